//! The command line: one subcommand per user task, each a thin call into the library, and the
//! documented exit codes. Printing results for people happens here and nowhere else.
#![allow(clippy::print_stdout)]

/// Prints one line for people, scrubbed of every secret the process has read: what is shown
/// here includes the gateway's own words, and a server may echo the key back.
macro_rules! say {
    ($($arg:tt)*) => {
        println!("{}", crate::gateway::scrub(&format!($($arg)*)))
    };
}

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigErrors};
use crate::contact::ContactRecord;
use crate::endpoint::Connection;
use crate::ids::{ContactId, RuleName};
use crate::logging::LogFormat;
use crate::reconcile::{Outcome, PassReport, PassRequest, Reconciler, RuleReport, Trigger, sample};
use crate::rules::{self, RuleError, RuleSet};
use segsync_sandbox::RatePlan;
use segsync_sandbox::{Faults, Sandbox, SandboxConfig};

#[derive(Debug, Parser)]
#[command(name = "segsync", version, about = "Keeps partner-gateway contact lists in sync with Rhai segment rules")]
pub struct Cli {
    /// Log format: auto (JSON unless stderr is a terminal), json or text. Overrides [log] format.
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<LogFormat>,
    /// The configuration file.
    #[arg(long, global = true, default_value = "config.toml")]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The daemon: run every rule now, then on its schedule and whenever its file changes.
    Run,
    /// Validate config.toml and every rule, and run the rule tests (no network); non-zero on any problem.
    Check,
    /// Run rule unit tests (rules/NAME.test.toml beside rules/NAME.rhai).
    Test {
        /// Rules to test (default: all).
        rules: Vec<String>,
    },
    /// Fetch one contact and show why it is or is not in RULE's segment.
    Explain { rule: String, contact_id: String },
    /// Dry run: per rule, what a sync would add and remove (with a sample of ids); changes nothing.
    Plan {
        /// Rules to plan (default: all).
        rules: Vec<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// One reconcile pass now, then exit (exit 4 if a guard held a change, 1 if a rule failed).
    Sync {
        /// Rules to sync (default: all).
        rules: Vec<String>,
        /// Confirm, once, removals the mass-removal guard would hold.
        #[arg(long)]
        allow_mass_removal: bool,
    },
    /// The last runs per rule: when, trigger, added, removed, outcome.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Runs to show per rule.
        #[arg(long, default_value_t = 1)]
        runs: usize,
    },
    /// Serve the bundled emulator of the partner-gateway API on localhost, seeded with demo contacts.
    Sandbox(SandboxArgs),
}

#[derive(Debug, clap::Args)]
pub struct SandboxArgs {
    /// Address to listen on (loopback only is sensible).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Number of demo contacts to generate.
    #[arg(long, default_value_t = 20_000)]
    pub contacts: u64,
    /// Seed of the demo data: the same seed gives the same contacts.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// The API key clients must send (X-Api-Key, or as the Basic password).
    #[arg(long, default_value = "sandbox-key")]
    pub api_key: String,
    /// Rate plan to enforce per key.
    #[arg(long, default_value_t = RatePlan::Production)]
    pub plan: RatePlan,
    /// Latency added to every API request, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// Share of API requests that fail (split evenly: 500, 429, dropped connection), 0.0 to 1.0.
    #[arg(long, default_value_t = 0.0)]
    pub fault_rate: f64,
    /// Contacts changed per minute (purchases, moves, sign-ups, deletions).
    #[arg(long, default_value_t = 0)]
    pub churn_per_minute: u32,
}

/// Exit codes, documented in the README.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Everything done.
    Ok = 0,
    /// A runtime failure: the API, the state database, a failed rule run, a failed rule test.
    Failure = 1,
    /// Wrong command-line usage (clap's own code).
    Usage = 2,
    /// Invalid config.toml or rules.
    Invalid = 3,
    /// A guard held a change (mass removal); nothing failed.
    Held = 4,
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> Self {
        ExitCode::from(e as u8)
    }
}

pub fn run(cli: Cli) -> anyhow::Result<Exit> {
    if let Command::Sandbox(args) = cli.command {
        crate::logging::init(cli.log_format.unwrap_or_default());
        return runtime()?.block_on(sandbox(args));
    }
    let config = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(ConfigErrors(errors)) => {
            crate::logging::init(cli.log_format.unwrap_or_default());
            for e in &errors {
                say!("{e}");
            }
            say!("config: {} problem(s) in {}", errors.len(), cli.config.display());
            return Ok(Exit::Invalid);
        }
    };
    crate::logging::init(cli.log_format.unwrap_or(config.log_format));
    match cli.command {
        Command::Run => {
            runtime()?.block_on(crate::daemon::run(
                config,
                crate::schedule::Clock::System,
                CancellationToken::new(),
            ))?;
            Ok(Exit::Ok)
        }
        Command::Check => Ok(check(&config)),
        Command::Test { rules } => test(&config, &rules),
        Command::Explain { rule, contact_id } => runtime()?.block_on(explain(&config, &rule, &contact_id)),
        Command::Plan { rules, json } => runtime()?.block_on(pass(&config, &rules, PassMode::Plan { json })),
        Command::Sync { rules, allow_mass_removal } => {
            runtime()?.block_on(pass(&config, &rules, PassMode::Sync { allow_mass_removal }))
        }
        Command::Status { json, runs } => status(&config, json, runs),
        Command::Sandbox(_) => unreachable!("handled above"),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")
}

/// Loads the rules of `config` with the one engine.
pub fn load_rules(config: &Config) -> (rhai::Engine, RuleSet, Vec<RuleError>) {
    let engine = rules::engine::build(config.time_zone);
    let (set, errors) = rules::load_dir(&engine, &config.rules_dir);
    (engine, set, errors)
}

fn check(config: &Config) -> Exit {
    let mut problems = 0;
    // What `run` would refuse, `check` refuses too: a key it cannot send, a state it cannot write.
    match config.credentials() {
        Err(e) => {
            say!("{}: {e}", config.path.display());
            problems += 1;
        }
        Ok(credentials) if credentials.header().is_none() => {
            say!(
                "{}: the API key ({}) holds characters an HTTP header cannot carry (a line break or a control \
                 character inside it?)",
                config.path.display(),
                config.key_source_name()
            );
            problems += 1;
        }
        Ok(_) => {}
    }
    if let Err(e) = crate::state::check_writable(&config.state_path) {
        say!("{}: [state] path: {e}", config.path.display());
        problems += 1;
    }
    let (engine, set, errors) = load_rules(config);
    for e in &errors {
        say!("{e}");
    }
    problems += errors.len();
    let mut passed = 0;
    for rule in set.iter() {
        match rules::fixtures::run(&engine, rule) {
            Ok(report) => {
                passed += report.passed;
                for f in &report.failures {
                    say!("{f}");
                }
                problems += report.failures.len();
            }
            Err(e) => {
                say!("{e}");
                problems += 1;
            }
        }
    }
    let names: Vec<&str> = set.rules.keys().map(RuleName::as_str).collect();
    if problems == 0 {
        say!(
            "ok: config {}, {} rule(s) ({}), {passed} rule test(s) passed",
            config.path.display(),
            set.len(),
            names.join(", ")
        );
        Exit::Ok
    } else {
        say!("check: {problems} problem(s); {} valid rule(s) ({})", set.len(), names.join(", "));
        Exit::Invalid
    }
}

/// The rules named on the command line (all when none), or the names that do not exist.
fn select(set: &RuleSet, names: &[String]) -> Result<Vec<Arc<rules::Rule>>, String> {
    if names.is_empty() {
        return Ok(set.iter().cloned().collect());
    }
    let mut out = Vec::new();
    for name in names {
        match set.get(&RuleName::from(name.as_str())) {
            Some(rule) => out.push(rule.clone()),
            None => {
                let known: Vec<&str> = set.rules.keys().map(RuleName::as_str).collect();
                return Err(format!("no valid rule named {name:?} (loaded: {})", known.join(", ")));
            }
        }
    }
    Ok(out)
}

/// Loads the rules, prints the broken ones, and picks the named ones (all when none are named);
/// `Err` is the exit code when a named rule is not among the valid ones.
fn load_selected(config: &Config, names: &[String]) -> Result<(rhai::Engine, Vec<Arc<rules::Rule>>, bool), Exit> {
    let (engine, set, errors) = load_rules(config);
    for e in &errors {
        say!("{e}");
    }
    match select(&set, names) {
        Ok(selected) => Ok((engine, selected, errors.is_empty())),
        Err(e) => {
            say!("{e}");
            Err(Exit::Invalid)
        }
    }
}

fn test(config: &Config, names: &[String]) -> anyhow::Result<Exit> {
    let (engine, selected, all_valid) = match load_selected(config, names) {
        Ok(loaded) => loaded,
        Err(code) => return Ok(code),
    };
    let (mut passed, mut failed, mut untested) = (0, 0, Vec::new());
    for rule in &selected {
        let report = match rules::fixtures::run(&engine, rule) {
            Ok(r) => r,
            Err(e) => {
                say!("{e}");
                failed += 1;
                continue;
            }
        };
        if report.file.is_none() {
            untested.push(rule.name.as_str());
        }
        for f in &report.failures {
            say!("FAIL {f}");
        }
        say!("{}: {} passed, {} failed", rule.name, report.passed, report.failures.len());
        passed += report.passed;
        failed += report.failures.len();
    }
    if !untested.is_empty() {
        say!("no tests for: {} (add rules/NAME.test.toml)", untested.join(", "));
    }
    say!("{passed} passed, {failed} failed");
    Ok(if failed > 0 {
        Exit::Failure
    } else if all_valid {
        Exit::Ok
    } else {
        Exit::Invalid
    })
}

async fn explain(config: &Config, rule_name: &str, contact_id: &str) -> anyhow::Result<Exit> {
    let (engine, set, errors) = load_rules(config);
    let rule = match select(&set, &[rule_name.to_owned()]) {
        Ok(mut r) => r.remove(0),
        Err(e) => {
            for err in errors.iter().filter(|e| e.file.file_stem().is_some_and(|s| s == rule_name)) {
                say!("{err}");
            }
            say!("{e}");
            return Ok(Exit::Invalid);
        }
    };
    let connection = Connection::open(config).await?;
    let fetched = connection.gateway.get_contact::<ContactRecord>(&ContactId::from(contact_id)).await;
    connection.close().await;
    let contact = fetched.with_context(|| format!("fetching contact {contact_id}"))?;
    let today = rules::Date(chrono::Utc::now().with_timezone(&config.time_zone).date_naive());
    say!("rule      {} ({}, hash {})", rule.name, rule.path.display(), rule.short_hash());
    say!("list      {}", rule.list);
    say!("contact   {}", contact.id);
    say!("today     {} ({})", today.0, config.time_zone);
    let map = contact.map().map(|m| m.clone()).unwrap_or_default();
    for term in &rule.filter {
        let (key, value) = term.query_pair();
        let verdict = match term.judge(&map) {
            Ok(true) => "passes".to_owned(),
            Ok(false) => "FAILS".to_owned(),
            Err(e) => format!("CANNOT JUDGE ({e})"),
        };
        say!("filter    {key} = {value:?}: {verdict} (contact has {})", show_field(&map, &key));
    }
    for (path, value) in fields_read(&map, &rule.mentions) {
        say!("reads     {path} = {value}");
    }
    match rule.evaluate(&engine, &contact, today) {
        Ok(true) => say!("answer    IN the segment: the list should hold this contact"),
        Ok(false) => say!("answer    NOT in the segment: the list should not hold this contact"),
        Err(e) => say!("answer    ERROR, so the contact is neither added nor removed: {e}"),
    }
    Ok(Exit::Ok)
}

/// The contact's value at a dotted filter key (`customFields.x.before` reads `customFields.x`).
fn show_field(map: &rhai::Map, key: &str) -> String {
    let key = key.strip_suffix(".before").unwrap_or(key);
    let value = match key.strip_prefix("customFields.") {
        Some(custom) => {
            map.get("customFields").and_then(|c| c.read_lock::<rhai::Map>().and_then(|m| m.get(custom).cloned()))
        }
        None => map.get(key).cloned(),
    };
    value.map_or_else(|| "nothing".to_owned(), |v| format!("{v:?}"))
}

/// The contact's fields whose names the rule mentions, top-level and in `customFields`.
fn fields_read(map: &rhai::Map, mentions: &[String]) -> Vec<(String, String)> {
    let custom =
        map.get("customFields").and_then(|c| c.read_lock::<rhai::Map>().map(|m| m.clone())).unwrap_or_default();
    let mut out = Vec::new();
    for word in mentions.iter().filter(|w| *w != "customFields") {
        if let Some(v) = map.get(word.as_str()) {
            out.push((word.clone(), format!("{v:?}")));
        } else if let Some(v) = custom.get(word.as_str()) {
            out.push((format!("customFields.{word}"), format!("{v:?}")));
        } else {
            out.push((word.clone(), "(absent on this contact)".into()));
        }
    }
    out
}

enum PassMode {
    Plan { json: bool },
    Sync { allow_mass_removal: bool },
}

/// `plan` and `sync`: one pass over the selected rules, dry or real.
async fn pass(config: &Config, names: &[String], mode: PassMode) -> anyhow::Result<Exit> {
    let (engine, selected, all_valid) = match load_selected(config, names) {
        Ok(loaded) => loaded,
        Err(code) => return Ok(code),
    };
    let dry_run = matches!(mode, PassMode::Plan { .. });
    let allow_mass_removal = matches!(mode, PassMode::Sync { allow_mass_removal: true });
    // Only a writer needs the instance lock; a dry run may look while the daemon works.
    let _lock = if dry_run {
        None
    } else {
        match crate::state::lock(&config.state_path) {
            Ok(lock) => Some(lock),
            // The daemon holds the state: hand it the confirmation instead of fighting it.
            Err(crate::state::StateError::Locked { pid, .. }) if allow_mass_removal && !names.is_empty() => {
                return confirm_through_daemon(config, &selected, &pid).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    let state = crate::state::State::open(&config.state_path)?;
    let connection = Connection::open(config).await?;
    let reconciler = Reconciler {
        gateway: connection.gateway.clone(),
        engine: Arc::new(engine),
        state,
        endpoint: connection.endpoint.clone(),
        guards: config.guards.clone(),
        time_zone: config.time_zone,
        cancel: CancellationToken::new(),
    };
    let cancel = reconciler.cancel.clone();
    let stop = tokio::spawn(async move {
        shutdown_signal().await;
        cancel.cancel();
    });
    let request = PassRequest { rules: selected, trigger: Trigger::Manual, dry_run, allow_mass_removal, today: None };
    let report = reconciler.run_pass(request).await;
    stop.abort();
    connection.close().await;
    match mode {
        PassMode::Plan { json: true } => {
            let rows: Vec<serde_json::Value> = report.rules.iter().map(plan_json).collect();
            say!("{}", serde_json::to_string_pretty(&rows)?);
        }
        _ => print_pass(&report, dry_run),
    }
    Ok(if report.any(Outcome::Failed) || report.any(Outcome::Partial) || report.any(Outcome::Interrupted) {
        Exit::Failure
    } else if report.any(Outcome::Held) {
        Exit::Held
    } else if all_valid {
        Exit::Ok
    } else {
        Exit::Invalid
    })
}

/// `sync RULE --allow-mass-removal` while the daemon runs: records the confirmation for the daemon,
/// then waits for its run of each rule and reports the outcome.
async fn confirm_through_daemon(config: &Config, rules: &[Arc<rules::Rule>], pid: &str) -> anyhow::Result<Exit> {
    let state = crate::state::State::open(&config.state_path)?;
    let since = crate::state::now();
    for rule in rules {
        state.approve(&rule.name, chrono::Duration::minutes(10))?;
    }
    let names: Vec<&str> = rules.iter().map(|r| r.name.as_str()).collect();
    say!("segsync is running (pid {pid}); asked it to run {} once with removals allowed", names.join(", "));
    let deadline = std::time::Instant::now() + Duration::from_secs(600);
    let mut worst = Exit::Ok;
    for rule in rules {
        let run = loop {
            if let Some(run) = state.run_finished_after(&rule.name, &since)? {
                break run;
            }
            if std::time::Instant::now() > deadline {
                say!("{}: no run within 10 minutes; see `segsync status` and the daemon's log", rule.name);
                return Ok(Exit::Failure);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        say!("{}: added {}, removed {}, outcome {} {}", run.rule, run.added, run.removed, run.outcome, run.detail);
        worst = match (worst, run.outcome.as_str()) {
            (_, "failed" | "partial" | "interrupted") | (Exit::Failure, _) => Exit::Failure,
            (_, "held") | (Exit::Held, _) => Exit::Held,
            _ => Exit::Ok,
        };
    }
    Ok(worst)
}

fn plan_json(r: &RuleReport) -> serde_json::Value {
    serde_json::json!({
        "rule": r.rule.name,
        "list": r.rule.list,
        "list_id": r.list_id,
        "list_exists": r.list_id.is_some(),
        "mode": r.rule.mode,
        "members": r.members_before,
        "scanned": r.scanned,
        "matched": r.matched,
        "eval_errors": r.eval_errors,
        "first_eval_error": r.first_error,
        "to_add": r.plan.to_add.len(),
        "to_remove": r.plan.to_remove.len(),
        "sample_add": sample(&r.plan.to_add, 10),
        "sample_remove": sample(&r.plan.to_remove, 10),
        "held": r.plan.held,
        "outcome": r.outcome,
        "detail": r.detail,
        "api_requests": r.usage.total_requests(),
    })
}

fn print_pass(report: &PassReport, dry_run: bool) {
    for r in &report.rules {
        // A rule that stopped before its list was resolved says so, not "would be created".
        let stopped = matches!(r.outcome, Outcome::Failed | Outcome::Interrupted);
        let list = match (&r.list_id, r.list_created) {
            (Some(id), true) if dry_run => format!("{id}, would be created"),
            (Some(id), true) => format!("{id}, created now"),
            (Some(id), false) => id.to_string(),
            (None, _) if stopped => "list not resolved".into(),
            (None, _) => "would be created".into(),
        };
        say!("{} → {:?} ({list}, {})", r.rule.name, r.rule.list, r.rule.mode);
        if stopped && r.scanned == 0 && r.members_before == 0 {
            say!("  nothing read");
        } else {
            say!(
                "  members {}, scanned {}, matched {}, eval errors {}",
                r.members_before,
                r.scanned,
                r.matched,
                r.eval_errors
            );
        }
        if dry_run {
            say!("  would add {}, would remove {}", r.plan.to_add.len(), r.plan.to_remove.len());
        } else {
            say!(
                "  added {}, removed {} (planned +{} / -{})",
                r.added,
                r.removed,
                r.plan.to_add.len(),
                r.plan.to_remove.len()
            );
        }
        let more =
            |ids: &[ContactId]| if ids.len() > 5 { format!(" … (+{} more)", ids.len() - 5) } else { String::new() };
        if !r.plan.to_add.is_empty() {
            say!("  add:    {}{}", sample(&r.plan.to_add, 5).join(", "), more(&r.plan.to_add));
        }
        if !r.plan.to_remove.is_empty() {
            say!("  remove: {}{}", sample(&r.plan.to_remove, 5).join(", "), more(&r.plan.to_remove));
        }
        if let Some(e) = &r.first_error {
            say!("  first evaluation error: {e}");
        }
        say!("  outcome {}{}", r.outcome, r.detail.as_ref().map(|d| format!(": {d}")).unwrap_or_default());
    }
    let mut outcomes: Vec<String> = Vec::new();
    for outcome in [Outcome::Ok, Outcome::Held, Outcome::Partial, Outcome::Failed, Outcome::Interrupted] {
        let n = report.rules.iter().filter(|r| r.outcome == outcome).count();
        if n > 0 {
            outcomes.push(format!("{n} {outcome}"));
        }
    }
    say!(
        "{} {} rule(s) ({}) in {:.1} s, {} API request(s) ({})",
        if dry_run { "planned" } else { "ran" },
        report.rules.len(),
        outcomes.join(", "),
        report.duration.as_secs_f64(),
        report.usage.total_requests(),
        report.usage.requests.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
    );
}

fn status(config: &Config, json: bool, runs: usize) -> anyhow::Result<Exit> {
    if !config.state_path.exists() {
        say!("no runs yet (no state database at {})", config.state_path.display());
        return Ok(Exit::Ok);
    }
    let state = crate::state::State::open(&config.state_path)?;
    let rows = state.last_runs(runs.max(1))?;
    if json {
        say!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(Exit::Ok);
    }
    if rows.is_empty() {
        say!("no runs yet");
        return Ok(Exit::Ok);
    }
    say!(
        "{:<22} {:<24} {:<8} {:>8} {:>8} {:>8} {:>9} {:>8}  detail",
        "rule",
        "finished",
        "trigger",
        "members",
        "added",
        "removed",
        "requests",
        "outcome"
    );
    for r in rows {
        say!(
            "{:<22} {:<24} {:<8} {:>8} {:>8} {:>8} {:>9} {:>8}  {}",
            r.rule,
            r.finished_at,
            r.trigger,
            r.members_before,
            r.added,
            r.removed,
            r.api_requests,
            r.outcome,
            r.detail
        );
    }
    Ok(Exit::Ok)
}

async fn sandbox(args: SandboxArgs) -> anyhow::Result<Exit> {
    if !(0.0..=1.0).contains(&args.fault_rate) {
        anyhow::bail!("--fault-rate must be between 0.0 and 1.0, got {}", args.fault_rate);
    }
    let config = SandboxConfig {
        contacts: args.contacts,
        seed: args.seed,
        api_key: args.api_key,
        plan: args.plan,
        faults: Faults::split(args.fault_rate, Duration::from_millis(args.latency_ms)),
        churn_per_minute: args.churn_per_minute,
        ..SandboxConfig::default()
    };
    let started = std::time::Instant::now();
    let sandbox = Sandbox::start(config, args.listen).await.with_context(|| format!("listening on {}", args.listen))?;
    tracing::info!(
        base_url = %sandbox.base_url(),
        contacts = args.contacts,
        plan = %args.plan,
        generate_ms = started.elapsed().as_millis() as u64,
        "sandbox ready (stats at /_sandbox/stats)"
    );
    let cancel = CancellationToken::new();
    let stop = cancel.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        stop.cancel();
    });
    sandbox.serve_until(cancel).await;
    tracing::info!("sandbox stopped");
    Ok(Exit::Ok)
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
