//! The queue contract, written once and run against every queue adapter.
//!
//! Precondition for every adapter instance: lock duration 1 s, max delivery
//! count 3, duplicate detection on.

use bytes::Bytes;
use chrono::Utc;
use rtp_durability::queue::{
    MAX_DELIVERY_COUNT_EXCEEDED, OutgoingMessage, Queue, QueueError, Subqueue,
};
use std::{collections::BTreeMap, sync::Arc, time::Duration};

pub const LOCK: Duration = Duration::from_secs(1);
pub const MAX_DELIVERY: u32 = 3;

fn msg(id: &str) -> OutgoingMessage {
    OutgoingMessage {
        message_id: id.to_owned(),
        body: Bytes::from(format!("{{\"id\":\"{id}\"}}")),
        content_type: Some("application/json".into()),
        properties: BTreeMap::from([
            ("transaction_id".into(), id.to_owned()),
            ("kind".into(), "initial".into()),
        ]),
        scheduled_enqueue_at: None,
    }
}

const WAIT: Duration = Duration::from_secs(3);
const NO_WAIT: Duration = Duration::from_millis(100);

pub async fn send_receive_complete(q: Arc<dyn Queue>) {
    q.send(vec![msg("a")]).await.unwrap();
    let got = q.receive(10, WAIT).await.unwrap();
    assert_eq!(got.len(), 1);
    let m = &got[0];
    assert_eq!(m.message_id, "a");
    assert_eq!(&m.body[..], b"{\"id\":\"a\"}");
    assert_eq!(
        m.properties.get("transaction_id").map(String::as_str),
        Some("a")
    );
    assert_eq!(m.content_type.as_deref(), Some("application/json"));
    assert_eq!(m.delivery_count, 1);
    assert_eq!(m.subqueue, Subqueue::Main);
    assert!(m.locked_until > Utc::now());
    // Locked: nobody else gets it.
    assert!(q.receive(10, NO_WAIT).await.unwrap().is_empty());
    q.complete(m).await.unwrap();
    assert!(matches!(q.complete(m).await, Err(QueueError::LockLost)));
    assert!(q.receive(10, NO_WAIT).await.unwrap().is_empty());
    q.ping().await.unwrap();
}

pub async fn batch_send(q: Arc<dyn Queue>) {
    let batch: Vec<_> = (0..20).map(|i| msg(&format!("b{i}"))).collect();
    q.send(batch).await.unwrap();
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < 20 {
        let got = q.receive(8, WAIT).await.unwrap();
        assert!(!got.is_empty(), "only {} of 20 arrived", seen.len());
        for m in got {
            seen.insert(m.message_id.clone());
            q.complete(&m).await.unwrap();
        }
    }
}

pub async fn lock_expiry_redelivers(q: Arc<dyn Queue>) {
    q.send(vec![msg("x")]).await.unwrap();
    let first = q.receive(1, WAIT).await.unwrap().remove(0);
    // Expired but not yet redelivered: the holder has lost it already.
    tokio::time::sleep(LOCK + Duration::from_millis(300)).await;
    assert!(matches!(
        q.complete(&first).await,
        Err(QueueError::LockLost)
    ));
    let second = q.receive(1, LOCK * 4).await.unwrap().remove(0);
    assert_eq!(second.message_id, "x");
    assert_eq!(second.delivery_count, 2);
    assert_ne!(first.lock_token, second.lock_token);
    // The first holder lost the message: it cannot settle or renew it.
    assert!(matches!(
        q.complete(&first).await,
        Err(QueueError::LockLost)
    ));
    assert!(matches!(
        q.renew_lock(&first).await,
        Err(QueueError::LockLost)
    ));
    q.complete(&second).await.unwrap();
}

pub async fn renew_lock_extends(q: Arc<dyn Queue>) {
    q.send(vec![msg("r")]).await.unwrap();
    let m = q.receive(1, WAIT).await.unwrap().remove(0);
    tokio::time::sleep(LOCK / 2).await;
    let until = q.renew_lock(&m).await.unwrap();
    assert!(until > m.locked_until, "renewal moves the expiry");
    tokio::time::sleep(LOCK / 2).await;
    // Past the original expiry nobody else gets it, and it is still ours.
    assert!(q.receive(1, NO_WAIT).await.unwrap().is_empty());
    let again = q.renew_lock(&m).await.unwrap();
    assert!(again > until);
    q.complete(&m).await.unwrap();
}

pub async fn abandon_makes_visible_and_counts(q: Arc<dyn Queue>) {
    q.send(vec![msg("ab")]).await.unwrap();
    let m = q.receive(1, WAIT).await.unwrap().remove(0);
    q.abandon(&m).await.unwrap();
    let again = q.receive(1, WAIT).await.unwrap().remove(0);
    assert_eq!(again.delivery_count, 2);
    assert_ne!(
        again.lock_token, m.lock_token,
        "a redelivery gets a new lock"
    );
    assert_eq!(again.message_id, "ab");
    q.complete(&again).await.unwrap();
}

pub async fn max_delivery_dead_letters(q: Arc<dyn Queue>) {
    q.send(vec![msg("poison")]).await.unwrap();
    for n in 1..=MAX_DELIVERY {
        let m = q.receive(1, WAIT).await.unwrap().remove(0);
        assert_eq!(m.delivery_count, n);
        q.abandon(&m).await.unwrap();
    }
    assert!(q.receive(1, NO_WAIT).await.unwrap().is_empty());
    let dl = q.receive_dead_letters(1, WAIT).await.unwrap().remove(0);
    assert_eq!(dl.message_id, "poison");
    assert_eq!(dl.subqueue, Subqueue::DeadLetter);
    assert_eq!(
        dl.dead_letter_reason.as_deref(),
        Some(MAX_DELIVERY_COUNT_EXCEEDED)
    );
    q.complete(&dl).await.unwrap();
}

pub async fn explicit_dead_letter_keeps_reason(q: Arc<dyn Queue>) {
    q.send(vec![msg("dl")]).await.unwrap();
    let m = q.receive(1, WAIT).await.unwrap().remove(0);
    q.dead_letter(&m, "PermanentFailure", "downstream answered 400")
        .await
        .unwrap();
    assert!(q.receive(1, NO_WAIT).await.unwrap().is_empty());
    let peeked = q.peek_dead_letters(0, 10).await.unwrap();
    let p = peeked
        .iter()
        .find(|p| p.message_id == "dl")
        .expect("peek shows the dead letter");
    assert_eq!(p.dead_letter_reason.as_deref(), Some("PermanentFailure"));
    assert_eq!(
        p.dead_letter_description.as_deref(),
        Some("downstream answered 400")
    );
    assert_eq!(&p.body[..], b"{\"id\":\"dl\"}");
    // Peeking does not lock.
    let got = q.receive_dead_letters(1, WAIT).await.unwrap().remove(0);
    assert_eq!(got.message_id, "dl");
    q.complete(&got).await.unwrap();
    assert!(
        q.peek_dead_letters(0, 10)
            .await
            .unwrap()
            .iter()
            .all(|p| p.message_id != "dl")
    );
}

pub async fn scheduled_is_invisible_until_due(q: Arc<dyn Queue>) {
    let mut m = msg("later");
    let due = Utc::now() + chrono::Duration::milliseconds(1500);
    m.scheduled_enqueue_at = Some(due);
    q.send(vec![m]).await.unwrap();
    assert!(
        q.receive(1, Duration::from_millis(500))
            .await
            .unwrap()
            .is_empty()
    );
    let got = q.receive(1, Duration::from_secs(5)).await.unwrap();
    assert_eq!(got.len(), 1, "due message arrives within the wait");
    assert!(Utc::now() >= got[0].enqueued_at);
    assert!(
        Utc::now() >= due - chrono::Duration::milliseconds(100),
        "delivered before it was due"
    );
    q.complete(&got[0]).await.unwrap();
}

pub async fn duplicate_ids_dropped_distinct_kept(q: Arc<dyn Queue>) {
    q.send(vec![msg("tx-1")]).await.unwrap();
    q.send(vec![msg("tx-1")]).await.unwrap();
    q.send(vec![msg("tx-1:retry:2"), msg("tx-1:replay:abc")])
        .await
        .unwrap();
    let mut ids = Vec::new();
    loop {
        let got = q.receive(10, Duration::from_millis(500)).await.unwrap();
        if got.is_empty() {
            break;
        }
        for m in got {
            ids.push(m.message_id.clone());
            q.complete(&m).await.unwrap();
        }
    }
    ids.sort();
    assert_eq!(ids, vec!["tx-1", "tx-1:replay:abc", "tx-1:retry:2"]);
}

macro_rules! queue_contract {
    ($module:ident, $make:expr) => {
        mod $module {
            use super::*;
            #[tokio::test]
            async fn send_receive_complete() {
                super::send_receive_complete($make().await).await
            }
            #[tokio::test]
            async fn batch_send() {
                super::batch_send($make().await).await
            }
            #[tokio::test]
            async fn lock_expiry_redelivers() {
                super::lock_expiry_redelivers($make().await).await
            }
            #[tokio::test]
            async fn renew_lock_extends() {
                super::renew_lock_extends($make().await).await
            }
            #[tokio::test]
            async fn abandon_makes_visible_and_counts() {
                super::abandon_makes_visible_and_counts($make().await).await
            }
            #[tokio::test]
            async fn max_delivery_dead_letters() {
                super::max_delivery_dead_letters($make().await).await
            }
            #[tokio::test]
            async fn explicit_dead_letter_keeps_reason() {
                super::explicit_dead_letter_keeps_reason($make().await).await
            }
            #[tokio::test]
            async fn scheduled_is_invisible_until_due() {
                super::scheduled_is_invisible_until_due($make().await).await
            }
            #[tokio::test]
            async fn duplicate_ids_dropped_distinct_kept() {
                super::duplicate_ids_dropped_distinct_kept($make().await).await
            }
        }
    };
}

async fn local() -> Arc<dyn Queue> {
    use rtp_durability::queue::local::{LocalQueue, LocalQueueOptions};
    let dir = tempfile::tempdir().unwrap().keep();
    Arc::new(
        LocalQueue::open(
            &dir.join("queue.db"),
            LocalQueueOptions {
                lock_duration: LOCK,
                max_delivery_count: MAX_DELIVERY,
                duplicate_detection_window: Duration::from_secs(60),
            },
        )
        .unwrap(),
    )
}

queue_contract!(local_queue, local);

/// The simulation's queue (`tests/sim`) behaves like the real ones.
async fn memory() -> Arc<dyn Queue> {
    use rtp_durability::queue::memory::{MemoryQueue, MemoryQueueOptions};
    Arc::new(MemoryQueue::new(MemoryQueueOptions {
        lock_duration: LOCK,
        max_delivery_count: MAX_DELIVERY,
        duplicate_detection_window: Duration::from_secs(60),
    }))
}

queue_contract!(memory_queue, memory);

#[tokio::test]
async fn local_queue_survives_reopen() {
    use rtp_durability::queue::local::{LocalQueue, LocalQueueOptions};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    {
        let q = LocalQueue::open(&path, LocalQueueOptions::default()).unwrap();
        q.send(vec![msg("kept")]).await.unwrap();
    }
    let q = LocalQueue::open(&path, LocalQueueOptions::default()).unwrap();
    let got = q.receive(1, WAIT).await.unwrap();
    assert_eq!(got[0].message_id, "kept");
}

/// The Service Bus adapter over real AMQP against the in-repo test broker.
async fn servicebus() -> Arc<dyn Queue> {
    use rtp_durability::queue::servicebus::{ServiceBusQueue, ServiceBusSettings};
    let queue = format!("contract-{}", uuid::Uuid::new_v4().simple());
    let broker = sb_test_broker::start(sb_test_broker::BrokerConfig {
        queues: vec![queue.clone()],
        lock_duration: LOCK,
        max_delivery_count: MAX_DELIVERY,
        duplicate_window: Duration::from_secs(60),
        sas_key: Some("contract-key".into()),
        ..Default::default()
    })
    .await
    .unwrap();
    let q = ServiceBusQueue::connect(&ServiceBusSettings {
        connection_string: Some(broker.connection_string().into()),
        queue,
        ..Default::default()
    })
    .await
    .unwrap();
    // The broker lives as long as the test process.
    std::mem::forget(broker);
    Arc::new(q)
}

queue_contract!(servicebus_queue, servicebus);
