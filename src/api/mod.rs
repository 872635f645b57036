//! The HTTP API (actix-web): ingest, transaction queries and replay, the
//! seed-compatible routes, and health.

pub mod error;
pub mod health;
pub mod ingest;
pub mod seed;
pub mod transactions;

use crate::app::Services;
use crate::auth::{API_KEY_HEADER, Auth, Principal};
use actix_web::{HttpRequest, web};
pub use error::ApiError;
use std::sync::Arc;

pub struct ApiState {
    pub services: Arc<Services>,
    pub auth: Auth,
}

impl ApiState {
    pub fn new(services: Arc<Services>, auth: Auth) -> ApiState {
        ApiState { services, auth }
    }

    pub fn vendor(&self, req: &HttpRequest) -> Result<Principal, ApiError> {
        let key = req
            .headers()
            .get(API_KEY_HEADER)
            .and_then(|v| v.to_str().ok());
        self.auth.vendor(key).ok_or(ApiError::Unauthenticated)
    }

    pub fn admin(&self, req: &HttpRequest) -> Result<Principal, ApiError> {
        if let Some(p) = self.auth.admin(bearer(req)) {
            return Ok(p);
        }
        // A valid vendor key on an operator route is a permission problem, not an identity one.
        if self.vendor(req).is_ok() {
            return Err(ApiError::Forbidden);
        }
        Err(ApiError::Unauthenticated)
    }

    /// Admin, or any vendor (for reading a vendor's own transactions).
    pub fn admin_or_vendor(&self, req: &HttpRequest) -> Result<Principal, ApiError> {
        match self.auth.admin(bearer(req)) {
            Some(p) => Ok(p),
            None => self.vendor(req),
        }
    }

    /// Health and metrics: open when `RTPD_PUBLIC_HEALTH` is true, else admin only.
    pub fn observer(&self, req: &HttpRequest) -> Result<(), ApiError> {
        if self.services.settings.public_health {
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

pub fn configure(cfg: &mut web::ServiceConfig, state: web::Data<ApiState>) {
    cfg.app_data(state)
        .app_data(
            web::QueryConfig::default()
                .error_handler(|e, _| ApiError::bad("invalid_query", e.to_string()).into()),
        )
        .app_data(
            web::PathConfig::default()
                .error_handler(|e, _| ApiError::bad("invalid_path", e.to_string()).into()),
        )
        .route("/v1/transactions", web::post().to(ingest::ingest))
        .route("/v1/transactions", web::get().to(transactions::list))
        .route("/v1/transactions/{id}", web::get().to(transactions::get))
        .route(
            "/v1/transactions/{id}/replay",
            web::post().to(transactions::replay),
        )
        .route("/metrics", web::get().to(seed::metrics))
        .route("/status", web::get().to(seed::status))
        .route("/transactions", web::get().to(seed::transactions))
        .route("/replay/{id}", web::post().to(seed::replay))
        .route("/healthz", web::get().to(health::healthz))
        .route("/readyz", web::get().to(health::readyz))
        .default_service(web::to(|| async {
            Err::<actix_web::HttpResponse, _>(ApiError::NotFound("no such route".into()))
        }));
}
