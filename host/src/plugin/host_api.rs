//! The `host` interface: what the gateway offers every plugin, and the
//! per-instance state ([`HostState`]) those calls run against.
//!
//! Nothing here gives a plugin a socket, a file or the environment: WASI is
//! linked with an empty context (no preopens, no env, no args; stdout and
//! stderr only reach the log, see [`super::output`]), so a plugin can only
//! compute and call these four functions.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use wasmtime::component::{Resource, ResourceTable};
use wasmtime::{ResourceLimiter, StoreLimits};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::bindings::{Header, Level, TlsInfo, WebsocketHandshake, host, types};
use super::output::{PluginOutput, PrintBudget, Stream};
use super::view::{RequestHandle, RequestView};
use crate::counting::Counters;
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
    /// How many lines its stdout and stderr may still log this second.
    pub print_budget: Arc<PrintBudget>,
}

impl PluginContext {
    pub fn new(name: String, config: BTreeMap<String, String>, services: Arc<HostServices>) -> PluginContext {
        PluginContext { name, config, services, print_budget: Arc::default() }
    }
}

/// An instance's caps on memories and tables, which remembers that it
/// refused a memory growth: a call that then traps failed on its memory cap.
pub struct Caps {
    limits: StoreLimits,
    /// Set when a memory growth was refused (cleared before every call).
    pub(crate) refused_memory: bool,
    /// The largest linear memory this instance has grown to, in bytes.
    pub(crate) memory_bytes: usize,
}

impl ResourceLimiter for Caps {
    fn memory_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        let allowed = self.limits.memory_growing(current, desired, maximum)?;
        self.refused_memory |= !allowed;
        if allowed {
            self.memory_bytes = self.memory_bytes.max(desired);
        }
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
    /// The request of the call under way (an empty one between calls).
    pub(crate) request: RequestView,
    /// The number of the call under way: the handle its request is passed
    /// as. `None` between calls, when no handle is valid.
    pub(crate) call: Option<u32>,
    /// Calls started on this instance (the next call's number).
    pub(crate) calls: u32,
    /// The CPU time the running code may use: its thread's CPU clock when
    /// it started, and its budget (the call deadline, or start-up's).
    pub(crate) cpu: CpuBudget,
    wasi: WasiCtx,
    table: ResourceTable,
}

/// A deadline in the CPU time of the thread running the plugin: what the
/// plugin itself spent, not the time its thread waited for a core.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuBudget {
    started: Duration,
    budget: Duration,
}

impl CpuBudget {
    /// A budget of `budget` from now, on this thread.
    pub fn starting_now(budget: Duration) -> CpuBudget {
        CpuBudget { started: thread_cpu_time(), budget }
    }

    /// What is left of it (zero once spent).
    pub fn left(&self) -> Duration {
        self.budget.saturating_sub(thread_cpu_time().saturating_sub(self.started))
    }
}

/// This thread's CPU time.
fn thread_cpu_time() -> Duration {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(now.tv_sec.max(0) as u64, now.tv_nsec.clamp(0, 999_999_999) as u32)
}

impl HostState {
    pub fn new(plugin: Arc<PluginContext>, limits: StoreLimits) -> HostState {
        // The builder's defaults grant nothing: stdin closed, no environment,
        // no arguments, no directories, no sockets. Stdout and stderr go to
        // the gateway's log, line by line, within the plugin's budget.
        let name: Arc<str> = plugin.name.as_str().into();
        let budget = plugin.print_budget.clone();
        let wasi = wasmtime_wasi::WasiCtxBuilder::new()
            .stdout(PluginOutput::new(name.clone(), Stream::Stdout, budget.clone()))
            .stderr(PluginOutput::new(name, Stream::Stderr, budget))
            .build();
        let caps = Caps { limits, refused_memory: false, memory_bytes: 0 };
        HostState {
            plugin,
            caps,
            request: RequestView::empty(),
            call: None,
            calls: 0,
            cpu: CpuBudget::default(),
            wasi,
            table: ResourceTable::new(),
        }
    }

    pub(crate) fn table(&mut self) -> &mut ResourceTable {
        &mut self.table
    }

    /// The request `handle` names, if it is the call under way's.
    fn request(&self, handle: &Resource<RequestHandle>) -> wasmtime::Result<&RequestView> {
        match self.call {
            Some(call) if call == handle.rep() => Ok(&self.request),
            _ => Err(wasmtime::Error::msg("a request handle was used outside the call it was passed to")),
        }
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl types::Host for HostState {}

/// The accessors of the `request` resource: each copies one field out of the
/// request of the call under way.
impl types::HostRequest for HostState {
    fn method(&mut self, req: Resource<RequestHandle>) -> wasmtime::Result<String> {
        Ok(self.request(&req)?.method())
    }

    fn scheme(&mut self, req: Resource<RequestHandle>) -> wasmtime::Result<String> {
        Ok(self.request(&req)?.scheme())
    }

    fn version(&mut self, req: Resource<RequestHandle>) -> wasmtime::Result<String> {
        Ok(self.request(&req)?.version())
    }

    fn authority(&mut self, req: Resource<RequestHandle>) -> wasmtime::Result<String> {
        Ok(self.request(&req)?.authority())
    }

    fn path(&mut self, req: Resource<RequestHandle>) -> wasmtime::Result<String> {
        Ok(self.request(&req)?.path())
    }

    fn query(&mut self, req: Resource<RequestHandle>) -> wasmtime::Result<Option<String>> {
        Ok(self.request(&req)?.query())
    }

    fn header(&mut self, req: Resource<RequestHandle>, name: String) -> wasmtime::Result<Option<String>> {
        Ok(self.request(&req)?.header(&name))
    }

    fn headers(&mut self, req: Resource<RequestHandle>) -> wasmtime::Result<Vec<Header>> {
        Ok(self.request(&req)?.headers())
    }

    fn client_ip(&mut self, req: Resource<RequestHandle>) -> wasmtime::Result<String> {
        Ok(self.request(&req)?.client_ip())
    }

    fn listener(&mut self, req: Resource<RequestHandle>) -> wasmtime::Result<String> {
        Ok(self.request(&req)?.listener())
    }

    fn tls(&mut self, req: Resource<RequestHandle>) -> wasmtime::Result<Option<TlsInfo>> {
        Ok(self.request(&req)?.tls())
    }

    fn websocket(&mut self, req: Resource<RequestHandle>) -> wasmtime::Result<Option<WebsocketHandshake>> {
        Ok(self.request(&req)?.websocket())
    }

    /// Plugins only ever get borrowed requests, which they cannot drop.
    fn drop(&mut self, _req: Resource<RequestHandle>) -> wasmtime::Result<()> {
        Ok(())
    }
}

impl host::Host for HostState {
    fn log(&mut self, level: Level, message: String) -> wasmtime::Result<()> {
        let plugin = self.plugin.name.as_str();
        // Within the plugin's budget of lines a second, shared with what it
        // prints (the rest is counted and reported, not written).
        if !self.plugin.print_budget.take(plugin) {
            return Ok(());
        }
        // One line, of bounded length: a plugin cannot forge log lines.
        let message = printable(&message);
        match level {
            Level::Trace => tracing::trace!(plugin = %plugin, "{message}"),
            Level::Debug => tracing::debug!(plugin = %plugin, "{message}"),
            Level::Info => tracing::info!(plugin = %plugin, "{message}"),
            Level::Warn => tracing::warn!(plugin = %plugin, "{message}"),
            Level::Error => tracing::error!(plugin = %plugin, "{message}"),
        }
        Ok(())
    }

    fn config(&mut self, key: String) -> wasmtime::Result<Option<String>> {
        Ok(self.plugin.config.get(&key).cloned())
    }

    fn healthy_servers(&mut self, pool: String) -> wasmtime::Result<Vec<String>> {
        Ok(self.plugin.services.pools.load().healthy_servers(&pool))
    }

    fn count(&mut self, key: String, window_ms: u32) -> wasmtime::Result<u64> {
        Ok(self.plugin.services.counters.count(&self.plugin.name, &key, window_ms))
    }
}

/// Longest plugin-written message the gateway repeats in logs and errors.
const MAX_MESSAGE: usize = 1024;

/// A plugin's message made safe to log: control characters escaped, cut at
/// [`MAX_MESSAGE`] bytes.
pub(crate) fn printable(message: &str) -> String {
    let mut out = String::with_capacity(message.len().min(MAX_MESSAGE + 4));
    for c in message.chars() {
        if out.len() >= MAX_MESSAGE {
            out.push('…');
            break;
        }
        if c.is_control() { out.extend(c.escape_default()) } else { out.push(c) }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugin_messages_are_escaped_and_bounded() {
        assert_eq!(printable("bad `routes`: line 2"), "bad `routes`: line 2");
        assert_eq!(printable("a\nforged: log line\u{1b}[31m"), "a\\nforged: log line\\u{1b}[31m");
        let long = printable(&"x".repeat(5000));
        assert!(long.ends_with('…') && long.len() < MAX_MESSAGE + 4);
    }
}
