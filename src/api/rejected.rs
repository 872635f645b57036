//! Rejected calls, kept for forensics under `rejected/v1` (a group-committed
//! log beside the WAL): why, who if known, how big, the body's sha256, from
//! where, when. Never the payload, and never enqueued.

use crate::wal::Log;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// What the ingest handler learned about the body before refusing it.
#[derive(Debug, Clone, Default)]
pub struct BodySeen {
    pub size: usize,
    /// Set once the whole body was read.
    pub sha256: Option<String>,
}

/// One line of `rejected/v1`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RejectedCall {
    pub v: u32,
    pub at: DateTime<Utc>,
    pub status: u16,
    /// The error code, or the precise credential problem for a 401.
    pub reason: String,
    pub method: String,
    pub path: String,
    /// The authenticated vendor, if authentication got that far.
    pub vendor: Option<String>,
    /// `X-Rtpd-Vendor` as presented (unverified), trimmed to 64 characters.
    pub claimed_vendor: Option<String>,
    /// Body bytes read, or the declared `Content-Length` if none were.
    pub size: Option<u64>,
    pub sha256: Option<String>,
    pub remote_addr: Option<String>,
}

/// Statuses recorded. Load shedding (429, 503) is counted in metrics only, so
/// a flood does not turn into a write load; 404/405 are not calls to anything.
pub fn is_recorded(status: u16) -> bool {
    matches!(status, 400 | 401 | 403 | 408 | 409 | 411 | 413 | 415 | 431)
}

/// Keeps at most this much of a path (ids are bounded, garbage is not).
const MAX_PATH: usize = 256;

pub fn truncate(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

pub fn path_of(path: &str) -> String {
    truncate(path, MAX_PATH)
}

/// Appends the record; a failure is logged and the rejection answered anyway.
pub async fn record(rejected: &Log, call: RejectedCall) {
    let at = call.at;
    let reason = call.reason.clone();
    match tokio::time::timeout(Duration::from_secs(2), rejected.append_json(&call, at)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, %reason, "could not record a rejected call"),
        Err(_) => tracing::warn!(%reason, "recording a rejected call timed out"),
    }
}
