//! `rtpd reconcile`: one pass of the reconciler over a window of the WAL.

use super::time_arg;
use crate::app::Services;
use crate::config::Settings;
use crate::reconcile::{ReconcileOptions, reconcile};
use chrono::{DateTime, Utc};

#[derive(Debug, clap::Args)]
pub struct Opts {
    /// Start of the window: RFC 3339 or an age like 2h, 7d
    #[arg(long, default_value = "24h", value_parser = time_arg::parse)]
    pub from: DateTime<Utc>,
    /// End of the window
    #[arg(long, default_value = "now", value_parser = time_arg::parse)]
    pub to: DateTime<Utc>,
    /// Print what would be re-driven, change nothing
    #[arg(long)]
    pub dry_run: bool,
    /// Re-drive `pending` left untouched this long (default RTPD_RECONCILE_PENDING_AFTER_SECS)
    #[arg(long)]
    pub pending_after_secs: Option<f64>,
    /// Re-drives per second at most
    #[arg(long, default_value_t = 200)]
    pub rate: u32,
}

pub async fn run(opts: Opts) -> anyhow::Result<()> {
    let settings = Settings::load()?;
    let svc = Services::build(&settings).await?;
    let pending_after = Settings::secs(
        opts.pending_after_secs
            .unwrap_or(settings.reconcile_pending_after_secs),
    );
    let report = reconcile(
        &svc,
        &ReconcileOptions {
            from: opts.from,
            to: opts.to,
            pending_after,
            slack: pending_after,
            dry_run: opts.dry_run,
            rate_per_sec: opts.rate,
        },
    )
    .await?;
    for a in &report.actions {
        println!(
            "{}{a}",
            if opts.dry_run {
                "would re-drive "
            } else {
                "re-drove "
            }
        );
    }
    println!(
        "{} segments, {} records: {} missing from ledger, {} pending, {} failed, {} processing re-driven{}; {} conflicting, {} unreadable",
        report.segments,
        report.records,
        report.missing_from_ledger,
        report.redriven_pending,
        report.redriven_failed,
        report.redriven_processing,
        if opts.dry_run { " (dry run)" } else { "" },
        report.conflicting,
        report.unreadable
    );
    Ok(())
}
