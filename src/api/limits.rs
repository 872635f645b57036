//! Limits every request meets before its handler — the size of the request
//! line and headers (431), credentials that could be read two ways (400),
//! any `Content-Encoding` but `identity` (415), and the in-flight caps (503 +
//! `Retry-After`) — and, after the handler, the bookkeeping of refused calls:
//! one metric each, and a sampled forensics record for the ones worth
//! keeping.
//!
//! The in-flight cap is three pools, so no class of caller can starve
//! another: the probe routes have their own ([`super::PROBE_IN_FLIGHT`]),
//! except `/healthz`, which waits for no pool; requests whose credential
//! checks out before the body (an admin token, an API key) share
//! `RTPD_MAX_IN_FLIGHT`; the rest share `RTPD_MAX_IN_FLIGHT_UNAUTHENTICATED`.
//! Signed requests are among the rest until their signature verifies
//! (after the body): anyone can forge well-formed signature headers, so
//! they only then move to the vendors' pool ([`InFlight::promote`]).
//! Per source address ([`Sources`]; the client address of
//! [`super::client_addr`], behind a trusted proxy the one it forwarded):
//! anonymous requests meet a rate (`RTPD_UNAUTHENTICATED_RATE_PER_SEC`,
//! 429); signed ones not verified yet
//! hold at most `RTPD_MAX_UNVERIFIED_PER_SOURCE` of the unauthenticated
//! pool, so a few forging addresses cannot fill it, and those that end
//! unverified are charged to the rate — a genuine vendor's never are. An
//! address that sent a verified signature lately is vouched for: its signed
//! requests wait for their bodies in the vendors' pool, out of forgers'
//! reach, until one of them fails.
//!
//! Also enforced elsewhere: the body size and the body read timeout in
//! `ingest::read_body` (every route that reads a body, after its caller is
//! authenticated), the request-head timeout in the server builder
//! (`app.rs`), per-vendor rate limits in `ApiState::admit`.

use super::rejected::{self, BodySeen, RejectedCall};
use super::{ApiError, ApiState, Caller, CallerVendor};
use crate::auth::VENDOR_HEADER;
use crate::metrics;
use actix_web::{
    HttpMessage, HttpRequest, ResponseError,
    body::{EitherBody, MessageBody},
    dev::{ServiceRequest, ServiceResponse},
    http::header,
    middleware::Next,
    web,
};
use governor::{
    DefaultKeyedRateLimiter, Quota, RateLimiter,
    clock::{Clock, DefaultClock},
};
use std::collections::HashMap;
use std::collections::VecDeque;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// Sources tracked at most, in each map below; past it, the stale are dropped.
const MAX_TRACKED_SOURCES: usize = 100_000;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn retry_after(wait: Duration) -> ApiError {
    ApiError::TooManyRequests {
        retry_after_secs: u32::try_from(wait.as_secs_f64().ceil() as u64)
            .unwrap_or(u32::MAX)
            .max(1),
    }
}

/// How long a source address that sent a verified signature stays vouched
/// for; each verified signature renews it, any failed one ends it.
const VOUCHED_FOR: Duration = Duration::from_secs(600);

/// Limits per source address (an IPv4 address, an IPv6 /64), on callers
/// without a verified credential. Off (`None` rate) when
/// `RTPD_UNAUTHENTICATED_RATE_PER_SEC=0`, for a deployment behind a proxy
/// that cannot be trusted (`RTPD_TRUSTED_PROXIES`), where every caller has
/// the proxy's address.
pub struct Sources {
    rate: Option<DefaultKeyedRateLimiter<IpAddr>>,
    /// Evictions a source's newcomers may cause ([`Sources::evict_for`]),
    /// at the same rate as `rate` but apart from it, so that neither spends
    /// the other (a forger could empty its own `rate` with anonymous
    /// requests to stop evicting and queue for free; a genuine signer's
    /// evictions must not get it blocked).
    evictions: Option<DefaultKeyedRateLimiter<IpAddr>>,
    /// Sources with a signed request waiting for a place in the full
    /// unauthenticated pool: one each at most, so that no source can line
    /// up many waiters ahead of another's.
    queued: Arc<Mutex<std::collections::HashSet<IpAddr>>>,
    /// Signed requests not verified yet, in flight per source, waiting in
    /// the unauthenticated pool; at most `unverified_cap`
    /// (`RTPD_MAX_UNVERIFIED_PER_SOURCE`), so that a few forging addresses
    /// cannot fill that pool.
    unverified: Arc<Mutex<HashMap<IpAddr, usize>>>,
    unverified_cap: usize,
    /// Those signed requests, oldest first per source, each with the signal
    /// that gives its place up ([`Sources::evict_for`]).
    waiting: Arc<Mutex<Waiting>>,
    /// Sources that sent a verified signature lately: until when, by which
    /// vendor, under which of its credentials
    /// ([`crate::auth::Auth::vendor_fingerprint`]). A vouch no longer counts
    /// once that vendor is removed from the keys file or its keys change;
    /// other vendors' vouches stay.
    vouched: Mutex<HashMap<IpAddr, Vouch>>,
    /// Signed requests of vouched sources not verified yet, in flight per
    /// source, waiting in the vendors' pool; at most `vouched_cap`.
    vouched_in_flight: Arc<Mutex<HashMap<IpAddr, usize>>>,
    vouched_cap: usize,
    /// Sources whose signed requests failed faster than the rate allows:
    /// their signed requests are refused until then.
    blocked: Mutex<HashMap<IpAddr, Instant>>,
}

/// Why a source is vouched for ([`Sources::vouch`]).
struct Vouch {
    until: Instant,
    vendor: String,
    fingerprint: [u8; 32],
}

/// Where a signed request waits for its body.
pub enum Unverified {
    /// Its source sent a verified signature lately: in the vendors' pool.
    Vouched(SourceSlot),
    /// In the unauthenticated pool (no slot when the per-source limits are
    /// off).
    Pooled(Option<SourceSlot>),
}

/// The per-source limits, from the settings.
pub struct SourceLimits {
    pub rate_per_sec: u32,
    pub burst: u32,
    /// Signed requests of one source waiting in the unauthenticated pool.
    pub unverified: usize,
    /// Signed requests of one vouched source waiting in the vendors' pool.
    pub vouched: usize,
}

impl Sources {
    pub fn new(limits: SourceLimits) -> Sources {
        let quota = NonZeroU32::new(limits.rate_per_sec).map(|rate| {
            let burst = NonZeroU32::new(limits.burst).unwrap_or(rate);
            Quota::per_second(rate).allow_burst(burst)
        });
        Sources {
            rate: quota.map(RateLimiter::keyed),
            evictions: quota.map(RateLimiter::keyed),
            queued: Default::default(),
            unverified: Default::default(),
            unverified_cap: limits.unverified.max(1),
            waiting: Default::default(),
            vouched: Default::default(),
            vouched_in_flight: Default::default(),
            vouched_cap: limits.vouched.max(1),
            blocked: Default::default(),
        }
    }

    /// A request without a valid credential: one unit of its source's rate.
    pub fn admit_anonymous(&self, source: IpAddr) -> Result<(), ApiError> {
        let Some(rate) = &self.rate else {
            return Ok(());
        };
        let checked = rate.check_key(&source);
        if rate.len() > MAX_TRACKED_SOURCES {
            rate.retain_recent();
        }
        checked.map_err(|not_until| {
            tracing::debug!(%source, "unauthenticated requests over the per-source limit");
            retry_after(not_until.wait_time_from(DefaultClock::default().now()))
        })
    }

    /// A signed request whose signature is checked only after its body. It
    /// is not charged to the rate — a signing vendor signs every request,
    /// and a genuine signature is never charged — and none is admitted
    /// while its source's failures are over the rate. A source that sent a
    /// verified signature lately waits in the vendors' pool (at most
    /// `vouched_cap` at once), where forgers from other addresses cannot
    /// reach; any other waits in the unauthenticated pool, at most
    /// `RTPD_MAX_UNVERIFIED_PER_SOURCE` at once.
    pub fn admit_unverified(
        &self,
        source: IpAddr,
        current: impl Fn(&str) -> Option<[u8; 32]>,
    ) -> Result<Unverified, ApiError> {
        if self.rate.is_none() {
            return Ok(Unverified::Pooled(None));
        }
        let now = Instant::now();
        if let Some(until) = lock(&self.blocked).get(&source).copied()
            && until > now
        {
            tracing::debug!(%source, "signed requests refused: too many failed signatures");
            return Err(retry_after(until - now));
        }
        let vouched = lock(&self.vouched).get(&source).is_some_and(|v| {
            v.until > now && current(&v.vendor).is_some_and(|f| f == v.fingerprint)
        });
        if vouched && let Some(slot) = take(&self.vouched_in_flight, source, self.vouched_cap) {
            return Ok(Unverified::Vouched(slot));
        }
        match take(&self.unverified, source, self.unverified_cap) {
            Some(slot) => Ok(Unverified::Pooled(Some(slot))),
            None => {
                tracing::debug!(%source, "too many unverified signed requests from one source");
                Err(retry_after(Duration::from_secs(1)))
            }
        }
    }

    /// A signed request of `source` verified for `vendor`, whose
    /// credentials have `fingerprint`: its next ones wait in the vendors'
    /// pool for a while.
    pub fn vouch(&self, source: IpAddr, vendor: &str, fingerprint: [u8; 32]) {
        if self.rate.is_none() {
            return;
        }
        let now = Instant::now();
        let mut vouched = lock(&self.vouched);
        if vouched.len() > MAX_TRACKED_SOURCES {
            vouched.retain(|_, v| v.until > now);
        }
        vouched.insert(
            source,
            Vouch {
                until: now + VOUCHED_FOR,
                vendor: vendor.to_owned(),
                fingerprint,
            },
        );
    }

    /// A signed request has its place in the unauthenticated pool and waits
    /// for its body: from now on it may be told to give the place up
    /// ([`Sources::evict_for`]) — not while it waits for a place itself.
    fn waiting_for_body(&self, slot: &mut Option<SourceSlot>) {
        if let Some(slot) = slot {
            slot.eviction = Some(Waiting::enter(&self.waiting, slot.source));
        }
    }

    /// The unauthenticated pool is full and a signed request of `source`
    /// waits for a place: the oldest waiting signed request of the source
    /// holding the most places — if it holds at least as many as `source`
    /// does with this one — is told to give its place up. So forgers from
    /// a few addresses, each holding a share of the pool, cannot keep a
    /// signing vendor from another address out (issue 20, second review's
    /// finding 1); forgers from many addresses meet the newcomer as equals,
    /// and the oldest waiter goes first. True when one was told.
    pub fn evict_for(&self, source: IpAddr) -> bool {
        let counts = lock(&self.unverified);
        let own = counts.get(&source).copied().unwrap_or(0);
        let mut waiting = lock(&self.waiting);
        let now = Instant::now();
        // Only addresses with a request waiting for its body can give a
        // place up: at most one per place in the pool, however many
        // addresses wait for one (a seventh review: walking every counted
        // address made each waiter's poll cost grow with the waiters).
        let victim = waiting
            .by_source
            .iter()
            .filter_map(|(s, queue)| {
                let n = counts.get(s).copied().unwrap_or(0);
                (*s != source && n >= own.max(1)).then_some((s, n, queue))
            })
            .filter_map(|(s, n, queue)| {
                let (oldest, since, _) = queue.front()?;
                // A request gets this long for its body before it can be
                // told to give its place up: a genuine signer's body
                // arrives within it, however fast forgers churn.
                (now.duration_since(*since) >= EVICTABLE_AFTER).then_some((
                    n,
                    std::cmp::Reverse(*oldest),
                    *s,
                ))
            })
            .max()
            .map(|(_, _, s)| s);
        drop(counts);
        let Some(victim) = victim else {
            return false;
        };
        // Each eviction costs the newcomer's address a unit of its eviction
        // budget, so forgers cannot churn the pool faster than their
        // addresses' budgets allow (a reviewer's probe: 12 addresses,
        // ~2,000 evictions/s, none charged).
        if let Some(evictions) = &self.evictions {
            let checked = evictions.check_key(&source);
            if evictions.len() > MAX_TRACKED_SOURCES {
                evictions.retain_recent();
            }
            if checked.is_err() {
                return false;
            }
        }
        let Some(queue) = waiting.by_source.get_mut(&victim) else {
            return false;
        };
        let Some((_, _, signal)) = queue.pop_front() else {
            return false;
        };
        if queue.is_empty() {
            waiting.by_source.remove(&victim);
        }
        tracing::debug!(%victim, %source, "unauthenticated pool full: the oldest unverified request of the address holding most places gives it up");
        signal.notify_one();
        true
    }

    /// A place in the queue for a full pool, if `source` has none there.
    fn queue(&self, source: IpAddr) -> Option<Queued> {
        lock(&self.queued).insert(source).then(|| Queued {
            queued: self.queued.clone(),
            source,
        })
    }

    /// A signed request that ended with its signature unverified (refused,
    /// timed out, or never checked): charged to its source's rate; over it,
    /// the source's signed requests are refused until the rate allows again.
    /// The source is no longer vouched for.
    pub fn charge_unverified(&self, source: IpAddr) {
        let Some(rate) = &self.rate else {
            return;
        };
        lock(&self.vouched).remove(&source);
        if let Err(not_until) = rate.check_key(&source) {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            let now = Instant::now();
            let mut blocked = lock(&self.blocked);
            if blocked.len() > MAX_TRACKED_SOURCES {
                blocked.retain(|_, until| *until > now);
            }
            blocked.insert(source, now + wait);
        }
    }
}

/// One of `cap` places of `source` in `counts`, if one is free.
fn take(
    counts: &Arc<Mutex<HashMap<IpAddr, usize>>>,
    source: IpAddr,
    cap: usize,
) -> Option<SourceSlot> {
    let mut held = lock(counts);
    let n = held.entry(source).or_default();
    if *n >= cap {
        return None;
    }
    *n += 1;
    Some(SourceSlot {
        counts: counts.clone(),
        source,
        eviction: None,
    })
}

/// A source's one request waiting for a place in the full pool.
struct Queued {
    queued: Arc<Mutex<std::collections::HashSet<IpAddr>>>,
    source: IpAddr,
}

impl Drop for Queued {
    fn drop(&mut self) {
        lock(&self.queued).remove(&self.source);
    }
}

/// Signed requests waiting for their bodies in the unauthenticated pool,
/// oldest first per source, each with the signal that evicts it.
#[derive(Default)]
struct Waiting {
    next: u64,
    by_source: HashMap<IpAddr, VecDeque<(u64, Instant, Arc<Notify>)>>,
}

impl Waiting {
    fn enter(waiting: &Arc<Mutex<Waiting>>, source: IpAddr) -> Eviction {
        let mut w = lock(waiting);
        w.next += 1;
        let id = w.next;
        let signal = Arc::new(Notify::new());
        w.by_source
            .entry(source)
            .or_default()
            .push_back((id, Instant::now(), signal.clone()));
        Eviction {
            waiting: waiting.clone(),
            id,
            signal,
        }
    }
}

/// A waiting signed request's place in [`Waiting`]; left when dropped.
struct Eviction {
    waiting: Arc<Mutex<Waiting>>,
    id: u64,
    signal: Arc<Notify>,
}

/// One unverified signed request of a source, counted while it lives.
pub struct SourceSlot {
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
    source: IpAddr,
    /// In the unauthenticated pool: how it is told to give its place up.
    eviction: Option<Eviction>,
}

impl SourceSlot {
    pub fn source(&self) -> IpAddr {
        self.source
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        if let Some(e) = self.eviction.take() {
            let mut w = lock(&e.waiting);
            if let Some(queue) = w.by_source.get_mut(&self.source) {
                queue.retain(|(id, _, _)| *id != e.id);
                if queue.is_empty() {
                    w.by_source.remove(&self.source);
                }
            }
        }
        let mut counts = lock(&self.counts);
        if let Some(n) = counts.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.source);
            }
        }
    }
}

/// The in-flight slot a request holds, shared with its handler through the
/// request's extensions so that a signed request can move from the
/// unauthenticated pool to the vendors' once its signature verifies.
#[derive(Clone, Default)]
pub struct InFlight(Arc<Mutex<Held>>);

#[derive(Default)]
enum Held {
    /// `/healthz`, the request is over, or it was refused once its
    /// signature verified.
    #[default]
    Nothing,
    /// A slot the request keeps to its end (held, never read: dropping it
    /// gives the slot back).
    Kept(#[allow(dead_code)] OwnedSemaphorePermit),
    /// A signed request whose signature is not verified yet, in the
    /// unauthenticated pool.
    Unverified(
        #[allow(dead_code)] OwnedSemaphorePermit,
        #[allow(dead_code)] Option<SourceSlot>,
    ),
    /// A signed request whose signature is not verified yet, from a vouched
    /// source: already in the vendors' pool.
    Vouched(OwnedSemaphorePermit, #[allow(dead_code)] SourceSlot),
}

impl InFlight {
    fn holding(held: Held) -> InFlight {
        InFlight(Arc::new(Mutex::new(held)))
    }

    /// The signature verified: the request takes a slot in the vendors'
    /// pool (503 when it is full, with its unverified one given back and
    /// not charged: the signature is genuine) and gives back its unverified one (a
    /// vouched source's request keeps the vendor slot it has). True when
    /// the request was a signed one waiting for this.
    pub fn promote(&self, vendors: &Arc<Semaphore>) -> Result<bool, ApiError> {
        let mut held = lock(&self.0);
        match std::mem::take(&mut *held) {
            Held::Unverified(permit, slot) => match vendors.clone().try_acquire_owned() {
                Ok(permit) => *held = Held::Kept(permit),
                // Refused, but verified: it gives its unverified slot back
                // now and is not charged as unverified.
                Err(_) => {
                    drop((permit, slot));
                    return Err(busy());
                }
            },
            Held::Vouched(permit, _) => *held = Held::Kept(permit),
            other => {
                *held = other;
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The request was told to give its place up: it does so now (the
    /// place goes to the request waiting for it), and it is not charged to
    /// its address as a failed signature nor does it end a vouch — it may
    /// be a genuine signer's, evicted by forgers from other addresses.
    pub fn give_up(&self) {
        self.release();
    }

    /// Resolves when the request is told to give its place in the
    /// unauthenticated pool up ([`Sources::evict_for`]); never otherwise.
    pub async fn evicted(&self) {
        let signal = match &*lock(&self.0) {
            Held::Unverified(_, Some(slot)) => slot.eviction.as_ref().map(|e| e.signal.clone()),
            _ => None,
        };
        match signal {
            Some(s) => s.notified().await,
            None => std::future::pending().await,
        }
    }

    fn is_unverified(&self) -> bool {
        matches!(*lock(&self.0), Held::Unverified(..) | Held::Vouched(..))
    }

    fn release(&self) {
        *lock(&self.0) = Held::Nothing;
    }
}

/// Gives the slot back when the guard is done with the request, whichever
/// way it ends (the extensions may outlive it); a signed request that ends
/// with its signature unverified is charged to its source then — answered,
/// failed, or dropped because its client reset the connection (issue 20,
/// second review finding 3: a forger's RST escaped the charge and kept its
/// address vouched for).
struct Release {
    in_flight: InFlight,
    charge: Option<(web::Data<ApiState>, IpAddr)>,
}

impl Drop for Release {
    fn drop(&mut self) {
        if self.in_flight.is_unverified()
            && let Some((state, source)) = &self.charge
        {
            state.sources.charge_unverified(*source);
        }
        self.in_flight.release();
    }
}

/// Waits its turn for a place in the full unauthenticated pool (first come,
/// first served), asking every [`EVICT_POLL`] for a request that has held
/// its place long enough to give it up ([`Sources::evict_for`]): whoever
/// asks, the freed place goes to the head of the queue, so a newcomer is
/// served after at most one waiter per address (a sixth review: places
/// freed only by the forgers' own timing left a new signer out).
async fn wait_for_place(state: &ApiState, source: Option<IpAddr>) -> Option<OwnedSemaphorePermit> {
    let acquire = state.unauthenticated.clone().acquire_owned();
    tokio::pin!(acquire);
    loop {
        // A place that came meanwhile is taken before asking for another.
        if let Some(permit) = futures::FutureExt::now_or_never(&mut acquire) {
            return permit.ok();
        }
        if let Some(s) = source {
            state.sources.evict_for(s);
        }
        tokio::select! {
            biased;
            permit = &mut acquire => return permit.ok(),
            () = tokio::time::sleep(EVICT_POLL) => {}
        }
    }
}

/// How often a request waiting for a place asks for an eviction.
const EVICT_POLL: Duration = Duration::from_millis(100);

/// Whether the request says a body follows (only such a request waits for
/// one, and so can be told to give its place up while it does).
fn has_body(req: &ServiceRequest) -> bool {
    req.headers().contains_key(header::TRANSFER_ENCODING)
        || req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .is_some_and(|n| n > 0)
}

/// How long a signed request waits, in turn (the pool's waiters are served
/// first come, first served), for a place in a full unauthenticated pool.
const EVICTION_WAIT: Duration = Duration::from_secs(3);
/// How long a signed request holding a place in that pool is safe from
/// eviction ([`Sources::evict_for`]).
const EVICTABLE_AFTER: Duration = Duration::from_secs(1);

fn busy() -> ApiError {
    metrics::api_rejected("busy");
    ApiError::Unavailable {
        what: "the API (too many requests in flight)",
        retry_after_secs: 1,
    }
}

/// Bytes of the request line and headers, as they came over the wire.
fn head_size(req: &ServiceRequest) -> usize {
    let line = req.method().as_str().len() + req.uri().to_string().len() + 12;
    req.headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum::<usize>()
        + line
}

fn fallback_reason(status: u16) -> &'static str {
    match status {
        400 => "bad_request",
        408 => "request_timeout",
        413 => "payload_too_large",
        415 => "unsupported_media_type",
        _ => "client_error",
    }
}

fn call_record(state: &ApiState, req: &HttpRequest, status: u16, reason: &str) -> RejectedCall {
    let remote_addr = state.client_ip(req).map(|ip| ip.to_string());
    let ext = req.extensions();
    let seen = ext.get::<BodySeen>();
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    RejectedCall {
        v: 1,
        at: crate::clock::now(),
        status,
        reason: reason.to_owned(),
        method: req.method().to_string(),
        path: rejected::path_of(req.path()),
        vendor: ext.get::<CallerVendor>().map(|c| c.0.clone()),
        claimed_vendor: req
            .headers()
            .get(VENDOR_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(|v| rejected::truncate(v, 64)),
        size: seen.map(|s| s.size as u64).or(declared),
        sha256: seen.and_then(|s| s.sha256.clone()),
        remote_addr,
        suppressed: None,
    }
}

/// `Content-Encoding` on a request: only `identity` (no encoding) is
/// accepted. A compressed body would have to be inflated before its caller
/// is authenticated, and the signature covers the bytes as sent.
fn encoded(req: &ServiceRequest) -> bool {
    let mut values = req.headers().get_all(header::CONTENT_ENCODING);
    values.any(|v| {
        !v.to_str()
            .is_ok_and(|v| v.trim().eq_ignore_ascii_case("identity"))
    })
}

/// Answers `err` before the handler, with its metric and (sampled) record.
async fn refuse<B>(
    state: &ApiState,
    req: ServiceRequest,
    err: ApiError,
) -> Result<ServiceResponse<EitherBody<B>>, actix_web::Error> {
    metrics::api_rejected(err.reason());
    let status = err.status_code().as_u16();
    if rejected::is_recorded(status) {
        record(
            state,
            call_record(state, req.request(), status, err.reason()),
        )
        .await;
    }
    Ok(req
        .into_response(err.error_response())
        .map_into_right_body())
}

async fn record(state: &ApiState, call: RejectedCall) {
    if let Some(call) = state.rejected_sampler.admit(call) {
        rejected::record(&state.rejected, call).await;
    }
}

pub async fn guard(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    let Some(state) = req.app_data::<web::Data<ApiState>>().cloned() else {
        return next
            .call(req)
            .await
            .map(ServiceResponse::map_into_left_body);
    };
    let limit = state.settings.max_header_bytes;
    if head_size(&req) > limit {
        return refuse(&state, req, ApiError::HeadersTooLarge { limit }).await;
    }
    if let Err(e) = super::check_credential_headers(req.request()) {
        return refuse(&state, req, e).await;
    }
    if encoded(&req) {
        return refuse(&state, req, ApiError::UnsupportedContentEncoding).await;
    }
    let source = state.client_ip(req.request()).map(rejected::source_of);
    if let Some(peer) = req.peer_addr()
        && super::client_addr::forwarded_by_untrusted(
            peer.ip(),
            req.headers(),
            &state.settings.trusted_proxies,
        )
    {
        metrics::forwarded_for_ignored();
    }
    let acquire = |pool: &Arc<Semaphore>| pool.clone().try_acquire_owned().map_err(|_| busy());
    let free_place = |pool: &Arc<Semaphore>| pool.clone().try_acquire_owned().ok();
    let held = if req.path() == "/healthz" {
        // Liveness answers whatever else is busy.
        Ok(Held::Nothing)
    } else if super::is_probe_route(req.path()) {
        acquire(&state.probes).map(Held::Kept)
    } else {
        let caller = state.caller(req.request());
        super::note_caller(
            req.request(),
            match caller {
                Caller::Credentialed => "credentialed",
                Caller::Signed => "unverified",
                Caller::Other => "anonymous",
            },
        );
        match caller {
            Caller::Credentialed => acquire(&state.in_flight).map(Held::Kept),
            Caller::Signed => match source.map(|s| {
                state
                    .sources
                    .admit_unverified(s, |v| state.auth.vendor_fingerprint(v))
            }) {
                Some(Err(e)) => return refuse(&state, req, e).await,
                Some(Ok(Unverified::Vouched(slot))) => {
                    acquire(&state.in_flight).map(|p| Held::Vouched(p, slot))
                }
                Some(Ok(Unverified::Pooled(mut slot))) => {
                    let with_body = has_body(&req);
                    let place = match free_place(&state.unauthenticated) {
                        Some(p) => Some(p),
                        // Full. Perhaps a request of an address holding more
                        // places gives one up; either way this one waits its
                        // turn for the next free place (the pool's waiters
                        // are served first come, first served), one request
                        // per address at most.
                        None => match slot.as_ref().and_then(|s| state.sources.queue(s.source())) {
                            Some(_queued) => {
                                let source = slot.as_ref().map(SourceSlot::source);
                                tokio::time::timeout(EVICTION_WAIT, wait_for_place(&state, source))
                                    .await
                                    .ok()
                                    .flatten()
                            }
                            None => None,
                        },
                    };
                    match place {
                        Some(p) => {
                            if with_body {
                                state.sources.waiting_for_body(&mut slot);
                            }
                            Ok(Held::Unverified(p, slot))
                        }
                        None => Err(busy()),
                    }
                }
                None => acquire(&state.unauthenticated).map(|p| Held::Unverified(p, None)),
            },
            Caller::Other => {
                if let Some(Err(e)) = source.map(|s| state.sources.admit_anonymous(s)) {
                    return refuse(&state, req, e).await;
                }
                acquire(&state.unauthenticated).map(Held::Kept)
            }
        }
    };
    let in_flight = match held {
        Ok(held) => InFlight::holding(held),
        Err(err) => {
            return Ok(req
                .into_response(err.error_response())
                .map_into_right_body());
        }
    };
    req.extensions_mut().insert(in_flight.clone());
    let release = Release {
        in_flight,
        charge: source.map(|s| (state.clone(), s)),
    };
    let res = next.call(req).await?;
    drop(release);
    let status = res.status().as_u16();
    if (400..500).contains(&status) && status != 404 && status != 405 {
        let reason = res
            .response()
            .error()
            .and_then(|e| e.as_error::<ApiError>())
            .map_or_else(|| fallback_reason(status), ApiError::reason);
        metrics::api_rejected(reason);
        if rejected::is_recorded(status) {
            record(&state, call_record(&state, res.request(), status, reason)).await;
        }
    }
    Ok(res.map_into_left_body())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sources() -> Sources {
        Sources::new(SourceLimits {
            rate_per_sec: 10,
            burst: 10,
            unverified: 4,
            vouched: 4,
        })
    }

    #[test]
    fn a_vouch_counts_while_its_vendors_keys_stay_the_same() {
        let sources = sources();
        let src = IpAddr::from([10, 0, 0, 1]);
        sources.vouch(src, "acme", [1; 32]);
        let now = |vendor: &str| (vendor == "acme").then_some([1; 32]);
        assert!(matches!(
            sources.admit_unverified(src, now),
            Ok(Unverified::Vouched(_))
        ));
        // acme's keys changed since, or acme is gone.
        let rotated = |vendor: &str| (vendor == "acme").then_some([2; 32]);
        assert!(matches!(
            sources.admit_unverified(src, rotated),
            Ok(Unverified::Pooled(Some(_)))
        ));
        assert!(matches!(
            sources.admit_unverified(src, |_: &str| None),
            Ok(Unverified::Pooled(Some(_)))
        ));
    }

    #[test]
    fn a_full_pool_evicts_the_oldest_waiter_of_the_address_holding_most() {
        let sources = sources();
        let forger = IpAddr::from([10, 0, 0, 1]);
        let signer = IpAddr::from([10, 0, 0, 2]);
        let pooled = |src| match sources.admit_unverified(src, |_: &str| None) {
            Ok(Unverified::Pooled(slot)) => {
                let mut slot = slot;
                sources.waiting_for_body(&mut slot);
                slot.expect("a place")
            }
            _ => panic!("no place"),
        };
        let forged: Vec<_> = (0..3).map(|_| pooled(forger)).collect();
        let waiting = |src| {
            lock(&sources.waiting)
                .by_source
                .get(&src)
                .map_or(0, VecDeque::len)
        };
        // The forger holds more than the newcomer, but its requests are
        // still young: safe for their first second.
        let _newcomer = pooled(signer);
        assert!(!sources.evict_for(signer));
        assert_eq!(waiting(forger), 3);
        // Then it gives its oldest up.
        std::thread::sleep(EVICTABLE_AFTER + Duration::from_millis(50));
        assert!(sources.evict_for(signer));
        assert_eq!(waiting(forger), 2);
        let oldest = forged[0].eviction.as_ref().unwrap().signal.clone();
        let told = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
            .block_on(async {
                tokio::time::timeout(Duration::from_millis(10), oldest.notified())
                    .await
                    .is_ok()
            });
        assert!(told, "the oldest forged request was not told");
        // The forger evicts no one holding fewer places than it does.
        assert!(!sources.evict_for(forger));
        drop(forged);
        assert_eq!(waiting(forger), 0, "dropped slots leave the queue");
    }
}
