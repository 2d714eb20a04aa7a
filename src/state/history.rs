//! Removal grace and membership history: when each member first failed its rule (so a removal can
//! wait out `REMOVE_AFTER`), and every add and removal segsync applied, with the reason.

use std::collections::HashMap;

use rusqlite::params;
use serde::Serialize;

use super::{State, StateError};
use crate::ids::{Account, ContactId, ListId, RuleName};
use crate::run::Trigger;

/// What a history entry records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Added,
    Removed,
    /// The rule's file changed (its content hash).
    RuleChanged,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Added => "added",
            Self::Removed => "removed",
            Self::RuleChanged => "rule_changed",
        }
    }

    fn parse(text: &str) -> Self {
        match text {
            "added" => Self::Added,
            "removed" => Self::Removed,
            _ => Self::RuleChanged,
        }
    }
}

/// One membership movement (or rule change), as stored and as `segsync history` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HistoryEntry {
    /// RFC 3339 UTC.
    pub at: String,
    pub rule: RuleName,
    pub rule_hash: String,
    pub list_id: ListId,
    /// Empty for a rule change.
    pub contact: String,
    pub action: Action,
    pub trigger: String,
    /// For a removal, the facts the rule read that made it false; for a rule change, what changed.
    pub reason: String,
}

impl State {
    /// When each pending member of `rule` first failed it, under this `rule_hash` only.
    pub fn pending_since(
        &self,
        account: &Account,
        rule: &RuleName,
        rule_hash: &str,
    ) -> Result<HashMap<ContactId, String>, StateError> {
        self.with(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT contact, since FROM pending WHERE endpoint = ?1 AND rule = ?2 AND rule_hash = ?3",
            )?;
            let rows = stmt.query_map(params![account.as_str(), rule.as_str(), rule_hash], |r| {
                Ok((ContactId::from(r.get::<_, String>(0)?), r.get::<_, String>(1)?))
            })?;
            rows.collect()
        })
    }

    /// Replaces `rule`'s pending members with `pending` (contact, since), all under `rule_hash`:
    /// members that qualify again, left the list, or were removed drop out, and so do entries
    /// made under another version of the rule.
    pub fn set_pending(
        &self,
        account: &Account,
        rule: &RuleName,
        rule_hash: &str,
        pending: &[(ContactId, String)],
    ) -> Result<(), StateError> {
        self.with(|c| {
            let tx = c.transaction()?;
            tx.execute(
                "DELETE FROM pending WHERE endpoint = ?1 AND rule = ?2",
                params![account.as_str(), rule.as_str()],
            )?;
            {
                let mut insert = tx.prepare_cached(
                    "INSERT INTO pending (endpoint, rule, rule_hash, contact, since) VALUES (?1, ?2, ?3, ?4, ?5)",
                )?;
                for (contact, since) in pending {
                    insert.execute(params![account.as_str(), rule.as_str(), rule_hash, contact.as_str(), since])?;
                }
            }
            tx.commit()
        })
    }

    /// Stores history entries in one transaction.
    pub fn record_history(&self, entries: &[HistoryEntry]) -> Result<(), StateError> {
        if entries.is_empty() {
            return Ok(());
        }
        self.with(|c| {
            let tx = c.transaction()?;
            {
                let mut insert = tx.prepare_cached(
                    "INSERT INTO history (at, rule, rule_hash, list_id, contact, action, trigger, reason)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                )?;
                for e in entries {
                    insert.execute(params![
                        e.at,
                        e.rule.as_str(),
                        e.rule_hash,
                        e.list_id.as_str(),
                        e.contact,
                        e.action.as_str(),
                        e.trigger,
                        e.reason
                    ])?;
                }
            }
            tx.commit()
        })
    }

    /// Every entry of `contact`, newest first.
    pub fn history_of_contact(&self, contact: &str) -> Result<Vec<HistoryEntry>, StateError> {
        self.with(|c| query(c, "contact = ?1", params![contact]))
    }

    /// `rule`'s entries since `since` (RFC 3339), newest first: its movements and its changes.
    pub fn history_of_rule(&self, rule: &RuleName, since: &str) -> Result<Vec<HistoryEntry>, StateError> {
        self.with(|c| query(c, "rule = ?1 AND at >= ?2", params![rule.as_str(), since]))
    }

    /// Deletes entries older than `before` (RFC 3339); returns how many.
    pub fn prune_history(&self, before: &str) -> Result<usize, StateError> {
        self.with(|c| c.execute("DELETE FROM history WHERE at < ?1", params![before]))
    }
}

fn query(
    c: &rusqlite::Connection,
    filter: &str,
    params: &[&dyn rusqlite::ToSql],
) -> rusqlite::Result<Vec<HistoryEntry>> {
    let mut stmt = c.prepare(&format!(
        "SELECT at, rule, rule_hash, list_id, contact, action, trigger, reason FROM history WHERE {filter}
         ORDER BY at DESC, id DESC"
    ))?;
    let rows = stmt.query_map(params, |r| {
        Ok(HistoryEntry {
            at: r.get(0)?,
            rule: RuleName::from(r.get::<_, String>(1)?),
            rule_hash: r.get(2)?,
            list_id: ListId::from(r.get::<_, String>(3)?),
            contact: r.get(4)?,
            action: Action::parse(&r.get::<_, String>(5)?),
            trigger: r.get(6)?,
            reason: r.get(7)?,
        })
    })?;
    rows.collect()
}

/// A history entry for `trigger`'s run of `rule` at `at`.
pub fn entry(
    at: &str,
    (rule, rule_hash): (&RuleName, &str),
    list: &ListId,
    trigger: Trigger,
    (contact, action, reason): (&str, Action, String),
) -> HistoryEntry {
    HistoryEntry {
        at: at.to_owned(),
        rule: rule.clone(),
        rule_hash: rule_hash.to_owned(),
        list_id: list.clone(),
        contact: contact.to_owned(),
        action,
        trigger: trigger.to_string(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Pending entries are per rule version; history reads newest first and prunes by age.
    #[test]
    fn pending_and_history_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = State::open(&dir.path().join("segsync.db")).expect("open");
        let (account, vip) = (Account::remote("https://e.example/api"), RuleName::from("vip"));
        let pending = [(ContactId::from("cnt-1"), "2026-11-01T00:00:00.000Z".to_owned())];
        state.set_pending(&account, &vip, "hash-a", &pending).expect("pending");
        assert_eq!(state.pending_since(&account, &vip, "hash-a").expect("read").len(), 1);
        assert!(state.pending_since(&account, &vip, "hash-b").expect("read").is_empty(), "another version");
        state.set_pending(&account, &vip, "hash-b", &[]).expect("cleared");
        assert!(state.pending_since(&account, &vip, "hash-a").expect("read").is_empty());

        let list = ListId::from("list-1");
        let at = |day: u32| format!("2026-11-{day:02}T10:00:00.000Z");
        state
            .record_history(&[
                entry(&at(1), (&vip, "a"), &list, Trigger::Cron, ("cnt-1", Action::Added, String::new())),
                entry(&at(5), (&vip, "a"), &list, Trigger::Cron, ("cnt-1", Action::Removed, "spent = 10.0".into())),
                entry(&at(3), (&vip, "a"), &list, Trigger::Cron, ("cnt-2", Action::Added, String::new())),
            ])
            .expect("history");
        let marco = state.history_of_contact("cnt-1").expect("read");
        assert_eq!(marco.iter().map(|e| e.action).collect::<Vec<_>>(), [Action::Removed, Action::Added]);
        assert_eq!(marco[0].reason, "spent = 10.0");
        assert_eq!(state.history_of_rule(&vip, &at(2)).expect("read").len(), 2);
        assert_eq!(state.prune_history(&at(4)).expect("prune"), 2);
        assert_eq!(state.history_of_rule(&vip, &at(1)).expect("read").len(), 1);
    }
}
