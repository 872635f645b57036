//! The in-memory ledger: the ledger contract over one mutex-guarded map, with
//! the same state machine (`transaction::machine`) as every other ledger.
//! Time comes from [`crate::clock`], so on the simulation's virtual clock a
//! lease expires when the simulated minutes have passed.
//!
//! Used by the deterministic simulation (`tests/sim`), which also wipes it
//! ([`MemoryLedger::wipe`]) to play a Redis loss. Nothing in it is durable.

use super::{
    ClaimOutcome, Counts, Ledger, LedgerError, ListQuery, Page, RegisterOutcome, ReplayOutcome,
    decode_cursor, encode_cursor,
};
use crate::transaction::{
    Registration, Settlement, TxRecord,
    machine::{self, ClaimDecision},
};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use std::{collections::BTreeMap, sync::Mutex, time::Duration};

struct Inner {
    records: BTreeMap<String, TxRecord>,
    leases: BTreeMap<String, (String, DateTime<Utc>)>,
    checkpoints: BTreeMap<String, String>,
    /// The intact mark ([`Ledger::intact`]): a new memory ledger has nothing
    /// before it and is marked; [`MemoryLedger::wipe`] takes the mark away.
    intact: bool,
    rebuild: Option<String>,
    lost_refused: std::collections::BTreeSet<String>,
}

impl Default for Inner {
    fn default() -> Self {
        Inner {
            records: BTreeMap::new(),
            leases: BTreeMap::new(),
            checkpoints: BTreeMap::new(),
            intact: true,
            rebuild: None,
            lost_refused: Default::default(),
        }
    }
}

#[derive(Default)]
pub struct MemoryLedger {
    inner: Mutex<Inner>,
}

fn until(now: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    now + chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

impl MemoryLedger {
    pub fn new() -> MemoryLedger {
        MemoryLedger::default()
    }

    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        f(&mut self.inner.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// `change` applied to `id`'s record if `owner` at `attempt` still holds
    /// it (`machine::holds`); [`LedgerError::Fenced`] (nothing changes) if not.
    fn as_holder(
        &self,
        id: &str,
        owner: &str,
        attempt: u32,
        change: impl FnOnce(&mut TxRecord),
    ) -> Result<TxRecord, LedgerError> {
        self.with(|i| {
            let Some(rec) = i.records.get_mut(id) else {
                return Err(LedgerError::NotFound(id.to_owned()));
            };
            if !machine::holds(rec, owner, attempt) {
                return Err(LedgerError::Fenced {
                    id: id.to_owned(),
                    owner: owner.to_owned(),
                    attempt,
                });
            }
            change(rec);
            Ok(rec.clone())
        })
    }

    /// Forgets everything: records, leases and checkpoints (a Redis loss).
    pub fn wipe(&self) {
        self.with(|i| {
            *i = Inner {
                intact: false,
                ..Inner::default()
            }
        });
    }

    /// Every record, in id order (the simulation's final check).
    pub fn snapshot(&self) -> Vec<TxRecord> {
        self.with(|i| i.records.values().cloned().collect())
    }
}

#[async_trait]
impl Ledger for MemoryLedger {
    async fn register(&self, reg: Registration) -> Result<RegisterOutcome, LedgerError> {
        self.with(|i| {
            if !i.intact {
                i.lost_refused.insert(reg.wal_ref.to_string());
                return Err(LedgerError::Lost("the memory ledger was wiped".into()));
            }
            if let Some(existing) = i.records.get(reg.transaction_id.as_str()) {
                return Ok(if existing.sha256 == reg.sha256 {
                    RegisterOutcome::Duplicate(existing.clone())
                } else {
                    RegisterOutcome::Conflict(existing.clone())
                });
            }
            let rec = TxRecord::new(&reg, crate::clock::now());
            i.records
                .insert(reg.transaction_id.to_string(), rec.clone());
            Ok(RegisterOutcome::New(rec))
        })
    }

    async fn get(&self, id: &str) -> Result<Option<TxRecord>, LedgerError> {
        Ok(self.with(|i| i.records.get(id).cloned()))
    }

    async fn claim(
        &self,
        id: &str,
        owner: &str,
        lease: Duration,
    ) -> Result<ClaimOutcome, LedgerError> {
        Ok(self.with(|i| {
            let Some(rec) = i.records.get_mut(id) else {
                return ClaimOutcome::NotFound;
            };
            let now = crate::clock::now();
            match machine::decide_claim(rec, now) {
                ClaimDecision::Terminal => ClaimOutcome::Terminal(rec.clone()),
                ClaimDecision::Busy => ClaimOutcome::Busy(rec.clone()),
                ClaimDecision::NotDue => ClaimOutcome::NotDue(rec.clone()),
                ClaimDecision::Claim { .. } => {
                    machine::apply_claim(rec, owner, until(now, lease), now);
                    ClaimOutcome::Claimed(rec.clone())
                }
            }
        }))
    }

    async fn settle(
        &self,
        id: &str,
        owner: &str,
        attempt: u32,
        s: Settlement,
    ) -> Result<TxRecord, LedgerError> {
        self.as_holder(id, owner, attempt, |rec| {
            machine::apply_settlement(rec, &s, crate::clock::now())
        })
    }

    async fn extend_lease(
        &self,
        id: &str,
        owner: &str,
        attempt: u32,
        lease: Duration,
    ) -> Result<TxRecord, LedgerError> {
        self.as_holder(id, owner, attempt, |rec| {
            machine::apply_extension(rec, until(crate::clock::now(), lease))
        })
    }

    async fn release(&self, id: &str, owner: &str, attempt: u32) -> Result<TxRecord, LedgerError> {
        self.as_holder(id, owner, attempt, |rec| {
            machine::apply_release(rec, crate::clock::now())
        })
    }

    async fn replay(
        &self,
        id: &str,
        nonce: &str,
        force: bool,
        quiet: Duration,
    ) -> Result<ReplayOutcome, LedgerError> {
        Ok(self.with(|i| {
            let Some(rec) = i.records.get_mut(id) else {
                return ReplayOutcome::NotFound;
            };
            let now = crate::clock::now();
            if !machine::may_replay(rec, force, now) {
                return ReplayOutcome::Refused(rec.clone());
            }
            machine::apply_replay(rec, nonce, now, super::chrono_quiet(quiet));
            ReplayOutcome::Reset(rec.clone())
        }))
    }

    async fn restore(&self, rec: TxRecord) -> Result<(), LedgerError> {
        self.with(|i| i.records.insert(rec.transaction_id.to_string(), rec));
        Ok(())
    }

    async fn restore_missing(&self, rec: TxRecord) -> Result<bool, LedgerError> {
        Ok(self.with(|i| {
            let id = rec.transaction_id.to_string();
            if i.records.contains_key(&id) {
                return false;
            }
            i.records.insert(id, rec);
            true
        }))
    }

    async fn restore_if_unchanged(
        &self,
        seen: &TxRecord,
        rec: TxRecord,
    ) -> Result<bool, LedgerError> {
        Ok(self.with(|i| {
            let id = rec.transaction_id.to_string();
            match i.records.get(&id) {
                Some(cur) if super::same_version(cur, seen) => {
                    i.records.insert(id, rec);
                    true
                }
                _ => false,
            }
        }))
    }

    async fn try_lease(&self, name: &str, owner: &str, ttl: Duration) -> Result<bool, LedgerError> {
        Ok(self.with(|i| {
            let now = crate::clock::now();
            let free = match i.leases.get(name) {
                Some((holder, until)) => holder == owner || *until <= now,
                None => true,
            };
            if free {
                i.leases
                    .insert(name.to_owned(), (owner.to_owned(), until(now, ttl)));
            }
            free
        }))
    }

    async fn checkpoint(&self, name: &str) -> Result<Option<String>, LedgerError> {
        Ok(self.with(|i| i.checkpoints.get(name).cloned()))
    }

    async fn set_checkpoint(&self, name: &str, value: &str) -> Result<(), LedgerError> {
        self.with(|i| i.checkpoints.insert(name.to_owned(), value.to_owned()));
        Ok(())
    }

    async fn list(&self, q: ListQuery) -> Result<Page, LedgerError> {
        let limit = q.limit.clamp(1, 1000);
        let cursor = match q.cursor.as_deref() {
            Some(c) => Some(decode_cursor(c).ok_or(LedgerError::InvalidCursor)?),
            None => None,
        };
        Ok(self.with(|i| {
            let mut rows: Vec<&TxRecord> = i
                .records
                .values()
                .filter(|r| q.state.is_none_or(|s| r.status == s))
                .filter(|r| match &cursor {
                    Some((u, id)) => {
                        let ru = r.updated_at.timestamp_micros();
                        ru < *u || (ru == *u && r.transaction_id.as_str() < id.as_str())
                    }
                    None => true,
                })
                .collect();
            // Newest update first, then id descending: the order every ledger lists in.
            rows.sort_by(|a, b| {
                (b.updated_at.timestamp_micros(), b.transaction_id.as_str())
                    .cmp(&(a.updated_at.timestamp_micros(), a.transaction_id.as_str()))
            });
            let more = rows.len() > limit;
            let items: Vec<TxRecord> = rows.into_iter().take(limit).cloned().collect();
            let next_cursor = if more {
                items.last().map(|r| {
                    encode_cursor(r.updated_at.timestamp_micros(), r.transaction_id.as_str())
                })
            } else {
                None
            };
            Page { items, next_cursor }
        }))
    }

    async fn counts(&self) -> Result<Counts, LedgerError> {
        Ok(self.with(|i| {
            let mut c = Counts::default();
            for r in i.records.values() {
                *c.slot(r.status) += 1;
            }
            c
        }))
    }

    async fn oldest_update(
        &self,
        state: crate::transaction::State,
    ) -> Result<Option<chrono::DateTime<chrono::Utc>>, LedgerError> {
        Ok(self.with(|i| {
            i.records
                .values()
                .filter(|r| r.status == state)
                .map(|r| r.updated_at)
                .min()
        }))
    }

    async fn ping(&self) -> Result<(), LedgerError> {
        Ok(())
    }

    fn describe(&self) -> String {
        "in-memory ledger".into()
    }

    async fn intact(&self) -> Result<bool, LedgerError> {
        Ok(self.with(|i| i.intact))
    }

    async fn refused_while_lost(
        &self,
        _id: &str,
        wal_refs: &[String],
    ) -> Result<Vec<String>, LedgerError> {
        Ok(self.with(|i| {
            wal_refs
                .iter()
                .filter(|r| i.lost_refused.contains(*r))
                .cloned()
                .collect()
        }))
    }

    async fn begin_rebuild(&self, token: &str) -> Result<(), LedgerError> {
        self.with(|i| i.rebuild = Some(token.to_owned()));
        Ok(())
    }

    async fn mark_intact(&self, token: &str) -> Result<bool, LedgerError> {
        Ok(self.with(|i| {
            if i.rebuild.as_deref() == Some(token) {
                i.intact = true;
                i.rebuild = None;
            }
            i.intact
        }))
    }
}
