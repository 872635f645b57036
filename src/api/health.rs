//! `GET /healthz` (the process answers) and `GET /readyz` (this replica is
//! set up to answer vendors).
//!
//! Readiness decides whether the platform sends this replica traffic. It
//! turns true once the replica has reached its WAL and its ledger (so a
//! replica or a new revision whose configuration, identity or network cannot
//! reach them never takes traffic) and stays true through later outages of
//! any dependency: those are shared by every replica, and taking them all out
//! of the load balancer would trade rtpd's own answers (a 503 with
//! Retry-After for the WAL or the ledger; a 202 with `enqueued: false` for
//! the queue, re-driven by the reconciler) for the platform's bare error.
//! The body, and `/status`, say what each dependency answered.
//!
//! Under a flood of probes: `/healthz` waits for no in-flight pool (see
//! `limits::guard`), so it answers whatever else is busy; `/readyz` and
//! `/status` share one dependency check per [`CHECK_REUSED_FOR`], made by
//! one request at a time.

use super::{ApiError, ApiState, error::ErrorBody};
use crate::ledger::Ledger;
use crate::queue::Queue;
use crate::wal::Log;
use actix_web::{HttpRequest, HttpResponse, web};
use serde::Serialize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::{collections::BTreeMap, future::Future, sync::Arc, time::Duration};
use tokio::time::Instant;
use utoipa::ToSchema;

/// How long one dependency check answers `/readyz` and `/status`: a flood
/// of probes costs one check a second, not one check each.
pub const CHECK_REUSED_FOR: Duration = Duration::from_secs(1);

/// What each dependency answered: `connected`, or `unavailable: <why>`.
pub type Checked = BTreeMap<&'static str, String>;

/// What `/readyz` and `/status` probe.
#[derive(Clone)]
pub struct Dependencies {
    pub wal: Log,
    pub ledger: Arc<dyn Ledger>,
    pub queue: Arc<dyn Queue>,
    /// Set once this replica has reached its WAL and its ledger.
    pub reached: Arc<AtomicBool>,
    last: Arc<LastCheck>,
}

/// The last check, and the right to make the next one.
#[derive(Default)]
struct LastCheck {
    result: std::sync::Mutex<Option<(Instant, Checked)>>,
    refreshing: tokio::sync::Mutex<()>,
}

impl Dependencies {
    pub fn new(wal: Log, ledger: Arc<dyn Ledger>, queue: Arc<dyn Queue>) -> Dependencies {
        Dependencies {
            wal,
            ledger,
            queue,
            reached: Default::default(),
            last: Default::default(),
        }
    }

    fn last(&self, max_age: Option<Duration>) -> Option<Checked> {
        let last = self.last.result.lock().unwrap_or_else(|p| p.into_inner());
        last.as_ref()
            .filter(|(at, _)| max_age.is_none_or(|age| at.elapsed() < age))
            .map(|(_, checked)| checked.clone())
    }

    /// What each dependency answered: the last check while it is younger
    /// than [`CHECK_REUSED_FOR`], else a new one. One caller at a time makes
    /// it; the others meanwhile get the last check (a hung dependency holds
    /// one probe, not every probe), or wait for it when there is none yet.
    pub async fn checked(&self) -> Checked {
        if let Some(fresh) = self.last(Some(CHECK_REUSED_FOR)) {
            return fresh;
        }
        let _refreshing = match self.last.refreshing.try_lock() {
            Ok(g) => g,
            Err(_) => {
                if let Some(last) = self.last(None) {
                    return last;
                }
                self.last.refreshing.lock().await
            }
        };
        // Made by another caller while this one waited.
        if let Some(fresh) = self.last(Some(CHECK_REUSED_FOR)) {
            return fresh;
        }
        let checked = check_dependencies(self).await;
        *self.last.result.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((Instant::now(), checked.clone()));
        checked
    }
}

/// Where the replica stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReadyStatus {
    /// Not ready: it has not reached its WAL and its ledger yet.
    Starting,
    /// Ready, every dependency answers.
    Ready,
    /// Ready, and a dependency does not answer now: vendors get rtpd's own
    /// answer for it (see the module comment).
    Degraded,
}

/// `{"status": "ok"}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Liveness {
    pub status: String,
}

/// Whether this replica should get traffic, and what each dependency said.
#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    pub ready: bool,
    pub status: ReadyStatus,
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

async fn check_dependencies(svc: &Dependencies) -> Checked {
    let (wal, ledger, queue) = tokio::join!(
        probe(svc.wal.ping()),
        // A ledger found without its intact mark (it lost its data) answers
        // but registers nothing until it is rebuilt: reported as unavailable.
        probe(async {
            svc.ledger.ping().await?;
            match svc.ledger.intact().await? {
                true => Ok(()),
                false => Err(crate::ledger::LedgerError::Lost(
                    "registrations refused until the rebuild marks it intact".into(),
                )),
            }
        }),
        probe(svc.queue.ping())
    );
    BTreeMap::from([("wal", wal), ("ledger", ledger), ("queue", queue)])
}

/// Readiness: 200 once this replica has reached its WAL and its ledger, and
/// from then on (`degraded` while a dependency does not answer).
#[utoipa::path(
    get,
    path = "/readyz",
    operation_id = "readyz",
    responses(
        (status = 200, description = "Ready (status ready or degraded)", body = Readiness),
        (status = 503, description = "Starting: the WAL or the ledger has not answered yet", body = Readiness),
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
    let deps = state.dependencies.checked().await;
    let connected = |k: &str| deps.get(k).is_some_and(|v| v == "connected");
    if connected("wal") && connected("ledger") {
        state.dependencies.reached.store(true, Ordering::Relaxed);
    }
    let ready = state.dependencies.reached.load(Ordering::Relaxed);
    let status = if !ready {
        ReadyStatus::Starting
    } else if deps.values().all(|v| v == "connected") {
        ReadyStatus::Ready
    } else {
        ReadyStatus::Degraded
    };
    // Anyone may ask when health is public; only an operator gets the
    // backends' own error text (hosts, entity names).
    let detailed = state.admin(&req).is_ok();
    let body = Readiness {
        ready,
        status,
        dependencies: deps
            .into_iter()
            .map(|(k, v)| {
                let v = if detailed || v == "connected" {
                    v
                } else {
                    "unavailable".to_owned()
                };
                (k.to_owned(), v)
            })
            .collect(),
    };
    Ok(if ready {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    })
}
