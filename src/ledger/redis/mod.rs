//! The production ledger on Redis. It owns the Redis key space under
//! `RTPD_REDIS_KEY_PREFIX`: one hash per transaction, and per shard a counts
//! hash and sorted-set indexes by state (see `keys`). Each operation is one
//! Lua script on one hash slot (see `scripts`), so a transition, its index
//! moves and its count changes are one atomic step, and each ledger call on
//! the hot path is one round trip: ingest `get` + `register`, processor
//! `claim` + `settle` — four per transaction.
//!
//! Terminal records expire `retention` after they became terminal; their
//! index entries and counts are trimmed by later settles and by `counts()`.

mod connect;
mod entra;
mod errors;
mod keys;
mod record;
mod scripts;

pub use connect::{DEFAULT_TIMEOUT, RedisSettings};
pub use keys::{SHARDS, shard_of};

use super::{
    ClaimOutcome, Counts, Ledger, LedgerError, ListQuery, Page, RegisterOutcome, ReplayOutcome,
    decode_cursor, encode_cursor,
};
use crate::transaction::{Registration, Settlement, State, TxRecord};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use errors::{classify, malformed, timed_out};
use keys::Keys;
use record::{from_flat, micros, to_fields, truncate};
use redis::{RedisResult, Script, aio::ConnectionManager};
use std::{future::Future, time::Duration};

/// Expired terminal index entries dropped per settle or per shard in `counts()`.
const TRIM_PER_CALL: u32 = 100;

pub struct RedisLedger {
    conn: ConnectionManager,
    keys: Keys,
    retention: Option<Duration>,
    timeout: Duration,
    describe: String,
    _tokens: Option<entra::EntraTokens>,
}

type Reply = (String, Vec<String>);

impl RedisLedger {
    /// Sets up the connection without contacting Redis (see `connect`).
    pub fn connect(s: &RedisSettings) -> Result<RedisLedger, LedgerError> {
        let keys = Keys::new(&s.key_prefix).map_err(LedgerError::Fatal)?;
        let c = connect::connect(s)?;
        Ok(RedisLedger {
            conn: c.conn,
            keys,
            retention: s.retention,
            timeout: s.timeout,
            describe: c.describe,
            _tokens: c.tokens,
        })
    }

    async fn bounded<T>(
        &self,
        what: &str,
        f: impl Future<Output = RedisResult<T>>,
    ) -> Result<T, LedgerError> {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(r) => r.map_err(classify),
            Err(_) => Err(timed_out(what, self.timeout)),
        }
    }

    async fn script(
        &self,
        what: &str,
        script: &'static Script,
        keys: Vec<String>,
        args: Vec<String>,
    ) -> Result<Reply, LedgerError> {
        let mut conn = self.conn.clone();
        self.bounded(what, async move {
            let mut inv = script.prepare_invoke();
            for k in &keys {
                inv.key(k);
            }
            for a in &args {
                inv.arg(a);
            }
            inv.invoke_async(&mut conn).await
        })
        .await
    }

    fn now() -> DateTime<Utc> {
        truncate(crate::clock::now())
    }

    /// When a record that became terminal at `at` expires (ms since the
    /// epoch), or empty when retention is off.
    fn expire_at_ms(&self, at: DateTime<Utc>) -> String {
        self.retention
            .map(|r| (at.timestamp_millis() + r.as_millis() as i64).to_string())
            .unwrap_or_default()
    }

    /// Terminal index entries older than this have expired.
    fn cutoff_us(&self, now: DateTime<Utc>) -> String {
        self.retention
            .map(|r| (micros(now) - r.as_micros() as i64).to_string())
            .unwrap_or_default()
    }

    /// ARGV of RESTORE and RESTORE_MISSING: id, status, updated_at_us,
    /// expire_at_ms, this process's now_us (a due time is moved to the
    /// server's clock), fields.
    fn restore_args(&self, rec: &TxRecord) -> Vec<String> {
        let expire = if rec.status.is_terminal() {
            self.expire_at_ms(rec.updated_at)
        } else {
            String::new()
        };
        let mut args = vec![
            rec.transaction_id.to_string(),
            rec.status.as_str().to_owned(),
            micros(rec.updated_at).to_string(),
            expire,
            micros(Self::now()).to_string(),
        ];
        args.extend(flat_fields(rec));
        args
    }

    fn record(fields: Vec<String>) -> Result<TxRecord, LedgerError> {
        from_flat(fields)
            .map_err(malformed)?
            .ok_or_else(|| malformed("script returned no record"))
    }
}

fn flat_fields(r: &TxRecord) -> impl Iterator<Item = String> {
    to_fields(r)
        .into_iter()
        .flat_map(|(k, v)| [k.to_owned(), v])
}

fn unexpected(op: &str, code: &str) -> LedgerError {
    malformed(format!("{op} script answered {code:?}"))
}

/// How long a shard keeps the WAL records it refused while unmarked once it
/// is marked again: past a rebuild's lookback (an hour by default) they are
/// out of every automatic rebuild's window, and the journal keeps its notes.
const LOST_REFUSED_KEPT: Duration = Duration::from_secs(24 * 3600);

#[async_trait]
impl Ledger for RedisLedger {
    async fn register(&self, reg: Registration) -> Result<RegisterOutcome, LedgerError> {
        let now = Self::now();
        let mut reg = reg;
        reg.received_at = truncate(reg.received_at);
        reg.expires_at = reg.expires_at.map(truncate);
        let rec = TxRecord::new(&reg, now);
        let mut args = vec![
            rec.transaction_id.to_string(),
            micros(now).to_string(),
            rec.wal_ref.to_string(),
        ];
        args.extend(flat_fields(&rec));
        let shard = shard_of(&rec.transaction_id);
        let mut keys = self.keys.transition_keys(&rec.transaction_id);
        keys.push(self.keys.intact(shard));
        keys.push(self.keys.lost_refused(shard));
        let (code, fields) = self
            .script("register", &scripts::REGISTER, keys, args)
            .await?;
        match code.as_str() {
            "lost" => Err(LedgerError::Lost(format!(
                "{}: no intact mark (Redis lost this shard's data, or the ledger is new)",
                self.describe
            ))),
            "new" => Ok(RegisterOutcome::New(rec)),
            "exists" => {
                let existing = Self::record(fields)?;
                Ok(if existing.sha256 == reg.sha256 {
                    RegisterOutcome::Duplicate(existing)
                } else {
                    RegisterOutcome::Conflict(existing)
                })
            }
            other => Err(unexpected("register", other)),
        }
    }

    async fn get(&self, id: &str) -> Result<Option<TxRecord>, LedgerError> {
        let mut conn = self.conn.clone();
        let key = self.keys.tx(id);
        let flat: Vec<String> = self
            .bounded("get", async move {
                redis::cmd("HGETALL").arg(key).query_async(&mut conn).await
            })
            .await?;
        from_flat(flat).map_err(malformed)
    }

    async fn claim(
        &self,
        id: &str,
        owner: &str,
        lease: Duration,
    ) -> Result<ClaimOutcome, LedgerError> {
        // The script reads the time from the Redis server (see scripts::CLAIM).
        let lease_us = i64::try_from(lease.as_micros()).unwrap_or(i64::MAX / 4);
        let (code, fields) = self
            .script(
                "claim",
                &scripts::CLAIM,
                self.keys.transition_keys(id),
                vec![id.to_owned(), owner.to_owned(), lease_us.to_string()],
            )
            .await?;
        Ok(match code.as_str() {
            "not_found" => ClaimOutcome::NotFound,
            "terminal" => ClaimOutcome::Terminal(Self::record(fields)?),
            "busy" => ClaimOutcome::Busy(Self::record(fields)?),
            "not_due" => ClaimOutcome::NotDue(Self::record(fields)?),
            "claimed" => ClaimOutcome::Claimed(Self::record(fields)?),
            other => return Err(unexpected("claim", other)),
        })
    }

    async fn settle(
        &self,
        id: &str,
        owner: &str,
        attempt: u32,
        s: Settlement,
    ) -> Result<TxRecord, LedgerError> {
        let now = Self::now();
        let (error, retry_at) = match &s {
            Settlement::Success => (String::new(), String::new()),
            Settlement::Failed {
                error,
                next_retry_at,
            } => (error.clone(), micros(*next_retry_at).to_string()),
            Settlement::DeadLetter { error, .. } => (error.clone(), String::new()),
        };
        let (code, fields) = self
            .script(
                "settle",
                &scripts::SETTLE,
                self.keys.transition_keys(id),
                vec![
                    id.to_owned(),
                    owner.to_owned(),
                    attempt.to_string(),
                    micros(now).to_string(),
                    s.state().as_str().to_owned(),
                    error,
                    retry_at,
                    self.expire_at_ms(now),
                    self.cutoff_us(now),
                    TRIM_PER_CALL.to_string(),
                ],
            )
            .await?;
        match code.as_str() {
            "settled" => Self::record(fields),
            "not_found" => Err(LedgerError::NotFound(id.to_owned())),
            "fenced" => Err(LedgerError::Fenced {
                id: id.to_owned(),
                owner: owner.to_owned(),
                attempt,
            }),
            other => Err(unexpected("settle", other)),
        }
    }

    async fn extend_lease(
        &self,
        id: &str,
        owner: &str,
        attempt: u32,
        lease: Duration,
    ) -> Result<TxRecord, LedgerError> {
        let lease_us = i64::try_from(lease.as_micros()).unwrap_or(i64::MAX / 4);
        let (code, fields) = self
            .script(
                "extend_lease",
                &scripts::EXTEND_LEASE,
                self.keys.transition_keys(id),
                vec![
                    id.to_owned(),
                    owner.to_owned(),
                    attempt.to_string(),
                    lease_us.to_string(),
                ],
            )
            .await?;
        match code.as_str() {
            "extended" => Self::record(fields),
            "not_found" => Err(LedgerError::NotFound(id.to_owned())),
            "fenced" => Err(LedgerError::Fenced {
                id: id.to_owned(),
                owner: owner.to_owned(),
                attempt,
            }),
            other => Err(unexpected("extend_lease", other)),
        }
    }

    async fn release(&self, id: &str, owner: &str, attempt: u32) -> Result<TxRecord, LedgerError> {
        let (code, fields) = self
            .script(
                "release",
                &scripts::RELEASE,
                self.keys.transition_keys(id),
                vec![
                    id.to_owned(),
                    owner.to_owned(),
                    attempt.to_string(),
                    micros(Self::now()).to_string(),
                ],
            )
            .await?;
        match code.as_str() {
            "released" => Self::record(fields),
            "not_found" => Err(LedgerError::NotFound(id.to_owned())),
            "fenced" => Err(LedgerError::Fenced {
                id: id.to_owned(),
                owner: owner.to_owned(),
                attempt,
            }),
            other => Err(unexpected("release", other)),
        }
    }

    async fn replay(
        &self,
        id: &str,
        nonce: &str,
        force: bool,
        quiet: Duration,
    ) -> Result<ReplayOutcome, LedgerError> {
        let now = Self::now();
        let (code, fields) = self
            .script(
                "replay",
                &scripts::REPLAY,
                self.keys.transition_keys(id),
                vec![
                    id.to_owned(),
                    nonce.to_owned(),
                    if force { "1" } else { "0" }.to_owned(),
                    micros(now).to_string(),
                    super::chrono_quiet(quiet)
                        .num_microseconds()
                        .unwrap_or(i64::MAX / 4)
                        .to_string(),
                ],
            )
            .await?;
        Ok(match code.as_str() {
            "not_found" => ReplayOutcome::NotFound,
            "refused" => ReplayOutcome::Refused(Self::record(fields)?),
            "reset" => ReplayOutcome::Reset(Self::record(fields)?),
            other => return Err(unexpected("replay", other)),
        })
    }

    async fn restore_missing(&self, rec: TxRecord) -> Result<bool, LedgerError> {
        let (code, _) = self
            .script(
                "restore_missing",
                &scripts::RESTORE_MISSING,
                self.keys.transition_keys(&rec.transaction_id),
                self.restore_args(&rec),
            )
            .await?;
        match code.as_str() {
            "restored" => Ok(true),
            "exists" => Ok(false),
            other => Err(unexpected("restore_missing", other)),
        }
    }

    async fn restore_if_unchanged(
        &self,
        seen: &TxRecord,
        rec: TxRecord,
    ) -> Result<bool, LedgerError> {
        let mut args = self.restore_args(&rec);
        let fields = args.split_off(5);
        args.extend([
            seen.status.as_str().to_owned(),
            seen.attempts.to_string(),
            micros(seen.updated_at).to_string(),
            seen.replay_nonce.clone().unwrap_or_default(),
            seen.lease_owner.clone().unwrap_or_default(),
        ]);
        args.extend(fields);
        let (code, _) = self
            .script(
                "restore_if_unchanged",
                &scripts::RESTORE_IF_UNCHANGED,
                self.keys.transition_keys(&rec.transaction_id),
                args,
            )
            .await?;
        match code.as_str() {
            "restored" => Ok(true),
            "changed" => Ok(false),
            other => Err(unexpected("restore_if_unchanged", other)),
        }
    }

    async fn try_lease(&self, name: &str, owner: &str, ttl: Duration) -> Result<bool, LedgerError> {
        let mut conn = self.conn.clone();
        let key = self.keys.lease(name);
        let (owner, ms) = (
            owner.to_owned(),
            ttl.as_millis().max(if ttl.is_zero() { 0 } else { 1 }),
        );
        let held: i64 = self
            .bounded("lease", async move {
                scripts::LEASE
                    .key(key)
                    .arg(owner)
                    .arg(ms.to_string())
                    .invoke_async(&mut conn)
                    .await
            })
            .await?;
        Ok(held == 1)
    }

    async fn checkpoint(&self, name: &str) -> Result<Option<String>, LedgerError> {
        let mut conn = self.conn.clone();
        let key = self.keys.checkpoint(name);
        self.bounded("checkpoint", async move {
            redis::cmd("GET").arg(key).query_async(&mut conn).await
        })
        .await
    }

    async fn set_checkpoint(&self, name: &str, value: &str) -> Result<(), LedgerError> {
        let mut conn = self.conn.clone();
        let (key, value) = (self.keys.checkpoint(name), value.to_owned());
        self.bounded("set_checkpoint", async move {
            redis::cmd("SET")
                .arg(key)
                .arg(value)
                .query_async(&mut conn)
                .await
        })
        .await
    }

    async fn restore(&self, rec: TxRecord) -> Result<(), LedgerError> {
        let args = self.restore_args(&rec);
        let (code, _) = self
            .script(
                "restore",
                &scripts::RESTORE,
                self.keys.transition_keys(&rec.transaction_id),
                args,
            )
            .await?;
        match code.as_str() {
            "restored" => Ok(()),
            other => Err(unexpected("restore", other)),
        }
    }

    async fn list(&self, q: ListQuery) -> Result<Page, LedgerError> {
        let limit = q.limit.clamp(1, 1000);
        let cursor = match q.cursor.as_deref() {
            Some(c) => Some(decode_cursor(c).ok_or(LedgerError::InvalidCursor)?),
            None => None,
        };
        let (max, cid) = match &cursor {
            Some((u, id)) => (u.to_string(), id.clone()),
            None => ("+inf".to_owned(), String::new()),
        };
        // Each shard's next `limit + 1` after the cursor, then a merge: the
        // newest `limit + 1` overall are among them.
        let pages = (0..SHARDS).map(|shard| {
            let mut conn = self.conn.clone();
            let key = self.keys.index(shard, q.state);
            let (max, cid) = (max.clone(), cid.clone());
            async move {
                scripts::PAGE
                    .key(key)
                    .arg(max)
                    .arg(cid)
                    .arg(limit + 1)
                    .invoke_async::<Vec<String>>(&mut conn)
                    .await
            }
        });
        let pages = self
            .bounded("list", futures::future::try_join_all(pages))
            .await?;
        let mut entries = Vec::new();
        for page in pages {
            let mut it = page.into_iter();
            while let (Some(id), Some(score)) = (it.next(), it.next()) {
                let us = score
                    .parse::<f64>()
                    .map_err(|_| malformed(format!("index score {score:?}")))?
                    as i64;
                entries.push((us, id));
            }
        }
        entries.sort_unstable_by(|a, b| b.cmp(a));
        let more = entries.len() > limit;
        entries.truncate(limit);
        let fetches = entries.iter().map(|(_, id)| {
            let mut conn = self.conn.clone();
            let key = self.keys.tx(id);
            async move {
                redis::cmd("HGETALL")
                    .arg(key)
                    .query_async::<Vec<String>>(&mut conn)
                    .await
            }
        });
        let records = self
            .bounded("list", futures::future::try_join_all(fetches))
            .await?;
        let mut items = Vec::with_capacity(records.len());
        for flat in records {
            // Gone (expired) or moved on since the index was read: skip it,
            // as a later read of the index would.
            if let Some(rec) = from_flat(flat).map_err(malformed)?
                && q.state.is_none_or(|s| s == rec.status)
            {
                items.push(rec);
            }
        }
        let next_cursor = if more {
            entries.last().map(|(u, id)| encode_cursor(*u, id))
        } else {
            None
        };
        Ok(Page { items, next_cursor })
    }

    async fn oldest_update(&self, state: State) -> Result<Option<DateTime<Utc>>, LedgerError> {
        // Each shard's state index is scored by `updated_at` (µs): its first
        // entry is that shard's oldest.
        let firsts = (0..SHARDS).map(|shard| {
            let mut conn = self.conn.clone();
            let key = self.keys.index(shard, Some(state));
            async move {
                redis::cmd("ZRANGE")
                    .arg(key)
                    .arg(0)
                    .arg(0)
                    .arg("WITHSCORES")
                    .query_async::<Vec<String>>(&mut conn)
                    .await
            }
        });
        let firsts = self
            .bounded("oldest_update", futures::future::try_join_all(firsts))
            .await?;
        let mut oldest: Option<i64> = None;
        for first in firsts {
            if let [_, score] = first.as_slice() {
                let us = score
                    .parse::<f64>()
                    .map_err(|_| malformed(format!("index score {score:?}")))?
                    as i64;
                oldest = Some(oldest.map_or(us, |o| o.min(us)));
            }
        }
        Ok(oldest.and_then(DateTime::from_timestamp_micros))
    }

    async fn counts(&self) -> Result<Counts, LedgerError> {
        let cutoff = self.cutoff_us(Self::now());
        let shards = (0..SHARDS).map(|shard| {
            let mut conn = self.conn.clone();
            let keys = self.keys.shard_keys(shard);
            let cutoff = cutoff.clone();
            async move {
                let mut inv = scripts::COUNTS.prepare_invoke();
                for k in &keys {
                    inv.key(k);
                }
                inv.arg(cutoff)
                    .arg(TRIM_PER_CALL)
                    .invoke_async::<Vec<String>>(&mut conn)
                    .await
            }
        });
        let shards = self
            .bounded("counts", futures::future::try_join_all(shards))
            .await?;
        let mut counts = Counts::default();
        for flat in shards {
            let mut it = flat.into_iter();
            while let (Some(state), Some(n)) = (it.next(), it.next()) {
                let n: i64 = n
                    .parse()
                    .map_err(|_| malformed(format!("count {n:?} of {state}")))?;
                if let Some(s) = State::parse(&state) {
                    *counts.slot(s) += n.max(0) as u64;
                }
            }
        }
        Ok(counts)
    }

    async fn ping(&self) -> Result<(), LedgerError> {
        let mut conn = self.conn.clone();
        let pong: String = self
            .bounded("ping", async move {
                redis::cmd("PING").query_async(&mut conn).await
            })
            .await?;
        if pong == "PONG" {
            Ok(())
        } else {
            Err(malformed(format!("PING answered {pong:?}")))
        }
    }

    fn describe(&self) -> String {
        self.describe.clone()
    }

    async fn intact(&self) -> Result<bool, LedgerError> {
        let shards = (0..SHARDS).map(|shard| {
            let mut conn = self.conn.clone();
            let key = self.keys.intact(shard);
            async move {
                redis::cmd("EXISTS")
                    .arg(key)
                    .query_async::<i64>(&mut conn)
                    .await
            }
        });
        let marks = self
            .bounded("intact", futures::future::try_join_all(shards))
            .await?;
        Ok(marks.iter().all(|m| *m == 1))
    }

    async fn refused_while_lost(
        &self,
        id: &str,
        wal_refs: &[String],
    ) -> Result<Vec<String>, LedgerError> {
        if wal_refs.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.conn.clone();
        let key = self.keys.lost_refused(shard_of(id));
        let refs = wal_refs.to_vec();
        let member: Vec<i64> = self
            .bounded("refused_while_lost", async move {
                redis::cmd("SMISMEMBER")
                    .arg(key)
                    .arg(&refs)
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        Ok(wal_refs
            .iter()
            .zip(member)
            .filter(|(_, m)| *m == 1)
            .map(|(r, _)| r.clone())
            .collect())
    }

    async fn begin_rebuild(&self, token: &str) -> Result<(), LedgerError> {
        let shards = (0..SHARDS).map(|shard| {
            let mut conn = self.conn.clone();
            let (key, token) = (self.keys.rebuild(shard), token.to_owned());
            async move {
                scripts::BEGIN_REBUILD
                    .key(key)
                    .arg(token)
                    .invoke_async::<i64>(&mut conn)
                    .await
            }
        });
        self.bounded("begin_rebuild", futures::future::try_join_all(shards))
            .await?;
        Ok(())
    }

    async fn mark_intact(&self, token: &str) -> Result<bool, LedgerError> {
        let shards = (0..SHARDS).map(|shard| {
            let mut conn = self.conn.clone();
            let keys = [
                self.keys.intact(shard),
                self.keys.rebuild(shard),
                self.keys.lost_refused(shard),
            ];
            let token = token.to_owned();
            async move {
                scripts::MARK_INTACT
                    .key(&keys[0])
                    .key(&keys[1])
                    .key(&keys[2])
                    .arg(token)
                    .arg(LOST_REFUSED_KEPT.as_millis() as u64)
                    .invoke_async::<i64>(&mut conn)
                    .await
            }
        });
        let marks = self
            .bounded("mark_intact", futures::future::try_join_all(shards))
            .await?;
        Ok(marks.iter().all(|m| *m == 1))
    }
}
