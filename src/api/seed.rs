//! The seed's routes, same shapes as `transaction-queue-proxy`:
//! `GET /metrics`, `GET /status`, `GET /transactions?limit=N`, `POST /replay/{id}`.

use super::transactions::{
    ReplayAccepted, ReplayBody, VendorParam, ledger_error, parse_limit, replay_route,
};
use super::{ApiError, ApiState, error::ErrorBody};
use crate::ledger::ListQuery;
use crate::metrics as prom;
use crate::transaction::{State, TransactionId};
use actix_web::{HttpRequest, HttpResponse, http::header, web};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use utoipa::{IntoParams, ToSchema};

/// Transactions by state (the seed's `/metrics`).
#[derive(Debug, Serialize, ToSchema)]
pub struct StateCounts {
    pub pending: u64,
    pub processing: u64,
    pub success: u64,
    pub failed: u64,
    pub dead_letter: u64,
    pub total: u64,
}

/// The seed's `/status`: `connected`, or `unavailable: <why>`, per dependency.
#[derive(Debug, Serialize, ToSchema)]
pub struct StatusReport {
    /// `healthy` or `degraded`.
    pub status: String,
    /// The ledger's state (the seed called it the database).
    pub database: String,
    pub dependencies: BTreeMap<String, String>,
    pub timestamp: chrono::DateTime<chrono::Utc>,
}

/// One row of the seed's `/transactions`.
#[derive(Debug, Serialize, ToSchema)]
pub struct SeedTransaction {
    #[schema(value_type = String)]
    pub transaction_id: TransactionId,
    /// Whose transaction it is (absent when authentication is off); the
    /// same id from two vendors is two transactions.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub vendor: Option<String>,
    pub status: State,
    pub retry_count: u32,
    pub error_message: Option<String>,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

/// JSON counts for a plain client; Prometheus text when the client asks for
/// text/plain or OpenMetrics.
#[utoipa::path(
    get,
    path = "/metrics",
    operation_id = "metrics",
    responses(
        (status = 200, description = "Counts by state; Prometheus text with Accept: text/plain", content(
            (StateCounts = "application/json"),
            (String = "text/plain")
        )),
        (status = 401, description = "Admin token required (unless RTPD_PUBLIC_METRICS=true)", body = ErrorBody),
        (status = 403, description = "A vendor credential on an operator route", body = ErrorBody),
    ),
    security((), ("AdminToken" = []))
)]
pub async fn metrics(
    req: HttpRequest,
    state: web::Data<ApiState>,
) -> Result<HttpResponse, ApiError> {
    state.metrics_reader(&req)?;
    let accept = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let counts = prom::observe_ledger(state.ledger().as_ref()).await;
    if accept.contains("text/plain") || accept.contains("application/openmetrics-text") {
        return Ok(HttpResponse::Ok()
            .content_type("text/plain; version=0.0.4; charset=utf-8")
            .body(prom::render()));
    }
    let c = counts.map_err(ledger_error)?;
    Ok(HttpResponse::Ok().json(StateCounts {
        pending: c.pending,
        processing: c.processing,
        success: c.success,
        failed: c.failed,
        dead_letter: c.dead_letter,
        total: c.total(),
    }))
}

/// Health of the service and each dependency (the seed's `/status`).
#[utoipa::path(
    get,
    path = "/status",
    operation_id = "status",
    responses(
        (status = 200, description = "Every dependency connected", body = StatusReport),
        (status = 503, description = "A dependency is unavailable", body = StatusReport),
        (status = 401, description = "Admin token required (unless RTPD_PUBLIC_METRICS=true)", body = ErrorBody),
        (status = 403, description = "A vendor credential on an operator route", body = ErrorBody),
    ),
    security((), ("AdminToken" = []))
)]
pub async fn status(
    req: HttpRequest,
    state: web::Data<ApiState>,
) -> Result<HttpResponse, ApiError> {
    state.metrics_reader(&req)?;
    let deps = state.dependencies.checked().await;
    let healthy = deps.values().all(|v| v == "connected");
    let body = StatusReport {
        status: if healthy { "healthy" } else { "degraded" }.into(),
        database: deps.get("ledger").cloned().unwrap_or_default(),
        dependencies: deps.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
        timestamp: crate::clock::now(),
    };
    Ok(if healthy {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    })
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SeedListParams {
    /// How many, 1–1000 (default 20).
    #[param(minimum = 1, maximum = 1000, default = 20)]
    pub limit: Option<usize>,
}

/// The most recently updated transactions (the seed's `/transactions`).
#[utoipa::path(
    get,
    path = "/transactions",
    operation_id = "seedTransactions",
    params(SeedListParams),
    responses(
        (status = 200, description = "Newest update first", body = Vec<SeedTransaction>),
        (status = 400, description = "Invalid limit", body = ErrorBody),
        (status = 401, description = "Missing or wrong credentials", body = ErrorBody),
        (status = 403, description = "A vendor credential on an operator route", body = ErrorBody),
    ),
    security(("AdminToken" = []))
)]
pub async fn transactions(
    req: HttpRequest,
    q: web::Query<SeedListParams>,
    state: web::Data<ApiState>,
) -> Result<HttpResponse, ApiError> {
    state.admin(&req)?;
    let page = state
        .ledger()
        .list(ListQuery {
            state: None,
            limit: parse_limit(Some(q.limit.unwrap_or(20)))?,
            cursor: None,
        })
        .await
        .map_err(ledger_error)?;
    let rows: Vec<_> = page
        .items
        .into_iter()
        .map(|r| SeedTransaction {
            transaction_id: r.transaction_id.vendor_id(),
            vendor: r.vendor,
            status: r.status,
            retry_count: r.retry_count,
            error_message: r.error_message,
            created_at: r.created_at,
            updated_at: r.updated_at,
        })
        .collect();
    Ok(HttpResponse::Ok().json(rows))
}

/// The seed's replay: back to `pending`, re-enqueued from the WAL.
#[utoipa::path(
    post,
    path = "/replay/{id}",
    operation_id = "seedReplay",
    params(("id" = String, Path, description = "Transaction id: 1–128 characters of A-Za-z0-9._:-", min_length = 1, max_length = 128, pattern = "^[A-Za-z0-9._:-]{1,128}$"), VendorParam),
    request_body(content = Option<ReplayBody>, content_type = "application/json"),
    responses(
        (status = 202, description = "Reset to pending and re-enqueued from the WAL", body = ReplayAccepted),
        (status = 400, description = "Invalid id or body, or force without a reason or an expected_state", body = ErrorBody),
        (status = 401, description = "Missing or wrong credentials", body = ErrorBody),
        (status = 403, description = "A vendor credential on an operator route", body = ErrorBody),
        (status = 404, description = "No such transaction", body = ErrorBody),
        (status = 409, description = "Not replayable now (a success without force, a lapsed claim whose success is journaled without force, a live claim, or another state than expected_state)", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
    ),
    security(("AdminToken" = []))
)]
pub async fn replay(
    req: HttpRequest,
    path: web::Path<String>,
    q: web::Query<VendorParam>,
    payload: web::Payload,
    state: web::Data<ApiState>,
) -> Result<HttpResponse, ApiError> {
    replay_route(&req, &path, q.vendor.as_deref(), payload, &state).await
}
