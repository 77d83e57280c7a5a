//! The gateway's configuration: the TOML file given to `wasmgate run`, and the
//! `NAME.toml` file beside each plugin.
//!
//! Every table refuses unknown keys, every default is written next to its
//! field, and [`Config::load`] validates the whole file (references between
//! listeners, pools and plugins included) before anything is started, naming
//! the file, the key and the reason on failure.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// A configuration file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read { file: PathBuf, source: std::io::Error },
    /// TOML syntax or a wrong type/unknown key; the message has line and column.
    #[error("{file}: {message}")]
    Parse { file: PathBuf, message: String },
    /// The file parsed but a value is not usable; `line` is where the key
    /// is written (none for a default value).
    #[error("{file}{}: `{key}`: {reason}", .line.map(|l| format!(":{l}")).unwrap_or_default())]
    Invalid { file: PathBuf, line: Option<usize>, key: String, reason: String },
}

impl ConfigError {
    /// Adds the line of the offending key in `text` (the file's contents).
    fn with_line(self, text: &str) -> ConfigError {
        match self {
            ConfigError::Invalid { file, line: None, key, reason } => {
                let line = line_of_key(text, &key);
                ConfigError::Invalid { file, line, key, reason }
            }
            other => other,
        }
    }
}

/// The line where `key` (`listener[0].waf[1]`, `plugins.dir`) is written in
/// `text`, or where the nearest enclosing table or value is.
fn line_of_key(text: &str, key: &str) -> Option<usize> {
    let document = toml::de::DeTable::parse(text).ok()?;
    let mut found = None;
    let mut value: Option<&toml::de::DeValue<'_>> = None;
    let table = document.get_ref();
    for segment in key.split('.') {
        let (name, indexes) = match segment.split_once('[') {
            Some((name, rest)) => (name, rest),
            None => (segment, ""),
        };
        let next = match value {
            None => table.get(name),
            Some(v) => v.get(name),
        };
        let Some(next) = next else { break };
        found = Some(next.span().start);
        value = Some(next.get_ref());
        for index in indexes.split('[').filter(|i| !i.is_empty()) {
            let Some(item) = index.trim_end_matches(']').parse::<usize>().ok().and_then(|i| value?.get(i)) else {
                break;
            };
            found = Some(item.span().start);
            value = Some(item.get_ref());
        }
    }
    found.map(|offset| text[..offset.min(text.len())].matches('\n').count() + 1)
}

/// The whole gateway configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
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
}

/// `[plugins]`: where plugins live and the limits every call runs under.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginsConfig {
    /// Directory of `NAME.wasm` components (and optional `NAME.toml`), relative
    /// to the config file.
    #[serde(default = "default_plugin_dir")]
    pub dir: PathBuf,
    /// Wall-clock deadline of one plugin call, enforced preemptively.
    #[serde(default = "default_call_timeout_ms")]
    pub call_timeout_ms: u64,
    /// Linear memory one plugin instance may grow to.
    #[serde(default = "default_memory_limit_mb")]
    pub memory_limit_mb: u64,
    /// What a request gets when a plugin traps, overruns or is missing.
    #[serde(default)]
    pub on_error: OnError,
    /// Reload plugins when files in `dir` are added, replaced or removed.
    #[serde(default = "yes")]
    pub watch: bool,
    /// Keep compiled plugins on disk so unchanged files are not recompiled.
    #[serde(default = "yes")]
    pub cache: bool,
    /// Where compiled plugins are kept (must be private to the gateway's
    /// user). Default: `$XDG_CACHE_HOME/wasmgate` or `~/.cache/wasmgate`.
    pub cache_dir: Option<PathBuf>,
    /// Consecutive failures after which a plugin is quarantined (its
    /// `on_error` outcome applies without calling it).
    #[serde(default = "default_quarantine_after_failures")]
    pub quarantine_after_failures: u32,
    /// First quarantine length; each further one doubles it.
    #[serde(default = "default_quarantine_initial_ms")]
    pub quarantine_initial_ms: u64,
    /// Longest quarantine.
    #[serde(default = "default_quarantine_max_ms")]
    pub quarantine_max_ms: u64,
}

fn yes() -> bool {
    true
}
fn default_quarantine_after_failures() -> u32 {
    5
}
fn default_quarantine_initial_ms() -> u64 {
    1_000
}
fn default_quarantine_max_ms() -> u64 {
    60_000
}

fn default_plugin_dir() -> PathBuf {
    PathBuf::from("plugins")
}
fn default_call_timeout_ms() -> u64 {
    10
}
fn default_memory_limit_mb() -> u64 {
    32
}

impl Default for PluginsConfig {
    fn default() -> Self {
        PluginsConfig {
            dir: default_plugin_dir(),
            call_timeout_ms: default_call_timeout_ms(),
            memory_limit_mb: default_memory_limit_mb(),
            on_error: OnError::default(),
            watch: true,
            cache: true,
            cache_dir: None,
            quarantine_after_failures: default_quarantine_after_failures(),
            quarantine_initial_ms: default_quarantine_initial_ms(),
            quarantine_max_ms: default_quarantine_max_ms(),
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
}

fn default_max_websockets() -> usize {
    100_000
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
#[serde(deny_unknown_fields)]
pub struct ProbeConfig {
    /// `"http"`: a request whose status (and body) must match; `"websocket"`:
    /// a real upgrade handshake that must get its 101 and accept key.
    #[serde(default)]
    pub kind: ProbeKind,
    /// Request method of an HTTP probe.
    #[serde(default = "default_probe_method")]
    pub method: String,
    #[serde(default = "default_probe_path")]
    pub path: String,
    /// `Host` header of the probe; default: the server's `host:port`.
    pub host: Option<String>,
    /// Time between two probes of one server (fractions allowed).
    #[serde(default = "default_probe_interval_s")]
    pub interval_s: f64,
    /// A probe that takes longer fails.
    #[serde(default = "default_probe_timeout_s")]
    pub timeout_s: f64,
    /// Consecutive failures that turn a healthy server unhealthy.
    #[serde(default = "default_unhealthy_threshold")]
    pub unhealthy_threshold: u32,
    /// Consecutive successes that bring an unhealthy server back.
    #[serde(default = "default_healthy_threshold")]
    pub healthy_threshold: u32,
    /// Statuses that pass: ranges and single codes, e.g. `"200-399"`, `"200,204"`.
    #[serde(default = "default_match_status")]
    pub match_status: String,
    /// If set, an HTTP probe's body (its first 64 KiB) must contain this.
    pub match_body: Option<String>,
    /// Servers start healthy (so start-up is not a 503 storm) until probes
    /// say otherwise; `false` keeps them out until `healthy_threshold` passes.
    #[serde(default = "yes")]
    pub start_healthy: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProbeKind {
    #[default]
    Http,
    Websocket,
}

fn default_probe_method() -> String {
    "GET".into()
}
fn default_probe_path() -> String {
    "/".into()
}
fn default_probe_interval_s() -> f64 {
    5.0
}
fn default_probe_timeout_s() -> f64 {
    2.0
}
fn default_unhealthy_threshold() -> u32 {
    3
}
fn default_healthy_threshold() -> u32 {
    2
}
fn default_match_status() -> String {
    "200-399".into()
}

impl Default for ProbeConfig {
    fn default() -> Self {
        ProbeConfig {
            kind: ProbeKind::default(),
            method: default_probe_method(),
            path: default_probe_path(),
            host: None,
            interval_s: default_probe_interval_s(),
            timeout_s: default_probe_timeout_s(),
            unhealthy_threshold: default_unhealthy_threshold(),
            healthy_threshold: default_healthy_threshold(),
            match_status: default_match_status(),
            match_body: None,
            start_healthy: true,
        }
    }
}

/// Parsed `match_status`: inclusive ranges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusMatch(Vec<(u16, u16)>);

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
#[serde(deny_unknown_fields)]
pub struct WebSocketConfig {
    /// Close a WebSocket after this long with no byte in either direction.
    #[serde(default = "default_idle_timeout_s")]
    pub idle_timeout_s: u64,
    /// Close every WebSocket after this long, busy or not.
    #[serde(default = "default_max_lifetime_s")]
    pub max_lifetime_s: u64,
    /// On shutdown, WebSockets get their Close 1001 spread over this window.
    #[serde(default = "default_drain_s")]
    pub drain_s: u64,
}

fn default_drain_s() -> u64 {
    30
}

fn default_idle_timeout_s() -> u64 {
    300
}
fn default_max_lifetime_s() -> u64 {
    14_400
}

impl Default for WebSocketConfig {
    fn default() -> Self {
        WebSocketConfig {
            idle_timeout_s: default_idle_timeout_s(),
            max_lifetime_s: default_max_lifetime_s(),
            drain_s: default_drain_s(),
        }
    }
}

/// `[log]`: the access log.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
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
pub enum AccessFormat {
    #[default]
    Off,
    Text,
    Json,
}

/// `[limits]`: what one client may hold, and how many the process takes.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// A client must send a whole request head (and finish a TLS handshake)
    /// within this time, or its connection is closed (slowloris defence).
    #[serde(default = "default_header_read_timeout_s")]
    pub header_read_timeout_s: u64,
    /// Largest request head accepted; past it, 431.
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: usize,
    /// Client connections plus WebSockets the process serves at once; past
    /// it new connections are refused. Default: derived from the open-file
    /// limit (raised to its hard limit at start), keeping headroom.
    pub max_connections: Option<usize>,
}

fn default_header_read_timeout_s() -> u64 {
    30
}
fn default_max_header_bytes() -> usize {
    64 * 1024
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            header_read_timeout_s: default_header_read_timeout_s(),
            max_header_bytes: default_max_header_bytes(),
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

impl PluginSettings {
    /// Reads `path`; a missing file means no settings. Returns the bytes
    /// read too, so a caller can tell versions apart by exactly what it parsed.
    pub fn load(path: &Path) -> Result<(PluginSettings, Vec<u8>), ConfigError> {
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Self::default(), Vec::new())),
            Err(source) => return Err(ConfigError::Read { file: path.to_owned(), source }),
        };
        let text = String::from_utf8_lossy(&bytes);
        let settings: PluginSettings = parse(path, &text)?;
        let invalid = |key: &str, reason: &str| ConfigError::Invalid {
            file: path.to_owned(),
            line: line_of_key(&text, key),
            key: key.to_owned(),
            reason: reason.to_owned(),
        };
        if settings.call_timeout_ms.is_some_and(|t| !(1..=MAX_CALL_TIMEOUT_MS).contains(&t)) {
            return Err(invalid("call_timeout_ms", "must be 1-60000"));
        }
        if settings.memory_limit_mb.is_some_and(|m| !(1..=MAX_MEMORY_LIMIT_MB).contains(&m)) {
            return Err(invalid("memory_limit_mb", "must be 1-4096"));
        }
        Ok((settings, bytes))
    }
}

/// Upper bounds that keep durations and sizes far from overflow.
const MAX_CALL_TIMEOUT_MS: u64 = 60_000;
const MAX_MEMORY_LIMIT_MB: u64 = 4096;
const MAX_TIMEOUT_S: u64 = 30 * 86_400;

fn parse<T: serde::de::DeserializeOwned>(file: &Path, text: &str) -> Result<T, ConfigError> {
    toml::from_str(text)
        .map_err(|e| ConfigError::Parse { file: file.to_owned(), message: e.to_string().trim_end().to_owned() })
}

impl Config {
    /// Reads, parses and validates `path`. Relative paths inside the file are
    /// resolved against the file's directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { file: path.to_owned(), source })?;
        let mut config: Config = parse(path, &text)?;
        config.source = path.to_owned();
        let base = path.parent().unwrap_or(Path::new("."));
        if config.plugins.dir.is_relative() {
            config.plugins.dir = base.join(&config.plugins.dir);
        }
        if let Some(cache_dir) = &config.plugins.cache_dir
            && cache_dir.is_relative()
        {
            config.plugins.cache_dir = Some(base.join(cache_dir));
        }
        for listener in &mut config.listener {
            for certificate in &mut listener.certificate {
                certificate.cert = base.join(&certificate.cert);
                certificate.key = base.join(&certificate.key);
            }
        }
        if let Some(admin) = &mut config.admin
            && let Some(token_file) = &admin.token_file
        {
            admin.token_file = Some(base.join(token_file));
        }
        for pool in &mut config.pool {
            if let Some(ca) = &pool.ca {
                pool.ca = Some(base.join(ca));
            }
        }
        if let Some(file) = &config.log.access_file {
            config.log.access_file = Some(base.join(file));
        }
        config.validate().map_err(|e| e.with_line(&text))?;
        Ok(config)
    }

    /// Parses `text` as if read from `source` (used by tests and `load`).
    pub fn from_toml(source: &Path, text: &str) -> Result<Config, ConfigError> {
        let mut config: Config = parse(source, text)?;
        config.source = source.to_owned();
        config.validate().map_err(|e| e.with_line(text))?;
        Ok(config)
    }

    /// Checks everything that can be checked without the plugin files.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid =
            |key: String, reason: String| ConfigError::Invalid { file: self.source.clone(), line: None, key, reason };
        if !(1..=MAX_CALL_TIMEOUT_MS).contains(&self.plugins.call_timeout_ms) {
            return Err(invalid("plugins.call_timeout_ms".into(), "must be 1-60000".into()));
        }
        if !(1..=MAX_MEMORY_LIMIT_MB).contains(&self.plugins.memory_limit_mb) {
            return Err(invalid("plugins.memory_limit_mb".into(), "must be 1-4096".into()));
        }
        if self.plugins.quarantine_max_ms > MAX_TIMEOUT_S * 1000 {
            return Err(invalid("plugins.quarantine_max_ms".into(), "must be at most 30 days".into()));
        }
        if self.plugins.quarantine_after_failures == 0 {
            return Err(invalid("plugins.quarantine_after_failures".into(), "must be at least 1".into()));
        }
        if self.plugins.quarantine_initial_ms > self.plugins.quarantine_max_ms {
            return Err(invalid(
                "plugins.quarantine_initial_ms".into(),
                "must not exceed plugins.quarantine_max_ms".into(),
            ));
        }
        if let Some(admin) = &self.admin
            && !admin.listen.ip().is_loopback()
            && admin.token_file.is_none()
        {
            return Err(invalid("admin.listen".into(), "a non-loopback admin listener needs a token_file".into()));
        }
        if !(1..=3600).contains(&self.limits.header_read_timeout_s) {
            return Err(invalid("limits.header_read_timeout_s".into(), "must be 1-3600".into()));
        }
        if !(8192..=16 << 20).contains(&self.limits.max_header_bytes) {
            return Err(invalid("limits.max_header_bytes".into(), "must be 8192 to 16 MiB".into()));
        }
        if self.limits.max_connections == Some(0) {
            return Err(invalid("limits.max_connections".into(), "must be at least 1".into()));
        }
        if self.websocket.drain_s > MAX_TIMEOUT_S {
            return Err(invalid("websocket.drain_s".into(), "must be at most 30 days".into()));
        }
        for (key, value) in
            [("idle_timeout_s", self.websocket.idle_timeout_s), ("max_lifetime_s", self.websocket.max_lifetime_s)]
        {
            if !(1..=MAX_TIMEOUT_S).contains(&value) {
                return Err(invalid(format!("websocket.{key}"), "must be between 1 second and 30 days".into()));
            }
        }

        let mut pools = HashSet::new();
        for (i, pool) in self.pool.iter().enumerate() {
            let key = |field: &str| format!("pool[{i}].{field}");
            if pool.name.is_empty() {
                return Err(invalid(key("name"), "must not be empty".into()));
            }
            if !pools.insert(pool.name.as_str()) {
                return Err(invalid(key("name"), format!("pool `{}` is defined twice", pool.name)));
            }
            if pool.servers.is_empty() {
                return Err(invalid(key("servers"), format!("pool `{}` has no servers", pool.name)));
            }
            for (j, server) in pool.servers.iter().enumerate() {
                check_server_address(server)
                    .map_err(|reason| invalid(key("servers"), format!("`{server}`: {reason}")))?;
                if pool.servers[..j].contains(server) {
                    return Err(invalid(key("servers"), format!("`{server}` is listed twice")));
                }
            }
            if !(1..=MAX_TIMEOUT_S).contains(&pool.request_timeout_s) {
                return Err(invalid(key("request_timeout_s"), "must be between 1 second and 30 days".into()));
            }
            if pool.protocol == PoolProtocol::Http
                && (pool.ca.is_some() || pool.tls_server_name.is_some() || pool.insecure_skip_verify)
            {
                return Err(invalid(
                    key("protocol"),
                    "ca, tls_server_name and insecure_skip_verify need protocol = \"https\"".into(),
                ));
            }
            if let Some(name) = &pool.tls_server_name
                && rustls::pki_types::ServerName::try_from(name.as_str()).is_err()
            {
                return Err(invalid(key("tls_server_name"), format!("`{name}` is not a DNS name or IP address")));
            }
            let probe = &pool.probe;
            StatusMatch::parse(&probe.match_status).map_err(|reason| invalid(key("probe.match_status"), reason))?;
            if !(probe.interval_s >= 0.05 && probe.interval_s <= 86_400.0) {
                return Err(invalid(key("probe.interval_s"), "must be between 0.05 and 86400".into()));
            }
            if !(probe.timeout_s > 0.0 && probe.timeout_s <= probe.interval_s) {
                return Err(invalid(key("probe.timeout_s"), "must be more than 0 and at most interval_s".into()));
            }
            if probe.unhealthy_threshold == 0 || probe.healthy_threshold == 0 {
                return Err(invalid(key("probe"), "thresholds must be at least 1".into()));
            }
            if !probe.path.starts_with('/') || probe.path.parse::<http::uri::PathAndQuery>().is_err() {
                return Err(invalid(key("probe.path"), format!("`{}` is not an origin-form path", probe.path)));
            }
            if http::Method::from_bytes(probe.method.as_bytes()).is_err() {
                return Err(invalid(key("probe.method"), format!("`{}` is not an HTTP method", probe.method)));
            }
            if let Some(host) = &probe.host
                && http::HeaderValue::from_str(host).is_err()
            {
                return Err(invalid(key("probe.host"), "not a valid Host header value".into()));
            }
        }

        if self.listener.is_empty() {
            return Err(invalid("listener".into(), "at least one [[listener]] is needed".into()));
        }
        let mut names = HashSet::new();
        let mut binds = HashSet::new();
        for (i, listener) in self.listener.iter().enumerate() {
            let key = |field: &str| format!("listener[{i}].{field}");
            if listener.name.is_empty() {
                return Err(invalid(key("name"), "must not be empty".into()));
            }
            if !names.insert(listener.name.as_str()) {
                return Err(invalid(key("name"), format!("listener `{}` is defined twice", listener.name)));
            }
            if listener.bind.port() != 0 && !binds.insert(listener.bind) {
                return Err(invalid(key("bind"), format!("{} is used by two listeners", listener.bind)));
            }
            if let Some(pool) = &listener.default_pool
                && !pools.contains(pool.as_str())
            {
                return Err(invalid(key("default_pool"), format!("no pool is named `{pool}`")));
            }
            if listener.router.is_none() && listener.default_pool.is_none() {
                return Err(invalid(
                    key("router"),
                    format!("listener `{}` needs a `router` or a `default_pool`", listener.name),
                ));
            }
            if listener.max_websockets == 0 {
                return Err(invalid(key("max_websockets"), "must be at least 1".into()));
            }
            match listener.protocol {
                ListenerProtocol::Https if listener.certificate.is_empty() => {
                    return Err(invalid(
                        key("certificate"),
                        "an https listener needs a [[listener.certificate]]".into(),
                    ));
                }
                ListenerProtocol::Https if listener.redirect_to_https => {
                    return Err(invalid(key("redirect_to_https"), "only an http listener redirects".into()));
                }
                ListenerProtocol::Http if !listener.certificate.is_empty() => {
                    return Err(invalid(key("certificate"), "certificates need protocol = \"https\"".into()));
                }
                ListenerProtocol::Http
                    if listener.redirect_to_https
                        && !self.listener.iter().any(|l| l.protocol == ListenerProtocol::Https) =>
                {
                    return Err(invalid(key("redirect_to_https"), "no https listener to redirect to".into()));
                }
                _ => {}
            }
            for (j, certificate) in listener.certificate.iter().enumerate() {
                if certificate.hosts.is_empty() {
                    return Err(invalid(key(&format!("certificate[{j}].hosts")), "list at least one name".into()));
                }
            }
        }
        self.plugin_roles()?;
        Ok(())
    }

    /// The role every named plugin is used in, with the first key naming it;
    /// a plugin used as both a router and a WAF is an error.
    pub fn plugin_roles(&self) -> Result<HashMap<String, (PluginRole, String)>, ConfigError> {
        let mut roles: HashMap<String, (PluginRole, String)> = HashMap::new();
        for (name, key, role) in self.referenced_plugins() {
            match roles.get(&name) {
                Some((first, first_key)) if *first != role => {
                    return Err(ConfigError::Invalid {
                        file: self.source.clone(),
                        line: None,
                        key,
                        reason: format!(
                            "plugin `{name}` is used as a {first} by `{first_key}`; it cannot also be a {role}"
                        ),
                    });
                }
                Some(_) => {}
                None => {
                    roles.insert(name, (role, key));
                }
            }
        }
        Ok(roles)
    }

    /// Names of every plugin some listener refers to, with the key naming it.
    pub fn referenced_plugins(&self) -> Vec<(String, String, PluginRole)> {
        let mut out = Vec::new();
        for (i, listener) in self.listener.iter().enumerate() {
            for (j, waf) in listener.waf.iter().enumerate() {
                out.push((waf.clone(), format!("listener[{i}].waf[{j}]"), PluginRole::Waf));
            }
            if let Some(router) = &listener.router {
                out.push((router.clone(), format!("listener[{i}].router"), PluginRole::Router));
            }
        }
        out
    }
}

/// The role a listener gives a plugin; it must match the plugin's exports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PluginRole {
    Router,
    Waf,
}

impl std::fmt::Display for PluginRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PluginRole::Router => "router",
            PluginRole::Waf => "waf",
        })
    }
}

/// A server is `host:port`: an authority with an explicit port and nothing else.
fn check_server_address(server: &str) -> Result<(), String> {
    let authority: http::uri::Authority = server.parse().map_err(|_| "not a valid host:port".to_string())?;
    if authority.port_u16().is_none() {
        return Err("a port is required (host:port)".into());
    }
    if authority.as_str().contains('@') {
        return Err("user info is not allowed".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(Path::new("test.toml"), text)
    }

    const MINIMAL: &str = r#"
        [[listener]]
        name = "web"
        bind = "127.0.0.1:0"
        default_pool = "app"
        [[pool]]
        name = "app"
        servers = ["127.0.0.1:9001"]
    "#;

    #[test]
    fn minimal_config_gets_defaults() {
        let config = load(MINIMAL).unwrap();
        assert_eq!(config.plugins.call_timeout_ms, 10);
        assert_eq!(config.plugins.memory_limit_mb, 32);
        assert_eq!(config.plugins.on_error, OnError::Deny);
        assert_eq!(config.websocket.idle_timeout_s, 300);
        assert_eq!(config.websocket.max_lifetime_s, 14_400);
        assert_eq!(config.pool[0].request_timeout_s, 30);
        assert_eq!(config.listener[0].max_websockets, 100_000);
    }

    #[test]
    fn unknown_key_is_refused_with_its_line() {
        let err = load(&format!("{MINIMAL}\nidle_timeout = 3\n")).unwrap_err().to_string();
        assert!(err.contains("test.toml"), "{err}");
        assert!(err.contains("line"), "{err}");
        assert!(err.contains("idle_timeout"), "{err}");
    }

    #[test]
    fn unknown_default_pool_names_the_key() {
        let err = load(&MINIMAL.replace("default_pool = \"app\"", "default_pool = \"nope\"")).unwrap_err().to_string();
        assert!(err.contains("listener[0].default_pool"), "{err}");
        assert!(err.contains("`nope`"), "{err}");
    }

    #[test]
    fn server_without_port_is_refused() {
        let err = load(&MINIMAL.replace("127.0.0.1:9001", "backend.local")).unwrap_err().to_string();
        assert!(err.contains("pool[0].servers"), "{err}");
        assert!(err.contains("port"), "{err}");
    }

    #[test]
    fn unknown_balance_is_refused() {
        let err = load(&format!("{MINIMAL}balance = \"random\"\n")).unwrap_err().to_string();
        assert!(err.contains("random"), "{err}");
        assert!(load(&format!("{MINIMAL}balance = \"least-connections\"\n")).is_ok());
    }

    #[test]
    fn a_public_admin_listener_needs_a_token() {
        let err = load(&format!("[admin]\nlisten = \"0.0.0.0:9901\"\n{MINIMAL}")).unwrap_err().to_string();
        assert!(err.contains("admin.listen") && err.contains("token_file"), "{err}");
        assert!(load(&format!("[admin]\nlisten = \"127.0.0.1:9901\"\n{MINIMAL}")).is_ok());
    }

    #[test]
    fn probe_settings_are_checked() {
        let probe = |body: &str| load(&format!("{MINIMAL}[pool.probe]\n{body}\n"));
        let config = probe("path = \"/health\"\ninterval_s = 0.5\ntimeout_s = 0.2").unwrap();
        assert_eq!(config.pool[0].probe.path, "/health");
        assert_eq!(config.pool[0].probe.unhealthy_threshold, 3);
        let err = probe("match_status = \"200-99\"").unwrap_err().to_string();
        assert!(err.contains("pool[0].probe.match_status"), "{err}");
        let err = probe("timeout_s = 10").unwrap_err().to_string();
        assert!(err.contains("pool[0].probe.timeout_s"), "{err}");
        let err = probe("path = \"health\"").unwrap_err().to_string();
        assert!(err.contains("pool[0].probe.path"), "{err}");
    }

    #[test]
    fn status_match_takes_ranges_and_codes() {
        let m = StatusMatch::parse("200-299, 304,418").unwrap();
        assert!(m.matches(200) && m.matches(299) && m.matches(304) && m.matches(418));
        assert!(!m.matches(300) && !m.matches(500));
        assert!(StatusMatch::parse("").is_err());
        assert!(StatusMatch::parse("600").is_err());
    }

    #[test]
    fn listener_needs_router_or_default_pool() {
        let err = load(&MINIMAL.replace("default_pool = \"app\"", "")).unwrap_err().to_string();
        assert!(err.contains("needs a `router` or a `default_pool`"), "{err}");
    }
}
