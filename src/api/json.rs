//! JSON bodies as the API reads them: a document whose keys never repeat.

use super::ApiError;
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use std::collections::HashSet;

/// Parses the body, refusing duplicate keys at any depth: serde_json would
/// silently keep the last, and the processor or downstream might keep the first.
pub fn parse_document(text: &str) -> Result<serde_json::Value, ApiError> {
    match serde_json::from_str::<NoDuplicateKeys>(text) {
        Ok(_) => {}
        Err(e) if e.is_data() => {
            return Err(ApiError::bad(
                "duplicate_key",
                format!("body has a duplicate key: {e}"),
            ));
        }
        Err(e) => {
            return Err(ApiError::bad(
                "invalid_json",
                format!("body is not valid JSON: {e}"),
            ));
        }
    }
    serde_json::from_str(text)
        .map_err(|e| ApiError::bad("invalid_json", format!("body is not valid JSON: {e}")))
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
