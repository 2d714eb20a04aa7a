//! The membership cache in a pass: whether a list's cached members can stand in for reading
//! them, loading them, and keeping the cache true after the writes.
//!
//! A cache is used only when it was filled by a complete member read less than
//! `verify_members_every` ago, no write since went unconfirmed, and the list directory read at
//! the start of this pass does not count more members than the cache holds. Its members are
//! judged on the records of this pass's shared scan, so a removal still rests on the member's
//! current record. After the scan the cache must account for the directory's count exactly: its
//! members the scan returned (a cached member the scan did not return was deleted, and left the
//! list by itself) must be as many as the list holds. If not, someone changed the list by hand:
//! the list is read now, its members judged on their member records, and a cached "member" that
//! is not one is a candidate again, judged on its scan record. So a hand edit is corrected in the
//! same pass, and deleted contacts (churn) cost no read.

use futures_util::future::join_all;

use super::{MemberSource, Plan, ReadKind, Reconciler, Rule, Slot, apply};
use crate::gateway::{Endpoint, ListInfo};
use crate::ids::{ContactId, ContactIdSet, ListId};
use crate::rules::Date;
use crate::state::Applied;

/// What a rule's run tells the cache.
pub(super) struct Update {
    pub from: MemberSource,
    /// The members the run started from.
    pub members: ContactIdSet,
    /// Cached members the scan did not return (deleted contacts).
    pub unseen: Vec<ContactId>,
    /// A write failed part-way: which batches landed is not known.
    pub write_failed: bool,
}

impl Reconciler {
    /// Marks the slot's cache trusted when it may stand in for a member read this pass.
    pub(super) fn consult_cache(&self, slot: &mut Slot, directory: Option<&[ListInfo]>) {
        let Some(list) = slot.list.as_ref().filter(|_| !slot.created && slot.error.is_none()) else { return };
        slot.listed = directory.and_then(|all| all.iter().find(|l| &l.id == list)).and_then(|l| l.contact_count);
        let Ok(Some(cached)) = self.state.cached_list(&self.account, list) else { return };
        let fresh = chrono::DateTime::parse_from_rfc3339(&cached.verified_at).is_ok_and(|at| {
            chrono::Utc::now().signed_duration_since(at).to_std().is_ok_and(|age| age < self.verify_members_every)
        });
        // More members than the cache holds: someone added some; fewer may be deletions, which
        // the scan tells apart (`settle_cached`).
        slot.trusted_cache = cached.trusted && fresh && slot.listed.is_some_and(|n| n <= cached.members);
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

    /// After the scan: a cached list whose members the scan returned are exactly as many as the
    /// directory counted is confirmed (the others were deleted); any other is read now.
    pub(super) async fn settle_cached(&self, slots: &mut [Slot], today: Date, dry_run: bool) {
        let checks = slots.iter_mut().filter(|s| s.error.is_none() && s.members_from == MemberSource::Cache).map(
            |slot| async move {
                let Some(seen) = slot.seen.take() else { return };
                let cached = &slot.eval.members;
                if slot.listed == Some(seen.seen.count()) {
                    slot.unseen = (0..cached.len() as u32)
                        .filter(|&i| !seen.seen.get(i))
                        .filter_map(|i| cached.at(i).map(ContactId::from))
                        .collect();
                    slot.eval.merge(seen.eval);
                    return;
                }
                tracing::debug!(rule = %slot.rule.name, listed = ?slot.listed, seen = seen.seen.count(),
                    "the list's count disagrees with the cache; reading its members");
                let cached = std::mem::take(&mut slot.eval.members);
                let candidates = std::mem::take(&mut slot.eval);
                self.read_members(slot, dry_run, today).await;
                if slot.error.is_some() || slot.members_from != MemberSource::Read {
                    return;
                }
                slot.eval.merge(candidates);
                // A cached "member" that is not one is a candidate, judged on its scan record.
                for i in 0..cached.len() as u32 {
                    let Some(id) = cached.at(i).filter(|id| seen.matched.get(i) && !slot.eval.members.contains(id))
                    else {
                        continue;
                    };
                    slot.eval.matched += 1;
                    slot.eval.candidates_matching.push(ContactId::from(id));
                }
            },
        );
        join_all(checks).await;
    }

    /// Keeps the cache true after a rule's writes: a fresh read replaces it, cached members take
    /// the confirmed writes. Anything unconfirmed, failed or disagreeing with the list's count as
    /// the last write answered it leaves the cache untrusted, so the next pass reads the list.
    /// The plan goes to the writing thread and comes back (no copy of a first sync's million adds).
    pub(super) async fn update_cache(
        &self,
        rule: &Rule,
        list: &ListId,
        update: Update,
        plan: Plan,
        applied: &apply::Applied,
    ) -> Plan {
        let Update { from, members, unseen, write_failed } = update;
        if from == MemberSource::Unknown {
            return plan;
        }
        // Only what was sent: a held removal is not applied; a failed run may have sent a part.
        // Deleted members left by themselves.
        let removed = plan.removals_to_apply().len() + unseen.len();
        let expected = (members.len() + plan.adds_to_apply().len()).saturating_sub(removed) as u64;
        let agrees = applied.list_total().is_none_or(|total| total == expected);
        if !agrees {
            tracing::debug!(rule = %rule.name, list_id = %list, expected, answered = ?applied.list_total(),
                "list count differs from the cache; reading it next pass");
        }
        let confirmed = !write_failed && applied.unconfirmed().is_none() && agrees;
        let (state, account, list) = (self.state.clone(), self.account.clone(), list.clone());
        let stored = tokio::task::spawn_blocking(move || {
            let mut removals = plan.removals_to_apply().to_vec();
            removals.extend(unseen);
            let applied = Applied { added: plan.adds_to_apply(), removed: &removals, confirmed };
            let stored = match from {
                MemberSource::Cache => state.update_members(&account, &list, applied),
                _ => state.store_members(&account, &list, &members, applied),
            };
            (stored, plan)
        })
        .await;
        match stored {
            Ok((Ok(()), plan)) => plan,
            Ok((Err(e), plan)) => {
                tracing::warn!(rule = %rule.name, error = %e, "cache not stored");
                plan
            }
            Err(e) => {
                tracing::warn!(rule = %rule.name, error = %e, "cache not stored");
                Plan::default()
            }
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
