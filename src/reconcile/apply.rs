//! Stage 7, `apply`: writing a plan to the gateway: adds in batches of at most 1,000, then
//! removals in bulk batches. Between batches it checks for shutdown, so a stop never cuts a batch
//! in half. Both writes are idempotent (set union, set difference), so a retry or a rerun is
//! harmless. Nothing is written in a dry run, or when a guard refused the plan. A rule's new list is
//! created here, just before its first write, so a rule that fails before (a read, the error
//! share) leaves no list behind.

use tokio_util::sync::CancellationToken;

use super::plan::Planned;
use super::{Flow, Plan, ReconcileError, Reconciler};
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

/// A rule's plan and what of it was written.
pub(super) struct Written {
    pub planned: Planned,
    pub applied: Applied,
    /// The write that failed (the batches before it stand).
    pub error: Option<ReconcileError>,
}

impl Reconciler {
    pub(super) async fn apply(&self, planned: Flow<Planned>, dry_run: bool) -> Flow<Written> {
        let mut planned = planned?;
        if dry_run || planned.plan.refused.is_some() {
            return Ok(Written { planned, applied: Applied::default(), error: None });
        }
        // A new list is created here, by a run that writes: never by one that cannot judge.
        if planned.judged.bound.list.is_none()
            && let Err(e) = self.create(&mut planned.judged.bound).await
        {
            return Ok(Written { planned, applied: Applied::default(), error: Some(e) });
        }
        let bound = &planned.judged.bound;
        let Some(list) = bound.list.clone() else {
            return Ok(Written { planned, applied: Applied::default(), error: None });
        };
        let (applied, error) = match write(&bound.job.gateway, &list, &planned.plan, &self.cancel).await {
            Ok(applied) => (applied, None),
            Err((applied, e)) => (applied, Some(e)),
        };
        if let (None, Some(why)) = (&error, applied.unconfirmed()) {
            tracing::warn!(rule = %bound.job.rule.name, list_id = %list, detail = %why, "writes unconfirmed");
        }
        Ok(Written { planned, applied, error })
    }
}

async fn write(
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
