//! How requests carry a shared access signature (SAS).
//!
//! The Azure SDK for Rust has no shared-key signing, so with an account key we
//! sign an **account SAS** ourselves, version `sv=2022-11-02`, following
//! "Create an account SAS" (learn.microsoft.com/rest/api/storageservices/create-account-sas).
//! For every version since 2020-12-06 the string to sign is
//!
//! ```text
//! accountname \n signedpermissions \n signedservice \n signedresourcetype \n
//! signedstart \n signedexpiry \n signedIP \n signedProtocol \n signedversion \n
//! signedEncryptionScope \n
//! ```
//!
//! (each field followed by a newline, the last one included), and the signature
//! is `base64(HMAC-SHA256(base64decode(account key), UTF-8(string to sign)))`.
//! We grant `ss=b` (blob service), `srt=co` (container + object: the container
//! check/create and the blobs), `sp=rwlc` (read, write, list, create), no IP
//! range and no encryption scope. Writes stay create-only because `put_new`
//! always sends `If-None-Match: *`.
//!
//! Tokens are short-lived (one hour) and re-signed well before they expire, so a
//! long-lived client never sends a stale one. A SAS given in the connection
//! string is used as is; renewing it is its owner's business.

use azure_core::http::{
    Context, Request,
    policies::{Policy, PolicyResult},
};
use base64::{Engine as _, engine::general_purpose::STANDARD};
use chrono::{DateTime, TimeDelta, Utc};
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretBox, SecretString};
use sha2::Sha256;
use std::{fmt, sync::Arc, sync::Mutex};
use url::{Url, form_urlencoded};

pub(crate) const SAS_VERSION: &str = "2022-11-02";
const SERVICES: &str = "b";
const RESOURCE_TYPES: &str = "co";
const PERMISSIONS: &str = "rwlc";
const LIFETIME: TimeDelta = TimeDelta::hours(1);
/// Re-sign when less than this is left: covers a slow request plus the SDK's retries.
const RENEW_BEFORE: TimeDelta = TimeDelta::minutes(15);
/// Backdate the start so a server clock slightly behind ours still accepts the token.
const CLOCK_SKEW: TimeDelta = TimeDelta::minutes(5);

/// Signs account SAS tokens with a storage account key.
pub(crate) struct AccountSasSigner {
    account: String,
    key: SecretBox<Vec<u8>>,
    /// `https`, or `https,http` when the endpoint is plain http (Azurite).
    protocol: &'static str,
}

impl AccountSasSigner {
    pub(crate) fn new(account: String, key: SecretBox<Vec<u8>>, allow_http: bool) -> Self {
        let protocol = if allow_http { "https,http" } else { "https" };
        AccountSasSigner {
            account,
            key,
            protocol,
        }
    }

    fn string_to_sign(&self, start: &str, expiry: &str) -> String {
        let ip = "";
        let encryption_scope = "";
        [
            self.account.as_str(),
            PERMISSIONS,
            SERVICES,
            RESOURCE_TYPES,
            start,
            expiry,
            ip,
            self.protocol,
            SAS_VERSION,
            encryption_scope,
        ]
        .iter()
        .map(|field| format!("{field}\n"))
        .collect()
    }

    /// The token (query string, no leading `?`) valid from `start` to `expiry`.
    pub(crate) fn token(&self, start: DateTime<Utc>, expiry: DateTime<Utc>) -> SecretString {
        let start = start.format("%Y-%m-%dT%H:%M:%SZ").to_string();
        let expiry = expiry.format("%Y-%m-%dT%H:%M:%SZ").to_string();
        let mut mac = Hmac::<Sha256>::new_from_slice(self.key.expose_secret())
            .expect("HMAC-SHA256 accepts keys of any length");
        mac.update(self.string_to_sign(&start, &expiry).as_bytes());
        let sig = STANDARD.encode(mac.finalize().into_bytes());
        let token = form_urlencoded::Serializer::new(String::new())
            .append_pair("sv", SAS_VERSION)
            .append_pair("ss", SERVICES)
            .append_pair("srt", RESOURCE_TYPES)
            .append_pair("sp", PERMISSIONS)
            .append_pair("st", &start)
            .append_pair("se", &expiry)
            .append_pair("spr", self.protocol)
            .append_pair("sig", &sig)
            .finish();
        SecretString::from(token)
    }
}

/// A pipeline policy (run on every try) that puts the current SAS on the request URL.
pub(crate) struct SasPolicy {
    source: Source,
}

enum Source {
    Fixed(SecretString),
    Signed {
        signer: AccountSasSigner,
        current: Mutex<Option<(SecretString, DateTime<Utc>)>>,
    },
}

impl SasPolicy {
    pub(crate) fn fixed(token: SecretString) -> Arc<Self> {
        Arc::new(SasPolicy {
            source: Source::Fixed(token),
        })
    }

    pub(crate) fn signed(signer: AccountSasSigner) -> Arc<Self> {
        Arc::new(SasPolicy {
            source: Source::Signed {
                signer,
                current: Mutex::new(None),
            },
        })
    }

    /// The token to use at `now`, re-signed when the current one is near its expiry.
    fn token_at(&self, now: DateTime<Utc>) -> SecretString {
        match &self.source {
            Source::Fixed(token) => token.clone(),
            Source::Signed { signer, current } => {
                // A poisoned lock only means another request panicked mid-update; the value is still usable.
                let mut current = current.lock().unwrap_or_else(|p| p.into_inner());
                match &*current {
                    Some((token, expiry)) if *expiry - now > RENEW_BEFORE => token.clone(),
                    _ => {
                        let expiry = now + LIFETIME;
                        let token = signer.token(now - CLOCK_SKEW, expiry);
                        *current = Some((token.clone(), expiry));
                        token
                    }
                }
            }
        }
    }
}

impl fmt::Debug for SasPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.source {
            Source::Fixed(_) => "fixed",
            Source::Signed { .. } => "account-key",
        };
        f.debug_struct("SasPolicy")
            .field("source", &kind)
            .finish_non_exhaustive()
    }
}

#[async_trait::async_trait]
impl Policy for SasPolicy {
    async fn send(
        &self,
        ctx: &Context,
        request: &mut Request,
        next: &[Arc<dyn Policy>],
    ) -> PolicyResult {
        let token = self.token_at(Utc::now());
        apply(request.url_mut(), token.expose_secret());
        next[0].send(ctx, request, &next[1..]).await
    }
}

/// Appends `token` to the query of `url`, first dropping any parameter the token
/// sets: the same request goes through this policy again on each retry.
/// Works on the raw query so the other parameters keep their exact encoding.
fn apply(url: &mut Url, token: &str) {
    let key_of = |pair: &str| {
        let raw = pair.split_once('=').map_or(pair, |(k, _)| k);
        form_urlencoded::parse(raw.as_bytes())
            .next()
            .map(|(k, _)| k.into_owned())
            .unwrap_or_default()
    };
    let token_keys: Vec<String> = token.split('&').map(key_of).collect();
    let mut query: Vec<&str> = url
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|pair| !pair.is_empty() && !token_keys.contains(&key_of(pair)))
        .collect();
    query.push(token);
    url.set_query(Some(&query.join("&")));
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn signer() -> AccountSasSigner {
        // Azurite's well-known development key (public).
        let key = STANDARD
            .decode(super::super::connection_string::DEV_ACCOUNT_KEY)
            .unwrap();
        AccountSasSigner::new(
            "devstoreaccount1".into(),
            SecretBox::new(Box::new(key)),
            true,
        )
    }

    #[test]
    fn string_to_sign_follows_the_2020_12_06_layout() {
        assert_eq!(
            signer().string_to_sign("2025-01-01T00:00:00Z", "2025-01-01T01:00:00Z"),
            "devstoreaccount1\nrwlc\nb\nco\n2025-01-01T00:00:00Z\n2025-01-01T01:00:00Z\n\nhttps,http\n2022-11-02\n\n"
        );
    }

    /// Expected signature computed outside Rust from the documented algorithm
    /// (5RpnL2hv7g68OsosAHQR/h/J0qjCFJxy6578ZzMs7bA=, same with Python's hmac):
    /// printf 'devstoreaccount1\nrwlc\nb\nco\n2025-01-01T00:00:00Z\n2025-01-01T01:00:00Z\n\nhttps,http\n2022-11-02\n\n' \
    ///   | openssl dgst -sha256 -mac HMAC -macopt "hexkey:$(echo "$DEV_ACCOUNT_KEY" | base64 -d | xxd -p -c 256)" -binary | base64
    #[test]
    fn token_matches_the_hand_derived_vector() {
        let start = Utc.with_ymd_and_hms(2025, 1, 1, 0, 0, 0).unwrap();
        let expiry = Utc.with_ymd_and_hms(2025, 1, 1, 1, 0, 0).unwrap();
        let token = signer().token(start, expiry);
        assert_eq!(
            token.expose_secret(),
            "sv=2022-11-02&ss=b&srt=co&sp=rwlc&st=2025-01-01T00%3A00%3A00Z&se=2025-01-01T01%3A00%3A00Z\
             &spr=https%2Chttp&sig=5RpnL2hv7g68OsosAHQR%2Fh%2FJ0qjCFJxy6578ZzMs7bA%3D"
        );
    }

    #[test]
    fn signed_tokens_are_reused_then_renewed_before_expiry() {
        let policy = SasPolicy::signed(signer());
        let t0 = Utc.with_ymd_and_hms(2025, 1, 1, 0, 0, 0).unwrap();
        let first = policy.token_at(t0);
        assert_eq!(
            policy.token_at(t0 + TimeDelta::minutes(44)).expose_secret(),
            first.expose_secret()
        );
        let renewed = policy.token_at(t0 + TimeDelta::minutes(46));
        assert_ne!(renewed.expose_secret(), first.expose_secret());
        assert!(
            renewed
                .expose_secret()
                .contains("se=2025-01-01T01%3A46%3A00Z")
        );
    }

    #[test]
    fn apply_replaces_a_previous_token_and_keeps_other_parameters_verbatim() {
        let mut url =
            Url::parse("http://h/acct/c?restype=container&comp=list&prefix=wal%2Fv1%2F").unwrap();
        apply(&mut url, "sv=1&sig=a%2Bb");
        apply(&mut url, "sv=2&sig=c");
        assert_eq!(
            url.query(),
            Some("restype=container&comp=list&prefix=wal%2Fv1%2F&sv=2&sig=c")
        );
        let mut bare = Url::parse("http://h/acct/c/blob").unwrap();
        apply(&mut bare, "sv=2&sig=c");
        assert_eq!(bare.as_str(), "http://h/acct/c/blob?sv=2&sig=c");
    }
}
