//! The request as plugins see it: the `request` resource of the contract,
//! served from what hyper parsed, one field at a time.
//!
//! A [`RequestView`] owns the request head (hyper's `Parts`) only while the
//! request is being decided; the plugin call moves it into the instance's
//! store for the call and back out after, so nothing is copied for a plugin
//! but the fields it asks for, and the head goes on to the backend untouched.

use std::sync::{Arc, LazyLock};

use http::request::Parts;
use http::{HeaderMap, HeaderName, Request, Version};

use super::bindings::{Header, TlsInfo, WebsocketHandshake};
use crate::http::ConnInfo;
use crate::http::headers::list;

/// The type behind `Resource<RequestHandle>`: a request handle carries the
/// number of the call it was issued for, never a pointer.
pub struct RequestHandle;

/// One request under decision.
pub struct RequestView {
    pub parts: Parts,
    pub client: Arc<ConnInfo>,
    pub listener: Arc<str>,
    /// Set when the gateway validated the request as a WebSocket handshake.
    pub websocket: bool,
    /// The client's address: the peer's, or the one a trusted proxy's
    /// `X-Forwarded-For` names ([`RequestView::with_client_ip`]).
    pub client_ip: std::net::IpAddr,
}

static NOBODY: LazyLock<(Arc<ConnInfo>, Arc<str>)> = LazyLock::new(|| {
    let addr = std::net::SocketAddr::from(([0, 0, 0, 0], 0));
    (Arc::new(ConnInfo::new(addr, None)), Arc::from(""))
});

impl RequestView {
    pub fn new(parts: Parts, client: Arc<ConnInfo>, listener: Arc<str>, websocket: bool) -> RequestView {
        let client_ip = client.addr.ip().to_canonical();
        RequestView { parts, client, listener, websocket, client_ip }
    }

    /// The same request from client address `ip` (behind a trusted proxy).
    pub fn with_client_ip(mut self, ip: std::net::IpAddr) -> RequestView {
        self.client_ip = ip;
        self
    }

    /// What an instance holds between calls: no request at all.
    pub(crate) fn empty() -> RequestView {
        let (client, listener) = NOBODY.clone();
        let client_ip = client.addr.ip();
        RequestView { parts: Request::new(()).into_parts().0, client, listener, websocket: false, client_ip }
    }

    pub(crate) fn method(&self) -> String {
        self.parts.method.as_str().to_owned()
    }

    pub(crate) fn scheme(&self) -> String {
        self.client.scheme().to_owned()
    }

    pub(crate) fn version(&self) -> String {
        match self.parts.version {
            Version::HTTP_2 => "HTTP/2",
            Version::HTTP_10 => "HTTP/1.0",
            _ => "HTTP/1.1",
        }
        .to_owned()
    }

    /// The `Host` header, else the target's authority.
    pub(crate) fn authority(&self) -> String {
        self.parts
            .headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_owned)
            .or_else(|| self.parts.uri.authority().map(|a| a.as_str().to_owned()))
            .unwrap_or_default()
    }

    pub(crate) fn path(&self) -> String {
        self.parts.uri.path().to_owned()
    }

    pub(crate) fn query(&self) -> Option<String> {
        self.parts.uri.query().map(str::to_owned)
    }

    /// Every line of header `name`, joined as RFC 9110 §5.3 combines them
    /// (`cookie` lines as RFC 9113 §8.2.3 does). `None` for a name that is
    /// not a valid header name.
    pub(crate) fn header(&self, name: &str) -> Option<String> {
        let name = HeaderName::from_bytes(name.as_bytes()).ok()?;
        joined(&self.parts.headers, &name)
    }

    pub(crate) fn headers(&self) -> Vec<Header> {
        self.parts
            .headers
            .iter()
            .map(|(name, value)| Header { name: name.as_str().to_owned(), value: text(value.as_bytes()) })
            .collect()
    }

    pub(crate) fn client_ip(&self) -> String {
        self.client_ip.to_string()
    }

    pub(crate) fn listener(&self) -> String {
        self.listener.as_ref().to_owned()
    }

    pub(crate) fn tls(&self) -> Option<TlsInfo> {
        self.client.tls.as_ref().map(|tls| TlsInfo { sni: tls.sni.clone(), alpn: tls.alpn.clone() })
    }

    pub(crate) fn websocket(&self) -> Option<WebsocketHandshake> {
        let headers = &self.parts.headers;
        self.websocket.then(|| WebsocketHandshake {
            version: "13".to_owned(),
            subprotocols: list(headers, http::header::SEC_WEBSOCKET_PROTOCOL),
            origin: joined(headers, &http::header::ORIGIN),
            extensions: list(headers, http::header::SEC_WEBSOCKET_EXTENSIONS),
        })
    }
}

fn joined(headers: &HeaderMap, name: &HeaderName) -> Option<String> {
    let mut lines = headers.get_all(name).iter();
    let first = text(lines.next()?.as_bytes());
    let separator = if name == http::header::COOKIE { "; " } else { ", " };
    Some(lines.fold(first, |mut all, line| {
        all.push_str(separator);
        all.push_str(&text(line.as_bytes()));
        all
    }))
}

/// A header value as text: bytes that are not UTF-8 become U+FFFD.
fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(headers: &[(&str, &str)]) -> RequestView {
        let mut builder = Request::builder().uri("/p?q=1");
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let parts = builder.body(()).unwrap().into_parts().0;
        let client = Arc::new(ConnInfo::new("192.0.2.1:5000".parse().unwrap(), None));
        RequestView::new(parts, client, Arc::from("web"), false)
    }

    #[test]
    fn a_header_on_several_lines_is_one_value_with_every_line() {
        let req = view(&[("x-key", "a"), ("X-Key", "b"), ("cookie", "s=1"), ("cookie", "t=2")]);
        assert_eq!(req.header("X-KEY").as_deref(), Some("a, b"));
        assert_eq!(req.header("cookie").as_deref(), Some("s=1; t=2"));
        assert_eq!(req.header("absent"), None);
        assert_eq!(req.header("not a name"), None);
    }

    #[test]
    fn fields_come_from_the_parts() {
        let req = view(&[("host", "app.example:8080")]);
        assert_eq!(
            (req.path(), req.query(), req.authority()),
            ("/p".into(), Some("q=1".into()), "app.example:8080".into())
        );
        assert_eq!((req.method(), req.scheme(), req.version()), ("GET".into(), "http".into(), "HTTP/1.1".into()));
        assert_eq!((req.client_ip(), req.listener()), ("192.0.2.1".into(), "web".into()));
        assert!(req.websocket().is_none() && req.tls().is_none());
    }
}
