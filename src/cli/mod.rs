//! The `rtpd` command line: one file per subcommand, each an `Opts` struct
//! and an `async fn run`.

pub mod config;
pub mod dev;
pub mod dlq;
pub mod environment;
pub mod healthcheck;
pub mod migrate;
pub mod mock;
pub mod operator;
pub mod produce;
#[cfg(feature = "kafka")]
pub mod produce_kafka;
pub mod rebuild_ledger;
pub mod reconcile;
pub mod replay;
pub mod serve;
pub mod time_arg;
pub mod wal;

use clap::{CommandFactory, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "rtpd",
    version,
    about = "Durability layer for real-time payments"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The whole pipeline on one machine: embedded backends, mock downstream, data under ./.rtpd
    Dev(dev::Opts),
    /// API and processor against the configured backends
    Serve(serve::Opts),
    /// The ingest API only
    Api(serve::Opts),
    /// The queue processor only
    Processor(serve::Opts),
    /// The Kafka intake only: RTPD_KAFKA_TOPICS through the durability step, like POST /v1/transactions
    KafkaIntake(serve::Opts),
    /// A stand-in payment service
    MockDownstream(mock::Opts),
    /// Send test transactions and report throughput and latency
    Produce(produce::Opts),
    /// Repair the ledger from the WAL and journal and re-drive overdue transactions
    Reconcile(reconcile::Opts),
    /// Replay transactions from the WAL: by id, time range, state or the dead-letter queue
    Replay(replay::Opts),
    /// Read WAL segments and records (`ls`, `cat`)
    Wal(wal::Opts),
    /// Rebuild the ledger from the WAL and the outcome journal (after Redis was lost)
    RebuildLedger(rebuild_ledger::Opts),
    /// Inspect, replay and purge the dead-letter queue
    Dlq(dlq::Opts),
    /// Apply the PostgreSQL ledger's schema migrations and exit
    Migrate(migrate::Opts),
    /// Print the effective configuration (secrets redacted)
    Config(config::Opts),
    /// Exit 0 if a health URL answers 2xx (for container HEALTHCHECKs)
    Healthcheck(healthcheck::Opts),
}

/// The command line as `rtpd` parses it: each subcommand's `--help` ends
/// with the `RTPD_*` variables it reads and its exit status.
pub fn command() -> clap::Command {
    let mut cmd = Cli::command();
    let names: Vec<String> = cmd
        .get_subcommands()
        .map(|c| c.get_name().to_owned())
        .collect();
    for name in names {
        let (reads, exit) = environment::of(&name);
        cmd = cmd.mut_subcommand(&name, |c| environment::describe(c, reads, exit));
    }
    cmd
}

/// How a subcommand ended, when success has more than one meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// Exit 0.
    Done,
    /// Exit 3: `rtpd reconcile --dry-run` found something to do.
    Drift,
}

impl Ending {
    pub fn code(self) -> i32 {
        match self {
            Ending::Done => 0,
            Ending::Drift => 3,
        }
    }
}

/// Resolves when SIGTERM or Ctrl-C arrives.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
