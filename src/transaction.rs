//! The transaction vocabulary shared by every part: identifiers, states, the
//! ledger's view of a transaction, and the transitions between states.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::fmt;

/// Longest accepted transaction id.
pub const MAX_ID_LEN: usize = 128;

/// Longest vendor name (credentials refuse longer ones).
pub const MAX_VENDOR_LEN: usize = 64;

/// A validated transaction id: 1–128 characters of `A-Za-z0-9._:-` — or,
/// as a ledger key, `<vendor>/<id>` (see [`TransactionId::scoped`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct TransactionId(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidId {
    #[error("transaction_id is empty")]
    Empty,
    #[error("transaction_id is longer than {MAX_ID_LEN} characters")]
    TooLong,
    #[error("transaction_id may contain only A-Z a-z 0-9 . _ : -")]
    IllegalCharacter,
    /// A `<vendor>/<id>` key where a vendor's own id belongs.
    #[error("transaction_id may not contain /: it is a vendor's own id, not a <vendor>/<id> key")]
    AlreadyScoped,
    #[error("vendor may contain only A-Z a-z 0-9 - _ . (at most 64)")]
    IllegalVendor,
}

impl TransactionId {
    pub fn parse(s: &str) -> Result<Self, InvalidId> {
        if s.is_empty() {
            return Err(InvalidId::Empty);
        }
        if s.len() > MAX_ID_LEN {
            return Err(InvalidId::TooLong);
        }
        if !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
        {
            return Err(InvalidId::IllegalCharacter);
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The key of `id` received from `vendor`: `<vendor>/<id>`. A
    /// transaction is identified by (vendor, id): the same id from two
    /// vendors is two transactions, with two ledger entries, two queue
    /// identities and two downstream `Idempotency-Key`s. `/` is allowed in
    /// neither ids nor vendor names, so a key reads one way only (`:` would
    /// not do: ids may contain it). Without a vendor (`RTPD_AUTH=none`) the
    /// key is the id itself, as in the seed.
    ///
    /// Total: `id` must be a vendor's own id. One that is already a key
    /// (it holds a `/`) is refused, with or without a vendor, so no input
    /// can name another vendor's key; so is a vendor name that is not one.
    ///
    /// Entries written before keys were scoped are under the bare id and
    /// belong to the vendor recorded in them: see `ledger::find`.
    pub fn scoped(vendor: Option<&str>, id: &TransactionId) -> Result<TransactionId, InvalidId> {
        if id.0.contains('/') {
            return Err(InvalidId::AlreadyScoped);
        }
        match vendor {
            Some(v) if valid_vendor(v) => Ok(TransactionId(format!("{v}/{}", id.0))),
            Some(_) => Err(InvalidId::IllegalVendor),
            None => Ok(id.clone()),
        }
    }

    /// The vendor of a scoped key.
    pub fn scope(&self) -> Option<&str> {
        self.0.split_once('/').map(|(v, _)| v)
    }

    /// The vendor's own id: the key without its `<vendor>/`.
    pub fn vendor_id(&self) -> TransactionId {
        match self.0.split_once('/') {
            Some((_, id)) => TransactionId(id.to_owned()),
            None => self.clone(),
        }
    }

    /// The vendor's id within a key held as text (a span attribute):
    /// `acme/TX-1` → `TX-1`; a bare id is itself.
    pub fn vendor_part(key: &str) -> &str {
        key.split_once('/').map_or(key, |(_, id)| id)
    }

    /// The bare id of a scoped key (where an entry written before scoping is).
    pub fn unscoped(&self) -> Option<TransactionId> {
        self.0
            .split_once('/')
            .map(|(_, id)| TransactionId(id.to_owned()))
    }

    /// An id, or a `<vendor>/<id>` key (what ledgers, queue messages and
    /// the journal hold). Input from vendors goes through [`Self::parse`].
    pub fn parse_key(s: &str) -> Result<Self, InvalidId> {
        let Some((vendor, id)) = s.split_once('/') else {
            return Self::parse(s);
        };
        if !valid_vendor(vendor) {
            return Err(InvalidId::IllegalCharacter);
        }
        Self::parse(id)?;
        Ok(Self(s.to_owned()))
    }
}

/// A vendor name as credentials allow it: 1–64 of `A-Za-z0-9-_.`.
fn valid_vendor(vendor: &str) -> bool {
    !vendor.is_empty()
        && vendor.len() <= MAX_VENDOR_LEN
        && vendor
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl fmt::Display for TransactionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for TransactionId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        TransactionId::parse_key(&s).map_err(serde::de::Error::custom)
    }
}

impl PartialEq<str> for TransactionId {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for TransactionId {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl PartialEq<String> for TransactionId {
    fn eq(&self, other: &String) -> bool {
        &self.0 == other
    }
}

impl std::ops::Deref for TransactionId {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

/// Hex sha256 of the exact payload bytes a vendor sent: computed once at
/// intake, then carried and compared, never recomputed from text.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Sha256(String);

impl Sha256 {
    pub fn of(bytes: &[u8]) -> Sha256 {
        use sha2::Digest;
        Sha256(hex::encode(sha2::Sha256::digest(bytes)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Values read back from our own stores and messages.
impl From<&str> for Sha256 {
    fn from(s: &str) -> Sha256 {
        Sha256(s.to_owned())
    }
}

impl From<String> for Sha256 {
    fn from(s: String) -> Sha256 {
        Sha256(s)
    }
}

impl fmt::Display for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl PartialEq<str> for Sha256 {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for Sha256 {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl PartialEq<String> for Sha256 {
    fn eq(&self, other: &String) -> bool {
        &self.0 == other
    }
}

/// One record's place in a log: segment key, byte offset and length (without
/// the newline). Written `<key>#<offset>+<len>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WalRef {
    pub key: String,
    pub offset: u64,
    pub len: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a WAL reference: {0}")]
pub struct InvalidWalRef(pub String);

impl fmt::Display for WalRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}+{}", self.key, self.offset, self.len)
    }
}

impl std::str::FromStr for WalRef {
    type Err = InvalidWalRef;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || InvalidWalRef(s.to_owned());
        let (key, range) = s.rsplit_once('#').ok_or_else(bad)?;
        let (off, len) = range.split_once('+').ok_or_else(bad)?;
        if key.is_empty() {
            return Err(bad());
        }
        Ok(WalRef {
            key: key.to_owned(),
            offset: off.parse().map_err(|_| bad())?,
            len: len.parse().map_err(|_| bad())?,
        })
    }
}

impl Serialize for WalRef {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for WalRef {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The seed's states. `success` and `dead_letter` are terminal (a replay can
/// move `dead_letter` back to `pending`).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    PartialOrd,
    Ord,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Pending,
    Processing,
    Success,
    Failed,
    DeadLetter,
}

impl State {
    pub const ALL: [State; 5] = [
        State::Pending,
        State::Processing,
        State::Success,
        State::Failed,
        State::DeadLetter,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Processing => "processing",
            State::Success => "success",
            State::Failed => "failed",
            State::DeadLetter => "dead_letter",
        }
    }

    pub fn parse(s: &str) -> Option<State> {
        State::ALL.into_iter().find(|st| st.as_str() == s)
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, State::Success | State::DeadLetter)
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the ledger knows about one transaction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[schema(as = Transaction)]
pub struct TxRecord {
    #[schema(value_type = String)]
    pub transaction_id: TransactionId,
    pub status: State,
    /// Hex sha256 of the exact payload bytes the vendor sent.
    #[schema(value_type = String)]
    pub sha256: Sha256,
    /// Where the payload lives in the WAL: `<segment>#<offset>+<length>`.
    #[schema(value_type = String)]
    pub wal_ref: WalRef,
    /// Downstream attempts started so far; also the fencing token of the
    /// current claim.
    pub attempts: u32,
    /// `attempts` when the current retry budget began: 0, or the attempt
    /// count at the last operator replay. Retries are counted from here, so a
    /// replay grants a full budget while the fencing token keeps growing.
    #[serde(default)]
    pub attempt_base: u32,
    pub retry_count: u32,
    pub error_message: Option<String>,
    pub next_retry_at: Option<DateTime<Utc>>,
    pub lease_owner: Option<String>,
    pub lease_until: Option<DateTime<Utc>>,
    pub vendor: Option<String>,
    /// Set by an operator replay so the replayed copy is not taken for a duplicate.
    pub replay_nonce: Option<String>,
    /// The vendor's deadline (`expires_at`): no downstream call starts after it.
    #[serde(default)]
    pub expires_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl TxRecord {
    pub fn new(reg: &Registration, now: DateTime<Utc>) -> Self {
        TxRecord {
            transaction_id: reg.transaction_id.clone(),
            status: State::Pending,
            sha256: reg.sha256.clone(),
            wal_ref: reg.wal_ref.clone(),
            attempts: 0,
            attempt_base: 0,
            retry_count: 0,
            error_message: None,
            next_retry_at: None,
            lease_owner: None,
            lease_until: None,
            vendor: reg.vendor.clone(),
            replay_nonce: None,
            expires_at: reg.expires_at,
            created_at: reg.received_at,
            updated_at: now,
        }
    }

    /// The registration this record was made from.
    pub fn registration(&self) -> Registration {
        Registration {
            transaction_id: self.transaction_id.clone(),
            sha256: self.sha256.clone(),
            wal_ref: self.wal_ref.clone(),
            vendor: self.vendor.clone(),
            received_at: self.created_at,
            expires_at: self.expires_at,
        }
    }
}

/// A new transaction to put in the ledger.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Registration {
    pub transaction_id: TransactionId,
    pub sha256: Sha256,
    pub wal_ref: WalRef,
    pub vendor: Option<String>,
    pub received_at: DateTime<Utc>,
    /// The vendor's deadline, if it gave one.
    #[serde(default)]
    pub expires_at: Option<DateTime<Utc>>,
}

/// How an attempt ended, as recorded by its (fenced) owner.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Settlement {
    Success,
    Failed {
        error: String,
        next_retry_at: DateTime<Utc>,
    },
    DeadLetter {
        reason: DeadLetterReason,
        error: String,
    },
}

/// Why a transaction was dead-lettered: the dead-letter queue's reason and
/// the group an operator replays by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DeadLetterReason {
    /// The downstream kept failing transiently until no retry was left.
    RetriesExhausted,
    /// The downstream refused it (a 4xx other than 408, 409 and 429).
    PermanentFailure,
    /// Attempts kept starting without recording an outcome (a crash loop).
    AttemptsWithoutOutcome,
    /// The message lacks the properties that name its transaction.
    MalformedMessage,
    /// The message body does not hash to the sha256 it carries.
    PayloadHashMismatch,
    /// The ledger holds other content for this transaction id.
    LedgerConflict,
    /// The vendor's `expires_at` passed: no downstream call starts after it.
    DeadlineExceeded,
}

impl DeadLetterReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterReason::RetriesExhausted => "RetriesExhausted",
            // Reported as before: the group an operator looks at for a crash loop.
            DeadLetterReason::PermanentFailure | DeadLetterReason::AttemptsWithoutOutcome => {
                "PermanentFailure"
            }
            DeadLetterReason::MalformedMessage => "MalformedMessage",
            DeadLetterReason::PayloadHashMismatch => "PayloadHashMismatch",
            DeadLetterReason::LedgerConflict => "LedgerConflict",
            DeadLetterReason::DeadlineExceeded => "DeadlineExceeded",
        }
    }
}

impl fmt::Display for DeadLetterReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Settlement {
    pub fn state(&self) -> State {
        match self {
            Settlement::Success => State::Success,
            Settlement::Failed { .. } => State::Failed,
            Settlement::DeadLetter { .. } => State::DeadLetter,
        }
    }
}

/// The pure state machine both ledger adapters apply. Adapters load the
/// record, call one of these, and store the result atomically.
pub mod machine {
    use super::*;

    #[derive(Debug, Clone, PartialEq)]
    pub enum ClaimDecision {
        /// Start attempt number `attempt` (the fencing token).
        Claim { attempt: u32 },
        /// Already `success` or `dead_letter`: nothing to do.
        Terminal,
        /// Someone else holds an unexpired lease.
        Busy,
        /// A retry is scheduled later than now.
        NotDue,
    }

    pub fn decide_claim(rec: &TxRecord, now: DateTime<Utc>) -> ClaimDecision {
        match rec.status {
            State::Success | State::DeadLetter => ClaimDecision::Terminal,
            State::Processing if rec.lease_until.is_some_and(|u| u > now) => ClaimDecision::Busy,
            // A replayed retry keeps its time (see `apply_replay`), so a
            // `pending` record can wait for it too.
            State::Pending | State::Failed if rec.next_retry_at.is_some_and(|t| t > now) => {
                ClaimDecision::NotDue
            }
            _ => ClaimDecision::Claim {
                attempt: rec.attempts + 1,
            },
        }
    }

    pub fn apply_claim(
        rec: &mut TxRecord,
        owner: &str,
        lease_until: DateTime<Utc>,
        now: DateTime<Utc>,
    ) {
        rec.attempts += 1;
        rec.status = State::Processing;
        rec.lease_owner = Some(owner.to_owned());
        rec.lease_until = Some(lease_until);
        rec.updated_at = now;
    }

    /// Whether `owner` at `attempt` still holds the transaction.
    pub fn holds(rec: &TxRecord, owner: &str, attempt: u32) -> bool {
        rec.status == State::Processing
            && rec.attempts == attempt
            && rec.lease_owner.as_deref() == Some(owner)
    }

    /// The holder ([`holds`]) gives its claim back before any downstream
    /// call was made under it (it gave the message back: a dependency
    /// failed between the claim and the call). Back to `pending`, due at
    /// once; the attempt leaves the retry budget (`attempt_base` moves up
    /// one, never past `attempts`), so it counts neither as a retry nor as
    /// an attempt without an outcome, and the attempt number (the fencing
    /// token) keeps growing.
    pub fn apply_release(rec: &mut TxRecord, now: DateTime<Utc>) {
        rec.status = State::Pending;
        rec.attempt_base = (rec.attempt_base + 1).min(rec.attempts);
        rec.lease_owner = None;
        rec.lease_until = None;
        rec.next_retry_at = None;
        rec.updated_at = now;
    }

    /// A lease extension by the holder ([`holds`]): the lease ends at
    /// `lease_until` unless it already ends later (an extension never
    /// shortens it). `updated_at` stays: the state did not change, so the
    /// record keeps its place in the lists.
    pub fn apply_extension(rec: &mut TxRecord, lease_until: DateTime<Utc>) {
        if rec.lease_until.is_none_or(|u| u < lease_until) {
            rec.lease_until = Some(lease_until);
        }
    }

    pub fn apply_settlement(rec: &mut TxRecord, s: &Settlement, now: DateTime<Utc>) {
        rec.status = s.state();
        rec.lease_owner = None;
        rec.lease_until = None;
        rec.updated_at = now;
        match s {
            Settlement::Success => {
                rec.next_retry_at = None;
            }
            Settlement::Failed {
                error,
                next_retry_at,
            } => {
                rec.error_message = Some(error.clone());
                rec.next_retry_at = Some(*next_retry_at);
                rec.retry_count += 1;
            }
            Settlement::DeadLetter { error, .. } => {
                rec.error_message = Some(error.clone());
                rec.next_retry_at = None;
            }
        }
    }

    /// Operator replay: `dead_letter`/`failed`/`pending` go back to `pending`;
    /// `success` only with `force`; `processing` never (a call is in flight).
    pub fn may_replay(rec: &TxRecord, force: bool, now: DateTime<Utc>) -> bool {
        match rec.status {
            State::Success => force,
            State::Processing => rec.lease_until.is_none_or(|u| u <= now),
            _ => true,
        }
    }

    /// `quiet`: how long after a failed or dead-lettered attempt ended (or
    /// a lapsed claim's lease) its call may still run at the downstream
    /// (it timed out here, or its process died; the replayer passes the
    /// processor's lock duration + downstream timeout, the window a ledger
    /// restore waits out too). The replayed transaction is not due before
    /// that (simulation seed 804: a replay just after a timed-out attempt
    /// started the next call while the downstream still worked on that
    /// one), nor after a retry already scheduled sooner (a restored record's
    /// is that same window); a replayed `pending` keeps its time; a
    /// `success` (the call answered) is due at once.
    pub fn apply_replay(
        rec: &mut TxRecord,
        nonce: &str,
        now: DateTime<Utc>,
        quiet: chrono::Duration,
    ) {
        let after_attempt = rec.updated_at + quiet;
        let not_before = match rec.status {
            State::Failed => Some(
                rec.next_retry_at
                    .map_or(after_attempt, |t| t.min(after_attempt)),
            ),
            State::DeadLetter => Some(after_attempt),
            State::Pending => rec.next_retry_at,
            // A lapsed claim: its call was bounded by the lease here, but a
            // process that died left it running at the downstream.
            State::Processing => rec.lease_until.map(|u| u + quiet),
            State::Success => None,
        };
        rec.next_retry_at = not_before.filter(|t| *t > now);
        // A fresh retry budget; the attempt number (fencing token) keeps
        // growing. A lapsed claim's attempt stays in the new budget: its
        // outcome is unknown (its worker may have journaled a success and
        // died before settling), so the next claim reads the journal before
        // it calls (simulation seed 693; see `JournalIndex::known`).
        rec.attempt_base = if rec.status == State::Processing {
            rec.attempts.saturating_sub(1)
        } else {
            rec.attempts
        };
        rec.status = State::Pending;
        rec.retry_count = 0;
        rec.replay_nonce = Some(nonce.to_owned());
        rec.lease_owner = None;
        rec.lease_until = None;
        rec.updated_at = now;
    }
}

#[cfg(test)]
mod tests {
    use super::machine::*;
    use super::*;
    use chrono::Duration;

    fn rec() -> TxRecord {
        TxRecord::new(
            &Registration {
                transaction_id: TransactionId::parse("tx-1").unwrap(),
                sha256: "00".into(),
                wal_ref: "w#0+1".parse().unwrap(),
                vendor: None,
                received_at: Utc::now(),
                expires_at: None,
            },
            Utc::now(),
        )
    }

    /// A replay of a lapsed claim keeps that attempt, whose outcome is
    /// unknown, in the new retry budget, so the next claim reads the journal
    /// before it calls; a replay of a failed attempt starts the budget after it.
    #[test]
    fn a_replay_of_a_lapsed_claim_keeps_its_attempt_in_the_budget() {
        let now = Utc::now();
        let mut r = rec();
        apply_claim(
            &mut r,
            "w",
            now - Duration::seconds(10),
            now - Duration::seconds(20),
        );
        apply_replay(&mut r, "n1", now, Duration::seconds(1));
        assert_eq!(
            (r.status, r.attempts, r.attempt_base),
            (State::Pending, 1, 0)
        );
        let mut r = rec();
        apply_claim(&mut r, "w", now + Duration::seconds(10), now);
        apply_settlement(
            &mut r,
            &Settlement::Failed {
                error: "503".into(),
                next_retry_at: now,
            },
            now,
        );
        apply_replay(&mut r, "n1", now, Duration::seconds(1));
        assert_eq!((r.attempts, r.attempt_base, r.retry_count), (1, 1, 0));
    }

    #[test]
    fn ids_are_validated() {
        assert!(TransactionId::parse("TX-1.a_b:c").is_ok());
        assert_eq!(TransactionId::parse(""), Err(InvalidId::Empty));
        assert_eq!(
            TransactionId::parse(&"a".repeat(129)),
            Err(InvalidId::TooLong)
        );
        assert!(TransactionId::parse(&"a".repeat(128)).is_ok());
        // Ledger keys: `<vendor>/<id>`, never from a vendor's input.
        assert!(TransactionId::parse("acme/T-1").is_err());
        let key = TransactionId::parse_key("acme/T:1").unwrap();
        assert_eq!(key.scope(), Some("acme"));
        assert_eq!(key.vendor_id(), "T:1");
        assert!(TransactionId::parse_key("a/b/c").is_err());
        assert!(TransactionId::parse_key("/x").is_err());
        assert!(TransactionId::parse_key(&format!("{}/x", "v".repeat(65))).is_err());
        let id = TransactionId::parse("T:1").unwrap();
        assert_eq!(TransactionId::scoped(Some("acme"), &id), Ok(key));
        assert_eq!(TransactionId::scoped(None, &id), Ok(id));
        for bad in ["a b", "a/b", "é", "a\n", "a#b"] {
            assert_eq!(
                TransactionId::parse(bad),
                Err(InvalidId::IllegalCharacter),
                "{bad:?}"
            );
        }
    }

    /// Issue 20, D5: scoping is total. An unscoped id is always prefixed
    /// with the vendor; a value that is already a key (it holds a `/`) is
    /// never taken as it is, so no input can name another vendor's key.
    #[test]
    fn scoping_never_yields_another_vendors_key() {
        let foreign = TransactionId::parse_key("globex/X").unwrap();
        for vendor in [Some("acme"), Some("globex"), None] {
            assert_eq!(
                TransactionId::scoped(vendor, &foreign),
                Err(InvalidId::AlreadyScoped),
                "{vendor:?}"
            );
        }
        // An unscoped id is always prefixed, whatever it looks like.
        for id in ["X", "globex:X", "X:retry:2", &"i".repeat(MAX_ID_LEN)] {
            let id = TransactionId::parse(id).unwrap();
            let key = TransactionId::scoped(Some("acme"), &id).unwrap();
            assert_eq!(key.scope(), Some("acme"), "{key}");
            assert_eq!(key.vendor_id(), id);
            assert_eq!(TransactionId::parse_key(&key).as_ref(), Ok(&key));
        }
        // A vendor name that could not be read back out of the key.
        let id = TransactionId::parse("X").unwrap();
        for vendor in ["", "a/b", "a b", &"v".repeat(MAX_VENDOR_LEN + 1)] {
            assert_eq!(
                TransactionId::scoped(Some(vendor), &id),
                Err(InvalidId::IllegalVendor),
                "{vendor:?}"
            );
        }
    }

    #[test]
    fn states_round_trip_their_names() {
        for s in State::ALL {
            assert_eq!(State::parse(s.as_str()), Some(s));
        }
        assert_eq!(State::parse("done"), None);
    }

    #[test]
    fn claim_walks_the_seed_state_machine() {
        let now = Utc::now();
        let mut r = rec();
        assert_eq!(decide_claim(&r, now), ClaimDecision::Claim { attempt: 1 });
        apply_claim(&mut r, "w1", now + Duration::seconds(30), now);
        assert_eq!(r.status, State::Processing);
        assert_eq!(decide_claim(&r, now), ClaimDecision::Busy);
        assert!(holds(&r, "w1", 1));
        assert!(!holds(&r, "w2", 1));
        assert!(!holds(&r, "w1", 2));
        // An expired lease can be taken over, with a higher fencing token.
        assert_eq!(
            decide_claim(&r, now + Duration::seconds(31)),
            ClaimDecision::Claim { attempt: 2 }
        );

        let retry_at = now + Duration::seconds(60);
        apply_settlement(
            &mut r,
            &Settlement::Failed {
                error: "503".into(),
                next_retry_at: retry_at,
            },
            now,
        );
        assert_eq!(r.status, State::Failed);
        assert_eq!(r.retry_count, 1);
        assert_eq!(decide_claim(&r, now), ClaimDecision::NotDue);
        assert_eq!(
            decide_claim(&r, retry_at + Duration::seconds(1)),
            ClaimDecision::Claim { attempt: 2 }
        );

        apply_claim(&mut r, "w1", now, now);
        apply_settlement(&mut r, &Settlement::Success, now);
        assert_eq!(decide_claim(&r, now), ClaimDecision::Terminal);
        assert!(!may_replay(&r, false, now));
        assert!(may_replay(&r, true, now));
    }

    #[test]
    fn dead_letter_is_replayable_to_pending() {
        let now = Utc::now();
        let mut r = rec();
        apply_claim(&mut r, "w", now, now);
        apply_settlement(
            &mut r,
            &Settlement::DeadLetter {
                reason: DeadLetterReason::PermanentFailure,
                error: "400".into(),
            },
            now,
        );
        assert_eq!(decide_claim(&r, now), ClaimDecision::Terminal);
        assert!(may_replay(&r, false, now));
        // Not due until its last call can have ended, then claimable.
        let quiet = Duration::seconds(70);
        apply_replay(&mut r, "n1", now, quiet);
        assert_eq!(r.status, State::Pending);
        assert_eq!(decide_claim(&r, now), ClaimDecision::NotDue);
        assert_eq!(
            decide_claim(&r, now + quiet + Duration::milliseconds(1)),
            ClaimDecision::Claim { attempt: 2 }
        );
    }
}
