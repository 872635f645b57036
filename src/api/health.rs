//! `GET /healthz` (the process answers) and `GET /readyz` (every dependency answers).

use super::{ApiError, ApiState};
use crate::ledger::Ledger;
use crate::queue::Queue;
use crate::wal::Log;
use actix_web::{HttpRequest, HttpResponse, web};
use serde_json::json;
use std::{collections::BTreeMap, future::Future, sync::Arc, time::Duration};

/// What `/readyz` and `/status` probe.
#[derive(Clone)]
pub struct Dependencies {
    pub wal: Log,
    pub ledger: Arc<dyn Ledger>,
    pub queue: Arc<dyn Queue>,
}

pub async fn healthz(
    req: HttpRequest,
    state: web::Data<ApiState>,
) -> Result<HttpResponse, ApiError> {
    state.observer(&req)?;
    Ok(HttpResponse::Ok().json(json!({ "status": "ok" })))
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

pub async fn readyz(
    req: HttpRequest,
    state: web::Data<ApiState>,
) -> Result<HttpResponse, ApiError> {
    state.observer(&req)?;
    let deps = check_dependencies(&state.dependencies).await;
    let ready = deps.values().all(|v| v == "connected");
    let body = json!({ "ready": ready, "dependencies": deps });
    Ok(if ready {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    })
}
