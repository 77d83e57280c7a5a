//! The wasmtime engine every plugin is compiled for, the linker that gives
//! plugins their imports, and the epoch ticker that makes call deadlines
//! preemptive. Calls are synchronous: no fibers, no async host functions.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::Thread;
use std::time::Duration;

use wasmtime::component::{HasSelf, Linker};
use wasmtime::{Config, Engine};

use super::bindings::RouterPlugin;
use super::host_api::HostState;
use super::wasi::{NoUdp, Nonblocking, NonblockingIo};

/// How often the engine's epoch advances: the resolution of call deadlines.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);

/// Ticks without guest code running after which the ticker sleeps until a
/// call wakes it: a gateway whose plugins are not being called (or that
/// has none) is not woken a thousand times a second.
const QUIET_TICKS: u32 = 100;

/// The engine and linker, shared by every plugin.
pub struct Runtime {
    pub(crate) engine: Engine,
    pub(crate) linker: Linker<HostState>,
    ticker: Arc<Ticker>,
}

/// The epoch ticker's state, shared with its thread.
#[derive(Default)]
struct Ticker {
    /// Calls and start-ups running guest code now.
    running: AtomicUsize,
    /// The thread is asleep (or about to be) until a call wakes it.
    parked: AtomicBool,
    stop: AtomicBool,
    /// Epochs advanced so far.
    ticks: AtomicU64,
    thread: OnceLock<Thread>,
}

impl Ticker {
    /// Advances the engine's epoch every [`EPOCH_TICK`] while guest code
    /// runs (and [`QUIET_TICKS`] after), else sleeps until woken.
    fn run(&self, engine: &Engine) {
        let mut quiet = 0;
        while !self.stop.load(Ordering::Acquire) {
            if self.running.load(Ordering::SeqCst) > 0 {
                quiet = 0;
            } else if quiet < QUIET_TICKS {
                quiet += 1;
            } else {
                // A call that starts after `parked` is set sees it and
                // wakes the thread; one that started before is seen here.
                self.parked.store(true, Ordering::SeqCst);
                if self.running.load(Ordering::SeqCst) == 0 && !self.stop.load(Ordering::Acquire) {
                    std::thread::park();
                }
                self.parked.store(false, Ordering::SeqCst);
                quiet = 0;
                continue;
            }
            std::thread::sleep(EPOCH_TICK);
            engine.increment_epoch();
            self.ticks.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn wake(&self) {
        if let Some(thread) = self.thread.get() {
            thread.unpark();
        }
    }
}

/// Keeps the epoch ticking while guest code runs (see [`Runtime::awake`]).
pub(crate) struct Awake<'a>(&'a Ticker);

impl Drop for Awake<'_> {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Runtime {
    pub fn new() -> anyhow::Result<Runtime> {
        let mut config = Config::new();
        // Deadlines: the ticker below advances the epoch; a call traps once
        // it has run for its plugin's number of ticks.
        config.epoch_interruption(true);
        // A bounded stack: deep recursion traps instead of growing.
        config.max_wasm_stack(512 * 1024);
        let engine = Engine::new(&config)?;

        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
        // wasmtime's synchronous `io` would block the worker thread (and
        // panics inside tokio): replaced by calls that never wait.
        linker.allow_shadowing(true);
        fn io(state: &mut HostState) -> Nonblocking<'_> {
            Nonblocking(state.table())
        }
        wasmtime_wasi::p2::bindings::sync::io::poll::add_to_linker::<HostState, NonblockingIo>(&mut linker, io)?;
        wasmtime_wasi::p2::bindings::sync::io::streams::add_to_linker::<HostState, NonblockingIo>(&mut linker, io)?;
        wasmtime_wasi::p2::bindings::sync::sockets::udp_create_socket::add_to_linker::<HostState, NoUdp>(
            &mut linker,
            |_| NoUdp,
        )?;
        linker.allow_shadowing(false);
        // Both plugin worlds import the same `host` interface; linking it
        // once through the router world serves WAF plugins as well.
        RouterPlugin::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |state| state)?;

        let ticker = Arc::new(Ticker::default());
        let (ticking, engine_ticked) = (ticker.clone(), engine.clone());
        let thread =
            std::thread::Builder::new().name("wasmgate-epoch".into()).spawn(move || ticking.run(&engine_ticked))?;
        let _ = ticker.thread.set(thread.thread().clone());
        Ok(Runtime { engine, linker, ticker })
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Held while guest code runs (a call, a start-up): the epoch ticks,
    /// so the store's deadline can interrupt it. Taken before the deadline
    /// is set.
    pub(crate) fn awake(&self) -> Awake<'_> {
        self.ticker.running.fetch_add(1, Ordering::SeqCst);
        if self.ticker.parked.load(Ordering::SeqCst) {
            self.ticker.wake();
        }
        Awake(&self.ticker)
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.ticker.stop.store(true, Ordering::Release);
        self.ticker.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_epoch_ticks_only_while_guest_code_runs_and_a_little_after() {
        let runtime = Runtime::new().unwrap();
        let ticks = || runtime.ticker.ticks.load(Ordering::Relaxed);
        let quiet = EPOCH_TICK * QUIET_TICKS;
        // Started with nothing running: asleep after its quiet ticks.
        std::thread::sleep(quiet * 3);
        let asleep = ticks();
        std::thread::sleep(quiet);
        assert_eq!(ticks(), asleep, "ticked with nothing running");
        {
            let _awake = runtime.awake();
            std::thread::sleep(quiet * 2);
            // Sleeps overshoot; at least a tenth of the ticks is plenty.
            assert!(ticks() >= asleep + u64::from(QUIET_TICKS) / 5, "{} ticks while awake", ticks() - asleep);
        }
        std::thread::sleep(quiet * 3);
        let again = ticks();
        std::thread::sleep(quiet);
        assert_eq!(ticks(), again, "asleep again once nothing runs");
    }
}
