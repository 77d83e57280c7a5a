//! One loaded plugin: its compiled component, identity, limits, and the
//! instances that calls reuse, one per worker thread.
//!
//! A call runs synchronously on the calling thread: it takes that thread's
//! instance of this plugin version (instantiating one, `init` included, if
//! the thread has none), moves the request into the instance's store, arms
//! the epoch deadline and runs the export. No lock is taken and nothing is
//! awaited. An instance that returns normally stays with its thread; one
//! that trapped, overran its deadline or hit its memory cap is dropped, so no
//! later request ever runs on a broken instance. Failures feed the plugin's
//! crash-loop [`Breaker`].

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use thread_local::ThreadLocal;
use wasmtime::component::{Component, InstancePre, Resource};
use wasmtime::{Store, StoreLimitsBuilder, Trap, UpdateDeadline};

use super::bindings::{RouteDecision, Verdict, lifecycle, router, waf};
use super::breaker::{Breaker, BreakerLimits};
use super::host_api::{CpuBudget, HostState, PluginContext, printable};
use super::runtime::{EPOCH_TICK, Runtime};
use super::view::{RequestHandle, RequestView};
use crate::config::{OnError, PluginKind};

/// Elements one table of a plugin may grow to (a Rust plugin uses hundreds).
const MAX_TABLE_ELEMENTS: usize = 100_000;

/// How long a new instance may take to start, its `init` included. Start-up
/// runs at load (where a slow one is refused) and whenever a thread first
/// needs an instance, outside any call's deadline.
pub const INIT_TIMEOUT: Duration = Duration::from_secs(1);

/// The version of the plugin contract (`wit/plugin.wit`) this host speaks.
pub const CONTRACT_VERSION: &str = "0.3.0";

/// The contract this host speaks, as it appears in export names.
const CONTRACT: &str = "wasmgate:plugin@0.3.0";

/// Why a plugin call produced no decision.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("plugin `{plugin}` ran past its {timeout_ms} ms deadline")]
    Timeout { plugin: String, timeout_ms: u64 },
    #[error("plugin `{plugin}` trapped: {message}")]
    Trap { plugin: String, message: String },
    #[error("plugin `{plugin}` hit its {limit_mb} MiB memory cap")]
    MemoryLimit { plugin: String, limit_mb: u64 },
    #[error("plugin `{plugin}` could not be instantiated: {message}")]
    Instantiate { plugin: String, message: String },
    #[error("plugin `{plugin}` refused its configuration: {message}")]
    InitRefused { plugin: String, message: String },
    #[error("plugin `{plugin}` returned an invalid decision: {reason}")]
    InvalidOutput { plugin: String, reason: String },
    #[error("plugin `{plugin}` is not loaded")]
    Missing { plugin: String },
    #[error("plugin `{plugin}` is a {actual} plugin, used here as a {expected}")]
    WrongKind { plugin: String, actual: PluginKind, expected: PluginKind },
    #[error("plugin `{plugin}` is quarantined after repeated failures")]
    Quarantined { plugin: String },
}

impl PluginError {
    /// The plugin the error is about.
    pub fn plugin(&self) -> &str {
        match self {
            PluginError::Timeout { plugin, .. }
            | PluginError::Trap { plugin, .. }
            | PluginError::MemoryLimit { plugin, .. }
            | PluginError::Instantiate { plugin, .. }
            | PluginError::InitRefused { plugin, .. }
            | PluginError::InvalidOutput { plugin, .. }
            | PluginError::Missing { plugin }
            | PluginError::WrongKind { plugin, .. }
            | PluginError::Quarantined { plugin } => plugin,
        }
    }
}

/// Limits and policy of one plugin (the `[plugins]` defaults overridden by
/// its `NAME.toml`).
#[derive(Debug, Clone, Copy)]
pub struct PluginLimits {
    pub call_timeout: Duration,
    pub memory_limit_bytes: usize,
    pub on_error: OnError,
    pub breaker: BreakerLimits,
}

/// Who a loaded plugin is.
#[derive(Debug, Clone)]
pub struct PluginIdentity {
    pub name: String,
    pub kind: PluginKind,
    /// Hex SHA-256 of the component file.
    pub sha256: String,
    /// 1 for the first load of this name, +1 for every later load.
    pub version: u64,
    pub loaded_at: SystemTime,
    /// Whether the compiled artifact came from the cache.
    pub from_cache: bool,
}

/// Counters of one plugin version.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PluginStats {
    pub calls: u64,
    /// Failed calls, whatever the cause (the causes below are among them).
    pub errors: u64,
    /// Calls stopped at their deadline.
    pub timeouts: u64,
    /// Calls that failed because the instance's memory cap refused a growth.
    pub memory_limit_hits: u64,
    /// Instances retired between calls, past three quarters of the cap.
    pub instances_retired: u64,
    pub quarantines: u64,
    /// Whether calls are currently refused by the crash-loop breaker.
    pub quarantined: bool,
    /// Why the breaker last tripped.
    pub quarantine_reason: Option<String>,
    /// Why the latest failed call failed.
    pub last_error: Option<String>,
}

/// The decision a component exports: which world it implements.
enum Exports {
    Router(router::GuestIndices),
    Waf(waf::GuestIndices),
}

/// A component linked and checked against one of the two plugin worlds.
pub(crate) struct Pre {
    instance_pre: InstancePre<HostState>,
    exports: Exports,
    /// Set when the component exports `lifecycle` (its `init`).
    init: Option<lifecycle::GuestIndices>,
}

impl Pre {
    /// Links `component` and finds which world it implements: the one whose
    /// generated bindings accept its exports (names, versions and types).
    pub(crate) fn new(runtime: &Runtime, component: &Component) -> anyhow::Result<Pre> {
        let exports: Vec<String> =
            component.component_type().exports(runtime.engine()).map(|(name, _)| name.to_owned()).collect();
        if let Some(old) = exports.iter().find(|name| name.starts_with("wasmgate:plugin/") && !name.ends_with("@0.3.0"))
        {
            anyhow::bail!(
                "exports `{old}`, from another version of the plugin contract; this gateway speaks {CONTRACT}: \
                 rebuild the plugin against the WIT files in the gateway's wit/ (Rust: its wasmgate-sdk)"
            );
        }
        let instance_pre = runtime.linker.instantiate_pre(component)?;
        let router = router::GuestIndices::new(&instance_pre);
        let waf = waf::GuestIndices::new(&instance_pre);
        let exports_kind = match (router, waf) {
            (Ok(router), Err(_)) => Exports::Router(router),
            (Err(_), Ok(waf)) => Exports::Waf(waf),
            (Ok(_), Ok(_)) => anyhow::bail!(
                "exports both `wasmgate:plugin/router` and `wasmgate:plugin/waf`; a plugin is one or the other"
            ),
            (Err(router), Err(waf)) => anyhow::bail!(
                "implements neither the router-plugin nor the waf-plugin world (its exports: {}; as a router: {router:#}; as a WAF: {waf:#})",
                if exports.is_empty() { "none".to_owned() } else { exports.join(", ") }
            ),
        };
        let init = if exports.iter().any(|name| name.starts_with("wasmgate:plugin/lifecycle")) {
            Some(lifecycle::GuestIndices::new(&instance_pre)?)
        } else {
            None
        };
        Ok(Pre { instance_pre, exports: exports_kind, init })
    }

    pub(crate) fn kind(&self) -> PluginKind {
        match self.exports {
            Exports::Router(_) => PluginKind::Router,
            Exports::Waf(_) => PluginKind::Waf,
        }
    }
}

enum Bindings {
    Router(router::Guest),
    Waf(waf::Guest),
}

struct Instance {
    store: Store<HostState>,
    bindings: Bindings,
}

#[derive(Default)]
struct Counters {
    calls: AtomicU64,
    errors: AtomicU64,
    timeouts: AtomicU64,
    memory_limit_hits: AtomicU64,
    /// Instances retired after a call because they neared the memory cap.
    retired: AtomicU64,
    /// Set on failures only: the success path never touches it.
    last_error: ArcSwapOption<String>,
}

/// A compiled, validated plugin ready to be called.
pub struct LoadedPlugin {
    pub name: String,
    pub kind: PluginKind,
    pub identity: PluginIdentity,
    pub limits: PluginLimits,
    /// Hash of the component and its settings file: what a reload compares.
    pub(crate) source_hash: String,
    runtime: Arc<Runtime>,
    context: Arc<PluginContext>,
    pre: Pre,
    /// Each thread's instance of this version (none after a failed call).
    instances: ThreadLocal<RefCell<Option<Instance>>>,
    /// The call deadline in epoch ticks.
    call_ticks: u64,
    counters: Counters,
    breaker: Breaker,
}

/// What [`LoadedPlugin::new`] needs besides the component.
pub struct PluginSource {
    pub sha256: String,
    pub source_hash: String,
    pub version: u64,
    pub from_cache: bool,
}

/// Epoch ticks in `duration`, rounded up, at least one.
fn ticks(duration: Duration) -> u64 {
    (duration.as_nanos().div_ceil(EPOCH_TICK.as_nanos()) as u64).max(1)
}

impl LoadedPlugin {
    /// Links `component`, finds its world, and starts one instance (its
    /// `init` included) to prove it starts. Blocks for up to
    /// [`INIT_TIMEOUT`]: call it off the async workers.
    pub fn new(
        runtime: Arc<Runtime>,
        component: Component,
        source: PluginSource,
        context: Arc<PluginContext>,
        limits: PluginLimits,
    ) -> anyhow::Result<LoadedPlugin> {
        let pre = Pre::new(&runtime, &component)?;
        let kind = pre.kind();
        let identity = PluginIdentity {
            name: context.name.clone(),
            kind,
            sha256: source.sha256,
            version: source.version,
            loaded_at: SystemTime::now(),
            from_cache: source.from_cache,
        };
        let plugin = LoadedPlugin {
            name: context.name.clone(),
            kind,
            identity,
            limits,
            source_hash: source.source_hash,
            runtime,
            context,
            pre,
            instances: ThreadLocal::new(),
            call_ticks: ticks(limits.call_timeout),
            counters: Counters::default(),
            breaker: Breaker::new(limits.breaker),
        };
        plugin.start_instance()?;
        Ok(plugin)
    }

    /// Asks a router plugin where `req` goes.
    pub fn route(&self, req: &mut RequestView) -> Result<RouteDecision, PluginError> {
        self.call(PluginKind::Router, req, |bindings, store, handle| match bindings {
            Bindings::Router(router) => router.call_route(store, handle),
            Bindings::Waf(_) => unreachable!("call() checked the kind"),
        })
    }

    /// Asks a WAF plugin for its verdict on `req`.
    pub fn inspect(&self, req: &mut RequestView) -> Result<Verdict, PluginError> {
        self.call(PluginKind::Waf, req, |bindings, store, handle| match bindings {
            Bindings::Waf(waf) => waf.call_inspect(store, handle),
            Bindings::Router(_) => unreachable!("call() checked the kind"),
        })
    }

    /// Starts a new instance, `init` included, and drops it: what a load
    /// does to prove the plugin starts (and what the benchmarks time).
    pub fn start_instance(&self) -> Result<(), PluginError> {
        self.instantiate().map(drop)
    }

    /// A snapshot of this version's counters.
    pub fn stats(&self) -> PluginStats {
        let c = &self.counters;
        PluginStats {
            calls: c.calls.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
            timeouts: c.timeouts.load(Ordering::Relaxed),
            memory_limit_hits: c.memory_limit_hits.load(Ordering::Relaxed),
            instances_retired: c.retired.load(Ordering::Relaxed),
            quarantines: self.breaker.quarantines(),
            quarantined: self.breaker.is_open(),
            quarantine_reason: self.breaker.last_reason(),
            last_error: c.last_error.load_full().map(|e| e.as_ref().clone()),
        }
    }

    /// Counts a failure found after the call returned (an invalid decision).
    pub fn record_failure(&self, error: &PluginError, req: &RequestView) {
        self.failed(error, req);
    }

    /// One call on this thread's instance: the request moved into the
    /// store and passed as handle number `call`, the deadline armed, the
    /// request moved back out whatever happened.
    fn call<T>(
        &self,
        expected: PluginKind,
        req: &mut RequestView,
        export: impl FnOnce(&Bindings, &mut Store<HostState>, Resource<RequestHandle>) -> wasmtime::Result<T>,
    ) -> Result<T, PluginError> {
        if self.kind != expected {
            return Err(PluginError::WrongKind { plugin: self.name.clone(), actual: self.kind, expected });
        }
        if !self.breaker.admit(self.limits.call_timeout) {
            return Err(PluginError::Quarantined { plugin: self.name.clone() });
        }
        self.counters.calls.fetch_add(1, Ordering::Relaxed);
        let slot = self.instances.get_or(|| RefCell::new(None));
        // Taken out, not borrowed: nothing of the slot is held during the call.
        let taken = slot.borrow_mut().take();
        let mut instance = match taken {
            Some(instance) => instance,
            None => self.instantiate().inspect_err(|error| self.failed(error, req))?,
        };

        let state = instance.store.data_mut();
        state.calls = state.calls.wrapping_add(1);
        let call = state.calls;
        state.call = Some(call);
        state.caps.refused_memory = false;
        std::mem::swap(&mut state.request, req);
        state.cpu = CpuBudget::starting_now(self.limits.call_timeout);
        let awake = self.runtime.awake();
        instance.store.set_epoch_deadline(self.call_ticks);
        let result = export(&instance.bindings, &mut instance.store, Resource::new_borrow(call));
        drop(awake);
        let state = instance.store.data_mut();
        std::mem::swap(&mut state.request, req);
        state.call = None;

        match result {
            Ok(value) => {
                // An instance whose memory has grown past three quarters of
                // its cap is retired now, between calls, rather than failing
                // a request when it reaches the cap (a garbage-collected
                // guest, JavaScript say, can grow a little with every call).
                let grown = instance.store.data().caps.memory_bytes;
                if grown <= self.limits.memory_limit_bytes / 4 * 3 {
                    *slot.borrow_mut() = Some(instance);
                } else {
                    self.counters.retired.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(plugin = %self.name, memory_bytes = grown, "instance retired near its memory cap");
                }
                self.succeeded();
                Ok(value)
            }
            Err(err) => {
                let error = self.classify(err, instance.store.data().caps.refused_memory);
                // The instance is dropped here: after a trap or an overrun its
                // state is unknown, so it never serves another request.
                drop(instance);
                self.failed(&error, req);
                Err(error)
            }
        }
    }

    fn timeout_error(&self) -> PluginError {
        PluginError::Timeout { plugin: self.name.clone(), timeout_ms: self.limits.call_timeout.as_millis() as u64 }
    }

    /// What a trap means: the deadline, the memory cap (a growth was
    /// refused during the call), or the plugin's own fault.
    fn classify(&self, err: wasmtime::Error, refused_memory: bool) -> PluginError {
        if let Some(Trap::Interrupt) = err.downcast_ref::<Trap>() {
            return self.timeout_error();
        }
        if refused_memory {
            tracing::debug!(plugin = %self.name, "plugin trap after a refused memory growth: {err:?}");
            let limit_mb = (self.limits.memory_limit_bytes >> 20) as u64;
            return PluginError::MemoryLimit { plugin: self.name.clone(), limit_mb };
        }
        // The trap itself (or the host's reason for trapping), without the
        // wasm backtrace (logged at debug).
        tracing::debug!(plugin = %self.name, "plugin trap: {err:?}");
        let message = err.downcast_ref::<Trap>().map_or_else(|| err.root_cause().to_string(), Trap::to_string);
        PluginError::Trap { plugin: self.name.clone(), message }
    }

    fn succeeded(&self) {
        if self.breaker.succeeded() {
            tracing::info!(plugin = %self.name, version = self.identity.version, "plugin recovered; quarantine over");
        }
    }

    /// Counts a failed call by its cause, remembers why, and feeds the breaker.
    fn failed(&self, error: &PluginError, req: &RequestView) {
        let c = &self.counters;
        c.errors.fetch_add(1, Ordering::Relaxed);
        match error {
            PluginError::Timeout { .. } => c.timeouts.fetch_add(1, Ordering::Relaxed),
            PluginError::MemoryLimit { .. } => c.memory_limit_hits.fetch_add(1, Ordering::Relaxed),
            _ => 0,
        };
        c.last_error.store(Some(Arc::new(error.to_string())));
        if let Some(tripped) = self.breaker.failed(req.client_ip) {
            tracing::warn!(
                plugin = %self.name,
                version = self.identity.version,
                why = %tripped.reason,
                backoff_ms = tripped.backoff.as_millis() as u64,
                last_error = %error,
                "plugin quarantined; its on_error policy applies until the backoff ends"
            );
        }
    }

    /// A new instance with its `init` run, bounded by [`INIT_TIMEOUT`].
    fn instantiate(&self) -> Result<Instance, PluginError> {
        // Every way to take host memory is capped: linear memories (size and
        // count), tables (elements and count), instances.
        let limits = StoreLimitsBuilder::new()
            .memory_size(self.limits.memory_limit_bytes)
            .memories(8)
            .table_elements(MAX_TABLE_ELEMENTS)
            .tables(32)
            .instances(64)
            .build();
        let mut store = Store::new(&self.runtime.engine, HostState::new(self.context.clone(), limits));
        store.limiter(|state| &mut state.caps);
        // Deadlines count the plugin's own CPU time: the epoch ticks (wall
        // time) only say when to look. Time its thread spent waiting for a
        // core (a CPU flood, a busy machine) is given back, so load alone
        // never makes a plugin time out.
        store.epoch_deadline_callback(|store| {
            let left = store.data().cpu.left();
            Ok(if left.is_zero() { UpdateDeadline::Interrupt } else { UpdateDeadline::Continue(ticks(left)) })
        });
        // Start-up code (constructors, static initialisers, `init`) is bounded too.
        store.data_mut().cpu = CpuBudget::starting_now(INIT_TIMEOUT);
        let _awake = self.runtime.awake();
        store.set_epoch_deadline(ticks(INIT_TIMEOUT));
        let failed = |err: wasmtime::Error| PluginError::Instantiate {
            plugin: self.name.clone(),
            message: match err.downcast_ref::<Trap>() {
                Some(Trap::Interrupt) => format!("start-up ran past {} ms", INIT_TIMEOUT.as_millis()),
                _ => format!("{err:#}"),
            },
        };
        let instance = self.pre.instance_pre.instantiate(&mut store).map_err(failed)?;
        let bindings = match &self.pre.exports {
            Exports::Router(indices) => indices.load(&mut store, &instance).map(Bindings::Router),
            Exports::Waf(indices) => indices.load(&mut store, &instance).map(Bindings::Waf),
        }
        .map_err(failed)?;
        if let Some(init) = &self.pre.init {
            let init = init.load(&mut store, &instance).map_err(failed)?;
            if let Err(message) = init.call_init(&mut store).map_err(failed)? {
                return Err(PluginError::InitRefused { plugin: self.name.clone(), message: printable(&message) });
            }
        }
        Ok(Instance { store, bindings })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test plugin `looper` (built by scripts/build-plugins), loaded with
    /// a call deadline of `ms`.
    fn looper_with_deadline_ms(ms: u64) -> LoadedPlugin {
        use crate::config::PluginsConfig;
        use crate::counting::Counters;
        use crate::plugin::{Loader, host_api::HostServices};
        let exe = std::env::current_exe().expect("test executable");
        let looper = exe.ancestors().nth(3).expect("target dir").join("wasm32-wasip2/release/looper.wasm");
        assert!(looper.exists(), "{} is missing: run scripts/build-plugins", looper.display());
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(&looper, dir.path().join("looper.wasm")).unwrap();
        std::fs::write(dir.path().join("looper.toml"), format!("call_timeout_ms = {ms}\n")).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let services = Arc::new(HostServices { counters: Counters::default(), pools: Default::default() });
            let defaults = PluginsConfig { dir: dir.path().to_owned(), cache: false, ..PluginsConfig::default() };
            let loader = Loader::new(Arc::new(Runtime::new().unwrap()), defaults, services, Default::default());
            loader.load(&dir.path().join("looper.wasm"), 1).await.unwrap()
        })
    }

    /// A call that spins for 3 ms of wall time (so it never uses more CPU
    /// than that) under a call deadline of 10 ms, while eight threads keep
    /// both cores busy: its thread waits for a core for longer than the
    /// deadline, yet the call does not time out. (Rarely one does: the
    /// thread's CPU clock also counts time a busy host charges to it, a
    /// stolen virtual CPU or other tests' network interrupts. A deadline on
    /// wall time would fail every call held past it.)
    #[test]
    fn time_waiting_for_a_core_does_not_count_against_the_deadline() {
        use std::sync::atomic::AtomicBool;

        let plugin = looper_with_deadline_ms(10);

        let flooding = Arc::new(AtomicBool::new(true));
        let flood: Vec<_> = (0..8)
            .map(|_| {
                let flooding = flooding.clone();
                std::thread::spawn(move || {
                    while flooding.load(Ordering::Relaxed) {
                        std::hint::black_box(());
                    }
                })
            })
            .collect();
        let (mut timeouts, mut held, mut slowest) = (0, 0, Duration::ZERO);
        for _ in 0..100 {
            let parts = http::Request::builder().uri("/spin?ms=3").body(()).unwrap().into_parts().0;
            let client = Arc::new(crate::http::ConnInfo::new("192.0.2.1:5000".parse().unwrap(), None));
            let mut view = RequestView::new(parts, client, Arc::from("web"), false);
            let started = std::time::Instant::now();
            match plugin.inspect(&mut view) {
                Ok(_) => {}
                Err(PluginError::Timeout { .. }) => timeouts += 1,
                Err(other) => panic!("{other}"),
            }
            slowest = slowest.max(started.elapsed());
            if started.elapsed() > Duration::from_millis(10) {
                held += 1;
            }
        }
        flooding.store(false, Ordering::Relaxed);
        for thread in flood {
            thread.join().unwrap();
        }
        assert!(held >= 5, "the flood held only {held} calls past their deadline (slowest {slowest:?})");
        assert!(
            timeouts * 10 <= held,
            "{timeouts} of the {held} calls held past their deadline by the flood timed out (slowest {slowest:?})"
        );
    }

    #[test]
    fn deadlines_round_up_to_whole_ticks() {
        assert_eq!(ticks(Duration::from_millis(10)), 10);
        assert_eq!(ticks(Duration::from_micros(1500)), 2);
        assert_eq!(ticks(Duration::ZERO), 1);
    }
}
