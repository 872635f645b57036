//! Intake: the durability step every way in shares (the HTTP API, and any
//! other transport), without the transport. A validated submission goes in;
//! `Accepted | Duplicate | Conflict` comes out, or an error saying which
//! dependency is unavailable.
//!
//! Order: ledger lookup → WAL → ledger → queue. Registering before the send
//! closes the race in which a fast processor finds no ledger entry. An
//! `Accepted` is returned only after the WAL append returned (the record is
//! durable) and the ledger holds the transaction; if the send then fails, the
//! transaction is `pending` in the ledger and the reconciler re-drives it
//! from the WAL (`enqueued: false`).

use crate::envelope::{Delivery, Envelope};
use crate::journal::{EntryKind, Journal, JournalEntry};
use crate::ledger::{self, Ledger, LedgerError, RegisterOutcome};
use crate::queue::{OutgoingMessage, Queue, QueueError};
use crate::resend::Resend;
use crate::transaction::{Registration, Sha256, State, TransactionId, TxRecord};
use crate::wal::{Log, Source, WalError, WalRecord};
use bytes::Bytes;
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

/// How long intake waits for the queue to take a message before it answers
/// the vendor anyway: the record is durable and registered `pending`, so the
/// message goes to the resend queue (and the reconciler re-drives it if that
/// fails too) and the vendor gets `enqueued: false`. A send left waiting on
/// a broker that went away must not hold the vendor's request open.
pub const INGEST_SEND_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// How long a vendor's duplicate of a pending transaction waits for the
/// resend of its initial message (see `Intake::duplicate`): the answer is a
/// 200 either way, and past this the resend queue sends it.
pub const DUPLICATE_SEND_WAIT: std::time::Duration = std::time::Duration::from_millis(250);

/// One transaction as a transport received it, already validated: the id is
/// parsed and the payload is a UTF-8 JSON object. The id is the vendor's;
/// intake keys the transaction by (vendor, id).
#[derive(Debug, Clone)]
pub struct Submission {
    pub transaction_id: TransactionId,
    /// The exact bytes the vendor sent.
    pub payload: Bytes,
    pub sha256: Sha256,
    pub source: Source,
    /// The vendor's deadline: no downstream call starts after it.
    pub expires_at: Option<chrono::DateTime<chrono::Utc>>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum IntakeOutcome {
    /// Durable in the WAL and registered; `enqueued` says whether the send
    /// succeeded (if not, the reconciler re-drives it).
    Accepted { record: TxRecord, enqueued: bool },
    /// Same id, same bytes: the existing transaction.
    Duplicate(TxRecord),
    /// Same id, other bytes: refused, nothing written.
    Conflict(TxRecord),
}

/// A dependency intake needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dependency {
    Wal,
    Ledger,
    /// The ledger lost its data and is being rebuilt (no intact mark).
    LedgerRebuilding,
    /// The outcome journal, where a refusal of a payload already in the WAL
    /// is noted before the 409 goes out.
    Journal,
}

#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    /// Nothing was acknowledged; the caller may try again.
    #[error("{dependency:?} unavailable: {message}")]
    Unavailable {
        dependency: Dependency,
        message: String,
    },
    #[error("payload is not UTF-8")]
    NotUtf8,
    /// The submission's id or vendor cannot be scoped into a key.
    #[error(transparent)]
    InvalidId(crate::transaction::InvalidId),
    #[error(transparent)]
    Wal(WalError),
    #[error(transparent)]
    Ledger(LedgerError),
}

fn ledger_error(e: LedgerError) -> IntakeError {
    match e {
        LedgerError::Unavailable(message) | LedgerError::Lost(message) => {
            IntakeError::Unavailable {
                dependency: Dependency::Ledger,
                message,
            }
        }
        other => IntakeError::Ledger(other),
    }
}

/// The ports intake writes to.
#[derive(Clone)]
pub struct Intake {
    pub wal: Log,
    /// Notes the payloads refused after their WAL append (see [`EntryKind::Refused`]).
    pub journal: Journal,
    pub ledger: Arc<dyn Ledger>,
    pub queue: Arc<dyn Queue>,
    /// Where a failed send goes to be retried at once (else only the
    /// reconciler re-drives it).
    pub resend: Option<Resend>,
    /// Set when the ledger last answered that it lost its data
    /// ([`LedgerError::Lost`]); see [`Intake::accept`].
    pub ledger_lost: LostHint,
}

/// Whether the ledger was last seen lost (no intact mark), shared by the
/// clones of one [`Intake`]. Only a hint: it makes intake ask the ledger
/// (one cheap read) before writing anything, never refuses on its own.
#[derive(Clone, Debug, Default)]
pub struct LostHint(Arc<std::sync::atomic::AtomicBool>);

impl LostHint {
    fn set(&self, lost: bool) {
        self.0.store(lost, std::sync::atomic::Ordering::Relaxed);
    }

    fn get(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Intake {
    pub async fn accept(&self, s: Submission) -> Result<IntakeOutcome, IntakeError> {
        // The same id from two vendors is two transactions.
        // A key (`<vendor>/<id>`) where the vendor's own id belongs is refused:
        // no intake can name another vendor's transaction.
        let key = TransactionId::scoped(s.source.vendor.as_deref(), &s.transaction_id)
            .map_err(IntakeError::InvalidId)?;
        if let Some(rec) = ledger::find(&*self.ledger, &key)
            .await
            .map_err(ledger_error)?
        {
            // While a lost ledger is being rebuilt, what it holds may be a
            // record restored in the middle of the rebuild (or a payload a
            // vendor was answered 503 for): no 200 or 409 is answered from
            // it until the rebuild has settled which record stands.
            if !self.ledger.intact().await.map_err(ledger_error)? {
                return Err(IntakeError::Unavailable {
                    dependency: Dependency::LedgerRebuilding,
                    message: "the ledger is being rebuilt".into(),
                });
            }
            return Ok(match existing(rec, &s.sha256) {
                IntakeOutcome::Duplicate(rec) => self.duplicate(rec, &s.payload).await,
                other => other,
            });
        }
        let text = std::str::from_utf8(&s.payload).map_err(|_| IntakeError::NotUtf8)?;
        // While the ledger is lost and being rebuilt, every new id would be
        // refused after its WAL append (below): a WAL record and a journal
        // note per 503, which under a fleet of retrying vendors multiplied
        // the WAL the rebuild must read (issue 13: 10,000 records for 1,400
        // transactions in the fault campaign) and kept ingest down longer.
        // Once the ledger has said it is lost, ask it first; nothing is
        // written and nothing acknowledged, so the 503 loses nothing.
        if self.ledger_lost.get() {
            if !self.ledger.intact().await.map_err(ledger_error)? {
                return Err(IntakeError::Unavailable {
                    dependency: Dependency::LedgerRebuilding,
                    message: "the ledger lost its data and is being rebuilt".into(),
                });
            }
            self.ledger_lost.set(false);
        }
        let received_at = crate::clock::now();
        let record = WalRecord {
            v: 1,
            transaction_id: s.transaction_id.clone(),
            received_at,
            source: s.source.clone(),
            sha256: s.sha256.clone(),
            payload: text.to_owned(),
            expires_at: s.expires_at,
            trace_parent: crate::trace_context::current_traceparent(),
        };
        let wal_ref = self
            .wal
            .append_json(&record, received_at)
            .instrument(tracing::info_span!(
                "wal.append",
                otel.kind = "client",
                transaction_id = %s.transaction_id,
                transaction_key = key.as_str(),
            ))
            .await
            .map_err(|e| {
                tracing::error!(transaction_id = %s.transaction_id, error = %e, "WAL append failed; not acknowledging");
                match e {
                    WalError::Unavailable(message) => IntakeError::Unavailable {
                        dependency: Dependency::Wal,
                        message,
                    },
                    WalError::Closed => IntakeError::Unavailable {
                        dependency: Dependency::Wal,
                        message: "the WAL is shut down".into(),
                    },
                    other => IntakeError::Wal(other),
                }
            })?;
        let reg = Registration {
            transaction_id: key,
            sha256: s.sha256.clone(),
            wal_ref,
            vendor: s.source.vendor.clone(),
            received_at,
            expires_at: s.expires_at,
        };
        let registered = match self
            .ledger
            .register_with_payload(reg.clone(), &s.payload)
            .await
        {
            Err(LedgerError::Lost(message)) => {
                self.ledger_lost.set(true);
                // The ledger lost its data and is not rebuilt yet (issue 12,
                // N1): an id acknowledged before the loss would look new, so
                // nothing is accepted until the rebuild. Our WAL record is
                // noted refused first, so the rebuild never takes it for the
                // transaction; the answer is a 503 and the vendor re-POSTs.
                self.note_refused(
                    &reg,
                    State::Pending,
                    format!(
                        "503: the ledger lost its data and is being rebuilt; WAL record {} refused",
                        reg.wal_ref
                    ),
                )
                .await?;
                tracing::debug!(transaction_id = %reg.transaction_id, "ledger lost, not rebuilt yet: refused with a 503");
                return Err(IntakeError::Unavailable {
                    dependency: Dependency::LedgerRebuilding,
                    message,
                });
            }
            other => other.map_err(ledger_error)?,
        };
        let record = match registered {
            RegisterOutcome::New(rec) => rec,
            // A concurrent first POST of the same bytes won the race; ours is
            // a harmless extra WAL record.
            RegisterOutcome::Duplicate(rec) => return Ok(self.duplicate(rec, &s.payload).await),
            RegisterOutcome::Conflict(rec) => {
                // Other bytes won: ours is in the WAL all the same. Noted in
                // the journal before the 409, so a ledger rebuild never takes
                // this record for the transaction (issue 12 item 2). If the
                // note cannot be written the answer is a 503 ("maybe
                // accepted"), never a 409 for bytes a rebuild might run.
                let reason = format!(
                    "409: other content ({}) holds this id; WAL record {} refused",
                    rec.sha256, reg.wal_ref
                );
                self.note_refused(&reg, rec.status, reason).await?;
                return Ok(IntakeOutcome::Conflict(rec));
            }
        };
        let message = Envelope::new(reg, s.payload, Delivery::Initial).to_message();
        let enqueued = self.send(&record, message, INGEST_SEND_WAIT).await;
        tracing::info!(transaction_id = %record.transaction_id, wal_ref = %record.wal_ref, enqueued, "transaction accepted");
        Ok(IntakeOutcome::Accepted { record, enqueued })
    }
}

impl Intake {
    /// The same bytes again. While the transaction is still `pending` its
    /// first send may never have happened: the ledger registered it but its
    /// answer was lost (a Redis killed between the write and the reply), the
    /// vendor got a 503 and retried. Nothing else would send it before the
    /// reconciler's pending threshold (minutes), so the initial message is
    /// sent again; its message id is the key, and the queue's duplicate
    /// detection drops it when the first send did go through.
    async fn duplicate(&self, rec: TxRecord, payload: &Bytes) -> IntakeOutcome {
        if rec.status == State::Pending {
            tracing::info!(transaction_id = %rec.transaction_id, "duplicate of a pending transaction; its initial message sent again");
            let message =
                Envelope::new(rec.registration(), payload.clone(), Delivery::Initial).to_message();
            // The vendor's answer does not wait for a slow queue: past a
            // short wait the resend queue has it (one copy per message id).
            self.send(&rec, message, DUPLICATE_SEND_WAIT).await;
        }
        IntakeOutcome::Duplicate(rec)
    }

    /// Sends a transaction's initial message; a send that fails or does not
    /// answer within `wait` goes to the resend queue. Whether it was sent.
    async fn send(&self, record: &TxRecord, message: OutgoingMessage, wait: Duration) -> bool {
        let sent = match tokio::time::timeout(wait, self.queue.send(vec![message.clone()])).await {
            Ok(result) => result,
            Err(_) => Err(QueueError::Unavailable(format!(
                "no answer from the queue within {wait:?}"
            ))),
        };
        match sent {
            Ok(()) => true,
            Err(e) => {
                let resending = self
                    .resend
                    .as_ref()
                    .is_some_and(|r| r.push_failed(&record.transaction_id, message, &e));
                tracing::warn!(transaction_id = %record.transaction_id, error = %e, resending, "enqueue failed; resent when the queue answers, else re-driven by the reconciler from the WAL");
                false
            }
        }
    }

    async fn note_refused(
        &self,
        reg: &Registration,
        state: State,
        reason: String,
    ) -> Result<(), IntakeError> {
        let entry = JournalEntry {
            v: 1,
            kind: EntryKind::Refused,
            transaction_id: reg.transaction_id.to_string(),
            at: crate::clock::now(),
            attempt: None,
            state,
            error: None,
            next_retry_at: None,
            actor: "intake".into(),
            reason: Some(reason),
            sha256: Some(reg.sha256.clone()),
            wal_ref: Some(reg.wal_ref.to_string()),
            replay_nonce: None,
            latency_ms: None,
        };
        self.journal.append(&entry).await.map(|_| ()).map_err(|e| {
            tracing::error!(transaction_id = %reg.transaction_id, error = %e, "could not note a refused payload; answering 503");
            IntakeError::Unavailable {
                dependency: Dependency::Journal,
                message: e.to_string(),
            }
        })
    }
}

fn existing(rec: TxRecord, sha: &Sha256) -> IntakeOutcome {
    if rec.sha256 == *sha {
        IntakeOutcome::Duplicate(rec)
    } else {
        IntakeOutcome::Conflict(rec)
    }
}
