//! The Service Bus adapter under concurrent load (issue 14): group commit of
//! single-message sends, duplicate detection inside a batch, and a sender
//! that does not share its connection with the receivers.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use rtp_durability::queue::servicebus::{ServiceBusQueue, ServiceBusSettings};
use rtp_durability::queue::{OutgoingMessage, Queue};
use sb_test_broker::{BrokerConfig, BrokerHandle};
use secrecy::SecretString;

async fn setup() -> (BrokerHandle, ServiceBusQueue, String) {
    let queue = format!("q-{}", uuid::Uuid::new_v4().simple());
    let b = sb_test_broker::start(BrokerConfig {
        queues: vec![queue.clone()],
        duplicate_window: Duration::from_secs(60),
        sas_key: Some("SAS_KEY_VALUE".into()),
        ..Default::default()
    })
    .await
    .expect("broker starts");
    let q = ServiceBusQueue::connect(&ServiceBusSettings {
        connection_string: Some(SecretString::from(b.connection_string())),
        queue: queue.clone(),
        ..Default::default()
    })
    .await
    .expect("connects");
    (b, q, queue)
}

fn msg(id: &str, body: &str) -> OutgoingMessage {
    OutgoingMessage {
        message_id: id.into(),
        body: Bytes::from(body.to_string()),
        content_type: Some("application/json".into()),
        properties: BTreeMap::new(),
        scheduled_enqueue_at: None,
    }
}

async fn receive_all(q: &ServiceBusQueue, n: usize) -> Vec<(String, Bytes)> {
    let mut got = Vec::new();
    while got.len() < n {
        let more = q
            .receive(n - got.len(), Duration::from_secs(2))
            .await
            .unwrap();
        if more.is_empty() {
            break;
        }
        for m in more {
            q.complete(&m).await.unwrap();
            got.push((m.message_id, m.body));
        }
    }
    got.sort();
    got
}

/// Sends that wait while others are in flight go to the service together,
/// as one batch message, and each caller hears back once that batch is
/// accepted: 200 concurrent sends take far fewer than 200 transfers, and
/// every message arrives once.
#[tokio::test]
async fn concurrent_single_sends_are_grouped_into_batches() {
    let (b, q, queue) = setup().await;
    let before = b.transfers_received();
    let sends = (0..200).map(|i| q.send(vec![msg(&format!("gc-{i:03}"), &format!("body-{i}"))]));
    for result in futures::future::join_all(sends).await {
        result.expect("each send is accepted");
    }
    let transfers = b.transfers_received() - before;
    assert!(
        transfers <= 20,
        "200 concurrent sends took {transfers} transfers; group commit would take a few"
    );
    assert_eq!(b.counts(&queue), (200, 0), "every message arrived once");
    let got = receive_all(&q, 200).await;
    assert_eq!(got.len(), 200);
    for (i, (id, body)) in got.iter().enumerate() {
        assert_eq!(id, &format!("gc-{i:03}"));
        assert_eq!(body, &Bytes::from(format!("body-{i}")));
    }
}

/// Duplicate detection is per message id, also inside one batch message
/// and across batches: the first copy wins.
#[tokio::test]
async fn duplicate_ids_inside_a_batch_are_dropped() {
    let (b, q, queue) = setup().await;
    q.send(vec![
        msg("bd-1", "one"),
        msg("bd-2", "two"),
        msg("bd-1", "one again"),
    ])
    .await
    .unwrap();
    q.send(vec![msg("bd-2", "two again"), msg("bd-3", "three")])
        .await
        .unwrap();
    assert_eq!(b.counts(&queue), (3, 0));
    let got = receive_all(&q, 3).await;
    assert_eq!(
        got,
        vec![
            ("bd-1".to_string(), Bytes::from("one")),
            ("bd-2".to_string(), Bytes::from("two")),
            ("bd-3".to_string(), Bytes::from("three")),
        ]
    );
}

/// One bad message in a group fails alone: a message over the link's size
/// limit is refused, the others sent with it are accepted.
#[tokio::test]
async fn a_refused_message_does_not_fail_the_others_in_its_group() {
    let (b, q, queue) = setup().await;
    let huge = "x".repeat(300 * 1024);
    let mut sends = Vec::new();
    for i in 0..20 {
        let body = if i == 7 {
            huge.clone()
        } else {
            format!("ok-{i}")
        };
        sends.push(q.send(vec![msg(&format!("rf-{i:02}"), &body)]));
    }
    let results = futures::future::join_all(sends).await;
    for (i, r) in results.iter().enumerate() {
        if i == 7 {
            assert!(
                matches!(r, Err(e) if !e.is_retryable()),
                "the oversized message is refused for good: {r:?}"
            );
        } else {
            assert!(r.is_ok(), "send {i}: {r:?}");
        }
    }
    assert_eq!(b.counts(&queue), (19, 0));
}

/// The sender has a connection of its own (as Microsoft's SDKs keep senders
/// and receivers apart): a send never queues behind a receive, a drain or
/// a settlement on the same socket or session.
#[tokio::test]
async fn sends_and_receives_use_separate_connections() {
    let (b, q, _) = setup().await;
    q.send(vec![msg("sc-1", "x")]).await.unwrap();
    let got = receive_all(&q, 1).await;
    assert_eq!(got.len(), 1);
    q.send(vec![msg("sc-2", "y")]).await.unwrap();
    assert_eq!(
        b.connections(),
        2,
        "one connection for sending, one for receiving and settling"
    );
}
