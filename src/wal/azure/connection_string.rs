//! What a storage connection string says: the blob endpoint and how to
//! authorize against it (an account key, or a SAS token used as given).
//!
//! Accepted forms:
//! - `UseDevelopmentStorage=true` (Azurite's well-known account on 127.0.0.1:10000);
//! - `DefaultEndpointsProtocol=..;AccountName=..;AccountKey=..;[EndpointSuffix=..|BlobEndpoint=..]`;
//! - `BlobEndpoint=..;SharedAccessSignature=..` (AccountName optional).
//!
//! Errors name the offending field, never its value: the string holds a secret.

use base64::{Engine as _, engine::general_purpose::STANDARD};
use secrecy::{SecretBox, SecretString};
use url::Url;

/// Azurite's documented development account.
pub(crate) const DEV_ACCOUNT: &str = "devstoreaccount1";
/// Azurite's documented development key (public, not a secret).
pub(crate) const DEV_ACCOUNT_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
const DEV_BLOB_ENDPOINT: &str = "http://127.0.0.1:10000/devstoreaccount1";

pub(crate) struct ConnectionString {
    /// The blob service endpoint, without a trailing slash.
    pub blob_endpoint: Url,
    pub auth: ConnectionAuth,
}

pub(crate) enum ConnectionAuth {
    /// Shared key: requests are authorized with account SAS tokens derived from it.
    AccountKey {
        account: String,
        key: SecretBox<Vec<u8>>,
    },
    /// A SAS token (query string without the leading `?`), used exactly as given.
    Sas(SecretString),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("storage connection string: {0}")]
pub(crate) struct ConnectionStringError(String);

fn err(msg: impl Into<String>) -> ConnectionStringError {
    ConnectionStringError(msg.into())
}

pub(crate) fn parse(s: &str) -> Result<ConnectionString, ConnectionStringError> {
    let mut fields: Vec<(&str, &str)> = Vec::new();
    for part in s.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        // Split at the first '=' only: keys and SAS tokens contain '='.
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| err("every field must look like Name=value"))?;
        let k = k.trim();
        if fields.iter().any(|(seen, _)| seen.eq_ignore_ascii_case(k)) {
            return Err(err(format!("{k} is given twice")));
        }
        fields.push((k, v.trim()));
    }
    let get = |name: &str| {
        fields
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
            .filter(|v| !v.is_empty())
    };
    const KNOWN: [&str; 10] = [
        "UseDevelopmentStorage",
        "DefaultEndpointsProtocol",
        "AccountName",
        "AccountKey",
        "BlobEndpoint",
        "EndpointSuffix",
        "SharedAccessSignature",
        // The portal's strings name the other services too; they do not concern the WAL.
        "QueueEndpoint",
        "TableEndpoint",
        "FileEndpoint",
    ];
    if let Some((k, _)) = fields
        .iter()
        .find(|(k, _)| !KNOWN.iter().any(|n| n.eq_ignore_ascii_case(k)))
    {
        return Err(err(format!("unknown field {k}")));
    }

    if let Some(v) = get("UseDevelopmentStorage") {
        if !v.eq_ignore_ascii_case("true") {
            return Err(err("UseDevelopmentStorage must be true when present"));
        }
        if fields.len() > 1 {
            return Err(err(
                "UseDevelopmentStorage=true cannot be combined with other fields",
            ));
        }
        return Ok(ConnectionString {
            blob_endpoint: Url::parse(DEV_BLOB_ENDPOINT).map_err(|e| err(e.to_string()))?,
            auth: ConnectionAuth::AccountKey {
                account: DEV_ACCOUNT.to_owned(),
                key: decode_key(DEV_ACCOUNT_KEY)?,
            },
        });
    }

    let account = get("AccountName");
    let blob_endpoint = match get("BlobEndpoint") {
        Some(e) => {
            let url = Url::parse(e).map_err(|_| err("BlobEndpoint is not a URL"))?;
            if !matches!(url.scheme(), "http" | "https") || url.cannot_be_a_base() {
                return Err(err("BlobEndpoint must be an http(s) URL"));
            }
            if url.query().is_some() {
                return Err(err(
                    "BlobEndpoint must not carry a query; put the SAS in SharedAccessSignature",
                ));
            }
            url
        }
        None => {
            let account = account.ok_or_else(|| err("needs AccountName or BlobEndpoint"))?;
            let protocol = get("DefaultEndpointsProtocol").unwrap_or("https");
            if !matches!(protocol, "http" | "https") {
                return Err(err("DefaultEndpointsProtocol must be http or https"));
            }
            let suffix = get("EndpointSuffix").unwrap_or("core.windows.net");
            Url::parse(&format!("{protocol}://{account}.blob.{suffix}"))
                .map_err(|_| err("AccountName/EndpointSuffix do not form a valid endpoint URL"))?
        }
    };
    let blob_endpoint = trim_trailing_slash(blob_endpoint);

    let auth = match (get("AccountKey"), get("SharedAccessSignature")) {
        (Some(_), Some(_)) => {
            return Err(err(
                "has both AccountKey and SharedAccessSignature; keep one",
            ));
        }
        (Some(key), None) => ConnectionAuth::AccountKey {
            account: account
                .ok_or_else(|| err("AccountKey needs AccountName"))?
                .to_owned(),
            key: decode_key(key)?,
        },
        (None, Some(sas)) => {
            let sas = sas.trim_start_matches('?');
            if !sas.split('&').any(|p| p.starts_with("sig=")) {
                return Err(err("SharedAccessSignature has no sig= parameter"));
            }
            ConnectionAuth::Sas(SecretString::from(sas.to_owned()))
        }
        (None, None) => return Err(err("needs AccountKey or SharedAccessSignature")),
    };
    Ok(ConnectionString {
        blob_endpoint,
        auth,
    })
}

fn decode_key(key: &str) -> Result<SecretBox<Vec<u8>>, ConnectionStringError> {
    let bytes = STANDARD
        .decode(key)
        .map_err(|_| err("AccountKey is not valid base64"))?;
    if bytes.is_empty() {
        return Err(err("AccountKey is empty"));
    }
    Ok(SecretBox::new(Box::new(bytes)))
}

fn trim_trailing_slash(mut url: Url) -> Url {
    let path = url.path().trim_end_matches('/').to_owned();
    url.set_path(&path);
    url
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    fn key_of(c: &ConnectionString) -> (&str, &[u8]) {
        match &c.auth {
            ConnectionAuth::AccountKey { account, key } => (account, key.expose_secret()),
            ConnectionAuth::Sas(_) => panic!("expected an account key"),
        }
    }

    #[test]
    fn development_storage_is_azurite_well_known_account() {
        let c = parse("UseDevelopmentStorage=true").unwrap();
        assert_eq!(
            c.blob_endpoint.as_str(),
            "http://127.0.0.1:10000/devstoreaccount1"
        );
        let (account, key) = key_of(&c);
        assert_eq!(account, "devstoreaccount1");
        assert_eq!(key.len(), 64);
    }

    #[test]
    fn explicit_form_builds_endpoint_from_suffix() {
        let c = parse(
            "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=a2V5;EndpointSuffix=core.chinacloudapi.cn",
        )
        .unwrap();
        assert_eq!(
            c.blob_endpoint.as_str(),
            "https://acct.blob.core.chinacloudapi.cn/"
        );
        assert_eq!(key_of(&c), ("acct", b"key".as_slice()));
    }

    #[test]
    fn blob_endpoint_wins_and_loses_its_trailing_slash() {
        let c = parse(&format!(
            "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={DEV_ACCOUNT_KEY};BlobEndpoint=http://127.0.0.1:41234/devstoreaccount1/;"
        ))
        .unwrap();
        assert_eq!(
            c.blob_endpoint.as_str(),
            "http://127.0.0.1:41234/devstoreaccount1"
        );
    }

    #[test]
    fn sas_is_kept_verbatim_without_leading_question_mark() {
        let c = parse("BlobEndpoint=https://a.blob.core.windows.net;SharedAccessSignature=?sv=2022-11-02&sig=ab%2Bc%3D")
            .unwrap();
        match c.auth {
            ConnectionAuth::Sas(s) => assert_eq!(s.expose_secret(), "sv=2022-11-02&sig=ab%2Bc%3D"),
            ConnectionAuth::AccountKey { .. } => panic!("expected SAS"),
        }
    }

    #[test]
    fn errors_name_the_field_not_the_secret() {
        let e = parse("AccountName=a;AccountKey=not*base64").err().unwrap();
        assert!(e.to_string().contains("AccountKey"));
        assert!(!e.to_string().contains("not*base64"));
        assert!(parse("AccountName=a").is_err());
        assert!(parse("AccountKey=a2V5").is_err());
        assert!(parse("AccountName=a;AccountKey=a2V5;SharedAccessSignature=sig=x").is_err());
        assert!(parse("UseDevelopmentStorage=false").is_err());
        assert!(parse("AccountName=a;Bogus=1;AccountKey=a2V5").is_err());
        assert!(
            parse("BlobEndpoint=https://a.blob.core.windows.net;SharedAccessSignature=sv=1")
                .is_err()
        );
    }
}
