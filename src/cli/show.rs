//! How pass reports and run history are shown to people (text) and to programs (JSON).

use super::Exit;
use crate::config::Config;
use crate::ids::ContactId;
use crate::reconcile::{Outcome, PassReport, RuleReport, sample};

pub(super) fn plan_json(r: &RuleReport) -> serde_json::Value {
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

pub(super) fn print_pass(report: &PassReport, dry_run: bool) {
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

pub(super) fn status(config: &Config, json: bool, runs: usize) -> anyhow::Result<Exit> {
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
            r.detail.as_deref().unwrap_or("")
        );
    }
    Ok(Exit::Ok)
}
