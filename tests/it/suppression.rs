//! Suppression (issue 22): a rule with `MODE = "suppress"` keeps the contacts it selects out of every
//! list it applies to, run as users run it (`segsync sync`) against the real sandbox over HTTP, on
//! the demo data's own opt-out field. Lists are checked exactly against predicates written here.
use std::path::{Path, PathBuf};

use segsync_sandbox::store::Contact;
use segsync_sandbox::{Sandbox, SandboxConfig};

use crate::support;

const EVERYONE: &str = "const LIST = \"Everyone\";\nconst REMOVE_AFTER = \"30d\";\nfn matches(c) { true }\n";
const OPTOUT: &str = "const MODE = \"suppress\";\nconst FILTER = #{ \"customFields.gdprOptOut\": \"true\" };\n\
                      fn matches(c) { c.customFields.gdprOptOut == true }\n";

fn setup(sandbox: &Sandbox, rules: &[(&str, &str)]) -> (tempfile::TempDir, PathBuf) {
    support::rules_folder(&sandbox.base_url(), rules, "[guards]\nmax_removal_share = 0.9\n")
}

async fn segsync(args: &[&str], config: &Path) -> (i32, String) {
    support::segsync(args, config).await
}

fn members(sandbox: &Sandbox, name: &str) -> Vec<String> {
    sandbox.with_store(|s| {
        let Some(list) = s.lists().iter().find(|l| l.name == name).map(|l| l.id.clone()) else { return Vec::new() };
        let mut ids = s.member_ids(&list).expect("members");
        ids.sort();
        ids
    })
}

fn opted_out(c: &Contact) -> bool {
    c.custom_fields.get("gdprOptOut").and_then(serde_json::Value::as_bool) == Some(true)
}

// Opted-out contacts are never added; a member who opts out leaves at once despite a 30-day
// REMOVE_AFTER, with the suppression as the reason in plan and history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opted_out_contacts_are_in_no_list() {
    let sandbox = support::start(SandboxConfig { churn_per_minute: 0, ..support::sandbox_config(2_000) }).await;
    let (_dir, config) = setup(&sandbox, &[("everyone", EVERYONE), ("optout", OPTOUT)]);
    let out_now = support::ids_where(&sandbox, opted_out);
    assert!(out_now.len() > 10, "the demo data has opt-outs: {}", out_now.len());
    let (code, out) = segsync(&["sync"], &config).await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(members(&sandbox, "Everyone"), support::ids_where(&sandbox, |c| !opted_out(c)));
    assert!(out.contains(&format!("{} matching contact(s) kept out", out_now.len())), "{out}");
    assert!(out.contains(&format!("suppressed {}", out_now.len())), "{out}");

    // A member opts out: the next sync removes them at once, not after 30 days.
    let leaver = members(&sandbox, "Everyone")[0].clone();
    sandbox
        .with_store(|s| s.update(&leaver, |c| drop(c.custom_fields.insert("gdprOptOut".into(), true.into()))))
        .expect("opt out");
    let (code, out) = segsync(&["plan", "everyone"], &config).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("suppressed: 1 member(s) removed at once, {} matching", out_now.len())), "{out}");
    let (code, out) = segsync(&["sync", "everyone"], &config).await;
    assert_eq!(code, 0, "a suppression rule applies to a pass that does not run it: {out}");
    assert!(!members(&sandbox, "Everyone").contains(&leaver), "removed at once");
    assert_eq!(members(&sandbox, "Everyone"), support::ids_where(&sandbox, |c| !opted_out(c)));
    let (code, out) = segsync(&["history", &leaver], &config).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("suppressed by rule optout"), "history names the suppression: {out}");
    let (code, out) = segsync(&["explain", "everyone", &leaver], &config).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("SUPPRESSED by rule optout"), "explain names the suppression: {out}");
    assert!(out.contains("not in the list") && out.contains("as it should be"), "{out}");
    sandbox.shutdown().await;
}

// A suppression rule that cannot judge a contact adds it to no list (privacy first) and removes no
// member on that error; SUPPRESS_FROM limits a suppression to the rules it names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unjudged_contact_is_not_added_and_not_removed() {
    let sandbox = support::start(SandboxConfig { churn_per_minute: 0, ..support::sandbox_config(500) }).await;
    // Reading the field strictly errors on every contact without it.
    let strict = "const MODE = \"suppress\";\nfn matches(c) { c.customFields.gdprOptOut == true }\n";
    let (dir, config) = setup(&sandbox, &[("everyone", EVERYONE)]);
    let (code, out) = segsync(&["sync"], &config).await;
    assert_eq!(code, 0, "{out}");
    let before = members(&sandbox, "Everyone");
    assert_eq!(before.len(), 500);

    std::fs::write(dir.path().join("rules/optout.rhai"), strict).expect("rule");
    let fresh = sandbox.with_store(|s| {
        let seq = s.next_contact_seq();
        let mut c = s.get(&before[0]).expect("a contact").clone();
        c.id = format!("cnt-new-{seq}");
        c.custom_fields.remove("gdprOptOut");
        s.create(c).id
    });
    let (code, out) = segsync(&["sync"], &config).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("such contacts are added to no list"), "{out}");
    let after = members(&sandbox, "Everyone");
    assert!(!after.contains(&fresh), "not added while the suppression cannot judge it");
    let opted: Vec<String> = support::ids_where(&sandbox, opted_out);
    assert!(!opted.is_empty());
    assert!(opted.iter().all(|id| !after.contains(id)), "the opted-out members it could judge left");
    assert_eq!(after.len(), before.len() - opted.len(), "no member left on an error");

    // Limited to another rule: this list is left alone and the new contact joins it.
    std::fs::write(dir.path().join("rules/other.rhai"), "const LIST = \"Other\";\nfn matches(c) { false }\n")
        .expect("rule");
    std::fs::write(dir.path().join("rules/optout.rhai"), format!("const SUPPRESS_FROM = [\"other\"];\n{strict}"))
        .expect("rule");
    let (code, out) = segsync(&["sync"], &config).await;
    assert_eq!(code, 0, "{out}");
    assert!(members(&sandbox, "Everyone").contains(&fresh), "{out}");
    sandbox.shutdown().await;
}

// A suppression rule file that does not load cannot keep its contacts out, so no list changes until
// it loads again (fails closed); any other broken file stops only itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_suppression_rule_changes_no_list() {
    let sandbox = support::start(SandboxConfig { churn_per_minute: 0, ..support::sandbox_config(300) }).await;
    let broken = "const MODE = \"suppress\";\nfn matches(c) { c.customFields.gdprOptOut == }\n";
    let other = "// const MODE = \"suppress\";\nconst LIST = \"Other\";\nfn matches(c) { true\n";
    let (dir, config) = setup(&sandbox, &[("everyone", EVERYONE), ("optout", broken), ("other", other)]);
    let (code, out) = segsync(&["sync"], &config).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("the suppression rule optout does not load"), "{out}");
    assert!(sandbox.with_store(|s| s.lists().is_empty()), "no list changed: {out}");

    std::fs::remove_file(dir.path().join("rules/optout.rhai")).expect("remove");
    let (code, out) = segsync(&["sync"], &config).await;
    assert_eq!(code, 3, "the broken `other` is only itself: {out}");
    assert_eq!(members(&sandbox, "Everyone").len(), 300, "{out}");
    sandbox.shutdown().await;
}
