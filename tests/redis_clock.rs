//! Clock skew (tests that move this process's clock). Issue 12 item 11: the Redis claim decides by the Redis server's clock, not
//! the caller's. A test binary of its own: it moves this process's clock
//! (`clock::simulate`), which must not touch any other test.

use chrono::{Duration as ChronoDuration, Utc};
use rtp_durability::ledger::redis::{DEFAULT_TIMEOUT, RedisLedger, RedisSettings};
use rtp_durability::ledger::{ClaimOutcome, Ledger};
use rtp_durability::transaction::{Registration, Settlement, TransactionId};
use std::time::Duration;

#[tokio::test]
async fn redis_claim_decides_by_the_server_clock() {
    let url = std::env::var("RTPD_TEST_REDIS_URL")
        .expect("RTPD_TEST_REDIS_URL is not set: run the tests with scripts/test.sh");
    let l = RedisLedger::connect(&RedisSettings {
        url: url.as_str().into(),
        key_prefix: format!("t-{}", uuid::Uuid::new_v4().simple()),
        entra: false,
        client_id: None,
        retention: None,
        timeout: DEFAULT_TIMEOUT,
    })
    .unwrap();
    rtp_durability::ledger::mark_new(&l).await.unwrap();
    l.register(Registration {
        transaction_id: TransactionId::parse("clk-1").unwrap(),
        sha256: "aa".into(),
        wal_ref: "w#0+1".parse().unwrap(),
        vendor: None,
        received_at: Utc::now(),
        expires_at: None,
    })
    .await
    .unwrap();
    l.claim("clk-1", "w1", Duration::from_secs(30))
        .await
        .unwrap();
    // The retry is due by the server's (true) clock a minute ago.
    let due = Utc::now() - ChronoDuration::minutes(1);
    l.settle(
        "clk-1",
        "w1",
        1,
        Settlement::Failed {
            error: "503".into(),
            next_retry_at: due,
        },
    )
    .await
    .unwrap();
    // This process's clock now runs an hour behind the server's.
    assert!(rtp_durability::clock::simulate(
        Utc::now() - ChronoDuration::hours(1),
        1
    ));
    let ClaimOutcome::Claimed(rec) = l
        .claim("clk-1", "w2", Duration::from_secs(30))
        .await
        .unwrap()
    else {
        panic!("due by the server's clock, so claimable whatever the caller's clock says")
    };
    // The lease runs from the server's now, not the caller's.
    let lease_until = rec.lease_until.unwrap();
    assert!(
        lease_until > Utc::now() + ChronoDuration::seconds(20),
        "{lease_until}"
    );
}

/// The due times a process computes on its own clock (a retry's, a
/// restore's wait for a lost process's call) are stored on the server's:
/// a processor whose clock runs behind does not make them due early (the
/// long fault campaign's overlapping calls: a retry after a timed-out call
/// reached the downstream while it still worked on that call).
#[tokio::test]
async fn due_times_set_on_a_clock_running_behind_are_kept_on_the_servers() {
    let url = std::env::var("RTPD_TEST_REDIS_URL")
        .expect("RTPD_TEST_REDIS_URL is not set: run the tests with scripts/test.sh");
    let l = RedisLedger::connect(&RedisSettings {
        url: url.as_str().into(),
        key_prefix: format!("t-{}", uuid::Uuid::new_v4().simple()),
        entra: false,
        client_id: None,
        retention: None,
        timeout: DEFAULT_TIMEOUT,
    })
    .unwrap();
    rtp_durability::ledger::mark_new(&l).await.unwrap();
    // This process's clock runs a minute behind the server's.
    assert!(rtp_durability::clock::simulate(
        Utc::now() - ChronoDuration::minutes(1),
        1
    ));
    let reg = |id: &str| Registration {
        transaction_id: TransactionId::parse(id).unwrap(),
        sha256: "aa".into(),
        wal_ref: "w#0+1".parse().unwrap(),
        vendor: None,
        received_at: rtp_durability::clock::now(),
        expires_at: None,
    };
    l.register(reg("skew-1")).await.unwrap();
    l.claim("skew-1", "w1", Duration::from_secs(30))
        .await
        .unwrap();
    let retry_in = ChronoDuration::seconds(20);
    let rec = l
        .settle(
            "skew-1",
            "w1",
            1,
            Settlement::Failed {
                error: "timed out".into(),
                next_retry_at: rtp_durability::clock::now() + retry_in,
            },
        )
        .await
        .unwrap();
    let due = rec.next_retry_at.unwrap();
    assert!(
        due > Utc::now() + ChronoDuration::seconds(15),
        "the retry is due {due}, 20 s from the caller's now, not 20 s from the server's"
    );
    assert!(
        matches!(
            l.claim("skew-1", "w2", Duration::from_secs(30))
                .await
                .unwrap(),
            ClaimOutcome::NotDue(_)
        ),
        "a retry set 20 s ahead on a clock a minute behind was claimable at once"
    );

    // A restore's wait (a lost process's call may still be running).
    let mut restored =
        rtp_durability::transaction::TxRecord::new(&reg("skew-2"), rtp_durability::clock::now());
    restored.status = rtp_durability::transaction::State::Failed;
    restored.attempts = 1;
    restored.next_retry_at = Some(rtp_durability::clock::now() + ChronoDuration::seconds(7));
    assert!(l.restore_missing(restored).await.unwrap());
    assert!(
        matches!(
            l.claim("skew-2", "w3", Duration::from_secs(30))
                .await
                .unwrap(),
            ClaimOutcome::NotDue(_)
        ),
        "a restored transaction's wait, set on a clock a minute behind, was over at once"
    );
}

/// A journal segment is filed under its writer's hour: a success journaled
/// just after the hour by a processor whose clock runs 2 s behind is in the
/// hour before the one the transaction was received in, and the journal
/// read before a re-attempt's call still finds it (a reviewer's probe: it
/// listed from the hour of `received_at` only, and the call went out again).
#[tokio::test]
async fn a_journal_read_finds_a_success_filed_in_the_hour_before_by_a_clock_behind() {
    use chrono::TimeZone;
    use rtp_durability::journal::{EntryKind, Journal, JournalEntry, SHARED_INDEX_MAX_IDS};
    use rtp_durability::transaction::State;
    use rtp_durability::wal::{GroupCommit, JOURNAL_PREFIX, Log, memory::MemoryStore};
    let journal = Journal::new(Log::start(
        std::sync::Arc::new(MemoryStore::default()),
        JOURNAL_PREFIX,
        "t",
        GroupCommit::default(),
    ));
    let received_at =
        Utc.with_ymd_and_hms(2026, 12, 1, 12, 0, 0).unwrap() + ChronoDuration::milliseconds(500);
    // The processor that called runs 2 s behind intake: 11:59:58.8 on its clock.
    rtp_durability::clock::simulate(received_at - ChronoDuration::milliseconds(1700), 1);
    journal
        .append(&JournalEntry {
            v: 1,
            kind: EntryKind::Attempt,
            transaction_id: "paid".into(),
            at: rtp_durability::clock::now(),
            attempt: Some(1),
            state: State::Success,
            error: None,
            next_retry_at: None,
            actor: "w1".into(),
            reason: None,
            sha256: None,
            wal_ref: None,
            replay_nonce: None,
            latency_ms: None,
        })
        .await
        .unwrap();
    // Another processor, on the right clock, reads before its call.
    rtp_durability::clock::simulate(received_at + ChronoDuration::seconds(1), 1);
    let shared = rtp_durability::journal::SharedIndex::default();
    shared
        .refresh(&journal, received_at, SHARED_INDEX_MAX_IDS)
        .await
        .unwrap();
    assert!(
        shared.index.lock().await.known("paid").is_some(),
        "a success journaled in the hour before (2 s of clock skew) was not read"
    );
}

/// An unforced replay is refused while a claim's lease runs on the server's
/// clock, whatever the replaying process's clock says (a reviewer's probe: a
/// process 90 s ahead reset a live claim and left it due at once — a second
/// call while the first ran).
#[tokio::test]
async fn a_replay_from_a_clock_ahead_does_not_reset_a_live_claim() {
    let url = std::env::var("RTPD_TEST_REDIS_URL")
        .expect("RTPD_TEST_REDIS_URL is not set: run the tests with scripts/test.sh");
    let l = RedisLedger::connect(&RedisSettings {
        url: url.as_str().into(),
        key_prefix: format!("t-{}", uuid::Uuid::new_v4().simple()),
        entra: false,
        client_id: None,
        retention: None,
        timeout: DEFAULT_TIMEOUT,
    })
    .unwrap();
    rtp_durability::ledger::mark_new(&l).await.unwrap();
    l.register(Registration {
        transaction_id: TransactionId::parse("rp-1").unwrap(),
        sha256: "aa".into(),
        wal_ref: "w#0+1".parse().unwrap(),
        vendor: None,
        received_at: Utc::now(),
        expires_at: None,
    })
    .await
    .unwrap();
    let ClaimOutcome::Claimed(c) = l
        .claim("rp-1", "w1", Duration::from_secs(30))
        .await
        .unwrap()
    else {
        panic!("a new transaction is claimable")
    };
    // The replaying process's clock runs 90 s ahead of the server's.
    assert!(rtp_durability::clock::simulate(
        Utc::now() + ChronoDuration::seconds(90),
        1
    ));
    let out = l
        .replay("rp-1", "n1", false, Duration::from_secs(30))
        .await
        .unwrap();
    assert!(
        matches!(out, rtp_durability::ledger::ReplayOutcome::Refused(_)),
        "unforced replay of a claim whose lease runs to {:?} (server clock) was accepted: {out:?}",
        c.lease_until
    );
}
