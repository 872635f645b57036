//! `POST /v1/transactions`: read and validate the request, hand it to
//! [`crate::intake`] (the durability step), and answer with a durability
//! receipt.

use super::rejected::BodySeen;
use super::{ApiError, ApiState, VendorCheck, error::ErrorBody};
use crate::intake::{Dependency, IntakeError, IntakeOutcome, Submission};
use crate::metrics;
use crate::trace_context;
use crate::transaction::{Sha256, State, TransactionId, TxRecord, WalRef};
use crate::validate;
use crate::wal::Source;
use actix_web::{HttpMessage, HttpRequest, HttpResponse, ResponseError, http::header, web};
use bytes::{Bytes, BytesMut};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::Serialize;
use std::time::{Duration, Instant};
use tracing::Instrument;
use utoipa::ToSchema;

/// Submit a transaction; a 2xx only once it is durable in the WAL.
#[utoipa::path(
    post,
    path = "/v1/transactions",
    operation_id = "ingestTransaction",
    request_body(content = TransactionPayload, content_type = "application/json"),
    params(
        ("Idempotency-Key" = Option<String>, Header, description = "The transaction id, when the body has none", min_length = 1, max_length = 128, pattern = "^[A-Za-z0-9._:-]{1,128}$"),
        ("X-Rtpd-Expires-At" = Option<String>, Header, description = "The payment's deadline (RFC 3339), when the body has no expires_at: no downstream call starts after it", format = DateTime),
    ),
    responses(
        (status = 202, description = "New transaction, durable and enqueued", body = Receipt),
        (status = 200, description = "Same id and same content as before: the existing receipt", body = Receipt),
        (status = 400, description = "Invalid JSON, a duplicate key, a bad or missing transaction id, an invalid expires_at", body = ErrorBody),
        (status = 401, description = "Missing or wrong vendor credentials", body = ErrorBody),
        (status = 408, description = "The body did not arrive within RTPD_REQUEST_TIMEOUT_SECS", body = ErrorBody),
        (status = 409, description = "Same id, different content: refused, nothing overwritten", body = ErrorBody),
        (status = 413, description = "Body larger than RTPD_MAX_BODY_BYTES", body = ErrorBody),
        (status = 415, description = "Content-Type is not JSON", body = ErrorBody),
    ),
    security(
        ("ApiKey" = []),
        ("VendorSignature" = [], "VendorId" = [], "SignatureTimestamp" = []),
        ("WebhookSignature" = [], "WebhookId" = [], "WebhookTimestamp" = [])
    )
)]
pub async fn ingest(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<ApiState>,
) -> Result<HttpResponse, ApiError> {
    let started = Instant::now();
    // Named as OpenTelemetry's HTTP conventions name a server span, which is
    // what Application Insights lists under requests.
    let span = tracing::info_span!(
        "ingest",
        otel.name = "POST /v1/transactions",
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        http.request.method = "POST",
        http.route = "/v1/transactions",
        transaction_id = tracing::field::Empty,
        transaction_key = tracing::field::Empty,
        vendor.trace_id = tracing::field::Empty,
        http.response.status_code = tracing::field::Empty,
    );
    // A vendor's trace context is not trusted (W3C Trace Context allows a
    // service to ignore an untrusted parent): its sampled flag must not
    // hide a payment from the traces, nor its trace id choose ours. Each
    // payment starts a trace of rtpd's own, sampled as the operator's
    // OTEL_TRACES_SAMPLER says, with a link to the vendor's span (and its
    // trace id as an attribute) for correlation.
    trace_context::link_untrusted(
        &span,
        req.headers()
            .get(trace_context::TRACEPARENT)
            .and_then(|v| v.to_str().ok()),
    );
    let result = accept(&req, payload, &state).instrument(span.clone()).await;
    let status = match &result {
        Ok(r) => r.status(),
        Err(e) => e.status_code(),
    };
    state.forget_signature_if_refused(&req, status);
    span.record("http.response.status_code", status.as_u16());
    if status.is_server_error() {
        span.record("otel.status_code", "error");
    }
    metrics::ingest_took(started.elapsed());
    result
}

/// Reads the body up to `limit` bytes within `timeout`, refusing early on a
/// declared length. The timeout covers the whole body, so a client trickling
/// bytes cannot hold a worker.
pub async fn read_body(
    req: &HttpRequest,
    payload: web::Payload,
    limit: usize,
    timeout: Duration,
) -> Result<Bytes, ApiError> {
    let in_flight = req.extensions().get::<super::limits::InFlight>().cloned();
    let evicted = async {
        match &in_flight {
            Some(f) => f.evicted().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        read = tokio::time::timeout(timeout, read_body_unbounded(req, payload, limit)) => {
            read.map_err(|_| ApiError::RequestTimeout)?
        }
        // A signed request still waiting for its body, from an address that
        // holds more of the unauthenticated pool than a newcomer: it gives
        // its place up (not charged: it may be a genuine signer's).
        () = evicted => {
            if let Some(f) = &in_flight {
                f.give_up();
            }
            Err(ApiError::Unavailable {
            what: "the API (too many unverified requests from this address)",
            retry_after_secs: 1,
        })
        }
    }
}

async fn read_body_unbounded(
    req: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
) -> Result<Bytes, ApiError> {
    if let Some(len) = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        && len > limit
    {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    let mut body = BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk =
            chunk.map_err(|e| ApiError::bad("bad_body", format!("could not read body: {e}")))?;
        if body.len() + chunk.len() > limit {
            return Err(ApiError::PayloadTooLarge { limit });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

fn is_json(req: &HttpRequest) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|m| {
            let m = m.trim().to_ascii_lowercase();
            m == "application/json" || (m.starts_with("application/") && m.ends_with("+json"))
        })
        .unwrap_or(false)
}

/// Finds the transaction id in the body or the `Idempotency-Key` header.
fn transaction_id(
    req: &HttpRequest,
    doc: &serde_json::Map<String, serde_json::Value>,
) -> Result<TransactionId, ApiError> {
    let header_id = match req.headers().get("Idempotency-Key") {
        Some(v) => Some(v.to_str().map_err(|_| {
            ApiError::bad("invalid_transaction_id", "Idempotency-Key must be ASCII")
        })?),
        None => None,
    };
    let body_id = validate::id_member(doc, "transaction_id")?;
    let id = match (body_id, header_id) {
        (Some(b), Some(h)) if b != h => {
            return Err(ApiError::bad(
                "invalid_transaction_id",
                "transaction_id and Idempotency-Key differ",
            ));
        }
        (Some(b), _) => b,
        (None, Some(h)) => h,
        (None, None) => {
            return Err(ApiError::bad(
                "missing_transaction_id",
                "the body needs a transaction_id (or send an Idempotency-Key header)",
            ));
        }
    };
    Ok(validate::transaction_id(id)?)
}

/// Header that carries the vendor's deadline when the body does not.
pub const EXPIRES_AT_HEADER: &str = "X-Rtpd-Expires-At";

/// The vendor's deadline: `expires_at` in the body or the
/// `X-Rtpd-Expires-At` header (RFC 3339); when both are given they must
/// name the same instant.
fn expires_at(
    req: &HttpRequest,
    doc: &serde_json::Map<String, serde_json::Value>,
) -> Result<Option<chrono::DateTime<chrono::Utc>>, ApiError> {
    let header = match req.headers().get(EXPIRES_AT_HEADER) {
        Some(v) => {
            let s = v.to_str().map_err(|_| {
                ApiError::bad("invalid_expires_at", "X-Rtpd-Expires-At must be ASCII")
            })?;
            Some(validate::deadline(s, "X-Rtpd-Expires-At")?)
        }
        None => None,
    };
    Ok(validate::one_deadline(
        validate::expires_member(doc)?,
        header,
    )?)
}

/// The durability receipt: where the exact bytes are in the WAL, and their sha256.
#[derive(Debug, Serialize, ToSchema)]
pub struct Receipt {
    #[schema(value_type = String)]
    pub transaction_id: TransactionId,
    pub status: State,
    pub received_at: DateTime<Utc>,
    pub wal: WalReceipt,
    /// On 202: whether the queue took the message (if not, the reconciler re-drives it).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub enqueued: Option<bool>,
    /// On 200: this id was seen before with the same bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub duplicate: Option<bool>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct WalReceipt {
    /// `<segment>#<offset>+<length>`.
    #[serde(rename = "ref")]
    #[schema(value_type = String)]
    pub wal_ref: WalRef,
    #[schema(value_type = String)]
    pub sha256: Sha256,
}

impl Receipt {
    fn of(rec: TxRecord) -> Receipt {
        Receipt {
            // The vendor's own id, not the ledger's `<vendor>/<id>` key.
            transaction_id: rec.transaction_id.vendor_id(),
            status: rec.status,
            received_at: rec.created_at,
            wal: WalReceipt {
                wal_ref: rec.wal_ref,
                sha256: rec.sha256,
            },
            enqueued: None,
            duplicate: None,
        }
    }
}

/// Any JSON object, kept byte-exact. `transaction_id` may instead come from
/// the `Idempotency-Key` header. Duplicate keys are refused.
#[derive(Serialize, ToSchema)]
#[allow(dead_code)] // documents the wire shape; the handler reads raw bytes
pub struct TransactionPayload {
    #[schema(
        pattern = "^[A-Za-z0-9._:-]{1,128}$",
        min_length = 1,
        max_length = 128,
        nullable = false
    )]
    transaction_id: Option<String>,
    /// The payment's deadline (RFC 3339): no downstream call starts after
    /// it, and the transaction dead-letters with `DeadlineExceeded`. May
    /// instead come from the `X-Rtpd-Expires-At` header.
    #[schema(format = DateTime, nullable = false)]
    expires_at: Option<String>,
    /// Any other members, kept byte-exact.
    #[serde(flatten)]
    other: std::collections::HashMap<String, serde_json::Value>,
}

fn unavailable(e: IntakeError) -> ApiError {
    match e {
        IntakeError::Unavailable {
            dependency: Dependency::Wal,
            ..
        } => ApiError::Unavailable {
            what: "the write-ahead log",
            retry_after_secs: 2,
        },
        IntakeError::Unavailable {
            dependency: Dependency::Ledger,
            message,
        } => {
            tracing::error!(error = %message, "ledger unavailable during ingest");
            ApiError::Unavailable {
                what: "the ledger",
                retry_after_secs: 5,
            }
        }
        // Logged by the rebuild (start and end), not once per refused POST.
        IntakeError::Unavailable {
            dependency: Dependency::LedgerRebuilding,
            ..
        } => ApiError::Unavailable {
            what: "the ledger (being rebuilt from the WAL after it lost its data)",
            retry_after_secs: 5,
        },
        IntakeError::Unavailable {
            dependency: Dependency::Journal,
            message,
        } => {
            tracing::error!(error = %message, "outcome journal unavailable during ingest");
            ApiError::Unavailable {
                what: "the outcome journal",
                retry_after_secs: 2,
            }
        }
        IntakeError::NotUtf8 => ApiError::bad("invalid_utf8", "body is not valid UTF-8"),
        IntakeError::InvalidId(e) => ApiError::bad("invalid_transaction_id", e.to_string()),
        other => ApiError::Unexpected(other.into()),
    }
}

async fn accept(
    req: &HttpRequest,
    payload: web::Payload,
    state: &ApiState,
) -> Result<HttpResponse, ApiError> {
    let check = state.vendor_before_body(req)?;
    if !is_json(req) {
        return Err(ApiError::UnsupportedMediaType);
    }
    let settings = &state.settings;
    let body = read_body(
        req,
        payload,
        settings.max_body_bytes,
        settings.request_timeout(),
    )
    .await?;
    let sha = Sha256::of(&body);
    req.extensions_mut().insert(BodySeen {
        size: body.len(),
        sha256: Some(sha.to_string()),
    });
    let principal = match check {
        VendorCheck::Done(p) => p,
        VendorCheck::NeedsBody(signed) => state.vendor_signed(req, &signed, &body)?,
    };
    let doc = validate::object(&body)?;
    let id = transaction_id(req, &doc)?;
    let expires_at = expires_at(req, &doc)?;
    let span = tracing::Span::current();
    span.record("transaction_id", id.as_str());
    // An id that cannot be scoped is refused by intake (400); the span then
    // carries the bare id only.
    if let Ok(key) = TransactionId::scoped(principal.vendor(), &id) {
        span.record("transaction_key", key.as_str());
    }
    let submission = Submission {
        transaction_id: id,
        payload: body,
        sha256: sha,
        source: Source {
            vendor: principal.vendor().map(str::to_owned),
            remote_addr: state.client_ip(req).map(|ip| ip.to_string()),
            kafka: None,
        },
        expires_at,
    };
    match state.intake.accept(submission).await.map_err(unavailable)? {
        IntakeOutcome::Accepted { record, enqueued } => {
            Ok(HttpResponse::Accepted().json(Receipt {
                enqueued: Some(enqueued),
                ..Receipt::of(record)
            }))
        }
        IntakeOutcome::Duplicate(record) => Ok(HttpResponse::Ok().json(Receipt {
            duplicate: Some(true),
            ..Receipt::of(record)
        })),
        IntakeOutcome::Conflict(record) => Err(ApiError::Conflict {
            id: record.transaction_id.vendor_id().to_string(),
            status: record.status.to_string(),
        }),
    }
}
