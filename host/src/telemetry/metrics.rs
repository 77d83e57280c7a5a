//! Prometheus metrics (`GET /metrics` on the admin listener), with the
//! `prometheus-client` crate.
//!
//! Counters and histograms the request path moves live in [`Metrics`]; they
//! are atomics (histograms too: [`Histogram`] here is a fixed set of atomic
//! buckets, no lock per observation). What is state rather than events —
//! server health, plugin counters kept by the plugin registry, live
//! WebSockets per listener — is read at scrape time.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

/// Upper bounds (seconds) of request-duration buckets.
const REQUEST_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
/// Upper bounds (seconds) of plugin-call buckets: calls take microseconds.
const PLUGIN_BUCKETS: &[f64] =
    &[1e-6, 2e-6, 3e-6, 5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 0.1, 1.0];

/// A histogram of fixed buckets, each an atomic counter. Clones share it.
#[derive(Debug, Clone)]
pub struct Histogram(Arc<Buckets>);

#[derive(Debug)]
pub struct Buckets {
    bounds: &'static [f64],
    /// Observations per bucket (not cumulative); the last is +Inf.
    counts: Box<[AtomicU64]>,
    sum_ns: AtomicU64,
}

impl std::ops::Deref for Histogram {
    type Target = Buckets;
    fn deref(&self) -> &Buckets {
        &self.0
    }
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram(Arc::new(Buckets {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_ns: AtomicU64::new(0),
        }))
    }
}

impl Buckets {
    pub fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let bucket = self.bounds.iter().position(|&b| seconds <= b).unwrap_or(self.bounds.len());
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(elapsed.as_nanos() as u64, Ordering::Relaxed);
    }

    /// The `q` quantile (0-1), as the upper bound of the bucket it falls in
    /// (`None` with no observation; the largest bound for the +Inf bucket).
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let counts: Vec<u64> = self.counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = (q * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, count) in counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Some(self.bounds.get(i).or(self.bounds.last()).copied().unwrap_or(0.0));
            }
        }
        self.bounds.last().copied()
    }
}

impl TypedMetric for Histogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Histogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        // Per-bucket counts: the encoder makes them cumulative.
        let buckets: Vec<(f64, u64)> = self
            .counts
            .iter()
            .enumerate()
            .map(|(i, count)| (self.bounds.get(i).copied().unwrap_or(f64::INFINITY), count.load(Ordering::Relaxed)))
            .collect();
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub listener: Arc<str>,
    /// Empty when the request reached no pool (a WAF deny, a plugin's own
    /// answer, an error before routing).
    pub pool: Arc<str>,
    /// `2xx`, `4xx`...
    pub class: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabel {
    pub listener: Arc<str>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerPoolLabels {
    pub listener: Arc<str>,
    pub pool: Arc<str>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectErrorLabels {
    pub pool: Arc<str>,
    /// `connect`, `tls` or `timeout`.
    pub kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    pub listener: Arc<str>,
    /// `upgraded`, `waf_denied`, `at_capacity`, `refused` (by a plugin or
    /// the backend) or `error`.
    pub result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// `client`, `server`, `idle`, `lifetime`, `drain`, `removed`,
    /// `unhealthy` or `error`.
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabel {
    /// `client_to_server` or `server_to_client`.
    pub direction: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginLabel {
    pub plugin: Arc<str>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// `applied` or `refused`.
    pub result: &'static str,
}

/// The gateway's event metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: HistogramFamily<ListenerLabel>,
    pub upstream_errors: Family<ConnectErrorLabels, Counter>,
    pub websockets: Family<ListenerPoolLabels, Gauge>,
    pub handshakes: Family<HandshakeLabels, Counter>,
    pub websocket_closes: Family<ReasonLabel, Counter>,
    pub relayed_bytes: Family<DirectionLabel, Counter>,
    pub spliced_bytes: Counter,
    pub plugin_call_duration: HistogramFamily<PluginLabel>,
    pub reloads: Family<ResultLabel, Counter>,
    /// All requests answered, and those answered 5xx (the dashboard's rates).
    pub answered: AtomicU64,
    pub failed: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("wasmgate");
        let metrics = Metrics {
            requests: Family::default(),
            request_duration: Family::new_with_constructor(|| Histogram::new(REQUEST_BUCKETS)),
            upstream_errors: Family::default(),
            websockets: Family::default(),
            handshakes: Family::default(),
            websocket_closes: Family::default(),
            relayed_bytes: Family::default(),
            spliced_bytes: Counter::default(),
            plugin_call_duration: Family::new_with_constructor(|| Histogram::new(PLUGIN_BUCKETS)),
            reloads: Family::default(),
            answered: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            registry: Registry::default(),
        };
        registry.register(
            "requests",
            "Requests answered, by listener, pool (empty: none) and status class",
            metrics.requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from a request's head to its response's head, by listener",
            metrics.request_duration.clone(),
        );
        registry.register(
            "upstream_connect_errors",
            "Failed connections to servers, by pool and kind (connect, tls, timeout)",
            metrics.upstream_errors.clone(),
        );
        registry.register(
            "websockets_active",
            "WebSockets being relayed, by listener and pool",
            metrics.websockets.clone(),
        );
        registry.register(
            "websocket_handshakes",
            "WebSocket handshakes, by listener and result",
            metrics.handshakes.clone(),
        );
        registry.register(
            "websocket_closes",
            "Relayed WebSockets ended, by who ended them and why",
            metrics.websocket_closes.clone(),
        );
        registry.register(
            "websocket_relayed_bytes",
            "Bytes relayed on ended WebSockets, by direction",
            metrics.relayed_bytes.clone(),
        );
        registry.register(
            "websocket_spliced_bytes",
            "Of the bytes relayed on ended WebSockets, those spliced from one plain TCP socket to the other",
            metrics.spliced_bytes.clone(),
        );
        registry.register(
            "plugin_call_duration_seconds",
            "Duration of plugin calls, by plugin",
            metrics.plugin_call_duration.clone(),
        );
        registry.register("reloads", "Config reloads, by result", metrics.reloads.clone());
        for result in ["applied", "refused"] {
            metrics.reloads.get_or_create_owned(&ResultLabel { result });
        }
        Metrics { registry, ..metrics }
    }
}

/// The status classes, as labels.
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// How a WebSocket handshake ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeResult {
    Upgraded,
    WafDenied,
    AtCapacity,
    /// Answered without an upgrade by a plugin or the backend.
    Refused,
    /// Any other answer the gateway made itself.
    Error,
}

impl HandshakeResult {
    const ALL: [HandshakeResult; 5] = [
        HandshakeResult::Upgraded,
        HandshakeResult::WafDenied,
        HandshakeResult::AtCapacity,
        HandshakeResult::Refused,
        HandshakeResult::Error,
    ];

    /// The metrics label.
    pub fn label(self) -> &'static str {
        match self {
            HandshakeResult::Upgraded => "upgraded",
            HandshakeResult::WafDenied => "waf_denied",
            HandshakeResult::AtCapacity => "at_capacity",
            HandshakeResult::Refused => "refused",
            HandshakeResult::Error => "error",
        }
    }
}

/// One listener's request counters by pool and status class, made when
/// its rules are, so that counting a request takes no lock.
pub struct RequestCounters {
    /// By pool name; `""` for requests that reached no pool.
    by_pool: std::collections::HashMap<Arc<str>, [Counter; 5]>,
}

impl RequestCounters {
    pub fn new<'a>(metrics: &Metrics, listener: &str, pools: impl Iterator<Item = &'a Arc<str>>) -> RequestCounters {
        let listener: Arc<str> = listener.into();
        let counters = |pool: Arc<str>| {
            CLASSES.map(|class| {
                let labels = RequestLabels { listener: listener.clone(), pool: pool.clone(), class };
                metrics.requests.get_or_create(&labels).clone()
            })
        };
        let mut by_pool: std::collections::HashMap<Arc<str>, [Counter; 5]> =
            pools.map(|pool| (pool.clone(), counters(pool.clone()))).collect();
        by_pool.insert("".into(), counters("".into()));
        RequestCounters { by_pool }
    }

    /// Counts a response of `status` from `pool` (`""`: none).
    pub fn count(&self, pool: &str, status: u16) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        if let Some(counters) = self.by_pool.get(pool) {
            counters[class].inc();
        }
    }
}

/// One listener's handshake counters, made with the listener so that
/// counting a handshake takes no lock.
pub struct HandshakeCounters([Counter; 5]);

impl HandshakeCounters {
    pub fn new(metrics: &Metrics, listener: &str) -> HandshakeCounters {
        HandshakeCounters(HandshakeResult::ALL.map(|result| {
            let labels = HandshakeLabels { listener: listener.into(), result: result.label() };
            metrics.handshakes.get_or_create(&labels).clone()
        }))
    }

    pub fn count(&self, result: HandshakeResult) {
        // `ALL` lists the results in declaration order (tested below).
        self.0[result as usize].inc();
    }
}

impl Metrics {
    /// The duration histogram of `plugin`'s calls (kept across its versions).
    pub fn plugin_timing(&self, plugin: &str) -> Histogram {
        self.plugin_call_duration.get_or_create(&PluginLabel { plugin: plugin.into() }).clone()
    }

    /// The whole exposition (OpenMetrics text): the event metrics, then
    /// `live`, the state its owner reads at scrape time.
    pub fn encode(&self, state: Box<dyn Collector>) -> String {
        let mut text = String::new();
        let mut live = Registry::with_prefix("wasmgate");
        live.register_collector(state);
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode_registry(&mut text, &self.registry);
        let _ = prometheus_client::encoding::text::encode_registry(&mut text, &live);
        let _ = prometheus_client::encoding::text::encode_eof(&mut text);
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_handshake_result_counts_under_its_own_label() {
        for (i, result) in HandshakeResult::ALL.into_iter().enumerate() {
            assert_eq!(result as usize, i, "{result:?} is at its own index");
        }
        let metrics = Metrics::default();
        let counters = HandshakeCounters::new(&metrics, "web");
        counters.count(HandshakeResult::AtCapacity);
        let text = metrics.encode(Box::new(NoState));
        assert!(
            text.contains("wasmgate_websocket_handshakes_total{listener=\"web\",result=\"at_capacity\"} 1"),
            "{text}"
        );
        assert!(text.contains("wasmgate_websocket_handshakes_total{listener=\"web\",result=\"upgraded\"} 0"), "{text}");
    }

    #[derive(Debug)]
    struct NoState;

    impl Collector for NoState {
        fn encode(&self, _: prometheus_client::encoding::DescriptorEncoder) -> Result<(), std::fmt::Error> {
            Ok(())
        }
    }
}
