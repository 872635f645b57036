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
//! - **Standard Webhooks** (`webhook-id`, `webhook-timestamp`,
//!   `webhook-signature: v1,<base64>` over `id + "." + timestamp + "." +
//!   body`, <https://www.standardwebhooks.com>), for vendors whose webhook
//!   sender already speaks it. Secrets are `<vendor>:whsec:whsec_<base64>`,
//!   from `RTPD_VENDOR_KEYS_FILE` only. The headers name no vendor: the secret
//!   that verifies the signature does, so each vendor has its own. A vendor
//!   may have both `hmac` and `whsec` entries and then signs either way.
//!
//! A vendor may have several keys or secrets, so they rotate without downtime.
//! Admin tokens (`RTPD_ADMIN_TOKENS[_FILE]`) are sha256 hashes too.
//!
//! The credential files are re-read while the process runs ([`Auth::watch`]):
//! every `RTPD_CREDENTIALS_POLL_SECS` when their content changed, and at once
//! on SIGHUP. A file that does not parse, or would leave no vendor, is
//! refused whole and the credentials in use stay, with one error logged per
//! bad version of the file. A poll applies new content only once two polls
//! in a row read the same bytes, so a file caught half-written by a writer
//! that does not write aside and rename is neither applied (a cut at a line
//! end still parses, minus the vendors after it) nor reported — unless the
//! writer stalls for a whole poll. A file that keeps changing is reported
//! once; an empty file is refused. SIGHUP means "the file is complete" and
//! applies at once.

use crate::config::{AuthMode, ConfigError, Secret, Settings};
use arc_swap::ArcSwap;
use base64::Engine;
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretSlice};
use sha2::{Digest, Sha256};
use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use subtle::ConstantTimeEq;

/// Header a vendor sends its API key in.
pub const API_KEY_HEADER: &str = "X-Api-Key";
/// Header naming the signing vendor.
pub const VENDOR_HEADER: &str = "X-Rtpd-Vendor";
/// Header carrying the signing time, unix seconds.
pub const TIMESTAMP_HEADER: &str = "X-Rtpd-Timestamp";
/// Header carrying `v1=<hex HMAC-SHA256>`.
pub const SIGNATURE_HEADER: &str = "X-Rtpd-Signature";
/// Standard Webhooks: the message id (the same on every retry of an event).
pub const WEBHOOK_ID_HEADER: &str = "webhook-id";
/// Standard Webhooks: the attempt's time, unix seconds.
pub const WEBHOOK_TIMESTAMP_HEADER: &str = "webhook-timestamp";
/// Standard Webhooks: space-separated `v1,<base64 HMAC-SHA256>` signatures.
pub const WEBHOOK_SIGNATURE_HEADER: &str = "webhook-signature";

/// Signatures remembered for replay detection. Past this many inside one
/// window the oldest are forgotten (logged); ingest stays idempotent by
/// transaction id, so a replay that slips through cannot enqueue twice.
const REPLAY_CACHE_CAPACITY: usize = 200_000;

const ENTRY_FORMAT: &str = "entries must look like <name>:sha256:<64 hex chars> (or <name>:hmac:<secret> or <name>:whsec:whsec_<base64> in RTPD_VENDOR_KEYS_FILE)";

/// Standard Webhooks secrets: at least 24 bytes (the spec's minimum), at most 64.
const WEBHOOK_SECRET_BYTES: std::ops::RangeInclusive<usize> = 24..=64;

/// Why a vendor credential was refused. Each is a 401; the reason goes to the
/// rejected-calls log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthFailure {
    #[error(
        "missing credentials: send X-Api-Key, or X-Rtpd-Vendor, X-Rtpd-Timestamp and X-Rtpd-Signature, \
         or webhook-id, webhook-timestamp and webhook-signature"
    )]
    Missing,
    #[error("invalid API key")]
    BadKey,
    #[error("unknown vendor, or the vendor does not sign its requests")]
    UnknownVendor,
    #[error("X-Rtpd-Signature must be v1=<64 hex characters>")]
    MalformedSignature,
    #[error(
        "the signature's timestamp (X-Rtpd-Timestamp or webhook-timestamp) must be unix seconds"
    )]
    BadTimestamp,
    #[error(
        "the signature's timestamp (X-Rtpd-Timestamp or webhook-timestamp) is outside the replay window"
    )]
    StaleTimestamp,
    #[error("signature does not match")]
    BadSignature,
    #[error("signature already used")]
    ReusedSignature,
    #[error("webhook-id must be 1 to 256 printable ASCII characters")]
    BadWebhookId,
    #[error("webhook-signature must hold one or more space-separated v1,<base64 HMAC-SHA256>")]
    MalformedWebhookSignature,
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
            AuthFailure::BadWebhookId => "bad_webhook_id",
            AuthFailure::MalformedWebhookSignature => "malformed_webhook_signature",
        }
    }
}

/// The signature headers of one request, as presented.
#[derive(Debug, Clone, Copy, Default)]
pub struct Signed<'a> {
    /// `X-Rtpd-Vendor`; empty for Standard Webhooks (the secret names the vendor).
    pub vendor: &'a str,
    pub timestamp: &'a str,
    pub signature: &'a str,
    /// `webhook-id`: set when the request is signed the Standard Webhooks way.
    pub webhook_id: Option<&'a str>,
}

enum Scheme {
    ApiKey(Vec<[u8; 32]>),
    /// `hmac` entries (X-Rtpd-*) and `whsec` entries (Standard Webhooks).
    Hmac {
        secrets: Vec<SecretSlice<u8>>,
        webhooks: Vec<SecretSlice<u8>>,
    },
}

struct Vendor {
    name: String,
    scheme: Scheme,
}

impl Vendor {
    /// A digest of the vendor's name and credentials
    /// ([`Auth::vendor_fingerprint`]); kept in memory only.
    fn fingerprint(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        let mut put = |tag: &[u8], bytes: &[u8]| {
            h.update(tag);
            h.update((bytes.len() as u64).to_be_bytes());
            h.update(bytes);
        };
        put(b"name", self.name.as_bytes());
        match &self.scheme {
            Scheme::ApiKey(keys) => keys.iter().for_each(|k| put(b"key", k)),
            Scheme::Hmac { secrets, webhooks } => {
                secrets.iter().for_each(|s| put(b"hmac", s.expose_secret()));
                webhooks
                    .iter()
                    .for_each(|s| put(b"whsec", s.expose_secret()));
            }
        }
        h.finalize().into()
    }
}

impl Inner {
    fn fingerprint_of(&self, vendor: &str) -> Option<[u8; 32]> {
        self.vendors
            .iter()
            .find(|v| v.name == vendor)
            .map(Vendor::fingerprint)
    }
}

/// One consistent set of credentials; replaced whole when a file changes.
struct Inner {
    vendors: Arc<Vec<Vendor>>,
    admins: Arc<Vec<(String, [u8; 32])>>,
    window_secs: i64,
    /// Shared by every set, so a reload forgets no used signature.
    seen: Arc<Mutex<ReplayCache>>,
}

/// The credentials in use, where they come from, and what each file held
/// when it was last read.
struct Live {
    current: ArcSwap<Inner>,
    vendors: Option<Source>,
    admins: Source,
    files: Mutex<FileStates>,
}

/// Inline entries (an environment variable) and an optional file.
struct Source {
    inline: Option<Secret>,
    file: Option<PathBuf>,
    inline_var: &'static str,
    file_var: &'static str,
}

#[derive(Default)]
struct FileStates {
    vendors: FileState,
    admins: FileState,
}

/// The sha256 of a file's content when it was last applied or refused, so an
/// unchanged file is not parsed again and a bad one is reported once.
#[derive(Default)]
struct FileState {
    seen: Option<[u8; 32]>,
    /// New content read by the last poll and not yet applied: the next poll
    /// applies it if it reads the same bytes again.
    settling: Option<[u8; 32]>,
    /// Polls in a row that found content different from the poll before:
    /// a file that keeps changing is reported once it passes
    /// [`UNSETTLED_POLLS_REPORTED`].
    unsettled_polls: u32,
    unreadable: Option<String>,
}

/// Polls in a row with changing content after which a credential file is
/// reported as never settling (a writer that rewrites it faster than the poll).
const UNSETTLED_POLLS_REPORTED: u32 = 3;

/// Whether new file content is applied at the first read or only once it
/// has stopped changing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// SIGHUP and direct calls: the operator says the file is complete.
    No,
    /// Polling: the same content must be read twice in a row.
    UntilSettled,
}

/// Vendor and admin credentials; cheap to clone. Clones share the
/// credentials in use, so a reload reaches every clone.
#[derive(Clone, Default)]
pub struct Auth {
    /// `None` when authentication is switched off (`RTPD_AUTH=none`).
    inner: Option<Arc<Live>>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.current() {
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

/// `v1,<base64>` for `id + "." + timestamp + "." + content` with a
/// `whsec_<base64>` secret: one entry of a Standard Webhooks
/// `webhook-signature` header.
pub fn sign_webhook(secret: &str, id: &str, timestamp: i64, content: &[u8]) -> Option<String> {
    let key = decode_webhook_secret(secret).ok()?;
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).ok()?;
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(content);
    Some(format!("v1,{}", BASE64.encode(mac.finalize().into_bytes())))
}

/// Standard base64, padded or not (the reference libraries accept both).
const BASE64: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

fn decode_webhook_secret(value: &str) -> Result<Vec<u8>, String> {
    let encoded = value
        .trim()
        .strip_prefix("whsec_")
        .ok_or("must start with whsec_")?;
    let key = BASE64
        .decode(encoded)
        .map_err(|_| "is not whsec_ followed by base64".to_owned())?;
    if !WEBHOOK_SECRET_BYTES.contains(&key.len()) {
        return Err(format!(
            "must decode to {} to {} bytes (Standard Webhooks), got {}",
            WEBHOOK_SECRET_BYTES.start(),
            WEBHOOK_SECRET_BYTES.end(),
            key.len()
        ));
    }
    Ok(key)
}

/// HMAC-SHA256 keyed with `key`. HMAC takes a key of any length, so this
/// does not fail; if it ever did, the request is refused, not the process.
fn keyed(key: &[u8]) -> Result<Hmac<Sha256>, AuthFailure> {
    Hmac::<Sha256>::new_from_slice(key).map_err(|_| AuthFailure::BadSignature)
}

/// `v1=<hex>` for `timestamp + "." + content`: what a vendor sends in
/// `X-Rtpd-Signature`.
pub fn sign(secret: &[u8], timestamp: i64, content: &[u8]) -> Option<String> {
    let mut mac = keyed(secret).ok()?;
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(content);
    Some(format!("v1={}", hex::encode(mac.finalize().into_bytes())))
}

enum Entry {
    Hash(String, [u8; 32]),
    Hmac(String, SecretSlice<u8>),
    Webhook(String, SecretSlice<u8>),
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
            "whsec" if allow_hmac => {
                let key = decode_webhook_secret(value).map_err(|why| {
                    ConfigError::new(variable, format!("whsec secret for {name:?} {why}"))
                })?;
                out.push(Entry::Webhook(name.to_owned(), SecretSlice::from(key)));
            }
            "hmac" | "whsec" => {
                return Err(ConfigError::new(
                    variable,
                    "hmac and whsec secrets are accepted only from RTPD_VENDOR_KEYS_FILE (a mounted secret), \
                     never from an environment variable",
                ));
            }
            _ => return Err(ConfigError::new(variable, ENTRY_FORMAT)),
        }
    }
    Ok(out)
}

impl Source {
    fn vendors(s: &Settings) -> Source {
        Source {
            inline: s.vendor_keys.clone(),
            file: s.vendor_keys_file.clone(),
            inline_var: "RTPD_VENDOR_KEYS",
            file_var: "RTPD_VENDOR_KEYS_FILE",
        }
    }

    fn admins(s: &Settings) -> Source {
        Source {
            inline: s.admin_tokens.clone(),
            file: s.admin_tokens_file.clone(),
            inline_var: "RTPD_ADMIN_TOKENS",
            file_var: "RTPD_ADMIN_TOKENS_FILE",
        }
    }

    fn read_file(&self) -> Result<Option<String>, ConfigError> {
        let Some(path) = &self.file else {
            return Ok(None);
        };
        std::fs::read_to_string(path).map(Some).map_err(|e| {
            ConfigError::new(
                self.file_var,
                format!("cannot read {}: {e}", path.display()),
            )
        })
    }

    /// The inline entries and those of `file_text`; signing secrets only
    /// from the file.
    fn entries(&self, file_text: Option<&str>) -> Result<Vec<Entry>, ConfigError> {
        let mut out = Vec::new();
        if let Some(s) = &self.inline {
            out.extend(parse_list(self.inline_var, s.expose(), false)?);
        }
        if let Some(text) = file_text {
            out.extend(parse_list(
                self.file_var,
                text,
                self.file_var == "RTPD_VENDOR_KEYS_FILE",
            )?);
        }
        Ok(out)
    }

    fn vendors_of(&self, file_text: Option<&str>) -> Result<Vec<Vendor>, ConfigError> {
        let vendors = vendors_from(self.entries(file_text)?)?;
        if vendors.is_empty() {
            return Err(ConfigError::new(
                if self.file.is_some() {
                    self.file_var
                } else {
                    self.inline_var
                },
                "no vendor credentials configured; set RTPD_VENDOR_KEYS or RTPD_VENDOR_KEYS_FILE, \
                 or RTPD_AUTH=none to run unauthenticated",
            ));
        }
        Ok(vendors)
    }

    fn admins_of(&self, file_text: Option<&str>) -> Result<Vec<(String, [u8; 32])>, ConfigError> {
        Ok(self
            .entries(file_text)?
            .into_iter()
            .filter_map(|e| match e {
                Entry::Hash(n, h) => Some((n, h)),
                Entry::Hmac(..) | Entry::Webhook(..) => None,
            })
            .collect())
    }
}

/// Groups entries per vendor; a vendor uses an API key or signatures (one
/// or both signing schemes), not both.
fn vendors_from(entries: Vec<Entry>) -> Result<Vec<Vendor>, ConfigError> {
    let mut vendors: Vec<Vendor> = Vec::new();
    for e in entries {
        let name = match &e {
            Entry::Hash(n, _) | Entry::Hmac(n, _) | Entry::Webhook(n, _) => n.clone(),
        };
        let i = match vendors.iter().position(|v| v.name == name) {
            Some(i) => i,
            None => {
                let scheme = match e {
                    Entry::Hash(..) => Scheme::ApiKey(Vec::new()),
                    Entry::Hmac(..) | Entry::Webhook(..) => Scheme::Hmac {
                        secrets: Vec::new(),
                        webhooks: Vec::new(),
                    },
                };
                vendors.push(Vendor { name, scheme });
                vendors.len() - 1
            }
        };
        match (&mut vendors[i].scheme, e) {
            (Scheme::ApiKey(keys), Entry::Hash(_, h)) => keys.push(h),
            (Scheme::Hmac { secrets, .. }, Entry::Hmac(_, s)) => secrets.push(s),
            (Scheme::Hmac { webhooks, .. }, Entry::Webhook(_, s)) => webhooks.push(s),
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
    distinct_webhook_secrets(&vendors)?;
    Ok(vendors)
}

/// A Standard Webhooks request names no vendor; its secret does, so no two
/// vendors may share one.
fn distinct_webhook_secrets(vendors: &[Vendor]) -> Result<(), ConfigError> {
    let mut owner: std::collections::HashMap<[u8; 32], &str> = Default::default();
    for v in vendors {
        if let Scheme::Hmac { webhooks, .. } = &v.scheme {
            for w in webhooks {
                let fingerprint: [u8; 32] = Sha256::digest(w.expose_secret()).into();
                if let Some(other) = owner.insert(fingerprint, &v.name)
                    && other != v.name
                {
                    return Err(ConfigError::new(
                        "RTPD_VENDOR_KEYS_FILE",
                        format!(
                            "vendors {other:?} and {:?} have the same whsec secret; each vendor needs its own \
                             (the secret is what tells Standard Webhooks senders apart)",
                            v.name
                        ),
                    ));
                }
            }
        }
    }
    Ok(())
}

impl Auth {
    /// Vendors and operators, for a process that serves the API. Refuses to
    /// start without vendor credentials.
    pub fn from_settings(s: &Settings) -> Result<Auth, ConfigError> {
        if s.auth == AuthMode::None {
            return Ok(Auth::default());
        }
        Self::build(s, Some(Source::vendors(s)))
    }

    /// Operators only (admin tokens), for a process without vendor routes:
    /// the processor's health server, whose `/metrics` and `/status` are
    /// for operators.
    pub fn operators(s: &Settings) -> Result<Auth, ConfigError> {
        if s.auth == AuthMode::None {
            return Ok(Auth::default());
        }
        Self::build(s, None)
    }

    fn build(s: &Settings, vendor_source: Option<Source>) -> Result<Auth, ConfigError> {
        let admin_source = Source::admins(s);
        let mut files = FileStates::default();
        let vendors = match &vendor_source {
            Some(src) => {
                let text = src.read_file()?;
                files.vendors.seen = text.as_deref().map(|t| Sha256::digest(t).into());
                src.vendors_of(text.as_deref())?
            }
            None => Vec::new(),
        };
        let text = admin_source.read_file()?;
        files.admins.seen = text.as_deref().map(|t| Sha256::digest(t).into());
        let admins = admin_source.admins_of(text.as_deref())?;
        let inner = Inner {
            vendors: Arc::new(vendors),
            admins: Arc::new(admins),
            window_secs: i64::from(s.signature_window_secs),
            seen: Arc::new(Mutex::new(ReplayCache::new(REPLAY_CACHE_CAPACITY))),
        };
        Ok(Auth {
            inner: Some(Arc::new(Live {
                current: ArcSwap::from_pointee(inner),
                vendors: vendor_source,
                admins: admin_source,
                files: Mutex::new(files),
            })),
        })
    }

    pub fn disabled() -> Auth {
        Auth::default()
    }

    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// The names of the vendors configured now (none with `RTPD_AUTH=none`),
    /// for operators looking up an id without naming its vendor.
    pub fn vendor_names(&self) -> Vec<String> {
        self.current()
            .map(|i| i.vendors.iter().map(|v| v.name.clone()).collect())
            .unwrap_or_default()
    }

    /// The credentials in use now.
    fn current(&self) -> Option<Arc<Inner>> {
        self.inner.as_ref().map(|live| live.current.load_full())
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
        let Some(inner) = self.current() else {
            return Ok(Principal::Anonymous);
        };
        let presented: [u8; 32] = Sha256::digest(api_key.ok_or(AuthFailure::Missing)?).into();
        let mut found = None;
        for v in inner.vendors.iter() {
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
        let Some(inner) = self.current() else {
            return Some(Principal::Anonymous);
        };
        let presented: [u8; 32] = Sha256::digest(bearer?.as_bytes()).into();
        let mut found = None;
        for (name, h) in inner.admins.iter() {
            if bool::from(h.ct_eq(&presented)) && found.is_none() {
                found = Some(name.clone());
            }
        }
        found.map(Principal::Admin)
    }

    /// Checks what can be checked before the body is read: the vendor signs,
    /// the signature is well formed, the timestamp is inside the window.
    pub fn precheck_signed(&self, s: &Signed<'_>, now: i64) -> Result<(), AuthFailure> {
        let inner = self.current().ok_or(AuthFailure::UnknownVendor)?;
        if s.webhook_id.is_some() {
            return webhook_parts(&inner, s, now).map(|_| ());
        }
        Self::signed_parts(&inner, s, now).map(|_| ())
    }

    fn signed_parts<'a>(
        inner: &'a Inner,
        s: &Signed<'_>,
        now: i64,
    ) -> Result<SignedParts<'a>, AuthFailure> {
        let vendor = inner
            .vendors
            .iter()
            .find(|v| v.name == s.vendor)
            .ok_or(AuthFailure::UnknownVendor)?;
        let Scheme::Hmac { secrets, .. } = &vendor.scheme else {
            return Err(AuthFailure::UnknownVendor);
        };
        if secrets.is_empty() {
            // A vendor that declared only Standard Webhooks.
            return Err(AuthFailure::UnknownVendor);
        }
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
        self.verify_signed_keyed(s, content, now, None)
            .map(|(p, _)| p)
    }

    /// [`Auth::verify_signed`] for a request from `from` (its client
    /// address, `None` if it has none), also giving the replay-cache entry
    /// it made, for [`Auth::forget_signature`] when the request is then
    /// refused. A signature forgotten that way is accepted once more, from
    /// any address (a vendor's retry may leave from another one), but
    /// vouches ([`ReplayKey::vouches`]) only for the address it first came
    /// from.
    pub fn verify_signed_keyed(
        &self,
        s: &Signed<'_>,
        content: &[u8],
        now: i64,
        from: Option<IpAddr>,
    ) -> Result<(Principal, ReplayKey), AuthFailure> {
        let inner = self.current().ok_or(AuthFailure::UnknownVendor)?;
        if s.webhook_id.is_some() {
            return verify_webhook(&inner, s, content, now, from);
        }
        let SignedParts {
            inner,
            vendor,
            secrets,
            ts,
            sig,
        } = Self::signed_parts(&inner, s, now)?;
        let mut ok = false;
        for secret in secrets {
            let mut mac = keyed(secret.expose_secret())?;
            mac.update(ts.to_string().as_bytes());
            mac.update(b".");
            mac.update(content);
            ok |= mac.verify_slice(&sig).is_ok();
        }
        if !ok {
            return Err(AuthFailure::BadSignature);
        }
        let vouches = inner
            .seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(sig, ts + inner.window_secs, now, from)
            .ok_or(AuthFailure::ReusedSignature)?;
        // The same credentials the signature was checked against.
        let vouches = vouches.then(|| inner.fingerprint_of(vendor)).flatten();
        Ok((
            Principal::Vendor(vendor.to_owned()),
            ReplayKey { sig, vouches },
        ))
    }

    /// A digest of `vendor`'s credentials as they are now (`None`: no such
    /// vendor): what an address vouched for by that vendor's signature
    /// was vouched under. It changes when the vendor's keys or secrets do,
    /// and only then.
    pub fn vendor_fingerprint(&self, vendor: &str) -> Option<[u8; 32]> {
        self.current()?.fingerprint_of(vendor)
    }

    /// Forgets a signature verified by [`Auth::verify_signed_keyed`] whose
    /// request was then refused (429, 503): it had no effect, so the
    /// vendor's byte-identical retry must not be taken for a replay (a 401
    /// may be read as final and the payment dropped). From another client
    /// address the retry is accepted too — a vendor may send from several —
    /// but vouches for nothing: it may be a captured request replayed.
    pub fn forget_signature(&self, key: ReplayKey) {
        if let Some(inner) = self.current() {
            inner
                .seen
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .release(&key.sig);
        }
    }
}

/// A replay-cache entry: what [`Auth::forget_signature`] takes.
#[derive(Debug, Clone, Copy)]
pub struct ReplayKey {
    sig: [u8; 32],
    /// The vendor's credential fingerprint, if the request may vouch for
    /// its address.
    vouches: Option<[u8; 32]>,
}

impl ReplayKey {
    /// The fingerprint of the credentials the signature verified against
    /// ([`Auth::vendor_fingerprint`]), if the request may vouch for its
    /// address: not a forgotten signature used again from another address.
    pub fn vouches(&self) -> Option<[u8; 32]> {
        self.vouches
    }
}

/// What one reload did, for the caller and the tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reloaded {
    /// Files whose new content is now in use.
    pub applied: Vec<&'static str>,
    /// Files whose new content was refused (the old credentials stay).
    pub refused: Vec<&'static str>,
    /// Files whose content changed since the last poll and will be applied
    /// (or refused) at the next poll if it is still the same.
    pub settling: Vec<&'static str>,
    /// Files reported (once) because they changed at every one of the
    /// last few polls and so were never applied.
    pub unsettled: Vec<&'static str>,
}

impl Auth {
    /// Re-reads the credential files and applies those whose content
    /// changed. Each file is applied whole or not at all: a file that cannot
    /// be read or parsed, or that would leave no vendor, is refused and its
    /// previous credentials stay; one error is logged per refused version.
    /// What SIGHUP does.
    pub fn reload(&self) -> Reloaded {
        self.reread(Wait::No)
    }

    /// [`Auth::reload`] for a timer: content that changed since the last
    /// poll waits for the next one, and is applied (or refused) only if it
    /// is still the same then — a writer may be half-way through it.
    pub fn poll(&self) -> Reloaded {
        self.reread(Wait::UntilSettled)
    }

    fn reread(&self, wait: Wait) -> Reloaded {
        let mut done = Reloaded::default();
        let Some(live) = &self.inner else {
            return done;
        };
        let mut files = live.files.lock().unwrap_or_else(|p| p.into_inner());
        let current = live.current.load_full();
        let mut vendors = None;
        let mut admins = None;
        if let Some(src) = &live.vendors
            && let Some(text) = changed(src, &mut files.vendors, wait, &mut done)
        {
            match src.vendors_of(Some(&text)) {
                Ok(v) => {
                    done.applied.push(src.file_var);
                    vendors = Some(v);
                }
                Err(e) => refuse(src, &e, &mut done),
            }
        }
        if let Some(text) = changed(&live.admins, &mut files.admins, wait, &mut done) {
            match live.admins.admins_of(Some(&text)) {
                Ok(a) => {
                    done.applied.push(live.admins.file_var);
                    admins = Some(a);
                }
                Err(e) => refuse(&live.admins, &e, &mut done),
            }
        }
        if vendors.is_none() && admins.is_none() {
            return done;
        }
        let next = Inner {
            vendors: vendors.map_or_else(|| current.vendors.clone(), Arc::new),
            admins: admins.map_or_else(|| current.admins.clone(), Arc::new),
            window_secs: current.window_secs,
            seen: current.seen.clone(),
        };
        tracing::info!(
            files = ?done.applied,
            vendors = next.vendors.len(),
            admin_tokens = next.admins.len(),
            "credentials reloaded"
        );
        live.current.store(Arc::new(next));
        done
    }

    /// Re-reads the credential files every `poll` (never if zero) and at once
    /// on SIGHUP, until `stop` turns true. The signal handler is installed
    /// before this returns, so a SIGHUP right after start-up cannot end the
    /// process.
    pub fn watch(
        &self,
        poll: Duration,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> std::io::Result<impl std::future::Future<Output = ()> + Send + 'static> {
        let auth = self.clone();
        #[cfg(unix)]
        let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        Ok(async move {
            if !auth.is_enabled() {
                let _ = stop.changed().await;
                return;
            }
            let mut tick = (!poll.is_zero()).then(|| {
                let mut t = tokio::time::interval(poll);
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                t
            });
            loop {
                #[cfg(unix)]
                let hup = hangup.recv();
                #[cfg(not(unix))]
                let hup = std::future::pending::<Option<()>>();
                let polled = async {
                    match tick.as_mut() {
                        Some(t) => {
                            t.tick().await;
                        }
                        None => std::future::pending::<()>().await,
                    }
                };
                let wait = tokio::select! {
                    _ = stop.changed() => return,
                    _ = polled => Wait::UntilSettled,
                    _ = hup => {
                        tracing::info!("SIGHUP: re-reading the credential files");
                        Wait::No
                    }
                };
                let auth = auth.clone();
                // File reads are blocking; they are small and rare.
                let _ = tokio::task::spawn_blocking(move || auth.reread(wait)).await;
            }
        })
    }
}

/// The file's content if it differs from what was last applied or refused
/// (and, when `wait` says so, was read the same at the previous poll).
fn changed(src: &Source, state: &mut FileState, wait: Wait, done: &mut Reloaded) -> Option<String> {
    let path = src.file.as_deref()?;
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) => {
            // A mounted secret is replaced by swapping a link: a read can miss
            // it for a moment, so only a lasting or new failure is worth a line.
            let why = e.to_string();
            if state.unreadable.as_deref() != Some(why.as_str()) {
                tracing::error!(
                    variable = src.file_var,
                    path = %path.display(),
                    error = %why,
                    "new credentials refused; keeping the ones in use (cannot read the file)"
                );
                done.refused.push(src.file_var);
                state.unreadable = Some(why);
            }
            return None;
        }
    };
    state.unreadable = None;
    let hash: [u8; 32] = Sha256::digest(&bytes).into();
    if state.seen == Some(hash) {
        state.settling = None;
        state.unsettled_polls = 0;
        return None;
    }
    if wait == Wait::UntilSettled && state.settling != Some(hash) {
        tracing::debug!(
            variable = src.file_var,
            "credential file changed; applying it at the next poll if it stays the same"
        );
        state.settling = Some(hash);
        state.unsettled_polls += 1;
        if state.unsettled_polls == UNSETTLED_POLLS_REPORTED {
            tracing::warn!(
                variable = src.file_var,
                path = %path.display(),
                polls = state.unsettled_polls,
                "credential file keeps changing between polls; not applied; \
                 send SIGHUP once it is complete to apply it at once"
            );
            done.unsettled.push(src.file_var);
        }
        done.settling.push(src.file_var);
        return None;
    }
    state.settling = None;
    state.unsettled_polls = 0;
    state.seen = Some(hash);
    match String::from_utf8(bytes) {
        // An emptied file is far more often a write in progress (`> file`
        // before the writer has its content) than a wish to revoke every
        // credential: refuse it; revoking all is done by a file of comments.
        Ok(text) if text.trim().is_empty() => {
            refuse(
                src,
                &ConfigError::new(
                    src.file_var,
                    "the file is empty (to revoke every credential, leave a comment line in it)",
                ),
                done,
            );
            None
        }
        Ok(text) => Some(text),
        Err(_) => {
            refuse(
                src,
                &ConfigError::new(src.file_var, "the file is not UTF-8"),
                done,
            );
            None
        }
    }
}

fn refuse(src: &Source, e: &ConfigError, done: &mut Reloaded) {
    tracing::error!(
        variable = src.file_var,
        path = %src.file.as_deref().map(Path::display).map(|d| d.to_string()).unwrap_or_default(),
        error = %e,
        "new credentials refused; keeping the ones in use"
    );
    done.refused.push(src.file_var);
}

/// A Standard Webhooks request that passed the checks possible before the
/// body is read.
struct WebhookParts<'a> {
    id: &'a str,
    ts: i64,
    /// The `v1` signatures presented (others, like `v1a`, are skipped).
    sigs: Vec<[u8; 32]>,
}

fn webhook_parts<'a>(
    inner: &Inner,
    s: &Signed<'a>,
    now: i64,
) -> Result<WebhookParts<'a>, AuthFailure> {
    let id = s.webhook_id.unwrap_or("");
    if id.is_empty() || id.len() > 256 || !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(AuthFailure::BadWebhookId);
    }
    let signs = inner
        .vendors
        .iter()
        .any(|v| matches!(&v.scheme, Scheme::Hmac { webhooks, .. } if !webhooks.is_empty()));
    if !signs {
        return Err(AuthFailure::UnknownVendor);
    }
    // Like the reference libraries: entries of other versions (`v1a`) and
    // entries that do not decode are skipped; one good `v1` is enough.
    let sigs: Vec<[u8; 32]> = s
        .signature
        .split_ascii_whitespace()
        .take(16)
        .filter_map(|entry| entry.strip_prefix("v1,"))
        .filter_map(|encoded| BASE64.decode(encoded).ok()?.try_into().ok())
        .collect();
    if sigs.is_empty() {
        return Err(AuthFailure::MalformedWebhookSignature);
    }
    let ts_text = s.timestamp.trim();
    if ts_text.is_empty() || ts_text.len() > 12 || !ts_text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(AuthFailure::BadTimestamp);
    }
    let ts: i64 = ts_text.parse().map_err(|_| AuthFailure::BadTimestamp)?;
    if (now - ts).abs() > inner.window_secs {
        return Err(AuthFailure::StaleTimestamp);
    }
    Ok(WebhookParts { id, ts, sigs })
}

/// Verifies a Standard Webhooks signature over `id + "." + timestamp + "." +
/// content` against every vendor's `whsec` secrets; the one that matches
/// names the vendor. Each attempt (webhook-id and timestamp) is accepted
/// once: a replayed request is refused, while a sender's retry of the same
/// event (same id, new timestamp and signature) is let through and answered
/// by ingest as the transaction it already is.
fn verify_webhook(
    inner: &Inner,
    s: &Signed<'_>,
    content: &[u8],
    now: i64,
    from: Option<IpAddr>,
) -> Result<(Principal, ReplayKey), AuthFailure> {
    let WebhookParts { id, ts, sigs } = webhook_parts(inner, s, now)?;
    let prefix = format!("{id}.{ts}.");
    let mut found: Option<&str> = None;
    // Every secret is tried, so timing does not tell which vendor matched.
    for v in inner.vendors.iter() {
        let Scheme::Hmac { webhooks, .. } = &v.scheme else {
            continue;
        };
        for secret in webhooks {
            let mut mac = keyed(secret.expose_secret())?;
            mac.update(prefix.as_bytes());
            mac.update(content);
            let expected: [u8; 32] = mac.finalize().into_bytes().into();
            let hit = sigs
                .iter()
                .fold(false, |acc, sig| acc | bool::from(expected.ct_eq(sig)));
            if hit && found.is_none() {
                found = Some(&v.name);
            }
        }
    }
    let vendor = found.ok_or(AuthFailure::BadSignature)?;
    let attempt: [u8; 32] = Sha256::digest(format!("webhook\0{vendor}\0{id}\0{ts}")).into();
    let vouches = inner
        .seen
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(attempt, ts + inner.window_secs, now, from)
        .ok_or(AuthFailure::ReusedSignature)?;
    let vouches = vouches.then(|| inner.fingerprint_of(vendor)).flatten();
    Ok((
        Principal::Vendor(vendor.to_owned()),
        ReplayKey {
            sig: attempt,
            vouches,
        },
    ))
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
    /// Each signature, and whether it may be used once more, from which
    /// client address ([`ReplayCache::release`]).
    seen: HashMap<[u8; 32], Use>,
    /// Insertion order with each entry's expiry (its timestamp + window).
    order: VecDeque<([u8; 32], i64)>,
    capacity: usize,
}

impl ReplayCache {
    fn new(capacity: usize) -> ReplayCache {
        ReplayCache {
            seen: HashMap::new(),
            order: VecDeque::new(),
            capacity,
        }
    }

    /// Remembers `sig` (used from `from`) until `expires`. `None` if it was
    /// already remembered and not released for one more use; otherwise
    /// whether this use may vouch for `from` (not when it is a released
    /// signature used from another address than its first).
    fn insert(
        &mut self,
        sig: [u8; 32],
        expires: i64,
        now: i64,
        from: Option<IpAddr>,
    ) -> Option<bool> {
        while let Some((old, exp)) = self.order.front().copied() {
            if exp >= now {
                break;
            }
            self.order.pop_front();
            self.seen.remove(&old);
        }
        if let Some(use_) = self.seen.get_mut(&sig) {
            return match *use_ {
                Use::RetryFrom(first) => {
                    *use_ = Use::Used(first);
                    Some(first == from)
                }
                Use::Used(_) => None,
            };
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
        self.seen.insert(sig, Use::Used(from));
        self.order.push_back((sig, expires));
        Some(true)
    }

    /// Lets `sig` be used once more (it keeps its expiry); that use vouches
    /// only if it comes from the address `sig` was *first* used from — a
    /// copy replayed from elsewhere and refused in turn does not make its
    /// own address the first.
    fn release(&mut self, sig: &[u8; 32]) {
        if let Some(use_) = self.seen.get_mut(sig) {
            *use_ = match *use_ {
                Use::Used(first) | Use::RetryFrom(first) => Use::RetryFrom(first),
            };
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Use {
    /// Used; first from this address.
    Used(Option<IpAddr>),
    /// Its last request was refused without effect: the sender's retry is
    /// not a replay (and vouches only from this, the first address).
    RetryFrom(Option<IpAddr>),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(vendors: &str, admins: &str) -> Auth {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("vendor-keys");
        std::fs::write(&file, vendors).unwrap();
        let settings = Settings {
            vendor_keys_file: Some(file),
            admin_tokens: (!admins.is_empty()).then(|| Secret::from(admins)),
            ..Settings::default()
        };
        Auth::from_settings(&settings).unwrap()
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
            let sig = sign(secret.as_bytes(), now, body).unwrap();
            let s = Signed {
                vendor: "globex",
                timestamp: &now.to_string(),
                signature: &sig,
                webhook_id: None,
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
        let sig = sign(b"old-secret-0123456789", now, body).unwrap();
        let ts = now.to_string();
        let s = |vendor, timestamp, signature| Signed {
            vendor,
            timestamp,
            signature,
            webhook_id: None,
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
        assert!(c.insert([1; 32], 100, 0, None).is_some());
        assert!(c.insert([1; 32], 100, 50, None).is_none());
        // Expired entries are dropped first.
        assert!(c.insert([1; 32], 300, 101, None).is_some());
        assert!(c.insert([2; 32], 300, 101, None).is_some());
        assert!(c.insert([3; 32], 300, 101, None).is_some());
        assert_eq!(c.order.len(), 2, "capacity holds");
        assert!(c.insert([3; 32], 300, 102, None).is_none());
    }

    #[test]
    fn a_released_signature_is_accepted_once_more_and_vouches_only_from_its_address() {
        let mut c = ReplayCache::new(10);
        let vendor = Some(IpAddr::from([10, 0, 0, 1]));
        let other = Some(IpAddr::from([10, 0, 0, 2]));
        assert_eq!(c.insert([1; 32], 100, 0, vendor), Some(true));
        c.release(&[1; 32]);
        assert_eq!(
            c.insert([1; 32], 100, 2, vendor),
            Some(true),
            "the vendor's retry"
        );
        assert_eq!(c.insert([1; 32], 100, 3, vendor), None, "used again");
        c.release(&[1; 32]);
        assert_eq!(
            c.insert([1; 32], 100, 4, other),
            Some(false),
            "from another address: accepted, vouching for nothing"
        );
        assert_eq!(c.insert([1; 32], 100, 5, vendor), None, "used again");
        // The copy from elsewhere refused in turn: its next use still
        // vouches for nothing (a reviewer laundered a vouch this way).
        c.release(&[1; 32]);
        assert_eq!(c.insert([1; 32], 100, 6, other), Some(false));
        // Released and then expired: gone, like any entry.
        c.release(&[1; 32]);
        assert_eq!(c.insert([1; 32], 300, 101, other), Some(true));
    }

    #[test]
    fn a_vendors_fingerprint_changes_with_its_own_credentials_only() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("vendor-keys");
        let secret = "0123456789abcdef0123456789abcdef";
        let acme = format!("acme:hmac:{secret}\n");
        let globex = format!("globex:sha256:{}\n", hash_secret("g1"));
        std::fs::write(&keys, format!("{acme}{globex}")).unwrap();
        let a = Auth::from_settings(&Settings {
            vendor_keys_file: Some(keys.clone()),
            ..Settings::default()
        })
        .unwrap();
        let acme_before = a.vendor_fingerprint("acme").unwrap();
        let globex_before = a.vendor_fingerprint("globex").unwrap();
        assert_ne!(acme_before, globex_before);
        // A comment and another vendor's new key: acme's vouches stay.
        let globex2 = format!("globex:sha256:{}\n", hash_secret("g2"));
        std::fs::write(&keys, format!("# rotated globex\n{acme}{globex2}")).unwrap();
        assert_eq!(a.reload().applied, vec!["RTPD_VENDOR_KEYS_FILE"]);
        assert_eq!(a.vendor_fingerprint("acme"), Some(acme_before));
        assert_ne!(a.vendor_fingerprint("globex"), Some(globex_before));
        // acme removed: its vouches end.
        std::fs::write(&keys, &globex2).unwrap();
        assert_eq!(a.reload().applied, vec!["RTPD_VENDOR_KEYS_FILE"]);
        assert_eq!(a.vendor_fingerprint("acme"), None);
    }

    #[test]
    fn a_changed_file_is_applied_whole_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("vendor-keys");
        let tokens = dir.path().join("admin-tokens");
        let line = |name: &str, key: &str| format!("{name}:sha256:{}\n", hash_secret(key));
        std::fs::write(&keys, line("acme", "k1")).unwrap();
        std::fs::write(&tokens, line("ops", "t1")).unwrap();
        let a = Auth::from_settings(&Settings {
            vendor_keys_file: Some(keys.clone()),
            admin_tokens_file: Some(tokens.clone()),
            ..Settings::default()
        })
        .unwrap();
        let clone = a.clone();
        assert_eq!(a.reload(), Reloaded::default(), "nothing changed");

        std::fs::write(&keys, line("acme", "k2")).unwrap();
        assert_eq!(a.reload().applied, vec!["RTPD_VENDOR_KEYS_FILE"]);
        assert_eq!(
            clone.vendor(Some("k2")),
            Some(Principal::Vendor("acme".into())),
            "every clone sees the reload"
        );
        assert_eq!(clone.vendor(Some("k1")), None);

        // A bad line anywhere refuses the whole file; the keys in use stay.
        std::fs::write(&keys, format!("{}acme:sha256:nope\n", line("acme", "k3"))).unwrap();
        assert_eq!(a.reload().refused, vec!["RTPD_VENDOR_KEYS_FILE"]);
        assert_eq!(a.vendor(Some("k3")), None);
        assert!(a.vendor(Some("k2")).is_some());
        assert_eq!(
            a.reload(),
            Reloaded::default(),
            "refused once, not on every poll"
        );
        // No vendor left: refused too. The admin file is independent.
        std::fs::write(&keys, "# empty\n").unwrap();
        std::fs::write(&tokens, line("ops", "t2")).unwrap();
        let r = a.reload();
        assert_eq!(r.refused, vec!["RTPD_VENDOR_KEYS_FILE"]);
        assert_eq!(r.applied, vec!["RTPD_ADMIN_TOKENS_FILE"]);
        assert!(a.vendor(Some("k2")).is_some());
        assert_eq!(a.admin(Some("t2")), Some(Principal::Admin("ops".into())));
        assert_eq!(a.admin(Some("t1")), None);
        // A file that disappears keeps the credentials, reported once.
        std::fs::remove_file(&keys).unwrap();
        assert_eq!(a.reload().refused, vec!["RTPD_VENDOR_KEYS_FILE"]);
        assert_eq!(a.reload(), Reloaded::default());
        assert!(a.vendor(Some("k2")).is_some());
        std::fs::write(&keys, line("acme", "k4")).unwrap();
        assert_eq!(a.reload().applied, vec!["RTPD_VENDOR_KEYS_FILE"]);
        assert!(a.vendor(Some("k4")).is_some());
    }

    #[test]
    fn a_file_caught_half_written_is_applied_only_once_it_stops_changing() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("vendor-keys");
        let line = |name: &str, key: &str| format!("{name}:sha256:{}\n", hash_secret(key));
        std::fs::write(&keys, line("acme", "a1") + &line("globex", "g1")).unwrap();
        let a = Auth::from_settings(&Settings {
            vendor_keys_file: Some(keys.clone()),
            ..Settings::default()
        })
        .unwrap();
        let vendors = |a: &Auth| {
            ["a1", "g1", "a2", "g2"]
                .into_iter()
                .filter(|k| a.vendor(Some(k)).is_some())
                .collect::<Vec<_>>()
        };
        let settling = Reloaded {
            settling: vec!["RTPD_VENDOR_KEYS_FILE"],
            ..Reloaded::default()
        };
        let whole = line("acme", "a2") + &line("globex", "g2");

        // Written in place, caught after the first line: it parses, but
        // applying it would lock globex out. The poll waits.
        std::fs::write(&keys, line("acme", "a2")).unwrap();
        assert_eq!(a.poll(), settling);
        assert_eq!(vendors(&a), ["a1", "g1"], "nothing of the partial file");
        // The writer finishes: changed again, so still waiting ...
        std::fs::write(&keys, &whole).unwrap();
        assert_eq!(a.poll(), settling);
        assert_eq!(vendors(&a), ["a1", "g1"]);
        // ... until a poll reads the same bytes again.
        assert_eq!(a.poll().applied, vec!["RTPD_VENDOR_KEYS_FILE"]);
        assert_eq!(vendors(&a), ["a2", "g2"]);
        assert_eq!(a.poll(), Reloaded::default(), "unchanged");

        // Cut inside a hash: it does not parse. While it is still being
        // written nothing is said; once it stays, it is refused once and
        // the keys in use stay.
        let cut = &whole[..whole.len() - 20];
        std::fs::write(&keys, cut).unwrap();
        assert_eq!(a.poll(), settling);
        assert_eq!(a.poll().refused, vec!["RTPD_VENDOR_KEYS_FILE"]);
        assert_eq!(a.poll(), Reloaded::default(), "refused once");
        assert_eq!(vendors(&a), ["a2", "g2"]);
        // Fixed: applied at the second poll that reads it.
        std::fs::write(&keys, line("acme", "a1") + &line("globex", "g2")).unwrap();
        assert_eq!(a.poll(), settling);
        assert_eq!(a.poll().applied, vec!["RTPD_VENDOR_KEYS_FILE"]);
        assert_eq!(vendors(&a), ["a1", "g2"]);
        // SIGHUP (reload) does not wait: the operator says the file is whole.
        std::fs::write(&keys, line("acme", "a2") + &line("globex", "g1")).unwrap();
        assert_eq!(a.reload().applied, vec!["RTPD_VENDOR_KEYS_FILE"]);
        assert_eq!(vendors(&a), ["g1", "a2"]);
    }

    #[test]
    fn a_file_that_never_settles_is_reported_once_and_sighup_applies_it() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("vendor-keys");
        let line = |name: &str, key: &str| format!("{name}:sha256:{}\n", hash_secret(key));
        std::fs::write(&keys, line("acme", "a1")).unwrap();
        let a = Auth::from_settings(&Settings {
            vendor_keys_file: Some(keys.clone()),
            ..Settings::default()
        })
        .unwrap();
        let mut reports = 0;
        for i in 0..20 {
            // Each version whole (written aside, renamed), but a new one every poll.
            let tmp = dir.path().join("tmp");
            std::fs::write(&tmp, line("acme", "a2") + &line("rot", &format!("r{i}"))).unwrap();
            std::fs::rename(&tmp, &keys).unwrap();
            let r = a.poll();
            assert!(r.applied.is_empty() && r.refused.is_empty());
            assert_eq!(r.settling, vec!["RTPD_VENDOR_KEYS_FILE"]);
            reports += r.unsettled.len();
        }
        assert_eq!(reports, 1, "reported once, not at every poll");
        assert!(a.vendor(Some("a2")).is_none());
        assert_eq!(a.reload().applied, vec!["RTPD_VENDOR_KEYS_FILE"]);
        assert!(a.vendor(Some("a2")).is_some());
    }

    #[test]
    fn an_emptied_credential_file_is_refused_and_the_old_tokens_stay() {
        let dir = tempfile::tempdir().unwrap();
        let admins = dir.path().join("admin-tokens");
        let entry = format!("ops:sha256:{}\n", hash_secret("tok-0123456789"));
        std::fs::write(&admins, &entry).unwrap();
        let a = Auth::operators(&Settings {
            admin_tokens_file: Some(admins.clone()),
            ..Settings::default()
        })
        .unwrap();
        std::fs::write(&admins, "").unwrap();
        assert_eq!(a.poll().settling, vec!["RTPD_ADMIN_TOKENS_FILE"]);
        assert_eq!(a.poll().refused, vec!["RTPD_ADMIN_TOKENS_FILE"]);
        assert!(a.admin(Some("tok-0123456789")).is_some());
        // Revoking every token on purpose: a file of comments.
        std::fs::write(&admins, "# all revoked\n").unwrap();
        assert_eq!(a.reload().applied, vec!["RTPD_ADMIN_TOKENS_FILE"]);
        assert!(a.admin(Some("tok-0123456789")).is_none());
    }

    #[test]
    fn operators_need_no_vendor_credentials() {
        let a = Auth::operators(&Settings {
            admin_tokens: Some(Secret::from(
                format!("ops:sha256:{}", hash_secret("root")).as_str(),
            )),
            ..Settings::default()
        })
        .unwrap();
        assert_eq!(a.admin(Some("root")), Some(Principal::Admin("ops".into())));
        assert_eq!(a.admin(None), None);
        assert_eq!(a.vendor(Some("root")), None);
        assert!(Auth::from_settings(&Settings::default()).is_err());
    }

    /// Produced with the `standardwebhooks` package from PyPI (1.1.0):
    /// `Webhook(SECRET).sign("msg_2KWPBgLlAfxdpx2AI54pPJ85f4W",
    /// datetime.fromtimestamp(1674087231, tz=timezone.utc), BODY)`.
    const WH_SECRET: &str = "whsec_cnRwZC1zdGFuZGFyZC13ZWJob29rcy10ZXN0LWtleSE=";
    const WH_BODY: &[u8] = br#"{"transaction_id":"WH-1","amount":"5.00"}"#;
    const WH_SIGNATURE: &str = "v1,/s55IVqVjDCOxz+2FMCn1co99TY2fwbbwZhMmi6jLcI=";

    #[test]
    fn standard_webhooks_signatures_match_the_reference_library() {
        let a = auth(
            &format!("hooli:whsec:{WH_SECRET},acme:sha256:{}", hash_secret("k")),
            "",
        );
        let ts = 1_674_087_231;
        assert_eq!(
            sign_webhook(WH_SECRET, "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W", ts, WH_BODY).as_deref(),
            Some(WH_SIGNATURE)
        );
        let w = |id, signature| Signed {
            vendor: "",
            timestamp: "1674087231",
            signature,
            webhook_id: Some(id),
        };
        let id = "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W";
        assert_eq!(a.precheck_signed(&w(id, WH_SIGNATURE), ts + 299), Ok(()));
        // Several signatures (rotation), an asymmetric one skipped, padding optional.
        let several = format!("v1,AAAA v1a,Zm9v {}", WH_SIGNATURE.trim_end_matches('='));
        assert_eq!(
            a.verify_signed(&w(id, &several), WH_BODY, ts + 1),
            Ok(Principal::Vendor("hooli".into()))
        );
        assert_eq!(
            a.verify_signed(&w(id, WH_SIGNATURE), WH_BODY, ts + 2),
            Err(AuthFailure::ReusedSignature),
            "the same attempt is accepted once"
        );
        assert_eq!(
            a.verify_signed(&w("msg_other", WH_SIGNATURE), WH_BODY, ts),
            Err(AuthFailure::BadSignature)
        );
        assert_eq!(
            a.verify_signed(&w(id, WH_SIGNATURE), b"{}", ts),
            Err(AuthFailure::BadSignature)
        );
        assert_eq!(
            a.precheck_signed(&w(id, WH_SIGNATURE), ts + 301),
            Err(AuthFailure::StaleTimestamp)
        );
        assert_eq!(
            a.precheck_signed(&w(id, "v1=abcdef"), ts),
            Err(AuthFailure::MalformedWebhookSignature)
        );
        assert_eq!(
            a.precheck_signed(&w(id, "v1a,Zm9v"), ts),
            Err(AuthFailure::MalformedWebhookSignature),
            "no v1 signature at all"
        );
        assert_eq!(
            a.precheck_signed(&w("", WH_SIGNATURE), ts),
            Err(AuthFailure::BadWebhookId)
        );
        assert_eq!(
            a.precheck_signed(&w("has space", WH_SIGNATURE), ts),
            Err(AuthFailure::BadWebhookId)
        );
        // Without any whsec vendor the scheme is not offered at all.
        let keys_only = auth(&format!("acme:sha256:{}", hash_secret("k")), "");
        assert_eq!(
            keys_only.precheck_signed(&w(id, WH_SIGNATURE), ts),
            Err(AuthFailure::UnknownVendor)
        );
    }

    #[test]
    fn webhook_secrets_come_from_the_file_are_long_enough_and_not_shared() {
        let e = parse_list(
            "RTPD_VENDOR_KEYS",
            &format!("hooli:whsec:{WH_SECRET}"),
            false,
        )
        .err()
        .unwrap();
        assert!(e.message.contains("RTPD_VENDOR_KEYS_FILE"), "{}", e.message);
        for bad in ["whsec_c2hvcnQ=", "not-whsec", "whsec_!!!"] {
            let e = parse_list("F", &format!("hooli:whsec:{bad}"), true)
                .err()
                .unwrap();
            assert!(e.message.contains("hooli"), "{}", e.message);
        }
        let shared = format!("a:whsec:{WH_SECRET},b:whsec:{WH_SECRET}");
        let e = vendors_from(parse_list("F", &shared, true).unwrap())
            .err()
            .unwrap();
        assert!(e.message.contains("same whsec secret"), "{}", e.message);
        // Both signing schemes for one vendor are fine; an API key with either is not.
        let both = format!("g:hmac:0123456789abcdef,g:whsec:{WH_SECRET}");
        assert_eq!(
            vendors_from(parse_list("F", &both, true).unwrap())
                .unwrap()
                .len(),
            1
        );
        let mixed = format!("g:sha256:{},g:whsec:{WH_SECRET}", hash_secret("k"));
        assert!(vendors_from(parse_list("F", &mixed, true).unwrap()).is_err());
    }
}
