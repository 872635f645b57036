//! `rtpd produce --kafka`: the same transactions as records on a Kafka
//! topic, timed until the ledger holds them all (the API's `/metrics`
//! count), so the Kafka intake's rate to durable can stand next to the
//! HTTP API's acknowledged rate in one run (`scripts/bench.sh kafka`).

use super::produce::{Opts, payload};
use anyhow::Context;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::time::{Duration, Instant};

/// How long the ledger may take to hold every record after the last send.
const DURABLE_WITHIN: Duration = Duration::from_secs(300);

async fn ledger_total(client: &reqwest::Client, url: &str) -> anyhow::Result<u64> {
    let m: serde_json::Value = client
        .get(format!("{}/metrics", url.trim_end_matches('/')))
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .with_context(|| format!("reading {url}/metrics (rtpd dev leaves it open; elsewhere set RTPD_PUBLIC_METRICS=true)"))?
        .json()
        .await?;
    m["total"]
        .as_u64()
        .context("the /metrics answer has no total")
}

pub async fn run(opts: &Opts, servers: &str) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let before = ledger_total(&http, &opts.url).await?;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", servers)
        .set("linger.ms", "5")
        .set("enable.idempotence", "true")
        .create()
        .context("creating the Kafka producer")?;
    let prefix = opts
        .prefix
        .clone()
        .unwrap_or_else(|| format!("KX-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]));
    let started = Instant::now();
    let pace = (opts.rate > 0).then(|| Duration::from_secs_f64(1.0 / opts.rate as f64));
    let mut sends = futures::stream::FuturesUnordered::new();
    let mut failed = 0u64;
    use futures::StreamExt;
    for i in 0..opts.count {
        let id = format!("{prefix}-{i}");
        let body = payload(&id, opts.payload_bytes);
        let producer = producer.clone();
        let topic = opts.topic.clone();
        sends.push(async move {
            producer
                .send(
                    FutureRecord::to(&topic).key(&id).payload(&body),
                    Duration::from_secs(30),
                )
                .await
                .map(|_| ())
                .map_err(|(e, _)| e)
        });
        // Enough in flight to keep the producer's batches full.
        while sends.len() >= opts.concurrency.max(1) * 64 {
            if let Some(Err(e)) = sends.next().await {
                failed += 1;
                tracing::warn!(error = %e, "a record was not produced");
            }
        }
        if let Some(p) = pace {
            let due = started + p.mul_f64((i + 1) as f64);
            tokio::time::sleep_until(due.into()).await;
        }
    }
    while let Some(r) = sends.next().await {
        if let Err(e) = r {
            failed += 1;
            tracing::warn!(error = %e, "a record was not produced");
        }
    }
    let produced_in = started.elapsed();
    let want = before + opts.count - failed;
    let deadline = Instant::now() + DURABLE_WITHIN;
    let mut total = before;
    while total < want {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the ledger holds {} of the {} records {:?} after the last send",
            total - before,
            opts.count - failed,
            DURABLE_WITHIN
        );
        // Not too often: each count is work for the process measured.
        tokio::time::sleep(Duration::from_millis(100)).await;
        total = ledger_total(&http, &opts.url).await?;
    }
    let durable_in = started.elapsed();
    let n = opts.count - failed;
    println!(
        "produced {n} records to {} in {:.2}s; all durable in the ledger after {:.2}s ({:.0}/s)",
        opts.topic,
        produced_in.as_secs_f64(),
        durable_in.as_secs_f64(),
        n as f64 / durable_in.as_secs_f64().max(1e-9)
    );
    anyhow::ensure!(failed == 0, "{failed} records were not produced");
    Ok(())
}
