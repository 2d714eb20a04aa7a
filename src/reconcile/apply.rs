//! Writing a plan to the gateway: adds in batches of at most 1,000, then removals in bulk
//! batches. Between batches it checks for shutdown, so a stop never cuts a batch in half.
//! Both writes are idempotent (set union, set difference), so a retry or a rerun is harmless.

use tokio_util::sync::CancellationToken;

use super::{Plan, ReconcileError};
use crate::gateway::{Gateway, MAX_BATCH, WriteOutcome};
use crate::ids::ListId;

/// What the gateway confirmed of the adds and the removals.
#[derive(Debug, Default, Clone, Copy)]
pub struct Applied {
    pub added: WriteOutcome,
    pub removed: WriteOutcome,
}

impl Applied {
    /// The list's size as the last write answered it.
    pub fn list_total(&self) -> Option<u64> {
        self.removed.list_total.or(self.added.list_total)
    }

    /// Why the writes are not known to have happened, if they are not.
    pub fn unconfirmed(&self) -> Option<String> {
        let (adds, removals) = (self.added.unconfirmed, self.removed.unconfirmed);
        (adds + removals > 0).then(|| {
            format!(
                "the gateway did not confirm {adds} add(s) and {removals} removal(s) (its answers lacked the counts or \
                 they did not add up); the next run reads the list again"
            )
        })
    }
}

pub async fn apply(
    gw: &Gateway,
    list: &ListId,
    plan: &Plan,
    cancel: &CancellationToken,
) -> Result<Applied, (Applied, ReconcileError)> {
    let mut done = Applied::default();
    for batch in plan.adds_to_apply().chunks(MAX_BATCH) {
        if cancel.is_cancelled() {
            return Err((done, ReconcileError::Interrupted));
        }
        match gw.add_members(list, batch).await {
            Ok(out) => done.added.merge(out),
            Err(e) => return Err((done, e.into())),
        }
    }
    for batch in plan.removals_to_apply().chunks(MAX_BATCH) {
        if cancel.is_cancelled() {
            return Err((done, ReconcileError::Interrupted));
        }
        match gw.remove_members(list, batch).await {
            Ok(out) => done.removed.merge(out),
            Err(e) => return Err((done, e.into())),
        }
    }
    Ok(done)
}
