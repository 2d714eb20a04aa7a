//! The read plan: how a pass reads its candidates. One shared scan of every contact that every
//! due rule rides (a list whose cache holds needs no member read: its members are judged on the
//! scan's records), or each rule's own read of `FILTER & notListIds=<its list>` plus its
//! members; whichever the directory's counts and those remembered from the last pass say costs
//! fewer requests.

use std::sync::Arc;

use futures_util::future::join_all;

use super::{MemberSource, ReadKind, ReconcileError, Reconciler, Slot, read};
use crate::gateway::{Endpoint, Meter, ScanQuery};
use crate::ids::ContactIdSet;
use crate::rules::{Date, Rule};
use crate::state::Estimate;

/// What one rule's reading costs, as far as known before the reads.
struct RuleCost {
    /// Its list exists: its members are read unless the cache gives them.
    bound: bool,
    /// Members, as the directory, the cache or the last run counted them.
    members: u64,
    /// The cache may give the members (only a shared scan can judge them).
    cached: bool,
    /// The non-members its own read would return; `None` when only a scan can tell.
    own: Option<u64>,
}

/// The cheaper read and its requests: the shared scan (plus the members no cache gives) against
/// every rule's own read (plus every list's members).
fn cheaper(costs: &[RuleCost], contacts: Option<u64>, page: u64) -> (ReadKind, u64) {
    let pages = |n: u64| n.div_ceil(page).max(1);
    let member_pages = |c: &RuleCost| if c.bound { pages(c.members) } else { 0 };
    let own: Option<u64> = costs.iter().map(|c| c.own.map(|n| pages(n) + member_pages(c))).sum();
    let Some(contacts) = contacts else {
        // Unknown size: a rule that must see everyone needs the scan; else the own reads.
        return match own {
            Some(own) => (ReadKind::OwnRead, own),
            None => (ReadKind::SharedScan, costs.iter().map(member_pages).sum()),
        };
    };
    // A scan ends on an empty page when the count is a multiple of the page.
    let scan = pages(contacts)
        + u64::from(contacts % page == 0)
        + costs.iter().filter(|c| !c.cached).map(member_pages).sum::<u64>();
    match own {
        Some(own) if own <= scan => (ReadKind::OwnRead, own),
        _ => (ReadKind::SharedScan, scan),
    }
}

impl Reconciler {
    fn page(&self) -> u64 {
        u64::from(self.gateway.expected_paging(Endpoint::Contacts).page_size)
    }

    /// Today in the configured zone (a pass's own "today" may be frozen; plans only estimate).
    fn today(&self) -> Date {
        Date(chrono::Utc::now().with_timezone(&self.time_zone).date_naive())
    }

    fn contacts(&self) -> Option<u64> {
        self.state.estimate(&self.account, &Estimate::Contacts).ok().flatten()
    }

    /// The non-members `rule`'s own read returns, as last seen; `None` when unfiltered and the
    /// account's size is unknown.
    fn own_estimate(&self, rule: &Rule, members: u64, contacts: Option<u64>) -> Option<u64> {
        if !rule.narrowed(self.today()) {
            contacts.map(|n| n.saturating_sub(members))
        } else {
            let key = Estimate::Candidates(rule.name.clone());
            Some(self.state.estimate(&self.account, &key).ok().flatten().unwrap_or(0))
        }
    }

    /// Before a pass: the read plan the remembered counts predict and the requests the pass should
    /// cost (directory, members, candidates and creates; writes are not known yet). `None` when
    /// the account's size is not known yet (the first pass).
    pub(super) fn predict(&self, rules: &[Arc<Rule>]) -> (ReadKind, Option<u64>) {
        let contacts = self.contacts();
        let last = self.state.last_runs(1).unwrap_or_default();
        let mut unbound = 0;
        let costs: Vec<RuleCost> = rules
            .iter()
            .map(|rule| {
                let list = self.state.binding(&self.account, &rule.name, &rule.list).ok().flatten();
                let cached = list.as_ref().and_then(|l| self.state.cached_list(&self.account, l).ok().flatten());
                let members = cached.as_ref().map(|c| c.members).unwrap_or_else(|| {
                    last.iter()
                        .find(|r| r.rule == rule.name)
                        .map_or(0, |r| (r.members_before + r.added).saturating_sub(r.removed))
                });
                unbound += u64::from(list.is_none());
                RuleCost {
                    bound: list.is_some(),
                    members,
                    cached: cached.is_some_and(|c| c.trusted),
                    own: self.own_estimate(rule, members, contacts),
                }
            })
            .collect();
        let (kind, reads) = cheaper(&costs, contacts, self.page());
        // The directory, and per new list its create and the directory read after it.
        let lookups = 1 + 2 * unbound;
        (kind, contacts.map(|_| reads + lookups))
    }

    /// Shared scan or own reads: whichever costs fewer requests, with the cache in the count.
    pub(super) fn choose_read(&self, slots: &[Slot], live: &[usize]) -> ReadKind {
        let contacts = self.contacts();
        let last = self.state.last_runs(1).unwrap_or_default();
        let costs: Vec<RuleCost> = live
            .iter()
            .map(|&i| {
                let slot = &slots[i];
                let members = slot.listed.unwrap_or_else(|| {
                    last.iter()
                        .find(|r| r.rule == slot.rule.name)
                        .map_or(0, |r| (r.members_before + r.added).saturating_sub(r.removed))
                });
                RuleCost {
                    bound: slot.list.is_some() && !slot.created,
                    members,
                    cached: slot.trusted_cache,
                    own: self.own_estimate(&slot.rule, members, contacts),
                }
            })
            .collect();
        cheaper(&costs, contacts, self.page()).0
    }

    /// Evaluates the candidates of the `live` slots, read the `read` way, into each slot.
    pub(super) async fn read_candidates(
        &self,
        slots: &mut [Slot],
        live: &[usize],
        read: ReadKind,
        shared: &Arc<Meter>,
        today: Date,
    ) {
        // Members are shared with the evaluating threads, then handed back (no copy of big sets).
        let members: Vec<Arc<ContactIdSet>> =
            live.iter().map(|&i| Arc::new(std::mem::take(&mut slots[i].eval.members))).collect();
        let found: Vec<(Vec<usize>, Result<read::Candidates, ReconcileError>)> = match read {
            ReadKind::SharedScan => {
                let targets = live
                    .iter()
                    .zip(&members)
                    .map(|(&i, m)| read::Target {
                        rule: slots[i].rule.clone(),
                        members: m.clone(),
                        cached: slots[i].members_from == MemberSource::Cache,
                        derived: slots[i].rule.derived_filter(today),
                    })
                    .collect();
                let gw = self.gateway.metered(shared.clone());
                let result =
                    read::candidates(&self.cancel, &gw, &self.engine, &ScanQuery::default(), targets, today).await;
                vec![(live.to_vec(), result)]
            }
            ReadKind::OwnRead => {
                let reads = live.iter().zip(&members).map(|(&i, m)| self.own_read(&slots[i], m.clone(), today));
                live.iter().map(|&i| vec![i]).zip(join_all(reads).await).collect()
            }
        };
        for (&i, m) in live.iter().zip(members) {
            slots[i].eval.members = Arc::try_unwrap(m).unwrap_or_else(|shared| (*shared).clone());
        }
        let mut estimates = Vec::new();
        for (indexes, result) in found {
            match result {
                Ok(found) => {
                    estimates.extend(Self::estimates(slots, &indexes, &found, read, today));
                    let parts = found.per_target.into_iter().zip(found.in_filter).zip(found.cached);
                    for (&i, ((part, in_filter), cached)) in indexes.iter().zip(parts) {
                        slots[i].eval.merge(part);
                        slots[i].in_filter = in_filter;
                        slots[i].seen = cached;
                    }
                }
                Err(e) if e.is_interrupted() => {
                    for &i in &indexes {
                        slots[i].error = Some(ReconcileError::Interrupted);
                    }
                }
                Err(e) => {
                    let shared = Arc::new(e);
                    for &i in &indexes {
                        slots[i].error = Some(ReconcileError::Read(shared.clone()));
                    }
                }
            }
        }
        let (state, account) = (self.state.clone(), self.account.clone());
        match tokio::task::spawn_blocking(move || state.set_estimates(&account, &estimates)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "estimates not stored"),
            Err(e) => tracing::warn!(error = %e, "estimates not stored"),
        }
    }

    /// A rule's own read: its FILTER plus `notListIds` (when its list exists).
    async fn own_read(
        &self,
        slot: &Slot,
        members: Arc<ContactIdSet>,
        today: Date,
    ) -> Result<read::Candidates, ReconcileError> {
        let query = ScanQuery {
            filters: slot.rule.own_read_query(today),
            not_list_ids: slot.list.iter().filter(|_| !slot.created).cloned().collect(),
            ..ScanQuery::default()
        };
        let target =
            read::Target { rule: slot.rule.clone(), members, cached: false, derived: slot.rule.derived_filter(today) };
        read::candidates(&self.cancel, &slot.gateway, &self.engine, &query, vec![target], today).await
    }

    /// The counts the next pass plans its reads with, from what this read found.
    fn estimates(
        slots: &[Slot],
        indexes: &[usize],
        found: &read::Candidates,
        read: ReadKind,
        today: Date,
    ) -> Vec<(Estimate, u64)> {
        let mut out = Vec::new();
        match (read, indexes) {
            (ReadKind::SharedScan, _) => out.push((Estimate::Contacts, found.total)),
            // A rule's own unfiltered read of its non-members, plus its members, is everyone.
            (ReadKind::OwnRead, &[i]) if !slots[i].rule.narrowed(today) && !slots[i].created => {
                out.push((Estimate::Contacts, found.total + slots[i].eval.members.len() as u64))
            }
            _ => {}
        }
        for (k, &i) in indexes.iter().enumerate() {
            if slots[i].rule.narrowed(today) {
                out.push((Estimate::Candidates(slots[i].rule.name.clone()), found.in_filter[k]));
            }
        }
        out
    }
}
