//! Request-response nodes: `$cbs` (put-token) and `<queue>/$management`
//! (renew-lock, peek-message, schedule-message, cancel-scheduled-message),
//! answering with the status properties Service Bus uses.

use fe2o3_amqp_types::messaging::message::__private::{Deserializable, Serializable};
use fe2o3_amqp_types::messaging::{AmqpValue, ApplicationProperties, Body, Message, Properties};
use fe2o3_amqp_types::primitives::{Array, OrderedMap, SimpleValue, Symbol, Timestamp, Value};
use serde_bytes::ByteBuf;
use uuid::Uuid;

use crate::auth::{self, Claim};
use crate::store::{AmqpMessage, Settlement, Subqueue, now_ms};
use crate::{CbsPut, ManagementRequest, Shared, lock};

pub const LOCK_LOST: &str = "com.microsoft:message-lock-lost";
pub const ARGUMENT_OUT_OF_RANGE: &str = "com.microsoft:argument-out-of-range";

fn app_prop<'a>(m: &'a AmqpMessage, key: &str) -> Option<&'a SimpleValue> {
    m.application_properties.as_ref().and_then(|p| p.0.get(key))
}

fn prop_string(m: &AmqpMessage, key: &str) -> Option<String> {
    match app_prop(m, key)? {
        SimpleValue::String(s) => Some(s.clone()),
        SimpleValue::Symbol(s) => Some(s.0.clone()),
        _ => None,
    }
}

fn body_map(m: &AmqpMessage) -> OrderedMap<Value, Value> {
    match &m.body {
        Body::Value(AmqpValue(Value::Map(map))) => map.clone(),
        _ => OrderedMap::new(),
    }
}

fn get<'a>(map: &'a OrderedMap<Value, Value>, key: &str) -> Option<&'a Value> {
    map.get(&Value::String(key.into()))
        .or_else(|| map.get(&Value::Symbol(Symbol::from(key))))
}

fn as_i64(v: &Value) -> Option<i64> {
    match v {
        Value::Long(n) => Some(*n),
        Value::Int(n) => Some(i64::from(*n)),
        Value::Uint(n) => Some(i64::from(*n)),
        Value::Ulong(n) => i64::try_from(*n).ok(),
        Value::Short(n) => Some(i64::from(*n)),
        Value::Ushort(n) => Some(i64::from(*n)),
        Value::Byte(n) => Some(i64::from(*n)),
        Value::Ubyte(n) => Some(i64::from(*n)),
        _ => None,
    }
}

fn as_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Symbol(s) => Some(s.0.clone()),
        _ => None,
    }
}

fn list(v: Option<&Value>) -> Vec<Value> {
    match v {
        Some(Value::Array(a)) => a.0.clone(),
        Some(Value::List(l)) => l.clone(),
        Some(other) => vec![other.clone()],
        None => Vec::new(),
    }
}

/// Encode a message for a receiver. The header is written out in full:
/// `serde_amqp` drops trailing default fields, and Service Bus's SDKs read an
/// absent delivery-count as "unknown" rather than 0.
pub fn encode_message(m: &AmqpMessage) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = m.clone();
    if let Some(h) = rest.header.take() {
        let bool_code = |b: bool| if b { 0x41u8 } else { 0x42 };
        let mut fields = vec![bool_code(h.durable), 0x50, h.priority.0];
        match h.ttl {
            Some(ttl) => {
                fields.push(0x70);
                fields.extend_from_slice(&ttl.to_be_bytes());
            }
            None => fields.push(0x40),
        }
        fields.push(bool_code(h.first_acquirer));
        fields.push(0x70);
        fields.extend_from_slice(&h.delivery_count.to_be_bytes());
        // described(smallulong 0x70) list8(size, count = 5, fields)
        out.extend_from_slice(&[0x00, 0x53, 0x70, 0xc0, (fields.len() + 1) as u8, 5]);
        out.extend_from_slice(&fields);
    }
    out.extend(serde_amqp::to_vec(&Serializable(&rest)).unwrap_or_default());
    out
}

pub fn decode_message(bytes: &[u8]) -> Result<AmqpMessage, serde_amqp::Error> {
    serde_amqp::from_slice::<Deserializable<AmqpMessage>>(bytes).map(|d| d.0)
}

struct Reply {
    status: i32,
    description: String,
    condition: Option<&'static str>,
    body: Value,
}

impl Reply {
    fn ok(status: i32, body: Value) -> Self {
        Self {
            status,
            description: "OK".into(),
            condition: None,
            body,
        }
    }
    fn err(status: i32, condition: &'static str, description: impl Into<String>) -> Self {
        Self {
            status,
            description: description.into(),
            condition: Some(condition),
            body: Value::Null,
        }
    }
}

fn response(request: &AmqpMessage, reply: Reply, cbs: bool) -> AmqpMessage {
    let (code_key, desc_key) = if cbs {
        ("status-code", "status-description")
    } else {
        ("statusCode", "statusDescription")
    };
    let mut props = OrderedMap::new();
    props.insert(code_key.to_string(), SimpleValue::Int(reply.status));
    props.insert(desc_key.to_string(), SimpleValue::String(reply.description));
    if let Some(c) = reply.condition {
        props.insert(
            "errorCondition".to_string(),
            SimpleValue::Symbol(Symbol::from(c)),
        );
    }
    let request_props = request.properties.clone().unwrap_or_default();
    Message {
        header: None,
        delivery_annotations: None,
        message_annotations: None,
        properties: Some(Properties {
            message_id: Some(fe2o3_amqp_types::messaging::MessageId::String(
                Uuid::new_v4().to_string(),
            )),
            correlation_id: request_props.message_id.clone(),
            to: request_props.reply_to.clone(),
            ..Default::default()
        }),
        application_properties: Some(ApplicationProperties(props)),
        body: Body::Value(AmqpValue(reply.body)),
        footer: None,
    }
}

/// Answer a `$cbs` request; an accepted put-token returns the claim it grants.
pub fn handle_cbs(shared: &Shared, request: &AmqpMessage) -> (AmqpMessage, Option<Claim>) {
    let op = prop_string(request, "operation").unwrap_or_default();
    let kind = prop_string(request, "type").unwrap_or_default();
    let audience = prop_string(request, "name").unwrap_or_default();
    let expiration = match app_prop(request, "expiration") {
        Some(SimpleValue::Timestamp(t)) => Some(t.milliseconds()),
        _ => None,
    };
    let token = match &request.body {
        Body::Value(AmqpValue(Value::String(s))) => s.clone(),
        _ => String::new(),
    };
    let mut claim = None;
    let reply = if op != "put-token" {
        Reply::err(
            400,
            "amqp:not-implemented",
            format!("unsupported cbs operation {op}"),
        )
    } else if kind != "servicebus.windows.net:sastoken" && kind != "jwt" {
        Reply::err(
            400,
            "amqp:invalid-field",
            format!("unsupported token type {kind}"),
        )
    } else {
        let granted = auth::claim_for(&shared.config, &kind, &audience, &token, expiration);
        tracing::debug!(%audience, %kind, ?granted, "put-token");
        match granted {
            Err((status, condition, description)) => Reply::err(status, condition, description),
            Ok(c) => {
                claim = Some(c);
                lock(&shared.tokens).push(CbsPut {
                    kind,
                    audience,
                    token,
                });
                Reply {
                    status: 202,
                    description: "Accepted".into(),
                    condition: None,
                    body: Value::Null,
                }
            }
        }
    };
    (response(request, reply, true), claim)
}

/// Dead-letter reason and description longer than this are refused, as the service does.
pub const MAX_DEAD_LETTER_FIELD: usize = 4096;

/// Why a dead-letter's fields are refused, if they are.
pub fn dead_letter_fields_refused(
    reason: Option<&str>,
    description: Option<&str>,
) -> Option<String> {
    for (name, value) in [
        ("DeadLetterReason", reason),
        ("DeadLetterErrorDescription", description),
    ] {
        // .NET string lengths, as the service counts: UTF-16 code units.
        if let Some(v) = value
            && v.encode_utf16().count() > MAX_DEAD_LETTER_FIELD
        {
            return Some(format!(
                "The {name} of {} characters exceeds the maximum of {MAX_DEAD_LETTER_FIELD}.",
                v.encode_utf16().count()
            ));
        }
    }
    None
}

/// A request's bookkeeping properties, for tests to read back.
fn log_request(shared: &Shared, node: String, request: &AmqpMessage, open_links: Vec<String>) {
    let operation = prop_string(request, "operation").unwrap_or_default();
    let associated_link_name = prop_string(request, "associated-link-name");
    let server_timeout_ms =
        app_prop(request, "com.microsoft:server-timeout").and_then(|v| match v {
            SimpleValue::Uint(n) => Some(i64::from(*n)),
            SimpleValue::Int(n) => Some(i64::from(*n)),
            SimpleValue::Long(n) => Some(*n),
            SimpleValue::Ulong(n) => i64::try_from(*n).ok(),
            _ => None,
        });
    lock(&shared.management_log).push(ManagementRequest {
        node,
        operation,
        associated_link_name,
        server_timeout_ms,
        open_links,
    });
}

/// Answer a `<queue>/$management` request.
pub fn handle_management(
    shared: &Shared,
    queue: &str,
    sub: Subqueue,
    request: &AmqpMessage,
    open_links: Vec<String>,
) -> AmqpMessage {
    let op = prop_string(request, "operation").unwrap_or_default();
    let node = match sub {
        Subqueue::Main => format!("{queue}/$management"),
        Subqueue::DeadLetter => format!("{queue}/$DeadLetterQueue/$management"),
    };
    log_request(shared, node, request, open_links);
    let map = body_map(request);
    let now = now_ms();
    let injected = lock(&shared.faults).fail_management.pop_front();
    let reply = if let Some(status) = injected {
        Reply::err(
            status,
            "com.microsoft:server-busy",
            "The server is busy. Please retry the operation later (injected).",
        )
    } else {
        let mut inner = lock(&shared.inner);
        match shared.queue_mut(&mut inner, queue) {
            None => Reply::err(
                404,
                "amqp:not-found",
                format!("The messaging entity '{queue}' could not be found."),
            ),
            Some(q) => operation(q, sub, &op, &map, now),
        }
    };
    shared.notify();
    response(request, reply, false)
}

fn operation(
    q: &mut crate::store::QueueState,
    sub: Subqueue,
    op: &str,
    map: &OrderedMap<Value, Value>,
    now: i64,
) -> Reply {
    q.expire_locks(now);
    {
        match op {
            "com.microsoft:renew-lock" => {
                let mut expirations = Vec::new();
                let mut lost = false;
                for v in list(get(map, "lock-tokens")) {
                    let Value::Uuid(u) = v else { continue };
                    match q.renew_lock(Uuid::from_bytes(u.into_inner()), now) {
                        Ok(until) => {
                            expirations.push(Value::Timestamp(Timestamp::from_milliseconds(until)))
                        }
                        Err(_) => lost = true,
                    }
                }
                if lost {
                    Reply::err(
                        410,
                        LOCK_LOST,
                        "The lock supplied is invalid. Either the lock expired, or the message has already been removed from the queue.",
                    )
                } else {
                    let mut body = OrderedMap::new();
                    body.insert(
                        Value::String("expirations".into()),
                        Value::Array(Array(expirations)),
                    );
                    Reply::ok(200, Value::Map(body))
                }
            }
            "com.microsoft:peek-message" => {
                let from = get(map, "from-sequence-number")
                    .and_then(as_i64)
                    .unwrap_or(0);
                let count = get(map, "message-count")
                    .and_then(as_i64)
                    .unwrap_or(1)
                    .max(0) as usize;
                let found = q.peek(sub, from, count);
                if found.is_empty() {
                    Reply::ok(204, Value::Null)
                } else {
                    let messages = found
                        .iter()
                        .map(|m| {
                            let mut entry = OrderedMap::new();
                            entry.insert(
                                Value::String("message".into()),
                                Value::Binary(ByteBuf::from(encode_message(m))),
                            );
                            Value::Map(entry)
                        })
                        .collect();
                    let mut body = OrderedMap::new();
                    body.insert(Value::String("messages".into()), Value::List(messages));
                    Reply::ok(200, Value::Map(body))
                }
            }
            "com.microsoft:schedule-message" => {
                let mut sequences = Vec::new();
                for entry in list(get(map, "messages")) {
                    let Value::Map(entry) = entry else { continue };
                    let Some(Value::Binary(bytes)) = get(&entry, "message") else {
                        continue;
                    };
                    match decode_message(bytes) {
                        Ok(m) => {
                            if let Some(seq) = q.enqueue(m, now) {
                                sequences.push(Value::Long(seq));
                            }
                        }
                        Err(_) => continue,
                    }
                }
                let mut body = OrderedMap::new();
                body.insert(
                    Value::String("sequence-numbers".into()),
                    Value::Array(Array(sequences)),
                );
                Reply::ok(200, Value::Map(body))
            }
            "com.microsoft:cancel-scheduled-message" => {
                for v in list(get(map, "sequence-numbers")) {
                    if let Some(seq) = as_i64(&v) {
                        q.cancel_scheduled(seq, now);
                    }
                }
                Reply::ok(200, Value::Null)
            }
            "com.microsoft:update-disposition" => {
                let status = get(map, "disposition-status")
                    .and_then(as_string)
                    .unwrap_or_default();
                let reason = get(map, "deadletter-reason").and_then(as_string);
                let description = get(map, "deadletter-description").and_then(as_string);
                let how = match status.as_str() {
                    "completed" => Some(Settlement::Complete),
                    "abandoned" => Some(Settlement::Abandon),
                    "suspended" => Some(Settlement::DeadLetter {
                        reason: reason.clone(),
                        description: description.clone(),
                    }),
                    _ => None,
                };
                let too_long = if status == "suspended" {
                    dead_letter_fields_refused(reason.as_deref(), description.as_deref())
                } else {
                    None
                };
                if let Some(why) = too_long {
                    return Reply::err(400, ARGUMENT_OUT_OF_RANGE, why);
                }
                match how {
                    None => Reply::err(
                        400,
                        "amqp:not-implemented",
                        format!("disposition {status} is not supported by the test broker"),
                    ),
                    Some(how) => {
                        let mut lost = false;
                        for v in list(get(map, "lock-tokens")) {
                            let Value::Uuid(u) = v else { continue };
                            let token = Uuid::from_bytes(u.into_inner());
                            let settled = q
                                .find_lock(token)
                                .map(|(s, seq)| q.settle(s, seq, token, how.clone(), now));
                            lost |= !matches!(settled, Some(Ok(())));
                        }
                        if lost {
                            Reply::err(
                                410,
                                LOCK_LOST,
                                "The lock supplied is invalid. Either the lock expired, or the message has already been removed from the queue.",
                            )
                        } else {
                            Reply::ok(200, Value::Null)
                        }
                    }
                }
            }
            other => Reply::err(
                400,
                "amqp:not-implemented",
                format!("operation {other} is not supported by the test broker"),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fe2o3_amqp_types::messaging::Header;

    #[test]
    fn dead_letter_fields_are_counted_in_utf16_code_units() {
        // 3,000 characters, 6,000 UTF-16 code units: over the service's 4,096.
        let emoji = "😀".repeat(3000);
        assert!(dead_letter_fields_refused(None, Some(&emoji)).is_some());
        assert!(dead_letter_fields_refused(Some(&"😀".repeat(2048)), None).is_none());
        assert!(dead_letter_fields_refused(Some(&"é".repeat(4096)), None).is_none());
    }

    #[test]
    fn full_header_round_trips() {
        let mut m = response(
            &Message::builder()
                .body(Body::Value(AmqpValue(Value::Null)))
                .build(),
            Reply::ok(200, Value::Null),
            false,
        );
        m.header = Some(Header {
            durable: true,
            delivery_count: 0,
            ..Default::default()
        });
        let back = decode_message(&encode_message(&m)).unwrap();
        assert_eq!(back.header, m.header);
        m.header = Some(Header {
            delivery_count: 3,
            ttl: Some(1000),
            ..Default::default()
        });
        let back = decode_message(&encode_message(&m)).unwrap();
        assert_eq!(back.header, m.header);
        assert_eq!(back.properties, m.properties);
    }
}
