//! Shared Access Signatures, per the documented algorithm: HMAC-SHA256 over
//! `<url-encoded resource>\n<expiry>`, base64, in
//! `SharedAccessSignature sr=..&sig=..&se=..&skn=..`.

use base64::Engine;
use hmac::{Hmac, Mac};
use percent_encoding::percent_decode_str;
use sha2::Sha256;

#[derive(Debug, Clone)]
pub struct SasFields {
    /// `sr` as sent (URL-encoded), which is what was signed.
    pub resource_raw: String,
    /// `sr` decoded.
    pub resource: String,
    pub signature: String,
    pub expiry: i64,
    pub key_name: String,
}

pub fn parse(token: &str) -> Option<SasFields> {
    let fields = token.strip_prefix("SharedAccessSignature ")?;
    let (mut sr, mut sig, mut se, mut skn) = (None, None, None, None);
    for pair in fields.split('&') {
        match pair.split_once('=') {
            Some(("sr", v)) => sr = Some(v),
            Some(("sig", v)) => sig = Some(v),
            Some(("se", v)) => se = Some(v),
            Some(("skn", v)) => skn = Some(v),
            _ => {}
        }
    }
    let sr = sr?;
    Some(SasFields {
        resource_raw: sr.to_string(),
        resource: percent_decode_str(sr).decode_utf8_lossy().into_owned(),
        signature: percent_decode_str(sig?).decode_utf8().ok()?.into_owned(),
        expiry: se?.parse().ok()?,
        key_name: percent_decode_str(skn?).decode_utf8().ok()?.into_owned(),
    })
}

pub fn signature_valid(f: &SasFields, key: &str) -> bool {
    let Ok(signature) = base64::engine::general_purpose::STANDARD.decode(f.signature.as_bytes())
    else {
        return false;
    };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key.as_bytes()) else {
        return false;
    };
    mac.update(format!("{}\n{}", f.resource_raw, f.expiry).as_bytes());
    mac.verify_slice(&signature).is_ok()
}
