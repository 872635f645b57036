//! The HTTP API (actix-web): ingest, transaction queries and replay, the
//! seed-compatible routes, health, and the OpenAPI document. The route table
//! lives here, once: the server registers it and a test compares it with
//! `/openapi.json`.

pub mod error;
pub mod health;
pub mod ingest;
pub mod json;
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
use actix_web::{HttpMessage, HttpRequest, Route, http::Method, web};
pub use error::ApiError;
use governor::{
    DefaultKeyedRateLimiter, Quota, RateLimiter,
    clock::{Clock, DefaultClock},
};
use std::{num::NonZeroU32, sync::Arc};
use tokio::sync::Semaphore;

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
}

/// The authenticated vendor of a request, kept in its extensions so a
/// rejection after authentication can still name the vendor.
#[derive(Debug, Clone)]
pub struct CallerVendor(pub String);

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
        ApiState {
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
        let p = self
            .auth
            .verify_signed(s, body, now_unix())
            .map_err(ApiError::Unauthenticated)?;
        self.admit(req, p)
    }

    /// Remembers who the vendor is and applies its rate limit.
    fn admit(&self, req: &HttpRequest, p: Principal) -> Result<Principal, ApiError> {
        let Some(vendor) = p.vendor() else {
            return Ok(p);
        };
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

fn bearer(req: &HttpRequest) -> Option<&str> {
    req.headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// Health and metrics only: what `rtpd processor` serves for probes.
pub fn configure_health(cfg: &mut web::ServiceConfig, state: web::Data<ApiState>) {
    cfg.app_data(state)
        .route("/metrics", web::get().to(seed::metrics))
        .route("/status", web::get().to(seed::status))
        .route("/healthz", web::get().to(health::healthz))
        .route("/readyz", web::get().to(health::readyz))
        .default_service(web::to(|| async {
            Err::<actix_web::HttpResponse, _>(ApiError::NotFound("no such route".into()))
        }));
}

/// Every route the server serves: path (actix and OpenAPI share the `{id}`
/// syntax), method, handler.
pub fn routes() -> Vec<(&'static str, Method, Route)> {
    vec![
        (
            "/v1/transactions",
            Method::POST,
            web::post().to(ingest::ingest),
        ),
        (
            "/v1/transactions",
            Method::GET,
            web::get().to(transactions::list),
        ),
        (
            "/v1/transactions/{id}",
            Method::GET,
            web::get().to(transactions::get),
        ),
        (
            "/v1/transactions/{id}/replay",
            Method::POST,
            web::post().to(transactions::replay),
        ),
        ("/metrics", Method::GET, web::get().to(seed::metrics)),
        ("/status", Method::GET, web::get().to(seed::status)),
        (
            "/transactions",
            Method::GET,
            web::get().to(seed::transactions),
        ),
        ("/replay/{id}", Method::POST, web::post().to(seed::replay)),
        ("/healthz", Method::GET, web::get().to(health::healthz)),
        ("/readyz", Method::GET, web::get().to(health::readyz)),
        ("/openapi.json", Method::GET, web::get().to(openapi::serve)),
    ]
}

/// `(METHOD, path)` of every served route.
pub fn served_routes() -> Vec<(Method, &'static str)> {
    routes().into_iter().map(|(p, m, _)| (m, p)).collect()
}

pub fn configure(cfg: &mut web::ServiceConfig, state: web::Data<ApiState>) {
    cfg.app_data(state)
        .app_data(
            web::QueryConfig::default()
                .error_handler(|e, _| ApiError::bad("invalid_query", e.to_string()).into()),
        )
        .app_data(
            web::PathConfig::default()
                .error_handler(|e, _| ApiError::bad("invalid_path", e.to_string()).into()),
        );
    let mut table = routes();
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
        for (_, _, route) in table.extract_if(.., |(p, _, _)| *p == path) {
            resource = resource.route(route);
        }
        cfg.service(resource);
    }
    cfg.default_service(web::to(|| async {
        Err::<actix_web::HttpResponse, _>(ApiError::NotFound("no such route".into()))
    }));
}
