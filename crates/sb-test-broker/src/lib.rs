//! A test-only AMQP 1.0 broker that behaves like Azure Service Bus as its
//! clients see it: SASL ANONYMOUS/PLAIN, CBS put-token on `$cbs` (202), queues
//! with peek-lock, lock expiry and redelivery with delivery-count + 1, max
//! delivery count → `$DeadLetterQueue` (`MaxDeliveryCountExceeded`), explicit
//! dead-letter keeping `DeadLetterReason`/`DeadLetterErrorDescription`,
//! scheduled enqueue, batch messages (format 0x80013700), duplicate detection
//! by message-id within a window, broker annotations and 16-byte GUID delivery
//! tags, and `$management` renew-lock / peek-message / schedule-message.
//!
//! Why own framing on `fe2o3-amqp-types` rather than a server library:
//! `fe2o3-amqp`'s acceptor-side sender only emits 4-byte counter delivery tags,
//! and Microsoft's SDKs parse the lock token from a 16-byte tag, so it cannot
//! impersonate Service Bus. `ntex-amqp`'s server can set tags but drags in the
//! ntex runtime and its own service model, which is a lot of surface for a test
//! fixture. AMQP framing is small (one length-prefixed frame type, nine
//! performatives) and `fe2o3-amqp-types`/`serde_amqp` already provide every
//! codec, so the broker owns only the state machine it needs — which is also
//! the part whose Service Bus fidelity matters. Fidelity is checked by
//! Microsoft's Python SDK (`tests/servicebus/conformance.py`).
//!
//! Not a production broker: state is in memory, one lock across all queues.

mod auth;
mod connection;
mod frame;
mod management;
mod sas;
mod store;
mod tls;
mod websocket;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use store::QueueState;
pub use store::{QueueSettings, Subqueue};

/// What a shared access rule may do, as Service Bus names its claims.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rights {
    pub send: bool,
    pub listen: bool,
    pub manage: bool,
}

impl Rights {
    pub const ALL: Rights = Rights {
        send: true,
        listen: true,
        manage: true,
    };
    pub const SEND: Rights = Rights {
        send: true,
        listen: false,
        manage: false,
    };
    pub const LISTEN: Rights = Rights {
        send: false,
        listen: true,
        manage: false,
    };
}

/// A shared access policy: key name, key, rights.
#[derive(Debug, Clone)]
pub struct SasRule {
    pub name: String,
    pub key: String,
    pub rights: Rights,
}

/// The name under which [`BrokerConfig::sas_key`] signs, with every right.
pub const ROOT_KEY_NAME: &str = "RootManageSharedAccessKey";

/// Which links a forced detach hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkKind {
    /// The client sends to a queue.
    Sender,
    /// The client receives from a queue or its dead-letter queue.
    Receiver,
    /// Either link of a `$management` client.
    Management,
    /// Either link of a `$cbs` client.
    Cbs,
}

/// How the broker behaves; the defaults are Service Bus's own values except
/// for shorter windows that suit tests.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// Address to bind; port 0 picks a free port.
    pub bind: SocketAddr,
    /// Queues that exist at start.
    pub queues: Vec<String>,
    /// Create a queue the first time a link or request names it. Off by
    /// default: Service Bus answers `amqp:not-found` for an unknown entity.
    pub auto_create_queues: bool,
    pub lock_duration: Duration,
    pub max_delivery_count: u32,
    pub duplicate_window: Duration,
    /// When set, `$cbs` tokens must be signed with this key under
    /// [`ROOT_KEY_NAME`] (or with one of `sas_rules`), must not be expired, and
    /// every link needs a token whose audience covers its entity and whose
    /// rights allow what the link does. Unset, anything goes.
    pub sas_key: Option<String>,
    /// More shared access policies, for rights checks.
    pub sas_rules: Vec<SasRule>,
    /// When set, token audiences must name this host (`sb://<host>/...`).
    pub namespace: Option<String>,
    /// TLS on connect with a generated test CA; a cleartext first byte is refused.
    pub tls: bool,
    /// AMQP over WebSockets (`/$servicebus/websocket`) instead of raw AMQP.
    pub websockets: bool,
    /// Advertised in Open and enforced on incoming frames (Service Bus: 65,536).
    pub max_frame_size: u32,
    /// Advertised in Open; a connection silent for longer is closed (Service Bus: 120 s).
    pub idle_time_out: Duration,
    /// A link with no transfer or settlement for this long is force-detached
    /// (`amqp:link:detach-forced`; Service Bus: 10 minutes).
    pub link_idle_timeout: Duration,
    /// A connection without links for this long is closed (Service Bus: 60 s).
    pub connection_idle_timeout: Duration,
    /// Advertised on attach and enforced on sends (Service Bus Standard: 256 KiB).
    pub max_message_size: u64,
    /// Added to the broker's clock in the lock and enqueue times it reports,
    /// to test clients against a service clock that is not theirs.
    pub clock_offset_ms: i64,
    /// Every frame the broker writes leaves this much later (order kept), as
    /// a long round trip to a distant region would: flow replies, transfers
    /// and answers all arrive late.
    pub write_delay: Duration,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            queues: Vec::new(),
            auto_create_queues: false,
            lock_duration: Duration::from_secs(30),
            max_delivery_count: 10,
            duplicate_window: Duration::from_secs(600),
            sas_key: None,
            sas_rules: Vec::new(),
            namespace: None,
            tls: false,
            websockets: false,
            max_frame_size: 65_536,
            idle_time_out: Duration::from_secs(120),
            link_idle_timeout: Duration::from_secs(600),
            connection_idle_timeout: Duration::from_secs(60),
            max_message_size: 256 * 1024,
            clock_offset_ms: 0,
            write_delay: Duration::ZERO,
        }
    }
}

impl BrokerConfig {
    fn queue_settings(&self) -> QueueSettings {
        QueueSettings {
            lock_duration: self.lock_duration,
            max_delivery_count: self.max_delivery_count,
            duplicate_window: self.duplicate_window,
            clock_offset_ms: self.clock_offset_ms,
        }
    }
}

pub(crate) struct Inner {
    queues: HashMap<String, QueueState>,
}

/// Failures injected by tests, each consumed by the next matching operation.
#[derive(Debug, Default)]
pub(crate) struct Faults {
    /// Error conditions for the next sends to a queue (rejected outcomes).
    pub reject_transfers: VecDeque<String>,
    /// The next this many sends are taken and never answered (nor stored).
    pub hold_transfers: usize,
    /// Status codes for the next `$management` requests.
    pub fail_management: VecDeque<i32>,
    /// For the next this many drains of a receiving link, messages are held
    /// back while the link has credit and sent at the drain, immediately
    /// before its answer.
    pub deliver_at_drain: usize,
    /// The next this many drains are never answered.
    pub ignore_drains: usize,
    /// Error conditions for the next link attaches to a queue (the attach is
    /// refused: answered without a terminus, then detached with the error).
    pub refuse_attaches: VecDeque<String>,
    /// The next this many link attaches to a queue are never answered.
    pub ignore_attaches: usize,
}

/// One `$cbs` put-token the broker accepted.
#[derive(Debug, Clone)]
pub struct CbsPut {
    pub kind: String,
    pub audience: String,
    pub token: String,
}

/// One `$management` request as received.
#[derive(Debug, Clone)]
pub struct ManagementRequest {
    pub node: String,
    pub operation: String,
    /// `associated-link-name`, when the client named its receiving link.
    pub associated_link_name: Option<String>,
    /// `com.microsoft:server-timeout` in milliseconds, when given.
    pub server_timeout_ms: Option<i64>,
    /// Link names open on the requesting connection at the time.
    pub open_links: Vec<String>,
}

pub(crate) struct Shared {
    pub(crate) config: BrokerConfig,
    pub(crate) inner: Mutex<Inner>,
    /// Bumped on every state change so connections look for deliverable work.
    changed: watch::Sender<u64>,
    /// Bumped to drop every open connection (reconnect tests).
    kill: watch::Sender<u64>,
    /// Bumped to forget every token put so far, as their expiry would.
    pub(crate) revoke: watch::Sender<u64>,
    /// Forced detaches requested by tests: (request number, which links).
    pub(crate) detach: watch::Sender<(u64, Option<LinkKind>)>,
    pub(crate) tokens: Mutex<Vec<CbsPut>>,
    pub(crate) faults: Mutex<Faults>,
    pub(crate) management_log: Mutex<Vec<ManagementRequest>>,
    /// Transfers the broker received on sending links (each attempt counts).
    pub(crate) transfers_received: AtomicU64,
    refused_cleartext: AtomicU64,
    connections: AtomicU64,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    pub(crate) fn notify(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// The queue named `name` (case-insensitive, as in Service Bus), created
    /// on demand when the broker auto-creates queues.
    pub(crate) fn queue_mut<'a>(
        &self,
        inner: &'a mut Inner,
        name: &str,
    ) -> Option<&'a mut QueueState> {
        let key = name.to_ascii_lowercase();
        if self.config.auto_create_queues {
            return Some(inner.queues.entry(key).or_insert_with(|| {
                QueueState::new(name.to_string(), self.config.queue_settings())
            }));
        }
        inner.queues.get_mut(&key)
    }

    pub(crate) fn queue_exists(&self, name: &str) -> bool {
        if self.config.auto_create_queues {
            return true;
        }
        lock(&self.inner)
            .queues
            .contains_key(&name.to_ascii_lowercase())
    }

    fn create_queue(&self, name: &str) {
        lock(&self.inner)
            .queues
            .entry(name.to_ascii_lowercase())
            .or_insert_with(|| QueueState::new(name.to_string(), self.config.queue_settings()));
    }
}

/// A running broker; dropping it stops accepting connections.
pub struct BrokerHandle {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
    ca_pem: Option<String>,
}

impl BrokerHandle {
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn key(&self) -> String {
        self.shared
            .config
            .sas_key
            .clone()
            .unwrap_or_else(|| "SAS_KEY_VALUE".into())
    }

    /// A connection string the official SDKs accept for this broker. Without
    /// TLS it is the emulator form (plain AMQP, port kept); with TLS it names
    /// `localhost` as a namespace would, and clients reach the port through
    /// [`BrokerHandle::custom_endpoint`].
    pub fn connection_string(&self) -> String {
        self.connection_string_for(ROOT_KEY_NAME, &self.key())
    }

    /// A connection string signing with another policy's key.
    pub fn connection_string_for(&self, key_name: &str, key: &str) -> String {
        if self.shared.config.tls {
            format!(
                "Endpoint=sb://localhost/;SharedAccessKeyName={key_name};SharedAccessKey={key};"
            )
        } else {
            format!(
                "Endpoint=sb://{};SharedAccessKeyName={key_name};SharedAccessKey={key};UseDevelopmentEmulator=true;",
                self.addr
            )
        }
    }

    /// Where to connect when the connection string names a namespace host
    /// (`sb://localhost:<port>`), as the SDKs' custom endpoint address.
    pub fn custom_endpoint(&self) -> String {
        format!("sb://localhost:{}", self.addr.port())
    }

    /// The test CA's certificate (PEM) when TLS is on.
    pub fn ca_pem(&self) -> Option<&str> {
        self.ca_pem.as_deref()
    }

    /// Create a queue (strict brokers refuse unknown ones).
    pub fn create_queue(&self, name: &str) {
        self.shared.create_queue(name);
    }

    /// (active, dead-lettered) message counts of a queue; active includes
    /// locked and scheduled messages.
    pub fn counts(&self, queue: &str) -> (usize, usize) {
        lock(&self.shared.inner)
            .queues
            .get(&queue.to_ascii_lowercase())
            .map_or((0, 0), |q| q.counts())
    }

    /// Messages of a queue's main entity that are locked right now.
    pub fn locked(&self, queue: &str) -> usize {
        let now = store::now_ms();
        lock(&self.shared.inner)
            .queues
            .get(&queue.to_ascii_lowercase())
            .map_or(0, |q| q.locked(now))
    }

    /// Tokens presented on `$cbs` so far, as (type, token).
    pub fn cbs_tokens(&self) -> Vec<(String, String)> {
        lock(&self.shared.tokens)
            .iter()
            .map(|p| (p.kind.clone(), p.token.clone()))
            .collect()
    }

    /// Every accepted put-token with its audience, in order.
    pub fn cbs_puts(&self) -> Vec<CbsPut> {
        lock(&self.shared.tokens).clone()
    }

    /// Every `$management` request so far.
    pub fn management_requests(&self) -> Vec<ManagementRequest> {
        lock(&self.shared.management_log).clone()
    }

    /// Transfers received on client-sending links so far (retries included).
    pub fn transfers_received(&self) -> u64 {
        self.shared.transfers_received.load(Ordering::Relaxed)
    }

    /// Connections accepted so far (a client that reconnects shows here).
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::Relaxed)
    }

    /// Connections refused because they did not open with a TLS ClientHello.
    pub fn refused_cleartext(&self) -> u64 {
        self.shared.refused_cleartext.load(Ordering::Relaxed)
    }

    /// Reject the next `count` sends to any queue with `condition`
    /// (`com.microsoft:server-busy`, `com.microsoft:timeout`,
    /// `amqp:resource-limit-exceeded`, ...).
    pub fn reject_next_transfers(&self, count: usize, condition: &str) {
        let mut f = lock(&self.shared.faults);
        f.reject_transfers
            .extend(std::iter::repeat_n(condition.to_string(), count));
    }

    /// Drop every injected fault not used up yet.
    pub fn clear_faults(&self) {
        *lock(&self.shared.faults) = Faults::default();
    }

    /// Take the next `count` sends to any queue and never answer them (the
    /// message is not stored), as a service that stopped responding.
    pub fn hold_next_transfers(&self, count: usize) {
        lock(&self.shared.faults).hold_transfers += count;
    }

    /// For the next `count` drains, hold messages back while the receiving
    /// link has credit and send them when it drains, in the same write as,
    /// and just before, the drain's answer: transfers racing the answer.
    pub fn deliver_at_next_drains(&self, count: usize) {
        lock(&self.shared.faults).deliver_at_drain += count;
        self.shared.notify();
    }

    /// Never answer the next `count` drains (the credit stays granted).
    pub fn ignore_next_drains(&self, count: usize) {
        lock(&self.shared.faults).ignore_drains += count;
    }

    /// Refuse the next `count` attaches of links to a queue with `condition`
    /// (`com.microsoft:server-busy`, `com.microsoft:timeout`, ...).
    pub fn refuse_next_attaches(&self, count: usize, condition: &str) {
        let mut f = lock(&self.shared.faults);
        f.refuse_attaches
            .extend(std::iter::repeat_n(condition.to_string(), count));
    }

    /// Never answer the next `count` attaches of links to a queue (a
    /// service that hangs on opening a link).
    pub fn ignore_next_attaches(&self, count: usize) {
        lock(&self.shared.faults).ignore_attaches += count;
    }

    /// Answer the next `count` `$management` requests with `status` (e.g. 503).
    pub fn fail_next_management(&self, count: usize, status: i32) {
        let mut f = lock(&self.shared.faults);
        f.fail_management.extend(std::iter::repeat_n(status, count));
    }

    /// Force-detach every open link of a kind (all links with `None`), as the
    /// service's idle timer does.
    pub fn force_detach(&self, kind: Option<LinkKind>) {
        self.shared.detach.send_modify(|(n, k)| {
            *n = n.wrapping_add(1);
            *k = kind;
        });
    }

    /// Forget every token put on `$cbs` so far, as if all had expired: links
    /// they authorized are detached with `amqp:unauthorized-access` and new
    /// links need a new token.
    pub fn revoke_tokens(&self) {
        self.shared.revoke.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Drop every open connection abruptly, as a network failure would.
    pub fn drop_connections(&self) {
        self.shared.kill.send_modify(|v| *v = v.wrapping_add(1));
    }

    pub fn shutdown(self) {
        self.drop_connections();
        self.accept.abort();
    }
}

impl Drop for BrokerHandle {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Bind and serve in the background of the current Tokio runtime.
pub async fn start(config: BrokerConfig) -> std::io::Result<BrokerHandle> {
    let listener = TcpListener::bind(config.bind).await?;
    let addr = listener.local_addr()?;
    let tls = if config.tls {
        Some(tls::generate()?)
    } else {
        None
    };
    let mut queues = HashMap::new();
    for name in &config.queues {
        queues.insert(
            name.to_ascii_lowercase(),
            QueueState::new(name.clone(), config.queue_settings()),
        );
    }
    let shared = Arc::new(Shared {
        config,
        inner: Mutex::new(Inner { queues }),
        changed: watch::channel(0).0,
        kill: watch::channel(0).0,
        revoke: watch::channel(0).0,
        detach: watch::channel((0, None)).0,
        tokens: Mutex::new(Vec::new()),
        faults: Mutex::new(Faults::default()),
        management_log: Mutex::new(Vec::new()),
        transfers_received: AtomicU64::new(0),
        refused_cleartext: AtomicU64::new(0),
        connections: AtomicU64::new(0),
    });
    let ca_pem = tls.as_ref().map(|t| t.ca_pem.clone());
    let acceptor = tls.map(|t| t.acceptor);
    let accept_shared = shared.clone();
    let accept = tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((socket, peer)) => {
                    let shared = accept_shared.clone();
                    let acceptor = acceptor.clone();
                    tokio::spawn(async move {
                        if let Err(e) = accept_connection(shared, socket, acceptor).await {
                            tracing::debug!(%peer, error = %e, "connection ended");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    });
    Ok(BrokerHandle {
        addr,
        shared,
        accept,
        ca_pem,
    })
}

async fn accept_connection(
    shared: Arc<Shared>,
    socket: TcpStream,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> std::io::Result<()> {
    socket.set_nodelay(true).ok();
    shared.connections.fetch_add(1, Ordering::Relaxed);
    let Some(acceptor) = tls else {
        return serve_transport(shared, socket).await;
    };
    let mut first = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(30), socket.peek(&mut first))
        .await
        .map_err(|_| std::io::Error::other("no bytes within 30 s"))??;
    if n == 0 || first[0] != tls::TLS_HANDSHAKE_RECORD {
        // Service Bus answers nothing here; closing at once keeps tests fast.
        shared.refused_cleartext.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            first_byte = first[0],
            "refused a connection that did not open with a TLS ClientHello"
        );
        return Ok(());
    }
    let stream = acceptor.accept(socket).await?;
    serve_transport(shared, stream).await
}

async fn serve_transport<S>(shared: Arc<Shared>, stream: S) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let result = if shared.config.websockets {
        let ws = websocket::accept(stream).await?;
        connection::serve(shared, ws).await
    } else {
        connection::serve(shared, stream).await
    };
    result.map_err(|e| std::io::Error::other(e.to_string()))
}
