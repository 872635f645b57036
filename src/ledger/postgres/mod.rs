//! The ledger on PostgreSQL (Azure Database for PostgreSQL in production).
//! It owns the tables its migrations create (see `schema` and
//! `migrations/`) in the connection's schema (`search_path`): one row per
//! transaction, per-state counter slots kept by a trigger in the same
//! transaction as the row change, named leases, checkpoints, and the seed's
//! `messages` view.
//!
//! Each ledger call is one statement (see `sql`), prepared once per pooled
//! connection and then one round trip: ingest `get` + `register`, processor
//! `claim` + `settle` — four per transaction, as on Redis. Registration is
//! `INSERT … ON CONFLICT DO NOTHING`; claims and settles are `UPDATE`s whose
//! `WHERE` holds the state machine's conditions and the fencing check, so
//! the row lock and PostgreSQL's re-check of a row updated concurrently make
//! them atomic without any explicit transaction.
//!
//! Terminal records are deleted `retention` after they became terminal, in
//! batches, by a background task (see [`PostgresLedger::purge_expired`]).
//! Migrations run before the first call (and in the background from start-up
//! until the database answers); `rtpd migrate` runs them alone.

mod connect;
mod entra;
mod errors;
pub mod schema;
mod sql;

pub use connect::{DEFAULT_POOL_SIZE, DEFAULT_TIMEOUT, PostgresSettings};

use super::{
    ClaimOutcome, Counts, Ledger, LedgerError, ListQuery, Page, RegisterOutcome, ReplayOutcome,
    decode_cursor, encode_cursor,
};
use crate::backoff::Backoff;
use crate::transaction::{
    Registration, Settlement, State, TxRecord,
    machine::{self, ClaimDecision},
};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use deadpool_postgres::{Object, Pool};
use errors::{classify, malformed, timed_out};
use sql::truncate;
use std::{future::Future, sync::Arc, time::Duration};
use tokio::sync::OnceCell;
use tokio_postgres::{Row, types::ToSql};

/// Terminal records deleted per statement by retention.
const PURGE_BATCH: i64 = 1000;
/// How often retention runs.
const PURGE_EVERY: Duration = Duration::from_secs(60);

pub struct PostgresLedger {
    inner: Arc<Inner>,
    _background: AbortOnDrop,
}

struct Inner {
    pool: Pool,
    schema: OnceCell<()>,
    retention: Option<Duration>,
    timeout: Duration,
    describe: String,
    payload: bool,
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl PostgresLedger {
    /// Sets up the pool without waiting for the database, and starts the
    /// background task that migrates the schema as soon as the database
    /// answers and then applies retention.
    pub fn connect(s: &PostgresSettings) -> Result<PostgresLedger, LedgerError> {
        let c = connect::connect(s)?;
        let inner = Arc::new(Inner {
            pool: c.pool,
            schema: OnceCell::new(),
            retention: s.retention,
            timeout: s.timeout,
            describe: c.describe,
            payload: s.payload,
        });
        let bg = inner.clone();
        let task = tokio::spawn(async move { bg.background().await });
        Ok(PostgresLedger {
            inner,
            _background: AbortOnDrop(task),
        })
    }

    /// Applies pending migrations now.
    pub async fn migrate(&self) -> Result<schema::Applied, LedgerError> {
        self.inner.migrate().await
    }

    /// Deletes terminal records older than the retention, in batches; returns
    /// how many. Nothing when retention is off.
    pub async fn purge_expired(&self) -> Result<u64, LedgerError> {
        self.inner.purge_expired().await
    }
}

/// Applies pending migrations and nothing else: no ledger, no background
/// work (what `rtpd migrate` runs).
pub async fn migrate(s: &PostgresSettings) -> Result<schema::Applied, LedgerError> {
    let c = connect::connect(s)?;
    let mut conn = c.pool.get().await.map_err(errors::pool)?;
    run_migrations(&mut conn).await
}

/// Migrations may rewrite tables; they get longer than a ledger call.
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(60);

impl Inner {
    async fn migrate(&self) -> Result<schema::Applied, LedgerError> {
        let mut conn = self.pool.get().await.map_err(errors::pool)?;
        let applied = run_migrations(&mut conn).await?;
        if !applied.applied.is_empty() {
            tracing::info!(applied = ?applied.applied, version = applied.version, "ledger schema migrated");
        }
        Ok(applied)
    }

    /// Migrates once per process, before the first call that needs the tables.
    async fn ready(&self) -> Result<(), LedgerError> {
        self.schema
            .get_or_try_init(|| async { self.migrate().await.map(|_| ()) })
            .await
            .copied()
    }

    async fn background(&self) {
        let mut retry = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        while let Err(e) = self.ready().await {
            tracing::warn!(error = %e, "ledger schema not migrated yet; retrying");
            tokio::time::sleep(retry.next_delay()).await;
        }
        if self.retention.is_none() {
            return;
        }
        loop {
            match self.purge_expired().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(deleted = n, "ledger retention"),
                Err(e) => tracing::warn!(error = %e, "ledger retention failed; next round retries"),
            }
            tokio::time::sleep(PURGE_EVERY).await;
        }
    }

    async fn purge_expired(&self) -> Result<u64, LedgerError> {
        let Some(retention) = self.retention else {
            return Ok(0);
        };
        // A retention longer than the calendar goes back deletes nothing.
        let Some(cutoff) = chrono::Duration::from_std(retention)
            .ok()
            .and_then(|r| crate::clock::now().checked_sub_signed(r))
        else {
            return Ok(0);
        };
        let mut total = 0;
        loop {
            let n = self
                .execute("purge", sql::PURGE_TERMINAL, &[&cutoff, &PURGE_BATCH])
                .await?;
            total += n;
            if n < PURGE_BATCH as u64 {
                return Ok(total);
            }
        }
    }

    async fn conn(&self) -> Result<Object, LedgerError> {
        self.ready().await?;
        self.pool.get().await.map_err(errors::pool)
    }

    /// One prepared statement, one round trip (the prepare is cached per
    /// connection), bounded by the timeout, connection checkout included.
    async fn query(
        &self,
        what: &str,
        statement: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, LedgerError> {
        bounded(what, self.timeout, async {
            let conn = self.conn().await?;
            let stmt = conn.prepare_cached(statement).await.map_err(classify)?;
            conn.query(&stmt, params).await.map_err(classify)
        })
        .await
    }

    async fn execute(
        &self,
        what: &str,
        statement: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, LedgerError> {
        bounded(what, self.timeout, async {
            let conn = self.conn().await?;
            let stmt = conn.prepare_cached(statement).await.map_err(classify)?;
            conn.execute(&stmt, params).await.map_err(classify)
        })
        .await
    }

    async fn get(&self, id: &str) -> Result<Option<TxRecord>, LedgerError> {
        self.query("get", sql::GET, &[&id])
            .await?
            .first()
            .map(|r| sql::record(r, 0).map_err(malformed))
            .transpose()
    }

    async fn get_first(&self, ids: &[&str]) -> Result<Option<TxRecord>, LedgerError> {
        let ids: Vec<&str> = ids.to_vec();
        self.query("get", sql::GET_FIRST, &[&ids])
            .await?
            .first()
            .map(|r| sql::record(r, 0).map_err(malformed))
            .transpose()
    }

    async fn put(&self, statement: &str, rec: &TxRecord) -> Result<u64, LedgerError> {
        self.put_if(statement, rec, None).await
    }

    /// [`Inner::put`]; with `seen`, its version ($17..$21) follows the record's columns.
    async fn put_if(
        &self,
        statement: &str,
        rec: &TxRecord,
        seen: Option<&TxRecord>,
    ) -> Result<u64, LedgerError> {
        let attempts = i32::try_from(rec.attempts).map_err(malformed)?;
        let retry_count = i32::try_from(rec.retry_count).map_err(malformed)?;
        let attempt_base = i32::try_from(rec.attempt_base).map_err(malformed)?;
        let (wal_ref, status) = (rec.wal_ref.to_string(), rec.status.as_str());
        let seen_attempts = seen
            .map(|r| i32::try_from(r.attempts))
            .transpose()
            .map_err(malformed)?;
        let seen_status = seen.map(|r| r.status.as_str());
        let seen_updated = seen.map(|r| truncate(r.updated_at));
        let seen_nonce = seen.and_then(|r| r.replay_nonce.clone());
        let seen_owner = seen.and_then(|r| r.lease_owner.clone());
        let (id, sha) = (rec.transaction_id.as_str(), rec.sha256.as_str());
        let next_retry_at = rec.next_retry_at.map(truncate);
        let lease_until = rec.lease_until.map(truncate);
        let (created_at, updated_at) = (truncate(rec.created_at), truncate(rec.updated_at));
        let expires_at = rec.expires_at.map(truncate);
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![
            &id,
            &status,
            &sha,
            &wal_ref,
            &attempts,
            &retry_count,
            &rec.error_message,
            &next_retry_at,
            &rec.lease_owner,
            &lease_until,
            &rec.vendor,
            &rec.replay_nonce,
            &created_at,
            &updated_at,
            &attempt_base,
            &expires_at,
        ];
        if seen.is_some() {
            params.extend([
                &seen_status as &(dyn ToSql + Sync),
                &seen_attempts,
                &seen_updated,
                &seen_nonce,
                &seen_owner,
            ]);
        }
        self.execute("restore", statement, &params).await
    }
}

async fn bounded<T>(
    what: &str,
    timeout: Duration,
    f: impl Future<Output = Result<T, LedgerError>>,
) -> Result<T, LedgerError> {
    tokio::time::timeout(timeout, f)
        .await
        .unwrap_or_else(|_| Err(timed_out(what, timeout)))
}

async fn run_migrations(conn: &mut Object) -> Result<schema::Applied, LedgerError> {
    bounded("migrate", MIGRATE_TIMEOUT, async {
        schema::migrate(conn).await.map_err(classify)
    })
    .await
}

fn now() -> DateTime<Utc> {
    truncate(crate::clock::now())
}

/// Reads the `(changed, record…)` rows of CLAIM, SETTLE, EXTEND_LEASE and REPLAY.
fn changed_row(rows: &[Row]) -> Result<Option<(bool, TxRecord)>, LedgerError> {
    rows.first()
        .map(|r| {
            let changed: bool = r.try_get(0).map_err(malformed)?;
            Ok((changed, sql::record(r, 1).map_err(malformed)?))
        })
        .transpose()
}

/// The row a holder's statement (`SETTLE`, `EXTEND_LEASE`, `RELEASE`)
/// returned: the changed record, [`LedgerError::Fenced`] when `owner` at
/// `attempt` no longer held it, `NotFound` for an unknown id.
fn as_holder(rows: &[Row], id: &str, owner: &str, attempt: u32) -> Result<TxRecord, LedgerError> {
    match changed_row(rows)? {
        Some((true, rec)) => Ok(rec),
        Some((false, _)) => Err(LedgerError::Fenced {
            id: id.to_owned(),
            owner: owner.to_owned(),
            attempt,
        }),
        None => Err(LedgerError::NotFound(id.to_owned())),
    }
}

#[async_trait]
impl Ledger for PostgresLedger {
    async fn register(&self, reg: Registration) -> Result<RegisterOutcome, LedgerError> {
        self.register_with_payload(reg, &[]).await
    }

    async fn register_with_payload(
        &self,
        reg: Registration,
        payload: &[u8],
    ) -> Result<RegisterOutcome, LedgerError> {
        let payload = match (self.inner.payload, payload.is_empty()) {
            (true, false) => Some(
                std::str::from_utf8(payload)
                    .map_err(|e| malformed(format!("payload is not UTF-8: {e}")))?,
            ),
            _ => None,
        };
        let mut reg = reg;
        reg.received_at = truncate(reg.received_at);
        reg.expires_at = reg.expires_at.map(truncate);
        let rec = TxRecord::new(&reg, now());
        let wal_ref = rec.wal_ref.to_string();
        // A conflicting row that retention deletes between the two statements
        // makes the id new again: try once more.
        for _ in 0..2 {
            let rows = self
                .inner
                .query(
                    "register",
                    sql::REGISTER,
                    &[
                        &rec.transaction_id.as_str(),
                        &rec.sha256.as_str(),
                        &wal_ref,
                        &rec.vendor,
                        &rec.created_at,
                        &rec.updated_at,
                        &payload,
                        &rec.expires_at,
                    ],
                )
                .await?;
            if let Some(row) = rows.first() {
                return Ok(RegisterOutcome::New(
                    sql::record(row, 0).map_err(malformed)?,
                ));
            }
            if let Some(existing) = self.inner.get(&rec.transaction_id).await? {
                return Ok(if existing.sha256 == reg.sha256 {
                    RegisterOutcome::Duplicate(existing)
                } else {
                    RegisterOutcome::Conflict(existing)
                });
            }
        }
        Err(LedgerError::Unavailable(format!(
            "registering {} kept racing with its deletion",
            rec.transaction_id
        )))
    }

    async fn get(&self, id: &str) -> Result<Option<TxRecord>, LedgerError> {
        self.inner.get(id).await
    }

    async fn get_first(&self, ids: &[&str]) -> Result<Option<TxRecord>, LedgerError> {
        self.inner.get_first(ids).await
    }

    async fn claim(
        &self,
        id: &str,
        owner: &str,
        lease: Duration,
    ) -> Result<ClaimOutcome, LedgerError> {
        let now = now();
        let until =
            truncate(now + chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::MAX));
        let rows = self
            .inner
            .query("claim", sql::CLAIM, &[&id, &owner, &now, &until])
            .await?;
        Ok(match changed_row(&rows)? {
            None => ClaimOutcome::NotFound,
            Some((true, rec)) => ClaimOutcome::Claimed(rec),
            // The latest version, locked: the machine names the reason.
            Some((false, rec)) => match machine::decide_claim(&rec, now) {
                ClaimDecision::Terminal => ClaimOutcome::Terminal(rec),
                ClaimDecision::NotDue => ClaimOutcome::NotDue(rec),
                ClaimDecision::Busy | ClaimDecision::Claim { .. } => ClaimOutcome::Busy(rec),
            },
        })
    }

    async fn settle(
        &self,
        id: &str,
        owner: &str,
        attempt: u32,
        s: Settlement,
    ) -> Result<TxRecord, LedgerError> {
        let now = now();
        let (error, retry_at) = match &s {
            Settlement::Success => (None, None),
            Settlement::Failed {
                error,
                next_retry_at,
            } => (Some(error.as_str()), Some(truncate(*next_retry_at))),
            Settlement::DeadLetter { error, .. } => (Some(error.as_str()), None),
        };
        let attempt_i = i32::try_from(attempt).map_err(malformed)?;
        let rows = self
            .inner
            .query(
                "settle",
                sql::SETTLE,
                &[
                    &id,
                    &owner,
                    &attempt_i,
                    &now,
                    &s.state().as_str(),
                    &error,
                    &retry_at,
                ],
            )
            .await?;
        as_holder(&rows, id, owner, attempt)
    }

    async fn replay_fate(&self, id: &str, nonce: &str) -> Result<Option<TxRecord>, LedgerError> {
        self.inner
            .execute("replay_fate", sql::FENCE_REPLAY, &[&id, &nonce])
            .await?;
        self.inner.get(id).await
    }

    async fn release(&self, id: &str, owner: &str, attempt: u32) -> Result<TxRecord, LedgerError> {
        let now = now();
        let attempt_i = i32::try_from(attempt).map_err(malformed)?;
        let rows = self
            .inner
            .query("release", sql::RELEASE, &[&id, &owner, &attempt_i, &now])
            .await?;
        as_holder(&rows, id, owner, attempt)
    }

    async fn extend_lease(
        &self,
        id: &str,
        owner: &str,
        attempt: u32,
        lease: Duration,
    ) -> Result<TxRecord, LedgerError> {
        let until =
            truncate(now() + chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::MAX));
        let attempt_i = i32::try_from(attempt).map_err(malformed)?;
        let rows = self
            .inner
            .query(
                "extend_lease",
                sql::EXTEND_LEASE,
                &[&id, &owner, &attempt_i, &until],
            )
            .await?;
        as_holder(&rows, id, owner, attempt)
    }

    async fn replay(
        &self,
        id: &str,
        nonce: &str,
        force: bool,
        quiet: Duration,
    ) -> Result<ReplayOutcome, LedgerError> {
        let rows = self
            .inner
            .query(
                "replay",
                sql::REPLAY,
                &[&id, &nonce, &force, &now(), &quiet_secs(quiet)],
            )
            .await?;
        Ok(match changed_row(&rows)? {
            None => ReplayOutcome::NotFound,
            Some((true, rec)) => ReplayOutcome::Reset(rec),
            Some((false, rec)) => ReplayOutcome::Refused(rec),
        })
    }

    async fn restore(&self, rec: TxRecord) -> Result<(), LedgerError> {
        self.inner.put(sql::RESTORE, &rec).await.map(|_| ())
    }

    async fn restore_missing(&self, rec: TxRecord) -> Result<bool, LedgerError> {
        Ok(self.inner.put(sql::RESTORE_MISSING, &rec).await? == 1)
    }

    async fn restore_if_unchanged(
        &self,
        seen: &TxRecord,
        rec: TxRecord,
    ) -> Result<bool, LedgerError> {
        Ok(self
            .inner
            .put_if(sql::RESTORE_IF_UNCHANGED, &rec, Some(seen))
            .await?
            == 1)
    }

    async fn try_lease(&self, name: &str, owner: &str, ttl: Duration) -> Result<bool, LedgerError> {
        let micros = i64::try_from(ttl.as_micros()).unwrap_or(i64::MAX);
        Ok(self
            .inner
            .execute("lease", sql::TRY_LEASE, &[&name, &owner, &micros])
            .await?
            == 1)
    }

    async fn checkpoint(&self, name: &str) -> Result<Option<String>, LedgerError> {
        self.inner
            .query("checkpoint", sql::CHECKPOINT, &[&name])
            .await?
            .first()
            .map(|r| r.try_get(0).map_err(malformed))
            .transpose()
    }

    async fn set_checkpoint(&self, name: &str, value: &str) -> Result<(), LedgerError> {
        self.inner
            .execute("set_checkpoint", sql::SET_CHECKPOINT, &[&name, &value])
            .await
            .map(|_| ())
    }

    async fn list(&self, q: ListQuery) -> Result<Page, LedgerError> {
        let limit = q.limit.clamp(1, 1000);
        let (after, after_id) = match q.cursor.as_deref() {
            Some(c) => {
                let (us, id) = decode_cursor(c).ok_or(LedgerError::InvalidCursor)?;
                (
                    DateTime::from_timestamp_micros(us).ok_or(LedgerError::InvalidCursor)?,
                    id,
                )
            }
            None => (sql::list_start(), String::new()),
        };
        let n = (limit + 1) as i64;
        let rows = match q.state {
            Some(s) => {
                self.inner
                    .query(
                        "list",
                        sql::LIST_STATE,
                        &[&s.as_str(), &after, &after_id, &n],
                    )
                    .await?
            }
            None => {
                self.inner
                    .query("list", sql::LIST_ALL, &[&after, &after_id, &n])
                    .await?
            }
        };
        let more = rows.len() > limit;
        let items = rows
            .iter()
            .take(limit)
            .map(|r| sql::record(r, 0).map_err(malformed))
            .collect::<Result<Vec<_>, _>>()?;
        let next_cursor = if more {
            items
                .last()
                .map(|r| encode_cursor(r.updated_at.timestamp_micros(), &r.transaction_id))
        } else {
            None
        };
        Ok(Page { items, next_cursor })
    }

    async fn counts(&self) -> Result<Counts, LedgerError> {
        let rows = self.inner.query("counts", sql::COUNTS, &[]).await?;
        let row = rows
            .first()
            .ok_or_else(|| malformed("counts returned no row"))?;
        let mut counts = Counts::default();
        for (i, s) in State::ALL.into_iter().enumerate() {
            let n: i64 = row.try_get(i).map_err(malformed)?;
            *counts.slot(s) = n.max(0) as u64;
        }
        Ok(counts)
    }

    async fn oldest_update(&self, state: State) -> Result<Option<DateTime<Utc>>, LedgerError> {
        let rows = self
            .inner
            .query("oldest_update", sql::OLDEST_UPDATE, &[&state.as_str()])
            .await?;
        match rows.first() {
            Some(row) => row.try_get(0).map_err(malformed),
            None => Ok(None),
        }
    }

    async fn ping(&self) -> Result<(), LedgerError> {
        self.inner.query("ping", sql::PING, &[]).await.map(|_| ())
    }

    fn describe(&self) -> String {
        self.inner.describe.clone()
    }

    /// PostgreSQL keeps what it committed across restarts, so the ledger
    /// does not lose its data the way a Redis without persistence does; a
    /// database restored from an older backup is the operator's
    /// `rtpd rebuild-ledger` (docs/operations.md). No mark is kept.
    async fn intact(&self) -> Result<bool, LedgerError> {
        Ok(true)
    }
    async fn begin_rebuild(&self, _token: &str) -> Result<(), LedgerError> {
        Ok(())
    }
    async fn mark_intact(&self, _token: &str) -> Result<bool, LedgerError> {
        Ok(true)
    }
    async fn refused_while_lost(
        &self,
        _id: &str,
        _wal_refs: &[String],
    ) -> Result<Vec<String>, LedgerError> {
        Ok(Vec::new())
    }
}

/// A replay's `quiet` in seconds, for `make_interval` (at most a year, as
/// the machine's).
fn quiet_secs(quiet: Duration) -> f64 {
    super::chrono_quiet(quiet).as_seconds_f64()
}
