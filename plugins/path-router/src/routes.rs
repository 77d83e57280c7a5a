//! The route table: parsing the `routes` config string and matching requests.

/// What a matching route does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Pool(String),
    Redirect { status: u16, location: String },
    Respond(u16),
}

/// Where a hash-balanced pool's key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Affinity {
    Header(String),
    Query(String),
    ClientIp,
}

/// One line of the route table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub host: String,
    pub prefix: String,
    pub action: Action,
    pub rewrite: Option<String>,
    pub set_headers: Vec<(String, String)>,
    pub affinity: Option<Affinity>,
}

/// Parses the route table; errors name the line.
pub fn parse_routes(text: &str) -> Result<Vec<Route>, String> {
    let mut routes = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        routes.push(parse_line(line).map_err(|e| format!("line {}: {e}: `{line}`", i + 1))?);
    }
    if routes.is_empty() {
        return Err("no routes".into());
    }
    Ok(routes)
}

fn parse_line(line: &str) -> Result<Route, String> {
    let mut words = line.split_whitespace();
    let host = words.next().ok_or("missing host")?.to_ascii_lowercase();
    let prefix = words.next().ok_or("missing path prefix")?.to_owned();
    if !prefix.starts_with('/') {
        return Err("the path prefix must start with /".into());
    }
    let mut route =
        Route { host, prefix, action: Action::Respond(404), rewrite: None, set_headers: Vec::new(), affinity: None };
    let mut action = None;
    for word in words {
        let (key, value) = word.split_once('=').ok_or_else(|| format!("`{word}` is not key=value"))?;
        match key {
            "pool" | "redirect" | "respond" if action.is_some() => return Err("more than one action".into()),
            "pool" => action = Some(Action::Pool(value.to_owned())),
            "respond" => action = Some(Action::Respond(status(value)?)),
            "redirect" => {
                let (status, location) = match value.split_once(':') {
                    Some((code, location)) if code.len() == 3 && code.bytes().all(|b| b.is_ascii_digit()) => {
                        (status(code)?, location)
                    }
                    _ => (308, value),
                };
                if !matches!(status, 301 | 302 | 303 | 307 | 308) {
                    return Err(format!("{status} is not a redirect status"));
                }
                action = Some(Action::Redirect { status, location: location.to_owned() });
            }
            "rewrite" if value.starts_with('/') => route.rewrite = Some(value.to_owned()),
            "rewrite" => return Err("rewrite must start with /".into()),
            "set-header" => {
                let (name, value) = value.split_once(':').ok_or("set-header needs NAME:VALUE")?;
                route.set_headers.push((name.to_owned(), value.to_owned()));
            }
            "affinity" => {
                route.affinity = Some(match value.split_once(':') {
                    Some(("header", name)) => Affinity::Header(name.to_owned()),
                    Some(("query", name)) => Affinity::Query(name.to_owned()),
                    None if value == "client-ip" => Affinity::ClientIp,
                    _ => return Err("affinity is header:NAME, query:NAME or client-ip".into()),
                })
            }
            other => return Err(format!("unknown option `{other}`")),
        }
    }
    route.action = action.ok_or("no action (pool=, redirect= or respond=)")?;
    Ok(route)
}

fn status(text: &str) -> Result<u16, String> {
    text.parse::<u16>()
        .ok()
        .filter(|s| (200..=599).contains(s))
        .ok_or_else(|| format!("`{text}` is not a status 200-599"))
}

fn host_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix('*') {
        Some("") => true,
        Some(suffix) => host.ends_with(suffix) && host.len() > suffix.len(),
        None => pattern == host,
    }
}

/// The route for `host` and `path`: the longest matching prefix, first wins ties.
pub fn pick<'a>(routes: &'a [Route], host: &str, path: &str) -> Option<&'a Route> {
    routes.iter().filter(|r| host_matches(&r.host, host) && path.starts_with(r.prefix.as_str())).fold(
        None,
        |best: Option<&Route>, r| match best {
            Some(b) if b.prefix.len() >= r.prefix.len() => Some(b),
            _ => Some(r),
        },
    )
}

/// Replaces `prefix` at the start of `path` with `new_prefix`, without
/// doubling or losing the slash between them.
pub fn rewrite(path: &str, prefix: &str, new_prefix: &str) -> String {
    let rest = &path[prefix.len().min(path.len())..];
    let joined = match (new_prefix.ends_with('/'), rest.starts_with('/')) {
        (true, true) => format!("{new_prefix}{}", &rest[1..]),
        (false, false) if !rest.is_empty() => format!("{new_prefix}/{rest}"),
        _ => format!("{new_prefix}{rest}"),
    };
    if joined.is_empty() { "/".into() } else { joined }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "
        # comment
        *               /api/    pool=api rewrite=/v1/ set-header=x-api:yes
        *               /        pool=app
        admin.test      /        pool=admin
        *.example.test  /old     redirect=301:/new
        *               /gone    respond=410
    ";

    #[test]
    fn longest_prefix_wins_and_hosts_filter() {
        let routes = parse_routes(TABLE).unwrap();
        assert_eq!(pick(&routes, "x", "/api/users").unwrap().action, Action::Pool("api".into()));
        assert_eq!(pick(&routes, "x", "/apix").unwrap().action, Action::Pool("app".into()));
        assert_eq!(pick(&routes, "admin.test", "/").unwrap().action, Action::Pool("app".into()));
        assert_eq!(
            pick(&routes, "a.example.test", "/old/page").unwrap().action,
            Action::Redirect { status: 301, location: "/new".into() }
        );
        assert_eq!(pick(&routes, "example.test", "/old").unwrap().action, Action::Pool("app".into()));
        assert_eq!(pick(&routes, "x", "/gone").unwrap().action, Action::Respond(410));
    }

    #[test]
    fn rewrite_keeps_one_slash() {
        assert_eq!(rewrite("/api/users", "/api/", "/v1/"), "/v1/users");
        assert_eq!(rewrite("/api/users", "/api", "/"), "/users");
        assert_eq!(rewrite("/api", "/api", "/v1"), "/v1");
        assert_eq!(rewrite("/api/x", "/api", "/v1"), "/v1/x");
        assert_eq!(rewrite("/api", "/api", ""), "/");
    }

    #[test]
    fn bad_lines_are_named() {
        let err = parse_routes("* /a pool=x\n* b pool=y").unwrap_err();
        assert!(err.starts_with("line 2:"), "{err}");
        assert!(parse_routes("* /a").unwrap_err().contains("no action"));
        assert!(parse_routes("* /a pool=x respond=404").unwrap_err().contains("more than one action"));
        assert!(parse_routes("* /a redirect=200:/x").unwrap_err().contains("not a redirect"));
    }
}
