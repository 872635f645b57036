//! Entra ID authentication to Azure Database for PostgreSQL: the user is the
//! database role of the identity (the user part of `RTPD_POSTGRES_URL`), the
//! password an access token for `https://ossrdbms-aad.database.windows.net/.default`.
//! The server checks the token only when a connection opens, so open
//! connections outlive it; each new connection takes the current token,
//! which a background task refreshes well before it expires. The identity is
//! the one Blob Storage and Service Bus use (`azure::identity`).

use crate::backoff::Backoff;
use azure_core::credentials::TokenCredential;
use secrecy::SecretString;
use std::{sync::Arc, time::Duration};
use tokio::sync::watch;

pub const SCOPE: &str = "https://ossrdbms-aad.database.windows.net/.default";

type Current = Option<Result<SecretString, String>>;

/// The current token for new connections. Dropping it stops the refresh.
#[derive(Clone)]
pub struct EntraPasswords {
    rx: watch::Receiver<Current>,
    _task: Arc<AbortOnDrop>,
    pub identity: String,
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// When to fetch the next token: at three quarters of the remaining
/// lifetime, so a failed refresh still has time to be retried.
fn refresh_after(remaining: Duration) -> Duration {
    (remaining * 3 / 4).max(Duration::from_secs(10))
}

impl EntraPasswords {
    pub fn start(client_id: Option<&str>) -> Result<EntraPasswords, String> {
        let (credential, identity) = crate::azure::identity::credential(client_id)
            .map_err(|e| format!("{e} (for PostgreSQL)"))?;
        Ok(Self::with_credential(credential, identity))
    }

    pub fn with_credential(credential: Arc<dyn TokenCredential>, identity: String) -> Self {
        let (tx, rx) = watch::channel::<Current>(None);
        let task = tokio::spawn(async move {
            let mut retry = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
            loop {
                let wait = match credential.get_token(&[SCOPE], None).await {
                    Ok(token) => {
                        retry.reset();
                        let remaining =
                            token.expires_on - azure_core::time::OffsetDateTime::now_utc();
                        tx.send_replace(Some(Ok(SecretString::from(
                            token.token.secret().to_owned(),
                        ))));
                        refresh_after(remaining.try_into().unwrap_or_default())
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "fetching an Entra ID token for PostgreSQL failed");
                        // New connections keep using the last token while it
                        // lasts; only before the first one is the error shown.
                        if tx.borrow().as_ref().is_none_or(|c| c.is_err()) {
                            tx.send_replace(Some(Err(e.to_string())));
                        }
                        retry.next_delay()
                    }
                };
                tokio::time::sleep(wait).await;
            }
        });
        EntraPasswords {
            rx,
            _task: Arc::new(AbortOnDrop(task)),
            identity,
        }
    }

    /// The token to open a connection with, waiting for the first one.
    pub async fn current(&self) -> Result<SecretString, String> {
        let mut rx = self.rx.clone();
        let got = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| "the Entra ID token task stopped".to_owned())?;
        got.clone()
            .unwrap_or_else(|| Err("no Entra ID token yet".to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use azure_core::credentials::{AccessToken, TokenRequestOptions};
    use secrecy::ExposeSecret;

    #[derive(Debug)]
    struct Counting(std::sync::atomic::AtomicU32);

    #[async_trait::async_trait]
    impl TokenCredential for Counting {
        async fn get_token(
            &self,
            scopes: &[&str],
            _: Option<TokenRequestOptions<'_>>,
        ) -> azure_core::Result<AccessToken> {
            assert_eq!(scopes, [SCOPE]);
            let n = self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(AccessToken::new(
                format!("token-{n}"),
                azure_core::time::OffsetDateTime::now_utc() + azure_core::time::Duration::hours(1),
            ))
        }
    }

    #[tokio::test]
    async fn connections_get_the_current_token_for_the_database_scope() {
        let p = EntraPasswords::with_credential(Arc::new(Counting(0.into())), "test".into());
        assert_eq!(p.current().await.unwrap().expose_secret(), "token-0");
        // Not fetched again while it is fresh.
        assert_eq!(p.current().await.unwrap().expose_secret(), "token-0");
    }

    #[test]
    fn refresh_happens_well_before_expiry() {
        assert_eq!(
            refresh_after(Duration::from_secs(3600)),
            Duration::from_secs(2700)
        );
        assert_eq!(refresh_after(Duration::ZERO), Duration::from_secs(10));
    }
}
