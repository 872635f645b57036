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

mod connection;
mod frame;
mod management;
mod sas;
mod store;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use store::QueueState;
pub use store::{QueueSettings, Subqueue};

/// How the broker behaves; the defaults are Service Bus's queue defaults
/// except for shorter windows that suit tests.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// Address to bind; port 0 picks a free port.
    pub bind: SocketAddr,
    /// Queues that exist at start.
    pub queues: Vec<String>,
    /// Create a queue the first time a link or request names it (lets tests
    /// isolate themselves with random queue names).
    pub auto_create_queues: bool,
    pub lock_duration: Duration,
    pub max_delivery_count: u32,
    pub duplicate_window: Duration,
    /// When set, SAS tokens presented on `$cbs` must be signed with this key.
    pub sas_key: Option<String>,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            queues: Vec::new(),
            auto_create_queues: true,
            lock_duration: Duration::from_secs(30),
            max_delivery_count: 10,
            duplicate_window: Duration::from_secs(600),
            sas_key: None,
        }
    }
}

impl BrokerConfig {
    fn queue_settings(&self) -> QueueSettings {
        QueueSettings {
            lock_duration: self.lock_duration,
            max_delivery_count: self.max_delivery_count,
            duplicate_window: self.duplicate_window,
        }
    }
}

pub(crate) struct Inner {
    queues: HashMap<String, QueueState>,
}

pub(crate) struct Shared {
    pub(crate) config: BrokerConfig,
    pub(crate) inner: Mutex<Inner>,
    /// Bumped on every state change so connections look for deliverable work.
    changed: watch::Sender<u64>,
    /// Bumped to drop every open connection (reconnect tests).
    kill: watch::Sender<u64>,
    pub(crate) tokens: Mutex<Vec<(String, String)>>,
}

impl Shared {
    pub(crate) fn notify(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// The queue named `name` (case-insensitive, as in Service Bus), created on demand.
    pub(crate) fn queue_mut<'a>(&self, inner: &'a mut Inner, name: &str) -> &'a mut QueueState {
        let key = name.to_ascii_lowercase();
        inner
            .queues
            .entry(key)
            .or_insert_with(|| QueueState::new(name.to_string(), self.config.queue_settings()))
    }

    pub(crate) fn queue_exists(&self, name: &str) -> bool {
        if self.config.auto_create_queues {
            return true;
        }
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.queues.contains_key(&name.to_ascii_lowercase())
    }
}

/// A running broker; dropping it stops accepting connections.
pub struct BrokerHandle {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

impl BrokerHandle {
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A connection string the official SDKs accept for this broker.
    pub fn connection_string(&self) -> String {
        let key = self
            .shared
            .config
            .sas_key
            .clone()
            .unwrap_or_else(|| "SAS_KEY_VALUE".into());
        format!(
            "Endpoint=sb://{};SharedAccessKeyName=RootManageSharedAccessKey;SharedAccessKey={key};UseDevelopmentEmulator=true;",
            self.addr
        )
    }

    /// (active, dead-lettered) message counts of a queue; active includes
    /// locked and scheduled messages.
    pub fn counts(&self, queue: &str) -> (usize, usize) {
        let inner = self.shared.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner
            .queues
            .get(&queue.to_ascii_lowercase())
            .map_or((0, 0), |q| q.counts())
    }

    /// Tokens presented on `$cbs` so far, as (type, token).
    pub fn cbs_tokens(&self) -> Vec<(String, String)> {
        self.shared
            .tokens
            .lock()
            .map(|t| t.clone())
            .unwrap_or_default()
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
        tokens: Mutex::new(Vec::new()),
    });
    let accept_shared = shared.clone();
    let accept = tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((socket, peer)) => {
                    let shared = accept_shared.clone();
                    tokio::spawn(async move {
                        if let Err(e) = connection::serve(shared, socket).await {
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
    })
}
