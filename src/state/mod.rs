//! The state database (SQLite): which list each rule fills, the history of runs, the read
//! planner's last-seen counts, the membership cache (`members`), and the instance lock.
//!
//! Every write is one transaction, so a crash never leaves half a row. The schema is versioned by
//! `PRAGMA user_version` and migrated on open. Holds contact ids (the cache), never contact
//! fields: lists live on the gateway, and the cache is only ever a shortcut to reading them.

mod account;
mod commit;
mod history;
mod members;

pub use account::SetAside;
pub use commit::{BindingWrite, CacheWrite, Commit};
pub use history::{Action, HistoryEntry, Movements};
pub use members::{CacheWrites, CachedList};

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

use crate::ids::{Account, ListId, RuleName};
use crate::outcome::{Outcome, Trigger};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    // The cause is part of the message and deliberately not a `#[source]`: an error chain
    // printed whole (`{:#}`) would say it twice.
    #[error("state database {path}: {cause}")]
    Sqlite { path: PathBuf, cause: rusqlite::Error },
    #[error("state lock {path}: {cause}")]
    Io { path: PathBuf, cause: std::io::Error },
    #[error(
        "another segsync (pid {pid}) is using the state file {path}; two instances would fight over the same lists. \
         Stop it first, or give this one its own [state] path (to confirm a held mass removal while it runs: \
         `segsync sync RULE --allow-mass-removal`)"
    )]
    Locked { path: PathBuf, pid: String },
    #[error(
        "cannot read the state database {path}: {cause}; the service keeps it in a folder only it (and root) may \
         read: run this command as root, e.g. `sudo segsync status`"
    )]
    Unreadable { path: PathBuf, cause: std::io::Error },
    #[error("the state thread failed: {0}")]
    Thread(String),
    #[error("the state database {path} has schema version {found}, newer than this segsync understands ({known})")]
    TooNew { path: PathBuf, found: i64, known: i64 },
}

/// Why the database could not be created or written.
#[derive(Debug, thiserror::Error)]
pub enum Unwritable {
    #[error("{} is a folder, not a database file", .0.display())]
    IsFolder(PathBuf),
    #[error("{} is not a folder, so {} cannot be created", dir.display(), db.display())]
    NotAFolder { dir: PathBuf, db: PathBuf },
    #[error("cannot write in {} ({cause}), so {} cannot be created or updated", dir.display(), db.display())]
    Denied { dir: PathBuf, db: PathBuf, cause: std::io::Error },
}

/// Whether the database at `db_path` could be created or opened for writing: its folder (or the
/// nearest existing ancestor, which `lock` would create it in) is a folder this process can write.
pub fn check_writable(db_path: &Path) -> Result<(), Unwritable> {
    if db_path.is_dir() {
        return Err(Unwritable::IsFolder(db_path.into()));
    }
    let mut dir = db_path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    while !dir.exists() {
        match dir.parent().filter(|d| !d.as_os_str().is_empty()) {
            Some(parent) => dir = parent,
            None => break,
        }
    }
    if !dir.is_dir() {
        return Err(Unwritable::NotAFolder { dir: dir.into(), db: db_path.into() });
    }
    let probe = dir.join(format!(".segsync-check-{}", std::process::id()));
    match OpenOptions::new().write(true).create_new(true).open(&probe) {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(cause) => Err(Unwritable::Denied { dir: dir.into(), db: db_path.into(), cause }),
    }
}

/// Holds the instance lock until dropped (the OS releases it if the process dies).
#[derive(Debug)]
pub struct InstanceLock {
    _file: File,
}

/// Takes the lock file beside the database, or says who holds it.
pub fn lock(db_path: &Path) -> Result<InstanceLock, StateError> {
    let path = lock_path(db_path);
    let io = |cause| StateError::Io { path: path.clone(), cause };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        private_dir(dir).map_err(io)?;
    }
    let mut file =
        OpenOptions::new().read(true).write(true).create(true).truncate(false).mode(0o600).open(&path).map_err(io)?;
    match file.try_lock() {
        Ok(()) => {
            file.set_len(0).map_err(io)?;
            file.rewind().map_err(io)?;
            write!(file, "{}", std::process::id()).map_err(io)?;
            file.flush().map_err(io)?;
            Ok(InstanceLock { _file: file })
        }
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            Err(StateError::Locked { path: db_path.into(), pid: pid.trim().to_owned() })
        }
        Err(std::fs::TryLockError::Error(e)) => Err(io(e)),
    }
}

/// Creates the folders of `dir` that are missing, readable by this user only (0700).
fn private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// Creates the database file (and its missing folders) readable by this user only, whatever the
/// umask: it holds contact ids and, for removals, field values. SQLite gives its `-wal` and `-shm`
/// files the database file's mode. An existing file is left as it is (see [`privacy_problem`]).
fn create_private(path: &Path) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        private_dir(dir)?;
    }
    match OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        other => other.map(drop),
    }
}

/// Why the state at `db_path` is readable by other users than its owner, if it is: the file (or
/// its `-wal` journal) grants group or other any access. `check` and `status` warn with it.
pub fn privacy_problem(db_path: &Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mut wal = db_path.as_os_str().to_owned();
    wal.push("-wal");
    [db_path.to_path_buf(), PathBuf::from(wal)].into_iter().find_map(|file| {
        let mode = std::fs::metadata(&file).ok()?.permissions().mode() & 0o777;
        (mode & 0o077 != 0).then(|| {
            format!(
                "the state {} is readable by other users (mode {mode:04o}); it holds contact ids and removal facts: \
                 chmod 600 {}",
                file.display(),
                file.display()
            )
        })
    })
}

fn lock_path(db_path: &Path) -> PathBuf {
    let mut name = db_path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".lock");
    db_path.with_file_name(name)
}

/// One finished (or interrupted) rule run, as stored and as `segsync status` shows it.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct RunRecord {
    pub rule: RuleName,
    pub list_id: Option<ListId>,
    pub trigger: Trigger,
    pub rule_hash: String,
    pub started_at: String,
    pub finished_at: String,
    pub scanned: u64,
    pub matched: u64,
    pub members_before: u64,
    pub added: u64,
    pub removed: u64,
    pub eval_errors: u64,
    pub api_requests: u64,
    pub retries: u64,
    pub duration_ms: u64,
    pub outcome: Outcome,
    pub detail: Option<String>,
    /// Removals the plan held or made.
    pub to_remove: u64,
}

const SCHEMA_VERSION: i64 = 7;

/// How long a statement waits for another connection's lock.
const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Switches the database to WAL. The switch takes an exclusive lock, and SQLite answers BUSY at once,
/// without waiting on the busy handler, when another connection opening the same new file holds a
/// shared lock it also wants to raise (`segsync status` opening while the daemon starts): so the
/// switch is tried again, for up to the busy timeout.
fn wal(conn: &Connection) -> rusqlite::Result<()> {
    let deadline = std::time::Instant::now() + BUSY_TIMEOUT;
    loop {
        match conn.pragma_update(None, "journal_mode", "WAL") {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

/// Runs kept per rule; older ones are pruned as new ones are recorded.
const KEEP_RUNS: i64 = 1000;

const MIGRATIONS: [&str; 7] = [
    r"
    CREATE TABLE binding (
        endpoint  TEXT NOT NULL,
        rule      TEXT NOT NULL,
        list_name TEXT NOT NULL,
        list_id   TEXT NOT NULL,
        bound_at  TEXT NOT NULL,
        PRIMARY KEY (endpoint, rule, list_name)
    );
    CREATE TABLE run (
        id             INTEGER PRIMARY KEY,
        rule           TEXT NOT NULL,
        list_id        TEXT NOT NULL,
        trigger        TEXT NOT NULL,
        rule_hash      TEXT NOT NULL,
        started_at     TEXT NOT NULL,
        finished_at    TEXT NOT NULL,
        scanned        INTEGER NOT NULL,
        matched        INTEGER NOT NULL,
        members_before INTEGER NOT NULL,
        added          INTEGER NOT NULL,
        removed        INTEGER NOT NULL,
        eval_errors    INTEGER NOT NULL,
        api_requests   INTEGER NOT NULL,
        retries        INTEGER NOT NULL,
        duration_ms    INTEGER NOT NULL,
        outcome        TEXT NOT NULL,
        detail         TEXT NOT NULL
    );
    CREATE INDEX run_by_rule ON run (rule, id);
    CREATE TABLE estimate (
        endpoint TEXT NOT NULL,
        key      TEXT NOT NULL,
        value    INTEGER NOT NULL,
        PRIMARY KEY (endpoint, key)
    );
",
    r"
    CREATE TABLE approval (
        rule         TEXT PRIMARY KEY,
        requested_at TEXT NOT NULL,
        expires_at   TEXT NOT NULL
    );
",
    // What the daemon runs (for `status`), removals a held run planned, and run requests that do
    // not confirm a mass removal (`sync RULE` while the daemon runs).
    r"
    CREATE TABLE loaded (
        rule      TEXT PRIMARY KEY,
        rule_hash TEXT NOT NULL,
        loaded_at TEXT NOT NULL
    );
    ALTER TABLE run ADD COLUMN to_remove INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE approval ADD COLUMN allow_mass_removal INTEGER NOT NULL DEFAULT 1;
",
    // The membership cache (ids only) and the paging each endpoint takes.
    r"
    CREATE TABLE cached_list (
        id          INTEGER PRIMARY KEY,
        endpoint    TEXT NOT NULL,
        list_id     TEXT NOT NULL,
        verified_at TEXT NOT NULL,
        trusted     INTEGER NOT NULL,
        members     INTEGER NOT NULL,
        UNIQUE (endpoint, list_id)
    );
    CREATE TABLE cached_member (
        list    INTEGER NOT NULL,
        contact TEXT NOT NULL,
        PRIMARY KEY (list, contact)
    ) WITHOUT ROWID;
    CREATE TABLE paging (
        endpoint   TEXT NOT NULL,
        api        TEXT NOT NULL,
        page_size  INTEGER NOT NULL,
        pagination TEXT NOT NULL,
        PRIMARY KEY (endpoint, api)
    );
",
    // Removal grace (when a member first failed its rule) and the membership history.
    r"
    CREATE TABLE pending (
        endpoint  TEXT NOT NULL,
        rule      TEXT NOT NULL,
        rule_hash TEXT NOT NULL,
        contact   TEXT NOT NULL,
        since     TEXT NOT NULL,
        PRIMARY KEY (endpoint, rule, contact)
    ) WITHOUT ROWID;
    CREATE TABLE history_run (
        id        INTEGER PRIMARY KEY,
        at        TEXT NOT NULL,
        rule      TEXT NOT NULL,
        rule_hash TEXT NOT NULL,
        list_id   TEXT NOT NULL,
        trigger   TEXT NOT NULL,
        note      TEXT NOT NULL
    );
    CREATE INDEX history_run_by_rule ON history_run (rule, at);
    CREATE INDEX history_run_by_at ON history_run (at);
    CREATE TABLE history (
        contact TEXT NOT NULL,
        run     INTEGER NOT NULL,
        action  TEXT NOT NULL,
        reason  TEXT NOT NULL,
        PRIMARY KEY (contact, run)
    ) WITHOUT ROWID;
    CREATE INDEX history_by_run ON history (run);
",
    // Whose state it is (the salt of the key fingerprints in `Account`), other accounts' state set
    // aside, and the daemon's answers to run requests.
    r"
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    CREATE TABLE set_aside (
        account    TEXT PRIMARY KEY,
        base_url   TEXT NOT NULL,
        noticed_at TEXT NOT NULL,
        by_account TEXT NOT NULL
    );
    CREATE TABLE run_answer (
        rule        TEXT NOT NULL,
        requested_at TEXT NOT NULL,
        answered_at TEXT NOT NULL,
        taken       INTEGER NOT NULL,
        reason      TEXT NOT NULL,
        PRIMARY KEY (rule, requested_at)
    );
",
    // The column naming whose rows they are holds the account (base URL and key fingerprint).
    r"
    ALTER TABLE binding RENAME COLUMN endpoint TO account;
    ALTER TABLE estimate RENAME COLUMN endpoint TO account;
    ALTER TABLE cached_list RENAME COLUMN endpoint TO account;
    ALTER TABLE paging RENAME COLUMN endpoint TO account;
    ALTER TABLE pending RENAME COLUMN endpoint TO account;
",
];

/// The state database. Cheap to clone; calls are short and serialized.
#[derive(Clone)]
pub struct State {
    conn: Arc<Mutex<Connection>>,
    path: PathBuf,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State").field("path", &self.path).finish()
    }
}

#[cfg(test)]
impl State {
    pub fn bind(&self, account: &Account, rule: &RuleName, list_name: &str, list: &ListId) -> Result<(), StateError> {
        self.write(|tx| bind_in(tx, account, rule, list_name, list))
    }

    pub fn record_run(&self, run: &RunRecord) -> Result<(), StateError> {
        self.write(|tx| record_run_in(tx, run))
    }

    pub fn set_estimates(&self, account: &Account, values: &[(Estimate, u64)]) -> Result<(), StateError> {
        self.write(|tx| set_estimates_in(tx, account, values))
    }
}

impl State {
    /// Opens (creating and migrating) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, StateError> {
        let sql = |cause| StateError::Sqlite { path: path.into(), cause };
        create_private(path).map_err(|cause| StateError::Io { path: path.into(), cause })?;
        let mut conn = Connection::open(path).map_err(sql)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(sql)?;
        wal(&conn).map_err(sql)?;
        conn.pragma_update(None, "synchronous", "FULL").map_err(sql)?;
        // Each migration reads the version and applies the next step inside one write transaction
        // (`BEGIN IMMEDIATE`), so two processes opening a new database at once (the daemon starting
        // while `segsync status` looks) never both apply the same step.
        loop {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(sql)?;
            let version: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0)).map_err(sql)?;
            if version > SCHEMA_VERSION {
                return Err(StateError::TooNew { path: path.into(), found: version, known: SCHEMA_VERSION });
            }
            let Some(migration) = MIGRATIONS.get(version as usize) else { break };
            tx.execute_batch(migration).map_err(sql)?;
            tx.pragma_update(None, "user_version", version + 1).map_err(sql)?;
            tx.commit().map_err(sql)?;
        }
        Ok(Self { conn: Arc::new(Mutex::new(conn)), path: path.into() })
    }

    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>) -> Result<T, StateError> {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut conn).map_err(|cause| StateError::Sqlite { path: self.path.clone(), cause })
    }

    /// Runs `f` in one write transaction.
    fn write<T>(&self, f: impl FnOnce(&rusqlite::Transaction<'_>) -> rusqlite::Result<T>) -> Result<T, StateError> {
        self.with(|c| {
            let tx = c.transaction()?;
            let out = f(&tx)?;
            tx.commit()?;
            Ok(out)
        })
    }

    /// The list a rule's LIST name was bound to on this account.
    pub fn binding(&self, account: &Account, rule: &RuleName, list_name: &str) -> Result<Option<ListId>, StateError> {
        self.with(|c| {
            c.query_row(
                "SELECT list_id FROM binding WHERE account = ?1 AND rule = ?2 AND list_name = ?3",
                params![account.as_str(), rule.as_str(), list_name],
                |r| r.get::<_, String>(0),
            )
            .optional()
        })
        .map(|id| id.map(ListId::from))
    }

    /// The lists the partitioned rule `parent` filled on this account (its partitions' bindings,
    /// named `parent:LIST`), by name.
    pub fn partition_lists(&self, account: &Account, parent: &RuleName) -> Result<Vec<String>, StateError> {
        let prefix = format!("{parent}{}", crate::rules::PARTITION_SEPARATOR);
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT DISTINCT list_name FROM binding WHERE account = ?1 AND substr(rule, 1, length(?2)) = ?2 \
                 ORDER BY list_name",
            )?;
            let names = stmt.query_map(params![account.as_str(), prefix], |r| r.get::<_, String>(0))?;
            names.collect()
        })
    }

    /// The list the rule was last bound to under another LIST name, if any (to log a rename).
    pub fn other_binding(
        &self,
        account: &Account,
        rule: &RuleName,
        list_name: &str,
    ) -> Result<Option<(String, ListId)>, StateError> {
        self.with(|c| {
            c.query_row(
                "SELECT list_name, list_id FROM binding WHERE account = ?1 AND rule = ?2 AND list_name <> ?3 ORDER BY bound_at DESC LIMIT 1",
                params![account.as_str(), rule.as_str(), list_name],
                |r| Ok((r.get::<_, String>(0)?, ListId::from(r.get::<_, String>(1)?))),
            )
            .optional()
        })
    }

    /// Asks the running daemon to run `rule` once now, allowed to apply a held mass removal when
    /// `allow_mass_removal` (an operator's confirmation), within `ttl`. Returns the request's
    /// time, by which its answer ([`State::run_answer`]) is found.
    pub fn request_run(
        &self,
        rule: &RuleName,
        allow_mass_removal: bool,
        ttl: chrono::Duration,
    ) -> Result<String, StateError> {
        let now = chrono::Utc::now();
        let expires = (now + ttl).to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let requested = now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        self.with(|c| {
            c.execute(
                "INSERT INTO approval (rule, requested_at, expires_at, allow_mass_removal) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (rule) DO UPDATE SET requested_at = excluded.requested_at, expires_at = excluded.expires_at,
                 allow_mass_removal = max(approval.allow_mass_removal, excluded.allow_mass_removal)",
                params![rule.as_str(), requested, expires, allow_mass_removal],
            )
            .map(drop)
        })?;
        Ok(requested)
    }

    /// A confirmation of a held mass removal for the running daemon.
    pub fn approve(&self, rule: &RuleName, ttl: chrono::Duration) -> Result<String, StateError> {
        self.request_run(rule, true, ttl)
    }

    /// Takes (and deletes) the run requests that have not expired: each rule, whether the run
    /// may apply a held mass removal, and when it was asked for (to answer it).
    pub fn take_run_requests(&self) -> Result<Vec<RunRequest>, StateError> {
        let now = now();
        self.with(|c| {
            let tx = c.transaction()?;
            let requests = {
                let mut stmt = tx.prepare(
                    "SELECT rule, allow_mass_removal, requested_at FROM approval WHERE expires_at > ?1 ORDER BY rule",
                )?;
                let rows = stmt.query_map(params![now], |r| {
                    Ok(RunRequest {
                        rule: RuleName::from(r.get::<_, String>(0)?),
                        allow_mass_removal: r.get(1)?,
                        requested_at: r.get(2)?,
                    })
                })?;
                rows.collect::<rusqlite::Result<Vec<_>>>()?
            };
            tx.execute("DELETE FROM approval", [])?;
            tx.commit()?;
            Ok(requests)
        })
    }

    /// The daemon's answer to a run request: taken, or not and why. Answers older than a day go.
    pub fn answer_run_request(&self, request: &RunRequest, answer: &RunAnswer) -> Result<(), StateError> {
        let now = now();
        let old = at(chrono::Utc::now() - chrono::Duration::days(1));
        self.with(|c| {
            c.execute("DELETE FROM run_answer WHERE answered_at < ?1", params![old])?;
            c.execute(
                "INSERT OR REPLACE INTO run_answer (rule, requested_at, answered_at, taken, reason) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![request.rule.as_str(), request.requested_at, now, answer.taken, answer.reason],
            )
            .map(drop)
        })
    }

    /// The daemon's answer to the request for `rule` made at `requested_at` (or a later one that
    /// replaced it), if it answered yet.
    pub fn run_answer(&self, rule: &RuleName, requested_at: &str) -> Result<Option<RunAnswer>, StateError> {
        self.with(|c| {
            c.query_row(
                "SELECT taken, reason FROM run_answer WHERE rule = ?1 AND requested_at >= ?2 ORDER BY requested_at LIMIT 1",
                params![rule.as_str(), requested_at],
                |r| Ok(RunAnswer { taken: r.get(0)?, reason: r.get(1)? }),
            )
            .optional()
        })
    }

    /// Withdraws the run requests for `rules` still waiting; returns how many were waiting.
    pub fn withdraw_run_requests(&self, rules: &[RuleName]) -> Result<usize, StateError> {
        self.with(|c| {
            let mut n = 0;
            for rule in rules {
                n += c.execute("DELETE FROM approval WHERE rule = ?1", params![rule.as_str()])?;
            }
            Ok(n)
        })
    }

    /// Records the rules the daemon runs now, replacing the previous set (for `status`).
    pub fn set_loaded(&self, rules: &[LoadedRule]) -> Result<(), StateError> {
        self.write(|tx| {
            tx.execute("DELETE FROM loaded", [])?;
            for r in rules {
                tx.execute(
                    "INSERT INTO loaded (rule, rule_hash, loaded_at) VALUES (?1, ?2, ?3)",
                    params![r.rule.as_str(), r.hash, at(r.loaded_at)],
                )?;
            }
            Ok(())
        })
    }

    /// The rules the daemon last said it runs, with their content hashes and since when.
    /// The name of every list a rule is or was bound to, by id (for `status` and `history`, which
    /// would otherwise show bare ids).
    pub fn list_names(&self) -> Result<HashMap<ListId, String>, StateError> {
        self.with(|c| {
            let mut stmt = c.prepare("SELECT list_id, list_name FROM binding")?;
            let rows = stmt.query_map([], |r| Ok((ListId::from(r.get::<_, String>(0)?), r.get::<_, String>(1)?)))?;
            rows.collect()
        })
    }

    pub fn loaded(&self) -> Result<Vec<LoadedRule>, StateError> {
        self.with(|c| {
            let mut stmt = c.prepare("SELECT rule, rule_hash, loaded_at FROM loaded ORDER BY rule")?;
            let rows = stmt.query_map([], |r| {
                let loaded_at = r.get::<_, String>(2)?;
                Ok(LoadedRule {
                    rule: RuleName::from(r.get::<_, String>(0)?),
                    hash: r.get(1)?,
                    loaded_at: parse_at(&loaded_at).unwrap_or_default(),
                })
            })?;
            rows.collect()
        })
    }

    /// When each rule last ran with outcome ok.
    pub fn last_successes(&self) -> Result<HashMap<RuleName, chrono::DateTime<chrono::Utc>>, StateError> {
        self.with(|c| {
            let mut stmt = c.prepare("SELECT rule, MAX(finished_at) FROM run WHERE outcome = 'ok' GROUP BY rule")?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
            let mut out = HashMap::new();
            for row in rows {
                let (rule, finished) = row?;
                if let Some(t) = parse_at(&finished) {
                    out.insert(RuleName::from(rule), t);
                }
            }
            Ok(out)
        })
    }

    /// The newest run of `rule` that finished after `after` (RFC 3339), if any.
    pub fn run_finished_after(&self, rule: &RuleName, after: &str) -> Result<Option<RunRecord>, StateError> {
        Ok(self.last_runs(1)?.into_iter().find(|r| &r.rule == rule && r.finished_at.as_str() > after))
    }

    /// Forgets bindings and estimates of earlier bundled-sandbox instances (their lists are gone).
    pub fn forget_other_sandboxes(&self, current: &Account) -> Result<(), StateError> {
        let pattern = format!("{}%", Account::SANDBOX_PREFIX);
        self.with(|c| {
            c.execute(
                "DELETE FROM binding WHERE account LIKE ?1 AND account <> ?2",
                params![pattern, current.as_str()],
            )?;
            c.execute(
                "DELETE FROM estimate WHERE account LIKE ?1 AND account <> ?2",
                params![pattern, current.as_str()],
            )?;
            c.execute(
                "DELETE FROM cached_member WHERE list IN
                    (SELECT id FROM cached_list WHERE account LIKE ?1 AND account <> ?2)",
                params![pattern, current.as_str()],
            )?;
            c.execute(
                "DELETE FROM cached_list WHERE account LIKE ?1 AND account <> ?2",
                params![pattern, current.as_str()],
            )?;
            c.execute(
                "DELETE FROM paging WHERE account LIKE ?1 AND account <> ?2",
                params![pattern, current.as_str()],
            )?;
            Ok(())
        })
    }

    /// The last `per_rule` runs of every rule, newest first within a rule.
    pub fn last_runs(&self, per_rule: usize) -> Result<Vec<RunRecord>, StateError> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT rule, list_id, trigger, rule_hash, started_at, finished_at, scanned, matched, members_before, added,
                        removed, eval_errors, api_requests, retries, duration_ms, outcome, detail, to_remove
                 FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY rule ORDER BY id DESC) AS n FROM run)
                 WHERE n <= ?1 ORDER BY rule, n",
            )?;
            let rows = stmt.query_map(params![per_rule as i64], |r| {
                // Absent values are stored as empty text (the columns predate `Option`).
                let text = |i: usize| -> rusqlite::Result<Option<String>> {
                    r.get::<_, String>(i).map(|s| (!s.is_empty()).then_some(s))
                };
                Ok(RunRecord {
                    rule: RuleName::from(r.get::<_, String>(0)?),
                    list_id: text(1)?.map(ListId::from),
                    trigger: r.get(2)?,
                    rule_hash: r.get(3)?,
                    started_at: r.get(4)?,
                    finished_at: r.get(5)?,
                    scanned: r.get::<_, i64>(6)? as u64,
                    matched: r.get::<_, i64>(7)? as u64,
                    members_before: r.get::<_, i64>(8)? as u64,
                    added: r.get::<_, i64>(9)? as u64,
                    removed: r.get::<_, i64>(10)? as u64,
                    eval_errors: r.get::<_, i64>(11)? as u64,
                    api_requests: r.get::<_, i64>(12)? as u64,
                    retries: r.get::<_, i64>(13)? as u64,
                    duration_ms: r.get::<_, i64>(14)? as u64,
                    outcome: r.get(15)?,
                    detail: text(16)?,
                    to_remove: r.get::<_, i64>(17)? as u64,
                })
            })?;
            rows.collect()
        })
    }

    /// A count the read planner saw last time.
    pub fn estimate(&self, account: &Account, what: &Estimate) -> Result<Option<u64>, StateError> {
        let key = what.key();
        self.with(|c| {
            c.query_row(
                "SELECT value FROM estimate WHERE account = ?1 AND key = ?2",
                params![account.as_str(), key],
                |r| r.get::<_, i64>(0),
            )
            .optional()
        })
        .map(|v| v.map(|v| v as u64))
    }
}

/// Binds `rule`'s `list_name` to `list` on `account`.
fn bind_in(c: &Connection, account: &Account, rule: &RuleName, list_name: &str, list: &ListId) -> rusqlite::Result<()> {
    c.execute(
        "INSERT INTO binding (account, rule, list_name, list_id, bound_at) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (account, rule, list_name) DO UPDATE SET list_id = excluded.list_id, bound_at = excluded.bound_at",
        params![account.as_str(), rule.as_str(), list_name, list.as_str(), now()],
    )
    .map(drop)
}

/// Stores a finished run and prunes the rule's runs beyond the newest 1,000.
fn record_run_in(c: &Connection, run: &RunRecord) -> rusqlite::Result<()> {
    c.execute(
        "INSERT INTO run (rule, list_id, trigger, rule_hash, started_at, finished_at, scanned, matched, members_before,
                          added, removed, eval_errors, api_requests, retries, duration_ms, outcome, detail, to_remove)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)",
        params![
            run.rule.as_str(),
            run.list_id.as_ref().map_or("", |l| l.as_str()),
            run.trigger,
            run.rule_hash,
            run.started_at,
            run.finished_at,
            run.scanned as i64,
            run.matched as i64,
            run.members_before as i64,
            run.added as i64,
            run.removed as i64,
            run.eval_errors as i64,
            run.api_requests as i64,
            run.retries as i64,
            run.duration_ms as i64,
            run.outcome,
            run.detail.as_deref().unwrap_or(""),
            run.to_remove as i64
        ],
    )?;
    c.execute(
        "DELETE FROM run WHERE rule = ?1 AND id < (SELECT MIN(id) FROM
            (SELECT id FROM run WHERE rule = ?1 ORDER BY id DESC LIMIT ?2))",
        params![run.rule.as_str(), KEEP_RUNS],
    )
    .map(drop)
}

/// Stores the counts the read planner saw.
fn set_estimates_in(c: &Connection, account: &Account, values: &[(Estimate, u64)]) -> rusqlite::Result<()> {
    for (what, value) in values {
        c.execute(
            "INSERT INTO estimate (account, key, value) VALUES (?1, ?2, ?3)
             ON CONFLICT (account, key) DO UPDATE SET value = excluded.value",
            params![account.as_str(), what.key(), *value as i64],
        )?;
    }
    Ok(())
}

/// An operator's request that the running daemon run a rule now (`segsync sync RULE`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunRequest {
    pub rule: RuleName,
    pub allow_mass_removal: bool,
    pub requested_at: String,
}

/// The daemon's answer to a [`RunRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAnswer {
    pub taken: bool,
    /// Why it was not taken (empty when taken).
    pub reason: String,
}

/// A count the read planner remembers between passes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Estimate {
    /// Every contact of the account.
    Contacts,
    /// The non-members passing a rule's FILTER (the size of its own read).
    Candidates(RuleName),
}

impl Estimate {
    /// The key it is stored under (the column's format since schema 1).
    fn key(&self) -> String {
        match self {
            Self::Contacts => "contacts".into(),
            Self::Candidates(rule) => format!("candidates:{rule}"),
        }
    }
}

/// A rule a daemon runs, and since when (kept across reloads and restarts while it stays loaded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedRule {
    pub rule: RuleName,
    pub hash: String,
    pub loaded_at: chrono::DateTime<chrono::Utc>,
}

/// A stored time, read back.
pub fn parse_at(text: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::parse_from_rfc3339(text).ok().map(|t| t.to_utc())
}

/// Now, as stored: RFC 3339 UTC with milliseconds.
pub fn now() -> String {
    at(chrono::Utc::now())
}

/// A moment as stored: RFC 3339 UTC with milliseconds.
/// Whether there is a state to read, for the commands that only read it (`status`, `history`):
/// `Ok(false)` when there is none yet; an error when there is one this user cannot read, which
/// must never pass for "no runs yet".
pub fn exists_readable(path: &Path) -> Result<bool, StateError> {
    match std::fs::File::open(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(cause) => Err(StateError::Unreadable { path: path.into(), cause }),
    }
}

pub fn at(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Bindings, runs and estimates survive a reopen; the schema version is recorded.
    #[test]
    fn round_trips_across_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state/segsync.db");
        let e = Account::remote("https://e.example/api");
        {
            let state = State::open(&path).expect("open");
            state.bind(&e, &RuleName::from("vip"), "VIP", &ListId::from("list-1")).expect("bind");
            state
                .record_run(&RunRecord {
                    rule: "vip".into(),
                    trigger: Trigger::Cron,
                    outcome: Outcome::Held,
                    added: 3,
                    ..RunRecord::default()
                })
                .expect("run");
            state.set_estimates(&e, &[(Estimate::Contacts, 20_000)]).expect("estimate");
        }
        let state = State::open(&path).expect("reopen");
        assert_eq!(state.binding(&e, &RuleName::from("vip"), "VIP").expect("read"), Some(ListId::from("list-1")));
        let other = Account::remote("https://other.example/api");
        assert_eq!(state.binding(&other, &RuleName::from("vip"), "VIP").expect("read"), None);
        assert_eq!(
            state.other_binding(&e, &RuleName::from("vip"), "VIP 2").expect("read"),
            Some(("VIP".into(), ListId::from("list-1")))
        );
        let run = &state.last_runs(5).expect("runs")[0];
        assert_eq!(
            (run.added, run.trigger, run.outcome, &run.list_id, &run.detail),
            (3, Trigger::Cron, Outcome::Held, &None, &None)
        );
        assert_eq!(state.estimate(&e, &Estimate::Contacts).expect("estimate"), Some(20_000));
        assert_eq!(state.estimate(&e, &Estimate::Candidates(RuleName::from("vip"))).expect("estimate"), None);
    }

    // Several processes opening a new database at once all succeed (no step is applied twice).
    #[test]
    fn concurrent_first_opens_migrate_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("segsync.db");
        let opens: Vec<_> = (0..8)
            .map(|_| {
                let path = path.clone();
                std::thread::spawn(move || State::open(&path).map(drop).map_err(|e| e.to_string()))
            })
            .collect();
        for open in opens {
            assert_eq!(open.join().expect("thread"), Ok(()));
        }
    }

    // Old runs are pruned per rule; approvals are taken once and expire.
    #[test]
    fn pruning_and_approvals() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = State::open(&dir.path().join("segsync.db")).expect("open");
        for i in 0..(KEEP_RUNS + 5) {
            state.record_run(&RunRecord { rule: "vip".into(), added: i as u64, ..RunRecord::default() }).expect("run");
        }
        state.record_run(&RunRecord { rule: "geo".into(), ..RunRecord::default() }).expect("run");
        let count: i64 = state
            .with(|c| c.query_row("SELECT COUNT(*) FROM run WHERE rule = 'vip'", [], |r| r.get(0)))
            .expect("count");
        assert_eq!(count, KEEP_RUNS);
        assert_eq!(
            state.last_runs(1).expect("runs").iter().find(|r| r.rule.as_str() == "vip").expect("vip").added,
            KEEP_RUNS as u64 + 4
        );

        state.approve(&RuleName::from("vip"), chrono::Duration::hours(1)).expect("approve");
        state.approve(&RuleName::from("old"), chrono::Duration::seconds(-1)).expect("approve");
        state.request_run(&RuleName::from("geo"), false, chrono::Duration::hours(1)).expect("request");
        let taken = state.take_run_requests().expect("take");
        assert_eq!(
            taken.iter().map(|r| (r.rule.as_str(), r.allow_mass_removal)).collect::<Vec<_>>(),
            [("geo", false), ("vip", true)]
        );
        let ignored = RunAnswer { taken: false, reason: "no rule named geo".into() };
        assert_eq!(state.run_answer(&RuleName::from("geo"), &taken[0].requested_at).expect("answer"), None);
        state.answer_run_request(&taken[0], &ignored).expect("answer");
        assert_eq!(state.run_answer(&RuleName::from("geo"), &taken[0].requested_at).expect("answer"), Some(ignored));
        assert!(state.take_run_requests().expect("take").is_empty(), "taken once");
    }

    // A second instance on the same state file is refused with a message naming the holder.
    #[test]
    fn second_instance_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("segsync.db");
        let _held = lock(&path).expect("first lock");
        let err = lock(&path).expect_err("second lock");
        let text = err.to_string();
        assert!(text.contains(&format!("pid {}", std::process::id())), "{text}");
        assert!(text.contains("another segsync"), "{text}");
    }
}
