//! The request head view: the [`RequestHead`] record plugins inspect, built
//! from what hyper parsed and what the socket knows.

use std::net::SocketAddr;

use http::request::Parts;

use crate::plugin::bindings::{Header, RequestHead};
use crate::websocket::ClientHandshake;

/// Builds the head plugins see for a request on `listener` from `client`.
pub fn request_head(
    parts: &Parts,
    client: SocketAddr,
    listener: &str,
    websocket: Option<&ClientHandshake>,
) -> RequestHead {
    let authority = parts
        .headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| parts.uri.authority().map(|a| a.to_string()))
        .unwrap_or_default();
    let headers = parts
        .headers
        .iter()
        .map(|(name, value)| Header {
            name: name.as_str().to_owned(),
            value: String::from_utf8_lossy(value.as_bytes()).into_owned(),
        })
        .collect();
    RequestHead {
        method: parts.method.as_str().to_owned(),
        scheme: "http".to_owned(),
        authority,
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(str::to_owned),
        headers,
        client_ip: client.ip().to_canonical().to_string(),
        listener: listener.to_owned(),
        websocket: websocket.map(ClientHandshake::plugin_view),
    }
}
