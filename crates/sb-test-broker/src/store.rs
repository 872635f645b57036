//! Queue state and Service Bus message semantics, free of any protocol detail:
//! sequence numbers, peek-lock, lock expiry and redelivery, max delivery count,
//! dead-lettering, scheduled enqueue and duplicate detection.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fe2o3_amqp_types::messaging::annotations::OwnedKey;
use fe2o3_amqp_types::messaging::{Body, Header, Message, MessageAnnotations, MessageId};
use fe2o3_amqp_types::primitives::{SimpleValue, Symbol, Timestamp, Value};
use uuid::Uuid;

pub type AmqpMessage = Message<Body<Value>>;

pub const SEQUENCE_NUMBER: &str = "x-opt-sequence-number";
pub const ENQUEUED_TIME: &str = "x-opt-enqueued-time";
pub const LOCKED_UNTIL: &str = "x-opt-locked-until";
pub const LOCK_TOKEN: &str = "x-opt-lock-token";
pub const SCHEDULED_ENQUEUE_TIME: &str = "x-opt-scheduled-enqueue-time";
pub const DEAD_LETTER_SOURCE: &str = "x-opt-deadletter-source";
pub const DEAD_LETTER_REASON: &str = "DeadLetterReason";
pub const DEAD_LETTER_DESCRIPTION: &str = "DeadLetterErrorDescription";

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// Which part of a queue a link or request addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Subqueue {
    Main,
    DeadLetter,
}

#[derive(Debug, Clone)]
pub struct QueueSettings {
    pub lock_duration: Duration,
    pub max_delivery_count: u32,
    pub duplicate_window: Duration,
    /// Added to the times the queue reports (lock expiry, enqueue time).
    pub clock_offset_ms: i64,
}

#[derive(Debug, Clone)]
struct Lock {
    token: Uuid,
    until_ms: i64,
}

#[derive(Debug, Clone)]
struct Stored {
    message: AmqpMessage,
    enqueued_ms: i64,
    visible_ms: i64,
    /// Deliveries that ended without settlement (abandon or lock expiry): the
    /// AMQP header delivery-count the next receiver sees.
    failed_deliveries: u32,
    lock: Option<Lock>,
}

#[derive(Debug, Default)]
struct Entity {
    messages: BTreeMap<i64, Stored>,
}

#[derive(Debug)]
pub struct QueueState {
    pub name: String,
    settings: QueueSettings,
    main: Entity,
    dead_letter: Entity,
    next_sequence: i64,
    seen_ids: HashMap<String, i64>,
}

/// A message handed out under a lock.
#[derive(Debug, Clone)]
pub struct Leased {
    pub sequence: i64,
    pub lock_token: Uuid,
    pub message: AmqpMessage,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settlement {
    Complete,
    /// Abandon: visible again, delivery count + 1.
    Abandon,
    /// Release without counting a failed delivery.
    Release,
    DeadLetter {
        reason: Option<String>,
        description: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockLost;

pub fn message_id_string(id: &MessageId) -> String {
    match id {
        MessageId::String(s) => s.clone(),
        MessageId::Ulong(n) => n.to_string(),
        MessageId::Uuid(u) => Uuid::from_bytes(*u.as_inner()).to_string(),
        MessageId::Binary(b) => b.iter().map(|x| format!("{x:02x}")).collect(),
    }
}

fn annotation<'a>(m: &'a AmqpMessage, key: &str) -> Option<&'a Value> {
    m.message_annotations
        .as_ref()
        .and_then(|a| a.0.get(&OwnedKey::Symbol(Symbol::from(key))))
}

fn set_annotation(m: &mut AmqpMessage, key: &str, value: Value) {
    m.message_annotations
        .get_or_insert_with(|| MessageAnnotations(Default::default()))
        .0
        .insert(OwnedKey::Symbol(Symbol::from(key)), value);
}

impl QueueState {
    pub fn new(name: String, settings: QueueSettings) -> Self {
        Self {
            name,
            settings,
            main: Entity::default(),
            dead_letter: Entity::default(),
            next_sequence: 1,
            seen_ids: HashMap::new(),
        }
    }

    fn entity(&mut self, sub: Subqueue) -> &mut Entity {
        match sub {
            Subqueue::Main => &mut self.main,
            Subqueue::DeadLetter => &mut self.dead_letter,
        }
    }

    /// Enqueue a sent message; returns its sequence number, or None when
    /// duplicate detection dropped it.
    pub fn enqueue(&mut self, mut message: AmqpMessage, now: i64) -> Option<i64> {
        let window = self.settings.duplicate_window.as_millis() as i64;
        if window > 0 {
            self.seen_ids.retain(|_, at| now - *at < window);
            if let Some(id) = message
                .properties
                .as_ref()
                .and_then(|p| p.message_id.as_ref())
            {
                let id = message_id_string(id);
                if self.seen_ids.contains_key(&id) {
                    return None;
                }
                self.seen_ids.insert(id, now);
            }
        }
        let scheduled = match annotation(&message, SCHEDULED_ENQUEUE_TIME) {
            Some(Value::Timestamp(t)) => Some(t.milliseconds()),
            Some(Value::Long(t)) => Some(*t),
            _ => None,
        };
        let visible_ms = scheduled.map_or(now, |t| t.max(now));
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        // Broker-owned state is never taken from the sender.
        message
            .header
            .get_or_insert_with(Header::default)
            .delivery_count = 0;
        message.delivery_annotations = None;
        self.main.messages.insert(
            sequence,
            Stored {
                message,
                enqueued_ms: visible_ms,
                visible_ms,
                failed_deliveries: 0,
                lock: None,
            },
        );
        Some(sequence)
    }

    /// Schedule through `$management`: same as a send, never deduplicated away silently.
    pub fn cancel_scheduled(&mut self, sequence: i64, now: i64) {
        if let Some(s) = self.main.messages.get(&sequence)
            && s.visible_ms > now
            && s.lock.is_none()
        {
            self.main.messages.remove(&sequence);
        }
    }

    /// Move expired locks back to visible (delivery count + 1), dead-lettering
    /// messages that reached the max delivery count.
    pub fn expire_locks(&mut self, now: i64) {
        for sub in [Subqueue::Main, Subqueue::DeadLetter] {
            let expired: Vec<i64> = self
                .entity(sub)
                .messages
                .iter()
                .filter(|(_, s)| s.lock.as_ref().is_some_and(|l| l.until_ms <= now))
                .map(|(seq, _)| *seq)
                .collect();
            for seq in expired {
                self.fail_delivery(sub, seq, now);
            }
        }
    }

    fn fail_delivery(&mut self, sub: Subqueue, seq: i64, now: i64) {
        let max = self.settings.max_delivery_count;
        let Some(stored) = self.entity(sub).messages.get_mut(&seq) else {
            return;
        };
        stored.lock = None;
        stored.failed_deliveries += 1;
        stored.visible_ms = stored.visible_ms.min(now);
        if sub == Subqueue::Main && stored.failed_deliveries >= max {
            let description =
                format!("Message could not be consumed after {max} delivery attempts.");
            self.move_to_dead_letter(
                seq,
                Some("MaxDeliveryCountExceeded".into()),
                Some(description),
            );
        }
    }

    fn move_to_dead_letter(
        &mut self,
        seq: i64,
        reason: Option<String>,
        description: Option<String>,
    ) {
        let Some(mut stored) = self.main.messages.remove(&seq) else {
            return;
        };
        stored.lock = None;
        let props = stored
            .message
            .application_properties
            .get_or_insert_with(Default::default);
        if let Some(r) = reason {
            props
                .0
                .insert(DEAD_LETTER_REASON.into(), SimpleValue::String(r));
        }
        if let Some(d) = description {
            props
                .0
                .insert(DEAD_LETTER_DESCRIPTION.into(), SimpleValue::String(d));
        }
        let name = self.name.clone();
        set_annotation(&mut stored.message, DEAD_LETTER_SOURCE, Value::String(name));
        self.dead_letter.messages.insert(seq, stored);
    }

    /// The next visible message, locked for `lock_duration`.
    pub fn lease(&mut self, sub: Subqueue, now: i64) -> Option<Leased> {
        let lock_ms = self.settings.lock_duration.as_millis() as i64;
        let offset = self.settings.clock_offset_ms;
        let entity = self.entity(sub);
        let (seq, stored) = entity
            .messages
            .iter_mut()
            .find(|(_, s)| s.lock.is_none() && s.visible_ms <= now)?;
        let token = Uuid::new_v4();
        stored.lock = Some(Lock {
            token,
            until_ms: now + lock_ms,
        });
        let message = decorate(stored, *seq, Some((token, now + lock_ms)), offset);
        Some(Leased {
            sequence: *seq,
            lock_token: token,
            message,
        })
    }

    /// Receive-and-delete: the next visible message, removed.
    pub fn take(&mut self, sub: Subqueue, now: i64) -> Option<AmqpMessage> {
        let offset = self.settings.clock_offset_ms;
        let entity = self.entity(sub);
        let seq = *entity
            .messages
            .iter()
            .find(|(_, s)| s.lock.is_none() && s.visible_ms <= now)?
            .0;
        let stored = entity.messages.remove(&seq)?;
        Some(decorate(&stored, seq, None, offset))
    }

    fn locked_mut(
        &mut self,
        sub: Subqueue,
        seq: i64,
        token: Uuid,
        now: i64,
    ) -> Result<&mut Stored, LockLost> {
        let stored = self.entity(sub).messages.get_mut(&seq).ok_or(LockLost)?;
        match &stored.lock {
            Some(l) if l.token == token && l.until_ms > now => Ok(stored),
            _ => Err(LockLost),
        }
    }

    pub fn settle(
        &mut self,
        sub: Subqueue,
        seq: i64,
        token: Uuid,
        how: Settlement,
        now: i64,
    ) -> Result<(), LockLost> {
        self.locked_mut(sub, seq, token, now)?;
        match how {
            Settlement::Complete => {
                self.entity(sub).messages.remove(&seq);
            }
            Settlement::Abandon => self.fail_delivery(sub, seq, now),
            Settlement::Release => {
                if let Some(s) = self.entity(sub).messages.get_mut(&seq) {
                    s.lock = None;
                }
            }
            Settlement::DeadLetter {
                reason,
                description,
            } => match sub {
                Subqueue::Main => self.move_to_dead_letter(seq, reason, description),
                // Service Bus refuses to dead-letter a dead letter; completing is the closest
                // harmless behaviour for a test broker.
                Subqueue::DeadLetter => {
                    self.dead_letter.messages.remove(&seq);
                }
            },
        }
        Ok(())
    }

    /// Find a lock by token alone (management operations carry only the token).
    pub fn find_lock(&self, token: Uuid) -> Option<(Subqueue, i64)> {
        for (sub, entity) in [
            (Subqueue::Main, &self.main),
            (Subqueue::DeadLetter, &self.dead_letter),
        ] {
            for (seq, s) in &entity.messages {
                if s.lock.as_ref().is_some_and(|l| l.token == token) {
                    return Some((sub, *seq));
                }
            }
        }
        None
    }

    /// Extends a lock; returns the new expiry as the broker reports it (clock offset applied).
    pub fn renew_lock(&mut self, token: Uuid, now: i64) -> Result<i64, LockLost> {
        let offset = self.settings.clock_offset_ms;
        let lock_ms = self.settings.lock_duration.as_millis() as i64;
        let (sub, seq) = self.find_lock(token).ok_or(LockLost)?;
        let stored = self.locked_mut(sub, seq, token, now)?;
        let until = now + lock_ms;
        if let Some(l) = stored.lock.as_mut() {
            l.until_ms = until;
        }
        Ok(until + offset)
    }

    /// Browse without locking, from `from` on (scheduled and locked messages included).
    pub fn peek(&mut self, sub: Subqueue, from: i64, count: usize) -> Vec<AmqpMessage> {
        let offset = self.settings.clock_offset_ms;
        self.entity(sub)
            .messages
            .range(from..)
            .take(count)
            .map(|(seq, s)| decorate(s, *seq, None, offset))
            .collect()
    }

    pub fn counts(&self) -> (usize, usize) {
        (self.main.messages.len(), self.dead_letter.messages.len())
    }

    /// Messages of the main entity under a live lock.
    pub fn locked(&self, now: i64) -> usize {
        self.main
            .messages
            .values()
            .filter(|s| s.lock.as_ref().is_some_and(|l| l.until_ms > now))
            .count()
    }
}

/// The message as a receiver sees it: broker annotations and header delivery-count.
fn decorate(stored: &Stored, seq: i64, lock: Option<(Uuid, i64)>, offset_ms: i64) -> AmqpMessage {
    let mut m = stored.message.clone();
    m.header.get_or_insert_with(Header::default).delivery_count = stored.failed_deliveries;
    set_annotation(&mut m, SEQUENCE_NUMBER, Value::Long(seq));
    set_annotation(
        &mut m,
        ENQUEUED_TIME,
        Value::Timestamp(Timestamp::from_milliseconds(stored.enqueued_ms + offset_ms)),
    );
    if let Some((token, until)) = lock {
        set_annotation(&mut m, LOCK_TOKEN, Value::Uuid((*token.as_bytes()).into()));
        set_annotation(
            &mut m,
            LOCKED_UNTIL,
            Value::Timestamp(Timestamp::from_milliseconds(until + offset_ms)),
        );
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use fe2o3_amqp_types::messaging::{AmqpValue, Properties};

    fn queue(max_delivery_count: u32) -> QueueState {
        QueueState::new(
            "q".into(),
            QueueSettings {
                lock_duration: Duration::from_secs(10),
                max_delivery_count,
                duplicate_window: Duration::from_secs(60),
                clock_offset_ms: 0,
            },
        )
    }

    fn message(id: &str) -> AmqpMessage {
        Message {
            header: None,
            delivery_annotations: None,
            message_annotations: None,
            properties: Some(Properties {
                message_id: Some(MessageId::String(id.into())),
                ..Default::default()
            }),
            application_properties: None,
            body: Body::Value(AmqpValue(Value::String("x".into()))),
            footer: None,
        }
    }

    #[test]
    fn duplicates_within_the_window_are_dropped() {
        let mut q = queue(10);
        assert_eq!(q.enqueue(message("a"), 0), Some(1));
        assert_eq!(q.enqueue(message("a"), 1_000), None);
        assert_eq!(q.enqueue(message("b"), 1_000), Some(2));
        assert_eq!(q.enqueue(message("a"), 61_000), Some(3), "window passed");
    }

    #[test]
    fn lock_expiry_redelivers_then_dead_letters_at_max() {
        let mut q = queue(2);
        q.enqueue(message("a"), 0);
        let first = q.lease(Subqueue::Main, 0).unwrap();
        assert!(q.lease(Subqueue::Main, 0).is_none(), "locked");
        q.expire_locks(10_000);
        let second = q.lease(Subqueue::Main, 10_000).unwrap();
        assert_eq!(second.message.header.as_ref().unwrap().delivery_count, 1);
        assert_eq!(
            q.settle(
                Subqueue::Main,
                first.sequence,
                first.lock_token,
                Settlement::Complete,
                10_000
            ),
            Err(LockLost)
        );
        q.settle(
            Subqueue::Main,
            second.sequence,
            second.lock_token,
            Settlement::Abandon,
            10_000,
        )
        .unwrap();
        assert_eq!(q.counts(), (0, 1));
        let dead = q.lease(Subqueue::DeadLetter, 10_000).unwrap();
        let reason = dead
            .message
            .application_properties
            .as_ref()
            .unwrap()
            .0
            .get(DEAD_LETTER_REASON)
            .cloned();
        assert_eq!(
            reason,
            Some(SimpleValue::String("MaxDeliveryCountExceeded".into()))
        );
    }

    #[test]
    fn scheduled_messages_wait_until_due() {
        let mut q = queue(10);
        let mut m = message("s");
        set_annotation(
            &mut m,
            SCHEDULED_ENQUEUE_TIME,
            Value::Timestamp(Timestamp::from_milliseconds(5_000)),
        );
        q.enqueue(m, 0);
        assert!(q.lease(Subqueue::Main, 4_999).is_none());
        assert!(q.lease(Subqueue::Main, 5_000).is_some());
    }

    #[test]
    fn renew_extends_and_peek_does_not_lock() {
        let mut q = queue(10);
        q.enqueue(message("a"), 0);
        assert_eq!(q.peek(Subqueue::Main, 0, 10).len(), 1);
        let l = q.lease(Subqueue::Main, 0).unwrap();
        assert_eq!(q.renew_lock(l.lock_token, 5_000), Ok(15_000));
        q.expire_locks(12_000);
        assert_eq!(
            q.settle(
                Subqueue::Main,
                l.sequence,
                l.lock_token,
                Settlement::Complete,
                12_000
            ),
            Ok(())
        );
        assert!(q.peek(Subqueue::Main, 0, 10).is_empty());
    }
}
