//! `plan` and `sync`: one pass over the selected rules, dry or real, and handing a confirmation
//! to a running daemon.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use tokio_util::sync::CancellationToken;

use super::Exit;
use super::check::load_selected;
use super::show::{plan_json, print_pass};
use crate::config::Config;
use crate::connection::Connection;
use crate::reconcile::{PassRequest, Progress, ProgressSink, Reconciler, Trigger};
use crate::rules::Rule;

/// Which of the two pass commands.
pub(super) enum Mode {
    Plan { json: bool, detailed_exitcode: bool },
    Sync { allow_mass_removal: bool, full: bool },
}

/// `plan` and `sync`: one pass over the selected rules, dry or real.
pub(super) async fn pass(config: &Config, names: &[String], mode: Mode) -> anyhow::Result<Exit> {
    let (engine, selected, all_valid) =
        match load_selected(config, names, true, matches!(mode, Mode::Plan { json: true, .. })) {
            Ok(loaded) => loaded,
            Err(code) => return Ok(code),
        };
    let dry_run = matches!(mode, Mode::Plan { .. });
    let allow_mass_removal = matches!(mode, Mode::Sync { allow_mass_removal: true, .. });
    // `--full`: the cache of these rules' lists is distrusted, so the pass (here, or the daemon's
    // when it runs) reads their members.
    if matches!(mode, Mode::Sync { full: true, .. }) {
        let names: Vec<_> = selected.iter().map(|r| r.name.clone()).collect();
        crate::state::State::open(&config.state_path)?.distrust_cache(&names)?;
    }
    // Only a writer needs the instance lock; a dry run may look while the daemon works.
    let _lock = if dry_run {
        None
    } else {
        match crate::state::lock(&config.state_path) {
            Ok(lock) => Some(lock),
            // The daemon holds the state: hand it the run (and any confirmation) instead of fighting it.
            Err(crate::state::StateError::Locked { pid, .. }) => {
                return run_through_daemon(config, &selected, &pid, allow_mass_removal).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    // A key that cannot be read is a configuration problem, the same code as in `check`.
    if let Err(e) = config.credentials() {
        say!("{}: {e}", config.path.display());
        return Ok(Exit::Invalid);
    }
    let state = crate::state::State::open(&config.state_path)?;
    let connection = Connection::open(config, Some(&state)).await?;
    let reconciler = Reconciler::from_config(config, &connection, Arc::new(engine), state, CancellationToken::new());
    let cancel = reconciler.cancel_token().clone();
    let stop = tokio::spawn(async move {
        crate::signals::stop_requested().await;
        cancel.cancel();
    });
    // A progress bar on a terminal, never when stderr is a file, a pipe or the journal.
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = ProgressBar::new_spinner();
        bar.set_style(
            ProgressStyle::with_template("{spinner} {msg} [{bar:30}] {pos}/{len} requests")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.enable_steady_tick(Duration::from_millis(200));
        bar
    });
    let progress = bar.clone().map(|bar| -> ProgressSink {
        Arc::new(move |p: &Progress| {
            bar.set_length(p.estimated_requests.unwrap_or(p.api_requests).max(p.api_requests));
            bar.set_position(p.api_requests);
            let eta = p.eta_s.map(|s| format!(", ETA {s} s")).unwrap_or_default();
            bar.set_message(format!("{}: {} contacts{eta}", p.stage, p.contacts));
        })
    });
    let request = PassRequest { dry_run, allow_mass_removal, progress, ..PassRequest::new(selected, Trigger::Manual) };
    let report = reconciler.run_pass(request).await;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    stop.abort();
    connection.close().await;
    match mode {
        Mode::Plan { json: true, .. } => {
            let rows: Vec<serde_json::Value> = report.rules.iter().map(plan_json).collect();
            say!("{}", serde_json::to_string_pretty(&rows)?);
        }
        _ => print_pass(&report, dry_run),
    }
    let exit = Exit::for_outcomes(report.rules.iter().map(|r| r.outcome)).unless_invalid(all_valid);
    let pending = report.rules.iter().any(|r| !r.plan.is_empty() || (r.list_id.is_none() && r.list_created));
    Ok(match mode {
        Mode::Plan { detailed_exitcode: true, .. } if exit == Exit::Ok && pending => Exit::Pending,
        _ => exit,
    })
}

/// How long a run request may wait for the daemon to take it.
const HANDOFF_WAIT: Duration = Duration::from_secs(6);

/// `sync [RULE…] [--allow-mass-removal]` while the daemon runs: asks the daemon (through the state
/// database) to run each rule once now, with the confirmation if given, then waits for its runs and
/// reports their outcomes.
async fn run_through_daemon(config: &Config, rules: &[Arc<Rule>], pid: &str, allow: bool) -> anyhow::Result<Exit> {
    let state = crate::state::State::open(&config.state_path)?;
    let since = crate::state::now();
    for rule in rules {
        state.request_run(&rule.name, allow, chrono::Duration::minutes(10))?;
    }
    let names: Vec<&str> = rules.iter().map(|r| r.name.as_str()).collect();
    let how = if allow { " with removals allowed" } else { "" };
    say!("segsync is running (pid {pid}); asked it to run {} once{how}", names.join(", "));
    // A daemon takes requests every 2 s; a holder that does not (another `sync`) is refused.
    tokio::time::sleep(HANDOFF_WAIT).await;
    let requested: Vec<crate::ids::RuleName> = rules.iter().map(|r| r.name.clone()).collect();
    if state.withdraw_run_requests(&requested)? > 0 {
        let path = config.state_path.clone();
        return Err(crate::state::StateError::Locked { path, pid: pid.to_owned() }.into());
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(600);
    let mut outcomes = Vec::new();
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
        say!(
            "{}: added {}, removed {}, outcome {} {}",
            run.rule,
            run.added,
            run.removed,
            run.outcome,
            run.detail.as_deref().unwrap_or("")
        );
        outcomes.push(run.outcome);
    }
    Ok(Exit::for_outcomes(outcomes))
}
