//! `segsync run`: the long-running service. Wiring, the event loop, signals, reload, shutdown and
//! systemd notifications live here and nowhere else.
//!
//! Timers, the file watcher and signal handlers only send [`Event`]s. Startup is a reload from
//! nothing: one path loads rules for both, and a failed reload keeps what is running. At most one
//! run per rule at a time; triggers during a run coalesce into one follow-up run; rules due
//! together share one pass (and so one contact scan).

mod diff;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rhai::Engine;
use sd_notify::NotifyState;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, ConfigErrors};
use crate::connection::Connection;
use crate::ids::RuleName;
use crate::metrics::{Health, Metrics};
use crate::reconcile::{Outcome, PassReport, PassRequest, Progress, ProgressSink, Reconciler, Trigger};
use crate::rules::{self, Diagnostic, Rule, RuleSet};
use crate::schedule::watch::RulesWatcher;
use crate::schedule::{Clock, CronTable, timer, watch as rules_watch};
use crate::signals::{Signal, Signals};
use crate::state::{InstanceLock, LoadedRule, RunAnswer, RunRequest, State};

/// Everything that can make the daemon act.
#[derive(Debug)]
pub enum Event {
    /// These rules' cron schedules fell due.
    Due(Vec<RuleName>),
    /// Something changed in the rules folder.
    RulesChanged,
    /// SIGHUP: reload config.toml and all rules.
    Reload,
    /// SIGTERM or SIGINT.
    Shutdown,
    /// A pass finished.
    PassDone(PassReport),
    /// Operators' run requests, taken from the state (`segsync sync [RULE…]` while we run).
    RunRequests(Vec<RunRequest>),
    /// A task the daemon cannot run without (the cron timer, the signal handlers) panicked: the
    /// daemon stops with an error, so systemd restarts it, rather than live on running nothing.
    TaskFailed { task: &'static str, error: String },
}

/// Spawns a task the daemon cannot run without; a panic in it becomes [`Event::TaskFailed`].
fn spawn_critical(
    task: &'static str,
    work: impl std::future::Future<Output = ()> + Send + 'static,
    tx: mpsc::UnboundedSender<Event>,
) {
    let handle = tokio::spawn(work);
    tokio::spawn(async move {
        if let Err(e) = handle.await
            && e.is_panic()
        {
            let error = crate::fault::panic_message(e.into_panic().as_ref());
            let _ = tx.send(Event::TaskFailed { task, error });
        }
    });
}

/// Polls the state for operators' run requests and reports them as [`Event::RunRequests`]; the
/// reads run on a blocking thread, so a pass's long commit delays only this poll.
fn spawn_request_poll(state: State, tx: mpsc::UnboundedSender<Event>, stop: CancellationToken) {
    tokio::spawn(async move {
        let mut poll = tokio::time::interval(APPROVAL_POLL);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = poll.tick() => {}
            }
            let state = state.clone();
            match tokio::task::spawn_blocking(move || state.take_run_requests()).await {
                Ok(Ok(requests)) if requests.is_empty() => {}
                Ok(Ok(requests)) => {
                    let _ = tx.send(Event::RunRequests(requests));
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "state warning"),
                Err(e) => tracing::warn!(error = %e, "state warning"),
            }
        }
    });
}

/// The daemon's own state writes (what it runs, answers to run requests), done in the order sent
/// on a blocking thread: the event loop never waits on SQLite, which a pass's commit may hold for
/// seconds, so the heartbeat and the watchdog go on.
struct StateWrites(mpsc::UnboundedSender<StateWrite>);

/// One of the daemon's own state writes.
type StateWrite = Box<dyn FnOnce(&State) -> Result<(), crate::state::StateError> + Send>;

impl StateWrites {
    fn start(state: &State, tracker: &TaskTracker) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<StateWrite>();
        let state = state.clone();
        tracker.spawn(async move {
            while let Some(write) = rx.recv().await {
                let state = state.clone();
                match tokio::task::spawn_blocking(move || write(&state)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::warn!(error = %e, "state warning"),
                    Err(e) => tracing::warn!(error = %e, "state warning"),
                }
            }
        });
        Self(tx)
    }

    fn send(&self, write: impl FnOnce(&State) -> Result<(), crate::state::StateError> + Send + 'static) {
        let _ = self.0.send(Box::new(write));
    }
}

/// How long the watcher waits for a burst of file events to settle.
const DEBOUNCE: Duration = Duration::from_millis(400);

/// How often the daemon looks for operators' confirmations of held removals.
const APPROVAL_POLL: Duration = Duration::from_secs(2);

/// How often the rules folder is re-read even without a file event: inotify misses changes on network
/// file systems and some mounts, and a re-read with unchanged hashes does nothing.
const RESCAN: Duration = Duration::from_secs(300);

struct Daemon {
    config: Config,
    engine: Arc<Engine>,
    rules: RuleSet,
    connection: Connection,
    /// Connections replaced by a reload, closed at shutdown (in-flight passes may still use them).
    retired: Vec<Connection>,
    state: State,
    /// The daemon's own state writes, in order, off the event loop.
    writes: StateWrites,
    _lock: InstanceLock,
    running: HashSet<RuleName>,
    pending: BTreeMap<RuleName, Trigger>,
    /// Rules whose next run may apply a held mass removal (`segsync sync RULE --allow-mass-removal`).
    approved: HashSet<RuleName>,
    tx: mpsc::UnboundedSender<Event>,
    table: watch::Sender<CronTable>,
    tracker: TaskTracker,
    /// Cancelled at shutdown: no new write batch or page read starts.
    apply_cancel: CancellationToken,
    watcher: Option<RulesWatcher>,
    status: String,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    /// Suppression rule files that do not load and have no running version (name, why): while
    /// there is one, no list changes.
    broken_suppressors: Vec<(String, String)>,
    /// Rule files the last load refused: one that loads again is logged `rule restored`.
    rejected: HashSet<String>,
    /// The database this process opened, whatever the config now says (a new path needs a restart).
    open_state_path: std::path::PathBuf,
    /// Where `/metrics` is served now, and what stops that server.
    metrics_server: Option<(std::net::SocketAddr, CancellationToken)>,
    producers: CancellationToken,
}

/// Runs the daemon until SIGTERM/SIGINT (or `stop`), then shuts down within the configured deadline.
pub async fn run(config: Config, clock: Clock, stop: CancellationToken) -> anyhow::Result<()> {
    let (tx, rx) = mpsc::unbounded_channel();
    // Signal handlers first: the default SIGHUP action would kill the process.
    spawn_signals(tx.clone(), stop.clone())?;
    tracing::info!(version = env!("CARGO_PKG_VERSION"), config = %config.path.display(), pid = std::process::id(), "segsync started");
    let producers = CancellationToken::new();
    let (mut daemon, table_rx) = Daemon::start(config, tx.clone(), &producers).await?;

    // Startup is a rules reload from nothing. With no usable rule at all there is nothing to run:
    // refuse to start, as `segsync check` (the unit's start gate) does.
    if let Some((loaded, errors, broken)) = load_rules(&daemon.engine, &daemon.config.rules_dir).await {
        if loaded.is_empty() {
            log_rejected(&errors);
            let rejected = errors.iter().filter_map(|e| e.rule_name()).count();
            anyhow::bail!("{}", rules::nothing_to_run(&daemon.config.rules_dir, rejected));
        }
        daemon.apply_rules(loaded, errors, broken, Trigger::Startup, clock);
    }
    daemon.start_watcher();
    let due_tx = tx.clone();
    let timer = timer::run(table_rx, clock, producers.clone(), move |due| {
        let _ = due_tx.send(Event::Due(due));
    });
    spawn_critical("cron timer", timer, tx.clone());
    spawn_request_poll(daemon.state.clone(), tx, producers.clone());
    notify(&[NotifyState::Ready, NotifyState::Status(&format!("{} rule(s) loaded", daemon.rules.len()))]);
    daemon.start_pending();
    let failure = daemon.event_loop(rx, clock).await;
    daemon.shutdown(producers).await;
    failure.map_or(Ok(()), Err)
}

/// A load of the rules folder: the rules, the problems of the files that did not load, and the
/// suppression files among them.
type Load = (RuleSet, Vec<Diagnostic>, Vec<(String, String)>);

/// Loads the rules folder on a blocking thread (compiling runs each file's top level in Rhai), and
/// runs each rule's own tests: a rule that fails them is refused like a syntax error.
/// `None` if the load itself broke; the caller then keeps what runs.
async fn load_rules(engine: &Arc<Engine>, dir: &std::path::Path) -> Option<Load> {
    let (engine, dir) = (engine.clone(), dir.to_path_buf());
    let load = move || {
        let (set, errors, _) = rules::load_tested(&engine, &dir);
        let broken = rules::broken_suppressions(&errors);
        (set, errors, broken)
    };
    match tokio::task::spawn_blocking(load).await {
        Ok(loaded) => Some(loaded),
        Err(e) => {
            tracing::error!(error = %e, "reload failed");
            None
        }
    }
}

fn spawn_signals(tx: mpsc::UnboundedSender<Event>, stop: CancellationToken) -> anyhow::Result<()> {
    let mut signals = Signals::install(true).context("installing the signal handlers")?;
    let events = tx.clone();
    spawn_critical(
        "signal handlers",
        async move {
            let tx = events;
            loop {
                let event = tokio::select! {
                    signal = signals.next() => match signal {
                        Signal::Reload => Event::Reload,
                        Signal::Stop => Event::Shutdown,
                    },
                    _ = stop.cancelled() => Event::Shutdown,
                };
                let last = matches!(event, Event::Shutdown);
                if tx.send(event).is_err() || last {
                    return;
                }
            }
        },
        tx,
    );
    Ok(())
}

fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "notify failed");
    }
}

fn log_rejected(errors: &[Diagnostic]) {
    for e in errors {
        let rule = e.rule_name().unwrap_or_default();
        tracing::error!(rule, file = %e.file.display(), line = e.line, col = e.col, error = %e.message, "rule rejected");
    }
}

impl Daemon {
    /// The daemon's parts, before any rule is loaded: the instance lock, the state, the connection,
    /// health remembered from the state, and the metrics endpoint.
    async fn start(
        config: Config,
        tx: mpsc::UnboundedSender<Event>,
        producers: &CancellationToken,
    ) -> anyhow::Result<(Self, watch::Receiver<CronTable>)> {
        let lock = crate::state::lock(&config.state_path)?;
        let state = State::open(&config.state_path)?;
        let connection = Connection::open(&config, Some(&state)).await?;
        if connection.sandbox.is_some()
            && let Err(e) = state.forget_other_sandboxes(&connection.account)
        {
            tracing::warn!(error = %e, "state warning");
        }
        let (table, table_rx) = watch::channel(CronTable::default());
        let health = Arc::new(Health::new(config.metrics.overdue_factor));
        // `/healthz` judges from what the state remembers, exactly as `status` does.
        match (state.loaded(), state.last_successes()) {
            (Ok(loaded), Ok(successes)) => health.remember(&loaded, &successes),
            (Err(e), _) | (_, Err(e)) => tracing::warn!(error = %e, "state warning"),
        }
        let metrics = Arc::new(Metrics::new());
        metrics.budget(&config.api.client);
        let mut metrics_server = None;
        if let Some(listen) = config.metrics.listen {
            let stop = producers.child_token();
            let bound = crate::metrics::serve(listen, metrics.clone(), health.clone(), stop.clone())
                .await
                .with_context(|| format!("serving metrics on {listen} ([metrics] listen)"))?;
            tracing::info!(listen = %bound, "metrics served");
            metrics_server = Some((listen, stop));
        }
        let tracker = TaskTracker::new();
        let daemon = Daemon {
            open_state_path: config.state_path.clone(),
            metrics_server,
            producers: producers.clone(),
            rejected: HashSet::new(),
            engine: Arc::new(rules::engine::build(config.time_zone)),
            config,
            rules: RuleSet::default(),
            connection,
            retired: Vec::new(),
            writes: StateWrites::start(&state, &tracker),
            state,
            _lock: lock,
            running: HashSet::new(),
            pending: BTreeMap::new(),
            approved: HashSet::new(),
            tx,
            table,
            tracker,
            apply_cancel: CancellationToken::new(),
            watcher: None,
            status: String::new(),
            metrics,
            health,
            broken_suppressors: Vec::new(),
        };
        Ok((daemon, table_rx))
    }

    /// The event loop, until shutdown; `Some` when a critical task failed. It never waits on the
    /// state, so the heartbeat and the watchdog go on whatever a pass is doing.
    async fn event_loop(&mut self, mut rx: mpsc::UnboundedReceiver<Event>, clock: Clock) -> Option<anyhow::Error> {
        let watchdog = sd_notify::watchdog_enabled();
        let mut rescan = tokio::time::interval_at(tokio::time::Instant::now() + RESCAN, RESCAN);
        let mut watchdog_tick = tokio::time::interval(watchdog.map_or(Duration::from_secs(3600), |d| d / 2));
        loop {
            self.health.beat();
            tokio::select! {
                event = rx.recv() => {
                    let event = event?;
                    match event {
                        Event::Shutdown => return None,
                        Event::Due(names) => {
                            for name in names.into_iter().filter(|n| self.rules.get(n).is_some()) {
                                self.pending.entry(name).or_insert(Trigger::Cron);
                            }
                        }
                        Event::RulesChanged => {
                            if let Some((loaded, errors, broken)) =
                                load_rules(&self.engine, &self.config.rules_dir).await
                            {
                                self.apply_rules(loaded, errors, broken, Trigger::File, clock);
                            }
                        }
                        Event::Reload => self.reload(clock).await,
                        Event::PassDone(report) => self.pass_done(&report),
                        Event::RunRequests(requests) => self.take_requests(requests),
                        Event::TaskFailed { task, error } => {
                            tracing::error!(task, error = %error, "daemon task failed");
                            return Some(anyhow::anyhow!("the daemon's {task} failed: {error}"));
                        }
                    }
                    self.start_pending();
                }
                _ = watchdog_tick.tick(), if watchdog.is_some() => notify(&[NotifyState::Watchdog]),
                _ = rescan.tick() => {
                    let _ = self.tx.send(Event::RulesChanged);
                }
            }
        }
    }

    fn reconciler(&self) -> Reconciler {
        Reconciler::from_config(
            &self.config,
            &self.connection,
            self.engine.clone(),
            self.state.clone(),
            self.apply_cancel.clone(),
        )
    }

    /// Replaces the running rules with `loaded`: new and changed rules run now (with `trigger`),
    /// unchanged ones keep running as they are, a rule whose file no longer compiles keeps its last
    /// good version, and a deleted rule stops being scheduled (its list is left as it is).
    fn apply_rules(
        &mut self,
        loaded: RuleSet,
        errors: Vec<Diagnostic>,
        broken: Vec<(String, String)>,
        trigger: Trigger,
        clock: timer::Clock,
    ) {
        log_rejected(&errors);
        let rejected: HashSet<String> = errors.iter().filter_map(|e| e.rule_name().map(str::to_owned)).collect();
        for rule in loaded.iter().filter(|r| self.rejected.contains(r.name.as_str())) {
            tracing::info!(rule = %rule.name, rule_hash = %rule.short_hash(), file = %rule.path.display(), "rule restored");
        }
        self.rejected = rejected;
        let change = diff::diff(&self.rules, loaded, &errors, trigger == Trigger::Reload);
        for name in &change.to_run {
            self.pending.insert(name.clone(), trigger);
        }
        for old in &change.kept_broken {
            tracing::warn!(rule = %old.name, rule_hash = %old.short_hash(), "rule kept");
        }
        for old in &change.removed {
            tracing::info!(rule = %old.name, list = %old.list, "rule removed");
            self.pending.remove(&old.name);
        }
        self.rules = change.next;
        // A broken suppression file whose last good version still runs is covered by that version.
        self.broken_suppressors =
            broken.into_iter().filter(|(name, _)| self.rules.get(&RuleName::from(name.as_str())).is_none()).collect();
        let table = CronTable {
            entries: self
                .rules
                .iter()
                .map(|r| (r.name.clone(), r.schedule.clone().unwrap_or_else(|| self.config.default_schedule.clone())))
                .collect(),
            tz: Some(self.config.time_zone),
        };
        let now = clock.now();
        let next_runs = table.next_after(now);
        let tz = self.config.time_zone;
        let intervals = table.entries.iter().filter_map(|(name, s)| Some((name.clone(), s.interval_after(now, tz)?)));
        let since = self.health.set_rules(intervals, chrono::Utc::now());
        let loaded: Vec<LoadedRule> = self
            .rules
            .iter()
            .map(|r| LoadedRule {
                rule: r.name.clone(),
                hash: r.hash.clone(),
                loaded_at: since.iter().find(|(n, _)| n == &r.name).map_or_else(chrono::Utc::now, |(_, t)| *t),
            })
            .collect();
        self.writes.send(move |state| state.set_loaded(&loaded));
        self.metrics.rules(self.rules.rules.values(), errors.len());
        for rule in self.rules.iter().filter(|r| self.pending.get(&r.name) == Some(&trigger)) {
            tracing::info!(
                rule = %rule.name,
                list = %rule.list,
                mode = %rule.mode,
                schedule = table.entries.get(&rule.name).map(|s| s.as_str()).unwrap_or_default(),
                rule_hash = %rule.short_hash(),
                next_run = %next_runs.get(&rule.name).map(|t| t.with_timezone(&self.config.time_zone).to_rfc3339()).unwrap_or_default(),
                "rule loaded"
            );
        }
        self.table.send_replace(table);
    }

    fn start_watcher(&mut self) {
        self.watcher = None;
        if !self.config.watch_rules {
            return;
        }
        let tx = self.tx.clone();
        match rules_watch::watch(&self.config.rules_dir, DEBOUNCE, move || {
            let _ = tx.send(Event::RulesChanged);
        }) {
            Ok(w) => self.watcher = Some(w),
            Err(e) => tracing::warn!(error = %e, "rules not watched"),
        }
    }

    /// SIGHUP: reload config.toml and every rule; an invalid config keeps the running one.
    async fn reload(&mut self, clock: timer::Clock) {
        let monotonic = NotifyState::monotonic_usec_now().ok();
        let mut states = vec![NotifyState::Reloading];
        states.extend(monotonic);
        notify(&states);
        tracing::info!(config = %self.config.path.display(), "reload requested");
        match Config::load(&self.config.path) {
            Err(ConfigErrors(errors)) => {
                for e in &errors {
                    tracing::error!(file = %e.file.display(), line = e.line, col = e.col, error = %e.message, "config rejected");
                }
                tracing::error!(error = format!("{} problem(s) in the config", errors.len()), "reload failed");
            }
            Ok(config) => {
                if config.state_path != self.open_state_path {
                    tracing::warn!(
                        error = format!(
                            "[state] path changes to {} need a restart; keeping the open database {}",
                            config.state_path.display(),
                            self.open_state_path.display()
                        ),
                        "state warning"
                    );
                }
                match self.reconnect(&config).await {
                    Ok(()) => {
                        self.rebind_metrics(config.metrics.listen).await;
                        self.metrics.budget(&config.api.client);
                        self.config = config;
                        rules::native::set_enabled(self.config.native_eval);
                        self.engine = Arc::new(rules::engine::build(self.config.time_zone));
                        if let Some((loaded, errors, broken)) = load_rules(&self.engine, &self.config.rules_dir).await {
                            self.apply_rules(loaded, errors, broken, Trigger::Reload, clock);
                        }
                        // The folder or watch_rules may have changed: watch anew.
                        self.start_watcher();
                        tracing::info!(rules = self.rules.len(), watching = self.watcher.is_some(), "reloaded");
                    }
                    Err(e) => tracing::error!(error = format!("{e:#}"), "reload failed"),
                }
            }
        }
        notify(&[NotifyState::Ready, NotifyState::Status(&self.status_line())]);
    }

    /// Serves `/metrics` where a reloaded config says: a new address is bound before the old one
    /// stops, and one that cannot be bound keeps the old server (said in the log).
    async fn rebind_metrics(&mut self, listen: Option<std::net::SocketAddr>) {
        let serving = self.metrics_server.as_ref().map(|(at, _)| *at);
        if listen == serving {
            return;
        }
        let Some(listen) = listen else {
            if let Some((at, stop)) = self.metrics_server.take() {
                stop.cancel();
                tracing::info!(listen = %at, "metrics stopped");
            }
            return;
        };
        let stop = self.producers.child_token();
        match crate::metrics::serve(listen, self.metrics.clone(), self.health.clone(), stop.clone()).await {
            Ok(bound) => {
                if let Some((_, old)) = self.metrics_server.replace((listen, stop)) {
                    old.cancel();
                }
                tracing::info!(listen = %bound, "metrics served");
            }
            Err(e) => tracing::error!(
                error = format!(
                    "[metrics] listen {listen}: {e}; still serving on {}",
                    serving.map_or_else(|| "nothing".to_owned(), |a| a.to_string())
                ),
                "metrics not moved"
            ),
        }
    }

    /// A fresh gateway for `config` (the key is read again, so the account too); a new
    /// connection if the endpoint changed.
    async fn reconnect(&mut self, config: &Config) -> anyhow::Result<()> {
        let before = self.connection.account.clone();
        if let Some(retired) = self.connection.reopen(config, &self.state).await? {
            self.retired.push(retired);
        }
        if self.connection.account != before {
            tracing::info!(account = %self.connection.account, "account changed");
        }
        Ok(())
    }

    /// Operators' run requests (`segsync sync [RULE…] [--allow-mass-removal]` while we run): each
    /// requested rule runs now, once; with a confirmation it may apply a held mass removal. Every
    /// request is answered (taken, or why not).
    fn take_requests(&mut self, requests: Vec<RunRequest>) {
        for request in requests {
            let name = request.rule.clone();
            let answer = if self.rules.get(&name).is_some() {
                tracing::info!(rule = %name, allow_mass_removal = request.allow_mass_removal, "run requested");
                if request.allow_mass_removal {
                    self.approved.insert(name.clone());
                }
                self.pending.insert(name, Trigger::Manual);
                RunAnswer { taken: true, reason: String::new() }
            } else {
                let loaded: Vec<&str> = self.rules.rules.keys().map(RuleName::as_str).collect();
                let how = if self.config.watch_rules {
                    "a new or repaired rule file is loaded when it is saved; `segsync check` says why a file is not"
                } else {
                    "[daemon] watch_rules is false: reload the daemon (SIGHUP, `systemctl reload segsync`) to load new files"
                };
                let reason =
                    format!("the daemon runs no rule named \"{name}\" (it runs: {}); {how}", loaded.join(", "));
                tracing::warn!(rule = %name, reason = %reason, "run request ignored");
                RunAnswer { taken: false, reason }
            };
            self.writes.send(move |state| state.answer_run_request(&request, &answer));
        }
    }

    /// Starts one pass per trigger for the pending rules that are not running now.
    fn start_pending(&mut self) {
        if self.apply_cancel.is_cancelled() {
            return;
        }
        let ready: Vec<(RuleName, Trigger)> =
            self.pending.iter().filter(|(n, _)| !self.running.contains(*n)).map(|(n, t)| (n.clone(), *t)).collect();
        let mut groups: BTreeMap<(Trigger, bool), Vec<Arc<Rule>>> = BTreeMap::new();
        for (name, trigger) in ready {
            self.pending.remove(&name);
            let allow = self.approved.remove(&name);
            if let Some(rule) = self.rules.get(&name) {
                groups.entry((trigger, allow)).or_default().push(rule.clone());
            }
        }
        for ((trigger, allow_mass_removal), rules) in groups {
            self.running.extend(rules.iter().map(|r| r.name.clone()));
            let reconciler = self.reconciler();
            let tx = self.tx.clone();
            let rule_count = rules.len();
            let status: ProgressSink = Arc::new(move |p: &Progress| {
                let eta = p.eta_s.map(|s| format!(", ETA {s} s")).unwrap_or_default();
                let of = p.estimated_requests.map(|e| format!(" of ~{e}")).unwrap_or_default();
                let line = format!(
                    "pass ({trigger}, {rule_count} rule(s)) {}: {} request(s){of}, {} contact(s) read, {} × 429{eta}",
                    p.stage, p.api_requests, p.contacts, p.throttled
                );
                notify(&[NotifyState::Status(&line)]);
            });
            let suppressors = self.rules.iter().filter(|r| r.mode == rules::Mode::Suppress).cloned().collect();
            let request = PassRequest {
                allow_mass_removal,
                progress: Some(status),
                suppressors,
                broken_suppressors: self.broken_suppressors.clone(),
                loaded: self.rules.iter().cloned().collect(),
                ..PassRequest::new(rules, trigger)
            };
            self.tracker.spawn(async move {
                let report = reconciler.run_pass(request).await;
                let _ = tx.send(Event::PassDone(report));
            });
        }
    }

    fn pass_done(&mut self, report: &PassReport) {
        let finished = chrono::Utc::now();
        self.metrics.observe(report, finished);
        // The daemon schedules rule files: a partitioned rule's lists are summed up in its own report.
        let files = report.rules.iter().filter(|r| !matches!(r.rule.lists, crate::rules::Lists::Partition { .. }));
        for r in files.clone() {
            self.running.remove(&r.rule.name);
            if r.outcome == Outcome::Ok {
                self.health.succeeded(&r.rule.name, finished);
            }
        }
        let now = chrono::Utc::now().with_timezone(&self.config.time_zone).format("%H:%M:%S");
        let parts: Vec<String> =
            files.map(|r| format!("{} {} +{}/-{}", r.rule.name, r.outcome, r.added, r.removed)).collect();
        self.status = format!("last pass {now}: {}", parts.join(", "));
        if report.rules.iter().any(|r| r.outcome != Outcome::Ok) {
            self.status.push_str(" (see the log)");
        }
        notify(&[NotifyState::Status(&self.status_line())]);
    }

    fn status_line(&self) -> String {
        if self.status.is_empty() {
            format!("{} rule(s) loaded", self.rules.len())
        } else {
            format!("{} rule(s); {}", self.rules.len(), self.status)
        }
    }

    async fn shutdown(mut self, producers: CancellationToken) {
        notify(&[NotifyState::Stopping]);
        let in_flight = self.running.len();
        tracing::info!(
            in_flight_rules = in_flight,
            deadline_s = self.config.shutdown_timeout.as_secs(),
            "shutting down"
        );
        producers.cancel();
        self.watcher = None;
        self.apply_cancel.cancel();
        // The writer finishes what was sent, then ends with its channel.
        drop(self.writes);
        self.tracker.close();
        if tokio::time::timeout(self.config.shutdown_timeout, self.tracker.wait()).await.is_err() {
            tracing::warn!("shutdown deadline passed");
        }
        self.connection.close().await;
        for c in self.retired {
            c.close().await;
        }
        tracing::info!("stopped");
    }
}
