//! Starting the gateway: load the plugins, apply the config (bind every
//! listener, build the pools, start the probers — see [`super::reload`]),
//! start the admin listener, and serve until stopped, reloading on SIGHUP.
//! `wasmgate check` runs the same steps short of binding.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;

use super::admin::{self, AdminState};
use super::reload::{Control, ReloadReport};
use crate::config::{Config, ListenerProtocol};
use crate::counting::Counters;
use crate::edge::listener::ConnectionCap;
use crate::edge::tls::CertStore;
use crate::file_watch::{self, FileWatch};
use crate::plugin::host_api::HostServices;
use crate::plugin::watcher;
use crate::plugin::{Loader, Registry, Runtime};
use crate::request::Shared;
use crate::shutdown::Drain;
use crate::telemetry::access_log::AccessLog;
use crate::telemetry::otlp::Otlp;
use crate::upstream::{Pool, Pools};

/// How long a draining gateway waits for requests on connections it
/// accepted just before it stopped accepting.
const ACCEPTED_SETTLE: Duration = Duration::from_millis(500);

/// How long a drained gateway lingers so the last responses reach the wire.
const RESPONSE_FLUSH: Duration = Duration::from_millis(250);

/// A running gateway. Dropping it stops its listeners and its plugin watch.
pub struct Gateway {
    control: Arc<Control>,
    admin: Option<SocketAddr>,
    admin_task: Option<tokio::task::JoinHandle<()>>,
    _watcher: Option<FileWatch>,
    /// With `watch_config`: reloads when the config file changes.
    _config_watch: Option<FileWatch>,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(task) = &self.admin_task {
            task.abort();
        }
        // Listeners and probers stop with the config they belong to.
        self.control.stop();
    }
}

/// Everything a config needs before it can serve: plugins loaded and checked.
pub struct Prepared {
    pub config: Config,
    pub registry: Arc<Registry>,
    pub loader: Arc<Loader>,
    pub services: Arc<HostServices>,
}

/// Loads the config's plugins and checks that every plugin a listener names is
/// loaded with the role it is used in.
pub async fn prepare(config: Config) -> anyhow::Result<Prepared> {
    if let Some(cluster) = &config.cluster {
        Counters::check(cluster)?;
    }
    prepare_with(config, Counters::default()).await
}

/// [`prepare`], with the counters the plugins' `count` will use.
async fn prepare_with(config: Config, counters: Counters) -> anyhow::Result<Prepared> {
    let runtime = Arc::new(Runtime::new().context("starting the WebAssembly runtime")?);
    Pools::new(&config.pool).map_err(anyhow::Error::msg)?;
    for listener in config.listener.iter().filter(|l| l.protocol == ListenerProtocol::Https) {
        CertStore::load(listener).map_err(anyhow::Error::msg)?;
    }
    let services = Arc::new(HostServices { counters, pools: Default::default() });
    let roles = config.plugin_roles()?;
    let loader = Arc::new(Loader::new(runtime, config.plugins.clone(), services.clone(), roles));
    let registry = Arc::new(Registry::new(config.plugins.on_error));
    let report = registry.reconcile(&loader).await;
    if let Err(problem) = registry.check_roles(&config) {
        let reasons: Vec<String> =
            report.rejected.iter().map(|r| format!("\n  rejected {}: {}", r.file.display(), r.reason)).collect();
        anyhow::bail!("{problem}{}", reasons.concat());
    }
    Ok(Prepared { config, registry, loader, services })
}

/// The admin bearer token in `file` (trimmed); an empty one is an error,
/// since it would guard nothing.
fn read_token(file: &std::path::Path) -> anyhow::Result<String> {
    let token = std::fs::read_to_string(file)
        .with_context(|| format!("admin: reading token_file {}", file.display()))?
        .trim()
        .to_owned();
    if token.is_empty() {
        anyhow::bail!("admin: token_file {} is empty", file.display());
    }
    Ok(token)
}

/// The file `watch_config` watches: the one the config was read from
/// (none for a config made in memory).
fn config_file_to_watch(config: &Config) -> Option<&Path> {
    (config.watch_config && config.source.is_file()).then_some(config.source.as_path())
}

/// Reloads through `control` whenever `file` is written, created or
/// renamed into place, or the Kubernetes `..data` link beside it is swapped
/// (a ConfigMap update): exactly what SIGHUP does, refusals included.
fn watch_config(file: &Path, control: Arc<Control>) -> notify::Result<FileWatch> {
    let dir = match file.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
        _ => PathBuf::from("."),
    };
    let name = file.file_name().map(ToOwned::to_owned);
    let watch = file_watch::watch(
        "config file",
        std::slice::from_ref(&dir),
        move |path| path.file_name() == name.as_deref() || file_watch::is_kubernetes_swap(path),
        move || {
            let control = control.clone();
            async move {
                tracing::info!("config file changed: reloading");
                control.reload().await;
            }
        },
    )?;
    tracing::info!(file = %file.display(), "watching the config file");
    Ok(watch)
}

impl Gateway {
    /// Prepares `config`, binds its listeners and starts serving.
    pub async fn start(config: Config) -> anyhow::Result<Gateway> {
        let counters = match &config.cluster {
            Some(cluster) => Counters::shared(cluster)?,
            None => Counters::default(),
        };
        let Prepared { config, registry, loader, services } = prepare_with(config, counters).await?;
        let watcher = if config.plugins.watch && config.plugins.dir.is_dir() {
            Some(watcher::watch(registry.clone(), loader.clone()).context("watching the plugin directory")?)
        } else {
            None
        };
        // The admin socket and token first: nothing is served if they fail.
        let admin_socket = match &config.admin {
            None => None,
            Some(admin_config) => {
                let token = match &admin_config.token_file {
                    Some(file) => Some(read_token(file)?),
                    None => None,
                };
                let socket = TcpListener::bind(admin_config.listen)
                    .await
                    .with_context(|| format!("admin: cannot bind {}", admin_config.listen))?;
                Some((socket, token, admin_config.allowed_hosts.clone()))
            }
        };
        let access_log = AccessLog::open(&config.log)?.map(Arc::new);
        let otlp = config.otlp.as_ref().map(Otlp::start).transpose()?.map(Arc::new);
        let shared = Arc::new(Shared {
            registry,
            drain: Arc::new(Drain::default()),
            metrics: Default::default(),
            access_log,
            otlp,
        });
        let cap = Arc::new(ConnectionCap::new(config.limits.max_connections, shared.drain.clone()));
        let control = Arc::new(Control::new(shared, loader, services, cap, config.clone()));
        let watched_config = config_file_to_watch(&config).map(Path::to_owned);
        let started = control.apply(config).await;
        if let Some(error) = started.error {
            anyhow::bail!("{error}");
        }
        let (admin, admin_task) = match admin_socket {
            None => (None, None),
            Some((socket, token, allowed_hosts)) => {
                let addr = socket.local_addr()?;
                let state = Arc::new(AdminState::new(control.clone(), token, allowed_hosts));
                tracing::info!(%addr, "admin listening (dashboard at /, /healthz, /readyz, /status, /metrics, POST /reload)");
                (Some(addr), Some(tokio::spawn(admin::serve(socket, state))))
            }
        };
        let config_watch = match watched_config {
            Some(file) => Some(watch_config(&file, control.clone()).context("watching the config file")?),
            None => None,
        };
        Ok(Gateway { control, admin, admin_task, _watcher: watcher, _config_watch: config_watch })
    }

    /// The address listener `name` is bound to.
    pub fn listener_addr(&self, name: &str) -> Option<SocketAddr> {
        self.control.view().listeners.iter().find(|l| l.name == name).map(|l| l.addr)
    }

    pub fn registry(&self) -> &Registry {
        &self.control.shared().registry
    }

    /// The admin listener's address, if there is one.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin
    }

    /// WebSockets relayed now, over every listener.
    pub fn websockets(&self) -> usize {
        self.control.shared().drain.websockets()
    }

    /// Pool `name` of the config in force, with its servers' live health.
    pub fn pool(&self, name: &str) -> Option<Arc<Pool>> {
        self.control.view().pools.get(name).cloned()
    }

    /// Reads the config file again and applies it, as SIGHUP does.
    pub async fn reload(&self) -> ReloadReport {
        self.control.reload().await
    }

    /// Serves until SIGINT or SIGTERM, then drains (see [`crate::shutdown`]);
    /// SIGHUP reloads the config file, SIGUSR1 reopens the access log, and
    /// SIGUSR2 is ignored (its default action would kill the process
    /// without a drain).
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        use tokio::signal::unix::{SignalKind, signal};
        let (mut terminate, mut interrupt) = (signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?);
        let mut hangup = signal(SignalKind::hangup())?;
        let (mut user1, mut user2) = (signal(SignalKind::user_defined1())?, signal(SignalKind::user_defined2())?);
        loop {
            tokio::select! {
                _ = terminate.recv() => break,
                _ = interrupt.recv() => break,
                _ = hangup.recv() => {
                    tracing::info!("SIGHUP: reloading the config");
                    self.control.reload().await;
                }
                _ = user1.recv() => match &self.control.shared().access_log {
                    Some(access) if access.reopen() => tracing::info!("SIGUSR1: reopening the access log"),
                    _ => tracing::info!("SIGUSR1: no access_file to reopen"),
                },
                _ = user2.recv() => tracing::info!("SIGUSR2 ignored"),
            }
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
        let (drain, window) = (&self.control.shared().drain, self.control.view().drain_window);
        tracing::info!(
            requests = drain.in_flight(),
            websockets = drain.websockets(),
            drain_s = window.as_secs(),
            "stopping: no new connections; requests finish, WebSockets get Close 1001 over the drain window"
        );
        drain.begin(window);
    }

    /// Resolves when nothing is left, or the window and the close grace are over.
    pub async fn wait_drained(&self) {
        let (drain, window) = (&self.control.shared().drain, self.control.view().drain_window);
        let now = tokio::time::Instant::now();
        let deadline = now + window + crate::websocket::relay::CLOSE_GRACE + Duration::from_secs(1);
        // A connection accepted just before the stop may not have sent its
        // request yet; give it time to, so it is served rather than cut.
        tokio::time::sleep_until(now + ACCEPTED_SETTLE.min(window)).await;
        while drain.in_flight() + drain.websockets() > 0 {
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(
                    requests = drain.in_flight(),
                    websockets = drain.websockets(),
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
