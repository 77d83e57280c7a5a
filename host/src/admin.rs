//! The admin listener: liveness, readiness and live status for operators and
//! orchestrators. Loopback by default; with `token_file`, every request needs
//! `Authorization: Bearer <token>` (required for a non-loopback bind).
//!
//! - `GET /healthz`: 200 while the process serves.
//! - `GET /readyz`: 200, or 503 once draining (so a balancer stops sending).
//! - `GET /status`: JSON — listeners, pools with each server's health, last
//!   reason and live connections, plugins with identity and counters.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;

use crate::plugin::Registry;
use crate::pool::Pools;
use crate::shutdown::Drain;

/// What the admin endpoints read.
pub struct AdminState {
    pub listeners: Vec<(String, SocketAddr)>,
    pub pools: Arc<Pools>,
    pub registry: Arc<Registry>,
    pub drain: Arc<Drain>,
    pub token: Option<String>,
    pub started: Instant,
}

/// Serves the admin endpoints on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(&state, req)) }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

fn handle(state: &AdminState, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if let Some(token) = &state.token {
        let presented = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        if presented != Some(format!("Bearer {token}").as_str()) {
            return text(StatusCode::UNAUTHORIZED, "a bearer token is required\n");
        }
    }
    match (req.method().as_str(), req.uri().path()) {
        ("GET", "/healthz") => text(StatusCode::OK, "ok\n"),
        ("GET", "/readyz") if state.drain.is_draining() => text(StatusCode::SERVICE_UNAVAILABLE, "draining\n"),
        ("GET", "/readyz") => text(StatusCode::OK, "ready\n"),
        ("GET", "/status") => {
            let mut response = Response::new(Full::new(Bytes::from(status(state).to_string())));
            response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            response
        }
        _ => text(StatusCode::NOT_FOUND, "not found: try /healthz, /readyz or /status\n"),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response
}

/// The live state as JSON.
pub fn status(state: &AdminState) -> serde_json::Value {
    let mut pools: Vec<_> = state.pools.all().collect();
    pools.sort_by(|a, b| a.name.cmp(&b.name));
    json!({
        "uptime_s": state.started.elapsed().as_secs(),
        "draining": state.drain.is_draining(),
        "requests_in_flight": state.drain.in_flight(),
        "websockets": state.drain.websockets(),
        "listeners": state.listeners.iter().map(|(name, addr)| json!({"name": name, "addr": addr.to_string()})).collect::<Vec<_>>(),
        "pools": pools.iter().map(|pool| json!({
            "name": pool.name,
            "balance": format!("{:?}", pool.balance),
            "servers": pool.servers.iter().map(|s| json!({
                "address": s.address,
                "healthy": s.is_healthy(),
                "last_reason": s.last_reason(),
                "active": s.active(),
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "plugins": state.registry.all().iter().map(|p| {
            let (id, stats) = (&p.identity, p.stats());
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
                "quarantines": stats.quarantines,
                "quarantined": stats.quarantined,
            })
        }).collect::<Vec<_>>(),
    })
}
