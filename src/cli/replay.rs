//! `rtpd replay`: put transactions back to `pending` and re-enqueue them from
//! the WAL — by id, by time range, by state, or from the dead-letter queue.
//! Bulk replays are rate-limited and show progress; `--dry-run` lists.

use super::time_arg;
use crate::config::Settings;
use crate::envelope::transaction_id_of;
use crate::replay::{ReplayRequest, Replayed, Replayer, Scope};
use crate::services::Services;
use crate::transaction::{State, TransactionId};
use anyhow::Context;
use chrono::{DateTime, Utc};
use indicatif::{ProgressBar, ProgressStyle};
use std::{collections::HashSet, time::Duration};

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("selection").required(true).args(["ids", "state", "from", "dlq"])))]
pub struct Opts {
    /// Transaction ids to replay: `<vendor>/<id>` (or the id with --vendor;
    /// a bare id when authentication is off)
    pub ids: Vec<String>,
    /// The vendor whose transaction ids these are (the same id from two
    /// vendors is two transactions)
    #[arg(long)]
    pub vendor: Option<String>,
    /// Replay every transaction in this state (e.g. dead_letter)
    #[arg(long, value_parser = parse_state)]
    pub state: Option<State>,
    /// Replay every transaction received since (RFC 3339 or an age like 2h)
    #[arg(long, value_parser = time_arg::parse)]
    pub from: Option<DateTime<Utc>>,
    /// ... until (with --from)
    #[arg(long, value_parser = time_arg::parse, requires = "from")]
    pub to: Option<DateTime<Utc>>,
    /// Replay the transactions in the dead-letter queue and remove their messages from it
    #[arg(long)]
    pub dlq: bool,
    /// List what would be replayed, change nothing
    #[arg(long)]
    pub dry_run: bool,
    /// Required to replay a transaction that already succeeded (with
    /// --if-state success, or --state success: the state you saw)
    #[arg(long)]
    pub force: bool,
    /// Replay only if the transaction is in this state now (the one you
    /// saw); a replay by --state sets it
    #[arg(long, value_parser = parse_state)]
    pub if_state: Option<State>,
    /// Why (recorded in the outcome journal)
    #[arg(long)]
    pub reason: Option<String>,
    /// Who is replaying, journaled as cli:<name> when the command has no Entra
    /// identity (with one, the Entra principal is journaled instead)
    #[arg(long, env = "USER")]
    pub operator: Option<String>,
    /// Replays per second at most
    #[arg(long, default_value_t = 50)]
    pub rate: u32,
    /// Replay at most this many
    #[arg(long, default_value_t = 100_000)]
    pub limit: usize,
}

pub(super) fn parse_state(s: &str) -> Result<State, String> {
    State::parse(s).ok_or_else(|| format!("{s:?} is not a state"))
}

impl Opts {
    fn scope(&self) -> anyhow::Result<Scope> {
        let chosen = [
            !self.ids.is_empty(),
            self.state.is_some(),
            self.from.is_some(),
            self.dlq,
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if chosen != 1 {
            anyhow::bail!("choose exactly one of: ids, --state, --from/--to, --dlq");
        }
        Ok(if let Some(s) = self.state {
            Scope::State(s)
        } else if let Some(from) = self.from {
            Scope::Received {
                from,
                to: self.to.unwrap_or_else(Utc::now),
            }
        } else if self.dlq {
            Scope::DeadLetterQueue
        } else {
            Scope::Ids(match &self.vendor {
                // With --vendor each id is that vendor's own: scoped, never
                // taken as a key (`other/X` is refused, not replayed as other's).
                Some(v) => self
                    .ids
                    .iter()
                    .map(|id| {
                        TransactionId::parse(id)
                            .and_then(|id| TransactionId::scoped(Some(v), &id))
                            .map(|k| k.to_string())
                            .map_err(|e| anyhow::anyhow!("{id} with --vendor {v}: {e}"))
                    })
                    .collect::<anyhow::Result<_>>()?,
                None => self.ids.clone(),
            })
        })
    }
}

pub async fn run(opts: Opts) -> anyhow::Result<()> {
    if let (Some(from), Some(to)) = (opts.from, opts.to)
        && to < from
    {
        // A usage error, as clap reports them: exit status 2.
        clap::Error::raw(
            clap::error::ErrorKind::ValueValidation,
            format!("--to ({to}) is before --from ({from})\n"),
        )
        .exit();
    }
    if opts.force && opts.reason.as_deref().is_none_or(|r| r.trim().is_empty()) {
        // A usage error, as clap reports them: exit status 2.
        clap::Error::raw(
            clap::error::ErrorKind::MissingRequiredArgument,
            "--force calls the downstream again: say why with --reason\n",
        )
        .exit();
    }
    if opts.force && opts.if_state.is_none() && opts.state.is_none() {
        // Issue 12: force without the state the operator saw reset a
        // success nobody had seen.
        clap::Error::raw(
            clap::error::ErrorKind::MissingRequiredArgument,
            "--force needs the state you saw: --if-state success (or replay by --state)\n",
        )
        .exit();
    }
    let scope = opts.scope()?;
    let settings = Settings::load()?;
    if let Scope::Received { from, to } = &scope {
        time_arg::check_retention(*from, *to, settings.wal_retention_days)?;
    }
    let svc = Services::build(&settings).await?;
    let scope = match scope {
        Scope::Ids(ids) if opts.vendor.is_none() => {
            Scope::Ids(across_vendors(&settings, &svc, ids).await?)
        }
        other => other,
    };
    let req = ReplayRequest {
        force: opts.force,
        operator: super::operator::resolve(&settings, opts.operator.as_deref()).await,
        reason: opts.reason.clone(),
        expect: opts.if_state.or(match &scope {
            Scope::State(s) => Some(*s),
            _ => None,
        }),
    };
    let summary = replay_scope(&svc.replayer(), &scope, &req, &opts).await?;
    if opts.dry_run && summary.missing > 0 {
        anyhow::bail!(
            "{} of {} transactions are not in the ledger",
            summary.missing,
            summary.selected
        );
    }
    if summary.refused > 0 && !opts.dry_run {
        anyhow::bail!(
            "{} of {} transactions were not replayed",
            summary.refused,
            summary.selected
        );
    }
    Ok(())
}

/// Ids given without `--vendor`, as the HTTP API reads them: a bare id
/// is the one transaction with that id, the bare entry's or any configured
/// vendor's; two or more is an error naming the vendors. A `<vendor>/<id>`
/// key, or an id found nowhere, is kept as given.
async fn across_vendors(
    settings: &Settings,
    svc: &Services,
    ids: Vec<String>,
) -> anyhow::Result<Vec<String>> {
    if ids.iter().all(|id| id.contains('/')) {
        return Ok(ids);
    }
    let vendors = crate::auth::Auth::from_settings(settings)
        .context(
            "reading the configured vendors, to look bare ids up across them (or name the vendor: --vendor V, or V/<id>)",
        )?
        .vendor_names();
    let mut keys = Vec::with_capacity(ids.len());
    for given in ids {
        let Ok(id) = TransactionId::parse(&given) else {
            keys.push(given);
            continue;
        };
        let found = crate::ledger::find_across_vendors(&*svc.ledger, &id, &vendors).await?;
        match found.as_slice() {
            [] => keys.push(given),
            [r] => keys.push(r.transaction_id.to_string()),
            many => {
                let names: Vec<&str> = many
                    .iter()
                    .map(|r| r.vendor.as_deref().unwrap_or("(none)"))
                    .collect();
                anyhow::bail!(
                    "vendors {} each sent transaction {given}: name one with --vendor or <vendor>/{given}",
                    names.join(", ")
                );
            }
        }
    }
    Ok(keys)
}

#[derive(Debug, Default)]
pub struct Summary {
    pub selected: usize,
    /// Replayed (dry run: would be).
    pub replayed: usize,
    /// Refused or not found (dry run: would be refused).
    pub refused: usize,
    /// Dry run: ids not in the ledger.
    pub missing: usize,
    pub replayed_ids: HashSet<String>,
}

/// Replays (or lists) a scope; for the dead-letter queue, also removes the
/// replayed transactions' messages from it.
pub async fn replay_scope(
    svc: &Replayer,
    scope: &Scope,
    req: &ReplayRequest,
    opts: &Opts,
) -> anyhow::Result<Summary> {
    let ids = svc.select(scope, opts.limit).await?;
    let mut s = Summary {
        selected: ids.len(),
        ..Summary::default()
    };
    let bulk = !matches!(scope, Scope::Ids(_));
    let bar = if bulk && !opts.dry_run && ids.len() > 1 {
        ProgressBar::new(ids.len() as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("[{elapsed_precise}] {bar:40} {pos}/{len} replayed {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let pace = (opts.rate > 0).then(|| Duration::from_secs_f64(1.0 / opts.rate as f64));
    for id in &ids {
        if opts.dry_run {
            let found = match TransactionId::parse_key(id) {
                Ok(key) => crate::ledger::find(&*svc.ledger, &key).await?,
                Err(_) => None,
            };
            match found {
                Some(r)
                    if crate::transaction::machine::may_replay(&r, req.force, Utc::now())
                        && req.expect.is_none_or(|s| s == r.status) =>
                {
                    s.replayed += 1;
                    println!("{id}: would replay (now {})", r.status)
                }
                Some(r) => {
                    s.refused += 1;
                    println!("{id}: would refuse ({})", r.status)
                }
                None => {
                    s.missing += 1;
                    println!("{id}: not in the ledger")
                }
            }
            continue;
        }
        let line = match svc.replay_one(id, req).await? {
            Replayed::Requeued { message_id, record } => {
                s.replayed += 1;
                s.replayed_ids.insert(id.clone());
                match record.next_retry_at.filter(|t| *t > crate::clock::now()) {
                    None => format!("{id}: replayed as message {message_id}"),
                    Some(t) => format!(
                        "{id}: replayed as message {message_id}, due at {} (its last call may still be running at the downstream until then)",
                        t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
                    ),
                }
            }
            Replayed::Refused(r) => {
                s.refused += 1;
                match req.expect.filter(|e| *e != r.status) {
                    Some(e) => format!(
                        "{id}: refused ({} now, not {e} as expected (--if-state, or --state when it was selected); look again before replaying it)",
                        r.status
                    ),
                    None => format!(
                        "{id}: refused ({}{})",
                        r.status,
                        if r.status == State::Success && !req.force {
                            "; use --force"
                        } else {
                            ""
                        }
                    ),
                }
            }
            Replayed::JournaledSuccess(_) => {
                s.refused += 1;
                format!(
                    "{id}: refused (processing; the outcome journal holds its success, the ledger catches up; --force --if-state processing --reason … calls again)"
                )
            }
            Replayed::NotFound => {
                s.refused += 1;
                format!(
                    "{id}: not found (a vendor's transaction: <vendor>/<id>, or `rtpd replay --vendor`)"
                )
            }
        };
        bar.suspend(|| println!("{line}"));
        bar.inc(1);
        if let Some(p) = pace {
            tokio::time::sleep(p).await;
        }
    }
    bar.finish_and_clear();
    if matches!(scope, Scope::DeadLetterQueue) && !opts.dry_run {
        let removed = svc
            .settle_dead_letters(|m| {
                transaction_id_of(m).is_some_and(|id| s.replayed_ids.contains(id))
            })
            .await?;
        println!("{removed} dead-lettered messages removed (their transactions were replayed)");
    }
    if opts.dry_run {
        println!(
            "{} selected: {} would be replayed, {} would be refused, {} not in the ledger (dry run)",
            s.selected, s.replayed, s.refused, s.missing
        );
    } else {
        println!(
            "{} selected, {} replayed, {} refused or missing",
            s.selected, s.replayed, s.refused
        );
    }
    Ok(s)
}
