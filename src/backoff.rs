//! Retry delays, in one place: the transaction retry policy (exponential with
//! ±20% jitter, capped after jitter) and the plain exponential back-off that
//! every reconnect and dependency-retry loop uses.
//!
//! Written out rather than taken from `backon`/`backoff`: those add jitter on
//! top of the delay (0..delay), while the seed asks for a symmetric ±20% band
//! whose cap still holds after jitter. The whole policy is the function below.

use std::time::Duration;

#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub base: Duration,
    pub max: Duration,
    /// Retries after the first attempt before dead-lettering.
    pub max_retries: u32,
}

/// Jitter band: the delay is scaled by a factor in `[1 - JITTER, 1 + JITTER]`.
pub const JITTER: f64 = 0.2;

impl RetryPolicy {
    /// Delay before retry number `retry` (1-based): `base * 2^(retry-1)`,
    /// jittered, never above `max`.
    pub fn delay(&self, retry: u32) -> Duration {
        let factor = crate::clock::uniform(1.0 - JITTER, 1.0 + JITTER);
        self.delay_with(retry, factor)
    }

    fn delay_with(&self, retry: u32, factor: f64) -> Duration {
        let exp = 2f64.powi(retry.saturating_sub(1).min(62) as i32);
        let secs = (self.base.as_secs_f64() * exp * factor).min(self.max.as_secs_f64());
        Duration::from_secs_f64(secs.max(0.0))
    }

    /// Whether attempt number `attempt` (1 = first call) may be followed by another.
    pub fn may_retry_after(&self, attempt: u32) -> bool {
        attempt <= self.max_retries
    }
}

/// `base · 2^n`, never above `max`.
pub fn exponential(base: Duration, max: Duration, n: u32) -> Duration {
    base.saturating_mul(1u32 << n.min(31)).min(max)
}

/// Back-off for a loop that retries a dependency: each failure doubles the
/// wait up to `max`; a success starts over.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Backoff {
        Backoff {
            base,
            max,
            failures: 0,
        }
    }

    /// The wait after one more failure.
    pub fn next_delay(&mut self) -> Duration {
        let d = exponential(self.base, self.max, self.failures);
        self.failures = self.failures.saturating_add(1);
        d
    }

    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// Failures since the last success.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

/// How long one call of a recovery pass (the reconciler's, a ledger
/// rebuild's, the processor's journal reads) is tried again while its
/// dependency is unavailable (a restart, a pause, a 500) before the caller
/// gives up. Under faults every few seconds a pass that started over on
/// each error would never finish: the ledger rebuild, which ingest waits
/// for, least of all. With [`MIN_TRIES`] and a store whose calls time out
/// (Azure's 30 s) one call can wait longer than a reconciler lease; a pass
/// that loses its lease ends (`LeaseHeld`) and a rebuild's token keeps a
/// second rebuild's mark apart.
pub const DEPENDENCY_PATIENCE: Duration = Duration::from_secs(15);

/// Tries of a call [`Patience`] makes before the clock may end them.
pub const MIN_TRIES: u32 = 5;

/// An error that a dependency may not give again: it was unavailable.
pub trait Transient: std::fmt::Display {
    fn transient(&self) -> bool;
}

/// Tries a call again after a transient error, with back-off (100 ms
/// doubling to 2 s), for up to [`DEPENDENCY_PATIENCE`] (or what
/// [`Patience::lasting`] says) from its first failure.
pub struct Patience {
    since: Option<tokio::time::Instant>,
    backoff: Backoff,
    lasting: Duration,
}

impl Default for Patience {
    fn default() -> Patience {
        Patience::new()
    }
}

impl Patience {
    pub fn new() -> Patience {
        Patience::lasting(DEPENDENCY_PATIENCE)
    }

    /// Patience that tries again for up to `lasting` from the first failure.
    pub fn lasting(lasting: Duration) -> Patience {
        Patience {
            since: None,
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(2)),
            lasting,
        }
    }

    /// Whether to try again after `e` (having waited a little). At least
    /// [`MIN_TRIES`] tries whatever the clock says: a read polled late (read
    /// ahead while its caller was busy) must not be given up after two.
    pub async fn again(&mut self, what: &'static str, e: &impl Transient) -> bool {
        let since = *self.since.get_or_insert_with(tokio::time::Instant::now);
        let wait = self.backoff.next_delay();
        if !e.transient()
            || (self.backoff.failures() >= MIN_TRIES && since.elapsed() + wait > self.lasting)
        {
            return false;
        }
        tracing::debug!(error = %e, what, "dependency unavailable; trying again");
        tokio::time::sleep(wait).await;
        true
    }
}

/// `f()`, tried again while it fails transiently ([`Patience`]). Only for
/// reads and conditional writes: a call that took effect before it failed
/// is harmless to make again.
pub async fn patiently<T, E: Transient, Fut: std::future::Future<Output = Result<T, E>>>(
    what: &'static str,
    f: impl FnMut() -> Fut,
) -> Result<T, E> {
    patiently_for(what, DEPENDENCY_PATIENCE, f).await
}

/// [`patiently`], trying again for up to `lasting` instead.
pub async fn patiently_for<T, E: Transient, Fut: std::future::Future<Output = Result<T, E>>>(
    what: &'static str,
    lasting: Duration,
    mut f: impl FnMut() -> Fut,
) -> Result<T, E> {
    let mut p = Patience::lasting(lasting);
    loop {
        match f().await {
            Err(e) if p.again(what, &e).await => {}
            r => return r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed() -> RetryPolicy {
        RetryPolicy {
            base: Duration::from_secs(60),
            max: Duration::from_secs(3600),
            max_retries: 5,
        }
    }

    #[test]
    fn follows_the_seed_schedule_within_jitter() {
        let p = seed();
        for (retry, nominal) in [(1, 60.0), (2, 120.0), (3, 240.0), (4, 480.0), (5, 960.0)] {
            for _ in 0..200 {
                let d = p.delay(retry).as_secs_f64();
                assert!(
                    d >= nominal * 0.8 - 1e-9 && d <= nominal * 1.2 + 1e-9,
                    "retry {retry}: {d}"
                );
            }
        }
    }

    #[test]
    fn cap_holds_after_jitter() {
        let p = seed();
        // 60 * 2^6 = 3840 > 3600: with +20% jitter it would be 4608 uncapped.
        assert_eq!(p.delay_with(7, 1.2), Duration::from_secs(3600));
        assert_eq!(p.delay_with(40, 1.2), Duration::from_secs(3600));
        for _ in 0..500 {
            assert!(p.delay(6) <= Duration::from_secs(3600));
        }
        // Below the cap the jitter band is visible at both ends.
        assert_eq!(p.delay_with(1, 0.8), Duration::from_secs(48));
        assert_eq!(p.delay_with(1, 1.2), Duration::from_secs(72));
    }

    #[test]
    fn retries_are_counted_after_the_first_attempt() {
        let p = seed();
        assert!(p.may_retry_after(1));
        assert!(p.may_retry_after(5));
        assert!(!p.may_retry_after(6));
    }

    #[test]
    fn back_off_doubles_up_to_its_cap_and_starts_over() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(500));
        let waits: Vec<u128> = (0..5).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(waits, [100, 200, 400, 500, 500]);
        assert_eq!(b.failures(), 5);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(100));
        assert_eq!(
            exponential(Duration::from_secs(1), Duration::from_secs(60), 40),
            Duration::from_secs(60)
        );
    }
}
