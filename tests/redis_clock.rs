//! Issue 12 item 11: the Redis claim decides by the Redis server's clock, not
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
