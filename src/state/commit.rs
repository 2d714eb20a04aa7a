//! One rule's run, written at once: its binding, removal grace, history, cache, the paging and
//! counts it learned, and the run record, in one transaction. A crash leaves either all of a run
//! or none of it, and the pass writes nothing to the state before this point.

use super::history::{record_movements_in, set_pending_in};
use super::members::{forget_list_in, set_paging_in, store_members_in, update_members_in};
use super::{Estimate, Movements, RunRecord, State, StateError, bind_in, record_run_in, set_estimates_in};
use crate::gateway::{Paging, Resource};
use crate::ids::{Account, ContactId, ContactIdSet, ListId, RuleName};

use super::CacheWrites;

/// Everything one rule's run writes to the state.
pub struct Commit<'a> {
    pub account: &'a Account,
    pub rule: &'a RuleName,
    /// The rule's `LIST` name, the binding below is for.
    pub list_name: &'a str,
    pub binding: BindingWrite<'a>,
    /// Members within their removal grace (with when each first failed), under the rule's hash;
    /// `None` leaves the pending members as they are (a rule without grace has none).
    pub pending: Option<(&'a str, &'a [(ContactId, String)])>,
    pub movements: Option<Movements<'a>>,
    pub cache: Option<CacheWrite<'a>>,
    pub paging: &'a [(Resource, Paging)],
    pub estimates: &'a [(Estimate, u64)],
    pub run: &'a RunRecord,
}

/// How the run's binding changed.
#[derive(Debug, Default, Clone, Copy)]
pub struct BindingWrite<'a> {
    /// A remembered id the directory no longer shows under the rule's name: its binding and cache
    /// are forgotten (before `bind` is stored).
    pub forget: Option<&'a ListId>,
    /// The list the run bound.
    pub bind: Option<&'a ListId>,
}

/// What the run tells the membership cache of its list.
#[derive(Debug, Clone, Copy)]
pub struct CacheWrite<'a> {
    pub list: &'a ListId,
    /// A complete member read made this run: it replaces the cache before the writes apply.
    /// `None`: the cache's own members take the writes.
    pub read: Option<&'a ContactIdSet>,
    pub writes: CacheWrites<'a>,
}

impl State {
    /// Writes one rule's run in one transaction. Blocking: call it off the async workers.
    pub fn commit(&self, c: &Commit<'_>) -> Result<(), StateError> {
        self.write(|tx| {
            crate::fault::hold_commit(c.rule.as_str());
            if let Some(old) = c.binding.forget {
                forget_list_in(tx, c.account, c.rule, c.list_name, old)?;
            }
            if let Some(list) = c.binding.bind {
                bind_in(tx, c.account, c.rule, c.list_name, list)?;
            }
            if let Some((hash, pending)) = c.pending {
                set_pending_in(tx, c.account, c.rule, hash, pending)?;
            }
            if let Some(movements) = &c.movements {
                record_movements_in(tx, movements)?;
            }
            if let Some(cache) = &c.cache {
                match cache.read {
                    Some(members) => store_members_in(tx, c.account, cache.list, members, cache.writes)?,
                    None => update_members_in(tx, c.account, cache.list, cache.writes)?,
                }
            }
            set_paging_in(tx, c.account, c.paging)?;
            set_estimates_in(tx, c.account, c.estimates)?;
            record_run_in(tx, c.run)
        })
    }
}
