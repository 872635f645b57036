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
//! Sending has a connection of its own (receivers and `$management` share
//! the other), `TCP_NODELAY` on both: in one process that ingests and
//! processes, sends never queue behind receiver traffic. Single-message
//! sends are group-committed: while sends are in flight, new ones wait and
//! go together as one batch message (see [`group_commit`]).
//!
//! Forced detaches (the service's 10-minute idle timer) are re-attached and
//! the operation retried once at once. A send has its own time limit
//! (`RTPD_SERVICEBUS_SEND_TIMEOUT_SECS`): after `com.microsoft:server-busy`
//! sends wait out a 10 s pause inside that limit and try again, as the SDKs
//! do, and fail (retryable) only when the pause would outlast it; see
//! `errors` for the rest.
//!
//! Locks held here are forgotten when the service hands the same message
//! out again (the old lock is gone) and [`HELD_GRACE`] after they ended, so
//! a message left to its lock expiry (the processor's `Busy`) leaves nothing behind.

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
use std::sync::Arc;
use tokio::sync::{Mutex, Semaphore, mpsc, oneshot};
use uuid::Uuid;

use super::{OutgoingMessage, Queue, QueueError, ReceivedMessage, Subqueue};
use connection::{Failure, Links};
use errors::Kind;
use management::{Disposition, PeekMessage, RenewLock, UpdateDisposition};

/// Settle on the receiving link only while our clock gives the lock at least
/// this long; closer to its end, `$management` asks the service instead.
pub const EXPIRY_MARGIN: Duration = Duration::from_millis(250);
/// The service keeps at most this many UTF-16 code units (.NET characters)
/// of a dead-letter reason or description.
pub const MAX_DEAD_LETTER_FIELD: usize = 4096;
/// A held lock is forgotten this long after its end (by our clock; the
/// margin covers clocks that disagree).
pub const HELD_GRACE: Duration = Duration::from_secs(600);
/// At most this many locks are held here; past it the ones that end first
/// are forgotten (their settlement then reports the lock lost), so a
/// runaway receiver cannot grow the map without bound inside the grace.
pub const MAX_HELD: usize = 100_000;
/// Service Bus Standard's message size limit; the sender's link may say otherwise.
const DEFAULT_MAX_MESSAGE_SIZE: u64 = 256 * 1024;
/// Room for a batch's own sections and each entry's data-section header.
const BATCH_OVERHEAD: u64 = 64;
const ENTRY_OVERHEAD: u64 = 8;
/// Group-commit sends in flight at once on the sender link.
const GROUP_IN_FLIGHT: usize = 4;
/// Messages in one group at most (the link's size limit may split it further).
const GROUP_MAX_MESSAGES: usize = 1000;

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
    /// How long one send may take, re-attaching and busy pauses included
    /// (`RTPD_SERVICEBUS_SEND_TIMEOUT_SECS`).
    pub send_timeout: Duration,
    /// How long sends pause after `com.microsoft:server-busy` (the SDKs: 10 s).
    pub server_busy_pause: Duration,
    /// How long a link's attach may wait for the service's answer before
    /// the connection is given up (30 s; shorter in tests).
    pub attach_timeout: Duration,
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
            send_timeout: Duration::from_secs(60),
            server_busy_pause: errors::SERVER_BUSY_BACKOFF,
            attach_timeout: Duration::from_secs(30),
        }
    }
}

struct Held {
    generation: u64,
    sequence_number: i64,
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
    /// Receiving links and `$management`, on a connection of their own.
    links: Links,
    /// The sender, on its own connection: a send never queues behind a
    /// receive, a settlement or a drain (nor their frames on the socket),
    /// and a receiving link the service detaches does not fail sends.
    sending: Arc<Sending>,
    /// Single-message sends, for the group-commit task.
    group: mpsc::UnboundedSender<Grouped>,
    /// Locks this process holds, by lock token.
    held: StdMutex<HashMap<Uuid, Held>>,
    /// One receive in flight per subqueue; settling does not wait for it.
    receiving: [Mutex<()>; 2],
    emulator: bool,
}

/// At most `max` UTF-16 code units of `s`, cut between characters.
fn truncate_chars(s: &str, max: usize) -> String {
    message::truncate_utf16(s, max).to_string()
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
        let sending = Arc::new(Sending {
            links: Links::new(
                endpoint.clone(),
                queue.clone(),
                tokens.clone(),
                0,
                target.clone(),
                tls.clone(),
                s.attach_timeout,
            ),
            busy_until: StdMutex::new(None),
            send_timeout: s.send_timeout,
            server_busy_pause: s.server_busy_pause,
        });
        let (group, waiting) = mpsc::unbounded_channel();
        tokio::spawn(group_commit(sending.clone(), waiting));
        let links = Links::new(
            endpoint,
            queue,
            tokens,
            s.prefetch,
            target,
            tls,
            s.attach_timeout,
        );
        let queue = ServiceBusQueue {
            links,
            sending,
            group,
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

    /// How many message locks this process holds (settled or expired ones
    /// are forgotten); for tests and diagnostics.
    pub fn held_locks(&self) -> usize {
        self.held().len()
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
        let what = format!("receiving from {}", self.links.entity(sub));
        let mut retried = false;
        let mut reauthorized = false;
        let (link, deliveries) = loop {
            let live = self.links.live().await?;
            let link = match self.links.receiver(&live, sub).await {
                Ok(link) => link,
                Err(e) if errors::is_unauthorized(&e) && !reauthorized => {
                    tracing::info!(error = %e, "the service refused our token; putting a fresh one and attaching again");
                    reauthorized = true;
                    Self::reput_tokens(&self.links).await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            // A failed receive ends that link; the service detaches idle ones, so
            // one new link is tried at once before giving up.
            let e = match link.receive(max, left).await {
                Ok(d) => break (link, d),
                Err(e) => e,
            };
            match errors::kind_in_text(&e) {
                Kind::Unauthorized if !reauthorized => {
                    tracing::info!(error = %e, "receiving link lost its authorization; putting a fresh token and re-attaching");
                    reauthorized = true;
                    Self::reput_tokens(&self.links).await;
                }
                kind @ (Kind::Unauthorized | Kind::NotFound | Kind::Refused) => {
                    return Err(errors::from_condition(kind, &what, &e));
                }
                _ if !retried => {
                    tracing::info!(error = %e, "receiving link failed; re-attaching");
                    retried = true;
                }
                kind => {
                    let e = errors::from_condition(kind, &what, &e);
                    // Whatever the service said, a receive is worth trying again later.
                    return Err(match e {
                        QueueError::Fatal(m) => QueueError::Unavailable(m),
                        other => other,
                    });
                }
            }
        };
        let mut out = Vec::with_capacity(deliveries.len());
        let mut held = self.held();
        forget_ended(&mut held, crate::clock::now());
        for delivery in deliveries {
            let tag = delivery.delivery_tag().to_vec();
            let (info, amqp) = delivery.into_parts();
            // Without a token the message can still be settled on this link by the
            // delivery itself; a random token keeps it addressable here.
            let token = message::lock_token(Some(&tag), &amqp).unwrap_or_else(Uuid::new_v4);
            let received = message::from_amqp(&amqp, token, sub);
            // The service hands a message out again only once its old lock is
            // gone (a message left to its lock expiry): forget that lock.
            held.retain(|_, h| h.subqueue != sub || h.sequence_number != received.sequence_number);
            held.insert(
                token,
                Held {
                    generation: link.generation,
                    sequence_number: received.sequence_number,
                    subqueue: sub,
                    info: Some(info),
                    locked_until: received.locked_until,
                },
            );
            out.push(received);
        }
        bound_held(&mut held, MAX_HELD);
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
        let comfortably_locked = held.locked_until > crate::clock::now() + EXPIRY_MARGIN;
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

    /// Put fresh tokens after the service refused one. A failure here has
    /// marked the connection broken, so the retry that follows reconnects
    /// (and authenticates afresh) instead.
    async fn reput_tokens(links: &Links) {
        if let Err(e) = links.reput_tokens().await {
            tracing::info!(error = %e, "putting fresh tokens failed; the retry reconnects");
        }
    }
}

/// The sending side: its own connection, the server-busy pause, the time
/// limit. Shared by the queue and its group-commit task.
struct Sending {
    links: Links,
    /// After `com.microsoft:server-busy`, sends wait until then (`clock` time).
    busy_until: StdMutex<Option<DateTime<Utc>>>,
    send_timeout: Duration,
    server_busy_pause: Duration,
}

impl Sending {
    /// Send within the time limit (`RTPD_SERVICEBUS_SEND_TIMEOUT_SECS`).
    async fn send(&self, messages: &[OutgoingMessage]) -> Result<(), QueueError> {
        let deadline = crate::clock::now() + self.send_timeout;
        // The sending link this send last wrote on, if it got that far.
        let used = StdMutex::new(None);
        match tokio::time::timeout(
            self.send_timeout,
            self.send_within(messages, deadline, &used),
        )
        .await
        {
            Ok(result) => result,
            Err(_) => {
                // The send was cut off mid-way: its link may hold a transfer in
                // doubt, so the next send attaches a new one (duplicate
                // detection drops a copy that did arrive) — unless another
                // send has replaced that link already.
                let used = used.lock().unwrap_or_else(|p| p.into_inner()).take();
                if let Some(link) = used {
                    self.links.drop_sender(&link).await;
                }
                Err(QueueError::Unavailable(format!(
                    "sending to {}: no answer within {:?} (RTPD_SERVICEBUS_SEND_TIMEOUT_SECS)",
                    self.links.queue, self.send_timeout
                )))
            }
        }
    }

    /// Send, waiting out server-busy pauses that end before `deadline`;
    /// a link failure is worth one more try on a new link at once.
    async fn send_within(
        &self,
        messages: &[OutgoingMessage],
        deadline: DateTime<Utc>,
        used: &StdMutex<Option<String>>,
    ) -> Result<(), QueueError> {
        let mut link_retried = false;
        let mut reauthorized = false;
        loop {
            let busy = *self.busy_until.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(until) = busy {
                let now = crate::clock::now();
                if until > now {
                    if until > deadline {
                        return Err(QueueError::Unavailable(format!(
                            "sending to {}: service bus said it is busy (com.microsoft:server-busy); its pause ends in {:.1}s, after this send's time limit",
                            self.links.queue,
                            (until - now).as_seconds_f64()
                        )));
                    }
                    tokio::time::sleep((until - now).to_std().unwrap_or_default()).await;
                    continue;
                }
            }
            match self.send_once(messages, used).await {
                Ok(()) => return Ok(()),
                Err(Failure::Answer(e)) if errors::is_unauthorized(&e) && !reauthorized => {
                    tracing::info!(error = %e, "the service refused our token; putting a fresh one and sending again");
                    reauthorized = true;
                    ServiceBusQueue::reput_tokens(&self.links).await;
                }
                Err(Failure::Answer(e)) => return Err(e),
                // The pause is set: wait it out above, or give up if it is too long.
                Err(Failure::Busy(e)) => {
                    tracing::info!(error = %e, "service bus is busy; pausing sends");
                }
                Err(Failure::Link(e)) if !link_retried => {
                    // The service detaches idle senders; the same messages again are
                    // safe (duplicate detection drops a copy that did arrive).
                    tracing::info!(error = %e, "sender link failed; re-attaching and sending again at once");
                    link_retried = true;
                }
                Err(Failure::Link(e)) => return Err(QueueError::Unavailable(e)),
            }
        }
    }

    /// After `com.microsoft:server-busy`, sends wait `server_busy_pause`.
    fn pause_for_server_busy(&self) {
        *self.busy_until.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(crate::clock::now() + self.server_busy_pause);
    }

    /// One attempt at sending.
    async fn send_once(
        &self,
        messages: &[OutgoingMessage],
        used: &StdMutex<Option<String>>,
    ) -> Result<(), Failure> {
        let live = self.links.live().await.map_err(Failure::Answer)?;
        let broken = live.broken();
        tokio::select! {
            result = self.send_on(&live, messages, used) => result,
            () = broken => {
                // A disposition can no longer arrive on this connection: fail
                // now (retryable) rather than wait out the send's time limit.
                // Duplicate detection drops a copy that did arrive.
                Err(Failure::Link(format!(
                    "sending to {}: the connection was lost while the send was in flight",
                    self.links.queue
                )))
            }
        }
    }

    /// One attempt at sending on `live`. The sender is held only while the
    /// transfers are written; their dispositions are awaited after it is let
    /// go, so concurrent sends share the link with several transfers in
    /// flight (unsettled) instead of each waiting for the one before.
    async fn send_on(
        &self,
        live: &Arc<connection::Live>,
        messages: &[OutgoingMessage],
        used: &StdMutex<Option<String>>,
    ) -> Result<(), Failure> {
        let what = format!("sending to {}", self.links.queue);
        let amqp: Vec<_> = messages.iter().map(message::to_amqp).collect();
        let encoded = amqp
            .iter()
            .map(message::encode)
            .collect::<Result<Vec<_>, _>>()
            .map_err(Failure::Answer)?;
        let mut slot = live.sender.lock().await;
        if let Err(e) = self.links.ensure_sender(live, &mut slot).await {
            // A busy service refuses the attach as it would the transfer:
            // sends pause the same way.
            if errors::is_server_busy(&e) {
                self.pause_for_server_busy();
                return Err(Failure::Busy(e));
            }
            return Err(Failure::Answer(e));
        }
        let Some(sender) = slot.as_mut() else {
            unreachable!("ensure_sender attached it")
        };
        let link = sender.name().to_string();
        *used.lock().unwrap_or_else(|p| p.into_inner()) = Some(link.clone());
        let limit = sender
            .max_message_size()
            .filter(|n| *n > 0)
            .unwrap_or(DEFAULT_MAX_MESSAGE_SIZE);
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
        let mut in_flight = Vec::with_capacity(sendables.len());
        let mut link_failed = None;
        for sendable in sendables {
            match sender.send_batchable(sendable).await {
                Ok(outcome) => in_flight.push(outcome),
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
        drop(slot);
        if link_failed.is_none() {
            for outcome in in_flight {
                match outcome.await {
                    Ok(Outcome::Accepted(_)) => {}
                    Ok(Outcome::Rejected(r)) => {
                        let Some(e) = r.error else {
                            return Err(Failure::Answer(QueueError::Fatal(format!(
                                "{what}: rejected without a reason"
                            ))));
                        };
                        if errors::kind(&e.condition) == Kind::ServerBusy {
                            self.pause_for_server_busy();
                            return Err(Failure::Busy(errors::from_error(&e, &what)));
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
        }
        let Some(e) = link_failed else {
            return Ok(());
        };
        // The link failed under this send: the next one attaches a new link,
        // unless a concurrent send has done so already.
        let mut slot = live.sender.lock().await;
        if slot.as_ref().is_some_and(|s| s.name() == link) {
            slot.take();
        }
        drop(slot);
        let detail = format!("{e:?}");
        Err(match errors::kind_in_text(&detail) {
            kind @ (Kind::Unauthorized | Kind::NotFound) => {
                Failure::Answer(errors::from_condition(kind, &what, &detail))
            }
            _ => Failure::Link(format!("{what}: {e}")),
        })
    }
}

/// A single-message send waiting for the group-commit task.
struct Grouped {
    message: OutgoingMessage,
    reply: oneshot::Sender<Result<(), QueueError>>,
}

/// Group commit for sends, as the WAL does for appends: a message that
/// arrives while [`GROUP_IN_FLIGHT`] sends are in flight waits, and every
/// message waiting when a send slot frees goes out in that one send (one
/// batch message, format 0x80013700, split by the link's size limit). Each
/// caller hears back once the service has accepted the batch holding its
/// message. A group the service refuses outright (not retryable) is sent
/// again one message at a time, so one bad message does not fail the others.
async fn group_commit(sending: Arc<Sending>, mut waiting: mpsc::UnboundedReceiver<Grouped>) {
    let slots = Arc::new(Semaphore::new(GROUP_IN_FLIGHT));
    while let Some(first) = waiting.recv().await {
        // What arrives while every slot is busy joins this group.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut group = vec![first];
        while group.len() < GROUP_MAX_MESSAGES {
            match waiting.try_recv() {
                Ok(g) => group.push(g),
                Err(_) => break,
            }
        }
        let sending = sending.clone();
        tokio::spawn(async move {
            let (messages, replies): (Vec<_>, Vec<_>) =
                group.into_iter().map(|g| (g.message, g.reply)).unzip();
            let result = sending.send(&messages).await;
            match result {
                Err(e) if messages.len() > 1 && !e.is_retryable() => {
                    tracing::info!(error = %e, messages = messages.len(), "the service refused a group of sends; sending each alone");
                    let alone = messages
                        .iter()
                        .map(|m| sending.send(std::slice::from_ref(m)));
                    for (reply, result) in replies
                        .into_iter()
                        .zip(futures::future::join_all(alone).await)
                    {
                        let _ = reply.send(result);
                    }
                }
                result => {
                    for reply in replies {
                        let _ = reply.send(copy(&result));
                    }
                }
            }
            drop(slot);
        });
    }
}

/// The same outcome for every message of a group.
fn copy(result: &Result<(), QueueError>) -> Result<(), QueueError> {
    match result {
        Ok(()) => Ok(()),
        Err(QueueError::LockLost) => Err(QueueError::LockLost),
        Err(QueueError::Unavailable(m)) => Err(QueueError::Unavailable(m.clone())),
        Err(QueueError::Fatal(m)) => Err(QueueError::Fatal(m.clone())),
    }
}

/// Forget locks that ended more than [`HELD_GRACE`] before `now`.
fn forget_ended(held: &mut HashMap<Uuid, Held>, now: DateTime<Utc>) {
    let horizon = now - HELD_GRACE;
    held.retain(|_, h| h.locked_until > horizon);
}

/// Keep at most `max` held locks, forgetting those that end first.
fn bound_held(held: &mut HashMap<Uuid, Held>, max: usize) {
    let excess = held.len().saturating_sub(max);
    if excess == 0 {
        return;
    }
    let mut ends: Vec<_> = held.iter().map(|(t, h)| (h.locked_until, *t)).collect();
    ends.select_nth_unstable(excess - 1);
    for (_, token) in &ends[..excess] {
        held.remove(token);
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
    async fn send(&self, mut messages: Vec<OutgoingMessage>) -> Result<(), QueueError> {
        // One unscheduled message (an ingest's) joins a group; a caller's own
        // batch, or a scheduled retry, goes as it is.
        if messages.len() == 1 && messages[0].scheduled_enqueue_at.is_none() {
            let (reply, answer) = oneshot::channel();
            let grouped = Grouped {
                message: messages.remove(0),
                reply,
            };
            if self.group.send(grouped).is_ok()
                && let Ok(result) = answer.await
            {
                return result;
            }
            return Err(QueueError::Unavailable(format!(
                "sending to {}: the group-commit task is gone",
                self.sending.links.queue
            )));
        }
        if messages.is_empty() {
            return Ok(());
        }
        self.sending.send(&messages).await
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
        let live = self.sending.links.live().await?;
        let mut slot = live.sender.lock().await;
        self.sending.links.ensure_sender(&live, &mut slot).await
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
    fn locks_are_forgotten_a_grace_after_they_end() {
        let now = Utc::now();
        let entry = |ended_ago: i64| Held {
            generation: 1,
            sequence_number: ended_ago,
            subqueue: Subqueue::Main,
            info: None,
            locked_until: now - chrono::TimeDelta::seconds(ended_ago),
        };
        let mut held = HashMap::new();
        let (fresh, recent, old) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        held.insert(fresh, entry(-30));
        held.insert(recent, entry(HELD_GRACE.as_secs() as i64 - 5));
        held.insert(old, entry(HELD_GRACE.as_secs() as i64 + 5));
        forget_ended(&mut held, now);
        assert!(held.contains_key(&fresh) && held.contains_key(&recent));
        assert!(
            !held.contains_key(&old),
            "a lock ended past the grace is kept"
        );
    }

    #[test]
    fn held_locks_are_bounded_in_number_keeping_the_latest() {
        let now = Utc::now();
        let mut held = HashMap::new();
        let mut tokens = Vec::new();
        for i in 0..10i64 {
            let t = Uuid::new_v4();
            tokens.push(t);
            held.insert(
                t,
                Held {
                    generation: 1,
                    sequence_number: i,
                    subqueue: Subqueue::Main,
                    info: None,
                    locked_until: now + chrono::TimeDelta::seconds(i),
                },
            );
        }
        bound_held(&mut held, 4);
        assert_eq!(held.len(), 4);
        for t in &tokens[6..] {
            assert!(held.contains_key(t), "a lock that ends last was dropped");
        }
        bound_held(&mut held, 4);
        assert_eq!(held.len(), 4);
    }

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
