//! The read plan: how a pass reads its candidates. One shared scan of every contact that every
//! due rule rides, or each rule's own read of `FILTER & notListIds=<its list>`; whichever the counts
//! remembered from the last pass say costs fewer requests. Members are always read (`bind`).

use std::collections::HashSet;
use std::sync::Arc;

use futures_util::future::join_all;

use super::{ReadKind, ReconcileError, Reconciler, Slot, read};
use crate::gateway::{Meter, ScanQuery};
use crate::ids::ContactId;
use crate::rules::{Date, Rule};
use crate::state::Estimate;

impl Reconciler {
    /// Before a pass: the read plan the remembered counts predict and the requests the pass should
    /// cost (members, candidates and list lookups; writes are not known yet). `None` when the
    /// account's size is not known yet (the first pass).
    pub(super) fn predict(&self, rules: &[Arc<Rule>]) -> (ReadKind, Option<u64>) {
        let page = u64::from(self.gateway.page_size());
        let pages = |n: u64| n.div_ceil(page).max(1);
        let Some(contacts) = self.state.estimate(&self.account, &Estimate::Contacts).ok().flatten() else {
            return (ReadKind::SharedScan, None);
        };
        let last = self.state.last_runs(1).unwrap_or_default();
        let (mut member_pages, mut unbound, mut own) = (0, 0, 0);
        for rule in rules {
            let members = last
                .iter()
                .find(|r| r.rule == rule.name)
                .map_or(0, |r| (r.members_before + r.added).saturating_sub(r.removed));
            match self.state.binding(&self.account, &rule.name, &rule.list) {
                Ok(Some(_)) => member_pages += pages(members),
                _ => unbound += 1,
            }
            own += if rule.filter.is_empty() {
                pages(contacts.saturating_sub(members))
            } else {
                let key = Estimate::Candidates(rule.name.clone());
                pages(self.state.estimate(&self.account, &key).ok().flatten().unwrap_or(0))
            };
        }
        // A shared scan ends on an empty page when the count is a multiple of the page.
        let scan = pages(contacts) + u64::from(contacts % page == 0);
        let (kind, candidates) = if own > scan { (ReadKind::SharedScan, scan) } else { (ReadKind::OwnRead, own) };
        let lookups = u64::from(unbound >= 2) + 2 * unbound;
        (kind, Some(member_pages + candidates + lookups))
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
        let members: Vec<Arc<HashSet<ContactId>>> =
            live.iter().map(|&i| Arc::new(std::mem::take(&mut slots[i].eval.members))).collect();
        let found: Vec<(Vec<usize>, Result<read::Candidates, ReconcileError>)> = match read {
            ReadKind::SharedScan => {
                let targets = live
                    .iter()
                    .zip(&members)
                    .map(|(&i, m)| read::Target { rule: slots[i].rule.clone(), members: m.clone() })
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
                    estimates.extend(Self::estimates(slots, &indexes, &found, read));
                    for ((&i, part), in_filter) in indexes.iter().zip(found.per_target).zip(found.in_filter) {
                        slots[i].eval.merge(part);
                        slots[i].in_filter = in_filter;
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

    /// Shared scan or own reads: whichever the last-seen counts say costs fewer requests.
    pub(super) fn choose_read(&self, slots: &[Slot], live: &[usize]) -> ReadKind {
        let page = u64::from(self.gateway.page_size());
        let pages = |n: u64| n.div_ceil(page).max(1);
        let contacts = self.state.estimate(&self.account, &Estimate::Contacts).ok().flatten();
        let mut own_total = 0;
        for &i in live {
            let slot = &slots[i];
            let own = if slot.rule.filter.is_empty() {
                match contacts {
                    Some(n) => pages(n.saturating_sub(slot.eval.members.len() as u64)),
                    // Unknown size and a rule that must see everyone: only a scan will tell.
                    None => return ReadKind::SharedScan,
                }
            } else {
                let key = Estimate::Candidates(slot.rule.name.clone());
                pages(self.state.estimate(&self.account, &key).ok().flatten().unwrap_or(0))
            };
            own_total += own;
        }
        match contacts {
            Some(n) if own_total > pages(n) => ReadKind::SharedScan,
            _ => ReadKind::OwnRead,
        }
    }

    /// A rule's own read: its FILTER plus `notListIds` (when its list exists).
    async fn own_read(
        &self,
        slot: &Slot,
        members: Arc<HashSet<ContactId>>,
        today: Date,
    ) -> Result<read::Candidates, ReconcileError> {
        let query = ScanQuery {
            filters: slot.rule.filter_query(),
            not_list_ids: slot.list.iter().filter(|_| !slot.created).cloned().collect(),
            ..ScanQuery::default()
        };
        let target = read::Target { rule: slot.rule.clone(), members };
        read::candidates(&self.cancel, &slot.gateway, &self.engine, &query, vec![target], today).await
    }

    /// The counts the next pass plans its reads with, from what this read found.
    fn estimates(slots: &[Slot], indexes: &[usize], found: &read::Candidates, read: ReadKind) -> Vec<(Estimate, u64)> {
        let mut out = Vec::new();
        match (read, indexes) {
            (ReadKind::SharedScan, _) => out.push((Estimate::Contacts, found.total)),
            // A rule's own unfiltered read of its non-members, plus its members, is everyone.
            (ReadKind::OwnRead, &[i]) if slots[i].rule.filter.is_empty() && !slots[i].created => {
                out.push((Estimate::Contacts, found.total + slots[i].eval.members.len() as u64))
            }
            _ => {}
        }
        for (k, &i) in indexes.iter().enumerate() {
            if !slots[i].rule.filter.is_empty() {
                out.push((Estimate::Candidates(slots[i].rule.name.clone()), found.in_filter[k]));
            }
        }
        out
    }
}
