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
