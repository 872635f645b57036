//! The time and the chance the pipeline acts on: lease expiries, retry
//! schedules, segment keys, jitter and nonces all come from here.
//!
//! A running service reads the system clock and the thread RNG. The
//! deterministic simulation switches the whole process, once, to a virtual
//! clock (tokio's paused time, counted from a fixed start) and a seeded
//! generator, so one seed replays exactly one history. The harness runs many
//! seeds in one process, one after the other, so switching again restarts the
//! virtual clock and reseeds the generator.

use chrono::{DateTime, Utc};
use rand::{RngExt, SeedableRng, rngs::StdRng};
use std::sync::{Mutex, RwLock};

struct Simulated {
    start: DateTime<Utc>,
    origin: tokio::time::Instant,
    rng: Mutex<StdRng>,
}

static SIMULATED: RwLock<Option<Simulated>> = RwLock::new(None);

fn simulated() -> std::sync::RwLockReadGuard<'static, Option<Simulated>> {
    SIMULATED.read().unwrap_or_else(|e| e.into_inner())
}

/// Switches this process to virtual time starting at `start` (measured by
/// tokio's clock from this call on; the caller runs on a paused runtime) and
/// to an RNG seeded with `seed`. Only the simulation harness calls this; it
/// cannot be undone, but calling it again restarts the clock at `start` and
/// reseeds (one seed after another in one process; never concurrently).
/// Returns false if the process was already switched.
pub fn simulate(start: DateTime<Utc>, seed: u64) -> bool {
    let mut s = SIMULATED.write().unwrap_or_else(|e| e.into_inner());
    let first = s.is_none();
    *s = Some(Simulated {
        start,
        origin: tokio::time::Instant::now(),
        rng: Mutex::new(StdRng::seed_from_u64(seed)),
    });
    first
}

/// Whether the process runs on virtual time.
pub fn is_simulated() -> bool {
    simulated().is_some()
}

/// Now, as every decision about leases, retries and deadlines sees it.
pub fn now() -> DateTime<Utc> {
    match simulated().as_ref() {
        Some(s) => {
            let elapsed = tokio::time::Instant::now().saturating_duration_since(s.origin);
            s.start + chrono::Duration::from_std(elapsed).unwrap_or_default()
        }
        None => Utc::now(),
    }
}

/// A uniformly drawn number in `[lo, hi]`.
pub fn uniform(lo: f64, hi: f64) -> f64 {
    match simulated().as_ref() {
        Some(s) => s
            .rng
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .random_range(lo..=hi),
        None => rand::rng().random_range(lo..=hi),
    }
}

/// A fresh 32-hex-digit nonce (replays, re-drives).
pub fn nonce() -> String {
    let bits: u128 = match simulated().as_ref() {
        Some(s) => s.rng.lock().unwrap_or_else(|e| e.into_inner()).random(),
        None => rand::rng().random(),
    };
    format!("{bits:032x}")
}

/// The monotonic instant timers use: tokio's, which the simulation pauses
/// and advances with the virtual clock.
pub type Instant = tokio::time::Instant;

/// Waits `d` on the clock [`now`] reads (virtual in the simulation).
pub async fn sleep(d: std::time::Duration) {
    tokio::time::sleep(d).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_real_clock_and_chance_by_default() {
        assert!(!is_simulated());
        let before = Utc::now();
        let t = now();
        assert!(t >= before && t <= Utc::now());
        for _ in 0..100 {
            let x = uniform(0.8, 1.2);
            assert!((0.8..=1.2).contains(&x));
        }
        let (a, b) = (nonce(), nonce());
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
    }
}
