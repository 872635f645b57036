//! Between the port's message types and AMQP messages as Service Bus reads
//! and writes them: properties, broker annotations, lock tokens, batches.

use std::collections::BTreeMap;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use fe2o3_amqp::types::messaging::annotations::OwnedKey;
use fe2o3_amqp::types::messaging::message::__private::Serializable;
use fe2o3_amqp::types::messaging::{
    AmqpValue, ApplicationProperties, Batch, Body, Data, Header, Message, MessageAnnotations,
    MessageId, Properties,
};
use fe2o3_amqp::types::primitives::{Binary, SimpleValue, Symbol, Timestamp, Value};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::super::{OutgoingMessage, QueueError, ReceivedMessage, Subqueue};

pub(super) type AmqpMessage = Message<Body<Value>>;

/// Message format of a batch: one transfer whose data sections are encoded messages.
pub(super) const BATCH_FORMAT: u32 = 0x8001_3700;
const SCHEDULED_ENQUEUE_TIME: &str = "x-opt-scheduled-enqueue-time";
const SEQUENCE_NUMBER: &str = "x-opt-sequence-number";
const ENQUEUED_TIME: &str = "x-opt-enqueued-time";
const LOCKED_UNTIL: &str = "x-opt-locked-until";
const LOCK_TOKEN: &str = "x-opt-lock-token";
const DEAD_LETTER_REASON: &str = "DeadLetterReason";
const DEAD_LETTER_DESCRIPTION: &str = "DeadLetterErrorDescription";
/// Service Bus refuses message ids longer than this many UTF-16 code units
/// (the service and the .NET SDK count .NET string lengths).
pub(super) const MAX_MESSAGE_ID: usize = 128;
/// The port's message id when it is longer than [`MAX_MESSAGE_ID`]; the wire
/// carries a shortened id and the receiver restores this one.
const FULL_MESSAGE_ID: &str = "rtpd_message_id";
/// Characters of a hash that keep shortened ids distinct.
const ID_HASH_CHARS: usize = 32;

/// The id Service Bus sees: the port's id when it fits, else its first
/// characters, `~` and a hash of the whole id, 128 characters together. The
/// same long id always maps to the same short one, so duplicate detection
/// still drops a copy sent twice, and different long ids stay different.
pub(super) fn wire_message_id(id: &str) -> String {
    if utf16_len(id) <= MAX_MESSAGE_ID {
        return id.to_string();
    }
    let hash = hex::encode(Sha256::digest(id.as_bytes()));
    let keep = truncate_utf16(id, MAX_MESSAGE_ID - ID_HASH_CHARS - 1);
    format!("{keep}~{}", &hash[..ID_HASH_CHARS])
}

/// A string's length as Service Bus (.NET) counts it: UTF-16 code units.
pub(super) fn utf16_len(s: &str) -> usize {
    s.chars().map(char::len_utf16).sum()
}

/// The longest prefix of `s` of at most `max` UTF-16 code units, cut
/// between characters (never inside a surrogate pair).
pub(super) fn truncate_utf16(s: &str, max: usize) -> &str {
    let mut units = 0;
    for (at, c) in s.char_indices() {
        units += c.len_utf16();
        if units > max {
            return &s[..at];
        }
    }
    s
}

pub(super) fn to_amqp(m: &OutgoingMessage) -> AmqpMessage {
    let wire_id = wire_message_id(&m.message_id);
    let shortened = wire_id != m.message_id;
    let properties = Properties {
        message_id: Some(MessageId::String(wire_id)),
        content_type: m.content_type.as_deref().map(Symbol::from),
        ..Default::default()
    };
    let application_properties = (!m.properties.is_empty() || shortened).then(|| {
        let mut map = fe2o3_amqp::types::primitives::OrderedMap::new();
        for (k, v) in &m.properties {
            map.insert(k.clone(), SimpleValue::String(v.clone()));
        }
        if shortened {
            map.insert(
                FULL_MESSAGE_ID.to_string(),
                SimpleValue::String(m.message_id.clone()),
            );
        }
        ApplicationProperties(map)
    });
    let message_annotations = m.scheduled_enqueue_at.map(|at| {
        let mut a = MessageAnnotations::default();
        a.0.insert(
            OwnedKey::Symbol(Symbol::from(SCHEDULED_ENQUEUE_TIME)),
            Value::Timestamp(Timestamp::from_milliseconds(at.timestamp_millis())),
        );
        a
    });
    Message {
        header: Some(Header {
            durable: true,
            ..Default::default()
        }),
        delivery_annotations: None,
        message_annotations,
        properties: Some(properties),
        application_properties,
        body: Body::Data(Batch::from(vec![Data(Binary::from(m.body.to_vec()))])),
        footer: None,
    }
}

pub(super) fn encode(m: &AmqpMessage) -> Result<Vec<u8>, QueueError> {
    serde_amqp::to_vec(&Serializable(m))
        .map_err(|e| QueueError::Fatal(format!("encoding message: {e}")))
}

/// One batch message carrying `encoded` messages as data sections. Service Bus
/// takes the envelope's message-id for the batch; the entries keep their own.
pub(super) fn batch_envelope(encoded: Vec<Vec<u8>>) -> AmqpMessage {
    Message {
        header: None,
        delivery_annotations: None,
        message_annotations: None,
        properties: None,
        application_properties: None,
        body: Body::Data(Batch::from(
            encoded
                .into_iter()
                .map(|b| Data(Binary::from(b)))
                .collect::<Vec<_>>(),
        )),
        footer: None,
    }
}

fn annotation<'a>(m: &'a AmqpMessage, key: &str) -> Option<&'a Value> {
    m.message_annotations
        .as_ref()?
        .0
        .get(&OwnedKey::Symbol(Symbol::from(key)))
}

fn timestamp(v: Option<&Value>) -> Option<DateTime<Utc>> {
    match v? {
        Value::Timestamp(t) => DateTime::from_timestamp_millis(t.milliseconds()),
        Value::Long(ms) => DateTime::from_timestamp_millis(*ms),
        _ => None,
    }
}

fn simple_to_string(v: &SimpleValue) -> Option<String> {
    Some(match v {
        SimpleValue::String(s) => s.clone(),
        SimpleValue::Symbol(s) => s.0.clone(),
        SimpleValue::Bool(b) => b.to_string(),
        SimpleValue::Int(n) => n.to_string(),
        SimpleValue::Long(n) => n.to_string(),
        SimpleValue::Uint(n) => n.to_string(),
        SimpleValue::Ulong(n) => n.to_string(),
        SimpleValue::Short(n) => n.to_string(),
        SimpleValue::Ushort(n) => n.to_string(),
        SimpleValue::Byte(n) => n.to_string(),
        SimpleValue::Ubyte(n) => n.to_string(),
        SimpleValue::Double(n) => n.to_string(),
        SimpleValue::Float(n) => n.to_string(),
        SimpleValue::Uuid(u) => Uuid::from_bytes(*u.as_inner()).to_string(),
        SimpleValue::Timestamp(t) => t.milliseconds().to_string(),
        SimpleValue::Null => return None,
        _ => return None,
    })
}

fn message_id_string(id: &MessageId) -> String {
    match id {
        MessageId::String(s) => s.clone(),
        MessageId::Ulong(n) => n.to_string(),
        MessageId::Uuid(u) => Uuid::from_bytes(*u.as_inner()).to_string(),
        MessageId::Binary(b) => b.iter().map(|x| format!("{x:02x}")).collect(),
    }
}

fn body_bytes(body: &Body<Value>) -> Bytes {
    match body {
        Body::Data(sections) => {
            let mut out = Vec::new();
            for d in sections.iter() {
                out.extend_from_slice(&d.0);
            }
            Bytes::from(out)
        }
        Body::Value(AmqpValue(Value::Binary(b))) => Bytes::from(b.to_vec()),
        Body::Value(AmqpValue(Value::String(s))) => Bytes::from(s.clone().into_bytes()),
        _ => Bytes::new(),
    }
}

/// The lock token: the 16-byte delivery tag in .NET GUID byte order, else
/// the `x-opt-lock-token` annotation.
pub(super) fn lock_token(delivery_tag: Option<&[u8]>, m: &AmqpMessage) -> Option<Uuid> {
    if let Some(tag) = delivery_tag
        && let Ok(bytes) = <[u8; 16]>::try_from(tag)
    {
        return Some(Uuid::from_bytes_le(bytes));
    }
    match annotation(m, LOCK_TOKEN) {
        Some(Value::Uuid(u)) => Some(Uuid::from_bytes(*u.as_inner())),
        _ => None,
    }
}

/// A received (or peeked, `lock_token` nil) message in the port's terms.
pub(super) fn from_amqp(m: &AmqpMessage, lock_token: Uuid, subqueue: Subqueue) -> ReceivedMessage {
    let props = m.properties.clone().unwrap_or_default();
    let mut properties = BTreeMap::new();
    let (mut reason, mut description, mut full_id) = (None, None, None);
    if let Some(app) = &m.application_properties {
        for (k, v) in app.0.iter() {
            let Some(v) = simple_to_string(v) else {
                continue;
            };
            match k.as_str() {
                DEAD_LETTER_REASON => reason = Some(v),
                DEAD_LETTER_DESCRIPTION => description = Some(v),
                FULL_MESSAGE_ID => full_id = Some(v),
                _ => {
                    properties.insert(k.clone(), v);
                }
            }
        }
    }
    let enqueued_at = timestamp(annotation(m, ENQUEUED_TIME)).unwrap_or_else(Utc::now);
    let sequence_number = match annotation(m, SEQUENCE_NUMBER) {
        Some(Value::Long(n)) => *n,
        Some(Value::Int(n)) => i64::from(*n),
        _ => 0,
    };
    ReceivedMessage {
        message_id: full_id.unwrap_or_else(|| {
            props
                .message_id
                .as_ref()
                .map(message_id_string)
                .unwrap_or_default()
        }),
        body: body_bytes(&m.body),
        content_type: props.content_type.map(|s| s.0),
        properties,
        lock_token,
        // AMQP counts earlier failed deliveries; Service Bus counts this one too.
        delivery_count: m.header.as_ref().map_or(0, |h| h.delivery_count) + 1,
        sequence_number,
        enqueued_at,
        locked_until: timestamp(annotation(m, LOCKED_UNTIL)).unwrap_or(DateTime::UNIX_EPOCH),
        subqueue,
        dead_letter_reason: reason,
        dead_letter_description: description,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_fields() {
        let out = OutgoingMessage {
            message_id: "tx-1".into(),
            body: Bytes::from_static(b"{\"a\":1}"),
            content_type: Some("application/json".into()),
            properties: BTreeMap::from([("k".to_string(), "v".to_string())]),
            scheduled_enqueue_at: None,
        };
        let m = to_amqp(&out);
        let token = Uuid::new_v4();
        let r = from_amqp(&m, token, Subqueue::Main);
        assert_eq!(r.message_id, "tx-1");
        assert_eq!(r.body, out.body);
        assert_eq!(r.content_type.as_deref(), Some("application/json"));
        assert_eq!(r.properties, out.properties);
        assert_eq!(r.delivery_count, 1);
    }

    #[test]
    fn long_message_ids_fit_stay_distinct_and_round_trip() {
        let base = "t".repeat(128);
        let a = wire_message_id(&format!("{base}:retry:1"));
        let b = wire_message_id(&format!("{base}:retry:2"));
        assert_eq!(a.chars().count(), MAX_MESSAGE_ID);
        assert_ne!(a, b);
        assert_eq!(a, wire_message_id(&format!("{base}:retry:1")), "stable");
        assert_eq!(wire_message_id("short:retry:1"), "short:retry:1");
        let out = OutgoingMessage {
            message_id: format!("{base}:retry:1"),
            body: Bytes::new(),
            content_type: None,
            properties: BTreeMap::new(),
            scheduled_enqueue_at: None,
        };
        let back = from_amqp(&to_amqp(&out), Uuid::nil(), Subqueue::Main);
        assert_eq!(back.message_id, out.message_id);
        assert!(
            back.properties.is_empty(),
            "the full id is not an application property"
        );
    }

    #[test]
    fn lengths_count_utf16_code_units_as_the_service_does() {
        assert_eq!(utf16_len("abc"), 3);
        assert_eq!(utf16_len("é"), 1);
        assert_eq!(utf16_len("😀"), 2);
        assert_eq!(
            truncate_utf16("a😀b", 2),
            "a",
            "a surrogate pair is never split"
        );
        assert_eq!(truncate_utf16("a😀b", 3), "a😀");
        assert_eq!(truncate_utf16("ab", 10), "ab");
        let emoji_id = "😀".repeat(100);
        let wire = wire_message_id(&emoji_id);
        assert!(utf16_len(&wire) <= MAX_MESSAGE_ID, "{}", utf16_len(&wire));
        assert_ne!(wire, emoji_id);
        assert_eq!(wire_message_id(&"é".repeat(128)), "é".repeat(128));
    }

    #[test]
    fn lock_token_from_tag_uses_guid_byte_order() {
        let token = Uuid::parse_str("00112233-4455-6677-8899-aabbccddeeff").unwrap();
        let tag = token.to_bytes_le();
        assert_eq!(tag[..4], [0x33, 0x22, 0x11, 0x00]);
        let m = to_amqp(&OutgoingMessage {
            message_id: "x".into(),
            body: Bytes::new(),
            content_type: None,
            properties: BTreeMap::new(),
            scheduled_enqueue_at: None,
        });
        assert_eq!(lock_token(Some(&tag), &m), Some(token));
        assert_eq!(lock_token(Some(&[0, 0, 0, 1]), &m), None);
    }
}
