//! Who the WAL talks to Blob Storage as: the endpoint and the identity, chosen
//! once from the settings (and, for Entra ID, from the environment the
//! process runs in).
//!
//! Entra ID (`RTPD_STORAGE_ACCOUNT_URL`) uses the process identity of
//! [`crate::azure::identity`].

use super::{
    AzureBlobSettings,
    connection_string::{self, ConnectionAuth},
    sas::{AccountSasSigner, SAS_VERSION, SasPolicy},
};
use crate::wal::store::StoreError;
use azure_core::credentials::TokenCredential;
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
            let (credential, identity) =
                crate::azure::identity::credential(settings.client_id.as_deref())
                    .map_err(StoreError::Fatal)?;
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
