//! What the service's error conditions mean here: retry (and how soon) or
//! give up, each with a name an operator can search for. The SDKs read them
//! the same way: server-busy and timeout are transient (server-busy with a
//! ~10 s pause), a message over the size limit never fits, a missing entity
//! or a missing right is a configuration problem.

use std::time::Duration;

use fe2o3_amqp::types::definitions::{self, AmqpError, ErrorCondition, LinkError};

use super::super::QueueError;

/// How long sends pause after `com.microsoft:server-busy`, as the SDKs do.
pub(super) const SERVER_BUSY_BACKOFF: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    ServerBusy,
    Timeout,
    Quota,
    TooLarge,
    Unauthorized,
    NotFound,
    LockLost,
    /// The service detached the link (idle timer, or a test's forced detach).
    Detached,
    Other,
}

pub(super) fn kind(condition: &ErrorCondition) -> Kind {
    match condition {
        ErrorCondition::AmqpError(AmqpError::ResourceLimitExceeded) => Kind::Quota,
        ErrorCondition::AmqpError(AmqpError::UnauthorizedAccess) => Kind::Unauthorized,
        ErrorCondition::AmqpError(AmqpError::NotFound) => Kind::NotFound,
        ErrorCondition::LinkError(LinkError::MessageSizeExceeded) => Kind::TooLarge,
        ErrorCondition::LinkError(LinkError::DetachForced) => Kind::Detached,
        ErrorCondition::Custom(s) => match s.0.as_str() {
            "com.microsoft:server-busy" => Kind::ServerBusy,
            "com.microsoft:timeout" => Kind::Timeout,
            "com.microsoft:message-lock-lost" => Kind::LockLost,
            "com.microsoft:entity-not-found" => Kind::NotFound,
            "amqp:link:message-size-exceeded" => Kind::TooLarge,
            _ => Kind::Other,
        },
        _ => Kind::Other,
    }
}

/// The port's error for a condition the service answered with; `what` says
/// which operation (`sending to q`, `$management renew-lock`).
pub(super) fn from_condition(kind: Kind, what: &str, detail: &str) -> QueueError {
    match kind {
        Kind::ServerBusy => QueueError::Unavailable(format!(
            "{what}: service bus is busy (com.microsoft:server-busy), pausing {}s: {detail}",
            SERVER_BUSY_BACKOFF.as_secs()
        )),
        Kind::Timeout => QueueError::Unavailable(format!(
            "{what}: service bus timed out (com.microsoft:timeout): {detail}"
        )),
        // The entity is full; consumers drain it, so this passes.
        Kind::Quota => QueueError::Unavailable(format!(
            "{what}: service bus quota exceeded (amqp:resource-limit-exceeded): {detail}"
        )),
        Kind::TooLarge => QueueError::Fatal(format!(
            "{what}: message size exceeded (amqp:link:message-size-exceeded): {detail}"
        )),
        Kind::Unauthorized => QueueError::Fatal(format!(
            "{what}: unauthorized (amqp:unauthorized-access): {detail}"
        )),
        Kind::NotFound => QueueError::Fatal(format!(
            "{what}: entity not found (amqp:not-found): {detail}"
        )),
        Kind::LockLost => QueueError::LockLost,
        Kind::Detached => QueueError::Unavailable(format!(
            "{what}: link detached by the service (amqp:link:detach-forced): {detail}"
        )),
        Kind::Other => QueueError::Fatal(format!("{what}: {detail}")),
    }
}

pub(super) fn from_error(e: &definitions::Error, what: &str) -> QueueError {
    let detail = format!(
        "{:?}: {}",
        e.condition,
        e.description.as_deref().unwrap_or("no description")
    );
    from_condition(kind(&e.condition), what, &detail)
}

/// A link-level failure whose cause is only known by its text (attach
/// errors of the management client wrap the service's error deep inside).
pub(super) fn kind_in_text(text: &str) -> Kind {
    if text.contains("UnauthorizedAccess") || text.contains("unauthorized-access") {
        Kind::Unauthorized
    } else if text.contains("NotFound") || text.contains("amqp:not-found") {
        Kind::NotFound
    } else if text.contains("DetachForced") || text.contains("detach-forced") {
        Kind::Detached
    } else {
        Kind::Other
    }
}
