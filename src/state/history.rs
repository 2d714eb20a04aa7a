//! Removal grace and membership history: when each member first failed its rule (so a removal can
//! wait out `REMOVE_AFTER`), and every add and removal segsync applied, with the reason.

use std::collections::HashMap;

use rusqlite::{Connection, params};
use serde::Serialize;

use super::{State, StateError};
use crate::ids::{Account, ContactId, ListId, RuleName};
use crate::outcome::Trigger;

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
                "SELECT contact, since FROM pending WHERE account = ?1 AND rule = ?2 AND rule_hash = ?3",
            )?;
            let rows = stmt.query_map(params![account.as_str(), rule.as_str(), rule_hash], |r| {
                Ok((ContactId::from(r.get::<_, String>(0)?), r.get::<_, String>(1)?))
            })?;
            rows.collect()
        })
    }

    /// Members pending removal, per rule (every account).
    pub fn pending_counts(&self) -> Result<HashMap<String, u64>, StateError> {
        self.with(|c| {
            let mut stmt = c.prepare("SELECT rule, COUNT(*) FROM pending GROUP BY rule")?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64)))?;
            rows.collect()
        })
    }

    /// Every entry of `contact`, newest first.
    pub fn history_of_contact(&self, contact: &str) -> Result<Vec<HistoryEntry>, StateError> {
        let sql = format!("{MOVEMENTS} WHERE h.contact = ?1 ORDER BY r.at DESC, r.id DESC");
        self.with(|c| query(c, &sql, params![contact]))
    }

    /// `rule`'s entries since `since` (RFC 3339), newest first: its movements and its changes.
    pub fn history_of_rule(&self, rule: &RuleName, since: &str) -> Result<Vec<HistoryEntry>, StateError> {
        let sql = format!(
            "SELECT * FROM ({MOVEMENTS} WHERE r.rule = ?1 AND r.at >= ?2
               UNION ALL
             SELECT r.at, r.rule, r.rule_hash, r.list_id, '', 'rule_changed', r.trigger, r.note, r.id
             FROM history_run r WHERE r.rule = ?1 AND r.at >= ?2 AND r.note <> '')
             ORDER BY at DESC, run DESC, action = 'rule_changed', action DESC"
        );
        self.with(|c| query(c, &sql, params![rule.as_str(), since]))
    }

    /// Deletes entries older than `before` (RFC 3339); returns how many runs' worth.
    pub fn prune_history(&self, before: &str) -> Result<usize, StateError> {
        self.with(|c| {
            let tx = c.transaction()?;
            tx.execute("DELETE FROM history WHERE run IN (SELECT id FROM history_run WHERE at < ?1)", params![before])?;
            let runs = tx.execute("DELETE FROM history_run WHERE at < ?1", params![before])?;
            tx.commit()?;
            Ok(runs)
        })
    }
}

/// Replaces `rule`'s pending members with `pending` (contact, since), all under `rule_hash`:
/// members that qualify again, left the list, or were removed drop out, and so do entries made
/// under another version of the rule.
pub(super) fn set_pending_in(
    c: &Connection,
    account: &Account,
    rule: &RuleName,
    rule_hash: &str,
    pending: &[(ContactId, String)],
) -> rusqlite::Result<()> {
    c.execute("DELETE FROM pending WHERE account = ?1 AND rule = ?2", params![account.as_str(), rule.as_str()])?;
    let mut insert =
        c.prepare_cached("INSERT INTO pending (account, rule, rule_hash, contact, since) VALUES (?1, ?2, ?3, ?4, ?5)")?;
    for (contact, since) in pending {
        insert.execute(params![account.as_str(), rule.as_str(), rule_hash, contact.as_str(), since])?;
    }
    Ok(())
}

/// Records one run's movements: the run once (with a rule-change note, if any), then a row per
/// contact (a first sync adds a million contacts).
pub(super) fn record_movements_in(c: &Connection, run: &Movements<'_>) -> rusqlite::Result<()> {
    if run.added.is_empty() && run.removed.is_empty() && run.note.is_none() {
        return Ok(());
    }
    c.execute(
        "INSERT INTO history_run (at, rule, rule_hash, list_id, trigger, note) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            run.at,
            run.rule.as_str(),
            run.rule_hash,
            run.list.as_str(),
            run.trigger.to_string(),
            run.note.as_deref().unwrap_or("")
        ],
    )?;
    let id = c.last_insert_rowid();
    let mut insert =
        c.prepare_cached("INSERT OR REPLACE INTO history (contact, run, action, reason) VALUES (?1, ?2, ?3, ?4)")?;
    for contact in run.added {
        insert.execute(params![contact.as_str(), id, Action::Added.as_str(), ""])?;
    }
    for (contact, reason) in &run.removed {
        insert.execute(params![contact.as_str(), id, Action::Removed.as_str(), reason])?;
    }
    Ok(())
}

/// A contact's movements joined with their run (an add's reason is implied, not stored).
const MOVEMENTS: &str = "SELECT r.at AS at, r.rule, r.rule_hash, r.list_id, h.contact, h.action AS action, r.trigger,
    CASE WHEN h.action = 'added' THEN 'matches returned true' ELSE h.reason END, r.id AS run
    FROM history h JOIN history_run r ON r.id = h.run";

/// One run's applied movements, for the history.
#[derive(Debug)]
pub struct Movements<'a> {
    pub at: &'a str,
    pub rule: &'a RuleName,
    pub rule_hash: &'a str,
    pub list: &'a ListId,
    pub trigger: Trigger,
    /// Set when the rule's file changed since its previous run.
    pub note: Option<String>,
    pub added: &'a [ContactId],
    /// Each removed contact with the facts that made the rule say no.
    pub removed: Vec<(&'a ContactId, &'a str)>,
}

fn query(c: &rusqlite::Connection, sql: &str, params: &[&dyn rusqlite::ToSql]) -> rusqlite::Result<Vec<HistoryEntry>> {
    let mut stmt = c.prepare(sql)?;
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

#[cfg(test)]
impl State {
    pub fn set_pending(
        &self,
        account: &Account,
        rule: &RuleName,
        rule_hash: &str,
        pending: &[(ContactId, String)],
    ) -> Result<(), StateError> {
        self.write(|tx| set_pending_in(tx, account, rule, rule_hash, pending))
    }

    pub fn record_movements(&self, run: &Movements<'_>) -> Result<(), StateError> {
        self.write(|tx| record_movements_in(tx, run))
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
        let ids = |v: &[&str]| v.iter().map(|s| ContactId::from(*s)).collect::<Vec<_>>();
        let (one, two) = (ids(&["cnt-1"]), ids(&["cnt-2"]));
        let days: Vec<String> = (0..=6).map(at).collect();
        let run = |day: usize| Movements {
            at: &days[day],
            rule: &vip,
            rule_hash: "a",
            list: &list,
            trigger: Trigger::Cron,
            note: None,
            added: &[],
            removed: Vec::new(),
        };
        state.record_movements(&Movements { added: &one, ..run(1) }).expect("day 1");
        state
            .record_movements(&Movements { added: &two, note: Some("rule vip changed".into()), ..run(3) })
            .expect("day 3");
        state.record_movements(&Movements { removed: vec![(&one[0], "totalSpent = 10.0")], ..run(5) }).expect("day 5");
        state.record_movements(&run(6)).expect("nothing to record");
        let marco = state.history_of_contact("cnt-1").expect("read");
        assert_eq!(marco.iter().map(|e| e.action).collect::<Vec<_>>(), [Action::Removed, Action::Added]);
        assert_eq!(
            (marco[0].reason.as_str(), marco[1].reason.as_str()),
            ("totalSpent = 10.0", "matches returned true")
        );
        let since_2 = state.history_of_rule(&vip, &at(2)).expect("read");
        assert_eq!(
            since_2.iter().map(|e| (e.action, e.contact.as_str())).collect::<Vec<_>>(),
            [(Action::Removed, "cnt-1"), (Action::Added, "cnt-2"), (Action::RuleChanged, "")]
        );
        assert_eq!(state.prune_history(&at(4)).expect("prune"), 2);
        assert_eq!(state.history_of_rule(&vip, &at(1)).expect("read").len(), 1);
        assert!(state.history_of_contact("cnt-2").expect("read").is_empty());
    }
}
