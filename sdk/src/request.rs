//! The request a plugin is asked about: the gateway's, read one field at a
//! time (each accessor is one call into the gateway), or, in native unit
//! tests, one built by [`testing`](crate::testing).

use crate::bindings::wasmgate::plugin::types as wit;
use crate::{Header, TlsInfo, WebsocketHandshake};

/// The request under decision. Valid only during the call it was passed to.
pub struct Request<'a> {
    inner: Inner<'a>,
}

enum Inner<'a> {
    Host(&'a wit::Request),
    #[cfg(not(target_arch = "wasm32"))]
    Mock(&'a crate::testing::MockRequest),
}

macro_rules! field {
    ($(#[$doc:meta])* $name:ident -> $ty:ty) => {
        $(#[$doc])*
        pub fn $name(&self) -> $ty {
            match &self.inner {
                Inner::Host(req) => req.$name(),
                #[cfg(not(target_arch = "wasm32"))]
                Inner::Mock(req) => req.$name.clone(),
            }
        }
    };
}

impl<'a> Request<'a> {
    #[doc(hidden)]
    pub fn from_host(req: &'a wit::Request) -> Request<'a> {
        Request { inner: Inner::Host(req) }
    }

    #[cfg(not(target_arch = "wasm32"))]
    pub(crate) fn from_mock(req: &'a crate::testing::MockRequest) -> Request<'a> {
        Request { inner: Inner::Mock(req) }
    }

    /// The number of the gateway's handle for this request (0 for a test's
    /// request). For tests of the host's handle checks; a plugin has no use
    /// for it, and the handle is valid only during this call.
    #[doc(hidden)]
    pub fn raw_handle(&self) -> u32 {
        match &self.inner {
            Inner::Host(req) => req.handle(),
            #[cfg(not(target_arch = "wasm32"))]
            Inner::Mock(_) => 0,
        }
    }

    field!(
        /// `GET`, `POST`, ...
        method -> String
    );
    field!(
        /// `http` or `https`: how the client reached the gateway.
        scheme -> String
    );
    field!(
        /// `HTTP/1.1`, `HTTP/1.0` or `HTTP/2`.
        version -> String
    );
    field!(
        /// The `Host` header (or the target's authority), with any port.
        authority -> String
    );
    field!(
        /// The path, percent-encoded as received, without the query.
        path -> String
    );
    field!(
        /// The query string without its `?`.
        query -> Option<String>
    );
    field!(
        /// The client's IP address as the gateway's socket saw it.
        client_ip -> String
    );
    field!(
        /// The listener the request arrived on.
        listener -> String
    );
    field!(
        /// TLS details, on TLS connections.
        tls -> Option<TlsInfo>
    );
    field!(
        /// The WebSocket handshake, when the request is one.
        websocket -> Option<WebsocketHandshake>
    );
    field!(
        /// Every header, in the order received.
        headers -> Vec<Header>
    );

    /// Header `name` (any case); several lines of it joined by `, ` (`; `
    /// for `cookie`).
    pub fn header(&self, name: &str) -> Option<String> {
        match &self.inner {
            Inner::Host(req) => req.header(name),
            #[cfg(not(target_arch = "wasm32"))]
            Inner::Mock(req) => req.joined_header(name),
        }
    }

    /// The host part of the authority, without a port, lower-cased.
    pub fn host(&self) -> String {
        let authority = self.authority();
        let host = if let Some(rest) = authority.strip_prefix('[') {
            // [v6]:port
            rest.split(']').next().unwrap_or(rest)
        } else {
            authority.rsplit_once(':').map_or(authority.as_str(), |(h, _)| h)
        };
        host.to_ascii_lowercase()
    }

    /// The value of query parameter `name` (not percent-decoded).
    pub fn query_param(&self, name: &str) -> Option<String> {
        self.query()?.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (k == name).then(|| v.to_owned())
        })
    }

    /// True when this request is a WebSocket opening handshake.
    pub fn is_websocket(&self) -> bool {
        self.websocket().is_some()
    }
}
