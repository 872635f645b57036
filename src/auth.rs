//! Who may call what: vendors (ingest, their own transactions) and operators
//! with admin tokens (listing, replay, dead letters).
//!
//! Secrets are configured as sha256 hashes (`<name>:sha256:<hex>`, comma
//! separated, in `RTPD_VENDOR_KEYS` / `RTPD_ADMIN_TOKENS` or the files named by
//! `*_FILE`), so an environment dump does not leak a usable key. A presented
//! key is hashed and compared in constant time with every active hash; a name
//! may have several hashes, so keys rotate without downtime.

use crate::config::{AuthMode, ConfigError, Settings};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Header a vendor sends its API key in.
pub const API_KEY_HEADER: &str = "X-Api-Key";

#[derive(Debug, Clone)]
struct Credential {
    name: String,
    hash: [u8; 32],
}

#[derive(Debug, Clone, Default)]
pub struct Auth {
    enabled: bool,
    vendors: Vec<Credential>,
    admins: Vec<Credential>,
}

/// The caller, once authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    Vendor(String),
    Admin(String),
    /// Authentication is switched off (`RTPD_AUTH=none`).
    Anonymous,
}

impl Principal {
    pub fn vendor(&self) -> Option<&str> {
        match self {
            Principal::Vendor(v) => Some(v),
            _ => None,
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Principal::Vendor(v) | Principal::Admin(v) => v,
            Principal::Anonymous => "anonymous",
        }
    }
}

pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

fn parse_list(variable: &str, text: &str) -> Result<Vec<Credential>, ConfigError> {
    let mut out = Vec::new();
    for entry in text
        .split([',', '\n'])
        .map(str::trim)
        .filter(|e| !e.is_empty() && !e.starts_with('#'))
    {
        let mut parts = entry.splitn(3, ':');
        let (Some(name), Some(kind), Some(hexhash)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(ConfigError::new(
                variable,
                "entries must look like <name>:sha256:<64 hex chars>",
            ));
        };
        if name.is_empty() || kind != "sha256" {
            return Err(ConfigError::new(
                variable,
                "entries must look like <name>:sha256:<64 hex chars>",
            ));
        }
        let mut hash = [0u8; 32];
        hex::decode_to_slice(hexhash.trim(), &mut hash).map_err(|_| {
            ConfigError::new(
                variable,
                format!("entry for {name:?} is not 64 hex characters"),
            )
        })?;
        out.push(Credential {
            name: name.to_owned(),
            hash,
        });
    }
    Ok(out)
}

fn read_source(
    inline: Option<&crate::config::Secret>,
    file: Option<&std::path::Path>,
    inline_var: &str,
    file_var: &str,
) -> Result<Vec<Credential>, ConfigError> {
    let mut out = Vec::new();
    if let Some(s) = inline {
        out.extend(parse_list(inline_var, s.expose())?);
    }
    if let Some(path) = file {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new(file_var, format!("cannot read {}: {e}", path.display()))
        })?;
        out.extend(parse_list(file_var, &text)?);
    }
    Ok(out)
}

impl Auth {
    pub fn from_settings(s: &Settings) -> Result<Auth, ConfigError> {
        if s.auth == AuthMode::None {
            return Ok(Auth::default());
        }
        let vendors = read_source(
            s.vendor_keys.as_ref(),
            s.vendor_keys_file.as_deref(),
            "RTPD_VENDOR_KEYS",
            "RTPD_VENDOR_KEYS_FILE",
        )?;
        let admins = read_source(
            s.admin_tokens.as_ref(),
            s.admin_tokens_file.as_deref(),
            "RTPD_ADMIN_TOKENS",
            "RTPD_ADMIN_TOKENS_FILE",
        )?;
        if vendors.is_empty() {
            return Err(ConfigError::new(
                "RTPD_VENDOR_KEYS",
                "no vendor credentials configured; set RTPD_VENDOR_KEYS or RTPD_VENDOR_KEYS_FILE, \
                 or RTPD_AUTH=none to run unauthenticated",
            ));
        }
        Ok(Auth {
            enabled: true,
            vendors,
            admins,
        })
    }

    pub fn disabled() -> Auth {
        Auth::default()
    }

    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    fn find(list: &[Credential], presented: &str) -> Option<String> {
        let h: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        // Compare against every entry so timing does not reveal which matched.
        let mut found = None;
        for c in list {
            if bool::from(c.hash.ct_eq(&h)) && found.is_none() {
                found = Some(c.name.clone());
            }
        }
        found
    }

    pub fn vendor(&self, api_key: Option<&str>) -> Option<Principal> {
        if !self.enabled {
            return Some(Principal::Anonymous);
        }
        Self::find(&self.vendors, api_key?).map(Principal::Vendor)
    }

    pub fn admin(&self, bearer: Option<&str>) -> Option<Principal> {
        if !self.enabled {
            return Some(Principal::Anonymous);
        }
        Self::find(&self.admins, bearer?).map(Principal::Admin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(vendors: &str, admins: &str) -> Auth {
        Auth {
            enabled: true,
            vendors: parse_list("V", vendors).unwrap(),
            admins: parse_list("A", admins).unwrap(),
        }
    }

    #[test]
    fn keys_are_checked_by_hash_and_rotate() {
        let a = auth(
            &format!(
                "acme:sha256:{},acme:sha256:{}",
                hash_secret("old"),
                hash_secret("new")
            ),
            &format!("ops:sha256:{}", hash_secret("root")),
        );
        assert_eq!(
            a.vendor(Some("old")),
            Some(Principal::Vendor("acme".into()))
        );
        assert_eq!(
            a.vendor(Some("new")),
            Some(Principal::Vendor("acme".into()))
        );
        assert_eq!(a.vendor(Some("nope")), None);
        assert_eq!(a.vendor(None), None);
        assert_eq!(a.admin(Some("root")), Some(Principal::Admin("ops".into())));
        // A vendor key is not an admin token.
        assert_eq!(a.admin(Some("new")), None);
    }

    #[test]
    fn malformed_entries_name_the_variable() {
        let e = parse_list("RTPD_VENDOR_KEYS", "acme:plain:secret").unwrap_err();
        assert_eq!(e.variable, "RTPD_VENDOR_KEYS");
        let e = parse_list("RTPD_VENDOR_KEYS", "acme:sha256:abcd").unwrap_err();
        assert!(e.message.contains("64 hex"));
    }
}
