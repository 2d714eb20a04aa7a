//! Stage 4, `read`: the candidates, read the way `members` chose. One shared scan of every contact
//! that every rule rides (a cached list's members are judged on its records), or each rule's own
//! read of `FILTER & notListIds=<its list>`. Also the counts the next pass plans with.

use std::sync::Arc;

use futures_util::future::join_all;

use super::judge::{self, CachedSeen, Found, Target};
use super::members::Members;
use super::partition::{Named, Unfolding};
use super::{Evaluation, Flow, MemberSource, ReadKind, ReconcileError, Reconciler, Stopped};
use crate::gateway::{Meter, ScanQuery};
use crate::ids::ContactIdSet;
use crate::rules::{Date, Observed, Rule};
use crate::state::Estimate;

/// Per unfolding rule: the lists its contacts name that it has no part for, or why the read failed.
pub(super) type NamedLists = Vec<Result<Named, String>>;

/// A list's members and the candidates its rule matched.
pub(super) struct Candidates {
    pub members: Members,
    /// The non-members the read judged.
    pub found: Evaluation,
    /// Non-members passing the rule's FILTER and derived filter: what its own read would return.
    pub in_filter: u64,
    /// What the shared scan saw of a cached list's members.
    pub seen: Option<CachedSeen>,
    /// The counts the next pass plans its reads with (stored at commit).
    pub estimates: Vec<(Estimate, u64)>,
}

impl Reconciler {
    /// Reads and judges the candidates of every rule with its members, and the lists each
    /// `unfolding` rule's contacts name that it has no part for: counted on the shared scan, or by
    /// a read of the rule's FILTER when each rule reads its own (`Err`: that read failed).
    pub(super) async fn read(
        &self,
        members: Vec<Flow<Members>>,
        read: ReadKind,
        unfolding: &[Unfolding],
        shared: &Arc<Meter>,
        today: Date,
    ) -> (Vec<Flow<Candidates>>, NamedLists) {
        let mut live: Vec<Members> = Vec::new();
        let mut slots: Vec<Option<Box<Stopped>>> = Vec::with_capacity(members.len());
        for m in members {
            match m {
                Ok(m) => {
                    live.push(m);
                    slots.push(None);
                }
                Err(stopped) => slots.push(Some(stopped)),
            }
        }
        // Members are shared with the judging threads, then handed back (no copy of big sets).
        let sets: Vec<Arc<ContactIdSet>> =
            live.iter_mut().map(|m| Arc::new(std::mem::take(&mut m.eval.members))).collect();
        let (found, named): (Vec<Result<Found, Arc<ReconcileError>>>, NamedLists) = match read {
            ReadKind::SharedScan => {
                let targets = live.iter().zip(&sets).map(|(m, set)| target(m, set, today)).collect();
                let (gw, query) = (self.gateway.metered(shared.clone()), ScanQuery::default());
                let scan = judge::candidates(&self.cancel, &gw, &self.engine, &query, targets, unfolding, today);
                match scan.await {
                    Ok(mut found) => {
                        let named = std::mem::take(&mut found.named).into_iter().map(Ok).collect();
                        (split(found), named)
                    }
                    Err(e) => {
                        let failed = unfolding.iter().map(|_| Err(e.to_string())).collect();
                        let e = Arc::new(e);
                        (live.iter().map(|_| Err(e.clone())).collect(), failed)
                    }
                }
            }
            ReadKind::OwnRead => {
                let reads = live.iter().zip(&sets).map(|(m, set)| self.own_read(m, set, today));
                let found = join_all(reads).await.into_iter().map(|r| r.map_err(Arc::new)).collect();
                (found, self.unfolding_names(unfolding, shared, today).await)
            }
        };
        for (m, set) in live.iter_mut().zip(sets) {
            m.eval.members = Arc::try_unwrap(set).unwrap_or_else(|shared| (*shared).clone());
        }
        let mut judged = live.into_iter().zip(found).map(|(members, found)| match found {
            Ok(found) => Ok(candidates(members, found, read, today)),
            Err(e) => {
                let error = if e.is_interrupted() { ReconcileError::Interrupted } else { ReconcileError::Read(e) };
                Err(Box::new(Stopped { bound: members.bound, eval: members.eval, error }))
            }
        });
        let judged =
            slots.into_iter().map(|slot| slot.map_or_else(|| judged.next().expect("one per live rule"), Err)).collect();
        (judged, named)
    }

    /// The lists `unfolding` rules' contacts name that they have no part for, when no shared scan
    /// counted them: one unfiltered read for them all when one of them reads everyone anyway (no
    /// FILTER), else a read of each one's FILTER.
    async fn unfolding_names(&self, unfolding: &[Unfolding], shared: &Arc<Meter>, today: Date) -> NamedLists {
        if unfolding.len() > 1 && unfolding.iter().any(|u| u.parent.filter.is_empty()) {
            let (gw, query) = (self.gateway.metered(shared.clone()), ScanQuery::default());
            return match judge::candidates(&self.cancel, &gw, &self.engine, &query, Vec::new(), unfolding, today).await
            {
                Ok(found) => found.named.into_iter().map(Ok).collect(),
                Err(e) => unfolding.iter().map(|_| Err(e.to_string())).collect(),
            };
        }
        let names = unfolding.iter().map(|u| self.named_lists(&u.parent, u.max, today, shared));
        join_all(names)
            .await
            .into_iter()
            .zip(unfolding)
            .map(|(named, u)| {
                named.map(|mut named| {
                    named.lists.retain(|list, _| !u.known.contains(list));
                    named
                })
            })
            .collect()
    }

    /// A rule's own read: its FILTER plus `notListIds` (when its list exists).
    async fn own_read(&self, m: &Members, set: &Arc<ContactIdSet>, today: Date) -> Result<Found, ReconcileError> {
        let bound = &m.bound;
        let query = ScanQuery {
            filters: bound.job.rule.own_read_query(today),
            not_list_ids: bound.list.iter().filter(|_| !bound.created).cloned().collect(),
            ..ScanQuery::default()
        };
        let targets = vec![target(m, set, today)];
        let mut found =
            judge::candidates(&self.cancel, &bound.job.gateway, &self.engine, &query, targets, &[], today).await?;
        let rule = &bound.job.rule;
        if let Some(candidates) = found.per_target.first_mut()
            && needs_filter_sample(rule, &m.eval, &candidates.observed)
        {
            // The server's filtered read says only "nothing": one unfiltered page says what the
            // FILTER's fields hold instead (a finding), at one request.
            candidates.observed.merge(judge::filter_sample(&self.cancel, &bound.job.gateway, rule).await?);
        }
        Ok(found)
    }
}

/// Whether a rule's own read left its FILTER unexplained: the server returned no one, and no member
/// showed that the FILTER matches someone.
fn needs_filter_sample(rule: &Rule, members: &Evaluation, candidates: &Observed) -> bool {
    !rule.filter.is_empty()
        && candidates.filtered() == 0
        && (members.members.is_empty() || (members.observed.filtered() > 0 && !members.observed.filter_matched()))
}

fn target(m: &Members, set: &Arc<ContactIdSet>, today: Date) -> Target {
    let rule = m.bound.job.rule.clone();
    Target { derived: rule.derived_filter(today), rule, members: set.clone(), cached: m.from == MemberSource::Cache }
}

/// One shared scan's findings, one per target.
fn split(found: Found) -> Vec<Result<Found, Arc<ReconcileError>>> {
    let total = found.total;
    found
        .per_target
        .into_iter()
        .zip(found.in_filter)
        .zip(found.cached)
        .map(|((part, in_filter), cached)| {
            Ok(Found {
                per_target: vec![part],
                cached: vec![cached],
                in_filter: vec![in_filter],
                named: Vec::new(),
                total,
            })
        })
        .collect()
}

/// A rule's candidates from its part of a read, with the counts the next pass plans with.
fn candidates(members: Members, found: Found, read: ReadKind, today: Date) -> Candidates {
    let rule = &members.bound.job.rule;
    let in_filter = found.in_filter.first().copied().unwrap_or(0);
    let mut estimates = Vec::new();
    match read {
        ReadKind::SharedScan => estimates.push((Estimate::Contacts, found.total)),
        // A rule's own unfiltered read of its non-members, plus its members, is everyone.
        ReadKind::OwnRead if !rule.narrowed(today) && !members.bound.created => {
            estimates.push((Estimate::Contacts, found.total + members.eval.members.len() as u64))
        }
        ReadKind::OwnRead => {}
    }
    if rule.narrowed(today) {
        estimates.push((Estimate::Candidates(rule.name.clone()), in_filter));
    }
    Candidates {
        found: found.per_target.into_iter().next().unwrap_or_default(),
        seen: found.cached.into_iter().next().flatten(),
        in_filter,
        estimates,
        members,
    }
}
