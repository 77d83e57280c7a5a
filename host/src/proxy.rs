//! The life of a request, top to bottom:
//!
//! 1. [`ClientHandshake::from_request`]: is it a WebSocket handshake, and a
//!    valid one?
//! 2. [`head::request_head`]: the view of the request plugins get.
//! 3. [`ListenerProxy::run_waf`]: the listener's WAF plugins, in order; a deny
//!    answers the client.
//! 4. [`ListenerProxy::route`]: the router plugin (or the default pool) picks
//!    a pool, or answers the client itself.
//! 5. [`Pool::pick`]: a healthy server of that pool (another one if it
//!    cannot be reached and the request can be sent again).
//! 6. [`Forwarder::send`] for a plain request; for a handshake,
//!    [`websocket::send_handshake`] then [`websocket::answer`], which starts
//!    the relay.
//!
//! Each step is a call; the detail lives in the file named for it.

// A step that ends the request early returns the client's response as its
// error; it is moved once per request, so its size does not matter.
#![allow(clippy::result_large_err)]

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Instant;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, Response};
use http_body_util::{Either, Empty, Full};
use hyper::body::Body as _;
use hyper::body::Incoming;

use crate::access_log::{self, AccessLog, RequestEntry};
use crate::config::{ListenerConfig, OnError};
use crate::error::{ERROR_HEADER, GatewayError};
use crate::forward::{self, SendError};
use crate::head;
use crate::listener::ConnInfo;
use crate::metrics::{self, ConnectErrorLabels, Histogram, ListenerLabel, Metrics, RequestCounters};
use crate::plugin::bindings::{RequestHead, RouteDecision, Verdict};
use crate::plugin::{PluginError, Registry, validate};
use crate::pool::{Pool, Pools, Server};
use crate::relay::RelayLimits;
use crate::shutdown::{Drain, Spread};
use crate::websocket::{self, ClientHandshake, Relaying, WebSocketLog, WebSocketSlot};
use prometheus_client::metrics::counter::Counter;

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
    /// For pools that balance by hash.
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
    pub drain: Arc<Drain>,
    pub metrics: Arc<Metrics>,
    /// `None` when `[log] access = "off"`.
    pub access_log: Option<Arc<AccessLog>>,
}

/// Where a routed request went, riding in its response's extensions for the
/// metrics (and the access log): the pool, and the server if one answered.
#[derive(Clone)]
pub struct Served {
    pub pool: Arc<Pool>,
    pub server: Option<Arc<Server>>,
}

/// One listener's rules under the config in force, with the pools they
/// name. A reload replaces them whole, so a request sees one config.
pub struct ListenerRules {
    /// Each plugin with its call-duration histogram.
    waf: Vec<(String, Histogram)>,
    router: Option<(String, Histogram)>,
    default_pool: Option<Arc<Pool>>,
    max_websockets: usize,
    /// Port of the HTTPS listener plain requests are redirected to.
    redirect_to_https: Option<u16>,
    pools: Arc<Pools>,
    relay_limits: RelayLimits,
    requests: RequestCounters,
}

impl ListenerRules {
    pub fn new(
        config: &ListenerConfig,
        pools: Arc<Pools>,
        relay_limits: RelayLimits,
        redirect_to_https: Option<u16>,
        metrics: &Metrics,
    ) -> ListenerRules {
        let timed = |name: &String| (name.clone(), metrics.plugin_timing(name));
        let requests = RequestCounters::new(metrics, &config.name, pools.all().map(|p| &p.label));
        ListenerRules {
            requests,
            waf: config.waf.iter().map(timed).collect(),
            router: config.router.as_ref().map(timed),
            default_pool: config.default_pool.as_deref().and_then(|p| pools.get(p).cloned()),
            max_websockets: config.max_websockets,
            redirect_to_https: if config.redirect_to_https { redirect_to_https } else { None },
            pools,
            relay_limits,
        }
    }
}

/// One listener: its rules, applied to each of its requests, and what
/// outlives a reload (its count of live WebSockets).
pub struct ListenerProxy {
    pub name: String,
    /// The name as a metrics label, and this listener's duration histogram.
    label: Arc<str>,
    duration: Histogram,
    /// By [`metrics::HANDSHAKE_RESULTS`].
    handshakes: [Counter; 5],
    rules: ArcSwap<ListenerRules>,
    live_websockets: Arc<AtomicUsize>,
    /// Set when a reload removes the listener: its WebSockets close over it.
    removal: Arc<Spread>,
    shared: Arc<Shared>,
}

/// The outcome of one step that may end the request early.
type Step<T> = Result<T, Response<ResponseBody>>;

impl ListenerProxy {
    pub fn new(name: &str, rules: ListenerRules, shared: Arc<Shared>) -> ListenerProxy {
        let duration = shared.metrics.request_duration.get_or_create(&ListenerLabel { listener: name.into() }).clone();
        ListenerProxy {
            name: name.to_owned(),
            label: name.into(),
            duration,
            handshakes: metrics::handshake_counters(&shared.metrics, name),
            rules: ArcSwap::from_pointee(rules),
            live_websockets: Arc::new(AtomicUsize::new(0)),
            removal: Arc::new(Spread::default()),
            shared,
        }
    }

    /// Applies new rules to the requests that start from now on.
    pub fn set_rules(&self, rules: ListenerRules) {
        self.rules.store(Arc::new(rules));
    }

    /// The listener was removed: its WebSockets close over `window`.
    pub fn retire(&self, window: std::time::Duration) {
        self.removal.begin(window);
    }

    /// Resolves once a reload removed this listener.
    pub fn retired(&self) -> impl Future<Output = ()> + Send + 'static {
        self.removal.started()
    }

    /// WebSockets relayed for this listener now.
    pub fn live_websockets(&self) -> usize {
        self.live_websockets.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Handles one request from `client` and returns the client's response.
    pub async fn handle(&self, req: Request<Incoming>, client: &ConnInfo) -> Response<ResponseBody> {
        let _in_flight = self.shared.drain.request();
        let started = Instant::now();
        let handshake = req.headers().contains_key(http::header::UPGRADE) || req.method() == Method::CONNECT;
        let version_1x = req.version() < http::Version::HTTP_2;
        // Only copied when a log line will be written.
        let logged = (self.shared.access_log.is_some() || tracing::enabled!(tracing::Level::DEBUG))
            .then(|| (req.method().clone(), req.uri().path().to_owned()));
        let rules = self.rules.load_full();
        let response = match self.pass(&rules, req, client).await {
            Ok(response) | Err(response) => response,
        };
        let elapsed = started.elapsed();
        self.count(&rules, &response, handshake, elapsed);
        let mut response = response;
        if self.removal.has_begun() && response.status() != http::StatusCode::SWITCHING_PROTOCOLS && version_1x {
            // The listener was removed: this is the connection's last response.
            response.headers_mut().insert(http::header::CONNECTION, HeaderValue::from_static("close"));
        }
        if let (Some(access_log), Some((method, path))) = (&self.shared.access_log, &logged) {
            let served = response.extensions().get::<Served>();
            access_log.request(&RequestEntry {
                listener: &self.name,
                client: client.addr,
                method: method.as_str(),
                path,
                status: response.status().as_u16(),
                pool: served.map_or("", |s| s.pool.name.as_str()),
                server: served.and_then(|s| s.server.as_ref()).map_or("", |s| s.address.as_str()),
                duration_ms: access_log::millis(elapsed),
                bytes: response.body().size_hint().exact(),
                error: response.headers().get(ERROR_HEADER).and_then(|v| v.to_str().ok()),
            });
        }
        if let Some((method, path)) = logged.filter(|_| tracing::enabled!(tracing::Level::DEBUG)) {
            tracing::debug!(
                listener = %self.name,
                %method,
                %path,
                status = response.status().as_u16(),
                error = response.headers().get(ERROR_HEADER).and_then(|v| v.to_str().ok()).unwrap_or(""),
                elapsed_us = started.elapsed().as_micros() as u64,
                "request"
            );
        }
        response
    }

    /// Counts a response in the metrics.
    fn count(
        &self,
        rules: &ListenerRules,
        response: &Response<ResponseBody>,
        handshake: bool,
        elapsed: std::time::Duration,
    ) {
        let metrics = &self.shared.metrics;
        let status = response.status().as_u16();
        let served = response.extensions().get::<Served>();
        rules.requests.count(served.map_or("", |s| &s.pool.name), status);
        self.duration.observe(elapsed);
        metrics.answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if status >= 500 {
            metrics.failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        if handshake {
            let error = response.headers().get(ERROR_HEADER).map(|v| v.as_bytes());
            // Indexes into metrics::HANDSHAKE_RESULTS.
            let result = match (response.extensions().get::<websocket::Upgraded>(), error) {
                (Some(_), _) => 0,
                (_, Some(b"waf-deny")) => 1,
                (_, Some(b"at-capacity")) => 2,
                (_, Some(_)) => 4,
                _ => 3,
            };
            self.handshakes[result].inc();
        }
    }

    async fn pass(
        &self,
        rules: &ListenerRules,
        req: Request<Incoming>,
        client: &ConnInfo,
    ) -> Step<Response<ResponseBody>> {
        let handshake = ClientHandshake::from_request(&req).map_err(GatewayError::into_response)?;
        if let Some(port) = rules.redirect_to_https
            && handshake.is_none()
            && req.body().is_end_stream()
        {
            return Err(redirect_to_https(&req, port).into_response());
        }
        let head = head::request_head(&req, client, &self.name, handshake.as_ref());
        self.run_waf(rules, &head).await?;
        let route = self.route(rules, &head).await?;
        let result = match handshake {
            None => self.forward(req, &route, client).await,
            Some(handshake) => self.upgrade(rules, req, handshake, &route, client).await,
        };
        result.map_err(|error| {
            let mut response = error.into_response();
            response.extensions_mut().insert(Served { pool: route.pool.clone(), server: None });
            response
        })
    }

    /// Upgrades a WebSocket handshake: a place under the listener's cap, the
    /// handshake to a server (another if it cannot be reached), then the
    /// client's answer and the relay.
    async fn upgrade(
        &self,
        rules: &ListenerRules,
        mut req: Request<Incoming>,
        handshake: ClientHandshake,
        route: &Route,
        client: &ConnInfo,
    ) -> Result<Response<ResponseBody>, GatewayError> {
        let slot = WebSocketSlot::try_take(&self.live_websockets, rules.max_websockets)
            .ok_or_else(|| GatewayError::AtCapacity { listener: self.name.clone() })?;
        let client_upgrade = hyper::upgrade::on(&mut req);
        let log = self.shared.access_log.clone().map(|access| WebSocketLog {
            access,
            client: client.addr,
            path: req.uri().path().to_owned(),
        });
        let (mut parts, _body) = req.into_parts();
        forward::prepare_upstream(&mut parts, route, client)?;
        let (timeout, tls) = (route.pool.request_timeout, route.pool.tls.as_ref());
        let attempt = |server: Arc<Server>| {
            let (head, handshake) = (forward::copy_head(&parts), &handshake);
            async move {
                // Counted on its server from the handshake on (least-connections).
                let active = server.begin();
                websocket::send_handshake(head, handshake, &server, tls, timeout).await.map(|r| (r, active))
            }
        };
        let ((response, active), server) = self.try_servers(route, true, attempt).await?;
        let served = Served { pool: route.pool.clone(), server: Some(server.clone()) };
        let (limits, drain, listener_removal) = (rules.relay_limits, self.shared.drain.clone(), self.removal.clone());
        let (metrics, listener) = (self.shared.metrics.clone(), self.label.clone());
        let mut response = websocket::answer(
            response,
            Relaying {
                client_upgrade,
                handshake,
                server,
                active,
                limits,
                slot,
                drain,
                listener_removal,
                metrics,
                listener,
                log,
            },
        )?;
        response.extensions_mut().insert(served);
        Ok(response)
    }

    /// Forwards a plain request. Without a body it can be sent again to
    /// another server if the first cannot be reached.
    async fn forward(
        &self,
        req: Request<Incoming>,
        route: &Route,
        client: &ConnInfo,
    ) -> Result<Response<ResponseBody>, GatewayError> {
        let (mut parts, body) = req.into_parts();
        forward::prepare_upstream(&mut parts, route, client)?;
        let replayable = body.is_end_stream();
        let idempotent = matches!(
            parts.method,
            Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
        );
        let mut body = (!replayable).then_some(body);
        let timeout = route.pool.request_timeout;
        let forwarder = &route.pool.forwarder;
        let attempt = |server: Arc<Server>| {
            let body = match body.take() {
                Some(body) => Either::Left(body),
                None => Either::Right(Empty::new()),
            };
            let head = forward::copy_head(&parts);
            async move {
                let _active = server.begin();
                forwarder.send(head, body, &server, timeout).await
            }
        };
        let (mut response, server) = self.try_servers(route, replayable && idempotent, attempt).await?;
        response.extensions_mut().insert(Served { pool: route.pool.clone(), server: Some(server) });
        Ok(response)
    }

    /// Steps 5 and 6: picks a healthy server and sends to it. A server that
    /// cannot be connected to is marked unhealthy and, if `retryable` (nothing
    /// reached any server and the request can be sent again), another is
    /// tried, up to the pool's `retries`.
    async fn try_servers<T, F, Fut>(
        &self,
        route: &Route,
        retryable: bool,
        mut attempt: F,
    ) -> Result<(T, Arc<Server>), GatewayError>
    where
        F: FnMut(Arc<Server>) -> Fut,
        Fut: Future<Output = Result<T, SendError>>,
    {
        let pool = &route.pool;
        let mut tried: Vec<Arc<Server>> = Vec::new();
        let mut last_error = None;
        loop {
            let Some(server) = pool.pick(route.affinity_key.as_deref(), &tried) else {
                // Nothing (else) to try: the last failure, or no server at all.
                return Err(last_error.unwrap_or_else(|| GatewayError::NoHealthyServer { pool: pool.name.clone() }));
            };
            let may_retry = retryable && tried.len() < pool.retries as usize;
            let unreachable =
                GatewayError::BackendUnreachable { pool: pool.name.clone(), server: server.address.clone() };
            let outcome = attempt(server.clone()).await;
            if let Err(error) = &outcome {
                let kind = match error {
                    SendError::Connect(_) => Some("connect"),
                    SendError::Tls(_) => Some("tls"),
                    SendError::Timeout => Some("timeout"),
                    SendError::Failed(_) => None,
                };
                if let Some(kind) = kind {
                    let labels = ConnectErrorLabels { pool: pool.label.clone(), kind };
                    self.shared.metrics.upstream_errors.get_or_create(&labels).inc();
                }
            }
            match outcome {
                Ok(value) => return Ok((value, server)),
                Err(SendError::Timeout) => {
                    return Err(GatewayError::BackendTimeout {
                        pool: pool.name.clone(),
                        server: server.address.clone(),
                    });
                }
                Err(SendError::Tls(reason)) => {
                    tracing::warn!(pool = %pool.name, server = %server.address, %reason, "TLS to the server failed");
                    return Err(GatewayError::BackendTls {
                        pool: pool.name.clone(),
                        server: server.address.clone(),
                        reason,
                    });
                }
                Err(SendError::Connect(error)) => {
                    tracing::warn!(pool = %pool.name, server = %server.address, %error, retry = may_retry, "connect failed");
                    server.connect_failed(&error);
                }
                Err(SendError::Failed(error)) => {
                    tracing::warn!(pool = %pool.name, server = %server.address, %error, retry = may_retry, "upstream request failed");
                }
            }
            if !may_retry {
                return Err(unreachable);
            }
            last_error = Some(unreachable);
            tried.push(server);
        }
    }

    /// Runs the WAF plugins in order; the first deny ends the request.
    async fn run_waf(&self, rules: &ListenerRules, head: &RequestHead) -> Step<()> {
        for (name, timing) in &rules.waf {
            let registry = &self.shared.registry;
            let Some(plugin) = registry.get(name) else {
                let error = PluginError::Missing { plugin: name.clone() };
                self.plugin_failed(error, registry.missing_policy(name))?;
                continue;
            };
            let policy = plugin.limits.on_error;
            let started = Instant::now();
            let verdict = plugin.inspect(head).await;
            timing.observe(started.elapsed());
            let denial = match verdict {
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
    async fn route(&self, rules: &ListenerRules, head: &RequestHead) -> Step<Route> {
        let Some((name, timing)) = &rules.router else {
            return self.default_route(rules);
        };
        let registry = &self.shared.registry;
        let Some(plugin) = registry.get(name) else {
            let error = PluginError::Missing { plugin: name.clone() };
            return self.router_failed(rules, error, registry.missing_policy(name));
        };
        let policy = plugin.limits.on_error;
        let started = Instant::now();
        let decision = plugin.route(head).await;
        timing.observe(started.elapsed());
        let decided = match decision {
            Ok(RouteDecision::Forward(upstream)) => {
                validate::upstream(name, upstream, &rules.pools).map(Decided::Forward)
            }
            Ok(RouteDecision::Respond(response)) => validate::response(name, response).map(Decided::Respond),
            Ok(RouteDecision::NoRoute) => Ok(Decided::NoRoute),
            Err(error) => return self.router_failed(rules, error, policy),
        };
        match decided {
            Ok(Decided::Forward(route)) => Ok(route),
            Ok(Decided::Respond(response)) => Err(response),
            Ok(Decided::NoRoute) => self.default_route(rules),
            Err(error) => {
                plugin.record_failure(&error);
                self.router_failed(rules, error, policy)
            }
        }
    }

    /// A failed router fails open only if there is a default pool to open to.
    fn router_failed(&self, rules: &ListenerRules, error: PluginError, policy: OnError) -> Step<Route> {
        let policy = if rules.default_pool.is_some() { policy } else { OnError::Deny };
        self.plugin_failed(error, policy)?;
        self.default_route(rules)
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

    fn default_route(&self, rules: &ListenerRules) -> Step<Route> {
        match &rules.default_pool {
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

/// The 308 to the same URL on the HTTPS listener's port.
fn redirect_to_https<B>(req: &Request<B>, port: u16) -> GatewayError {
    let authority = req
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
        .unwrap_or("");
    let host = match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => authority,
    };
    let target = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
    let location =
        if port == 443 { format!("https://{host}{target}") } else { format!("https://{host}:{port}{target}") };
    GatewayError::RedirectToHttps { location }
}
