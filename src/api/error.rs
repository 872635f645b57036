//! HTTP errors: every one is a JSON body `{"error": <code>, "message": <text>}`.

use crate::auth::AuthFailure;
use actix_web::{HttpResponse, ResponseError, http::StatusCode};

/// Every error the API answers: `{"error": <code>, "message": <text>}`; a 409
/// also names the transaction and its current state.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
#[schema(as = Error)]
pub struct ErrorBody {
    /// A stable code, e.g. `invalid_json`, `conflict`, `unauthenticated`.
    pub error: String,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub transaction_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub status: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    BadRequest { code: &'static str, message: String },
    #[error("{0}")]
    Unauthenticated(AuthFailure),
    #[error("this credential may not use this route")]
    Forbidden,
    #[error("{0}")]
    NotFound(String),
    #[error("transaction {id} exists with different content")]
    Conflict { id: String, status: String },
    #[error("{0}")]
    InvalidState(String),
    #[error("request body is larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("request line and headers are larger than {limit} bytes")]
    HeadersTooLarge { limit: usize },
    #[error("method not allowed on this route")]
    MethodNotAllowed,
    #[error("content type must be application/json")]
    UnsupportedMediaType,
    #[error(
        "request bodies are not accepted with a Content-Encoding (other than identity); send them uncompressed"
    )]
    UnsupportedContentEncoding,
    #[error("{what} is unavailable; retry later")]
    Unavailable {
        what: &'static str,
        retry_after_secs: u32,
    },
    #[error("too many requests")]
    TooManyRequests { retry_after_secs: u32 },
    #[error("request timed out")]
    RequestTimeout,
    #[error("internal error")]
    Unexpected(#[from] anyhow::Error),
}

impl ApiError {
    pub fn bad(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::BadRequest {
            code,
            message: message.into(),
        }
    }

    /// Why the call was refused, for the rejected-calls log: the error code,
    /// or for a 401 the precise credential problem.
    pub fn reason(&self) -> &'static str {
        match self {
            ApiError::Unauthenticated(f) => f.reason(),
            other => other.code(),
        }
    }

    fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest { code, .. } => code,
            ApiError::Unauthenticated(_) => "unauthenticated",
            ApiError::HeadersTooLarge { .. } => "headers_too_large",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::Forbidden => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::Conflict { .. } => "conflict",
            ApiError::InvalidState(_) => "invalid_state",
            ApiError::PayloadTooLarge { .. } => "payload_too_large",
            ApiError::UnsupportedMediaType => "unsupported_media_type",
            ApiError::UnsupportedContentEncoding => "unsupported_content_encoding",
            ApiError::Unavailable { .. } => "unavailable",
            ApiError::TooManyRequests { .. } => "rate_limited",
            ApiError::RequestTimeout => "request_timeout",
            ApiError::Unexpected(_) => "internal",
        }
    }
}

impl From<crate::validate::Invalid> for ApiError {
    fn from(e: crate::validate::Invalid) -> ApiError {
        ApiError::bad(e.code, e.message)
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            ApiError::HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Forbidden => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict { .. } | ApiError::InvalidState(_) => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType | ApiError::UnsupportedContentEncoding => {
                StatusCode::UNSUPPORTED_MEDIA_TYPE
            }
            ApiError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::Unexpected(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        if let ApiError::Unexpected(e) = self {
            // The cause chain is logged once, here; the client gets no internals.
            tracing::error!(error = ?e, "unexpected error");
        }
        let mut body = ErrorBody {
            error: self.code().to_owned(),
            message: self.to_string(),
            transaction_id: None,
            status: None,
        };
        if let ApiError::Conflict { id, status } = self {
            body.transaction_id = Some(id.clone());
            body.status = Some(status.clone());
        }
        let mut resp = HttpResponse::build(self.status_code());
        match self {
            ApiError::Unavailable {
                retry_after_secs, ..
            }
            | ApiError::TooManyRequests { retry_after_secs } => {
                resp.insert_header(("Retry-After", retry_after_secs.to_string()));
            }
            ApiError::Unauthenticated(_) => {
                resp.insert_header((
                    "WWW-Authenticate",
                    "ApiKey header=\"X-Api-Key\", Rtpd-HMAC-SHA256 headers=\"X-Rtpd-Vendor X-Rtpd-Timestamp X-Rtpd-Signature\", Bearer",
                ));
            }
            _ => {}
        }
        resp.json(body)
    }
}
