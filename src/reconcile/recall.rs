//! Stage 1, `recall`: what the state remembers of each rule at the start of a pass, read in one
//! go on a blocking thread (the async workers never wait on SQLite): its binding, its list's cache
//! record, its last run, its own read's last size, when each pending member first failed, and the
//! account's size and learned paging.

use std::collections::HashMap;
use std::sync::Arc;

use super::Reconciler;
use crate::ids::{ContactId, ListId};
use crate::rules::Rule;
use crate::state::{CachedList, Estimate, RunRecord, State, StateError};

/// What the state remembers of one rule.
#[derive(Debug, Default)]
pub(super) struct Recalled {
    /// The list its `LIST` name is bound to.
    pub binding: Option<ListId>,
    /// The list it was last bound to under another `LIST` name (to log the rename).
    pub other_binding: Option<(String, ListId)>,
    /// The cache's record of the bound list.
    pub cached: Option<CachedList>,
    /// Its last run (members estimate, and the rule hash a history note compares against).
    pub last_run: Option<RunRecord>,
    /// The non-members its own read returned last time.
    pub own_read: Option<u64>,
    /// When each member pending removal first failed, under this version of the rule.
    pub pending_since: HashMap<ContactId, String>,
}

impl Recalled {
    /// The members the list had at the end of the last run, as far as known.
    pub fn members_estimate(&self) -> u64 {
        self.cached.as_ref().map(|c| c.members).unwrap_or_else(|| {
            self.last_run.as_ref().map_or(0, |r| (r.members_before + r.added).saturating_sub(r.removed))
        })
    }
}

/// What the state remembers for a pass.
pub(super) struct Memory {
    /// Every contact of the account, as the last complete read counted them.
    pub contacts: Option<u64>,
    /// Per rule, in the pass's order.
    pub rules: Vec<Result<Recalled, StateError>>,
}

impl Reconciler {
    /// Reads what the pass needs from the state, and tells the gateway the paging earlier runs
    /// learned (an expectation for planning; reads still probe).
    pub(super) async fn recall(&self, rules: &[Arc<Rule>]) -> Memory {
        let (state, account, default_grace) = (self.state.clone(), self.account.clone(), self.default_remove_after);
        let rules_for_work = rules.to_vec();
        let read = tokio::task::spawn_blocking(move || {
            let paging = state.paging(&account);
            let contacts = state.estimate(&account, &Estimate::Contacts);
            let last = state.last_runs(1);
            let rules = rules_for_work
                .iter()
                .map(|rule| recall_rule(&state, &account, rule, rule.remove_after.or(default_grace).is_some(), &last))
                .collect();
            (paging, contacts, rules)
        })
        .await;
        let (paging, contacts, rules) = match read {
            Ok(read) => read,
            Err(e) => {
                let failed = |_| Err(StateError::Thread(e.to_string()));
                (Ok(Vec::new()), Ok(None), rules.iter().map(failed).collect())
            }
        };
        match paging {
            Ok(learned) => learned.into_iter().for_each(|(resource, paging)| self.gateway.remember(resource, paging)),
            Err(e) => tracing::debug!(error = %e, "no remembered paging"),
        }
        Memory { contacts: contacts.unwrap_or(None), rules }
    }
}

fn recall_rule(
    state: &State,
    account: &crate::ids::Account,
    rule: &Rule,
    graced: bool,
    last: &Result<Vec<RunRecord>, StateError>,
) -> Result<Recalled, StateError> {
    let binding = state.binding(account, &rule.name, &rule.list)?;
    let other_binding = match binding {
        Some(_) => None,
        None => state.other_binding(account, &rule.name, &rule.list)?,
    };
    let cached = match &binding {
        Some(list) => state.cached_list(account, list)?,
        None => None,
    };
    let pending_since = if graced { state.pending_since(account, &rule.name, &rule.hash)? } else { HashMap::new() };
    Ok(Recalled {
        binding,
        other_binding,
        cached,
        last_run: last.as_ref().ok().and_then(|runs| runs.iter().find(|r| r.rule == rule.name).cloned()),
        own_read: state.estimate(account, &Estimate::Candidates(rule.name.clone()))?,
        pending_since,
    })
}
