//! The HTTP API (actix-web): ingest, transaction queries and replay, the
//! seed-compatible routes, health, and the OpenAPI document. The route table
//! lives here, once: the server registers it and a test compares it with
//! `/openapi.json`.

pub mod client_addr;
pub mod console;
pub mod error;
pub mod health;
pub mod ingest;
pub mod limits;
pub mod openapi;
pub mod rejected;
pub mod seed;
pub mod transactions;

use crate::auth::{
    API_KEY_HEADER, Auth, Principal, SIGNATURE_HEADER, Signed, TIMESTAMP_HEADER, VENDOR_HEADER,
    WEBHOOK_ID_HEADER, WEBHOOK_SIGNATURE_HEADER, WEBHOOK_TIMESTAMP_HEADER,
};
use crate::config::Settings;
use crate::intake::Intake;
use crate::ledger::Ledger;
use crate::replay::Replayer;
use crate::wal::Log;
use actix_web::{
    HttpMessage, HttpRequest, Route,
    body::MessageBody,
    dev::{ServiceRequest, ServiceResponse},
    http::Method,
    http::StatusCode,
    middleware::Next,
    web,
};
pub use error::ApiError;
use governor::{
    DefaultKeyedRateLimiter, Quota, RateLimiter,
    clock::{Clock, DefaultClock},
};
use std::{net::IpAddr, num::NonZeroU32, sync::Arc};
use tokio::sync::Semaphore;

/// Requests to the probe routes (`/healthz`, `/readyz`, `/metrics`,
/// `/status`) handled at once: a pool of their own, so neither vendors nor
/// anonymous clients can starve the platform's probes, and probes cannot
/// take the vendors' slots.
pub const PROBE_IN_FLIGHT: usize = 16;

/// Routes served from the probe pool.
pub fn is_probe_route(path: &str) -> bool {
    matches!(path, "/healthz" | "/readyz" | "/metrics" | "/status")
}

/// Counts every answer to `POST /v1/transactions` in
/// `rtpd_ingest_requests{code, caller}`, once, whatever gave it: the
/// handler, or a limit in [`limits::guard`] before it (a 503 when the
/// in-flight pools are full, a 429, 431, 400, 415). The 5xx alert and the
/// workbook read this counter, so a load-shedding 503 must be in it.
/// Wrapped outside the guard (in `app.rs`, for the api role only); the
/// handler itself counts nothing. Also counted: a percent-encoded path the
/// router serves as the route (`/v1/%74ransactions`), a request whose
/// client went away before the answer (`499`, as nginx logs it), and a
/// handler that panicked (`500`: actix sends nothing then). Answers actix
/// gives before the app sees the request (408, 400 or 431 on the head)
/// never reach it and are not counted.
pub async fn count_ingest(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let ingest = req.method() == Method::POST && is_ingest_path(req.path());
    let mut unanswered = None;
    if ingest {
        let caller = IngestCaller::default();
        let h = req.headers();
        let presents = CREDENTIAL_HEADERS.iter().any(|n| h.contains_key(*n));
        caller
            .0
            .set(if presents { "unverified" } else { "anonymous" });
        req.extensions_mut().insert(caller.clone());
        unanswered = Some(Unanswered {
            caller,
            answered: false,
        });
    }
    let res = next.call(req).await;
    if let Some(u) = &mut unanswered {
        u.answered = true;
        let status = match &res {
            Ok(res) => res.status(),
            Err(e) => e.as_response_error().status_code(),
        };
        crate::metrics::ingest_answered(status.as_u16(), u.caller.0.get());
    }
    res
}

/// Whether `path` is the ingest route as the router reads it: percent-
/// decoded, so `/v1/%74ransactions` is the route too.
fn is_ingest_path(path: &str) -> bool {
    path == INGEST_PATH
        // The router decodes all but an encoded `/` (`%2F` is not a separator to it).
        || (path.contains('%')
            && !path.to_ascii_lowercase().contains("%2f")
            && percent_encoding::percent_decode_str(path)
                .decode_utf8()
                .is_ok_and(|p| p == INGEST_PATH))
}

/// Who an ingest request's caller turned out to be, for
/// `rtpd_ingest_requests{caller}`: set from the headers by
/// [`count_ingest`], then by the guard ([`note_caller`]) and by the
/// handler once a credential checks out.
#[derive(Clone, Default)]
pub struct IngestCaller(std::rc::Rc<std::cell::Cell<&'static str>>);

/// Records `caller` for the ingest counter, if the request is counted.
pub fn note_caller(req: &HttpRequest, caller: &'static str) {
    if let Some(c) = req.extensions().get::<IngestCaller>() {
        c.0.set(caller);
    }
}

/// An ingest request being served; dropped unanswered (the client went
/// away, or the handler panicked), it is counted as such.
struct Unanswered {
    caller: IngestCaller,
    answered: bool,
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        if !self.answered {
            let code = if std::thread::panicking() { 500 } else { 499 };
            crate::metrics::ingest_answered(code, self.caller.0.get());
        }
    }
}

/// The ingest route's path.
pub const INGEST_PATH: &str = "/v1/transactions";

/// Headers that carry a credential. Each may appear once; a request that
/// repeats one is refused rather than served by whichever copy came first.
const CREDENTIAL_HEADERS: &[&str] = &[
    "authorization",
    API_KEY_HEADER,
    VENDOR_HEADER,
    TIMESTAMP_HEADER,
    SIGNATURE_HEADER,
    WEBHOOK_ID_HEADER,
    WEBHOOK_TIMESTAMP_HEADER,
    WEBHOOK_SIGNATURE_HEADER,
];

/// Refuses credentials that could be read two ways: a repeated credential
/// header, or more than one scheme at once (say an API key and a Bearer
/// token: serving that as the stronger of the two would let whichever check
/// runs first decide).
pub fn check_credential_headers(req: &HttpRequest) -> Result<(), ApiError> {
    let h = req.headers();
    for name in CREDENTIAL_HEADERS {
        if h.get_all(*name).nth(1).is_some() {
            return Err(ApiError::bad(
                "duplicate_credentials",
                format!(
                    "the {name} header appears more than once; send each credential header once"
                ),
            ));
        }
    }
    let schemes = [
        h.contains_key("authorization"),
        h.contains_key(API_KEY_HEADER),
        [VENDOR_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER]
            .iter()
            .any(|n| h.contains_key(*n)),
        [
            WEBHOOK_ID_HEADER,
            WEBHOOK_TIMESTAMP_HEADER,
            WEBHOOK_SIGNATURE_HEADER,
        ]
        .iter()
        .any(|n| h.contains_key(*n)),
    ];
    if schemes.iter().filter(|s| **s).count() > 1 {
        return Err(ApiError::bad(
            "ambiguous_credentials",
            "send one kind of credential: Authorization: Bearer, X-Api-Key, X-Rtpd-* signature headers, or webhook-* signature headers",
        ));
    }
    Ok(())
}

pub struct ApiState {
    pub settings: Settings,
    pub auth: Auth,
    pub intake: Intake,
    pub replayer: Replayer,
    /// Rejected inbound calls, for forensics.
    pub rejected: Log,
    pub dependencies: health::Dependencies,
    /// Per-vendor request rate; `None` when `RTPD_VENDOR_RATE_PER_SEC=0`.
    limiter: Option<DefaultKeyedRateLimiter<String>>,
    /// Requests handled at once, across workers (`RTPD_MAX_IN_FLIGHT`).
    pub in_flight: Arc<Semaphore>,
    /// Requests without a credential that checks out before the body
    /// (`RTPD_MAX_IN_FLIGHT_UNAUTHENTICATED`), apart from `in_flight`:
    /// anonymous ones, and signed ones until their signature verifies.
    pub unauthenticated: Arc<Semaphore>,
    /// The probe routes' own pool ([`PROBE_IN_FLIGHT`]).
    pub probes: Arc<Semaphore>,
    /// Limits per source address on callers without a verified credential.
    pub sources: limits::Sources,
    /// Which refused calls are written to `rejected/v1`.
    pub rejected_sampler: rejected::Sampler,
    /// The operations console (`None`: `RTPD_CONSOLE=false`).
    pub console: Option<Arc<console::ConsoleState>>,
}

/// Who a request is, as far as can be told before its body: which
/// in-flight pool it waits in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// An admin token or an API key that checks out (or auth is off).
    Credentialed,
    /// Well-formed signature headers: verified only with the body.
    Signed,
    /// Anonymous, or a wrong key, token or signature header.
    Other,
}

/// The authenticated vendor of a request, kept in its extensions so a
/// rejection after authentication can still name the vendor.
#[derive(Debug, Clone)]
pub struct CallerVendor(pub String);

/// The replay-cache entry of a signed request's verified signature.
#[derive(Clone, Copy)]
struct SignatureUsed(crate::auth::ReplayKey);

/// How a vendor authenticates this request.
pub enum VendorCheck<'a> {
    Done(Principal),
    /// A signature over the body: verify once the body is read.
    NeedsBody(Signed<'a>),
}

fn header<'a>(req: &'a HttpRequest, name: &str) -> Option<&'a str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

fn signed_headers(req: &HttpRequest) -> Option<Signed<'_>> {
    let (v, t, s) = (
        header(req, VENDOR_HEADER),
        header(req, TIMESTAMP_HEADER),
        header(req, SIGNATURE_HEADER),
    );
    if v.is_none() && t.is_none() && s.is_none() {
        return webhook_headers(req);
    }
    Some(Signed {
        vendor: v.unwrap_or(""),
        timestamp: t.unwrap_or(""),
        signature: s.unwrap_or(""),
        webhook_id: None,
    })
}

/// Standard Webhooks headers, when there are no `X-Rtpd-*` ones.
fn webhook_headers(req: &HttpRequest) -> Option<Signed<'_>> {
    let (id, t, s) = (
        header(req, WEBHOOK_ID_HEADER),
        header(req, WEBHOOK_TIMESTAMP_HEADER),
        header(req, WEBHOOK_SIGNATURE_HEADER),
    );
    if id.is_none() && t.is_none() && s.is_none() {
        return None;
    }
    Some(Signed {
        vendor: "",
        timestamp: t.unwrap_or(""),
        signature: s.unwrap_or(""),
        webhook_id: Some(id.unwrap_or("")),
    })
}

fn now_unix() -> i64 {
    crate::clock::now().timestamp()
}

impl ApiState {
    pub fn new(
        settings: Settings,
        auth: Auth,
        intake: Intake,
        replayer: Replayer,
        rejected: Log,
        dependencies: health::Dependencies,
    ) -> ApiState {
        let s = &settings;
        let limiter = NonZeroU32::new(s.vendor_rate_per_sec).map(|rate| {
            let burst = NonZeroU32::new(s.vendor_rate_burst).unwrap_or(rate);
            RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst))
        });
        let in_flight = Arc::new(Semaphore::new(s.max_in_flight));
        let unauthenticated = Arc::new(Semaphore::new(s.max_in_flight_unauthenticated));
        let sources = limits::Sources::new(limits::SourceLimits {
            rate_per_sec: s.unauthenticated_rate_per_sec,
            burst: s.unauthenticated_rate_burst,
            unverified: s.unverified_per_source(),
            vouched: s.max_in_flight / 4,
        });
        let console = s.console.then(|| {
            Arc::new(console::ConsoleState::new(
                replayer.clone(),
                &s.console_redact,
            ))
        });
        ApiState {
            console,
            unauthenticated,
            probes: Arc::new(Semaphore::new(PROBE_IN_FLIGHT)),
            sources,
            rejected_sampler: rejected::Sampler::default(),
            settings,
            auth,
            intake,
            replayer,
            rejected,
            dependencies,
            limiter,
            in_flight,
        }
    }

    /// Which pool the request waits in (see [`limits`]): an admin token or
    /// an API key checks out before the body; signature headers of a
    /// signing vendor with a fresh timestamp only say the request may be
    /// signed — anyone can forge them — so it waits with the
    /// unauthenticated until [`ApiState::vendor_signed`] (or
    /// [`ApiState::vendor`], for a request without a body) verifies it.
    /// With `RTPD_AUTH=none` every request is credentialed.
    pub fn caller(&self, req: &HttpRequest) -> Caller {
        if !self.auth.is_enabled() {
            return Caller::Credentialed;
        }
        let ok = if let Some(token) = bearer(req) {
            self.auth.admin(Some(token)).is_some()
        } else if req.path().starts_with("/console/") || req.path() == "/console" {
            // A console session holds an admin token.
            console::session_of(self, req).is_some()
        } else {
            match signed_headers(req) {
                Some(s) => {
                    return match self.auth.precheck_signed(&s, now_unix()) {
                        Ok(()) => Caller::Signed,
                        Err(_) => Caller::Other,
                    };
                }
                None => self.auth.vendor_by_key(header(req, API_KEY_HEADER)).is_ok(),
            }
        };
        if ok {
            Caller::Credentialed
        } else {
            Caller::Other
        }
    }

    /// The client address of the request: its TCP peer, or the address a
    /// trusted proxy forwarded it for ([`client_addr`]). `None` for a peer
    /// without an IP address (a Unix socket).
    pub fn client_ip(&self, req: &HttpRequest) -> Option<IpAddr> {
        let peer = req.peer_addr()?.ip();
        Some(client_addr::client_ip(
            peer,
            req.headers(),
            &self.settings.trusted_proxies,
            self.settings.trusted_proxy_hops,
        ))
    }

    pub fn ledger(&self) -> &Arc<dyn Ledger> {
        &self.intake.ledger
    }

    /// A vendor on a request without a body: an API key, or a signature over
    /// `timestamp + "." + METHOD + " " + path?query`.
    pub fn vendor(&self, req: &HttpRequest) -> Result<Principal, ApiError> {
        let p = match signed_headers(req) {
            Some(s) if self.auth.is_enabled() => {
                let target = req
                    .uri()
                    .path_and_query()
                    .map_or(req.path(), |pq| pq.as_str());
                let content = format!("{} {target}", req.method());
                self.auth.verify_signed(&s, content.as_bytes(), now_unix())
            }
            _ => self.auth.vendor_by_key(header(req, API_KEY_HEADER)),
        }
        .map_err(ApiError::Unauthenticated)?;
        self.admit(req, p)
    }

    /// The first half of a vendor check on a request with a body: an API key
    /// is checked now; a signature's headers and timestamp are checked now
    /// and the signature itself by [`ApiState::vendor_signed`] after the read.
    pub fn vendor_before_body<'a>(
        &self,
        req: &'a HttpRequest,
    ) -> Result<VendorCheck<'a>, ApiError> {
        match signed_headers(req) {
            Some(s) if self.auth.is_enabled() => {
                self.auth
                    .precheck_signed(&s, now_unix())
                    .map_err(ApiError::Unauthenticated)?;
                Ok(VendorCheck::NeedsBody(s))
            }
            _ => {
                let p = self
                    .auth
                    .vendor_by_key(header(req, API_KEY_HEADER))
                    .map_err(ApiError::Unauthenticated)?;
                self.admit(req, p).map(VendorCheck::Done)
            }
        }
    }

    pub fn vendor_signed(
        &self,
        req: &HttpRequest,
        s: &Signed<'_>,
        body: &[u8],
    ) -> Result<Principal, ApiError> {
        let from = self.client_ip(req).map(rejected::source_of);
        let (p, key) = self
            .auth
            .verify_signed_keyed(s, body, now_unix(), from)
            .map_err(ApiError::Unauthenticated)?;
        // Refused from here on (429, 503 — in admit or later in ingest), the
        // request had no effect: ingest forgets the signature then, so the
        // vendor's identical retry is not a replay.
        req.extensions_mut().insert(SignatureUsed(key));
        self.admit_vouching(req, p, |_| key.vouches())
    }

    /// Forgets the signature of a signed request that is answered `status`,
    /// if that answer means the request had no effect and should be retried.
    pub fn forget_signature_if_refused(&self, req: &HttpRequest, status: StatusCode) {
        if !(status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS) {
            return;
        }
        let key = req.extensions().get::<SignatureUsed>().map(|k| k.0);
        if let Some(key) = key {
            self.auth.forget_signature(key);
        }
    }

    /// Remembers who the vendor is and applies its rate limit. A signed
    /// request, verified now, moves to the vendors' in-flight pool.
    fn admit(&self, req: &HttpRequest, p: Principal) -> Result<Principal, ApiError> {
        self.admit_vouching(req, p, |vendor| self.auth.vendor_fingerprint(vendor))
    }

    /// [`ApiState::admit`]; a signed request verified now vouches for its
    /// address under the vendor's credential fingerprint `vouch(vendor)`,
    /// if any — asked only then, so an API-key request computes none.
    fn admit_vouching(
        &self,
        req: &HttpRequest,
        p: Principal,
        vouch: impl FnOnce(&str) -> Option<[u8; 32]>,
    ) -> Result<Principal, ApiError> {
        let Some(vendor) = p.vendor() else {
            return Ok(p);
        };
        // Verified: counted as credentialed whatever comes next (a full
        // vendors' pool's 503 is one the 5xx alert must see).
        note_caller(req, "credentialed");
        let in_flight = req.extensions().get::<limits::InFlight>().cloned();
        if let Some(in_flight) = in_flight
            && in_flight.promote(&self.in_flight)?
            && let Some(fingerprint) = vouch(vendor)
            && let Some(client) = self.client_ip(req)
        {
            self.sources
                .vouch(rejected::source_of(client), vendor, fingerprint);
        }
        req.extensions_mut().insert(CallerVendor(vendor.to_owned()));
        if let Some(limiter) = &self.limiter
            && let Err(not_until) = limiter.check_key(&vendor.to_owned())
        {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            tracing::warn!(vendor, "vendor over its rate limit");
            return Err(ApiError::TooManyRequests {
                retry_after_secs: u32::try_from(wait.as_secs()).unwrap_or(u32::MAX).max(1),
            });
        }
        Ok(p)
    }

    pub fn admin(&self, req: &HttpRequest) -> Result<Principal, ApiError> {
        if let Some(p) = self.auth.admin(bearer(req)) {
            note_caller(req, "credentialed");
            return Ok(p);
        }
        // A valid vendor credential on an operator route is a permission problem, not an identity one.
        match self.vendor(req) {
            Ok(_) => Err(ApiError::Forbidden),
            Err(ApiError::Unauthenticated(f)) => Err(ApiError::Unauthenticated(f)),
            Err(other) => Err(other),
        }
    }

    /// Admin, or any vendor (for reading a vendor's own transactions).
    pub fn admin_or_vendor(&self, req: &HttpRequest) -> Result<Principal, ApiError> {
        match self.auth.admin(bearer(req)) {
            Some(p) => Ok(p),
            None => self.vendor(req),
        }
    }

    /// Health probes: open when `RTPD_PUBLIC_HEALTH` is true, else admin only.
    pub fn observer(&self, req: &HttpRequest) -> Result<(), ApiError> {
        if self.settings.public_health {
            return Ok(());
        }
        self.admin(req).map(|_| ())
    }

    /// `/metrics` and `/status`: admin only unless `RTPD_PUBLIC_METRICS` is true.
    pub fn metrics_reader(&self, req: &HttpRequest) -> Result<(), ApiError> {
        if self.settings.public_metrics {
            return Ok(());
        }
        self.admin(req).map(|_| ())
    }
}

/// The token of `Authorization: Bearer <token>`; the scheme name is
/// case-insensitive (RFC 9110, section 11.1).
fn bearer(req: &HttpRequest) -> Option<&str> {
    let value = header(req, "authorization")?;
    let (scheme, token) = value.trim_start().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Puts a handler on a route whose method is already set, so one table
/// entry serves GET and HEAD alike.
type Handler = fn(Route) -> Route;

/// Health and metrics only: what `rtpd processor` serves for probes.
pub fn configure_health(cfg: &mut web::ServiceConfig, state: web::Data<ApiState>) {
    cfg.app_data(state);
    let table: Vec<(&'static str, Method, Handler)> = vec![
        ("/metrics", Method::GET, |r| r.to(seed::metrics)),
        ("/status", Method::GET, |r| r.to(seed::status)),
        ("/healthz", Method::GET, |r| r.to(health::healthz)),
        ("/readyz", Method::GET, |r| r.to(health::readyz)),
    ];
    register(cfg, table);
}

/// Every route the server serves: path (actix and OpenAPI share the `{id}`
/// syntax), method, handler. Each GET route also answers HEAD, and every
/// path answers OPTIONS (see [`register`]).
pub fn routes() -> Vec<(&'static str, Method, Handler)> {
    vec![
        (INGEST_PATH, Method::POST, |r| r.to(ingest::ingest)),
        ("/v1/transactions", Method::GET, |r| {
            r.to(transactions::list)
        }),
        ("/v1/transactions/{id}", Method::GET, |r| {
            r.to(transactions::get)
        }),
        ("/v1/transactions/{id}/replay", Method::POST, |r| {
            r.to(transactions::replay)
        }),
        ("/metrics", Method::GET, |r| r.to(seed::metrics)),
        ("/status", Method::GET, |r| r.to(seed::status)),
        ("/transactions", Method::GET, |r| r.to(seed::transactions)),
        ("/replay/{id}", Method::POST, |r| r.to(seed::replay)),
        ("/healthz", Method::GET, |r| r.to(health::healthz)),
        ("/readyz", Method::GET, |r| r.to(health::readyz)),
        ("/openapi.json", Method::GET, |r| r.to(openapi::serve)),
    ]
}

/// Registers a route table: each path once, HEAD beside every GET (RFC 9110
/// requires it; actix sends HEAD the GET answer's headers without its body),
/// OPTIONS answered 204 with `Allow` and no CORS headers (the API is for
/// servers, not browsers), any other method 405, any other path 404.
fn register(cfg: &mut web::ServiceConfig, mut table: Vec<(&'static str, Method, Handler)>) {
    let mut paths: Vec<&'static str> = Vec::new();
    for (p, _, _) in &table {
        if !paths.contains(p) {
            paths.push(p);
        }
    }
    for path in paths {
        let mut resource = web::resource(path).default_service(web::to(|| async {
            Err::<actix_web::HttpResponse, _>(ApiError::MethodNotAllowed)
        }));
        let mut allow: Vec<String> = Vec::new();
        for (_, method, handler) in table.extract_if(.., |(p, _, _)| *p == path) {
            if method == Method::GET {
                resource = resource.route(handler(web::route().method(Method::HEAD)));
                allow.push("HEAD".into());
            }
            allow.push(method.to_string());
            resource = resource.route(handler(web::route().method(method.clone())));
        }
        allow.push("OPTIONS".into());
        let allow = allow.join(", ");
        resource = resource.route(web::route().method(Method::OPTIONS).to(move || {
            let allow = allow.clone();
            async move {
                actix_web::HttpResponse::NoContent()
                    .insert_header((actix_web::http::header::ALLOW, allow))
                    .finish()
            }
        }));
        cfg.service(resource);
    }
    cfg.default_service(web::to(|| async {
        Err::<actix_web::HttpResponse, _>(ApiError::NotFound("no such route".into()))
    }));
}

/// `(METHOD, path)` of every served route.
pub fn served_routes() -> Vec<(Method, &'static str)> {
    routes().into_iter().map(|(p, m, _)| (m, p)).collect()
}

pub fn configure(cfg: &mut web::ServiceConfig, state: web::Data<ApiState>) {
    if let Some(c) = &state.console {
        console::configure(cfg, c.clone());
    }
    cfg.app_data(state)
        .app_data(
            web::QueryConfig::default()
                .error_handler(|e, _| ApiError::bad("invalid_query", e.to_string()).into()),
        )
        .app_data(
            web::PathConfig::default()
                .error_handler(|e, _| ApiError::bad("invalid_path", e.to_string()).into()),
        );
    register(cfg, routes());
}
