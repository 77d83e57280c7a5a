//! The life of a request, one phase after another, in the order
//! [`ListenerProxy::handle`] runs them. Each phase is a method below, in the
//! same order; each may end the request with its [`Answer`].
//!
//! 1. [`target`](ListenerProxy::target): the method, authority and path
//!    settled (normalized, or refused with 400/405) before anything reads them.
//! 2. [`handshake`](ListenerProxy::handshake): is it a WebSocket handshake,
//!    and a valid one (400/426)?
//! 3. [`redirect`](ListenerProxy::redirect): on a listener with
//!    `redirect_to_https`, a plain request without a body is answered 308
//!    to the same URL on the HTTPS listener, if that listener has a
//!    certificate for its host (421 if not: `Host` is the client's word).
//! 4. [`decide`](ListenerProxy::decide): on a listener with plugins, the
//!    request head lent to them as a [`RequestView`] for phases 5 and 6.
//! 5. [`waf`](ListenerProxy::waf): the listener's WAF plugins, in order; a
//!    deny answers the client.
//! 6. [`route`](ListenerProxy::route): the router plugin (or the default
//!    pool) picks a pool, or answers the client itself.
//! 7. [`forward`](ListenerProxy::forward) a plain request, or
//!    [`upgrade`](ListenerProxy::upgrade) a handshake: a healthy server of
//!    the pool (another if it cannot be reached and the request can be sent
//!    again, [`try_servers`](ListenerProxy::try_servers)), then its answer
//!    (without the `x-wasmgate-*` headers only the gateway may make); an
//!    upgrade starts the relay.
//! 8. [`log`](ListenerProxy::log): the outcome counted in the metrics and
//!    written to the access log.
//!
//! The detail of each phase lives in the file named for it; the logic here
//! is sequencing and failure policy (`on_error`).

// A phase that ends the request early returns the client's answer as its
// error; it is moved once per request, so its size does not matter.
#![allow(clippy::result_large_err)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use http::header::HeaderValue;
use http::{Method, Request, Response};
use http_body_util::{Either, Empty};
use hyper::body::Body as _;
use hyper::body::Incoming;

use super::forward;
use super::outcome::{Answer, Outcome};
use super::route::Route;
use super::target;
use super::validate;
use crate::config::{ListenerConfig, OnError};
use crate::http::trace::{self, Trace};
use crate::http::{ConnInfo, ERROR_HEADER, GatewayError, ResponseBody, WAF_DENY};
use crate::plugin::bindings::{RouteDecision, Verdict};
use crate::plugin::{PluginError, PluginSlot, Registry, RequestView};
use crate::shutdown::{Drain, Spread, StopCause};
use crate::telemetry::access_log::{self, AccessLog, RequestEntry};
use crate::telemetry::metrics::{
    ConnectErrorLabels, HandshakeCounters, Histogram, ListenerLabel, Metrics, RequestCounters,
};
use crate::telemetry::otlp::{Attribute, Otlp, SpanRecord};
use crate::upstream::{Pool, Pools, SendError, Server};
use crate::websocket::ClientHandshake;
use crate::websocket::relay::RelayLimits;
use crate::websocket::session::{self, ClientAnswer, Relaying, WebSocketLog, WebSocketSlot};

/// What the gateway as a whole shares between listeners.
pub struct Shared {
    pub registry: Arc<Registry>,
    pub drain: Arc<Drain>,
    pub metrics: Arc<Metrics>,
    /// `None` when `[log] access = "off"`.
    pub access_log: Option<Arc<AccessLog>>,
    /// `None` without `[otlp]`: then no span is built.
    pub otlp: Option<Arc<Otlp>>,
}

/// A plugin as one listener uses it: its name, the slot its current version
/// is read from, and its call-duration histogram, all resolved once per
/// rules (not per request).
struct PluginUse {
    name: String,
    slot: Arc<PluginSlot>,
    timing: Histogram,
}

/// The HTTPS listener an `http` listener redirects to: its port, and the
/// names its certificates serve (lowercase), the only hosts a `Location`
/// may name.
#[derive(Debug)]
pub struct HttpsTarget {
    pub port: u16,
    pub hosts: Vec<String>,
}

/// One `X-Forwarded-For` entry's address: an IP address, with or without a
/// port.
fn forwarded_address(entry: &[u8]) -> Option<std::net::IpAddr> {
    let entry = std::str::from_utf8(entry).ok()?.trim();
    entry
        .parse::<std::net::IpAddr>()
        .ok()
        .or_else(|| entry.parse::<std::net::SocketAddr>().ok().map(|address| address.ip()))
}

/// One listener's rules under the config in force, with the pools they
/// name. A reload replaces them whole, so a request sees one config.
pub struct ListenerRules {
    waf: Vec<PluginUse>,
    router: Option<PluginUse>,
    default_pool: Option<Arc<Pool>>,
    max_websockets: usize,
    /// Where plain requests are redirected to.
    redirect_to_https: Option<Arc<HttpsTarget>>,
    pools: Arc<Pools>,
    relay_limits: RelayLimits,
    requests: RequestCounters,
    /// Peers whose forwarding headers are kept.
    trusted_proxies: Vec<ipnet::IpNet>,
    /// HTTPS: the `Host` must name the SNI's host.
    require_sni_match: bool,
    /// Connections open with a PROXY protocol header.
    proxy_protocol: bool,
}

impl ListenerRules {
    /// Whether `client` is a proxy this listener trusts.
    fn trusts(&self, client: &ConnInfo) -> bool {
        self.trusts_ip(client.addr.ip())
    }

    fn trusts_ip(&self, ip: std::net::IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.trusted_proxies.iter().any(|net| net.contains(&ip))
    }

    /// The client's address as plugins and the crash-loop breaker see it:
    /// from a trusted proxy, the right-most `X-Forwarded-For` address that
    /// is not itself a trusted proxy (the first hop no trusted proxy vouches
    /// past); otherwise, or if the entry there is not an address, the
    /// peer's. Entries are split on the raw bytes, so bytes a client put in
    /// an earlier entry never hide the ones its proxies appended; an entry
    /// with a port (`203.0.113.5:4711`, `[2001:db8::1]:443`) counts as its
    /// address.
    fn client_ip(&self, headers: &http::HeaderMap, client: &ConnInfo) -> std::net::IpAddr {
        let peer = client.addr.ip().to_canonical();
        if !self.trusts_ip(peer) {
            return peer;
        }
        let lines = headers.get_all(&forward::X_FORWARDED_FOR).iter().rev();
        for entry in lines.flat_map(|line| line.as_bytes().rsplit(|&b| b == b',')) {
            match forwarded_address(entry) {
                Some(ip) if self.trusts_ip(ip) => continue,
                Some(ip) => return ip.to_canonical(),
                None => return peer,
            }
        }
        peer
    }
}

impl ListenerRules {
    pub fn new(
        config: &ListenerConfig,
        pools: Arc<Pools>,
        relay_limits: RelayLimits,
        redirect_to_https: Option<Arc<HttpsTarget>>,
        metrics: &Metrics,
        registry: &Registry,
    ) -> ListenerRules {
        let timed = |name: &String| PluginUse {
            name: name.clone(),
            slot: registry.slot(name),
            timing: metrics.plugin_timing(name),
        };
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
            trusted_proxies: config.trusted_proxies.clone(),
            require_sni_match: config.require_sni_match,
            proxy_protocol: config.proxy_protocol,
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
    handshakes: HandshakeCounters,
    rules: ArcSwap<ListenerRules>,
    live_websockets: Arc<AtomicUsize>,
    /// Set when a reload removes the listener: its WebSockets close over it.
    removal: Arc<Spread>,
    shared: Arc<Shared>,
}

/// The outcome of one phase that may end the request early.
type Step<T> = Result<T, Answer>;

/// What the logging phase knows of the request once its head is gone.
struct Asked {
    started: Instant,
    /// The wall-clock start, for a span (only with `[otlp]`).
    started_at: Option<SystemTime>,
    handshake: bool,
    /// Method and path, copied only when a log line will be written.
    logged: Option<(Method, String)>,
}

impl ListenerProxy {
    pub fn new(name: &str, rules: ListenerRules, shared: Arc<Shared>) -> ListenerProxy {
        let duration = shared.metrics.request_duration.get_or_create(&ListenerLabel { listener: name.into() }).clone();
        ListenerProxy {
            name: name.to_owned(),
            label: name.into(),
            duration,
            handshakes: HandshakeCounters::new(&shared.metrics, name),
            rules: ArcSwap::from_pointee(rules),
            live_websockets: Arc::new(AtomicUsize::new(0)),
            removal: Arc::new(Spread::new(StopCause::Removed)),
            shared,
        }
    }

    /// Applies new rules to the requests that start from now on.
    /// Whether this listener's connections must open with a PROXY protocol
    /// header (under the rules in force when the connection is accepted).
    pub fn proxy_protocol(&self) -> bool {
        self.rules.load().proxy_protocol
    }

    pub fn set_rules(&self, rules: ListenerRules) {
        self.rules.store(Arc::new(rules));
    }

    /// The listener was removed: its WebSockets close over `window`.
    pub fn retire(&self, window: Duration) {
        self.removal.begin(window);
    }

    /// Resolves once a reload removed this listener.
    pub fn retired(&self) -> impl Future<Output = ()> + Send + 'static {
        self.removal.started()
    }

    /// WebSockets relayed for this listener now.
    pub fn live_websockets(&self) -> usize {
        self.live_websockets.load(Ordering::Acquire)
    }

    /// Handles one request from `client` and returns the client's response.
    pub async fn handle(&self, mut req: Request<Incoming>, client: &Arc<ConnInfo>) -> Response<ResponseBody> {
        let _in_flight = self.shared.drain.request();
        let version_1x = req.version() < http::Version::HTTP_2;
        let asked = Asked {
            started: Instant::now(),
            started_at: self.shared.otlp.as_ref().map(|_| SystemTime::now()),
            handshake: req.headers().contains_key(http::header::UPGRADE) || req.method() == Method::CONNECT,
            logged: (self.shared.access_log.is_some()
                || self.shared.otlp.is_some()
                || tracing::enabled!(tracing::Level::DEBUG))
            .then(|| (req.method().clone(), req.uri().path().to_owned())),
        };
        let rules = self.rules.load_full();
        // Phase 0: the request's ID and trace context, for the plugins, the
        // backend, the client and the log.
        let trace = Trace::of(req.headers(), rules.trusts(client));
        trace.stamp(req.headers_mut());
        let answer = match self.pass(&rules, req, client, &trace).await {
            Ok(answer) | Err(answer) => answer,
        };
        if let (Some(otlp), Some(start)) = (&self.shared.otlp, asked.started_at) {
            self.request_span(otlp, &trace, start, &answer, client, &asked);
        }
        self.log(&rules, &answer, client, asked, &trace);
        let mut response = answer.response;
        response.headers_mut().insert(trace::REQUEST_ID, trace.request_id);
        if self.removal.has_begun() && !matches!(answer.outcome, Outcome::Upgraded) && version_1x {
            // The listener was removed: this is the connection's last response.
            response.headers_mut().insert(http::header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }

    /// Phases 1 to 7, in order.
    async fn pass(
        &self,
        rules: &ListenerRules,
        mut req: Request<Incoming>,
        client: &Arc<ConnInfo>,
        trace: &Trace,
    ) -> Step<Answer> {
        Self::target(rules, &mut req, client)?;
        let handshake = Self::handshake(&req)?;
        Self::redirect(rules, &req, handshake.is_some())?;
        let (req, route) = self.decide(rules, req, client, handshake.is_some(), trace)?;
        let answer = match handshake {
            None => self.forward(rules, req, &route, client).await,
            // Boxed: a handshake's future is larger than a plain request's,
            // and every request's future would carry its size otherwise.
            Some(handshake) => Box::pin(self.upgrade(rules, req, handshake, &route, client, trace)).await,
        };
        answer.map_err(|error| Answer::from(error).routed_to(&route.pool))
    }

    /// Phase 1: settles the method, the authority and the path (and, where
    /// the listener asks, checks the host against the SNI).
    fn target(rules: &ListenerRules, req: &mut Request<Incoming>, client: &ConnInfo) -> Step<()> {
        target::settle(req)?;
        if rules.require_sni_match {
            let sni = client.tls.as_ref().and_then(|tls| tls.sni.as_deref());
            target::check_sni(req, sni)?;
        }
        Ok(())
    }

    /// Phase 2: reads the WebSocket handshake, if the request asks for one.
    fn handshake(req: &Request<Incoming>) -> Step<Option<ClientHandshake>> {
        Ok(ClientHandshake::from_request(req)?)
    }

    /// Phase 3: the 308 to the same URL on the HTTPS listener's port, for a
    /// plain request without a body on a listener that redirects.
    fn redirect(rules: &ListenerRules, req: &Request<Incoming>, handshake: bool) -> Step<()> {
        match &rules.redirect_to_https {
            Some(https) if !handshake && req.body().is_end_stream() => {
                Err(GatewayError::redirect_to_https(req, https.port, &https.hosts).into())
            }
            _ => Ok(()),
        }
    }

    /// Phases 4 to 6: lends the request head to the plugins (the body stays
    /// aside, unread), then takes it back to send on. A listener without
    /// plugins builds nothing and looks nothing up.
    fn decide(
        &self,
        rules: &ListenerRules,
        req: Request<Incoming>,
        client: &Arc<ConnInfo>,
        websocket: bool,
        trace: &Trace,
    ) -> Step<(Request<Incoming>, Route)> {
        if rules.waf.is_empty() && rules.router.is_none() {
            return Ok((req, Self::default_route(rules)?));
        }
        let (parts, body) = req.into_parts();
        let client_ip = rules.client_ip(&parts.headers, client);
        let mut view = RequestView::new(parts, client.clone(), self.label.clone(), websocket).with_client_ip(client_ip);
        self.waf(rules, &mut view, trace)?;
        let route = self.route(rules, &mut view, trace)?;
        Ok((Request::from_parts(view.parts, body), route))
    }

    /// Phase 5: runs the WAF plugins in order; the first deny ends the request.
    fn waf(&self, rules: &ListenerRules, req: &mut RequestView, trace: &Trace) -> Step<()> {
        for waf in &rules.waf {
            let name = &waf.name;
            let plugin = waf.slot.load();
            let Some(plugin) = plugin.as_deref() else {
                let error = PluginError::Missing { plugin: name.clone() };
                self.plugin_failed(error, self.shared.registry.missing_policy(name))?;
                continue;
            };
            let policy = plugin.limits.on_error;
            let (started, at) = (Instant::now(), self.shared.otlp.as_ref().map(|_| SystemTime::now()));
            let verdict = plugin.inspect(req);
            waf.timing.observe(started.elapsed());
            if let Some(at) = at {
                let outcome = match &verdict {
                    Ok(Verdict::Allow) => Ok("allow"),
                    Ok(Verdict::Deny(_)) => Ok("deny"),
                    Err(error) => Err(error),
                };
                self.plugin_span(trace, name, "waf", at, started.elapsed(), outcome);
            }
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
                    response.headers_mut().insert(ERROR_HEADER, HeaderValue::from_static(WAF_DENY));
                    return Err(Answer::new(response, Outcome::WafDenied));
                }
                Err(error) => {
                    plugin.record_failure(&error, req);
                    self.plugin_failed(error, policy)?;
                }
            }
        }
        Ok(())
    }

    /// Phase 6: asks the router plugin (if any) where the request goes.
    fn route(&self, rules: &ListenerRules, req: &mut RequestView, trace: &Trace) -> Step<Route> {
        let Some(router) = &rules.router else {
            return Self::default_route(rules);
        };
        let name = &router.name;
        let plugin = router.slot.load();
        let Some(plugin) = plugin.as_deref() else {
            let error = PluginError::Missing { plugin: name.clone() };
            return self.router_failed(rules, error, self.shared.registry.missing_policy(name));
        };
        let policy = plugin.limits.on_error;
        let (started, at) = (Instant::now(), self.shared.otlp.as_ref().map(|_| SystemTime::now()));
        let decision = plugin.route(req);
        router.timing.observe(started.elapsed());
        if let Some(at) = at {
            let outcome = match &decision {
                Ok(RouteDecision::Forward(_)) => Ok("forward"),
                Ok(RouteDecision::Respond(_)) => Ok("respond"),
                Ok(RouteDecision::NoRoute) => Ok("no-route"),
                Err(error) => Err(error),
            };
            self.plugin_span(trace, name, "router", at, started.elapsed(), outcome);
        }
        let decided = match decision {
            Ok(RouteDecision::Forward(upstream)) => validate::upstream(name, upstream, &rules.pools).map(Ok),
            Ok(RouteDecision::Respond(response)) => {
                validate::response(name, response).map(|r| Err(Answer::new(r, Outcome::PluginAnswered)))
            }
            Ok(RouteDecision::NoRoute) => return Self::default_route(rules),
            Err(error) => return self.router_failed(rules, error, policy),
        };
        match decided {
            Ok(step) => step,
            Err(error) => {
                plugin.record_failure(&error, req);
                self.router_failed(rules, error, policy)
            }
        }
    }

    /// With `[otlp]`: a plugin call's span, a child of its request's.
    fn plugin_span(
        &self,
        trace: &Trace,
        plugin: &str,
        kind: &'static str,
        start: SystemTime,
        took: Duration,
        outcome: Result<&'static str, &PluginError>,
    ) {
        let Some(otlp) = &self.shared.otlp else { return };
        otlp.record(SpanRecord {
            trace_id: trace.trace_id,
            span_id: Trace::new_span_id(),
            parent_id: Some(trace.span_id),
            flags: trace.flags,
            name: format!("plugin {plugin}"),
            server: false,
            start,
            end: start + took,
            attributes: vec![
                ("wasmgate.plugin", Attribute::from(plugin)),
                ("wasmgate.plugin.kind", Attribute::from(kind)),
                ("wasmgate.plugin.outcome", Attribute::from(*outcome.as_ref().unwrap_or(&"error"))),
            ],
            error: outcome.err().map(ToString::to_string),
        });
    }

    /// With `[otlp]`: the request's span, the server side of it, with the
    /// IDs the backend's `traceparent` names as its parent.
    fn request_span(
        &self,
        otlp: &Otlp,
        trace: &Trace,
        start: SystemTime,
        answer: &Answer,
        client: &ConnInfo,
        asked: &Asked,
    ) {
        let status = answer.response.status().as_u16();
        let (method, path) = asked.logged.as_ref().map_or(("", ""), |(m, p)| (m.as_str(), p.as_str()));
        let mut attributes = vec![
            ("http.request.method", Attribute::from(method)),
            ("url.path", Attribute::from(path)),
            ("http.response.status_code", Attribute::from(u64::from(status))),
            ("client.address", Attribute::from(client.addr.ip().to_string())),
            ("wasmgate.listener", Attribute::from(self.name.as_str())),
            ("wasmgate.request_id", Attribute::from(trace.request_id.to_str().unwrap_or(""))),
        ];
        if let Some(pool) = &answer.pool {
            attributes.push(("wasmgate.pool", Attribute::from(pool.name.as_str())));
        }
        if let Some(server) = &answer.server {
            attributes.push(("server.address", Attribute::from(server.address.as_str())));
        }
        let error = answer.outcome.error_code();
        if let Some(code) = error {
            attributes.push(("wasmgate.error", Attribute::from(code)));
        }
        otlp.record(SpanRecord {
            trace_id: trace.trace_id,
            span_id: trace.span_id,
            parent_id: trace.parent_id,
            flags: trace.flags,
            name: method.to_owned(),
            server: true,
            start,
            end: start + asked.started.elapsed(),
            attributes,
            error: (status >= 500).then(|| error.unwrap_or("server error").to_owned()),
        });
    }

    /// A failed router fails open only if there is a default pool to open to.
    fn router_failed(&self, rules: &ListenerRules, error: PluginError, policy: OnError) -> Step<Route> {
        let policy = if rules.default_pool.is_some() { policy } else { OnError::Deny };
        self.plugin_failed(error, policy)?;
        Self::default_route(rules)
    }

    fn default_route(rules: &ListenerRules) -> Step<Route> {
        match &rules.default_pool {
            Some(pool) => Ok(Route::to_pool(pool.clone())),
            None => Err(GatewayError::NoRoute.into()),
        }
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
                Err(GatewayError::PluginUnavailable { plugin: error.plugin().to_owned() }.into())
            }
        }
    }

    /// Phase 7 for a plain request. Without a body it can be sent again to
    /// another server if the first cannot be reached.
    async fn forward(
        &self,
        rules: &ListenerRules,
        req: Request<Incoming>,
        route: &Route,
        client: &ConnInfo,
    ) -> Result<Answer, GatewayError> {
        let (mut parts, body) = req.into_parts();
        forward::prepare_upstream(&mut parts, route, client, rules.trusts(client))?;
        let replayable = body.is_end_stream();
        let idempotent = matches!(
            parts.method,
            Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
        );
        let mut body = (!replayable).then_some(body);
        let timeout = route.pool.request_timeout;
        let forwarder = &route.pool.forwarder;
        let retryable = replayable && idempotent && route.pool.may_retry();
        let mut parts = Some(parts);
        let attempt = |server: Arc<Server>| {
            let body = match body.take() {
                Some(body) => Either::Left(body),
                None => Either::Right(Empty::new()),
            };
            let head = next_head(&mut parts, retryable);
            async move {
                let _active = server.begin();
                let authority = server
                    .authority
                    .as_ref()
                    .ok_or_else(|| SendError::Failed(format!("`{}` is not a host and port", server.address)))?;
                forwarder.send(head?, body, &server.address, authority, timeout).await
            }
        };
        let (mut response, server) = self.try_servers(route, retryable, attempt).await?;
        remove_gateway_headers(response.headers_mut());
        Ok(Answer::served(response, Outcome::Served, &route.pool, server))
    }

    /// Phase 7 for a WebSocket handshake: a place under the listener's cap,
    /// the handshake to a server (another if it cannot be reached), then the
    /// client's answer and the relay.
    async fn upgrade(
        &self,
        rules: &ListenerRules,
        mut req: Request<Incoming>,
        handshake: ClientHandshake,
        route: &Route,
        client: &ConnInfo,
        trace: &Trace,
    ) -> Result<Answer, GatewayError> {
        let slot = WebSocketSlot::try_take(&self.live_websockets, rules.max_websockets)
            .ok_or_else(|| GatewayError::AtCapacity { listener: self.name.clone() })?;
        let client_upgrade = hyper::upgrade::on(&mut req);
        let tunnel = client.tunnels.enter();
        let log = self.shared.access_log.clone().map(|access| {
            Box::new(WebSocketLog {
                access,
                client: client.addr,
                path: req.uri().path().to_owned(),
                request_id: trace.request_id.to_str().unwrap_or("").to_owned(),
            })
        });
        let (mut parts, _body) = req.into_parts();
        forward::prepare_upstream(&mut parts, route, client, rules.trusts(client))?;
        let (timeout, tls, budgets) = (route.pool.request_timeout, route.pool.tls.as_ref(), &route.pool.budgets);
        let retryable = route.pool.may_retry();
        let mut parts = Some(parts);
        let attempt = |server: Arc<Server>| {
            let (head, handshake) = (next_head(&mut parts, retryable), &handshake);
            async move {
                // Counted on its server from the handshake on (least-connections).
                let active = server.begin();
                let answer = handshake.send(head?, &server.address, tls, budgets, timeout).await;
                answer.map(|response| (response, active))
            }
        };
        let ((mut response, active), server) = self.try_servers(route, retryable, attempt).await?;
        remove_gateway_headers(response.headers_mut());
        let relaying = Relaying {
            server: server.clone(),
            active,
            limits: rules.relay_limits,
            slot,
            drain: self.shared.drain.clone(),
            listener_removal: self.removal.clone(),
            metrics: self.shared.metrics.clone(),
            listener: self.label.clone(),
            log,
            span: self.shared.otlp.clone().map(|otlp| {
                let span = SpanRecord {
                    trace_id: trace.trace_id,
                    span_id: Trace::new_span_id(),
                    parent_id: Some(trace.span_id),
                    flags: trace.flags,
                    name: "WebSocket".into(),
                    server: false,
                    start: SystemTime::now(),
                    end: SystemTime::now(),
                    attributes: vec![
                        ("wasmgate.listener", Attribute::from(self.name.as_str())),
                        ("wasmgate.request_id", Attribute::from(trace.request_id.to_str().unwrap_or(""))),
                    ],
                    error: None,
                };
                Box::new((otlp, span))
            }),
            tunnel,
        };
        Ok(match session::answer(response, &handshake, client_upgrade, relaying)? {
            ClientAnswer::Upgraded(response) => Answer::served(response, Outcome::Upgraded, &route.pool, server),
            ClientAnswer::Declined(response) => Answer::served(response, Outcome::Served, &route.pool, server),
        })
    }

    /// Phase 7's choice of server: picks a healthy one and sends to it. A
    /// server that cannot be connected to is marked unhealthy and, if
    /// `retryable` (nothing reached any server and the request can be sent
    /// again), another is tried, up to the pool's `retries`.
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
            let outcome = attempt(server.clone()).await;
            if let Err(error) = &outcome {
                let kind = match error {
                    SendError::Connect(_) => Some("connect"),
                    SendError::Local(_) => Some("local"),
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
                Err(SendError::Local(error)) => {
                    // Not the server's doing: its health stays, and trying
                    // another server would meet the same shortage.
                    tracing::warn!(pool = %pool.name, server = %server.address, %error, "no resources for an upstream connection");
                    return Err(GatewayError::OutOfResources { pool: pool.name.clone() });
                }
                Err(SendError::Connect(error)) => {
                    tracing::warn!(pool = %pool.name, server = %server.address, %error, retry = may_retry, "connect failed");
                    server.connect_failed(&error);
                }
                Err(SendError::Failed(error)) => {
                    tracing::warn!(pool = %pool.name, server = %server.address, %error, retry = may_retry, "upstream request failed");
                }
            }
            let unreachable =
                GatewayError::BackendUnreachable { pool: pool.name.clone(), server: server.address.clone() };
            if !may_retry {
                return Err(unreachable);
            }
            last_error = Some(unreachable);
            tried.push(server);
        }
    }

    /// Phase 8: counts the answer in the metrics and writes its access-log
    /// line (and a debug line).
    fn log(&self, rules: &ListenerRules, answer: &Answer, client: &ConnInfo, asked: Asked, trace: &Trace) {
        let elapsed = asked.started.elapsed();
        let status = answer.response.status().as_u16();
        let pool = answer.pool.as_ref().map_or("", |p| p.name.as_str());
        let metrics = &self.shared.metrics;
        rules.requests.count(pool, status);
        self.duration.observe(elapsed);
        metrics.answered.fetch_add(1, Ordering::Relaxed);
        if status >= 500 {
            metrics.failed.fetch_add(1, Ordering::Relaxed);
        }
        if asked.handshake {
            self.handshakes.count(answer.outcome.handshake_result());
        }
        let Some((method, path)) = &asked.logged else { return };
        let error = answer.outcome.error_code();
        if let Some(access_log) = &self.shared.access_log {
            access_log.request(&RequestEntry {
                listener: &self.name,
                client: client.addr,
                method: method.as_str(),
                path,
                status,
                pool,
                server: answer.server.as_ref().map_or("", |s| s.address.as_str()),
                duration_ms: access_log::millis(elapsed),
                bytes: answer.response.body().size_hint().exact(),
                error,
                request_id: trace.request_id.to_str().unwrap_or(""),
                trace_id: &trace.trace_id_hex(),
            });
        }
        tracing::debug!(
            listener = %self.name,
            %method,
            %path,
            status,
            error = error.unwrap_or(""),
            elapsed_us = elapsed.as_micros() as u64,
            "request"
        );
    }
}

/// The head for one attempt at a server: a copy while another server may
/// still be tried (`retryable`), else the head itself, which only the one
/// attempt there is can take.
fn next_head(parts: &mut Option<http::request::Parts>, retryable: bool) -> Result<http::request::Parts, SendError> {
    let head = if retryable { parts.as_ref().map(forward::copy_head) } else { parts.take() };
    head.ok_or_else(|| SendError::Failed("the request head was already sent".into()))
}

/// Removes the `x-wasmgate-*` headers from a backend's answer: a client,
/// and whoever reads its traces, must be able to tell the gateway's own
/// answers (`x-wasmgate-error`) from a backend's.
fn remove_gateway_headers(headers: &mut http::HeaderMap) {
    let names: Vec<http::HeaderName> =
        headers.keys().filter(|name| name.as_str().starts_with("x-wasmgate-")).cloned().collect();
    for name in names {
        headers.remove(name);
    }
}
