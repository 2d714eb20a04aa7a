//! How pass reports and run history are shown to people (text) and to programs (JSON).

use super::Exit;
use crate::config::Config;
use crate::ids::ContactId;
use crate::reconcile::{Outcome, PassReport, RuleReport, Trigger, sample};

/// When a member failing since `since` is due for removal under the rule's grace (RFC 3339).
fn due(r: &RuleReport, since: &str) -> Option<String> {
    let after = chrono::Duration::from_std(r.remove_after?).ok()?;
    let since = chrono::DateTime::parse_from_rfc3339(since).ok()?.with_timezone(&chrono::Utc);
    since.checked_add_signed(after).map(crate::state::at)
}

pub(super) fn plan_json(r: &RuleReport) -> serde_json::Value {
    serde_json::json!({
        "rule": r.rule.name,
        "list": r.rule.list,
        "list_id": r.list_id,
        "list_exists": r.list_id.is_some(),
        "mode": r.rule.mode,
        "engine": r.rule.engine_name(),
        "members_before": r.members_before,
        "read_plan": r.read.as_str(),
        "members_from": r.members_from.as_str(),
        "derived_filter": r.derived_filter.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
        "scanned": r.scanned,
        "matched": r.matched,
        "eval_errors": r.eval_errors,
        "first_eval_error": r.first_error,
        "warnings": r.findings,
        "to_add": r.plan.to_add.len(),
        "to_remove": r.plan.to_remove.len(),
        "sample_add": sample(&r.plan.to_add, 10),
        "sample_remove": sample(&r.plan.to_remove, 10),
        "held": r.plan.held,
        "pending_removal": r.plan.pending.len(),
        "suppressed_removals": r.plan.suppressed.len(),
        "kept_out": r.plan.kept_out,
        "sample_pending": r.plan.pending.iter().take(10).map(|(id, since)| serde_json::json!({"contact": id, "failing_since": since, "due": due(r, since)})).collect::<Vec<_>>(),
        "outcome": r.outcome,
        "detail": r.detail,
        "api_requests": r.usage.total_requests(),
    })
}

pub(super) fn print_pass(report: &PassReport, dry_run: bool) {
    for r in &report.rules {
        if r.rule.mode == crate::rules::Mode::Suppress {
            let whom = match &r.rule.suppress_from {
                Some(names) => format!("out of the lists of {}", names.join(", ")),
                None => "out of every list".into(),
            };
            say!("{} → keeps the contacts it selects {whom} (suppress)", r.rule.name);
            say!("  scanned {}, suppressed {}, eval errors {}", r.scanned, r.matched, r.eval_errors);
            if let Some(e) = &r.first_error {
                say!("  first evaluation error: {e} (such contacts are added to no list)");
            }
            say!("  outcome {}{}", r.outcome, r.detail.as_ref().map(|d| format!(": {d}")).unwrap_or_default());
            continue;
        }
        if matches!(r.rule.lists, crate::rules::Lists::Partitioned { .. }) {
            let (add, remove) = if dry_run {
                (format!("would add {}", r.plan.to_add.len()), format!("would remove {}", r.plan.to_remove.len()))
            } else {
                (format!("added {}", r.added), format!("removed {}", r.removed))
            };
            say!("{} → the lists fn list names ({})", r.rule.name, r.rule.mode);
            if r.plan.to_add.is_empty() && r.plan.to_remove.is_empty() && dry_run {
                say!("  {}", r.detail.as_deref().unwrap_or_default());
            } else {
                say!("  {add}, {remove}; {}", r.detail.as_deref().unwrap_or_default());
            }
            say!("  outcome {}", r.outcome);
            continue;
        }
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
        say!("  judged by {}", r.rule.engine_name());
        if !r.derived_filter.is_empty() {
            let terms: Vec<String> = r.derived_filter.iter().map(|(k, v)| format!("{k}={v}")).collect();
            say!("  derived filter {} (from matches; narrows its own reads)", terms.join("&"));
        }
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
        if !r.plan.pending.is_empty() {
            let shown: Vec<String> = r
                .plan
                .pending
                .iter()
                .take(5)
                .map(|(id, since)| format!("{id} (due {})", due(r, since).unwrap_or_else(|| "?".into())))
                .collect();
            say!(
                "  pending removal {} (failing, within REMOVE_AFTER): {}{}",
                r.plan.pending.len(),
                shown.join(", "),
                if r.plan.pending.len() > 5 {
                    format!(" … (+{} more)", r.plan.pending.len() - 5)
                } else {
                    String::new()
                }
            );
        }
        if !r.plan.suppressed.is_empty() || r.plan.kept_out > 0 {
            say!(
                "  suppressed: {} member(s) removed at once, {} matching contact(s) kept out{}",
                r.plan.suppressed.len(),
                r.plan.kept_out,
                if r.plan.suppressed.is_empty() {
                    String::new()
                } else {
                    format!(" (removed: {})", sample(&r.plan.suppressed, 5).join(", "))
                }
            );
        }
        if let Some(e) = &r.first_error {
            say!("  first evaluation error: {e}");
        }
        for finding in &r.findings {
            let at = crate::diagnostic::Diagnostic {
                rule: None,
                file: r.rule.path.clone(),
                line: finding.line,
                col: finding.col,
                message: finding.message.clone(),
            };
            say!("  warning: {at}");
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

/// The version of `status --json`'s shape; bumped when a field changes meaning or goes away.
const STATUS_SCHEMA_VERSION: u32 = 1;

/// One rule in `status`.
#[derive(Debug, serde::Serialize)]
struct RuleStatus {
    rule: String,
    /// The list's name (a rule's `LIST`, or the list `fn list` names), as the gateway shows it.
    list: Option<String>,
    list_id: Option<String>,
    /// When the last run finished.
    last_run: Option<String>,
    trigger: Option<Trigger>,
    outcome: Option<Outcome>,
    /// Members of the list after the last run.
    members: Option<u64>,
    added: Option<u64>,
    removed: Option<u64>,
    detail: Option<String>,
    last_success: Option<String>,
    next_run: Option<String>,
    /// `running` (the daemon runs this file as it is on disk), `changed` (the file changed since the
    /// daemon loaded it), `broken` (the file does not load; its last good version runs), `not_loaded`,
    /// `deleted` (the daemon runs a rule whose file is gone), or null when no daemon runs.
    file: Option<&'static str>,
    /// Removals a guard holds until `segsync sync RULE --allow-mass-removal`.
    held_removals: u64,
    /// Members failing the rule but within its `REMOVE_AFTER` grace.
    pending_removal: u64,
    /// No successful run for `overdue_factor` schedule intervals.
    overdue: bool,
    runs: Vec<crate::state::RunRecord>,
}

/// `status`: per rule, the last run, members, next run, whether the daemon runs the file on disk,
/// held removals and overdue rules. Exit 0 when every rule's last run is ok; 1 when one failed, is
/// partial or is overdue; 4 when one holds removals.
/// What the state remembers for `status` (all empty when there is no state yet).
#[derive(Default)]
struct Remembered {
    daemon_pid: Option<String>,
    history: Vec<crate::state::RunRecord>,
    pending: std::collections::HashMap<String, u64>,
    /// What a daemon loaded and when: kept after it stops, so a rule that never succeeded since is
    /// overdue here exactly as `/healthz` says.
    loaded: Vec<crate::state::LoadedRule>,
    successes: std::collections::HashMap<crate::ids::RuleName, chrono::DateTime<chrono::Utc>>,
    set_aside: Vec<crate::state::SetAside>,
    list_names: std::collections::HashMap<crate::ids::ListId, String>,
}

impl Remembered {
    fn read(config: &Config) -> anyhow::Result<Self> {
        if !crate::state::exists_readable(&config.state_path)? {
            return Ok(Self::default());
        }
        let state = crate::state::State::open(&config.state_path)?;
        let daemon_pid = match crate::state::lock(&config.state_path) {
            Err(crate::state::StateError::Locked { pid, .. }) => Some(pid),
            _ => None,
        };
        Ok(Self {
            daemon_pid,
            history: state.last_runs(1000)?,
            pending: state.pending_counts()?,
            loaded: state.loaded()?,
            successes: state.last_successes()?,
            set_aside: state.set_aside()?,
            list_names: state.list_names()?,
        })
    }

    /// One rule's row: its runs, its file on disk (`disk`, or `broken`), its schedule.
    fn rule_status(
        &self,
        name: &str,
        disk: Option<&crate::rules::Rule>,
        broken: bool,
        config: &Config,
        runs: usize,
    ) -> RuleStatus {
        let now = chrono::Utc::now();
        let (history, successes, loaded, daemon_pid) = (&self.history, &self.successes, &self.loaded, &self.daemon_pid);
        let rule_runs: Vec<&crate::state::RunRecord> = history.iter().filter(|r| r.rule.as_str() == name).collect();
        let last = rule_runs.first().copied();
        let rule_name = crate::ids::RuleName::from(name);
        let success = successes.get(&rule_name).copied();
        let last_success = success.map(|t| local_at(t, config.time_zone));
        let schedule = disk.map(|r| r.schedule.clone().unwrap_or_else(|| config.default_schedule.clone()));
        let next_run = schedule.as_ref().and_then(|s| s.next_after(now, config.time_zone));
        let interval = schedule.as_ref().and_then(|s| s.interval_after(now, config.time_zone));
        let loaded_rule = loaded.iter().find(|r| r.rule == rule_name);
        let overdue = match (interval, loaded_rule.map(|r| r.loaded_at).or(success)) {
            (Some(interval), Some(since)) => {
                crate::schedule::is_overdue(interval, config.metrics.overdue_factor, success, since, now)
            }
            _ => false,
        };
        let running = loaded_rule.filter(|_| daemon_pid.is_some()).map(|r| r.hash.as_str());
        let file = daemon_pid.as_ref().map(|_| match (disk, running) {
            (Some(d), Some(h)) if d.hash == h => "running",
            (Some(_), Some(_)) => "changed",
            (None, Some(_)) if broken => "broken",
            (None, Some(_)) => "deleted",
            (_, None) => "not_loaded",
        });
        let list_id = last.and_then(|r| r.list_id.clone());
        let list = list_id.as_ref().and_then(|id| self.list_names.get(id).cloned()).or_else(|| match disk {
            Some(d) if d.fills_its_list() && !d.is_partitioned() => Some(d.list.clone()),
            _ => name.split_once(':').map(|(_, list)| list.to_owned()),
        });
        let tz = config.time_zone;
        RuleStatus {
            rule: name.to_owned(),
            list,
            list_id: list_id.map(|l| l.to_string()),
            last_run: last.map(|r| local(&r.finished_at, tz)),
            trigger: last.map(|r| r.trigger),
            outcome: last.map(|r| r.outcome),
            members: last.map(|r| (r.members_before + r.added).saturating_sub(r.removed)),
            added: last.map(|r| r.added),
            removed: last.map(|r| r.removed),
            detail: last.and_then(|r| r.detail.clone()),
            last_success,
            next_run: next_run.map(|t| local_at(t, config.time_zone)),
            file,
            held_removals: last.filter(|r| r.outcome == Outcome::Held).map_or(0, |r| r.to_remove),
            pending_removal: self.pending.get(name).copied().unwrap_or(0),
            overdue,
            runs: rule_runs
                .iter()
                .take(runs)
                .map(|r| crate::state::RunRecord {
                    started_at: local(&r.started_at, tz),
                    finished_at: local(&r.finished_at, tz),
                    ..(*r).clone()
                })
                .collect(),
        }
    }
}

/// A time as `status` and `history` show it, in text and JSON alike: ISO 8601 in the configured
/// `[rules] time_zone`, to the second.
fn local_at(t: chrono::DateTime<chrono::Utc>, tz: chrono_tz::Tz) -> String {
    t.with_timezone(&tz).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// [`local_at`] of a time the state recorded (RFC 3339); left as it is if it does not parse.
fn local(recorded: &str, tz: chrono_tz::Tz) -> String {
    chrono::DateTime::parse_from_rfc3339(recorded)
        .map_or_else(|_| recorded.to_owned(), |t| local_at(t.with_timezone(&chrono::Utc), tz))
}

/// `status`: per rule, the last run, members, next run, whether the daemon runs the file on disk,
/// held removals and overdue rules. Exit 0 when every rule's last run is ok; 1 when one failed, is
/// partial or is overdue; 4 when one holds removals.
pub(super) fn status(config: &Config, json: bool, runs: usize) -> anyhow::Result<Exit> {
    let remembered = Remembered::read(config)?;
    let engine = crate::rules::engine::build(config.time_zone);
    let (on_disk, broken, _) = crate::rules::load_tested(&engine, &config.rules_dir);
    let broken: Vec<String> = broken.iter().filter_map(|e| e.rule_name().map(str::to_owned)).collect();
    let mut files: std::collections::BTreeSet<String> = on_disk.rules.keys().map(|n| n.to_string()).collect();
    files.extend(broken.iter().cloned());
    if remembered.daemon_pid.is_some() {
        files.extend(remembered.loaded.iter().map(|r| r.rule.to_string()));
    }
    // A rule whose file is gone, and which no running daemon runs, is no longer a rule: its old
    // runs stay in `history --rule`, not in `status` (whose exit code they would fail forever).
    let file_of = |name: &str| name.split_once(':').map_or(name, |(file, _)| file).to_owned();
    let mut names = files.clone();
    names.extend(remembered.history.iter().map(|r| r.rule.to_string()).filter(|n| files.contains(&file_of(n))));
    let rows: Vec<RuleStatus> = names
        .iter()
        .map(|name| {
            let disk = on_disk.get(&crate::ids::RuleName::from(name.as_str())).map(|r| r.as_ref());
            remembered.rule_status(name, disk, broken.contains(name), config, runs)
        })
        .collect();
    let mut outcomes: Vec<Outcome> =
        rows.iter().filter_map(|r| r.outcome).filter(|o| *o != Outcome::Interrupted).collect();
    if rows.iter().any(|r| r.overdue) {
        outcomes.push(Outcome::Failed);
    }
    let exit = Exit::for_outcomes(outcomes);
    let (daemon_pid, set_aside) = (&remembered.daemon_pid, &remembered.set_aside);
    let warnings: Vec<String> = crate::state::privacy_problem(&config.state_path)
        .into_iter()
        .chain(set_aside.iter().map(|s| {
            format!(
                "state of another account at {} (key fingerprint {}) set aside since {}: {} binding(s), {} cached \
                 list(s), {} pending removal(s), not used for this key",
                s.base_url,
                s.key_fingerprint.as_deref().unwrap_or("none: written before segsync kept one"),
                s.noticed_at,
                s.bindings,
                s.cached_lists,
                s.pending_removals
            )
        }))
        .collect();
    if json {
        let doc = serde_json::json!({
            "schema_version": STATUS_SCHEMA_VERSION,
            "daemon": {
                "running": daemon_pid.is_some(),
                "pid": daemon_pid.as_deref().and_then(|p| p.parse::<u32>().ok()),
            },
            "rules": rows,
            "set_aside": set_aside,
            "warnings": warnings,
        });
        say!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(exit);
    }
    print_status(&rows, daemon_pid.as_deref(), &warnings);
    Ok(exit)
}

/// `status` for people.
fn print_status(rows: &[RuleStatus], daemon_pid: Option<&str>, warnings: &[String]) {
    match daemon_pid {
        Some(pid) => say!("daemon: running (pid {pid})"),
        None => say!("daemon: not running"),
    }
    for warning in warnings {
        say!("warning: {warning}");
    }
    if rows.is_empty() {
        say!("no rules and no runs yet");
        return;
    }
    say!(
        "{:<20} {:<20} {:<25} {:<8} {:>8} {:>7} {:>7} {:<11} {:<25} {:<10}  detail",
        "rule",
        "list",
        "last run",
        "trigger",
        "members",
        "added",
        "removed",
        "outcome",
        "next run",
        "file"
    );
    let dash = || "-".to_owned();
    for r in rows {
        let mut outcome = r.outcome.map_or_else(dash, |o| o.to_string());
        if r.overdue {
            outcome.push_str(",overdue");
        }
        let mut detail = match (r.held_removals, &r.detail) {
            (n, _) if n > 0 => {
                let file = r.rule.split_once(':').map_or(r.rule.as_str(), |(file, _)| file);
                format!("{n} removal(s) held: segsync sync {file} --allow-mass-removal")
            }
            (_, Some(d)) => d.clone(),
            _ => String::new(),
        };
        if r.pending_removal > 0 {
            let pending = format!("{} pending removal (REMOVE_AFTER)", r.pending_removal);
            detail = if detail.is_empty() { pending } else { format!("{detail}; {pending}") };
        }
        say!(
            "{:<20} {:<20} {:<25} {:<8} {:>8} {:>7} {:>7} {:<11} {:<25} {:<10}  {}",
            r.rule,
            r.list.clone().unwrap_or_else(dash),
            r.last_run.clone().unwrap_or_else(dash),
            r.trigger.map_or_else(dash, |t| t.to_string()),
            r.members.map_or_else(dash, |m| m.to_string()),
            r.added.map_or_else(dash, |m| m.to_string()),
            r.removed.map_or_else(dash, |m| m.to_string()),
            outcome,
            r.next_run.clone().unwrap_or_else(dash),
            r.file.unwrap_or("-"),
            detail
        );
        for run in &r.runs {
            say!(
                "  {} {:<8} +{} -{} {} {}",
                run.finished_at,
                run.trigger,
                run.added,
                run.removed,
                run.outcome,
                run.detail.as_deref().unwrap_or("")
            );
        }
    }
}

/// One `history` entry as shown: the list's name beside its id.
#[derive(serde::Serialize)]
struct ShownEntry {
    #[serde(flatten)]
    entry: crate::state::HistoryEntry,
    list: Option<String>,
}

/// `history CONTACT_ID` or `history --rule RULE`, newest first, optionally `--since 7d`.
pub(super) fn history(
    config: &Config,
    contact: Option<&str>,
    rule: Option<&str>,
    since: Option<&str>,
    json: bool,
) -> anyhow::Result<Exit> {
    let since = match since.map(crate::duration::parse).transpose() {
        Ok(d) => d.map(|d| {
            let from = chrono::Utc::now().checked_sub_signed(crate::duration::to_chrono(d));
            crate::state::at(from.unwrap_or(chrono::DateTime::<chrono::Utc>::MIN_UTC))
        }),
        Err(e) => {
            complain!("--since: {e}");
            return Ok(Exit::Usage);
        }
    };
    let (entries, names) = if crate::state::exists_readable(&config.state_path)? {
        let state = crate::state::State::open(&config.state_path)?;
        let from = since.clone().unwrap_or_default();
        let entries = match (contact, rule) {
            (Some(contact), _) => state.history_of_contact(contact)?.into_iter().filter(|e| e.at >= from).collect(),
            (None, Some(rule)) => state.history_of_rule(&crate::ids::RuleName::from(rule), &from)?,
            (None, None) => Vec::new(),
        };
        (entries, state.list_names()?)
    } else {
        Default::default()
    };
    let tz = config.time_zone;
    let entries: Vec<ShownEntry> = entries
        .into_iter()
        .map(|e| ShownEntry {
            list: names.get(&e.list_id).cloned(),
            entry: crate::state::HistoryEntry { at: local(&e.at, tz), ..e },
        })
        .collect();
    if json {
        let out = serde_json::json!({ "schema_version": 1, "since": since.map(|s| local(&s, tz)), "entries": entries });
        say!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(Exit::Ok);
    }
    let whose = contact.map_or_else(|| format!("rule {}", rule.unwrap_or_default()), |c| format!("contact {c}"));
    if entries.is_empty() {
        say!("no history for {whose}{}", since.map(|s| format!(" since {}", local(&s, tz))).unwrap_or_default());
        return Ok(Exit::Ok);
    }
    for ShownEntry { entry: e, list } in &entries {
        let what = match e.action {
            crate::state::Action::RuleChanged => "changed".to_owned(),
            action => format!("{} {}", action.as_str(), e.contact),
        };
        let list =
            list.as_ref().map_or_else(|| format!("list {}", e.list_id), |l| format!("list {l:?} ({})", e.list_id));
        say!("{}  {:<7} {:<24} {list}  ({}, hash {})", e.at, e.rule, what, e.trigger, e.rule_hash);
        if !e.reason.is_empty() {
            say!("    {}", e.reason);
        }
    }
    Ok(Exit::Ok)
}
