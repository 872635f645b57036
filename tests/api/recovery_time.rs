//! Recovery time (issue 22): after a dependency blip, every acknowledged
//! transaction is terminal soon after the dependency returns — not after a
//! lease expiry or the reconciler's pending threshold — with no duplicate
//! success and no overlapping downstream calls.
//!
//! - In process: the processor keeps a message locked while the ledger does
//!   not answer, and finishes it when the ledger returns (issue 12 item 6).
//! - Production-shaped: `rtpd api` + `rtpd processor`, the Service Bus test
//!   broker, Redis with AOF, local WAL, mock downstream at 50 ms; a 6 s outage
//!   mid-backlog. `RTPD_TEST_RECOVERY_TX` sets the number of transactions
//!   (the figure is 600; CI runs 150); the processes run from
//!   `RTPD_TEST_RELEASE_BIN` when it is set (`scripts/test.sh` sets it; the
//!   figures in docs/reliability.md are of the release binary).

use crate::support::process::{
    OwnRedis, Proc, azurite_connection_string_on, free_port, release_rtpd, spawn_mock_from,
    start_azurite, stop_azurite, wait_http_ok,
};
use crate::support::{AppOptions, json, spawn_app_with};
use rtp_durability::mock_downstream::MockOptions;
use rtp_durability::processor::Outcome;
use rtp_durability::transaction::State;
use sb_test_broker::{BrokerConfig, BrokerHandle};
use serde_json::{Value, json};
use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

/// The bound the issue sets: terminal within 30 s of the dependency's return.
const RECOVERY_BOUND: Duration = Duration::from_secs(30);
const OUTAGE: Duration = Duration::from_secs(6);

async fn until(what: &str, within: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !ok() {
        assert!(Instant::now() < deadline, "{what} within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Issue 12 item 6: a ledger outage no longer abandons the message (a hot
/// loop that burns its deliveries into `MaxDeliveryCountExceeded`). The
/// processor keeps it locked, renewing, while the claim — and, in the second
/// half, the settle after the downstream call — waits for the ledger; workers
/// take no new messages meanwhile; when the ledger returns the same delivery
/// finishes with one downstream call.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ledger_outage_holds_the_message_locked_until_the_ledger_returns() {
    let mut redis = OwnRedis::start_persistent();
    let app = spawn_app_with(AppOptions {
        redis_url: Some(redis.url()),
        lock_secs: 2.0,
        downstream_timeout_secs: 5.0,
        mock: MockOptions {
            success_rate: 1.0,
            latency: Duration::from_millis(1500),
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    for id in ["HOLD-CLAIM", "HOLD-SETTLE"] {
        let r = app
            .post_json(&json!({ "transaction_id": id, "amount": "1.00" }))
            .await;
        assert_eq!(r.status(), 202);
    }
    let waiting = app.services.waiting.clone();

    // 1. The ledger is down before the claim.
    redis.kill();
    let work = app.processor.try_process_next(Duration::from_secs(5));
    let check = async {
        until(
            "the processor holds the message",
            Duration::from_secs(10),
            || waiting.snapshot().0 == 1,
        )
        .await;
        assert!(app.processor.ledger_down(), "workers pause receiving");
        // Longer than the 2 s lock: only renewals keep it from coming back.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let stolen = app
            .services
            .queue
            .receive(2, Duration::from_millis(300))
            .await
            .unwrap();
        assert_eq!(
            stolen.len(),
            1,
            "only the other message is visible; the held one stays locked"
        );
        assert_eq!(stolen[0].delivery_count, 1);
        app.services.queue.abandon(&stolen[0]).await.unwrap();
        redis.launch();
    };
    let (outcome, ()) = tokio::join!(work, check);
    assert_eq!(outcome.unwrap(), Outcome::Succeeded);
    assert!(!app.processor.ledger_down());
    assert_eq!(waiting.snapshot().0, 0);

    // 2. The ledger goes down during the downstream call: the settle waits.
    let work = app.processor.try_process_next(Duration::from_secs(5));
    let check = async {
        // The call takes 1.5 s; the claim happened before it started.
        tokio::time::sleep(Duration::from_millis(500)).await;
        redis.kill();
        until("the settle is held", Duration::from_secs(10), || {
            waiting.snapshot().0 == 1
        })
        .await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        redis.launch();
    };
    let (outcome, ()) = tokio::join!(work, check);
    assert_eq!(outcome.unwrap(), Outcome::Succeeded);

    let calls = app.mock_calls().await;
    for id in ["HOLD-CLAIM", "HOLD-SETTLE"] {
        let rec = app.record(id).await;
        assert_eq!(rec.status, State::Success, "{id}");
        assert_eq!(rec.attempts, 1, "{id}: one attempt, no lease expiry");
        let key = rec.transaction_id.to_string();
        assert_eq!(calls["by_key"][key.as_str()]["calls"], 1, "{key}: {calls}");
    }
    assert_eq!(calls["concurrent_overlaps"], 0);
    assert!(
        app.services
            .queue
            .peek_dead_letters(0, 10)
            .await
            .unwrap()
            .is_empty(),
        "no delivery burnt into the dead-letter queue"
    );
    app.assert_queue_empty().await;
}

/// Which dependency the scenario takes away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// Redis killed (AOF, fsync always) and started again with its data.
    Redis,
    /// The Service Bus broker stopped and started again on its port. The
    /// test broker keeps messages in memory, so this also loses the queue.
    ServiceBus,
    /// Azurite stopped and started again with its data; the WAL (and the
    /// outcome journal) on Blob Storage instead of a local directory.
    Blob,
}

const QUEUE: &str = "rtp-transactions";
const LOCK_SECS: u64 = 5;

fn broker_config(bind: std::net::SocketAddr) -> BrokerConfig {
    BrokerConfig {
        bind,
        queues: vec![QUEUE.into()],
        lock_duration: Duration::from_secs(LOCK_SECS),
        max_delivery_count: 10,
        duplicate_window: Duration::from_secs(60),
        sas_key: Some("recovery-time".into()),
        ..Default::default()
    }
}

struct Stack {
    redis: OwnRedis,
    azurite: Option<(Proc, u16, tempfile::TempDir)>,
    broker: Option<BrokerHandle>,
    broker_addr: std::net::SocketAddr,
    mock_port: u16,
    base: String,
    _procs: Vec<Proc>,
    _dir: tempfile::TempDir,
}

impl Stack {
    /// Copies the processes' logs out of the temp dir (which goes with a
    /// panic) and says where.
    fn keep_logs(&self, fault: Fault) -> std::path::PathBuf {
        let keep = std::env::temp_dir().join(format!("recovery-time-{fault:?}"));
        let _ = std::fs::create_dir_all(&keep);
        for f in ["api.log", "processor.log"] {
            let _ = std::fs::copy(self._dir.path().join(f), keep.join(f));
        }
        keep
    }
}

async fn start_stack(fault: Fault) -> Stack {
    let redis = OwnRedis::start_persistent();
    let azurite = (fault == Fault::Blob).then(|| {
        let (port, data) = (free_port(), tempfile::tempdir().unwrap());
        (start_azurite(port, data.path()), port, data)
    });
    let broker = sb_test_broker::start(broker_config("127.0.0.1:0".parse().unwrap()))
        .await
        .unwrap();
    let broker_addr = broker.addr();
    let mock_port = free_port();
    let mock = spawn_mock_from(release_rtpd(), mock_port, &["--latency-ms", "50"]);
    wait_http_ok(
        &format!("http://127.0.0.1:{mock_port}/healthz"),
        Duration::from_secs(20),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut env: Vec<(&str, String)> = vec![
        ("RTPD_DATA_DIR", dir.path().display().to_string()),
        ("RTPD_AUTH", "none".into()),
        ("RTPD_PUBLIC_METRICS", "true".into()),
        ("RTPD_LEDGER", "redis".into()),
        ("RTPD_REDIS_URL", redis.url()),
        ("RTPD_QUEUE", "servicebus".into()),
        (
            "RTPD_SERVICEBUS_CONNECTION_STRING",
            broker.connection_string(),
        ),
        ("RTPD_SERVICEBUS_QUEUE", QUEUE.into()),
        (
            "RTPD_DOWNSTREAM_URL",
            format!("http://127.0.0.1:{mock_port}/process"),
        ),
        ("RTPD_VENDOR_RATE_PER_SEC", "0".into()),
        ("RTPD_LOCK_DURATION_SECS", LOCK_SECS.to_string()),
        ("RTPD_DOWNSTREAM_TIMEOUT_SECS", "2".into()),
        ("RTPD_BACKOFF_BASE_SECS", "0.5".into()),
        ("RTPD_BACKOFF_MAX_SECS", "2".into()),
        // The periodic reconciler at its production pace: the recovery
        // trigger, not a frequent pass, has to bring the stragglers in.
        ("RTPD_RECONCILE_INTERVAL_SECS", "60".into()),
        ("RTPD_RECONCILE_PENDING_AFTER_SECS", "300".into()),
        ("RTPD_RECOVERY_PROBE_SECS", "0.5".into()),
        ("RTPD_LOG_LEVEL", "warn".into()),
    ];
    match &azurite {
        Some((_, port, _)) => env.extend([
            ("RTPD_WAL", "azure".into()),
            (
                "RTPD_STORAGE_CONNECTION_STRING",
                azurite_connection_string_on(*port),
            ),
        ]),
        None => env.push(("RTPD_WAL", "local".into())),
    }
    let spawn = |sub: &str, port: u16| {
        let log = std::fs::File::create(dir.path().join(format!("{sub}.log"))).unwrap();
        Proc(
            release_rtpd()
                .arg(sub)
                .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
                .env("RTPD_HTTP_ADDR", format!("127.0.0.1:{port}"))
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap(),
        )
    };
    // The processor first: opening the local WAL clears its temp directory.
    let processor_port = free_port();
    let processor = spawn("processor", processor_port);
    wait_http_ok(
        &format!("http://127.0.0.1:{processor_port}/healthz"),
        Duration::from_secs(30),
    )
    .await;
    let api_port = free_port();
    let api = spawn("api", api_port);
    let base = format!("http://127.0.0.1:{api_port}");
    wait_http_ok(&format!("{base}/readyz"), Duration::from_secs(30)).await;
    Stack {
        redis,
        azurite,
        broker: Some(broker),
        broker_addr,
        mock_port,
        base,
        _procs: vec![mock, processor, api],
        _dir: dir,
    }
}

/// Everything one scenario waits for (start-up, progress, the producer,
/// recovery, the checks) fits in this, under nextest's 120 s limit, so a
/// slow run fails with its logs instead of being killed without them.
const SCENARIO_BUDGET: Duration = Duration::from_secs(100);
/// One HTTP request's own limit: a request left unanswered (a connection
/// that died under it) counts as a connection error.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(HTTP_TIMEOUT)
        .build()
        .unwrap()
}

/// Posts `n` transactions, 8 at a time; a vendor re-POSTs the same bytes
/// after a 503, a connection error or a request that timed out, until it
/// gets its receipt.
fn produce(base: String, prefix: &'static str, n: usize) -> tokio::task::JoinHandle<Vec<String>> {
    tokio::spawn(async move {
        let client = http_client();
        let acked = Arc::new(Mutex::new(Vec::new()));
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..8 {
            let (client, base, acked, next) =
                (client.clone(), base.clone(), acked.clone(), next.clone());
            workers.spawn(async move {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= n {
                        return;
                    }
                    let id = format!("{prefix}-{i:04}");
                    let body = serde_json::to_vec(
                        &json!({ "transaction_id": id, "amount": "1.00", "currency": "USD" }),
                    )
                    .unwrap();
                    loop {
                        match client
                            .post(format!("{base}/v1/transactions"))
                            .header("content-type", "application/json")
                            .body(body.clone())
                            .send()
                            .await
                        {
                            Ok(r) if r.status() == 202 || r.status() == 200 => break,
                            Ok(r) => assert!(
                                r.status() == 503,
                                "{id}: only 503 while a dependency is down, got {}",
                                r.status()
                            ),
                            // Connection refused/reset, or no answer within HTTP_TIMEOUT.
                            Err(_) => {}
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    acked.lock().unwrap().push(id);
                }
            });
        }
        while workers.join_next().await.transpose().unwrap().is_some() {}
        acked.lock().unwrap().clone()
    })
}

async fn metrics(client: &reqwest::Client, base: &str) -> Option<Value> {
    let r = client.get(format!("{base}/metrics")).send().await.ok()?;
    if !r.status().is_success() {
        return None;
    }
    r.json().await.ok()
}

fn count(m: &Value, k: &str) -> u64 {
    m[k].as_u64().unwrap_or(0)
}

/// Samples the ledger counts from `from` on, concurrently with the producer,
/// until all `n` are terminal and none is open; returns when that was first
/// seen, or the last counts if `until` came first.
fn watch_terminal(
    base: String,
    n: usize,
    until: Instant,
) -> tokio::task::JoinHandle<Result<Instant, Value>> {
    tokio::spawn(async move {
        let client = http_client();
        let mut last = Value::Null;
        loop {
            if let Some(m) = metrics(&client, &base).await {
                let terminal = count(&m, "success") + count(&m, "dead_letter");
                let open = count(&m, "pending") + count(&m, "processing") + count(&m, "failed");
                if terminal >= n as u64 && open == 0 {
                    return Ok(Instant::now());
                }
                last = m;
            }
            if Instant::now() >= until {
                return Err(last);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

/// Runs the scenario and returns the time from the dependency's return until
/// every acknowledged transaction was terminal.
async fn scenario(fault: Fault, prefix: &'static str) -> Duration {
    let n: usize = std::env::var("RTPD_TEST_RECOVERY_TX")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(150);
    let budget_end = Instant::now() + SCENARIO_BUDGET;
    let left = || budget_end.saturating_duration_since(Instant::now());
    let mut s = start_stack(fault).await;
    let client = http_client();
    let producer = produce(s.base.clone(), prefix, n);

    // Mid-backlog: some done, most still to do.
    loop {
        if let Some(m) = metrics(&client, &s.base).await
            && count(&m, "success") >= (n / 4) as u64
        {
            break;
        }
        if left() < OUTAGE + RECOVERY_BOUND {
            panic!(
                "no progress before the fault ({:?} of the budget left); logs in {}",
                left(),
                s.keep_logs(fault).display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    match fault {
        Fault::Redis => {
            s.redis.kill();
            tokio::time::sleep(OUTAGE).await;
            s.redis.launch();
        }
        Fault::ServiceBus => {
            s.broker.take().unwrap().shutdown();
            tokio::time::sleep(OUTAGE).await;
            s.broker = Some(
                sb_test_broker::start(broker_config(s.broker_addr))
                    .await
                    .expect("the broker starts again on its port"),
            );
        }
        Fault::Blob => {
            let (proc, port, data) = s.azurite.as_mut().unwrap();
            stop_azurite(proc);
            tokio::time::sleep(OUTAGE).await;
            *proc = start_azurite(*port, data.path());
        }
    }
    let returned = Instant::now();
    // Sampled while the producer is still at work: the time is when the
    // counts got there, not when the producer (or this test) noticed. Room
    // for the checks after it (up to ~10 s) stays in the budget.
    let checks = Duration::from_secs(10);
    let watcher = watch_terminal(
        s.base.clone(),
        n,
        (returned + RECOVERY_BOUND + Duration::from_secs(20)).min(budget_end - checks),
    );

    let acked = match tokio::time::timeout(left().saturating_sub(checks), producer).await {
        Ok(acked) => acked.unwrap(),
        Err(_) => panic!(
            "{fault:?}: the producer did not get every receipt within the budget; logs in {}",
            s.keep_logs(fault).display()
        ),
    };
    assert_eq!(
        acked.len(),
        n,
        "every transaction was acknowledged in the end"
    );
    let recovered = match watcher.await.unwrap() {
        Ok(at) => at.saturating_duration_since(returned),
        Err(last) => panic!(
            "{fault:?}: not all terminal long after the return; last counts: {last}; logs in {}",
            s.keep_logs(fault).display()
        ),
    };
    eprintln!(
        "recovery time after a {OUTAGE:?} {fault:?} outage, {n} transactions: {:.2} s",
        recovered.as_secs_f64()
    );

    let calls: Value = client
        .get(format!("http://127.0.0.1:{}/calls", s.mock_port))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(calls["duplicate_successes"], 0, "{fault:?}");
    assert_eq!(calls["concurrent_overlaps"], 0, "{fault:?}");
    let mut not_success = BTreeSet::new();
    for id in &acked {
        let r = client
            .get(format!("{}/v1/transactions/{id}", s.base))
            .send()
            .await
            .unwrap();
        let rec = json(r).await;
        if rec["status"] != "success" {
            not_success.insert(format!("{id}: {}", rec["status"]));
        }
        assert_eq!(
            calls["by_key"][id.as_str()]["successes"],
            1,
            "{id}: one success downstream"
        );
    }
    assert!(not_success.is_empty(), "{not_success:?}");
    assert!(
        recovered <= RECOVERY_BOUND,
        "{fault:?}: all terminal only {recovered:?} after the return (bound {RECOVERY_BOUND:?}); logs in {}",
        s.keep_logs(fault).display()
    );
    recovered
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_outage_mid_backlog_recovers_within_30s_of_its_return() {
    scenario(Fault::Redis, "RT-REDIS").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn servicebus_restart_mid_backlog_recovers_within_30s_of_its_return() {
    scenario(Fault::ServiceBus, "RT-SB").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn blob_storage_outage_mid_backlog_recovers_within_30s_of_its_return() {
    scenario(Fault::Blob, "RT-BLOB").await;
}

/// Recording an outcome does not need the message lock: when the lock is
/// lost while the settle waits for the ledger, the worker still records the
/// outcome once the ledger answers (instead of returning `Fenced` with the
/// transaction left `processing` until its lease runs out and it is called
/// again). Only the claim's hold stops on a lost lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lock_lost_while_the_settle_waits_for_the_ledger_still_records_the_outcome() {
    use async_trait::async_trait;
    use rtp_durability::queue::{OutgoingMessage, Queue, QueueError, ReceivedMessage};
    /// The real queue, except that every lock renewal says the lock is lost.
    struct LosesLocks(Arc<dyn Queue>);
    #[async_trait]
    impl Queue for LosesLocks {
        async fn send(&self, m: Vec<OutgoingMessage>) -> Result<(), QueueError> {
            self.0.send(m).await
        }
        async fn receive(
            &self,
            max: usize,
            wait: Duration,
        ) -> Result<Vec<ReceivedMessage>, QueueError> {
            self.0.receive(max, wait).await
        }
        async fn receive_dead_letters(
            &self,
            max: usize,
            wait: Duration,
        ) -> Result<Vec<ReceivedMessage>, QueueError> {
            self.0.receive_dead_letters(max, wait).await
        }
        async fn peek_dead_letters(
            &self,
            from: i64,
            max: usize,
        ) -> Result<Vec<ReceivedMessage>, QueueError> {
            self.0.peek_dead_letters(from, max).await
        }
        async fn complete(&self, m: &ReceivedMessage) -> Result<(), QueueError> {
            self.0.complete(m).await
        }
        async fn abandon(&self, m: &ReceivedMessage) -> Result<(), QueueError> {
            self.0.abandon(m).await
        }
        async fn dead_letter(
            &self,
            m: &ReceivedMessage,
            r: &str,
            d: &str,
        ) -> Result<(), QueueError> {
            self.0.dead_letter(m, r, d).await
        }
        async fn renew_lock(
            &self,
            _m: &ReceivedMessage,
        ) -> Result<chrono::DateTime<chrono::Utc>, QueueError> {
            Err(QueueError::LockLost)
        }
        async fn ping(&self) -> Result<(), QueueError> {
            self.0.ping().await
        }
        fn describe(&self) -> String {
            "loses locks".into()
        }
    }

    let mut redis = OwnRedis::start_persistent();
    let app = spawn_app_with(AppOptions {
        redis_url: Some(redis.url()),
        lock_secs: 2.0,
        downstream_timeout_secs: 5.0,
        mock: MockOptions {
            success_rate: 1.0,
            latency: Duration::from_millis(1500),
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    let r = app
        .post_json(&json!({ "transaction_id": "LOST-LOCK", "amount": "1.00" }))
        .await;
    assert_eq!(r.status(), 202);
    let mut p = app.services.processor().unwrap();
    p.queue = Arc::new(LosesLocks(app.services.queue.clone()));
    let waiting = p.waiting.clone();
    let work = p.try_process_next(Duration::from_secs(5));
    let check = async {
        // The call takes 1.5 s; the claim happened before it started.
        tokio::time::sleep(Duration::from_millis(500)).await;
        redis.kill();
        until("the settle is held", Duration::from_secs(10), || {
            waiting.snapshot().0 == 1
        })
        .await;
        // Past the 2 s lock: the renewal has said the lock is lost.
        tokio::time::sleep(Duration::from_secs(3)).await;
        redis.launch();
    };
    let (outcome, ()) = tokio::join!(work, check);
    assert_eq!(
        outcome.unwrap(),
        Outcome::Succeeded,
        "the outcome is recorded although the lock was lost"
    );
    let rec = app.record("LOST-LOCK").await;
    assert_eq!(rec.status, State::Success);
    assert_eq!(rec.attempts, 1);
    let calls = app.mock_calls().await;
    assert_eq!(calls["by_key"]["acme/LOST-LOCK"]["calls"], 1, "{calls}");
}
