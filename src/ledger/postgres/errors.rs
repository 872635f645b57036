//! Which PostgreSQL failures are worth retrying. "The database is not
//! reachable, not serving, or asked us to try again" is `Unavailable` (ingest
//! answers 503 + Retry-After, the processor abandons the message for
//! redelivery); anything else — a constraint violated, a malformed row, SQL
//! this build got wrong — is `Fatal`.

use crate::ledger::LedgerError;
use deadpool_postgres::PoolError;
use tokio_postgres::error::SqlState;

/// SQLSTATE classes and codes that mean "try again later".
fn transient_state(code: &SqlState) -> bool {
    let c = code.code();
    // 08: connection exception; 53: insufficient resources (too many
    // connections, out of memory or disk); 57P0x: the server is shutting down,
    // crashed, or is still starting; 40001/40P01: serialization failure and
    // deadlock, which a retry resolves; 25006: read-only transaction (a
    // failover demoted the server we talk to); 28000/28P01: authentication
    // failed (an Entra ID token expired or a secret rotated: reconnecting
    // with fresh credentials is the fix); 57014/55P03: a statement or lock
    // timeout set on the role or database; 40003: outcome unknown.
    c.starts_with("08")
        || c.starts_with("53")
        || c.starts_with("57P0")
        || matches!(
            c,
            "40001" | "40P01" | "40003" | "25006" | "28000" | "28P01" | "57014" | "55P03"
        )
}

pub fn classify(e: tokio_postgres::Error) -> LedgerError {
    let transient = match e.as_db_error() {
        Some(db) => transient_state(db.code()),
        // No server answer: closed connection, I/O, timeout, TLS.
        None => e.code().is_none_or(transient_state),
    };
    if transient {
        LedgerError::Unavailable(format!("postgres: {e}"))
    } else {
        LedgerError::Fatal(format!("postgres: {e}"))
    }
}

pub fn pool(e: PoolError) -> LedgerError {
    match e {
        PoolError::Backend(e) => classify(e),
        PoolError::Timeout(kind) => {
            LedgerError::Unavailable(format!("postgres: no connection in time ({kind:?})"))
        }
        PoolError::Closed => LedgerError::Unavailable("postgres: the pool is closed".into()),
        PoolError::NoRuntimeSpecified | PoolError::PostCreateHook(_) => {
            LedgerError::Fatal(format!("postgres pool: {e}"))
        }
    }
}

pub fn timed_out(what: &str, after: std::time::Duration) -> LedgerError {
    LedgerError::Unavailable(format!("postgres {what} timed out after {after:?}"))
}

pub fn malformed(msg: impl std::fmt::Display) -> LedgerError {
    LedgerError::Fatal(format!("postgres ledger: {msg}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_and_shutdown_states_are_transient_others_fatal() {
        for c in [
            "08006", "08001", "57P01", "57P03", "53300", "40001", "40P01", "28P01",
        ] {
            assert!(transient_state(&SqlState::from_code(c)), "{c}");
        }
        for c in ["23505", "42P01", "22P02", "42601"] {
            assert!(!transient_state(&SqlState::from_code(c)), "{c}");
        }
    }
}
