//! Reconcile passes against the real sandbox over HTTP: lists end up holding exactly what the
//! rules select (checked by predicates written here, not by segsync's planner), changes move
//! exactly the changed contacts, nothing is written when nothing changed, and the guards hold.
use crate::support;

use std::collections::{BTreeSet, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use chrono::NaiveDate;
use segsync::ids::Account;
use segsync::reconcile::Guards;
use segsync::reconcile::{MemberSource, Outcome, Parts, PassReport, PassRequest, ReadKind, Reconciler, Trigger};
use segsync::rules::{self, Date, Rule};
use segsync::state::State;
use segsync_sandbox::store::Contact;
use segsync_sandbox::{Faults, Sandbox, SandboxConfig};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

fn guards() -> Guards {
    Guards { max_removal_share: 0.2, max_removals: None, max_error_share: 0.01, mass_removal_floor: 10 }
}

struct World {
    sandbox: Sandbox,
    reconciler: Reconciler,
    rules: Vec<Arc<Rule>>,
    _dir: tempfile::TempDir,
}

async fn world(config: SandboxConfig, rules_dir: &Path) -> World {
    world_in(config, rules_dir, chrono_tz::Europe::Rome).await
}

async fn world_in(config: SandboxConfig, rules_dir: &Path, time_zone: chrono_tz::Tz) -> World {
    let sandbox = support::start(config).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = rules::engine::build(time_zone);
    let (set, errors) = rules::load_dir(&engine, rules_dir);
    assert!(errors.is_empty(), "{errors:?}");
    let reconciler = Reconciler::new(Parts {
        gateway: support::gateway(&sandbox, segsync::gateway::RatePlan::Unlimited),
        account: Account::remote(&sandbox.base_url()),
        engine: Arc::new(engine),
        state: State::open(&dir.path().join("segsync.db")).expect("state"),
        guards: guards(),
        time_zone,
        cancel: CancellationToken::new(),
        verify_members_every: Duration::from_secs(86_400),
        default_remove_after: None,
        history_retention: Duration::from_secs(180 * 86_400),
        history_facts: true,
        max_lists_per_rule: segsync::config::DEFAULT_MAX_LISTS,
    });
    World { sandbox, reconciler, rules: set.iter().cloned().collect(), _dir: dir }
}

fn today() -> Date {
    Date(support::today())
}

impl World {
    async fn sync(&self) -> PassReport {
        self.pass(self.rules.clone(), false).await
    }

    async fn pass(&self, rules: Vec<Arc<Rule>>, allow_mass_removal: bool) -> PassReport {
        self.pass_at(rules, allow_mass_removal, None).await
    }

    async fn pass_at(
        &self,
        rules: Vec<Arc<Rule>>,
        allow_mass_removal: bool,
        now: Option<chrono::DateTime<chrono::Utc>>,
    ) -> PassReport {
        self.reconciler
            .run_pass(PassRequest {
                allow_mass_removal,
                today: Some(today()),
                now,
                ..PassRequest::new(rules, Trigger::Manual)
            })
            .await
    }

    /// The members of the list named `name`, read straight from the sandbox's data.
    fn members(&self, name: &str) -> BTreeSet<String> {
        self.sandbox.with_store(|s| {
            let lists: Vec<_> = s.lists().iter().filter(|l| l.name == name).map(|l| l.id.clone()).collect();
            assert_eq!(lists.len(), 1, "exactly one list named {name:?}");
            let q = segsync_sandbox::store::ContactQuery { list_ids: lists, ..Default::default() };
            let slots = s.search(&q).expect("search");
            slots.iter().filter_map(|&i| s.slot(i)).map(|c| c.id.clone()).collect()
        })
    }

    /// Contacts for which `pred` holds, read straight from the sandbox's data.
    fn expected(&self, pred: impl Fn(&Contact) -> bool) -> BTreeSet<String> {
        self.sandbox.with_store(|s| {
            let ids: Vec<String> = s.contact_ids().map(str::to_owned).collect();
            ids.into_iter().filter(|id| s.get(id).is_some_and(&pred)).collect()
        })
    }

    async fn api(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let url = format!("{}/partner-gateway/v1{path}", self.sandbox.base_url());
        let resp = support::http()
            .request(method, url)
            .header("X-Api-Key", support::KEY)
            .json(&body)
            .send()
            .await
            .expect("sent");
        assert!(resp.status().is_success(), "{path}: {}", resp.status());
        resp.json().await.expect("json")
    }
}

use crate::support::spent;

fn days_since_purchase(c: &Contact) -> Option<i64> {
    let d = c.custom_fields.get("lastPurchaseDate")?.as_str()?;
    let d = NaiveDate::parse_from_str(d, "%Y-%m-%d").ok()?;
    Some((support::today() - d).num_days())
}

/// The five shipped segments, written out independently of segsync's rule engine.
fn check_all_shipped(w: &World) {
    assert_eq!(w.members("VIP - Spend > 5000 EUR"), w.expected(|c| spent(c).is_some_and(|s| s > 5000.0)));
    assert_eq!(w.members("Re-engagement 90d"), w.expected(|c| days_since_purchase(c).is_some_and(|d| d > 90)));
    for region in ["Lombardia", "Veneto", "Emilia-Romagna"] {
        assert_eq!(
            w.members(&format!("Geo - {region}")),
            w.expected(|c| c.region.as_deref() == Some(region)),
            "{region}"
        );
    }
}

// First sync of the shipped rules on 20,000 contacts creates five lists holding exactly what each rule selects;
// a change moves exactly the changed contacts; a second unchanged sync writes nothing.
#[tokio::test]
async fn shipped_rules_sync_exactly() {
    let w = world(support::sandbox_config(20_000), Path::new("rules")).await;
    let first = w.sync().await;
    assert!(
        first.rules.iter().all(|r| r.outcome == Outcome::Ok),
        "{:#?}",
        first.rules.iter().map(|r| &r.detail).collect::<Vec<_>>()
    );
    assert_eq!(first.read, ReadKind::SharedScan, "the first pass knows no counts and must see everyone");
    check_all_shipped(&w);
    let stats = w.sandbox.stats();
    // One 400 that teaches the page size, 200 pages and the empty page that ends the read.
    assert_eq!(stats.count("GET /contacts"), 202, "one shared scan, no member reads of new lists: {stats:?}");
    assert_eq!(stats.count("POST /contacts/list"), 5);
    let adds: u64 = first.rules.iter().map(|r| (r.plan.to_add.len() as u64).div_ceil(1000)).sum();
    assert_eq!(stats.count("POST /contacts/list/contacts"), adds);

    // Change the data through the API: one becomes a VIP, one VIP moves to Veneto, a member is deleted,
    // a new lapsed customer signs up in Emilia-Romagna.
    let non_vip = w.expected(|c| spent(c).is_some_and(|s| s < 100.0) && c.region.as_deref() == Some("Sicilia"));
    let new_vip = non_vip.iter().next().expect("a small spender").clone();
    w.api(
        reqwest::Method::PUT,
        &format!("/contacts/{new_vip}"),
        json!({"customFields": {"totalSpent": 9100.0, "lastPurchaseDate": "2026-11-27"}}),
    )
    .await;
    let mover = w
        .expected(|c| spent(c).is_some_and(|s| s > 5000.0) && c.region.as_deref() == Some("Lombardia"))
        .into_iter()
        .next()
        .expect("a Lombard VIP");
    w.api(reqwest::Method::PUT, &format!("/contacts/{mover}"), json!({"region": "Veneto", "city": "Verona"})).await;
    let gone = w.members("Geo - Veneto").into_iter().next().expect("a Venetian");
    w.api(reqwest::Method::DELETE, &format!("/contacts/{gone}"), Value::Null).await;
    let born = w
        .api(
            reqwest::Method::POST,
            "/contacts",
            json!({"phoneNumber": "+393330000001", "region": "Emilia-Romagna",
            "customFields": {"totalSpent": 20.0, "lastPurchaseDate": "2025-01-01"}}),
        )
        .await;

    let before = w.sandbox.stats();
    let second = w.sync().await;
    assert!(second.rules.iter().all(|r| r.outcome == Outcome::Ok));
    check_all_shipped(&w);
    let by_rule = |name: &str| second.rules.iter().find(|r| r.rule.name.as_str() == name).expect("rule");
    assert_eq!((by_rule("vip").added, by_rule("vip").removed), (1, 0));
    assert_eq!(by_rule("vip").plan.to_add[0].as_str(), new_vip);
    assert_eq!((by_rule("geo-lombardia").added, by_rule("geo-lombardia").removed), (0, 1));
    assert_eq!(by_rule("geo-lombardia").plan.to_remove[0].as_str(), mover);
    assert_eq!(
        (by_rule("geo-veneto").added, by_rule("geo-veneto").removed),
        (1, 0),
        "the deleted member left by itself"
    );
    assert_eq!(by_rule("geo-emilia-romagna").plan.to_add[0].as_str(), born["id"].as_str().expect("id"));
    assert_eq!(by_rule("reengagement-90d").removed, 1, "the new VIP bought yesterday");
    // The deleted contact left its lists by itself: the scan did not return it, which accounts
    // for their smaller counts, so no list was read.
    assert!(second.rules.iter().all(|r| r.members_from == MemberSource::Cache), "{second:#?}");
    let writes = w.sandbox.stats().since(&before).writes();
    assert_eq!(
        writes,
        4 + 1 + 1,
        "four adds and one removal batch per changed list, nothing else: {:?}",
        w.sandbox.stats().since(&before)
    );

    // Nothing changed: zero writes.
    let before = w.sandbox.stats();
    let third = w.sync().await;
    assert!(third.rules.iter().all(|r| r.outcome == Outcome::Ok && r.plan.is_empty()));
    let delta = w.sandbox.stats().since(&before);
    assert_eq!(delta.writes(), 0, "{delta:?}");
    // Every list's members came from the cache: the scan (200 pages and the empty one) and the
    // directory were the whole pass.
    assert!(third.rules.iter().all(|r| r.members_from == MemberSource::Cache), "{third:#?}");
    assert_eq!(delta.count("GET /contacts"), 201, "{delta:?}");
    assert_eq!(delta.count("GET /contacts/list"), 1, "{delta:?}");
    check_all_shipped(&w);
    w.sandbox.shutdown().await;
}

// A rule edit that would drop 90 % of a list is held (adds still go); --allow-mass-removal applies it.
#[tokio::test]
async fn mass_removal_is_held_until_confirmed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rule = dir.path().join("spenders.rhai");
    std::fs::write(&rule, "const LIST = \"Spenders\";\nfn matches(c) { c.customFields.totalSpent > 200.0 }\n")
        .expect("write");
    let w = world(support::sandbox_config(3_000), dir.path()).await;
    let first = w.sync().await;
    assert_eq!(first.rules[0].outcome, Outcome::Ok);
    let before = w.members("Spenders");

    std::fs::write(
        &rule,
        "const LIST = \"Spenders\";\nfn matches(c) { c.customFields.totalSpent > 3000.0 || c.id == \"cnt-000001\" }\n",
    )
    .expect("write");
    let engine = rules::engine::build(chrono_tz::Europe::Rome);
    let edited = Arc::new(rules::load_file(&engine, &rule).expect("valid"));
    let held = w.pass(vec![edited.clone()], false).await;
    let r = &held.rules[0];
    assert_eq!(r.outcome, Outcome::Held, "{:?}", r.detail);
    assert!(r.detail.as_deref().unwrap_or_default().contains("--allow-mass-removal"));
    assert!(r.plan.to_remove.len() as f64 > 0.8 * before.len() as f64);
    assert_eq!(r.removed, 0);
    let now = w.members("Spenders");
    assert!(now.is_superset(&before), "nothing was removed");
    assert!(now.contains("cnt-000001"), "adds still go");

    let applied = w.pass(vec![edited], true).await;
    assert_eq!(applied.rules[0].outcome, Outcome::Ok);
    assert_eq!(w.members("Spenders"), w.expected(|c| spent(c).is_some_and(|s| s > 3000.0) || c.id == "cnt-000001"));
    w.sandbox.shutdown().await;
}

// A contact the rule errors on is never removed, even though its neighbours are.
#[tokio::test]
async fn evaluation_errors_never_remove() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rule = dir.path().join("loyal.rhai");
    std::fs::write(&rule, "const LIST = \"Loyal\";\nconst FILTER = #{ region: \"Molise\" };\nfn matches(c) { true }\n")
        .expect("write");
    let mut w = world(support::sandbox_config(4_000), dir.path()).await;
    w.reconciler = w.reconciler.clone().with_guards(Guards { max_error_share: 1.0, ..guards() });
    w.sync().await;
    let members: Vec<String> = w.members("Loyal").into_iter().collect();
    assert!(members.len() >= 6, "{members:?}");
    // Two members lose their spending field (the new rule cannot judge them), two fall below the bar.
    for id in &members[..2] {
        w.api(reqwest::Method::PUT, &format!("/contacts/{id}"), json!({"customFields": {"totalSpent": null}})).await;
    }
    for id in &members[2..4] {
        w.api(reqwest::Method::PUT, &format!("/contacts/{id}"), json!({"customFields": {"totalSpent": 1.0}})).await;
    }
    for id in &members[4..] {
        w.api(reqwest::Method::PUT, &format!("/contacts/{id}"), json!({"customFields": {"totalSpent": 100.0}})).await;
    }
    std::fs::write(&rule, "const LIST = \"Loyal\";\nconst FILTER = #{ region: \"Molise\" };\nfn matches(c) { c.customFields.totalSpent > 50.0 }\n").expect("write");
    let engine = rules::engine::build(chrono_tz::Europe::Rome);
    let edited = Arc::new(rules::load_file(&engine, &rule).expect("valid"));
    let report = w.pass(vec![edited], true).await;
    let r = &report.rules[0];
    assert_eq!(r.eval_errors, 2);
    assert!(r.first_error.as_deref().unwrap_or_default().contains("totalSpent"), "{:?}", r.first_error);
    let now = w.members("Loyal");
    assert!(now.contains(&members[0]) && now.contains(&members[1]), "errored contacts stay");
    assert!(!now.contains(&members[2]) && !now.contains(&members[3]), "failing contacts leave");

    // Above the error-share guard, the rule changes nothing at all.
    w.reconciler = w.reconciler.clone().with_guards(Guards { max_error_share: 0.01, ..guards() });
    let engine = rules::engine::build(chrono_tz::Europe::Rome);
    std::fs::write(&rule, "const LIST = \"Loyal\";\nconst FILTER = #{ region: \"Molise\" };\nfn matches(c) { c.customFields.totalSpent > 500.0 }\n").expect("write");
    let strict = Arc::new(rules::load_file(&engine, &rule).expect("valid"));
    let before = w.members("Loyal");
    let report = w.pass(vec![strict], true).await;
    assert_eq!(report.rules[0].outcome, Outcome::Failed);
    assert_eq!(w.members("Loyal"), before);
    w.sandbox.shutdown().await;
}

// With 500s, 429s and dropped connections, repeated syncs converge to the correct end state.
#[tokio::test]
async fn converges_under_faults() {
    let faults = Faults { latency: std::time::Duration::ZERO, error_rate: 0.05, throttle_rate: 0.02, drop_rate: 0.05 };
    let w = world(SandboxConfig { faults, ..support::sandbox_config(5_000) }, Path::new("rules")).await;
    // Converged: a pass in which every rule is ok with nothing left to do, within six passes.
    let mut converged = None;
    for pass in 1..=6 {
        let report = w.sync().await;
        if report.rules.iter().all(|r| r.outcome == Outcome::Ok && r.plan.is_empty()) {
            converged = Some(pass);
            break;
        }
    }
    assert!(converged.is_some(), "no clean pass within six passes");
    check_all_shipped(&w);
    let stats = w.sandbox.stats();
    assert!(stats.outcome_total("500") + stats.outcome_total("dropped") > 0, "faults happened: {stats:?}");
    let names: HashSet<String> = w.sandbox.with_store(|s| s.lists().iter().map(|l| l.name.clone()).collect());
    assert_eq!(names.len(), w.sandbox.with_store(|s| s.lists().len()), "no duplicate lists");
    w.sandbox.shutdown().await;
}

// A deleted list is recreated (with a warning) and refilled; a renamed LIST binds a new list.
#[tokio::test]
async fn deleted_list_is_recreated_and_renamed_list_rebinds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rule = dir.path().join("molise.rhai");
    std::fs::write(
        &rule,
        "const LIST = \"Molise\";\nconst FILTER = #{ region: \"Molise\" };\nfn matches(c) { true }\n",
    )
    .expect("write");
    let w = world(support::sandbox_config(3_000), dir.path()).await;
    let first = w.sync().await;
    let old_id = first.rules[0].list_id.clone().expect("list");
    // Someone deletes the list behind our back (the sandbox has no list DELETE, so drop it in the store).
    w.sandbox.with_store(|s| s.drop_list(old_id.as_str()));
    let second = w.sync().await;
    assert_eq!(second.rules[0].outcome, Outcome::Ok);
    assert_ne!(second.rules[0].list_id, Some(old_id));
    assert_eq!(w.members("Molise"), w.expected(|c| c.region.as_deref() == Some("Molise")));

    std::fs::write(
        &rule,
        "const LIST = \"Molise 2027\";\nconst FILTER = #{ region: \"Molise\" };\nfn matches(c) { true }\n",
    )
    .expect("write");
    let engine = rules::engine::build(chrono_tz::Europe::Rome);
    let renamed = Arc::new(rules::load_file(&engine, &rule).expect("valid"));
    w.pass(vec![renamed], false).await;
    assert_eq!(w.members("Molise 2027"), w.members("Molise"), "new list filled, old one left as it was");
    w.sandbox.shutdown().await;
}

// Run alone after a first pass, a FILTER rule reads only its members and its filtered non-members
// (`FILTER & notListIds`), not the whole address book; a newcomer matching it is still added.
#[tokio::test]
async fn filtered_rule_alone_reads_only_its_slice() {
    let w = world(support::sandbox_config(20_000), Path::new("rules")).await;
    w.sync().await;
    let newcomer = w
        .api(
            reqwest::Method::POST,
            "/contacts",
            json!({"email": "new@example.it", "region": "Veneto", "customFields": {}}),
        )
        .await;
    let veneto: Vec<Arc<Rule>> = w.rules.iter().filter(|r| r.name.as_str() == "geo-veneto").cloned().collect();
    let before = w.sandbox.stats();
    let report = w.pass(veneto, false).await;
    assert_eq!(report.read, ReadKind::OwnRead);
    let r = &report.rules[0];
    assert_eq!(r.plan.to_add.iter().map(|id| id.as_str()).collect::<Vec<_>>(), [newcomer["id"].as_str().expect("id")]);
    let delta = w.sandbox.stats().since(&before);
    let member_pages = r.members_before.div_ceil(100);
    assert_eq!(
        delta.count("GET /contacts"),
        member_pages + 1,
        "members, then one page of filtered non-members: {delta:?}"
    );
    assert_eq!(w.members("Geo - Veneto"), w.expected(|c| c.region.as_deref() == Some("Veneto")));
    w.sandbox.shutdown().await;
}

// The lapsed rule has no FILTER, but its `matches` implies one: only contacts whose last purchase
// is over 90 days old can match. Run alone, its own read asks the server for exactly those
// (`customFields.lastPurchaseDate.before`, two days of margin) among the non-members, and the list
// is still exactly what `matches` selects.
#[tokio::test]
async fn derived_filter_narrows_the_lapsed_rules_own_read() {
    let w = world(support::sandbox_config(20_000), Path::new("rules")).await;
    w.sync().await;
    // The second pass counts what the rule's own read would return now (no lapsed non-members).
    w.sync().await;
    let lapsed = w
        .api(
            reqwest::Method::POST,
            "/contacts",
            json!({"email": "old@example.it", "customFields": {"lastPurchaseDate": "2025-01-01"}}),
        )
        .await;
    let recent = (support::today() - chrono::Days::new(10)).format("%Y-%m-%d").to_string();
    w.api(
        reqwest::Method::POST,
        "/contacts",
        json!({"email": "new@example.it", "customFields": {"lastPurchaseDate": recent}}),
    )
    .await;
    let rule: Vec<Arc<Rule>> = w.rules.iter().filter(|r| r.name.as_str() == "reengagement-90d").cloned().collect();
    let before = w.sandbox.stats();
    let report = w.pass(rule, false).await;
    assert_eq!(report.read, ReadKind::OwnRead);
    let r = &report.rules[0];
    let bound = (support::today() - chrono::Days::new(88)).format("%Y-%m-%d").to_string();
    assert_eq!(r.derived_filter, [("customFields.lastPurchaseDate.before".to_owned(), bound)]);
    assert_eq!(r.plan.to_add.iter().map(|id| id.as_str()).collect::<Vec<_>>(), [lapsed["id"].as_str().expect("id")]);
    // Members, the one lapsed non-member, and the two days of margin (bought 89 or 90 days ago).
    let margin = w.expected(|c| matches!(days_since_purchase(c), Some(89 | 90))).len() as u64;
    assert_eq!(r.scanned, r.members_before + 1 + margin);
    let delta = w.sandbox.stats().since(&before);
    assert_eq!(delta.count("GET /contacts"), r.members_before.div_ceil(100) + 1, "{delta:?}");
    assert_eq!(w.members("Re-engagement 90d"), w.expected(|c| days_since_purchase(c).is_some_and(|d| d > 90)));
    w.sandbox.shutdown().await;
}

/// The id of the list named `name` on the sandbox.
fn list_id(w: &World, name: &str) -> String {
    w.sandbox.with_store(|s| s.lists().iter().find(|l| l.name == name).map(|l| l.id.clone()).expect("list"))
}

// Someone edits a list by hand: a member removed, a non-qualifying contact added. Each changes the
// list's count, so the next pass reads that list instead of trusting the cache, and puts it right.
// A swap that keeps the count is found when the cache is older than `verify_members_every`.
#[tokio::test]
async fn hand_edits_are_corrected_in_the_next_pass() {
    let w = world(support::sandbox_config(5_000), Path::new("rules")).await;
    w.sync().await;
    let vip = list_id(&w, "VIP - Spend > 5000 EUR");
    let qualifying = w.members("VIP - Spend > 5000 EUR");
    let taken = qualifying.iter().next().expect("a VIP").clone();
    w.api(reqwest::Method::DELETE, "/contacts/list/contacts", json!({"listIds": [vip], "contactIds": [taken]})).await;
    let report = w.sync().await;
    let vip_run = report.rules.iter().find(|r| r.rule.name.as_str() == "vip").expect("vip");
    assert_eq!(vip_run.members_from, MemberSource::Read, "the count changed: read, not cached");
    assert_eq!(vip_run.plan.to_add.iter().map(|c| c.as_str()).collect::<Vec<_>>(), [taken.as_str()]);
    assert_eq!(w.members("VIP - Spend > 5000 EUR"), qualifying, "the removed member is back");
    assert!(
        report.rules.iter().filter(|r| r.rule.name.as_str() != "vip").all(|r| r.members_from == MemberSource::Cache)
    );

    let intruder = w.expected(|c| spent(c).is_some_and(|s| s < 10.0)).into_iter().next().expect("a small spender");
    w.api(reqwest::Method::POST, "/contacts/list/contacts", json!({"listId": vip, "contactIds": [intruder]})).await;
    let report = w.sync().await;
    let vip_run = report.rules.iter().find(|r| r.rule.name.as_str() == "vip").expect("vip");
    assert_eq!(vip_run.members_from, MemberSource::Read);
    assert_eq!(vip_run.plan.to_remove.iter().map(|c| c.as_str()).collect::<Vec<_>>(), [intruder.as_str()]);
    assert_eq!(w.members("VIP - Spend > 5000 EUR"), qualifying, "the hand-added contact is gone");
    let settled = w.sync().await;
    assert!(settled.rules.iter().all(|r| r.members_from == MemberSource::Cache && r.plan.is_empty()));

    // A swap keeps the count: the cache cannot see it, a reconciler whose cache has expired does.
    let taken = qualifying.iter().nth(1).expect("another VIP").clone();
    w.api(reqwest::Method::DELETE, "/contacts/list/contacts", json!({"listIds": [vip], "contactIds": [taken]})).await;
    w.api(reqwest::Method::POST, "/contacts/list/contacts", json!({"listId": vip, "contactIds": [intruder]})).await;
    let blind = w.sync().await;
    let vip_run = blind.rules.iter().find(|r| r.rule.name.as_str() == "vip").expect("vip");
    assert_eq!((vip_run.members_from, vip_run.plan.is_empty()), (MemberSource::Cache, true), "{vip_run:#?}");
    let expired = World {
        reconciler: Reconciler::new(Parts {
            gateway: support::gateway(&w.sandbox, segsync::gateway::RatePlan::Unlimited),
            account: Account::remote(&w.sandbox.base_url()),
            engine: Arc::new(rules::engine::build(chrono_tz::Europe::Rome)),
            state: State::open(&w._dir.path().join("segsync.db")).expect("state"),
            guards: guards(),
            time_zone: chrono_tz::Europe::Rome,
            cancel: CancellationToken::new(),
            verify_members_every: Duration::ZERO,
            default_remove_after: None,
            history_retention: Duration::from_secs(180 * 86_400),
            history_facts: true,
            max_lists_per_rule: segsync::config::DEFAULT_MAX_LISTS,
        }),
        ..w
    };
    let report = expired.sync().await;
    assert!(report.rules.iter().all(|r| r.members_from == MemberSource::Read));
    assert_eq!(expired.members("VIP - Spend > 5000 EUR"), qualifying, "the swap is undone");
    expired.sandbox.shutdown().await;
}

// REMOVE_AFTER = "3d": a member failing for less than three days stays (pending, counted), one
// qualifying again in between starts afresh, and one failing for longer is removed, with the
// fact that made it fail in the history. The first failing time survives a restart.
#[tokio::test]
async fn removal_grace_waits_out_remove_after() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("spenders.rhai"),
        "const LIST = \"Spenders\";\nconst REMOVE_AFTER = \"3d\";\nfn matches(c) { c.customFields.totalSpent > 200.0 }\n",
    )
    .expect("write");
    let w = world(support::sandbox_config(2_000), dir.path()).await;
    let t0 = chrono::Utc::now();
    let day = |n: i64| t0 + chrono::Duration::days(n);
    w.pass_at(w.rules.clone(), false, Some(t0)).await;
    let members = w.members("Spenders");
    let mut spenders = members.iter().cloned();
    let (leaving, flapping) = (spenders.next().expect("a spender"), spenders.next().expect("another"));
    let spend = |amount: f64| json!({"customFields": {"totalSpent": amount}});
    w.api(reqwest::Method::PUT, &format!("/contacts/{leaving}"), spend(10.0)).await;
    w.api(reqwest::Method::PUT, &format!("/contacts/{flapping}"), spend(10.0)).await;

    let one = w.pass_at(w.rules.clone(), false, Some(day(1))).await;
    let pending: Vec<&str> = one.rules[0].plan.pending.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(pending.len(), 2, "{pending:?}");
    assert!(one.rules[0].plan.to_remove.is_empty() && one.rules[0].removed == 0);
    assert_eq!(w.members("Spenders"), members, "kept within the grace");

    // The flapping one qualifies again on day 2: its grace starts afresh if it fails again.
    w.api(reqwest::Method::PUT, &format!("/contacts/{flapping}"), spend(900.0)).await;
    let two = w.pass_at(w.rules.clone(), false, Some(day(2))).await;
    assert_eq!(two.rules[0].plan.pending.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>(), [leaving.as_str()]);
    w.api(reqwest::Method::PUT, &format!("/contacts/{flapping}"), spend(10.0)).await;

    // A restart: a new reconciler on the same state file.
    let restarted = World {
        reconciler: Reconciler::new(Parts {
            gateway: support::gateway(&w.sandbox, segsync::gateway::RatePlan::Unlimited),
            account: Account::remote(&w.sandbox.base_url()),
            engine: Arc::new(rules::engine::build(chrono_tz::Europe::Rome)),
            state: State::open(&w._dir.path().join("segsync.db")).expect("state"),
            guards: guards(),
            time_zone: chrono_tz::Europe::Rome,
            cancel: CancellationToken::new(),
            verify_members_every: Duration::from_secs(86_400),
            default_remove_after: None,
            history_retention: Duration::from_secs(180 * 86_400),
            history_facts: true,
            max_lists_per_rule: segsync::config::DEFAULT_MAX_LISTS,
        }),
        ..w
    };
    // Day 4 and a second: the leaving one has failed since day 1, over 3 days; the flapping one
    // failed again after day 2, so its grace started afresh and it is still pending.
    let four = restarted.pass_at(restarted.rules.clone(), false, Some(day(4) + chrono::Duration::seconds(1))).await;
    let r = &four.rules[0];
    assert_eq!(r.plan.to_remove.iter().map(|id| id.as_str()).collect::<Vec<_>>(), [leaving.as_str()]);
    assert_eq!(r.plan.pending.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>(), [flapping.as_str()]);
    assert_eq!(r.removed, 1);
    assert!(!restarted.members("Spenders").contains(&leaving));
    assert!(restarted.members("Spenders").contains(&flapping));

    let state = State::open(&restarted._dir.path().join("segsync.db")).expect("state");
    let history = state.history_of_contact(&leaving).expect("history");
    assert_eq!(history[0].action, segsync::state::Action::Removed);
    assert_eq!(history[0].reason, "matches returned false: totalSpent = 10.0");
    assert!(history[0].at.starts_with(&(day(4)).format("%Y-%m-%d").to_string()), "{history:?}");
    restarted.sandbox.shutdown().await;
}

// The derived date filter holds in every zone: in Pacific/Pago_Pago (UTC−11), a purchase stamped
// `…T00:30:00+14:00` whose local date is 91 days ago is written two days later than that local
// date. `matches` selects it, and the own read the derived filter narrows still returns it, so
// the sync adds it (with one day of margin the server excluded it and sync never did).
#[tokio::test]
async fn derived_filter_keeps_far_zone_stamps() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("lapsed.rhai"),
        "const LIST = \"Lapsed\";\nfn matches(c) { days_since(c.customFields.lastPurchaseDate) > 90 }\n",
    )
    .expect("rule");
    let w = world_in(support::sandbox_config(300), dir.path(), chrono_tz::Pacific::Pago_Pago).await;
    // Everyone bought recently, so the rule's own read is what a pass takes.
    let recent = (support::today() - chrono::Days::new(3)).format("%Y-%m-%d").to_string();
    let ids: Vec<String> = w.sandbox.with_store(|s| s.contact_ids().map(str::to_owned).collect());
    for id in &ids {
        let url = format!("/contacts/{id}");
        w.api(reqwest::Method::PUT, &url, json!({"customFields": {"lastPurchaseDate": recent}})).await;
    }
    w.sync().await;
    w.sync().await;
    // Local date in Pago Pago: today − 91; written (at +14:00): today − 89.
    let written = (support::today() - chrono::Days::new(89)).format("%Y-%m-%d");
    let far = w
        .api(
            reqwest::Method::POST,
            "/contacts",
            json!({"email": "far@example.it", "customFields": {"lastPurchaseDate": format!("{written}T00:30:00+14:00")}}),
        )
        .await;
    let report = w.sync().await;
    assert_eq!(report.read, ReadKind::OwnRead, "the derived filter narrows this read");
    assert_eq!(report.rules[0].outcome, Outcome::Ok);
    let far_id = far["id"].as_str().expect("id").to_owned();
    assert_eq!(w.members("Lapsed"), BTreeSet::from([far_id]), "the far-zone contact is added, nobody else");
    w.sandbox.shutdown().await;
}

// A list is created only by a run that can write (issue 21): a rule that errors on every contact
// is refused by the error-share guard and leaves no list on the gateway, in `plan` as in `sync`;
// once fixed, its first run creates the list and fills it.
#[tokio::test]
async fn a_rule_that_cannot_judge_creates_no_list() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rule = dir.path().join("broken.rhai");
    std::fs::write(&rule, "const LIST = \"Broken\";\nfn matches(c) { c.customFields.noSuchField > 1 }\n")
        .expect("rule");
    let w = world(support::sandbox_config(300), dir.path()).await;
    let lists = |w: &World| w.sandbox.with_store(|s| s.lists().iter().filter(|l| l.name == "Broken").count());
    let report = w.sync().await;
    let run = &report.rules[0];
    assert_eq!(run.outcome, Outcome::Failed, "{run:?}");
    assert!(run.detail.as_deref().is_some_and(|d| d.contains("max_error_share")), "{run:?}");
    assert_eq!((run.list_id.clone(), lists(&w)), (None, 0), "no list for a rule that cannot judge");

    std::fs::write(&rule, "const LIST = \"Broken\";\nfn matches(c) { c.region == \"Veneto\" }\n").expect("fix");
    let engine = rules::engine::build(chrono_tz::UTC);
    let fixed = Arc::new(rules::load_file(&engine, &rule).expect("fixed rule"));
    let report = w.pass(vec![fixed], false).await;
    assert_eq!(report.rules[0].outcome, Outcome::Ok, "{:?}", report.rules[0]);
    assert!(report.rules[0].list_created);
    assert_eq!(lists(&w), 1);
    assert_eq!(w.members("Broken"), w.expected(|c| c.region.as_deref() == Some("Veneto")));
    w.sandbox.shutdown().await;
}
