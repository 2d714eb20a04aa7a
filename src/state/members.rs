//! The membership cache: each bound list's members as the last complete member read saw them,
//! plus every confirmed write since, so a pass need not read members it already knows. Contact
//! ids only, never contact fields. And the paging each gateway resource taught the client.

use rusqlite::{Connection, OptionalExtension, params};

use super::{State, StateError, now};
use crate::gateway::{Pagination, Paging, Resource};
use crate::ids::{Account, ContactId, ContactIdSet, ListId, RuleName};

/// What the cache knows of one list, without its members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedList {
    /// When the last complete member read finished (RFC 3339 UTC).
    pub verified_at: String,
    /// False after a write the gateway did not confirm, or whose answer disagreed with the cache.
    pub trusted: bool,
    /// Members the cache holds.
    pub members: u64,
}

/// How a rule's writes changed its list, for the cache.
#[derive(Debug, Clone, Copy)]
pub struct CacheWrites<'a> {
    pub added: &'a [ContactId],
    pub removed: &'a [ContactId],
    /// Every write confirmed, and the list's count the last write answered agrees with the cache.
    pub confirmed: bool,
}

impl State {
    /// The cache's record of `list`, if it has one.
    pub fn cached_list(&self, account: &Account, list: &ListId) -> Result<Option<CachedList>, StateError> {
        self.with(|c| {
            c.query_row(
                "SELECT verified_at, trusted, members FROM cached_list WHERE account = ?1 AND list_id = ?2",
                params![account.as_str(), list.as_str()],
                |r| Ok(CachedList { verified_at: r.get(0)?, trusted: r.get(1)?, members: r.get::<_, i64>(2)? as u64 }),
            )
            .optional()
        })
    }

    /// The cached members of `list` (empty when it has none).
    pub fn cached_members(&self, account: &Account, list: &ListId) -> Result<ContactIdSet, StateError> {
        self.with(|c| {
            // Sized up front: a million ids loaded by doubling would hold two copies at the end.
            // The count is the one every cache write keeps (`apply_in`); the bytes follow from the
            // first id's length (`reserve_like`): ids of an account are about one length.
            let count: i64 = c
                .query_row(
                    "SELECT members FROM cached_list WHERE account = ?1 AND list_id = ?2",
                    params![account.as_str(), list.as_str()],
                    |r| r.get(0),
                )
                .optional()?
                .unwrap_or(0);
            // In the primary key's order: ascending ids go in without a hash table, which the
            // pass builds only if it looks one up outside its members table.
            let mut stmt = c.prepare_cached(
                "SELECT m.contact FROM cached_member m JOIN cached_list l ON l.id = m.list
                 WHERE l.account = ?1 AND l.list_id = ?2 ORDER BY m.contact",
            )?;
            let mut rows = stmt.query(params![account.as_str(), list.as_str()])?;
            let mut left = count.max(0) as usize;
            let mut set = ContactIdSet::with_capacity_ascending(left, 0);
            while let Some(row) = rows.next()? {
                let id = row.get_ref(0)?.as_str()?;
                set.reserve_like(id.len(), left);
                set.push_ascending(id);
                left = left.saturating_sub(1);
            }
            Ok(set)
        })
    }

    /// Distrusts the cached members of every list bound to `rules` (any account), so the next
    /// pass over them reads their members (`sync --full`).
    pub fn distrust_cache(&self, rules: &[RuleName]) -> Result<(), StateError> {
        self.with(|c| {
            for rule in rules {
                c.execute(
                    "UPDATE cached_list SET trusted = 0 WHERE (account, list_id) IN
                        (SELECT account, list_id FROM binding WHERE rule = ?1)",
                    params![rule.as_str()],
                )?;
            }
            Ok(())
        })
    }

    /// The paging each resource of `account` was last seen to take.
    pub fn paging(&self, account: &Account) -> Result<Vec<(Resource, Paging)>, StateError> {
        self.with(|c| {
            let mut stmt = c.prepare("SELECT api, page_size, pagination FROM paging WHERE account = ?1")?;
            let rows = stmt.query_map(params![account.as_str()], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, String>(2)?))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (api, size, pagination) = row?;
                if let (Some(resource), Some(pagination)) = (Resource::parse(&api), Pagination::parse(&pagination)) {
                    out.push((resource, Paging { page_size: size.clamp(1, i64::from(u32::MAX)) as u32, pagination }));
                }
            }
            Ok(out)
        })
    }
}

/// Forgets `rule`'s binding of `list_name` to `list` and the cache of `list`: the directory no
/// longer shows that id under that name.
pub(super) fn forget_list_in(
    c: &Connection,
    account: &Account,
    rule: &RuleName,
    list_name: &str,
    list: &ListId,
) -> rusqlite::Result<()> {
    c.execute(
        "DELETE FROM binding WHERE account = ?1 AND rule = ?2 AND list_name = ?3 AND list_id = ?4",
        params![account.as_str(), rule.as_str(), list_name, list.as_str()],
    )?;
    c.execute(
        "DELETE FROM cached_member WHERE list IN (SELECT id FROM cached_list WHERE account = ?1 AND list_id = ?2)",
        params![account.as_str(), list.as_str()],
    )?;
    c.execute("DELETE FROM cached_list WHERE account = ?1 AND list_id = ?2", params![account.as_str(), list.as_str()])
        .map(drop)
}

/// Replaces `list`'s members with a complete member read (`members`), then applies the writes
/// made since; the list counts as verified now.
pub(super) fn store_members_in(
    c: &Connection,
    account: &Account,
    list: &ListId,
    members: &ContactIdSet,
    writes: CacheWrites<'_>,
) -> rusqlite::Result<()> {
    c.execute(
        "INSERT INTO cached_list (account, list_id, verified_at, trusted, members) VALUES (?1, ?2, ?3, 1, 0)
         ON CONFLICT (account, list_id) DO UPDATE SET verified_at = excluded.verified_at, trusted = 1",
        params![account.as_str(), list.as_str(), now()],
    )?;
    let key: i64 = c.query_row(
        "SELECT id FROM cached_list WHERE account = ?1 AND list_id = ?2",
        params![account.as_str(), list.as_str()],
        |r| r.get(0),
    )?;
    c.execute("DELETE FROM cached_member WHERE list = ?1", params![key])?;
    {
        let mut insert = c.prepare_cached("INSERT OR IGNORE INTO cached_member (list, contact) VALUES (?1, ?2)")?;
        for id in members.iter() {
            insert.execute(params![key, id])?;
        }
    }
    apply_in(c, key, writes)
}

/// Applies a rule's writes to the cached members of `list` (if it is cached).
pub(super) fn update_members_in(
    c: &Connection,
    account: &Account,
    list: &ListId,
    writes: CacheWrites<'_>,
) -> rusqlite::Result<()> {
    let key: Option<i64> = c
        .query_row(
            "SELECT id FROM cached_list WHERE account = ?1 AND list_id = ?2",
            params![account.as_str(), list.as_str()],
            |r| r.get(0),
        )
        .optional()?;
    match key {
        Some(key) => apply_in(c, key, writes),
        None => Ok(()),
    }
}

/// Stores the paging each resource of `account` answered to.
pub(super) fn set_paging_in(c: &Connection, account: &Account, paging: &[(Resource, Paging)]) -> rusqlite::Result<()> {
    for (resource, p) in paging {
        c.execute(
            "INSERT INTO paging (account, api, page_size, pagination) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (account, api) DO UPDATE SET page_size = excluded.page_size,
             pagination = excluded.pagination",
            params![account.as_str(), resource.as_str(), i64::from(p.page_size), p.pagination.as_str()],
        )?;
    }
    Ok(())
}

/// Adds and removes the written ids, recounts, and keeps the trust only if the writes were confirmed.
fn apply_in(tx: &Connection, key: i64, applied: CacheWrites<'_>) -> rusqlite::Result<()> {
    {
        let mut insert = tx.prepare_cached("INSERT OR IGNORE INTO cached_member (list, contact) VALUES (?1, ?2)")?;
        for id in applied.added {
            insert.execute(params![key, id.as_str()])?;
        }
        let mut delete = tx.prepare_cached("DELETE FROM cached_member WHERE list = ?1 AND contact = ?2")?;
        for id in applied.removed {
            delete.execute(params![key, id.as_str()])?;
        }
    }
    tx.execute(
        "UPDATE cached_list SET members = (SELECT COUNT(*) FROM cached_member WHERE list = ?1),
         trusted = trusted AND ?2 WHERE id = ?1",
        params![key, applied.confirmed],
    )?;
    Ok(())
}

#[cfg(test)]
impl State {
    pub fn store_members(
        &self,
        account: &Account,
        list: &ListId,
        members: &ContactIdSet,
        writes: CacheWrites<'_>,
    ) -> Result<(), StateError> {
        self.write(|tx| store_members_in(tx, account, list, members, writes))
    }

    pub fn update_members(&self, account: &Account, list: &ListId, writes: CacheWrites<'_>) -> Result<(), StateError> {
        self.write(|tx| update_members_in(tx, account, list, writes))
    }

    pub fn set_paging(&self, account: &Account, paging: &[(Resource, Paging)]) -> Result<(), StateError> {
        self.write(|tx| set_paging_in(tx, account, paging))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // A complete read replaces the cache, confirmed writes move it, an unconfirmed one distrusts it;
    // the paging round-trips per resource.
    #[test]
    fn cache_follows_reads_and_writes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = State::open(&dir.path().join("segsync.db")).expect("open");
        let (account, list) = (Account::remote("https://e.example/api"), ListId::from("list-1"));
        assert_eq!(state.cached_list(&account, &list).expect("read"), None);
        let ids = |v: &[&str]| v.iter().map(|s| ContactId::from(*s)).collect::<Vec<_>>();
        let read: ContactIdSet = ["a", "b", "c"].into_iter().collect();
        let (added, removed) = (ids(&["d"]), ids(&["a"]));
        let applied = CacheWrites { added: &added, removed: &removed, confirmed: true };
        state.store_members(&account, &list, &read, applied).expect("store");
        let cached = state.cached_list(&account, &list).expect("read").expect("cached");
        assert_eq!((cached.members, cached.trusted), (3, true));
        assert_eq!(state.cached_members(&account, &list).expect("members"), ["b", "c", "d"].into_iter().collect());

        let (added, removed) = (ids(&["e", "f"]), ids(&["b"]));
        state
            .update_members(&account, &list, CacheWrites { added: &added, removed: &removed, confirmed: false })
            .expect("update");
        let cached = state.cached_list(&account, &list).expect("read").expect("cached");
        assert_eq!((cached.members, cached.trusted), (4, false), "an unconfirmed write distrusts the cache");
        state
            .store_members(&account, &list, &read, CacheWrites { added: &[], removed: &[], confirmed: true })
            .expect("store");
        let cached = state.cached_list(&account, &list).expect("read").expect("cached");
        assert_eq!((cached.members, cached.trusted), (3, true), "a complete read restores it");
        let other = Account::remote("https://other.example/api");
        assert_eq!(state.cached_list(&other, &list).expect("read"), None, "per account");

        let paging = Paging { page_size: 100, pagination: Pagination::Page };
        state.set_paging(&account, &[(Resource::Lists, paging)]).expect("paging");
        assert_eq!(state.paging(&account).expect("paging"), [(Resource::Lists, paging)]);
        assert!(state.paging(&other).expect("paging").is_empty());
    }
}
