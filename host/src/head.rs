//! The request head view: the [`RequestHead`] record plugins inspect, built
//! from what hyper parsed and what the socket knows.

use http::{Request, Version};

use crate::listener::ConnInfo;
use crate::plugin::bindings::{Header, RequestHead, TlsInfo};
use crate::websocket::ClientHandshake;

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
        websocket: websocket.map(ClientHandshake::plugin_view),
    }
}
