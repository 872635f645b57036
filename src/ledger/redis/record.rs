//! How a `TxRecord` is stored: one Redis hash per transaction, one field per
//! attribute, absent fields for `None`, times as integer microseconds since
//! the epoch (the scripts compare them as numbers; a double holds today's
//! microseconds exactly). A hash rather than a JSON string so the scripts
//! read and write single fields without re-encoding the whole document.

use crate::transaction::{Sha256, State, TransactionId, TxRecord};
use chrono::{DateTime, Utc};
use std::collections::HashMap;

/// Times are stored with microsecond precision; the adapter rounds every time
/// it hands out the same way so a record reads back equal to what was returned.
pub fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

pub fn truncate(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(t.timestamp_micros()).unwrap_or(t)
}

/// Field/value pairs for `HSET`, `None`s left out.
pub fn to_fields(r: &TxRecord) -> Vec<(&'static str, String)> {
    let mut f = vec![
        ("transaction_id", r.transaction_id.to_string()),
        ("status", r.status.as_str().to_owned()),
        ("sha256", r.sha256.to_string()),
        ("wal_ref", r.wal_ref.to_string()),
        ("attempts", r.attempts.to_string()),
        ("attempt_base", r.attempt_base.to_string()),
        ("retry_count", r.retry_count.to_string()),
        ("created_at", micros(r.created_at).to_string()),
        ("updated_at", micros(r.updated_at).to_string()),
    ];
    let optional = [
        ("error_message", r.error_message.clone()),
        (
            "next_retry_at",
            r.next_retry_at.map(|t| micros(t).to_string()),
        ),
        ("lease_owner", r.lease_owner.clone()),
        ("lease_until", r.lease_until.map(|t| micros(t).to_string())),
        ("vendor", r.vendor.clone()),
        ("replay_nonce", r.replay_nonce.clone()),
        ("expires_at", r.expires_at.map(|t| micros(t).to_string())),
    ];
    f.extend(optional.into_iter().filter_map(|(k, v)| v.map(|v| (k, v))));
    f
}

/// Reads the flat `HGETALL` reply back; `None` for an empty reply (no key).
pub fn from_flat(flat: Vec<String>) -> Result<Option<TxRecord>, String> {
    if flat.is_empty() {
        return Ok(None);
    }
    let mut it = flat.into_iter();
    let mut m = HashMap::new();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        m.insert(k, v);
    }
    from_map(m).map(Some)
}

fn from_map(mut m: HashMap<String, String>) -> Result<TxRecord, String> {
    let id = m.get("transaction_id").cloned().unwrap_or_default();
    let bad = |field: &str| format!("record {id:?}: field {field} is missing or malformed");
    let mut take = |k: &str| m.remove(k);
    let time = |v: Option<String>, k: &str| -> Result<Option<DateTime<Utc>>, String> {
        v.map(|s| {
            s.parse::<i64>()
                .ok()
                .and_then(DateTime::from_timestamp_micros)
                .ok_or_else(|| bad(k))
        })
        .transpose()
    };
    let num = |v: Option<String>, k: &str| -> Result<u32, String> {
        v.and_then(|s| s.parse().ok()).ok_or_else(|| bad(k))
    };
    Ok(TxRecord {
        transaction_id: take("transaction_id")
            .and_then(|s| TransactionId::parse_key(&s).ok())
            .ok_or_else(|| bad("transaction_id"))?,
        status: take("status")
            .and_then(|s| State::parse(&s))
            .ok_or_else(|| bad("status"))?,
        sha256: take("sha256")
            .map(Sha256::from)
            .ok_or_else(|| bad("sha256"))?,
        wal_ref: take("wal_ref")
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("wal_ref"))?,
        attempts: num(take("attempts"), "attempts")?,
        // Absent in records written before replays reset the retry budget.
        attempt_base: match take("attempt_base") {
            Some(v) => num(Some(v), "attempt_base")?,
            None => 0,
        },
        retry_count: num(take("retry_count"), "retry_count")?,
        error_message: take("error_message"),
        next_retry_at: time(take("next_retry_at"), "next_retry_at")?,
        lease_owner: take("lease_owner"),
        lease_until: time(take("lease_until"), "lease_until")?,
        vendor: take("vendor"),
        replay_nonce: take("replay_nonce"),
        expires_at: time(take("expires_at"), "expires_at")?,
        created_at: time(take("created_at"), "created_at")?.ok_or_else(|| bad("created_at"))?,
        updated_at: time(take("updated_at"), "updated_at")?.ok_or_else(|| bad("updated_at"))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transaction::Registration;

    #[test]
    fn a_record_round_trips_through_its_fields() {
        let now = truncate(Utc::now());
        let mut r = TxRecord::new(
            &Registration {
                transaction_id: TransactionId::parse("t:1").unwrap(),
                sha256: "ab".into(),
                wal_ref: "w#0+1".parse().unwrap(),
                vendor: None,
                received_at: now,
                expires_at: None,
            },
            now,
        );
        let flat = |r: &TxRecord| {
            to_fields(r)
                .into_iter()
                .flat_map(|(k, v)| [k.to_owned(), v])
                .collect::<Vec<_>>()
        };
        assert_eq!(from_flat(flat(&r)).unwrap(), Some(r.clone()));
        r.status = State::Failed;
        r.error_message = Some("503 \"busy\"".into());
        r.next_retry_at = Some(now);
        r.lease_owner = Some("w".into());
        r.lease_until = Some(now);
        r.vendor = Some("acme".into());
        r.replay_nonce = Some("n".into());
        r.attempts = 7;
        r.attempt_base = 5;
        r.expires_at = Some(now);
        assert_eq!(from_flat(flat(&r)).unwrap(), Some(r));
        assert_eq!(from_flat(vec![]).unwrap(), None);
        assert!(from_flat(vec!["status".into(), "nope".into()]).is_err());
    }
}
