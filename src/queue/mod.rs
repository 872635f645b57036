//! The queue port: a peek-lock queue with Azure Service Bus semantics.
//!
//! Contract:
//! - `send` is durable when it returns `Ok`. A message whose `message_id`
//!   equals one sent within the duplicate-detection window is dropped
//!   silently (Service Bus duplicate detection), so retries and replays must
//!   carry distinct ids.
//! - A message with `scheduled_enqueue_at` is invisible until then.
//! - `receive` locks each message it returns for the lock duration and bumps
//!   its delivery count (1 on first delivery). No other receiver gets it while
//!   the lock holds. When the lock expires unsettled, the message becomes
//!   visible again; once its delivery count has reached the queue's maximum,
//!   it moves to the dead-letter subqueue with reason `MaxDeliveryCountExceeded`.
//! - `complete`, `abandon`, `dead_letter` and `renew_lock` act only while the
//!   caller holds the lock; otherwise they fail with [`QueueError::LockLost`]
//!   and change nothing, so a worker never acts on a message it no longer owns.
//! - Ordering is not guaranteed.

pub mod local;
pub mod memory;
pub mod servicebus;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use std::{collections::BTreeMap, time::Duration};
use uuid::Uuid;

/// Dead-letter reason used when delivery count runs out.
pub const MAX_DELIVERY_COUNT_EXCEEDED: &str = "MaxDeliveryCountExceeded";

#[derive(Debug, Clone, PartialEq)]
pub struct OutgoingMessage {
    pub message_id: String,
    pub body: Bytes,
    pub content_type: Option<String>,
    /// Application properties (string values).
    pub properties: BTreeMap<String, String>,
    pub scheduled_enqueue_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subqueue {
    Main,
    DeadLetter,
}

#[derive(Debug, Clone)]
pub struct ReceivedMessage {
    pub message_id: String,
    pub body: Bytes,
    pub content_type: Option<String>,
    pub properties: BTreeMap<String, String>,
    pub lock_token: Uuid,
    /// 1 on first delivery.
    pub delivery_count: u32,
    pub sequence_number: i64,
    pub enqueued_at: DateTime<Utc>,
    pub locked_until: DateTime<Utc>,
    pub subqueue: Subqueue,
    pub dead_letter_reason: Option<String>,
    pub dead_letter_description: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The lock expired or the message was settled elsewhere: the caller no
    /// longer owns it.
    #[error("message lock lost")]
    LockLost,
    /// Worth retrying.
    #[error("queue unavailable: {0}")]
    Unavailable(String),
    #[error("queue error: {0}")]
    Fatal(String),
}

impl QueueError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, QueueError::Unavailable(_))
    }
}

#[async_trait]
pub trait Queue: Send + Sync + 'static {
    async fn send(&self, messages: Vec<OutgoingMessage>) -> Result<(), QueueError>;
    /// Peek-locks up to `max` visible messages from the main queue, waiting up
    /// to `wait` for the first.
    async fn receive(&self, max: usize, wait: Duration)
    -> Result<Vec<ReceivedMessage>, QueueError>;
    /// Peek-locks from the dead-letter subqueue.
    async fn receive_dead_letters(
        &self,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<ReceivedMessage>, QueueError>;
    /// Browses the dead-letter subqueue without locking, from sequence number `from` on.
    async fn peek_dead_letters(
        &self,
        from: i64,
        max: usize,
    ) -> Result<Vec<ReceivedMessage>, QueueError>;
    async fn complete(&self, m: &ReceivedMessage) -> Result<(), QueueError>;
    async fn abandon(&self, m: &ReceivedMessage) -> Result<(), QueueError>;
    async fn dead_letter(
        &self,
        m: &ReceivedMessage,
        reason: &str,
        description: &str,
    ) -> Result<(), QueueError>;
    async fn renew_lock(&self, m: &ReceivedMessage) -> Result<DateTime<Utc>, QueueError>;
    async fn ping(&self) -> Result<(), QueueError>;
    fn describe(&self) -> String;
}
