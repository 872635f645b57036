//! Tokens for CBS put-token: SAS tokens signed per the documented algorithm,
//! or Entra ID access tokens from `azure_identity` (scope
//! `https://servicebus.azure.net/.default`).

use std::sync::Arc;
use std::time::Duration;

use azure_core::credentials::TokenCredential;
use base64::Engine;
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;

use super::connection_string::Credential;

pub(super) const SAS_TOKEN_TYPE: &str = "servicebus.windows.net:sastoken";
pub(super) const JWT_TOKEN_TYPE: &str = "jwt";
const ENTRA_SCOPE: &str = "https://servicebus.azure.net/.default";

pub(super) struct Token {
    pub kind: &'static str,
    pub value: SecretString,
    pub expires_at: DateTime<Utc>,
}

/// Produces tokens for an audience; chosen once at connect time.
#[derive(Clone)]
pub(super) enum TokenSource {
    SharedKey {
        name: String,
        key: SecretString,
        /// Lifetime of the tokens we sign.
        lifetime: Duration,
    },
    Signature(SecretString),
    Entra(Arc<dyn TokenCredential>),
}

impl TokenSource {
    pub fn new(credential: &Credential, sas_lifetime: Duration) -> Result<Self, String> {
        Ok(match credential {
            Credential::SharedKey { name, key } => TokenSource::SharedKey {
                name: name.clone(),
                key: key.clone(),
                lifetime: sas_lifetime,
            },
            Credential::Signature(sig) => TokenSource::Signature(sig.clone()),
            Credential::Entra { client_id } => TokenSource::Entra(
                crate::azure::identity::credential(client_id.as_deref())
                    .map_err(|e| format!("Entra ID credential: {e}"))?
                    .0,
            ),
        })
    }

    pub fn describe(&self) -> String {
        match self {
            TokenSource::SharedKey { name, .. } => format!("shared access key {name}"),
            TokenSource::Signature(_) => "shared access signature".into(),
            TokenSource::Entra(_) => "Entra ID".into(),
        }
    }

    pub async fn token(&self, audience: &str) -> Result<Token, String> {
        match self {
            TokenSource::SharedKey {
                name,
                key,
                lifetime,
            } => {
                let expires_at = Utc::now() + *lifetime;
                let value = sign_sas(audience, name, key.expose_secret(), expires_at.timestamp());
                Ok(Token {
                    kind: SAS_TOKEN_TYPE,
                    value: SecretString::from(value),
                    expires_at,
                })
            }
            TokenSource::Signature(sig) => {
                let expires_at = sas_expiry(sig.expose_secret())
                    .unwrap_or_else(|| Utc::now() + Duration::from_secs(3600));
                Ok(Token {
                    kind: SAS_TOKEN_TYPE,
                    value: sig.clone(),
                    expires_at,
                })
            }
            TokenSource::Entra(credential) => {
                let access = credential
                    .get_token(&[ENTRA_SCOPE], None)
                    .await
                    .map_err(|e| format!("Entra ID token: {e}"))?;
                let expires_at =
                    DateTime::<Utc>::from_timestamp(access.expires_on.unix_timestamp(), 0)
                        .unwrap_or_else(|| Utc::now() + Duration::from_secs(300));
                Ok(Token {
                    kind: JWT_TOKEN_TYPE,
                    value: SecretString::from(access.token.secret().to_string()),
                    expires_at,
                })
            }
        }
    }
}

/// `SharedAccessSignature sr=<enc uri>&sig=<enc base64 hmac>&se=<expiry>&skn=<key name>`,
/// signing `<enc uri>\n<expiry>` with HMAC-SHA256 under the key (as text).
pub(super) fn sign_sas(resource: &str, key_name: &str, key: &str, expiry: i64) -> String {
    let encoded: String = url::form_urlencoded::byte_serialize(resource.as_bytes()).collect();
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac =
        Hmac::<Sha256>::new_from_slice(key.as_bytes()).expect("hmac takes any key length");
    mac.update(format!("{encoded}\n{expiry}").as_bytes());
    let signature = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    let signature: String = url::form_urlencoded::byte_serialize(signature.as_bytes()).collect();
    let key_name: String = url::form_urlencoded::byte_serialize(key_name.as_bytes()).collect();
    format!("SharedAccessSignature sr={encoded}&sig={signature}&se={expiry}&skn={key_name}")
}

fn sas_expiry(token: &str) -> Option<DateTime<Utc>> {
    let se = token
        .split(['&', ' '])
        .find_map(|p| p.strip_prefix("se="))?;
    DateTime::<Utc>::from_timestamp(se.parse().ok()?, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sas_matches_documented_algorithm() {
        let token = sign_sas(
            "sb://ns.servicebus.windows.net/q",
            "send",
            "key",
            1_700_000_000,
        );
        assert!(
            token.starts_with(
                "SharedAccessSignature sr=sb%3A%2F%2Fns.servicebus.windows.net%2Fq&sig="
            )
        );
        assert!(token.ends_with("&se=1700000000&skn=send"));
        let sig = token
            .split("sig=")
            .nth(1)
            .unwrap()
            .split('&')
            .next()
            .unwrap();
        let sig = url::form_urlencoded::parse(format!("s={sig}").as_bytes())
            .next()
            .unwrap()
            .1
            .to_string();
        let mut mac = Hmac::<Sha256>::new_from_slice(b"key").unwrap();
        mac.update(b"sb%3A%2F%2Fns.servicebus.windows.net%2Fq\n1700000000");
        assert_eq!(
            base64::engine::general_purpose::STANDARD
                .decode(sig)
                .unwrap(),
            mac.finalize().into_bytes().to_vec()
        );
        assert_eq!(sas_expiry(&token).unwrap().timestamp(), 1_700_000_000);
    }
}
