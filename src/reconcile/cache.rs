//! The membership cache in a pass: whether a list's cached members can stand in for reading
//! them, loading them, and keeping the cache true after the writes.
//!
//! A cache is used only when it was filled by a complete member read less than
//! `verify_members_every` ago, no write since went unconfirmed, and the list directory read in
//! this same pass gives the list exactly the count the cache holds. The members it gives are
//! then judged on the records of this pass's shared scan, so a removal still rests on the
//! member's current record. A cached member the scan did not return is kept.

use futures_util::future::join_all;

use super::{MemberSource, Plan, ReadKind, Reconciler, Rule, Slot, apply};
use crate::gateway::{Endpoint, ListInfo};
use crate::ids::{ContactIdSet, ListId};
use crate::rules::Date;
use crate::state::Applied;

impl Reconciler {
    /// Marks the slot's cache trusted when it may stand in for a member read this pass.
    pub(super) fn consult_cache(&self, slot: &mut Slot, directory: Option<&[ListInfo]>) {
        let Some(list) = slot.list.as_ref().filter(|_| !slot.created && slot.error.is_none()) else { return };
        slot.listed = directory.and_then(|all| all.iter().find(|l| &l.id == list)).and_then(|l| l.contact_count);
        let Ok(Some(cached)) = self.state.cached_list(&self.account, list) else { return };
        let fresh = chrono::DateTime::parse_from_rfc3339(&cached.verified_at).is_ok_and(|at| {
            chrono::Utc::now().signed_duration_since(at).to_std().is_ok_and(|age| age < self.verify_members_every)
        });
        slot.trusted_cache = cached.trusted && fresh && slot.listed == Some(cached.members);
        if !slot.trusted_cache {
            tracing::debug!(rule = %slot.rule.name, list_id = %list, trusted = cached.trusted, fresh,
                cached = cached.members, listed = ?slot.listed, "cache not used; reading members");
        }
    }

    /// Gives every live slot its members: the cache's (shared scan only, where trusted), else a
    /// complete read of the list.
    pub(super) async fn members(&self, slots: &mut [Slot], read: ReadKind, today: Date, dry_run: bool) {
        let (cached, to_read): (Vec<&mut Slot>, Vec<&mut Slot>) = slots
            .iter_mut()
            .filter(|s| s.error.is_none() && s.list.is_some() && !s.created)
            .partition(|s| s.trusted_cache && read == ReadKind::SharedScan);
        let loads = cached.into_iter().map(|slot| async move {
            let (state, account, list) = (self.state.clone(), self.account.clone(), slot.list.clone());
            let loaded =
                tokio::task::spawn_blocking(move || list.map(|list| state.cached_members(&account, &list)).transpose())
                    .await;
            match loaded {
                Ok(Ok(Some(members))) => {
                    slot.eval.members = members;
                    slot.members_from = MemberSource::Cache;
                }
                // The cache cannot be read: read the list instead.
                other => {
                    let error = match other {
                        Ok(Err(e)) => e.to_string(),
                        Err(e) => e.to_string(),
                        Ok(Ok(_)) => "no list".into(),
                    };
                    tracing::warn!(rule = %slot.rule.name, error = %error, "cache not readable");
                    self.read_members(slot, dry_run, today).await;
                }
            }
        });
        let reads = to_read.into_iter().map(|slot| self.read_members(slot, dry_run, today));
        futures_util::future::join(join_all(loads), join_all(reads)).await;
    }

    /// Keeps the cache true after a rule's writes: a fresh read replaces it, cached members take
    /// the confirmed writes. Anything unconfirmed, failed or disagreeing with the list's count as
    /// the last write answered it leaves the cache untrusted, so the next pass reads the list.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn update_cache(
        &self,
        rule: &Rule,
        list: &ListId,
        from: MemberSource,
        members: ContactIdSet,
        plan: &Plan,
        applied: &apply::Applied,
        write_failed: bool,
    ) {
        if from == MemberSource::Unknown {
            return;
        }
        // Only what was sent: a held removal is not applied; a failed run may have sent a part.
        let (adds, removals) = (plan.adds_to_apply().to_vec(), plan.removals_to_apply().to_vec());
        let expected = (members.len() + adds.len()).saturating_sub(removals.len()) as u64;
        let agrees = applied.list_total().is_none_or(|total| total == expected);
        if !agrees {
            tracing::debug!(rule = %rule.name, list_id = %list, expected, answered = ?applied.list_total(),
                "list count differs from the cache; reading it next pass");
        }
        let confirmed = !write_failed && applied.unconfirmed().is_none() && agrees;
        let (state, account, list) = (self.state.clone(), self.account.clone(), list.clone());
        let stored = tokio::task::spawn_blocking(move || {
            let applied = Applied { added: &adds, removed: &removals, confirmed };
            match from {
                MemberSource::Cache => state.update_members(&account, &list, applied),
                _ => state.store_members(&account, &list, &members, applied),
            }
        })
        .await;
        match stored {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(rule = %rule.name, error = %e, "cache not stored"),
            Err(e) => tracing::warn!(rule = %rule.name, error = %e, "cache not stored"),
        }
    }

    /// Stores the paging the endpoints answered to, for the next run.
    pub(super) fn remember_paging(&self) {
        let now: Vec<_> = Endpoint::ALL.into_iter().map(|e| (e, self.gateway.paging(e))).collect();
        if let Err(e) = self.state.set_paging(&self.account, &now) {
            tracing::warn!(error = %e, "paging not stored");
        }
    }
}
