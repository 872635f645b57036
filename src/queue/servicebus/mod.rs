//! Azure Service Bus behind the queue port, over AMQP 1.0 with `fe2o3-amqp`.
//!
//! Owns the protocol mapping; each file answers one question:
//! `connection_string` (where and as whom), `auth` (CBS tokens: SAS or Entra
//! ID), `tls` (whom to trust), `connection` (the connection, its links,
//! reconnecting, token refresh), `receiver` (a peek-lock link with bounded
//! credit), `message` (port ⇄ AMQP messages), `management` (`$management`
//! requests), `errors` (what the service's error conditions mean).
//!
//! Settlement follows Service Bus: complete = `accepted`, abandon =
//! `modified` on the link that received the message while it is attached and
//! the lock is (by our clock) comfortably valid. Otherwise — the service
//! detached the link, or our clock says the lock is about to end — the
//! message is settled by lock token through `$management`
//! `com.microsoft:update-disposition`, whose answer (410 when the lock is
//! gone) is the service's, never our clock's. Dead-letters always go that
//! way: `fe2o3-amqp` 0.18 does not show a receiver the outcome the service
//! echoes, and a dead-letter the service refuses must not pass silently. The
//! reason and description are cut to the service's 4,096 characters first.
//!
//! Forced detaches (the service's 10-minute idle timer) are re-attached and
//! the operation retried once at once; `com.microsoft:server-busy` pauses
//! sends for 10 s, as the SDKs do; see `errors` for the rest.

mod auth;
mod connection;
mod connection_string;
mod errors;
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
use fe2o3_amqp::link::SendError;
use fe2o3_amqp::link::delivery::DeliveryInfo;
use fe2o3_amqp::link::receiver::TerminalDeliveryState;
use fe2o3_amqp::types::messaging::{Accepted, Modified, Outcome};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::Mutex;
use uuid::Uuid;

use super::{OutgoingMessage, Queue, QueueError, ReceivedMessage, Subqueue};
use connection::{Failure, Links};
use errors::Kind;
use management::{Disposition, PeekMessage, RenewLock, UpdateDisposition};

/// Settle on the receiving link only while our clock gives the lock at least
/// this long; closer to its end, `$management` asks the service instead.
pub const EXPIRY_MARGIN: Duration = Duration::from_millis(250);
/// The service keeps at most this many characters of a dead-letter reason or description.
pub const MAX_DEAD_LETTER_FIELD: usize = 4096;
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
    /// The delivery on its link; gone once a link settlement was tried.
    info: Option<DeliveryInfo>,
    locked_until: DateTime<Utc>,
}

/// How a held message is settled.
enum Settle {
    Complete,
    Abandon,
    DeadLetter { reason: String, description: String },
}

pub struct ServiceBusQueue {
    links: Links,
    /// Locks this process holds, by lock token.
    held: StdMutex<HashMap<Uuid, Held>>,
    /// One receive in flight per subqueue; settling does not wait for it.
    receiving: [Mutex<()>; 2],
    /// After `com.microsoft:server-busy`, sends wait until then.
    busy_until: StdMutex<Option<std::time::Instant>>,
    emulator: bool,
}

/// At most `max` characters of `s`, cut on a character boundary.
fn truncate_chars(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((at, _)) => s[..at].to_string(),
        None => s.to_string(),
    }
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
            busy_until: StdMutex::new(None),
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
        let deadline = tokio::time::Instant::now() + wait;
        let mut retried = false;
        let (link, deliveries) = loop {
            let live = self.links.live().await?;
            let link = self.links.receiver(&live, sub).await?;
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            // A failed receive ends that link; the service detaches idle ones, so
            // one new link is tried at once before giving up.
            match link.receive(max, left).await {
                Ok(d) => break (link, d),
                Err(e) if !retried => {
                    tracing::info!(error = %e, "receiving link failed; re-attaching");
                    retried = true;
                }
                Err(e) => return Err(QueueError::Unavailable(e)),
            }
        };
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
                    info: Some(info),
                    locked_until: received.locked_until,
                },
            );
            out.push(received);
        }
        Ok(out)
    }

    async fn settle(&self, m: &ReceivedMessage, how: Settle) -> Result<(), QueueError> {
        let Some(mut held) = self.held().remove(&m.lock_token) else {
            return Err(QueueError::LockLost);
        };
        let link_state = match how {
            Settle::Complete => Some(TerminalDeliveryState::Accepted(Accepted {})),
            Settle::Abandon => Some(TerminalDeliveryState::Modified(Modified {
                delivery_failed: None,
                undeliverable_here: None,
                message_annotations: None,
            })),
            Settle::DeadLetter { .. } => None,
        };
        let comfortably_locked = held.locked_until > Utc::now() + EXPIRY_MARGIN;
        if let (Some(state), true, Some(info)) = (link_state, comfortably_locked, held.info.take())
            && let Some(link) = self
                .links
                .current_receiver(held.subqueue, held.generation)
                .await
        {
            match link.settle(info, state).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::info!(lock_token = %m.lock_token, error = %e, "link settlement failed; settling by lock token");
                }
            }
        }
        let (status, dead_letter) = match how {
            Settle::Complete => (Disposition::Completed, None),
            Settle::Abandon => (Disposition::Abandoned, None),
            Settle::DeadLetter {
                reason,
                description,
            } => (Disposition::Suspended, Some((reason, description))),
        };
        let request = UpdateDisposition {
            tokens: vec![m.lock_token],
            status,
            dead_letter,
            link: self
                .links
                .receiver_name(held.subqueue, held.generation)
                .await,
        };
        match self.links.management(held.subqueue, request).await {
            Ok(_) => Ok(()),
            Err(QueueError::LockLost) => Err(QueueError::LockLost),
            Err(e) => {
                tracing::warn!(lock_token = %m.lock_token, error = %e, "the service did not take the settlement");
                if e.is_retryable() {
                    // The lock may still hold: let the caller try again.
                    self.held().insert(m.lock_token, held);
                }
                Err(e)
            }
        }
    }

    /// One attempt at sending; a link failure is worth one more on a new link.
    async fn send_once(&self, messages: &[OutgoingMessage]) -> Result<(), Failure> {
        let what = format!("sending to {}", self.links.queue);
        let live = self.links.live().await.map_err(Failure::Answer)?;
        let mut slot = live.sender.lock().await;
        self.links
            .ensure_sender(&live, &mut slot)
            .await
            .map_err(Failure::Answer)?;
        let Some(sender) = slot.as_mut() else {
            unreachable!("ensure_sender attached it")
        };
        let limit = sender
            .max_message_size()
            .filter(|n| *n > 0)
            .unwrap_or(DEFAULT_MAX_MESSAGE_SIZE);
        let amqp: Vec<_> = messages.iter().map(message::to_amqp).collect();
        let encoded = amqp
            .iter()
            .map(message::encode)
            .collect::<Result<Vec<_>, _>>()
            .map_err(Failure::Answer)?;
        // Over the limit never fits: say so instead of letting it be retried forever.
        if let Some((m, e)) = messages
            .iter()
            .zip(&encoded)
            .find(|(_, e)| e.len() as u64 > limit)
        {
            return Err(Failure::Answer(errors::from_condition(
                Kind::TooLarge,
                &what,
                &format!(
                    "message {} is {} bytes encoded; the queue takes at most {limit}",
                    m.message_id,
                    e.len()
                ),
            )));
        }
        let sendables: Vec<Sendable<_>> = if messages.len() == 1 {
            amqp.into_iter()
                .map(|m| Sendable::builder().message(m).build())
                .collect()
        } else {
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
        let mut link_failed = None;
        for sendable in sendables {
            match sender.send(sendable).await {
                Ok(Outcome::Accepted(_)) => {}
                Ok(Outcome::Rejected(r)) => {
                    let Some(e) = r.error else {
                        return Err(Failure::Answer(QueueError::Fatal(format!(
                            "{what}: rejected without a reason"
                        ))));
                    };
                    if errors::kind(&e.condition) == Kind::ServerBusy {
                        *self.busy_until.lock().unwrap_or_else(|p| p.into_inner()) =
                            Some(std::time::Instant::now() + errors::SERVER_BUSY_BACKOFF);
                    }
                    return Err(Failure::Answer(errors::from_error(&e, &what)));
                }
                Ok(other) => {
                    return Err(Failure::Answer(QueueError::Unavailable(format!(
                        "{what}: the service did not accept the message: {other:?}"
                    ))));
                }
                Err(SendError::MessageSizeExceeded(e)) => {
                    return Err(Failure::Answer(errors::from_condition(
                        Kind::TooLarge,
                        &what,
                        &e.to_string(),
                    )));
                }
                Err(e) => {
                    link_failed = Some(e);
                    break;
                }
            }
        }
        let Some(e) = link_failed else {
            return Ok(());
        };
        slot.take();
        let detail = format!("{e:?}");
        Err(match errors::kind_in_text(&detail) {
            kind @ (Kind::Unauthorized | Kind::NotFound) => {
                Failure::Answer(errors::from_condition(kind, &what, &detail))
            }
            _ => Failure::Link(format!("{what}: {e}")),
        })
    }
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
        let busy = *self.busy_until.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(until) = busy
            && let Some(left) = until.checked_duration_since(std::time::Instant::now())
        {
            return Err(QueueError::Unavailable(format!(
                "sending to {}: service bus said it is busy (com.microsoft:server-busy); sends pause {:.1}s more",
                self.links.queue,
                left.as_secs_f64()
            )));
        }
        match self.send_once(&messages).await {
            Ok(()) => Ok(()),
            Err(Failure::Answer(e)) => Err(e),
            Err(Failure::Link(e)) => {
                // The service detaches idle senders; the same messages again are
                // safe (duplicate detection drops a copy that did arrive).
                tracing::info!(error = %e, "sender link failed; re-attaching and sending again at once");
                match self.send_once(&messages).await {
                    Ok(()) => Ok(()),
                    Err(Failure::Answer(e)) => Err(e),
                    Err(Failure::Link(e)) => Err(QueueError::Unavailable(e)),
                }
            }
        }
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
        self.settle(m, Settle::Complete).await
    }

    async fn abandon(&self, m: &ReceivedMessage) -> Result<(), QueueError> {
        self.settle(m, Settle::Abandon).await
    }

    async fn dead_letter(
        &self,
        m: &ReceivedMessage,
        reason: &str,
        description: &str,
    ) -> Result<(), QueueError> {
        let how = Settle::DeadLetter {
            reason: truncate_chars(reason, MAX_DEAD_LETTER_FIELD),
            description: truncate_chars(description, MAX_DEAD_LETTER_FIELD),
        };
        self.settle(m, how).await
    }

    /// Always asks the service: only its clock decides whether the lock holds.
    async fn renew_lock(&self, m: &ReceivedMessage) -> Result<DateTime<Utc>, QueueError> {
        let (subqueue, generation) = {
            let held = self.held();
            let h = held.get(&m.lock_token).ok_or(QueueError::LockLost)?;
            (h.subqueue, h.generation)
        };
        let request = RenewLock {
            tokens: vec![m.lock_token],
            link: self.links.receiver_name(subqueue, generation).await,
        };
        let renewed = match self.links.management(subqueue, request).await {
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
