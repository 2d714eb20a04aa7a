//! Reporting a rule's run: the run stored in the state, and its one summary log event.

use super::{Outcome, Reconciler, RuleReport, Trigger};
use crate::ids::ContactId;
use crate::state::RunRecord;

impl Reconciler {
    /// Stores the run and logs its one summary event.
    pub(super) async fn record(&self, r: &RuleReport, trigger: Trigger, started_at: &str, dry_run: bool) {
        let record = RunRecord {
            rule: r.rule.name.clone(),
            list_id: r.list_id.clone(),
            trigger,
            rule_hash: r.rule.short_hash().to_owned(),
            started_at: started_at.to_owned(),
            finished_at: crate::state::now(),
            scanned: r.scanned,
            matched: r.matched,
            members_before: r.members_before,
            added: r.added,
            removed: r.removed,
            eval_errors: r.eval_errors,
            api_requests: r.usage.total_requests(),
            retries: r.usage.retries,
            duration_ms: r.duration.as_millis() as u64,
            outcome: r.outcome,
            detail: r.detail.clone(),
            to_remove: r.plan.to_remove.len() as u64,
        };
        if dry_run {
            return;
        }
        let state = self.state.clone();
        let stored = record.clone();
        match tokio::task::spawn_blocking(move || state.record_run(&stored)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(rule = %record.rule, error = %e, "run not recorded"),
            Err(e) => tracing::error!(rule = %record.rule, error = %e, "run not recorded"),
        }
        macro_rules! summary {
            ($level:ident) => {
                tracing::$level!(
                    rule = %record.rule,
                    list_id = record.list_id.as_ref().map(|l| l.as_str()),
                    trigger = %record.trigger,
                    rule_hash = %record.rule_hash,
                    scanned = record.scanned,
                    matched = record.matched,
                    members_before = record.members_before,
                    added = record.added,
                    removed = record.removed,
                    to_add = r.plan.to_add.len(),
                    to_remove = r.plan.to_remove.len(),
                    pending_removal = r.plan.pending.len(),
                    eval_errors = record.eval_errors,
                    first_eval_error = r.first_error.as_deref(),
                    api_requests = record.api_requests,
                    retries = record.retries,
                    read_plan = r.read.as_str(),
                    members_from = r.members_from.as_str(),
                    duration_ms = record.duration_ms,
                    outcome = %record.outcome,
                    detail = record.detail.as_deref(),
                    "rule run"
                )
            };
        }
        match r.outcome {
            Outcome::Ok => summary!(info),
            Outcome::Held | Outcome::Partial | Outcome::Interrupted => summary!(warn),
            Outcome::Failed => summary!(error),
        }
    }
}

/// A few ids, for people.
pub fn sample(ids: &[ContactId], n: usize) -> Vec<&str> {
    ids.iter().take(n).map(ContactId::as_str).collect()
}
