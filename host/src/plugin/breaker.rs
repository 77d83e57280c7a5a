//! The crash-loop breaker of one plugin version.
//!
//! After `quarantine_after_failures` consecutive failures the plugin is
//! quarantined: its `on_error` outcome applies without calling it, for a
//! backoff that doubles with each quarantine up to a cap. The first call
//! after a quarantine is a trial: a failure quarantines it again, a success
//! closes the breaker. A trial older than twice the call deadline was
//! abandoned (its request went away), so another may start.
//!
//! All state is atomics: asking the breaker takes no lock.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// When the breaker trips and for how long.
#[derive(Debug, Clone, Copy)]
pub struct BreakerLimits {
    pub quarantine_after_failures: u32,
    pub quarantine_initial: Duration,
    pub quarantine_max: Duration,
}

/// What [`Breaker::failed`] did.
pub struct Tripped {
    pub consecutive_failures: u32,
    pub backoff: Duration,
}

#[derive(Debug)]
pub struct Breaker {
    limits: BreakerLimits,
    consecutive_failures: AtomicU32,
    /// Quarantines since the last success: the backoff doubles with each.
    backoff_level: AtomicU32,
    /// Milliseconds after `born` until which calls are refused (0: none).
    quarantined_until_ms: AtomicU64,
    /// When (ms after `born`, +1) the trial call after a quarantine started;
    /// 0: none under way.
    trial_started_ms: AtomicU64,
    quarantines: AtomicU64,
    born: Instant,
}

impl Breaker {
    pub fn new(limits: BreakerLimits) -> Breaker {
        Breaker {
            limits,
            consecutive_failures: AtomicU32::new(0),
            backoff_level: AtomicU32::new(0),
            quarantined_until_ms: AtomicU64::new(0),
            trial_started_ms: AtomicU64::new(0),
            quarantines: AtomicU64::new(0),
            born: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.born.elapsed().as_millis() as u64
    }

    /// Whether a call may run now: always when closed; after a quarantine's
    /// backoff, one trial call at a time (`call_timeout` tells an abandoned
    /// trial from one under way).
    pub fn admit(&self, call_timeout: Duration) -> bool {
        let until = self.quarantined_until_ms.load(Ordering::Relaxed);
        if until == 0 {
            return true;
        }
        let now = self.now_ms();
        let started = self.trial_started_ms.load(Ordering::Acquire);
        let abandoned = started != 0 && now + 1 > started + call_timeout.as_millis() as u64 * 2;
        now >= until
            && (started == 0 || abandoned)
            && self.trial_started_ms.compare_exchange(started, now + 1, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }

    /// A call succeeded; returns `true` if that ended a quarantine.
    pub fn succeeded(&self) -> bool {
        self.consecutive_failures.store(0, Ordering::Relaxed);
        if self.backoff_level.swap(0, Ordering::Relaxed) == 0 {
            return false;
        }
        self.quarantined_until_ms.store(0, Ordering::Relaxed);
        self.trial_started_ms.store(0, Ordering::Release);
        true
    }

    /// A call failed; returns what the breaker did if it tripped.
    pub fn failed(&self) -> Option<Tripped> {
        let limits = &self.limits;
        let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < limits.quarantine_after_failures {
            return None;
        }
        let level = self.backoff_level.fetch_add(1, Ordering::Relaxed).min(20);
        let backoff = limits.quarantine_initial.saturating_mul(1 << level).min(limits.quarantine_max);
        self.quarantined_until_ms.store(self.now_ms() + backoff.as_millis() as u64, Ordering::Relaxed);
        // After the quarantine one more failure is enough to re-trip.
        self.consecutive_failures.store(limits.quarantine_after_failures.saturating_sub(1), Ordering::Relaxed);
        self.quarantines.fetch_add(1, Ordering::Relaxed);
        self.trial_started_ms.store(0, Ordering::Release);
        Some(Tripped { consecutive_failures: failures, backoff })
    }

    /// Whether calls are refused right now.
    pub fn is_open(&self) -> bool {
        self.now_ms() < self.quarantined_until_ms.load(Ordering::Relaxed)
    }

    /// Times the breaker tripped.
    pub fn quarantines(&self) -> u64 {
        self.quarantines.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> Breaker {
        Breaker::new(BreakerLimits {
            quarantine_after_failures: 3,
            quarantine_initial: Duration::from_millis(40),
            quarantine_max: Duration::from_millis(100),
        })
    }

    #[test]
    fn trips_after_consecutive_failures_and_doubles_to_its_cap() {
        let b = breaker();
        assert!(b.failed().is_none() && b.failed().is_none());
        assert!(!b.succeeded(), "a success before tripping ends no quarantine");
        assert!(b.failed().is_none() && b.failed().is_none());
        let first = b.failed().expect("third consecutive failure trips");
        assert_eq!(first.backoff, Duration::from_millis(40));
        assert!(b.is_open() && !b.admit(Duration::from_millis(10)));
        // One more failure re-trips, with the backoff doubled, then capped.
        assert_eq!(b.failed().expect("re-trips").backoff, Duration::from_millis(80));
        assert_eq!(b.failed().expect("re-trips").backoff, Duration::from_millis(100));
        assert_eq!(b.quarantines(), 3);
        assert!(b.succeeded(), "a success closes the breaker");
        assert!(!b.is_open() && b.admit(Duration::from_millis(10)));
    }

    #[test]
    fn one_trial_call_at_a_time_after_the_backoff() {
        let b = breaker();
        for _ in 0..3 {
            b.failed();
        }
        std::thread::sleep(Duration::from_millis(45));
        let timeout = Duration::from_secs(10);
        assert!(b.admit(timeout), "the trial");
        assert!(!b.admit(timeout), "no second call while the trial runs");
    }
}
