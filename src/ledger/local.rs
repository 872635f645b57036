//! The embedded ledger on SQLite. A record is one row holding its JSON
//! document plus the columns it is indexed by; the state machine in
//! `transaction::machine` decides every transition, and the per-state count
//! row changes in the same transaction.

use super::{
    ClaimOutcome, Counts, Ledger, LedgerError, ListQuery, Page, RegisterOutcome, ReplayOutcome,
    decode_cursor, encode_cursor,
};
use crate::sqlite::{Db, DbError};
use crate::transaction::{
    Registration, Settlement, State, TxRecord,
    machine::{self, ClaimDecision},
};
use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, params};
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS transactions (
    id         TEXT PRIMARY KEY,
    status     TEXT NOT NULL,
    updated_at INTEGER NOT NULL,
    doc        TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS transactions_by_update ON transactions(updated_at, id);
CREATE INDEX IF NOT EXISTS transactions_by_status ON transactions(status, updated_at, id);
CREATE TABLE IF NOT EXISTS state_counts (
    status TEXT PRIMARY KEY,
    n      INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS leases (
    name     TEXT PRIMARY KEY,
    owner    TEXT NOT NULL,
    until_us INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoints (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS lost_refusals (
    wal_ref TEXT PRIMARY KEY
);
"#;

pub struct LocalLedger {
    db: Db,
    path: PathBuf,
}

fn db_err(e: DbError) -> LedgerError {
    match e {
        DbError::Closed => LedgerError::Unavailable(e.to_string()),
        DbError::Sqlite(e) => LedgerError::Fatal(e.to_string()),
    }
}

fn load(c: &Connection, id: &str) -> rusqlite::Result<Option<TxRecord>> {
    let doc: Option<String> = c
        .prepare_cached("SELECT doc FROM transactions WHERE id = ?1")?
        .query_row(params![id], |r| r.get(0))
        .optional()?;
    doc.map(|d| {
        serde_json::from_str(&d).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
    })
    .transpose()
}

fn bump(c: &Connection, state: State, delta: i64) -> rusqlite::Result<()> {
    c.prepare_cached(
        "INSERT INTO state_counts (status, n) VALUES (?1, ?2) \
         ON CONFLICT(status) DO UPDATE SET n = n + excluded.n",
    )?
    .execute(params![state.as_str(), delta])?;
    Ok(())
}

/// Writes `rec`, moving the count from `before` (if any) to its state.
fn store(c: &Connection, rec: &TxRecord, before: Option<State>) -> rusqlite::Result<()> {
    let doc = serde_json::to_string(rec)
        .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
    c.prepare_cached(
        "INSERT INTO transactions (id, status, updated_at, doc) VALUES (?1, ?2, ?3, ?4) \
         ON CONFLICT(id) DO UPDATE SET status = excluded.status, updated_at = excluded.updated_at, doc = excluded.doc",
    )?
    .execute(params![
        rec.transaction_id.as_str(),
        rec.status.as_str(),
        rec.updated_at.timestamp_micros(),
        doc
    ])?;
    if before != Some(rec.status) {
        if let Some(b) = before {
            bump(c, b, -1)?;
        }
        bump(c, rec.status, 1)?;
    }
    Ok(())
}

/// The checkpoint names of the intact mark and of the rebuild in progress
/// ([`Ledger::intact`]): the mark goes with the database file.
const INTACT: &str = "ledger.intact";
const REBUILD: &str = "ledger.rebuild";

fn intact_mark(c: &Connection) -> rusqlite::Result<Option<String>> {
    c.prepare_cached("SELECT value FROM checkpoints WHERE name = ?1")?
        .query_row(params![INTACT], |r| r.get(0))
        .optional()
}

impl LocalLedger {
    pub fn open(path: &Path) -> Result<LocalLedger, LedgerError> {
        Ok(LocalLedger {
            db: Db::open(path, SCHEMA).map_err(db_err)?,
            path: path.to_owned(),
        })
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, rusqlite::Error> + Send + 'static,
    ) -> Result<T, LedgerError> {
        self.db.run(f).await.map_err(db_err)
    }

    /// `change` applied to `id`'s record if `owner` at `attempt` still holds
    /// it (`machine::holds`), in one step; [`LedgerError::Fenced`] (nothing
    /// changes) if not.
    async fn as_holder(
        &self,
        id: &str,
        owner: &str,
        attempt: u32,
        change: impl FnOnce(&mut TxRecord) + Send + 'static,
    ) -> Result<TxRecord, LedgerError> {
        let (id2, owner2) = (id.to_owned(), owner.to_owned());
        let found = self
            .run(move |c| {
                let Some(mut rec) = load(c, &id2)? else {
                    return Ok(None);
                };
                if !machine::holds(&rec, &owner2, attempt) {
                    return Ok(Some(None));
                }
                let before = rec.status;
                change(&mut rec);
                store(c, &rec, Some(before))?;
                Ok(Some(Some(rec)))
            })
            .await?;
        match found {
            Some(Some(rec)) => Ok(rec),
            Some(None) => Err(LedgerError::Fenced {
                id: id.to_owned(),
                owner: owner.to_owned(),
                attempt,
            }),
            None => Err(LedgerError::NotFound(id.to_owned())),
        }
    }
}

/// Carries a fencing refusal out of a database job.
#[derive(Debug)]
struct Fenced;
impl std::fmt::Display for Fenced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("fenced")
    }
}
impl std::error::Error for Fenced {}

#[async_trait]
impl Ledger for LocalLedger {
    async fn register(&self, reg: Registration) -> Result<RegisterOutcome, LedgerError> {
        // One job on the one writer: the mark is read in the same step.
        self.run(move |c| {
            if intact_mark(c)?.is_none() {
                c.prepare_cached("INSERT OR IGNORE INTO lost_refusals (wal_ref) VALUES (?1)")?
                    .execute(params![reg.wal_ref.to_string()])?;
                return Ok(Err(LedgerError::Lost(
                    "the ledger database has no intact mark (new, or replaced)".into(),
                )));
            }
            if let Some(existing) = load(c, &reg.transaction_id)? {
                return Ok(Ok(if existing.sha256 == reg.sha256 {
                    RegisterOutcome::Duplicate(existing)
                } else {
                    RegisterOutcome::Conflict(existing)
                }));
            }
            let rec = TxRecord::new(&reg, crate::clock::now());
            store(c, &rec, None)?;
            Ok(Ok(RegisterOutcome::New(rec)))
        })
        .await?
    }

    async fn get(&self, id: &str) -> Result<Option<TxRecord>, LedgerError> {
        let id = id.to_owned();
        self.db.read(move |c| load(c, &id)).await.map_err(db_err)
    }

    async fn claim(
        &self,
        id: &str,
        owner: &str,
        lease: Duration,
    ) -> Result<ClaimOutcome, LedgerError> {
        let (id, owner) = (id.to_owned(), owner.to_owned());
        self.run(move |c| {
            let Some(mut rec) = load(c, &id)? else {
                return Ok(ClaimOutcome::NotFound);
            };
            let now = crate::clock::now();
            Ok(match machine::decide_claim(&rec, now) {
                ClaimDecision::Terminal => ClaimOutcome::Terminal(rec),
                ClaimDecision::Busy => ClaimOutcome::Busy(rec),
                ClaimDecision::NotDue => ClaimOutcome::NotDue(rec),
                ClaimDecision::Claim { .. } => {
                    let before = rec.status;
                    let until =
                        now + chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::MAX);
                    machine::apply_claim(&mut rec, &owner, until, now);
                    store(c, &rec, Some(before))?;
                    ClaimOutcome::Claimed(rec)
                }
            })
        })
        .await
    }

    async fn settle(
        &self,
        id: &str,
        owner: &str,
        attempt: u32,
        s: Settlement,
    ) -> Result<TxRecord, LedgerError> {
        let (id2, owner2) = (id.to_owned(), owner.to_owned());
        let result = self
            .db
            .run(move |c| {
                let Some(mut rec) = load(c, &id2)? else {
                    return Ok(None);
                };
                if !machine::holds(&rec, &owner2, attempt) {
                    return Err(rusqlite::Error::ToSqlConversionFailure(Box::new(Fenced)));
                }
                let before = rec.status;
                machine::apply_settlement(&mut rec, &s, crate::clock::now());
                store(c, &rec, Some(before))?;
                Ok(Some(rec))
            })
            .await;
        match result {
            Ok(Some(rec)) => Ok(rec),
            Ok(None) => Err(LedgerError::NotFound(id.to_owned())),
            Err(DbError::Sqlite(rusqlite::Error::ToSqlConversionFailure(e)))
                if e.is::<Fenced>() =>
            {
                Err(LedgerError::Fenced {
                    id: id.to_owned(),
                    owner: owner.to_owned(),
                    attempt,
                })
            }
            Err(e) => Err(db_err(e)),
        }
    }

    async fn extend_lease(
        &self,
        id: &str,
        owner: &str,
        attempt: u32,
        lease: Duration,
    ) -> Result<TxRecord, LedgerError> {
        self.as_holder(id, owner, attempt, move |rec| {
            let until = crate::clock::now()
                + chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::MAX);
            machine::apply_extension(rec, until);
        })
        .await
    }

    async fn release(&self, id: &str, owner: &str, attempt: u32) -> Result<TxRecord, LedgerError> {
        self.as_holder(id, owner, attempt, |rec| {
            machine::apply_release(rec, crate::clock::now())
        })
        .await
    }

    async fn replay(
        &self,
        id: &str,
        nonce: &str,
        force: bool,
        quiet: Duration,
    ) -> Result<ReplayOutcome, LedgerError> {
        let (id, nonce) = (id.to_owned(), nonce.to_owned());
        self.run(move |c| {
            let Some(mut rec) = load(c, &id)? else {
                return Ok(ReplayOutcome::NotFound);
            };
            let now = crate::clock::now();
            if !machine::may_replay(&rec, force, now) {
                return Ok(ReplayOutcome::Refused(rec));
            }
            let before = rec.status;
            machine::apply_replay(&mut rec, &nonce, now, super::chrono_quiet(quiet));
            store(c, &rec, Some(before))?;
            Ok(ReplayOutcome::Reset(rec))
        })
        .await
    }

    async fn restore(&self, rec: TxRecord) -> Result<(), LedgerError> {
        self.run(move |c| {
            let before = load(c, &rec.transaction_id)?.map(|r| r.status);
            store(c, &rec, before)
        })
        .await
    }

    async fn restore_missing(&self, rec: TxRecord) -> Result<bool, LedgerError> {
        self.run(move |c| {
            if load(c, &rec.transaction_id)?.is_some() {
                return Ok(false);
            }
            store(c, &rec, None)?;
            Ok(true)
        })
        .await
    }

    async fn restore_if_unchanged(
        &self,
        seen: &TxRecord,
        rec: TxRecord,
    ) -> Result<bool, LedgerError> {
        let seen = seen.clone();
        self.run(move |c| match load(c, &rec.transaction_id)? {
            Some(cur) if super::same_version(&cur, &seen) => {
                store(c, &rec, Some(cur.status))?;
                Ok(true)
            }
            _ => Ok(false),
        })
        .await
    }

    async fn try_lease(&self, name: &str, owner: &str, ttl: Duration) -> Result<bool, LedgerError> {
        let (name, owner) = (name.to_owned(), owner.to_owned());
        self.run(move |c| {
            let now = crate::clock::now().timestamp_micros();
            let until = now.saturating_add(i64::try_from(ttl.as_micros()).unwrap_or(i64::MAX));
            let changed = c
                .prepare_cached(
                    "INSERT INTO leases (name, owner, until_us) VALUES (?1, ?2, ?3) \
                     ON CONFLICT(name) DO UPDATE SET owner = excluded.owner, until_us = excluded.until_us \
                     WHERE leases.owner = excluded.owner OR leases.until_us <= ?4",
                )?
                .execute(params![name, owner, until, now])?;
            Ok(changed == 1)
        })
        .await
    }

    async fn checkpoint(&self, name: &str) -> Result<Option<String>, LedgerError> {
        let name = name.to_owned();
        self.run(move |c| {
            c.prepare_cached("SELECT value FROM checkpoints WHERE name = ?1")?
                .query_row(params![name], |r| r.get(0))
                .optional()
        })
        .await
    }

    async fn set_checkpoint(&self, name: &str, value: &str) -> Result<(), LedgerError> {
        let (name, value) = (name.to_owned(), value.to_owned());
        self.run(move |c| {
            c.prepare_cached(
                "INSERT INTO checkpoints (name, value) VALUES (?1, ?2) \
                 ON CONFLICT(name) DO UPDATE SET value = excluded.value",
            )?
            .execute(params![name, value])?;
            Ok(())
        })
        .await
    }

    async fn list(&self, q: ListQuery) -> Result<Page, LedgerError> {
        let limit = q.limit.clamp(1, 1000);
        let cursor = match q.cursor.as_deref() {
            Some(c) => Some(decode_cursor(c).ok_or(LedgerError::InvalidCursor)?),
            None => None,
        };
        let state = q.state.map(|s| s.as_str());
        self.db
            .read(move |c| {
                let (cu, cid) = cursor.unwrap_or((i64::MAX, String::new()));
                let unbounded = cid.is_empty();
                let sql = "SELECT doc, updated_at FROM transactions \
                       WHERE (?1 IS NULL OR status = ?1) \
                         AND (?4 OR updated_at < ?2 OR (updated_at = ?2 AND id < ?3)) \
                       ORDER BY updated_at DESC, id DESC LIMIT ?5";
                let rows: Vec<(String, i64)> = c
                    .prepare_cached(sql)?
                    .query_map(
                        params![state, cu, cid, unbounded, (limit + 1) as i64],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )?
                    .collect::<Result<_, _>>()?;
                let more = rows.len() > limit;
                let mut items = Vec::with_capacity(limit);
                let mut last = None;
                for (doc, updated) in rows.into_iter().take(limit) {
                    let rec: TxRecord = serde_json::from_str(&doc)
                        .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
                    last = Some((updated, rec.transaction_id.clone()));
                    items.push(rec);
                }
                let next_cursor = if more {
                    last.map(|(u, id)| encode_cursor(u, &id))
                } else {
                    None
                };
                Ok(Page { items, next_cursor })
            })
            .await
            .map_err(db_err)
    }

    async fn counts(&self) -> Result<Counts, LedgerError> {
        self.db
            .read(|c| {
                let mut counts = Counts::default();
                let rows: Vec<(String, i64)> = c
                    .prepare_cached("SELECT status, n FROM state_counts")?
                    .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<Result<_, _>>()?;
                for (s, n) in rows {
                    if let Some(state) = State::parse(&s) {
                        *counts.slot(state) = n.max(0) as u64;
                    }
                }
                Ok(counts)
            })
            .await
            .map_err(db_err)
    }

    async fn oldest_update(
        &self,
        state: State,
    ) -> Result<Option<chrono::DateTime<chrono::Utc>>, LedgerError> {
        let us: Option<i64> = self
            .db
            .read(move |c| {
                c.prepare_cached("SELECT MIN(updated_at) FROM transactions WHERE status = ?1")?
                    .query_row(params![state.as_str()], |r| r.get(0))
            })
            .await
            .map_err(db_err)?;
        Ok(us.and_then(chrono::DateTime::from_timestamp_micros))
    }

    async fn ping(&self) -> Result<(), LedgerError> {
        self.run(|c| c.query_row("SELECT 1", [], |_| Ok(()))).await
    }

    fn describe(&self) -> String {
        format!("embedded ledger {}", self.path.display())
    }

    async fn intact(&self) -> Result<bool, LedgerError> {
        self.run(|c| intact_mark(c).map(|m| m.is_some())).await
    }

    async fn refused_while_lost(
        &self,
        _id: &str,
        wal_refs: &[String],
    ) -> Result<Vec<String>, LedgerError> {
        let refs = wal_refs.to_vec();
        self.run(move |c| {
            let mut st = c.prepare_cached("SELECT 1 FROM lost_refusals WHERE wal_ref = ?1")?;
            let mut out = Vec::new();
            for r in refs {
                if st.exists(params![r])? {
                    out.push(r);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn begin_rebuild(&self, token: &str) -> Result<(), LedgerError> {
        self.set_checkpoint(REBUILD, token).await
    }

    async fn mark_intact(&self, token: &str) -> Result<bool, LedgerError> {
        let token = token.to_owned();
        self.run(move |c| {
            let rebuild: Option<String> = c
                .prepare_cached("SELECT value FROM checkpoints WHERE name = ?1")?
                .query_row(params![REBUILD], |r| r.get(0))
                .optional()?;
            if rebuild.as_deref() == Some(token.as_str()) {
                c.prepare_cached(
                    "INSERT INTO checkpoints (name, value) VALUES (?1, ?2) \
                     ON CONFLICT(name) DO UPDATE SET value = excluded.value",
                )?
                .execute(params![INTACT, token])?;
                c.prepare_cached("DELETE FROM checkpoints WHERE name = ?1")?
                    .execute(params![REBUILD])?;
            }
            Ok(intact_mark(c)?.is_some())
        })
        .await
    }
}
