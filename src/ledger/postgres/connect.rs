//! How the ledger reaches PostgreSQL: a `deadpool-postgres` pool of
//! `tokio-postgres` connections, TLS with rustls (certificates checked
//! against the platform's roots, as the HTTP clients do), and either the
//! URL's own credentials or Entra ID tokens. Connections are opened on
//! demand, so the service starts (and reports the ledger not ready) while
//! the database is down.

use super::entra::EntraPasswords;
use crate::ledger::LedgerError;
use deadpool_postgres::{
    Connect, Manager, ManagerConfig, Pool, RecyclingMethod, Runtime, tokio_postgres,
};
use futures::future::BoxFuture;
use secrecy::{ExposeSecret, SecretString};
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres_rustls::MakeRustlsConnect;

#[derive(Debug, Clone)]
pub struct PostgresSettings {
    /// `postgresql://…` or `host=… dbname=…`; may carry a password.
    pub url: SecretString,
    /// Authenticate with Entra ID tokens; the URL's user is the identity's
    /// database role and the URL must not carry a password.
    pub entra: bool,
    /// `RTPD_AZURE_CLIENT_ID`: use this user-assigned managed identity.
    pub client_id: Option<String>,
    /// How long terminal records are kept; `None` keeps them forever.
    pub retention: Option<Duration>,
    /// Bound on every call, waiting for a connection included.
    pub timeout: Duration,
    /// Connections this process opens at most.
    pub pool_size: usize,
    /// Keep a copy of each payload in the `payload` column.
    pub payload: bool,
}

pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

/// Enough for the API's and the processor's concurrent calls on two cores;
/// an Azure Flexible Server's smallest tier allows 50 connections.
pub const DEFAULT_POOL_SIZE: usize = 16;

impl PostgresSettings {
    pub fn from_settings(s: &crate::config::Settings) -> Result<PostgresSettings, LedgerError> {
        let url = s.postgres_url.as_ref().ok_or_else(|| {
            fatal("RTPD_POSTGRES_URL is required with RTPD_LEDGER=postgres".to_owned())
        })?;
        Ok(PostgresSettings {
            url: url.0.clone(),
            entra: s.postgres_entra,
            client_id: s.azure_client_id.clone(),
            retention: (s.ledger_retention_days > 0)
                .then(|| Duration::from_secs(u64::from(s.ledger_retention_days) * 86_400)),
            timeout: DEFAULT_TIMEOUT,
            pool_size: DEFAULT_POOL_SIZE,
            payload: s.postgres_payload,
        })
    }
}

fn fatal(msg: String) -> LedgerError {
    LedgerError::Fatal(msg)
}

pub struct Connected {
    pub pool: Pool,
    /// Where and as whom, for logs; never a secret.
    pub describe: String,
}

/// Opens connections with the URL's settings, and with the current Entra ID
/// token as the password when there is one.
struct Connector {
    tls: MakeRustlsConnect,
    passwords: Option<EntraPasswords>,
}

impl Connect for Connector {
    fn connect(
        &self,
        pg_config: &tokio_postgres::Config,
    ) -> BoxFuture<'_, Result<(tokio_postgres::Client, JoinHandle<()>), tokio_postgres::Error>>
    {
        let mut config = pg_config.clone();
        Box::pin(async move {
            if let Some(p) = &self.passwords {
                match p.current().await {
                    Ok(token) => {
                        config.password(token.expose_secret());
                    }
                    Err(e) => {
                        // Surfaces as a failed connection: Unavailable, retried.
                        tracing::warn!(error = %e, "no Entra ID token for PostgreSQL");
                    }
                }
            }
            let (client, connection) = config.connect(self.tls.clone()).await?;
            let task = tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!(error = %e, "postgres connection ended");
                }
            });
            Ok((client, task))
        })
    }
}

fn tls() -> Result<MakeRustlsConnect, LedgerError> {
    use rustls_platform_verifier::ConfigVerifierExt;
    let config = rustls::ClientConfig::with_platform_verifier()
        .map_err(|e| fatal(format!("TLS set-up for PostgreSQL: {e}")))?;
    Ok(MakeRustlsConnect::new(config))
}

/// libpq's `sslmode=verify-ca` and `verify-full`, which Azure's guidance asks
/// for, as the driver's `require`: the certificate is verified either way
/// (rustls with the platform's roots and the host name).
fn with_supported_sslmode(url: &str) -> String {
    url.replace("sslmode=verify-full", "sslmode=require")
        .replace("sslmode=verify-ca", "sslmode=require")
}

/// Builds the pool without contacting the database.
pub fn connect(s: &PostgresSettings) -> Result<Connected, LedgerError> {
    let mut config: tokio_postgres::Config = with_supported_sslmode(s.url.expose_secret())
        .parse()
        .map_err(|e| fatal(format!("RTPD_POSTGRES_URL: {e}")))?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(s.timeout);
    }
    if config.get_application_name().is_none() {
        config.application_name("rtpd");
    }
    let user = config.get_user().unwrap_or_default().to_owned();
    let (passwords, auth) = if s.entra {
        if user.is_empty() || config.get_password().is_some() {
            return Err(fatal(
                "RTPD_POSTGRES_ENTRA=true needs RTPD_POSTGRES_URL like \
                 postgresql://<role>@<server>.postgres.database.azure.com/<db>?sslmode=require \
                 (the identity's database role as the user, no password)"
                    .to_owned(),
            ));
        }
        // A token is a bearer secret: never send it in clear.
        if config.get_ssl_mode() != SslMode::Require {
            config.ssl_mode(SslMode::Require);
        }
        let p = EntraPasswords::start(s.client_id.as_deref()).map_err(fatal)?;
        let auth = format!("Entra ID as role {user} ({})", p.identity);
        (Some(p), auth)
    } else if config.get_password().is_some() {
        (None, format!("password for {user}"))
    } else {
        (None, format!("user {user} without a password"))
    };
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .zip(config.get_ports().iter().chain(std::iter::repeat(&5432)))
        .map(|(h, port)| match h {
            Host::Tcp(h) => format!("{h}:{port}"),
            #[cfg(unix)]
            Host::Unix(p) => format!("{}", p.display()),
        })
        .collect();
    let tls_mode = match config.get_ssl_mode() {
        SslMode::Disable => "plain",
        SslMode::Require => "TLS",
        _ => "TLS if offered",
    };
    let describe = format!(
        "postgres ledger {} db {} ({tls_mode}, {auth})",
        hosts.join(","),
        config.get_dbname().unwrap_or("(default)")
    );
    let manager = Manager::from_connect(
        config,
        Connector {
            tls: tls()?,
            passwords,
        },
        ManagerConfig {
            // No test query on checkout: that would be a round trip per call.
            // A connection the server closed is noticed by `is_closed` and
            // replaced; one that died silently fails its next call, which is
            // retried as Unavailable.
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let pool = Pool::builder(manager)
        .max_size(s.pool_size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(s.timeout))
        .create_timeout(Some(s.timeout))
        .recycle_timeout(Some(s.timeout))
        .build()
        .map_err(|e| fatal(format!("postgres pool: {e}")))?;
    Ok(Connected { pool, describe })
}

#[cfg(test)]
mod sslmode_tests {
    use super::with_supported_sslmode;

    #[test]
    fn verify_modes_are_accepted_as_require_with_verification() {
        for mode in ["verify-full", "verify-ca"] {
            let url = format!("postgresql://u@h.postgres.database.azure.com/db?sslmode={mode}");
            let cfg: tokio_postgres::Config = with_supported_sslmode(&url).parse().unwrap();
            assert_eq!(cfg.get_ssl_mode(), tokio_postgres::config::SslMode::Require);
        }
    }
}
