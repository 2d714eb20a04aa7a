//! Whose state this is. The gateway serves every customer from one URL and the key says whose
//! account it is, so everything the state remembers about lists (bindings, the membership cache,
//! learned paging, removal grace, the read planner's counts) is keyed by an [`Account`] made of
//! the base URL and a fingerprint of the key: HMAC-SHA256 under a random salt kept in this state,
//! never the key and never a plain hash of it. State written under another key is never read for
//! this one: it is set aside (kept, reported by `status`, used again if that key comes back).

use rusqlite::{OptionalExtension, params};
use serde::Serialize;

use super::{State, StateError, now};
use crate::gateway::Credentials;
use crate::ids::Account;

/// The tables whose rows belong to one account (their `account` column holds it).
const ACCOUNT_TABLES: [&str; 5] = ["binding", "cached_list", "pending", "paging", "estimate"];

/// Another account's state found beside this one's, and not used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SetAside {
    /// The account's base URL.
    pub base_url: String,
    /// The first hex digits of its key's fingerprint (`None`: written before segsync kept one).
    pub key_fingerprint: Option<String>,
    /// When it was first found not to be the running account's.
    pub noticed_at: String,
    pub bindings: u64,
    pub cached_lists: u64,
    pub pending_removals: u64,
}

impl State {
    /// The account `credentials` name at `base_url`, as this state keys it.
    pub fn account(&self, base_url: &str, credentials: &Credentials) -> Result<Account, StateError> {
        let salt = self.with(|c| {
            let fresh: [u8; 32] = rand::random();
            c.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('account_salt', ?1)",
                params![fresh.iter().map(|b| format!("{b:02x}")).collect::<String>()],
            )?;
            c.query_row("SELECT value FROM meta WHERE key = 'account_salt'", [], |r| r.get::<_, String>(0))
        })?;
        Ok(Account::keyed(base_url, &credentials.fingerprint(salt.as_bytes())))
    }

    /// Sets aside every other account's state at `account`'s base URL (state written under
    /// another key, or before segsync kept a key's fingerprint): none of it is read for
    /// `account`. Returns what was newly set aside, for the caller's warning; `account`'s own
    /// state, set aside earlier, is taken back.
    pub fn set_aside_others(&self, account: &Account) -> Result<Vec<SetAside>, StateError> {
        let base = account.base_url().to_owned();
        let noticed = now();
        self.with(|c| {
            let tx = c.transaction()?;
            tx.execute("DELETE FROM set_aside WHERE account = ?1", params![account.as_str()])?;
            let union = ACCOUNT_TABLES.map(|t| format!("SELECT account FROM {t}")).join(" UNION ");
            let others: Vec<String> = {
                let mut stmt = tx.prepare(&format!(
                    "SELECT account FROM ({union}) WHERE account <> ?1 AND (account = ?2 OR substr(account, 1, length(?3)) = ?3)
                     AND account NOT IN (SELECT account FROM set_aside)"
                ))?;
                let rows = stmt
                    .query_map(params![account.as_str(), base, format!("{base}{}", Account::KEY_MARK)], |r| {
                        r.get::<_, String>(0)
                    })?;
                rows.collect::<rusqlite::Result<_>>()?
            };
            let mut fresh = Vec::new();
            for other in others {
                tx.execute(
                    "INSERT INTO set_aside (account, base_url, noticed_at, by_account) VALUES (?1, ?2, ?3, ?4)",
                    params![other, base, noticed, account.as_str()],
                )?;
                fresh.push(described(&tx, &other, base.clone(), noticed.clone())?);
            }
            tx.commit()?;
            Ok(fresh)
        })
    }

    /// Every account's state set aside in this state file, with what it holds (for `status`).
    pub fn set_aside(&self) -> Result<Vec<SetAside>, StateError> {
        self.with(|c| {
            let accounts: Vec<(String, String, String)> = {
                let mut stmt = c.prepare("SELECT account, base_url, noticed_at FROM set_aside ORDER BY noticed_at")?;
                let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
                rows.collect::<rusqlite::Result<_>>()?
            };
            accounts
                .into_iter()
                .map(|(account, base_url, noticed_at)| described(c, &account, base_url, noticed_at))
                .collect()
        })
    }

    /// The salt of this state's key fingerprints, if one was made (tests look at it).
    pub fn account_salt(&self) -> Result<Option<String>, StateError> {
        self.with(|c| {
            c.query_row("SELECT value FROM meta WHERE key = 'account_salt'", [], |r| r.get::<_, String>(0)).optional()
        })
    }
}

/// What `account`'s set-aside state holds.
fn described(
    c: &rusqlite::Connection,
    account: &str,
    base_url: String,
    noticed_at: String,
) -> rusqlite::Result<SetAside> {
    let count = |table: &str| -> rusqlite::Result<u64> {
        c.query_row(&format!("SELECT COUNT(*) FROM {table} WHERE account = ?1"), params![account], |r| {
            r.get::<_, i64>(0)
        })
        .map(|n| n as u64)
    };
    Ok(SetAside {
        key_fingerprint: account.split_once(Account::KEY_MARK).map(|(_, k)| k.chars().take(8).collect()),
        base_url,
        noticed_at,
        bindings: count("binding")?,
        cached_lists: count("cached_list")?,
        pending_removals: count("pending")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::Secret;
    use crate::ids::{ListId, RuleName};

    // Two keys at one URL are two accounts; the fingerprint is keyed by this state's salt, so it
    // is neither the key nor the key's plain hash, and another state file fingerprints apart.
    #[test]
    fn keys_name_accounts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = State::open(&dir.path().join("a.db")).expect("open");
        let url = "https://gw.example/api";
        let a = state.account(url, &Credentials::ApiKey(Secret::new("key-of-account-a"))).expect("a");
        let again = state.account(url, &Credentials::ApiKey(Secret::new("key-of-account-a"))).expect("a again");
        let b = state.account(url, &Credentials::ApiKey(Secret::new("key-of-account-b"))).expect("b");
        assert_eq!(a, again);
        assert_ne!(a, b);
        assert_eq!(a.base_url(), url);
        assert!(!a.as_str().contains("key-of-account-a"), "{a}");
        let other = State::open(&dir.path().join("b.db")).expect("open");
        let elsewhere = other.account(url, &Credentials::ApiKey(Secret::new("key-of-account-a"))).expect("a");
        assert_ne!(a, elsewhere, "a salt per state file");
    }

    // Another key's bindings, cache and grace are set aside (once, with what they hold), never
    // read for this key, and taken back when that key returns.
    #[test]
    fn other_accounts_are_set_aside() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = State::open(&dir.path().join("s.db")).expect("open");
        let url = "https://gw.example/api";
        let a = state.account(url, &Credentials::ApiKey(Secret::new("key-of-account-a"))).expect("a");
        let b = state.account(url, &Credentials::ApiKey(Secret::new("key-of-account-b"))).expect("b");
        let legacy = Account::remote(url);
        let elsewhere = Account::remote("https://other.example/api");
        let vip = RuleName::from("vip");
        for account in [&a, &legacy, &elsewhere] {
            state.bind(account, &vip, "VIP", &ListId::from("list-1")).expect("bind");
        }
        let found = state.set_aside_others(&b).expect("set aside");
        assert_eq!(found.len(), 2, "a and the unkeyed state, not another URL's: {found:?}");
        assert!(found.iter().all(|s| s.bindings == 1 && s.base_url == url));
        assert!(found.iter().any(|s| s.key_fingerprint.is_none()));
        assert_eq!(state.binding(&b, &vip, "VIP").expect("read"), None);
        assert!(state.set_aside_others(&b).expect("again").is_empty(), "warned once");
        assert_eq!(state.set_aside().expect("list").len(), 2);
        state.bind(&b, &vip, "VIP", &ListId::from("list-9")).expect("bind");
        state.set_aside_others(&a).expect("a returns");
        assert_eq!(state.binding(&a, &vip, "VIP").expect("read"), Some(ListId::from("list-1")));
        assert_eq!(state.set_aside().expect("list").len(), 2, "the legacy state and b's");
    }
}
