//! `rtpd produce`: the seed's test-message producer. Sends transactions at a
//! rate and concurrency, shows progress, and ends with throughput, an HDR
//! latency summary and counts by response code.

use anyhow::Context;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use std::{
    collections::BTreeMap,
    io::Write,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

#[derive(Debug, Clone, Default, clap::Args)]
pub struct Opts {
    /// Base URL of the API
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Transactions to send
    #[arg(long, default_value_t = 1000)]
    pub count: u64,
    /// Transactions per second at most (0 = as fast as possible)
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Requests in flight at once
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Approximate size of each JSON payload in bytes
    #[arg(long, default_value_t = 256)]
    pub payload_bytes: usize,
    /// Vendor API key (default: RTPD_API_KEY, then ./.rtpd/dev-credentials.json)
    #[arg(long, env = "RTPD_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Transaction id prefix (default: a fresh run id)
    #[arg(long)]
    pub prefix: Option<String>,
    /// Write the id of every acknowledged (2xx) transaction to this file, one per line
    #[arg(long)]
    pub acked_out: Option<PathBuf>,
    /// Hide the progress bar
    #[arg(long)]
    pub quiet: bool,
    /// Send the transactions as records to these Kafka brokers instead of
    /// POSTing them, and time them until the ledger holds them all (read
    /// from --url's /metrics): the Kafka intake's rate to durable
    #[cfg(feature = "kafka")]
    #[arg(long, value_name = "BOOTSTRAP_SERVERS")]
    pub kafka: Option<String>,
    /// Topic for --kafka
    #[cfg(feature = "kafka")]
    #[arg(long, default_value = "transactions")]
    pub topic: String,
}

#[derive(Debug, Default)]
pub struct Summary {
    pub sent: u64,
    pub acked: u64,
    pub by_code: BTreeMap<String, u64>,
    pub elapsed: Duration,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Summary {
    pub fn acked_per_sec(&self) -> f64 {
        self.acked as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

pub(crate) fn payload(id: &str, size: usize) -> String {
    let base = format!(
        "{{\"transaction_id\":\"{id}\",\"amount\":\"125.50\",\"currency\":\"USD\",\"debtor\":\"ACME-001\",\"creditor\":\"SHOP-042\",\"pad\":\"\"}}"
    );
    let pad = size.saturating_sub(base.len());
    base.replacen(
        "\"pad\":\"\"",
        &format!("\"pad\":\"{}\"", "x".repeat(pad)),
        1,
    )
}

fn default_key() -> Option<String> {
    let text = std::fs::read_to_string(".rtpd/dev-credentials.json").ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("api_key")?.as_str().map(str::to_owned)
}

pub async fn produce(opts: &Opts) -> anyhow::Result<Summary> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(opts.concurrency)
        .build()?;
    let url = format!("{}/v1/transactions", opts.url.trim_end_matches('/'));
    let key = opts.api_key.clone().or_else(default_key);
    let prefix = opts
        .prefix
        .clone()
        .unwrap_or_else(|| format!("TX-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]));
    let next = Arc::new(AtomicU64::new(0));
    let hist = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(
        1, 60_000_000, 3,
    )?));
    let codes = Arc::new(Mutex::new(BTreeMap::<String, u64>::new()));
    let acked_ids = Arc::new(Mutex::new(Vec::<String>::new()));
    let pacer = (opts.rate > 0).then(|| {
        let mut iv = tokio::time::interval(Duration::from_secs_f64(1.0 / opts.rate as f64));
        iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        Arc::new(tokio::sync::Mutex::new(iv))
    });
    let bar = if opts.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(opts.count)
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} {per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..opts.concurrency.max(1) {
        let (client, url, key, prefix) = (client.clone(), url.clone(), key.clone(), prefix.clone());
        let (next, hist, codes, acked_ids, pacer, bar) = (
            next.clone(),
            hist.clone(),
            codes.clone(),
            acked_ids.clone(),
            pacer.clone(),
            bar.clone(),
        );
        let (count, size) = (opts.count, opts.payload_bytes);
        workers.spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= count {
                    return;
                }
                if let Some(p) = &pacer {
                    p.lock().await.tick().await;
                }
                let id = format!("{prefix}-{n:08}");
                let mut req = client
                    .post(&url)
                    .header("Content-Type", "application/json")
                    .body(payload(&id, size));
                if let Some(k) = &key {
                    req = req.header("X-Api-Key", k);
                }
                let t = Instant::now();
                let code = match req.send().await {
                    Ok(r) => {
                        let s = r.status();
                        let _ = r.bytes().await;
                        s.as_u16().to_string()
                    }
                    Err(e) if e.is_timeout() => "timeout".to_owned(),
                    Err(_) => "connection_error".to_owned(),
                };
                let us = t.elapsed().as_micros() as u64;
                if code.starts_with('2') {
                    let _ = hist.lock().expect("histogram lock").record(us.max(1));
                    acked_ids.lock().expect("ids lock").push(id);
                }
                *codes.lock().expect("codes lock").entry(code).or_default() += 1;
                bar.inc(1);
            }
        });
    }
    while workers.join_next().await.is_some() {}
    let elapsed = started.elapsed();
    bar.finish_and_clear();
    let h = hist.lock().expect("histogram lock");
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let ids = acked_ids.lock().expect("ids lock");
    if let Some(path) = &opts.acked_out {
        let mut f =
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        for id in ids.iter() {
            writeln!(f, "{id}")?;
        }
        f.sync_all()?;
    }
    Ok(Summary {
        sent: opts.count,
        acked: ids.len() as u64,
        by_code: codes.lock().expect("codes lock").clone(),
        elapsed,
        p50_ms: ms(0.5),
        p90_ms: ms(0.9),
        p99_ms: ms(0.99),
        max_ms: h.max() as f64 / 1000.0,
    })
}

pub async fn run(opts: Opts) -> anyhow::Result<()> {
    #[cfg(feature = "kafka")]
    if let Some(servers) = &opts.kafka {
        return super::produce_kafka::run(&opts, servers).await;
    }
    let s = produce(&opts).await?;
    println!(
        "sent {} in {:.2}s: {} acknowledged ({:.0}/s)",
        s.sent,
        s.elapsed.as_secs_f64(),
        s.acked,
        s.acked_per_sec()
    );
    println!(
        "ack latency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2}",
        s.p50_ms, s.p90_ms, s.p99_ms, s.max_ms
    );
    let codes: Vec<String> = s.by_code.iter().map(|(c, n)| format!("{c}: {n}")).collect();
    println!("responses: {}", codes.join(", "));
    if s.acked == 0 && s.sent > 0 {
        anyhow::bail!("no transaction was acknowledged");
    }
    Ok(())
}
