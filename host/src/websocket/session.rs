//! A WebSocket session after the server's answer: the place it holds under
//! its listener's cap, the client's answer (101, or 200 over HTTP/2), and the
//! background task that relays both upgraded connections until they close,
//! then counts and logs the session.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header;
use http::{Response, StatusCode};
use http_body_util::Either;
use hyper::body::Incoming;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::handshake::{ClientHandshake, check_server_handshake};
use super::relay::{self, EndCause, RelayEnd, RelayLimits, Socket};
use crate::http::body::Upstream;
use crate::http::conn::ClientStream;
use crate::http::headers::remove_hop_by_hop;
use crate::http::{GatewayError, ResponseBody, TunnelGuard};
use crate::shutdown::{Drain, Spread, Stop};
use crate::telemetry::access_log::{self, AccessLog, WebSocketEntry};
use crate::telemetry::metrics::{DirectionLabel, ListenerPoolLabels, Metrics, ReasonLabel};
use crate::telemetry::otlp::{Attribute, Otlp, SpanRecord};
use crate::upstream::Server;
use crate::upstream::connect::{Io, plain_tcp};
use crate::upstream::pool::ActiveGuard;

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

/// What a successful upgrade needs to keep while it relays.
pub struct Relaying {
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
    /// Set when the access log is on (boxed, like `span`: a pointer's
    /// width in every WebSocket's state when off).
    pub log: Option<Box<WebSocketLog>>,
    /// With `[otlp]`: the exporter and this WebSocket's span, filled in and
    /// sent when it ends.
    pub span: Option<Box<(Arc<Otlp>, SpanRecord)>>,
    /// Counts this WebSocket on its client connection while it lives.
    pub tunnel: TunnelGuard,
}

/// The client's upgraded connection: its own TCP socket when hyper hands
/// it back (an HTTP/1.1 upgrade on a plain connection), else hyper's
/// upgraded stream (TLS, or a stream of an HTTP/2 connection).
enum ClientIo {
    Plain(TcpStream),
    Other(Box<TokioIo<Upgraded>>),
}

impl ClientIo {
    /// The client's stream, and what hyper read from it past the handshake.
    ///
    /// hyper-util's `downcast` puts its version sniff's leftover after
    /// hyper's read buffer, which would misorder them if both held bytes;
    /// the leftover (at most 24 bytes, part of the request head) is always
    /// drained by hyper's first read of the head, which takes at least
    /// 8 KiB, so only hyper's buffer can hold bytes there. What the
    /// listener's first read took and hyper has not read yet comes after
    /// both (hyper's second read takes all of it, so only a head that fits
    /// in the sniff's 24 bytes, never a WebSocket handshake, leaves any).
    fn from_upgraded(upgraded: Upgraded) -> (ClientIo, Bytes) {
        match hyper_util::server::conn::auto::upgrade::downcast::<TokioIo<ClientStream>>(upgraded) {
            Ok(parts) => {
                let (tcp, unread) = parts.io.into_inner().into_tcp();
                let read_before =
                    if unread.is_empty() { parts.read_buf } else { [parts.read_buf, unread].concat().into() };
                (ClientIo::Plain(tcp), read_before)
            }
            Err(upgraded) => (ClientIo::Other(Box::new(TokioIo::new(upgraded))), Bytes::new()),
        }
    }
}

/// The server's upgraded connection (as [`connect`](crate::upstream::connect)
/// opened it), and what hyper read from it past the 101.
fn server_io_from(upgraded: Upgraded) -> (Box<dyn Io>, Bytes) {
    match upgraded.downcast::<TokioIo<Box<dyn Io>>>() {
        Ok(parts) => (parts.io.into_inner(), parts.read_buf),
        Err(upgraded) => (Box::new(TokioIo::new(upgraded)), Bytes::new()),
    }
}

impl Socket for ClientIo {
    fn tcp(&self) -> Option<&TcpStream> {
        match self {
            ClientIo::Plain(stream) => Some(stream),
            ClientIo::Other(_) => None,
        }
    }
}

impl Socket for Box<dyn Io> {
    fn tcp(&self) -> Option<&TcpStream> {
        plain_tcp(&**self)
    }
}

impl AsyncRead for ClientIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientIo::Plain(stream) => Pin::new(stream).poll_read(cx, buf),
            ClientIo::Other(stream) => Pin::new(stream).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientIo::Plain(stream) => Pin::new(stream).poll_write(cx, data),
            ClientIo::Other(stream) => Pin::new(stream).poll_write(cx, data),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientIo::Plain(stream) => Pin::new(stream).poll_flush(cx),
            ClientIo::Other(stream) => Pin::new(stream).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientIo::Plain(stream) => Pin::new(stream).poll_shutdown(cx),
            ClientIo::Other(stream) => Pin::new(stream).poll_shutdown(cx),
        }
    }
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

/// The client's answer to its handshake.
pub enum ClientAnswer {
    /// The server upgraded: the client gets its 101 (200 over HTTP/2) and
    /// the relay runs in the background.
    Upgraded(Response<ResponseBody>),
    /// The server declined the upgrade: its answer is the client's.
    Declined(Response<ResponseBody>),
}

/// What the access log line of a WebSocket needs beyond the relay's end.
pub struct WebSocketLog {
    pub access: Arc<AccessLog>,
    pub client: std::net::SocketAddr,
    pub path: String,
    /// The handshake's request ID.
    pub request_id: String,
}

/// Turns the server's answer into the client's: a 101 (after checking the
/// accept key) with the relay started in the background, or the server's
/// own refusal passed through.
///
/// The client's `handshake` is only borrowed: its header values share the
/// client connection's read buffer, which the WebSocket must not keep.
/// `client_upgrade` (the client's side of the upgrade) is kept apart from
/// `relaying`: it is used up once the upgrade completes, and dropped then
/// rather than kept for the WebSocket's whole life.
pub fn answer(
    mut response: Response<Incoming>,
    handshake: &ClientHandshake,
    client_upgrade: OnUpgrade,
    relaying: Relaying,
) -> Result<ClientAnswer, GatewayError> {
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        // The server declined the upgrade: its answer is the client's answer.
        let (mut parts, body) = response.into_parts();
        remove_hop_by_hop(&mut parts.headers);
        parts.headers.remove(header::UPGRADE);
        return Ok(ClientAnswer::Declined(Response::from_parts(parts, Upstream::new(body))));
    }
    if let Err(reason) = check_server_handshake(response.headers(), handshake) {
        return Err(GatewayError::BadBackendHandshake {
            pool: relaying.server.pool.clone(),
            server: relaying.server.address.clone(),
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
        remove_hop_by_hop(headers);
        headers.remove(header::UPGRADE);
        headers.remove(header::SEC_WEBSOCKET_ACCEPT);
    } else {
        *answer.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    }

    // Boxed, and only borrowed by the task: what the task keeps across its
    // awaits is stored in it for the WebSocket's whole life, so an idle
    // WebSocket holds this once, out of line, not field by field.
    let mut session = Box::new(relaying);
    tokio::spawn(async move {
        // The upgrades' results are moved straight into the relay: a local
        // holding them would stay in the task's state beside the relay's
        // own copy for the WebSocket's whole life. The wait for them is
        // boxed for the same reason: the task's state is sized by its
        // largest moment, and this one's room would outlive it.
        let upgrades = Box::pin(async { tokio::try_join!(client_upgrade, server_upgrade) });
        let mut relay = match upgrades.await {
            Ok((client_io, server_io)) => {
                let (client, from_client) = ClientIo::from_upgraded(client_io);
                let (server, from_server) = server_io_from(server_io);
                let mut relay = relay::Relay::new(client, server, session.limits);
                relay.read_before(&from_client, &from_server);
                relay
            }
            Err(e) => {
                tracing::debug!(pool = %session.server.pool, error = %e, "upgrade did not complete");
                return;
            }
        };
        if let Some(span) = &mut session.span {
            span.1.start = std::time::SystemTime::now();
        }
        let session = &*session;
        let _live = session.drain.websocket();
        let _on_server = session.server.websocket();
        let _counted = {
            let labels =
                ListenerPoolLabels { listener: session.listener.clone(), pool: session.server.pool.as_str().into() };
            GaugeGuard::up(session.metrics.websockets.get_or_create(&labels).clone())
        };
        let stop = session.stop_signal();
        // Borrowed, not moved: a relay moved into a future would be kept
        // twice in this task's state, the moved-from place included.
        let end = relay.run(&stop).await;
        // Both sockets (and their upstream places) close before the
        // WebSocket stops being counted: a drain that sees none left finds
        // them closed.
        drop(relay);
        drop(stop);
        session.stop_signal_ended();
        session.ended(&end);
    });
    Ok(ClientAnswer::Upgraded(answer))
}

impl Relaying {
    /// One stop signal that every source able to close this WebSocket
    /// fires: shutdown, its server (ejected or removed), its listener
    /// (removed).
    fn stop_signal(&self) -> Arc<Stop> {
        let stop = Arc::new(Stop::default());
        self.drain.add(&stop);
        self.server.add_stop(&stop);
        self.listener_removal.add(&stop);
        stop
    }

    /// The signal from [`Relaying::stop_signal`] was dropped: each source
    /// that holds it may prune its list.
    fn stop_signal_ended(&self) {
        self.drain.ended();
        self.server.stop_ended();
        self.listener_removal.ended();
    }

    /// Counts, traces and logs a relay that ended.
    fn ended(&self, end: &RelayEnd) {
        let lasted = end.lasted;
        let metrics = &self.metrics;
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
        metrics.spliced_bytes.inc_by(end.spliced);
        let (pool, address) = (&self.server.pool, &self.server.address);
        let (up, down) = (end.client_to_server, end.server_to_client);
        if let Some(traced) = &self.span {
            let (otlp, span) = &**traced;
            let mut span = span.clone();
            span.end = span.start + lasted;
            span.attributes.extend([
                ("wasmgate.pool", Attribute::from(pool.as_str())),
                ("server.address", Attribute::from(address.as_str())),
                ("wasmgate.websocket.close", Attribute::from(reason)),
                ("wasmgate.websocket.bytes_up", Attribute::from(up)),
                ("wasmgate.websocket.bytes_down", Attribute::from(down)),
            ]);
            if let EndCause::Error(e) = &end.cause {
                span.error = Some(e.to_string());
            }
            otlp.record(span);
        }
        if let Some(log) = &self.log {
            log.access.websocket(&WebSocketEntry {
                listener: &self.listener,
                client: log.client,
                path: &log.path,
                pool,
                server: address,
                duration_ms: access_log::millis(lasted),
                client_to_server: up,
                server_to_client: down,
                close: reason,
                request_id: &log.request_id,
            });
        }
        match &end.cause {
            EndCause::Error(e) => {
                tracing::debug!(%pool, server = %address, error = %e, up, down, "websocket relay error")
            }
            _ => tracing::debug!(%pool, server = %address, reason, up, down, "websocket closed"),
        }
    }
}
