//! Removal grace and membership history around a rule's writes: when each failing member first
//! failed (so a removal waits out `REMOVE_AFTER`), and an entry for every add and removal applied,
//! a removal with the facts that made the rule say no.

use std::collections::HashMap;

use super::{Plan, Reconciler};
use crate::ids::{ContactId, ListId};
use crate::reconcile::plan::Grace;
use crate::rules::Rule;
use crate::run::Trigger;
use crate::state::Movements;

impl Reconciler {
    /// The rule's removal grace for a run at `now`: its own `REMOVE_AFTER`, else the configured
    /// default, and when each pending member first failed under this version of the rule.
    pub(super) fn grace(&self, rule: &Rule, now: chrono::DateTime<chrono::Utc>) -> Grace {
        let remove_after = rule.remove_after.or(self.default_remove_after);
        let since = match remove_after {
            Some(_) => self.state.pending_since(&self.account, &rule.name, &rule.hash).unwrap_or_else(|e| {
                tracing::warn!(rule = %rule.name, error = %e, "grace not read");
                HashMap::new()
            }),
            None => HashMap::new(),
        };
        Grace { remove_after, since, now }
    }

    /// Remembers who is still pending: members within their grace, and due members whose removal
    /// did not happen (held, refused, or a write failed) so they stay due. Everyone else (qualifying
    /// again, removed, gone) drops out, and so do entries of an earlier version of the rule.
    pub(super) fn keep_grace(&self, rule: &Rule, grace: &Grace, plan: &Plan, removals_applied: bool) {
        if grace.remove_after.is_none() {
            return;
        }
        let mut pending = plan.pending.clone();
        if !removals_applied {
            pending.extend(plan.to_remove.iter().map(|id| (id.clone(), grace.since(id))));
        }
        if let Err(e) = self.state.set_pending(&self.account, &rule.name, &rule.hash, &pending) {
            tracing::warn!(rule = %rule.name, error = %e, "grace not stored");
        }
    }

    /// Records the run's applied adds and removals (and a rule change) in the history.
    pub(super) fn log_history(
        &self,
        rule: &Rule,
        list: &ListId,
        trigger: Trigger,
        plan: &Plan,
        reasons: &[(ContactId, String)],
        now: chrono::DateTime<chrono::Utc>,
    ) {
        let at = crate::state::at(now);
        let reasons: HashMap<&ContactId, &str> = reasons.iter().map(|(id, why)| (id, why.as_str())).collect();
        let previous = self.state.last_runs(1).ok().and_then(|runs| runs.into_iter().find(|r| r.rule == rule.name));
        let note = previous.filter(|r| !r.rule_hash.is_empty() && r.rule_hash != rule.short_hash()).map(|before| {
            format!(
                "rule {} changed: hash {} → {}; {} added and {} removed by this run",
                rule.name,
                before.rule_hash,
                rule.short_hash(),
                plan.adds_to_apply().len(),
                plan.removals_to_apply().len()
            )
        });
        let movements = Movements {
            at: &at,
            rule: &rule.name,
            rule_hash: rule.short_hash(),
            list,
            trigger,
            note,
            added: plan.adds_to_apply(),
            removed: plan
                .removals_to_apply()
                .iter()
                .map(|id| {
                    let reason = reasons.get(id).copied().unwrap_or("the rule said no");
                    (id, if self.history_facts { reason } else { without_values(reason) })
                })
                .collect(),
        };
        if let Err(e) = self.state.record_movements(&movements) {
            tracing::warn!(rule = %rule.name, error = %e, "history not stored");
        }
    }

    /// Prunes history older than the retention.
    pub(super) async fn prune_history(&self) {
        let (state, retention) = (self.state.clone(), self.history_retention);
        let Some(cut) = chrono::Utc::now().checked_sub_signed(crate::duration::to_chrono(retention)) else { return };
        let before = crate::state::at(cut);
        match tokio::task::spawn_blocking(move || state.prune_history(&before)).await {
            Ok(Ok(n)) if n > 0 => tracing::debug!(pruned = n, "history pruned"),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "history not pruned"),
            Err(e) => tracing::warn!(error = %e, "history not pruned"),
        }
    }
}

/// A removal's reason without the contact's field values (`[state] history_facts = false`): the
/// rule's verdict stays, what the record held does not.
fn without_values(reason: &str) -> &str {
    match reason.split_once(": ") {
        Some((verdict, _)) if verdict == "matches returned false" => verdict,
        _ if reason.starts_with("FILTER ") => "FILTER fails",
        _ => reason,
    }
}

#[cfg(test)]
mod tests {
    use super::without_values;

    // The data-minimal setting keeps the verdict and drops every value the record held.
    #[test]
    fn reasons_without_values() {
        assert_eq!(
            without_values("matches returned false: customFields.totalSpent = 4200.0, email = \"a@b.it\""),
            "matches returned false"
        );
        assert_eq!(without_values("FILTER region = \"Veneto\" fails"), "FILTER fails");
        assert_eq!(without_values("the rule said no"), "the rule said no");
    }
}
