//! The queue message, as a type: what every flow that sends a transaction to
//! the queue (intake, retries, replay, the reconciler) builds, and what the
//! processor and the dead-letter tools read back. The wire format — body,
//! application properties and the message-id rule — lives here once.
//!
//! Message ids: the first enqueue of a transaction uses the transaction id,
//! so Service Bus duplicate detection drops a vendor's retried POST; every
//! later copy (a retry, a replay, a re-drive) gets a distinct id, so
//! duplicate detection cannot drop it.

use crate::queue::{OutgoingMessage, ReceivedMessage};
use crate::transaction::{Registration, Sha256, TransactionId, WalRef};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use std::collections::BTreeMap;

/// Application properties every queue message carries.
pub mod props {
    pub const TRANSACTION_ID: &str = "transaction_id";
    pub const SHA256: &str = "sha256";
    pub const WAL_REF: &str = "wal_ref";
    pub const VENDOR: &str = "vendor";
    pub const RECEIVED_AT: &str = "received_at";
    /// The vendor's deadline (RFC 3339), when it gave one.
    pub const EXPIRES_AT: &str = "expires_at";
    /// `initial`, `retry`, `replay` or `redrive`.
    pub const KIND: &str = "kind";
    /// The retry number of a `retry`, the nonce of a `replay` or `redrive`.
    pub const DELIVERY: &str = "delivery";
    /// W3C trace context of the span that sent the message.
    pub const TRACEPARENT: &str = crate::trace_context::TRACEPARENT;
    /// The same value under the name Microsoft's Service Bus SDKs read and
    /// write (W3C format), so Azure Functions and the .NET/Java/Python
    /// clients continue the trace.
    pub const DIAGNOSTIC_ID: &str = "Diagnostic-Id";
}

/// Which copy of a transaction a message is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// The enqueue at intake.
    Initial,
    /// The scheduled copy for attempt number `n`.
    Retry(u32),
    /// An operator replay, with its nonce.
    Replay(String),
    /// A re-drive by the reconciler, with its nonce.
    Redrive(String),
}

impl Delivery {
    pub fn kind(&self) -> &'static str {
        match self {
            Delivery::Initial => "initial",
            Delivery::Retry(_) => "retry",
            Delivery::Replay(_) => "replay",
            Delivery::Redrive(_) => "redrive",
        }
    }

    /// A fresh nonce for a replay or a re-drive.
    pub fn nonce() -> String {
        crate::clock::nonce()
    }

    fn detail(&self) -> Option<String> {
        match self {
            Delivery::Initial => None,
            Delivery::Retry(n) => Some(n.to_string()),
            Delivery::Replay(nonce) | Delivery::Redrive(nonce) => Some(nonce.clone()),
        }
    }

    fn parse(kind: Option<&str>, detail: Option<&str>) -> Delivery {
        let detail = detail.unwrap_or_default();
        match kind {
            Some("retry") => Delivery::Retry(detail.parse().unwrap_or(0)),
            Some("replay") => Delivery::Replay(detail.to_owned()),
            Some("redrive") => Delivery::Redrive(detail.to_owned()),
            _ => Delivery::Initial,
        }
    }
}

/// Why a received message cannot be read as an envelope.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("message has no {0} property")]
    Missing(&'static str),
    #[error("message property {0} is invalid: {1}")]
    Invalid(&'static str, String),
}

/// One transaction on its way through the queue.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    pub registration: Registration,
    pub delivery: Delivery,
    /// The exact payload bytes the vendor sent.
    pub payload: Bytes,
    /// Invisible until then (a scheduled retry).
    pub scheduled: Option<DateTime<Utc>>,
    /// W3C `traceparent` of the sender's span: a new envelope takes the
    /// current span's, a received one the sender's.
    pub trace_parent: Option<String>,
}

/// Service Bus's limit on a message id.
pub const MAX_MESSAGE_ID_LEN: usize = 128;

impl Envelope {
    pub fn new(registration: Registration, payload: Bytes, delivery: Delivery) -> Envelope {
        Envelope {
            registration,
            delivery,
            payload,
            scheduled: None,
            trace_parent: crate::trace_context::current_traceparent(),
        }
    }

    pub fn scheduled_at(mut self, at: Option<DateTime<Utc>>) -> Envelope {
        self.scheduled = at;
        self
    }

    pub fn transaction_id(&self) -> &TransactionId {
        &self.registration.transaction_id
    }

    /// The transaction's key for the first enqueue, a distinct id for every
    /// later copy: `<key>/<kind>/<n or nonce>` (`acme/TX-1/retry/2`). `/`
    /// can appear in neither a transaction id nor a vendor name, so a
    /// copy's id is never another transaction's key (`X:retry:2` is a
    /// valid id; `X/retry/2` is not) nor another transaction's copy (a key
    /// holds at most one `/`, a copy's id two or three, and its last two
    /// parts are fixed words and digits or a hex nonce). Service Bus message
    /// ids are at most 128 characters and a key (`<vendor>/<id>`) may be up
    /// to 193: a longer id is replaced by `~sha256:<hex of it>` (the same
    /// every time, so duplicate detection still works; `~` is in neither
    /// ids nor vendor names, so it is never an unhashed id either); the
    /// `transaction_id` property keeps the key.
    pub fn message_id(&self) -> String {
        let id = &self.registration.transaction_id;
        let id = match self.delivery.detail() {
            None => id.to_string(),
            Some(detail) => format!("{id}/{}/{detail}", self.delivery.kind()),
        };
        if id.len() <= MAX_MESSAGE_ID_LEN {
            id
        } else {
            format!("~sha256:{}", Sha256::of(id.as_bytes()))
        }
    }

    pub fn to_message(&self) -> OutgoingMessage {
        let reg = &self.registration;
        let mut properties = BTreeMap::from([
            (
                props::TRANSACTION_ID.to_owned(),
                reg.transaction_id.to_string(),
            ),
            (props::SHA256.to_owned(), reg.sha256.to_string()),
            (props::WAL_REF.to_owned(), reg.wal_ref.to_string()),
            (props::RECEIVED_AT.to_owned(), reg.received_at.to_rfc3339()),
            (props::KIND.to_owned(), self.delivery.kind().to_owned()),
        ]);
        if let Some(detail) = self.delivery.detail() {
            properties.insert(props::DELIVERY.to_owned(), detail);
        }
        if let Some(v) = &reg.vendor {
            properties.insert(props::VENDOR.to_owned(), v.clone());
        }
        if let Some(t) = reg.expires_at {
            properties.insert(props::EXPIRES_AT.to_owned(), t.to_rfc3339());
        }
        if let Some(tp) = &self.trace_parent {
            properties.insert(props::TRACEPARENT.to_owned(), tp.clone());
            properties.insert(props::DIAGNOSTIC_ID.to_owned(), tp.clone());
        }
        OutgoingMessage {
            message_id: self.message_id(),
            body: self.payload.clone(),
            content_type: Some("application/json".into()),
            properties,
            scheduled_enqueue_at: self.scheduled,
        }
    }

    pub fn from_message(m: &ReceivedMessage) -> Result<Envelope, EnvelopeError> {
        let p = &m.properties;
        let get = |name: &'static str| p.get(name).ok_or(EnvelopeError::Missing(name));
        let transaction_id = TransactionId::parse_key(get(props::TRANSACTION_ID)?)
            .map_err(|e| EnvelopeError::Invalid(props::TRANSACTION_ID, e.to_string()))?;
        let sha256 = Sha256::from(get(props::SHA256)?.as_str());
        let wal_ref: WalRef =
            get(props::WAL_REF)?
                .parse()
                .map_err(|e: crate::transaction::InvalidWalRef| {
                    EnvelopeError::Invalid(props::WAL_REF, e.to_string())
                })?;
        let received_at = p
            .get(props::RECEIVED_AT)
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or(m.enqueued_at);
        let expires_at = p
            .get(props::EXPIRES_AT)
            .map(|t| {
                DateTime::parse_from_rfc3339(t)
                    .map(|t| t.with_timezone(&Utc))
                    .map_err(|e| EnvelopeError::Invalid(props::EXPIRES_AT, e.to_string()))
            })
            .transpose()?;
        Ok(Envelope {
            registration: Registration {
                transaction_id,
                sha256,
                wal_ref,
                vendor: p.get(props::VENDOR).cloned(),
                received_at,
                expires_at,
            },
            delivery: Delivery::parse(
                p.get(props::KIND).map(String::as_str),
                p.get(props::DELIVERY).map(String::as_str),
            ),
            payload: m.body.clone(),
            scheduled: None,
            // A message from a Microsoft SDK may carry only Diagnostic-Id.
            trace_parent: p
                .get(props::TRACEPARENT)
                .or_else(|| p.get(props::DIAGNOSTIC_ID))
                .cloned(),
        })
    }

    /// Whether the body is the payload the registration names.
    pub fn payload_matches(&self) -> bool {
        Sha256::of(&self.payload) == self.registration.sha256
    }
}

/// The transaction id a received message names, if any (for listings).
pub fn transaction_id_of(m: &ReceivedMessage) -> Option<&str> {
    m.properties.get(props::TRANSACTION_ID).map(String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::Subqueue;

    fn reg() -> Registration {
        Registration {
            transaction_id: TransactionId::parse("TX-1").unwrap(),
            sha256: Sha256::of(b"{}"),
            wal_ref: "wal/v1/2026/01/01/00/s.ndjson#0+2".parse().unwrap(),
            vendor: Some("acme".into()),
            received_at: DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
            expires_at: None,
        }
    }

    fn received(out: &OutgoingMessage) -> ReceivedMessage {
        ReceivedMessage {
            message_id: out.message_id.clone(),
            body: out.body.clone(),
            content_type: out.content_type.clone(),
            properties: out.properties.clone(),
            lock_token: uuid::Uuid::new_v4(),
            delivery_count: 1,
            sequence_number: 1,
            enqueued_at: Utc::now(),
            locked_until: Utc::now(),
            subqueue: Subqueue::Main,
            dead_letter_reason: None,
            dead_letter_description: None,
        }
    }

    #[test]
    fn the_first_copy_uses_the_transaction_id_and_later_ones_differ() {
        let ids: Vec<String> = [
            Delivery::Initial,
            Delivery::Retry(2),
            Delivery::Replay("n1".into()),
            Delivery::Redrive("n2".into()),
        ]
        .into_iter()
        .map(|d| Envelope::new(reg(), Bytes::from_static(b"{}"), d).message_id())
        .collect();
        assert_eq!(
            ids,
            ["TX-1", "TX-1/retry/2", "TX-1/replay/n1", "TX-1/redrive/n2"]
        );
    }

    /// Issue 20, D4: an id shaped like another id's copy (`X:retry:2`, and
    /// the same for every kind of copy, scoped or not) gets its own message
    /// id, and a hashed long id never equals an unhashed one.
    #[test]
    fn a_copys_message_id_is_never_another_transactions() {
        let with = |key: &str, d: Delivery| {
            let reg = Registration {
                transaction_id: TransactionId::parse_key(key).unwrap(),
                ..reg()
            };
            Envelope::new(reg, Bytes::from_static(b"{}"), d).message_id()
        };
        for key in ["X", "acme/X"] {
            for (copy, shaped) in [
                (Delivery::Retry(2), "X:retry:2"),
                (Delivery::Replay("n1".into()), "X:replay:n1"),
                (Delivery::Redrive("n2".into()), "X:redrive:n2"),
            ] {
                let of_x = with(key, copy);
                let shaped = key.replace('X', shaped);
                assert_ne!(of_x, with(&shaped, Delivery::Initial), "{of_x}");
                assert_ne!(
                    with(key, Delivery::Initial),
                    with(&shaped, Delivery::Initial)
                );
            }
        }
        let long = format!("{}/{}", "v".repeat(64), "i".repeat(128));
        let hashed = with(&long, Delivery::Retry(2));
        assert!(hashed.starts_with("~sha256:") && hashed.len() <= MAX_MESSAGE_ID_LEN);
        assert!(TransactionId::parse_key(&hashed).is_err(), "{hashed}");
    }

    #[test]
    fn envelopes_round_trip_through_a_message() {
        for d in [
            Delivery::Initial,
            Delivery::Retry(3),
            Delivery::Replay("abc".into()),
            Delivery::Redrive("def".into()),
        ] {
            let e = Envelope::new(reg(), Bytes::from_static(b"{}"), d);
            let back = Envelope::from_message(&received(&e.to_message())).unwrap();
            assert_eq!(back, e);
            assert!(back.payload_matches());
        }
    }

    #[test]
    fn trace_context_travels_as_traceparent_and_diagnostic_id() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut e = Envelope::new(reg(), Bytes::from_static(b"{}"), Delivery::Initial);
        e.trace_parent = Some(tp.to_owned());
        let mut out = e.to_message();
        assert_eq!(out.properties[props::TRACEPARENT], tp);
        assert_eq!(out.properties[props::DIAGNOSTIC_ID], tp);
        assert_eq!(
            Envelope::from_message(&received(&out))
                .unwrap()
                .trace_parent
                .as_deref(),
            Some(tp)
        );
        // Written by a Microsoft SDK: Diagnostic-Id only.
        out.properties.remove(props::TRACEPARENT);
        assert_eq!(
            Envelope::from_message(&received(&out))
                .unwrap()
                .trace_parent
                .as_deref(),
            Some(tp)
        );
    }

    #[test]
    fn a_message_without_its_properties_is_refused() {
        let mut out =
            Envelope::new(reg(), Bytes::from_static(b"{}"), Delivery::Initial).to_message();
        out.properties.remove(props::SHA256);
        assert_eq!(
            Envelope::from_message(&received(&out)),
            Err(EnvelopeError::Missing(props::SHA256))
        );
    }
}
