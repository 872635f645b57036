//! An AMQP connection to the namespace and the links on it: one connection
//! and one session, a sender, one peek-lock receiver and one `$management`
//! client per subqueue — created on first use, reused for every message,
//! re-created after a failure. A lost connection is re-opened with
//! exponential backoff. The queue keeps two of these: one for its sender,
//! one for its receivers and `$management`, so the two never share a socket.
//!
//! The service force-detaches links idle for 10 minutes, `$cbs` included, so
//! every token put (at connect, before a `$management` node's first use, and
//! each refresh) goes over a `$cbs` link attached for it and closed after.
//! Tokens are re-put a quarter of their life (at most 5 minutes) before they
//! expire: once a token expires the service detaches the links it authorized.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
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
use super::errors::{self, Kind};
use super::receiver::ReceiverLink;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
const BACKOFF_BASE: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Re-put a token at most this long before it expires (a quarter of its life if shorter).
const TOKEN_REFRESH_MARGIN: Duration = Duration::from_secs(5 * 60);
/// A management request's own wait, a little over the server timeout we ask for.
const MANAGEMENT_WAIT: Duration =
    Duration::from_millis(super::management::SERVER_TIMEOUT_MS as u64 + 5_000);
/// How long a token put on `$cbs` (its link's attach included) may wait for
/// the service; `ServiceBusSettings::attach_timeout` bounds the other links'.
const ATTACH_WAIT: Duration = Duration::from_secs(30);
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
    /// How long a link's attach may wait for the service.
    attach_wait: Duration,
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
    /// Tells operations in flight (sends waiting for a disposition) that
    /// this connection is gone, so they fail at once instead of waiting out
    /// their time limit.
    broken_signal: tokio::sync::watch::Sender<bool>,
    /// Audiences with a token on this connection, re-put before they expire.
    claims: Mutex<Vec<String>>,
    cbs_refresh: std::sync::Mutex<Option<JoinHandle<()>>>,
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
        self.broken_signal.send_replace(true);
    }

    /// Resolves once the connection is known broken (at once if it already is).
    pub fn broken(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.broken_signal.subscribe();
        async move {
            // The sender lives as long as the `Live`; if it went, so did the connection.
            let _ = rx.wait_for(|b| *b).await;
        }
    }

    async fn usable(&self) -> bool {
        !self.broken.load(Ordering::Acquire) && !self.connection.lock().await.is_closed()
    }

    async fn close(&self) {
        if let Some(task) = self
            .cbs_refresh
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            task.abort();
        }
        let mut conn = self.connection.lock().await;
        let _ = tokio::time::timeout(Duration::from_secs(5), conn.close()).await;
    }
}

/// How often [`watch_connection`] looks at the connection's event loop.
const CONNECTION_WATCH_EVERY: Duration = Duration::from_millis(100);

/// Marks `live` broken as soon as its connection's event loop stops (the
/// socket closed, the service closed the connection), which wakes every
/// send waiting on it. Ends with the connection.
async fn watch_connection(live: Weak<Live>) {
    loop {
        tokio::time::sleep(CONNECTION_WATCH_EVERY).await;
        let Some(live) = live.upgrade() else { return };
        if live.broken.load(Ordering::Acquire) {
            live.mark_broken();
            return;
        }
        // `try_lock`: a close in progress holds the lock; look again later.
        let closed = live
            .connection
            .try_lock()
            .map(|c| c.is_closed())
            .unwrap_or(false);
        if closed {
            tracing::warn!("service bus connection closed; failing operations in flight on it");
            live.mark_broken();
            return;
        }
    }
}

fn backoff(failures: u32) -> Duration {
    crate::backoff::exponential(BACKOFF_BASE, BACKOFF_MAX, failures)
}

impl Links {
    pub fn new(
        endpoint: Endpoint,
        queue: String,
        tokens: TokenSource,
        prefetch: u32,
        target: Target,
        tls: Arc<tokio_rustls::rustls::ClientConfig>,
        attach_wait: Duration,
    ) -> Self {
        Self {
            attach_wait,
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
            Ok(Ok((live, expires))) => {
                let live = Arc::new(live);
                let task = tokio::spawn(refresh_tokens(
                    Arc::downgrade(&live),
                    self.tokens.clone(),
                    expires,
                ));
                *live.cbs_refresh.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
                tokio::spawn(watch_connection(Arc::downgrade(&live)));
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
            (Transport::Amqp, false) => {
                let socket = tcp(target).await?;
                builder.scheme("amqp").open_with_stream(socket).await
            }
            (Transport::Amqp, true) => {
                let socket = tcp(target).await?;
                // Service Bus expects a TLS ClientHello as the first byte on 5671, not
                // the AMQP TLS protocol header (`AMQP 2.1.0.0`) that AMQP 1.0 starts with.
                builder
                    .scheme("amqps")
                    .alt_tls_establishment(true)
                    .domain(target.host.as_str())
                    .tls_connector(tokio_rustls::TlsConnector::from(self.tls.clone()))
                    .open_with_stream(socket)
                    .await
            }
            (Transport::WebSockets, tls) => {
                let connector = tls
                    .then(|| fe2o3_amqp_ws::tokio_tungstenite::Connector::Rustls(self.tls.clone()));
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

    /// A connection and session with a token for the queue; returns when it expires.
    async fn connect(&self) -> Result<(Live, chrono::DateTime<Utc>), String> {
        let mut connection = self.open().await?;
        let mut session = Session::begin(&mut connection)
            .await
            .map_err(|e| format!("beginning session: {e}"))?;
        let audience = self.endpoint.audience(&self.queue);
        let expires =
            put_tokens(&mut session, &self.tokens, std::slice::from_ref(&audience)).await?;
        let live = Live {
            connection: Mutex::new(connection),
            session: Mutex::new(session),
            broken: Arc::new(AtomicBool::new(false)),
            broken_signal: tokio::sync::watch::Sender::new(false),
            claims: Mutex::new(vec![audience]),
            cbs_refresh: std::sync::Mutex::new(None),
            sender: Mutex::new(None),
            receivers: [Mutex::new(None), Mutex::new(None)],
            mgmt: [Mutex::new(None), Mutex::new(None)],
        };
        Ok((live, expires))
    }

    /// Put a token for `audience` on this connection unless one is there already.
    async fn claim(&self, live: &Arc<Live>, audience: String) -> Result<(), QueueError> {
        let mut claims = live.claims.lock().await;
        if claims.contains(&audience) {
            return Ok(());
        }
        let tokens = self.tokens.clone();
        let audiences = vec![audience.clone()];
        on_session(
            live,
            ATTACH_WAIT,
            "putting a token on $cbs",
            move |session| Box::pin(async move { put_tokens(session, &tokens, &audiences).await }),
        )
        .await?
        .map_err(|e| attach_failure(live, &e, &audience))?;
        claims.push(audience);
        Ok(())
    }

    /// Put a fresh token for every audience claimed on the open connection,
    /// after the service refused one (`amqp:unauthorized-access`: expired,
    /// or a refresh that came late).
    pub async fn reput_tokens(&self) -> Result<(), QueueError> {
        let live = self.live().await?;
        let audiences = live.claims.lock().await.clone();
        let tokens = self.tokens.clone();
        // Both tries within one bound.
        let result = on_session(&live, ATTACH_WAIT, "putting a fresh token on $cbs", move |session| {
            Box::pin(async move {
                let mut result = put_tokens(session, &tokens, &audiences).await;
                if let Err(e) = &result {
                    // The links the service just detached are still closing on
                    // this session; one more try after they have.
                    tracing::info!(error = %e, "putting a fresh token failed; trying once more");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    result = put_tokens(session, &tokens, &audiences).await;
                }
                result
            })
        })
        .await?;
        result.map(|_| ()).map_err(|e| {
            live.mark_broken();
            QueueError::Unavailable(format!("putting a fresh token on $cbs: {e}"))
        })
    }

    /// Attach the sender if there is none.
    pub async fn ensure_sender(
        &self,
        live: &Arc<Live>,
        slot: &mut Option<Sender>,
    ) -> Result<(), QueueError> {
        if slot.is_none() {
            let what = format!("attaching sender to {}", self.queue);
            let queue = self.queue.clone();
            let sender = on_session(live, self.attach_wait, &what, move |session| {
                Box::pin(async move {
                    Sender::attach(
                        session,
                        format!("rtpd-sender-{}", Uuid::new_v4()),
                        queue.as_str(),
                    )
                    .await
                })
            })
            .await?
            .map_err(|e| attach_failure(live, &format!("{e:?}"), &what))?;
            *slot = Some(sender);
        }
        Ok(())
    }

    /// Forget the sender link named `link` (a send on it was cut off
    /// mid-way); the next send attaches a new one. A link another send has
    /// attached since is kept.
    pub async fn drop_sender(&self, link: &str) {
        let live = self.state.lock().await.live.clone();
        let Some(live) = live else { return };
        let mut slot = live.sender.lock().await;
        if slot.as_ref().is_some_and(|s| s.name() == link)
            && let Some(sender) = slot.take()
        {
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(5), sender.close()).await;
            });
        }
    }

    /// The receiving link for a subqueue, attached (peek-lock, manual credit) if needed.
    pub async fn receiver(
        &self,
        live: &Arc<Live>,
        sub: Subqueue,
    ) -> Result<ReceiverLink, QueueError> {
        let mut slot = live.receivers[index(sub)].lock().await;
        if let Some(link) = slot.as_ref()
            && link.is_alive()
        {
            return Ok(link.clone());
        }
        let entity = self.entity(sub);
        let receiver = {
            let what = format!("attaching receiver to {entity}");
            let source = entity.clone();
            on_session(live, self.attach_wait, &what, move |session| {
                Box::pin(async move {
                    Receiver::builder()
                        .name(format!("rtpd-receiver-{}", Uuid::new_v4()))
                        .source(source.as_str())
                        .receiver_settle_mode(ReceiverSettleMode::Second)
                        .credit_mode(CreditMode::Manual)
                        .attach(session)
                        .await
                })
            })
            .await?
            .map_err(|e| attach_failure(live, &format!("{e:?}"), &what))?
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

    /// The receiving link's name if it is still the one of `generation`.
    pub async fn receiver_name(&self, sub: Subqueue, generation: u64) -> Option<String> {
        self.current_receiver(sub, generation).await.map(|l| l.name)
    }

    /// Run one request on the subqueue's `$management` node. A link the
    /// service detached (idle for 10 minutes, typically) is re-attached and
    /// the request sent again at once, so a lock renewal is not late.
    pub async fn management<Req>(
        &self,
        sub: Subqueue,
        request: Req,
    ) -> Result<Req::Response, QueueError>
    where
        Req: Request + Clone + Send,
        Req::Body: Send,
        Req::Response: Response<Error = MgmtError> + Send,
        <Req::Response as Response>::Body: std::fmt::Debug + Send,
    {
        let mut attempt = 0;
        let mut reauthorized = false;
        loop {
            attempt += 1;
            match self.management_once(sub, request.clone()).await {
                Err(Failure::Link(e)) if attempt == 1 => {
                    tracing::info!(error = %e, "$management link failed; re-attaching and retrying once");
                }
                Err(Failure::Answer(e)) if errors::is_unauthorized(&e) && !reauthorized => {
                    tracing::info!(error = %e, "$management refused our token; putting a fresh one and retrying once");
                    reauthorized = true;
                    self.reput_tokens().await?;
                }
                Err(Failure::Link(e)) => return Err(QueueError::Unavailable(e)),
                Err(Failure::Answer(e) | Failure::Busy(e)) => return Err(e),
                Ok(r) => return Ok(r),
            }
        }
    }

    async fn management_once<Req>(
        &self,
        sub: Subqueue,
        request: Req,
    ) -> Result<Req::Response, Failure>
    where
        Req: Request + Send,
        Req::Body: Send,
        Req::Response: Response<Error = MgmtError> + Send,
        <Req::Response as Response>::Body: std::fmt::Debug + Send,
    {
        let live = self.live().await.map_err(Failure::Answer)?;
        let mut slot = live.mgmt[index(sub)].lock().await;
        if slot.is_none() {
            let entity = self.entity(sub);
            let node = format!("{entity}/$management");
            // The SDKs claim the management node separately from its entity.
            self.claim(&live, self.endpoint.audience(&node))
                .await
                .map_err(Failure::Answer)?;
            let what = format!("attaching {node}");
            let address = node.clone();
            let client = on_session(&live, self.attach_wait, &what, move |session| {
                Box::pin(async move {
                    MgmtClient::builder()
                        .management_node_address(address)
                        .client_node_addr(format!("{entity}-rtpd-mgmt-{}", Uuid::new_v4().simple()))
                        .attach(session)
                        .await
                })
            })
            .await
            .map_err(Failure::Answer)?
            .map_err(|e| Failure::Answer(attach_failure(&live, &format!("{e:?}"), &what)))?;
            *slot = Some(client);
        }
        let Some(client) = slot.as_mut() else {
            unreachable!("attached above")
        };
        match tokio::time::timeout(MANAGEMENT_WAIT, client.call(request)).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(MgmtError::Status(status))) => {
                // A status answer leaves the links fine.
                Err(Failure::Answer(management_error(MgmtError::Status(status))))
            }
            Ok(Err(e)) => {
                // Anything else may have left a response in flight that the next
                // call would mistake for its own: start over on a new link.
                *slot = None;
                Err(Failure::Link(format!("$management: {e}")))
            }
            Err(_) => {
                *slot = None;
                Err(Failure::Answer(QueueError::Unavailable(
                    "management request timed out".into(),
                )))
            }
        }
    }
}

/// The TCP socket to `target`, with Nagle's algorithm off (`TCP_NODELAY`),
/// as the SDKs and the WebSocket transport (`disable_nagle`) have it. With
/// Nagle on, a small frame written while an earlier one is unacknowledged
/// waits for the peer's delayed ACK (40 ms on Linux): a transfer queued behind
/// a receiver's flow or disposition frame, or a disposition behind a transfer,
/// then takes ~40 ms instead of a round trip.
async fn tcp(target: &Target) -> Result<tokio::net::TcpStream, String> {
    let socket = tokio::net::TcpStream::connect((target.host.as_str(), target.port))
        .await
        .map_err(|e| format!("connecting to {}:{}: {e}", target.host, target.port))?;
    socket
        .set_nodelay(true)
        .map_err(|e| format!("setting TCP_NODELAY: {e}"))?;
    Ok(socket)
}

/// Why a management request failed: the link (worth one immediate retry on a
/// new link) or the service's answer.
pub(super) enum Failure {
    Link(String),
    Answer(QueueError),
    /// `com.microsoft:server-busy`: the send pause is set; try after it.
    Busy(QueueError),
}

/// A link that could not be attached: a refusal the service names (no such
/// entity, no right) is final; busy, timed out or over quota is the
/// service's answer about this link, retryable, and leaves the connection
/// (and everything in flight on it) alone; anything else may be the
/// connection, so the next operation opens a new one.
/// Runs `op` (an attach, a token put) on the connection's session, in a
/// task of its own, within `wait` (the wait for the session included). The
/// session is locked meanwhile, so one the service never answers would
/// stall every link of the connection: past `wait` the connection is marked
/// broken and the next operation makes a new one. The caller may stop
/// waiting sooner (its own time limit, a dropped future) without cutting
/// `op` off half-way, which would leave a half-made link on the session and
/// the connection never given up.
async fn on_session<T: Send + 'static>(
    live: &Arc<Live>,
    wait: Duration,
    what: &str,
    op: impl for<'a> FnOnce(&'a mut SessionHandle<()>) -> futures::future::BoxFuture<'a, T>
    + Send
    + 'static,
) -> Result<T, QueueError> {
    let owned = live.clone();
    let task_what = what.to_owned();
    let task = tokio::spawn(async move {
        let done = tokio::time::timeout(wait, async {
            let mut session = owned.session.lock().await;
            op(&mut session).await
        })
        .await;
        done.map_err(|_| {
            owned.mark_broken();
            QueueError::Unavailable(format!(
                "{task_what}: no answer from the service within {wait:?}; leaving the connection"
            ))
        })
    });
    task.await
        .map_err(|e| QueueError::Unavailable(format!("{what}: {e}")))?
}

fn attach_failure(live: &Live, detail: &str, what: &str) -> QueueError {
    match errors::kind_in_text(detail) {
        kind @ (Kind::NotFound
        | Kind::Unauthorized
        | Kind::Refused
        | Kind::ServerBusy
        | Kind::Timeout
        | Kind::Quota) => errors::from_condition(kind, what, detail),
        _ => {
            live.mark_broken();
            QueueError::Unavailable(format!("{what}: {detail}"))
        }
    }
}

/// 410 is Service Bus's "lock lost"; 401 and 404 are named refusals; 408,
/// 429 and 5xx mean try again; other statuses are final answers.
fn management_error(e: MgmtError) -> QueueError {
    let text = format!("$management: {e}");
    match &e {
        MgmtError::Status(status) => match status.code.0.get() {
            410 => QueueError::LockLost,
            401 => errors::from_condition(Kind::Unauthorized, "$management", &e.to_string()),
            404 => errors::from_condition(Kind::NotFound, "$management", &e.to_string()),
            code if code >= 500 || code == 408 || code == 429 => QueueError::Unavailable(text),
            _ => QueueError::Fatal(text),
        },
        _ => QueueError::Unavailable(text),
    }
}

/// Put a token for each audience over a `$cbs` link attached for the
/// purpose and closed after; returns the earliest expiry.
async fn put_tokens(
    session: &mut SessionHandle<()>,
    tokens: &TokenSource,
    audiences: &[String],
) -> Result<chrono::DateTime<Utc>, String> {
    // A name of its own each time: a `$cbs` link whose close the service has
    // not finished must not make the next attach a duplicate.
    let mut cbs = CbsClient::builder()
        .client_node_addr(format!("cbs-rtpd-{}", Uuid::new_v4().simple()))
        .attach(session)
        .await
        .map_err(|e| format!("attaching $cbs: {e:?}"))?;
    let mut earliest: Option<chrono::DateTime<Utc>> = None;
    let mut result = Ok(());
    for audience in audiences {
        let token = match tokens.token(audience).await {
            Ok(t) => t,
            Err(e) => {
                result = Err(e);
                break;
            }
        };
        let cbs_token = CbsToken::new(
            token.value.expose_secret(),
            token.kind,
            Some(Timestamp::from_milliseconds(
                token.expires_at.timestamp_millis(),
            )),
        );
        if let Err(e) = cbs.put_token(audience.as_str(), cbs_token).await {
            result = Err(format!("cbs put-token for {audience}: {e:?}"));
            break;
        }
        earliest = Some(earliest.map_or(token.expires_at, |t| t.min(token.expires_at)));
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), cbs.close()).await;
    result?;
    earliest.ok_or_else(|| "no audience to put a token for".to_string())
}

/// How long to wait before re-putting a token that expires at `expires`.
fn refresh_wait(expires: chrono::DateTime<Utc>) -> Duration {
    let left = (expires - Utc::now()).to_std().unwrap_or_default();
    let margin = TOKEN_REFRESH_MARGIN.min(left / 4);
    left.saturating_sub(margin).max(Duration::from_secs(1))
}

/// Re-put every claimed audience's token before it expires; a failure marks
/// the connection broken so the next operation reconnects (and authenticates
/// afresh).
async fn refresh_tokens(live: Weak<Live>, tokens: TokenSource, mut expires: chrono::DateTime<Utc>) {
    loop {
        tokio::time::sleep(refresh_wait(expires)).await;
        let Some(live) = live.upgrade() else { return };
        let audiences = live.claims.lock().await.clone();
        let token_source = tokens.clone();
        let put = on_session(
            &live,
            ATTACH_WAIT,
            "refreshing tokens on $cbs",
            move |session| {
                Box::pin(async move { put_tokens(session, &token_source, &audiences).await })
            },
        )
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r);
        match put {
            Ok(next) => expires = next,
            Err(e) => {
                tracing::warn!(error = %e, "service bus token refresh failed");
                live.mark_broken();
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_refreshed_well_before_they_expire() {
        let hour = refresh_wait(Utc::now() + chrono::TimeDelta::hours(1));
        assert!(hour <= Duration::from_secs(55 * 60) && hour > Duration::from_secs(54 * 60));
        let short = refresh_wait(Utc::now() + chrono::TimeDelta::seconds(8));
        assert!(short <= Duration::from_secs(6) && short >= Duration::from_secs(5));
        assert_eq!(refresh_wait(Utc::now()), Duration::from_secs(1));
    }
}
