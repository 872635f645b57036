//! Entra ID authentication to Azure Managed Redis / Azure Cache for Redis:
//! the user name is the identity's object id (the user part of
//! `RTPD_REDIS_URL`), the password an access token for
//! `https://redis.azure.com/.default`, re-sent with AUTH before it expires.
//!
//! Why tokens from our own `azure_identity` 1.x rather than the redis crate's
//! `entra-id` feature: that feature is built on `azure_identity` 0.31, so it
//! would compile a second, older Azure SDK next to the one the WAL uses and
//! could not take the WAL's credential (the two `TokenCredential` traits
//! differ). Instead we feed the crate's `token-based-authentication` hook —
//! a `StreamingCredentialsProvider` — from the same identity the WAL picks
//! (`azure::identity::EntraIdentity`), and the crate re-AUTHs every
//! connection on each new token.

use crate::backoff::Backoff;
use azure_core::credentials::TokenCredential;
use futures::Stream;
use redis::{BasicAuth, ErrorKind, RedisError, RedisResult};
use std::{pin::Pin, sync::Arc, time::Duration};
use tokio::sync::watch;

pub const SCOPE: &str = "https://redis.azure.com/.default";

type Current = Option<Result<BasicAuth, String>>;

/// Fetches tokens in the background and hands each new one to every
/// subscribed connection. Dropping it stops the refresh.
pub struct EntraTokens {
    rx: watch::Receiver<Current>,
    task: Arc<AbortOnDrop>,
    pub identity: String,
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Clone for EntraTokens {
    fn clone(&self) -> Self {
        EntraTokens {
            rx: self.rx.clone(),
            task: self.task.clone(),
            identity: self.identity.clone(),
        }
    }
}

/// When to fetch the next token: at three quarters of the remaining
/// lifetime, so a failed refresh still has time to be retried.
fn refresh_after(remaining: Duration) -> Duration {
    (remaining * 3 / 4).max(Duration::from_secs(10))
}

impl EntraTokens {
    /// Chooses the identity like the WAL does (`RTPD_AZURE_CLIENT_ID` → that
    /// user-assigned managed identity) and starts refreshing.
    pub fn start(object_id: String, client_id: Option<&str>) -> Result<EntraTokens, String> {
        let (credential, identity) = crate::azure::identity::credential(client_id)
            .map_err(|e| format!("{e} (for Redis)"))?;
        Ok(Self::with_credential(object_id, credential, identity))
    }

    pub fn with_credential(
        object_id: String,
        credential: Arc<dyn TokenCredential>,
        identity: String,
    ) -> EntraTokens {
        let (tx, rx) = watch::channel::<Current>(None);
        let task = tokio::spawn(async move {
            let mut retry = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
            loop {
                let wait = match credential.get_token(&[SCOPE], None).await {
                    Ok(token) => {
                        retry.reset();
                        let remaining =
                            token.expires_on - azure_core::time::OffsetDateTime::now_utc();
                        tx.send_replace(Some(Ok(BasicAuth::new(
                            object_id.clone(),
                            token.token.secret().to_owned(),
                        ))));
                        refresh_after(remaining.try_into().unwrap_or_default())
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "fetching an Entra ID token for Redis failed");
                        // Connections keep their last token until it expires;
                        // only a connection that never had one sees the error.
                        if tx.borrow().as_ref().is_none_or(|c| c.is_err()) {
                            tx.send_replace(Some(Err(e.to_string())));
                        }
                        retry.next_delay()
                    }
                };
                tokio::time::sleep(wait).await;
            }
        });
        EntraTokens {
            rx,
            task: Arc::new(AbortOnDrop(task)),
            identity,
        }
    }
}

fn to_item(c: Result<BasicAuth, String>) -> RedisResult<BasicAuth> {
    c.map_err(|e| {
        RedisError::from((
            ErrorKind::AuthenticationFailed,
            "Entra ID token for Redis",
            e,
        ))
    })
}

impl redis::StreamingCredentialsProvider for EntraTokens {
    /// The current credentials at once (if there are any yet), then each new one.
    fn subscribe(&self) -> Pin<Box<dyn Stream<Item = RedisResult<BasicAuth>> + Send + 'static>> {
        let mut rx = self.rx.clone();
        rx.mark_changed();
        Box::pin(futures::stream::unfold(rx, |mut rx| async move {
            loop {
                rx.changed().await.ok()?;
                let current = rx.borrow_and_update().clone();
                if let Some(c) = current {
                    return Some((to_item(c), rx));
                }
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use azure_core::credentials::{AccessToken, TokenRequestOptions};
    use futures::StreamExt;
    use redis::StreamingCredentialsProvider;

    #[derive(Debug)]
    struct Fixed(std::sync::atomic::AtomicU32);

    #[async_trait::async_trait]
    impl TokenCredential for Fixed {
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
    async fn subscribers_get_the_object_id_and_the_current_token() {
        let tokens =
            EntraTokens::with_credential("oid-1".into(), Arc::new(Fixed(0.into())), "test".into());
        let first = tokens.subscribe().next().await.unwrap().unwrap();
        assert_eq!(first.username(), "oid-1");
        assert_eq!(first.password(), "token-0");
        // A late subscriber gets the current token at once.
        let again = tokens.subscribe().next().await.unwrap().unwrap();
        assert_eq!(again.password(), "token-0");
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
