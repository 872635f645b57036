//! Requests on `<entity>/$management` (renew-lock, peek-message,
//! update-disposition), shaped as "AMQP 1.0 in Azure Service Bus:
//! request-response-based operations" says, with the properties the SDKs
//! add: `com.microsoft:server-timeout` and, for lock operations, the
//! `associated-link-name` of the link that received the message.

use chrono::{DateTime, Utc};
use fe2o3_amqp::types::messaging::{ApplicationProperties, Body, Message};
use fe2o3_amqp::types::primitives::{Array, OrderedMap, SimpleValue, Value};
use fe2o3_amqp_management::error::{Error as MgmtError, StatusError};
use fe2o3_amqp_management::{Request, Response};
use serde_amqp::primitives::Uuid as AmqpUuid;
use uuid::Uuid;

use super::message::AmqpMessage;

pub(super) const RENEW_LOCK: &str = "com.microsoft:renew-lock";
pub(super) const PEEK_MESSAGE: &str = "com.microsoft:peek-message";
pub(super) const UPDATE_DISPOSITION: &str = "com.microsoft:update-disposition";
/// How long the service may take on a request; we wait a little longer.
pub(super) const SERVER_TIMEOUT_MS: u32 = 30_000;

/// `com.microsoft:server-timeout`, and `associated-link-name` when known.
fn request_properties(link: Option<&str>) -> ApplicationProperties {
    let mut map = OrderedMap::new();
    map.insert(
        "com.microsoft:server-timeout".to_string(),
        SimpleValue::Uint(SERVER_TIMEOUT_MS),
    );
    if let Some(link) = link {
        map.insert(
            "associated-link-name".to_string(),
            SimpleValue::String(link.to_string()),
        );
    }
    ApplicationProperties(map)
}

fn lock_tokens(tokens: Vec<Uuid>) -> Value {
    Value::Array(Array(
        tokens
            .into_iter()
            .map(|t| Value::Uuid(AmqpUuid::from(*t.as_bytes())))
            .collect(),
    ))
}

fn body(entries: Vec<(&str, Value)>) -> Value {
    let mut map = OrderedMap::new();
    for (k, v) in entries {
        map.insert(Value::String(k.to_string()), v);
    }
    Value::Map(map)
}

fn field<'a>(body: &'a Value, key: &str) -> Option<&'a Value> {
    let Value::Map(map) = body else { return None };
    map.get(&Value::String(key.to_string()))
        .or_else(|| map.get(&Value::Symbol(key.into())))
}

fn list(v: Option<&Value>) -> Vec<Value> {
    match v {
        Some(Value::Array(a)) => a.0.clone(),
        Some(Value::List(l)) => l.clone(),
        _ => Vec::new(),
    }
}

#[derive(Clone)]
pub(super) struct RenewLock {
    pub tokens: Vec<Uuid>,
    pub link: Option<String>,
}
pub(super) struct RenewLockResponse(pub Vec<DateTime<Utc>>);

impl Request for RenewLock {
    const OPERATION: &'static str = RENEW_LOCK;
    type Response = RenewLockResponse;
    type Body = Value;

    fn encode_application_properties(&mut self) -> Option<ApplicationProperties> {
        Some(request_properties(self.link.as_deref()))
    }

    fn encode_body(self) -> Value {
        body(vec![("lock-tokens", lock_tokens(self.tokens))])
    }
}

/// How a message is settled through `$management`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Disposition {
    Completed,
    Abandoned,
    /// Dead-lettered.
    Suspended,
}

/// Settle by lock token, for a message whose receiving link is gone (or to
/// get the service's answer, which a link disposition does not give us).
#[derive(Clone)]
pub(super) struct UpdateDisposition {
    pub tokens: Vec<Uuid>,
    pub status: Disposition,
    pub dead_letter: Option<(String, String)>,
    pub link: Option<String>,
}
pub(super) struct UpdateDispositionResponse;

impl Request for UpdateDisposition {
    const OPERATION: &'static str = UPDATE_DISPOSITION;
    type Response = UpdateDispositionResponse;
    type Body = Value;

    fn encode_application_properties(&mut self) -> Option<ApplicationProperties> {
        Some(request_properties(self.link.as_deref()))
    }

    fn encode_body(self) -> Value {
        let status = match self.status {
            Disposition::Completed => "completed",
            Disposition::Abandoned => "abandoned",
            Disposition::Suspended => "suspended",
        };
        let mut entries = vec![
            ("disposition-status", Value::String(status.into())),
            ("lock-tokens", lock_tokens(self.tokens)),
        ];
        if let Some((reason, description)) = self.dead_letter {
            entries.push(("deadletter-reason", Value::String(reason)));
            entries.push(("deadletter-description", Value::String(description)));
        }
        body(entries)
    }
}

impl Response for UpdateDispositionResponse {
    const STATUS_CODE: u16 = 200;
    type Body = Value;
    type Error = MgmtError;

    fn decode_message(_: Message<Value>) -> Result<Self, MgmtError> {
        Ok(UpdateDispositionResponse)
    }
}

impl Response for RenewLockResponse {
    const STATUS_CODE: u16 = 200;
    type Body = Value;
    type Error = MgmtError;

    fn decode_message(message: Message<Value>) -> Result<Self, MgmtError> {
        let expirations = list(field(&message.body, "expirations"))
            .into_iter()
            .filter_map(|v| match v {
                Value::Timestamp(t) => DateTime::from_timestamp_millis(t.milliseconds()),
                _ => None,
            })
            .collect();
        Ok(RenewLockResponse(expirations))
    }
}

#[derive(Clone)]
pub(super) struct PeekMessage {
    pub from_sequence_number: i64,
    pub count: i32,
}
pub(super) struct PeekMessageResponse(pub Vec<AmqpMessage>);

impl Request for PeekMessage {
    const OPERATION: &'static str = PEEK_MESSAGE;
    type Response = PeekMessageResponse;
    type Body = Value;

    fn encode_application_properties(&mut self) -> Option<ApplicationProperties> {
        Some(request_properties(None))
    }

    fn encode_body(self) -> Value {
        body(vec![
            (
                "from-sequence-number",
                Value::Long(self.from_sequence_number),
            ),
            ("message-count", Value::Int(self.count)),
        ])
    }
}

impl Response for PeekMessageResponse {
    const STATUS_CODE: u16 = 200;
    type Body = Value;
    type Error = MgmtError;

    /// 204 (no messages) is a success too.
    fn from_message(mut message: Message<Value>) -> Result<Self, MgmtError> {
        match Self::verify_status_code(&mut message) {
            Ok(_) => Self::decode_message(message),
            Err(MgmtError::Status(StatusError { code, .. })) if code.0.get() == 204 => {
                Ok(PeekMessageResponse(Vec::new()))
            }
            Err(e) => Err(e),
        }
    }

    fn decode_message(message: Message<Value>) -> Result<Self, MgmtError> {
        let mut out = Vec::new();
        for entry in list(field(&message.body, "messages")) {
            let Some(Value::Binary(bytes)) = field(&entry, "message") else {
                continue;
            };
            let decoded: Result<AmqpMessage, _> = serde_amqp::from_slice::<
                fe2o3_amqp::types::messaging::message::__private::Deserializable<
                    Message<Body<Value>>,
                >,
            >(bytes)
            .map(|d| d.0);
            match decoded {
                Ok(m) => out.push(m),
                Err(e) => {
                    return Err(MgmtError::DecodeError(Some(
                        fe2o3_amqp_management::error::InvalidType {
                            expected: "encoded AMQP message".into(),
                            actual: e.to_string(),
                        },
                    )));
                }
            }
        }
        Ok(PeekMessageResponse(out))
    }
}
