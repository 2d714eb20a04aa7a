//! The performance harness: segsync's reconcile passes (in this process, release mode) against the
//! sandbox (a child process), with API requests next to the lower bound the API allows, wall time,
//! CPU, peak memory, and evaluations per second. Prints a Markdown table; asserts nothing.
//!
//! Run: `cargo bench --bench harness` (all scenarios) or `cargo bench --bench harness -- s1 s3`.
//!
//! Lower bound of one pass, from the API's own limits (100 contacts per page, 1,000 ids per write):
//!   members   Σ over lists that existed before the pass: max(1, ⌈members/100⌉)
//!   candidates min(⌈contacts/100⌉, Σ over rules: max(1, ⌈non-members passing FILTER / 100⌉))
//!   lists     first pass only: 1 (all lists, one page) + one create per rule
//!   writes    Σ ⌈adds/1000⌉ + Σ ⌈removals/1000⌉
//! Reading every member's record is part of the bound: safety requires judging each member on its
//! own current record.

// A benchmark reports by printing.
#![allow(clippy::print_stdout)]

mod support;

// The same allocator as the segsync binary, so the harness measures what the binary does.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::sync::Arc;
use std::time::{Duration, Instant};

use segsync::config::Guards;
use segsync::gateway::RatePlan;
use segsync::ids::Account;
use segsync::reconcile::{Parts, PassReport, PassRequest, Reconciler, Trigger};
use segsync::rules::{self, Date};
use segsync::state::State;
use tokio_util::sync::CancellationToken;

struct Scenario {
    name: &'static str,
    title: &'static str,
    contacts: u64,
    rule_dirs: &'static [&'static str],
    plan: RatePlan,
}

const SCENARIOS: [Scenario; 3] = [
    Scenario {
        name: "s1",
        title: "S1 tourism board: 20,000 contacts, 5 shipped rules",
        contacts: 20_000,
        rule_dirs: &["rules"],
        plan: RatePlan::Unlimited,
    },
    Scenario {
        name: "s2",
        title: "S2 scale: 1,000,000 contacts, 10 rules",
        contacts: 1_000_000,
        rule_dirs: &["rules", "benches/rules-s2"],
        plan: RatePlan::Unlimited,
    },
    Scenario {
        name: "s3",
        title: "S3 rate-limited: S1 on the production plan (1,000/min, 50/s)",
        contacts: 20_000,
        rule_dirs: &["rules"],
        plan: RatePlan::Production,
    },
];

struct Row {
    pass: &'static str,
    requests: u64,
    by_kind: String,
    bound: u64,
    bound_parts: String,
    wall: Duration,
    cpu: Duration,
    peak_mb: f64,
    evaluations: u64,
    contacts: u64,
}

fn lower_bound(report: &PassReport, contacts: u64, first: bool) -> (u64, String) {
    let pages = |n: u64| n.div_ceil(100).max(1);
    let members: u64 = if first { 0 } else { report.rules.iter().map(|r| pages(r.members_before)).sum() };
    let own: u64 = report.rules.iter().map(|r| pages(r.in_filter)).sum();
    let candidates = own.min(contacts.div_ceil(100));
    let lists = if first { 1 + report.rules.len() as u64 } else { 0 };
    let writes: u64 = report
        .rules
        .iter()
        .map(|r| {
            (r.plan.adds_to_apply().len() as u64).div_ceil(1000)
                + (r.plan.removals_to_apply().len() as u64).div_ceil(1000)
        })
        .sum();
    (members + candidates + lists + writes, format!("{members}+{candidates}+{lists}+{writes}"))
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

async fn run(s: &Scenario) {
    println!("\n### {}\n", s.title);
    let sandbox = support::SandboxChild::start(s.contacts, &s.plan.to_string());
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
    });
    let today = Date(chrono::Utc::now().with_timezone(&chrono_tz::Europe::Rome).date_naive());
    let mut rows = Vec::new();
    for (index, pass) in ["first sync", "after 1 % churn", "no change"].into_iter().enumerate() {
        if index == 1 {
            let url = format!("http://127.0.0.1:{}/_sandbox/churn?count={}", sandbox.port, s.contacts / 100);
            reqwest::Client::new().post(url).send().await.expect("churn");
        }
        // On a rate-limited plan each pass starts with a fresh minute window, so its wall time can be
        // compared with the least time the windows allow from nothing.
        if index > 0 && s.plan.limits().is_some() {
            tokio::time::sleep(Duration::from_secs(61)).await;
        }
        let contacts = total_contacts(&sandbox.base_url).await;
        support::reset_peak();
        let cpu = support::cpu_time();
        let started = Instant::now();
        let request = PassRequest {
            rules: set.iter().cloned().collect(),
            trigger: Trigger::Manual,
            dry_run: false,
            allow_mass_removal: true,
            today: Some(today),
            progress: None,
        };
        let report = reconciler.run_pass(request).await;
        let wall = started.elapsed();
        let cpu = support::cpu_time() - cpu;
        for r in report.rules.iter().filter(|r| r.detail.is_some()) {
            println!("  note: {} {}: {}", r.rule.name, r.outcome, r.detail.as_deref().unwrap_or_default());
        }
        let (bound, bound_parts) = lower_bound(&report, contacts, index == 0);
        rows.push(Row {
            pass,
            requests: report.usage.total_requests(),
            by_kind: report.usage.requests.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", "),
            bound,
            bound_parts,
            wall,
            cpu,
            peak_mb: support::peak_mb(),
            evaluations: report.rules.iter().map(|r| r.scanned).sum(),
            contacts,
        });
    }
    println!(
        "| pass | requests | lower bound (members+candidates+lists+writes) | ratio | wall s | CPU s | CPU µs/contact | peak MB | evaluations/s |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {} ({}) | {:.3} | {:.2} | {:.2} | {:.1} | {:.0} | {:.0} |",
            r.pass,
            r.requests,
            r.bound,
            r.bound_parts,
            r.requests as f64 / r.bound as f64,
            r.wall.as_secs_f64(),
            r.cpu.as_secs_f64(),
            r.cpu.as_secs_f64() * 1e6 / r.contacts as f64,
            r.peak_mb,
            r.evaluations as f64 / r.wall.as_secs_f64(),
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
                "- {}: wall {:.1} s vs T_min({}) {:.1} s at budget_share 0.8 → {:.3} (target ≤ 1.10)",
                r.pass,
                r.wall.as_secs_f64(),
                r.requests,
                bound,
                r.wall.as_secs_f64() / bound
            );
        }
        let stats = sandbox.stats();
        let throttled: u64 =
            stats["routes"].as_object().map_or(0, |routes| routes.values().filter_map(|o| o["429"].as_u64()).sum());
        println!("- 429 answers from the sandbox: {throttled}");
    }
}

#[tokio::main]
async fn main() {
    let wanted: Vec<String> = std::env::args().skip(1).filter(|a| a.starts_with('s')).collect();
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
