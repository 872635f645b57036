//! A Kafka record as intake sees it: the same checks as `POST
//! /v1/transactions` ([`crate::validate`]), the id from the key, a header
//! or a JSON member, and where the record came from for the WAL.

use crate::intake::Submission;
use crate::transaction::Sha256;
use crate::validate::{self, Invalid};
use crate::wal::{KafkaOrigin, Source};
use bytes::Bytes;
use std::fmt;
use std::str::FromStr;

/// Where the transaction id is read from (`RTPD_KAFKA_ID_FROM`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdFrom {
    /// The record key, as UTF-8.
    Key,
    /// A record header of this name.
    Header(String),
    /// A string member of the JSON payload (top level).
    Field(String),
}

impl FromStr for IdFrom {
    type Err = String;

    fn from_str(s: &str) -> Result<IdFrom, String> {
        let s = s.trim();
        match s.split_once(':') {
            None if s == "key" => Ok(IdFrom::Key),
            Some(("header", name)) if !name.is_empty() => Ok(IdFrom::Header(name.to_owned())),
            Some(("field", name)) if !name.is_empty() => Ok(IdFrom::Field(name.to_owned())),
            _ => Err(format!(
                "{s:?} is not key, header:<name> or field:<name> (such as field:transaction_id)"
            )),
        }
    }
}

impl fmt::Display for IdFrom {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdFrom::Key => f.write_str("key"),
            IdFrom::Header(n) => write!(f, "header:{n}"),
            IdFrom::Field(n) => write!(f, "field:{n}"),
        }
    }
}

/// The header that may carry a deadline, as on the HTTP API.
pub const EXPIRES_AT_HEADER: &str = "X-Rtpd-Expires-At";

/// One fetched record, owned (the consumer's borrow ends at the next poll).
#[derive(Debug, Clone)]
pub struct Fetched {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    pub payload: Option<Bytes>,
}

impl Fetched {
    fn header(&self, name: &str) -> Option<Option<&[u8]>> {
        self.headers
            .iter()
            .rev()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_deref())
    }

    /// `<topic>/<partition>@<offset>`: how logs and the journal name it.
    pub fn name(&self) -> String {
        format!("{}/{}@{}", self.topic, self.partition, self.offset)
    }

    pub fn origin(&self) -> KafkaOrigin {
        KafkaOrigin {
            topic: self.topic.clone(),
            partition: self.partition,
            offset: self.offset,
        }
    }
}

/// What intake gets from a record, or why the record is refused.
pub fn submission(
    r: &Fetched,
    id_from: &IdFrom,
    vendor: Option<&str>,
    max_bytes: usize,
) -> Result<Submission, Invalid> {
    let payload = r.payload.clone().unwrap_or_default();
    if payload.len() > max_bytes {
        return Err(Invalid::new(
            "payload_too_large",
            format!(
                "the record's value is {} bytes, more than RTPD_MAX_BODY_BYTES ({max_bytes})",
                payload.len()
            ),
        ));
    }
    if r.payload.is_none() {
        return Err(Invalid::new(
            "empty_record",
            "the record has no value (a tombstone)",
        ));
    }
    let doc = validate::object(&payload)?;
    let text = |what: &str, bytes: Option<&[u8]>| -> Result<Option<String>, Invalid> {
        match bytes {
            None => Ok(None),
            Some(b) => std::str::from_utf8(b)
                .map(|s| Some(s.to_owned()))
                .map_err(|_| {
                    Invalid::new("invalid_transaction_id", format!("the {what} is not UTF-8"))
                }),
        }
    };
    let id = match id_from {
        IdFrom::Key => text("record key", r.key.as_deref())?,
        IdFrom::Header(name) => text(&format!("header {name}"), r.header(name).flatten())?,
        IdFrom::Field(name) => validate::id_member(&doc, name)?.map(str::to_owned),
    };
    let Some(id) = id else {
        return Err(Invalid::new(
            "missing_transaction_id",
            format!("the record has no transaction id (RTPD_KAFKA_ID_FROM={id_from})"),
        ));
    };
    let transaction_id = validate::transaction_id(&id)?;
    let header_deadline = match r.header(EXPIRES_AT_HEADER).flatten() {
        None => None,
        Some(b) => {
            let s = std::str::from_utf8(b).map_err(|_| {
                Invalid::new("invalid_expires_at", "X-Rtpd-Expires-At must be ASCII")
            })?;
            Some(validate::deadline(s, "X-Rtpd-Expires-At")?)
        }
    };
    let expires_at = validate::one_deadline(validate::expires_member(&doc)?, header_deadline)?;
    Ok(Submission {
        transaction_id,
        sha256: Sha256::of(&payload),
        payload,
        source: Source {
            vendor: vendor.map(str::to_owned),
            remote_addr: None,
            kafka: Some(r.origin()),
        },
        expires_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(key: Option<&str>, headers: &[(&str, &str)], value: Option<&str>) -> Fetched {
        Fetched {
            topic: "payments".into(),
            partition: 2,
            offset: 41,
            key: key.map(|k| k.as_bytes().to_vec()),
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), Some(v.as_bytes().to_vec())))
                .collect(),
            payload: value.map(|v| Bytes::copy_from_slice(v.as_bytes())),
        }
    }

    #[test]
    fn the_id_comes_from_where_the_setting_says() {
        let r = rec(
            Some("k-1"),
            &[("tx-id", "h-1")],
            Some(r#"{"transaction_id":"f-1","amount":5}"#),
        );
        let id = |from: &str| {
            submission(&r, &from.parse().unwrap(), None, 1024)
                .unwrap()
                .transaction_id
                .to_string()
        };
        assert_eq!(id("key"), "k-1");
        assert_eq!(id("header:tx-id"), "h-1");
        assert_eq!(id("header:TX-ID"), "h-1");
        assert_eq!(id("field:transaction_id"), "f-1");
        let s = submission(&r, &IdFrom::Key, Some("acme"), 1024).unwrap();
        assert_eq!(
            s.payload.as_ref(),
            br#"{"transaction_id":"f-1","amount":5}"#
        );
        assert_eq!(s.sha256, Sha256::of(s.payload.as_ref()));
        assert_eq!(s.source.vendor.as_deref(), Some("acme"));
        let k = s.source.kafka.unwrap();
        assert_eq!(
            (k.topic.as_str(), k.partition, k.offset),
            ("payments", 2, 41)
        );
    }

    #[test]
    fn bad_records_are_refused_with_the_apis_codes() {
        let code = |r: Fetched, from: &str| {
            submission(&r, &from.parse().unwrap(), None, 64)
                .unwrap_err()
                .code
        };
        assert_eq!(
            code(rec(Some("a"), &[], Some("not json")), "key"),
            "invalid_json"
        );
        assert_eq!(
            code(rec(Some("a"), &[], Some("[1]")), "key"),
            "not_an_object"
        );
        assert_eq!(
            code(rec(Some("a"), &[], Some(r#"{"x":1,"x":2}"#)), "key"),
            "duplicate_key"
        );
        assert_eq!(
            code(rec(None, &[], Some("{}")), "key"),
            "missing_transaction_id"
        );
        assert_eq!(
            code(rec(Some("a b"), &[], Some("{}")), "key"),
            "invalid_transaction_id"
        );
        assert_eq!(
            code(
                rec(Some("a"), &[], Some(r#"{"transaction_id":7}"#)),
                "field:transaction_id"
            ),
            "invalid_transaction_id"
        );
        assert_eq!(code(rec(Some("a"), &[], None), "key"), "empty_record");
        let big = format!(r#"{{"pad":"{}"}}"#, "x".repeat(100));
        assert_eq!(
            code(rec(Some("a"), &[], Some(&big)), "key"),
            "payload_too_large"
        );
        assert_eq!(
            code(
                rec(Some("a"), &[(EXPIRES_AT_HEADER, "tomorrow")], Some("{}")),
                "key"
            ),
            "invalid_expires_at"
        );
        let mut r = rec(Some("a"), &[], None);
        r.payload = Some(Bytes::from_static(b"{\"a\":\"\xff\"}"));
        assert_eq!(code(r, "key"), "invalid_utf8");
    }

    #[test]
    fn id_from_parses_and_names_the_forms() {
        for bad in ["", "keys", "header:", "field", "value:x"] {
            assert!(bad.parse::<IdFrom>().is_err(), "{bad}");
        }
        assert_eq!(
            "header:x-id".parse::<IdFrom>().unwrap().to_string(),
            "header:x-id"
        );
    }
}
