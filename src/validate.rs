//! What every way in (the HTTP API, the Kafka intake) checks before intake:
//! a UTF-8 JSON object whose keys never repeat, a transaction id, a
//! deadline. Transport-free: each way in turns an [`Invalid`] into its own
//! refusal (a 400 with this code, a dead-letter record with it as reason).

use crate::transaction::TransactionId;
use chrono::{DateTime, Utc};
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};
use std::collections::HashSet;

/// Why a payload was refused: a stable code (the API's `error` field) and
/// a message for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub code: &'static str,
    pub message: String,
}

impl Invalid {
    pub fn new(code: &'static str, message: impl Into<String>) -> Invalid {
        Invalid {
            code,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

/// Parses the body, refusing duplicate keys at any depth: serde_json would
/// silently keep the last, and the processor or downstream might keep the first.
pub fn parse_document(text: &str) -> Result<Value, Invalid> {
    match serde_json::from_str::<NoDuplicateKeys>(text) {
        Ok(_) => {}
        Err(e) if e.is_data() => {
            return Err(Invalid::new(
                "duplicate_key",
                format!("body has a duplicate key: {e}"),
            ));
        }
        Err(e) => {
            return Err(Invalid::new(
                "invalid_json",
                format!("body is not valid JSON: {e}"),
            ));
        }
    }
    serde_json::from_str(text)
        .map_err(|e| Invalid::new("invalid_json", format!("body is not valid JSON: {e}")))
}

/// The payload as a JSON object: UTF-8, valid JSON, no repeated key, an object.
pub fn object(payload: &[u8]) -> Result<Map<String, Value>, Invalid> {
    let text = std::str::from_utf8(payload)
        .map_err(|_| Invalid::new("invalid_utf8", "body is not valid UTF-8"))?;
    match parse_document(text)? {
        Value::Object(doc) => Ok(doc),
        _ => Err(Invalid::new("not_an_object", "body must be a JSON object")),
    }
}

/// The string member `field` of the body, if present (`invalid_transaction_id`
/// when it is not a string).
pub fn id_member<'a>(doc: &'a Map<String, Value>, field: &str) -> Result<Option<&'a str>, Invalid> {
    match doc.get(field) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.as_str())),
        Some(_) => Err(Invalid::new(
            "invalid_transaction_id",
            format!("{field} must be a string"),
        )),
    }
}

/// A transaction id as the vendor wrote it.
pub fn transaction_id(id: &str) -> Result<TransactionId, Invalid> {
    TransactionId::parse(id).map_err(|e| Invalid::new("invalid_transaction_id", e.to_string()))
}

/// A deadline in RFC 3339; `whence` names where it was read, for the message.
pub fn deadline(s: &str, whence: &str) -> Result<DateTime<Utc>, Invalid> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| {
            Invalid::new(
                "invalid_expires_at",
                format!("{whence} must be an RFC 3339 time such as 2026-01-31T12:00:00Z: {e}"),
            )
        })
}

/// The body's `expires_at` (absent or null: none).
pub fn expires_member(doc: &Map<String, Value>) -> Result<Option<DateTime<Utc>>, Invalid> {
    match doc.get("expires_at") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => deadline(s, "expires_at").map(Some),
        Some(_) => Err(Invalid::new(
            "invalid_expires_at",
            "expires_at must be a string (RFC 3339)",
        )),
    }
}

/// The deadline from the body and from the transport's header, which must
/// name the same instant when both are given.
pub fn one_deadline(
    body: Option<DateTime<Utc>>,
    header: Option<DateTime<Utc>>,
) -> Result<Option<DateTime<Utc>>, Invalid> {
    match (body, header) {
        (Some(b), Some(h)) if b != h => Err(Invalid::new(
            "invalid_expires_at",
            "expires_at and X-Rtpd-Expires-At differ",
        )),
        (b, h) => Ok(b.or(h)),
    }
}

/// Walks a JSON document and fails (as a data error) on a repeated key.
struct NoDuplicateKeys;

impl<'de> Deserialize<'de> for NoDuplicateKeys {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NoDuplicateKeysVisitor)
    }
}

struct NoDuplicateKeysVisitor;

impl<'de> Visitor<'de> for NoDuplicateKeysVisitor {
    type Value = NoDuplicateKeys;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(NoDuplicateKeys)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(NoDuplicateKeys)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(NoDuplicateKeys)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(NoDuplicateKeys)
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(NoDuplicateKeys)
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(NoDuplicateKeys)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<NoDuplicateKeys>()?.is_some() {}
        Ok(NoDuplicateKeys)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut seen = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            map.next_value::<NoDuplicateKeys>()?;
            if !seen.insert(key) {
                // The key itself is payload: it is not repeated in the message.
                return Err(de::Error::custom("a key repeats within one object"));
            }
        }
        Ok(NoDuplicateKeys)
    }
}
