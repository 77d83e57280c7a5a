//! Responses the gateway makes itself. Each carries a short text body and an
//! `x-wasmgate-error` header naming the cause, so a client (or an operator
//! reading a curl trace) can tell a gateway answer from a backend's.

use super::body::{self, ResponseBody};
use http::{HeaderValue, Response, StatusCode, header};

/// The header naming why the gateway answered.
pub const ERROR_HEADER: &str = "x-wasmgate-error";

/// The `x-wasmgate-error` code on a WAF plugin's denial (the plugin's own
/// status and body are kept).
pub const WAF_DENY: &str = "waf-deny";

/// The methods a 405 says the gateway proxies (any but `CONNECT`, which
/// only opens RFC 8441 WebSockets, and `TRACE`, which is forwarded but not
/// advertised).
pub const ALLOWED_METHODS: &str = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS";

/// Why the gateway answered a request itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GatewayError {
    /// 308: this listener sends plain-HTTP clients to HTTPS.
    #[error("moved to {location}")]
    RedirectToHttps { location: String },
    /// 400: the request could not be understood.
    #[error("malformed request: {0}")]
    BadRequest(&'static str),
    /// 421: the request names another host than its TLS connection's SNI.
    #[error("this connection is for another host")]
    MisdirectedRequest,
    /// 405: a method the gateway does not proxy (`CONNECT` other than an
    /// RFC 8441 WebSocket).
    #[error("method {0} is not allowed here")]
    MethodNotAllowed(http::Method),
    /// 400: an `Upgrade: websocket` request that breaks RFC 6455 §4.2.1.
    #[error("malformed WebSocket handshake: {0}")]
    BadHandshake(&'static str),
    /// 426: a WebSocket version other than 13.
    #[error("unsupported WebSocket version; this gateway speaks version 13")]
    UnsupportedWebSocketVersion,
    /// 404: neither the router nor a default pool took the request.
    #[error("no route for this request")]
    NoRoute,
    /// 502: the server refused or dropped the connection.
    #[error("backend {server} of pool `{pool}` is unreachable")]
    BackendUnreachable { pool: String, server: String },
    /// 502: the server answered the WebSocket handshake wrongly.
    #[error("backend {server} of pool `{pool}` answered the WebSocket handshake wrongly: {reason}")]
    BadBackendHandshake { pool: String, server: String, reason: &'static str },
    /// 502: the TLS handshake with the server failed.
    #[error("TLS to backend {server} of pool `{pool}` failed: {reason}")]
    BackendTls { pool: String, server: String, reason: String },
    /// 503: the pool has no server to take the request.
    #[error("no healthy server in pool `{pool}`")]
    NoHealthyServer { pool: String },
    /// 503: the listener has as many WebSockets as it may hold.
    #[error("listener `{listener}` is at its WebSocket capacity")]
    AtCapacity { listener: String },
    /// 503: this host is out of descriptors or ports for a new upstream
    /// connection (the server's health is left alone).
    #[error("the gateway is out of connections to pool `{pool}`; retry shortly")]
    OutOfResources { pool: String },
    /// 503: a plugin failed and fails closed.
    #[error("plugin `{plugin}` is unavailable")]
    PluginUnavailable { plugin: String },
    /// 504: the server took longer than the pool's `request_timeout_s`.
    #[error("backend {server} of pool `{pool}` did not answer in time")]
    BackendTimeout { pool: String, server: String },
}

impl GatewayError {
    /// The 308 to the same URL on the HTTPS listener's `port`: the host from
    /// `Host` (or the absolute target's authority), the target unchanged;
    /// or 421 if `hosts` (the HTTPS
    /// listener's certificate names) do not include the request's host: the
    /// `Location` never names a host the client made up.
    pub fn redirect_to_https<B>(req: &http::Request<B>, port: u16, hosts: &[String]) -> GatewayError {
        let authority = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| req.uri().authority().map(|a| a.as_str()))
            .unwrap_or("");
        let host = match authority.rsplit_once(':') {
            Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
            _ => authority,
        };
        if !super::target::names_host(hosts, host) {
            return GatewayError::MisdirectedRequest;
        }
        let target = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
        let location =
            if port == 443 { format!("https://{host}{target}") } else { format!("https://{host}:{port}{target}") };
        GatewayError::RedirectToHttps { location }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::RedirectToHttps { .. } => StatusCode::PERMANENT_REDIRECT,
            GatewayError::BadRequest(_) | GatewayError::BadHandshake(_) => StatusCode::BAD_REQUEST,
            GatewayError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            GatewayError::MisdirectedRequest => StatusCode::MISDIRECTED_REQUEST,
            GatewayError::UnsupportedWebSocketVersion => StatusCode::UPGRADE_REQUIRED,
            GatewayError::NoRoute => StatusCode::NOT_FOUND,
            GatewayError::BackendUnreachable { .. }
            | GatewayError::BadBackendHandshake { .. }
            | GatewayError::BackendTls { .. } => StatusCode::BAD_GATEWAY,
            GatewayError::NoHealthyServer { .. }
            | GatewayError::AtCapacity { .. }
            | GatewayError::OutOfResources { .. }
            | GatewayError::PluginUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            GatewayError::BackendTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The value of `x-wasmgate-error`.
    pub fn code(&self) -> &'static str {
        match self {
            GatewayError::RedirectToHttps { .. } => "redirect-to-https",
            GatewayError::BadRequest(_) => "bad-request",
            GatewayError::MethodNotAllowed(_) => "method-not-allowed",
            GatewayError::MisdirectedRequest => "misdirected-request",
            GatewayError::BadHandshake(_) => "bad-handshake",
            GatewayError::UnsupportedWebSocketVersion => "unsupported-websocket-version",
            GatewayError::NoRoute => "no-route",
            GatewayError::BackendUnreachable { .. } => "backend-unreachable",
            GatewayError::BadBackendHandshake { .. } => "bad-backend-handshake",
            GatewayError::BackendTls { .. } => "backend-tls",
            GatewayError::NoHealthyServer { .. } => "no-healthy-server",
            GatewayError::AtCapacity { .. } => "at-capacity",
            GatewayError::OutOfResources { .. } => "out-of-resources",
            GatewayError::PluginUnavailable { .. } => "plugin-unavailable",
            GatewayError::BackendTimeout { .. } => "backend-timeout",
        }
    }

    /// The response a client gets. Backend addresses are not shown to clients.
    pub fn response(&self) -> Response<ResponseBody> {
        let body = match self {
            GatewayError::BackendUnreachable { pool, .. } => format!("backend of pool `{pool}` is unreachable"),
            GatewayError::BadBackendHandshake { pool, .. } => {
                format!("backend of pool `{pool}` answered the WebSocket handshake wrongly")
            }
            GatewayError::BackendTimeout { pool, .. } => format!("backend of pool `{pool}` did not answer in time"),
            GatewayError::BackendTls { pool, .. } => format!("TLS to the backend of pool `{pool}` failed"),
            other => other.to_string(),
        };
        let mut response = Response::new(body::whole(body + "\n"));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
        headers.insert(ERROR_HEADER, HeaderValue::from_static(self.code()));
        match self {
            GatewayError::UnsupportedWebSocketVersion => {
                headers.insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
            }
            GatewayError::AtCapacity { .. } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            }
            GatewayError::OutOfResources { .. } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            GatewayError::MethodNotAllowed(_) => {
                // RFC 9110 §15.5.6: a 405 lists what is allowed.
                headers.insert(header::ALLOW, HeaderValue::from_static(ALLOWED_METHODS));
            }
            GatewayError::RedirectToHttps { location } => {
                if let Ok(location) = HeaderValue::from_str(location) {
                    headers.insert(header::LOCATION, location);
                }
            }
            _ => {}
        }
        response
    }
}
