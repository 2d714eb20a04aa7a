//! The read plan's cost model (pure): how a pass reads its candidates. One shared scan of every
//! contact that every due rule rides (a list whose cache holds needs no member read: its members
//! are judged on the scan's records), or each rule's own read of `FILTER & notListIds=<its list>`
//! plus its members; whichever the directory's counts and those remembered from the last pass say
//! costs fewer requests. `predict` runs before the pass (for `pass started`), `members` chooses
//! with it once the directory has been read.

use super::recall::Recalled;
use super::{Flow, Job, ReadKind};
use crate::rules::{Date, Rule};

/// What one rule's reading costs, as far as known before the reads.
pub(super) struct RuleCost {
    /// Its list exists: its members are read unless the cache gives them.
    pub bound: bool,
    /// Members, as the directory, the cache or the last run counted them.
    pub members: u64,
    /// The cache may give the members (only a shared scan can judge them).
    pub cached: bool,
    /// The non-members its own read would return; `None` when only a scan can tell.
    pub own: Option<u64>,
}

/// The cheaper read and its requests: the shared scan (plus the members no cache gives) against
/// every rule's own read (plus every list's members).
pub(super) fn cheaper(costs: &[RuleCost], contacts: Option<u64>, page: u64) -> (ReadKind, u64) {
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

/// The non-members `rule`'s own read returns, as last seen; `None` when unfiltered and the
/// account's size is unknown.
pub(super) fn own_estimate(
    rule: &Rule,
    recalled: &Recalled,
    members: u64,
    contacts: Option<u64>,
    today: Date,
) -> Option<u64> {
    if rule.narrowed(today) {
        Some(recalled.own_read.unwrap_or(0))
    } else {
        contacts.map(|n| n.saturating_sub(members))
    }
}

/// Before a pass: the read plan the remembered counts predict and the requests the pass should
/// cost (directory, members, candidates and creates; writes are not known yet). `None` when the
/// account's size is not known yet (the first pass).
pub(super) fn predict(jobs: &[Flow<Job>], contacts: Option<u64>, page: u64, today: Date) -> (ReadKind, Option<u64>) {
    let mut unbound = 0;
    let costs: Vec<RuleCost> = jobs
        .iter()
        .filter_map(|job| job.as_ref().ok())
        .map(|job| {
            let recalled = &job.recalled;
            let members = recalled.members_estimate();
            unbound += u64::from(recalled.binding.is_none());
            RuleCost {
                bound: recalled.binding.is_some(),
                members,
                cached: recalled.cached.as_ref().is_some_and(|c| c.trusted),
                own: own_estimate(&job.rule, recalled, members, contacts, today),
            }
        })
        .collect();
    let (kind, reads) = cheaper(&costs, contacts, page);
    // The directory, and per new list its create and the directory read after it.
    let lookups = 1 + 2 * unbound;
    (kind, contacts.map(|_| reads + lookups))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cost(bound: bool, members: u64, cached: bool, own: Option<u64>) -> RuleCost {
        RuleCost { bound, members, cached, own }
    }

    // The cheaper read wins; a rule that must see everyone forces the scan when the size is unknown;
    // a cached list's members cost nothing on a scan.
    #[test]
    fn the_cheaper_read_wins() {
        let narrow = [cost(true, 500, false, Some(200))];
        assert_eq!(cheaper(&narrow, Some(100_000), 1000), (ReadKind::OwnRead, 2));
        let wide = [cost(true, 500, false, None)];
        assert_eq!(cheaper(&wide, Some(100_000), 1000), (ReadKind::SharedScan, 102));
        assert_eq!(cheaper(&[cost(true, 50, false, None)], None, 1000), (ReadKind::SharedScan, 1));
        let cached = [cost(true, 5_000, true, Some(95_000)), cost(true, 5_000, true, Some(95_000))];
        assert_eq!(cheaper(&cached, Some(100_000), 1000), (ReadKind::SharedScan, 101));
    }
}
