//! Redis-specific ledger behaviour beyond the shared contract (which checks
//! that the Lua scripts decide exactly as `transaction::machine`): retention expires
//! terminal records and keeps counts honest, and a dead Redis is a fast
//! `Unavailable`.

use crate::support::{redis_key_prefix, redis_url};
use chrono::{DateTime, Utc};
use rtp_durability::ledger::redis::{DEFAULT_TIMEOUT, RedisLedger, RedisSettings};
use rtp_durability::ledger::{Ledger, LedgerError, ListQuery, RegisterOutcome, ReplayOutcome};
use rtp_durability::transaction::{
    DeadLetterReason, Registration, Settlement, State, TransactionId, TxRecord,
};
use std::time::{Duration, Instant};

/// A new ledger, marked intact (nothing was in it before).
async fn marked(l: RedisLedger) -> RedisLedger {
    rtp_durability::ledger::mark_new(&l).await.unwrap();
    l
}

fn ledger_with(url: String, retention: Option<Duration>) -> RedisLedger {
    ledger_in(url, &redis_key_prefix(), retention)
}

/// A ledger under `prefix`: two of them on one prefix see the same keys.
fn ledger_in(url: String, prefix: &str, retention: Option<Duration>) -> RedisLedger {
    RedisLedger::connect(&RedisSettings {
        url: url.into(),
        key_prefix: prefix.to_owned(),
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
        expires_at: None,
    }
}

#[tokio::test]
async fn terminal_records_expire_after_retention_and_counts_follow() {
    let retention = Duration::from_millis(800);
    let l = marked(ledger_with(redis_url(), Some(retention))).await;
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
        l.replay("kept-replayed", "n", false, std::time::Duration::ZERO)
            .await
            .unwrap(),
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
    let l = marked(ledger_with(redis_url(), Some(retention))).await;
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
    let l = marked(ledger_with(redis_url(), None)).await;
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

/// A Redis that restarts in the middle of a rebuild with an older copy of
/// its data — the rebuild's token in it, restores made after that copy
/// gone (an RDB snapshot, an AOF that lost its tail, a failover to a
/// replica that lagged) — is not marked intact by that rebuild: the token
/// carries the server's `run_id` from when the rebuild began, and the mark
/// compares it (issue 12: the mark checked only the token, so an id whose
/// restore was lost looked new and other bytes could be accepted under it).
#[tokio::test]
async fn a_redis_restarted_mid_rebuild_is_not_marked_by_that_rebuild() {
    let mut redis = crate::support::process::OwnRedis::start();
    let prefix = redis_key_prefix();
    let on = |url: String| ledger_in(url, &prefix, None);
    let l = on(redis.url());
    l.begin_rebuild("t1").await.unwrap();
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("SAVE").query_async(&mut conn).await.unwrap();
    let rec = TxRecord::new(&reg("rb-1"), Utc::now());
    l.restore(rec).await.unwrap();
    redis.kill();
    redis.launch();
    // The copy it came back with: the token, not the restore.
    let back = on(redis.url());
    let found = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Ok(r) = back.get("rb-1").await {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap();
    assert!(found.is_none(), "the restore was lost with the restart");
    assert!(
        !back.mark_intact("t1").await.unwrap(),
        "a rebuild that began before the restart does not mark the ledger"
    );
    assert!(!back.intact().await.unwrap());
    // A rebuild begun after the restart does.
    back.begin_rebuild("t2").await.unwrap();
    assert!(back.mark_intact("t2").await.unwrap());
    assert!(back.intact().await.unwrap());
}

/// The same, without a restart: the node that took the rebuild's restores
/// is resynced from a peer that lags (a failover and a failback), keeping
/// its `run_id` and taking the peer's older data, the token included. The
/// mark compares the replication id too, which such a resync changes (a
/// reviewer's probe: with `run_id` alone the ledger was marked with a hole).
#[tokio::test]
async fn a_redis_resynced_from_a_lagging_peer_is_not_marked_by_that_rebuild() {
    use crate::support::process::OwnRedis;
    let a = OwnRedis::start();
    let b = OwnRedis::start();
    let l = ledger_with(a.url(), None);
    let conn = |url: String| async move {
        redis::Client::open(url)
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    };
    let (mut ca, mut cb) = (conn(a.url()).await, conn(b.url()).await);
    async fn follow(c: &mut redis::aio::MultiplexedConnection, port: u16) {
        let _: () = redis::cmd("REPLICAOF")
            .arg("127.0.0.1")
            .arg(port)
            .query_async(c)
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let info: String = redis::cmd("INFO")
                .arg("replication")
                .query_async(c)
                .await
                .unwrap();
            if info.contains("master_link_status:up") {
                break;
            }
            assert!(Instant::now() < deadline, "replication link: {info}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _: () = redis::cmd("REPLICAOF")
            .arg("NO")
            .arg("ONE")
            .query_async(c)
            .await
            .unwrap();
    }
    async fn run_id(c: &mut redis::aio::MultiplexedConnection) -> String {
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query_async(c)
            .await
            .unwrap();
        info.lines()
            .find_map(|l| l.strip_prefix("run_id:"))
            .unwrap()
            .trim()
            .to_owned()
    }
    l.begin_rebuild("t3").await.unwrap();
    follow(&mut cb, a.port()).await; // B copies A: the token, nothing else
    l.restore(TxRecord::new(&reg("rb-9"), Utc::now()))
        .await
        .unwrap();
    let before = run_id(&mut ca).await;
    follow(&mut ca, b.port()).await; // A takes B's older data back
    assert_eq!(run_id(&mut ca).await, before, "no restart");
    assert!(
        l.get("rb-9").await.unwrap().is_none(),
        "the restore is gone"
    );
    assert!(
        !l.mark_intact("t3").await.unwrap(),
        "a rebuild whose restores a resync undid does not mark the ledger"
    );
    l.begin_rebuild("t4").await.unwrap();
    assert!(l.mark_intact("t4").await.unwrap());
}
