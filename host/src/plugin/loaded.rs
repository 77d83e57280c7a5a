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
//! whole deadline; at the deadline it is interrupted.
//!
//! The crash-loop breaker: after `quarantine_after_failures` consecutive
//! failures the plugin is quarantined (its `on_error` outcome applies without
//! calling it) for a backoff that doubles with each quarantine up to a cap. The
//! first call after a quarantine is a trial: a failure quarantines it again,
//! a success closes the breaker.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use wasmtime::component::Component;
use wasmtime::{Store, StoreLimitsBuilder, Trap, UpdateDeadline};

use super::bindings::{RequestHead, RouteDecision, RouterPlugin, RouterPluginPre, Verdict, WafPlugin, WafPluginPre};
use super::host_api::{HostState, PluginContext};
use super::runtime::Runtime;
use crate::config::OnError;

/// Idle instances kept per plugin; more are created under load and dropped
/// when the pool is full.
const MAX_IDLE_INSTANCES: usize = 16;

/// Elements one table of a plugin may grow to (a Rust plugin uses hundreds).
const MAX_TABLE_ELEMENTS: usize = 100_000;

/// Which contract a component implements, read from its exports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PluginKind {
    Router,
    Waf,
}

impl PluginKind {
    pub fn role(self) -> crate::config::PluginRole {
        match self {
            PluginKind::Router => crate::config::PluginRole::Router,
            PluginKind::Waf => crate::config::PluginRole::Waf,
        }
    }
}

impl std::fmt::Display for PluginKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.role().fmt(f)
    }
}

/// Why a plugin call produced no decision.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("plugin `{plugin}` ran past its {timeout_ms} ms deadline")]
    Timeout { plugin: String, timeout_ms: u64 },
    #[error("plugin `{plugin}` trapped: {message}")]
    Trap { plugin: String, message: String },
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
    pub quarantine_after_failures: u32,
    pub quarantine_initial: Duration,
    pub quarantine_max: Duration,
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
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PluginStats {
    pub calls: u64,
    pub errors: u64,
    pub timeouts: u64,
    pub quarantines: u64,
    /// Whether calls are currently refused by the crash-loop breaker.
    pub quarantined: bool,
}

enum Pre {
    Router(RouterPluginPre<HostState>),
    Waf(WafPluginPre<HostState>),
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
    quarantines: AtomicU64,
    consecutive_failures: AtomicU32,
    /// Quarantines since the last success: the backoff doubles with each.
    backoff_level: AtomicU32,
    /// Milliseconds after `born` until which calls are refused (0: none).
    quarantined_until_ms: AtomicU64,
    /// When (ms after `born`, +1) the trial call after a quarantine started;
    /// 0: none under way. A trial older than a call's deadline was abandoned
    /// (its request went away), so another may start.
    trial_started_ms: AtomicU64,
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
    born: Instant,
}

/// What [`LoadedPlugin::new`] needs besides the component.
pub struct PluginSource {
    pub sha256: String,
    pub source_hash: String,
    pub version: u64,
    pub from_cache: bool,
}

impl LoadedPlugin {
    /// Links `component`, reads its kind from its exports, and instantiates it
    /// once to prove it starts (that instance is kept for the first call).
    pub async fn new(
        runtime: Arc<Runtime>,
        component: Component,
        source: PluginSource,
        context: Arc<PluginContext>,
        limits: PluginLimits,
    ) -> anyhow::Result<LoadedPlugin> {
        let kind = kind_of(&runtime, &component)?;
        let instance_pre = runtime.linker.instantiate_pre(&component)?;
        let pre = match kind {
            PluginKind::Router => Pre::Router(RouterPluginPre::new(instance_pre)?),
            PluginKind::Waf => Pre::Waf(WafPluginPre::new(instance_pre)?),
        };
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
            born: Instant::now(),
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
            quarantines: c.quarantines.load(Ordering::Relaxed),
            quarantined: self.now_ms() < c.quarantined_until_ms.load(Ordering::Relaxed),
        }
    }

    /// Counts a failure found after the call returned (an invalid decision).
    pub fn record_failure(&self, error: &PluginError) {
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
        self.failed(error);
    }

    /// Starts the deadline for the call about to begin: the epoch callback
    /// yields at every tick and interrupts once the call has run its time.
    fn arm(&self, store: &mut Store<HostState>) {
        store.data_mut().call_deadline = Instant::now() + self.limits.call_timeout;
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
            Ok(Err(err)) => self.classify(err),
            Err(_elapsed) => self.timeout_error(),
        };
        // The instance is dropped here: after a trap or an overrun its state
        // is unknown, so it never serves another request.
        drop(instance);
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
        if matches!(err, PluginError::Timeout { .. }) {
            self.counters.timeouts.fetch_add(1, Ordering::Relaxed);
        }
        self.failed(&err);
        Err(err)
    }

    fn timeout_error(&self) -> PluginError {
        PluginError::Timeout { plugin: self.name.clone(), timeout_ms: self.limits.call_timeout.as_millis() as u64 }
    }

    fn classify(&self, err: wasmtime::Error) -> PluginError {
        if let Some(Trap::Interrupt) = err.downcast_ref::<Trap>() {
            return self.timeout_error();
        }
        // The trap itself, without the wasm backtrace (logged at debug).
        tracing::debug!(plugin = %self.name, "plugin trap: {err:?}");
        let message = err.downcast_ref::<Trap>().map_or_else(|| err.to_string(), Trap::to_string);
        PluginError::Trap { plugin: self.name.clone(), message }
    }

    fn now_ms(&self) -> u64 {
        self.born.elapsed().as_millis() as u64
    }

    fn succeeded(&self) {
        let c = &self.counters;
        c.consecutive_failures.store(0, Ordering::Relaxed);
        if c.backoff_level.swap(0, Ordering::Relaxed) != 0 {
            c.quarantined_until_ms.store(0, Ordering::Relaxed);
            c.trial_started_ms.store(0, Ordering::Release);
            tracing::info!(plugin = %self.name, version = self.identity.version, "plugin recovered; quarantine over");
        }
    }

    fn failed(&self, error: &PluginError) {
        let c = &self.counters;
        let failures = c.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < self.limits.quarantine_after_failures {
            return;
        }
        let level = c.backoff_level.fetch_add(1, Ordering::Relaxed).min(20);
        let backoff = self.limits.quarantine_initial.saturating_mul(1 << level).min(self.limits.quarantine_max);
        c.quarantined_until_ms.store(self.now_ms() + backoff.as_millis() as u64, Ordering::Relaxed);
        // After the quarantine one more failure is enough to re-trip.
        c.consecutive_failures.store(self.limits.quarantine_after_failures.saturating_sub(1), Ordering::Relaxed);
        c.quarantines.fetch_add(1, Ordering::Relaxed);
        c.trial_started_ms.store(0, Ordering::Release);
        tracing::warn!(
            plugin = %self.name,
            version = self.identity.version,
            consecutive_failures = failures,
            backoff_ms = backoff.as_millis() as u64,
            last_error = %error,
            "plugin quarantined; its on_error policy applies until the backoff ends"
        );
    }

    async fn take(&self, expected: PluginKind) -> Result<Instance, PluginError> {
        if self.kind != expected {
            return Err(PluginError::WrongKind { plugin: self.name.clone(), actual: self.kind, expected });
        }
        let c = &self.counters;
        let until = c.quarantined_until_ms.load(Ordering::Relaxed);
        // After a quarantine, one trial call at a time until one succeeds.
        if until != 0 {
            let now = self.now_ms();
            let started = c.trial_started_ms.load(Ordering::Acquire);
            let abandoned = started != 0 && now + 1 > started + self.limits.call_timeout.as_millis() as u64 * 2;
            let may_try = now >= until
                && (started == 0 || abandoned)
                && c.trial_started_ms.compare_exchange(started, now + 1, Ordering::AcqRel, Ordering::Acquire).is_ok();
            if !may_try {
                return Err(PluginError::Quarantined { plugin: self.name.clone() });
            }
        }
        c.calls.fetch_add(1, Ordering::Relaxed);
        let idle = self.idle.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).pop();
        match idle {
            Some(instance) => Ok(instance),
            None => match tokio::time::timeout(self.limits.call_timeout, self.instantiate()).await {
                Ok(Ok(instance)) => Ok(instance),
                Ok(Err(error)) => {
                    c.errors.fetch_add(1, Ordering::Relaxed);
                    self.failed(&error);
                    Err(error)
                }
                Err(_elapsed) => {
                    let error = self.timeout_error();
                    c.errors.fetch_add(1, Ordering::Relaxed);
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
        store.limiter(|state| &mut state.limits);
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

/// The kind of a component, read from its exports.
pub fn kind_of(runtime: &Runtime, component: &Component) -> anyhow::Result<PluginKind> {
    let ty = component.component_type();
    let exports: Vec<String> = ty.exports(runtime.engine()).map(|(name, _)| name.to_owned()).collect();
    let router = exports.iter().any(|e| e.starts_with("wasmgate:plugin/router@"));
    let waf = exports.iter().any(|e| e.starts_with("wasmgate:plugin/waf@"));
    match (router, waf) {
        (true, false) => Ok(PluginKind::Router),
        (false, true) => Ok(PluginKind::Waf),
        (true, true) => anyhow::bail!(
            "exports both `wasmgate:plugin/router` and `wasmgate:plugin/waf`; a plugin is one or the other"
        ),
        (false, false) => anyhow::bail!(
            "exports neither `wasmgate:plugin/router` nor `wasmgate:plugin/waf` (its exports: {})",
            if exports.is_empty() { "none".to_owned() } else { exports.join(", ") }
        ),
    }
}
