//! `POST /v1/transactions`: validate, dedup, make durable, register, enqueue,
//! and answer with a durability receipt.
//!
//! Order: WAL → ledger → queue. Registering before the send closes the race
//! in which a fast processor finds no ledger entry. A 2xx is sent only after
//! the WAL append returned (the record is durable) and the ledger holds the
//! transaction; if the send then fails, the transaction is `pending` in the
//! ledger and the reconciler re-drives it from the WAL.

use super::rejected::BodySeen;
use super::{ApiError, ApiState, VendorCheck};
use crate::ledger::{LedgerError, RegisterOutcome};
use crate::metrics;
use crate::processor::message_for;
use crate::transaction::{Registration, TransactionId, TxRecord};
use crate::wal::{Source, WalError, WalRecord, sha256_hex};
use actix_web::{HttpMessage, HttpRequest, HttpResponse, ResponseError, http::header, web};
use bytes::{Bytes, BytesMut};
use chrono::Utc;
use futures::StreamExt;
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::json;
use std::collections::HashSet;
use std::time::{Duration, Instant};

pub async fn ingest(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<ApiState>,
) -> Result<HttpResponse, ApiError> {
    let started = Instant::now();
    let result = accept(&req, payload, &state).await;
    let status = match &result {
        Ok(r) => r.status(),
        Err(e) => e.status_code(),
    };
    metrics::ingest_answered(status.as_u16(), started.elapsed());
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
    tokio::time::timeout(timeout, read_body_unbounded(req, payload, limit))
        .await
        .map_err(|_| ApiError::RequestTimeout)?
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

/// Parses the body, refusing duplicate keys at any depth: serde_json would
/// silently keep the last, and the processor or downstream might keep the first.
fn parse_document(text: &str) -> Result<serde_json::Value, ApiError> {
    match serde_json::from_str::<NoDuplicateKeys>(text) {
        Ok(_) => {}
        Err(e) if e.is_data() => {
            return Err(ApiError::bad(
                "duplicate_key",
                format!("body has a duplicate key: {e}"),
            ));
        }
        Err(e) => {
            return Err(ApiError::bad(
                "invalid_json",
                format!("body is not valid JSON: {e}"),
            ));
        }
    }
    serde_json::from_str(text)
        .map_err(|e| ApiError::bad("invalid_json", format!("body is not valid JSON: {e}")))
}

/// Walks a JSON document and fails (as a data error) on a repeated key.
struct NoDuplicateKeys;

impl<'de> Deserialize<'de> for NoDuplicateKeys {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NoDuplicateKeysVisitor)
    }
}

struct NoDuplicateKeysVisitor;

impl<'de> Visitor<'de> for NoDuplicateKeysVisitor {
    type Value = NoDuplicateKeys;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(NoDuplicateKeys)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(NoDuplicateKeys)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(NoDuplicateKeys)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(NoDuplicateKeys)
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(NoDuplicateKeys)
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(NoDuplicateKeys)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<NoDuplicateKeys>()?.is_some() {}
        Ok(NoDuplicateKeys)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut seen = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            map.next_value::<NoDuplicateKeys>()?;
            if !seen.insert(key) {
                // The key itself is payload: it is not repeated in the message.
                return Err(de::Error::custom("a key repeats within one object"));
            }
        }
        Ok(NoDuplicateKeys)
    }
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
    let body_id = match doc.get("transaction_id") {
        None => None,
        Some(serde_json::Value::String(s)) => Some(s.as_str()),
        Some(_) => {
            return Err(ApiError::bad(
                "invalid_transaction_id",
                "transaction_id must be a string",
            ));
        }
    };
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
    TransactionId::parse(id).map_err(|e| ApiError::bad("invalid_transaction_id", e.to_string()))
}

fn receipt(rec: &TxRecord) -> serde_json::Value {
    json!({
        "transaction_id": rec.transaction_id,
        "status": rec.status,
        "received_at": rec.created_at,
        "wal": { "ref": rec.wal_ref, "sha256": rec.sha256 },
    })
}

fn existing(rec: TxRecord, sha: &str) -> Result<HttpResponse, ApiError> {
    if rec.sha256 == sha {
        let mut body = receipt(&rec);
        body["duplicate"] = json!(true);
        Ok(HttpResponse::Ok().json(body))
    } else {
        Err(ApiError::Conflict {
            id: rec.transaction_id,
            status: rec.status.to_string(),
        })
    }
}

fn ledger_unavailable(e: LedgerError) -> ApiError {
    tracing::error!(error = %e, "ledger unavailable during ingest");
    ApiError::Unavailable {
        what: "the ledger",
        retry_after_secs: 5,
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
    let settings = &state.services.settings;
    let body = read_body(
        req,
        payload,
        settings.max_body_bytes,
        settings.request_timeout(),
    )
    .await?;
    let sha = sha256_hex(&body);
    req.extensions_mut().insert(BodySeen {
        size: body.len(),
        sha256: Some(sha.clone()),
    });
    let principal = match check {
        VendorCheck::Done(p) => p,
        VendorCheck::NeedsBody(signed) => state.vendor_signed(req, &signed, &body)?,
    };
    let text = std::str::from_utf8(&body)
        .map_err(|_| ApiError::bad("invalid_utf8", "body is not valid UTF-8"))?;
    let doc = parse_document(text)?;
    let serde_json::Value::Object(doc) = doc else {
        return Err(ApiError::bad("not_an_object", "body must be a JSON object"));
    };
    let id = transaction_id(req, &doc)?;
    let svc = &state.services;

    if let Some(rec) = svc
        .ledger
        .get(id.as_str())
        .await
        .map_err(ledger_unavailable)?
    {
        return existing(rec, &sha);
    }

    let received_at = Utc::now();
    let record = WalRecord {
        v: 1,
        transaction_id: id.to_string(),
        received_at,
        source: Source {
            vendor: principal.vendor().map(str::to_owned),
            remote_addr: req.peer_addr().map(|a| a.ip().to_string()),
        },
        sha256: sha.clone(),
        payload: text.to_owned(),
    };
    let wal_ref = svc.wal.append_json(&record, received_at).await.map_err(|e| {
        tracing::error!(transaction_id = %id, error = %e, "WAL append failed; not acknowledging");
        match e {
            WalError::Unavailable(_) | WalError::Closed => ApiError::Unavailable {
                what: "the write-ahead log",
                retry_after_secs: 2,
            },
            other => ApiError::Unexpected(other.into()),
        }
    })?;

    let reg = Registration {
        transaction_id: id.to_string(),
        sha256: sha.clone(),
        wal_ref: wal_ref.to_string(),
        vendor: record.source.vendor.clone(),
        received_at,
    };
    let rec = match svc
        .ledger
        .register(reg.clone())
        .await
        .map_err(ledger_unavailable)?
    {
        RegisterOutcome::New(rec) => rec,
        // A concurrent identical POST won the race; ours is a harmless extra WAL record.
        RegisterOutcome::Duplicate(rec) | RegisterOutcome::Conflict(rec) => {
            return existing(rec, &sha);
        }
    };

    let enqueued = match svc
        .queue
        .send(vec![message_for(&reg, body, "initial", None, None)])
        .await
    {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(transaction_id = %id, error = %e, "enqueue failed; the reconciler will re-drive from the WAL");
            false
        }
    };
    tracing::info!(transaction_id = %id, wal_ref = %wal_ref, enqueued, "transaction accepted");
    let mut body = receipt(&rec);
    body["enqueued"] = json!(enqueued);
    Ok(HttpResponse::Accepted().json(body))
}
