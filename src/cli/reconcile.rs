//! `rtpd reconcile`: one pass of the reconciler over a window of the WAL,
//! under the reconciler lease.

use super::{Ending, time_arg};
use crate::config::Settings;
use crate::reconcile::{LeaseOptions, ReconcileOptions, ReconcileReport};
use crate::services::Services;
use chrono::{DateTime, Utc};
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct Opts {
    /// Start of the window: RFC 3339 or an age like 2h, 7d
    #[arg(long, default_value = "24h", value_parser = time_arg::parse)]
    pub from: DateTime<Utc>,
    /// End of the window
    #[arg(long, default_value = "now", value_parser = time_arg::parse)]
    pub to: DateTime<Utc>,
    /// Print what would be done, change nothing
    #[arg(long)]
    pub dry_run: bool,
    /// Re-drive `pending` left untouched this long
    #[arg(long, env = "RTPD_RECONCILE_PENDING_AFTER_SECS")]
    pub pending_after_secs: Option<f64>,
    /// Re-drives per second at most
    #[arg(long, default_value_t = 200)]
    pub rate: u32,
}

/// Exit 3 from `--dry-run` when the pass found something to do.
pub async fn run(opts: Opts) -> anyhow::Result<Ending> {
    let settings = Settings::load()?;
    time_arg::check_retention(opts.from, opts.to, settings.wal_retention_days)?;
    let svc = Services::build(&settings).await?;
    let pending_after = Settings::secs(
        opts.pending_after_secs
            .unwrap_or(settings.reconcile_pending_after_secs),
    );
    let mut o = ReconcileOptions::new(opts.from, opts.to, pending_after);
    o.dry_run = opts.dry_run;
    o.rate_per_sec = opts.rate;
    // A dry run changes nothing, so it needs no lease.
    if !opts.dry_run {
        o.lease = Some(LeaseOptions {
            owner: format!("cli-{}", svc.instance),
            ttl: Duration::from_secs(60),
        });
    }
    let report = svc
        .reconciler()
        .reconcile_when_free(&o, Duration::from_secs(60))
        .await?;
    print_report(&report, opts.dry_run);
    if !report.complete && !opts.dry_run {
        anyhow::bail!(
            "the pass stopped short of the whole window ({} segments could not be read; a failed re-enqueue stops it too; the log says which; `rtpd wal accept-lost <segment>` accepts one gone for good)",
            report.unreadable_segments
        );
    }
    Ok(if opts.dry_run && found_drift(&report) {
        Ending::Drift
    } else {
        Ending::Done
    })
}

/// The WAL, the journal and the ledger disagree: ledger entries missing or
/// wrong, transactions overdue for a re-drive, or WAL records or segments
/// unreadable.
/// (Conflicting records are refused 409s, not drift.)
pub fn found_drift(report: &ReconcileReport) -> bool {
    report.drift() + report.redriven() + report.unreadable + report.unreadable_segments > 0
}

pub fn print_report(report: &ReconcileReport, dry_run: bool) {
    for a in &report.actions {
        println!("{}{a}", if dry_run { "would do: " } else { "" });
    }
    println!(
        "{} segments, {} records: {} missing from ledger and unfinished (restored), {} missing and finished (restored, never re-driven), \
         {} corrected from the journal; re-driven {} pending, {} failed, {} processing{}; {} conflicting, {} unreadable; {} segments unreadable (skipped, named in the log)",
        report.segments,
        report.records,
        report.missing_from_ledger,
        report.restored_finished,
        report.corrected_from_journal,
        report.redriven_pending,
        report.redriven_failed,
        report.redriven_processing,
        if dry_run { " (dry run)" } else { "" },
        report.conflicting,
        report.unreadable,
        report.unreadable_segments
    );
}
