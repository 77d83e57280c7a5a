//! The WebSocket opening handshake on both sides: the client's, checked
//! against RFC 6455 §4.2.1 (or RFC 8441 extended CONNECT over HTTP/2); the
//! one sent to the chosen server over a new HTTP/1.1 connection; and the
//! server's 101, checked as a client would (RFC 6455 §4.1).

use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, Version};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use crate::http::GatewayError;
use crate::http::headers::{has_token, list, new_websocket_key};
use crate::upstream::SendError;
use crate::upstream::budget::Budgets;
use crate::upstream::connect::{self, error_chain};
use crate::upstream::tls::PoolTls;

/// A client's valid opening handshake.
#[derive(Debug, Clone)]
pub struct ClientHandshake {
    /// The key sent to the server: the client's own over HTTP/1.1, a fresh
    /// one when bridging an HTTP/2 extended CONNECT (which has no key).
    upstream_key: HeaderValue,
    /// An HTTP/2 extended CONNECT (RFC 8441): answered 200, not 101.
    pub over_h2: bool,
    /// `Sec-WebSocket-Protocol`, each offered subprotocol.
    pub subprotocols: Vec<String>,
    pub origin: Option<String>,
    /// `Sec-WebSocket-Extensions`, each offered extension with its parameters.
    pub extensions: Vec<String>,
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
        let key = new_websocket_key();
        Ok(Some(ClientHandshake {
            upstream_key: HeaderValue::from_str(&key).map_err(|_| GatewayError::BadHandshake("key"))?,
            over_h2: true,
            subprotocols: list(headers, header::SEC_WEBSOCKET_PROTOCOL),
            origin: headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()).map(str::to_owned),
            extensions: list(headers, header::SEC_WEBSOCKET_EXTENSIONS),
        }))
    }

    /// Sends the handshake (a head made for upstream) to the server at
    /// `address` as an HTTP/1.1 upgrade over a new connection (TLS for `https`
    /// pools) and returns its answer.
    pub async fn send(
        &self,
        mut parts: Parts,
        address: &str,
        tls: Option<&PoolTls>,
        budgets: &Budgets,
        timeout: Duration,
    ) -> Result<Response<Incoming>, SendError> {
        parts.method = Method::GET;
        parts.headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        parts.headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        parts.headers.insert(header::SEC_WEBSOCKET_KEY, self.upstream_key.clone());
        let request = Request::from_parts(parts, Empty::<Bytes>::new());
        let exchange = async {
            let io = connect::connect(address, tls, connect::connect_timeout(timeout), budgets).await?;
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
}

/// Checks a server's 101 as a client would (RFC 6455 §4.1): the upgrade
/// headers, the accept key, and a subprotocol and extensions the client
/// offered.
pub(super) fn check_server_handshake(headers: &HeaderMap, handshake: &ClientHandshake) -> Result<(), &'static str> {
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
