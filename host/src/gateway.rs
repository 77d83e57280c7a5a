//! Starting the gateway: load the plugins, build the pools, bind every
//! listener, and serve until stopped. `wasmgate check` runs the same steps
//! short of binding.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::task::JoinHandle;

use crate::admin::AdminState;
use crate::config::{Config, ListenerProtocol};
use crate::counter::Counters;
use crate::listener::{ConnectionCap, ConnectionLimits};
use crate::plugin::host_api::HostServices;
use crate::plugin::watcher::{self, Watcher};
use crate::plugin::{Loader, Registry, Runtime};
use crate::pool::Pools;
use crate::proxy::{self, ListenerProxy, Shared};
use crate::relay::RelayLimits;
use crate::shutdown::Drain;
use crate::tls::{self, CertStore};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// How long a draining gateway waits for requests on connections it
/// accepted just before it stopped accepting.
const ACCEPTED_SETTLE: Duration = Duration::from_millis(500);

/// How long a drained gateway lingers so the last responses reach the wire.
const RESPONSE_FLUSH: Duration = Duration::from_millis(250);

/// A running gateway. Dropping it stops its listeners and its plugin watch.
pub struct Gateway {
    listeners: Vec<(String, SocketAddr)>,
    listener_tasks: Vec<JoinHandle<()>>,
    tasks: Vec<JoinHandle<()>>,
    drain: Arc<Drain>,
    drain_window: Duration,
    registry: Arc<Registry>,
    pools: Arc<Pools>,
    admin: Option<SocketAddr>,
    _watcher: Option<Watcher>,
    _cert_watchers: Vec<notify::RecommendedWatcher>,
}

/// Everything a config needs before it can serve: plugins loaded and checked.
pub struct Prepared {
    pub config: Config,
    pub registry: Arc<Registry>,
    pub loader: Arc<Loader>,
    pub pools: Arc<Pools>,
}

/// Loads the config's plugins and checks that every plugin a listener names is
/// loaded with the role it is used in.
pub async fn prepare(config: Config) -> anyhow::Result<Prepared> {
    let runtime = Arc::new(Runtime::new().context("starting the WebAssembly runtime")?);
    let pools = Arc::new(Pools::new(&config.pool).map_err(anyhow::Error::msg)?);
    for listener in config.listener.iter().filter(|l| l.protocol == ListenerProtocol::Https) {
        CertStore::load(listener).map_err(anyhow::Error::msg)?;
    }
    let services = Arc::new(HostServices { counters: Counters::default(), pools: pools.clone() });
    let roles = config.plugin_roles()?;
    let loader = Arc::new(Loader::new(runtime, config.plugins.clone(), services, roles));
    let registry = Arc::new(Registry::new(config.plugins.on_error));
    let report = registry.reconcile(&loader).await;
    if let Err(problem) = proxy::check_plugin_roles(&config, &registry) {
        let reasons: Vec<String> =
            report.rejected.iter().map(|r| format!("\n  rejected {}: {}", r.file.display(), r.reason)).collect();
        anyhow::bail!("{problem}{}", reasons.concat());
    }
    Ok(Prepared { config, registry, loader, pools })
}

impl Gateway {
    /// Prepares `config`, binds its listeners and starts serving.
    pub async fn start(config: Config) -> anyhow::Result<Gateway> {
        let Prepared { config, registry, loader, pools } = prepare(config).await?;
        let watcher = if config.plugins.watch && config.plugins.dir.is_dir() {
            Some(watcher::watch(registry.clone(), loader).context("watching the plugin directory")?)
        } else {
            None
        };
        let shared = Arc::new(Shared {
            registry: registry.clone(),
            pools,
            relay_limits: RelayLimits {
                idle_timeout: Duration::from_secs(config.websocket.idle_timeout_s),
                max_lifetime: Duration::from_secs(config.websocket.max_lifetime_s),
            },
            drain: Arc::new(Drain::default()),
        });
        // Bind everything first: a redirect needs the HTTPS listener's port.
        let mut sockets = Vec::new();
        for listener_config in &config.listener {
            let socket = crate::listener::bind(listener_config.bind).with_context(|| {
                format!("listener `{}`: cannot bind {}", listener_config.name, listener_config.bind)
            })?;
            sockets.push((listener_config, socket.local_addr()?, socket));
        }
        let https_port =
            sockets.iter().find(|(l, _, _)| l.protocol == ListenerProtocol::Https).map(|(_, a, _)| a.port());

        let cap = Arc::new(ConnectionCap::new(config.limits.max_connections, shared.drain.clone()));
        let limits = ConnectionLimits {
            header_read_timeout: Duration::from_secs(config.limits.header_read_timeout_s),
            max_header_bytes: config.limits.max_header_bytes,
        };
        let mut listeners = Vec::new();
        let mut listener_tasks = Vec::new();
        let tasks = crate::probe::spawn_probers(shared.pools.all());
        let mut cert_watchers = Vec::new();
        for (listener_config, addr, socket) in sockets {
            let tls = match listener_config.protocol {
                ListenerProtocol::Http => None,
                ListenerProtocol::Https => {
                    let store = Arc::new(CertStore::load(listener_config).map_err(anyhow::Error::msg)?);
                    cert_watchers.push(tls::watch(store.clone()).context("watching certificate files")?);
                    Some(TlsAcceptor::from(tls::server_config(store)))
                }
            };
            let kind =
                if tls.is_some() { "https: HTTP/1.1, HTTP/2, WebSocket" } else { "http: HTTP/1.1, h2c, WebSocket" };
            tracing::info!(listener = %listener_config.name, %addr, "listening ({kind})");
            let redirect = if listener_config.redirect_to_https { https_port } else { None };
            let proxy = Arc::new(ListenerProxy::new(listener_config, shared.clone(), redirect));
            let stop = shared.drain.started();
            listener_tasks.push(tokio::spawn(crate::listener::serve(socket, proxy, tls, limits, cap.clone(), stop)));
            listeners.push((listener_config.name.clone(), addr));
        }
        let admin = match &config.admin {
            None => None,
            Some(admin_config) => {
                let token = match &admin_config.token_file {
                    Some(file) => Some(
                        std::fs::read_to_string(file)
                            .with_context(|| format!("admin: reading token_file {}", file.display()))?
                            .trim()
                            .to_owned(),
                    ),
                    None => None,
                };
                let socket = TcpListener::bind(admin_config.listen)
                    .await
                    .with_context(|| format!("admin: cannot bind {}", admin_config.listen))?;
                let addr = socket.local_addr()?;
                let state = Arc::new(AdminState {
                    listeners: listeners.clone(),
                    pools: shared.pools.clone(),
                    registry: registry.clone(),
                    drain: shared.drain.clone(),
                    token,
                    started: std::time::Instant::now(),
                });
                tracing::info!(%addr, "admin listening (/healthz, /readyz, /status)");
                listener_tasks.push(tokio::spawn(crate::admin::serve(socket, state)));
                Some(addr)
            }
        };
        Ok(Gateway {
            admin,
            listeners,
            listener_tasks,
            tasks,
            registry,
            pools: shared.pools.clone(),
            drain: shared.drain.clone(),
            drain_window: Duration::from_secs(config.websocket.drain_s),
            _watcher: watcher,
            _cert_watchers: cert_watchers,
        })
    }

    /// The address listener `name` is bound to.
    pub fn listener_addr(&self, name: &str) -> Option<SocketAddr> {
        self.listeners.iter().find(|(n, _)| n == name).map(|(_, addr)| *addr)
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The admin listener's address, if there is one.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin
    }

    /// The pools, with their servers' live health.
    pub fn pools(&self) -> &Pools {
        &self.pools
    }

    /// Serves until SIGINT or SIGTERM, then drains (see [`crate::shutdown`]).
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        use tokio::signal::unix::{SignalKind, signal};
        let (mut terminate, mut interrupt) = (signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?);
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
        self.drain().await;
        tokio::select! {
            _ = self.wait_drained() => tracing::info!("drained; exiting"),
            _ = terminate.recv() => tracing::warn!("second signal: exiting now"),
            _ = interrupt.recv() => tracing::warn!("second signal: exiting now"),
        }
        Ok(())
    }

    /// Stops accepting and starts closing WebSockets over the drain window.
    pub async fn drain(&self) {
        tracing::info!(
            requests = self.drain.in_flight(),
            websockets = self.drain.websockets(),
            drain_s = self.drain_window.as_secs(),
            "stopping: no new connections; requests finish, WebSockets get Close 1001 over the drain window"
        );
        self.drain.begin(self.drain_window);
    }

    /// Resolves when nothing is left, or the window and the close grace are over.
    pub async fn wait_drained(&self) {
        let now = tokio::time::Instant::now();
        let deadline = now + self.drain_window + crate::relay::CLOSE_GRACE + Duration::from_secs(1);
        // A connection accepted just before the stop may not have sent its
        // request yet; give it time to, so it is served rather than cut.
        tokio::time::sleep_until(now + ACCEPTED_SETTLE.min(self.drain_window)).await;
        while self.drain.in_flight() + self.drain.websockets() > 0 {
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(
                    requests = self.drain.in_flight(),
                    websockets = self.drain.websockets(),
                    "drain window over; cutting what is left"
                );
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The last responses were handed to their connections; let them be
        // written before the process exits.
        tokio::time::sleep(RESPONSE_FLUSH).await;
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        for task in self.tasks.iter().chain(&self.listener_tasks) {
            task.abort();
        }
    }
}
