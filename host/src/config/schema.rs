//! The configuration's schema: every table and key of the gateway config
//! and of a plugin's `NAME.toml`, with its default written once (beside
//! the field, or in the table's `Default`) and a one-line doc comment.
//! What a value must satisfy beyond its type is checked in
//! [`super::validate`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

/// The whole gateway configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Reload when the config file changes (written in place, or its
    /// Kubernetes ConfigMap's `..data` link swapped), exactly as on SIGHUP.
    /// A top-level key: it goes before the first `[section]`. Read at start.
    #[serde(default)]
    pub watch_config: bool,
    /// The admin listener (health, readiness, status); none without it.
    pub admin: Option<AdminConfig>,
    #[serde(default)]
    pub plugins: PluginsConfig,
    /// Where clients connect. At least one.
    #[serde(default)]
    pub listener: Vec<ListenerConfig>,
    /// Groups of backend servers.
    #[serde(default)]
    pub pool: Vec<PoolConfig>,
    #[serde(default)]
    pub websocket: WebSocketConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub log: LogConfig,
    /// Counts shared with other instances; this process counts alone
    /// without it.
    pub cluster: Option<ClusterConfig>,
    /// Trace export; none without it.
    pub otlp: Option<OtlpConfig>,
    /// The file this was read from (set by [`Config::load`]).
    #[serde(skip)]
    pub source: PathBuf,
}

/// `[admin]`: where operators and orchestrators ask how the gateway is.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// `ip:port`; loopback unless `token_file` is set.
    pub listen: SocketAddr,
    /// A file holding a bearer token every admin request must present
    /// (relative to the config file).
    pub token_file: Option<PathBuf>,
    /// Host names the admin listener answers to, beside IP addresses and
    /// `localhost` (a page on another name that resolves to the gateway, a
    /// DNS-rebinding attack, gets 421). Default: none.
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
}

/// `[plugins]`: where plugins live and the limits every call runs under.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PluginsConfig {
    /// Directory of `NAME.wasm` components (and optional `NAME.toml`), relative
    /// to the config file.
    pub dir: PathBuf,
    /// Deadline of one plugin call on the plugin's own CPU time, enforced
    /// preemptively.
    pub call_timeout_ms: u64,
    /// Linear memory one plugin instance may grow to.
    pub memory_limit_mb: u64,
    /// What a request gets when a plugin traps, overruns or is missing.
    pub on_error: OnError,
    /// Reload plugins when files in `dir` are added, replaced or removed.
    pub watch: bool,
    /// Keep compiled plugins on disk so unchanged files are not recompiled.
    pub cache: bool,
    /// Where compiled plugins are kept (must be private to the gateway's
    /// user). Default: `$XDG_CACHE_HOME/wasmgate` or `~/.cache/wasmgate`.
    pub cache_dir: Option<PathBuf>,
    /// The most the compiled-artifact cache takes on disk; past it, the
    /// least recently used artifacts are removed.
    pub cache_max_mb: u64,
    /// Failed calls within 10 s after which a plugin is quarantined (its
    /// `on_error` outcome applies without calling it), if they were at least
    /// half of its calls and came from at least two client addresses.
    pub quarantine_after_failures: u32,
    /// First quarantine length; each further one doubles it.
    pub quarantine_initial_ms: u64,
    /// Longest quarantine.
    pub quarantine_max_ms: u64,
}

impl Default for PluginsConfig {
    fn default() -> Self {
        PluginsConfig {
            dir: PathBuf::from("plugins"),
            call_timeout_ms: 10,
            memory_limit_mb: 32,
            on_error: OnError::default(),
            watch: true,
            cache: true,
            cache_dir: None,
            cache_max_mb: 1024,
            quarantine_after_failures: 5,
            quarantine_initial_ms: 1_000,
            quarantine_max_ms: 60_000,
        }
    }
}

/// Failure policy of a plugin.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// Fail closed: the request gets 503 `plugin-unavailable`.
    #[default]
    Deny,
    /// Fail open: a WAF is skipped; a router falls back to `default_pool`.
    Allow,
}

/// `[[listener]]`: an address clients connect to and the rules for it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Unique name; plugins see it as `listener` in the request head.
    pub name: String,
    /// `ip:port` to listen on (port 0 picks a free port).
    pub bind: SocketAddr,
    /// `"http"` (HTTP/1.1, and HTTP/2 with prior knowledge) or `"https"`
    /// (TLS 1.2/1.3, ALPN `h2` and `http/1.1`). WebSocket works on both.
    #[serde(default)]
    pub protocol: ListenerProtocol,
    /// Certificates of an `https` listener, chosen by SNI. The first is the
    /// default for clients without SNI or with an unknown name.
    #[serde(default)]
    pub certificate: Vec<CertificateConfig>,
    /// What an `https` listener does with an SNI name no certificate lists:
    /// `"default"` (serve the first certificate) or `"refuse"`.
    #[serde(default)]
    pub unknown_sni: UnknownSni,
    /// On an `http` listener: answer requests without a body with a 308 to
    /// the same URL on the first `https` listener (WebSocket handshakes and
    /// requests with a body are served as they are).
    #[serde(default)]
    pub redirect_to_https: bool,
    /// On an `https` listener: answer 421 to a request whose `Host` (or
    /// `:authority`) names another host than the TLS SNI, so one
    /// certificate's connection cannot reach another host's routes (domain
    /// fronting). Off by default.
    #[serde(default)]
    pub require_sni_match: bool,
    /// WAF plugins run in this order on every request head.
    #[serde(default)]
    pub waf: Vec<String>,
    /// Router plugin choosing the pool; without one, `default_pool` is used.
    pub router: Option<String>,
    /// Pool used without a router, or when the router finds no route.
    pub default_pool: Option<String>,
    /// Concurrent upgraded WebSockets on this listener; past it, 503 `at-capacity`.
    #[serde(default = "default_max_websockets")]
    pub max_websockets: usize,
    /// Peers (addresses or CIDR blocks) whose forwarding headers are kept:
    /// a load balancer or CDN in front of the gateway. From any other peer,
    /// `X-Forwarded-For` is replaced by the peer's address and `Forwarded`,
    /// `X-Real-IP`, `X-Forwarded-Port` and `X-Forwarded-Prefix` are removed.
    /// Default: none.
    #[serde(default, deserialize_with = "addresses_or_blocks")]
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Every connection starts with a PROXY protocol header (v1 or v2) from
    /// an L4 load balancer, whose source address is the client's; a
    /// connection without a valid one is closed. Only for a listener that
    /// nothing but the balancer can reach. Default: off.
    #[serde(default)]
    pub proxy_protocol: bool,
}

fn default_max_websockets() -> usize {
    100_000
}

/// A list of `10.0.0.0/8`-style blocks or single addresses.
fn addresses_or_blocks<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<ipnet::IpNet>, D::Error> {
    Vec::<String>::deserialize(deserializer)?
        .iter()
        .map(|entry| {
            entry
                .parse::<ipnet::IpNet>()
                .or_else(|_| entry.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map(|net| net.trunc())
                .map_err(|_| serde::de::Error::custom(format!("`{entry}` is not an address or a CIDR block")))
        })
        .collect()
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerProtocol {
    #[default]
    Http,
    Https,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownSni {
    #[default]
    Default,
    Refuse,
}

/// `[[listener.certificate]]`: a certificate chain and its key (PEM files,
/// relative to the config file), for the SNI names in `hosts`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateConfig {
    /// Names this certificate serves: exact (`app.example.test`) or one
    /// leading wildcard label (`*.example.test`).
    pub hosts: Vec<String>,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// `[[pool]]`: backend servers that can take the same requests.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    pub name: String,
    /// `host:port` of each server.
    pub servers: Vec<String>,
    /// How a server is chosen among the healthy ones.
    #[serde(default)]
    pub balance: Balance,
    /// `"http"` or `"https"` (TLS to the servers; probes use it too).
    #[serde(default)]
    pub protocol: PoolProtocol,
    /// For `https`: a PEM file of CA certificates to verify servers with
    /// (relative to the config file); default: the system's roots.
    pub ca: Option<PathBuf>,
    /// For `https`: the name to send as SNI and verify the certificate
    /// against; default: each server's host.
    pub tls_server_name: Option<String>,
    /// For `https`: accept any server certificate. For labs only: logged
    /// loudly at start-up.
    #[serde(default)]
    pub insecure_skip_verify: bool,
    /// Longest wait for a server's response head (or its 101), in seconds.
    #[serde(default = "default_request_timeout_s")]
    pub request_timeout_s: u64,
    /// Other servers tried when connecting to one fails (for requests
    /// without a body and WebSocket handshakes: nothing has reached a server).
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Close the WebSockets of a server when it turns unhealthy. By default a
    /// failed probe only stops new traffic; established connections stay.
    #[serde(default)]
    pub close_on_unhealthy: bool,
    /// Upstream connections open at once to this pool's servers (busy or
    /// idle; WebSockets and probes included). Past it a request gets 503
    /// `out-of-resources` at once and no server's health changes. Default:
    /// no limit but the process's.
    pub max_connections: Option<usize>,
    /// The active health probe. A pool without one is probed with `GET /`.
    #[serde(default)]
    pub probe: ProbeConfig,
}

fn default_request_timeout_s() -> u64 {
    30
}
fn default_retries() -> u32 {
    1
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Balance {
    /// Each healthy server in turn.
    #[default]
    RoundRobin,
    /// The healthy server with the fewest in-flight requests and live
    /// WebSockets: what matters when connections last hours.
    LeastConnections,
    /// Rendezvous hashing of the router's `affinity-key`: a key stays on its
    /// server, and adding a server moves only that server's share of keys.
    Hash,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolProtocol {
    #[default]
    Http,
    Https,
}

/// `[pool.probe]`: how servers are checked.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProbeConfig {
    /// `"http"`: a request whose status (and body) must match; `"websocket"`:
    /// a real upgrade handshake that must get its 101 and accept key.
    pub kind: ProbeKind,
    /// Request method of an HTTP probe.
    pub method: String,
    pub path: String,
    /// `Host` header of the probe; default: the server's `host:port`.
    pub host: Option<String>,
    /// Time between two probes of one server (fractions allowed).
    pub interval_s: f64,
    /// A probe that takes longer fails.
    pub timeout_s: f64,
    /// Consecutive failures that turn a healthy server unhealthy.
    pub unhealthy_threshold: u32,
    /// Consecutive successes that bring an unhealthy server back.
    pub healthy_threshold: u32,
    /// Statuses that pass: ranges and single codes, e.g. `"200-399"`, `"200,204"`.
    pub match_status: StatusMatch,
    /// If set, an HTTP probe's body (its first 64 KiB) must contain this.
    pub match_body: Option<String>,
    /// Servers start healthy (so start-up is not a 503 storm) until probes
    /// say otherwise; `false` keeps them out until `healthy_threshold` passes.
    pub start_healthy: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProbeKind {
    #[default]
    Http,
    Websocket,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        ProbeConfig {
            kind: ProbeKind::default(),
            method: "GET".into(),
            path: "/".into(),
            host: None,
            interval_s: 5.0,
            timeout_s: 2.0,
            unhealthy_threshold: 3,
            healthy_threshold: 2,
            match_status: StatusMatch(vec![(200, 399)]),
            match_body: None,
            start_healthy: true,
        }
    }
}

/// `match_status`, parsed when the config is: inclusive ranges.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct StatusMatch(Vec<(u16, u16)>);

impl TryFrom<String> for StatusMatch {
    type Error = String;
    fn try_from(text: String) -> Result<StatusMatch, String> {
        StatusMatch::parse(&text).map_err(|reason| format!("match_status `{text}`: {reason}"))
    }
}

impl StatusMatch {
    pub fn parse(text: &str) -> Result<StatusMatch, String> {
        let mut ranges = Vec::new();
        for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (low, high) = item.split_once('-').unwrap_or((item, item));
            let code = |s: &str| {
                s.trim()
                    .parse::<u16>()
                    .ok()
                    .filter(|c| (100..=599).contains(c))
                    .ok_or(format!("`{s}` is not a status 100-599"))
            };
            let (low, high) = (code(low)?, code(high)?);
            if low > high {
                return Err(format!("`{item}` is an empty range"));
            }
            ranges.push((low, high));
        }
        if ranges.is_empty() {
            return Err("no status given".into());
        }
        Ok(StatusMatch(ranges))
    }

    pub fn matches(&self, status: u16) -> bool {
        self.0.iter().any(|&(low, high)| (low..=high).contains(&status))
    }
}

/// `[websocket]`: limits on upgraded connections.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebSocketConfig {
    /// Close a WebSocket after this long with no byte in either direction.
    pub idle_timeout_s: u64,
    /// Close every WebSocket after this long, busy or not.
    pub max_lifetime_s: u64,
    /// On shutdown, WebSockets get their Close 1001 spread over this window.
    pub drain_s: u64,
    /// Move large frame payloads between plain TCP sockets with splice(2),
    /// not through the gateway's memory: less gateway CPU per byte, but
    /// peers on the same host spend more to receive it (off by default).
    pub splice: bool,
}

impl Default for WebSocketConfig {
    fn default() -> Self {
        WebSocketConfig { idle_timeout_s: 300, max_lifetime_s: 14_400, drain_s: 30, splice: false }
    }
}

/// `[log]`: the access log.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// The gateway's own log lines on standard error: `text` (default) or
    /// `json` (one object per line: timestamp, level, target, fields).
    /// Read at start-up.
    #[serde(default)]
    pub format: LogFormat,
    /// One line per request and per closed WebSocket: `off` (default),
    /// `text` or `json`.
    #[serde(default)]
    pub access: AccessFormat,
    /// Where access lines go (relative to the config file); standard output
    /// without it.
    pub access_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessFormat {
    #[default]
    Off,
    Text,
    Json,
}

/// `[cluster]`: what the host's `count` shares with the other instances of a
/// fleet, through Redis. Read at start-up.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// `redis://host:port[/db]` (or `redis+unix:///path`): the Redis server
    /// every instance of the fleet names.
    pub redis: String,
    /// Keeps fleets that share one Redis apart: keys and the sync channel
    /// are named `wasmgate:NAME:...`. Letters, digits, `-`, `_` and `.`.
    #[serde(default = "default_cluster_name")]
    pub name: String,
    #[serde(default)]
    pub counting: Counting,
    /// `synced`: how often counts are sent to and merged from the others.
    #[serde(default = "default_sync_interval_ms")]
    pub sync_interval_ms: u64,
    /// `exact`: bounds the write and the read of a `count`'s round trip;
    /// past it the count is local and Redis is taken as down until the
    /// sync thread hears from it.
    #[serde(default = "default_redis_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_cluster_name() -> String {
    "default".into()
}

fn default_sync_interval_ms() -> u64 {
    100
}

fn default_redis_timeout_ms() -> u64 {
    5
}

/// `[otlp]`: spans for requests, WebSockets and plugin calls, sent to an
/// OpenTelemetry collector over OTLP/HTTP (protobuf). Read at start-up.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OtlpConfig {
    /// The collector's traces URL, e.g. `http://127.0.0.1:4318/v1/traces`
    /// (plain HTTP: a collector agent beside the gateway).
    pub endpoint: String,
    /// The `service.name` of the spans.
    #[serde(default = "default_service_name")]
    pub service_name: String,
}

fn default_service_name() -> String {
    "wasmgate".into()
}

/// How `[cluster]` counts: the trade-off between a network round trip per
/// `count` and a total that lags by one sync interval.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Counting {
    /// Counted here; deltas sent to and merged from the other instances
    /// every `sync_interval_ms`. No network wait in a `count`.
    #[default]
    Synced,
    /// Every `count` is one Redis round trip, so the fleet's total is exact.
    Exact,
}

/// `[limits]`: what one client may hold, and how many the process takes.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// A client must send a whole request head (and finish a TLS handshake)
    /// within this time, or its connection is closed (slowloris defence).
    pub header_read_timeout_s: u64,
    /// Largest request head accepted; past it, 431.
    pub max_header_bytes: usize,
    /// A client connection that moves no byte for this long while no
    /// request or WebSocket is under way on it is closed (HTTP/2 gets a
    /// GOAWAY first). Before its first request a connection has
    /// `header_read_timeout_s` instead.
    pub client_idle_timeout_s: u64,
    /// Requests one HTTP/2 client connection may have under way at once
    /// (`SETTINGS_MAX_CONCURRENT_STREAMS`); each may need an upstream
    /// connection of its own.
    pub max_concurrent_streams: u32,
    /// Client connections plus WebSockets the process serves at once; past
    /// it new connections are refused. Default: derived from the open-file
    /// limit (raised to its hard limit at start), keeping headroom.
    pub max_connections: Option<usize>,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            header_read_timeout_s: 30,
            max_header_bytes: 64 * 1024,
            client_idle_timeout_s: 60,
            max_concurrent_streams: 100,
            max_connections: None,
        }
    }
}

/// `NAME.toml` beside a plugin: its config strings and limit overrides.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginSettings {
    /// Overrides `[plugins] call_timeout_ms`.
    pub call_timeout_ms: Option<u64>,
    /// Overrides `[plugins] memory_limit_mb`.
    pub memory_limit_mb: Option<u64>,
    /// Overrides `[plugins] on_error`.
    pub on_error: Option<OnError>,
    /// Strings the plugin reads with the host's `config(key)`.
    #[serde(default)]
    pub config: BTreeMap<String, String>,
}

/// The role a listener gives a plugin; it must match the plugin's exports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PluginKind {
    Router,
    Waf,
}

impl std::fmt::Display for PluginKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PluginKind::Router => "router",
            PluginKind::Waf => "waf",
        })
    }
}
