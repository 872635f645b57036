//! Rejected calls, kept for forensics under `rejected/v1` (a group-committed
//! log beside the WAL): why, who if known, how big, the body's sha256, from
//! where, when. Never the payload, and never enqueued.
//!
//! A flood of refusals must not become a flood of storage writes (on Azure
//! each flush is a PUT), so records are sampled: per source address (IPv6 by
//! /64) and reason at most [`PER_SOURCE_BURST`] at once and
//! [`PER_SOURCE_PER_MINUTE`] a minute, and at most [`TOTAL_PER_SEC`] a second
//! in all. A call left out is counted (`rtpd_rejected_calls_unrecorded`) and
//! in the `suppressed` field of the next record of its source and reason.

use crate::wal::Log;
use chrono::{DateTime, Utc};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Mutex;
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
    /// Calls of the same source and reason left out by sampling since the
    /// previous record of that source and reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suppressed: Option<u64>,
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

/// Records kept per source address and reason: at once, then per minute.
pub const PER_SOURCE_BURST: u32 = 10;
pub const PER_SOURCE_PER_MINUTE: u32 = 6;
/// Records kept per second across all sources.
pub const TOTAL_PER_SEC: u32 = 50;
/// Sources whose left-out calls are counted one by one; beyond, they are
/// only in the metric.
const MAX_COUNTED_SOURCES: usize = 10_000;

/// Where a call came from, for limits: an IPv4 address, or an IPv6 /64
/// (one host commonly holds a whole /64).
pub fn source_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut o = v6.octets();
                o[8..].fill(0);
                IpAddr::V6(o.into())
            }
        },
        v4 => v4,
    }
}

type SampleKey = (Option<IpAddr>, String);

/// Decides which refused calls are written to `rejected/v1`.
pub struct Sampler {
    per_source: DefaultKeyedRateLimiter<SampleKey>,
    total: DefaultDirectRateLimiter,
    left_out: Mutex<HashMap<SampleKey, u64>>,
}

impl Default for Sampler {
    fn default() -> Self {
        let per_minute = NonZeroU32::new(PER_SOURCE_PER_MINUTE).expect("non-zero constant");
        let burst = NonZeroU32::new(PER_SOURCE_BURST).expect("non-zero constant");
        let total = NonZeroU32::new(TOTAL_PER_SEC).expect("non-zero constant");
        Sampler {
            per_source: RateLimiter::keyed(Quota::per_minute(per_minute).allow_burst(burst)),
            total: RateLimiter::direct(Quota::per_second(total)),
            left_out: Mutex::new(HashMap::new()),
        }
    }
}

impl Sampler {
    /// The call to write, with the count of its kind left out before it;
    /// `None` when this one is left out (and counted).
    pub fn admit(&self, mut call: RejectedCall) -> Option<RejectedCall> {
        let source = call
            .remote_addr
            .as_deref()
            .and_then(|a| a.parse::<IpAddr>().ok())
            .map(source_of);
        let key = (source, call.reason.clone());
        let keep = self.per_source.check_key(&key).is_ok() && self.total.check().is_ok();
        if self.per_source.len() > MAX_COUNTED_SOURCES {
            self.per_source.retain_recent();
        }
        let mut left_out = self.left_out.lock().unwrap_or_else(|p| p.into_inner());
        if keep {
            call.suppressed = left_out.remove(&key);
            return Some(call);
        }
        crate::metrics::rejected_call_unrecorded();
        if left_out.len() < MAX_COUNTED_SOURCES || left_out.contains_key(&key) {
            *left_out.entry(key).or_default() += 1;
        }
        None
    }
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
