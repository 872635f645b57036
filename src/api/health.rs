//! `GET /healthz` (the process answers) and `GET /readyz` (every dependency answers).

use super::{ApiError, ApiState, error::ErrorBody};
use crate::ledger::Ledger;
use crate::queue::Queue;
use crate::wal::Log;
use actix_web::{HttpRequest, HttpResponse, web};
use serde::Serialize;
use std::{collections::BTreeMap, future::Future, sync::Arc, time::Duration};
use utoipa::ToSchema;

/// What `/readyz` and `/status` probe.
#[derive(Clone)]
pub struct Dependencies {
    pub wal: Log,
    pub ledger: Arc<dyn Ledger>,
    pub queue: Arc<dyn Queue>,
}

/// `{"status": "ok"}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Liveness {
    pub status: String,
}

/// Whether every dependency answers, and what each said.
#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    pub ready: bool,
    pub dependencies: BTreeMap<String, String>,
}

/// Liveness: the process answers.
#[utoipa::path(
    get,
    path = "/healthz",
    operation_id = "healthz",
    responses(
        (status = 200, description = "The process answers", body = Liveness),
        (status = 401, description = "Admin token required (RTPD_PUBLIC_HEALTH=false)", body = ErrorBody),
        (status = 403, description = "A vendor credential on an operator route", body = ErrorBody),
    ),
    security((), ("AdminToken" = []))
)]
pub async fn healthz(
    req: HttpRequest,
    state: web::Data<ApiState>,
) -> Result<HttpResponse, ApiError> {
    state.observer(&req)?;
    Ok(HttpResponse::Ok().json(Liveness {
        status: "ok".into(),
    }))
}

async fn probe<E: std::fmt::Display>(f: impl Future<Output = Result<(), E>>) -> String {
    match tokio::time::timeout(Duration::from_secs(2), f).await {
        Ok(Ok(())) => "connected".into(),
        Ok(Err(e)) => format!("unavailable: {e}"),
        Err(_) => "unavailable: timed out".into(),
    }
}

pub async fn check_dependencies(svc: &Dependencies) -> BTreeMap<&'static str, String> {
    let (wal, ledger, queue) = tokio::join!(
        probe(svc.wal.ping()),
        probe(svc.ledger.ping()),
        probe(svc.queue.ping())
    );
    BTreeMap::from([("wal", wal), ("ledger", ledger), ("queue", queue)])
}

/// Readiness: every dependency (WAL, ledger, queue) answers.
#[utoipa::path(
    get,
    path = "/readyz",
    operation_id = "readyz",
    responses(
        (status = 200, description = "Every dependency answers", body = Readiness),
        (status = 503, description = "A dependency does not answer", body = Readiness),
        (status = 401, description = "Admin token required (RTPD_PUBLIC_HEALTH=false)", body = ErrorBody),
        (status = 403, description = "A vendor credential on an operator route", body = ErrorBody),
    ),
    security((), ("AdminToken" = []))
)]
pub async fn readyz(
    req: HttpRequest,
    state: web::Data<ApiState>,
) -> Result<HttpResponse, ApiError> {
    state.observer(&req)?;
    let deps = check_dependencies(&state.dependencies).await;
    let ready = deps.values().all(|v| v == "connected");
    let body = Readiness {
        ready,
        dependencies: deps.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
    };
    Ok(if ready {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    })
}
