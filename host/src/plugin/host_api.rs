//! The `host` interface: what the gateway offers every plugin, and the
//! per-instance state ([`HostState`]) those calls run against.
//!
//! Nothing here gives a plugin a socket, a file or the environment: WASI is
//! linked with an empty context (no preopens, no env, no args, stdio
//! discarded), so a plugin can only compute and call these four functions.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use wasmtime::component::ResourceTable;
use wasmtime::{ResourceLimiter, StoreLimits};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::bindings::{Level, host, types};
use super::counter::Counters;
use crate::upstream::Pools;

/// Gateway services shared by every plugin.
pub struct HostServices {
    pub counters: Counters,
    /// The pools of the config in force (a reload replaces them).
    pub pools: ArcSwap<Pools>,
}

/// What one plugin's instances know about it.
pub struct PluginContext {
    pub name: String,
    pub config: BTreeMap<String, String>,
    pub services: Arc<HostServices>,
}

/// An instance's caps on memories and tables, which remembers that it
/// refused a memory growth: a call that then traps failed on its memory cap.
pub struct Caps {
    limits: StoreLimits,
    /// Set when a memory growth was refused (cleared before every call).
    pub(crate) refused_memory: bool,
}

impl ResourceLimiter for Caps {
    fn memory_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        let allowed = self.limits.memory_growing(current, desired, maximum)?;
        self.refused_memory |= !allowed;
        Ok(allowed)
    }

    fn table_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        self.limits.table_growing(current, desired, maximum)
    }

    fn instances(&self) -> usize {
        self.limits.instances()
    }

    fn tables(&self) -> usize {
        self.limits.tables()
    }

    fn memories(&self) -> usize {
        self.limits.memories()
    }
}

/// The data of one plugin instance's store.
pub struct HostState {
    pub(crate) plugin: Arc<PluginContext>,
    pub(crate) caps: Caps,
    /// When the call under way must end (set before every call).
    pub(crate) call_deadline: Instant,
    wasi: WasiCtx,
    table: ResourceTable,
}

impl HostState {
    pub fn new(plugin: Arc<PluginContext>, limits: StoreLimits) -> HostState {
        // The builder's defaults grant nothing: stdin closed, stdout/stderr
        // discarded, no environment, no arguments, no directories, no sockets.
        let wasi = wasmtime_wasi::WasiCtxBuilder::new().build();
        let caps = Caps { limits, refused_memory: false };
        HostState { plugin, caps, call_deadline: Instant::now(), wasi, table: ResourceTable::new() }
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl types::Host for HostState {}

impl host::Host for HostState {
    fn log(&mut self, level: Level, message: String) {
        let plugin = self.plugin.name.as_str();
        match level {
            Level::Trace => tracing::trace!(plugin, "{message}"),
            Level::Debug => tracing::debug!(plugin, "{message}"),
            Level::Info => tracing::info!(plugin, "{message}"),
            Level::Warn => tracing::warn!(plugin, "{message}"),
            Level::Error => tracing::error!(plugin, "{message}"),
        }
    }

    fn config(&mut self, key: String) -> Option<String> {
        self.plugin.config.get(&key).cloned()
    }

    fn healthy_servers(&mut self, pool: String) -> Vec<String> {
        self.plugin.services.pools.load().healthy_servers(&pool)
    }

    fn count(&mut self, key: String, window_ms: u32) -> u64 {
        self.plugin.services.counters.count(&self.plugin.name, &key, window_ms)
    }
}
