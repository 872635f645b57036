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
        /// Only these (a transaction key or id, a SEQ or a message id, as `rtpd dlq ls` shows them; default: all)
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
        /// Only these (a transaction key or id, a SEQ or a message id, as `rtpd dlq ls` shows them; default: all)
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

/// Whether `given` names the message: its sequence number or message id (as
/// `rtpd dlq ls` prints them), its transaction's key (`acme/TX-1`), or,
/// given a bare id, the id within that key (`TX-1`).
fn names(m: &ReceivedMessage, given: &str) -> bool {
    m.sequence_number.to_string() == given
        || m.message_id == given
        || tx_id(m).is_some_and(|key| {
            key == given || (!given.contains('/') && TransactionId::vendor_part(key) == given)
        })
}

/// The dead-lettered messages the given names pick (sequence numbers).
/// Refused, naming each: a name that picks nothing, and a name that picks
/// messages of more than one transaction in any of its readings (a bare id
/// two vendors share, a vendor's and an entry's from before ids were scoped,
/// a number that is one message's SEQ and another's id) — the operator then
/// gives the key or the SEQ, as `rtpd dlq ls` shows them.
fn pick(msgs: &[ReceivedMessage], given: &[String]) -> anyhow::Result<BTreeSet<i64>> {
    let mut picked = BTreeSet::new();
    let mut unmatched = Vec::new();
    for name in given {
        let hits: Vec<&ReceivedMessage> = msgs.iter().filter(|m| names(m, name)).collect();
        // What each hit is: its transaction, or itself when it names none.
        let what: BTreeSet<String> = hits
            .iter()
            .map(|m| match tx_id(m) {
                Some(key) => key.to_owned(),
                None => format!("message {}", m.message_id),
            })
            .collect();
        if what.len() > 1 {
            let seqs: Vec<String> = hits.iter().map(|m| m.sequence_number.to_string()).collect();
            let what: Vec<String> = what.into_iter().collect();
            anyhow::bail!(
                "{name} names more than one dead-lettered transaction or message ({}; SEQ {}): give the key or the SEQ that `rtpd dlq ls` shows",
                what.join(", "),
                seqs.join(", ")
            );
        }
        if hits.is_empty() {
            unmatched.push(name.as_str());
        }
        picked.extend(hits.iter().map(|m| m.sequence_number));
    }
    if !unmatched.is_empty() {
        anyhow::bail!(
            "no dead-lettered message matches {} (see `rtpd dlq ls`: SEQ, transaction key or message id)",
            unmatched.join(", ")
        );
    }
    Ok(picked)
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
            let found: Vec<_> = msgs.iter().filter(|m| names(m, &target)).collect();
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
            let mut picked = BTreeSet::new();
            let mut msgs = Vec::new();
            let scope = if ids.is_empty() {
                Scope::DeadLetterQueue
            } else {
                // The transactions of the messages named, by their keys.
                msgs = peek_all(&svc, usize::MAX).await?;
                picked = pick(&msgs, &ids)?;
                let chosen: Vec<&ReceivedMessage> = msgs
                    .iter()
                    .filter(|m| picked.contains(&m.sequence_number))
                    .collect();
                if let Some(m) = chosen.iter().find(|m| tx_id(m).is_none()) {
                    anyhow::bail!(
                        "dead-lettered message {} (SEQ {}) names no transaction to replay: remove it with `rtpd dlq purge {} --yes`",
                        m.message_id,
                        m.sequence_number,
                        m.sequence_number
                    );
                }
                let keys: BTreeSet<String> = chosen
                    .iter()
                    .filter_map(|m| tx_id(m))
                    .map(str::to_owned)
                    .collect();
                Scope::Ids(keys.into_iter().collect())
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
                // Only the messages picked: a copy of the same transaction
                // dead-lettered again since the replay stays listed.
                let replayed = |m: &ReceivedMessage| {
                    picked.contains(&m.sequence_number)
                        && tx_id(m).is_some_and(|id| s.replayed_ids.contains(id))
                };
                let wanted = msgs.iter().filter(|m| replayed(m)).count();
                let removed = svc.replayer().settle_dead_letters(replayed).await?;
                println!("{removed} dead-lettered messages removed");
                if removed < wanted {
                    anyhow::bail!(
                        "{} of {wanted} dead-lettered messages of replayed transactions were not removed (held by another command, or not received in time): `rtpd dlq ls` shows them; `rtpd dlq purge <SEQ> --yes` removes one",
                        wanted - removed
                    );
                }
            }
            if dry_run && s.missing > 0 {
                anyhow::bail!(
                    "{} of {} transactions are not in the ledger",
                    s.missing,
                    s.selected
                );
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
            let msgs = peek_all(&svc, usize::MAX).await?;
            let picked = pick(&msgs, &ids)?;
            let chosen =
                |m: &ReceivedMessage| ids.is_empty() || picked.contains(&m.sequence_number);
            if !yes {
                let n = msgs.iter().filter(|m| chosen(m)).count();
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
                        latency_ms: None,
                    })
                    .await?;
                if svc.queue.complete(m).await.is_ok() {
                    removed += 1;
                }
            }
            println!("{removed} dead-lettered messages purged (journaled)");
            if !ids.is_empty() && removed < picked.len() {
                anyhow::bail!(
                    "{} of {} dead-lettered messages named were not purged (held by another command, or gone): `rtpd dlq ls` shows what is left",
                    picked.len() - removed,
                    picked.len()
                );
            }
        }
    }
    Ok(())
}
