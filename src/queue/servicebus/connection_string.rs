//! Where the namespace is and how to authenticate, from a Service Bus
//! connection string or a namespace name.

use secrecy::SecretString;

/// How the connection authenticates on `$cbs`.
#[derive(Clone)]
pub(super) enum Credential {
    /// `SharedAccessKeyName` + `SharedAccessKey`: we sign SAS tokens ourselves.
    SharedKey { name: String, key: SecretString },
    /// `SharedAccessSignature`: a ready token, used as is until it expires.
    Signature(SecretString),
    /// Entra ID (namespace form).
    Entra { client_id: Option<String> },
}

#[derive(Clone)]
pub(super) struct Endpoint {
    /// Host as the audience names it: `ns.servicebus.windows.net`, or
    /// `host:port` for the emulator (the official SDKs keep the port there).
    pub host: String,
    /// `amqps://host:5671` or, for the emulator, `amqp://host:port`.
    pub url: String,
    pub emulator: bool,
    pub entity_path: Option<String>,
    pub credential: Credential,
}

impl Endpoint {
    /// Token audience for an entity.
    pub fn audience(&self, entity: &str) -> String {
        format!("sb://{}/{}", self.host, entity)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub(super) struct ParseError(String);

/// `Endpoint=sb://host[:port]/;SharedAccessKeyName=..;SharedAccessKey=..;EntityPath=..;UseDevelopmentEmulator=true`.
pub(super) fn parse(connection_string: &str) -> Result<Endpoint, ParseError> {
    let mut endpoint = None;
    let (mut key_name, mut key, mut signature, mut entity, mut emulator) =
        (None, None, None, None, false);
    for part in connection_string
        .split(';')
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        let Some((k, v)) = part.split_once('=') else {
            return Err(ParseError(format!("malformed segment {:?}", k_only(part))));
        };
        match k.trim().to_ascii_lowercase().as_str() {
            "endpoint" => endpoint = Some(v.trim().to_string()),
            "sharedaccesskeyname" => key_name = Some(v.to_string()),
            "sharedaccesskey" => key = Some(v.to_string()),
            "sharedaccesssignature" => signature = Some(v.to_string()),
            "entitypath" => entity = Some(v.trim().to_string()).filter(|e| !e.is_empty()),
            "usedevelopmentemulator" => emulator = v.trim().eq_ignore_ascii_case("true"),
            _ => {}
        }
    }
    let endpoint = endpoint.ok_or_else(|| ParseError("Endpoint is missing".into()))?;
    let without_scheme = endpoint
        .split_once("://")
        .map_or(endpoint.as_str(), |(_, rest)| rest);
    let authority = without_scheme.split('/').next().unwrap_or_default();
    if authority.is_empty() {
        return Err(ParseError("Endpoint has no host".into()));
    }
    let (hostname, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => match p.parse::<u16>() {
            Ok(p) => (h.to_string(), Some(p)),
            Err(_) => return Err(ParseError(format!("bad port in Endpoint: {p:?}"))),
        },
        _ => (authority.to_string(), None),
    };
    let credential = match (key_name, key, signature) {
        (_, _, Some(sig)) => Credential::Signature(SecretString::from(sig)),
        (Some(name), Some(key), None) => Credential::SharedKey {
            name,
            key: SecretString::from(key),
        },
        _ => {
            return Err(ParseError(
                "needs SharedAccessKeyName and SharedAccessKey, or SharedAccessSignature".into(),
            ));
        }
    };
    let (host, url) = if emulator {
        // As the official SDKs do for Microsoft's emulator: plain AMQP, port kept.
        let port = port.unwrap_or(5672);
        (
            format!("{hostname}:{port}"),
            format!("amqp://{hostname}:{port}"),
        )
    } else {
        (hostname.clone(), format!("amqps://{hostname}:5671"))
    };
    Ok(Endpoint {
        host,
        url,
        emulator,
        entity_path: entity,
        credential,
    })
}

fn k_only(part: &str) -> &str {
    part.split('=').next().unwrap_or(part)
}

/// Namespace form, authenticated with Entra ID: `ns.servicebus.windows.net`
/// (a scheme or trailing slash is tolerated).
pub(super) fn from_namespace(
    namespace: &str,
    client_id: Option<String>,
) -> Result<Endpoint, ParseError> {
    let host = namespace.trim();
    let host = host.split_once("://").map_or(host, |(_, rest)| rest);
    let host = host.trim_end_matches('/').to_string();
    if host.is_empty() || host.contains('/') {
        return Err(ParseError(format!(
            "not a namespace host name: {namespace:?}"
        )));
    }
    let host = if host.contains('.') {
        host
    } else {
        format!("{host}.servicebus.windows.net")
    };
    Ok(Endpoint {
        url: format!("amqps://{host}:5671"),
        host,
        emulator: false,
        entity_path: None,
        credential: Credential::Entra { client_id },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    #[test]
    fn azure_shared_key() {
        let e = parse("Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=send;SharedAccessKey=abc=;EntityPath=q1")
            .unwrap();
        assert_eq!(e.host, "ns.servicebus.windows.net");
        assert_eq!(e.url, "amqps://ns.servicebus.windows.net:5671");
        assert_eq!(e.entity_path.as_deref(), Some("q1"));
        assert_eq!(e.audience("q1"), "sb://ns.servicebus.windows.net/q1");
        match e.credential {
            Credential::SharedKey { name, key } => {
                assert_eq!(name, "send");
                assert_eq!(key.expose_secret(), "abc=");
            }
            _ => panic!("expected shared key"),
        }
    }

    #[test]
    fn emulator_keeps_port_and_uses_plain_amqp() {
        let e = parse("Endpoint=sb://127.0.0.1:5673;SharedAccessKeyName=RootManageSharedAccessKey;SharedAccessKey=SAS_KEY_VALUE;UseDevelopmentEmulator=true;").unwrap();
        assert!(e.emulator);
        assert_eq!(e.url, "amqp://127.0.0.1:5673");
        assert_eq!(e.host, "127.0.0.1:5673");
        let e = parse("Endpoint=sb://localhost;SharedAccessKeyName=a;SharedAccessKey=b;UseDevelopmentEmulator=true").unwrap();
        assert_eq!(e.url, "amqp://localhost:5672");
    }

    #[test]
    fn signature_and_errors() {
        let e = parse("Endpoint=sb://ns.servicebus.windows.net/;SharedAccessSignature=SharedAccessSignature sr=x&sig=y&se=1&skn=k").unwrap();
        assert!(matches!(e.credential, Credential::Signature(_)));
        assert!(parse("SharedAccessKeyName=a;SharedAccessKey=b").is_err());
        assert!(parse("Endpoint=sb://ns.servicebus.windows.net/").is_err());
    }

    #[test]
    fn namespace_form() {
        let e = from_namespace("myns", None).unwrap();
        assert_eq!(e.host, "myns.servicebus.windows.net");
        let e = from_namespace("sb://myns.servicebus.windows.net/", Some("id".into())).unwrap();
        assert_eq!(e.url, "amqps://myns.servicebus.windows.net:5671");
        assert!(matches!(
            e.credential,
            Credential::Entra { client_id: Some(_) }
        ));
    }
}
