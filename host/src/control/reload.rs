//! Applying a configuration: at start (onto nothing) and on every reload
//! (SIGHUP, `POST /reload`), by the same steps.
//!
//! 1. Everything that can fail happens first: the file is parsed and
//!    validated, the plugins it names are checked, the new pools are built
//!    (CA files), certificates are loaded and new sockets bound. A failure
//!    refuses the whole config and nothing changes.
//! 2. Then it is committed, which cannot fail: each listener's rules are
//!    swapped whole (a request sees the old config or the new one, never a
//!    mix), new accept loops start, replaced or removed ones stop, probers
//!    of new and changed pools start.
//!
//! What survives: a listener (by name) keeps its count of live WebSockets;
//! a server that stays in its pool keeps its health and connections; an
//! unchanged pool is kept whole. Established WebSockets never look at the
//! config again, so a reload cannot touch them — unless it removes the
//! server or the listener they belong to: those get Close 1001, each at a
//! random moment of `drain_s`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use crate::config::{Config, ListenerConfig, ListenerProtocol, PluginKind};
use crate::edge::listener::{self, ConnectionCap, ConnectionLimits};
use crate::edge::tls::{self, CertStore};
use crate::file_watch::FileWatch;
use crate::plugin::Loader;
use crate::plugin::host_api::HostServices;
use crate::request::{HttpsTarget, ListenerProxy, ListenerRules, Shared};
use crate::telemetry::metrics::ResultLabel;
use crate::upstream::Pools;
use crate::upstream::budget::SocketBudget;
use crate::upstream::pool::PoolChanges;
use crate::upstream::probe;
use crate::websocket::relay::RelayLimits;

/// Reloads remembered for the admin status and dashboard.
const HISTORY: usize = 20;

/// The outcome of applying a config, as `POST /reload` answers it.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadReport {
    /// `applied` or `refused`.
    pub result: &'static str,
    /// The config version serving after this reload.
    pub version: u64,
    /// What changed, one line each.
    pub changes: Vec<String>,
    /// Sections that changed but only take effect on a restart.
    pub restart_required: Vec<String>,
    /// Why a refused config was refused (file, line or key, reason).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When, in milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
}

impl ReloadReport {
    pub fn applied(&self) -> bool {
        self.result == "applied"
    }
}

/// One listener of the config in force, as the admin endpoints show it.
#[derive(Clone)]
pub struct ListenerView {
    pub name: String,
    pub addr: SocketAddr,
    pub proxy: Arc<ListenerProxy>,
    /// The certificates of an `https` listener.
    pub certs: Option<Arc<CertStore>>,
}

/// The config in force, for readers that must not wait for a reload.
pub struct View {
    pub version: u64,
    pub listeners: Vec<ListenerView>,
    pub pools: Arc<Pools>,
    pub drain_window: Duration,
}

impl std::fmt::Debug for View {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("View").field("version", &self.version).finish_non_exhaustive()
    }
}

/// The running gateway's configurable parts, and the one way to change them.
pub struct Control {
    shared: Arc<Shared>,
    loader: Arc<Loader>,
    services: Arc<HostServices>,
    cap: Arc<ConnectionCap>,
    limits: ConnectionLimits,
    /// The config the process started with: sections a reload cannot change
    /// are compared against it.
    started_with: Config,
    running: tokio::sync::Mutex<Running>,
    view: ArcSwap<View>,
    history: Mutex<VecDeque<ReloadReport>>,
    /// Set when the gateway is dropped: nothing may start again.
    stopped: std::sync::atomic::AtomicBool,
}

/// What a config started, kept to be changed by the next one.
#[derive(Default)]
struct Running {
    config: Option<Config>,
    version: u64,
    pools: Arc<Pools>,
    listeners: BTreeMap<String, RunningListener>,
    probers: HashMap<String, Prober>,
}

impl Running {
    /// Stops every accept loop and prober.
    fn clear(&mut self) {
        self.listeners.clear();
        self.probers.clear();
    }
}

struct RunningListener {
    proxy: Arc<ListenerProxy>,
    config: ListenerConfig,
    addr: SocketAddr,
    accept: AcceptLoop,
}

/// A listener's accept loop; dropping it stops accepting (connections
/// already accepted carry on).
struct AcceptLoop {
    _stop: oneshot::Sender<()>,
    certs: Option<Arc<CertStore>>,
    _cert_watcher: Option<FileWatch>,
}

/// A pool's probing task; dropping it stops probing.
struct Prober(JoinHandle<()>);

impl Drop for Prober {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A socket bound (and certificates loaded) for a new or rebound listener,
/// before the config is committed.
struct Opened {
    socket: tokio::net::TcpListener,
    addr: SocketAddr,
    tls: Option<(Arc<CertStore>, FileWatch)>,
}

/// A config checked, with everything it needs that could fail already made
/// (pools, certificates, bound sockets): step 1's result. Nothing running
/// has changed yet; dropping it changes nothing.
struct Prepared {
    config: Config,
    roles: HashMap<String, (PluginKind, String)>,
    pools: Arc<Pools>,
    pool_changes: PoolChanges,
    /// By listener name: the new and rebound listeners' sockets.
    opened: HashMap<String, Opened>,
}

/// What committing a config did, for the report.
struct Committed {
    changes: Vec<String>,
    restart_required: Vec<String>,
}

impl Control {
    pub fn new(
        shared: Arc<Shared>,
        loader: Arc<Loader>,
        services: Arc<HostServices>,
        cap: Arc<ConnectionCap>,
        started_with: Config,
    ) -> Control {
        let limits = ConnectionLimits {
            header_read_timeout: Duration::from_secs(started_with.limits.header_read_timeout_s),
            max_header_bytes: started_with.limits.max_header_bytes,
            client_idle_timeout: Duration::from_secs(started_with.limits.client_idle_timeout_s),
            max_concurrent_streams: started_with.limits.max_concurrent_streams,
        };
        let upstream = SocketBudget::new("the process", cap.upstream_allowance());
        Control {
            shared,
            loader,
            services,
            cap,
            limits,
            view: ArcSwap::from_pointee(View {
                version: 0,
                listeners: Vec::new(),
                pools: Arc::default(),
                drain_window: Duration::from_secs(started_with.websocket.drain_s),
            }),
            started_with,
            running: tokio::sync::Mutex::new(Running { pools: Arc::new(Pools::empty(upstream)), ..Running::default() }),
            history: Mutex::default(),
            stopped: Default::default(),
        }
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// What the plugins' host calls use (their counters, the pools' health).
    pub fn services(&self) -> &Arc<HostServices> {
        &self.services
    }

    /// The config in force.
    pub fn view(&self) -> Arc<View> {
        self.view.load_full()
    }

    /// The last reloads, oldest first.
    pub fn history(&self) -> Vec<ReloadReport> {
        self.history.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned().collect()
    }

    /// Stops every listener's accept loop and every prober (the gateway is
    /// dropped); connections already accepted carry on.
    pub fn stop(&self) {
        self.stopped.store(true, std::sync::atomic::Ordering::Release);
        // A reload under way holds the lock; it clears up after itself once
        // it sees `stopped` (see `apply`).
        if let Ok(mut running) = self.running.try_lock() {
            running.clear();
        }
    }

    /// True once the gateway was dropped.
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Reads the config file again and applies it (SIGHUP, `POST /reload`).
    pub async fn reload(&self) -> ReloadReport {
        let source = self.running.lock().await.config.as_ref().map(|c| c.source.clone());
        let Some(source) = source else {
            return self.refused("the gateway has not started".into()).await;
        };
        match Config::load(&source) {
            Ok(config) => self.apply(config).await,
            Err(error) => self.refused(error.to_string()).await,
        }
    }

    /// Applies `config` whole, or refuses it and changes nothing.
    pub async fn apply(&self, config: Config) -> ReloadReport {
        let mut running = self.running.lock().await;
        let outcome = self.prepare(&running, config).map(|prepared| self.commit(&mut running, prepared));
        if self.is_stopped() {
            running.clear();
        }
        let report = match outcome {
            Ok(Committed { changes, restart_required }) => {
                for change in &changes {
                    tracing::info!(version = running.version, "config: {change}");
                }
                for section in &restart_required {
                    tracing::warn!("config: [{section}] changed; it takes effect on the next restart");
                }
                report("applied", running.version, changes, restart_required, None)
            }
            Err(error) => {
                tracing::error!(version = running.version, %error, "config refused; the previous one keeps serving");
                report("refused", running.version, Vec::new(), Vec::new(), Some(error))
            }
        };
        self.remember(&report);
        report
    }

    async fn refused(&self, error: String) -> ReloadReport {
        let version = self.running.lock().await.version;
        tracing::error!(version, %error, "config refused; the previous one keeps serving");
        let report = report("refused", version, Vec::new(), Vec::new(), Some(error));
        self.remember(&report);
        report
    }

    fn remember(&self, report: &ReloadReport) {
        // Version 1 applied is the start, not a reload.
        if !(report.applied() && report.version == 1) {
            self.shared.metrics.reloads.get_or_create(&ResultLabel { result: report.result }).inc();
        }
        let mut history = self.history.lock().unwrap_or_else(|p| p.into_inner());
        if history.len() == HISTORY {
            history.pop_front();
        }
        history.push_back(report.clone());
    }

    /// Step 1: everything that can fail. Changes nothing that runs.
    fn prepare(&self, running: &Running, config: Config) -> Result<Prepared, String> {
        if self.shared.drain.is_draining() || self.is_stopped() {
            return Err("the gateway is shutting down".into());
        }
        self.shared.registry.check_roles(&config)?;
        let roles = config.plugin_roles().map_err(|e| e.to_string())?;
        let (pools, pool_changes) = running.pools.update(&config.pool)?;
        let mut opened = HashMap::new();
        for listener in &config.listener {
            if running.listeners.get(&listener.name).is_some_and(|r| same_socket(&r.config, listener)) {
                continue;
            }
            opened.insert(listener.name.clone(), open(listener)?);
        }
        Ok(Prepared { config, roles, pools: Arc::new(pools), pool_changes, opened })
    }

    /// Step 2: puts a prepared config into effect. It cannot fail.
    fn commit(&self, running: &mut Running, prepared: Prepared) -> Committed {
        let Prepared { config, roles, pools, pool_changes, mut opened } = prepared;
        let window = Duration::from_secs(config.websocket.drain_s);
        pools.commit();
        self.services.pools.store(pools.clone());
        self.loader.set_roles(roles);

        let mut changes = Vec::new();
        self.commit_listeners(running, &config, &pools, &mut opened, window, &mut changes);
        commit_pools(running, &pools, &pool_changes, window, &mut changes);
        let restart_required = self.restart_required(running, &config, &mut changes);

        running.version += 1;
        running.pools = pools.clone();
        self.view.store(Arc::new(View {
            version: running.version,
            listeners: running
                .listeners
                .iter()
                .map(|(name, l)| ListenerView {
                    name: name.clone(),
                    addr: l.addr,
                    proxy: l.proxy.clone(),
                    certs: l.accept.certs.clone(),
                })
                .collect(),
            pools,
            drain_window: window,
        }));
        running.config = Some(config);
        Committed { changes, restart_required }
    }

    /// Gives every listener of `config` its new rules, starts the accept
    /// loops of new and rebound ones, and retires the removed ones.
    fn commit_listeners(
        &self,
        running: &mut Running,
        config: &Config,
        pools: &Arc<Pools>,
        opened: &mut HashMap<String, Opened>,
        window: Duration,
        changes: &mut Vec<String>,
    ) {
        let relay_limits = RelayLimits::new(
            Duration::from_secs(config.websocket.idle_timeout_s),
            Duration::from_secs(config.websocket.max_lifetime_s),
            config.websocket.splice,
        );
        let addr_of = |name: &str| {
            opened.get(name).map(|o: &Opened| o.addr).or_else(|| running.listeners.get(name).map(|r| r.addr))
        };
        let https = config.listener.iter().find(|l| l.protocol == ListenerProtocol::Https);
        let https_target = https.and_then(|l| {
            let port = addr_of(&l.name)?.port();
            let hosts = l.certificate.iter().flat_map(|c| &c.hosts).map(|h| h.to_ascii_lowercase()).collect();
            Some(Arc::new(HttpsTarget { port, hosts }))
        });

        let mut listeners = BTreeMap::new();
        for config in &config.listener {
            let rules = ListenerRules::new(
                config,
                pools.clone(),
                relay_limits,
                https_target.clone(),
                &self.shared.metrics,
                &self.shared.registry,
            );
            let old = running.listeners.remove(&config.name);
            let proxy = match &old {
                Some(old) => {
                    describe_listener(&old.config, config, changes);
                    old.proxy.set_rules(rules);
                    old.proxy.clone()
                }
                None => Arc::new(ListenerProxy::new(&config.name, rules, self.shared.clone())),
            };
            let (addr, accept) = match (opened.remove(&config.name), old) {
                (Some(opened), old) => {
                    let addr = opened.addr;
                    match &old {
                        Some(old) if old.addr == addr => changes
                            .push(format!("listener `{}` rebound on {addr} (protocol or TLS changed)", config.name)),
                        Some(old) => {
                            changes.push(format!("listener `{}` moved from {} to {addr}", config.name, old.addr))
                        }
                        None => changes.push(format!("listener `{}` added on {addr}", config.name)),
                    }
                    // The old loop (if any) stops when `old` drops below,
                    // after the new one accepts.
                    (addr, self.accept(opened, proxy.clone()))
                }
                (None, Some(old)) => (old.addr, old.accept),
                (None, None) => unreachable!("prepare() opened every listener without a running socket"),
            };
            listeners.insert(config.name.clone(), RunningListener { proxy, config: config.clone(), addr, accept });
        }
        for (name, removed) in std::mem::replace(&mut running.listeners, listeners) {
            let websockets = removed.proxy.live_websockets();
            removed.proxy.retire(window);
            changes.push(format!(
                "listener `{name}` removed: stopped accepting; its {websockets} WebSocket(s) close over {}s",
                window.as_secs()
            ));
        }
    }

    /// Sections that changed but take effect only on a restart (and a line
    /// for a changed `[websocket]`).
    fn restart_required(&self, running: &Running, config: &Config, changes: &mut Vec<String>) -> Vec<String> {
        let mut restart_required = Vec::new();
        let Some(previous) = &running.config else { return restart_required };
        if previous.websocket != config.websocket {
            changes.push("[websocket] changed: applies to new WebSockets and the next drain".into());
        }
        let started = &self.started_with;
        if started.admin != config.admin {
            restart_required.push("admin".to_owned());
        }
        if started.plugins != config.plugins {
            restart_required.push("plugins".to_owned());
        }
        if started.limits != config.limits {
            restart_required.push("limits".to_owned());
        }
        if started.log != config.log {
            restart_required.push("log".to_owned());
        }
        if started.cluster != config.cluster {
            restart_required.push("cluster".to_owned());
        }
        if started.otlp != config.otlp {
            restart_required.push("otlp".to_owned());
        }
        if started.watch_config != config.watch_config {
            restart_required.push("watch_config".to_owned());
        }
        restart_required
    }

    /// Starts accepting on a socket [`open`] bound.
    fn accept(&self, opened: Opened, proxy: Arc<ListenerProxy>) -> AcceptLoop {
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let drained = self.shared.drain.started();
        let stop = async move {
            tokio::select! {
                _ = drained => {}
                _ = stop_rx => {}
            }
        };
        let (tls, certs, cert_watcher) = match opened.tls {
            Some((store, watcher)) => {
                (Some(TlsAcceptor::from(tls::server_config(store.clone()))), Some(store), Some(watcher))
            }
            None => (None, None, None),
        };
        let kind = if tls.is_some() { "https: HTTP/1.1, HTTP/2, WebSocket" } else { "http: HTTP/1.1, h2c, WebSocket" };
        tracing::info!(listener = %proxy.name, addr = %opened.addr, "listening ({kind})");
        tokio::spawn(listener::serve(opened.socket, proxy, tls, self.limits, self.cap.clone(), stop));
        AcceptLoop { _stop: stop_tx, certs, _cert_watcher: cert_watcher }
    }
}

/// Retires the servers a reload removed and restarts the probers of new
/// and changed pools.
fn commit_pools(
    running: &mut Running,
    pools: &Pools,
    pool_changes: &PoolChanges,
    window: Duration,
    changes: &mut Vec<String>,
) {
    for name in &pool_changes.added {
        changes.push(format!("pool `{name}` added"));
    }
    for name in &pool_changes.removed {
        changes.push(format!("pool `{name}` removed"));
    }
    for name in &pool_changes.changed {
        changes.push(format!("pool `{name}` changed"));
    }
    for (pool, server) in &pool_changes.servers_added {
        if !pool_changes.added.contains(pool) {
            changes.push(format!("pool `{pool}`: server {server} added"));
        }
    }
    for server in &pool_changes.servers_removed {
        server.retire(window);
        changes.push(format!(
            "pool `{}`: server {} removed; its {} connection(s) close over {}s",
            server.pool,
            server.address,
            server.active(),
            window.as_secs()
        ));
    }
    for name in pool_changes.removed.iter().chain(&pool_changes.changed) {
        running.probers.remove(name);
    }
    for name in pool_changes.added.iter().chain(&pool_changes.changed) {
        if let Some(pool) = pools.get(name) {
            running.probers.insert(name.clone(), Prober(probe::spawn_prober(pool.clone())));
        }
    }
}

/// Loads a listener's certificates and binds its socket.
fn open(listener: &ListenerConfig) -> Result<Opened, String> {
    let tls = match listener.protocol {
        ListenerProtocol::Http => None,
        ListenerProtocol::Https => {
            let store = Arc::new(CertStore::load(listener)?);
            let watcher = tls::watch(store.clone()).map_err(|e| format!("watching certificate files: {e}"))?;
            Some((store, watcher))
        }
    };
    let socket = listener::bind(listener.bind)
        .map_err(|e| format!("listener `{}`: cannot bind {}: {e}", listener.name, listener.bind))?;
    let addr = socket.local_addr().map_err(|e| format!("listener `{}`: {e}", listener.name))?;
    Ok(Opened { socket, addr, tls })
}

/// True if two listener configs can share one socket and TLS setup.
fn same_socket(a: &ListenerConfig, b: &ListenerConfig) -> bool {
    a.bind == b.bind && a.protocol == b.protocol && a.certificate == b.certificate && a.unknown_sni == b.unknown_sni
}

/// Lines for what changed in a kept listener's rules.
fn describe_listener(old: &ListenerConfig, new: &ListenerConfig, changes: &mut Vec<String>) {
    let name = &new.name;
    if old.waf != new.waf {
        changes.push(format!("listener `{name}`: waf {:?} -> {:?}", old.waf, new.waf));
    }
    if old.router != new.router {
        changes.push(format!("listener `{name}`: router {:?} -> {:?}", old.router, new.router));
    }
    if old.default_pool != new.default_pool {
        changes.push(format!("listener `{name}`: default_pool {:?} -> {:?}", old.default_pool, new.default_pool));
    }
    if old.max_websockets != new.max_websockets {
        changes.push(format!("listener `{name}`: max_websockets {} -> {}", old.max_websockets, new.max_websockets));
    }
    if old.redirect_to_https != new.redirect_to_https {
        changes.push(format!(
            "listener `{name}`: redirect_to_https {} -> {}",
            old.redirect_to_https, new.redirect_to_https
        ));
    }
}

fn report(
    result: &'static str,
    version: u64,
    changes: Vec<String>,
    restart_required: Vec<String>,
    error: Option<String>,
) -> ReloadReport {
    let at_unix_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    ReloadReport { result, version, changes, restart_required, error, at_unix_ms }
}
