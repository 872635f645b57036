//! `GET /v1/transactions/{id}`, `GET /v1/transactions`, and replay.

use super::{ApiError, ApiState, error::ErrorBody};
use crate::auth::Principal;
use crate::ledger::{LedgerError, ListQuery, Page};
use crate::replay::{Operator, ReplayError, ReplayRequest, Replayed};
use crate::transaction::{State, TransactionId, TxRecord};
use actix_web::{HttpRequest, HttpResponse, web};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

pub(crate) fn ledger_error(e: LedgerError) -> ApiError {
    match e {
        LedgerError::Unavailable(_) => ApiError::Unavailable {
            what: "the ledger",
            retry_after_secs: 5,
        },
        other => ApiError::Unexpected(other.into()),
    }
}

fn valid_id(id: &str) -> Result<TransactionId, ApiError> {
    TransactionId::parse(id).map_err(|e| ApiError::bad("invalid_transaction_id", e.to_string()))
}

/// Whose transaction an operator means: the same id from two vendors is two
/// transactions.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct VendorParam {
    /// Operators: the vendor whose transaction this is (needed for every
    /// transaction a vendor sent while authentication is on). A vendor's own
    /// credential decides for it; this is then ignored.
    pub vendor: Option<String>,
}

/// The transaction a caller means by `id`: a vendor's own; for an operator
/// the one of `?vendor=`, else the only one with that id (the bare id of an
/// unscoped entry, or any configured vendor's). Two vendors' transactions
/// with the id and no `?vendor=`: 400 `ambiguous_transaction_id`.
pub(crate) async fn resolve(
    state: &ApiState,
    who: &Principal,
    id: &str,
    vendor: Option<&str>,
) -> Result<Option<TxRecord>, ApiError> {
    let id = valid_id(id)?;
    let vendor = match who {
        Principal::Vendor(v) => Some(v.as_str()),
        _ => vendor.filter(|v| !v.is_empty()),
    };
    let ledger = &**state.ledger();
    if let Some(v) = vendor {
        let key = TransactionId::scoped(Some(v), &id)
            .map_err(|e| ApiError::bad("invalid_vendor", e.to_string()))?;
        return crate::ledger::find(ledger, &key)
            .await
            .map_err(ledger_error);
    }
    let mut found = crate::ledger::find_across_vendors(ledger, &id, &state.auth.vendor_names())
        .await
        .map_err(ledger_error)?;
    if found.len() > 1 {
        let vendors: Vec<&str> = found
            .iter()
            .map(|r| r.vendor.as_deref().unwrap_or("(none)"))
            .collect();
        return Err(ApiError::bad(
            "ambiguous_transaction_id",
            format!(
                "vendors {} each sent transaction {id}: add ?vendor=<name>",
                vendors.join(", ")
            ),
        ));
    }
    Ok(found.pop())
}

/// A record as the API shows it: the vendor's own id in `transaction_id`
/// (not the ledger's `<vendor>/<id>` key), the vendor in `vendor`.
pub(crate) fn as_shown(mut r: TxRecord) -> TxRecord {
    r.transaction_id = r.transaction_id.vendor_id();
    r
}

fn not_found(id: &str) -> ApiError {
    ApiError::NotFound(format!("transaction {id} not found"))
}

/// One transaction: state, attempts, last error, next retry, timestamps, WAL ref.
/// A vendor sees only its own; others look absent.
#[utoipa::path(
    get,
    path = "/v1/transactions/{id}",
    operation_id = "getTransaction",
    params(("id" = String, Path, description = "Transaction id: 1–128 characters of A-Za-z0-9._:-", min_length = 1, max_length = 128, pattern = "^[A-Za-z0-9._:-]{1,128}$"), VendorParam),
    responses(
        (status = 200, description = "The ledger's view of the transaction", body = TxRecord),
        (status = 400, description = "Invalid transaction id", body = ErrorBody),
        (status = 401, description = "Missing or wrong credentials", body = ErrorBody),
        (status = 404, description = "No such transaction (or another vendor's)", body = ErrorBody),
    ),
    security(("AdminToken" = []), ("ApiKey" = []), ("VendorSignature" = [], "VendorId" = [], "SignatureTimestamp" = []))
)]
pub async fn get(
    req: HttpRequest,
    path: web::Path<String>,
    q: web::Query<VendorParam>,
    state: web::Data<ApiState>,
) -> Result<HttpResponse, ApiError> {
    let who = state.admin_or_vendor(&req)?;
    let vendor = q.vendor.as_deref();
    match resolve(&state, &who, &path, vendor).await? {
        // A vendor sees only its own transactions; others look absent.
        Some(r) if matches!(&who, Principal::Vendor(v) if r.vendor.as_deref() != Some(v.as_str())) => {
            Err(not_found(&path))
        }
        Some(r) => Ok(HttpResponse::Ok().json(as_shown(r))),
        None => Err(not_found(&path)),
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Only transactions in this state.
    #[param(value_type = Option<State>)]
    pub state: Option<String>,
    /// Page size, 1–1000 (default 50).
    #[param(minimum = 1, maximum = 1000, default = 50)]
    pub limit: Option<usize>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

pub fn parse_state(s: Option<&str>) -> Result<Option<State>, ApiError> {
    match s {
        None | Some("") => Ok(None),
        Some(s) => State::parse(s).map(Some).ok_or_else(|| {
            ApiError::bad(
                "invalid_state",
                "state must be one of pending, processing, success, failed, dead_letter",
            )
        }),
    }
}

pub fn parse_limit(limit: Option<usize>) -> Result<usize, ApiError> {
    match limit.unwrap_or(50) {
        n @ 1..=1000 => Ok(n),
        _ => Err(ApiError::bad(
            "invalid_limit",
            "limit must be between 1 and 1000",
        )),
    }
}

/// Transactions, newest update first, a page at a time.
#[utoipa::path(
    get,
    path = "/v1/transactions",
    operation_id = "listTransactions",
    params(ListParams),
    responses(
        (status = 200, description = "A page of transactions", body = Page),
        (status = 400, description = "Invalid state, limit or cursor", body = ErrorBody),
        (status = 401, description = "Missing or wrong credentials", body = ErrorBody),
        (status = 403, description = "A vendor credential on an operator route", body = ErrorBody),
    ),
    security(("AdminToken" = []))
)]
pub async fn list(
    req: HttpRequest,
    q: web::Query<ListParams>,
    state: web::Data<ApiState>,
) -> Result<HttpResponse, ApiError> {
    state.admin(&req)?;
    let page = state
        .ledger()
        .list(ListQuery {
            state: parse_state(q.state.as_deref())?,
            limit: parse_limit(q.limit)?,
            cursor: q.cursor.clone(),
        })
        .await
        .map_err(|e| match e {
            LedgerError::InvalidCursor => ApiError::bad("invalid_cursor", "cursor is not valid"),
            other => ledger_error(other),
        })?;
    Ok(HttpResponse::Ok().json(Page {
        items: page.items.into_iter().map(as_shown).collect(),
        next_cursor: page.next_cursor,
    }))
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = ReplayRequest)]
pub struct ReplayBody {
    /// Required to replay a transaction that already succeeded (the downstream is called again).
    #[serde(default)]
    pub force: bool,
    /// Why (recorded in the outcome journal); required with `force`.
    pub reason: Option<String>,
    /// The state the caller saw: the replay is refused (409, with the
    /// current state) if the transaction is in another one now. Required
    /// with `force`.
    pub expected_state: Option<State>,
}

/// A replay was accepted: the transaction is `pending` again and a fresh copy is queued.
#[derive(Debug, Serialize, ToSchema)]
pub struct ReplayAccepted {
    #[schema(value_type = String)]
    pub transaction_id: TransactionId,
    /// Whose transaction it is (absent when authentication is off).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub vendor: Option<String>,
    pub status: State,
    pub message_id: String,
    /// When the replayed transaction runs, if not at once: a replay right
    /// after a failed attempt (or a lapsed claim) waits until that call
    /// can no longer be running at the downstream.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub due_at: Option<chrono::DateTime<chrono::Utc>>,
    pub message: String,
}

/// Shared by `POST /v1/transactions/{id}/replay` and the seed's `POST
/// /replay/{id}`: the operator is authenticated before a byte of the body
/// is read, and the body is read by the one body reader (size limit, read
/// timeout), so an anonymous client cannot hold a slot by sending slowly.
pub async fn replay_route(
    req: &HttpRequest,
    id: &str,
    vendor: Option<&str>,
    payload: web::Payload,
    state: &ApiState,
) -> Result<HttpResponse, ApiError> {
    let who = state.admin(req)?;
    let settings = &state.settings;
    let body = super::ingest::read_body(
        req,
        payload,
        settings.max_body_bytes,
        settings.request_timeout(),
    )
    .await?;
    let body = parse_replay_body(&body)?;
    if body.force && body.reason.as_deref().is_none_or(|r| r.trim().is_empty()) {
        return Err(ApiError::bad(
            "reason_required",
            "a forced replay calls the downstream again: say why in \"reason\"",
        ));
    }
    if body.force && body.expected_state.is_none() {
        // Issue 12: force without the state the operator saw reset a
        // success nobody had seen (one that came after the operator looked).
        return Err(ApiError::bad(
            "expected_state_required",
            "a forced replay must name the state you saw, e.g. \"expected_state\": \"success\"; it is refused if the transaction is in another state now",
        ));
    }
    do_replay(who, id, vendor, body, state).await
}

async fn do_replay(
    who: Principal,
    id: &str,
    vendor: Option<&str>,
    body: ReplayBody,
    state: &ApiState,
) -> Result<HttpResponse, ApiError> {
    let Some(current) = resolve(state, &who, id, vendor).await? else {
        return Err(not_found(id));
    };
    let key = current.transaction_id;
    let id = valid_id(id)?;
    let r = ReplayRequest {
        force: body.force,
        operator: match &who {
            Principal::Admin(name) => Operator::AdminToken(name.clone()),
            _ => Operator::Anonymous,
        },
        reason: body.reason,
        expect: body.expected_state,
    };
    match state.replayer.replay_one(key.as_str(), &r).await {
        Ok(Replayed::Requeued { record, message_id }) => {
            let due_at = record.next_retry_at.filter(|t| *t > crate::clock::now());
            Ok(HttpResponse::Accepted().json(ReplayAccepted {
                message: match due_at {
                    None => format!(
                        "Transaction {} reset to pending and re-enqueued from the WAL",
                        record.transaction_id
                    ),
                    Some(t) => format!(
                        "Transaction {} reset to pending and re-enqueued from the WAL; it runs at {} (its last call may still be running at the downstream until then)",
                        record.transaction_id,
                        t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
                    ),
                },
                due_at,
                transaction_id: record.transaction_id.vendor_id(),
                vendor: record.vendor,
                status: record.status,
                message_id,
            }))
        }
        Ok(Replayed::Refused(rec)) => Err(ApiError::InvalidState(
            if r.expect.is_some_and(|s| s != rec.status) {
                format!(
                    "transaction {id} is {} now, not {} as expected_state says; look again before replaying it",
                    rec.status,
                    r.expect.map(|s| s.to_string()).unwrap_or_default()
                )
            } else if rec.status == State::Success {
                format!(
                    "transaction {id} already succeeded; replay it with force to call the downstream again"
                )
            } else {
                format!(
                    "transaction {id} is {} with a live claim; try again later",
                    rec.status
                )
            },
        )),
        Ok(Replayed::JournaledSuccess(_)) => Err(ApiError::InvalidState(format!(
            "transaction {id} succeeded (the outcome journal says so; its ledger record missed the settle, which the processor and the reconciler record); replay it with force and \"expected_state\": \"processing\" to call the downstream again"
        ))),
        Ok(Replayed::NotFound) => Err(not_found(&id)),
        Err(ReplayError::Ledger(e)) => Err(ledger_error(e)),
        Err(e) => Err(ApiError::Unexpected(e.into())),
    }
}

/// Operator replay: back to `pending`, re-enqueued from the WAL.
#[utoipa::path(
    post,
    path = "/v1/transactions/{id}/replay",
    operation_id = "replayTransaction",
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

pub fn parse_replay_body(body: &[u8]) -> Result<ReplayBody, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(ReplayBody::default());
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad("invalid_json", format!("replay body: {e}")))
}
