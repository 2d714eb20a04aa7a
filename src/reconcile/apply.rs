//! Writing a plan to the gateway: adds in batches of at most 1,000, then removals in bulk
//! batches. Between batches it checks for shutdown, so a stop never cuts a batch in half.
//! Both writes are idempotent (set union, set difference), so a retry or a rerun is harmless.

use tokio_util::sync::CancellationToken;

use super::{Plan, ReconcileError};
use crate::gateway::{Gateway, MAX_BATCH};
use crate::ids::ListId;

#[derive(Debug, Default, Clone, Copy)]
pub struct Applied {
    pub added: u64,
    pub removed: u64,
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
            Ok(out) => done.added += out.added,
            Err(e) => return Err((done, e.into())),
        }
    }
    for batch in plan.removals_to_apply().chunks(MAX_BATCH) {
        if cancel.is_cancelled() {
            return Err((done, ReconcileError::Interrupted));
        }
        match gw.remove_members(list, batch).await {
            Ok(n) => done.removed += n,
            Err(e) => return Err((done, e.into())),
        }
    }
    Ok(done)
}
