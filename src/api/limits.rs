//! Limits every request meets before its handler — the size of the request
//! line and headers (431) and the process-wide in-flight cap (503 +
//! `Retry-After`) — and, after the handler, the bookkeeping of refused calls:
//! one metric each, and a forensics record for the ones worth keeping.
//!
//! Also enforced elsewhere: the body size and the body read timeout in
//! `ingest::read_body`, the request-head timeout in the server builder
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
        let err = ApiError::HeadersTooLarge { limit };
        metrics::api_rejected(err.reason());
        let call = call_record(req.request(), 431, err.reason());
        rejected::record(&state.rejected, call).await;
        return Ok(req
            .into_response(err.error_response())
            .map_into_right_body());
    }
    let Ok(_permit) = state.in_flight.clone().try_acquire_owned() else {
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
            let call = call_record(res.request(), status, reason);
            rejected::record(&state.rejected, call).await;
        }
    }
    Ok(res.map_into_left_body())
}
