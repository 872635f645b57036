//! `rtpd dlq ls | show | replay | purge`: the dead-letter queue, through the
//! queue port (the embedded queue or Service Bus' `$DeadLetterQueue`).

use super::operator::resolve as operator;
use super::replay::{Opts as ReplayOpts, replay_scope};
use crate::config::Settings;
use crate::envelope::transaction_id_of;
use crate::journal::{EntryKind, JournalEntry};
use crate::queue::ReceivedMessage;
use crate::replay::{ReplayRequest, Scope};
use crate::services::Services;
use crate::transaction::State;
use crate::transaction::TransactionId;
use chrono::Utc;
use std::collections::BTreeSet;

#[derive(Debug, clap::Args)]
pub struct Opts {
    #[command(subcommand)]
    pub command: DlqCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum DlqCommand {
    /// List dead-lettered messages with their reasons
    Ls {
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// One JSON object per line
        #[arg(long)]
        json: bool,
    },
    /// Show one dead-lettered message (by sequence number, message id or transaction id) and its ledger record
    Show { target: String },
    /// Replay the transactions of dead-lettered messages and remove those messages
    Replay {
        /// Only these transaction ids (default: all)
        ids: Vec<String>,
        #[arg(long)]
        dry_run: bool,
        /// Required to replay a transaction that already succeeded (with
        /// --if-state success: the state you saw)
        #[arg(long, requires = "if_state")]
        force: bool,
        /// Replay only the transactions in this state now (the one you saw)
        #[arg(long, value_parser = super::replay::parse_state)]
        if_state: Option<State>,
        #[arg(long)]
        reason: Option<String>,
        /// Who is replaying, journaled as cli:<name> when the command has no
        /// Entra identity (with one, the Entra principal is journaled instead)
        #[arg(long, env = "USER")]
        operator: Option<String>,
        #[arg(long, default_value_t = 50)]
        rate: u32,
    },
    /// Delete dead-lettered messages (journaled per message); requires --yes
    Purge {
        /// Only these transaction ids (default: all)
        ids: Vec<String>,
        /// Confirm the deletion
        #[arg(long)]
        yes: bool,
        #[arg(long)]
        reason: Option<String>,
        /// Who is purging, journaled as cli:<name> when the command has no
        /// Entra identity (with one, the Entra principal is journaled instead)
        #[arg(long, env = "USER")]
        operator: Option<String>,
    },
}

async fn peek_all(svc: &Services, limit: usize) -> anyhow::Result<Vec<ReceivedMessage>> {
    let mut out = Vec::new();
    let mut from = 0i64;
    while out.len() < limit {
        let batch = svc
            .queue
            .peek_dead_letters(from, (limit - out.len()).min(250))
            .await?;
        let Some(last) = batch.last() else { break };
        from = last.sequence_number + 1;
        out.extend(batch);
    }
    Ok(out)
}

fn tx_id(m: &ReceivedMessage) -> Option<&str> {
    transaction_id_of(m)
}

/// Whether `given` names the message's transaction: its key (`acme/TX-1`),
/// or, given a bare id, the id within its key (`TX-1`).
fn names(m: &ReceivedMessage, given: &str) -> bool {
    tx_id(m).is_some_and(|key| {
        key == given || (!given.contains('/') && TransactionId::vendor_part(key) == given)
    })
}

/// The transaction keys the given ids name among dead-lettered messages. A
/// bare id that names transactions of more than one vendor is refused: the
/// operator names the vendor (`acme/TX-1`), as the API asks.
fn keys_named(msgs: &[ReceivedMessage], ids: &[String]) -> anyhow::Result<BTreeSet<String>> {
    let mut keys = BTreeSet::new();
    for given in ids {
        let found: BTreeSet<&str> = msgs
            .iter()
            .filter(|m| names(m, given))
            .filter_map(tx_id)
            .collect();
        if found.len() > 1 {
            let found: Vec<&str> = found.into_iter().collect();
            anyhow::bail!(
                "{given} names dead-lettered transactions of several vendors ({}): give <vendor>/{given}",
                found.join(", ")
            );
        }
        keys.extend(found.into_iter().map(str::to_owned));
    }
    Ok(keys)
}

fn summary(m: &ReceivedMessage) -> serde_json::Value {
    serde_json::json!({
        "sequence_number": m.sequence_number,
        "message_id": m.message_id,
        "transaction_id": tx_id(m),
        "reason": m.dead_letter_reason,
        "description": m.dead_letter_description,
        "delivery_count": m.delivery_count,
        "enqueued_at": m.enqueued_at,
    })
}

pub async fn run(opts: Opts) -> anyhow::Result<()> {
    let settings = Settings::load()?;
    let svc = Services::build(&settings).await?;
    match opts.command {
        DlqCommand::Ls { limit, json } => {
            let msgs = peek_all(&svc, limit).await?;
            if !json {
                println!("SEQ\tTRANSACTION\tMESSAGE ID\tREASON\tDESCRIPTION");
            }
            for m in &msgs {
                if json {
                    println!("{}", summary(m));
                } else {
                    println!(
                        "{}\t{}\t{}\t{}\t{}",
                        m.sequence_number,
                        tx_id(m).unwrap_or("-"),
                        m.message_id,
                        m.dead_letter_reason.as_deref().unwrap_or("-"),
                        m.dead_letter_description.as_deref().unwrap_or("-"),
                    );
                }
            }
            if !json {
                println!("{} dead-lettered messages", msgs.len());
            }
        }
        DlqCommand::Show { target } => {
            let msgs = peek_all(&svc, usize::MAX).await?;
            let found: Vec<_> = msgs
                .iter()
                .filter(|m| {
                    m.sequence_number.to_string() == target
                        || m.message_id == target
                        || names(m, &target)
                })
                .collect();
            if found.is_empty() {
                anyhow::bail!("no dead-lettered message matches {target}");
            }
            for m in found {
                let mut v = summary(m);
                v["properties"] = serde_json::to_value(&m.properties)?;
                v["body"] =
                    serde_json::Value::String(String::from_utf8_lossy(&m.body).into_owned());
                if let Some(id) = tx_id(m) {
                    v["ledger"] = serde_json::to_value(svc.ledger.get(id).await?)?;
                }
                println!("{}", serde_json::to_string_pretty(&v)?);
            }
        }
        DlqCommand::Replay {
            ids,
            dry_run,
            force,
            if_state,
            reason,
            operator: who,
            rate,
        } => {
            if force && reason.as_deref().is_none_or(|r| r.trim().is_empty()) {
                // A usage error, as clap reports them: exit status 2.
                clap::Error::raw(
                    clap::error::ErrorKind::MissingRequiredArgument,
                    "--force calls the downstream again: say why with --reason\n",
                )
                .exit();
            }
            let req = ReplayRequest {
                force,
                operator: operator(&settings, who.as_deref()).await,
                reason,
                expect: if_state,
            };
            let scope = if ids.is_empty() {
                Scope::DeadLetterQueue
            } else {
                // Only ids that are in the dead-letter queue, by their keys.
                let in_dlq = keys_named(&peek_all(&svc, usize::MAX).await?, &ids)?;
                Scope::Ids(in_dlq.into_iter().collect())
            };
            let ropts = ReplayOpts {
                ids: vec![],
                vendor: None,
                state: None,
                from: None,
                to: None,
                dlq: true,
                dry_run,
                force,
                if_state,
                reason: None,
                operator: None,
                rate,
                limit: usize::MAX,
            };
            let s = replay_scope(&svc.replayer(), &scope, &req, &ropts).await?;
            if matches!(scope, Scope::Ids(_)) && !dry_run {
                let removed = svc
                    .replayer()
                    .settle_dead_letters(|m| tx_id(m).is_some_and(|id| s.replayed_ids.contains(id)))
                    .await?;
                println!("{removed} dead-lettered messages removed");
            }
            if s.refused > 0 && !dry_run {
                anyhow::bail!("{} of {} were not replayed", s.refused, s.selected);
            }
        }
        DlqCommand::Purge {
            ids,
            yes,
            reason,
            operator: who,
        } => {
            let keys = keys_named(&peek_all(&svc, usize::MAX).await?, &ids)?;
            let chosen =
                |m: &ReceivedMessage| ids.is_empty() || tx_id(m).is_some_and(|k| keys.contains(k));
            if !yes {
                let n = peek_all(&svc, usize::MAX)
                    .await?
                    .iter()
                    .filter(|m| chosen(m))
                    .count();
                anyhow::bail!(
                    "would delete {n} dead-lettered messages; run again with --yes to do it"
                );
            }
            let who = operator(&settings, who.as_deref()).await;
            let doomed = svc.replayer().lock_dead_letters(chosen).await?;
            let mut removed = 0;
            // Journaled before it is deleted: the journal shows every purge.
            for m in &doomed {
                let id = tx_id(m).unwrap_or(&m.message_id).to_owned();
                let state = match tx_id(m) {
                    Some(id) => svc
                        .ledger
                        .get(id)
                        .await?
                        .map_or(State::DeadLetter, |r| r.status),
                    None => State::DeadLetter,
                };
                svc.journal
                    .append(&JournalEntry {
                        v: 1,
                        kind: EntryKind::Purge,
                        transaction_id: id,
                        at: Utc::now(),
                        attempt: None,
                        state,
                        error: m.dead_letter_description.clone(),
                        next_retry_at: None,
                        actor: who.to_string(),
                        reason: Some(format!(
                            "purged dead-lettered message {} ({}){}",
                            m.message_id,
                            m.dead_letter_reason.as_deref().unwrap_or("no reason"),
                            reason
                                .as_deref()
                                .map(|r| format!(": {r}"))
                                .unwrap_or_default()
                        )),
                        sha256: None,
                        wal_ref: None,
                        replay_nonce: None,
                    })
                    .await?;
                if svc.queue.complete(m).await.is_ok() {
                    removed += 1;
                }
            }
            println!("{removed} dead-lettered messages purged (journaled)");
        }
    }
    Ok(())
}
