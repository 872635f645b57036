//! Redis-specific ledger behaviour beyond the shared contract: the Lua
//! scripts decide exactly as `transaction::machine` does, retention expires
//! terminal records and keeps counts honest, and a dead Redis is a fast
//! `Unavailable`.

use crate::support::{redis_key_prefix, redis_url};
use chrono::{DateTime, Utc};
use rtp_durability::ledger::redis::{DEFAULT_TIMEOUT, RedisLedger, RedisSettings};
use rtp_durability::ledger::{
    ClaimOutcome, Ledger, LedgerError, ListQuery, RegisterOutcome, ReplayOutcome,
};
use rtp_durability::transaction::{
    DeadLetterReason, Registration, Settlement, State, TransactionId, TxRecord,
    machine::{self, ClaimDecision},
};
use std::time::{Duration, Instant};

fn ledger_with(url: String, retention: Option<Duration>) -> RedisLedger {
    RedisLedger::connect(&RedisSettings {
        url: url.into(),
        key_prefix: redis_key_prefix(),
        entra: false,
        client_id: None,
        retention,
        timeout: DEFAULT_TIMEOUT,
    })
    .unwrap()
}

fn micros(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(t.timestamp_micros()).unwrap()
}

fn reg(id: &str) -> Registration {
    Registration {
        transaction_id: TransactionId::parse(id).unwrap(),
        sha256: "aa".into(),
        wal_ref: "wal/v1/x#0+1".parse().unwrap(),
        vendor: None,
        received_at: micros(Utc::now()),
    }
}

/// Records in every state the machine distinguishes.
fn variants(now: DateTime<Utc>) -> Vec<(&'static str, TxRecord)> {
    let base = TxRecord::new(&reg("x"), now);
    let later = now + chrono::Duration::seconds(60);
    let earlier = now - chrono::Duration::seconds(60);
    let with = |f: &dyn Fn(&mut TxRecord)| {
        let mut r = base.clone();
        r.attempts = 2;
        f(&mut r);
        r
    };
    vec![
        ("pending", base.clone()),
        (
            "processing-live",
            with(&|r| {
                r.status = State::Processing;
                r.lease_owner = Some("w1".into());
                r.lease_until = Some(later);
            }),
        ),
        (
            "processing-expired",
            with(&|r| {
                r.status = State::Processing;
                r.lease_owner = Some("w1".into());
                r.lease_until = Some(earlier);
            }),
        ),
        (
            "processing-no-lease",
            with(&|r| r.status = State::Processing),
        ),
        (
            "failed-not-due",
            with(&|r| {
                r.status = State::Failed;
                r.retry_count = 1;
                r.error_message = Some("503".into());
                r.next_retry_at = Some(later);
            }),
        ),
        (
            "failed-due",
            with(&|r| {
                r.status = State::Failed;
                r.retry_count = 1;
                r.next_retry_at = Some(earlier);
            }),
        ),
        ("failed-no-retry-at", with(&|r| r.status = State::Failed)),
        ("success", with(&|r| r.status = State::Success)),
        (
            "dead_letter",
            with(&|r| {
                r.status = State::DeadLetter;
                r.error_message = Some("400".into());
            }),
        ),
    ]
}

/// Puts `rec` under a fresh id and returns that id.
async fn put(l: &RedisLedger, name: &str, n: usize, rec: &TxRecord) -> (String, TxRecord) {
    let mut rec = rec.clone();
    rec.transaction_id = TransactionId::parse(&format!("{name}-{n}")).unwrap();
    l.restore(rec.clone()).await.unwrap();
    assert_eq!(
        l.get(&rec.transaction_id).await.unwrap().as_ref(),
        Some(&rec)
    );
    (rec.transaction_id.to_string(), rec)
}

#[tokio::test]
async fn scripts_decide_exactly_as_the_state_machine() {
    let l = ledger_with(redis_url(), Some(Duration::from_secs(86_400)));
    let now = micros(Utc::now());
    let lease = Duration::from_secs(30);
    for (i, (name, rec)) in variants(now).into_iter().enumerate() {
        // claim
        let (id, before) = put(&l, name, i * 10, &rec).await;
        let got = l.claim(&id, "w2", lease).await.unwrap();
        match (machine::decide_claim(&before, Utc::now()), got) {
            (ClaimDecision::Terminal, ClaimOutcome::Terminal(r))
            | (ClaimDecision::Busy, ClaimOutcome::Busy(r))
            | (ClaimDecision::NotDue, ClaimOutcome::NotDue(r)) => assert_eq!(r, before, "{name}"),
            (ClaimDecision::Claim { attempt }, ClaimOutcome::Claimed(r)) => {
                let mut want = before.clone();
                machine::apply_claim(&mut want, "w2", r.lease_until.unwrap(), r.updated_at);
                assert_eq!(r, want, "{name}");
                assert_eq!(r.attempts, attempt, "{name}");
                assert_eq!(l.get(&id).await.unwrap(), Some(want), "{name}");
            }
            (d, o) => panic!("{name}: machine says {d:?}, Redis says {o:?}"),
        }

        // settle, by the owner of record and by a stranger
        for (j, s) in [
            Settlement::Success,
            Settlement::Failed {
                error: "e".into(),
                next_retry_at: now,
            },
            Settlement::DeadLetter {
                reason: DeadLetterReason::PermanentFailure,
                error: "d".into(),
            },
        ]
        .into_iter()
        .enumerate()
        {
            for (k, (owner, attempt)) in [("w1", 2), ("w2", 2), ("w1", 3)].into_iter().enumerate() {
                let (id, before) = put(&l, name, i * 10 + 1 + j * 3 + k, &rec).await;
                let got = l.settle(&id, owner, attempt, s.clone()).await;
                if machine::holds(&before, owner, attempt) {
                    let r = got.unwrap();
                    let mut want = before.clone();
                    machine::apply_settlement(&mut want, &s, r.updated_at);
                    assert_eq!(r, want, "{name} {s:?}");
                    assert_eq!(l.get(&id).await.unwrap(), Some(want), "{name}");
                } else {
                    assert!(
                        matches!(got, Err(LedgerError::Fenced { .. })),
                        "{name}: {got:?}"
                    );
                    assert_eq!(
                        l.get(&id).await.unwrap(),
                        Some(before),
                        "fenced changes nothing"
                    );
                }
            }
        }

        // replay, with and without force
        for (j, force) in [false, true].into_iter().enumerate() {
            let (id, before) = put(&l, name, i * 10 + 100 + j, &rec).await;
            match l.replay(&id, "n", force).await.unwrap() {
                ReplayOutcome::Reset(r) => {
                    assert!(machine::may_replay(&before, force, Utc::now()), "{name}");
                    let mut want = before.clone();
                    machine::apply_replay(&mut want, "n", r.updated_at);
                    assert_eq!(r, want, "{name}");
                }
                ReplayOutcome::Refused(r) => {
                    assert!(!machine::may_replay(&before, force, Utc::now()), "{name}");
                    assert_eq!(r, before);
                }
                ReplayOutcome::NotFound => panic!("{name}: restored record not found"),
            }
        }
    }
    // Every transition kept the per-state counts equal to the records.
    let counts = l.counts().await.unwrap();
    let mut by_state = rtp_durability::ledger::Counts::default();
    let mut cursor = None;
    loop {
        let page = l
            .list(ListQuery {
                state: None,
                limit: 50,
                cursor,
            })
            .await
            .unwrap();
        for r in &page.items {
            *by_state.slot(r.status) += 1;
        }
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    assert_eq!(counts, by_state);
}

#[tokio::test]
async fn terminal_records_expire_after_retention_and_counts_follow() {
    let retention = Duration::from_millis(800);
    let l = ledger_with(redis_url(), Some(retention));
    for id in ["gone-ok", "gone-dl", "kept-replayed", "kept-pending"] {
        l.register(reg(id)).await.unwrap();
    }
    for (id, s) in [
        ("gone-ok", Settlement::Success),
        (
            "gone-dl",
            Settlement::DeadLetter {
                reason: DeadLetterReason::PermanentFailure,
                error: "x".into(),
            },
        ),
        (
            "kept-replayed",
            Settlement::DeadLetter {
                reason: DeadLetterReason::PermanentFailure,
                error: "x".into(),
            },
        ),
    ] {
        l.claim(id, "w", Duration::from_secs(30)).await.unwrap();
        l.settle(id, "w", 1, s).await.unwrap();
    }
    // A replay takes the record out of the terminal state: no more expiry.
    assert!(matches!(
        l.replay("kept-replayed", "n", false).await.unwrap(),
        ReplayOutcome::Reset(_)
    ));
    let c = l.counts().await.unwrap();
    assert_eq!((c.pending, c.success, c.dead_letter), (2, 1, 1));

    tokio::time::sleep(retention + Duration::from_millis(500)).await;
    assert!(l.get("gone-ok").await.unwrap().is_none());
    assert!(l.get("gone-dl").await.unwrap().is_none());
    assert!(l.get("kept-replayed").await.unwrap().is_some());
    assert!(l.get("kept-pending").await.unwrap().is_some());
    let c = l.counts().await.unwrap();
    assert_eq!(
        (c.pending, c.processing, c.success, c.failed, c.dead_letter),
        (2, 0, 0, 0, 0),
        "expired records leave the counts"
    );
    let all = l
        .list(ListQuery {
            state: None,
            limit: 100,
            cursor: None,
        })
        .await
        .unwrap();
    let mut ids: Vec<_> = all
        .items
        .iter()
        .map(|r| r.transaction_id.as_str())
        .collect();
    ids.sort();
    assert_eq!(ids, ["kept-pending", "kept-replayed"]);

    // The dedup window is over: the same id is new again (the WAL keeps the
    // long-term record), and counted once.
    assert!(matches!(
        l.register(reg("gone-ok")).await.unwrap(),
        RegisterOutcome::New(_)
    ));
    assert_eq!(l.counts().await.unwrap().pending, 3);
}

#[tokio::test]
async fn expired_records_leave_counts_even_before_a_trim() {
    // Re-registering an expired id whose index entries were not trimmed yet
    // must not count it twice.
    let retention = Duration::from_millis(300);
    let l = ledger_with(redis_url(), Some(retention));
    l.register(reg("again")).await.unwrap();
    l.claim("again", "w", Duration::from_secs(30))
        .await
        .unwrap();
    l.settle("again", "w", 1, Settlement::Success)
        .await
        .unwrap();
    tokio::time::sleep(retention + Duration::from_millis(300)).await;
    assert!(matches!(
        l.register(reg("again")).await.unwrap(),
        RegisterOutcome::New(_)
    ));
    let c = l.counts().await.unwrap();
    assert_eq!((c.pending, c.success, c.total()), (1, 0, 1));
}

#[tokio::test]
async fn a_dead_redis_is_a_fast_unavailable() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let l = ledger_with(format!("redis://127.0.0.1:{port}"), None);
    let started = Instant::now();
    let e = l.ping().await.unwrap_err();
    assert!(matches!(e, LedgerError::Unavailable(_)), "{e:?}");
    let e = l.register(reg("x")).await.unwrap_err();
    assert!(e.is_retryable(), "{e:?}");
    let e = l.get("x").await.unwrap_err();
    assert!(matches!(e, LedgerError::Unavailable(_)), "{e:?}");
    assert!(
        started.elapsed() < DEFAULT_TIMEOUT * 3 + Duration::from_millis(500),
        "each call is bounded: {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn pages_across_shards_keep_order_and_ties() {
    // Many records share one updated_at across all shards: the cursor must
    // neither skip nor repeat any of them, in the local ledger's order
    // (updated_at desc, id desc).
    let l = ledger_with(redis_url(), None);
    let t0 = micros(Utc::now());
    let mut want = Vec::new();
    for i in 0..45 {
        let mut r = TxRecord::new(&reg(&format!("tie-{i:02}")), t0);
        r.updated_at = t0 + chrono::Duration::microseconds(i64::from(i % 3 == 0));
        if i % 4 == 0 {
            r.status = State::Failed;
        }
        l.restore(r.clone()).await.unwrap();
        want.push((r.updated_at, r.transaction_id.clone(), r.status));
    }
    want.sort_by(|a, b| (b.0, &b.1).cmp(&(a.0, &a.1)));
    for state in [None, Some(State::Pending), Some(State::Failed)] {
        let mut got = Vec::new();
        let mut cursor = None;
        loop {
            let page = l
                .list(ListQuery {
                    state,
                    limit: 4,
                    cursor,
                })
                .await
                .unwrap();
            got.extend(page.items.iter().map(|r| r.transaction_id.clone()));
            match page.next_cursor {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        let expected: Vec<_> = want
            .iter()
            .filter(|w| state.is_none_or(|s| s == w.2))
            .map(|w| w.1.clone())
            .collect();
        assert_eq!(got, expected, "{state:?}");
    }
}
