//! Standalone Service Bus test broker, for the Python conformance suite and
//! manual runs. Prints `listening on 127.0.0.1:PORT` once ready.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use sb_test_broker::BrokerConfig;

#[derive(Parser)]
#[command(about = "AMQP 1.0 test broker behaving like Azure Service Bus")]
struct Opts {
    /// Port on 127.0.0.1; 0 picks a free one.
    #[arg(long, default_value_t = 5672)]
    port: u16,
    /// Queue to create at start (repeatable). Unknown queues are created on first use unless --strict.
    #[arg(long = "queue")]
    queues: Vec<String>,
    /// Refuse links to queues not named with --queue, as Service Bus would.
    #[arg(long)]
    strict: bool,
    #[arg(long, default_value_t = 30)]
    lock_duration_secs: u64,
    #[arg(long, default_value_t = 10)]
    max_delivery_count: u32,
    #[arg(long, default_value_t = 600)]
    duplicate_window_secs: u64,
    /// Check SAS token signatures against this key.
    #[arg(long)]
    sas_key: Option<String>,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let opts = Opts::parse();
    let config = BrokerConfig {
        bind: SocketAddr::from(([127, 0, 0, 1], opts.port)),
        queues: opts.queues,
        auto_create_queues: !opts.strict,
        lock_duration: Duration::from_secs(opts.lock_duration_secs),
        max_delivery_count: opts.max_delivery_count,
        duplicate_window: Duration::from_secs(opts.duplicate_window_secs),
        sas_key: opts.sas_key,
    };
    let broker = sb_test_broker::start(config).await?;
    println!("listening on {}", broker.addr());
    tokio::signal::ctrl_c().await?;
    broker.shutdown();
    Ok(())
}
