//! Which Redis failures are worth retrying. Anything that means "Redis is not
//! reachable or not serving right now" is `Unavailable` (ingest answers 503 +
//! Retry-After, the processor abandons the message for redelivery); anything
//! else — a script bug, a malformed record, a refused command — is `Fatal`.

use crate::ledger::LedgerError;
use redis::{ErrorKind, RedisError, ServerErrorKind};

pub fn classify(e: RedisError) -> LedgerError {
    let transient = e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || matches!(
            e.kind(),
            ErrorKind::Io
                | ErrorKind::ClusterConnectionNotFound
                // Entra ID token refresh or a rotated secret: reconnecting
                // with fresh credentials is the fix.
                | ErrorKind::AuthenticationFailed
                | ErrorKind::Server(
                    ServerErrorKind::BusyLoading
                        | ServerErrorKind::TryAgain
                        | ServerErrorKind::ClusterDown
                        | ServerErrorKind::MasterDown
                        // A failover demoted the node we talk to.
                        | ServerErrorKind::ReadOnly
                )
        );
    if transient {
        LedgerError::Unavailable(e.to_string())
    } else {
        LedgerError::Fatal(e.to_string())
    }
}

pub fn timed_out(what: &str, after: std::time::Duration) -> LedgerError {
    LedgerError::Unavailable(format!("redis {what} timed out after {after:?}"))
}

pub fn malformed(msg: impl std::fmt::Display) -> LedgerError {
    LedgerError::Fatal(format!("redis ledger: {msg}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_is_unavailable_and_script_errors_are_fatal() {
        let io = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(matches!(classify(io), LedgerError::Unavailable(_)));
        let client = RedisError::from((ErrorKind::Client, "bad"));
        assert!(matches!(classify(client), LedgerError::Fatal(_)));
    }
}
