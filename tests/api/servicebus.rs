//! The Service Bus adapter against the in-process test broker: every trait
//! method, reconnects, and interop with Microsoft's Python SDK (needs
//! `SB_INTEROP_PYTHON`, which `scripts/test.sh` sets).

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use chrono::Utc;
use rtp_durability::queue::servicebus::{ServiceBusQueue, ServiceBusSettings};
use rtp_durability::queue::{OutgoingMessage, Queue, QueueError, Subqueue};
use sb_test_broker::{BrokerConfig, BrokerHandle};
use secrecy::SecretString;

const LOCK: Duration = Duration::from_secs(2);

async fn broker(max_delivery_count: u32, queues: &[&str]) -> BrokerHandle {
    sb_test_broker::start(BrokerConfig {
        queues: queues.iter().map(|q| q.to_string()).collect(),
        lock_duration: LOCK,
        max_delivery_count,
        duplicate_window: Duration::from_secs(60),
        sas_key: Some("SAS_KEY_VALUE".into()),
        ..Default::default()
    })
    .await
    .expect("broker starts")
}

fn settings(b: &BrokerHandle, queue: &str) -> ServiceBusSettings {
    ServiceBusSettings {
        connection_string: Some(SecretString::from(b.connection_string())),
        queue: queue.into(),
        ..Default::default()
    }
}

async fn setup(max_delivery_count: u32) -> (BrokerHandle, ServiceBusQueue, String) {
    let queue = format!("q-{}", uuid::Uuid::new_v4().simple());
    let b = broker(max_delivery_count, &[&queue]).await;
    let q = ServiceBusQueue::connect(&settings(&b, &queue))
        .await
        .expect("connects");
    (b, q, queue)
}

fn msg(id: &str, body: &str) -> OutgoingMessage {
    OutgoingMessage {
        message_id: id.into(),
        body: Bytes::from(body.to_string()),
        content_type: Some("application/json".into()),
        properties: BTreeMap::from([
            ("vendor".to_string(), "acme".to_string()),
            ("attempt".to_string(), "1".to_string()),
        ]),
        scheduled_enqueue_at: None,
    }
}

async fn receive_one(q: &ServiceBusQueue) -> rtp_durability::queue::ReceivedMessage {
    let got = q.receive(1, Duration::from_secs(5)).await.expect("receive");
    assert_eq!(got.len(), 1, "expected one message");
    got.into_iter().next().unwrap()
}

#[tokio::test]
async fn send_receive_complete_round_trips_fields() {
    let (_b, q, _) = setup(10).await;
    q.send(vec![msg("tx-1", "{\"amount\":5}")]).await.unwrap();
    let m = receive_one(&q).await;
    assert_eq!(m.message_id, "tx-1");
    assert_eq!(&m.body[..], b"{\"amount\":5}");
    assert_eq!(m.content_type.as_deref(), Some("application/json"));
    assert_eq!(m.properties, msg("tx-1", "").properties);
    assert_eq!(m.delivery_count, 1);
    assert_eq!(m.subqueue, Subqueue::Main);
    assert!(m.sequence_number >= 1);
    assert!(m.locked_until > Utc::now());
    assert!(m.enqueued_at <= Utc::now());
    assert!(!m.lock_token.is_nil());
    q.complete(&m).await.unwrap();
    assert!(
        q.receive(1, Duration::from_millis(300))
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        matches!(q.complete(&m).await, Err(QueueError::LockLost)),
        "second settlement"
    );
}

#[tokio::test]
async fn receive_waits_then_returns_empty() {
    let (_b, q, _) = setup(10).await;
    let started = std::time::Instant::now();
    assert!(
        q.receive(5, Duration::from_millis(300))
            .await
            .unwrap()
            .is_empty()
    );
    assert!(started.elapsed() >= Duration::from_millis(250));
}

#[tokio::test]
async fn dead_letter_reason_round_trips_through_peek_and_receive() {
    let (_b, q, _) = setup(10).await;
    q.send(vec![msg("dl-1", "a"), msg("dl-2", "b")])
        .await
        .unwrap();
    let got = q.receive(2, Duration::from_secs(5)).await.unwrap();
    assert_eq!(got.len(), 2);
    for m in &got {
        q.dead_letter(
            m,
            "DownstreamRejected",
            &format!("422 for {}", m.message_id),
        )
        .await
        .unwrap();
    }
    let peeked = q.peek_dead_letters(0, 10).await.unwrap();
    let mut ids: Vec<_> = peeked.iter().map(|m| m.message_id.clone()).collect();
    ids.sort();
    assert_eq!(ids, ["dl-1", "dl-2"]);
    for p in &peeked {
        assert_eq!(p.dead_letter_reason.as_deref(), Some("DownstreamRejected"));
        assert_eq!(
            p.dead_letter_description.as_deref(),
            Some(format!("422 for {}", p.message_id).as_str())
        );
        assert_eq!(
            p.properties,
            msg("", "").properties,
            "reason is not an application property"
        );
        assert_eq!(p.subqueue, Subqueue::DeadLetter);
    }
    let last = peeked.iter().map(|m| m.sequence_number).max().unwrap();
    let from_last = q.peek_dead_letters(last, 10).await.unwrap();
    assert_eq!(from_last.len(), 1);
    assert!(q.peek_dead_letters(last + 1, 10).await.unwrap().is_empty());
    // Peeking does not lock: the dead letters can still be received and completed.
    let dead = q
        .receive_dead_letters(2, Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(dead.len(), 2);
    for d in &dead {
        assert_eq!(d.dead_letter_reason.as_deref(), Some("DownstreamRejected"));
        q.complete(d).await.unwrap();
    }
    assert!(q.peek_dead_letters(0, 10).await.unwrap().is_empty());
}

#[tokio::test]
async fn duplicate_detection_drops_same_id_keeps_distinct_ids() {
    let (_b, q, _) = setup(10).await;
    q.send(vec![msg("dup-1", "first")]).await.unwrap();
    q.send(vec![msg("dup-1", "second")]).await.unwrap();
    q.send(vec![msg("dup-1-retry-1", "retry")]).await.unwrap();
    let got = q.receive(10, Duration::from_secs(2)).await.unwrap();
    let mut ids: Vec<_> = got
        .iter()
        .map(|m| (m.message_id.clone(), m.body.clone()))
        .collect();
    ids.sort();
    assert_eq!(
        ids,
        vec![
            ("dup-1".to_string(), Bytes::from("first")),
            ("dup-1-retry-1".to_string(), Bytes::from("retry"))
        ]
    );
}

#[tokio::test]
async fn batch_send_delivers_every_message() {
    let (b, q, queue) = setup(10).await;
    let batch: Vec<_> = (0..25)
        .map(|i| msg(&format!("bt-{i}"), &format!("body-{i}")))
        .collect();
    q.send(batch).await.unwrap();
    assert_eq!(b.counts(&queue), (25, 0));
    let mut got = Vec::new();
    while got.len() < 25 {
        let more = q.receive(10, Duration::from_secs(2)).await.unwrap();
        assert!(!more.is_empty(), "ran dry at {}", got.len());
        got.extend(more);
    }
    let mut seqs: Vec<_> = got.iter().map(|m| m.sequence_number).collect();
    seqs.sort();
    seqs.dedup();
    assert_eq!(seqs.len(), 25);
    for m in &got {
        assert_eq!(m.body, Bytes::from(format!("body-{}", &m.message_id[3..])));
        q.complete(m).await.unwrap();
    }
    // Settlement is a one-way disposition frame; give the broker a moment to apply it.
    for _ in 0..50 {
        if b.counts(&queue) == (0, 0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(b.counts(&queue), (0, 0));
}

/// A lost connection takes no lock with it (Service Bus keeps locks until
/// they expire): after reconnecting, the old message is settled by lock
/// token and never comes back.
#[tokio::test]
async fn reconnects_after_connection_loss_and_settles_old_locks_by_token() {
    let (b, q, queue) = setup(10).await;
    q.send(vec![msg("rc-1", "x")]).await.unwrap();
    let m = receive_one(&q).await;
    b.drop_connections();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The adapter reconnects (with backoff) on the next operations.
    let mut settled = false;
    for _ in 0..50 {
        match q.complete(&m).await {
            Ok(()) => {
                settled = true;
                break;
            }
            Err(QueueError::Unavailable(_)) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert!(settled, "never settled the old lock");
    q.send(vec![msg("rc-2", "y")]).await.unwrap();
    q.ping().await.unwrap();
    let mut ids = Vec::new();
    // Longer than the lock: rc-1 would be back by then had the settlement been lost.
    let until = std::time::Instant::now() + LOCK + Duration::from_secs(1);
    while std::time::Instant::now() < until {
        for m in q
            .receive(2, Duration::from_millis(500))
            .await
            .unwrap_or_default()
        {
            ids.push(m.message_id.clone());
            q.complete(&m).await.unwrap();
        }
    }
    assert_eq!(
        ids,
        vec!["rc-2".to_string()],
        "rc-1 was settled before: {ids:?}"
    );
    assert_eq!(b.counts(&queue), (0, 0));
    assert!(
        matches!(q.complete(&m).await, Err(QueueError::LockLost)),
        "a second settlement of rc-1"
    );
}

#[tokio::test]
async fn wrong_key_is_refused_and_describe_names_the_queue() {
    let b = broker(10, &["q-auth"]).await;
    let mut s = settings(&b, "q-auth");
    s.connection_string = Some(SecretString::from(
        b.connection_string().replace("SAS_KEY_VALUE", "wrong"),
    ));
    assert!(ServiceBusQueue::connect(&s).await.is_err());
    assert!(b.cbs_tokens().is_empty(), "refused tokens are not recorded");
    let q = ServiceBusQueue::connect(&settings(&b, "q-auth"))
        .await
        .unwrap();
    let (kind, token) = &b.cbs_tokens()[0];
    assert_eq!(kind, "servicebus.windows.net:sastoken");
    assert!(token.contains("skn=RootManageSharedAccessKey"));
    q.ping().await.unwrap();
    let d = q.describe();
    assert!(d.contains("q-auth") && d.contains("emulator"), "{d}");
    assert!(!d.contains("SAS_KEY_VALUE"));
}

#[tokio::test]
async fn settings_are_validated() {
    let base = ServiceBusSettings {
        queue: "q".into(),
        ..Default::default()
    };
    assert!(matches!(
        ServiceBusQueue::connect(&base).await,
        Err(QueueError::Fatal(_))
    ));
    let both = ServiceBusSettings {
        connection_string: Some(SecretString::from(
            "Endpoint=sb://x/;SharedAccessKeyName=a;SharedAccessKey=b",
        )),
        namespace: Some("ns".into()),
        ..base.clone()
    };
    assert!(matches!(
        ServiceBusQueue::connect(&both).await,
        Err(QueueError::Fatal(_))
    ));
    let mismatch = ServiceBusSettings {
        connection_string: Some(SecretString::from(
            "Endpoint=sb://x/;SharedAccessKeyName=a;SharedAccessKey=b;EntityPath=other",
        )),
        ..base
    };
    assert!(matches!(
        ServiceBusQueue::connect(&mismatch).await,
        Err(QueueError::Fatal(_))
    ));
}

/// Interop with Microsoft's Python SDK, when `SB_INTEROP_PYTHON` names a Python
/// with azure-servicebus installed.
#[tokio::test]
async fn interop_with_official_python_sdk() {
    let python = std::env::var("SB_INTEROP_PYTHON")
        .expect("SB_INTEROP_PYTHON is not set: run the tests with scripts/test.sh, which installs the Python SDK");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/servicebus/interop.py");
    let (b, q, queue) = setup(10).await;
    let cs = b.connection_string();
    let run = |args: Vec<String>| {
        let python = python.clone();
        async move {
            let out = tokio::process::Command::new(python)
                .arg(script)
                .args(args)
                .output()
                .await
                .expect("python runs");
            (
                out.status.success(),
                String::from_utf8_lossy(&out.stdout).to_string()
                    + &String::from_utf8_lossy(&out.stderr),
            )
        }
    };
    // Rust sends, Python receives.
    q.send(vec![msg("from-rust-1", "{\"amount\":\"12.50\"}")])
        .await
        .unwrap();
    let args = vec![
        "receive-check",
        "--connection-string",
        &cs,
        "--queue",
        &queue,
        "--message-id",
        "from-rust-1",
        "--body",
        "{\"amount\":\"12.50\"}",
        "--content-type",
        "application/json",
        "--property",
        "vendor=acme",
        "--property",
        "attempt=1",
    ];
    let (ok, out) = run(args.into_iter().map(String::from).collect()).await;
    assert!(ok, "python receive-check failed: {out}");
    // Python sends, Rust receives.
    let args = vec![
        "send",
        "--connection-string",
        &cs,
        "--queue",
        &queue,
        "--message-id",
        "from-python-1",
        "--body",
        "hello from python",
        "--content-type",
        "text/plain",
        "--property",
        "k=v",
    ];
    let (ok, out) = run(args.into_iter().map(String::from).collect()).await;
    assert!(ok, "python send failed: {out}");
    let m = receive_one(&q).await;
    assert_eq!(m.message_id, "from-python-1");
    assert_eq!(&m.body[..], b"hello from python");
    assert_eq!(m.content_type.as_deref(), Some("text/plain"));
    assert_eq!(
        m.properties,
        BTreeMap::from([("k".to_string(), "v".to_string())])
    );
    q.complete(&m).await.unwrap();
}

/// A send in flight when the Service Bus connection dies comes back with a
/// retryable error as soon as the connection is known lost — it does not
/// wait for a disposition that cannot arrive (nor out the whole send time
/// limit, 60 s by default). Sixteen senders race the broker's death.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_send_in_flight_when_the_broker_dies_returns_promptly() {
    use rtp_durability::queue::servicebus::{ServiceBusQueue, ServiceBusSettings};
    use rtp_durability::queue::{OutgoingMessage, Queue, QueueError};
    use secrecy::SecretString;
    use std::sync::Arc;
    let b = sb_test_broker::start(sb_test_broker::BrokerConfig {
        queues: vec!["q-hang".into()],
        sas_key: Some("K".into()),
        duplicate_window: std::time::Duration::from_secs(60),
        ..Default::default()
    })
    .await
    .unwrap();
    let q = Arc::new(
        ServiceBusQueue::connect(&ServiceBusSettings {
            connection_string: Some(SecretString::from(b.connection_string())),
            queue: "q-hang".into(),
            ..Default::default()
        })
        .await
        .unwrap(),
    );
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..16 {
        let (q, stop) = (q.clone(), stop.clone());
        tasks.spawn(async move {
            // (hung sends, sends that failed with a non-retryable error, sends that went through)
            let (mut hung, mut fatal, mut ok) = (0, 0, 0);
            for i in 0.. {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let m = OutgoingMessage {
                    message_id: format!("m-{t}-{i}"),
                    body: bytes::Bytes::from(vec![b'x'; 2000]),
                    content_type: Some("application/json".into()),
                    properties: Default::default(),
                    scheduled_enqueue_at: None,
                };
                match tokio::time::timeout(std::time::Duration::from_secs(15), q.send(vec![m]))
                    .await
                {
                    Err(_) => {
                        hung += 1;
                        break;
                    }
                    Ok(Ok(())) => ok += 1,
                    Ok(Err(QueueError::Unavailable(_))) => {}
                    Ok(Err(e)) => {
                        eprintln!("send {t}-{i}: {e}");
                        fatal += 1;
                    }
                }
            }
            (hung, fatal, ok)
        });
    }
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    b.shutdown();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut hung, mut fatal, mut ok) = (0, 0, 0);
    while let Some(r) = tasks.join_next().await {
        let (h, f, o) = r.unwrap();
        hung += h;
        fatal += f;
        ok += o;
    }
    assert!(ok > 0, "no send went through before the broker stopped");
    assert_eq!(
        hung, 0,
        "{hung} of 16 sends in flight at the broker's death never returned (waited 15 s)"
    );
    assert_eq!(
        fatal, 0,
        "a lost connection is a retryable (Unavailable) failure"
    );
}
