//! The Kafka intake against librdkafka's mock cluster (a real Kafka protocol
//! listener on localhost, in this test process): records produced by an
//! independent client go through `rtpd dev`'s intake (the same durability
//! step as the HTTP API) and reach `success`, across a kill -9 of the
//! process mid-stream; bad records land on the dead-letter topic and the
//! partition goes on; a ledger outage pauses consumption and nothing is
//! skipped when it returns.

use crate::support::process::{
    OwnRedis, Proc, azurite_connection_string_on, free_port, mock_calls, poll_json, rtpd,
    spawn_dev_with, start_azurite, start_mock, stop_azurite, terminate, wait_http_ok,
};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rtp_durability::transaction::Sha256;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

const TOPIC: &str = "payments";
const DEAD: &str = "payments-dead";
const PARTITIONS: i32 = 3;

fn producer(bootstrap: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "5")
        .set("message.max.bytes", "4000000")
        .create()
        .unwrap()
}

async fn send(p: &FutureProducer, key: Option<&str>, value: &str) -> (i32, i64) {
    let mut r: FutureRecord<'_, str, str> = FutureRecord::to(TOPIC).payload(value);
    if let Some(k) = key {
        r = r.key(k);
    }
    let d = p
        .send(r, Duration::from_secs(10))
        .await
        .unwrap_or_else(|(e, _)| panic!("produce: {e}"));
    (d.partition, d.offset)
}

fn payload(id: &str, n: usize) -> String {
    format!(r#"{{"transaction_id":"{id}","amount":{n},"currency":"EUR"}}"#)
}

/// `rtpd dev` with the Kafka intake on, its mock downstream at `mock_port`.
fn spawn_intake(
    dir: &Path,
    api_port: u16,
    mock_port: u16,
    bootstrap: &str,
    env: &[(&str, &str)],
) -> Proc {
    let mut all: Vec<(&str, &str)> = vec![
        ("RTPD_KAFKA_BOOTSTRAP_SERVERS", bootstrap),
        ("RTPD_KAFKA_TOPICS", TOPIC),
        ("RTPD_KAFKA_GROUP_ID", "rtpd-test"),
        ("RTPD_KAFKA_VENDOR", "dev-vendor"),
        ("RTPD_KAFKA_DEAD_LETTER_TOPIC", DEAD),
        // A killed member leaves the group within seconds, not 45.
        ("RTPD_KAFKA_CONFIG_SESSION_TIMEOUT_MS", "6000"),
        ("RTPD_KAFKA_CONFIG_HEARTBEAT_INTERVAL_MS", "500"),
    ];
    all.extend_from_slice(env);
    spawn_dev_with(rtpd(), dir, api_port, mock_port, &[], &all)
}

fn api_key(dir: &Path) -> String {
    let creds: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("dev-credentials.json")).unwrap())
            .unwrap();
    creds["api_key"].as_str().unwrap().to_owned()
}

/// The group's committed offsets, per partition (absent: none committed).
fn committed(bootstrap: &str) -> BTreeMap<i32, i64> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "rtpd-test")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition(TOPIC, p);
    }
    let got = c.committed_offsets(tpl, Duration::from_secs(10)).unwrap();
    got.elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(o) => Some((e.partition(), o)),
            _ => None,
        })
        .collect()
}

/// Every record on the dead-letter topic: (reason, source offset, key,
/// whether its value was left out).
fn dead_letters(bootstrap: &str, at_least: usize) -> Vec<(String, String, Option<String>, bool)> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "dead-letter-reader")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(DEAD, 0, Offset::Beginning)
        .unwrap();
    c.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < deadline {
        match c.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let h = m.headers().expect("dead letters carry headers");
                let get = |name: &str| {
                    h.iter()
                        .find(|x| x.key == name)
                        .and_then(|x| x.value)
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                };
                assert_eq!(get("rtpd-source-topic").as_deref(), Some(TOPIC));
                assert!(get("rtpd-error").is_some_and(|e| !e.is_empty()));
                out.push((
                    get("rtpd-reason").unwrap(),
                    format!(
                        "{}@{}",
                        get("rtpd-source-partition").unwrap(),
                        get("rtpd-source-offset").unwrap()
                    ),
                    m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                    get("rtpd-value-dropped").is_some(),
                ));
            }
            Some(Err(e)) => panic!("reading the dead-letter topic: {e}"),
            None if out.len() >= at_least => break,
            None => {}
        }
    }
    out
}

async fn get_tx(client: &reqwest::Client, base: &str, key: &str, id: &str) -> Value {
    client
        .get(format!("{base}/v1/transactions/{id}"))
        .header("X-Api-Key", key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafka_records_reach_success_across_a_kill_9_and_bad_ones_are_set_aside() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic(TOPIC, PARTITIONS, 1).unwrap();
    cluster.create_topic(DEAD, 1, 1).unwrap();
    let bootstrap = cluster.bootstrap_servers();
    let p = producer(&bootstrap);

    // Bad records first, so the partitions must go on past them.
    let mut bad = BTreeSet::new();
    bad.insert(("invalid_json", send(&p, Some("x"), "not json").await));
    bad.insert((
        "missing_transaction_id",
        send(&p, Some("y"), r#"{"amount":1}"#).await,
    ));
    send(&p, None, &payload("K-5", 5)).await;
    bad.insert(("conflict", send(&p, None, &payload("K-5", 999)).await));
    // Larger than RTPD_MAX_BODY_BYTES, and than the dead-letter producer
    // takes: it goes there without its value.
    let big = format!(
        r#"{{"transaction_id":"BIG-1","pad":"{}"}}"#,
        "x".repeat(1_500_000)
    );
    bad.insert(("payload_too_large", send(&p, Some("big"), &big).await));
    // The same bytes again: a duplicate, absorbed, not a dead letter.
    send(&p, None, &payload("K-6", 6)).await;
    send(&p, None, &payload("K-6", 6)).await;

    let t0 = std::time::Instant::now();
    let step = |what: &str| eprintln!("[{:>6.1}s] {what}", t0.elapsed().as_secs_f64());
    step("bad records produced");
    let dir = tempfile::tempdir().unwrap();
    let redis = OwnRedis::start_persistent();
    let url = redis.url();
    let env = [("RTPD_LEDGER", "redis"), ("RTPD_REDIS_URL", url.as_str())];
    let (_mock, mock_port) = start_mock(&[]).await;
    let api_port = free_port();
    let base = format!("http://127.0.0.1:{api_port}");
    let mut dev = spawn_intake(dir.path(), api_port, mock_port, &bootstrap, &env);
    wait_http_ok(&format!("{base}/healthz"), Duration::from_secs(30)).await;
    let key = api_key(dir.path());

    // A steady stream, with the kill in the middle of it.
    const N: usize = 2000;
    let stream = {
        let p = p.clone();
        tokio::spawn(async move {
            for i in 0..N {
                let id = format!("K-{}", 1000 + i);
                send(&p, None, &payload(&id, i)).await;
                if i % 100 == 99 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        })
    };
    step("rtpd dev up; streaming");
    poll_json(&format!("{base}/metrics"), Duration::from_secs(60), |m| {
        m["total"].as_u64().unwrap_or(0) >= 600
    })
    .await;
    step("600 in the ledger; Redis stopped");
    // The ledger hangs: records fetched now stay in intake, not durable,
    // across several commit intervals; then the process dies.
    redis.signal("STOP");
    tokio::time::sleep(Duration::from_secs(3)).await;
    dev.kill9();
    redis.signal("CONT");
    let at_kill = committed(&bootstrap);
    step(&format!("killed; committed {at_kill:?}"));
    stream.await.unwrap();
    step("stream produced");
    let committed_total: i64 = at_kill.values().sum();
    assert!(
        committed_total > 0,
        "nothing committed before the kill: {at_kill:?}"
    );

    let _dev = spawn_intake(dir.path(), api_port, mock_port, &bootstrap, &env);
    wait_http_ok(&format!("{base}/healthz"), Duration::from_secs(30)).await;
    step("restarted");
    let valid = N + 2; // K-5 and K-6 besides the stream
    let last = poll_json(&format!("{base}/metrics"), Duration::from_secs(60), |m| {
        m["success"].as_u64().unwrap_or(0) >= valid as u64
    })
    .await;
    step("all success");
    assert_eq!(last["total"], valid as u64, "{last}");
    assert_eq!(last["dead_letter"], 0, "{last}");

    // Every record reached success once at the downstream, with the bytes sent.
    let calls = mock_calls(mock_port).await;
    assert_eq!(calls["duplicate_successes"], 0, "{calls}");
    assert_eq!(calls["concurrent_overlaps"], 0, "{calls}");
    use futures::StreamExt;
    // One client: building one loads the platform's root certificates.
    let client = reqwest::Client::new();
    let records: Vec<(String, usize, Value)> = futures::stream::iter(
        (0..N)
            .map(|i| (format!("K-{}", 1000 + i), i))
            .chain([("K-5".to_owned(), 5), ("K-6".to_owned(), 6)]),
    )
    .map(|(id, n)| {
        let (base, key, client) = (base.clone(), key.clone(), client.clone());
        async move {
            let rec = get_tx(&client, &base, &key, &id).await;
            (id, n, rec)
        }
    })
    .buffer_unordered(16)
    .collect()
    .await;
    for (id, n, rec) in records {
        assert_eq!(rec["status"], "success", "{id}: {rec}");
        assert_eq!(
            rec["sha256"],
            Sha256::of(payload(&id, n).as_bytes()).to_string(),
            "{id}: the first bytes stand"
        );
        assert_eq!(
            calls["by_key"][format!("dev-vendor/{id}")]["successes"],
            1,
            "{id}"
        );
    }
    // The WAL record names where in Kafka it came from.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rtpd"))
        .args(["wal", "cat", "dev-vendor/K-1000"])
        .env("RTPD_DATA_DIR", dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(r#""kafka":{"topic":"payments""#),
        "rtpd wal cat: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The bad records are on the dead-letter topic (at least once), each
    // with its reason and where it came from.
    step("audited the transactions");
    let dead = dead_letters(&bootstrap, bad.len());
    step("read the dead letters");
    let seen: BTreeSet<(String, String)> = dead
        .iter()
        .map(|(reason, at, _, _)| (reason.clone(), at.clone()))
        .collect();
    for (reason, at, _, dropped) in &dead {
        assert_eq!(
            *dropped,
            reason == "payload_too_large",
            "{reason} at {at}: value left out only when too large for the topic"
        );
    }
    for (reason, (partition, offset)) in &bad {
        assert!(
            seen.contains(&(reason.to_string(), format!("{partition}@{offset}"))),
            "{reason} at {partition}@{offset} not on {DEAD}: {dead:?}"
        );
    }
    assert_eq!(seen.len(), bad.len(), "only the bad records: {dead:?}");

    // Offsets end committed past every record.
    let end = poll_json(&format!("{base}/metrics"), Duration::from_secs(5), |_| true).await;
    assert_eq!(end["total"], valid as u64);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let c: i64 = committed(&bootstrap).values().sum();
        let produced = (N + bad.len() + 3) as i64;
        if c == produced {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "committed {c} of {produced} records"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_ledger_outage_pauses_the_partitions_and_nothing_is_skipped() {
    outage_pauses_and_skips_nothing(Outage::Ledger).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wal_outage_pauses_the_partitions_and_nothing_is_skipped() {
    outage_pauses_and_skips_nothing(Outage::Wal).await;
}

#[derive(Clone, Copy, PartialEq)]
enum Outage {
    /// Redis (the ledger) killed, then started again with its data.
    Ledger,
    /// Azurite (the WAL) stopped, then started again with its data.
    Wal,
}

async fn outage_pauses_and_skips_nothing(outage: Outage) {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic(TOPIC, PARTITIONS, 1).unwrap();
    cluster.create_topic(DEAD, 1, 1).unwrap();
    let bootstrap = cluster.bootstrap_servers();
    let p = producer(&bootstrap);
    let mut redis = OwnRedis::start_persistent();
    let url = redis.url();
    let blob_data = tempfile::tempdir().unwrap();
    let blob_port = free_port();
    let mut azurite = start_azurite(blob_port, blob_data.path());
    let blob = azurite_connection_string_on(blob_port);

    let dir = tempfile::tempdir().unwrap();
    let (_mock, mock_port) = start_mock(&[]).await;
    let api_port = free_port();
    let base = format!("http://127.0.0.1:{api_port}");
    let _dev = spawn_intake(
        dir.path(),
        api_port,
        mock_port,
        &bootstrap,
        &[
            ("RTPD_LEDGER", "redis"),
            ("RTPD_REDIS_URL", &url),
            ("RTPD_WAL", "azure"),
            ("RTPD_STORAGE_CONNECTION_STRING", &blob),
            ("RTPD_WAL_CONTAINER", "kafka-wal"),
        ],
    );
    wait_http_ok(&format!("{base}/healthz"), Duration::from_secs(30)).await;
    for i in 0..100 {
        send(&p, None, &payload(&format!("O-{i}"), i)).await;
    }
    poll_json(&format!("{base}/metrics"), Duration::from_secs(60), |m| {
        m["success"].as_u64().unwrap_or(0) >= 100
    })
    .await;

    // The ledger or the WAL goes away; records keep coming.
    match outage {
        Outage::Ledger => redis.kill(),
        Outage::Wal => stop_azurite(&mut azurite),
    }
    for i in 100..300 {
        send(&p, None, &payload(&format!("O-{i}"), i)).await;
    }
    let prom = |text: &str, name: &str| -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(name) && !l.starts_with('#'))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    };
    let client = reqwest::Client::new();
    let metrics_text = || async {
        client
            .get(format!("{base}/metrics"))
            .header("Accept", "text/plain")
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let text = metrics_text().await;
        if prom(&text, "rtpd_kafka_paused") == Some(1.0) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the intake did not pause while the dependency was down:\n{}",
            text.lines()
                .filter(|l| l.contains("kafka"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Back: everything sent during the outage is taken, none skipped.
    match outage {
        Outage::Ledger => redis.launch(),
        Outage::Wal => azurite = start_azurite(blob_port, blob_data.path()),
    }
    poll_json(&format!("{base}/metrics"), Duration::from_secs(90), |m| {
        m["success"].as_u64().unwrap_or(0) >= 300
    })
    .await;
    let text = metrics_text().await;
    assert_eq!(prom(&text, "rtpd_kafka_paused"), Some(0.0), "resumed");
    let calls = mock_calls(mock_port).await;
    assert_eq!(calls["duplicate_successes"], 0, "{calls}");
    let keys = calls["by_key"].as_object().unwrap();
    for i in 0..300 {
        assert_eq!(keys[&format!("dev-vendor/O-{i}")]["successes"], 1, "O-{i}");
    }
    // Azurite (started again for the WAL outage) lives to the end.
    drop(azurite);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_with_the_brokers_gone_ends_within_its_bounds() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic(TOPIC, PARTITIONS, 1).unwrap();
    // Many partitions: each broker call the lag reader makes then waits
    // out its timeout (a reviewer: 121 s to exit with 48).
    cluster.create_topic("wide", 48, 1).unwrap();
    cluster.create_topic(DEAD, 1, 1).unwrap();
    let bootstrap = cluster.bootstrap_servers();
    let p = producer(&bootstrap);
    let dir = tempfile::tempdir().unwrap();
    let (_mock, mock_port) = start_mock(&[]).await;
    let api_port = free_port();
    let base = format!("http://127.0.0.1:{api_port}");
    let mut dev = spawn_intake(
        dir.path(),
        api_port,
        mock_port,
        &bootstrap,
        &[("RTPD_KAFKA_TOPICS", "payments,wide")],
    );
    wait_http_ok(&format!("{base}/healthz"), Duration::from_secs(30)).await;
    send(&p, None, &payload("S-1", 1)).await;
    poll_json(&format!("{base}/metrics"), Duration::from_secs(30), |m| {
        m["success"].as_u64().unwrap_or(0) >= 1
    })
    .await;
    // The brokers go away (the group coordinator with them), then SIGTERM:
    // the last commit and leaving the group cannot finish, and must not
    // hold the process (20 s of grace for records in intake, 5 s for the
    // close; none are in intake here).
    // The lag reader has read at least once with the brokers there.
    tokio::time::sleep(Duration::from_secs(6)).await;
    drop(p);
    drop(cluster);
    tokio::time::sleep(Duration::from_secs(2)).await;
    terminate(&dev);
    let t0 = std::time::Instant::now();
    let status = loop {
        if let Some(s) = dev.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "still running {:?} after SIGTERM",
            t0.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.success(), "{status:?}");
}
