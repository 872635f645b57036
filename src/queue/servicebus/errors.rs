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
    /// A passing failure of the service or of the link or connection
    /// (`amqp:internal-error`, `amqp:connection:forced`, `amqp:link:stolen`,
    /// `com.microsoft:operation-cancelled`, ...), and any condition not
    /// known here: the SDKs re-make the link or connection and retry.
    Transient,
    /// A request the service will never take as it is (`amqp:not-allowed`,
    /// `com.microsoft:entity-disabled`, argument errors, decode errors).
    Refused,
}

/// The conditions known here by their AMQP names, as the Go SDK
/// (`internal/errors.go`), .NET (`ServiceBusFailureReason`) and Java
/// (`ServiceBusErrorCondition`) read them. Conditions not listed are
/// transient, as the Go SDK treats them (it re-makes the connection).
const CONDITIONS: &[(&str, Kind)] = &[
    ("amqp:unauthorized-access", Kind::Unauthorized),
    ("com.microsoft:publisher-revoked", Kind::Unauthorized),
    ("com.microsoft:entity-not-found", Kind::NotFound),
    ("amqp:not-found", Kind::NotFound),
    ("com.microsoft:message-lock-lost", Kind::LockLost),
    ("amqp:link:detach-forced", Kind::Detached),
    ("com.microsoft:server-busy", Kind::ServerBusy),
    ("com.microsoft:timeout", Kind::Timeout),
    ("amqp:resource-limit-exceeded", Kind::Quota),
    ("amqp:link:message-size-exceeded", Kind::TooLarge),
    ("amqp:not-allowed", Kind::Refused),
    ("amqp:not-implemented", Kind::Refused),
    ("amqp:decode-error", Kind::Refused),
    ("amqp:invalid-field", Kind::Refused),
    ("amqp:precondition-failed", Kind::Refused),
    ("com.microsoft:entity-disabled", Kind::Refused),
    ("com.microsoft:argument-error", Kind::Refused),
    ("com.microsoft:argument-out-of-range", Kind::Refused),
    ("com.microsoft:entity-already-exists", Kind::Refused),
    ("com.microsoft:session-cannot-be-locked", Kind::Refused),
];

/// What a condition's name means.
fn kind_of_name(name: &str) -> Kind {
    CONDITIONS
        .iter()
        .find(|(n, _)| *n == name)
        .map_or(Kind::Transient, |(_, k)| *k)
}

pub(super) fn kind(condition: &ErrorCondition) -> Kind {
    let name = match condition {
        ErrorCondition::Custom(s) => s.0.clone(),
        other => condition_name(other),
    };
    kind_of_name(&name)
}

/// The AMQP name of a condition `fe2o3-amqp` knows by an enum.
fn condition_name(condition: &ErrorCondition) -> String {
    let name = match condition {
        ErrorCondition::AmqpError(e) => match e {
            AmqpError::InternalError => "amqp:internal-error",
            AmqpError::NotFound => "amqp:not-found",
            AmqpError::UnauthorizedAccess => "amqp:unauthorized-access",
            AmqpError::DecodeError => "amqp:decode-error",
            AmqpError::ResourceLimitExceeded => "amqp:resource-limit-exceeded",
            AmqpError::NotAllowed => "amqp:not-allowed",
            AmqpError::InvalidField => "amqp:invalid-field",
            AmqpError::NotImplemented => "amqp:not-implemented",
            AmqpError::ResourceLocked => "amqp:resource-locked",
            AmqpError::PreconditionFailed => "amqp:precondition-failed",
            AmqpError::ResourceDeleted => "amqp:resource-deleted",
            AmqpError::IllegalState => "amqp:illegal-state",
            AmqpError::FrameSizeTooSmall => "amqp:frame-size-too-small",
        },
        ErrorCondition::LinkError(e) => match e {
            LinkError::DetachForced => "amqp:link:detach-forced",
            LinkError::TransferLimitExceeded => "amqp:link:transfer-limit-exceeded",
            LinkError::MessageSizeExceeded => "amqp:link:message-size-exceeded",
            LinkError::Redirect => "amqp:link:redirect",
            LinkError::Stolen => "amqp:link:stolen",
        },
        ErrorCondition::ConnectionError(_) => "amqp:connection",
        ErrorCondition::SessionError(_) => "amqp:session",
        _ => "",
    };
    name.to_string()
}

/// The port's error for a condition the service answered with; `what` says
/// which operation (`sending to q`, `$management renew-lock`).
pub(super) fn from_condition(kind: Kind, what: &str, detail: &str) -> QueueError {
    match kind {
        Kind::ServerBusy => QueueError::Unavailable(format!(
            "{what}: service bus is busy (com.microsoft:server-busy): {detail}"
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
            "{what}: {UNAUTHORIZED} (amqp:unauthorized-access): {detail}"
        )),
        Kind::NotFound => QueueError::Fatal(format!(
            "{what}: entity not found (amqp:not-found): {detail}"
        )),
        Kind::LockLost => QueueError::LockLost,
        Kind::Detached => QueueError::Unavailable(format!(
            "{what}: link detached by the service (amqp:link:detach-forced): {detail}"
        )),
        Kind::Transient => QueueError::Unavailable(format!(
            "{what}: the link or connection failed (retrying on a new one): {detail}"
        )),
        Kind::Refused => {
            QueueError::Fatal(format!("{what}: the service refused the request: {detail}"))
        }
    }
}

const UNAUTHORIZED: &str = "unauthorized";

/// Whether the port error says the service refused our token (after which
/// a fresh token is put and the operation tried once more).
pub(super) fn is_unauthorized(e: &QueueError) -> bool {
    matches!(e, QueueError::Fatal(m) if m.contains("(amqp:unauthorized-access)"))
}

/// Whether the port error is the service's `com.microsoft:server-busy`
/// (after which sends pause, as the SDKs do).
pub(super) fn is_server_busy(e: &QueueError) -> bool {
    matches!(e, QueueError::Unavailable(m) if m.contains("(com.microsoft:server-busy)"))
}

pub(super) fn from_error(e: &definitions::Error, what: &str) -> QueueError {
    let detail = format!(
        "{:?}: {}",
        e.condition,
        e.description.as_deref().unwrap_or("no description")
    );
    from_condition(kind(&e.condition), what, &detail)
}

/// The conditions `fe2o3-amqp` knows by an enum, for reading its `Debug`
/// text (`AmqpError(NotFound)`).
const ENUM_CONDITIONS: &[ErrorCondition] = &[
    ErrorCondition::AmqpError(AmqpError::UnauthorizedAccess),
    ErrorCondition::AmqpError(AmqpError::NotFound),
    ErrorCondition::AmqpError(AmqpError::ResourceLimitExceeded),
    ErrorCondition::AmqpError(AmqpError::NotAllowed),
    ErrorCondition::AmqpError(AmqpError::NotImplemented),
    ErrorCondition::AmqpError(AmqpError::DecodeError),
    ErrorCondition::AmqpError(AmqpError::InvalidField),
    ErrorCondition::AmqpError(AmqpError::PreconditionFailed),
    ErrorCondition::LinkError(LinkError::DetachForced),
    ErrorCondition::LinkError(LinkError::MessageSizeExceeded),
];

/// A link-level failure whose cause is only known by its text (`fe2o3-amqp`
/// wraps the service's error deep inside its own): the condition by its
/// AMQP name (a custom condition's symbol, or the service's text) or by
/// `fe2o3-amqp`'s enum name, read as [`kind`] reads the condition itself.
pub(super) fn kind_in_text(text: &str) -> Kind {
    if let Some((_, k)) = CONDITIONS.iter().find(|(name, _)| text.contains(name)) {
        return *k;
    }
    if let Some(c) = ENUM_CONDITIONS
        .iter()
        .find(|c| text.contains(&format!("{c:?}")))
    {
        return kind(c);
    }
    // Bare enum names, as some `fe2o3-amqp` errors print them
    // (`SendError::MessageSizeExceeded`, `RemoteClosedWithError(..UnauthorizedAccess..)`).
    const BARE: &[(&str, Kind)] = &[
        ("UnauthorizedAccess", Kind::Unauthorized),
        ("DetachForced", Kind::Detached),
        ("ResourceLimitExceeded", Kind::Quota),
        ("MessageSizeExceeded", Kind::TooLarge),
    ];
    BARE.iter()
        .find(|(name, _)| text.contains(name))
        .map_or(Kind::Transient, |(_, k)| *k)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fe2o3_amqp::types::definitions::ConnectionError;
    use fe2o3_amqp::types::primitives::Symbol;

    fn custom(name: &str) -> ErrorCondition {
        ErrorCondition::Custom(Symbol::from(name))
    }

    /// As the Go SDK (internal/errors.go) and .NET (ServiceBusFailureReason) read them.
    #[test]
    fn conditions_map_as_the_sdks_read_them() {
        let retryable = [
            custom("com.microsoft:server-busy"),
            custom("com.microsoft:timeout"),
            custom("com.microsoft:operation-cancelled"),
            custom("amqp:resource-limit-exceeded"),
            ErrorCondition::AmqpError(AmqpError::InternalError),
            ErrorCondition::AmqpError(AmqpError::ResourceLimitExceeded),
            ErrorCondition::ConnectionError(ConnectionError::ConnectionForced),
            ErrorCondition::LinkError(LinkError::DetachForced),
            ErrorCondition::LinkError(LinkError::TransferLimitExceeded),
            ErrorCondition::LinkError(LinkError::Stolen),
            custom("com.microsoft:something-new"),
        ];
        for c in retryable {
            let e = from_condition(kind(&c), "op", "d");
            assert!(e.is_retryable(), "{c:?} should be retryable: {e}");
        }
        let permanent = [
            ErrorCondition::LinkError(LinkError::MessageSizeExceeded),
            custom("amqp:link:message-size-exceeded"),
            ErrorCondition::AmqpError(AmqpError::UnauthorizedAccess),
            ErrorCondition::AmqpError(AmqpError::NotFound),
            ErrorCondition::AmqpError(AmqpError::NotAllowed),
            custom("com.microsoft:entity-disabled"),
            custom("com.microsoft:argument-out-of-range"),
            custom("com.microsoft:entity-not-found"),
        ];
        for c in permanent {
            let e = from_condition(kind(&c), "op", "d");
            assert!(!e.is_retryable(), "{c:?} should be permanent: {e}");
        }
        assert!(matches!(
            from_condition(kind(&custom("com.microsoft:message-lock-lost")), "op", "d"),
            QueueError::LockLost
        ));
    }

    #[test]
    fn link_failures_are_named_from_their_text() {
        assert_eq!(
            kind_in_text(
                "LinkStateError(RemoteClosedWithError(Error { condition: AmqpError(UnauthorizedAccess), .. }))"
            ),
            Kind::Unauthorized
        );
        assert_eq!(
            kind_in_text("RemoteDetachedWithError(Error { condition: LinkError(DetachForced) })"),
            Kind::Detached
        );
        assert_eq!(
            kind_in_text("condition: AmqpError(NotFound)"),
            Kind::NotFound
        );
        assert_eq!(kind_in_text("connection reset by peer"), Kind::Transient);
        // Every permanent condition the SDKs name is permanent by its text too.
        for refused in [
            "condition: AmqpError(NotImplemented)",
            "condition: AmqpError(DecodeError)",
            "condition: AmqpError(InvalidField)",
            "condition: AmqpError(PreconditionFailed)",
            "condition: Custom(Symbol(\"amqp:precondition-failed\"))",
            "condition: Custom(Symbol(\"com.microsoft:argument-error\"))",
            "condition: Custom(Symbol(\"com.microsoft:argument-out-of-range\"))",
            "condition: Custom(Symbol(\"com.microsoft:entity-already-exists\"))",
            "condition: Custom(Symbol(\"com.microsoft:session-cannot-be-locked\"))",
        ] {
            assert_eq!(kind_in_text(refused), Kind::Refused, "{refused}");
        }
        assert_eq!(
            kind_in_text("condition: Custom(Symbol(\"com.microsoft:message-lock-lost\"))"),
            Kind::LockLost
        );
        assert_eq!(
            kind_in_text("condition: Custom(Symbol(\"com.microsoft:server-busy\"))"),
            Kind::ServerBusy
        );
        assert_eq!(
            kind_in_text("condition: LinkError(MessageSizeExceeded)"),
            Kind::TooLarge
        );
        // Both readings agree on every condition known here.
        for (name, k) in CONDITIONS {
            assert_eq!(
                kind_in_text(&format!("Custom(Symbol({name:?}))")),
                *k,
                "{name}"
            );
        }
        for c in ENUM_CONDITIONS {
            assert_eq!(kind_in_text(&format!("{c:?}")), kind(c), "{c:?}");
        }
        assert!(is_unauthorized(&from_condition(
            Kind::Unauthorized,
            "op",
            "d"
        )));
        assert!(!is_unauthorized(&from_condition(Kind::NotFound, "op", "d")));
    }
}
