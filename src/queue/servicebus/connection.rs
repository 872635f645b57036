//! The AMQP connection to the namespace and the links on it: one connection
//! and one session, CBS tokens re-put before they expire, a sender, one
//! peek-lock receiver and one `$management` client per subqueue — created on
//! first use, reused for every message, re-created after a failure. A lost
//! connection is re-opened with exponential backoff.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use chrono::Utc;
use fe2o3_amqp::connection::ConnectionHandle;
use fe2o3_amqp::link::receiver::CreditMode;
use fe2o3_amqp::sasl_profile::SaslProfile;
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::types::definitions::ReceiverSettleMode;
use fe2o3_amqp::types::primitives::Timestamp;
use fe2o3_amqp::{Connection, Receiver, Sender, Session};
use fe2o3_amqp_cbs::client::CbsClient;
use fe2o3_amqp_cbs::token::CbsToken;
use fe2o3_amqp_management::error::Error as MgmtError;
use fe2o3_amqp_management::{MgmtClient, Request, Response};
use secrecy::ExposeSecret;
use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use uuid::Uuid;

use super::super::{QueueError, Subqueue};
use super::auth::TokenSource;
use super::connection_string::{Endpoint, Target, Transport};
use super::receiver::ReceiverLink;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
const BACKOFF_BASE: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Re-put a token this long before it expires.
const TOKEN_REFRESH_MARGIN: chrono::TimeDelta = chrono::TimeDelta::minutes(5);
/// Service Bus's own frame limit is 256 KiB on Standard; ask for no more than 1 MiB.
const MAX_FRAME_SIZE: u32 = 1024 * 1024;
const IDLE_TIMEOUT_MS: u32 = 60_000;

pub(super) struct Links {
    pub endpoint: Endpoint,
    pub queue: String,
    /// Where the socket goes and over what.
    pub target: Target,
    tls: Arc<tokio_rustls::rustls::ClientConfig>,
    tokens: TokenSource,
    prefetch: u32,
    state: Mutex<ConnState>,
    generations: AtomicU64,
}

#[derive(Default)]
struct ConnState {
    live: Option<Arc<Live>>,
    failures: u32,
    retry_at: Option<Instant>,
}

/// One open connection and the links made on it.
pub(super) struct Live {
    connection: Mutex<ConnectionHandle<()>>,
    session: Mutex<SessionHandle<()>>,
    broken: Arc<AtomicBool>,
    cbs_refresh: JoinHandle<()>,
    pub sender: Mutex<Option<Sender>>,
    receivers: [Mutex<Option<ReceiverLink>>; 2],
    mgmt: [Mutex<Option<MgmtClient>>; 2],
}

fn index(sub: Subqueue) -> usize {
    match sub {
        Subqueue::Main => 0,
        Subqueue::DeadLetter => 1,
    }
}

impl Live {
    pub fn mark_broken(&self) {
        self.broken.store(true, Ordering::Release);
    }

    async fn usable(&self) -> bool {
        !self.broken.load(Ordering::Acquire) && !self.connection.lock().await.is_closed()
    }

    async fn close(&self) {
        self.cbs_refresh.abort();
        let mut conn = self.connection.lock().await;
        let _ = tokio::time::timeout(Duration::from_secs(5), conn.close()).await;
    }
}

fn backoff(failures: u32) -> Duration {
    BACKOFF_BASE
        .saturating_mul(1u32 << failures.min(16))
        .min(BACKOFF_MAX)
}

impl Links {
    pub fn new(
        endpoint: Endpoint,
        queue: String,
        tokens: TokenSource,
        prefetch: u32,
        target: Target,
        tls: Arc<tokio_rustls::rustls::ClientConfig>,
    ) -> Self {
        Self {
            endpoint,
            queue,
            target,
            tls,
            tokens,
            prefetch,
            state: Mutex::new(ConnState::default()),
            generations: AtomicU64::new(0),
        }
    }

    pub fn describe_auth(&self) -> String {
        self.tokens.describe()
    }

    pub fn entity(&self, sub: Subqueue) -> String {
        match sub {
            Subqueue::Main => self.queue.clone(),
            Subqueue::DeadLetter => format!("{}/$DeadLetterQueue", self.queue),
        }
    }

    /// The open connection, opening one if needed (at most one attempt per
    /// backoff interval; callers in between get `Unavailable` at once).
    pub async fn live(&self) -> Result<Arc<Live>, QueueError> {
        let mut state = self.state.lock().await;
        if let Some(live) = &state.live {
            if live.usable().await {
                return Ok(live.clone());
            }
            tracing::warn!(queue = %self.queue, "service bus connection lost; reconnecting");
            if let Some(old) = state.live.take() {
                tokio::spawn(async move { old.close().await });
            }
        }
        if let Some(at) = state.retry_at
            && Instant::now() < at
        {
            return Err(QueueError::Unavailable(format!(
                "service bus reconnect backing off for {:?}",
                at - Instant::now()
            )));
        }
        match tokio::time::timeout(CONNECT_TIMEOUT, self.connect()).await {
            Ok(Ok(live)) => {
                let live = Arc::new(live);
                state.live = Some(live.clone());
                state.failures = 0;
                state.retry_at = None;
                Ok(live)
            }
            result => {
                let message = match result {
                    Ok(Err(e)) => e,
                    _ => format!("connecting timed out after {CONNECT_TIMEOUT:?}"),
                };
                state.retry_at = Some(Instant::now() + backoff(state.failures));
                state.failures = state.failures.saturating_add(1);
                tracing::warn!(queue = %self.queue, error = %message, "service bus connect failed");
                Err(QueueError::Unavailable(format!(
                    "connecting to {}: {message}",
                    self.endpoint.host
                )))
            }
        }
    }

    /// Open the AMQP connection over the configured transport.
    async fn open(&self) -> Result<ConnectionHandle<()>, String> {
        let target = &self.target;
        let url = target.url();
        let container = format!("rtpd-{}", Uuid::new_v4());
        let builder = Connection::builder()
            .container_id(container)
            .hostname(self.endpoint.hostname.as_str())
            .sasl_profile(SaslProfile::Anonymous)
            .max_frame_size(MAX_FRAME_SIZE)
            .idle_time_out(IDLE_TIMEOUT_MS);
        let opened = match (target.transport, target.tls) {
            (Transport::Amqp, false) => builder.open(url.as_str()).await,
            (Transport::Amqp, true) => {
                builder
                    .domain(target.host.as_str())
                    .tls_connector(tokio_rustls::TlsConnector::from(self.tls.clone()))
                    .open(url.as_str())
                    .await
            }
            (Transport::WebSockets, tls) => {
                let connector = tls.then(|| {
                    fe2o3_amqp_ws::tokio_tungstenite::Connector::Rustls(self.tls.clone())
                });
                let ws = fe2o3_amqp_ws::WebSocketStream::connect_tls_with_config(
                    url.as_str(),
                    None,
                    true,
                    connector,
                )
                .await
                .map_err(|e| format!("opening WebSocket {url}: {e}"))?;
                builder.open_with_stream(ws).await
            }
        };
        opened.map_err(|e| format!("opening connection to {url}: {e}"))
    }

    async fn connect(&self) -> Result<Live, String> {
        let mut connection = self.open().await?;
        let mut session = Session::begin(&mut connection)
            .await
            .map_err(|e| format!("beginning session: {e}"))?;
        let mut cbs = CbsClient::attach(&mut session)
            .await
            .map_err(|e| format!("attaching $cbs: {e}"))?;
        let audience = self.endpoint.audience(&self.queue);
        let expires = put_token(&mut cbs, &self.tokens, &audience).await?;
        let broken = Arc::new(AtomicBool::new(false));
        let cbs_refresh = tokio::spawn(refresh_tokens(
            cbs,
            self.tokens.clone(),
            audience,
            expires,
            broken.clone(),
        ));
        Ok(Live {
            connection: Mutex::new(connection),
            session: Mutex::new(session),
            broken,
            cbs_refresh,
            sender: Mutex::new(None),
            receivers: [Mutex::new(None), Mutex::new(None)],
            mgmt: [Mutex::new(None), Mutex::new(None)],
        })
    }

    /// Attach the sender if there is none.
    pub async fn ensure_sender(
        &self,
        live: &Live,
        slot: &mut Option<Sender>,
    ) -> Result<(), QueueError> {
        if slot.is_none() {
            let mut session = live.session.lock().await;
            let sender = Sender::attach(
                &mut session,
                format!("rtpd-sender-{}", Uuid::new_v4()),
                self.queue.as_str(),
            )
            .await
            .map_err(|e| {
                live.mark_broken();
                QueueError::Unavailable(format!("attaching sender to {}: {e}", self.queue))
            })?;
            *slot = Some(sender);
        }
        Ok(())
    }

    /// The receiving link for a subqueue, attached (peek-lock, manual credit) if needed.
    pub async fn receiver(&self, live: &Live, sub: Subqueue) -> Result<ReceiverLink, QueueError> {
        let mut slot = live.receivers[index(sub)].lock().await;
        if let Some(link) = slot.as_ref()
            && link.is_alive()
        {
            return Ok(link.clone());
        }
        let entity = self.entity(sub);
        let receiver = {
            let mut session = live.session.lock().await;
            Receiver::builder()
                .name(format!("rtpd-receiver-{}", Uuid::new_v4()))
                .source(entity.as_str())
                .receiver_settle_mode(ReceiverSettleMode::Second)
                .credit_mode(CreditMode::Manual)
                .attach(&mut session)
                .await
                .map_err(|e| {
                    live.mark_broken();
                    QueueError::Unavailable(format!("attaching receiver to {entity}: {e}"))
                })?
        };
        let generation = self.generations.fetch_add(1, Ordering::Relaxed) + 1;
        let link = ReceiverLink::spawn(receiver, generation, self.prefetch);
        *slot = Some(link.clone());
        Ok(link)
    }

    /// The receiving link for a subqueue if it is still the one of `generation`.
    pub async fn current_receiver(&self, sub: Subqueue, generation: u64) -> Option<ReceiverLink> {
        let live = self.state.lock().await.live.clone()?;
        let slot = live.receivers[index(sub)].lock().await;
        slot.as_ref()
            .filter(|l| l.generation == generation && l.is_alive())
            .cloned()
    }

    /// Run one request on the subqueue's `$management` node.
    pub async fn management<Req>(
        &self,
        sub: Subqueue,
        request: Req,
    ) -> Result<Req::Response, QueueError>
    where
        Req: Request + Send,
        Req::Body: Send,
        Req::Response: Response<Error = MgmtError> + Send,
        <Req::Response as Response>::Body: std::fmt::Debug + Send,
    {
        let live = self.live().await?;
        let mut slot = live.mgmt[index(sub)].lock().await;
        if slot.is_none() {
            let entity = self.entity(sub);
            let mut session = live.session.lock().await;
            let client = MgmtClient::builder()
                .management_node_address(format!("{entity}/$management"))
                .client_node_addr(format!("{entity}-rtpd-mgmt-{}", Uuid::new_v4().simple()))
                .attach(&mut session)
                .await
                .map_err(|e| {
                    live.mark_broken();
                    QueueError::Unavailable(format!("attaching {entity}/$management: {e}"))
                })?;
            *slot = Some(client);
        }
        let Some(client) = slot.as_mut() else {
            unreachable!("attached above")
        };
        match tokio::time::timeout(Duration::from_secs(30), client.call(request)).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => {
                // A status answer leaves the links fine; anything else may have left a
                // response in flight that the next call would mistake for its own.
                if !matches!(e, MgmtError::Status(_)) {
                    *slot = None;
                }
                Err(management_error(e))
            }
            Err(_) => {
                *slot = None;
                Err(QueueError::Unavailable(
                    "management request timed out".into(),
                ))
            }
        }
    }
}

/// 410 is Service Bus's "lock lost"; other statuses are answers (fatal unless
/// the service says it is busy or failing); anything else is a link problem.
fn management_error(e: MgmtError) -> QueueError {
    match &e {
        MgmtError::Status(status) => match status.code.0.get() {
            410 => QueueError::LockLost,
            code if code >= 500 || code == 408 || code == 429 => {
                QueueError::Unavailable(format!("$management: {e}"))
            }
            _ => QueueError::Fatal(format!("$management: {e}")),
        },
        _ => QueueError::Unavailable(format!("$management: {e}")),
    }
}

async fn put_token(
    cbs: &mut CbsClient,
    tokens: &TokenSource,
    audience: &str,
) -> Result<chrono::DateTime<Utc>, String> {
    let token = tokens.token(audience).await?;
    let cbs_token = CbsToken::new(
        token.value.expose_secret(),
        token.kind,
        Some(Timestamp::from_milliseconds(
            token.expires_at.timestamp_millis(),
        )),
    );
    cbs.put_token(audience, cbs_token)
        .await
        .map_err(|e| format!("cbs put-token: {e}"))?;
    Ok(token.expires_at)
}

/// Re-put the token before it expires; a failure marks the connection broken
/// so the next operation reconnects (and authenticates afresh).
async fn refresh_tokens(
    mut cbs: CbsClient,
    tokens: TokenSource,
    audience: String,
    mut expires: chrono::DateTime<Utc>,
    broken: Arc<AtomicBool>,
) {
    loop {
        let wait = (expires - TOKEN_REFRESH_MARGIN - Utc::now())
            .to_std()
            .unwrap_or(Duration::from_secs(1));
        tokio::time::sleep(wait.max(Duration::from_secs(1))).await;
        match put_token(&mut cbs, &tokens, &audience).await {
            Ok(next) => expires = next,
            Err(e) => {
                tracing::warn!(error = %e, "service bus token refresh failed");
                broken.store(true, Ordering::Release);
                return;
            }
        }
    }
}
