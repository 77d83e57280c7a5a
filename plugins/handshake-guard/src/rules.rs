//! The guard's rules, parsed from config strings, and the check of one request.

use wasmgate_sdk::{Request, count};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    WebSocket,
    All,
}

impl Scope {
    fn parse(key: &str, value: Option<String>, default: Scope) -> Result<Scope, String> {
        match value.as_deref().map(str::trim) {
            None => Ok(default),
            Some("websocket") => Ok(Scope::WebSocket),
            Some("all") => Ok(Scope::All),
            Some(other) => Err(format!("{key}: `{other}` is not `websocket` or `all`")),
        }
    }

    fn covers(self, websocket: bool) -> bool {
        self == Scope::All || websocket
    }
}

/// The parsed configuration.
#[derive(Debug)]
pub struct Rules {
    allowed_origins: Option<Vec<String>>,
    allow_missing_origin: bool,
    required_headers: Vec<String>,
    token: Option<(String, Vec<String>)>,
    auth_scope: Scope,
    deny_paths: Vec<String>,
    rate_limit: Option<(u64, u32)>,
    rate_limit_scope: Scope,
}

/// What the guard decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Forbidden(&'static str),
    TooManyRequests { retry_after_s: u32 },
}

fn items(value: &str) -> Vec<String> {
    value.split([',', ' ', '\n', '\t']).map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect()
}

impl Rules {
    /// Reads the rules through `config` (the host's config lookup).
    pub fn from_config(config: impl Fn(&str) -> Option<String>) -> Result<Rules, String> {
        let allow_missing_origin = match config("allow_missing_origin").as_deref().map(str::trim) {
            None | Some("true") => true,
            Some("false") => false,
            Some(other) => return Err(format!("allow_missing_origin: `{other}` is not true or false")),
        };
        let token = match (config("token_param"), config("tokens")) {
            (None, None) => None,
            (Some(param), Some(tokens)) if !items(&tokens).is_empty() => {
                Some((param.trim().to_owned(), items(&tokens)))
            }
            _ => return Err("token_param and tokens must be set together".into()),
        };
        let rate_limit = match config("rate_limit") {
            None => None,
            Some(text) => {
                Some(parse_rate(text.trim()).ok_or(format!("rate_limit: `{text}` is not N/Ws (e.g. 20/10s)"))?)
            }
        };
        Ok(Rules {
            allowed_origins: config("allowed_origins").map(|v| items(&v.to_ascii_lowercase())),
            allow_missing_origin,
            required_headers: config("required_headers").map(|v| items(&v)).unwrap_or_default(),
            token,
            auth_scope: Scope::parse("auth_scope", config("auth_scope"), Scope::WebSocket)?,
            deny_paths: config("deny_paths").map(|v| items(&v)).unwrap_or_default(),
            rate_limit,
            rate_limit_scope: Scope::parse("rate_limit_scope", config("rate_limit_scope"), Scope::All)?,
        })
    }

    /// Checks one request, reading only the fields the rules need; the rate
    /// limit counts through the host's sliding-window `count`.
    pub fn check(&self, req: &Request) -> Decision {
        if !self.deny_paths.is_empty() {
            let path = req.path();
            if self.deny_paths.iter().any(|pattern| glob(pattern, &path)) {
                return Decision::Forbidden("path denied");
            }
        }
        let websocket = req.websocket();
        if let Some(ws) = &websocket
            && let Some(allowed) = &self.allowed_origins
        {
            match &ws.origin {
                None if !self.allow_missing_origin => return Decision::Forbidden("origin required"),
                None => {}
                Some(origin) => {
                    let origin = origin.to_ascii_lowercase();
                    if !allowed.iter().any(|pattern| origin_matches(pattern, &origin)) {
                        return Decision::Forbidden("origin not allowed");
                    }
                }
            }
        }
        if self.auth_scope.covers(websocket.is_some()) {
            if self.required_headers.iter().any(|name| req.header(name).is_none()) {
                return Decision::Forbidden("required header missing");
            }
            if let Some((param, tokens)) = &self.token
                && !req.query_param(param).is_some_and(|t| tokens.contains(&t))
            {
                return Decision::Forbidden("token missing or wrong");
            }
        }
        if let Some((limit, window_ms)) = self.rate_limit
            && self.rate_limit_scope.covers(websocket.is_some())
            && count(&format!("ip:{}", req.client_ip()), window_ms) > limit
        {
            return Decision::TooManyRequests { retry_after_s: window_ms.div_ceil(1000) };
        }
        Decision::Allow
    }
}

/// `N/Ws` → (N, W in ms).
fn parse_rate(text: &str) -> Option<(u64, u32)> {
    let (n, window) = text.split_once('/')?;
    let seconds: u32 = window.strip_suffix('s')?.parse().ok()?;
    let n: u64 = n.trim().parse().ok()?;
    (seconds > 0 && seconds <= 86_400).then_some((n, seconds * 1000))
}

/// `*` in `pattern` matches any run of characters.
fn glob(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = text.strip_prefix(first) else { return false };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    rest.ends_with(last)
}

/// An origin pattern is `*`, an exact origin, or `scheme://*.suffix[:port]`.
fn origin_matches(pattern: &str, origin: &str) -> bool {
    if pattern == "*" || pattern == origin {
        return true;
    }
    match (pattern.split_once("://*."), origin.split_once("://")) {
        (Some((scheme, suffix)), Some((origin_scheme, host))) => {
            scheme == origin_scheme && host.ends_with(&format!(".{suffix}"))
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasmgate_sdk::testing::{self, MockRequest};

    fn head(path: &str, origin: Option<&str>, websocket: bool) -> MockRequest {
        let req =
            MockRequest::get(&format!("{path}?room=1&token=s3cret")).header("x-api-key", "k").client_ip("127.0.0.1");
        if websocket { req.websocket(origin) } else { req }
    }

    fn rules(pairs: &[(&str, &str)]) -> Rules {
        Rules::from_config(|key| pairs.iter().find(|(k, _)| *k == key).map(|(_, v)| v.to_string())).unwrap()
    }

    #[test]
    fn origins_are_checked_on_handshakes_only() {
        let r = rules(&[("allowed_origins", "https://app.test, https://*.example.test")]);
        assert_eq!(r.check(&head("/ws", Some("https://app.test"), true).request()), Decision::Allow);
        assert_eq!(r.check(&head("/ws", Some("https://a.example.test"), true).request()), Decision::Allow);
        assert_eq!(
            r.check(&head("/ws", Some("https://evil.test"), true).request()),
            Decision::Forbidden("origin not allowed")
        );
        assert_eq!(r.check(&head("/ws", Some("https://evil.test"), false).request()), Decision::Allow);
        assert_eq!(r.check(&head("/ws", None, true).request()), Decision::Allow);
        let strict = rules(&[("allowed_origins", "https://app.test"), ("allow_missing_origin", "false")]);
        assert_eq!(strict.check(&head("/ws", None, true).request()), Decision::Forbidden("origin required"));
    }

    #[test]
    fn paths_tokens_and_headers() {
        let r = rules(&[("deny_paths", "/admin*, *.php"), ("token_param", "token"), ("tokens", "s3cret")]);
        assert_eq!(r.check(&head("/admin/x", None, false).request()), Decision::Forbidden("path denied"));
        assert_eq!(r.check(&head("/x/index.php", None, false).request()), Decision::Forbidden("path denied"));
        assert_eq!(r.check(&head("/ws", None, true).request()), Decision::Allow);
        let wrong = rules(&[("token_param", "token"), ("tokens", "other")]);
        assert_eq!(wrong.check(&head("/ws", None, true).request()), Decision::Forbidden("token missing or wrong"));
        assert_eq!(wrong.check(&head("/ws", None, false).request()), Decision::Allow);
        let need = rules(&[("required_headers", "x-api-key x-other"), ("auth_scope", "all")]);
        assert_eq!(need.check(&head("/", None, false).request()), Decision::Forbidden("required header missing"));
    }

    #[test]
    fn rate_limit_answers_429_past_the_limit() {
        testing::reset();
        let r = rules(&[("rate_limit", "2/10s")]);
        assert_eq!(r.check(&head("/", None, false).request()), Decision::Allow);
        assert_eq!(r.check(&head("/", None, false).request()), Decision::Allow);
        assert_eq!(r.check(&head("/", None, false).request()), Decision::TooManyRequests { retry_after_s: 10 });
        assert_eq!(testing::counted("ip:127.0.0.1"), 3, "one count per request, by client IP");
    }

    #[test]
    fn bad_config_is_explained() {
        let err = Rules::from_config(|k| (k == "rate_limit").then(|| "lots".to_string())).unwrap_err();
        assert!(err.contains("rate_limit"), "{err}");
        let err = Rules::from_config(|k| (k == "tokens").then(|| "a".to_string())).unwrap_err();
        assert!(err.contains("together"), "{err}");
    }
}
