//! Graceful shutdown. On SIGTERM or SIGINT the gateway stops accepting, lets
//! requests in flight finish, and ends every WebSocket with a Close 1001 —
//! each at its own random moment in the `drain_s` window, so a fleet of
//! clients does not reconnect in one storm. What is left after the window
//! (plus the close grace) is cut, and the process exits 0. A second signal
//! exits at once.

use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use atomic_waker::AtomicWaker;
use tokio::sync::watch;

/// Why the gateway closes a WebSocket from outside its relay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopCause {
    /// The gateway is shutting down.
    Shutdown,
    /// A reload removed the WebSocket's server or listener.
    Removed,
    /// Its server turned unhealthy in a pool that closes such WebSockets.
    ServerUnhealthy,
}

/// One WebSocket's stop signal: set by the first of its sources to fire
/// (shutdown, its server or listener removed, its server ejected), with the
/// cause and the moment to close; the relay polls it and keeps the moment
/// on its own timer. 32 bytes (one word for the cause and moment, and the
/// waker), where a future per source would hold a channel wait and a timer
/// each for the WebSocket's whole life.
#[derive(Debug)]
pub struct Stop {
    /// 0 until fired; then the cause (1 to 3) in the top two bits and the
    /// moment in nanoseconds since [`epoch`] below them.
    when: AtomicU64,
    waker: AtomicWaker,
}

impl Default for Stop {
    /// Fixes the epoch, if this is the first: every moment a stop is fired
    /// with is taken after the stop exists, so none is before the epoch.
    fn default() -> Stop {
        epoch();
        Stop { when: AtomicU64::new(0), waker: AtomicWaker::new() }
    }
}

/// The instant stop moments are counted from: the first stop's making.
fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

const MOMENT_BITS: u32 = 62;

fn encode(cause: StopCause, at: Instant) -> u64 {
    let code = match cause {
        StopCause::Shutdown => 1,
        StopCause::Removed => 2,
        StopCause::ServerUnhealthy => 3,
    };
    // 2^62 ns is 146 years: a moment past that is kept at the limit.
    let nanos = u64::try_from(at.saturating_duration_since(epoch()).as_nanos()).unwrap_or(u64::MAX);
    (code << MOMENT_BITS) | nanos.min((1 << MOMENT_BITS) - 1)
}

fn decode(when: u64) -> Option<(StopCause, Instant)> {
    let cause = match when >> MOMENT_BITS {
        1 => StopCause::Shutdown,
        2 => StopCause::Removed,
        3 => StopCause::ServerUnhealthy,
        _ => return None,
    };
    Some((cause, epoch() + Duration::from_nanos(when & ((1 << MOMENT_BITS) - 1))))
}

impl Stop {
    /// Closes for `cause` at `at`, unless an earlier moment was already set.
    fn fire(&self, cause: StopCause, at: Instant) {
        let new = encode(cause, at);
        let moment = |when: u64| when & ((1 << MOMENT_BITS) - 1);
        let earlier = |when: u64| when != 0 && moment(when) <= moment(new);
        if self.when.fetch_update(Ordering::AcqRel, Ordering::Acquire, |when| (!earlier(when)).then_some(new)).is_ok() {
            self.waker.wake();
        }
    }

    /// The cause and moment to close once a source fired; until then
    /// `Pending`, with the task woken when one fires.
    pub fn poll_fired(&self, cx: &mut Context<'_>) -> Poll<(StopCause, Instant)> {
        self.waker.register(cx.waker());
        match decode(self.when.load(Ordering::Acquire)) {
            Some(fired) => Poll::Ready(fired),
            None => Poll::Pending,
        }
    }
}

/// The stop signals one source fires: a list of weak references, pruned of
/// ended WebSockets whenever it would grow and once half of it has ended, so
/// it stays within about twice the live ones. Firing takes the list; a
/// signal added after the source fired is fired at once.
#[derive(Debug)]
pub struct StopList {
    cause: StopCause,
    inner: Mutex<StopListInner>,
}

#[derive(Debug, Default)]
struct StopListInner {
    stops: Vec<Weak<Stop>>,
    /// WebSockets that ended since the last prune.
    ended: usize,
    /// Since when, and over what window, the source closes its WebSockets.
    fired: Option<(Instant, Duration)>,
}

impl StopListInner {
    /// Drops the ended WebSockets' entries; a list mostly ended gives its
    /// memory back.
    fn prune(&mut self) {
        self.ended = 0;
        self.stops.retain(|stop| stop.strong_count() > 0);
        let (live, capacity) = (self.stops.len(), self.stops.capacity());
        if capacity > 64 && live < capacity / 4 {
            self.stops.shrink_to(live * 2);
        }
    }
}

impl StopList {
    pub fn new(cause: StopCause) -> StopList {
        StopList { cause, inner: Mutex::new(StopListInner::default()) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, StopListInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds `stop`: fired when this source fires, at once if it has.
    pub fn add(&self, stop: &Arc<Stop>) {
        let mut inner = self.lock();
        if let Some((began, window)) = inner.fired {
            drop(inner);
            // A moment of what is left of the window.
            let now = Instant::now();
            stop.fire(self.cause, now + random_share((began + window).saturating_duration_since(now)));
            return;
        }
        if inner.stops.len() == inner.stops.capacity() {
            inner.prune();
            // Room for as many again as are live, so a prune comes only
            // after that many additions.
            let live = inner.stops.len();
            if live * 2 > inner.stops.capacity() {
                inner.stops.reserve(live);
            }
        }
        inner.stops.push(Arc::downgrade(stop));
    }

    /// A WebSocket whose signal was added here ended. Once as many have
    /// ended as half the list holds, the list is pruned: a mass close gives
    /// its memory back without waiting for new WebSockets, at an amortized
    /// constant cost per end.
    pub fn ended(&self) {
        let mut inner = self.lock();
        inner.ended += 1;
        if inner.ended * 2 >= inner.stops.len() {
            inner.prune();
        }
    }

    /// Fires every signal, each at its own uniformly random moment of
    /// `window` from now (`Duration::ZERO`: all at once), and every signal
    /// added from now on (at a moment of what is left of the window).
    pub fn fire(&self, window: Duration) {
        let now = Instant::now();
        let stops = {
            let mut inner = self.lock();
            inner.fired = Some((now, window));
            std::mem::take(&mut inner.stops)
        };
        self.fire_each(stops, now, window);
    }

    fn fire_each(&self, stops: Vec<Weak<Stop>>, now: Instant, window: Duration) {
        for stop in stops.iter().filter_map(Weak::upgrade) {
            stop.fire(self.cause, now + random_share(window));
        }
    }

    /// For a source that turns on and off (a server ejected while
    /// unhealthy): while on, every signal is fired at once, those added
    /// later too; once off, signals added wait for it to turn on again
    /// (those fired stay fired).
    pub fn set(&self, on: bool) {
        let stops = {
            let mut inner = self.lock();
            match (on, inner.fired.is_some()) {
                (true, false) => {
                    inner.fired = Some((Instant::now(), Duration::ZERO));
                    std::mem::take(&mut inner.stops)
                }
                (false, true) => {
                    inner.fired = None;
                    return;
                }
                _ => return,
            }
        };
        self.fire_each(stops, Instant::now(), Duration::ZERO);
    }
}

/// A uniformly random part of `window`.
fn random_share(window: Duration) -> Duration {
    static SEED: AtomicU64 = AtomicU64::new(0);
    if window.is_zero() {
        return window;
    }
    let draw = RandomState::new().hash_one(SEED.fetch_add(1, Ordering::Relaxed));
    window.mul_f64((draw % 1_000_000) as f64 / 1_000_000.0)
}

/// A window over which a set of connections is closed, each at its own
/// uniformly random moment: the whole gateway on shutdown, one server when a
/// reload removes it, one listener when a reload removes it.
#[derive(Debug)]
pub struct Spread {
    /// `Some(window)` once closing started.
    window: watch::Sender<Option<Duration>>,
    /// The same fact as an atomic, for the request path (no lock).
    begun: AtomicBool,
    /// The WebSockets it closes.
    stops: StopList,
}

impl Spread {
    /// A spread whose WebSockets close for `cause`.
    pub fn new(cause: StopCause) -> Spread {
        Spread { window: watch::channel(None).0, begun: AtomicBool::new(false), stops: StopList::new(cause) }
    }

    /// Starts closing over `window`.
    pub fn begin(&self, window: Duration) {
        self.begun.store(true, Ordering::Release);
        self.window.send_replace(Some(window));
        self.stops.fire(window);
    }

    pub fn has_begun(&self) -> bool {
        self.begun.load(Ordering::Acquire)
    }

    /// Resolves once closing has started.
    pub fn started(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.window.subscribe();
        async move {
            if rx.wait_for(|w| w.is_some()).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Fires `stop` at a uniformly random moment of the window once closing
    /// starts (of what is left of it, if it has).
    pub fn add(&self, stop: &Arc<Stop>) {
        self.stops.add(stop);
    }

    /// A WebSocket added here ended (see [`StopList::ended`]).
    pub fn ended(&self) {
        self.stops.ended();
    }
}

/// The shutdown state shared by every request and WebSocket.
#[derive(Debug)]
pub struct Drain {
    spread: Spread,
    in_flight: AtomicUsize,
    websockets: AtomicUsize,
}

/// Counts one request or WebSocket while it lives.
pub struct Live<'a>(&'a AtomicUsize);

impl Drop for Live<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Default for Drain {
    fn default() -> Self {
        Drain {
            spread: Spread::new(StopCause::Shutdown),
            in_flight: AtomicUsize::new(0),
            websockets: AtomicUsize::new(0),
        }
    }
}

impl Drain {
    /// Starts draining over `window`.
    pub fn begin(&self, window: Duration) {
        self.spread.begin(window);
    }

    pub fn is_draining(&self) -> bool {
        self.spread.has_begun()
    }

    pub fn request(&self) -> Live<'_> {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        Live(&self.in_flight)
    }

    pub fn websocket(&self) -> Live<'_> {
        self.websockets.fetch_add(1, Ordering::AcqRel);
        Live(&self.websockets)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    pub fn websockets(&self) -> usize {
        self.websockets.load(Ordering::Acquire)
    }

    /// Resolves once draining has started.
    pub fn started(&self) -> impl Future<Output = ()> + Send + 'static {
        self.spread.started()
    }

    /// Fires `stop` at a random moment of the drain window once draining
    /// starts (see [`Spread::add`]).
    pub fn add(&self, stop: &Arc<Stop>) {
        self.spread.add(stop);
    }

    /// A WebSocket added here ended (see [`StopList::ended`]).
    pub fn ended(&self) {
        self.spread.ended();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fired(stop: &Stop) -> Option<(StopCause, Instant)> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match stop.poll_fired(&mut cx) {
            Poll::Ready(fired) => Some(fired),
            Poll::Pending => None,
        }
    }

    #[test]
    fn a_spread_fires_each_signal_within_its_window_and_later_ones_within_what_is_left() {
        let spread = Spread::new(StopCause::Removed);
        let stops: Vec<Arc<Stop>> = (0..200).map(|_| Arc::new(Stop::default())).collect();
        stops.iter().for_each(|stop| spread.add(stop));
        assert!(stops.iter().all(|stop| fired(stop).is_none()), "nothing fires before the spread begins");

        let window = Duration::from_secs(60);
        let before = Instant::now();
        spread.begin(window);
        let moments: Vec<Instant> = stops
            .iter()
            .map(|stop| {
                let (cause, at) = fired(stop).expect("fired");
                assert_eq!(cause, StopCause::Removed);
                at
            })
            .collect();
        assert!(moments.iter().all(|&at| at >= before && at <= Instant::now() + window));
        // Spread out, not bunched: some in each half of the window.
        let middle = before + window / 2;
        assert!(moments.iter().any(|&at| at < middle) && moments.iter().any(|&at| at > middle));

        let late = Arc::new(Stop::default());
        spread.add(&late);
        let (_, at) = fired(&late).expect("a signal added after the spread began fires at once");
        assert!(at <= before + window + Duration::from_millis(50), "within what is left of the window");
    }

    #[test]
    fn a_stop_keeps_its_cause_and_moment_to_the_nanosecond() {
        drop(Stop::default());
        let now = Instant::now();
        for cause in [StopCause::Shutdown, StopCause::Removed, StopCause::ServerUnhealthy] {
            for at in
                [now, now + Duration::from_nanos(1), now + Duration::from_secs(4 * 3600) + Duration::from_nanos(7)]
            {
                assert_eq!(decode(encode(cause, at)), Some((cause, at)));
            }
        }
        // Before the epoch (a moment computed before the first stop): the epoch.
        let early = epoch().checked_sub(Duration::from_secs(1)).unwrap_or(epoch());
        assert_eq!(decode(encode(StopCause::Removed, early)), Some((StopCause::Removed, epoch())));
        assert_eq!(decode(0), None, "not fired");
        assert_eq!(std::mem::size_of::<Stop>(), 32);
    }

    #[test]
    fn the_earliest_source_wins_and_a_later_one_does_not_postpone_it() {
        let (drain, ejected) = (Spread::new(StopCause::Shutdown), StopList::new(StopCause::ServerUnhealthy));
        let stop = Arc::new(Stop::default());
        drain.add(&stop);
        ejected.add(&stop);
        ejected.set(true);
        let (cause, at) = fired(&stop).expect("fired");
        assert_eq!(cause, StopCause::ServerUnhealthy);
        assert!(at <= Instant::now());
        drain.begin(Duration::from_secs(60));
        assert_eq!(fired(&stop), Some((cause, at)));
    }

    #[test]
    fn an_ejection_fires_while_on_and_not_after_it_turns_off() {
        let list = StopList::new(StopCause::ServerUnhealthy);
        list.set(true);
        let during = Arc::new(Stop::default());
        list.add(&during);
        assert!(fired(&during).is_some(), "added while on: fired at once");
        list.set(false);
        let after = Arc::new(Stop::default());
        list.add(&after);
        assert!(fired(&after).is_none());
        assert!(fired(&during).is_some(), "a fired signal stays fired");
        list.set(true);
        assert!(fired(&after).is_some());
    }

    #[test]
    fn firing_wakes_the_waiting_task() {
        struct Flag(AtomicBool);
        impl std::task::Wake for Flag {
            fn wake(self: Arc<Self>) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let flag = Arc::new(Flag(AtomicBool::new(false)));
        let waker = std::task::Waker::from(flag.clone());
        let list = StopList::new(StopCause::Shutdown);
        let stop = Arc::new(Stop::default());
        list.add(&stop);
        assert!(stop.poll_fired(&mut Context::from_waker(&waker)).is_pending());
        list.fire(Duration::ZERO);
        assert!(flag.0.load(Ordering::SeqCst));
    }

    #[test]
    fn a_mass_close_gives_the_list_back_without_new_websockets() {
        let list = StopList::new(StopCause::Removed);
        let stops: Vec<Arc<Stop>> = (0..9_000).map(|_| Arc::new(Stop::default())).collect();
        stops.iter().for_each(|stop| list.add(stop));
        let kept = stops[..10].to_vec();
        drop(stops);
        for _ in 0..8_990 {
            list.ended();
        }
        let inner = list.lock();
        assert_eq!(inner.stops.len(), 10, "only the live ones are left");
        assert!(inner.stops.capacity() <= 64, "capacity {} after 8,990 ended", inner.stops.capacity());
        drop(kept);
    }

    #[test]
    fn ended_websockets_do_not_pile_up_in_a_list() {
        let list = StopList::new(StopCause::Removed);
        let kept: Vec<Arc<Stop>> = (0..10).map(|_| Arc::new(Stop::default())).collect();
        kept.iter().for_each(|stop| list.add(stop));
        for _ in 0..100_000 {
            list.add(&Arc::new(Stop::default()));
        }
        let inner = list.lock();
        assert!(inner.stops.capacity() <= 1024, "capacity {} after 100,000 ended ones", inner.stops.capacity());
        assert_eq!(inner.stops.iter().filter(|stop| stop.strong_count() > 0).count(), 10);
    }
}
