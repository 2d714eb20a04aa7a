//! One reconcile pass over the rules due now: bind each rule to its list, read members and
//! candidates, plan, guard, apply in batches, record the run, and log one summary per rule.
//!
//! `plan` is pure; this module does the I/O around it. A failing rule never stops the others.

mod apply;
mod bind;
mod cache;
mod history;
pub mod plan;
mod progress;
mod read;
mod read_plan;
mod report;

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono_tz::Tz;
use futures_util::future::join_all;
use rhai::Engine;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::config::Guards;
use crate::gateway::{Gateway, GatewayError, Meter, Usage};
use crate::ids::{Account, ContactId, ListId};
use crate::rules::{Date, Rule};
pub use crate::run::{Outcome, Trigger};
use crate::state::{State, StateError};
pub use plan::{Evaluation, Plan};
pub use progress::{Progress, ProgressSink};
pub use report::sample;

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Gateway(#[from] GatewayError),
    #[error(transparent)]
    State(#[from] StateError),
    /// The shared read of a pass failed: every rule it served fails with it.
    #[error("reading contacts: {0}")]
    Read(Arc<ReconcileError>),
    #[error("interrupted by shutdown; the next run converges")]
    Interrupted,
}

impl ReconcileError {
    /// Shutdown, not a fault.
    pub fn is_interrupted(&self) -> bool {
        match self {
            Self::Interrupted | Self::Gateway(GatewayError::Cancelled { .. }) => true,
            Self::Read(inner) => inner.is_interrupted(),
            _ => false,
        }
    }
}

/// Where a rule's members came from this pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberSource {
    /// Not known: the run failed before.
    #[default]
    Unknown,
    /// The membership cache, judged on the shared scan's records.
    Cache,
    /// A complete read of the list.
    Read,
    /// The list is new (or would be, in a dry run): no members.
    NewList,
}

impl MemberSource {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Cache => "cache",
            Self::Read => "read",
            Self::NewList => "new_list",
        }
    }
}

/// How the candidates of a pass were read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadKind {
    /// One scan of all contacts served every rule.
    SharedScan,
    /// Each rule read its own filtered non-members.
    OwnRead,
}

impl ReadKind {
    /// As logs and JSON output name it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SharedScan => "shared_scan",
            Self::OwnRead => "own_read",
        }
    }
}

/// Everything a pass needs; cheap to clone.
#[derive(Clone)]
pub struct Reconciler {
    /// Cancelled with `cancel`: every request and wait of a pass ends at shutdown.
    gateway: Gateway,
    engine: Arc<Engine>,
    state: State,
    /// The account the state's list bindings belong to.
    account: Account,
    guards: Guards,
    time_zone: Tz,
    /// Once cancelled, no further page read or write batch starts.
    cancel: CancellationToken,
    /// A cached list's members are read again after this long.
    verify_members_every: Duration,
    /// The removal grace of rules without their own `REMOVE_AFTER`.
    default_remove_after: Option<Duration>,
    history_retention: Duration,
    /// Whether removals are recorded with the field values that made the rule say no.
    history_facts: bool,
}

#[derive(Clone)]
pub struct PassRequest {
    pub rules: Vec<Arc<Rule>>,
    pub trigger: Trigger,
    /// Plan only: create nothing, write nothing, record nothing.
    pub dry_run: bool,
    pub allow_mass_removal: bool,
    /// The run's frozen "today"; `None` means today in the configured time zone.
    pub today: Option<Date>,
    /// Told of the pass's progress every second (the systemd status line, a progress bar).
    pub progress: Option<ProgressSink>,
    /// The run's "now" for removal grace and history; `None` means the clock's.
    pub now: Option<chrono::DateTime<chrono::Utc>>,
}

impl PassRequest {
    /// A pass over `rules`, writing, with no progress sink.
    pub fn new(rules: Vec<Arc<Rule>>, trigger: Trigger) -> Self {
        Self { rules, trigger, dry_run: false, allow_mass_removal: false, today: None, progress: None, now: None }
    }
}

/// The result of one rule's run.
#[derive(Debug, Clone)]
pub struct RuleReport {
    pub rule: Arc<Rule>,
    pub list_id: Option<ListId>,
    pub list_created: bool,
    pub members_before: u64,
    pub scanned: u64,
    pub matched: u64,
    pub eval_errors: u64,
    pub first_error: Option<String>,
    pub plan: Plan,
    pub added: u64,
    pub removed: u64,
    /// Non-members passing the rule's FILTER (the size of the rule's own read; for lower bounds).
    pub in_filter: u64,
    /// Requests this rule's run needed (a shared scan counts for every rule it served).
    pub usage: Usage,
    pub read: ReadKind,
    pub members_from: MemberSource,
    /// The server filter derived from `matches` for this pass (`key=value` pairs).
    pub derived_filter: Vec<(String, String)>,
    /// The removal grace that applied (the rule's `REMOVE_AFTER` or the configured default).
    pub remove_after: Option<Duration>,
    pub outcome: Outcome,
    /// Why it failed or was held.
    pub detail: Option<String>,
    pub duration: Duration,
}

impl RuleReport {
    /// A run that failed before it could say more than `detail`.
    fn failed(rule: Arc<Rule>, detail: String) -> Self {
        Self {
            rule,
            list_id: None,
            list_created: false,
            members_before: 0,
            scanned: 0,
            matched: 0,
            eval_errors: 0,
            first_error: None,
            plan: Plan::default(),
            added: 0,
            removed: 0,
            in_filter: 0,
            usage: Usage::default(),
            read: ReadKind::SharedScan,
            members_from: MemberSource::Unknown,
            derived_filter: Vec::new(),
            remove_after: None,
            outcome: Outcome::Failed,
            detail: Some(detail),
            duration: Duration::ZERO,
        }
    }
}

#[derive(Debug, Clone)]
pub struct PassReport {
    pub rules: Vec<RuleReport>,
    pub read: ReadKind,
    /// Every request of the pass, once.
    pub usage: Usage,
    pub duration: Duration,
}

impl PassReport {
    pub fn any(&self, outcome: Outcome) -> bool {
        self.rules.iter().any(|r| r.outcome == outcome)
    }
}

/// One rule's progress through a pass.
struct Slot {
    rule: Arc<Rule>,
    meter: Arc<Meter>,
    gateway: Gateway,
    list: Option<ListId>,
    created: bool,
    /// The list's size as the directory gave it this pass.
    listed: Option<u64>,
    /// The cache holds this list's members and the counts agree: no member read needed.
    trusted_cache: bool,
    members_from: MemberSource,
    /// What the shared scan saw of a cached list's members.
    seen: Option<read::CachedSeen>,
    /// Cached members the scan did not return: deleted contacts, gone from the list by themselves.
    unseen: Vec<ContactId>,
    eval: Evaluation,
    /// Non-members passing the rule's FILTER: what its own read would return.
    in_filter: u64,
    error: Option<ReconcileError>,
}

/// What a [`Reconciler`] is made of.
pub struct Parts {
    pub gateway: Gateway,
    pub account: Account,
    pub engine: Arc<Engine>,
    pub state: State,
    pub guards: Guards,
    pub time_zone: Tz,
    /// Shutdown: once cancelled, no page read, write batch or wait of a pass goes on.
    pub cancel: CancellationToken,
    /// A cached list's members are read again after this long (`[state] verify_members_every`).
    pub verify_members_every: Duration,
    /// `[rules] default_remove_after`.
    pub default_remove_after: Option<Duration>,
    /// `[state] history_retention`.
    pub history_retention: Duration,
    /// `[state] history_facts`.
    pub history_facts: bool,
}

impl Reconciler {
    /// The one constructor. The gateway is tied to `cancel` here, so every request of every pass
    /// ends at shutdown however the caller built its gateway, and expects (for planning, not for
    /// reading) the paging the account's endpoints taught an earlier run.
    pub fn new(parts: Parts) -> Self {
        let Parts {
            gateway,
            account,
            engine,
            state,
            guards,
            time_zone,
            cancel,
            verify_members_every,
            default_remove_after,
            history_retention,
            history_facts,
        } = parts;
        match state.paging(&account) {
            Ok(learned) => {
                for (endpoint, paging) in learned {
                    gateway.remember(endpoint, paging);
                }
            }
            Err(e) => tracing::debug!(error = %e, "no remembered paging"),
        }
        let gateway = gateway.cancelled_by(cancel.clone());
        Self {
            gateway,
            account,
            engine,
            state,
            guards,
            time_zone,
            cancel,
            verify_members_every,
            default_remove_after,
            history_retention,
            history_facts,
        }
    }

    /// The reconciler a config asks for, on `connection`'s gateway and account: what `sync`,
    /// `plan` and the daemon all build.
    pub fn from_config(
        config: &crate::config::Config,
        connection: &crate::connection::Connection,
        engine: Arc<Engine>,
        state: State,
        cancel: CancellationToken,
    ) -> Self {
        Self::new(Parts {
            gateway: connection.gateway.clone(),
            account: connection.account.clone(),
            engine,
            state,
            guards: config.guards.clone(),
            time_zone: config.time_zone,
            cancel,
            verify_members_every: config.verify_members_every,
            default_remove_after: config.default_remove_after,
            history_retention: config.history_retention,
            history_facts: config.history_facts,
        })
    }

    /// The same reconciler with other guards (the daemon keeps one per config).
    pub fn with_guards(self, guards: Guards) -> Self {
        Self { guards, ..self }
    }

    /// The token that stops this reconciler's passes.
    pub fn cancel_token(&self) -> &CancellationToken {
        &self.cancel
    }

    /// Runs one pass over `req.rules`; every rule gets a report, failed or not. A panic anywhere
    /// inside the pass is that pass's failure: each of its rules is recorded and logged as
    /// failed, naming the panic, and the caller (the daemon's loop, `sync`) goes on as after any
    /// failed run. Writes made before the panic stand; the next run converges.
    pub async fn run_pass(&self, req: PassRequest) -> PassReport {
        use futures_util::FutureExt;
        let (rules, trigger, dry_run) = (req.rules.clone(), req.trigger, req.dry_run);
        let (started, started_at) = (Instant::now(), crate::state::now());
        let panic = match std::panic::AssertUnwindSafe(self.run_pass_unguarded(req)).catch_unwind().await {
            Ok(report) => return report,
            Err(panic) => crate::fault::panic_message(panic.as_ref()),
        };
        tracing::error!(trigger = %trigger, rules = rules.len(), error = %panic, "pass panicked");
        let detail =
            format!("segsync panicked in this pass ({panic}); writes made before it stand, the next run converges");
        let reports: Vec<RuleReport> =
            rules.iter().map(|rule| RuleReport::failed(rule.clone(), detail.clone())).collect();
        for report in &reports {
            self.record(report, trigger, &started_at, dry_run).await;
        }
        PassReport { rules: reports, read: ReadKind::SharedScan, usage: Usage::default(), duration: started.elapsed() }
    }

    async fn run_pass_unguarded(&self, req: PassRequest) -> PassReport {
        let started = Instant::now();
        let started_at = crate::state::now();
        let today = req.today.unwrap_or_else(|| Date(chrono::Utc::now().with_timezone(&self.time_zone).date_naive()));
        // Learned paging is probed again at least every `verify_members_every` (and by every new
        // process), so no lesson is kept forever.
        self.gateway.reprobe_older_than(self.verify_members_every);
        let pass_meter = Arc::new(Meter::default());
        let mut slots: Vec<Slot> = req
            .rules
            .iter()
            .map(|rule| {
                let meter = Arc::new(Meter::default());
                Slot {
                    rule: rule.clone(),
                    gateway: self.gateway.metered(meter.clone()),
                    meter,
                    list: None,
                    created: false,
                    listed: None,
                    trusted_cache: false,
                    members_from: MemberSource::Unknown,
                    seen: None,
                    unseen: Vec::new(),
                    eval: Evaluation::default(),
                    in_filter: 0,
                    error: None,
                }
            })
            .collect();

        let shared_meter = Arc::new(Meter::default());
        let (predicted, estimated) = self.predict(&req.rules);
        let mut meters: Vec<Arc<Meter>> = slots.iter().map(|s| s.meter.clone()).collect();
        meters.extend([pass_meter.clone(), shared_meter.clone()]);
        let reporter = progress::Reporter::start(
            req.trigger,
            req.rules.len(),
            predicted.as_str(),
            estimated,
            estimated.and_then(|n| self.gateway.least_time(n)),
            meters,
            req.progress.clone(),
        );

        // 1. Bind each rule to its list. The directory's counts also tell whose cache still holds.
        let directory = self.list_directory(&pass_meter).await;
        join_all(slots.iter_mut().map(|slot| self.bind(slot, req.dry_run, directory.as_deref()))).await;
        for slot in &mut slots {
            self.consult_cache(slot, directory.as_deref());
        }

        // 2. Choose the cheaper read: one shared scan (cached lists ride it, their members judged
        //    on its records), or each rule's own filtered read of non-members (members read).
        //    Then read the members the cache cannot give, and the candidates.
        let live: Vec<usize> = (0..slots.len()).filter(|&i| slots[i].error.is_none()).collect();
        let read = self.choose_read(&slots, &live);
        self.members(&mut slots, read, today, req.dry_run).await;
        let live: Vec<usize> = (0..slots.len()).filter(|&i| slots[i].error.is_none()).collect();
        self.read_candidates(&mut slots, &live, read, &shared_meter, today).await;
        self.settle_cached(&mut slots, today, req.dry_run).await;
        reporter.writing();

        // 3. Plan, guard and apply each rule; one rule's failure is not another's.
        let shared_usage = shared_meter.usage();
        let meters: Vec<Arc<Meter>> = slots.iter().map(|s| s.meter.clone()).collect();
        let reports =
            join_all(slots.into_iter().map(|slot| self.finish(slot, &req, read, &shared_usage, (started, today))))
                .await;
        let mut usage = shared_usage.clone();
        for meter in meters.iter().chain([&pass_meter]) {
            usage.absorb(&meter.usage());
        }
        for report in &reports {
            self.record(report, req.trigger, &started_at, req.dry_run).await;
        }
        self.remember_paging();
        if !req.dry_run {
            self.prune_history().await;
        }
        drop(reporter);
        let report = PassReport { rules: reports, read, usage, duration: started.elapsed() };
        tracing::info!(
            trigger = %req.trigger,
            rules = report.rules.len(),
            read_plan = read.as_str(),
            api_requests = report.usage.total_requests(),
            requests = %serde_json::to_string(&report.usage.requests).unwrap_or_default(),
            retries = report.usage.retries,
            throttled = report.usage.throttled,
            duration_ms = report.duration.as_millis() as u64,
            dry_run = req.dry_run,
            "pass finished"
        );
        report
    }

    async fn finish(
        &self,
        slot: Slot,
        req: &PassRequest,
        read: ReadKind,
        shared: &Usage,
        (started, today): (Instant, Date),
    ) -> RuleReport {
        let rule = slot.rule.clone();
        crate::fault::panic_in_pass(rule.name.as_str());
        let members_before = slot.eval.members.len() as u64;
        let mut report = RuleReport {
            rule: rule.clone(),
            list_id: slot.list.clone(),
            list_created: slot.created,
            members_before,
            scanned: slot.eval.evaluated,
            matched: slot.eval.matched,
            eval_errors: slot.eval.errors,
            first_error: slot.eval.first_error.as_ref().map(|(id, e)| format!("contact {id}: {e}")),
            plan: Plan::default(),
            in_filter: slot.in_filter,
            added: 0,
            removed: 0,
            usage: Usage::default(),
            read,
            members_from: slot.members_from,
            derived_filter: rule.derived_filter(today).iter().map(crate::rules::FilterTerm::query_pair).collect(),
            remove_after: rule.remove_after.or(self.default_remove_after),
            outcome: Outcome::Ok,
            detail: None,
            duration: Duration::ZERO,
        };
        if let Some(e) = slot.error {
            report.outcome = if e.is_interrupted() { Outcome::Interrupted } else { Outcome::Failed };
            report.detail = Some(e.to_string());
        } else {
            // Sorting a million ids is real CPU work: off the async workers.
            let now = req.now.unwrap_or_else(chrono::Utc::now);
            let grace = self.grace(&rule, now);
            let (eval, mode, guards, allow) = (slot.eval, rule.mode, self.guards.clone(), req.allow_mass_removal);
            let planning = grace.clone();
            let planned = tokio::task::spawn_blocking(move || {
                let mut eval = eval;
                let plan = plan::plan(&mut eval, mode, &guards, allow, &planning);
                (plan, eval.members, eval.reasons)
            })
            .await
            .map_err(|e| Plan { refused: Some(format!("planning failed: {e}")), ..Plan::default() });
            let (members, reasons) = match planned {
                Ok((plan, members, reasons)) => {
                    report.plan = plan;
                    (Some(members), reasons)
                }
                Err(plan) => {
                    report.plan = plan;
                    (None, Vec::new())
                }
            };
            let mut applied = apply::Applied::default();
            let mut write_error = false;
            if let Some(why) = &report.plan.refused {
                report.outcome = Outcome::Failed;
                report.detail = Some(why.clone());
            } else if let (Some(list), false) = (&slot.list, req.dry_run) {
                let error = match apply::apply(&slot.gateway, list, &report.plan, &self.cancel).await {
                    Ok(done) => {
                        applied = done;
                        None
                    }
                    Err((done, e)) => {
                        applied = done;
                        Some(e)
                    }
                };
                write_error = error.is_some();
                report.added = applied.added.done;
                report.removed = applied.removed.done;
                if let Some(e) = error {
                    report.outcome = if e.is_interrupted() { Outcome::Interrupted } else { Outcome::Failed };
                    report.detail = Some(e.to_string());
                } else if let Some(why) = applied.unconfirmed() {
                    tracing::warn!(rule = %rule.name, list_id = %list, detail = %why, "writes unconfirmed");
                    report.outcome = Outcome::Partial;
                    report.detail = Some(why);
                }
            }
            if let (Some(list), false) = (&slot.list, req.dry_run) {
                let applied_all = !write_error && report.plan.refused.is_none();
                self.keep_grace(&rule, &grace, &report.plan, applied_all && report.plan.held.is_none());
                if !write_error {
                    self.log_history(&rule, list, req.trigger, &report.plan, &reasons, now);
                }
            }
            if let (Some(list), Some(members), false) = (&slot.list, members, req.dry_run) {
                let update =
                    cache::Update { from: slot.members_from, members, unseen: slot.unseen, write_failed: write_error };
                report.plan = self.update_cache(&rule, list, update, std::mem::take(&mut report.plan), &applied).await;
            }
            if report.outcome == Outcome::Ok
                && let Some(why) = &report.plan.held
            {
                report.outcome = Outcome::Held;
                report.detail = Some(why.clone());
            }
        }
        report.usage = slot.meter.usage();
        if read == ReadKind::SharedScan {
            report.usage.absorb(shared);
        }
        report.duration = started.elapsed();
        report
    }
}
