//! The Kafka intake: records from a consumer group's topics go through the
//! same durability step as `POST /v1/transactions` ([`crate::intake`]).
//!
//! - A record's offset is committed only once it is durable (WAL and
//!   ledger: intake's `Accepted` or `Duplicate`) or set aside on the
//!   dead-letter topic — per partition, in fetch order
//!   ([`offsets::Watermarks`]), never the end of a fetched batch. A crash
//!   anywhere re-reads from the first record that was not durable; the
//!   duplicates that result are absorbed by the ledger (same bytes: the
//!   existing transaction; its queue message id dedupes any resend).
//! - A bad record (not a JSON object, no or a bad id, too large, other bytes
//!   under a known id) goes to the dead-letter topic with the reason in its
//!   headers, is journaled ([`EntryKind::Rejected`]), and does not stop the
//!   partition.
//! - While the WAL, the ledger or the journal does not answer, or too many
//!   records are in intake, the assigned partitions are paused (the
//!   consumer keeps polling, so it stays in the group) and resumed later.
//!   Records already fetched wait and are tried again: nothing is skipped.

pub mod offsets;
pub mod record;

#[cfg(feature = "kafka")]
pub mod client;
#[cfg(feature = "kafka")]
mod consumer;
#[cfg(feature = "kafka")]
pub use consumer::run;

/// Headers of a dead-letter record (besides the original record's own).
pub mod headers {
    pub const REASON: &str = "rtpd-reason";
    pub const ERROR: &str = "rtpd-error";
    pub const TOPIC: &str = "rtpd-source-topic";
    pub const PARTITION: &str = "rtpd-source-partition";
    pub const OFFSET: &str = "rtpd-source-offset";
    pub const TRANSACTION_ID: &str = "rtpd-transaction-id";
    /// Set when the dead-letter topic refused the record as it was (too
    /// large): `<bytes> bytes, sha256 <hex>` of the value left out.
    pub const VALUE_DROPPED: &str = "rtpd-value-dropped";
}

/// What became of a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Accepted,
    Duplicate,
    DeadLettered,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Accepted => "accepted",
            Outcome::Duplicate => "duplicate",
            Outcome::DeadLettered => "dead_lettered",
        }
    }
}
