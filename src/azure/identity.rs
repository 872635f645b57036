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

use azure_core::credentials::TokenCredential;
use azure_identity::{
    DeveloperToolsCredential, ManagedIdentityCredential, ManagedIdentityCredentialOptions,
    UserAssignedId, WorkloadIdentityCredential, WorkloadIdentityCredentialOptions,
};
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
    let credential = chosen
        .credential()
        .map_err(|e| format!("cannot set up {identity}: {e}"))?;
    Ok((credential, identity))
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
    fn the_standard_azure_client_id_is_honoured_after_rtpds_own() {
        let env = |name: &str| (name == "AZURE_CLIENT_ID").then(|| "from-env".to_owned());
        assert_eq!(client_id(Some("own"), env).as_deref(), Some("own"));
        assert_eq!(client_id(None, env).as_deref(), Some("from-env"));
        assert_eq!(client_id(Some(" "), env).as_deref(), Some("from-env"));
        assert_eq!(client_id(None, |_| None), None);
    }
}
