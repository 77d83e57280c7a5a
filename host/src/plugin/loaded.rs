//! One loaded plugin: its compiled component, identity, limits, and a small
//! pool of instances that calls reuse.
//!
//! A call takes an idle instance (or instantiates one), arms the epoch
//! deadline, and runs the export. An instance that returns normally goes back
//! to the pool; one that trapped, overran its deadline or hit its memory cap
//! is dropped, so no later request ever runs on a broken instance.
//!
//! A call that runs longer than one epoch tick yields to the async runtime at
//! every tick, so a slow or looping plugin never holds a worker thread for its
//! whole deadline; at the deadline it is interrupted. Failures feed the
//! plugin's crash-loop [`Breaker`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwapOption;
use wasmtime::component::Component;
use wasmtime::{Store, StoreLimitsBuilder, Trap, UpdateDeadline};

use super::bindings::{RequestHead, RouteDecision, RouterPlugin, RouterPluginPre, Verdict, WafPlugin, WafPluginPre};
use super::breaker::{Breaker, BreakerLimits};
use super::host_api::{HostState, PluginContext};
use super::runtime::Runtime;
use crate::config::{OnError, PluginKind};

/// Idle instances kept per plugin; more are created under load and dropped
/// when the pool is full.
const MAX_IDLE_INSTANCES: usize = 16;

/// Elements one table of a plugin may grow to (a Rust plugin uses hundreds).
const MAX_TABLE_ELEMENTS: usize = 100_000;

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
    pub quarantines: u64,
    /// Whether calls are currently refused by the crash-loop breaker.
    pub quarantined: bool,
    /// Why the latest failed call failed.
    pub last_error: Option<String>,
}

/// A component linked and checked against one of the two plugin worlds.
pub(crate) enum Pre {
    Router(RouterPluginPre<HostState>),
    Waf(WafPluginPre<HostState>),
}

impl Pre {
    /// Links `component` and finds which world it implements: the one whose
    /// generated bindings accept its exports (names, versions and types).
    pub(crate) fn new(runtime: &Runtime, component: &Component) -> anyhow::Result<Pre> {
        let instance_pre = runtime.linker.instantiate_pre(component)?;
        let router = RouterPluginPre::new(instance_pre.clone());
        let waf = WafPluginPre::new(instance_pre);
        match (router, waf) {
            (Ok(router), Err(_)) => Ok(Pre::Router(router)),
            (Err(_), Ok(waf)) => Ok(Pre::Waf(waf)),
            (Ok(_), Ok(_)) => anyhow::bail!(
                "exports both `wasmgate:plugin/router` and `wasmgate:plugin/waf`; a plugin is one or the other"
            ),
            (Err(router), Err(waf)) => {
                let exports: Vec<String> =
                    component.component_type().exports(runtime.engine()).map(|(name, _)| name.to_owned()).collect();
                anyhow::bail!(
                    "implements neither the router-plugin nor the waf-plugin world (its exports: {}; as a router: {router:#}; as a WAF: {waf:#})",
                    if exports.is_empty() { "none".to_owned() } else { exports.join(", ") }
                )
            }
        }
    }

    pub(crate) fn kind(&self) -> PluginKind {
        match self {
            Pre::Router(_) => PluginKind::Router,
            Pre::Waf(_) => PluginKind::Waf,
        }
    }
}

enum Bindings {
    Router(RouterPlugin),
    Waf(WafPlugin),
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
    idle: Mutex<Vec<Instance>>,
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

impl LoadedPlugin {
    /// Links `component`, finds its world, and instantiates it once to prove
    /// it starts (that instance is kept for the first call).
    pub async fn new(
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
            idle: Mutex::new(Vec::new()),
            counters: Counters::default(),
            breaker: Breaker::new(limits.breaker),
        };
        let first = plugin.instantiate().await.map_err(anyhow::Error::from)?;
        plugin.put_back(first);
        Ok(plugin)
    }

    /// Asks a router plugin where `head` goes.
    pub async fn route(&self, head: &RequestHead) -> Result<RouteDecision, PluginError> {
        let mut instance = self.take(PluginKind::Router).await?;
        let Bindings::Router(bindings) = &instance.bindings else {
            unreachable!("take() checked the kind");
        };
        let bindings = bindings.wasmgate_plugin_router();
        self.arm(&mut instance.store);
        let result =
            tokio::time::timeout(self.limits.call_timeout, bindings.call_route(&mut instance.store, head)).await;
        self.finish(instance, result)
    }

    /// Asks a WAF plugin for its verdict on `head`.
    pub async fn inspect(&self, head: &RequestHead) -> Result<Verdict, PluginError> {
        let mut instance = self.take(PluginKind::Waf).await?;
        let Bindings::Waf(bindings) = &instance.bindings else {
            unreachable!("take() checked the kind");
        };
        let bindings = bindings.wasmgate_plugin_waf();
        self.arm(&mut instance.store);
        let result =
            tokio::time::timeout(self.limits.call_timeout, bindings.call_inspect(&mut instance.store, head)).await;
        self.finish(instance, result)
    }

    /// A snapshot of this version's counters.
    pub fn stats(&self) -> PluginStats {
        let c = &self.counters;
        PluginStats {
            calls: c.calls.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
            timeouts: c.timeouts.load(Ordering::Relaxed),
            memory_limit_hits: c.memory_limit_hits.load(Ordering::Relaxed),
            quarantines: self.breaker.quarantines(),
            quarantined: self.breaker.is_open(),
            last_error: c.last_error.load_full().map(|e| e.as_ref().clone()),
        }
    }

    /// Counts a failure found after the call returned (an invalid decision).
    pub fn record_failure(&self, error: &PluginError) {
        self.failed(error);
    }

    /// Starts the deadline for the call about to begin: the epoch callback
    /// yields at every tick and interrupts once the call has run its time.
    fn arm(&self, store: &mut Store<HostState>) {
        let state = store.data_mut();
        state.call_deadline = Instant::now() + self.limits.call_timeout;
        state.caps.refused_memory = false;
        store.set_epoch_deadline(1);
    }

    /// Returns a healthy instance to the pool; turns a failure into an error.
    ///
    /// The outer timeout catches a call blocked in a host function (say, a
    /// WASI poll), where the epoch deadline cannot interrupt it.
    fn finish<T>(
        &self,
        instance: Instance,
        result: Result<wasmtime::Result<T>, tokio::time::error::Elapsed>,
    ) -> Result<T, PluginError> {
        let err = match result {
            Ok(Ok(value)) => {
                self.put_back(instance);
                self.succeeded();
                return Ok(value);
            }
            Ok(Err(err)) => self.classify(err, instance.store.data().caps.refused_memory),
            Err(_elapsed) => self.timeout_error(),
        };
        // The instance is dropped here: after a trap or an overrun its state
        // is unknown, so it never serves another request.
        drop(instance);
        self.failed(&err);
        Err(err)
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
        // The trap itself, without the wasm backtrace (logged at debug).
        tracing::debug!(plugin = %self.name, "plugin trap: {err:?}");
        let message = err.downcast_ref::<Trap>().map_or_else(|| err.to_string(), Trap::to_string);
        PluginError::Trap { plugin: self.name.clone(), message }
    }

    fn succeeded(&self) {
        if self.breaker.succeeded() {
            tracing::info!(plugin = %self.name, version = self.identity.version, "plugin recovered; quarantine over");
        }
    }

    /// Counts a failed call by its cause, remembers why, and feeds the breaker.
    fn failed(&self, error: &PluginError) {
        let c = &self.counters;
        c.errors.fetch_add(1, Ordering::Relaxed);
        match error {
            PluginError::Timeout { .. } => c.timeouts.fetch_add(1, Ordering::Relaxed),
            PluginError::MemoryLimit { .. } => c.memory_limit_hits.fetch_add(1, Ordering::Relaxed),
            _ => 0,
        };
        c.last_error.store(Some(Arc::new(error.to_string())));
        if let Some(tripped) = self.breaker.failed() {
            tracing::warn!(
                plugin = %self.name,
                version = self.identity.version,
                consecutive_failures = tripped.consecutive_failures,
                backoff_ms = tripped.backoff.as_millis() as u64,
                last_error = %error,
                "plugin quarantined; its on_error policy applies until the backoff ends"
            );
        }
    }

    async fn take(&self, expected: PluginKind) -> Result<Instance, PluginError> {
        if self.kind != expected {
            return Err(PluginError::WrongKind { plugin: self.name.clone(), actual: self.kind, expected });
        }
        if !self.breaker.admit(self.limits.call_timeout) {
            return Err(PluginError::Quarantined { plugin: self.name.clone() });
        }
        let c = &self.counters;
        c.calls.fetch_add(1, Ordering::Relaxed);
        let idle = self.idle.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).pop();
        match idle {
            Some(instance) => Ok(instance),
            None => match tokio::time::timeout(self.limits.call_timeout, self.instantiate()).await {
                Ok(Ok(instance)) => Ok(instance),
                Ok(Err(error)) => {
                    self.failed(&error);
                    Err(error)
                }
                Err(_elapsed) => {
                    let error = self.timeout_error();
                    self.failed(&error);
                    Err(error)
                }
            },
        }
    }

    fn put_back(&self, instance: Instance) {
        let mut idle = self.idle.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if idle.len() < MAX_IDLE_INSTANCES {
            idle.push(instance);
        }
    }

    async fn instantiate(&self) -> Result<Instance, PluginError> {
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
        store.epoch_deadline_callback(|store| {
            if Instant::now() >= store.data().call_deadline {
                Ok(UpdateDeadline::Interrupt)
            } else {
                Ok(UpdateDeadline::Yield(1))
            }
        });
        // Start-up code (constructors, static initialisers) is bounded too.
        self.arm(&mut store);
        let bindings = match &self.pre {
            Pre::Router(pre) => pre.instantiate_async(&mut store).await.map(Bindings::Router),
            Pre::Waf(pre) => pre.instantiate_async(&mut store).await.map(Bindings::Waf),
        };
        match bindings {
            Ok(bindings) => Ok(Instance { store, bindings }),
            Err(err) => Err(PluginError::Instantiate { plugin: self.name.clone(), message: format!("{err:#}") }),
        }
    }
}
