//! Removal grace: a failing member is removed only once it has failed continuously for the rule's
//! `REMOVE_AFTER` (or `[rules] default_remove_after`). Pure: when each pending member first failed
//! is recalled from the state, and what stays pending is stored by `commit`.

use std::collections::HashMap;

use super::Plan;
use crate::ids::ContactId;

/// A rule's removal grace for one run: failing members are removed only once they have failed
/// continuously for `remove_after`.
#[derive(Debug, Clone)]
pub struct Grace {
    pub remove_after: Option<std::time::Duration>,
    /// When each member already pending first failed (RFC 3339), under this version of the rule.
    pub since: HashMap<ContactId, String>,
    pub now: chrono::DateTime<chrono::Utc>,
}

impl Grace {
    /// No grace: failing members are removed at once.
    pub fn none() -> Self {
        Self { remove_after: None, since: HashMap::new(), now: chrono::Utc::now() }
    }

    /// When `id` first failed: as remembered, else now.
    pub fn since(&self, id: &ContactId) -> String {
        self.since.get(id).cloned().unwrap_or_else(|| crate::state::at(self.now))
    }

    /// Whether a member failing since `since` has waited out the grace.
    pub(super) fn due(&self, since: &str, after: std::time::Duration) -> bool {
        let since = chrono::DateTime::parse_from_rfc3339(since).map_or(self.now, |t| t.with_timezone(&chrono::Utc));
        self.now.signed_duration_since(since).to_std().is_ok_and(|waited| waited >= after)
    }
}

impl Grace {
    /// Who is still pending after the run: members within their grace, and due members whose
    /// removal did not happen (held, refused, or a write failed) so they stay due. Everyone else
    /// (qualifying again, removed, gone) drops out. `None` when the rule has no grace.
    pub fn still_pending(&self, plan: &Plan, removals_applied: bool) -> Option<Vec<(ContactId, String)>> {
        self.remove_after?;
        let mut pending = plan.pending.clone();
        if !removals_applied {
            pending.extend(plan.to_remove.iter().map(|id| (id.clone(), self.since(id))));
        }
        Some(pending)
    }
}
