//! What the end-to-end tests share: compiled plugins, a recording test
//! backend (HTTP + WebSocket echo), an in-process gateway on ephemeral ports,
//! and small real clients.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use wasmgate::{Config, Gateway};

// ---------------------------------------------------------------- plugins

/// The compiled component of plugin crate `krate` (built by `scripts/test`).
pub fn plugin_wasm(krate: &str) -> PathBuf {
    // The test binary is target/<profile>/deps/<name>; plugins are in
    // target/wasm32-wasip2/release.
    let exe = std::env::current_exe().expect("test executable path");
    let target = exe.ancestors().nth(3).expect("target directory");
    let file = target.join("wasm32-wasip2/release").join(format!("{}.wasm", krate.replace('-', "_")));
    assert!(
        file.exists(),
        "{} is missing: build the plugins first (scripts/build-plugins --languages; scripts/test does)",
        file.display()
    );
    file
}

/// Every plugin the tests load, built by `scripts/build-plugins --languages`: the Rust
/// crates, and the examples in other languages.
const TEST_PLUGINS: [&str; 10] = [
    "path-router",
    "handshake-guard",
    "hello-router",
    "head-echo",
    "looper",
    "hostile",
    "init-trap",
    "api-key-guard",
    "canary-router",
    "ip-filter",
];

/// The compiled-artifact cache the whole test run shares (under cargo's
/// per-target scratch directory), filled with every test plugin before the
/// first gateway starts: Cranelift then never competes with a timing
/// assertion. Tests of the cache itself set their own `cache_dir`.
pub fn shared_cache() -> &'static Path {
    static CACHE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    CACHE.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("plugin-cache");
        // On its own thread and runtime: callers may be inside any runtime.
        let fill = dir.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async {
                use wasmgate::counting::Counters;
                use wasmgate::plugin::{Loader, Runtime, host_api::HostServices};
                let runtime = Arc::new(Runtime::new().expect("wasm runtime"));
                let services = Arc::new(HostServices { counters: Counters::default(), pools: Default::default() });
                let staging = tempfile::tempdir().expect("temp dir");
                let defaults = wasmgate::config::PluginsConfig {
                    dir: staging.path().to_owned(),
                    cache_dir: Some(fill),
                    ..Default::default()
                };
                let loader = Loader::new(runtime, defaults, services, Default::default());
                for krate in TEST_PLUGINS {
                    let file = staging.path().join(format!("{krate}.wasm"));
                    std::fs::copy(plugin_wasm(krate), &file).expect("copy plugin");
                    // A plugin that traps while starting is compiled (and
                    // cached) all the same; only its load fails.
                    let _ = loader.load(&file, 1).await;
                }
            });
        })
        .join()
        .expect("filling the plugin cache");
        dir
    })
}

/// A temporary plugin directory; its gateway uses the [`shared_cache`].
pub struct PluginDir {
    pub dir: tempfile::TempDir,
}

impl PluginDir {
    pub fn new() -> PluginDir {
        shared_cache();
        PluginDir { dir: tempfile::tempdir().expect("temp dir") }
    }

    /// Installs plugin crate `krate` as `name`, with `settings` as `name.toml`.
    pub fn add(self, name: &str, krate: &str, settings: &str) -> PluginDir {
        std::fs::copy(plugin_wasm(krate), self.dir.path().join(format!("{name}.wasm"))).expect("copy plugin");
        if !settings.is_empty() {
            std::fs::write(self.dir.path().join(format!("{name}.toml")), settings).expect("write settings");
        }
        self
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

// ---------------------------------------------------------------- gateway

/// Starts a gateway for `config` (TOML) with plugins from `plugins`.
pub async fn start_gateway(config: &str, plugins: &PluginDir) -> Gateway {
    let mut config = Config::from_toml(Path::new("test.toml"), config).expect("valid test config");
    config.plugins.dir = plugins.path().to_owned();
    if config.plugins.cache_dir.is_none() {
        config.plugins.cache_dir = Some(shared_cache().to_owned());
    }
    Gateway::start(config).await.expect("gateway starts")
}

// ---------------------------------------------------------------- processes

/// A `wasmgate run` child process; killed when dropped if still running.
pub struct GatewayProcess {
    pub child: std::process::Child,
    pub log: PathBuf,
}

impl GatewayProcess {
    /// Runs `wasmgate run --config CONFIG` with stderr to `LOG`, its cache
    /// under the config's directory; returns once `listening_lines` lines
    /// saying "listening" were logged.
    pub async fn start(config: &Path, log: &Path, listening_lines: usize) -> GatewayProcess {
        Self::start_limited(config, log, listening_lines, None).await
    }

    /// [`GatewayProcess::start`], with the open-file limit (soft and hard)
    /// set to `open_files` when given.
    pub async fn start_limited(
        config: &Path,
        log: &Path,
        listening_lines: usize,
        open_files: Option<u64>,
    ) -> GatewayProcess {
        let mut command = Self::command(config, log);
        if let Some(open_files) = open_files {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe; nothing else runs
            // between fork and exec.
            unsafe {
                command.pre_exec(move || {
                    let limit = rustix::process::Rlimit { current: Some(open_files), maximum: Some(open_files) };
                    rustix::process::setrlimit(rustix::process::Resource::Nofile, limit).map_err(std::io::Error::from)
                });
            }
        }
        let process = GatewayProcess { child: command.spawn().expect("start wasmgate"), log: log.to_owned() };
        process.listening(listening_lines).await
    }

    /// [`GatewayProcess::start`], the process allowed only the first CPU
    /// (by taskset(1), from util-linux): the gateway then runs one
    /// current-thread runtime.
    pub async fn start_on_one_cpu(config: &Path, log: &Path, listening_lines: usize) -> GatewayProcess {
        let mut command = std::process::Command::new("taskset");
        command.args(["--cpu-list", "0"]).arg(env!("CARGO_BIN_EXE_wasmgate"));
        let process = GatewayProcess {
            child: Self::run_command(command, config, log).spawn().expect("start taskset"),
            log: log.to_owned(),
        };
        process.listening(listening_lines).await
    }

    /// Runs `wasmgate run --config CONFIG` as [`GatewayProcess::start`]
    /// does, without waiting for anything.
    pub fn spawn(config: &Path, log: &Path) -> GatewayProcess {
        GatewayProcess { child: Self::command(config, log).spawn().expect("start wasmgate"), log: log.to_owned() }
    }

    /// `wasmgate run --config CONFIG`, stderr to `log`, its cache under the
    /// config's directory.
    fn command(config: &Path, log: &Path) -> std::process::Command {
        Self::run_command(std::process::Command::new(env!("CARGO_BIN_EXE_wasmgate")), config, log)
    }

    /// `command` (the wasmgate binary, or what runs it) given `run --config
    /// CONFIG`, stderr to `log`, its cache under the config's directory.
    fn run_command(mut command: std::process::Command, config: &Path, log: &Path) -> std::process::Command {
        let file = std::fs::File::create(log).expect("create log");
        command
            .args(["run", "--config"])
            .arg(config)
            .env("XDG_CACHE_HOME", config.parent().unwrap())
            .stdout(std::process::Stdio::null())
            .stderr(file);
        command
    }

    /// Waits until `listening_lines` lines saying "listening" were logged.
    pub async fn listening(mut self, listening_lines: usize) -> GatewayProcess {
        let process = &mut self;
        let started = Instant::now();
        while process.log_text().matches("listening").count() < listening_lines {
            // A bound, not a claim: the first start compiles its plugins,
            // and a JS component takes seconds (tens under a loaded CI).
            assert!(started.elapsed() < STARTUP_BOUND, "wasmgate never listened:\n{}", process.log_text());
            if let Ok(Some(status)) = process.child.try_wait() {
                panic!("wasmgate exited ({status}) before listening:\n{}", process.log_text());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Where listener `name` (or, for `"admin"`, the admin listener) is
    /// bound, as its latest "listening" log line says: configs bind port 0,
    /// so no port is picked, released and raced for.
    pub fn addr(&self, name: &str) -> SocketAddr {
        let log = self.log_text();
        let line = log
            .lines()
            .rev()
            .find(|l| match name {
                "admin" => l.contains("admin listening"),
                _ => l.contains(" listening (") && l.contains(&format!("listener={name} ")),
            })
            .unwrap_or_else(|| panic!("no listening line for `{name}` in:\n{log}"));
        let addr = line.split_whitespace().find_map(|w| w.strip_prefix("addr=")).expect("addr= in the line");
        addr.parse().unwrap_or_else(|e| panic!("`{addr}`: {e}"))
    }

    /// Sends `signal` (`TERM`, `HUP`...) with kill(1).
    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .expect("kill(1)");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Waits up to `limit` for the process to exit.
    pub async fn exited(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "wasmgate did not exit within {limit:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for GatewayProcess {
    /// Stops a process still running as an operator would: SIGTERM twice
    /// (the second exits at once), SIGKILL only if that fails. It exits on
    /// its own, so what it records at exit (coverage data) is written.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let pid = self.child.id().to_string();
            for _ in 0..2 {
                let _ = std::process::Command::new("kill").args(["-TERM", &pid]).status();
                std::thread::sleep(Duration::from_millis(50));
            }
            let deadline = Instant::now() + Duration::from_secs(2);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A config with one listener `web` routed by plugin `router`, in front
/// of pool `app` (the backend `app`); `plugins` goes in `[plugins]`.
pub fn routed_by(router: &str, app: &Backend, plugins: &str) -> String {
    format!(
        "[plugins]\n{plugins}\n\
         [[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nrouter = \"{router}\"\n\
         [[pool]]\nname = \"app\"\nservers = [\"{}\"]\n",
        app.addr
    )
}

/// The address of listener `web`.
pub fn web(gateway: &Gateway) -> SocketAddr {
    gateway.listener_addr("web").expect("listener `web`")
}

// ---------------------------------------------------------------- backend

/// A plain or TLS stream.
pub trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Io for T {}

/// A request as a backend received it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub target: String,
    pub version: http::Version,
    pub headers: HeaderMap,
    pub body_len: usize,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// A test backend on an ephemeral port. It answers `backend=NAME ...` to
/// plain requests, `/health` with its settable health status, echoes
/// WebSocket messages on `/ws...`, and records every request it receives. It
/// can be stopped (every connection cut, like a dead process) and restarted
/// on the same port.
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// The status `/health` answers (200 unless a test changes it).
    pub health: Arc<AtomicU16>,
    /// Close frames its WebSockets received: code and reason.
    pub closes: Arc<Mutex<Vec<(u16, String)>>>,
    stop: tokio::sync::watch::Sender<bool>,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

/// Resolves once `stop` turns true.
async fn stopped(mut stop: tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

impl Backend {
    pub async fn start(name: &str) -> Backend {
        Self::start_with(name, None).await
    }

    /// A backend that speaks TLS with `tls`.
    pub async fn start_tls(name: &str, tls: Arc<rustls::ServerConfig>) -> Backend {
        Self::start_with(name, Some(tokio_rustls::TlsAcceptor::from(tls))).await
    }

    async fn start_with(name: &str, tls: Option<tokio_rustls::TlsAcceptor>) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind backend");
        let backend = Backend {
            name: name.to_owned(),
            addr: listener.local_addr().unwrap(),
            seen: Arc::new(Mutex::new(Vec::new())),
            health: Arc::new(AtomicU16::new(200)),
            closes: Arc::default(),
            stop: tokio::sync::watch::channel(false).0,
            tls,
        };
        backend.serve(listener);
        backend
    }

    fn serve(&self, listener: TcpListener) {
        let (name, seen, health, closes) =
            (self.name.clone(), self.seen.clone(), self.health.clone(), self.closes.clone());
        let stop = self.stop.subscribe();
        let tls = self.tls.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    _ = stopped(stop.clone()) => return,
                };
                let Ok((stream, _)) = accepted else { continue };
                let (name, seen, health, closes, stop, tls) =
                    (name.clone(), seen.clone(), health.clone(), closes.clone(), stop.clone(), tls.clone());
                tokio::spawn(async move {
                    let stop_ws = stop.clone();
                    let service = service_fn(move |req| {
                        let state = (seen.clone(), health.clone(), closes.clone());
                        backend_handle(name.clone(), state, stop_ws.clone(), req)
                    });
                    let (io, h2): (Box<dyn Io>, bool) = match tls {
                        None => (Box::new(stream), false),
                        Some(acceptor) => match acceptor.accept(stream).await {
                            Ok(stream) => {
                                let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                                (Box::new(stream), h2)
                            }
                            Err(_) => return,
                        },
                    };
                    if h2 {
                        let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(io), service);
                        tokio::select! {
                            _ = connection => {}
                            _ = stopped(stop) => {}
                        }
                    } else {
                        let connection = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(io), service)
                            .with_upgrades();
                        tokio::select! {
                            _ = connection => {}
                            _ = stopped(stop) => {}
                        }
                    }
                });
            }
        });
    }

    /// Cuts every connection and stops listening.
    pub fn stop(&self) {
        self.stop.send_replace(true);
    }

    /// Listens again on the same address.
    pub async fn restart(&self) {
        self.stop.send_replace(false);
        let listener = TcpListener::bind(self.addr).await.expect("rebind backend");
        self.serve(listener);
    }

    /// Requests this backend received from clients (the gateway's own health
    /// probes left out).
    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().iter().filter(|r| r.header("user-agent") != Some("wasmgate-probe")).cloned().collect()
    }

    /// The gateway's health probes this backend received.
    pub fn probes(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().iter().filter(|r| r.header("user-agent") == Some("wasmgate-probe")).cloned().collect()
    }

    /// Upgrade requests this backend received from clients.
    pub fn handshakes(&self) -> usize {
        self.requests().iter().filter(|r| r.header("upgrade").is_some()).count()
    }
}

/// What a backend's handler records into: requests, its health, closes.
type BackendState = (Arc<Mutex<Vec<Seen>>>, Arc<AtomicU16>, Arc<Mutex<Vec<(u16, String)>>>);

/// Answers one request. `/spoof-gateway-error` answers 503 with the
/// gateway's own `x-wasmgate-error` header. Upgrade paths that misbehave on purpose:
/// `/reject-upgrade` (403), `/ws-bad-accept`, `/ws-no-upgrade`,
/// `/ws-no-connection`, `/ws-unoffered-protocol`, `/ws-unoffered-extension`
/// (a 101 a client must refuse).
async fn backend_handle(
    name: String,
    (seen, health, closes): BackendState,
    stop: tokio::sync::watch::Receiver<bool>,
    mut req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let target = req.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default();
    let headers = req.headers().clone();
    let method = req.method().to_string();
    let version = req.version();
    let path = req.uri().path().to_owned();
    let is_upgrade = headers.get("upgrade").is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));

    if is_upgrade {
        seen.lock().unwrap().push(Seen { method, target, version, headers: headers.clone(), body_len: 0 });
        if path.starts_with("/reject-upgrade") {
            return Ok(text(StatusCode::FORBIDDEN, "no websockets here"));
        }
        let key = headers.get("sec-websocket-key").map(|k| k.as_bytes().to_vec()).unwrap_or_default();
        let accept = if path.starts_with("/ws-bad-accept") {
            "bm90IHRoZSByaWdodCBrZXk=".to_owned()
        } else {
            tokio_tungstenite::tungstenite::handshake::derive_accept_key(&key)
        };
        let mut response = Response::new(Full::new(Bytes::new()));
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let h = response.headers_mut();
        if !path.starts_with("/ws-no-upgrade") {
            h.insert("upgrade", "websocket".parse().unwrap());
        }
        if !path.starts_with("/ws-no-connection") {
            h.insert("connection", "Upgrade".parse().unwrap());
        }
        h.insert("sec-websocket-accept", accept.parse().unwrap());
        if path.starts_with("/ws-unoffered-protocol") {
            h.insert("sec-websocket-protocol", "never-offered".parse().unwrap());
        } else if let Some(first) =
            headers.get("sec-websocket-protocol").and_then(|v| v.to_str().ok()).and_then(|v| v.split(',').next())
        {
            h.insert("sec-websocket-protocol", first.trim().parse().unwrap());
        }
        if path.starts_with("/ws-unoffered-extension") {
            h.insert("sec-websocket-extensions", "x-never-offered".parse().unwrap());
        }
        let on_upgrade = hyper::upgrade::on(&mut req);
        let name = name.clone();
        tokio::spawn(async move {
            if let Ok(upgraded) = on_upgrade.await {
                let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
                tokio::select! {
                    _ = echo(ws, &name, &closes) => {}
                    _ = stopped(stop) => {}
                }
            }
        });
        return Ok(response);
    }

    if path == "/health" {
        let status = StatusCode::from_u16(health.load(Ordering::Relaxed)).unwrap_or(StatusCode::OK);
        return Ok(text(status, &format!("backend={name} health")));
    }
    if path.contains("/slow") {
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let body = req.into_body().collect().await?.to_bytes();
    let checksum: u64 = body.iter().map(|&b| u64::from(b)).sum();
    let record = Seen { method: method.clone(), target: target.clone(), version, headers, body_len: body.len() };
    seen.lock().unwrap().push(record);
    if path == "/spoof-gateway-error" {
        // A backend that answers as if it were the gateway.
        let mut response = text(StatusCode::SERVICE_UNAVAILABLE, "backend says: no healthy server");
        response.headers_mut().insert("x-wasmgate-error", http::HeaderValue::from_static("no-healthy-server"));
        return Ok(response);
    }
    Ok(text(
        StatusCode::OK,
        &format!("backend={name} method={method} target={target} body_len={} checksum={checksum}", body.len()),
    ))
}

/// Echoes every data message; `close-me` makes the server start the close.
/// Records the Close frames it receives (a server-side stream refuses an
/// unmasked one, so a recorded Close was masked).
async fn echo<S>(mut ws: WebSocketStream<S>, name: &str, closes: &Mutex<Vec<(u16, String)>>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let _ = ws.send(Message::text(format!("hello from {name}"))).await;
    while let Some(Ok(message)) = ws.next().await {
        let sent = match message {
            Message::Close(frame) => {
                let (code, reason) = frame.map_or((1005, String::new()), |f| (u16::from(f.code), f.reason.to_string()));
                closes.lock().unwrap().push((code, reason));
                Ok(())
            }
            Message::Text(t) if t.as_str() == "close-me" => {
                let frame = CloseFrame { code: 1000.into(), reason: "bye".into() };
                ws.close(Some(frame)).await
            }
            Message::Text(_) | Message::Binary(_) => ws.send(message).await,
            _ => Ok(()),
        };
        if sent.is_err() {
            break;
        }
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_owned())));
    *response.status_mut() = status;
    response
}

// ---------------------------------------------------------------- clients

/// A response as a client got it.
#[derive(Debug)]
pub struct Got {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Got {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Sends one request over a fresh HTTP/1.1 connection, within 30 s.
///
/// It asks for `Connection: close` (unless the caller sets `Connection`),
/// so the gateway closes first and the TIME_WAIT stays on its listening
/// port: loops of requests do not use up this machine's ephemeral ports.
pub async fn request(addr: SocketAddr, method: &str, target: &str, headers: &[(&str, &str)], body: Vec<u8>) -> Got {
    let exchange = request_once(addr, method, target, headers, body);
    tokio::time::timeout(Duration::from_secs(30), exchange).await.expect("an answer within 30 s")
}

async fn request_once(addr: SocketAddr, method: &str, target: &str, headers: &[(&str, &str)], body: Vec<u8>) -> Got {
    let stream = TcpStream::connect(addr).await.expect("connect to gateway");
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.expect("http handshake");
    tokio::spawn(connection);
    let mut builder = Request::builder().method(method).uri(target);
    if !headers.iter().any(|(name, _)| name.eq_ignore_ascii_case("host")) {
        builder = builder.header("host", format!("gw.test:{}", addr.port()));
    }
    if !headers.iter().any(|(name, _)| name.eq_ignore_ascii_case("connection")) {
        builder = builder.header("connection", "close");
    }
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let response = sender.send_request(builder.body(Full::new(Bytes::from(body))).unwrap()).await.expect("response");
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.expect("body").to_bytes();
    Got { status, headers, body: String::from_utf8_lossy(&body).into_owned() }
}

/// A GET of `/` over a new connection that reports any failure (refused,
/// reset, timed out) instead of panicking: for tests that count failures.
pub async fn try_get_root(addr: SocketAddr) -> Result<(StatusCode, String), String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(connection);
    let request = Request::builder()
        .uri("/")
        .header("host", "gw.test")
        .header("connection", "close")
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let response = tokio::time::timeout(Duration::from_secs(5), sender.send_request(request))
        .await
        .map_err(|_| "timeout".to_string())?
        .map_err(|e| format!("send: {e:?}"))?;
    let status = response.status();
    let body = response.into_body().collect().await.map_err(|e| format!("body: {e}"))?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

pub async fn get(addr: SocketAddr, target: &str) -> Got {
    request(addr, "GET", target, &[], Vec::new()).await
}

/// Writes `raw` bytes to the gateway and reads the response head and body
/// until the server closes or `Content-Length` bytes arrived.
/// A request head read from `socket` up to its blank line, as text; `None`
/// if the peer closes or fails first. (For hand-made backends.)
pub async fn read_head(socket: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match socket.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

/// The `Sec-WebSocket-Key` of a raw request head.
pub fn websocket_key(head: &str) -> Option<String> {
    head.lines()
        .find_map(|l| l.split_once(':').filter(|(name, _)| name.eq_ignore_ascii_case("sec-websocket-key")))
        .map(|(_, key)| key.trim().to_owned())
}

pub async fn raw_exchange(addr: SocketAddr, raw: &str) -> String {
    let stream = TcpStream::connect(addr).await.expect("connect");
    exchange_on(stream, raw).await
}

/// [`raw_exchange`] from the loopback address `source` (any of 127.0.0.0/8),
/// as another client would.
pub async fn raw_exchange_from(source: std::net::IpAddr, addr: SocketAddr, raw: &str) -> String {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.bind(SocketAddr::new(source, 0)).expect("bind the source address");
    let stream = socket.connect(addr).await.expect("connect");
    exchange_on(stream, raw).await
}

async fn exchange_on(mut stream: TcpStream, raw: &str) -> String {
    stream.write_all(raw.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let n = match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await {
            Ok(Ok(n)) => n,
            _ => break,
        };
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&out);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned()))
                .and_then(|v| v.parse::<usize>().ok());
            if length.is_some_and(|len| body.len() >= len) || head.starts_with("HTTP/1.1 101") {
                break;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Opens a WebSocket through `addr` on a raw socket; returns it after the 101.
pub async fn raw_upgrade(addr: std::net::SocketAddr, path: &str) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "GET {path} HTTP/1.1\r\nHost: gw.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    while !answer.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte)).await.unwrap().unwrap();
        assert_eq!(n, 1, "the 101 never came: {}", String::from_utf8_lossy(&answer));
        answer.push(byte[0]);
    }
    assert!(answer.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&answer));
    stream
}

/// A WebSocket handshake request for `path` on the gateway.
pub fn ws_request(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> http::Request<()> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = format!("ws://{addr}{path}").into_client_request().expect("ws request");
    for (name, value) in headers {
        request.headers_mut().insert(http::HeaderName::from_bytes(name.as_bytes()).unwrap(), value.parse().unwrap());
    }
    request
}

pub type Ws = WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

/// Opens a WebSocket through the gateway and reads the backend's greeting.
pub async fn ws_connect(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (Ws, http::Response<Option<Vec<u8>>>) {
    let (ws, response, _) = ws_connect_greeted(addr, path, headers).await;
    (ws, response)
}

/// [`ws_connect`], also returning the greeting (`hello from NAME`: which
/// backend the WebSocket reached).
pub async fn ws_connect_greeted(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (Ws, http::Response<Option<Vec<u8>>>, String) {
    let (mut ws, response) =
        tokio_tungstenite::connect_async(ws_request(addr, path, headers)).await.expect("websocket handshake");
    let greeting = match next_message(&mut ws).await {
        Message::Text(t) if t.as_str().starts_with("hello from") => t.to_string(),
        other => panic!("expected the backend's greeting, got {other:?}"),
    };
    (ws, response, greeting)
}

/// The next message on any WebSocket stream, within 5 s.
pub async fn next_message<S>(ws: &mut WebSocketStream<S>) -> Message
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("a message within 5 s")
        .expect("stream open")
        .expect("valid message")
}

/// The status a refused WebSocket handshake got, with its headers and body.
pub async fn ws_refused(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Got {
    match tokio_tungstenite::connect_async(ws_request(addr, path, headers)).await {
        Ok(_) => panic!("handshake to {path} unexpectedly succeeded"),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => Got {
            status: response.status(),
            headers: response.headers().clone(),
            body: String::from_utf8_lossy(response.body().as_deref().unwrap_or_default()).into_owned(),
        },
        Err(other) => panic!("handshake to {path} failed without an HTTP answer: {other}"),
    }
}

/// The admin listener's `/status` document.
pub async fn status(admin: SocketAddr) -> serde_json::Value {
    serde_json::from_str(&get(admin, "/status").await.body).expect("/status is JSON")
}

/// How long a gateway process may take to start listening, or a new
/// component to start serving (a bound for plugin compilation, which no
/// test measures).
pub const STARTUP_BOUND: Duration = Duration::from_secs(120);

/// What a loaded 2-core CI machine may add to a timed bound (scheduling
/// delay, other tests' CPU): a bound is the README's figure plus this.
pub const CI_MARGIN: Duration = Duration::from_millis(750);

/// A directory laid out as the kubelet lays out a ConfigMap or Secret
/// volume: each version in its own `..NAME` directory, `..data` linking to
/// the current one, and every file a link through `..data`
/// (`tls.crt -> ..data/tls.crt`). An update writes a new version and
/// renames a new `..data` link into place; the files the gateway was told
/// about never change themselves.
pub struct KubeVolume {
    pub dir: tempfile::TempDir,
    versions: usize,
}

impl KubeVolume {
    /// A volume holding `files` (name, content).
    pub fn new(files: &[(&str, &[u8])]) -> KubeVolume {
        let mut volume = KubeVolume { dir: tempfile::tempdir().expect("temp dir"), versions: 0 };
        volume.update(files);
        for (name, _) in files {
            std::os::unix::fs::symlink(format!("..data/{name}"), volume.path().join(name)).expect("file link");
        }
        volume
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The kubelet's update: a new version directory with `files` (the same
    /// names as at first), a new link, one rename, the old version removed.
    pub fn update(&mut self, files: &[(&str, &[u8])]) {
        self.versions += 1;
        let version = format!("..2026_11_30_{:02}", self.versions);
        std::fs::create_dir(self.path().join(&version)).expect("version dir");
        for (name, content) in files {
            std::fs::write(self.path().join(&version).join(name), content).expect("write file");
        }
        let (link, tmp) = (self.path().join("..data"), self.path().join("..data_tmp"));
        std::os::unix::fs::symlink(&version, &tmp).expect("..data_tmp link");
        std::fs::rename(&tmp, &link).expect("swap ..data");
        if self.versions > 1 {
            let old = format!("..2026_11_30_{:02}", self.versions - 1);
            std::fs::remove_dir_all(self.path().join(old)).expect("remove the old version");
        }
    }
}

/// Waits until `condition` holds; panics with `what` after `limit`.
pub async fn wait_until(what: &str, limit: Duration, mut condition: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !condition() {
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    started.elapsed()
}

// ---------------------------------------------------------------- TLS

/// A private CA for tests, writing PEM files into a temporary directory.
pub struct Pki {
    pub dir: tempfile::TempDir,
    ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    pub ca_pem: PathBuf,
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, "wasmgate test CA");
        let ca = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap()).unwrap();
        let ca_pem = dir.path().join("ca.pem");
        std::fs::write(&ca_pem, ca.pem()).unwrap();
        Pki { dir, ca, ca_pem }
    }

    /// Issues a certificate for `hosts`, written as `NAME.pem` and `NAME.key`.
    pub fn issue(&self, name: &str, hosts: &[&str]) -> (PathBuf, PathBuf) {
        let params = rcgen::CertificateParams::new(hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>()).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        let (cert_path, key_path) =
            (self.dir.path().join(format!("{name}.pem")), self.dir.path().join(format!("{name}.key")));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path)
    }

    /// A rustls client trusting only this CA, offering `alpn`.
    pub fn client(&self, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.der().clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }

    /// A rustls server config for `cert`/`key` (for TLS test backends),
    /// offering ALPN `alpn`.
    pub fn server_alpn(&self, cert: &Path, key: &Path, alpn: &[&[u8]]) -> Arc<rustls::ServerConfig> {
        let mut config = Arc::unwrap_or_clone(self.server(cert, key));
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }

    /// A rustls server config for `cert`/`key` (for TLS test backends).
    pub fn server(&self, cert: &Path, key: &Path) -> Arc<rustls::ServerConfig> {
        use rustls::pki_types::pem::PemObject;
        let chain = rustls::pki_types::CertificateDer::pem_file_iter(cert).unwrap().map(|c| c.unwrap()).collect();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_file(key).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }
}

/// Connects to the gateway with TLS, presenting `sni`.
pub async fn tls_connect(
    addr: SocketAddr,
    sni: &str,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from(sni.to_owned()).unwrap();
    tokio_rustls::TlsConnector::from(config).connect(name, tcp).await
}

/// One HTTP/1.1 request over a fresh TLS connection.
pub async fn https_request(
    addr: SocketAddr,
    sni: &str,
    config: Arc<rustls::ClientConfig>,
    method: &str,
    target: &str,
) -> Got {
    let stream = tls_connect(addr, sni, config).await.expect("TLS handshake");
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(connection);
    let request =
        Request::builder().method(method).uri(target).header("host", sni).body(Full::new(Bytes::new())).unwrap();
    let response = sender.send_request(request).await.expect("response");
    let (status, headers) = (response.status(), response.headers().clone());
    let body = response.into_body().collect().await.unwrap().to_bytes();
    Got { status, headers, body: String::from_utf8_lossy(&body).into_owned() }
}
