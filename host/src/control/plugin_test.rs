//! `wasmgate plugin test FILE.wasm --request REQUEST.toml... [--config NAME.toml]`:
//! one plugin asked about described requests, under the gateway's own
//! sandbox, limits and output checks. Prints the decision and the time of
//! the call; fails when the plugin fails, when the gateway would refuse its
//! decision, or when the file's `expect` does not match.
//!
//! A request file (every key optional):
//!
//! ```toml
//! method = "GET"
//! version = "HTTP/1.1"            # HTTP/1.0, HTTP/1.1 or HTTP/2
//! authority = "app.example.test"  # sent as `host`
//! path = "/api/users"
//! query = "expand=true"
//! headers = [["x-user", "42"], ["cookie", "a=1"]]
//! client_ip = "203.0.113.7"
//! listener = "web"
//! websocket = false               # true: a validated handshake
//! tls = { sni = "app.example.test", alpn = "h2" }
//! healthy_servers = { app = ["10.0.0.1:8080"] }
//! expect = "forward api"          # allow | deny STATUS | forward POOL | respond STATUS | no-route
//! ```

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Deserialize;

use crate::config::{PluginKind, PluginsConfig, PoolConfig};
use crate::counting::Counters;
use crate::http::{ConnInfo, TlsDetails};
use crate::plugin::bindings::{RouteDecision, Verdict};
use crate::plugin::host_api::HostServices;
use crate::plugin::{LoadedPlugin, Loader, RequestView, Runtime};
use crate::request::validate;
use crate::upstream::Pools;

/// A described request, as a plugin author writes it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Described {
    #[serde(default = "default_method")]
    method: String,
    #[serde(default = "default_version")]
    version: String,
    #[serde(default = "default_authority")]
    authority: String,
    #[serde(default = "default_path")]
    path: String,
    query: Option<String>,
    #[serde(default)]
    headers: Vec<(String, String)>,
    #[serde(default = "default_client_ip")]
    client_ip: IpAddr,
    #[serde(default = "default_listener")]
    listener: String,
    #[serde(default)]
    websocket: bool,
    tls: Option<DescribedTls>,
    #[serde(default)]
    healthy_servers: BTreeMap<String, Vec<String>>,
    expect: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DescribedTls {
    sni: Option<String>,
    alpn: Option<String>,
}

fn default_method() -> String {
    "GET".into()
}
fn default_version() -> String {
    "HTTP/1.1".into()
}
fn default_authority() -> String {
    "example.test".into()
}
fn default_path() -> String {
    "/".into()
}
fn default_client_ip() -> IpAddr {
    IpAddr::from([192, 0, 2, 1])
}
fn default_listener() -> String {
    "web".into()
}

/// What the plugin decided, in the words of `expect`.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Allow,
    Deny(u16),
    Forward(String),
    Respond(u16),
    NoRoute,
}

impl Outcome {
    fn parse(text: &str) -> anyhow::Result<Outcome> {
        let words: Vec<&str> = text.split_whitespace().collect();
        let status = |word: Option<&&str>| -> anyhow::Result<u16> {
            word.and_then(|w| w.parse().ok())
                .filter(|status| (200..=599).contains(status))
                .with_context(|| format!("`expect = \"{text}\"`: a status from 200 to 599 must follow"))
        };
        Ok(match words.first().copied() {
            Some("allow") if words.len() == 1 => Outcome::Allow,
            Some("no-route") if words.len() == 1 => Outcome::NoRoute,
            Some("deny") if words.len() == 2 => Outcome::Deny(status(words.get(1))?),
            Some("respond") if words.len() == 2 => Outcome::Respond(status(words.get(1))?),
            Some("forward") if words.len() == 2 => Outcome::Forward(words[1].to_owned()),
            _ => bail!(
                "`expect = \"{text}\"`: write `allow`, `deny STATUS`, `forward POOL`, `respond STATUS` or `no-route`"
            ),
        })
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Allow => write!(f, "allow"),
            Outcome::Deny(status) => write!(f, "deny {status}"),
            Outcome::Forward(pool) => write!(f, "forward {pool}"),
            Outcome::Respond(status) => write!(f, "respond {status}"),
            Outcome::NoRoute => write!(f, "no-route"),
        }
    }
}

/// The report of one run, and whether it passed.
pub struct Report {
    pub text: String,
    pub passed: bool,
}

/// Runs `file` (with `settings` as its `NAME.toml`, else the one beside it)
/// on each request described in `requests`, loading it once.
pub async fn run(file: &Path, requests: &[PathBuf], settings: Option<&Path>) -> anyhow::Result<Report> {
    let mut described = Vec::with_capacity(requests.len());
    for request in requests {
        let text = std::fs::read_to_string(request).with_context(|| format!("reading {}", request.display()))?;
        let parsed: Described = toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", request.display()))?;
        let expected =
            parsed.expect.as_deref().map(Outcome::parse).transpose().context(request.display().to_string())?;
        let pools = pools(&parsed.healthy_servers).context(request.display().to_string())?;
        let view = view(&parsed).context(request.display().to_string())?;
        described.push((request, parsed, expected, Arc::new(pools), view));
    }

    // The plugin loads as the gateway loads it: from a directory holding
    // NAME.wasm and NAME.toml, through the compiled-artifact cache.
    let name = file.file_stem().and_then(|s| s.to_str()).context("the plugin file needs a UTF-8 name")?;
    let dir = Scratch::new()?;
    let staged = dir.0.join(format!("{name}.wasm"));
    std::fs::copy(file, &staged).with_context(|| format!("reading {}", file.display()))?;
    let beside = file.with_extension("toml");
    let settings: Option<PathBuf> = settings.map(Path::to_owned).or_else(|| beside.exists().then_some(beside));
    if let Some(settings) = &settings {
        std::fs::copy(settings, staged.with_extension("toml"))
            .with_context(|| format!("reading {}", settings.display()))?;
    }
    let services = Arc::new(HostServices { counters: Counters::default(), pools: Default::default() });
    let defaults = PluginsConfig { dir: dir.0.clone(), ..PluginsConfig::default() };
    let loader = Loader::new(Arc::new(Runtime::new()?), defaults, services.clone(), Default::default());
    let plugin = loader.load(&staged, 1).await.map_err(|e| anyhow::anyhow!("plugin `{name}` is refused: {e:#}"))?;

    let mut out = String::new();
    let _ = writeln!(out, "plugin:   {name} ({}), sha256 {}", plugin.kind, &plugin.identity.sha256[..16]);
    let mut passed = true;
    let mut fresh = true;
    for (request, described, expected, pools, mut view) in described {
        services.pools.store(pools);
        if requests.len() > 1 {
            let _ = writeln!(out, "\n{}", request.display());
        }
        let query = described.query.as_deref().map(|q| format!("?{q}")).unwrap_or_default();
        let _ = writeln!(
            out,
            "request:  {} {}{}{query} from {} on `{}`{}",
            described.method,
            view.authority(),
            view.path(),
            described.client_ip,
            described.listener,
            if described.websocket { " (WebSocket handshake)" } else { "" }
        );
        // One call per file: what a plugin counts (`count`) carries over
        // from one file to the next, in order, as it would across requests.
        let started = Instant::now();
        let called = call(&plugin, &mut view, &services.pools.load());
        let took = started.elapsed();
        let (outcome, decision) = match called {
            Ok(decided) => decided,
            Err(error) => {
                // A failed call fails this file; the others still run.
                let _ = writeln!(out, "error:    {error:#}");
                passed = false;
                continue;
            }
        };
        let _ = writeln!(out, "decision: {decision}");
        let start = if std::mem::take(&mut fresh) { " (a new instance, init included)" } else { "" };
        let _ = writeln!(out, "call:     {}{start}", micros(took));
        match expected {
            None => {}
            Some(expected) if expected == outcome => {
                let _ = writeln!(out, "expect:   {expected}: ok");
            }
            Some(expected) => {
                let _ = writeln!(out, "expect:   {expected}: FAILED, the plugin decided `{outcome}`");
                passed = false;
            }
        }
    }
    Ok(Report { text: out, passed })
}

fn micros(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

/// Pools named in `healthy_servers`, every server healthy.
fn pools(healthy: &BTreeMap<String, Vec<String>>) -> anyhow::Result<Pools> {
    let configs = healthy
        .iter()
        .map(|(name, servers)| {
            let mut table = toml::Table::new();
            table.insert("name".into(), toml::Value::String(name.clone()));
            table.insert(
                "servers".into(),
                toml::Value::Array(servers.iter().cloned().map(toml::Value::String).collect()),
            );
            toml::Value::Table(table)
                .try_into::<PoolConfig>()
                .map_err(|e| anyhow::anyhow!("healthy_servers.{name}: {e}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Pools::new(&configs).map_err(anyhow::Error::msg)
}

/// The request head the described request is.
fn view(described: &Described) -> anyhow::Result<RequestView> {
    let version = match described.version.as_str() {
        "HTTP/1.0" => http::Version::HTTP_10,
        "HTTP/1.1" => http::Version::HTTP_11,
        "HTTP/2" => http::Version::HTTP_2,
        other => bail!("version `{other}`: write HTTP/1.0, HTTP/1.1 or HTTP/2"),
    };
    let target = match &described.query {
        Some(query) => format!("{}?{query}", described.path),
        None => described.path.clone(),
    };
    let mut builder = http::Request::builder().method(described.method.as_str()).uri(target).version(version);
    if !described.headers.iter().any(|(name, _)| name.eq_ignore_ascii_case("host")) {
        builder = builder.header(http::header::HOST, described.authority.as_str());
    }
    for (name, value) in &described.headers {
        builder = builder.header(name.as_str(), value.as_str());
    }
    let mut request = builder
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .context("the described request is not valid HTTP")?;
    // The gateway's own first phase: the same normalized path and authority,
    // or the same refusal.
    crate::request::target::settle(&mut request).map_err(|e| anyhow::anyhow!("the gateway would refuse it: {e}"))?;
    let parts = request.into_parts().0;
    let tls = described.tls.as_ref().map(|tls| TlsDetails { sni: tls.sni.clone(), alpn: tls.alpn.clone() });
    let client = Arc::new(ConnInfo::new(SocketAddr::new(described.client_ip, 50000), tls));
    Ok(RequestView::new(parts, client, described.listener.as_str().into(), described.websocket))
}

/// One call, its decision in `expect`'s words and in full, after the
/// gateway's own checks on what a plugin returns.
fn call(plugin: &LoadedPlugin, view: &mut RequestView, pools: &Pools) -> anyhow::Result<(Outcome, String)> {
    let name = plugin.name.as_str();
    match plugin.kind {
        PluginKind::Waf => match plugin.inspect(view)? {
            Verdict::Allow => Ok((Outcome::Allow, "allow".into())),
            Verdict::Deny(response) => {
                let status = response.status;
                let body = String::from_utf8_lossy(&response.body).trim_end().to_owned();
                validate::response(name, response)?;
                Ok((Outcome::Deny(status), format!("deny {status} {body:?}")))
            }
        },
        PluginKind::Router => match plugin.route(view)? {
            RouteDecision::NoRoute => Ok((Outcome::NoRoute, "no-route (the listener's default_pool, or 404)".into())),
            RouteDecision::Respond(response) => {
                let status = response.status;
                let location = response.headers.iter().find(|h| h.name.eq_ignore_ascii_case("location"));
                let detail = location.map(|l| format!(" location {}", l.value)).unwrap_or_default();
                validate::response(name, response)?;
                Ok((Outcome::Respond(status), format!("respond {status}{detail}")))
            }
            RouteDecision::Forward(upstream) => {
                let mut text = format!("forward to pool `{}`", upstream.pool);
                if let Some(rewrite) = &upstream.rewrite_path {
                    let _ = write!(text, ", rewrite `{rewrite}`");
                }
                for header in &upstream.set_headers {
                    let _ = write!(text, ", set {}: {}", header.name, header.value);
                }
                if let Some(key) = &upstream.affinity_key {
                    let _ = write!(text, ", affinity key `{key}`");
                }
                let pool = upstream.pool.clone();
                if pools.get(&pool).is_some() {
                    validate::upstream(name, upstream, pools)?;
                } else {
                    let _ = write!(text, " (not in healthy_servers: not checked against a config)");
                }
                Ok((Outcome::Forward(pool), text))
            }
        },
    }
}

/// A private scratch directory, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> anyhow::Result<Scratch> {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        let dir = std::env::temp_dir().join(format!("wasmgate-plugin-test-{}-{nanos}", std::process::id()));
        // A new directory, never one that is already there.
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
