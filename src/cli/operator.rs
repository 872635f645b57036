//! Who runs an operator command (`rtpd replay`, `rtpd dlq replay | purge`),
//! as the outcome journal records it.
//!
//! When the command reaches Azure with an Entra identity (the WAL by account
//! URL, Service Bus by namespace, Redis or PostgreSQL with Entra tokens), the
//! operator is that identity: `entra:alice@contoso.com (oid …)` for a person
//! signed in with `az login`, `entra:app <client id> (oid …)` for a managed
//! identity. Otherwise — connection strings, keys, embedded backends — the
//! command line cannot know who runs it and journals the self-declared
//! `--operator` (default `$USER`) as `cli:<name>`; so it does, with one line
//! on stderr, when the Entra principal cannot be read.

use crate::azure::identity::{self, EntraPrincipal};
use crate::config::{LedgerKind, QueueKind, Settings, WalKind};
use crate::replay::Operator;
use azure_core::credentials::TokenCredential;

/// Token audiences of the services rtpd reaches with Entra ID. Any one
/// serves: the principal in the token is the same whatever the audience.
const STORAGE_SCOPE: &str = "https://storage.azure.com/.default";
const SERVICEBUS_SCOPE: &str = "https://servicebus.azure.net/.default";
const REDIS_SCOPE: &str = "https://redis.azure.com/.default";
const POSTGRES_SCOPE: &str = "https://ossrdbms-aad.database.windows.net/.default";

/// The audience of the first backend these settings reach with an Entra
/// identity, or `None` when none does (the same choices `Services::build`
/// makes: a connection string wins over an account URL or namespace).
pub fn entra_scope(s: &Settings) -> Option<&'static str> {
    if s.wal == WalKind::Azure
        && s.storage_connection_string.is_none()
        && s.storage_account_url.is_some()
    {
        Some(STORAGE_SCOPE)
    } else if s.queue == QueueKind::Servicebus
        && s.servicebus_connection_string.is_none()
        && s.servicebus_namespace.is_some()
    {
        Some(SERVICEBUS_SCOPE)
    } else if s.ledger == LedgerKind::Redis && s.redis_entra {
        Some(REDIS_SCOPE)
    } else if s.ledger == LedgerKind::Postgres && s.postgres_entra {
        Some(POSTGRES_SCOPE)
    } else {
        None
    }
}

/// The self-declared operator: `--operator`, else `$USER` (clap reads it).
pub fn declared(given: Option<&str>) -> Operator {
    Operator::Cli(
        given
            .map(str::trim)
            .filter(|g| !g.is_empty())
            .unwrap_or("unknown")
            .to_owned(),
    )
}

/// The operator to journal for a command run with these settings.
pub async fn resolve(settings: &Settings, given: Option<&str>) -> Operator {
    let Some(scope) = entra_scope(settings) else {
        return declared(given);
    };
    match identity::credential(settings.azure_client_id.as_deref()) {
        Ok((credential, _)) => from_credential(credential.as_ref(), scope, given).await,
        Err(why) => fall_back(given, &why),
    }
}

/// The Entra principal of `credential`, else the declared operator (said on stderr).
pub async fn from_credential(
    credential: &dyn TokenCredential,
    scope: &str,
    given: Option<&str>,
) -> Operator {
    match identity::principal(credential, scope).await {
        Ok(p) => entra(&p),
        Err(why) => fall_back(given, &why),
    }
}

fn entra(p: &EntraPrincipal) -> Operator {
    Operator::Entra(p.to_string())
}

fn fall_back(given: Option<&str>, why: &str) -> Operator {
    let op = declared(given);
    // Azure's errors span several lines (one per credential tried): one line here.
    let why = why
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    eprintln!("rtpd: will journal the operator as {op}, not an Entra principal: {why}");
    op
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;
    use azure_core::credentials::{AccessToken, TokenRequestOptions};
    use azure_core::time::{Duration, OffsetDateTime};

    /// A credential that hands out one token and records the scopes asked for.
    #[derive(Debug)]
    struct Fixed(String, std::sync::Mutex<Vec<String>>);

    #[async_trait::async_trait]
    impl TokenCredential for Fixed {
        async fn get_token(
            &self,
            scopes: &[&str],
            _: Option<TokenRequestOptions<'_>>,
        ) -> azure_core::Result<AccessToken> {
            self.1
                .lock()
                .unwrap()
                .extend(scopes.iter().map(|s| s.to_string()));
            Ok(AccessToken::new(
                self.0.clone(),
                OffsetDateTime::now_utc() + Duration::hours(1),
            ))
        }
    }

    fn fixed(token: String) -> Fixed {
        Fixed(token, Default::default())
    }

    #[tokio::test]
    async fn the_entra_principal_is_the_operator_when_the_command_has_one() {
        let c = fixed(identity::fake_token(serde_json::json!({
            "oid": "11111111-2222-3333-4444-555555555555",
            "upn": "alice@contoso.com",
        })));
        let op = from_credential(&c, STORAGE_SCOPE, Some("mallory")).await;
        assert_eq!(
            op.to_string(),
            "entra:alice@contoso.com (oid 11111111-2222-3333-4444-555555555555)"
        );
        assert_eq!(*c.1.lock().unwrap(), [STORAGE_SCOPE]);
        let mi = fixed(identity::fake_token(
            serde_json::json!({"oid": "o-7", "appid": "client-7"}),
        ));
        assert_eq!(
            from_credential(&mi, REDIS_SCOPE, None).await.to_string(),
            "entra:app client-7 (oid o-7)"
        );
    }

    #[tokio::test]
    async fn without_a_readable_principal_the_declared_name_is_journaled() {
        let opaque = fixed("not-a-jwt".into());
        assert_eq!(
            from_credential(&opaque, STORAGE_SCOPE, Some("carol"))
                .await
                .to_string(),
            "cli:carol"
        );
        assert_eq!(declared(Some("  ")).to_string(), "cli:unknown");
    }

    #[tokio::test]
    async fn connection_strings_and_embedded_backends_have_no_entra_principal() {
        let local = Settings::default();
        assert_eq!(entra_scope(&local), None);
        assert_eq!(resolve(&local, Some("dave")).await.to_string(), "cli:dave");
        let keyed = Settings {
            wal: WalKind::Azure,
            storage_connection_string: Some(Secret::from("UseDevelopmentStorage=true")),
            storage_account_url: Some("https://acct.blob.core.windows.net".into()),
            ..Settings::default()
        };
        assert_eq!(entra_scope(&keyed), None);
    }

    #[test]
    fn each_entra_backend_names_its_audience() {
        let wal = Settings {
            wal: WalKind::Azure,
            storage_account_url: Some("https://acct.blob.core.windows.net".into()),
            ..Settings::default()
        };
        assert_eq!(entra_scope(&wal), Some(STORAGE_SCOPE));
        let sb = Settings {
            queue: QueueKind::Servicebus,
            servicebus_namespace: Some("ns.servicebus.windows.net".into()),
            ..Settings::default()
        };
        assert_eq!(entra_scope(&sb), Some(SERVICEBUS_SCOPE));
        let redis = Settings {
            ledger: LedgerKind::Redis,
            redis_entra: true,
            ..Settings::default()
        };
        assert_eq!(entra_scope(&redis), Some(REDIS_SCOPE));
        let pg = Settings {
            ledger: LedgerKind::Postgres,
            postgres_entra: true,
            ..Settings::default()
        };
        assert_eq!(entra_scope(&pg), Some(POSTGRES_SCOPE));
    }
}
