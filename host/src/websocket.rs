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
use tokio::net::TcpStream;

use crate::error::GatewayError;
use crate::forward::{self, SendError, error_chain};
use crate::plugin::bindings::WebsocketHandshake;
use crate::pool::Server;
use crate::proxy::ResponseBody;
use crate::relay::{self, RelayEnd, RelayLimits};

/// A client's valid opening handshake.
#[derive(Debug, Clone)]
pub struct ClientHandshake {
    key: HeaderValue,
    subprotocols: Vec<String>,
    origin: Option<String>,
    extensions: Vec<String>,
}

impl ClientHandshake {
    /// Reads the handshake from a request: `Ok(None)` when the request does
    /// not ask for a WebSocket, an error when it asks wrongly.
    pub fn from_request<B>(req: &Request<B>) -> Result<Option<ClientHandshake>, GatewayError> {
        let headers = req.headers();
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
            key,
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
/// `server` over a new connection and returns its answer.
pub async fn send_handshake(parts: Parts, server: &Server, timeout: Duration) -> Result<Response<Incoming>, SendError> {
    let mut request = Request::from_parts(parts, Empty::<Bytes>::new());
    request.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    request.headers_mut().insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    let exchange = async {
        let stream =
            TcpStream::connect(server.address.as_str()).await.map_err(|e| SendError::Connect(e.to_string()))?;
        let _ = stream.set_nodelay(true);
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
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
    pub limits: RelayLimits,
    pub slot: WebSocketSlot,
}

/// Turns the server's answer into the client's: a 101 (after checking the
/// accept key) with the relay started in the background, or the server's
/// own refusal passed through.
pub fn answer(mut response: Response<Incoming>, relaying: Relaying) -> Result<Response<ResponseBody>, GatewayError> {
    let Relaying { client_upgrade, handshake, server, limits, slot } = relaying;
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        // The server declined the upgrade: its answer is the client's answer.
        let (mut parts, body) = response.into_parts();
        forward::remove_hop_by_hop(&mut parts.headers);
        parts.headers.remove(header::UPGRADE);
        return Ok(Response::from_parts(parts, Either::Left(body)));
    }
    let expected = tungstenite::handshake::derive_accept_key(handshake.key.as_bytes());
    let accept = response.headers().get(header::SEC_WEBSOCKET_ACCEPT);
    if accept.map(|v| v.as_bytes()) != Some(expected.as_bytes()) {
        return Err(GatewayError::BadBackendHandshake {
            pool: server.pool.clone(),
            server: server.address.clone(),
            reason: "Sec-WebSocket-Accept does not match the key",
        });
    }

    let server_upgrade = hyper::upgrade::on(&mut response);
    let mut answer = Response::new(Either::Right(Default::default()));
    *answer.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    *answer.headers_mut() = response.headers().clone();

    tokio::spawn(async move {
        let _slot = slot;
        // Counted for least-connections for as long as it lives.
        let _active = server.begin();
        let (client_io, server_io) = match tokio::try_join!(client_upgrade, server_upgrade) {
            Ok(both) => both,
            Err(e) => {
                tracing::debug!(pool = %server.pool, error = %e, "upgrade did not complete");
                return;
            }
        };
        let end = relay::relay(TokioIo::new(client_io), TokioIo::new(server_io), limits, server.ejected()).await;
        let (pool, address) = (&server.pool, &server.address);
        match end {
            RelayEnd::Closed { client_to_server, server_to_client } => {
                tracing::debug!(%pool, server = %address, client_to_server, server_to_client, "websocket closed");
            }
            RelayEnd::IdleTimeout => tracing::debug!(%pool, server = %address, "websocket idle timeout"),
            RelayEnd::MaxLifetime => {
                tracing::debug!(%pool, server = %address, "websocket reached its maximum lifetime")
            }
            RelayEnd::Stopped => {
                tracing::info!(%pool, server = %address, "websocket closed: its server turned unhealthy")
            }
            RelayEnd::Error(e) => tracing::debug!(%pool, server = %address, error = %e, "websocket relay error"),
        }
    });
    Ok(answer)
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
