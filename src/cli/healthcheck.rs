//! `rtpd healthcheck --url URL`: exit 0 when the URL answers 2xx within 3 s.
//! Container images have no curl; this is their HEALTHCHECK.

use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct Opts {
    #[arg(long, default_value = "http://127.0.0.1:8080/healthz")]
    pub url: String,
}

pub async fn run(opts: Opts) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()?;
    let resp = client.get(&opts.url).send().await?;
    if !resp.status().is_success() {
        anyhow::bail!("{} answered {}", opts.url, resp.status());
    }
    Ok(())
}
