//! Limits every request meets before its handler — the size of the request
//! line and headers (431), credentials that could be read two ways (400),
//! any `Content-Encoding` but `identity` (415), and the in-flight caps (503 +
//! `Retry-After`) — and, after the handler, the bookkeeping of refused calls:
//! one metric each, and a sampled forensics record for the ones worth
//! keeping.
//!
//! The in-flight cap is three pools, so no class of caller can starve
//! another: the probe routes have their own ([`super::PROBE_IN_FLIGHT`]);
//! requests whose credential checks out before the body share
//! `RTPD_MAX_IN_FLIGHT`; the rest (anonymous, wrong key or token) share
//! `RTPD_MAX_IN_FLIGHT_UNAUTHENTICATED`, after a per-source-address rate
//! limit (`RTPD_UNAUTHENTICATED_RATE_PER_SEC`, 429).
//!
//! Also enforced elsewhere: the body size and the body read timeout in
//! `ingest::read_body` (every route that reads a body, after its caller is
//! authenticated), the request-head timeout in the server builder
//! (`app.rs`), per-vendor rate limits in `ApiState::admit`.

use super::rejected::{self, BodySeen, RejectedCall};
use super::{ApiError, ApiState, CallerVendor};
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

fn call_record(req: &HttpRequest, status: u16, reason: &str) -> RejectedCall {
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
        remote_addr: req.peer_addr().map(|a| a.ip().to_string()),
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
        record(state, call_record(req.request(), status, err.reason())).await;
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
    let pool = if super::is_probe_route(req.path()) {
        &state.probes
    } else if state.presents_credential(req.request()) {
        &state.in_flight
    } else {
        if let Err(e) = state.admit_unauthenticated(req.request()) {
            return refuse(&state, req, e).await;
        }
        &state.unauthenticated
    };
    let Ok(_permit) = pool.clone().try_acquire_owned() else {
        metrics::api_rejected("busy");
        let err = ApiError::Unavailable {
            what: "the API (too many requests in flight)",
            retry_after_secs: 1,
        };
        return Ok(req
            .into_response(err.error_response())
            .map_into_right_body());
    };
    let res = next.call(req).await?;
    let status = res.status().as_u16();
    if (400..500).contains(&status) && status != 404 && status != 405 {
        let reason = res
            .response()
            .error()
            .and_then(|e| e.as_error::<ApiError>())
            .map_or_else(|| fallback_reason(status), ApiError::reason);
        metrics::api_rejected(reason);
        if rejected::is_recorded(status) {
            record(&state, call_record(res.request(), status, reason)).await;
        }
    }
    Ok(res.map_into_left_body())
}
