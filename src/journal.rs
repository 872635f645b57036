//! The outcome journal: every attempt's result, every replay and every purge,
//! appended durably (same group commit as the WAL, under `outcomes/v1/`)
//! before the queue message is settled. With the WAL it is the source of
//! truth; the ledger can be rebuilt from the two.

use crate::transaction::{Registration, State, TxRecord};
use crate::wal::{Log, WalError, WalRef};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    /// A downstream attempt ended (success, failed, dead_letter).
    Attempt,
    /// An operator replayed the transaction (back to pending).
    Replay,
    /// An operator purged dead-lettered messages.
    Purge,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JournalEntry {
    pub v: u32,
    pub kind: EntryKind,
    pub transaction_id: String,
    pub at: DateTime<Utc>,
    pub attempt: Option<u32>,
    pub state: State,
    pub error: Option<String>,
    pub next_retry_at: Option<DateTime<Utc>>,
    /// Processor instance, or the operator for replays and purges.
    pub actor: String,
    pub reason: Option<String>,
}

#[derive(Clone)]
pub struct Journal {
    log: Log,
}

impl Journal {
    pub fn new(log: Log) -> Journal {
        Journal { log }
    }

    pub fn log(&self) -> &Log {
        &self.log
    }

    pub async fn append(&self, entry: &JournalEntry) -> Result<WalRef, WalError> {
        self.log.append_json(entry, entry.at).await
    }
}

/// What the journal says about one transaction: the fold of its entries in
/// time order. A replay resets the state to `pending`; purges change nothing.
#[derive(Debug, Clone, PartialEq)]
pub struct Known {
    pub state: State,
    /// Highest attempt number journaled (the ledger's fencing token must pass it).
    pub attempts: u32,
    /// `attempts` at the last replay: where the current retry budget began.
    pub attempt_base: u32,
    pub retry_count: u32,
    pub error: Option<String>,
    pub next_retry_at: Option<DateTime<Utc>>,
    pub last_at: DateTime<Utc>,
}

impl Known {
    fn apply(&mut self, e: &JournalEntry) {
        if let Some(a) = e.attempt {
            self.attempts = self.attempts.max(a);
        }
        match e.kind {
            EntryKind::Attempt => {
                self.state = e.state;
                self.error = e.error.clone();
                self.next_retry_at = e.next_retry_at;
                if e.state == State::Failed {
                    self.retry_count += 1;
                }
            }
            EntryKind::Replay => {
                self.state = State::Pending;
                self.next_retry_at = None;
                self.attempt_base = self.attempts;
                self.retry_count = 0;
            }
            EntryKind::Purge => {}
        }
        self.last_at = self.last_at.max(e.at);
    }
}

/// The journal folded per transaction id. Segments are immutable, so a
/// refresh reads only segments it has not seen; one index can be refreshed
/// over and over (the reconciler, the processor's ledger-miss path).
#[derive(Debug, Default)]
pub struct JournalIndex {
    seen: std::collections::HashSet<String>,
    entries: std::collections::HashMap<String, Vec<JournalEntry>>,
    pub unreadable: u64,
}

impl JournalIndex {
    /// Reads every not-yet-seen segment whose partition overlaps `[from, to]`.
    pub async fn refresh(
        &mut self,
        journal: &Journal,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<(), WalError> {
        for seg in journal.log.segments(from, to).await? {
            if self.seen.contains(&seg.key) {
                continue;
            }
            for (r, bytes) in journal.log.read_segment(&seg.key).await? {
                match serde_json::from_slice::<JournalEntry>(&bytes) {
                    Ok(e) => self
                        .entries
                        .entry(e.transaction_id.clone())
                        .or_default()
                        .push(e),
                    Err(err) => {
                        self.unreadable += 1;
                        tracing::error!(journal_ref = %r, error = %err, "unreadable journal entry");
                    }
                }
            }
            self.seen.insert(seg.key);
        }
        Ok(())
    }

    /// The fold of everything journaled for `id`, or `None` if nothing is.
    pub fn known(&self, id: &str) -> Option<Known> {
        let entries = self.entries.get(id)?;
        let mut sorted: Vec<&JournalEntry> = entries.iter().collect();
        sorted.sort_by_key(|e| e.at);
        let first = sorted.first()?;
        let mut k = Known {
            state: State::Pending,
            attempts: 0,
            attempt_base: 0,
            retry_count: 0,
            error: None,
            next_retry_at: None,
            last_at: first.at,
        };
        for e in sorted {
            k.apply(e);
        }
        Some(k)
    }
}

/// The ledger record the WAL and the journal imply for a transaction.
///
/// An unfinished one is restored as touched `now`: the journal records an
/// attempt only once it ends, so an attempt by a process (or region) that was
/// lost may still be running at the downstream. Dating the record now makes
/// the re-drive wait the pending threshold (and a failed one's retry at least
/// that slack), which keeps a second call from overlapping the lost one.
pub fn restored_record(reg: &Registration, known: Option<&Known>, now: DateTime<Utc>) -> TxRecord {
    let mut rec = TxRecord::new(reg, now);
    if let Some(k) = known {
        rec.status = k.state;
        rec.attempts = k.attempts;
        rec.attempt_base = k.attempt_base;
        rec.retry_count = k.retry_count;
        rec.error_message = k.error.clone();
        rec.next_retry_at = (k.state == State::Failed)
            .then_some(k.next_retry_at)
            .flatten();
        rec.updated_at = k.last_at;
    }
    if !rec.status.is_terminal() {
        rec.updated_at = now;
        if rec.status == State::Failed {
            rec.next_retry_at = Some(rec.next_retry_at.map_or(now, |t| t.max(now)));
        }
    }
    rec
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(kind: EntryKind, secs: i64, attempt: Option<u32>, state: State) -> JournalEntry {
        JournalEntry {
            v: 1,
            kind,
            transaction_id: "t".into(),
            at: DateTime::from_timestamp(1_700_000_000 + secs, 0).unwrap(),
            attempt,
            state,
            error: None,
            next_retry_at: None,
            actor: "x".into(),
            reason: None,
        }
    }

    #[test]
    fn the_fold_follows_time_and_replays() {
        let mut idx = JournalIndex::default();
        idx.entries.insert(
            "t".into(),
            vec![
                entry(EntryKind::Attempt, 3, Some(2), State::Success),
                entry(EntryKind::Attempt, 1, Some(1), State::Failed),
            ],
        );
        let k = idx.known("t").unwrap();
        assert_eq!((k.state, k.attempts, k.retry_count), (State::Success, 2, 1));
        idx.entries
            .get_mut("t")
            .unwrap()
            .push(entry(EntryKind::Replay, 5, None, State::Pending));
        let k = idx.known("t").unwrap();
        assert_eq!(k.state, State::Pending);
        // A replay starts a fresh retry budget from the attempts made so far.
        assert_eq!((k.attempt_base, k.retry_count), (2, 0));
        idx.entries
            .get_mut("t")
            .unwrap()
            .push(entry(EntryKind::Purge, 6, None, State::DeadLetter));
        assert_eq!(idx.known("t").unwrap().state, State::Pending);
        assert!(idx.known("u").is_none());
    }
}
