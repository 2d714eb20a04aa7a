//! Partitioned rules (issue 22): one rule, one list per value of `fn list(contact)`, run as users
//! run them (`segsync sync`) against the real sandbox over HTTP. Every list is checked exactly
//! against a predicate written here, independently of the rule.
use std::path::{Path, PathBuf};

use segsync_sandbox::store::Contact;
use segsync_sandbox::{Sandbox, SandboxConfig};

use crate::support;

const REGIONS: [&str; 3] = ["Lombardia", "Veneto", "Emilia-Romagna"];

fn geo_rule(regions: &[&str], extra: &str) -> String {
    let quoted: Vec<String> = regions.iter().map(|r| format!("{r:?}")).collect();
    format!(
        "// One list per region.\n{extra}fn list(contact) {{\n    let region = contact.region;\n    \
         if region in [{}] {{ \"Geo - \" + region }}\n}}\n",
        quoted.join(", ")
    )
}

fn setup(sandbox: &Sandbox, rule: &str) -> (tempfile::TempDir, PathBuf) {
    support::rules_folder(&sandbox.base_url(), &[("geo", rule)], "")
}

async fn segsync(args: &[&str], config: &Path) -> (i32, String) {
    support::segsync(args, config).await
}

/// The ids in the list named `name` (none when there is no such list), sorted.
fn members(sandbox: &Sandbox, name: &str) -> Option<Vec<String>> {
    sandbox.with_store(|s| {
        let list = s.lists().iter().find(|l| l.name == name)?.id.clone();
        let mut ids = s.member_ids(&list).ok()?;
        ids.sort();
        Some(ids)
    })
}

fn in_region(sandbox: &Sandbox, region: &str) -> Vec<String> {
    support::ids_where(sandbox, |c: &Contact| c.region.as_deref() == Some(region))
}

/// Each region's list, as it stands.
fn region_lists(sandbox: &Sandbox, regions: &[&str]) -> Vec<Option<Vec<String>>> {
    regions.iter().map(|r| members(sandbox, &format!("Geo - {r}"))).collect()
}

/// Each region's list holds exactly that region's contacts.
fn assert_lists_follow_regions(sandbox: &Sandbox, regions: &[&str]) {
    for region in regions {
        assert_eq!(members(sandbox, &format!("Geo - {region}")), Some(in_region(sandbox, region)), "{region}");
    }
}

/// 2,000 contacts without churn, the geo rule's first sync (checked): the sandbox, the folder,
/// its config and what the sync printed.
async fn first_sync() -> (Sandbox, tempfile::TempDir, PathBuf, String) {
    let sandbox = support::start(SandboxConfig { churn_per_minute: 0, ..support::sandbox_config(2_000) }).await;
    let (dir, config) = setup(&sandbox, &geo_rule(&REGIONS, ""));
    let (code, out) = segsync(&["sync"], &config).await;
    assert_eq!(code, 0, "{out}");
    assert_lists_follow_regions(&sandbox, &REGIONS);
    (sandbox, dir, config, out)
}

fn move_to(sandbox: &Sandbox, id: &str, region: &str) {
    sandbox.with_store(|s| s.update(id, |c| c.region = Some(region.into()))).expect("update");
}

// A partitioned rule fills one list per value; a contact whose value changes leaves its old list
// and joins the new one in the same sync; a new value gets its list in the same sync; a value no
// contact returns any more keeps its list, emptied under the mass-removal guard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_rule_fills_one_list_per_value_and_contacts_move() {
    let (sandbox, dir, config, out) = first_sync().await;
    assert!(out.contains("geo:Geo - Veneto → \"Geo - Veneto\""), "every output names the list: {out}");

    // Two moves: Lombardia → Veneto, and Veneto → a region with no list.
    let (mover, leaver) = (in_region(&sandbox, "Lombardia")[0].clone(), in_region(&sandbox, "Veneto")[0].clone());
    move_to(&sandbox, &mover, "Veneto");
    move_to(&sandbox, &leaver, "Lazio");
    let (code, out) = segsync(&["sync"], &config).await;
    assert_eq!(code, 0, "{out}");
    assert_lists_follow_regions(&sandbox, &REGIONS);
    assert!(members(&sandbox, "Geo - Veneto").expect("list").contains(&mover), "joined the new list");
    assert!(!members(&sandbox, "Geo - Lombardia").expect("list").contains(&mover), "left the old one");

    // A new value: its list is created and filled in the same sync.
    std::fs::write(
        dir.path().join("rules/geo.rhai"),
        geo_rule(&["Lombardia", "Veneto", "Emilia-Romagna", "Lazio"], ""),
    )
    .expect("edit");
    let (code, out) = segsync(&["sync"], &config).await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(members(&sandbox, "Geo - Lazio"), Some(in_region(&sandbox, "Lazio")));

    // Veneto no longer returned: its list is kept; emptying it all is a mass removal, held.
    std::fs::write(dir.path().join("rules/geo.rhai"), geo_rule(&["Lombardia", "Emilia-Romagna", "Lazio"], ""))
        .expect("edit");
    let veneto = members(&sandbox, "Geo - Veneto").expect("list");
    let (code, out) = segsync(&["sync"], &config).await;
    assert_eq!(code, 4, "held: {out}");
    assert!(out.contains("no contact is named into \"Geo - Veneto\" any more: the list is kept"), "reported: {out}");
    assert_eq!(members(&sandbox, "Geo - Veneto"), Some(veneto), "held, not emptied");
    let (code, out) = segsync(&["sync", "geo", "--allow-mass-removal"], &config).await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(members(&sandbox, "Geo - Veneto"), Some(Vec::new()), "emptied, and the list is kept");
    sandbox.shutdown().await;
}

// A rule that would fill more lists than MAX_LISTS (or [rules] max_lists_per_rule) changes
// nothing, and says how many and which; `fn list(c) { c.id }` cannot create 2,000 lists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_lists_than_allowed_change_nothing() {
    let sandbox = support::start(SandboxConfig { churn_per_minute: 0, ..support::sandbox_config(2_000) }).await;
    let (dir, config) = setup(&sandbox, &geo_rule(&REGIONS, "const MAX_LISTS = 2;\n"));
    let (code, out) = segsync(&["sync"], &config).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("fn list names 3 lists, more than MAX_LISTS 2"), "{out}");
    assert!(out.contains("Most contacts: \"Geo - Lombardia\""), "{out}");
    assert!(sandbox.with_store(|s| s.lists().is_empty()), "no list was created");

    std::fs::write(dir.path().join("rules/geo.rhai"), "fn list(c) { c.id }\n").expect("edit");
    let (code, out) = segsync(&["sync"], &config).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("lists, more than MAX_LISTS 50"), "the configured default: {out}");
    assert!(sandbox.with_store(|s| s.lists().is_empty()), "no list was created");

    // A list another rule fills by LIST is not taken over: the partitioned rule changes nothing.
    std::fs::write(dir.path().join("rules/geo.rhai"), geo_rule(&REGIONS, "")).expect("edit");
    std::fs::write(dir.path().join("rules/veneto.rhai"), "const LIST = \"Geo - Veneto\";\nfn matches(c) { false }\n")
        .expect("rule");
    // Even when the other rule is not in the pass.
    let (code, out) = segsync(&["sync", "geo"], &config).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("fn list names \"Geo - Veneto\", which is the LIST of rule veneto"), "{out}");
    assert!(members(&sandbox, "Geo - Lombardia").is_none(), "nothing changed");
    sandbox.shutdown().await;
}

// A rule that filled lists before learns new ones from the pass's own read: a no-change sync
// reads the contacts once, not once more to find its lists. A slip found on that read (a `fn
// list` naming a list per contact, or a list another rule fills) still changes nothing before
// any list is touched: no member leaves, none joins, no list is created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn known_lists_learn_new_ones_from_the_pass_read() {
    let (sandbox, dir, config, _) = first_sync().await;
    let filled = region_lists(&sandbox, &REGIONS);

    // No change: one read of every contact (20 pages of 100 and the one that ends it).
    let before = sandbox.stats();
    let (code, out) = segsync(&["sync"], &config).await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(sandbox.stats().since(&before).count("GET /contacts"), 21, "one read: {out}");

    // A mover and a typo in the same pass: the typo is found on the read, and nothing moves.
    let mover = in_region(&sandbox, "Lombardia")[0].clone();
    move_to(&sandbox, &mover, "Veneto");
    std::fs::write(dir.path().join("rules/geo.rhai"), "fn list(c) { c.id }\n").expect("edit");
    let (code, out) = segsync(&["sync"], &config).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("lists, more than MAX_LISTS 50"), "{out}");
    assert_eq!(region_lists(&sandbox, &REGIONS), filled, "no list changed");
    assert_eq!(sandbox.with_store(|s| s.lists().len()), 3, "no list was created");

    // A new value whose list another rule fills: refused whole, the mover still where it was.
    std::fs::write(
        dir.path().join("rules/geo.rhai"),
        geo_rule(&["Lombardia", "Veneto", "Emilia-Romagna", "Lazio"], ""),
    )
    .expect("edit");
    std::fs::write(dir.path().join("rules/lazio.rhai"), "const LIST = \"Geo - Lazio\";\nfn matches(c) { false }\n")
        .expect("rule");
    move_to(&sandbox, &in_region(&sandbox, "Veneto")[1].clone(), "Lazio");
    let (code, out) = segsync(&["sync", "geo"], &config).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("fn list names \"Geo - Lazio\", which is the LIST of rule lazio"), "{out}");
    assert_eq!(region_lists(&sandbox, &REGIONS), filled, "no list changed");

    // Without the other rule, the new list is created and filled in the same sync, and the mover moves.
    std::fs::remove_file(dir.path().join("rules/lazio.rhai")).expect("remove");
    let (code, out) = segsync(&["sync"], &config).await;
    assert_eq!(code, 0, "{out}");
    assert_lists_follow_regions(&sandbox, &["Lombardia", "Veneto", "Emilia-Romagna", "Lazio"]);
    assert!(members(&sandbox, "Geo - Veneto").expect("list").contains(&mover), "joined the new list");
    sandbox.shutdown().await;
}

/// `segsync sync` on `config` with JSON logs: each `rule run` event's counts, by list name.
async fn sync_runs(config: &Path) -> std::collections::BTreeMap<String, Vec<(String, serde_json::Value)>> {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_segsync"));
    cmd.args(["sync", "--log-format", "json", "--config"])
        .arg(config)
        .env(support::KEY_VAR, support::KEY)
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null());
    let out = tokio::task::spawn_blocking(move || cmd.output().expect("runs")).await.expect("join");
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(0), "{text}");
    // The findings as `sync` prints them under each list: how many contacts were judged.
    let mut judged = std::collections::BTreeMap::new();
    let mut list = String::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some((_, name)) = line.split_once("→ \"Geo - ") {
            list = name.split('"').next().unwrap_or_default().to_lowercase().replace('-', "");
        } else if let Some((_, count)) = line.split_once("is absent on all ") {
            judged.insert(list.clone(), count.to_owned());
        }
    }
    const COUNTS: [&str; 12] = [
        "read_plan",
        "members_from",
        "scanned",
        "matched",
        "members_before",
        "added",
        "removed",
        "to_add",
        "to_remove",
        "eval_errors",
        "absent_fields",
        "filter_matched_none",
    ];
    let mut runs = std::collections::BTreeMap::new();
    for event in text.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()) {
        let (Some("rule run"), Some(rule)) = (event["message"].as_str(), event["rule"].as_str()) else { continue };
        if rule == "geo" {
            continue; // the partitioned rule's summary of its lists
        }
        // `geo:Geo - Emilia-Romagna` (a partition) and `emiliaromagna` (an ordinary rule) fill one list.
        let list = rule.rsplit_once(':').map_or(rule, |(_, list)| list.trim_start_matches("Geo - "));
        let list = list.to_lowercase().replace('-', "");
        let mut counts: Vec<(String, serde_json::Value)> =
            COUNTS.iter().map(|k| ((*k).to_owned(), event[*k].clone())).collect();
        counts.push(("absent_on".to_owned(), judged.get(&list).cloned().into()));
        runs.insert(list, counts);
    }
    runs
}

// The lists of a partitioned rule are judged as a group on the shared read (one finding and one
// `fn list` call per record for all of them, each list's members taken off its candidates). Every
// count a run reports, its findings included, and every list equal what ordinary rules (one per
// list, judged one by one) give on the same data: a first sync, a sync after a move, a hand edit
// and a contact the rules cannot judge, and a sync with no change, whose lists come from the cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_rules_lists_count_as_ordinary_rules_do() {
    // Every list reads `tier`, which no contact has: a finding counting the contacts judged.
    let tier = "let tier = contact.customFields.get(\"tier\");\n    ";
    let partitioned =
        vec![("geo".to_owned(), geo_rule(&REGIONS, "").replace("let region", &format!("{tier}let region")))];
    let ordinary: Vec<(String, String)> = REGIONS
        .iter()
        .map(|r| {
            let file = r.to_lowercase().replace('-', "");
            let body = format!(
                "const LIST = \"Geo - {r}\";\nfn matches(contact) {{\n    {tier}\
                 let region = contact.region;\n    region in {REGIONS:?} && region == {r:?}\n}}\n"
            );
            (file, body)
        })
        .collect();
    let mut sides = Vec::new();
    for rules in [&partitioned, &ordinary] {
        let sandbox = support::start(SandboxConfig { churn_per_minute: 0, ..support::sandbox_config(2_000) }).await;
        let files: Vec<(&str, &str)> = rules.iter().map(|(n, t)| (n.as_str(), t.as_str())).collect();
        let (dir, config) = support::rules_folder(&sandbox.base_url(), &files, "");
        sides.push((sandbox, dir, config));
    }
    let mut first = Vec::new();
    for (_, _, config) in &sides {
        first.push(sync_runs(config).await);
    }
    assert_eq!(first[0].len(), 3, "{:?}", first[0]);
    assert_eq!(first[0], first[1], "first sync");

    let sms = |s: &Sandbox, region: &str| {
        support::ids_where(s, |c: &Contact| {
            c.region.as_deref() == Some(region)
                && c.custom_fields.get("preferredChannel").and_then(|v| v.as_str()) == Some("SMS")
        })
    };
    let mut second = Vec::new();
    for (sandbox, _, config) in &sides {
        let (lombardia, veneto) = (sms(sandbox, "Lombardia"), sms(sandbox, "Veneto"));
        move_to(sandbox, &lombardia[0], "Veneto");
        sandbox.with_store(|s| s.update(&lombardia[1], |c| c.region = None)).expect("no region");
        let list = sandbox.with_store(|s| s.lists().iter().find(|l| l.name == "Geo - Lombardia").map(|l| l.id.clone()));
        let list = list.expect("Lombardia's list");
        sandbox.with_store(|s| s.add_members(&list, &[veneto[0].clone()])).expect("hand edit");
        second.push(sync_runs(config).await);
    }
    assert_eq!(second[0], second[1], "after the changes");
    let lombardia = &second[0]["lombardia"];
    let count = |k: &str| lombardia.iter().find(|(name, _)| name == k).map(|(_, v)| v.clone());
    assert_eq!(count("eval_errors"), Some(1.into()), "no region: {lombardia:?}");
    assert_eq!(count("removed"), Some(2.into()), "the mover and the hand-added contact: {lombardia:?}");
    assert_eq!(count("absent_fields"), Some("tier".into()), "{lombardia:?}");
    assert_eq!(count("absent_on"), Some("2,000 contacts".into()), "each contact once, member or not: {lombardia:?}");

    let mut third = Vec::new();
    for (_, _, config) in &sides {
        third.push(sync_runs(config).await);
    }
    assert_eq!(third[0], third[1], "no change");
    for runs in third[0].values() {
        assert!(runs.contains(&("members_from".to_owned(), "cache".into())), "judged on the shared read: {runs:?}");
    }
    for region in REGIONS {
        let name = format!("Geo - {region}");
        assert_eq!(members(&sides[0].0, &name), members(&sides[1].0, &name), "{region}");
    }
    for (sandbox, _, _) in sides {
        sandbox.shutdown().await;
    }
}
