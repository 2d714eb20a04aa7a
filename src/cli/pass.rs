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
pub(super) enum PassCommand {
    Plan { json: bool, detailed_exitcode: bool },
    Sync { allow_mass_removal: bool, full: bool },
}

/// `plan` and `sync`: one pass over the selected rules, dry or real.
pub(super) async fn pass(config: &Config, names: &[String], command: PassCommand) -> anyhow::Result<Exit> {
    let dry_run = matches!(command, PassCommand::Plan { .. });
    // `sync` runs only rules that pass their own tests (as the daemon does); `plan` previews a rule
    // failing them too, marked, because a dry run helps fix it.
    let (engine, selected, (loaded, broken_suppressors), all_valid) =
        match load_selected(config, names, !dry_run, matches!(command, PassCommand::Plan { json: true, .. })) {
            Ok(loaded) => loaded,
            Err(code) => return Ok(code),
        };
    let failing_tests = if dry_run { failing_tests(&engine, &selected) } else { Default::default() };
    let all_valid = all_valid && failing_tests.is_empty();
    let allow_mass_removal = matches!(command, PassCommand::Sync { allow_mass_removal: true, .. });
    // `--full`: the cache of these rules' lists is distrusted, so the pass (here, or the daemon's
    // when it runs) reads their members.
    if matches!(command, PassCommand::Sync { full: true, .. }) {
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
        complain!("{}: {e}", config.path.display());
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
    let request = PassRequest {
        dry_run,
        allow_mass_removal,
        progress,
        suppressors: loaded.iter().filter(|r| r.mode == crate::rules::Mode::Suppress).cloned().collect(),
        broken_suppressors,
        loaded,
        ..PassRequest::new(selected, Trigger::Manual)
    };
    let report = reconciler.run_pass(request).await;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    stop.abort();
    connection.close().await;
    match command {
        PassCommand::Plan { json: true, .. } => {
            let rows: Vec<serde_json::Value> = report
                .rules
                .iter()
                .map(|r| {
                    let mut row = plan_json(r);
                    row["fails_tests"] =
                        serde_json::json!(failing_tests.get(&r.rule.name).cloned().unwrap_or_default());
                    row
                })
                .collect();
            say!("{}", serde_json::to_string_pretty(&rows)?);
        }
        _ => {
            print_pass(&report, dry_run);
            for (rule, failures) in &failing_tests {
                for failure in failures {
                    say!(
                        "{rule}: fails its tests: {failure} (previewed; sync and the daemon refuse it until they pass)"
                    );
                }
            }
        }
    }
    let exit = Exit::for_outcomes(report.rules.iter().map(|r| r.outcome)).unless_invalid(all_valid);
    let pending = report.rules.iter().any(|r| !r.plan.is_empty() || (r.list_id.is_none() && r.list_created));
    Ok(match command {
        PassCommand::Plan { detailed_exitcode: true, .. } if exit == Exit::Ok && pending => Exit::Pending,
        _ => exit,
    })
}

/// The selected rules whose own tests fail, with each failing case (or why the test file is broken).
fn failing_tests(
    engine: &rhai::Engine,
    rules: &[Arc<Rule>],
) -> std::collections::BTreeMap<crate::ids::RuleName, Vec<String>> {
    rules
        .iter()
        .filter_map(|rule| {
            let failures = match crate::rules::fixtures::run(engine, rule) {
                Ok(report) => report.failures,
                Err(broken) => vec![format!("its test file is broken: {broken}")],
            };
            (!failures.is_empty()).then(|| (rule.name.clone(), failures))
        })
        .collect()
}

/// How long the daemon has to answer a run request. It looks for requests every 2 s; a holder
/// of the state that answers none within this is not a daemon (another `sync`).
const ANSWER_WAIT: Duration = Duration::from_secs(10);

/// How long a taken request may take to finish its run before `sync` stops waiting.
const RUN_WAIT: Duration = Duration::from_secs(600);

/// How often the state is looked at while waiting.
const POLL: Duration = Duration::from_millis(200);

/// `sync [RULE…] [--allow-mass-removal]` while the daemon runs: asks the daemon (through the state
/// database) to run each rule once now, with the confirmation if given; prints the daemon's answer
/// to each request (taken, or not and why) as soon as it gives it, then the outcome of each run
/// taken. A rule the daemon does not run is exit 2; SIGINT or SIGTERM while waiting stops waiting
/// (exit 130; what the daemon took, it still runs).
async fn run_through_daemon(config: &Config, rules: &[Arc<Rule>], pid: &str, allow: bool) -> anyhow::Result<Exit> {
    let state = crate::state::State::open(&config.state_path)?;
    let mut asked = Vec::new();
    for rule in rules {
        asked.push((rule.name.clone(), state.request_run(&rule.name, allow, chrono::Duration::minutes(10))?));
    }
    let names: Vec<&str> = rules.iter().map(|r| r.name.as_str()).collect();
    let how = if allow { " with removals allowed" } else { "" };
    say!("segsync is running (pid {pid}); asked it to run {} once{how}", names.join(", "));
    let stop = crate::signals::stop_requested();
    tokio::pin!(stop);

    // 1. The daemon's answers.
    let deadline = tokio::time::Instant::now() + ANSWER_WAIT;
    let mut answers = Vec::new();
    for (rule, requested_at) in &asked {
        let answer = loop {
            if let Some(answer) = state.run_answer(rule, requested_at)? {
                break answer;
            }
            if tokio::time::Instant::now() >= deadline {
                let requested: Vec<crate::ids::RuleName> = asked.iter().map(|(r, _)| r.clone()).collect();
                state.withdraw_run_requests(&requested)?;
                let path = config.state_path.clone();
                return Err(crate::state::StateError::Locked { path, pid: pid.to_owned() }.into());
            }
            tokio::select! {
                _ = tokio::time::sleep(POLL) => {}
                _ = &mut stop => return Ok(stopped_waiting()),
            }
        };
        if !answer.taken {
            say!("{rule}: not run: {}", answer.reason);
        }
        answers.push((rule, requested_at, answer.taken));
    }

    // 2. The outcome of each run the daemon took.
    let deadline = tokio::time::Instant::now() + RUN_WAIT;
    let mut outcomes = Vec::new();
    for (rule, requested_at, _) in answers.iter().filter(|(_, _, taken)| *taken) {
        let run = loop {
            if let Some(run) = state.run_finished_after(rule, requested_at)? {
                break run;
            }
            if tokio::time::Instant::now() >= deadline {
                say!("{rule}: no run within 10 minutes; see `segsync status` and the daemon's log");
                return Ok(Exit::Failure);
            }
            tokio::select! {
                _ = tokio::time::sleep(POLL) => {}
                _ = &mut stop => return Ok(stopped_waiting()),
            }
        };
        let detail = run.detail.as_deref().map(|d| format!(": {d}")).unwrap_or_default();
        say!("{}: added {}, removed {}, outcome {}{detail}", run.rule, run.added, run.removed, run.outcome);
        outcomes.push(run.outcome);
    }
    if answers.iter().any(|(_, _, taken)| !taken) {
        return Ok(Exit::Usage);
    }
    Ok(Exit::for_outcomes(outcomes))
}

fn stopped_waiting() -> Exit {
    say!("stopped waiting; the daemon still runs what it took (see `segsync status`)");
    Exit::Interrupted
}
