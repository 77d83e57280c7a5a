//! Checks on a parsed config beyond what its types say: ranges, references
//! between listeners, pools and plugins, and addresses. Each failure names
//! the key; [`super::Config::load`] adds the file and line.

use std::collections::{HashMap, HashSet};

use super::ConfigError;
use super::schema::*;

/// Upper bounds that keep durations and sizes far from overflow.
pub(super) const MAX_CALL_TIMEOUT_MS: u64 = 60_000;
pub(super) const MAX_MEMORY_LIMIT_MB: u64 = 4096;
pub(super) const MAX_TIMEOUT_S: u64 = 30 * 86_400;

impl Config {
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
        if !(64..=1 << 20).contains(&self.plugins.cache_max_mb) {
            return Err(invalid("plugins.cache_max_mb".into(), "must be 64 MiB to 1 TiB".into()));
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
        if let Some(Err((key, why))) = self.cluster.as_ref().map(ClusterConfig::validate) {
            return Err(invalid(key.into(), why.into()));
        }
        if let Some(otlp) = &self.otlp {
            let uri = otlp.endpoint.parse::<http::Uri>().ok();
            if uri.as_ref().is_none_or(|u| u.scheme_str() != Some("http") || u.host().is_none()) {
                return Err(invalid(
                    "otlp.endpoint".into(),
                    "must be an http:// URL (e.g. http://127.0.0.1:4318/v1/traces)".into(),
                ));
            }
            if otlp.service_name.is_empty() || otlp.service_name.len() > 128 {
                return Err(invalid("otlp.service_name".into(), "must be 1-128 characters".into()));
            }
        }
        if !(1..=3600).contains(&self.limits.header_read_timeout_s) {
            return Err(invalid("limits.header_read_timeout_s".into(), "must be 1-3600".into()));
        }
        if !(1..=10_000).contains(&self.limits.max_concurrent_streams) {
            return Err(invalid("limits.max_concurrent_streams".into(), "must be 1-10000".into()));
        }
        if !(1..=86400).contains(&self.limits.client_idle_timeout_s) {
            return Err(invalid("limits.client_idle_timeout_s".into(), "must be 1-86400".into()));
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
            if pool.max_connections == Some(0) {
                return Err(invalid(key("max_connections"), "must be at least 1".into()));
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
                ListenerProtocol::Http if listener.require_sni_match => {
                    return Err(invalid(key("require_sni_match"), "only an https listener has an SNI".into()));
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
    pub fn plugin_roles(&self) -> Result<HashMap<String, (PluginKind, String)>, ConfigError> {
        let mut roles: HashMap<String, (PluginKind, String)> = HashMap::new();
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
    pub fn referenced_plugins(&self) -> Vec<(String, String, PluginKind)> {
        let mut out = Vec::new();
        for (i, listener) in self.listener.iter().enumerate() {
            for (j, waf) in listener.waf.iter().enumerate() {
                out.push((waf.clone(), format!("listener[{i}].waf[{j}]"), PluginKind::Waf));
            }
            if let Some(router) = &listener.router {
                out.push((router.clone(), format!("listener[{i}].router"), PluginKind::Router));
            }
        }
        out
    }
}

impl PluginSettings {
    /// Checks the limit overrides; returns the offending key and why.
    pub(super) fn validate(&self) -> Result<(), (&'static str, &'static str)> {
        if self.call_timeout_ms.is_some_and(|t| !(1..=MAX_CALL_TIMEOUT_MS).contains(&t)) {
            return Err(("call_timeout_ms", "must be 1-60000"));
        }
        if self.memory_limit_mb.is_some_and(|m| !(1..=MAX_MEMORY_LIMIT_MB).contains(&m)) {
            return Err(("memory_limit_mb", "must be 1-4096"));
        }
        Ok(())
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

impl ClusterConfig {
    /// Checks the section; returns the offending key and why.
    fn validate(&self) -> Result<(), (&'static str, &'static str)> {
        let url = self.redis.trim();
        if !["redis://", "redis+unix://", "unix://"].iter().any(|scheme| url.starts_with(scheme)) {
            return Err((
                "cluster.redis",
                "must be a redis://, redis+unix:// or unix:// URL (no TLS: keep Redis on a private network)",
            ));
        }
        let name_ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
        if self.name.is_empty() || self.name.len() > 64 || !self.name.chars().all(name_ok) {
            return Err(("cluster.name", "must be 1-64 letters, digits, '-', '_' or '.'"));
        }
        if !(10..=60_000).contains(&self.sync_interval_ms) {
            return Err(("cluster.sync_interval_ms", "must be 10-60000"));
        }
        if !(1..=1000).contains(&self.timeout_ms) {
            return Err(("cluster.timeout_ms", "must be 1-1000"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

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
        // Parsed with the file: the error names the line and the key.
        let err = probe("match_status = \"200-99\"").unwrap_err().to_string();
        assert!(err.contains("line 10") && err.contains("match_status `200-99`: `99` is not a status"), "{err}");
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
