//! Every statement the PostgreSQL ledger runs, and how a row becomes a
//! `TxRecord`. Each ledger call is one statement (one round trip once the
//! connection has prepared it), so a transition, its checks and its count
//! change commit together. Decisions mirror `transaction::machine`; the
//! function each condition follows is named above it, and the contract suite
//! checks the two agree.
//!
//! Times are parameters from `crate::clock` (the same clock that set
//! `next_retry_at` and that the state machine compares with), except named
//! leases, which only the database reads back and which therefore use its
//! clock (`now()`): instances whose clocks differ still agree on who holds one.
//!
//! Keyed by `transaction_id`; a change of key (e.g. adding the vendor) is a
//! change of the `WHERE transaction_id = $1` clauses here and of the primary
//! key in a new migration.

use crate::transaction::{State, TransactionId, TxRecord};
use chrono::{DateTime, Utc};
use tokio_postgres::Row;

/// The record's columns, in the order [`record`] reads them.
macro_rules! cols {
    () => {
        "transaction_id, status, sha256, wal_ref, attempts, retry_count, error_message, \
         next_retry_at, lease_owner, lease_until, vendor, replay_nonce, created_at, updated_at, \
         attempt_base, expires_at"
    };
}

/// $1 id.
pub const GET: &str = concat!(
    "SELECT ",
    cols!(),
    " FROM transactions WHERE transaction_id = $1"
);

/// $1 ids (text[]): the row of the first of them that exists.
pub const GET_FIRST: &str = concat!(
    "SELECT ",
    cols!(),
    " FROM transactions WHERE transaction_id = ANY($1::text[]) \
     ORDER BY array_position($1::text[], transaction_id::text) LIMIT 1"
);

/// $1 id, $2 sha256, $3 wal_ref, $4 vendor, $5 created_at, $6 updated_at,
/// $7 payload (JSON text, or NULL when the ledger keeps no copy), $8 expires_at.
/// Returns the new row, or nothing when the id exists (the caller reads it
/// with [`GET`]: a row committed by a concurrent insert after this
/// statement's snapshot is invisible to any part of this statement).
pub const REGISTER: &str = concat!(
    "INSERT INTO transactions (transaction_id, status, sha256, wal_ref, attempts, retry_count, \
                               vendor, created_at, updated_at, payload, expires_at) \
     VALUES ($1, 'pending', $2, $3, 0, 0, $4, $5, $6, $7::text::jsonb, $8::timestamptz) \
     ON CONFLICT (transaction_id) DO NOTHING \
     RETURNING ",
    cols!()
);

/// $1 id, $2 owner, $3 now, $4 lease_until.
/// Rows: `(claimed bool, record…)`: `true` and the claimed record, or `false`
/// and the current record, locked so it is the latest version (a claim that
/// lost a race reports what the winner wrote, not the snapshot); none when
/// the id is unknown.
pub const CLAIM: &str = concat!(
    "WITH claimed AS ( \
         UPDATE transactions \
         SET attempts = attempts + 1, status = 'processing', lease_owner = $2::text, \
             lease_until = $4::timestamptz, updated_at = $3::timestamptz \
         WHERE transaction_id = $1 \
           AND ((status IN ('pending', 'failed') \
                 AND (next_retry_at IS NULL OR next_retry_at <= $3::timestamptz)) \
                OR (status = 'processing' AND (lease_until IS NULL OR lease_until <= $3::timestamptz))) \
         RETURNING ",
    cols!(),
    " ), latest AS ( SELECT ",
    cols!(),
    " FROM transactions WHERE transaction_id = $1 AND NOT EXISTS (SELECT 1 FROM claimed) \
      FOR UPDATE ) \
     SELECT true, * FROM claimed UNION ALL SELECT false, * FROM latest"
);

/// $1 id, $2 owner, $3 attempt, $4 now, $5 outcome state, $6 error,
/// $7 next_retry_at. The fencing check (machine::holds) is the `WHERE`.
/// Rows: `(settled bool, record…)`: `true` and the settled record, `false`
/// when the caller no longer holds the claim; none when the id is unknown.
pub const SETTLE: &str = concat!(
    "WITH settled AS ( \
         UPDATE transactions \
         SET status = $5::text, lease_owner = NULL, lease_until = NULL, updated_at = $4::timestamptz, \
             error_message = CASE WHEN $5::text = 'success' THEN error_message ELSE $6::text END, \
             next_retry_at = CASE WHEN $5::text = 'failed' THEN $7::timestamptz END, \
             retry_count = retry_count + CASE WHEN $5::text = 'failed' THEN 1 ELSE 0 END \
         WHERE transaction_id = $1 AND status = 'processing' \
           AND attempts = $3::integer AND lease_owner = $2::text \
         RETURNING ",
    cols!(),
    " ) SELECT true, * FROM settled \
     UNION ALL SELECT false, ",
    cols!(),
    " FROM transactions WHERE transaction_id = $1 AND NOT EXISTS (SELECT 1 FROM settled)"
);

/// $1 id, $2 owner, $3 attempt, $4 lease_until. The holder check
/// (machine::holds) is the `WHERE`; machine::apply_extension never shortens
/// the lease. Rows as [`SETTLE`]'s: `true` and the record, `false` when the
/// caller no longer holds the claim; none when the id is unknown.
pub const EXTEND_LEASE: &str = concat!(
    "WITH extended AS ( \
         UPDATE transactions \
         SET lease_until = GREATEST(lease_until, $4::timestamptz) \
         WHERE transaction_id = $1 AND status = 'processing' \
           AND attempts = $3::integer AND lease_owner = $2::text \
         RETURNING ",
    cols!(),
    " ) SELECT true, * FROM extended \
     UNION ALL SELECT false, ",
    cols!(),
    " FROM transactions WHERE transaction_id = $1 AND NOT EXISTS (SELECT 1 FROM extended)"
);

/// $1 id, $2 owner, $3 attempt, $4 now. The holder check (machine::holds)
/// is the `WHERE`; the rest is machine::apply_release. Rows as
/// [`SETTLE`]'s.
pub const RELEASE: &str = concat!(
    "WITH released AS ( \
         UPDATE transactions \
         SET status = 'pending', attempt_base = LEAST(attempt_base + 1, attempts), \
             lease_owner = NULL, lease_until = NULL, next_retry_at = NULL, \
             updated_at = $4::timestamptz \
         WHERE transaction_id = $1 AND status = 'processing' \
           AND attempts = $3::integer AND lease_owner = $2::text \
         RETURNING ",
    cols!(),
    " ) SELECT true, * FROM released \
     UNION ALL SELECT false, ",
    cols!(),
    " FROM transactions WHERE transaction_id = $1 AND NOT EXISTS (SELECT 1 FROM released)"
);

/// $1 id, $2 nonce, $3 force, $4 now, $5 quiet (seconds). Rows as
/// [`CLAIM`]'s: reset, or refused with the latest record. `next_retry_at` as
/// `machine::apply_replay`.
pub const REPLAY: &str = concat!(
    "WITH reset AS ( \
         UPDATE transactions \
         SET status = 'pending', replay_nonce = $2::text, \
             next_retry_at = CASE \
                 WHEN status = 'failed' \
                      AND LEAST(next_retry_at, updated_at + make_interval(secs => $5::float8)) > $4::timestamptz \
                     THEN LEAST(next_retry_at, updated_at + make_interval(secs => $5::float8)) \
                 WHEN status = 'dead_letter' \
                      AND updated_at + make_interval(secs => $5::float8) > $4::timestamptz \
                     THEN updated_at + make_interval(secs => $5::float8) \
                 WHEN status = 'pending' AND next_retry_at > $4::timestamptz THEN next_retry_at \
                 WHEN status = 'processing' \
                      AND lease_until + make_interval(secs => $5::float8) > $4::timestamptz \
                     THEN lease_until + make_interval(secs => $5::float8) \
             END, \
             attempt_base = CASE WHEN status = 'processing' THEN GREATEST(attempts - 1, 0) \
                                 ELSE attempts END, \
             retry_count = 0, \
             lease_owner = NULL, lease_until = NULL, updated_at = $4::timestamptz \
         WHERE transaction_id = $1 \
           AND NOT ($2::text = ANY(COALESCE(replay_withdrawn, '{}'::text[]))) \
           AND (status IN ('pending', 'failed', 'dead_letter') \
                OR (status = 'success' AND $3::boolean) \
                OR (status = 'processing' AND (lease_until IS NULL OR lease_until <= $4::timestamptz))) \
         RETURNING ",
    cols!(),
    " ), latest AS ( SELECT ",
    cols!(),
    " FROM transactions WHERE transaction_id = $1 AND NOT EXISTS (SELECT 1 FROM reset) \
      FOR UPDATE ) \
     SELECT true, * FROM reset UNION ALL SELECT false, * FROM latest"
);

/// $1 id, $2 a replay's nonce. Unless the replay took (the row carries the
/// nonce), adds it to the withdrawn ones (all of them are kept: a second
/// replay's fence must not lift the first's), which [`REPLAY`]'s `WHERE` refuses: an
/// UPDATE of that replay still queued (behind a row lock, or sent on a
/// connection whose caller gave up) then changes nothing, and one ahead of
/// this statement in the row's lock queue has committed before it re-reads
/// the row. Read the row in a statement of its own afterwards: this one's
/// snapshot predates a replay it waited for.
pub const FENCE_REPLAY: &str = "UPDATE transactions \
     SET replay_withdrawn = array_append(COALESCE(replay_withdrawn, '{}'::text[]), $2::text) \
     WHERE transaction_id = $1 AND replay_nonce IS DISTINCT FROM $2::text \
       AND NOT ($2::text = ANY(COALESCE(replay_withdrawn, '{}'::text[])))";

/// $1..$16: the record's columns in [`cols!`] order. Replaces whatever is there.
pub const RESTORE: &str = concat!(
    "INSERT INTO transactions (",
    cols!(),
    ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16) \
     ON CONFLICT (transaction_id) DO UPDATE SET \
         status = excluded.status, sha256 = excluded.sha256, wal_ref = excluded.wal_ref, \
         attempts = excluded.attempts, retry_count = excluded.retry_count, \
         error_message = excluded.error_message, next_retry_at = excluded.next_retry_at, \
         lease_owner = excluded.lease_owner, lease_until = excluded.lease_until, \
         vendor = excluded.vendor, replay_nonce = excluded.replay_nonce, \
         created_at = excluded.created_at, updated_at = excluded.updated_at, \
         attempt_base = excluded.attempt_base, expires_at = excluded.expires_at"
);

/// As [`RESTORE`], but only when the id is absent: affects 1 row or 0.
pub const RESTORE_MISSING: &str = concat!(
    "INSERT INTO transactions (",
    cols!(),
    ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16) \
     ON CONFLICT (transaction_id) DO NOTHING"
);

/// $1..$16 as [`RESTORE`], then the version the caller read: $17 status,
/// $18 attempts, $19 updated_at, $20 replay_nonce, $21 lease_owner
/// (`ledger::same_version`). Affects 1 row when that version was still
/// there and is now replaced, 0 otherwise.
pub const RESTORE_IF_UNCHANGED: &str = "\
    UPDATE transactions SET \
        status = $2, sha256 = $3, wal_ref = $4, attempts = $5, retry_count = $6, \
        error_message = $7, next_retry_at = $8, lease_owner = $9, lease_until = $10, \
        vendor = $11, replay_nonce = $12, created_at = $13, updated_at = $14, \
        attempt_base = $15, expires_at = $16 \
    WHERE transaction_id = $1 AND status = $17 AND attempts = $18 AND updated_at = $19 \
      AND replay_nonce IS NOT DISTINCT FROM $20 AND lease_owner IS NOT DISTINCT FROM $21";

/// $1 name, $2 owner, $3 ttl in microseconds. Affects 1 row when `owner`
/// holds the lease afterwards, 0 when another owner holds it.
pub const TRY_LEASE: &str = "\
    INSERT INTO leases (name, owner, held_until) \
    VALUES ($1, $2, now() + $3::bigint * interval '1 microsecond') \
    ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, held_until = excluded.held_until \
    WHERE leases.owner = excluded.owner OR leases.held_until <= now()";

/// $1 name.
pub const CHECKPOINT: &str = "SELECT value FROM checkpoints WHERE name = $1";

/// $1 name, $2 value.
pub const SET_CHECKPOINT: &str = "\
    INSERT INTO checkpoints (name, value) VALUES ($1, $2) \
    ON CONFLICT (name) DO UPDATE SET value = excluded.value";

/// $1 cursor updated_at, $2 cursor id, $3 limit. Newest first, after the cursor.
pub const LIST_ALL: &str = concat!(
    "SELECT ",
    cols!(),
    " FROM transactions WHERE (updated_at, transaction_id) < ($1::timestamptz, $2::text) \
     ORDER BY updated_at DESC, transaction_id DESC LIMIT $3"
);

/// $1 state, then as [`LIST_ALL`].
pub const LIST_STATE: &str = concat!(
    "SELECT ",
    cols!(),
    " FROM transactions WHERE status = $1 \
       AND (updated_at, transaction_id) < ($2::timestamptz, $3::text) \
     ORDER BY updated_at DESC, transaction_id DESC LIMIT $4"
);

/// $1 state. The least recent update in that state (the status index).
pub const OLDEST_UPDATE: &str = "SELECT min(updated_at) FROM transactions WHERE status = $1::text";

/// The sums of the counter slots, in `State::ALL` order.
pub const COUNTS: &str = "\
    SELECT coalesce(sum(pending), 0)::bigint, coalesce(sum(processing), 0)::bigint, \
           coalesce(sum(success), 0)::bigint, coalesce(sum(failed), 0)::bigint, \
           coalesce(sum(dead_letter), 0)::bigint \
    FROM state_counts";

/// $1 cutoff, $2 batch size. Deletes up to a batch of terminal records last
/// updated before the cutoff; the trigger takes them out of the counts.
/// Rows another statement holds are left for the next batch.
pub const PURGE_TERMINAL: &str = "\
    DELETE FROM transactions WHERE transaction_id IN ( \
        SELECT transaction_id FROM transactions \
        WHERE status IN ('success', 'dead_letter') AND updated_at < $1 \
        LIMIT $2 FOR UPDATE SKIP LOCKED)";

pub const PING: &str = "SELECT 1";

/// Where list pages start when there is no cursor: after every real update.
pub fn list_start() -> DateTime<Utc> {
    DateTime::from_timestamp(253_402_300_799, 0).unwrap_or(DateTime::<Utc>::MAX_UTC) // 9999-12-31
}

/// Times are stored with microsecond precision; every time handed out is
/// rounded the same way so a record reads back equal to what was returned.
pub fn truncate(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(t.timestamp_micros()).unwrap_or(t)
}

/// Reads a record from `row`, whose columns from `at` on are [`cols!`].
pub fn record(row: &Row, at: usize) -> Result<TxRecord, String> {
    let id: String = row.try_get(at).map_err(|e| e.to_string())?;
    let bad = |field: &str, e: &dyn std::fmt::Display| format!("record {id:?}: {field}: {e}");
    let status: String = row.try_get(at + 1).map_err(|e| bad("status", &e))?;
    let wal_ref: String = row.try_get(at + 3).map_err(|e| bad("wal_ref", &e))?;
    let count = |i: usize, name: &str| -> Result<u32, String> {
        let n: i32 = row.try_get(at + i).map_err(|e| bad(name, &e))?;
        u32::try_from(n).map_err(|e| bad(name, &e))
    };
    Ok(TxRecord {
        transaction_id: TransactionId::parse_key(&id).map_err(|e| bad("transaction_id", &e))?,
        status: State::parse(&status).ok_or_else(|| bad("status", &status))?,
        sha256: row
            .try_get::<_, String>(at + 2)
            .map_err(|e| bad("sha256", &e))?
            .into(),
        wal_ref: wal_ref.parse().map_err(|e| bad("wal_ref", &e))?,
        attempts: count(4, "attempts")?,
        retry_count: count(5, "retry_count")?,
        error_message: row.try_get(at + 6).map_err(|e| bad("error_message", &e))?,
        next_retry_at: row.try_get(at + 7).map_err(|e| bad("next_retry_at", &e))?,
        lease_owner: row.try_get(at + 8).map_err(|e| bad("lease_owner", &e))?,
        lease_until: row.try_get(at + 9).map_err(|e| bad("lease_until", &e))?,
        vendor: row.try_get(at + 10).map_err(|e| bad("vendor", &e))?,
        replay_nonce: row.try_get(at + 11).map_err(|e| bad("replay_nonce", &e))?,
        created_at: row.try_get(at + 12).map_err(|e| bad("created_at", &e))?,
        updated_at: row.try_get(at + 13).map_err(|e| bad("updated_at", &e))?,
        attempt_base: count(14, "attempt_base")?,
        expires_at: row.try_get(at + 15).map_err(|e| bad("expires_at", &e))?,
    })
}
