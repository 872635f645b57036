//! Who rtpd is to Entra ID: one identity, chosen once from the settings and
//! the environment the process runs in, used by Blob Storage, Service Bus and
//! Redis alike. First match wins:
//! 1. `AZURE_FEDERATED_TOKEN_FILE` set → workload identity (AKS), with the client id below.
//! 2. A client id — `RTPD_AZURE_CLIENT_ID`, else the Azure SDKs' standard
//!    `AZURE_CLIENT_ID` — → the user-assigned managed identity with that client id.
//! 3. `IDENTITY_ENDPOINT` or `MSI_ENDPOINT` set → system-assigned managed identity
//!    (App Service, Container Apps, Functions).
//! 4. Otherwise → developer tools (Azure CLI, then Azure Developer CLI).
//!
//! azure_identity 1.x has no `DefaultAzureCredential`, and its managed identity
//! credential cannot tell whether IMDS exists without calling it, so a VM using
//! its *system-assigned* identity (no environment variable) lands on step 4;
//! give such hosts a user-assigned identity and `RTPD_AZURE_CLIENT_ID`.
//!
//! [`principal`] reads who a credential is (the access token's `oid`, `upn`,
//! `appid` claims) so the command line can journal the Entra principal as
//! the operator.

use azure_core::credentials::TokenCredential;
use azure_identity::{
    DeveloperToolsCredential, ManagedIdentityCredential, ManagedIdentityCredentialOptions,
    UserAssignedId, WorkloadIdentityCredential, WorkloadIdentityCredentialOptions,
};
use base64::Engine;
use std::sync::Arc;

/// The identity a process authenticates as, the same for every Azure service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntraIdentity {
    Workload { client_id: Option<String> },
    UserAssigned { client_id: String },
    SystemAssigned,
    DeveloperTools,
}

impl EntraIdentity {
    pub fn choose(client_id: Option<&str>, env_set: impl Fn(&str) -> bool) -> Self {
        let client_id = client_id
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .map(str::to_owned);
        if env_set("AZURE_FEDERATED_TOKEN_FILE") {
            EntraIdentity::Workload { client_id }
        } else if let Some(client_id) = client_id {
            EntraIdentity::UserAssigned { client_id }
        } else if env_set("IDENTITY_ENDPOINT") || env_set("MSI_ENDPOINT") {
            EntraIdentity::SystemAssigned
        } else {
            EntraIdentity::DeveloperTools
        }
    }

    pub fn describe(&self) -> String {
        match self {
            EntraIdentity::Workload {
                client_id: Some(id),
            } => format!("workload identity, client id {id}"),
            EntraIdentity::Workload { client_id: None } => "workload identity".into(),
            EntraIdentity::UserAssigned { client_id } => {
                format!("user-assigned managed identity, client id {client_id}")
            }
            EntraIdentity::SystemAssigned => "system-assigned managed identity".into(),
            EntraIdentity::DeveloperTools => "developer tools credential (az / azd login)".into(),
        }
    }

    pub fn credential(&self) -> azure_core::Result<Arc<dyn TokenCredential>> {
        Ok(match self {
            EntraIdentity::Workload { client_id } => {
                WorkloadIdentityCredential::new(Some(WorkloadIdentityCredentialOptions {
                    client_id: client_id.clone(),
                    ..Default::default()
                }))?
            }
            EntraIdentity::UserAssigned { client_id } => {
                ManagedIdentityCredential::new(Some(ManagedIdentityCredentialOptions {
                    user_assigned_id: Some(UserAssignedId::ClientId(client_id.clone())),
                    ..Default::default()
                }))?
            }
            EntraIdentity::SystemAssigned => ManagedIdentityCredential::new(None)?,
            EntraIdentity::DeveloperTools => DeveloperToolsCredential::new(None)?,
        })
    }
}

pub fn env_set(name: &str) -> bool {
    std::env::var_os(name).is_some_and(|v| !v.is_empty())
}

/// The client id of a user-assigned identity: `RTPD_AZURE_CLIENT_ID` (given),
/// else `AZURE_CLIENT_ID` as every Azure SDK reads it.
pub fn client_id(given: Option<&str>, env: impl Fn(&str) -> Option<String>) -> Option<String> {
    given
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(str::to_owned)
        .or_else(|| env("AZURE_CLIENT_ID").filter(|c| !c.trim().is_empty()))
}

/// A credential for the process's identity, described for logs.
pub fn credential(given: Option<&str>) -> Result<(Arc<dyn TokenCredential>, String), String> {
    let client_id = client_id(given, |name| std::env::var(name).ok());
    let chosen = EntraIdentity::choose(client_id.as_deref(), env_set);
    let identity = chosen.describe();
    // One credential per identity for the whole process: every backend and
    // the journal's operator label share its token cache, so the principal
    // the CLI journals is the one whose token the backends presented.
    static SHARED: std::sync::OnceLock<
        std::sync::Mutex<std::collections::HashMap<String, Arc<dyn TokenCredential>>>,
    > = std::sync::OnceLock::new();
    let mut shared = SHARED
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(c) = shared.get(&identity) {
        return Ok((c.clone(), identity));
    }
    let credential = chosen
        .credential()
        .map_err(|e| format!("cannot set up {identity}: {e}"))?;
    shared.insert(identity.clone(), credential.clone());
    Ok((credential, identity))
}

/// Who an Entra ID access token was issued to, read from its claims.
///
/// The signature is not checked: this is a label for the journal, obtained
/// from our own credential a moment ago, never a decision about access.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntraPrincipal {
    /// `oid`: the object id, stable and unique in the tenant.
    pub object_id: String,
    /// `upn`, else `preferred_username`, else `unique_name`: a person's sign-in name.
    pub user: Option<String>,
    /// `appid` (v1 tokens), else `azp` (v2): the application a managed
    /// identity or service principal signs in as.
    pub app_id: Option<String>,
}

impl std::fmt::Display for EntraPrincipal {
    /// `alice@contoso.com (oid …)`, `app <client id> (oid …)` or `oid …`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.user, &self.app_id) {
            (Some(user), _) => write!(f, "{user} (oid {})", self.object_id),
            (None, Some(app)) => write!(f, "app {app} (oid {})", self.object_id),
            (None, None) => write!(f, "oid {}", self.object_id),
        }
    }
}

#[derive(serde::Deserialize)]
struct Claims {
    oid: Option<String>,
    upn: Option<String>,
    preferred_username: Option<String>,
    unique_name: Option<String>,
    appid: Option<String>,
    azp: Option<String>,
}

/// A claim fit for a one-line label: trimmed, printable, at most 256 bytes.
fn label(value: Option<String>) -> Option<String> {
    let v = value?;
    let v = v.trim();
    (!v.is_empty() && v.len() <= 256 && !v.chars().any(char::is_control)).then(|| v.to_owned())
}

impl EntraPrincipal {
    /// The principal named by a JWT access token's payload.
    pub fn from_access_token(token: &str) -> Result<EntraPrincipal, String> {
        let mut parts = token.trim().split('.');
        let (Some(_header), Some(payload), Some(_signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("the access token is not a JWT (three dot-separated parts)".into());
        };
        let json = base64::engine::general_purpose::GeneralPurpose::new(
            &base64::alphabet::URL_SAFE,
            base64::engine::GeneralPurposeConfig::new()
                .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
        )
        .decode(payload)
        .map_err(|_| "the access token's payload is not base64url".to_owned())?;
        let claims: Claims = serde_json::from_slice(&json)
            .map_err(|e| format!("the access token's payload is not JSON claims: {e}"))?;
        let object_id = label(claims.oid).ok_or("the access token has no oid claim")?;
        Ok(EntraPrincipal {
            object_id,
            user: label(claims.upn)
                .or_else(|| label(claims.preferred_username))
                .or_else(|| label(claims.unique_name)),
            app_id: label(claims.appid).or_else(|| label(claims.azp)),
        })
    }
}

/// Who `credential` is: asks it for a token for `scope` (any resource the
/// identity may ask for; the principal is the same) and reads the claims.
pub async fn principal(
    credential: &dyn TokenCredential,
    scope: &str,
) -> Result<EntraPrincipal, String> {
    let token = credential
        .get_token(&[scope], None)
        .await
        .map_err(|e| format!("cannot get an access token for {scope}: {e}"))?;
    EntraPrincipal::from_access_token(token.token.secret())
}

/// A JWT shaped like Entra ID's with these claims and a signature that is
/// not one: what tests use where no real token can be obtained.
#[cfg(test)]
pub(crate) fn fake_token(claims: serde_json::Value) -> String {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    format!(
        "{}.{}.{}",
        b64.encode(br#"{"typ":"JWT","alg":"RS256"}"#),
        b64.encode(claims.to_string()),
        b64.encode(b"not-a-signature")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_users_token_names_the_user_and_object_id() {
        let t = fake_token(serde_json::json!({
            "oid": "11111111-2222-3333-4444-555555555555",
            "upn": "alice@contoso.com",
            "appid": "04b07795-8ddb-461a-bbee-02f9e1bf7b46",
        }));
        let p = EntraPrincipal::from_access_token(&t).unwrap();
        assert_eq!(
            p.to_string(),
            "alice@contoso.com (oid 11111111-2222-3333-4444-555555555555)"
        );
        // v2 tokens and guests carry the sign-in name elsewhere.
        let t =
            fake_token(serde_json::json!({"oid": "o", "preferred_username": "bob@fabrikam.com"}));
        assert_eq!(
            EntraPrincipal::from_access_token(&t)
                .unwrap()
                .user
                .as_deref(),
            Some("bob@fabrikam.com")
        );
    }

    #[test]
    fn a_managed_identitys_token_names_its_application() {
        let t = fake_token(serde_json::json!({"oid": "o-1", "appid": "client-9", "upn": " "}));
        assert_eq!(
            EntraPrincipal::from_access_token(&t).unwrap().to_string(),
            "app client-9 (oid o-1)"
        );
        let t = fake_token(serde_json::json!({"oid": "o-2", "azp": "client-8"}));
        assert_eq!(
            EntraPrincipal::from_access_token(&t).unwrap().to_string(),
            "app client-8 (oid o-2)"
        );
    }

    #[test]
    fn tokens_without_an_object_id_or_not_jwts_are_refused() {
        let no_oid = fake_token(serde_json::json!({"upn": "alice@contoso.com"}));
        assert!(
            EntraPrincipal::from_access_token(&no_oid)
                .unwrap_err()
                .contains("oid")
        );
        assert!(EntraPrincipal::from_access_token("opaque-token").is_err());
        assert!(EntraPrincipal::from_access_token("a.!!!.c").is_err());
        let control = fake_token(serde_json::json!({"oid": "o\nforged"}));
        assert!(EntraPrincipal::from_access_token(&control).is_err());
    }

    fn env(set: &'static [&'static str]) -> impl Fn(&str) -> bool {
        move |name| set.contains(&name)
    }

    #[test]
    fn workload_identity_wins_when_the_pod_has_a_token_file() {
        assert_eq!(
            EntraIdentity::choose(
                Some("cid"),
                env(&["AZURE_FEDERATED_TOKEN_FILE", "IDENTITY_ENDPOINT"])
            ),
            EntraIdentity::Workload {
                client_id: Some("cid".into())
            }
        );
        assert_eq!(
            EntraIdentity::choose(None, env(&["AZURE_FEDERATED_TOKEN_FILE"])),
            EntraIdentity::Workload { client_id: None }
        );
    }

    #[test]
    fn client_id_means_user_assigned_managed_identity() {
        assert_eq!(
            EntraIdentity::choose(Some(" cid "), env(&["IDENTITY_ENDPOINT"])),
            EntraIdentity::UserAssigned {
                client_id: "cid".into()
            }
        );
    }

    #[test]
    fn managed_identity_endpoints_mean_system_assigned_else_developer_tools() {
        assert_eq!(
            EntraIdentity::choose(None, env(&["IDENTITY_ENDPOINT"])),
            EntraIdentity::SystemAssigned
        );
        assert_eq!(
            EntraIdentity::choose(Some(""), env(&["MSI_ENDPOINT"])),
            EntraIdentity::SystemAssigned
        );
        assert_eq!(
            EntraIdentity::choose(None, env(&[])),
            EntraIdentity::DeveloperTools
        );
    }

    #[test]
    fn the_standard_azure_client_id_is_honoured_after_rtpds_own() {
        let env = |name: &str| (name == "AZURE_CLIENT_ID").then(|| "from-env".to_owned());
        assert_eq!(client_id(Some("own"), env).as_deref(), Some("own"));
        assert_eq!(client_id(None, env).as_deref(), Some("from-env"));
        assert_eq!(client_id(Some(" "), env).as_deref(), Some("from-env"));
        assert_eq!(client_id(None, |_| None), None);
    }
}
