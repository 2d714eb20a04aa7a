//! One reconcile pass over the rules due now, as stages in pass order, each taking the previous
//! stage's output and returning its own typed value:
//!
//! 1. `recall` → `Recalled`: what the state remembers of each rule (one blocking read);
//! 2. `bind` → `Bound`: each rule's list, from one complete directory read;
//! 3. `members` → `Members`: each list's members (the cache or a read), and the read they choose;
//! 4. `read` → `Candidates`: the shared scan or each rule's own read, judged page by page;
//! 5. `settle` → `Judged`: cached members reconciled with what the scan saw;
//! 6. `plan` → `Planned`: the pure plan, with the removal grace and the guards;
//! 7. `apply` → `Written`: the writes, in batches;
//! 8. `commit` → `RuleReport`: the rule's state writes in one transaction, and its summary event.
//!
//! A rule that stops at any stage carries a `Stopped` to `commit` instead; one rule's failure never
//! stops another's. No stage writes the state before `commit`.
//!
//! Stages 1–8 are one `round`. A pass has a second round only when a partitioned rule's contacts
//! name lists it has no part for yet (`partition::unfold`, between `read` and `settle`).

mod apply;
mod bind;
mod commit;
mod cost;
mod grace;
mod judge;
mod members;
mod partition;
pub mod plan;
mod progress;
mod read;
mod recall;
mod settle;
mod suppress;

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono_tz::Tz;
use futures_util::future::join_all;
use rhai::Engine;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::gateway::{Gateway, GatewayError, Meter, Usage};
use crate::ids::{Account, ListId};
pub use crate::outcome::{Outcome, Trigger};
use crate::rules::{Date, Finding, Rule};
use crate::state::{State, StateError};
pub use commit::sample;
pub use grace::Grace;
pub use plan::{Evaluation, Guards, Plan};
pub use progress::{Progress, ProgressSink};

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Gateway(#[from] GatewayError),
    #[error(transparent)]
    State(#[from] StateError),
    /// The shared read of a pass failed: every rule it served fails with it.
    #[error("reading contacts: {0}")]
    Read(Arc<ReconcileError>),
    #[error("the daemon stopped mid-run; the next run converges")]
    Interrupted,
    /// The planning thread failed (it panicked).
    #[error("planning failed: {0}")]
    Planning(String),
    /// A shadow check found the native evaluator answering unlike Rhai during this run.
    #[error(
        "the native evaluator disagreed with Rhai during this run (see `native verdict differs`); nothing changed, \
         and the rule runs on Rhai from now on"
    )]
    NativeDisagreed,
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
    /// The most lists a partitioned rule may fill without its own `MAX_LISTS`.
    max_lists_per_rule: u64,
}

#[derive(Clone)]
pub struct PassRequest {
    /// When the request was made: a native evaluator retired after it judged part of this pass.
    pub made: Instant,
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
    /// Every loaded suppression rule (`MODE = "suppress"`), run or not: each keeps its contacts
    /// out of the lists it applies to in every pass.
    pub suppressors: Vec<Arc<Rule>>,
    /// Suppression rule files that do not load (and have no running version), with why: while
    /// there is one, no list changes (its contacts could not be kept out).
    pub broken_suppressors: Vec<(String, String)>,
    /// Every rule the caller has loaded, run or not (checks across rules: a partitioned rule's list
    /// must not be another rule's `LIST`).
    pub loaded: Vec<Arc<Rule>>,
}

impl PassRequest {
    /// A pass over `rules`, writing, with no progress sink.
    pub fn new(rules: Vec<Arc<Rule>>, trigger: Trigger) -> Self {
        Self {
            made: Instant::now(),
            rules,
            trigger,
            dry_run: false,
            allow_mass_removal: false,
            today: None,
            progress: None,
            now: None,
            suppressors: Vec::new(),
            broken_suppressors: Vec::new(),
            loaded: Vec::new(),
        }
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
    /// What the data showed that is likely a mistake in the rule (a field no contact has, a
    /// FILTER value no contact holds).
    pub findings: Vec<Finding>,
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
            findings: Vec::new(),
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
    /// `[rules] max_lists_per_rule`.
    pub max_lists_per_rule: u64,
}

impl Reconciler {
    /// The one constructor. The gateway is tied to `cancel` here, so every request of every pass
    /// ends at shutdown however the caller built its gateway. Touches nothing: each pass recalls
    /// what it needs from the state on a blocking thread.
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
            max_lists_per_rule,
        } = parts;
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
            max_lists_per_rule,
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
            max_lists_per_rule: config.max_lists_per_rule,
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
            self.record_alone(report, trigger, &started_at, dry_run).await;
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
        let partition_meter = Arc::new(Meter::default());
        let partitioned = self.partition(&req.rules, &req.loaded).await;
        // Suppression rules fill no list: each is judged once, for every list it applies to.
        let (suppressing, rules): (Vec<Arc<Rule>>, Vec<Arc<Rule>>) =
            partitioned.rules.into_iter().partition(|r| r.mode == crate::rules::Mode::Suppress);
        let mut suppressing_all = req.suppressors.clone();
        suppressing_all
            .extend(suppressing.iter().filter(|r| !req.suppressors.iter().any(|s| s.name == r.name)).cloned());
        let suppressors = self.suppressors(&suppressing_all, today, &partition_meter).await;
        let pass = Pass { req: &req, suppressors: &suppressors, today, started, started_at: &started_at };
        let mut reporter = None;
        let first = self.round(&pass, rules, &partitioned.unfolding, &partition_meter, &mut reporter).await;
        let (mut reports, read, mut usage) = (first.reports, first.read, first.usage);
        let mut refused = partitioned.refused;
        refused.extend(first.refused);
        // The lists unfolding rules' contacts named that they had no part for: a second round,
        // so a contact moving to a new value joins its new list in the same pass.
        if !first.unfolded.is_empty() {
            let second = self.round(&pass, first.unfolded, &[], &partition_meter, &mut reporter).await;
            reports.extend(second.reports);
            usage.absorb(&second.usage);
        }
        usage.absorb(&partition_meter.usage());
        // A suppression rule the pass ran: what it selected.
        for s in suppressors.iter().filter(|s| suppressing.iter().any(|r| r.name == s.rule.name)) {
            let report = suppress::report(s);
            self.record_alone(&report, req.trigger, &started_at, req.dry_run).await;
            reports.push(report);
        }
        // A partitioned rule's run, as its file: refused whole, or the summary of its lists.
        for report in refused {
            self.record_alone(&report, req.trigger, &started_at, req.dry_run).await;
            reports.push(report);
        }
        for parent in req.rules.iter().filter(|r| matches!(r.lists, crate::rules::Lists::Partitioned { .. })) {
            if reports.iter().any(|r| Arc::ptr_eq(&r.rule, parent)) {
                continue;
            }
            let lists: Vec<&RuleReport> = reports.iter().filter(|r| r.rule.file_rule() == &parent.name).collect();
            let summary = partition::summary(parent, &lists);
            self.record_alone(&summary, req.trigger, &started_at, req.dry_run).await;
            reports.push(summary);
        }

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

    /// One round of a pass over `rules`: recall, bind, members, read, settle, then plan, apply and
    /// commit each rule. The first round starts the pass's progress reporter; a second follows it.
    async fn round(
        &self,
        pass: &Pass<'_>,
        rules: Vec<Arc<Rule>>,
        unfolding: &[partition::Unfolding],
        partition_meter: &Arc<Meter>,
        reporter: &mut Option<progress::Reporter>,
    ) -> Round {
        let (req, today) = (pass.req, pass.today);
        let memory = self.recall(&rules).await;
        let contacts = memory.contacts;
        let jobs = self.jobs(&rules, memory.rules);
        let (directory_meter, shared_meter) = (Arc::new(Meter::default()), Arc::new(Meter::default()));
        let mut meters: Vec<Arc<Meter>> =
            jobs.iter().map(|j| j.as_ref().map_or_else(|s| s.meter(), |j| j.meter.clone())).collect();
        meters.extend([directory_meter.clone(), shared_meter.clone()]);
        match reporter {
            Some(reporter) => reporter.follow(meters.clone()),
            None => {
                let (predicted, estimated) = cost::predict(&jobs, contacts, self.page(), today);
                *reporter = Some(progress::Reporter::start(
                    req.trigger,
                    rules.len(),
                    predicted.as_str(),
                    estimated,
                    estimated.and_then(|n| self.gateway.least_time(n)),
                    meters.iter().chain([partition_meter]).cloned().collect(),
                    req.progress.clone(),
                ));
            }
        }

        let directory = self.list_directory(&directory_meter).await;
        let bound = join_all(jobs.into_iter().map(|job| self.bind(job, directory.as_deref()))).await;
        let (read, members) = self.members(bound, directory.as_deref(), contacts, today).await;
        let (candidates, named) = self.read(members, read, unfolding, &shared_meter, today).await;
        let (candidates, unfolded, refused) = partition::unfold(candidates, unfolding, named, req);
        let judged = self.settle(candidates, today).await;
        if let Some(reporter) = reporter {
            reporter.writing();
        }
        let shared_usage = shared_meter.usage();
        let reports = join_all(judged.into_iter().map(|judged| async {
            let run = (req, read, &shared_usage, (pass.started, pass.started_at));
            let written = match judged {
                Ok(judged) => {
                    let mut suppression = suppress::for_rule(pass.suppressors, &judged.bound.job.rule);
                    if let Some((name, why)) = req.broken_suppressors.first() {
                        suppression.failed.get_or_insert_with(|| {
                            format!("the suppression rule {name} does not load ({why}); nothing changed until it does")
                        });
                    }
                    self.apply(self.plan(judged, req, suppression).await, req.dry_run).await
                }
                Err(stopped) => Err(stopped),
            };
            self.commit(written, run).await
        }))
        .await;
        let mut usage = shared_usage;
        for meter in meters.iter().filter(|m| !Arc::ptr_eq(m, &shared_meter)) {
            usage.absorb(&meter.usage());
        }
        Round { reports, read, usage, unfolded, refused }
    }

    /// The page size a contacts read is expected to take (for planning).
    fn page(&self) -> u64 {
        u64::from(self.gateway.expected_paging(crate::gateway::Resource::Contacts).page_size)
    }

    /// One job per rule: its recalled state, or why it could not be read.
    fn jobs(&self, rules: &[Arc<Rule>], recalled: Vec<Result<recall::Recalled, StateError>>) -> Vec<Flow<Job>> {
        rules
            .iter()
            .zip(recalled)
            .map(|(rule, recalled)| {
                let meter = Arc::new(Meter::default());
                let job = |recalled| Job {
                    rule: rule.clone(),
                    gateway: self.gateway.metered(meter.clone()),
                    meter: meter.clone(),
                    recalled,
                };
                match recalled {
                    Ok(recalled) => Ok(job(recalled)),
                    Err(e) => Err(Stopped::new(bind::Bound::unbound(job(recall::Recalled::default())), e.into())),
                }
            })
            .collect()
    }
}

/// What every round of one pass shares.
struct Pass<'a> {
    req: &'a PassRequest,
    suppressors: &'a [suppress::Suppressor],
    today: Date,
    started: Instant,
    started_at: &'a str,
}

/// What one round of a pass did.
struct Round {
    reports: Vec<RuleReport>,
    read: ReadKind,
    /// Its requests (the shared read counted once).
    usage: Usage,
    /// The parts for lists unfolding rules' contacts named: the next round's rules.
    unfolded: Vec<Arc<Rule>>,
    /// Unfolding rules that changed nothing (too many lists, a failed read), reported whole.
    refused: Vec<RuleReport>,
}

/// One rule's run as it goes through the stages: the rule, its request meter and metered
/// gateway, and what the state remembered of it at the start of the pass.
pub(super) struct Job {
    rule: Arc<Rule>,
    meter: Arc<Meter>,
    gateway: Gateway,
    recalled: recall::Recalled,
}

/// A rule that stopped at some stage: what it had reached, and why.
pub(super) struct Stopped {
    bound: bind::Bound,
    /// What it had evaluated before it stopped (its counts are reported).
    eval: Evaluation,
    error: ReconcileError,
}

impl Stopped {
    fn new(bound: bind::Bound, error: ReconcileError) -> Box<Self> {
        Box::new(Self { bound, eval: Evaluation::default(), error })
    }

    fn meter(&self) -> Arc<Meter> {
        self.bound.job.meter.clone()
    }
}

/// A stage's output for one rule, or where and why it stopped.
pub(super) type Flow<T> = Result<T, Box<Stopped>>;
