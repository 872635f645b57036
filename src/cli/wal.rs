//! `rtpd wal ls | cat | accept-lost`: read the WAL (or the outcome
//! journal) without Storage Explorer, and tell recovery passes that a
//! segment the store will not return is gone for good.

use super::time_arg;
use crate::config::Settings;
use crate::services::Services;
use crate::wal::{Log, WalRecord, WalRef};
use anyhow::Context;
use chrono::{DateTime, Utc};

#[derive(Debug, clap::Args)]
pub struct Opts {
    #[command(subcommand)]
    pub command: WalCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum WalCommand {
    /// List segments with their record counts
    Ls(Window),
    /// Print records: one WAL reference, or every record of a transaction id
    Cat {
        /// A WAL reference (`<segment>#<offset>+<len>`) or a transaction id
        target: String,
        #[command(flatten)]
        window: Window,
    },
    /// Accept that a segment the store will not return is lost for good:
    /// recovery passes then read it as empty and can complete (journaled
    /// nowhere else; the acceptance is kept beside the log)
    AcceptLost {
        /// The segment's key, as the ERROR log line names it
        /// (`wal/v1/2026/11/30/23/….ndjson`, or `journal/v1/…` with --journal)
        segment: String,
        /// Why (kept with the acceptance)
        #[arg(long, required = true)]
        reason: String,
        /// Who is accepting (as for replays: cli:<name>, or the Entra principal)
        #[arg(long, env = "USER")]
        operator: Option<String>,
        /// The segment is one of the outcome journal's
        #[arg(long)]
        journal: bool,
    },
}

#[derive(Debug, clap::Args)]
pub struct Window {
    /// Start: RFC 3339 or an age like 2h, 7d
    #[arg(long, default_value = "24h", value_parser = time_arg::parse)]
    pub from: DateTime<Utc>,
    /// End
    #[arg(long, default_value = "now", value_parser = time_arg::parse)]
    pub to: DateTime<Utc>,
    /// Read the outcome journal instead of the transaction WAL
    #[arg(long)]
    pub journal: bool,
}

fn log_of<'a>(svc: &'a Services, w: &Window) -> &'a Log {
    if w.journal {
        svc.journal.log()
    } else {
        &svc.wal
    }
}

pub async fn run(opts: Opts) -> anyhow::Result<()> {
    let settings = Settings::load()?;
    if let WalCommand::Ls(w) = &opts.command {
        time_arg::check_retention(w.from, w.to, settings.wal_retention_days)?;
    }
    let svc = Services::build(&settings).await?;
    match opts.command {
        WalCommand::AcceptLost {
            segment,
            reason,
            operator,
            journal,
        } => {
            if reason.trim().is_empty() {
                anyhow::bail!("--reason must say why the segment is accepted as lost");
            }
            let (log, prefix, other) = if journal {
                (
                    svc.journal.log(),
                    crate::wal::JOURNAL_PREFIX,
                    "without --journal",
                )
            } else {
                (&svc.wal, crate::wal::WAL_PREFIX, "with --journal")
            };
            // `<prefix>/YYYY/MM/DD/HH/<segment>`: a segment of this log, not
            // an hour or another log's segment.
            let layout = segment
                .strip_prefix(prefix)
                .and_then(|r| r.strip_prefix('/'))
                .map(|r| r.split('/').collect::<Vec<_>>())
                .is_some_and(|parts| {
                    parts.len() == 5
                        && parts[..4]
                            .iter()
                            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
                        && !parts[4].is_empty()
                });
            if !layout {
                anyhow::bail!(
                    "{segment} is not a segment of {} (a key like {prefix}/2026/11/30/23/<name>.ndjson; a segment of the other log needs the command {other})",
                    log.describe()
                );
            }
            // As a recovery pass would meet it: tried again while it fails
            // (the store's patience), and only a segment that still fails as
            // unavailable while the store answers otherwise is accepted;
            // passes honour nothing else (a store down as a whole, or an
            // error no retry changes, is not "this segment is gone").
            match crate::backoff::patiently("segment read", || log.read_segment(&segment)).await {
                Err(crate::wal::WalError::NotFound(_)) => {
                    anyhow::bail!("no segment {segment} in {}", log.describe())
                }
                Ok(_) => anyhow::bail!(
                    "{segment} reads now: nothing to accept (an acceptance cannot be taken back)"
                ),
                Err(e @ crate::wal::WalError::Unavailable(_)) => {
                    if let Err(p) = log.ping().await {
                        anyhow::bail!(
                            "{segment} does not read ({e}), but neither does the store ({p}): not accepting while the store is down"
                        );
                    }
                }
                Err(e) => anyhow::bail!(
                    "{segment} fails with an error an acceptance does not cover ({e}); fix the cause (permissions, the blob's tier)"
                ),
            }
            let who = super::operator::resolve(&settings, operator.as_deref()).await;
            let note = serde_json::json!({
                "segment": segment,
                "accepted_at": Utc::now(),
                "operator": who.to_string(),
                "reason": reason,
            });
            if log.accept_lost(&segment, &note).await? {
                tracing::warn!(segment = %segment, operator = %who, reason = %reason, "WAL segment accepted as lost by an operator");
                println!(
                    "{segment}: accepted as lost by {who}; recovery passes read it as empty from now on"
                );
            } else {
                println!("{segment}: already accepted as lost");
            }
        }
        WalCommand::Ls(w) => {
            let log = log_of(&svc, &w);
            let mut total = 0usize;
            let segments = log.segments(w.from, w.to).await?;
            for s in &segments {
                let records = match s.metadata.get("records").and_then(|r| r.parse().ok()) {
                    Some(n) => n,
                    None => log.read_segment(&s.key).await?.len(),
                };
                total += records;
                println!("{}\t{} bytes\t{} records", s.key, s.size, records);
            }
            println!("{} segments, {total} records", segments.len());
        }
        WalCommand::Cat { target, window } => {
            let log = log_of(&svc, &window);
            if let Ok(r) = target.parse::<WalRef>()
                && target.contains('/')
            {
                let bytes = log.read(&r).await.with_context(|| format!("reading {r}"))?;
                println!("{}", String::from_utf8_lossy(&bytes));
                return Ok(());
            }
            // A transaction id: the ledger knows its record; the window finds every copy.
            let mut printed = 0;
            if !window.journal
                && let Ok(Some(rec)) = svc.ledger.get(&target).await
                && let Ok(bytes) = svc.wal.read(&rec.wal_ref).await
            {
                println!("{}", String::from_utf8_lossy(&bytes));
                printed += 1;
            }
            if printed == 0 {
                time_arg::check_retention(window.from, window.to, settings.wal_retention_days)?;
                for s in log.segments(window.from, window.to).await? {
                    for (_, bytes) in log.read_segment(&s.key).await? {
                        let v = serde_json::from_slice::<serde_json::Value>(&bytes).ok();
                        let id = v.as_ref().and_then(|v| {
                            v.get("transaction_id")
                                .and_then(|i| i.as_str())
                                .map(str::to_owned)
                        });
                        // A WAL record by its vendor's id, or by its key
                        // (`<vendor>/<id>`).
                        let key = v
                            .and_then(|v| serde_json::from_value::<WalRecord>(v).ok())
                            .and_then(|w| w.key().ok())
                            .map(|k| k.to_string());
                        if id.as_deref() == Some(target.as_str())
                            || key.as_deref() == Some(target.as_str())
                        {
                            println!("{}", String::from_utf8_lossy(&bytes));
                            printed += 1;
                        }
                    }
                }
            }
            if printed == 0 {
                anyhow::bail!(
                    "no WAL record for {target} between {} and {}",
                    window.from,
                    window.to
                );
            }
        }
    }
    Ok(())
}
