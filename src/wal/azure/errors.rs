//! Which Azure failures are worth retrying: SDK errors become [`StoreError`]s.

use crate::wal::store::StoreError;
use azure_core::error::ErrorKind;

/// What an operation was doing, for the error message.
pub(crate) struct Op<'a> {
    pub what: &'static str,
    pub key: &'a str,
    pub container: &'a str,
    pub identity: &'a str,
}

/// Maps an SDK error. 404 → `NotFound(key)`; 401/403 → `Fatal` naming the
/// container and identity; 408, 429, 5xx, I/O and connection failures, and
/// failures to get a token → `Unavailable`; anything else → `Fatal`.
/// Callers handle 409/412 themselves where they mean something.
pub(crate) fn map(op: &Op<'_>, e: azure_core::Error) -> StoreError {
    let Op {
        what,
        key,
        container,
        identity,
    } = op;
    let subject = if key.is_empty() {
        format!("container {container}")
    } else {
        format!("{key} in {container}")
    };
    match e.kind() {
        ErrorKind::HttpResponse {
            status, error_code, ..
        } => {
            let status = u16::from(*status);
            let code = error_code.as_deref().unwrap_or("no error code");
            match status {
                404 if error_code.as_deref() == Some("ContainerNotFound") => StoreError::Fatal(
                    format!("{what}: container {container} does not exist (as {identity})"),
                ),
                404 => StoreError::NotFound(key.to_string()),
                401 | 403 => StoreError::Fatal(format!(
                    "{what} {subject}: access denied for {identity} (HTTP {status} {code}); \
                     check the role assignment (Storage Blob Data Contributor) or the key/SAS"
                )),
                408 | 429 | 500..=599 => {
                    StoreError::Unavailable(format!("{what} {subject}: HTTP {status} {code}"))
                }
                _ => StoreError::Fatal(format!("{what} {subject}: HTTP {status} {code}: {e}")),
            }
        }
        // A token endpoint that does not answer is as transient as the storage endpoint;
        // a misconfigured identity shows up at start-up, where connect() names it.
        ErrorKind::Io | ErrorKind::Connection | ErrorKind::Credential => {
            StoreError::Unavailable(format!("{what} {subject} as {identity}: {e}"))
        }
        ErrorKind::DataConversion => StoreError::Fatal(format!("{what} {subject}: {e}")),
        // Used by the SDK for body-stream and partitioned-transfer failures; retrying is the safer guess.
        _ => StoreError::Unavailable(format!("{what} {subject}: {e}")),
    }
}

/// The HTTP status of an SDK error, if it is an HTTP error.
pub(crate) fn status(e: &azure_core::Error) -> Option<u16> {
    e.http_status().map(u16::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use azure_core::http::StatusCode;

    fn http(status: u16, code: Option<&str>) -> azure_core::Error {
        ErrorKind::HttpResponse {
            status: StatusCode::from(status),
            error_code: code.map(str::to_owned),
            raw_response: None,
        }
        .into_error()
    }

    fn op() -> Op<'static> {
        Op {
            what: "get",
            key: "wal/v1/a",
            container: "rtp-wal",
            identity: "workload identity",
        }
    }

    #[test]
    fn classification() {
        assert!(
            matches!(map(&op(), http(404, Some("BlobNotFound"))), StoreError::NotFound(k) if k == "wal/v1/a")
        );
        assert!(
            matches!(map(&op(), http(404, Some("ContainerNotFound"))), StoreError::Fatal(m) if m.contains("rtp-wal"))
        );
        let denied = map(&op(), http(403, Some("AuthorizationPermissionMismatch")));
        assert!(
            matches!(&denied, StoreError::Fatal(m) if m.contains("rtp-wal") && m.contains("workload identity"))
        );
        for s in [408, 429, 500, 503] {
            assert!(map(&op(), http(s, None)).is_retryable(), "{s}");
        }
        assert!(!map(&op(), http(400, Some("InvalidHeaderValue"))).is_retryable());
        assert!(map(&op(), ErrorKind::Io.into_error()).is_retryable());
        assert!(map(&op(), ErrorKind::Connection.into_error()).is_retryable());
    }
}
