//! One loaded plugin: its compiled component, identity, limits, and a small
//! pool of instances that calls reuse.
//!
//! A call takes an idle instance (or instantiates one), arms the epoch
//! deadline, and runs the export. An instance that returns normally goes back
//! to the pool; one that trapped, overran its deadline or hit its memory cap
//! is dropped, so no later request ever runs on a broken instance.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use wasmtime::component::Component;
use wasmtime::{Store, StoreLimitsBuilder, Trap};

use super::bindings::{RequestHead, RouteDecision, RouterPlugin, RouterPluginPre, Verdict, WafPlugin, WafPluginPre};
use super::host_api::{HostState, PluginContext};
use super::runtime::{EPOCH_TICK, Runtime};
use crate::config::OnError;

/// Idle instances kept per plugin; more are created under load and dropped
/// when the pool is full.
const MAX_IDLE_INSTANCES: usize = 16;

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
            | PluginError::WrongKind { plugin, .. } => plugin,
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

/// A compiled, validated plugin ready to be called.
pub struct LoadedPlugin {
    pub name: String,
    pub kind: PluginKind,
    /// Hex SHA-256 of the component file.
    pub sha256: String,
    pub limits: PluginLimits,
    runtime: Arc<Runtime>,
    context: Arc<PluginContext>,
    pre: Pre,
    idle: Mutex<Vec<Instance>>,
}

impl LoadedPlugin {
    /// Links `component`, reads its kind from its exports, and instantiates it
    /// once to prove it starts (that instance is kept for the first call).
    pub async fn new(
        runtime: Arc<Runtime>,
        component: Component,
        sha256: String,
        context: Arc<PluginContext>,
        limits: PluginLimits,
    ) -> anyhow::Result<LoadedPlugin> {
        let instance_pre = runtime.linker.instantiate_pre(&component)?;
        let pre = match RouterPluginPre::new(instance_pre.clone()) {
            Ok(router) => Pre::Router(router),
            Err(router_err) => match WafPluginPre::new(instance_pre) {
                Ok(waf) => Pre::Waf(waf),
                Err(waf_err) => anyhow::bail!(
                    "exports neither `wasmgate:plugin/router` ({router_err}) nor `wasmgate:plugin/waf` ({waf_err})"
                ),
            },
        };
        let kind = match pre {
            Pre::Router(_) => PluginKind::Router,
            Pre::Waf(_) => PluginKind::Waf,
        };
        let plugin = LoadedPlugin {
            name: context.name.clone(),
            kind,
            sha256,
            limits,
            runtime,
            context,
            pre,
            idle: Mutex::new(Vec::new()),
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
        let result = bindings.call_route(&mut instance.store, head).await;
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
        let result = bindings.call_inspect(&mut instance.store, head).await;
        self.finish(instance, result)
    }

    /// Sets the deadline for the call about to start.
    fn arm(&self, store: &mut Store<HostState>) {
        let ticks = self.limits.call_timeout.as_micros().div_ceil(EPOCH_TICK.as_micros()) as u64;
        // One extra tick: the current tick may be about to end.
        store.set_epoch_deadline(ticks + 1);
    }

    /// Returns a healthy instance to the pool; turns a failure into an error.
    fn finish<T>(&self, instance: Instance, result: wasmtime::Result<T>) -> Result<T, PluginError> {
        match result {
            Ok(value) => {
                self.put_back(instance);
                Ok(value)
            }
            Err(err) => {
                // The instance is dropped here: after a trap its state is
                // unknown, so it never serves another request.
                drop(instance);
                Err(self.classify(err))
            }
        }
    }

    fn classify(&self, err: wasmtime::Error) -> PluginError {
        if let Some(Trap::Interrupt) = err.downcast_ref::<Trap>() {
            return PluginError::Timeout {
                plugin: self.name.clone(),
                timeout_ms: self.limits.call_timeout.as_millis() as u64,
            };
        }
        // The trap itself, without the wasm backtrace (logged at debug).
        tracing::debug!(plugin = %self.name, "plugin trap: {err:?}");
        let message = err.downcast_ref::<Trap>().map_or_else(|| err.to_string(), Trap::to_string);
        PluginError::Trap { plugin: self.name.clone(), message }
    }

    async fn take(&self, expected: PluginKind) -> Result<Instance, PluginError> {
        if self.kind != expected {
            return Err(PluginError::WrongKind { plugin: self.name.clone(), actual: self.kind, expected });
        }
        let idle = self.idle.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).pop();
        match idle {
            Some(instance) => Ok(instance),
            None => self.instantiate().await,
        }
    }

    fn put_back(&self, instance: Instance) {
        let mut idle = self.idle.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if idle.len() < MAX_IDLE_INSTANCES {
            idle.push(instance);
        }
    }

    async fn instantiate(&self) -> Result<Instance, PluginError> {
        let limits = StoreLimitsBuilder::new().memory_size(self.limits.memory_limit_bytes).build();
        let mut store = Store::new(&self.runtime.engine, HostState::new(self.context.clone(), limits));
        store.limiter(|state| &mut state.limits);
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
