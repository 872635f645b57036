//! A claim outlasts its holder's work (issue 22). A worker extends its
//! claim's lease (`Ledger::extend_lease`) while an attempt runs longer than
//! the lease it claimed with — through the call and while the outcome
//! journal does not answer — and calls the downstream only on a lease it is
//! sure of. So no other worker, re-drive or replay takes the transaction
//! over and calls again meanwhile; and when the ledger is what is down (no
//! extension possible), the worker calls no one until an extension answers.

use crate::support::process::OwnRedis;
use crate::support::stores::{Switchable, journal_on};
use crate::support::{AppOptions, TestApp, key, spawn_app_with};
use rtp_durability::journal::Journal;
use rtp_durability::ledger::ClaimOutcome;
use rtp_durability::mock_downstream::MockOptions;
use rtp_durability::processor::{Outcome, Processor};
use rtp_durability::reconcile::ReconcileOptions;
use rtp_durability::transaction::State;
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LOCK_SECS: f64 = 1.0;
const TIMEOUT_SECS: f64 = 1.0;
/// The lease a claim takes: the lock duration plus the downstream timeout.
const LEASE: Duration = Duration::from_secs(2);

fn options(latency: Duration) -> AppOptions {
    AppOptions {
        lock_secs: LOCK_SECS,
        downstream_timeout_secs: TIMEOUT_SECS,
        mock: MockOptions {
            success_rate: 1.0,
            latency,
            ..Default::default()
        },
        ..Default::default()
    }
}

/// A second processor of the app, as its own worker (owner name) with its
/// own outcome journal.
fn worker(app: &TestApp, owner: &str, journal: Journal) -> Processor {
    let mut p = app.services.processor().unwrap();
    p.owner = owner.into();
    p.journal = journal;
    p
}

/// A reconciler pass that re-drives a lease lapsed by more than 100 ms (the
/// takeover a lapsed lease invites); returns how many it re-drove. Retried
/// while a ledger that just came back does not answer yet.
async fn redrive_lapsed(app: &TestApp) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = chrono::Utc::now();
        let mut o = ReconcileOptions::new(
            now - chrono::Duration::hours(1),
            now + chrono::Duration::minutes(1),
            Duration::from_millis(100),
        );
        o.redrive_pending = false;
        match app.services.reconciler().reconcile(&o).await {
            Ok(r) => return r.redriven_processing,
            Err(e) => assert!(Instant::now() < deadline, "reconcile: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An earlier attempt that died holding the claim: the next claim is
/// attempt 2, which reads the outcome journal before it calls.
async fn lapse_an_attempt(app: &TestApp, id: &str) {
    let c = app
        .services
        .ledger
        .claim(id, "died", Duration::from_millis(100))
        .await
        .unwrap();
    assert!(matches!(c, ClaimOutcome::Claimed(_)), "{c:?}");
    tokio::time::sleep(Duration::from_millis(200)).await;
}

/// Whether a lease owner name is one of `worker`'s claims (a worker names
/// each claim's lease `<worker>/<incarnation>.<n>`).
fn claimed_by(lease_owner: Option<&str>, worker: &str) -> bool {
    lease_owner
        .and_then(|o| o.strip_prefix(worker))
        .is_some_and(|rest| rest.starts_with('/'))
}

async fn until_claimed_by(app: &TestApp, id: &str, owner: &str, attempt: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = app.find(id).await.unwrap();
        if r.attempts == attempt && claimed_by(r.lease_owner.as_deref(), owner) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{owner} claims attempt {attempt}: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn calls(app: &TestApp, id: &str) -> u64 {
    app.mock_calls().await["by_key"][id]["calls"]
        .as_u64()
        .unwrap_or(0)
}

/// A journal outage longer than twice the lease, after the call: the
/// worker keeps its claim's lease while it waits to record the outcome, so
/// the reconciler finds nothing lapsed and another worker finds the
/// transaction busy — nobody calls again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_journal_outage_longer_than_the_lease_lets_no_one_call_again() {
    let app = spawn_app_with(options(Duration::ZERO)).await;
    let id = key("JL-1");
    let r = app
        .post_json(&json!({ "transaction_id": "JL-1", "amount": "1.00" }))
        .await;
    assert_eq!(r.status(), 202);
    let store = Switchable::new(app.services.journal.log().store().clone());
    let a = worker(&app, "worker-a", journal_on(store.clone(), "worker-a"));
    store.set_down(true);

    let work = a.try_process_next(Duration::from_secs(5));
    let check = async {
        let deadline = Instant::now() + Duration::from_secs(10);
        while calls(&app, &id).await == 0 {
            assert!(Instant::now() < deadline, "worker A calls");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Worker A has called and cannot write its outcome.
        tokio::time::sleep(LEASE * 2 + Duration::from_millis(500)).await;
        let redriven = redrive_lapsed(&app).await;
        let other = app
            .processor
            .try_process_next(Duration::from_millis(500))
            .await
            .unwrap();
        store.set_down(false);
        (redriven, other)
    };
    let (outcome, (redriven, other)) = tokio::join!(work, check);
    assert_eq!(redriven, 0, "the lease was kept: nothing looked lapsed");
    assert!(
        matches!(other, Outcome::Empty | Outcome::Busy),
        "another worker does not take the transaction over: {other:?}"
    );
    assert_eq!(outcome.unwrap(), Outcome::Succeeded);
    let rec = app.record("JL-1").await;
    assert_eq!((rec.status, rec.attempts), (State::Success, 1));
    let all = app.mock_calls().await;
    assert_eq!(all["by_key"][id.as_str()]["calls"], 1, "{all}");
}

/// A worker slow between its claim and its call — the journal read of a
/// re-attempt takes longer than the lease (the load case: after a ledger
/// loss, with the blob store faulty) — keeps its claim meanwhile: the
/// reconciler finds nothing lapsed, another worker finds nothing to take
/// over, and the slow worker calls once, on attempt 2. Before, the lease
/// lapsed during the read and every takeover was an attempt without a
/// call: the fault campaign's `executed_but_dead_lettered` (seed 1,
/// 2026-11-30). A worker whose lease does lapse (the ledger is down, so
/// nothing can keep it) still does not call on it: the next test.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_journal_read_before_the_call_keeps_the_claim() {
    let app = spawn_app_with(options(Duration::ZERO)).await;
    let id = key("SC-1");
    let r = app
        .post_json(&json!({ "transaction_id": "SC-1", "amount": "1.00" }))
        .await;
    assert_eq!(r.status(), 202);
    lapse_an_attempt(&app, &id).await;
    let store = Switchable::new(app.services.journal.log().store().clone());
    store.delay_next_list(LEASE + Duration::from_millis(500));
    let a = worker(&app, "worker-a", journal_on(store, "worker-a"));

    let work = a.try_process_next(Duration::from_secs(5));
    let check = async {
        until_claimed_by(&app, &id, "worker-a", 2).await;
        // Past the lease the claim was taken with, while worker A still reads.
        tokio::time::sleep(LEASE + Duration::from_millis(200)).await;
        assert_eq!(calls(&app, &id).await, 0, "worker A is still reading");
        let redriven = redrive_lapsed(&app).await;
        let other = app
            .processor
            .try_process_next(Duration::from_millis(300))
            .await
            .unwrap();
        (redriven, other)
    };
    let (slow, (redriven, other)) = tokio::join!(work, check);
    assert_eq!(redriven, 0, "the claim's lease was kept: nothing lapsed");
    assert!(
        matches!(other, Outcome::Empty | Outcome::Busy),
        "another worker does not take the transaction over: {other:?}"
    );
    assert_eq!(slow.unwrap(), Outcome::Succeeded);
    let rec = app.record("SC-1").await;
    assert_eq!((rec.status, rec.attempts), (State::Success, 2));
    let all = app.mock_calls().await;
    assert_eq!(all["by_key"][id.as_str()]["calls"], 1, "{all}");
    assert_eq!(all["concurrent_overlaps"], 0, "{all}");
}

/// A journal outage longer than the read's own patience (15 s) before a
/// re-attempt's call: the worker keeps its claim and tries again rather
/// than giving the message back — each give-back was an attempt counted
/// without a call, and enough of them dead-lettered a payment that may
/// have paid (a reviewer's probe). Once the journal answers it calls, once,
/// on attempt 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_journal_outage_before_the_call_costs_no_attempt() {
    let app = spawn_app_with(options(Duration::ZERO)).await;
    let id = key("JO-1");
    let r = app
        .post_json(&json!({ "transaction_id": "JO-1", "amount": "1.00" }))
        .await;
    assert_eq!(r.status(), 202);
    lapse_an_attempt(&app, &id).await;
    let store = Switchable::new(app.services.journal.log().store().clone());
    store.set_down(true);
    let a = worker(&app, "worker-a", journal_on(store.clone(), "worker-a"));
    let work = a.try_process_next(Duration::from_secs(5));
    let check = async {
        until_claimed_by(&app, &id, "worker-a", 2).await;
        tokio::time::sleep(Duration::from_secs(20)).await;
        let during = app.find(&id).await.unwrap();
        store.set_down(false);
        during
    };
    let (outcome, during) = tokio::join!(work, check);
    assert!(
        during.attempts == 2 && claimed_by(during.lease_owner.as_deref(), "worker-a"),
        "still worker A's attempt 2 after 20 s of outage: {during:?}"
    );
    assert_eq!(outcome.unwrap(), Outcome::Succeeded);
    let rec = app.record("JO-1").await;
    assert_eq!((rec.status, rec.attempts), (State::Success, 2));
    assert_eq!(calls(&app, &id).await, 1);
}

/// Claims that end before any call — the journal read before a
/// re-attempt's call failed, so the worker gave the message back — do not
/// count towards the crash-loop guard (issue 12, the claims-without-calls
/// budget). Each give-back releases its claim in the ledger (`release`):
/// no call was made under it, so the retry budget and the "attempts
/// without an outcome" count stay where they were. Before, three give-backs
/// with `RTPD_MAX_RETRIES=0` (and an attempt that died before them)
/// dead-lettered the payment as "4 attempts started without an outcome"
/// without a single downstream call.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn claims_released_before_the_call_do_not_count_as_attempts() {
    let app = spawn_app_with(AppOptions {
        max_retries: 0,
        ..options(Duration::ZERO)
    })
    .await;
    let id = key("RB-1");
    let r = app
        .post_json(&json!({ "transaction_id": "RB-1", "amount": "1.00" }))
        .await;
    assert_eq!(r.status(), 202);
    lapse_an_attempt(&app, &id).await;
    let store = Switchable::new(app.services.journal.log().store().clone());
    store.set_refusing(true);
    let mut a = worker(&app, "worker-a", journal_on(store.clone(), "worker-a"));
    a.journal_read_hold = Duration::from_millis(200);
    // Three claims give the message back without calling. (Without the
    // release, each next delivery meets the last claim's lease as busy
    // until it lapses, then claims again: three counted attempts all the same.)
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut deferred = 0;
    while deferred < 3 {
        assert!(Instant::now() < deadline, "three give-backs: {deferred}");
        match a.try_process_next(Duration::from_secs(2)).await.unwrap() {
            Outcome::Deferred(_) => deferred += 1,
            Outcome::Busy | Outcome::Empty => {}
            o => panic!("{o:?}"),
        }
    }
    assert_eq!(calls(&app, &id).await, 0);
    store.set_refusing(false);
    let outcome = loop {
        assert!(Instant::now() < deadline, "an outcome");
        match a.try_process_next(Duration::from_secs(2)).await.unwrap() {
            Outcome::Busy | Outcome::Empty => {}
            o => break o,
        }
    };
    assert_eq!(outcome, Outcome::Succeeded, "{:?}", app.find(&id).await);
    let rec = app.record("RB-1").await;
    assert_eq!(rec.status, State::Success);
    assert_eq!(calls(&app, &id).await, 1);
}

/// The ledger is what is down when the worker is ready to call on a lease
/// that has lapsed meanwhile: no extension is possible, so it holds the
/// message and calls no one. After the ledger returns, whoever holds the
/// claim calls — the worker itself (its extension answered first: nobody
/// took the transaction over) or another worker (its takeover came first:
/// the worker's extension is fenced). One call either way, no overlap.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lease_that_lapsed_while_the_ledger_was_down_is_not_called_on() {
    let mut redis = OwnRedis::start_persistent();
    let app = spawn_app_with(AppOptions {
        redis_url: Some(redis.url()),
        ..options(Duration::from_millis(300))
    })
    .await;
    let id = key("LD-1");
    let r = app
        .post_json(&json!({ "transaction_id": "LD-1", "amount": "1.00" }))
        .await;
    assert_eq!(r.status(), 202);
    lapse_an_attempt(&app, &id).await;
    let store = Switchable::new(app.services.journal.log().store().clone());
    store.delay_next_list(LEASE + Duration::from_secs(1));
    let a = worker(&app, "worker-a", journal_on(store, "worker-a"));

    let work = a.try_process_next(Duration::from_secs(5));
    let check = async {
        until_claimed_by(&app, &id, "worker-a", 2).await;
        redis.kill();
        // Worker A is ready to call a second after its lease ended, with
        // the ledger down.
        tokio::time::sleep(LEASE + Duration::from_secs(2)).await;
        let during = calls(&app, &id).await;
        redis.launch();
        redrive_lapsed(&app).await;
        let other = app
            .processor
            .try_process_next(Duration::from_secs(2))
            .await
            .unwrap();
        (during, other)
    };
    let (outcome, (during, other)) = tokio::join!(work, check);
    assert_eq!(during, 0, "no call while the lease could not be extended");
    let outcome = outcome.unwrap();
    let rec = app.record("LD-1").await;
    assert_eq!(rec.status, State::Success);
    match (&outcome, &other) {
        (Outcome::Succeeded, Outcome::Empty | Outcome::Busy | Outcome::Skipped(_)) => {
            assert_eq!(rec.attempts, 2, "worker A kept its claim")
        }
        (Outcome::Fenced, Outcome::Succeeded) => {
            assert_eq!(rec.attempts, 3, "another worker took it over")
        }
        _ => panic!("worker A: {outcome:?}, the other: {other:?}"),
    }
    let all = app.mock_calls().await;
    assert_eq!(all["by_key"][id.as_str()]["calls"], 1, "{all}");
    assert_eq!(all["concurrent_overlaps"], 0, "{all}");
}

/// A TCP relay in front of Redis that can hold Redis's answers back:
/// commands still reach Redis and take effect at once, their answers wait
/// in the relay (a network stalled in one direction) — a client's try
/// times out although its write was done.
struct StallingRelay {
    port: u16,
    holding: Arc<AtomicBool>,
}

impl StallingRelay {
    async fn start(to: u16) -> StallingRelay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let holding = Arc::new(AtomicBool::new(false));
        let hold = holding.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await else {
                    continue;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                tokio::spawn(async move { tokio::io::copy(&mut cr, &mut sw).await });
                let hold = hold.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match sr.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        while hold.load(Ordering::SeqCst) {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        if cw.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        StallingRelay { port, holding }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn hold_answers(&self, on: bool) {
        self.holding.store(on, Ordering::SeqCst);
    }
}

/// The network holds back the ledger's answer to a worker's claim past the
/// client's timeout: the claim took effect, the worker's try failed. Its next try meets the lease
/// its own first try took — under this claim's own lease name — and
/// carries on with it: one call, attempt 1, done within seconds. Before,
/// the retry found its own lease "busy" and left the message to its lock:
/// with production timeouts the payment waited out the lock and the lease
/// (the recovery campaign, seed 22: 123 s after a 5 s Redis stall).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_claim_whose_answer_was_lost_is_carried_on() {
    let redis = OwnRedis::start();
    let relay = StallingRelay::start(redis.port()).await;
    let app = spawn_app_with(AppOptions {
        redis_url: Some(relay.url()),
        // Production-sized: a claim left to its lease waits over a minute.
        lock_secs: 60.0,
        downstream_timeout_secs: 10.0,
        ..options(Duration::ZERO)
    })
    .await;
    let a = worker(&app, "worker-a", app.services.journal.clone());
    // One payment first: Redis has the claim script (a first EVALSHA is
    // answered NOSCRIPT and sent again, which a stall would hold up before
    // the claim runs at all).
    for id in ["AC-0", "AC-1"] {
        let r = app
            .post_json(&json!({ "transaction_id": id, "amount": "1.00" }))
            .await;
        assert_eq!(r.status(), 202);
    }
    assert_eq!(
        a.try_process_next(Duration::from_secs(5)).await.unwrap(),
        Outcome::Succeeded
    );
    let id = key("AC-1");
    relay.hold_answers(true);
    let work = a.try_process_next(Duration::from_secs(5));
    let answering = async {
        // The claim is written at once and takes effect; its answer is
        // held back past the client's timeout (2 s).
        tokio::time::sleep(Duration::from_secs(3)).await;
        relay.hold_answers(false);
        Instant::now()
    };
    let (outcome, answering) = tokio::join!(
        tokio::time::timeout(Duration::from_secs(30), work),
        answering
    );
    let outcome = outcome.expect("the worker finished within 30 s").unwrap();
    assert_eq!(
        outcome,
        Outcome::Succeeded,
        "not left to the lock and the lease"
    );
    assert!(
        answering.elapsed() < Duration::from_secs(20),
        "done {:?} after the answers came back",
        answering.elapsed()
    );
    let rec = app.record("AC-1").await;
    assert_eq!((rec.status, rec.attempts), (State::Success, 1));
    assert_eq!(calls(&app, &id).await, 1);
}
