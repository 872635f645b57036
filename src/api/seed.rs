//! The seed's routes, same shapes as `transaction-queue-proxy`:
//! `GET /metrics`, `GET /status`, `GET /transactions?limit=N`, `POST /replay/{id}`.

use super::transactions::{do_replay, ledger_error, parse_limit, parse_replay_body};
use super::{ApiError, ApiState, health};
use crate::ledger::ListQuery;
use crate::metrics as prom;
use actix_web::{HttpRequest, HttpResponse, http::header, web};
use serde::Deserialize;
use serde_json::json;

/// JSON counts for a plain client; Prometheus text when the client asks for
/// text/plain or OpenMetrics.
pub async fn metrics(
    req: HttpRequest,
    state: web::Data<ApiState>,
) -> Result<HttpResponse, ApiError> {
    state.observer(&req)?;
    let accept = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let counts = state.ledger().counts().await;
    if accept.contains("text/plain") || accept.contains("application/openmetrics-text") {
        return Ok(HttpResponse::Ok()
            .content_type("text/plain; version=0.0.4; charset=utf-8")
            .body(prom::render(counts.as_ref().ok())));
    }
    let c = counts.map_err(ledger_error)?;
    Ok(HttpResponse::Ok().json(json!({
        "pending": c.pending,
        "processing": c.processing,
        "success": c.success,
        "failed": c.failed,
        "dead_letter": c.dead_letter,
        "total": c.total(),
    })))
}

pub async fn status(
    req: HttpRequest,
    state: web::Data<ApiState>,
) -> Result<HttpResponse, ApiError> {
    state.observer(&req)?;
    let deps = health::check_dependencies(&state.dependencies).await;
    let healthy = deps.values().all(|v| v == "connected");
    let body = json!({
        "status": if healthy { "healthy" } else { "degraded" },
        "database": deps.get("ledger").cloned().unwrap_or_default(),
        "dependencies": deps,
        "timestamp": crate::clock::now(),
    });
    Ok(if healthy {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    })
}

#[derive(Debug, Deserialize)]
pub struct SeedListParams {
    pub limit: Option<usize>,
}

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
        .map(|r| {
            json!({
                "transaction_id": r.transaction_id,
                "status": r.status,
                "retry_count": r.retry_count,
                "error_message": r.error_message,
                "created_at": r.created_at,
                "updated_at": r.updated_at,
            })
        })
        .collect();
    Ok(HttpResponse::Ok().json(rows))
}

pub async fn replay(
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Bytes,
    state: web::Data<ApiState>,
) -> Result<HttpResponse, ApiError> {
    let body = parse_replay_body(&body)?;
    do_replay(&req, &path, body, &state).await
}
