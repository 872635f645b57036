//! `rtpd`: parse the command line, set up logging, run one subcommand,
//! report how it ended. Exit status: 0 done, 1 failed (one line on stderr),
//! 2 usage error (clap), 3 `reconcile --dry-run` found drift.

use clap::FromArgMatches;
use rtp_durability::cli::{self, Cli, Command, Ending};
use rtp_durability::config::{LogFormat, Settings};
use rtp_durability::telemetry;

/// mimalloc rather than glibc's malloc: per-thread free lists, no arena
/// locks or consolidation passes on the request path (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() {
    let cli = Cli::from_arg_matches(&cli::command().get_matches()).unwrap_or_else(|e| e.exit());
    // Logging follows the configuration when it loads; a bad configuration is
    // reported by the subcommand itself.
    let (format, level) = Settings::load()
        .map(|s| (s.log_format, s.log_level))
        .unwrap_or((LogFormat::Text, "info".into()));
    let otlp = match &cli.command {
        Command::Dev(o) => telemetry::OtlpOverride {
            endpoint: o.otlp.clone(),
        },
        _ => telemetry::OtlpOverride::default(),
    };
    let telemetry = match telemetry::init(format, &level, &otlp) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("rtpd: {e}");
            std::process::exit(1);
        }
    };
    let ended = run(cli.command).await;
    // The last spans and metrics leave before the process does.
    telemetry.shutdown();
    match ended {
        Ok(Ending::Done) => {}
        Ok(ending) => std::process::exit(ending.code()),
        Err(e) => {
            // One readable line; the cause chain joined.
            eprintln!("rtpd: {e:#}");
            std::process::exit(1);
        }
    }
}

async fn run(command: Command) -> anyhow::Result<Ending> {
    let done = |r: anyhow::Result<()>| r.map(|()| Ending::Done);
    match command {
        Command::Reconcile(o) => cli::reconcile::run(o).await,
        Command::Dev(o) => done(cli::dev::run(o).await),
        Command::Serve(_) => done(serve(cli::serve::Parts::Both).await),
        Command::Api(_) => done(serve(cli::serve::Parts::Api).await),
        Command::Processor(_) => done(serve(cli::serve::Parts::Processor).await),
        Command::KafkaIntake(_) => done(serve(cli::serve::Parts::KafkaIntake).await),
        Command::MockDownstream(o) => done(cli::mock::run(o).await),
        Command::Produce(o) => done(cli::produce::run(o).await),
        Command::Replay(o) => done(cli::replay::run(o).await),
        Command::Wal(o) => done(cli::wal::run(o).await),
        Command::RebuildLedger(o) => done(cli::rebuild_ledger::run(o).await),
        Command::Dlq(o) => done(cli::dlq::run(o).await),
        Command::Migrate(o) => done(cli::migrate::run(o).await),
        Command::Config(o) => done(cli::config::run(o).await),
        Command::Healthcheck(o) => done(cli::healthcheck::run(o).await),
    }
}

async fn serve(parts: cli::serve::Parts) -> anyhow::Result<()> {
    cli::serve::run(parts, Settings::load()?).await
}
