//! WebSocket upgrades: checking the client's opening handshake (RFC 6455
//! §4.2.1), sending it to the chosen server, checking the server's answer,
//! and handing both upgraded connections to the [relay](crate::relay).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::{Either, Empty};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use crate::access_log::{self, AccessLog, WebSocketEntry};
use crate::error::GatewayError;
use crate::forward::{self, SendError, error_chain};
use prometheus_client::metrics::gauge::Gauge;

use crate::metrics::{DirectionLabel, ListenerPoolLabels, Metrics, ReasonLabel};
use crate::plugin::bindings::WebsocketHandshake;
use crate::pool::{ActiveGuard, Server};
use crate::proxy::ResponseBody;
use crate::relay::{self, CloseReason, EndCause, RelayLimits};
use crate::shutdown::{Drain, Spread};
use crate::upstream::{self, PoolTls};

/// A client's valid opening handshake.
#[derive(Debug, Clone)]
pub struct ClientHandshake {
    /// The key sent to the server: the client's own over HTTP/1.1, a fresh
    /// one when bridging an HTTP/2 extended CONNECT (which has no key).
    upstream_key: HeaderValue,
    /// An HTTP/2 extended CONNECT (RFC 8441): answered 200, not 101.
    over_h2: bool,
    subprotocols: Vec<String>,
    origin: Option<String>,
    extensions: Vec<String>,
}

impl ClientHandshake {
    /// Reads the handshake from a request: `Ok(None)` when the request does
    /// not ask for a WebSocket, an error when it asks wrongly.
    pub fn from_request<B>(req: &Request<B>) -> Result<Option<ClientHandshake>, GatewayError> {
        let headers = req.headers();
        if req.method() == Method::CONNECT
            && let Some(protocol) = req.extensions().get::<hyper::ext::Protocol>()
        {
            return Self::extended_connect(req, protocol);
        }
        if !has_token(headers, header::UPGRADE, "websocket") {
            return Ok(None);
        }
        if req.method() != Method::GET {
            return Err(GatewayError::BadHandshake("the method must be GET"));
        }
        if req.version() < Version::HTTP_11 {
            return Err(GatewayError::BadHandshake("HTTP/1.1 or later is required"));
        }
        if !headers.contains_key(header::HOST) {
            return Err(GatewayError::BadHandshake("the Host header is missing"));
        }
        if !has_token(headers, header::CONNECTION, "upgrade") {
            return Err(GatewayError::BadHandshake("the Connection header must include Upgrade"));
        }
        let mut keys = headers.get_all(header::SEC_WEBSOCKET_KEY).iter();
        let key = match (keys.next(), keys.next()) {
            (Some(key), None) => key.clone(),
            (None, _) => return Err(GatewayError::BadHandshake("Sec-WebSocket-Key is missing")),
            (Some(_), Some(_)) => return Err(GatewayError::BadHandshake("Sec-WebSocket-Key is repeated")),
        };
        let decoded = base64::engine::general_purpose::STANDARD.decode(key.as_bytes());
        if !matches!(decoded, Ok(bytes) if bytes.len() == 16) {
            return Err(GatewayError::BadHandshake("Sec-WebSocket-Key must be 16 bytes in base64"));
        }
        match headers.get(header::SEC_WEBSOCKET_VERSION).map(|v| v.as_bytes().trim_ascii()) {
            None => return Err(GatewayError::BadHandshake("Sec-WebSocket-Version is missing")),
            Some(b"13") => {}
            Some(_) => return Err(GatewayError::UnsupportedWebSocketVersion),
        }
        Ok(Some(ClientHandshake {
            upstream_key: key,
            over_h2: false,
            subprotocols: list(headers, header::SEC_WEBSOCKET_PROTOCOL),
            origin: headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()).map(str::to_owned),
            extensions: list(headers, header::SEC_WEBSOCKET_EXTENSIONS),
        }))
    }

    /// An HTTP/2 extended CONNECT (RFC 8441 §4-5): `:protocol` must be
    /// `websocket` and the version 13; the key for the server is made here.
    fn extended_connect<B>(
        req: &Request<B>,
        protocol: &hyper::ext::Protocol,
    ) -> Result<Option<ClientHandshake>, GatewayError> {
        if !protocol.as_str().eq_ignore_ascii_case("websocket") {
            return Err(GatewayError::BadRequest("only the websocket protocol can be CONNECTed"));
        }
        let headers = req.headers();
        match headers.get(header::SEC_WEBSOCKET_VERSION).map(|v| v.as_bytes().trim_ascii()) {
            None => return Err(GatewayError::BadHandshake("Sec-WebSocket-Version is missing")),
            Some(b"13") => {}
            Some(_) => return Err(GatewayError::UnsupportedWebSocketVersion),
        }
        let random = std::hash::BuildHasher::hash_one(&std::hash::RandomState::new(), 0u8).to_le_bytes();
        let key = base64::engine::general_purpose::STANDARD.encode([random, random.map(|b| !b)].concat());
        Ok(Some(ClientHandshake {
            upstream_key: HeaderValue::from_str(&key).map_err(|_| GatewayError::BadHandshake("key"))?,
            over_h2: true,
            subprotocols: list(headers, header::SEC_WEBSOCKET_PROTOCOL),
            origin: headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()).map(str::to_owned),
            extensions: list(headers, header::SEC_WEBSOCKET_EXTENSIONS),
        }))
    }

    /// The handshake as plugins see it.
    pub fn plugin_view(&self) -> WebsocketHandshake {
        WebsocketHandshake {
            version: "13".to_owned(),
            subprotocols: self.subprotocols.clone(),
            origin: self.origin.clone(),
            extensions: self.extensions.clone(),
        }
    }
}

/// A held place in a listener's WebSocket capacity, given back on drop.
pub struct WebSocketSlot {
    live: Arc<AtomicUsize>,
}

impl WebSocketSlot {
    /// Takes a place if fewer than `max` WebSockets are live.
    pub fn try_take(live: &Arc<AtomicUsize>, max: usize) -> Option<WebSocketSlot> {
        live.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1)).ok()?;
        Some(WebSocketSlot { live: live.clone() })
    }
}

impl Drop for WebSocketSlot {
    fn drop(&mut self) {
        self.live.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Sends the handshake (a head prepared by [`forward::prepare_upstream`]) to
/// `server` as an HTTP/1.1 upgrade over a new connection (TLS for `https`
/// pools) and returns its answer.
pub async fn send_handshake(
    mut parts: Parts,
    handshake: &ClientHandshake,
    server: &Server,
    tls: Option<&PoolTls>,
    timeout: Duration,
) -> Result<Response<Incoming>, SendError> {
    parts.method = Method::GET;
    parts.headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    parts.headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    parts.headers.insert(header::SEC_WEBSOCKET_KEY, handshake.upstream_key.clone());
    let request = Request::from_parts(parts, Empty::<Bytes>::new());
    let exchange = async {
        let io = upstream::connect(server, tls, forward::connect_timeout(timeout)).await?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| SendError::Failed(error_chain(&e)))?;
        tokio::spawn(async move {
            if let Err(e) = connection.with_upgrades().await {
                tracing::debug!(error = %e, "upstream handshake connection ended with an error");
            }
        });
        sender.send_request(request).await.map_err(|e| SendError::Failed(error_chain(&e)))
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(result) => result,
        Err(_) => Err(SendError::Timeout),
    }
}

/// What a successful upgrade needs to keep while it relays.
pub struct Relaying {
    pub client_upgrade: OnUpgrade,
    pub handshake: ClientHandshake,
    pub server: Arc<Server>,
    /// Counts the connection on its server (for least-connections) from the
    /// handshake until the relay ends.
    pub active: ActiveGuard,
    pub limits: RelayLimits,
    pub slot: WebSocketSlot,
    /// Shutdown: when it drains, this WebSocket gets its Close.
    pub drain: Arc<Drain>,
    /// Set when a reload removes the listener.
    pub listener_removal: Arc<Spread>,
    pub metrics: Arc<Metrics>,
    /// The listener's name, as a metrics label.
    pub listener: Arc<str>,
    /// Set when the access log is on.
    pub log: Option<WebSocketLog>,
}

/// Holds a gauge one higher while it lives.
struct GaugeGuard(Gauge);

impl GaugeGuard {
    fn up(gauge: Gauge) -> GaugeGuard {
        gauge.inc();
        GaugeGuard(gauge)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Marks (in its extensions) a response that upgraded the client.
#[derive(Clone, Copy)]
pub struct Upgraded;

/// What the access log line of a WebSocket needs beyond the relay's end.
pub struct WebSocketLog {
    pub access: Arc<AccessLog>,
    pub client: std::net::SocketAddr,
    pub path: String,
}

/// Turns the server's answer into the client's: a 101 (after checking the
/// accept key) with the relay started in the background, or the server's
/// own refusal passed through.
pub fn answer(mut response: Response<Incoming>, relaying: Relaying) -> Result<Response<ResponseBody>, GatewayError> {
    let Relaying {
        client_upgrade,
        handshake,
        server,
        active,
        limits,
        slot,
        drain,
        listener_removal,
        metrics,
        listener,
        log,
    } = relaying;
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        // The server declined the upgrade: its answer is the client's answer.
        let (mut parts, body) = response.into_parts();
        forward::remove_hop_by_hop(&mut parts.headers);
        parts.headers.remove(header::UPGRADE);
        return Ok(Response::from_parts(parts, Either::Left(body)));
    }
    if let Err(reason) = check_server_handshake(response.headers(), &handshake) {
        return Err(GatewayError::BadBackendHandshake {
            pool: server.pool.clone(),
            server: server.address.clone(),
            reason,
        });
    }

    let server_upgrade = hyper::upgrade::on(&mut response);
    let mut answer = Response::new(Either::Right(Default::default()));
    *answer.headers_mut() = response.headers().clone();
    if handshake.over_h2 {
        // RFC 8441: a 200 opens the stream; HTTP/2 has no connection-level
        // headers and no accept key.
        *answer.status_mut() = StatusCode::OK;
        let headers = answer.headers_mut();
        forward::remove_hop_by_hop(headers);
        headers.remove(header::UPGRADE);
        headers.remove(header::SEC_WEBSOCKET_ACCEPT);
    } else {
        *answer.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    }
    answer.extensions_mut().insert(Upgraded);

    tokio::spawn(async move {
        let _slot = slot;
        let _active = active;
        let (client_io, server_io) = match tokio::try_join!(client_upgrade, server_upgrade) {
            Ok(both) => both,
            Err(e) => {
                tracing::debug!(pool = %server.pool, error = %e, "upgrade did not complete");
                return;
            }
        };
        let _live = drain.websocket();
        let _on_server = server.websocket();
        let started = std::time::Instant::now();
        let labels = ListenerPoolLabels { listener: listener.clone(), pool: server.pool.as_str().into() };
        let _counted = GaugeGuard::up(metrics.websockets.get_or_create(&labels).clone());
        let (ejected, drained) = (server.ejected(), drain.my_turn());
        let (server_removed, listener_removed) = (server.removed(), listener_removal.my_turn());
        let stop = async move {
            tokio::select! {
                _ = ejected => CloseReason::ServerUnhealthy,
                _ = drained => CloseReason::Shutdown,
                _ = server_removed => CloseReason::Removed,
                _ = listener_removed => CloseReason::Removed,
            }
        };
        let end = relay::relay(TokioIo::new(client_io), TokioIo::new(server_io), limits, stop).await;
        let reason = end.cause.label();
        metrics.websocket_closes.get_or_create(&ReasonLabel { reason }).inc();
        metrics
            .relayed_bytes
            .get_or_create(&DirectionLabel { direction: "client_to_server" })
            .inc_by(end.client_to_server);
        metrics
            .relayed_bytes
            .get_or_create(&DirectionLabel { direction: "server_to_client" })
            .inc_by(end.server_to_client);
        let (pool, address) = (&server.pool, &server.address);
        let (up, down) = (end.client_to_server, end.server_to_client);
        if let Some(log) = log {
            log.access.websocket(&WebSocketEntry {
                listener: &listener,
                client: log.client,
                path: &log.path,
                pool,
                server: address,
                duration_ms: access_log::millis(started.elapsed()),
                client_to_server: up,
                server_to_client: down,
                close: reason,
            });
        }
        match &end.cause {
            EndCause::Error(e) => {
                tracing::debug!(%pool, server = %address, error = %e, up, down, "websocket relay error")
            }
            _ => tracing::debug!(%pool, server = %address, reason, up, down, "websocket closed"),
        }
    });
    Ok(answer)
}

/// Checks a server's 101 as a client would (RFC 6455 §4.1): the upgrade
/// headers, the accept key, and a subprotocol and extensions the client
/// offered.
fn check_server_handshake(headers: &HeaderMap, handshake: &ClientHandshake) -> Result<(), &'static str> {
    if !has_token(headers, header::UPGRADE, "websocket") {
        return Err("the 101 has no Upgrade: websocket");
    }
    if !has_token(headers, header::CONNECTION, "upgrade") {
        return Err("the 101 has no Connection: Upgrade");
    }
    let expected = tungstenite::handshake::derive_accept_key(handshake.upstream_key.as_bytes());
    if headers.get(header::SEC_WEBSOCKET_ACCEPT).map(|v| v.as_bytes()) != Some(expected.as_bytes()) {
        return Err("Sec-WebSocket-Accept does not match the key");
    }
    if let Some(chosen) = headers.get(header::SEC_WEBSOCKET_PROTOCOL)
        && !handshake.subprotocols.iter().any(|offered| offered.as_bytes() == chosen.as_bytes().trim_ascii())
    {
        return Err("the server chose a subprotocol the client did not offer");
    }
    let offered: Vec<&str> = handshake.extensions.iter().map(|e| e.split(';').next().unwrap_or("").trim()).collect();
    if list(headers, header::SEC_WEBSOCKET_EXTENSIONS)
        .iter()
        .any(|e| !offered.contains(&e.split(';').next().unwrap_or("").trim()))
    {
        return Err("the server chose an extension the client did not offer");
    }
    Ok(())
}

/// True if any comma-separated token of header `name` equals `token`
/// (case-insensitive).
fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Every comma-separated item of every `name` header, trimmed.
fn list(headers: &HeaderMap, name: header::HeaderName) -> Vec<String> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}
