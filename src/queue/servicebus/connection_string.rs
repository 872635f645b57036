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
    /// The namespace's host name alone (AMQP Open hostname, TLS server name).
    pub hostname: String,
    pub emulator: bool,
    pub entity_path: Option<String>,
    pub credential: Credential,
}

/// How the connection reaches the namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transport {
    /// AMQP on 5671 (TLS from the first byte).
    #[default]
    Amqp,
    /// AMQP over WebSockets on 443 (`/$servicebus/websocket`), for networks
    /// that only let HTTPS out.
    WebSockets,
}

/// Where to open the socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Target {
    pub host: String,
    pub port: u16,
    pub tls: bool,
    pub transport: Transport,
}

impl Target {
    /// `amqps://host:port`, or the WebSocket URL.
    pub fn url(&self) -> String {
        match (self.transport, self.tls) {
            (Transport::Amqp, true) => format!("amqps://{}:{}", self.host, self.port),
            (Transport::Amqp, false) => format!("amqp://{}:{}", self.host, self.port),
            (Transport::WebSockets, true) => {
                format!("wss://{}:{}/$servicebus/websocket", self.host, self.port)
            }
            (Transport::WebSockets, false) => {
                format!("ws://{}:{}/$servicebus/websocket", self.host, self.port)
            }
        }
    }
}

impl Endpoint {
    /// Token audience for an entity.
    pub fn audience(&self, entity: &str) -> String {
        format!("sb://{}/{}", self.host, entity)
    }

    /// Where to connect: the namespace on 5671 (443 for WebSockets), the
    /// emulator's own port in plain AMQP, or a custom endpoint address (a
    /// proxy or gateway; the namespace stays the audience and Open hostname).
    pub fn target(&self, transport: Transport, custom: Option<&CustomEndpoint>) -> Target {
        let default_port = match transport {
            Transport::Amqp => 5671,
            Transport::WebSockets => 443,
        };
        if let Some(c) = custom {
            return Target {
                host: c.host.clone(),
                port: c.port.unwrap_or(default_port),
                tls: true,
                transport,
            };
        }
        if self.emulator {
            let port = self
                .host
                .rsplit_once(':')
                .and_then(|(_, p)| p.parse().ok())
                .unwrap_or(5672);
            return Target {
                host: self.hostname.clone(),
                port,
                tls: false,
                transport,
            };
        }
        Target {
            host: self.hostname.clone(),
            port: default_port,
            tls: true,
            transport,
        }
    }
}

/// A custom endpoint address: `sb://host[:port]`, `amqps://host[:port]` or `host[:port]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomEndpoint {
    pub host: String,
    pub port: Option<u16>,
}

impl CustomEndpoint {
    pub fn parse(s: &str) -> Result<Self, ParseError> {
        let s = s.trim();
        let with_scheme = if s.contains("://") {
            s.to_string()
        } else {
            format!("sb://{s}")
        };
        let url = url::Url::parse(&with_scheme)
            .map_err(|e| ParseError(format!("not an address: {e}")))?;
        let host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| ParseError("has no host".into()))?;
        Ok(CustomEndpoint {
            host: host.trim_matches(['[', ']']).to_string(),
            port: url.port(),
        })
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
    let host = if emulator {
        // As the official SDKs do for Microsoft's emulator: plain AMQP, port kept.
        format!("{hostname}:{}", port.unwrap_or(5672))
    } else {
        // A port in a namespace's Endpoint is ignored, as the SDKs do; a custom
        // endpoint address says where else to connect.
        hostname.clone()
    };
    Ok(Endpoint {
        host,
        hostname,
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
        hostname: host.clone(),
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
        assert_eq!(
            e.target(Transport::Amqp, None).url(),
            "amqps://ns.servicebus.windows.net:5671"
        );
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
        assert_eq!(
            e.target(Transport::Amqp, None).url(),
            "amqp://127.0.0.1:5673"
        );
        assert_eq!(e.host, "127.0.0.1:5673");
        let e = parse("Endpoint=sb://localhost;SharedAccessKeyName=a;SharedAccessKey=b;UseDevelopmentEmulator=true").unwrap();
        assert_eq!(
            e.target(Transport::Amqp, None).url(),
            "amqp://localhost:5672"
        );
    }

    #[test]
    fn signature_and_errors() {
        let e = parse("Endpoint=sb://ns.servicebus.windows.net/;SharedAccessSignature=SharedAccessSignature sr=x&sig=y&se=1&skn=k").unwrap();
        assert!(matches!(e.credential, Credential::Signature(_)));
        assert!(parse("SharedAccessKeyName=a;SharedAccessKey=b").is_err());
        assert!(parse("Endpoint=sb://ns.servicebus.windows.net/").is_err());
    }

    #[test]
    fn targets_per_transport_and_custom_endpoint() {
        let e = parse(
            "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=a;SharedAccessKey=b",
        )
        .unwrap();
        assert_eq!(
            e.target(Transport::Amqp, None).url(),
            "amqps://ns.servicebus.windows.net:5671"
        );
        assert_eq!(
            e.target(Transport::WebSockets, None).url(),
            "wss://ns.servicebus.windows.net:443/$servicebus/websocket"
        );
        let custom = CustomEndpoint::parse("sb://gateway.internal:8443").unwrap();
        let t = e.target(Transport::Amqp, Some(&custom));
        assert_eq!(
            (t.host.as_str(), t.port, t.tls),
            ("gateway.internal", 8443, true)
        );
        assert_eq!(e.audience("q"), "sb://ns.servicebus.windows.net/q");
        assert_eq!(CustomEndpoint::parse("localhost").unwrap().port, None);
        let emu = parse("Endpoint=sb://127.0.0.1:5673;SharedAccessKeyName=a;SharedAccessKey=b;UseDevelopmentEmulator=true").unwrap();
        assert_eq!(
            emu.target(Transport::Amqp, None).url(),
            "amqp://127.0.0.1:5673"
        );
    }

    #[test]
    fn namespace_form() {
        let e = from_namespace("myns", None).unwrap();
        assert_eq!(e.host, "myns.servicebus.windows.net");
        let e = from_namespace("sb://myns.servicebus.windows.net/", Some("id".into())).unwrap();
        assert_eq!(
            e.target(Transport::Amqp, None).url(),
            "amqps://myns.servicebus.windows.net:5671"
        );
        assert!(matches!(
            e.credential,
            Credential::Entra { client_id: Some(_) }
        ));
    }
}
