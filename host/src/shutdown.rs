//! Graceful shutdown. On SIGTERM or SIGINT the gateway stops accepting, lets
//! requests in flight finish, and ends every WebSocket with a Close 1001 —
//! each at its own random moment in the `drain_s` window, so a fleet of
//! clients does not reconnect in one storm. What is left after the window
//! (plus the close grace) is cut, and the process exits 0. A second signal
//! exits at once.

use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::watch;

/// A window over which a set of connections is closed, each at its own
/// uniformly random moment: the whole gateway on shutdown, one server when a
/// reload removes it, one listener when a reload removes it.
#[derive(Debug)]
pub struct Spread {
    /// `Some(window)` once closing started.
    window: watch::Sender<Option<Duration>>,
    /// The same fact as an atomic, for the request path (no lock).
    begun: AtomicBool,
    seed: AtomicU64,
}

impl Default for Spread {
    fn default() -> Self {
        Spread { window: watch::channel(None).0, begun: AtomicBool::new(false), seed: AtomicU64::new(0) }
    }
}

impl Spread {
    /// Starts closing over `window`.
    pub fn begin(&self, window: Duration) {
        self.begun.store(true, Ordering::Release);
        self.window.send_replace(Some(window));
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

    /// Resolves at this connection's moment to close: a uniformly random
    /// point of the window once closing starts; never before.
    pub fn my_turn(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.window.subscribe();
        let draw = RandomState::new().hash_one(self.seed.fetch_add(1, Ordering::Relaxed));
        let fraction = (draw % 1_000_000) as f64 / 1_000_000.0;
        async move {
            // The guard wait_for returns is dropped before the next await.
            let window = rx.wait_for(|w| w.is_some()).await.ok().and_then(|w| *w);
            match window {
                Some(window) => tokio::time::sleep(window.mul_f64(fraction)).await,
                None => std::future::pending().await,
            }
        }
    }
}

/// The shutdown state shared by every request and WebSocket.
#[derive(Debug, Default)]
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

    /// Resolves at this connection's moment to close (see [`Spread::my_turn`]).
    pub fn my_turn(&self) -> impl Future<Output = ()> + Send + 'static {
        self.spread.my_turn()
    }
}
