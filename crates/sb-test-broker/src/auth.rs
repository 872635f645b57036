//! Who may do what on a connection, as Service Bus decides it: a `$cbs`
//! put-token leaves a claim (audience, rights, expiry) on the connection; a
//! link needs a live claim whose audience covers its entity and whose rights
//! allow what it does; when the claim expires the link is detached with
//! `amqp:unauthorized-access` unless a fresh token replaced it.

use crate::{BrokerConfig, ROOT_KEY_NAME, Rights, sas, store::now_ms};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// Entity path the claim covers (`""` for the whole namespace), lowercase.
    pub path: String,
    pub rights: Rights,
    pub expires_ms: i64,
}

/// What a link does on its entity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    Send,
    Listen,
    /// `$management`: either right opens the node.
    SendOrListen,
}

impl Need {
    pub fn claim_name(self) -> &'static str {
        match self {
            Need::Send => "Send",
            Need::Listen | Need::SendOrListen => "Listen",
        }
    }

    fn allowed(self, r: Rights) -> bool {
        match self {
            Need::Send => r.send || r.manage,
            Need::Listen => r.listen || r.manage,
            Need::SendOrListen => r.send || r.listen || r.manage,
        }
    }
}

pub fn enabled(config: &BrokerConfig) -> bool {
    config.sas_key.is_some() || !config.sas_rules.is_empty()
}

/// `sb://host/a/b/` → (`host`, `a/b`), lowercase.
fn split_audience(audience: &str) -> (String, String) {
    let decoded = percent_encoding::percent_decode_str(audience)
        .decode_utf8_lossy()
        .to_ascii_lowercase();
    let rest = decoded
        .split_once("://")
        .map_or(decoded.as_str(), |(_, r)| r);
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    (host.to_string(), path.trim_matches('/').to_string())
}

pub fn covers(claim: &str, entity: &str) -> bool {
    claim.is_empty()
        || entity == claim
        || entity
            .strip_prefix(claim)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// A refused put-token: status, condition, description.
pub type Refusal = (i32, &'static str, String);

fn unauthorized(description: String) -> Refusal {
    (401, "amqp:unauthorized-access", description)
}

/// Checks a put-token and returns the claim it grants.
pub fn claim_for(
    config: &BrokerConfig,
    kind: &str,
    audience: &str,
    token: &str,
    expiration_ms: Option<i64>,
) -> Result<Claim, Refusal> {
    let (host, path) = split_audience(audience);
    if let Some(ns) = &config.namespace
        && !host.eq_ignore_ascii_case(ns)
    {
        return Err(unauthorized(format!(
            "InvalidAudience: the token audience '{audience}' does not name this namespace '{ns}'."
        )));
    }
    let far = now_ms() + 24 * 3600 * 1000;
    // Microsoft's Python SDK sends shared access signatures with type `jwt`;
    // the service goes by the token itself.
    let fields = sas::parse(token);
    if fields.is_none() && kind == "jwt" {
        // The broker cannot check an Entra ID token; it trusts it until its stated expiry.
        return Ok(Claim {
            path,
            rights: Rights::ALL,
            expires_ms: expiration_ms.unwrap_or(far),
        });
    }
    if !enabled(config) {
        return Ok(Claim {
            path,
            rights: Rights::ALL,
            expires_ms: fields.as_ref().map_or(far, |f| f.expiry * 1000),
        });
    }
    let Some(fields) = fields else {
        return Err(unauthorized(
            "InvalidSignature: the token is not a shared access signature.".into(),
        ));
    };
    let (key, rights) = if fields.key_name == ROOT_KEY_NAME {
        match &config.sas_key {
            Some(k) => (k.clone(), Rights::ALL),
            None => {
                return Err(unauthorized(format!(
                    "InvalidSignature: unknown key name '{}'.",
                    fields.key_name
                )));
            }
        }
    } else {
        match config.sas_rules.iter().find(|r| r.name == fields.key_name) {
            Some(r) => (r.key.clone(), r.rights),
            None => {
                return Err(unauthorized(format!(
                    "InvalidSignature: unknown key name '{}'.",
                    fields.key_name
                )));
            }
        }
    };
    if !sas::signature_valid(&fields, &key) {
        return Err(unauthorized(
            "InvalidSignature: the token has an invalid signature.".into(),
        ));
    }
    if fields.expiry * 1000 <= now_ms() {
        return Err(unauthorized(format!(
            "ExpiredToken: the token expired at {} (unix seconds).",
            fields.expiry
        )));
    }
    let (sr_host, sr_path) = split_audience(&fields.resource);
    if !sr_host.eq_ignore_ascii_case(&host) || !covers(&sr_path, &path) {
        return Err(unauthorized(format!(
            "InvalidAudience: the token is for '{}', not '{audience}'.",
            fields.resource
        )));
    }
    Ok(Claim {
        path,
        rights,
        expires_ms: fields.expiry * 1000,
    })
}

/// The latest expiry among claims that let a link do `need` on `entity`.
pub fn authorized_until(claims: &[Claim], entity: &str, need: Need) -> Option<i64> {
    let entity = entity.to_ascii_lowercase();
    claims
        .iter()
        .filter(|c| covers(&c.path, &entity) && need.allowed(c.rights))
        .map(|c| c.expires_ms)
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audiences_cover_sub_entities_only() {
        assert!(covers("", "q"));
        assert!(covers("q", "q"));
        assert!(covers("q", "q/$management"));
        assert!(!covers("q", "q2"));
        assert_eq!(
            split_audience("sb://NS.servicebus.windows.net/Q/$management"),
            (
                "ns.servicebus.windows.net".to_string(),
                "q/$management".to_string()
            )
        );
        assert_eq!(
            split_audience("sb%3a%2f%2fns%2fq"),
            ("ns".into(), "q".into())
        );
    }
}
