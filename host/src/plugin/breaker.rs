//! The crash-loop breaker of one plugin version.
//!
//! Failures are counted over a window of [`WINDOW`]. The plugin is
//! quarantined when, within one window, at least `quarantine_after_failures`
//! calls failed, they were at least half of the window's calls, and they
//! came from at least [`MIN_FAILING_CLIENTS`] client addresses: a plugin that
//! fails for everyone, not for one client. One client sending requests that
//! make the plugin fail gets the `on_error` outcome for those requests
//! only, however many it sends, while the plugin serves everyone else.
//!
//! While quarantined, the plugin's `on_error` outcome applies without
//! calling it, for a backoff that doubles with each quarantine up to a cap.
//! The first call after a quarantine is a trial: a failure quarantines it
//! again, a success closes the breaker. A trial older than twice the call
//! deadline was abandoned (its request went away), so another may start.
//!
//! Asking the breaker and counting a success take no lock; a failure takes
//! a short one, to remember which clients failed.

use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The window failures are counted over.
pub const WINDOW: Duration = Duration::from_secs(10);

/// Distinct client addresses whose calls must have failed in one window.
pub const MIN_FAILING_CLIENTS: usize = 2;

/// When the breaker trips and for how long.
#[derive(Debug, Clone, Copy)]
pub struct BreakerLimits {
    pub quarantine_after_failures: u32,
    pub quarantine_initial: Duration,
    pub quarantine_max: Duration,
}

/// What [`Breaker::failed`] did.
pub struct Tripped {
    /// Why, in words (also kept for `/status`).
    pub reason: String,
    pub backoff: Duration,
}

/// One window's counts.
#[derive(Debug, Default)]
struct Window {
    /// Milliseconds after `born` when it began.
    started_ms: u64,
    calls: u64,
    failures: u64,
    /// Up to [`MIN_FAILING_CLIENTS`] distinct addresses whose calls failed.
    failing_clients: Vec<IpAddr>,
}

#[derive(Debug)]
pub struct Breaker {
    limits: BreakerLimits,
    /// Calls in the current window (successes counted without the lock).
    calls: AtomicU64,
    window: Mutex<Window>,
    /// Quarantines since the last success: the backoff doubles with each.
    backoff_level: AtomicU32,
    /// Milliseconds after `born` until which calls are refused (0: none).
    quarantined_until_ms: AtomicU64,
    /// When (ms after `born`, +1) the trial call after a quarantine started;
    /// 0: none under way.
    trial_started_ms: AtomicU64,
    quarantines: AtomicU64,
    last_reason: Mutex<Option<String>>,
    born: Instant,
}

impl Breaker {
    pub fn new(limits: BreakerLimits) -> Breaker {
        Breaker {
            limits,
            calls: AtomicU64::new(0),
            window: Mutex::new(Window::default()),
            backoff_level: AtomicU32::new(0),
            quarantined_until_ms: AtomicU64::new(0),
            trial_started_ms: AtomicU64::new(0),
            quarantines: AtomicU64::new(0),
            last_reason: Mutex::new(None),
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
        self.calls.fetch_add(1, Ordering::Relaxed);
        if self.backoff_level.load(Ordering::Relaxed) == 0 || self.backoff_level.swap(0, Ordering::Relaxed) == 0 {
            return false;
        }
        self.quarantined_until_ms.store(0, Ordering::Relaxed);
        self.trial_started_ms.store(0, Ordering::Release);
        true
    }

    /// A call for `client` failed; returns what the breaker did if it tripped.
    pub fn failed(&self, client: IpAddr) -> Option<Tripped> {
        let now = self.now_ms();
        self.calls.fetch_add(1, Ordering::Relaxed);
        let reason = {
            let mut window = self.window.lock().unwrap_or_else(|p| p.into_inner());
            if now.saturating_sub(window.started_ms) >= WINDOW.as_millis() as u64 {
                *window = Window { started_ms: now, ..Window::default() };
                self.calls.store(1, Ordering::Relaxed);
            }
            window.calls = self.calls.load(Ordering::Relaxed);
            window.failures += 1;
            let client = client.to_canonical();
            if window.failing_clients.len() < MIN_FAILING_CLIENTS && !window.failing_clients.contains(&client) {
                window.failing_clients.push(client);
            }
            // A failed trial after a quarantine re-trips at once.
            let retrial = self.backoff_level.load(Ordering::Relaxed) > 0;
            let trips = window.failures >= u64::from(self.limits.quarantine_after_failures)
                && window.failures * 2 >= window.calls
                && window.failing_clients.len() >= MIN_FAILING_CLIENTS;
            if !retrial && !trips {
                return None;
            }
            if retrial {
                "its trial call after a quarantine failed".to_owned()
            } else {
                format!(
                    "{} of {} calls failed within {} s, from {} or more clients",
                    window.failures,
                    window.calls,
                    WINDOW.as_secs(),
                    MIN_FAILING_CLIENTS
                )
            }
        };
        let limits = &self.limits;
        let level = self.backoff_level.fetch_add(1, Ordering::Relaxed).min(20);
        let backoff = limits.quarantine_initial.saturating_mul(1 << level).min(limits.quarantine_max);
        self.quarantined_until_ms.store(now + backoff.as_millis() as u64, Ordering::Relaxed);
        self.quarantines.fetch_add(1, Ordering::Relaxed);
        self.trial_started_ms.store(0, Ordering::Release);
        *self.last_reason.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason.clone());
        Some(Tripped { reason, backoff })
    }

    /// Whether calls are refused right now.
    pub fn is_open(&self) -> bool {
        self.now_ms() < self.quarantined_until_ms.load(Ordering::Relaxed)
    }

    /// Times the breaker tripped.
    pub fn quarantines(&self) -> u64 {
        self.quarantines.load(Ordering::Relaxed)
    }

    /// Why it last tripped.
    pub fn last_reason(&self) -> Option<String> {
        self.last_reason.lock().unwrap_or_else(|p| p.into_inner()).clone()
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

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 2));

    #[test]
    fn trips_on_a_failure_rate_from_several_clients_and_doubles_to_its_cap() {
        let b = breaker();
        assert!(b.failed(A).is_none() && b.failed(B).is_none());
        let first = b.failed(A).expect("three failures, all the calls, from two clients");
        assert_eq!(first.backoff, Duration::from_millis(40));
        assert_eq!(first.reason, "3 of 3 calls failed within 10 s, from 2 or more clients");
        assert!(b.is_open() && !b.admit(Duration::from_millis(10)));
        // A failed trial re-trips, with the backoff doubled, then capped.
        assert_eq!(b.failed(A).expect("re-trips").backoff, Duration::from_millis(80));
        assert_eq!(b.failed(A).expect("re-trips").backoff, Duration::from_millis(100));
        assert_eq!(b.quarantines(), 3);
        assert_eq!(b.last_reason().as_deref(), Some("its trial call after a quarantine failed"));
        assert!(b.succeeded(), "a success closes the breaker");
        assert!(!b.is_open() && b.admit(Duration::from_millis(10)));
    }

    #[test]
    fn one_client_alone_never_trips_it() {
        let b = breaker();
        for _ in 0..1000 {
            assert!(b.failed(A).is_none(), "failures from one client only");
        }
        assert_eq!(b.quarantines(), 0);
    }

    #[test]
    fn failures_among_many_successes_do_not_trip_it() {
        let b = breaker();
        for _ in 0..100 {
            b.succeeded();
        }
        b.failed(A);
        for _ in 0..20 {
            b.succeeded();
        }
        for client in [A, B, A, B] {
            assert!(b.failed(client).is_none(), "5 failures of 25 calls in the window");
        }
    }

    #[test]
    fn one_trial_call_at_a_time_after_the_backoff() {
        let b = breaker();
        for client in [A, B, A] {
            b.failed(client);
        }
        std::thread::sleep(Duration::from_millis(45));
        let timeout = Duration::from_secs(10);
        assert!(b.admit(timeout), "the trial");
        assert!(!b.admit(timeout), "no second call while the trial runs");
    }
}
