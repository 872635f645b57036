//! Azure Service Bus behind the queue port, over AMQP 1.0 with `fe2o3-amqp`.
//!
//! Owns the protocol mapping; each file answers one question:
//! `connection_string` (where and as whom), `auth` (CBS tokens: SAS or Entra
//! ID), `connection` (the connection, its links, reconnecting), `receiver` (a
//! peek-lock link with bounded credit), `message` (port ⇄ AMQP messages),
//! `management` (`$management` requests).
//!
//! Settlement follows Service Bus: complete = `accepted`, abandon =
//! `modified`, dead-letter = `rejected` with `com.microsoft:dead-letter` and
//! the reason in the error info; renew-lock and peek go to `$management`.
//! A lock is owned only by the link that received it, so this adapter keeps
//! the locks it holds: settling or renewing one whose link was re-created,
//! that was already settled, or whose lock has (locally) expired fails with
//! [`QueueError::LockLost`] without touching the broker. `fe2o3-amqp` 0.18
//! does not expose the broker's echoed outcome for a receiver's disposition,
//! so a broker-side rejection inside the last [`EXPIRY_MARGIN`] of a lock is
//! caught by that margin, not by the echo; the message then comes back with
//! its delivery count raised, which the processor's ledger already absorbs.

mod auth;
mod connection;
mod connection_string;
mod management;
mod message;
mod receiver;
mod tls;

pub use connection_string::Transport;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex as StdMutex;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use fe2o3_amqp::Sendable;
use fe2o3_amqp::link::delivery::DeliveryInfo;
use fe2o3_amqp::link::receiver::TerminalDeliveryState;
use fe2o3_amqp::types::definitions::{self, ErrorCondition, Fields};
use fe2o3_amqp::types::messaging::{Accepted, Modified, Outcome, Rejected};
use fe2o3_amqp::types::primitives::{Symbol, Value};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::Mutex;
use uuid::Uuid;

use super::{OutgoingMessage, Queue, QueueError, ReceivedMessage, Subqueue};
use connection::Links;
use management::{PeekMessage, RenewLock};

/// Treat a lock as lost this long before its expiry, so a settlement never
/// races the broker's clock.
pub const EXPIRY_MARGIN: Duration = Duration::from_millis(250);
const DEAD_LETTER_CONDITION: &str = "com.microsoft:dead-letter";
/// Service Bus Standard's message size limit; the sender's link may say otherwise.
const DEFAULT_MAX_MESSAGE_SIZE: u64 = 256 * 1024;
/// Room for a batch's own sections and each entry's data-section header.
const BATCH_OVERHEAD: u64 = 64;
const ENTRY_OVERHEAD: u64 = 8;

/// `RTPD_SERVICEBUS_*` settings: a connection string (SAS or emulator) or a
/// namespace (Entra ID), the queue, the receive prefetch, and how to reach
/// the namespace.
#[derive(Clone)]
pub struct ServiceBusSettings {
    pub connection_string: Option<SecretString>,
    pub namespace: Option<String>,
    pub queue: String,
    pub client_id: Option<String>,
    /// Credit kept granted beyond a receive's own `max` (0: exactly `max`).
    pub prefetch: u32,
    /// AMQP on 5671, or AMQP over WebSockets on 443 (`RTPD_SERVICEBUS_TRANSPORT`).
    pub transport: Transport,
    /// Connect here instead of the namespace host, as the SDKs' custom
    /// endpoint address (`RTPD_SERVICEBUS_CUSTOM_ENDPOINT`): a gateway or proxy.
    pub custom_endpoint: Option<String>,
    /// Extra CA certificates (PEM) to trust (`RTPD_SERVICEBUS_CA_FILE`).
    pub ca_file: Option<PathBuf>,
    /// Lifetime of the SAS tokens signed from a shared key.
    pub sas_token_lifetime: Duration,
}

impl Default for ServiceBusSettings {
    fn default() -> Self {
        Self {
            connection_string: None,
            namespace: None,
            queue: "rtp-transactions".into(),
            client_id: None,
            prefetch: 0,
            transport: Transport::Amqp,
            custom_endpoint: None,
            ca_file: None,
            sas_token_lifetime: Duration::from_secs(3600),
        }
    }
}

struct Held {
    generation: u64,
    subqueue: Subqueue,
    info: DeliveryInfo,
    locked_until: DateTime<Utc>,
}

pub struct ServiceBusQueue {
    links: Links,
    /// Locks this process holds, by lock token.
    held: StdMutex<HashMap<Uuid, Held>>,
    /// One receive in flight per subqueue; settling does not wait for it.
    receiving: [Mutex<()>; 2],
    emulator: bool,
}

impl ServiceBusQueue {
    pub async fn connect(s: &ServiceBusSettings) -> Result<ServiceBusQueue, QueueError> {
        let endpoint = match (&s.connection_string, &s.namespace) {
            (Some(_), Some(_)) => {
                return Err(QueueError::Fatal(
                    "set either RTPD_SERVICEBUS_CONNECTION_STRING or RTPD_SERVICEBUS_NAMESPACE, not both".into(),
                ));
            }
            (None, None) => {
                return Err(QueueError::Fatal(
                    "service bus needs RTPD_SERVICEBUS_CONNECTION_STRING or RTPD_SERVICEBUS_NAMESPACE".into(),
                ));
            }
            (Some(cs), None) => connection_string::parse(cs.expose_secret()).map_err(|e| {
                QueueError::Fatal(format!("RTPD_SERVICEBUS_CONNECTION_STRING: {e}"))
            })?,
            (None, Some(ns)) => connection_string::from_namespace(ns, s.client_id.clone())
                .map_err(|e| QueueError::Fatal(format!("RTPD_SERVICEBUS_NAMESPACE: {e}")))?,
        };
        let queue = s.queue.trim().to_string();
        if queue.is_empty() {
            return Err(QueueError::Fatal("RTPD_SERVICEBUS_QUEUE is empty".into()));
        }
        if let Some(entity) = &endpoint.entity_path
            && !entity.eq_ignore_ascii_case(&queue)
        {
            return Err(QueueError::Fatal(format!(
                "the connection string's EntityPath {entity:?} differs from RTPD_SERVICEBUS_QUEUE {queue:?}"
            )));
        }
        let custom = s
            .custom_endpoint
            .as_deref()
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .map(connection_string::CustomEndpoint::parse)
            .transpose()
            .map_err(|e| QueueError::Fatal(format!("RTPD_SERVICEBUS_CUSTOM_ENDPOINT: {e}")))?;
        let tls = tls::client_config(s.ca_file.as_deref()).map_err(QueueError::Fatal)?;
        let tokens = auth::TokenSource::new(&endpoint.credential, s.sas_token_lifetime)
            .map_err(QueueError::Fatal)?;
        let emulator = endpoint.emulator;
        let target = endpoint.target(s.transport, custom.as_ref());
        let links = Links::new(endpoint, queue, tokens, s.prefetch, target, tls);
        let queue = ServiceBusQueue {
            links,
            held: StdMutex::new(HashMap::new()),
            receiving: [Mutex::new(()), Mutex::new(())],
            emulator,
        };
        // Fail at start-up on a wrong host, key or queue rather than at the first message.
        queue.ping().await?;
        Ok(queue)
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Held>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn receive_from(
        &self,
        sub: Subqueue,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<ReceivedMessage>, QueueError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let _one_at_a_time = self.receiving[matches!(sub, Subqueue::DeadLetter) as usize]
            .lock()
            .await;
        let live = self.links.live().await?;
        let link = self.links.receiver(&live, sub).await?;
        // A failed receive ends that link (and the locks it held); the next call attaches anew.
        let deliveries = link
            .receive(max, wait)
            .await
            .map_err(QueueError::Unavailable)?;
        let mut out = Vec::with_capacity(deliveries.len());
        let mut held = self.held();
        for delivery in deliveries {
            let tag = delivery.delivery_tag().to_vec();
            let (info, amqp) = delivery.into_parts();
            // Without a token the message can still be settled on this link by the
            // delivery itself; a random token keeps it addressable here.
            let token = message::lock_token(Some(&tag), &amqp).unwrap_or_else(Uuid::new_v4);
            let received = message::from_amqp(&amqp, token, sub);
            held.insert(
                token,
                Held {
                    generation: link.generation,
                    subqueue: sub,
                    info,
                    locked_until: received.locked_until,
                },
            );
            out.push(received);
        }
        Ok(out)
    }

    async fn settle(
        &self,
        m: &ReceivedMessage,
        state: TerminalDeliveryState,
    ) -> Result<(), QueueError> {
        let Some(held) = self.held().remove(&m.lock_token) else {
            return Err(QueueError::LockLost);
        };
        if held.locked_until <= Utc::now() + EXPIRY_MARGIN {
            return Err(QueueError::LockLost);
        }
        let Some(link) = self
            .links
            .current_receiver(held.subqueue, held.generation)
            .await
        else {
            return Err(QueueError::LockLost);
        };
        link.settle(held.info, state).await.map_err(|e| {
            tracing::warn!(lock_token = %m.lock_token, error = %e, "settlement failed; lock considered lost");
            QueueError::LockLost
        })
    }
}

fn dead_letter_state(reason: &str, description: &str) -> TerminalDeliveryState {
    let mut info = Fields::default();
    info.insert(
        Symbol::from("DeadLetterReason"),
        Value::String(reason.to_string()),
    );
    info.insert(
        Symbol::from("DeadLetterErrorDescription"),
        Value::String(description.to_string()),
    );
    TerminalDeliveryState::Rejected(Rejected {
        error: Some(definitions::Error {
            condition: ErrorCondition::Custom(Symbol::from(DEAD_LETTER_CONDITION)),
            description: Some(description.to_string()),
            info: Some(Box::new(info)),
        }),
    })
}

/// Pack encoded messages into batches under the link's size limit.
fn pack(encoded: Vec<Vec<u8>>, limit: u64) -> Vec<Vec<Vec<u8>>> {
    let mut batches: Vec<Vec<Vec<u8>>> = Vec::new();
    let mut size = BATCH_OVERHEAD;
    for m in encoded {
        let len = m.len() as u64 + ENTRY_OVERHEAD;
        match batches.last_mut() {
            Some(batch) if size + len <= limit => {
                batch.push(m);
                size += len;
            }
            _ => {
                size = BATCH_OVERHEAD + len;
                batches.push(vec![m]);
            }
        }
    }
    batches
}

#[async_trait]
impl Queue for ServiceBusQueue {
    async fn send(&self, messages: Vec<OutgoingMessage>) -> Result<(), QueueError> {
        if messages.is_empty() {
            return Ok(());
        }
        let live = self.links.live().await?;
        let mut slot = live.sender.lock().await;
        self.links.ensure_sender(&live, &mut slot).await?;
        let Some(sender) = slot.as_mut() else {
            unreachable!("ensure_sender attached it")
        };
        let limit = sender
            .max_message_size()
            .filter(|n| *n > 0)
            .unwrap_or(DEFAULT_MAX_MESSAGE_SIZE);
        let sendables: Vec<Sendable<_>> = if messages.len() == 1 {
            vec![
                Sendable::builder()
                    .message(message::to_amqp(&messages[0]))
                    .build(),
            ]
        } else {
            let encoded = messages
                .iter()
                .map(|m| message::encode(&message::to_amqp(m)))
                .collect::<Result<Vec<_>, _>>()?;
            pack(encoded, limit)
                .into_iter()
                .map(|batch| {
                    Sendable::builder()
                        .message(message::batch_envelope(batch))
                        .message_format(message::BATCH_FORMAT)
                        .build()
                })
                .collect()
        };
        for sendable in sendables {
            match sender.send(sendable).await {
                Ok(Outcome::Accepted(_)) => {}
                Ok(Outcome::Rejected(r)) => {
                    let detail = r.error.map_or_else(
                        || "no reason given".to_string(),
                        |e| format!("{:?}: {}", e.condition, e.description.unwrap_or_default()),
                    );
                    return Err(QueueError::Fatal(format!(
                        "service bus rejected the message: {detail}"
                    )));
                }
                Ok(other) => {
                    return Err(QueueError::Unavailable(format!(
                        "service bus did not accept the message: {other:?}"
                    )));
                }
                Err(e) => {
                    *slot = None;
                    return Err(QueueError::Unavailable(format!(
                        "sending to {}: {e}",
                        self.links.queue
                    )));
                }
            }
        }
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
        if max == 0 {
            return Ok(Vec::new());
        }
        let count = i32::try_from(max).unwrap_or(i32::MAX);
        let found = self
            .links
            .management(
                Subqueue::DeadLetter,
                PeekMessage {
                    from_sequence_number: from,
                    count,
                },
            )
            .await?;
        Ok(found
            .0
            .iter()
            .map(|m| message::from_amqp(m, Uuid::nil(), Subqueue::DeadLetter))
            .collect())
    }

    async fn complete(&self, m: &ReceivedMessage) -> Result<(), QueueError> {
        self.settle(m, TerminalDeliveryState::Accepted(Accepted {}))
            .await
    }

    async fn abandon(&self, m: &ReceivedMessage) -> Result<(), QueueError> {
        let modified = Modified {
            delivery_failed: None,
            undeliverable_here: None,
            message_annotations: None,
        };
        self.settle(m, TerminalDeliveryState::Modified(modified))
            .await
    }

    async fn dead_letter(
        &self,
        m: &ReceivedMessage,
        reason: &str,
        description: &str,
    ) -> Result<(), QueueError> {
        self.settle(m, dead_letter_state(reason, description)).await
    }

    async fn renew_lock(&self, m: &ReceivedMessage) -> Result<DateTime<Utc>, QueueError> {
        let (subqueue, generation) = {
            let held = self.held();
            let h = held.get(&m.lock_token).ok_or(QueueError::LockLost)?;
            if h.locked_until <= Utc::now() {
                return Err(QueueError::LockLost);
            }
            (h.subqueue, h.generation)
        };
        if self
            .links
            .current_receiver(subqueue, generation)
            .await
            .is_none()
        {
            self.held().remove(&m.lock_token);
            return Err(QueueError::LockLost);
        }
        let renewed = match self
            .links
            .management(subqueue, RenewLock(vec![m.lock_token]))
            .await
        {
            Ok(r) => r,
            Err(QueueError::LockLost) => {
                self.held().remove(&m.lock_token);
                return Err(QueueError::LockLost);
            }
            Err(e) => return Err(e),
        };
        let until = *renewed
            .0
            .first()
            .ok_or_else(|| QueueError::Fatal("renew-lock answered without an expiry".into()))?;
        match self.held().get_mut(&m.lock_token) {
            Some(h) => h.locked_until = until,
            // Settled while the renewal was in flight.
            None => return Err(QueueError::LockLost),
        }
        Ok(until)
    }

    async fn ping(&self) -> Result<(), QueueError> {
        let live = self.links.live().await?;
        let mut slot = live.sender.lock().await;
        self.links.ensure_sender(&live, &mut slot).await
    }

    fn describe(&self) -> String {
        format!(
            "azure service bus queue {} at {} via {} ({}{})",
            self.links.queue,
            self.links.endpoint.host,
            self.links.target.url(),
            self.links.describe_auth(),
            if self.emulator {
                ", emulator, no TLS"
            } else {
                ""
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_respects_limit() {
        let msgs = vec![vec![0u8; 100]; 10];
        let batches = pack(msgs, BATCH_OVERHEAD + 3 * (100 + ENTRY_OVERHEAD));
        assert_eq!(
            batches.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![3, 3, 3, 1]
        );
        let one = pack(vec![vec![0u8; 1000]], 10);
        assert_eq!(
            one.len(),
            1,
            "an oversized message still goes, alone, for the broker to judge"
        );
    }
}
