//! Shared Access Signature check for `$cbs` put-token, per the documented
//! algorithm: HMAC-SHA256 over `<url-encoded resource>\n<expiry>`, base64.

use base64::Engine;
use hmac::{Hmac, Mac};
use percent_encoding::percent_decode_str;
use sha2::Sha256;

use crate::BrokerConfig;

pub fn valid(config: &BrokerConfig, token: &str) -> bool {
    let Some(key) = &config.sas_key else {
        return true;
    };
    let Some(fields) = token.strip_prefix("SharedAccessSignature ") else {
        return false;
    };
    let (mut sr, mut sig, mut se) = (None, None, None);
    for pair in fields.split('&') {
        match pair.split_once('=') {
            Some(("sr", v)) => sr = Some(v),
            Some(("sig", v)) => sig = Some(v),
            Some(("se", v)) => se = Some(v),
            _ => {}
        }
    }
    let (Some(sr), Some(sig), Some(se)) = (sr, sig, se) else {
        return false;
    };
    let Ok(expiry) = se.parse::<i64>() else {
        return false;
    };
    if expiry * 1000 < crate::store::now_ms() {
        return false;
    }
    let Ok(signature) = percent_decode_str(sig).decode_utf8() else {
        return false;
    };
    let Ok(signature) = base64::engine::general_purpose::STANDARD.decode(signature.as_bytes())
    else {
        return false;
    };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key.as_bytes()) else {
        return false;
    };
    mac.update(format!("{sr}\n{se}").as_bytes());
    mac.verify_slice(&signature).is_ok()
}
