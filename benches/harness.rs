//! The performance harness: segsync's reconcile passes (in this process, release mode) against the
//! sandbox (a child process), with API requests next to the lower bound the API allows, wall time,
//! CPU, peak memory, and evaluations per second. Prints a Markdown table; asserts nothing.
//!
//! Run: `cargo bench --bench harness` (all scenarios) or `cargo bench --bench harness -- s1 s3`.
//!
//! Lower bound of one pass, from the API's own limits (`page` contacts per page: 100 on the seed's
//! server, 1,000 on the reference's page-based one; 1,000 ids per write):
//!   reads     first pass: min(⌈contacts/page⌉, Σ over rules ⌈non-members passing FILTER/page⌉);
//!             later passes, with the membership cache: min(⌈contacts/page⌉, Σ over rules
//!             ⌈own candidates/page⌉ + ⌈members/page⌉) (the scan judges cached members on their
//!             records; own reads must read members)
//!   lists     ⌈lists/page⌉ (the directory) + one create per new list
//!   writes    Σ ⌈adds/1000⌉ + Σ ⌈removals/1000⌉
//! A no-change pass with a trusted cache is bounded by ⌈contacts/page⌉ + ⌈lists/page⌉.
//!
//! CPU is also given as a multiple of a baseline measured in the same run: parsing the same page
//! bytes into `serde_json::Value` on one thread, per record, timed in five rounds right before and
//! five right after each pass (on a rate-limited plan, once after the last). On an unlimited plan
//! the no-change pass runs three times (`SEGSYNC_BENCH_REPEAT`), and a line gives the least and
//! median of its ratios, and all its runs' CPU against all their baselines' rounds.

// A benchmark reports by printing.
#![allow(clippy::print_stdout)]

mod support;

// The same allocator as the segsync binary, so the harness measures what the binary does.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::sync::Arc;
use std::time::{Duration, Instant};

use segsync::gateway::{Pagination, RatePlan, Resource};
use segsync::ids::Account;
use segsync::reconcile::Guards;
use segsync::reconcile::{Parts, PassReport, PassRequest, Reconciler, Trigger};
use segsync::rules::{self, Date};
use segsync::state::State;
use tokio_util::sync::CancellationToken;

/// What happens between the first pass and the second.
#[derive(Clone, Copy, PartialEq)]
enum Change {
    /// 1 % of the contacts change (purchases, moves, sign-ups, deletions).
    Churn,
    /// Someone edits lists by hand: a VIP removed from the VIP list, a Venetian added to Lombardia's.
    HandEdits,
}

struct Scenario {
    name: &'static str,
    title: &'static str,
    contacts: u64,
    rule_dirs: &'static [&'static str],
    plan: RatePlan,
    /// The sandbox plays the reference's page-based server (pages of up to 1,000).
    page_dialect: bool,
    change: Change,
}

const S1_RULES: &[&str] = &["rules"];
const S2_RULES: &[&str] = &["rules", "benches/rules-s2"];

const P20_RULES: &[&str] = &["benches/rules-p20"];
const R20_RULES: &[&str] = &["benches/rules-r20"];

const S6_RULES: &[&str] = &["benches/rules-s6"];

const SCENARIOS: [Scenario; 9] = [
    Scenario {
        name: "s1",
        title: "S1 tourism board: 20,000 contacts, 5 shipped rules",
        contacts: 20_000,
        rule_dirs: S1_RULES,
        plan: RatePlan::Unlimited,
        page_dialect: false,
        change: Change::Churn,
    },
    Scenario {
        name: "s2",
        title: "S2 scale: 1,000,000 contacts, 10 rules, the seed's server (pages of 100)",
        contacts: 1_000_000,
        rule_dirs: S2_RULES,
        plan: RatePlan::Unlimited,
        page_dialect: false,
        change: Change::Churn,
    },
    Scenario {
        name: "s2p",
        title: "S2 scale on the reference's page-based server (pages of 1,000)",
        contacts: 1_000_000,
        rule_dirs: S2_RULES,
        plan: RatePlan::Unlimited,
        page_dialect: true,
        change: Change::Churn,
    },
    Scenario {
        name: "s3",
        title: "S3 rate-limited: S1 on the production plan (1,000/min, 50/s)",
        contacts: 20_000,
        rule_dirs: S1_RULES,
        plan: RatePlan::Production,
        page_dialect: false,
        change: Change::Churn,
    },
    Scenario {
        name: "s4",
        title: "S4 S2's data on the production plan, page-based server",
        contacts: 1_000_000,
        rule_dirs: S2_RULES,
        plan: RatePlan::Production,
        page_dialect: true,
        change: Change::Churn,
    },
    Scenario {
        name: "s5",
        title: "S5 drift: S1, then lists edited by hand between passes",
        contacts: 20_000,
        rule_dirs: S1_RULES,
        plan: RatePlan::Unlimited,
        page_dialect: false,
        change: Change::HandEdits,
    },
    Scenario {
        name: "s6p",
        title: "S6p one partitioned rule, 20 lists (one per region): S2's data, page-based server",
        contacts: 1_000_000,
        rule_dirs: P20_RULES,
        plan: RatePlan::Unlimited,
        page_dialect: true,
        change: Change::Churn,
    },
    Scenario {
        name: "s6r",
        title: "S6r the same 20 lists from 20 separate rules: S2's data, page-based server",
        contacts: 1_000_000,
        rule_dirs: R20_RULES,
        plan: RatePlan::Unlimited,
        page_dialect: true,
        change: Change::Churn,
    },
    Scenario {
        name: "s6",
        title: "S6 100 lists (5 partitioned rules × 20 regions, one judged by Rhai): S2's data, page-based server, production plan",
        contacts: 1_000_000,
        rule_dirs: S6_RULES,
        plan: RatePlan::Production,
        page_dialect: true,
        change: Change::Churn,
    },
];

struct Row {
    pass: String,
    requests: u64,
    by_kind: String,
    bound: u64,
    bound_parts: String,
    wall: Duration,
    cpu: Duration,
    /// The part of `cpu` spent in the kernel (socket reads and writes, thread wake-ups).
    system: Duration,
    peak_mb: f64,
    /// Resident memory when the pass began (what earlier passes left held).
    start_mb: f64,
    evaluations: u64,
    /// Contact records the pass read (scanned and member records).
    records: u64,
    members_from: String,
    /// The baseline measured right before and after this pass: each pass is compared with the
    /// machine as it was then, not minutes earlier.
    baseline: Option<Baseline>,
}

fn lower_bound(report: &PassReport, contacts: u64, lists: u64, page: u64, first: bool) -> (u64, String) {
    let pages = |n: u64| n.div_ceil(page).max(1);
    // One report per list: a partitioned rule's summary of its lists is not a list.
    let per_list: Vec<&segsync::reconcile::RuleReport> =
        report.rules.iter().filter(|r| !matches!(r.rule.lists, rules::Lists::Partitioned { .. })).collect();
    let own: u64 = per_list.iter().map(|r| pages(r.in_filter) + if first { 0 } else { pages(r.members_before) }).sum();
    let candidates = own.min(pages(contacts));
    let lists = pages(lists) + if first { per_list.len() as u64 } else { 0 };
    let writes: u64 = per_list
        .iter()
        .map(|r| {
            (r.plan.adds_to_apply().len() as u64).div_ceil(1000)
                + (r.plan.removals_to_apply().len() as u64).div_ceil(1000)
        })
        .sum();
    (candidates + lists + writes, format!("{candidates}+{lists}+{writes}"))
}

fn http_get(base_url: &str, path_and_query: &str) -> reqwest::RequestBuilder {
    reqwest::Client::new()
        .get(format!("{base_url}/partner-gateway/v1{path_and_query}"))
        .header("X-Api-Key", support::KEY)
}

async fn get_json(base_url: &str, path_and_query: &str) -> serde_json::Value {
    http_get(base_url, path_and_query).send().await.expect("sent").json().await.expect("json")
}

/// The id of the list named `name`.
async fn list_id(base_url: &str, name: &str) -> String {
    let lists = get_json(base_url, "/contacts/list?limit=100").await;
    let found = lists["lists"].as_array().expect("lists").iter().find(|l| l["name"] == name).expect("list");
    found["id"].as_str().expect("id").to_owned()
}

/// Whether `contact` is a member of `list`.
async fn is_member(base_url: &str, list: &str, contact: &str) -> bool {
    let mut offset = 0;
    loop {
        let page = get_json(base_url, &format!("/contacts?listIds={list}&limit=100&offset={offset}")).await;
        let contacts = page["contacts"].as_array().expect("contacts");
        if contacts.iter().any(|c| c["id"] == contact) {
            return true;
        }
        if contacts.len() < 100 {
            return false;
        }
        offset += 100;
    }
}

/// The hand edits of S5: a VIP taken out of the VIP list, a Venetian put into Lombardia's.
/// Returns what was done, for the check after the pass.
async fn edit_by_hand(base_url: &str) -> (String, String, String, String) {
    let vip = list_id(base_url, "VIP - Spend > 5000 EUR").await;
    let lombardia = list_id(base_url, "Geo - Lombardia").await;
    let member = get_json(base_url, &format!("/contacts?listIds={vip}&limit=1")).await["contacts"][0]["id"]
        .as_str()
        .expect("a VIP")
        .to_owned();
    let venetian = get_json(base_url, "/contacts?region=Veneto&limit=1").await["contacts"][0]["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let client = reqwest::Client::new();
    let url = format!("{base_url}/partner-gateway/v1/contacts/list/contacts");
    let removed = client
        .delete(&url)
        .header("X-Api-Key", support::KEY)
        .json(&serde_json::json!({"listIds": [vip], "contactIds": [member]}))
        .send()
        .await
        .expect("sent");
    assert!(removed.status().is_success());
    let added = client
        .post(&url)
        .header("X-Api-Key", support::KEY)
        .json(&serde_json::json!({"listId": lombardia, "contactIds": [venetian]}))
        .send()
        .await
        .expect("sent");
    assert!(added.status().is_success());
    (vip, member, lombardia, venetian)
}

/// Twenty pages as the sandbox serves them, for the baseline.
async fn baseline_pages(base_url: &str, page: u64, pagination: Pagination) -> Vec<bytes::Bytes> {
    let mut bodies = Vec::new();
    for n in 0..20u64 {
        let at = match pagination {
            Pagination::Offset => format!("offset={}", n * page),
            Pagination::Page => format!("page={n}"),
        };
        let bytes = http_get(base_url, &format!("/contacts?limit={page}&{at}")).send().await.expect("sent");
        bodies.push(bytes.bytes().await.expect("body"));
    }
    bodies
}

/// Timed rounds of the baseline: records parsed and the seconds they took.
#[derive(Clone, Copy, Default)]
struct Baseline {
    records: u64,
    secs: f64,
}

impl Baseline {
    /// Five rounds of parsing `bodies` into `serde_json::Value` on one thread.
    ///
    /// All five count, not the best: this machine's speed moves by up to 2× within seconds (one
    /// round of these pages took 2.1 to 5.2 µs a record over one minute, nothing else running),
    /// and a pass's CPU is its mean over its seconds, so the baseline must be a mean too, not its
    /// luckiest moment. Rounds before and after a pass bracket it in time.
    fn rounds(bodies: &[bytes::Bytes]) -> Self {
        let started = Instant::now();
        let mut records = 0u64;
        for _ in 0..5 {
            for body in bodies {
                let v: serde_json::Value = serde_json::from_slice(body).expect("json");
                records += v["contacts"].as_array().map_or(0, |c| c.len() as u64);
            }
        }
        Self { records, secs: started.elapsed().as_secs_f64() }
    }

    fn and(self, other: Self) -> Self {
        Self { records: self.records + other.records, secs: self.secs + other.secs }
    }

    /// µs a record.
    fn us(self) -> f64 {
        self.secs * 1e6 / self.records as f64
    }
}

async fn total_contacts(base_url: &str) -> u64 {
    let url = format!("{base_url}/partner-gateway/v1/contacts?limit=1");
    let v: serde_json::Value = reqwest::Client::new()
        .get(url)
        .header("X-Api-Key", support::KEY)
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    v["total"].as_u64().expect("total")
}

/// The scenario's contacts, or `SEGSYNC_BENCH_CONTACTS` (a scaled-down run, for callgrind).
fn contacts_of(s: &Scenario) -> u64 {
    std::env::var("SEGSYNC_BENCH_CONTACTS").ok().and_then(|n| n.parse().ok()).unwrap_or(s.contacts)
}

async fn run(s: &Scenario) {
    println!("\n### {}\n", s.title);
    let contacts = contacts_of(s);
    if contacts != s.contacts {
        println!("(scaled down to {contacts} contacts by SEGSYNC_BENCH_CONTACTS)\n");
    }
    let extra: &[&str] = if s.page_dialect { &["--page-dialect"] } else { &[] };
    let sandbox = support::SandboxChild::start_with(contacts, &s.plan.to_string(), extra);
    let dir = tempfile::tempdir().expect("tempdir");
    let rules_dir = dir.path().join("rules");
    std::fs::create_dir(&rules_dir).expect("mkdir");
    for from in s.rule_dirs {
        for entry in std::fs::read_dir(from).expect("rules") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|x| x == "rhai") {
                std::fs::copy(&path, rules_dir.join(path.file_name().expect("name"))).expect("copy");
            }
        }
    }
    let engine = rules::engine::build(chrono_tz::Europe::Rome);
    let (set, errors) = rules::load_dir(&engine, &rules_dir);
    assert!(errors.is_empty(), "{errors:?}");
    // `SEGSYNC_BENCH_ENGINE=rhai` runs every rule through Rhai (as `[rules] native = false` does).
    rules::native::set_enabled(std::env::var("SEGSYNC_BENCH_ENGINE").as_deref() != Ok("rhai"));
    let engines: Vec<String> = set.iter().map(|r| format!("{} {}", r.name, r.engine_name())).collect();
    println!("engines: {}\n", engines.join("; "));
    let gateway = support::gateway(&sandbox.base_url, s.plan, 4);
    let reconciler = Reconciler::new(Parts {
        gateway: gateway.clone(),
        account: Account::remote(&sandbox.base_url),
        engine: Arc::new(engine),
        state: State::open(&dir.path().join("segsync.db")).expect("state"),
        guards: Guards { max_removal_share: 1.0, max_removals: None, max_error_share: 0.01, mass_removal_floor: 10 },
        time_zone: chrono_tz::Europe::Rome,
        cancel: CancellationToken::new(),
        verify_members_every: std::time::Duration::from_secs(86_400),
        default_remove_after: None,
        history_retention: std::time::Duration::from_secs(180 * 86_400),
        history_facts: true,
        max_lists_per_rule: segsync::config::DEFAULT_MAX_LISTS,
    });
    let today = Date(chrono::Utc::now().with_timezone(&chrono_tz::Europe::Rome).date_naive());
    let mut rows = Vec::new();
    let second = match s.change {
        Change::Churn => "after 1 % churn",
        Change::HandEdits => "after hand edits",
    };
    let mut edits = None;
    // The no-change pass runs `SEGSYNC_BENCH_REPEAT` times (3 by default on an unlimited plan, where
    // a pass takes seconds; once on a rate-limited one, where each waits a minute's window): on a
    // shared machine one run's ratio is one draw of the neighbours' noise, so the summary gives the
    // least and the median.
    let default_repeat = if s.plan.limits().is_some() { 1 } else { 3 };
    let repeat = std::env::var("SEGSYNC_BENCH_REPEAT").ok().and_then(|n| n.parse().ok()).unwrap_or(default_repeat);
    let names: Vec<String> = [String::from("first sync"), second.to_owned()]
        .into_iter()
        .chain((1..=repeat.max(1)).map(|k| if k == 1 { "no change".to_owned() } else { format!("no change ({k})") }))
        .collect();
    // `SEGSYNC_BENCH_PASSES=2` stops before the no-change pass: two callgrind runs, with and
    // without it (and `SEGSYNC_BENCH_REPEAT=1`), count that pass's instructions alone.
    let passes = std::env::var("SEGSYNC_BENCH_PASSES").ok().and_then(|n| n.parse().ok()).unwrap_or(names.len());
    let mut baseline_bodies: Option<Vec<bytes::Bytes>> = None;
    for (index, pass) in names.into_iter().enumerate().take(passes) {
        if index == 1 {
            match s.change {
                Change::Churn => {
                    let url = format!("http://127.0.0.1:{}/_sandbox/churn?count={}", sandbox.port, contacts / 100);
                    reqwest::Client::new().post(url).send().await.expect("churn");
                }
                Change::HandEdits => edits = Some(edit_by_hand(&sandbox.base_url).await),
            }
        }
        // `SEGSYNC_BENCH_IDLE_SECS`: an idle gap before each later pass, as a daemon has between
        // runs (tokio lets an idle blocking thread go after 10 s, and its allocator heap with it).
        if index > 0
            && let Some(idle) = std::env::var("SEGSYNC_BENCH_IDLE_SECS").ok().and_then(|n| n.parse().ok())
        {
            tokio::time::sleep(Duration::from_secs(idle)).await;
        }
        // On a rate-limited plan each pass starts with a fresh minute window, so its wall time can be
        // compared with the least time the windows allow from nothing.
        if index > 0 && s.plan.limits().is_some() {
            tokio::time::sleep(Duration::from_secs(61)).await;
        }
        let contacts = total_contacts(&sandbox.base_url).await;
        let before = baseline_bodies.as_deref().map(Baseline::rounds);
        let start_mb = support::rss_now_mb();
        support::reset_peak();
        let (user, system) = support::cpu_times();
        let started = Instant::now();
        let request = PassRequest {
            allow_mass_removal: true,
            today: Some(today),
            ..PassRequest::new(set.iter().cloned().collect(), Trigger::Manual)
        };
        let report = reconciler.run_pass(request).await;
        let wall = started.elapsed();
        let (user_after, system_after) = support::cpu_times();
        let (cpu, system) = (user_after + system_after - user - system, system_after - system);
        // Read now: the baseline's rounds after the pass are not the pass's memory.
        let peak_mb = support::peak_mb();
        for r in report.rules.iter().filter(|r| r.detail.is_some()) {
            println!("  note: {} {}: {}", r.rule.name, r.outcome, r.detail.as_deref().unwrap_or_default());
        }
        let page = u64::from(gateway.paging(Resource::Contacts).page_size);
        let lists = get_json(&sandbox.base_url, "/contacts/list?limit=1").await["total"].as_u64().unwrap_or(0);
        let (bound, bound_parts) = lower_bound(&report, contacts, lists, page, index == 0);
        // The baseline's pages are fetched once the first pass has learned the paging, except on a
        // rate-limited plan, where they wait until the last pass (their requests would count in
        // the windows the passes are measured against); then every pass shares one baseline.
        let last = index + 1 == passes;
        if baseline_bodies.is_none() && (s.plan.limits().is_none() || last) {
            let paging = gateway.paging(Resource::Contacts);
            baseline_bodies =
                Some(baseline_pages(&sandbox.base_url, u64::from(paging.page_size), paging.pagination).await);
        }
        let after = baseline_bodies.as_deref().map(Baseline::rounds);
        let baseline = after.map(|a| before.map_or(a, |b| b.and(a)));
        rows.push(Row {
            pass,
            baseline,
            requests: report.usage.total_requests(),
            by_kind: report.usage.requests.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", "),
            bound,
            bound_parts,
            wall,
            cpu,
            system,
            peak_mb,
            start_mb,
            evaluations: report.rules.iter().map(|r| r.scanned).sum(),
            records: report.usage.records,
            members_from: {
                let mut from: Vec<&str> = report.rules.iter().map(|r| r.members_from.as_str()).collect();
                from.sort_unstable();
                from.dedup_by(|a, b| a == b);
                from.join("/")
            },
        });
        if index == 1
            && let Some((vip, member, lombardia, venetian)) = &edits
        {
            let back = is_member(&sandbox.base_url, vip, member).await;
            let out = !is_member(&sandbox.base_url, lombardia, venetian).await;
            println!(
                "  hand edits: the removed VIP {member} is back: {back}; the added Venetian {venetian} is out: {out}"
            );
        }
    }
    let paging = gateway.paging(Resource::Contacts);
    // On a rate-limited plan the last pass's baseline is every pass's.
    let last = rows.last().and_then(|r| r.baseline.map(Baseline::us)).unwrap_or(f64::NAN);
    let baseline_of = |r: &Row| r.baseline.map_or(last, Baseline::us);
    let baselines: Vec<String> = rows.iter().map(|r| format!("{:.2}", baseline_of(r))).collect();
    println!(
        "pages of {} by `{}`; baseline (serde_json::Value, one thread, five rounds before and five after each pass) {} µs/record",
        paging.page_size,
        paging.pagination.as_str(),
        baselines.join(" / ")
    );
    println!();
    println!(
        "| pass | requests | lower bound (reads+lists+writes) | ratio | members from | wall s | CPU s | of it kernel | CPU µs/record | × baseline | MB at start | peak MB | evaluations/s |"
    );
    println!("|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let ratio = |r: &Row| r.cpu.as_secs_f64() * 1e6 / r.records.max(1) as f64 / baseline_of(r);
    for r in &rows {
        let per_record = r.cpu.as_secs_f64() * 1e6 / r.records.max(1) as f64;
        println!(
            "| {} | {} | {} ({}) | {:.3} | {} | {:.2} | {:.2} | {:.0} % | {:.2} | {:.2} | {:.0} | {:.0} | {:.0} |",
            r.pass,
            r.requests,
            r.bound,
            r.bound_parts,
            r.requests as f64 / r.bound as f64,
            r.members_from,
            r.wall.as_secs_f64(),
            r.cpu.as_secs_f64(),
            100.0 * r.system.as_secs_f64() / r.cpu.as_secs_f64().max(1e-9),
            per_record,
            ratio(r),
            r.start_mb,
            r.peak_mb,
            r.evaluations as f64 / r.wall.as_secs_f64(),
        );
    }
    let mut unchanged: Vec<f64> = rows.iter().skip(2).map(ratio).collect();
    if unchanged.len() > 1 {
        unchanged.sort_by(f64::total_cmp);
        // All the no-change runs' CPU against all their baselines' rounds: the machine's mean speed
        // over the same minutes, where one run's ratio is one draw of its moods.
        let runs = &rows[2..];
        let records: u64 = runs.iter().map(|r| r.records).sum();
        let cpu: f64 = runs.iter().map(|r| r.cpu.as_secs_f64()).sum();
        let pooled = runs.iter().filter_map(|r| r.baseline).fold(Baseline::default(), Baseline::and);
        println!(
            "\nno change, CPU × baseline over {} runs: least {:.2}, median {:.2}, most {:.2}; \
             all runs together {:.2} ({:.2} µs a record against {:.2})",
            unchanged.len(),
            unchanged[0],
            unchanged[unchanged.len() / 2],
            unchanged[unchanged.len() - 1],
            cpu * 1e6 / records.max(1) as f64 / pooled.us(),
            cpu * 1e6 / records.max(1) as f64,
            pooled.us(),
        );
    }
    for r in &rows {
        println!("- {}: {}", r.pass, r.by_kind);
    }
    if s.plan.limits().is_some() {
        println!();
        for r in &rows {
            // T_min(R): the least time R requests take within both windows at the budget share.
            let bound = gateway.least_time(r.requests).unwrap_or_default().as_secs_f64();
            println!(
                "- {}: wall {:.1} s vs T_min({}) {:.1} s at budget_share 0.8 → {:.3} (target ≤ 1.10); CPU {:.1} s → {:.3} × T_min (S6 target ≤ 0.5)",
                r.pass,
                r.wall.as_secs_f64(),
                r.requests,
                bound,
                r.wall.as_secs_f64() / bound,
                r.cpu.as_secs_f64(),
                r.cpu.as_secs_f64() / bound
            );
        }
        let stats = sandbox.stats();
        let throttled: u64 =
            stats["routes"].as_object().map_or(0, |routes| routes.values().filter_map(|o| o["429"].as_u64()).sum());
        println!("- 429 answers from the sandbox: {throttled}");
    }
}

/// The state database after 30 simulated days of 1 % daily churn on 20,000 contacts (the shipped
/// rules, one pass a day): its size, and what the history holds.
async fn history_growth() {
    println!("\n### H30 state size: 30 simulated days of 1 % daily churn on 20,000 contacts, shipped rules\n");
    let sandbox = support::SandboxChild::start(20_000, "unlimited");
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = rules::engine::build(chrono_tz::Europe::Rome);
    let (set, errors) = rules::load_dir(&engine, std::path::Path::new("rules"));
    assert!(errors.is_empty(), "{errors:?}");
    let db = dir.path().join("segsync.db");
    let reconciler = Reconciler::new(Parts {
        gateway: support::gateway(&sandbox.base_url, RatePlan::Unlimited, 4),
        account: Account::remote(&sandbox.base_url),
        engine: Arc::new(engine),
        state: State::open(&db).expect("state"),
        guards: Guards { max_removal_share: 1.0, max_removals: None, max_error_share: 0.01, mass_removal_floor: 10 },
        time_zone: chrono_tz::Europe::Rome,
        cancel: CancellationToken::new(),
        verify_members_every: std::time::Duration::from_secs(86_400),
        default_remove_after: Some(std::time::Duration::from_secs(2 * 86_400)),
        history_retention: std::time::Duration::from_secs(180 * 86_400),
        history_facts: true,
        max_lists_per_rule: segsync::config::DEFAULT_MAX_LISTS,
    });
    let today = Date(chrono::Utc::now().with_timezone(&chrono_tz::Europe::Rome).date_naive());
    let t0 = chrono::Utc::now();
    let size = || {
        ["", "-wal"]
            .iter()
            .map(|suffix| std::fs::metadata(format!("{}{suffix}", db.display())).map_or(0, |m| m.len()))
            .sum::<u64>()
    };
    println!("| day | adds | removals | pending removal (grace 2d) | state DB + WAL (KB) |");
    println!("|---:|---:|---:|---:|---:|");
    for day in 0..=30i64 {
        if day > 0 {
            let url = format!("http://127.0.0.1:{}/_sandbox/churn?count=200", sandbox.port);
            reqwest::Client::new().post(url).send().await.expect("churn");
        }
        let report = reconciler
            .run_pass(PassRequest {
                now: Some(t0 + chrono::Duration::days(day)),
                today: Some(today),
                ..PassRequest::new(set.iter().cloned().collect(), Trigger::Cron)
            })
            .await;
        if [0, 1, 7, 14, 30].contains(&day) {
            println!(
                "| {day} | {} | {} | {} | {} |",
                report.rules.iter().map(|r| r.added).sum::<u64>(),
                report.rules.iter().map(|r| r.removed).sum::<u64>(),
                report.rules.iter().map(|r| r.plan.pending.len()).sum::<usize>(),
                size() / 1024
            );
        }
    }
    let conn = rusqlite::Connection::open(&db).expect("db");
    let rows = |table: &str| -> i64 {
        conn.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0)).expect("count")
    };
    println!(
        "\n- history rows {}, history runs {}, cached members {}",
        rows("history"),
        rows("history_run"),
        rows("cached_member")
    );
}

fn main() {
    // The runtime the segsync binary runs on, so threads and memory are what the binary's are.
    segsync::runtime().expect("runtime").block_on(harness_main());
}

async fn harness_main() {
    let wanted: Vec<String> = std::env::args().skip(1).filter(|a| a.starts_with('s') || a == "h30").collect();
    let child = std::env::var_os(CHILD).is_some();
    if !child {
        println!(
            "segsync harness, {} cores, {} MB RAM, {}",
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            std::fs::read_to_string("/proc/meminfo")
                .ok()
                .and_then(|m| m.lines().next().and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok()))
                .unwrap_or(0)
                / 1024,
            chrono::Utc::now().format("%Y-%m-%d %H:%M UTC")
        );
        // mimalloc reads it at process start. The service units set 0 (memory handed back at once);
        // unset, mimalloc's default (a second) applies, as for `cargo run` and the CPU figures here:
        // the baseline allocates as much as a pass, and at 0 it runs slower too.
        println!(
            "allocator: MIMALLOC_PURGE_DELAY={}",
            std::env::var("MIMALLOC_PURGE_DELAY").as_deref().unwrap_or("unset (mimalloc's default, 1000 ms)")
        );
    }
    if wanted.iter().any(|w| w == "h30") {
        history_growth().await;
        return;
    }
    let chosen: Vec<&Scenario> =
        SCENARIOS.iter().filter(|s| wanted.is_empty() || wanted.iter().any(|w| w == s.name)).collect();
    if chosen.len() == 1 {
        run(chosen[0]).await;
        return;
    }
    // One process per scenario, so each one's peak memory is its own.
    let me = std::env::current_exe().expect("own path");
    for s in chosen {
        let status = std::process::Command::new(&me).arg(s.name).env(CHILD, "1").status().expect("scenario runs");
        assert!(status.success(), "scenario {} failed", s.name);
    }
}

/// Set for the per-scenario child processes.
const CHILD: &str = "SEGSYNC_HARNESS_CHILD";
