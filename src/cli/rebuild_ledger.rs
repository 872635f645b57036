//! `rtpd rebuild-ledger`: after the ledger (Redis) was lost or corrupted,
//! rebuild it from the WAL and the outcome journal. Finished transactions
//! come back finished and are never delivered again; unfinished ones come
//! back with their journaled attempts, for the reconciler to re-drive.

use super::reconcile::print_report;
use super::time_arg;
use crate::config::Settings;
use crate::reconcile::{LeaseOptions, ReconcileOptions};
use crate::services::Services;
use chrono::{DateTime, Utc};
use indicatif::{ProgressBar, ProgressStyle};
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct Opts {
    /// Start of the window: RFC 3339 or an age like 2h, 7d (cover the outage and the retry horizon)
    #[arg(long, value_parser = time_arg::parse)]
    pub from: DateTime<Utc>,
    /// End of the window
    #[arg(long, default_value = "now", value_parser = time_arg::parse)]
    pub to: DateTime<Utc>,
    /// Print what would be restored, change nothing
    #[arg(long)]
    pub dry_run: bool,
    /// Also re-drive what is unfinished (otherwise the reconciler does it)
    #[arg(long)]
    pub redrive: bool,
    /// Hide the progress bar
    #[arg(long)]
    pub quiet: bool,
    /// Mark the ledger intact even if some segments could not be read (the
    /// store kept failing on them while it answered otherwise; they are
    /// named in the log): what they held is not restored
    #[arg(long)]
    pub accept_unreadable_segments: bool,
}

pub async fn run(opts: Opts) -> anyhow::Result<()> {
    // Before connecting (which may take a while): `--to now` was read just before.
    let started = Utc::now();
    let settings = Settings::load()?;
    super::time_arg::check_retention(opts.from, opts.to, settings.wal_retention_days)?;
    let svc = Services::build(&settings).await?;
    let mut o = ReconcileOptions::new(
        opts.from,
        opts.to,
        Settings::secs(settings.reconcile_pending_after_secs),
    );
    o.dry_run = opts.dry_run;
    o.redrive = opts.redrive;
    o.accept_unreadable = opts.accept_unreadable_segments;
    o.rate_per_sec = 200;
    if !opts.dry_run {
        o.lease = Some(LeaseOptions {
            owner: format!("rebuild-{}", svc.instance),
            ttl: Duration::from_secs(60),
        });
    }
    let bar = if opts.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(0)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} segments {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    o.progress = Some(bar.clone());
    // The intact mark says every transaction of the recovery window is in
    // the ledger: a narrower window restores what it covers but marks
    // nothing (the service's own rebuild, over the lookback, does).
    let lookback = chrono::Duration::from_std(Settings::secs(settings.reconcile_lookback_secs))
        .unwrap_or_default();
    let covers =
        opts.from <= started - lookback && opts.to >= started - chrono::Duration::seconds(5);
    o.rebuild = true;
    let (report, marked) = if covers {
        svc.reconciler()
            .rebuild(&o, Duration::from_secs(60))
            .await?
    } else {
        let r = svc
            .reconciler()
            .reconcile_when_free(&o, Duration::from_secs(60))
            .await?;
        (r, false)
    };
    bar.finish_and_clear();
    print_report(&report, opts.dry_run);
    if !opts.dry_run {
        // A ledger without its intact mark refuses registrations (503) until
        // a complete rebuild marks it (see `Ledger::intact`).
        println!(
            "intact mark: {}",
            if marked {
                "set (ingest accepts new transactions)"
            } else if !covers {
                "not set by this run: its window does not span RTPD_RECONCILE_LOOKBACK_SECS up to now"
            } else if report.unreadable_segments > 0 && !opts.accept_unreadable_segments {
                "NOT set: segments could not be read (named in the log); read them (rtpd wal cat), or accept losing what they hold with --accept-unreadable-segments (this rebuild) or rtpd wal accept-lost <segment> (for good)"
            } else {
                "NOT set (the pass was not complete, or the ledger was lost again): run it again"
            }
        );
    }
    let counts = svc.ledger.counts().await?;
    println!(
        "ledger now: {} pending, {} processing, {} failed, {} success, {} dead_letter",
        counts.pending, counts.processing, counts.failed, counts.success, counts.dead_letter
    );
    // A rebuild meant to mark the ledger that did not: the operator (or a
    // script) must not take it for done.
    if !opts.dry_run && covers && !marked {
        anyhow::bail!(
            "the ledger was not marked intact (see above); a Redis ledger without its mark answers new transactions 503"
        );
    }
    Ok(())
}
