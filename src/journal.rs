//! The outcome journal: every attempt's result, every replay and every purge,
//! appended durably (same group commit as the WAL, under `outcomes/v1/`)
//! before the queue message is settled. With the WAL it is the source of
//! truth; the ledger can be rebuilt from the two.

use crate::transaction::State;
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
