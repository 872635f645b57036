//! The in-memory queue: Service Bus peek-lock semantics (the queue contract)
//! over one mutex-guarded map, on [`crate::clock`] time: scheduled messages,
//! lock expiry and redelivery, delivery counts, the dead-letter subqueue and
//! duplicate detection by message id.
//!
//! Used by the deterministic simulation (`tests/sim`), which also reaches in
//! to lose, copy or purge messages ([`MemoryQueue::lose`],
//! [`MemoryQueue::redeliver_copy`], [`MemoryQueue::purge`]). Lock tokens are
//! counted, not random, so a seed replays exactly.

use super::{
    MAX_DELIVERY_COUNT_EXCEEDED, OutgoingMessage, Queue, QueueError, ReceivedMessage, Subqueue,
};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use std::{collections::BTreeMap, sync::Mutex, time::Duration};
use tokio::sync::Notify;
use uuid::Uuid;

pub use super::local::LocalQueueOptions as MemoryQueueOptions;

#[derive(Debug, Clone)]
struct Stored {
    out: OutgoingMessage,
    subqueue: Subqueue,
    enqueued_at: DateTime<Utc>,
    visible_at: DateTime<Utc>,
    lock: Option<(Uuid, DateTime<Utc>)>,
    delivery_count: u32,
    dead_letter: Option<(String, String)>,
}

#[derive(Default)]
struct Inner {
    messages: BTreeMap<i64, Stored>,
    sent_ids: BTreeMap<String, DateTime<Utc>>,
    next_seq: i64,
    next_token: u128,
}

pub struct MemoryQueue {
    inner: Mutex<Inner>,
    opts: MemoryQueueOptions,
    notify: Notify,
    /// How far the broker's clock runs ahead when it releases scheduled
    /// messages (clock skew between the broker and its clients).
    scheduled_skew: Mutex<chrono::Duration>,
}

fn dur(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

fn received(seq: i64, s: &Stored) -> ReceivedMessage {
    let (token, until) = s.lock.unwrap_or((Uuid::nil(), s.visible_at));
    ReceivedMessage {
        message_id: s.out.message_id.clone(),
        body: s.out.body.clone(),
        content_type: s.out.content_type.clone(),
        properties: s.out.properties.clone(),
        lock_token: token,
        delivery_count: s.delivery_count,
        sequence_number: seq,
        enqueued_at: s.enqueued_at,
        locked_until: until,
        subqueue: s.subqueue,
        dead_letter_reason: s.dead_letter.as_ref().map(|d| d.0.clone()),
        dead_letter_description: s.dead_letter.as_ref().map(|d| d.1.clone()),
    }
}

impl MemoryQueue {
    pub fn new(opts: MemoryQueueOptions) -> MemoryQueue {
        MemoryQueue {
            inner: Mutex::new(Inner {
                next_seq: 1,
                ..Inner::default()
            }),
            opts,
            notify: Notify::new(),
            scheduled_skew: Mutex::new(chrono::Duration::zero()),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        f(&mut self.inner.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Sequence numbers of the main queue's messages, in order.
    pub fn main_sequence_numbers(&self) -> Vec<i64> {
        self.with(|i| {
            i.messages
                .iter()
                .filter(|(_, s)| s.subqueue == Subqueue::Main)
                .map(|(q, _)| *q)
                .collect()
        })
    }

    /// Every message of the main queue, locked or not (a browse).
    pub fn main_messages(&self) -> Vec<ReceivedMessage> {
        self.with(|i| {
            i.messages
                .iter()
                .filter(|(_, s)| s.subqueue == Subqueue::Main)
                .map(|(q, s)| received(*q, s))
                .collect()
        })
    }

    /// Deletes one message whatever its state (a lost message).
    pub fn lose(&self, seq: i64) -> bool {
        self.with(|i| i.messages.remove(&seq).is_some())
    }

    /// Puts a second, unlocked copy of a message in the queue, as a broker
    /// that redelivers a message it already handed out does.
    pub fn redeliver_copy(&self, seq: i64) -> bool {
        let done = self.with(|i| {
            let Some(s) = i.messages.get(&seq).cloned() else {
                return false;
            };
            let now = crate::clock::now();
            let q = i.next_seq;
            i.next_seq += 1;
            i.messages.insert(
                q,
                Stored {
                    lock: None,
                    // A scheduled message not yet released stays invisible until its time.
                    visible_at: if s.delivery_count == 0 {
                        s.visible_at.max(now)
                    } else {
                        now
                    },
                    delivery_count: 0,
                    ..s
                },
            );
            true
        });
        self.notify.notify_waiters();
        done
    }

    /// Releases scheduled messages up to `skew` before their time from now on,
    /// as a broker whose clock runs ahead does.
    pub fn set_scheduled_skew(&self, skew: Duration) {
        *self
            .scheduled_skew
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = dur(skew);
    }

    /// Deletes every message of a subqueue; returns how many.
    pub fn purge(&self, sub: Subqueue) -> usize {
        self.with(|i| {
            let before = i.messages.len();
            i.messages.retain(|_, s| s.subqueue != sub);
            before - i.messages.len()
        })
    }

    fn lock_batch(
        &self,
        sub: Subqueue,
        max: usize,
    ) -> (Vec<ReceivedMessage>, Option<DateTime<Utc>>) {
        let lock = dur(self.opts.lock_duration);
        let max_delivery = self.opts.max_delivery_count;
        let skew = *self
            .scheduled_skew
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        self.with(|i| {
            let now = crate::clock::now();
            let mut ready: Vec<(DateTime<Utc>, i64)> = i
                .messages
                .iter()
                .filter(|(_, s)| {
                    let early = if s.out.scheduled_enqueue_at.is_some() && s.delivery_count == 0 {
                        skew
                    } else {
                        chrono::Duration::zero()
                    };
                    s.subqueue == sub && s.visible_at <= now + early
                })
                .map(|(q, s)| (s.visible_at, *q))
                .collect();
            ready.sort();
            let mut out = Vec::new();
            for (_, q) in ready {
                if out.len() >= max {
                    break;
                }
                let token = Uuid::from_u128(i.next_token);
                i.next_token += 1;
                let Some(s) = i.messages.get_mut(&q) else {
                    continue;
                };
                if sub == Subqueue::Main && s.delivery_count >= max_delivery {
                    // Delivered the maximum number of times and the last lock ran out.
                    s.subqueue = Subqueue::DeadLetter;
                    s.lock = None;
                    s.visible_at = now;
                    s.dead_letter = Some((
                        MAX_DELIVERY_COUNT_EXCEEDED.to_owned(),
                        format!(
                            "Message could not be consumed after {max_delivery} delivery attempts."
                        ),
                    ));
                    continue;
                }
                s.delivery_count += 1;
                s.lock = Some((token, now + lock));
                s.visible_at = now + lock;
                out.push(received(q, s));
            }
            let next = out
                .is_empty()
                .then(|| {
                    i.messages
                        .values()
                        .filter(|s| s.subqueue == sub)
                        .map(|s| s.visible_at)
                        .min()
                })
                .flatten();
            (out, next)
        })
    }

    async fn receive_from(
        &self,
        sub: Subqueue,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<ReceivedMessage>, QueueError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (got, next_visible) = self.lock_batch(sub, max.max(1));
            if !got.is_empty() {
                return Ok(got);
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(Vec::new());
            }
            let mut until = deadline;
            if let Some(t) = next_visible {
                let wait = (t - crate::clock::now()).to_std().unwrap_or_default();
                until = until.min(now + wait);
            }
            tokio::select! {
                biased;
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(until) => {}
            }
        }
    }

    /// Applies `f` to the message while the caller's lock holds.
    fn settle(
        &self,
        m: &ReceivedMessage,
        f: impl FnOnce(&mut Inner, i64, DateTime<Utc>),
    ) -> Result<(), QueueError> {
        let r = self.with(|i| {
            let now = crate::clock::now();
            let holds = i.messages.get(&m.sequence_number).is_some_and(|s| {
                s.lock
                    .is_some_and(|(t, until)| t == m.lock_token && until > now)
            });
            if !holds {
                return Err(QueueError::LockLost);
            }
            f(i, m.sequence_number, now);
            Ok(())
        });
        self.notify.notify_waiters();
        r
    }
}

#[async_trait]
impl Queue for MemoryQueue {
    async fn send(&self, messages: Vec<OutgoingMessage>) -> Result<(), QueueError> {
        let window = dur(self.opts.duplicate_detection_window);
        self.with(|i| {
            let now = crate::clock::now();
            i.sent_ids.retain(|_, at| *at >= now - window);
            for m in messages {
                if i.sent_ids.contains_key(&m.message_id) {
                    continue;
                }
                i.sent_ids.insert(m.message_id.clone(), now);
                let visible_at = m.scheduled_enqueue_at.unwrap_or(now).max(now);
                let q = i.next_seq;
                i.next_seq += 1;
                i.messages.insert(
                    q,
                    Stored {
                        out: m,
                        subqueue: Subqueue::Main,
                        enqueued_at: now,
                        visible_at,
                        lock: None,
                        delivery_count: 0,
                        dead_letter: None,
                    },
                );
            }
        });
        self.notify.notify_waiters();
        Ok(())
    }

    async fn receive(
        &self,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<ReceivedMessage>, QueueError> {
        self.receive_from(Subqueue::Main, max, wait).await
    }

    async fn receive_dead_letters(
        &self,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<ReceivedMessage>, QueueError> {
        self.receive_from(Subqueue::DeadLetter, max, wait).await
    }

    async fn peek_dead_letters(
        &self,
        from: i64,
        max: usize,
    ) -> Result<Vec<ReceivedMessage>, QueueError> {
        Ok(self.with(|i| {
            i.messages
                .range(from..)
                .filter(|(_, s)| s.subqueue == Subqueue::DeadLetter)
                .take(max)
                .map(|(q, s)| received(*q, s))
                .collect()
        }))
    }

    async fn complete(&self, m: &ReceivedMessage) -> Result<(), QueueError> {
        self.settle(m, |i, q, _| {
            i.messages.remove(&q);
        })
    }

    async fn abandon(&self, m: &ReceivedMessage) -> Result<(), QueueError> {
        self.settle(m, |i, q, now| {
            if let Some(s) = i.messages.get_mut(&q) {
                s.lock = None;
                s.visible_at = now;
            }
        })
    }

    async fn dead_letter(
        &self,
        m: &ReceivedMessage,
        reason: &str,
        description: &str,
    ) -> Result<(), QueueError> {
        self.settle(m, |i, q, now| {
            if let Some(s) = i.messages.get_mut(&q) {
                s.subqueue = Subqueue::DeadLetter;
                s.lock = None;
                s.visible_at = now;
                s.dead_letter = Some((reason.to_owned(), description.to_owned()));
            }
        })
    }

    async fn renew_lock(&self, m: &ReceivedMessage) -> Result<DateTime<Utc>, QueueError> {
        let lock = dur(self.opts.lock_duration);
        let mut renewed = None;
        self.settle(m, |i, q, now| {
            if let Some(s) = i.messages.get_mut(&q) {
                let until = now + lock;
                s.lock = Some((m.lock_token, until));
                s.visible_at = until;
                renewed = Some(until);
            }
        })?;
        renewed.ok_or(QueueError::LockLost)
    }

    async fn ping(&self) -> Result<(), QueueError> {
        Ok(())
    }

    fn describe(&self) -> String {
        "in-memory queue".into()
    }
}
