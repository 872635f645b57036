//! `rtpd mock-downstream`: the stand-in payment service.

use crate::mock_downstream::{Mock, MockOptions, parse_mix};
use anyhow::Context;
use std::{net::TcpListener, time::Duration};

#[derive(Debug, clap::Args)]
pub struct Opts {
    /// Listen address
    #[arg(long, default_value = "127.0.0.1:8081")]
    pub addr: String,
    /// Probability that a call succeeds (the seed's mock uses 0.8)
    #[arg(long, default_value_t = 0.8)]
    pub success_rate: f64,
    /// Added latency per call, in milliseconds
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// Relative weights of failure kinds, e.g. 503=5,429=2,400=1,hang=1
    #[arg(long, default_value = "503=5,429=2,400=1,hang=1")]
    pub failure_mix: String,
    /// How long a `hang` failure holds the connection, in seconds
    #[arg(long, default_value_t = 60)]
    pub hang_secs: u64,
}

impl Opts {
    pub fn options(&self) -> anyhow::Result<MockOptions> {
        if !(0.0..=1.0).contains(&self.success_rate) {
            anyhow::bail!("--success-rate must be between 0 and 1");
        }
        Ok(MockOptions {
            success_rate: self.success_rate,
            latency: Duration::from_millis(self.latency_ms),
            failure_mix: parse_mix(&self.failure_mix)
                .map_err(|e| anyhow::anyhow!("--failure-mix: {e}"))?,
            hang: Duration::from_secs(self.hang_secs),
        })
    }
}

pub async fn run(opts: Opts) -> anyhow::Result<()> {
    let mock = Mock::new(opts.options()?);
    let listener =
        TcpListener::bind(&opts.addr).with_context(|| format!("binding {}", opts.addr))?;
    let (server, port) = mock.serve(listener)?;
    tracing::info!(
        port,
        success_rate = opts.success_rate,
        latency_ms = opts.latency_ms,
        "mock downstream listening"
    );
    println!(
        "mock downstream on http://{}  (POST /process, GET /calls)",
        opts.addr
    );
    let handle = server.handle();
    tokio::select! {
        r = server => r.context("mock server")?,
        _ = super::shutdown_signal() => handle.stop(true).await,
    }
    Ok(())
}
