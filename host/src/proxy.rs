//! The life of a request, top to bottom:
//!
//! 1. [`ClientHandshake::from_request`]: is it a WebSocket handshake, and a
//!    valid one?
//! 2. [`head::request_head`]: the view of the request plugins get.
//! 3. [`ListenerProxy::run_waf`]: the listener's WAF plugins, in order; a deny
//!    answers the client.
//! 4. [`ListenerProxy::route`]: the router plugin (or the default pool) picks
//!    a pool, or answers the client itself.
//! 5. [`Pool::pick`]: a server of that pool.
//! 6. [`Forwarder::forward`] for a plain request, [`websocket::upgrade`] for a
//!    handshake (which then relays the stream).
//!
//! Each step is a call; the detail lives in the file named for it.

// A step that ends the request early returns the client's response as its
// error; it is moved once per request, so its size does not matter.
#![allow(clippy::result_large_err)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Instant;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Request, Response};
use http_body_util::{Either, Full};
use hyper::body::Incoming;

use crate::config::{ListenerConfig, OnError};
use crate::error::{ERROR_HEADER, GatewayError};
use crate::forward::Forwarder;
use crate::head;
use crate::plugin::bindings::{RequestHead, RouteDecision, Verdict};
use crate::plugin::{PluginError, Registry, validate};
use crate::pool::{Pool, Pools};
use crate::relay::RelayLimits;
use crate::websocket::{self, ClientHandshake, WebSocketSlot};

/// The body of every response the gateway sends: a backend's streamed body,
/// or one the gateway or a plugin made.
pub type ResponseBody = Either<Incoming, Full<Bytes>>;

/// Where a request goes: a pool, and what to change on the way.
#[derive(Debug)]
pub struct Route {
    pub pool: Arc<Pool>,
    /// A new origin-form target; without a query the request's own is kept.
    pub rewrite: Option<PathAndQuery>,
    pub set_headers: Vec<(HeaderName, HeaderValue)>,
    /// For hash balancing (used once pools balance by hash).
    pub affinity_key: Option<String>,
}

impl Route {
    fn to_pool(pool: Arc<Pool>) -> Route {
        Route { pool, rewrite: None, set_headers: Vec::new(), affinity_key: None }
    }
}

/// What the gateway as a whole shares between listeners.
pub struct Shared {
    pub registry: Arc<Registry>,
    pub pools: Arc<Pools>,
    pub forwarder: Forwarder,
    pub relay_limits: RelayLimits,
}

/// One listener's rules, applied to each of its requests.
pub struct ListenerProxy {
    pub name: String,
    waf: Vec<String>,
    router: Option<String>,
    default_pool: Option<Arc<Pool>>,
    max_websockets: usize,
    live_websockets: Arc<AtomicUsize>,
    shared: Arc<Shared>,
}

/// The outcome of one step that may end the request early.
type Step<T> = Result<T, Response<ResponseBody>>;

impl ListenerProxy {
    pub fn new(config: &ListenerConfig, shared: Arc<Shared>) -> ListenerProxy {
        ListenerProxy {
            name: config.name.clone(),
            waf: config.waf.clone(),
            router: config.router.clone(),
            default_pool: config.default_pool.as_deref().and_then(|p| shared.pools.get(p).cloned()),
            max_websockets: config.max_websockets,
            live_websockets: Arc::new(AtomicUsize::new(0)),
            shared,
        }
    }

    /// Handles one request from `client` and returns the client's response.
    pub async fn handle(&self, req: Request<Incoming>, client: SocketAddr) -> Response<ResponseBody> {
        let started = Instant::now();
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let response = match self.pass(req, client).await {
            Ok(response) | Err(response) => response,
        };
        tracing::debug!(
            listener = %self.name,
            %method,
            %path,
            status = response.status().as_u16(),
            error = response.headers().get(ERROR_HEADER).and_then(|v| v.to_str().ok()).unwrap_or(""),
            elapsed_us = started.elapsed().as_micros() as u64,
            "request"
        );
        response
    }

    async fn pass(&self, req: Request<Incoming>, client: SocketAddr) -> Step<Response<ResponseBody>> {
        let (parts, body) = req.into_parts();
        let handshake = ClientHandshake::from_request(&parts).map_err(GatewayError::into_response)?;
        let head = head::request_head(&parts, client, &self.name, handshake.as_ref());
        let req = Request::from_parts(parts, body);

        self.run_waf(&head).await?;
        let route = self.route(&head).await?;
        let server = route
            .pool
            .pick()
            .ok_or_else(|| GatewayError::NoHealthyServer { pool: route.pool.name.clone() }.into_response())?;

        let result = match handshake {
            None => self.shared.forwarder.forward(req, &server, &route, client).await,
            Some(handshake) => {
                let slot = WebSocketSlot::try_take(&self.live_websockets, self.max_websockets)
                    .ok_or_else(|| GatewayError::AtCapacity { listener: self.name.clone() }.into_response())?;
                let limits = self.shared.relay_limits;
                websocket::upgrade(req, handshake, server, &route, client, limits, slot).await
            }
        };
        result.map_err(GatewayError::into_response)
    }

    /// Runs the WAF plugins in order; the first deny ends the request.
    async fn run_waf(&self, head: &RequestHead) -> Step<()> {
        for name in &self.waf {
            let registry = &self.shared.registry;
            let Some(plugin) = registry.get(name) else {
                let error = PluginError::Missing { plugin: name.clone() };
                self.plugin_failed(error, registry.missing_policy(name))?;
                continue;
            };
            let policy = plugin.limits.on_error;
            let denial = match plugin.inspect(head).await {
                Ok(Verdict::Allow) => continue,
                Ok(Verdict::Deny(denial)) => denial,
                Err(error) => {
                    self.plugin_failed(error, policy)?;
                    continue;
                }
            };
            match validate::response(name, denial) {
                Ok(mut response) => {
                    response.headers_mut().insert(ERROR_HEADER, HeaderValue::from_static("waf-deny"));
                    return Err(response);
                }
                Err(error) => {
                    plugin.record_failure(&error);
                    self.plugin_failed(error, policy)?;
                }
            }
        }
        Ok(())
    }

    /// Asks the router plugin (if any) where the request goes.
    async fn route(&self, head: &RequestHead) -> Step<Route> {
        let Some(name) = &self.router else {
            return self.default_route();
        };
        let registry = &self.shared.registry;
        let Some(plugin) = registry.get(name) else {
            let error = PluginError::Missing { plugin: name.clone() };
            return self.router_failed(error, registry.missing_policy(name));
        };
        let policy = plugin.limits.on_error;
        let decided = match plugin.route(head).await {
            Ok(RouteDecision::Forward(upstream)) => {
                validate::upstream(name, upstream, &self.shared.pools).map(Decided::Forward)
            }
            Ok(RouteDecision::Respond(response)) => validate::response(name, response).map(Decided::Respond),
            Ok(RouteDecision::NoRoute) => Ok(Decided::NoRoute),
            Err(error) => return self.router_failed(error, policy),
        };
        match decided {
            Ok(Decided::Forward(route)) => Ok(route),
            Ok(Decided::Respond(response)) => Err(response),
            Ok(Decided::NoRoute) => self.default_route(),
            Err(error) => {
                plugin.record_failure(&error);
                self.router_failed(error, policy)
            }
        }
    }

    /// A failed router fails open only if there is a default pool to open to.
    fn router_failed(&self, error: PluginError, policy: OnError) -> Step<Route> {
        let policy = if self.default_pool.is_some() { policy } else { OnError::Deny };
        self.plugin_failed(error, policy)?;
        self.default_route()
    }

    /// Applies a failed plugin's policy: `deny` ends the request with 503
    /// `plugin-unavailable`; `allow` lets it go on (a WAF is skipped, a router
    /// falls back to the default pool).
    fn plugin_failed(&self, error: PluginError, policy: OnError) -> Step<()> {
        match policy {
            OnError::Allow => {
                tracing::warn!(listener = %self.name, %error, "plugin failed; failing open");
                Ok(())
            }
            OnError::Deny => {
                tracing::warn!(listener = %self.name, %error, "plugin failed; failing closed");
                Err(GatewayError::PluginUnavailable { plugin: error.plugin().to_owned() }.into_response())
            }
        }
    }

    fn default_route(&self) -> Step<Route> {
        match &self.default_pool {
            Some(pool) => Ok(Route::to_pool(pool.clone())),
            None => Err(GatewayError::NoRoute.into_response()),
        }
    }
}

/// A router's decision once validated.
enum Decided {
    Forward(Route),
    Respond(Response<ResponseBody>),
    NoRoute,
}

/// Checks that every plugin the config names is loaded with the right kind.
pub fn check_plugin_roles(config: &crate::config::Config, registry: &Registry) -> Result<(), String> {
    for (name, key, role) in config.referenced_plugins() {
        match registry.get(&name) {
            None => {
                return Err(format!(
                    "{}: `{key}`: plugin `{name}` is not loaded (no valid {name}.wasm in {})",
                    config.source.display(),
                    config.plugins.dir.display()
                ));
            }
            Some(plugin) if plugin.kind.role() != role => {
                return Err(format!(
                    "{}: `{key}`: plugin `{name}` is a {} plugin, not a {role}",
                    config.source.display(),
                    plugin.kind
                ));
            }
            Some(_) => {}
        }
    }
    Ok(())
}
