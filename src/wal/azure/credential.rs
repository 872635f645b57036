//! Who the WAL talks to Blob Storage as: the endpoint and the identity, chosen
//! once from the settings (and, for Entra ID, from the environment the
//! process runs in).
//!
//! Entra ID (`RTPD_STORAGE_ACCOUNT_URL`), first match wins:
//! 1. `AZURE_FEDERATED_TOKEN_FILE` set → workload identity (AKS). Its client id is
//!    `RTPD_AZURE_CLIENT_ID` if set, else `AZURE_CLIENT_ID` from the pod.
//! 2. `RTPD_AZURE_CLIENT_ID` set → user-assigned managed identity with that client id.
//! 3. `IDENTITY_ENDPOINT` or `MSI_ENDPOINT` set → system-assigned managed identity
//!    (App Service, Container Apps, Functions).
//! 4. Otherwise → developer tools (Azure CLI, then Azure Developer CLI).
//!
//! azure_identity 1.x has no `DefaultAzureCredential`, and its managed identity
//! credential cannot tell whether IMDS exists without calling it, so a VM using
//! its *system-assigned* identity (no environment variable) lands on step 4;
//! give such hosts a user-assigned identity and `RTPD_AZURE_CLIENT_ID`.

use super::{
    AzureBlobSettings,
    connection_string::{self, ConnectionAuth},
    sas::{AccountSasSigner, SAS_VERSION, SasPolicy},
};
use crate::wal::store::StoreError;
use azure_core::credentials::TokenCredential;
use azure_identity::{
    DeveloperToolsCredential, ManagedIdentityCredential, ManagedIdentityCredentialOptions,
    UserAssignedId, WorkloadIdentityCredential, WorkloadIdentityCredentialOptions,
};
use secrecy::ExposeSecret;
use std::sync::Arc;
use url::Url;

pub(crate) enum Authorization {
    /// Bearer tokens from Entra ID.
    Token(Arc<dyn TokenCredential>),
    /// A SAS on every request URL.
    Sas(Arc<SasPolicy>),
}

pub(crate) struct Access {
    /// Blob service endpoint, e.g. `https://acct.blob.core.windows.net` (no trailing slash).
    pub endpoint: Url,
    pub authorization: Authorization,
    /// Which identity, for logs and errors; never a secret.
    pub identity: String,
}

/// Shared with the Redis ledger, which authenticates as the same identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum EntraIdentity {
    Workload { client_id: Option<String> },
    UserAssigned { client_id: String },
    SystemAssigned,
    DeveloperTools,
}

impl EntraIdentity {
    pub(crate) fn choose(client_id: Option<&str>, env_set: impl Fn(&str) -> bool) -> Self {
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

    pub(crate) fn describe(&self) -> String {
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

    pub(crate) fn credential(&self) -> azure_core::Result<Arc<dyn TokenCredential>> {
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

pub(crate) fn env_set(name: &str) -> bool {
    std::env::var_os(name).is_some_and(|v| !v.is_empty())
}

pub(crate) fn resolve(settings: &AzureBlobSettings) -> Result<Access, StoreError> {
    match (&settings.connection_string, &settings.account_url) {
        (Some(_), Some(_)) => Err(StoreError::Fatal(
            "set either RTPD_STORAGE_CONNECTION_STRING or RTPD_STORAGE_ACCOUNT_URL, not both"
                .into(),
        )),
        (None, None) => Err(StoreError::Fatal(
            "the azure WAL needs RTPD_STORAGE_CONNECTION_STRING or RTPD_STORAGE_ACCOUNT_URL".into(),
        )),
        (Some(cs), None) => {
            let parsed = connection_string::parse(cs.expose_secret())
                .map_err(|e| StoreError::Fatal(format!("RTPD_STORAGE_CONNECTION_STRING: {e}")))?;
            let (authorization, identity) = match parsed.auth {
                ConnectionAuth::AccountKey { account, key } => {
                    let identity =
                        format!("account key of {account}, signed as account SAS sv={SAS_VERSION}");
                    let allow_http = parsed.blob_endpoint.scheme() == "http";
                    let signer = AccountSasSigner::new(account, key, allow_http);
                    (Authorization::Sas(SasPolicy::signed(signer)), identity)
                }
                ConnectionAuth::Sas(token) => (
                    Authorization::Sas(SasPolicy::fixed(token)),
                    "shared access signature from the connection string".to_owned(),
                ),
            };
            Ok(Access {
                endpoint: parsed.blob_endpoint,
                authorization,
                identity,
            })
        }
        (None, Some(account_url)) => {
            let endpoint = Url::parse(account_url.trim()).map_err(|e| {
                StoreError::Fatal(format!("RTPD_STORAGE_ACCOUNT_URL is not a URL: {e}"))
            })?;
            // Bearer tokens must not travel in clear text; the SDK refuses too, less clearly.
            if endpoint.scheme() != "https" || endpoint.cannot_be_a_base() {
                return Err(StoreError::Fatal(format!(
                    "RTPD_STORAGE_ACCOUNT_URL must be an https URL like https://<account>.blob.core.windows.net, got {endpoint}"
                )));
            }
            if endpoint.query().is_some() {
                return Err(StoreError::Fatal(
                    "RTPD_STORAGE_ACCOUNT_URL must not carry a query (a SAS belongs in RTPD_STORAGE_CONNECTION_STRING)"
                        .into(),
                ));
            }
            let mut endpoint = endpoint;
            let path = endpoint.path().trim_end_matches('/').to_owned();
            endpoint.set_path(&path);
            let chosen = EntraIdentity::choose(settings.client_id.as_deref(), env_set);
            let identity = chosen.describe();
            let credential = chosen
                .credential()
                .map_err(|e| StoreError::Fatal(format!("cannot set up {identity}: {e}")))?;
            Ok(Access {
                endpoint,
                authorization: Authorization::Token(credential),
                identity,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn account_url_must_be_https_and_exactly_one_source_is_allowed() {
        let mut s = AzureBlobSettings {
            connection_string: None,
            account_url: Some("http://acct.blob.core.windows.net".into()),
            container: "rtp-wal".into(),
            create_container: false,
            client_id: Some("cid".into()),
        };
        assert!(matches!(resolve(&s), Err(StoreError::Fatal(m)) if m.contains("https")));
        s.connection_string = Some("UseDevelopmentStorage=true".into());
        assert!(matches!(resolve(&s), Err(StoreError::Fatal(m)) if m.contains("not both")));
        s.account_url = None;
        let access = resolve(&s).unwrap();
        assert_eq!(
            access.endpoint.as_str(),
            "http://127.0.0.1:10000/devstoreaccount1"
        );
        assert!(access.identity.contains("devstoreaccount1"));
    }
}
