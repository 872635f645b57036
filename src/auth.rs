//! Who may call what: vendors (ingest, their own transactions) and operators
//! with admin tokens (listing, replay, dead letters).
//!
//! Each vendor uses one of two schemes:
//! - **API key** in `X-Api-Key`. Keys are configured as sha256 hashes
//!   (`<vendor>:sha256:<hex>`, comma separated, in `RTPD_VENDOR_KEYS` or the
//!   file named by `RTPD_VENDOR_KEYS_FILE`), so an environment dump does not
//!   leak a usable key. A presented key is hashed and compared in constant
//!   time with every active hash.
//! - **HMAC-SHA256 signature** (`X-Rtpd-Vendor`, `X-Rtpd-Timestamp: <unix
//!   secs>`, `X-Rtpd-Signature: v1=<hex>`) over `timestamp + "." + body`; for a
//!   request without a body (GET), over `timestamp + "." + METHOD + " " +
//!   path?query`. A signature needs the secret itself, so HMAC secrets
//!   (`<vendor>:hmac:<secret>`) are accepted only from `RTPD_VENDOR_KEYS_FILE`
//!   (a mounted Key Vault secret), never from an environment variable.
//!   Timestamps outside the replay window are refused, and so is a signature
//!   already seen inside it.
//!
//! A vendor may have several keys or secrets, so they rotate without downtime.
//! Admin tokens (`RTPD_ADMIN_TOKENS[_FILE]`) are sha256 hashes too.

use crate::config::{AuthMode, ConfigError, Settings};
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretSlice};
use sha2::{Digest, Sha256};
use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use subtle::ConstantTimeEq;

/// Header a vendor sends its API key in.
pub const API_KEY_HEADER: &str = "X-Api-Key";
/// Header naming the signing vendor.
pub const VENDOR_HEADER: &str = "X-Rtpd-Vendor";
/// Header carrying the signing time, unix seconds.
pub const TIMESTAMP_HEADER: &str = "X-Rtpd-Timestamp";
/// Header carrying `v1=<hex HMAC-SHA256>`.
pub const SIGNATURE_HEADER: &str = "X-Rtpd-Signature";

/// Signatures remembered for replay detection. Past this many inside one
/// window the oldest are forgotten (logged); ingest stays idempotent by
/// transaction id, so a replay that slips through cannot enqueue twice.
const REPLAY_CACHE_CAPACITY: usize = 200_000;

const ENTRY_FORMAT: &str = "entries must look like <name>:sha256:<64 hex chars> (or <name>:hmac:<secret> in RTPD_VENDOR_KEYS_FILE)";

/// Why a vendor credential was refused. Each is a 401; the reason goes to the
/// rejected-calls log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthFailure {
    #[error(
        "missing credentials: send X-Api-Key, or X-Rtpd-Vendor, X-Rtpd-Timestamp and X-Rtpd-Signature"
    )]
    Missing,
    #[error("invalid API key")]
    BadKey,
    #[error("unknown vendor, or the vendor does not sign its requests")]
    UnknownVendor,
    #[error("X-Rtpd-Signature must be v1=<64 hex characters>")]
    MalformedSignature,
    #[error("X-Rtpd-Timestamp must be unix seconds")]
    BadTimestamp,
    #[error("X-Rtpd-Timestamp is outside the replay window")]
    StaleTimestamp,
    #[error("signature does not match")]
    BadSignature,
    #[error("signature already used")]
    ReusedSignature,
}

impl AuthFailure {
    pub fn reason(self) -> &'static str {
        match self {
            AuthFailure::Missing => "missing_credentials",
            AuthFailure::BadKey => "bad_api_key",
            AuthFailure::UnknownVendor => "unknown_vendor",
            AuthFailure::MalformedSignature => "malformed_signature",
            AuthFailure::BadTimestamp => "bad_timestamp",
            AuthFailure::StaleTimestamp => "stale_timestamp",
            AuthFailure::BadSignature => "bad_signature",
            AuthFailure::ReusedSignature => "reused_signature",
        }
    }
}

/// The signature headers of one request, as presented.
#[derive(Debug, Clone, Copy)]
pub struct Signed<'a> {
    pub vendor: &'a str,
    pub timestamp: &'a str,
    pub signature: &'a str,
}

enum Scheme {
    ApiKey(Vec<[u8; 32]>),
    Hmac(Vec<SecretSlice<u8>>),
}

struct Vendor {
    name: String,
    scheme: Scheme,
}

struct Inner {
    vendors: Vec<Vendor>,
    admins: Vec<(String, [u8; 32])>,
    window_secs: i64,
    seen: Mutex<ReplayCache>,
}

/// Vendor and admin credentials; cheap to clone.
#[derive(Clone, Default)]
pub struct Auth {
    /// `None` when authentication is switched off (`RTPD_AUTH=none`).
    inner: Option<Arc<Inner>>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.inner {
            None => f.write_str("Auth(disabled)"),
            Some(i) => f
                .debug_struct("Auth")
                .field(
                    "vendors",
                    &i.vendors.iter().map(|v| &v.name).collect::<Vec<_>>(),
                )
                .field("admins", &i.admins.len())
                .finish(),
        }
    }
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

/// `v1=<hex>` for `timestamp + "." + content`: what a vendor sends in
/// `X-Rtpd-Signature`.
pub fn sign(secret: &[u8], timestamp: i64, content: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC accepts any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(content);
    format!("v1={}", hex::encode(mac.finalize().into_bytes()))
}

enum Entry {
    Hash(String, [u8; 32]),
    Hmac(String, SecretSlice<u8>),
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn parse_list(variable: &str, text: &str, allow_hmac: bool) -> Result<Vec<Entry>, ConfigError> {
    let mut out = Vec::new();
    for entry in text
        .split([',', '\n'])
        .map(str::trim)
        .filter(|e| !e.is_empty() && !e.starts_with('#'))
    {
        let mut parts = entry.splitn(3, ':');
        let (Some(name), Some(kind), Some(value)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(ConfigError::new(variable, ENTRY_FORMAT));
        };
        if !valid_name(name) {
            return Err(ConfigError::new(
                variable,
                "names may contain only A-Z a-z 0-9 - _ . (at most 64)",
            ));
        }
        match kind {
            "sha256" => {
                let mut hash = [0u8; 32];
                hex::decode_to_slice(value.trim(), &mut hash).map_err(|_| {
                    ConfigError::new(
                        variable,
                        format!("entry for {name:?} is not 64 hex characters"),
                    )
                })?;
                out.push(Entry::Hash(name.to_owned(), hash));
            }
            "hmac" if allow_hmac => {
                if value.len() < 16 {
                    return Err(ConfigError::new(
                        variable,
                        format!("hmac secret for {name:?} must be at least 16 characters"),
                    ));
                }
                out.push(Entry::Hmac(
                    name.to_owned(),
                    SecretSlice::from(value.as_bytes().to_vec()),
                ));
            }
            "hmac" => {
                return Err(ConfigError::new(
                    variable,
                    "hmac secrets are accepted only from RTPD_VENDOR_KEYS_FILE (a mounted secret), \
                     never from an environment variable",
                ));
            }
            _ => return Err(ConfigError::new(variable, ENTRY_FORMAT)),
        }
    }
    Ok(out)
}

fn read_source(
    inline: Option<&crate::config::Secret>,
    file: Option<&std::path::Path>,
    inline_var: &str,
    file_var: &str,
    allow_hmac_in_file: bool,
) -> Result<Vec<Entry>, ConfigError> {
    let mut out = Vec::new();
    if let Some(s) = inline {
        out.extend(parse_list(inline_var, s.expose(), false)?);
    }
    if let Some(path) = file {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new(file_var, format!("cannot read {}: {e}", path.display()))
        })?;
        out.extend(parse_list(file_var, &text, allow_hmac_in_file)?);
    }
    Ok(out)
}

/// Groups entries per vendor; a vendor uses exactly one scheme.
fn vendors_from(entries: Vec<Entry>) -> Result<Vec<Vendor>, ConfigError> {
    let mut vendors: Vec<Vendor> = Vec::new();
    for e in entries {
        let name = match &e {
            Entry::Hash(n, _) | Entry::Hmac(n, _) => n.clone(),
        };
        let i = match vendors.iter().position(|v| v.name == name) {
            Some(i) => i,
            None => {
                let scheme = match e {
                    Entry::Hash(..) => Scheme::ApiKey(Vec::new()),
                    Entry::Hmac(..) => Scheme::Hmac(Vec::new()),
                };
                vendors.push(Vendor { name, scheme });
                vendors.len() - 1
            }
        };
        match (&mut vendors[i].scheme, e) {
            (Scheme::ApiKey(keys), Entry::Hash(_, h)) => keys.push(h),
            (Scheme::Hmac(secrets), Entry::Hmac(_, s)) => secrets.push(s),
            _ => {
                return Err(ConfigError::new(
                    "RTPD_VENDOR_KEYS_FILE",
                    format!(
                        "vendor {:?} has both API keys and HMAC secrets; choose one scheme per vendor",
                        vendors[i].name
                    ),
                ));
            }
        }
    }
    Ok(vendors)
}

impl Auth {
    pub fn from_settings(s: &Settings) -> Result<Auth, ConfigError> {
        if s.auth == AuthMode::None {
            return Ok(Auth::default());
        }
        let vendors = vendors_from(read_source(
            s.vendor_keys.as_ref(),
            s.vendor_keys_file.as_deref(),
            "RTPD_VENDOR_KEYS",
            "RTPD_VENDOR_KEYS_FILE",
            true,
        )?)?;
        let admins = read_source(
            s.admin_tokens.as_ref(),
            s.admin_tokens_file.as_deref(),
            "RTPD_ADMIN_TOKENS",
            "RTPD_ADMIN_TOKENS_FILE",
            false,
        )?
        .into_iter()
        .filter_map(|e| match e {
            Entry::Hash(n, h) => Some((n, h)),
            Entry::Hmac(..) => None,
        })
        .collect();
        if vendors.is_empty() {
            return Err(ConfigError::new(
                "RTPD_VENDOR_KEYS",
                "no vendor credentials configured; set RTPD_VENDOR_KEYS or RTPD_VENDOR_KEYS_FILE, \
                 or RTPD_AUTH=none to run unauthenticated",
            ));
        }
        Ok(Auth {
            inner: Some(Arc::new(Inner {
                vendors,
                admins,
                window_secs: i64::from(s.signature_window_secs),
                seen: Mutex::new(ReplayCache::new(REPLAY_CACHE_CAPACITY)),
            })),
        })
    }

    pub fn disabled() -> Auth {
        Auth::default()
    }

    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    fn matches(hashes: &[[u8; 32]], presented: &[u8; 32]) -> bool {
        // Compare against every entry so timing does not reveal which matched.
        hashes
            .iter()
            .fold(false, |acc, h| acc | bool::from(h.ct_eq(presented)))
    }

    /// The vendor owning an API key.
    pub fn vendor(&self, api_key: Option<&str>) -> Option<Principal> {
        self.vendor_by_key(api_key).ok()
    }

    pub fn vendor_by_key(&self, api_key: Option<&str>) -> Result<Principal, AuthFailure> {
        let Some(inner) = &self.inner else {
            return Ok(Principal::Anonymous);
        };
        let presented: [u8; 32] = Sha256::digest(api_key.ok_or(AuthFailure::Missing)?).into();
        let mut found = None;
        for v in &inner.vendors {
            if let Scheme::ApiKey(keys) = &v.scheme
                && Self::matches(keys, &presented)
                && found.is_none()
            {
                found = Some(v.name.clone());
            }
        }
        found.map(Principal::Vendor).ok_or(AuthFailure::BadKey)
    }

    pub fn admin(&self, bearer: Option<&str>) -> Option<Principal> {
        let Some(inner) = &self.inner else {
            return Some(Principal::Anonymous);
        };
        let presented: [u8; 32] = Sha256::digest(bearer?.as_bytes()).into();
        let mut found = None;
        for (name, h) in &inner.admins {
            if bool::from(h.ct_eq(&presented)) && found.is_none() {
                found = Some(name.clone());
            }
        }
        found.map(Principal::Admin)
    }

    /// Checks what can be checked before the body is read: the vendor signs,
    /// the signature is well formed, the timestamp is inside the window.
    pub fn precheck_signed(&self, s: &Signed<'_>, now: i64) -> Result<(), AuthFailure> {
        self.signed_parts(s, now).map(|_| ())
    }

    fn signed_parts<'a>(
        &'a self,
        s: &Signed<'_>,
        now: i64,
    ) -> Result<SignedParts<'a>, AuthFailure> {
        let inner = self.inner.as_deref().ok_or(AuthFailure::UnknownVendor)?;
        let vendor = inner
            .vendors
            .iter()
            .find(|v| v.name == s.vendor)
            .ok_or(AuthFailure::UnknownVendor)?;
        let Scheme::Hmac(secrets) = &vendor.scheme else {
            return Err(AuthFailure::UnknownVendor);
        };
        let hexsig = s
            .signature
            .trim()
            .strip_prefix("v1=")
            .ok_or(AuthFailure::MalformedSignature)?;
        let mut sig = [0u8; 32];
        hex::decode_to_slice(hexsig, &mut sig).map_err(|_| AuthFailure::MalformedSignature)?;
        let ts_text = s.timestamp.trim();
        if ts_text.is_empty() || ts_text.len() > 12 || !ts_text.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(AuthFailure::BadTimestamp);
        }
        let ts: i64 = ts_text.parse().map_err(|_| AuthFailure::BadTimestamp)?;
        if (now - ts).abs() > inner.window_secs {
            return Err(AuthFailure::StaleTimestamp);
        }
        Ok(SignedParts {
            inner,
            vendor: &vendor.name,
            secrets,
            ts,
            sig,
        })
    }

    /// Verifies a signature over `timestamp + "." + content` and remembers it,
    /// so the same signature is refused for the rest of the window.
    pub fn verify_signed(
        &self,
        s: &Signed<'_>,
        content: &[u8],
        now: i64,
    ) -> Result<Principal, AuthFailure> {
        let SignedParts {
            inner,
            vendor,
            secrets,
            ts,
            sig,
        } = self.signed_parts(s, now)?;
        let mut ok = false;
        for secret in secrets {
            let mut mac = Hmac::<Sha256>::new_from_slice(secret.expose_secret())
                .expect("HMAC accepts any key length");
            mac.update(ts.to_string().as_bytes());
            mac.update(b".");
            mac.update(content);
            ok |= mac.verify_slice(&sig).is_ok();
        }
        if !ok {
            return Err(AuthFailure::BadSignature);
        }
        let fresh = inner.seen.lock().unwrap_or_else(|p| p.into_inner()).insert(
            sig,
            ts + inner.window_secs,
            now,
        );
        if !fresh {
            return Err(AuthFailure::ReusedSignature);
        }
        Ok(Principal::Vendor(vendor.to_owned()))
    }
}

/// A signed request that passed the checks possible before the body is read.
struct SignedParts<'a> {
    inner: &'a Inner,
    vendor: &'a str,
    secrets: &'a [SecretSlice<u8>],
    ts: i64,
    sig: [u8; 32],
}

/// Signatures seen inside the replay window, bounded.
struct ReplayCache {
    seen: HashSet<[u8; 32]>,
    /// Insertion order with each entry's expiry (its timestamp + window).
    order: VecDeque<([u8; 32], i64)>,
    capacity: usize,
}

impl ReplayCache {
    fn new(capacity: usize) -> ReplayCache {
        ReplayCache {
            seen: HashSet::new(),
            order: VecDeque::new(),
            capacity,
        }
    }

    /// Remembers `sig` until `expires`; false if it was already remembered.
    fn insert(&mut self, sig: [u8; 32], expires: i64, now: i64) -> bool {
        while let Some((old, exp)) = self.order.front().copied() {
            if exp >= now {
                break;
            }
            self.order.pop_front();
            self.seen.remove(&old);
        }
        if self.seen.contains(&sig) {
            return false;
        }
        if self.order.len() >= self.capacity
            && let Some((old, _)) = self.order.pop_front()
        {
            self.seen.remove(&old);
            tracing::warn!(
                capacity = self.capacity,
                "replay cache full; forgetting the oldest signature"
            );
        }
        self.seen.insert(sig);
        self.order.push_back((sig, expires));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(vendors: &str, admins: &str) -> Auth {
        let vendors = vendors_from(parse_list("V", vendors, true).unwrap()).unwrap();
        let admins = parse_list("A", admins, false)
            .unwrap()
            .into_iter()
            .filter_map(|e| match e {
                Entry::Hash(n, h) => Some((n, h)),
                Entry::Hmac(..) => None,
            })
            .collect();
        Auth {
            inner: Some(Arc::new(Inner {
                vendors,
                admins,
                window_secs: 300,
                seen: Mutex::new(ReplayCache::new(4)),
            })),
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
        let e = parse_list("RTPD_VENDOR_KEYS", "acme:plain:secret", true)
            .err()
            .unwrap();
        assert_eq!(e.variable, "RTPD_VENDOR_KEYS");
        let e = parse_list("RTPD_VENDOR_KEYS", "acme:sha256:abcd", true)
            .err()
            .unwrap();
        assert!(e.message.contains("64 hex"));
        let e = parse_list("RTPD_VENDOR_KEYS", "acme:hmac:0123456789abcdef", false)
            .err()
            .unwrap();
        assert!(e.message.contains("RTPD_VENDOR_KEYS_FILE"), "{}", e.message);
        let mixed = format!(
            "acme:sha256:{},acme:hmac:0123456789abcdef",
            hash_secret("k")
        );
        let e = vendors_from(parse_list("F", &mixed, true).unwrap())
            .err()
            .unwrap();
        assert!(e.message.contains("one scheme"));
    }

    #[test]
    fn signatures_rotate_expire_and_are_used_once() {
        let a = auth(
            "globex:hmac:old-secret-0123456789,globex:hmac:new-secret-0123456789",
            "",
        );
        let now = 1_700_000_000;
        let body = b"{\"transaction_id\":\"T\"}";
        for secret in ["old-secret-0123456789", "new-secret-0123456789"] {
            let sig = sign(secret.as_bytes(), now, body);
            let s = Signed {
                vendor: "globex",
                timestamp: &now.to_string(),
                signature: &sig,
            };
            assert_eq!(
                a.verify_signed(&s, body, now + 10),
                Ok(Principal::Vendor("globex".into()))
            );
            assert_eq!(
                a.verify_signed(&s, body, now + 20),
                Err(AuthFailure::ReusedSignature)
            );
            assert_eq!(
                a.verify_signed(&s, body, now + 301),
                Err(AuthFailure::StaleTimestamp)
            );
        }
        let sig = sign(b"old-secret-0123456789", now, body);
        let ts = now.to_string();
        let s = |vendor, timestamp, signature| Signed {
            vendor,
            timestamp,
            signature,
        };
        assert_eq!(
            a.verify_signed(&s("globex", &ts, &sig), b"{}", now),
            Err(AuthFailure::BadSignature)
        );
        assert_eq!(
            a.verify_signed(&s("globex", &ts, &sig), body, now - 301),
            Err(AuthFailure::StaleTimestamp),
            "far-future timestamps are refused too"
        );
        assert_eq!(
            a.verify_signed(&s("globex", "yesterday", &sig), body, now),
            Err(AuthFailure::BadTimestamp)
        );
        assert_eq!(
            a.verify_signed(&s("globex", &ts, "sha1=00"), body, now),
            Err(AuthFailure::MalformedSignature)
        );
        assert_eq!(
            a.verify_signed(&s("initech", &ts, &sig), body, now),
            Err(AuthFailure::UnknownVendor)
        );
    }

    #[test]
    fn replay_cache_is_bounded_and_forgets_expired_entries() {
        let mut c = ReplayCache::new(2);
        assert!(c.insert([1; 32], 100, 0));
        assert!(!c.insert([1; 32], 100, 50));
        // Expired entries are dropped first.
        assert!(c.insert([1; 32], 300, 101));
        assert!(c.insert([2; 32], 300, 101));
        assert!(c.insert([3; 32], 300, 101));
        assert_eq!(c.order.len(), 2, "capacity holds");
        assert!(!c.insert([3; 32], 300, 102));
    }
}
