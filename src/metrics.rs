//! Prometheus metrics and the health check of `segsync run`, served on `[metrics] listen`.
//!
//! The daemon feeds every finished pass into [`Metrics::observe`]; the loop beats [`Health`] on
//! every turn. `/metrics` is the Prometheus text exposition (prometheus-client), `/healthz` answers
//! 200 while the loop is alive and no rule is overdue, 503 with a JSON reason otherwise.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::gateway::{Operation, PROCESS, Usage};
use crate::ids::RuleName;
use crate::outcome::Outcome;
use crate::reconcile::PassReport;
use crate::rules::Rule;

type Labels = Vec<(String, String)>;
type FloatGauge = Gauge<f64, AtomicU64>;

/// A rule's series: its file's name and its list (one per list for a rule with `fn list`; empty
/// for a suppression rule, which fills none).
fn rule(r: &Rule) -> Labels {
    vec![("rule".into(), r.file_rule().to_string()), ("list".into(), r.list.clone())]
}

fn op(op: Operation) -> Labels {
    vec![("op".into(), op.as_str().into())]
}

/// Every metric segsync exposes.
pub struct Metrics {
    registry: Registry,
    last_run: Family<Labels, FloatGauge>,
    last_success: Family<Labels, FloatGauge>,
    outcome: Family<Labels, Gauge>,
    members: Family<Labels, Gauge>,
    added: Family<Labels, Counter>,
    removed: Family<Labels, Counter>,
    eval_errors: Family<Labels, Gauge>,
    held: Family<Labels, Gauge>,
    pending_removal: Family<Labels, Gauge>,
    requests: Family<Labels, Counter>,
    retries: Family<Labels, Counter>,
    throttled: Family<Labels, Counter>,
    rate_limit_wait: Family<Labels, Counter<f64, AtomicU64>>,
    pass_duration: Histogram,
    rules_loaded: Gauge,
    rules_rejected: Gauge,
    /// The requests per minute segsync allows itself: the plan's limit times `budget_share`.
    rate_budget: FloatGauge,
    /// The process-wide request counts as of the last scrape (counters advance by the difference).
    synced: Mutex<Usage>,
    /// Each rule file's series, by file name: what goes when the file goes or its list changes.
    series: Mutex<HashMap<String, HashSet<Labels>>>,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("segsync");
        let m = Self {
            last_run: Family::default(),
            last_success: Family::default(),
            outcome: Family::default(),
            members: Family::default(),
            added: Family::default(),
            removed: Family::default(),
            eval_errors: Family::default(),
            held: Family::default(),
            pending_removal: Family::default(),
            requests: Family::default(),
            retries: Family::default(),
            throttled: Family::default(),
            rate_limit_wait: Family::default(),
            pass_duration: Histogram::new(exponential_buckets(0.25, 2.0, 14)),
            rules_loaded: Gauge::default(),
            rules_rejected: Gauge::default(),
            rate_budget: FloatGauge::default(),
            synced: Mutex::new(Usage::default()),
            series: Mutex::new(HashMap::new()),
            registry: Registry::default(),
        };
        registry.register(
            "rule_last_run_timestamp_seconds",
            "When the rule last ran (any outcome)",
            m.last_run.clone(),
        );
        registry.register(
            "rule_last_success_timestamp_seconds",
            "When the rule last ran with outcome ok",
            m.last_success.clone(),
        );
        registry.register(
            "rule_outcome",
            "1 for the outcome of the rule's last run, 0 for the others",
            m.outcome.clone(),
        );
        registry.register("rule_members", "Members of the rule's list after its last run", m.members.clone());
        registry.register("rule_added", "Members added to the rule's list", m.added.clone());
        registry.register("rule_removed", "Members removed from the rule's list", m.removed.clone());
        registry.register(
            "rule_eval_errors",
            "Contacts the rule could not judge in its last run",
            m.eval_errors.clone(),
        );
        registry.register("rule_held", "1 while the rule's removals are held by a guard", m.held.clone());
        registry.register(
            "rule_pending_removal",
            "Members failing the rule but within its REMOVE_AFTER grace",
            m.pending_removal.clone(),
        );
        registry.register("api_requests", "API requests by operation and status class", m.requests.clone());
        registry.register("api_retries", "Retried API requests by operation", m.retries.clone());
        registry.register("api_throttled", "429 answers by operation", m.throttled.clone());
        registry.register(
            "rate_limit_wait_seconds",
            "Time spent waiting on the rate limit, by operation",
            m.rate_limit_wait.clone(),
        );
        registry.register("pass_duration_seconds", "Duration of a reconcile pass", m.pass_duration.clone());
        registry.register("rules_loaded", "Rules running", m.rules_loaded.clone());
        registry.register(
            "rules_rejected",
            "Rule files refused at the last load (errors or failing tests)",
            m.rules_rejected.clone(),
        );
        registry.register(
            "rate_budget_requests_per_minute",
            "The requests per minute segsync allows itself ([api] plan times budget_share; 0 when unlimited)",
            m.rate_budget.clone(),
        );
        registry.register(
            "build",
            "The running segsync",
            Info::new(vec![("version".to_owned(), env!("SEGSYNC_VERSION").to_owned())]),
        );
        // Counters exist from the start (at 0), so `rate()` and alerts see them before the first 429.
        for operation in Operation::ALL {
            let _ = m.retries.get_or_create(&op(operation));
            let _ = m.throttled.get_or_create(&op(operation));
            let _ = m.rate_limit_wait.get_or_create(&op(operation));
        }
        Self { registry, ..m }
    }

    /// Records a finished pass's per-rule results and duration (requests are counted live).
    pub fn observe(&self, report: &PassReport, finished: DateTime<Utc>) {
        let now = finished.timestamp_millis() as f64 / 1000.0;
        // A partitioned rule's summary repeats its lists' figures: its lists have the series.
        for r in report.rules.iter().filter(|r| !matches!(r.rule.lists, crate::rules::Lists::Partitioned { .. })) {
            let labels = self.track(&r.rule);
            self.last_run.get_or_create(&labels).set(now);
            if r.outcome == Outcome::Ok {
                self.last_success.get_or_create(&labels).set(now);
            }
            for outcome in Outcome::ALL {
                let mut l = labels.clone();
                l.push(("outcome".into(), outcome.as_str().into()));
                self.outcome.get_or_create(&l).set(i64::from(outcome == r.outcome));
            }
            if r.list_id.is_some() {
                let after = (r.members_before + r.added).saturating_sub(r.removed);
                self.members.get_or_create(&labels).set(after as i64);
            }
            self.added.get_or_create(&labels).inc_by(r.added);
            self.removed.get_or_create(&labels).inc_by(r.removed);
            self.eval_errors.get_or_create(&labels).set(r.eval_errors as i64);
            self.held.get_or_create(&labels).set(i64::from(r.outcome == Outcome::Held));
            self.pending_removal.get_or_create(&labels).set(r.plan.pending.len() as i64);
        }
        self.pass_duration.observe(report.duration.as_secs_f64());
    }

    /// The rules running and refused after a load; each running rule's counters start at 0.
    pub fn rules<'a>(&self, loaded: impl IntoIterator<Item = &'a Arc<Rule>>, rejected: usize) {
        let mut count = 0;
        let mut running: Vec<&Arc<Rule>> = Vec::new();
        for r in loaded {
            // A partitioned rule's lists are known when it runs; they start then.
            if !r.is_partitioned() {
                let labels = self.track(r);
                let _ = self.added.get_or_create(&labels);
                let _ = self.removed.get_or_create(&labels);
            }
            count += 1;
            running.push(r);
        }
        // A deleted rule's series go, as do a rule's series for a LIST it no longer names: an
        // old `outcome="failed"` must not fire an alert forever. A partitioned rule keeps its
        // lists' series (the lists are known only as it runs).
        let mut series = self.series.lock().unwrap_or_else(|p| p.into_inner());
        series.retain(|file, sets| {
            let Some(now) = running.iter().find(|r| r.name.as_str() == file) else {
                sets.iter().for_each(|labels| self.remove(labels));
                return false;
            };
            if !now.is_partitioned() {
                let current = rule(now);
                sets.iter().filter(|l| **l != current).for_each(|labels| self.remove(labels));
                sets.retain(|l| *l == current);
            }
            true
        });
        self.rules_loaded.set(count);
        self.rules_rejected.set(rejected as i64);
    }

    /// The rate budget of the running config: `per_minute` × `share`, or none (unlimited).
    pub fn budget(&self, settings: &crate::gateway::ClientSettings) {
        let per_minute = settings.limits.map_or(0.0, |l| f64::from(l.per_minute) * settings.budget_share);
        self.rate_budget.set(per_minute);
    }

    /// A rule's labels, remembered under its file so its series can go with it.
    fn track(&self, r: &Rule) -> Labels {
        let labels = rule(r);
        let mut series = self.series.lock().unwrap_or_else(|p| p.into_inner());
        series.entry(r.file_rule().to_string()).or_default().insert(labels.clone());
        labels
    }

    /// Removes one rule's series (with these labels) from every per-rule family.
    fn remove(&self, labels: &Labels) {
        for family in [&self.members, &self.eval_errors, &self.held, &self.pending_removal] {
            family.remove(labels);
        }
        for family in [&self.last_run, &self.last_success] {
            family.remove(labels);
        }
        for family in [&self.added, &self.removed] {
            family.remove(labels);
        }
        for outcome in Outcome::ALL {
            let mut l = labels.clone();
            l.push(("outcome".into(), outcome.as_str().into()));
            self.outcome.remove(&l);
        }
    }

    /// Advances the request counters to the process-wide counts (live, during a pass too).
    fn sync_requests(&self) {
        let now = PROCESS.usage();
        let mut synced = self.synced.lock().unwrap_or_else(|p| p.into_inner());
        let delta = |new: u64, old: Option<&u64>| new.saturating_sub(old.copied().unwrap_or(0));
        for ((operation, class), n) in &now.statuses {
            let mut l = op(*operation);
            l.push(("class".into(), class.as_str().into()));
            self.requests.get_or_create(&l).inc_by(delta(*n, synced.statuses.get(&(*operation, *class))));
        }
        for (operation, n) in &now.retries_by_op {
            self.retries.get_or_create(&op(*operation)).inc_by(delta(*n, synced.retries_by_op.get(operation)));
        }
        for (operation, n) in &now.throttled_by_op {
            self.throttled.get_or_create(&op(*operation)).inc_by(delta(*n, synced.throttled_by_op.get(operation)));
        }
        for (operation, ms) in &now.waited_ms_by_op {
            let waited = delta(*ms, synced.waited_ms_by_op.get(operation));
            self.rate_limit_wait.get_or_create(&op(*operation)).inc_by(waited as f64 / 1000.0);
        }
        *synced = now;
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        self.sync_requests();
        let mut text = String::new();
        if encode(&mut text, &self.registry).is_err() {
            text.clear();
        }
        text
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// What `/healthz` judges: the loop's heartbeat, and each rule's last success against its schedule.
pub struct Health {
    heartbeat: AtomicI64,
    /// A rule is overdue when its last success is older than this many of its schedule's intervals.
    overdue_factor: f64,
    rules: Mutex<BTreeMap<RuleName, RuleHealth>>,
}

/// A rule's schedule interval, last success and load time, as `/healthz` sees them.
#[derive(Debug, Clone)]
pub struct RuleHealth {
    pub interval: Duration,
    pub last_success: Option<DateTime<Utc>>,
    /// When a daemon first loaded it (what `status` reads from the state).
    pub loaded_at: DateTime<Utc>,
}

/// How stale the loop's heartbeat may be (the loop beats at least every 2 s).
const HEARTBEAT_STALE: i64 = 30;

impl Health {
    pub fn new(overdue_factor: f64) -> Self {
        let now = Utc::now();
        Self { heartbeat: AtomicI64::new(now.timestamp()), overdue_factor, rules: Mutex::new(BTreeMap::new()) }
    }

    /// The event loop is alive.
    pub fn beat(&self) {
        self.heartbeat.store(Utc::now().timestamp(), Ordering::Relaxed);
    }

    /// What the state remembers from earlier processes, at startup: when each rule was loaded and
    /// last succeeded (so `/healthz` judges exactly as `status` does).
    pub fn remember(&self, loaded: &[crate::state::LoadedRule], successes: &HashMap<RuleName, DateTime<Utc>>) {
        let mut rules = self.rules.lock().unwrap_or_else(|p| p.into_inner());
        for r in loaded {
            let last_success = successes.get(&r.rule).copied();
            rules.insert(r.rule.clone(), RuleHealth { interval: Duration::MAX, last_success, loaded_at: r.loaded_at });
        }
    }

    /// The rules and their schedule intervals after a load, at `now`. A rule already known keeps
    /// its last success and load time; a new one is loaded now. Returns every rule's load time.
    pub fn set_rules(
        &self,
        intervals: impl IntoIterator<Item = (RuleName, Duration)>,
        now: DateTime<Utc>,
    ) -> Vec<(RuleName, DateTime<Utc>)> {
        let mut rules = self.rules.lock().unwrap_or_else(|p| p.into_inner());
        let old = std::mem::take(&mut *rules);
        for (name, interval) in intervals {
            let (last_success, loaded_at) = old.get(&name).map_or((None, now), |h| (h.last_success, h.loaded_at));
            rules.insert(name, RuleHealth { interval, last_success, loaded_at });
        }
        rules.iter().map(|(name, h)| (name.clone(), h.loaded_at)).collect()
    }

    /// A rule ran with outcome ok.
    pub fn succeeded(&self, name: &RuleName, at: DateTime<Utc>) {
        if let Some(h) = self.rules.lock().unwrap_or_else(|p| p.into_inner()).get_mut(name) {
            h.last_success = Some(at);
        }
    }

    /// `None` when healthy, else the reasons.
    pub fn problems(&self, now: DateTime<Utc>) -> Option<serde_json::Value> {
        let mut reasons = Vec::new();
        let silent = now.timestamp() - self.heartbeat.load(Ordering::Relaxed);
        if silent > HEARTBEAT_STALE {
            reasons.push(serde_json::json!({"problem": "event loop stalled", "silent_s": silent}));
        }
        for (name, h) in self.rules.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            if crate::schedule::is_overdue(h.interval, self.overdue_factor, h.last_success, h.loaded_at, now) {
                reasons.push(serde_json::json!({
                    "problem": "rule overdue",
                    "rule": name,
                    "last_success": h.last_success.map(|t| t.to_rfc3339()),
                    "allowed_s": h.interval.mul_f64(self.overdue_factor).as_secs(),
                }));
            }
        }
        (!reasons.is_empty()).then(|| serde_json::json!({"status": "unhealthy", "problems": reasons}))
    }
}

/// Serves `/metrics` and `/healthz` on `listen` until `cancel`.
pub async fn serve(
    listen: SocketAddr,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    cancel: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let bound = listener.local_addr()?;
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move |headers: axum::http::HeaderMap| {
                let metrics = metrics.clone();
                async move {
                    let accept = headers.get(axum::http::header::ACCEPT).and_then(|v| v.to_str().ok());
                    let text = metrics.encode();
                    if wants_openmetrics(accept.unwrap_or_default()) {
                        ([("content-type", OPENMETRICS)], text)
                    } else {
                        ([("content-type", PROMETHEUS_TEXT)], prometheus_text(&text))
                    }
                }
            }),
        )
        .route(
            "/healthz",
            axum::routing::get(move || {
                let health = health.clone();
                async move { healthz(&health) }
            }),
        );
    tokio::spawn(async move {
        let serve = axum::serve(listener, app).with_graceful_shutdown(async move { cancel.cancelled().await });
        if let Err(e) = serve.await {
            tracing::warn!(error = %e, "state warning");
        }
    });
    Ok(bound)
}

/// The content type of OpenMetrics 1.0, served when a scraper asks for it.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The content type of Prometheus's text format 0.0.4, served otherwise (as the Prometheus
/// client libraries do: `curl`, old scrapers and most tools expect it).
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether an `Accept` header asks for OpenMetrics (Prometheus sends it first when it can read it).
fn wants_openmetrics(accept: &str) -> bool {
    accept.split(',').any(|part| {
        let mut params = part.split(';').map(str::trim);
        let media = params.next().unwrap_or_default();
        let q = params.find_map(|p| p.strip_prefix("q=")).and_then(|q| q.parse::<f64>().ok()).unwrap_or(1.0);
        media.eq_ignore_ascii_case("application/openmetrics-text") && q > 0.0
    })
}

/// OpenMetrics text (what prometheus-client writes) as Prometheus text 0.0.4: no `# EOF` or
/// `# UNIT`; a counter's family is named after its `_total` samples, and an `info` is a gauge
/// named after its `_info` sample.
fn prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut renamed: HashMap<&str, String> = HashMap::new();
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let (name, kind) = match kind {
                "counter" => (format!("{name}_total"), "counter"),
                "info" => (format!("{name}_info"), "gauge"),
                "unknown" => (name.to_owned(), "untyped"),
                other => (name.to_owned(), other),
            };
            out.push_str(&format!("# TYPE {name} {kind}\n"));
            renamed.insert(rest.split(' ').next().unwrap_or_default(), name);
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    // HELP comes before TYPE: rename it the same way.
    out.lines()
        .map(|line| match line.strip_prefix("# HELP ").and_then(|r| r.split_once(' ')) {
            Some((name, help)) => match renamed.get(name) {
                Some(new) => format!("# HELP {new} {help}\n"),
                None => format!("{line}\n"),
            },
            None => format!("{line}\n"),
        })
        .collect()
}

fn healthz(health: &Health) -> Response {
    match health.problems(Utc::now()) {
        None => (StatusCode::OK, axum::Json(serde_json::json!({"status": "ok"}))).into_response(),
        Some(reasons) => (StatusCode::SERVICE_UNAVAILABLE, axum::Json(reasons)).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Prometheus text 0.0.4 unless OpenMetrics is asked for; each family named after its samples.
    #[test]
    fn metrics_speak_the_format_asked_for() {
        assert!(wants_openmetrics("application/openmetrics-text; version=1.0.0,text/plain;version=0.0.4;q=0.5"));
        assert!(!wants_openmetrics("text/plain;version=0.0.4"));
        assert!(!wants_openmetrics("*/*"));
        assert!(!wants_openmetrics(""));
        assert!(!wants_openmetrics("application/openmetrics-text;q=0"));
        let metrics = Metrics::new();
        let open = metrics.encode();
        assert!(open.ends_with("# EOF\n"), "{open}");
        assert!(open.contains("# TYPE segsync_build info\n"), "{open}");
        let text = prometheus_text(&open);
        assert!(!text.contains("# EOF") && !text.contains(" info\n"), "{text}");
        assert!(text.contains("# TYPE segsync_build_info gauge\n"), "{text}");
        assert!(text.contains("# HELP segsync_api_retries_total Retried API requests by operation.\n"), "{text}");
        assert!(text.contains("# TYPE segsync_api_retries_total counter\n"), "{text}");
        // Every sample belongs to the family its TYPE line names (counters' `_total` included).
        let mut family = String::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                family = rest.split(' ').next().unwrap_or_default().to_owned();
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap_or_default();
                let histogram = ["_bucket", "_sum", "_count"].iter().any(|s| name == format!("{family}{s}"));
                assert!(name == family || histogram, "{name} under {family}:\n{text}");
            }
        }
    }

    // A rule is overdue once its last success is older than the factor times its interval.
    #[test]
    fn overdue_rules_make_the_check_fail() {
        let health = Health::new(3.0);
        let now = Utc::now();
        health.set_rules([(RuleName::from("vip"), Duration::from_secs(60))], now);
        let overdue = |at: DateTime<Utc>| -> Vec<String> {
            let Some(p) = health.problems(at) else { return Vec::new() };
            let list = p["problems"].as_array().cloned().unwrap_or_default();
            list.iter().filter(|x| x["problem"] == "rule overdue").map(|x| x["rule"].to_string()).collect()
        };
        assert!(health.problems(now).is_none(), "just started");
        // Never a success: counted from the load.
        assert_eq!(overdue(now + chrono::Duration::seconds(181)), ["\"vip\""]);
        health.succeeded(&RuleName::from("vip"), now);
        assert!(overdue(now + chrono::Duration::seconds(179)).is_empty());
        assert_eq!(overdue(now + chrono::Duration::seconds(181)), ["\"vip\""]);
        // A loop that stops beating is reported too.
        let stalled = health.problems(now + chrono::Duration::seconds(60)).expect("stalled");
        assert_eq!(stalled["problems"][0]["problem"], "event loop stalled", "{stalled}");
    }
}
