//! `rtpd`: parse the command line, set up logging, run one subcommand,
//! report how it ended.

use clap::Parser;
use rtp_durability::cli::{self, Cli, Command};
use rtp_durability::config::{LogFormat, Settings};
use rtp_durability::telemetry;

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    // Logging follows the configuration when it loads; a bad configuration is
    // reported by the subcommand itself.
    let (format, level) = Settings::load()
        .map(|s| (s.log_format, s.log_level))
        .unwrap_or((LogFormat::Text, "info".into()));
    telemetry::init(format, &level);
    let result = match cli.command {
        Command::Dev(o) => cli::dev::run(o).await,
        Command::Serve(_) => serve(cli::serve::Parts::Both).await,
        Command::Api(_) => serve(cli::serve::Parts::Api).await,
        Command::Processor(_) => serve(cli::serve::Parts::Processor).await,
        Command::MockDownstream(o) => cli::mock::run(o).await,
        Command::Produce(o) => cli::produce::run(o).await,
        Command::Reconcile(o) => cli::reconcile::run(o).await,
        Command::Replay(o) => cli::replay::run(o).await,
        Command::Wal(o) => cli::wal::run(o).await,
        Command::RebuildLedger(o) => cli::rebuild_ledger::run(o).await,
        Command::Dlq(o) => cli::dlq::run(o).await,
        Command::Migrate(o) => cli::migrate::run(o).await,
        Command::Config(o) => cli::config::run(o).await,
        Command::Healthcheck(o) => cli::healthcheck::run(o).await,
    };
    if let Err(e) = result {
        // One readable line; the cause chain joined.
        eprintln!("rtpd: {e:#}");
        std::process::exit(1);
    }
}

async fn serve(parts: cli::serve::Parts) -> anyhow::Result<()> {
    cli::serve::run(parts, Settings::load()?).await
}
