//! What the gateway knows of a request before deciding anything: the client
//! connection it came on ([`ConnInfo`]), and the [`RequestHead`] record
//! plugins inspect, built from what hyper parsed and what the socket knows.

use std::net::SocketAddr;

use http::{Request, Version};

use crate::plugin::bindings::{Header, RequestHead, TlsInfo, WebsocketHandshake};
use crate::websocket::ClientHandshake;

/// What the gateway knows about a client connection (made by the listener).
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub addr: SocketAddr,
    /// Set on TLS connections.
    pub tls: Option<TlsDetails>,
}

/// What the TLS handshake told: the name asked for and the protocol agreed.
#[derive(Debug, Clone)]
pub struct TlsDetails {
    pub sni: Option<String>,
    pub alpn: Option<String>,
}

impl ConnInfo {
    /// `https` on TLS connections, else `http`.
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }
}

/// Builds the head plugins see for a request on `listener` from `client`.
pub fn request_head<B>(
    req: &Request<B>,
    client: &ConnInfo,
    listener: &str,
    websocket: Option<&ClientHandshake>,
) -> RequestHead {
    let authority = req
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .unwrap_or_default();
    let headers = req
        .headers()
        .iter()
        .map(|(name, value)| Header {
            name: name.as_str().to_owned(),
            value: String::from_utf8_lossy(value.as_bytes()).into_owned(),
        })
        .collect();
    RequestHead {
        method: req.method().as_str().to_owned(),
        scheme: client.scheme().to_owned(),
        version: match req.version() {
            Version::HTTP_2 => "HTTP/2",
            Version::HTTP_10 => "HTTP/1.0",
            _ => "HTTP/1.1",
        }
        .to_owned(),
        tls: client.tls.as_ref().map(|tls| TlsInfo { sni: tls.sni.clone(), alpn: tls.alpn.clone() }),
        authority,
        path: req.uri().path().to_owned(),
        query: req.uri().query().map(str::to_owned),
        headers,
        client_ip: client.addr.ip().to_canonical().to_string(),
        listener: listener.to_owned(),
        websocket: websocket.map(handshake_view),
    }
}

/// The handshake as plugins see it.
fn handshake_view(handshake: &ClientHandshake) -> WebsocketHandshake {
    WebsocketHandshake {
        version: "13".to_owned(),
        subprotocols: handshake.subprotocols.clone(),
        origin: handshake.origin.clone(),
        extensions: handshake.extensions.clone(),
    }
}
