//! How the ledger reaches Redis: one multiplexed connection behind a
//! `ConnectionManager` that reconnects by itself, TLS for `rediss://`, and
//! either the URL's own credentials or Entra ID tokens.

use super::entra::EntraTokens;
use crate::ledger::LedgerError;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use secrecy::{ExposeSecret, SecretString};
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// `redis://` or `rediss://`; may carry a password, so it stays secret.
    pub url: SecretString,
    pub key_prefix: String,
    /// Authenticate with Entra ID tokens; the URL's user part is the
    /// identity's object id and the URL must not carry a password.
    pub entra: bool,
    /// `RTPD_AZURE_CLIENT_ID`: use this user-assigned managed identity.
    pub client_id: Option<String>,
    /// How long terminal records are kept; `None` keeps them forever.
    pub retention: Option<Duration>,
    /// Bound on every call, connecting included: a dead Redis answers
    /// `Unavailable` this fast instead of hanging the request.
    pub timeout: Duration,
}

impl RedisSettings {
    pub fn from_settings(s: &crate::config::Settings) -> RedisSettings {
        RedisSettings {
            url: s.redis_url.0.clone(),
            key_prefix: s.redis_key_prefix.clone(),
            entra: s.redis_entra,
            client_id: s.azure_client_id.clone(),
            retention: (s.ledger_retention_days > 0)
                .then(|| Duration::from_secs(u64::from(s.ledger_retention_days) * 86_400)),
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

pub struct Connected {
    pub conn: ConnectionManager,
    /// Where and as whom, for logs; never a secret.
    pub describe: String,
    /// Kept alive for as long as the connection: dropping it stops the refresh.
    pub tokens: Option<EntraTokens>,
}

fn fatal(msg: impl Into<String>) -> LedgerError {
    LedgerError::Fatal(msg.into())
}

/// Builds the connection without waiting for Redis: the service starts (and
/// reports the ledger not ready) while Redis is down, and connects on first use.
pub fn connect(s: &RedisSettings) -> Result<Connected, LedgerError> {
    let raw = s.url.expose_secret();
    let parsed = url::Url::parse(raw).map_err(|e| fatal(format!("RTPD_REDIS_URL: {e}")))?;
    let client = redis::Client::open(raw).map_err(|e| fatal(format!("RTPD_REDIS_URL: {e}")))?;
    let addr = client.get_connection_info().addr().to_string();
    let mut config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(s.timeout))
        .set_response_timeout(Some(s.timeout))
        // Reconnect attempts behind a failed call; the caller's timeout bounds them.
        .set_number_of_retries(3)
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(Duration::from_millis(500));
    let tls = if parsed.scheme() == "rediss" {
        "TLS"
    } else {
        "plain"
    };
    let (tokens, auth) = if s.entra {
        let object_id = parsed.username();
        if object_id.is_empty() || parsed.password().is_some() {
            return Err(fatal(
                "RTPD_REDIS_ENTRA=true needs RTPD_REDIS_URL like rediss://<object-id>@<host>:10000 \
                 (the identity's object id as the user, no password)",
            ));
        }
        let tokens =
            EntraTokens::start(object_id.to_owned(), s.client_id.as_deref()).map_err(fatal)?;
        config = config.set_credentials_provider(tokens.clone());
        let auth = format!("Entra ID as {object_id} ({})", tokens.identity);
        (Some(tokens), auth)
    } else if parsed.password().is_some() {
        (None, "password from the URL".to_owned())
    } else {
        (None, "no authentication".to_owned())
    };
    let conn = ConnectionManager::new_lazy_with_config(client, config)
        .map_err(|e| fatal(format!("RTPD_REDIS_URL: {e}")))?;
    Ok(Connected {
        conn,
        describe: format!(
            "redis ledger {addr} ({tls}, {auth}), prefix {:?}",
            s.key_prefix
        ),
        tokens,
    })
}
