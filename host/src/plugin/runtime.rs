//! The wasmtime engine every plugin is compiled for, the linker that gives
//! plugins their imports, and the epoch ticker that makes call deadlines
//! preemptive. Calls are synchronous: no fibers, no async host functions.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use wasmtime::component::{HasSelf, Linker};
use wasmtime::{Config, Engine};

use super::bindings::RouterPlugin;
use super::host_api::HostState;
use super::wasi::{NoUdp, Nonblocking, NonblockingIo};

/// How often the engine's epoch advances: the resolution of call deadlines.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);

/// The engine and linker, shared by every plugin.
pub struct Runtime {
    pub(crate) engine: Engine,
    pub(crate) linker: Linker<HostState>,
    ticker_stop: Arc<AtomicBool>,
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

        let ticker_stop = Arc::new(AtomicBool::new(false));
        let stop = ticker_stop.clone();
        let ticking = engine.clone();
        std::thread::Builder::new().name("wasmgate-epoch".into()).spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(EPOCH_TICK);
                ticking.increment_epoch();
            }
        })?;
        Ok(Runtime { engine, linker, ticker_stop })
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}
