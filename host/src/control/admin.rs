//! The admin listener: liveness, readiness, live status and config reload
//! for operators and orchestrators. Loopback by default. With `token_file`,
//! every request but `GET /healthz` and `GET /readyz` (an orchestrator's
//! probes) needs `Authorization: Bearer <token>` (or, for a browser,
//! `?access_token=<token>`); without one, only the read-only endpoints
//! answer, so no local process can reload an unprotected gateway.
//!
//! - `GET /`: the live dashboard, one self-contained page (`dashboard.html`,
//!   embedded in the binary) fed by `GET /events`: Server-Sent Events
//!   carrying the `/status` document once a second.
//! - `GET /healthz`: 200 while the process serves.
//! - `GET /readyz`: 200, or 503 once draining (so a balancer stops sending).
//! - `GET /status`: JSON — config version, listeners, pools with each
//!   server's health, last reason and live connections, plugins with identity
//!   and counters, recent reloads.
//! - `POST /reload`: reads the config file again and applies it; the answer
//!   (JSON) lists what changed, or why the file was refused (400).
//!
//! Hardened like a client listener: a request head within 10 s, at most 64
//! connections and 16 event streams at once, and only requests whose `Host`
//! is an IP address, `localhost` or one of `allowed_hosts` (421 otherwise),
//! so a web page on a rebinding DNS name cannot read a tokenless loopback
//! admin.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{Either, Full};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;

use super::live_state::LiveState;
use super::reload::Control;

/// What the admin endpoints read.
pub struct AdminState {
    pub control: Arc<Control>,
    pub token: Option<String>,
    pub started: Instant,
    /// Host names answered beside IP addresses and `localhost`.
    allowed_hosts: Vec<String>,
    /// `/events` streams open now.
    event_streams: Arc<AtomicUsize>,
}

impl AdminState {
    pub fn new(control: Arc<Control>, token: Option<String>, allowed_hosts: Vec<String>) -> AdminState {
        AdminState { control, token, started: Instant::now(), allowed_hosts, event_streams: Arc::default() }
    }
}

/// Admin connections served at once; past it, new ones are closed at once.
const MAX_CONNECTIONS: usize = 64;

/// `/events` streams (open dashboards) at once; past it, 503.
const MAX_EVENT_STREAMS: usize = 16;

/// A request head must arrive within this.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the admin endpoints on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>) {
    let connections = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Out of file descriptors or similar: back off instead of spinning.
                tracing::warn!(%error, "admin: accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        // Past the cap the connection is closed at once (dropped).
        let Ok(admitted) = connections.clone().try_acquire_owned() else { continue };
        let state = state.clone();
        tokio::spawn(async move {
            let _admitted = admitted;
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(&state, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Whether the request's `Host` names this admin listener: an IP address,
/// `localhost`, or one of `allowed_hosts`. A browser page on another name
/// that resolves to the gateway (DNS rebinding) sends that name.
fn host_allowed(req: &Request<Incoming>, allowed_hosts: &[String]) -> bool {
    let Some(host) = req.headers().get(header::HOST).and_then(|h| h.to_str().ok()) else { return false };
    let Ok(authority) = host.parse::<http::uri::Authority>() else { return false };
    let name = authority.host().trim_start_matches('[').trim_end_matches(']');
    name.parse::<std::net::IpAddr>().is_ok()
        || name.eq_ignore_ascii_case("localhost")
        || allowed_hosts.iter().any(|allowed| allowed.eq_ignore_ascii_case(name))
}

/// True if `req` presents `token`: `Authorization: Bearer`, or the
/// `access_token` query parameter (percent-decoded) for a browser.
fn presents(req: &Request<Incoming>, token: &str) -> bool {
    let header = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    if header.and_then(|h| h.strip_prefix("Bearer ")).is_some_and(|t| same(t.as_bytes(), token.as_bytes())) {
        return true;
    }
    let query = req.uri().query().unwrap_or("").as_bytes();
    form_urlencoded::parse(query).any(|(key, value)| key == "access_token" && same(value.as_bytes(), token.as_bytes()))
}

/// Compares in time that does not depend on where the bytes differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0, |diff, (x, y)| diff | (x ^ y)) == 0
}

/// How long the accept loop waits after a failed accept.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// The page `GET /` serves.
const DASHBOARD: &str = include_str!("dashboard.html");

/// How often `/events` sends the status.
const EVENT_INTERVAL: Duration = Duration::from_secs(1);

/// An admin response's body: a whole one, or the endless event stream.
type AdminBody = Either<Full<Bytes>, EventStream>;

async fn handle(state: &Arc<AdminState>, req: Request<Incoming>) -> Response<AdminBody> {
    if !host_allowed(&req, &state.allowed_hosts) {
        return text(StatusCode::MISDIRECTED_REQUEST, "unknown host: add it to [admin] allowed_hosts\n");
    }
    // Liveness and readiness say only "ok", "ready" or "draining": an
    // orchestrator's probes (the kubelet's) carry no token.
    let probe = req.method() == Method::GET && matches!(req.uri().path(), "/healthz" | "/readyz");
    match &state.token {
        Some(token) if !probe && !presents(&req, token) => {
            return text(StatusCode::UNAUTHORIZED, "a bearer token is required\n");
        }
        None if req.method() != Method::GET => {
            return text(StatusCode::FORBIDDEN, "POST endpoints need [admin] token_file in the config\n");
        }
        _ => {}
    }
    let drain = &state.control.shared().drain;
    match (req.method().as_str(), req.uri().path()) {
        ("GET", "/") => whole(StatusCode::OK, "text/html; charset=utf-8", Bytes::from_static(DASHBOARD.as_bytes())),
        ("GET", "/events") => {
            let open = state.event_streams.fetch_add(1, Ordering::AcqRel);
            let slot = EventSlot(state.event_streams.clone());
            if open >= MAX_EVENT_STREAMS {
                return text(StatusCode::SERVICE_UNAVAILABLE, "too many open dashboards\n");
            }
            let stream =
                EventStream { state: state.clone(), interval: tokio::time::interval(EVENT_INTERVAL), _slot: slot };
            let mut response = Response::new(Either::Right(stream));
            response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
            response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            response
        }
        ("GET", "/healthz") => text(StatusCode::OK, "ok\n"),
        ("GET", "/readyz") if drain.is_draining() => text(StatusCode::SERVICE_UNAVAILABLE, "draining\n"),
        ("GET", "/readyz") => text(StatusCode::OK, "ready\n"),
        ("GET", "/status") => json_response(StatusCode::OK, &status(state)),
        ("GET", "/metrics") => {
            let shared = state.control.shared();
            let live = LiveState {
                view: state.control.view(),
                plugins: shared.registry.clone(),
                cluster: state.control.services().counters.status(),
            };
            let text = shared.metrics.encode(Box::new(live));
            whole(StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", Bytes::from(text))
        }
        ("POST", "/reload") => {
            let report = state.control.reload().await;
            let code = if report.applied() { StatusCode::OK } else { StatusCode::BAD_REQUEST };
            json_response(code, &serde_json::to_value(&report).unwrap_or_default())
        }
        _ => text(StatusCode::NOT_FOUND, "not found: try /, /healthz, /readyz, /status, /metrics or POST /reload\n"),
    }
}

/// Server-Sent Events: the status document, now and then once a second,
/// until the client goes away.
pub struct EventStream {
    state: Arc<AdminState>,
    interval: tokio::time::Interval,
    _slot: EventSlot,
}

/// Counts one open `/events` stream while it lives.
struct EventSlot(Arc<AtomicUsize>);

impl Drop for EventSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl hyper::body::Body for EventStream {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.state.control.is_stopped() {
            // The gateway is gone: end the stream (and the connection).
            return Poll::Ready(None);
        }
        match self.interval.poll_tick(cx) {
            Poll::Ready(_) => {
                let event = format!("data: {}\n\n", status(&self.state));
                Poll::Ready(Some(Ok(Frame::data(Bytes::from(event)))))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

fn whole(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<AdminBody> {
    let mut response = Response::new(Either::Left(Full::new(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<AdminBody> {
    whole(status, "application/json", Bytes::from(value.to_string()))
}

fn text(status: StatusCode, body: &'static str) -> Response<AdminBody> {
    whole(status, "text/plain; charset=utf-8", Bytes::from_static(body.as_bytes()))
}

/// The live state as JSON.
pub fn status(state: &AdminState) -> serde_json::Value {
    let (view, shared) = (state.control.view(), state.control.shared());
    let (drain, metrics) = (&shared.drain, &shared.metrics);
    let mut pools: Vec<_> = view.pools.all().collect();
    pools.sort_by(|a, b| a.name.cmp(&b.name));
    let unix_ms = |t: SystemTime| t.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    let micros = |seconds: Option<f64>| seconds.map(|s| (s * 1e6).round());
    json!({
        "config_version": view.version,
        "requests_total": metrics.answered.load(std::sync::atomic::Ordering::Relaxed),
        "errors_total": metrics.failed.load(std::sync::atomic::Ordering::Relaxed),
        "uptime_s": state.started.elapsed().as_secs(),
        "draining": drain.is_draining(),
        "requests_in_flight": drain.in_flight(),
        "websockets": drain.websockets(),
        "upstream_connections": {
            "open": view.pools.process_budget().open(),
            "limit": view.pools.process_budget().limit(),
        },
        "listeners": view.listeners.iter().map(|l| json!({
            "name": l.name,
            "addr": l.addr.to_string(),
            "websockets": l.proxy.live_websockets(),
            "certificates": l.certs.as_ref().map(|certs| {
                let stats = certs.stats();
                json!({"reloads": stats.reloads, "rejected": stats.rejected, "last_error": stats.last_error})
            }),
        })).collect::<Vec<_>>(),
        "pools": pools.iter().map(|pool| json!({
            "name": pool.name,
            "balance": format!("{:?}", pool.balance),
            "websockets": pool.servers.iter().map(|s| s.websockets()).sum::<usize>(),
            "upstream_connections": pool.budgets.pool.as_ref().map(|budget| json!({
                "open": budget.open(),
                "limit": budget.limit(),
            })),
            "servers": pool.servers.iter().map(|s| {
                let probe = s.last_probe();
                json!({
                    "address": s.address,
                    "healthy": s.is_healthy(),
                    "last_reason": s.last_reason(),
                    "active": s.active(),
                    "websockets": s.websockets(),
                    "last_probe": probe.map(|(at, failure)| json!({
                        "at_unix_ms": unix_ms(at),
                        "ok": failure.is_none(),
                        "detail": failure.unwrap_or_else(|| "passed".into()),
                    })),
                })
            }).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "plugins": shared.registry.all().iter().map(|p| {
            let (id, stats) = (&p.identity, p.stats());
            let timing = metrics.plugin_timing(&id.name);
            json!({
                "name": id.name,
                "kind": id.kind.to_string(),
                "sha256": id.sha256,
                "version": id.version,
                "from_cache": id.from_cache,
                "loaded_at": id.loaded_at.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
                "calls": stats.calls,
                "errors": stats.errors,
                "timeouts": stats.timeouts,
                "memory_limit_hits": stats.memory_limit_hits,
                "instances_retired": stats.instances_retired,
                "last_error": stats.last_error,
                "quarantines": stats.quarantines,
                "quarantine_reason": stats.quarantine_reason,
                "quarantined": stats.quarantined,
                "p50_us": micros(timing.quantile(0.5)),
                "p99_us": micros(timing.quantile(0.99)),
            })
        }).collect::<Vec<_>>(),
        "rejected_plugins": shared.registry.rejected().iter().map(|(name, r)| json!({
            "name": name,
            "file": r.file.display().to_string(),
            "reason": r.reason,
        })).collect::<Vec<_>>(),
        "cluster": state.control.services().counters.status(),
        "reloads": state.control.history(),
    })
}

/// Sends `POST path` with a bearer token to an admin listener (the
/// `wasmgate reload` command); returns the status and body.
pub async fn post(addr: std::net::SocketAddr, path: &str, token: &str) -> anyhow::Result<(StatusCode, String)> {
    use http_body_util::BodyExt;
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let request = Request::post(path)
        .header(header::HOST, addr.to_string())
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .body(http_body_util::Empty::<Bytes>::new())?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}
