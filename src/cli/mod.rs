//! The `rtpd` command line: one file per subcommand, each an `Opts` struct
//! and an `async fn run`.

pub mod config;
pub mod dev;
pub mod dlq;
pub mod healthcheck;
pub mod migrate;
pub mod mock;
pub mod produce;
pub mod rebuild_ledger;
pub mod reconcile;
pub mod replay;
pub mod serve;
pub mod time_arg;
pub mod wal;

use clap::{Parser, Subcommand};

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
