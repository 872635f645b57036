//! Console sessions: made by a login with an admin token, kept in this
//! process's memory. The browser holds only a random session id (an
//! HttpOnly, SameSite=Strict cookie on `/console`); the token stays here and
//! is checked again on every request, so a token removed from the admin
//! tokens ends its sessions at once. Each session has its own CSRF token.

use rand::RngExt;
use secrecy::{ExposeSecret, SecretString};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;

/// The session cookie's name.
pub const COOKIE: &str = "rtpd_console";

/// How long a session lasts from its login, used or not.
pub const LIFETIME: Duration = Duration::from_secs(8 * 3600);

/// Sessions at once in one process; a login beyond it is refused (503)
/// until one ends or expires.
pub const MAX_SESSIONS: usize = 1024;

struct Session {
    operator: String,
    token: SecretString,
    csrf: String,
    expires: Instant,
}

/// A live session, as a request sees it.
#[derive(Clone)]
pub struct Current {
    pub id: String,
    pub operator: String,
    pub token: SecretString,
    pub csrf: String,
}

#[derive(Default)]
pub struct Sessions {
    by_id: Mutex<HashMap<String, Session>>,
}

fn random_hex() -> String {
    let bytes: [u8; 32] = rand::rng().random();
    hex::encode(bytes)
}

impl Sessions {
    /// A new session for `operator`, logged in with `token`: its id and its
    /// CSRF token; `None` when [`MAX_SESSIONS`] are live.
    pub fn create(&self, operator: &str, token: &str) -> Option<Current> {
        let mut by_id = self.by_id.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        by_id.retain(|_, s| s.expires > now);
        if by_id.len() >= MAX_SESSIONS {
            return None;
        }
        let current = Current {
            id: random_hex(),
            operator: operator.to_owned(),
            token: SecretString::from(token.to_owned()),
            csrf: random_hex(),
        };
        by_id.insert(
            current.id.clone(),
            Session {
                operator: current.operator.clone(),
                token: current.token.clone(),
                csrf: current.csrf.clone(),
                expires: now + LIFETIME,
            },
        );
        Some(current)
    }

    /// The live session with this id.
    pub fn get(&self, id: &str) -> Option<Current> {
        let mut by_id = self.by_id.lock().unwrap_or_else(|e| e.into_inner());
        let s = by_id.get(id)?;
        if s.expires <= Instant::now() {
            by_id.remove(id);
            return None;
        }
        Some(Current {
            id: id.to_owned(),
            operator: s.operator.clone(),
            token: s.token.clone(),
            csrf: s.csrf.clone(),
        })
    }

    pub fn end(&self, id: &str) {
        self.by_id
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }
}

impl Current {
    /// Whether `given` is this session's CSRF token (compared in constant time).
    pub fn csrf_matches(&self, given: &str) -> bool {
        bool::from(self.csrf.as_bytes().ct_eq(given.as_bytes()))
    }

    pub fn token(&self) -> &str {
        self.token.expose_secret()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_have_random_ids_and_csrf_tokens_and_end() {
        let s = Sessions::default();
        let a = s.create("alice", "t1").unwrap();
        let b = s.create("alice", "t1").unwrap();
        assert_ne!(a.id, b.id);
        assert_ne!(a.csrf, b.csrf);
        assert_eq!(a.id.len(), 64);
        assert!(s.get(&a.id).unwrap().csrf_matches(&a.csrf));
        assert!(!s.get(&a.id).unwrap().csrf_matches(&b.csrf));
        assert!(!s.get(&a.id).unwrap().csrf_matches(""));
        s.end(&a.id);
        assert!(s.get(&a.id).is_none());
        assert!(s.get(&b.id).is_some());
        assert!(s.get("nope").is_none());
    }
}
