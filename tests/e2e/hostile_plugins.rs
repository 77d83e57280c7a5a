//! The hostile plugin suite: a router that loops, sleeps, hoards memory, recurses,
//! panics, returns a 100 MB body or one byte over the 1 MiB cap, injects
//! header lines, names a pool that does not exist, answers 101, or tries to
//! reach files, sockets and the environment. Each is contained, for its own
//! reason: that request gets the plugin's `on_error` outcome within its
//! deadline, concurrent requests are unaffected, and the gateway's memory
//! stays bounded.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::common::*;
use http::StatusCode;

/// Resident memory of this process (the gateway runs in it), in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Each hostile path with the reason the gateway must give for refusing it
/// (the plugin's `last_error`), and whether the refusal is its deadline.
const HOSTILE: [(&str, &str, bool); 12] = [
    ("/loop", "ran past its 250 ms deadline", true),
    ("/sleep", "the plugin tried to wait (sleep, poll or blocking I/O)", false),
    ("/grow", "hit its 32 MiB memory cap", false),
    ("/huge-body", "hit its 32 MiB memory cap", false),
    ("/recurse", "call stack exhausted", false),
    ("/panic", "unreachable", false),
    ("/big-body", "response body of 1048577 bytes exceeds 1048576", false),
    ("/crlf", "value of header `x-evil` is not valid", false),
    ("/bad-header-name", "header name \"bad name\" is not valid", false),
    ("/status-101", "status 101 is not 200-599", false),
    ("/unknown-pool", "pool `no-such-pool` does not exist", false),
    ("/bad-rewrite", "rewrite `http://elsewhere/` is not origin-form", false),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_hostile_plugin_is_contained() {
    let app = Backend::start("app").await;
    let plugins = PluginDir::new().add("hostile", "hostile", "");
    let config = routed_by("hostile", &app, "call_timeout_ms = 250\nquarantine_after_failures = 1000");
    let gateway = start_gateway(&config, &plugins).await;
    let addr = web(&gateway);
    assert_eq!(get(addr, "/fine").await.status, StatusCode::OK);
    // Exactly at the body cap is fine.
    let max = get(addr, "/max-body").await;
    assert_eq!((max.status, max.body.len()), (StatusCode::OK, 1 << 20));

    // Well-behaved traffic alongside, all the way through.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let bystander = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let counter = if get(addr, "/fine").await.status == StatusCode::OK { &ok } else { &failed };
                counter.fetch_add(1, Ordering::Relaxed);
            }
        })
    };

    let hostile = gateway.registry().get("hostile").unwrap();
    let deadline = Duration::from_millis(250);
    let rss_before = rss_kib();
    for round in 0..3 {
        for (path, reason, at_deadline) in HOSTILE {
            let started = Instant::now();
            let got = get(addr, path).await;
            let took = started.elapsed();
            assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE, "{path}: {}", got.body);
            assert_eq!(got.header("x-wasmgate-error"), Some("plugin-unavailable"), "{path}");
            assert!(got.header("x-injected").is_none(), "{path}: no header was injected");
            let last_error = hostile.stats().last_error.unwrap_or_default();
            assert!(last_error.contains(reason), "{path}: refused for `{last_error}`, not `{reason}`");
            if at_deadline {
                assert!(took >= deadline, "round {round} {path}: cut off early, after {took:?}");
                assert!(took < deadline + CI_MARGIN, "round {round} {path}: cut off after {took:?}");
            } else {
                assert!(took < CI_MARGIN, "round {round} {path}: took {took:?}");
            }
        }
    }
    let grown_kib = rss_kib().saturating_sub(rss_before);
    eprintln!("gateway RSS grew by {grown_kib} KiB over {} hostile calls", 3 * HOSTILE.len());
    stop.store(true, Ordering::Relaxed);
    bystander.await.unwrap();

    assert_eq!(failed.load(Ordering::Relaxed), 0, "bystander requests were unaffected");
    assert!(ok.load(Ordering::Relaxed) > 10, "bystanders kept being served");
    assert!(
        app.requests().iter().all(|r| !HOSTILE.iter().any(|(path, ..)| r.target == *path)),
        "no hostile request reached the backend"
    );
    assert!(grown_kib < 96 * 1024, "gateway RSS grew by {grown_kib} KiB");
    let stats = hostile.stats();
    assert_eq!(stats.errors, 3 * HOSTILE.len() as u64);
    assert_eq!(stats.timeouts, 3, "/loop runs into the deadline, nothing else (a sleep fails at once)");
    assert_eq!(stats.memory_limit_hits, 6, "/grow and /huge-body run into the memory cap, nothing else");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_cannot_set_the_headers_the_gateway_manages() {
    let app = Backend::start("app").await;
    let plugins = PluginDir::new().add("hostile", "hostile", "");
    let config = routed_by("hostile", &app, "quarantine_after_failures = 1000");
    let gateway = start_gateway(&config, &plugins).await;
    let hostile = gateway.registry().get("hostile").unwrap();
    let reserved = [
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "content-length",
        "upgrade",
        "te",
        "trailer",
        "sec-websocket-accept",
        "x-wasmgate-error",
    ];
    for name in reserved {
        for path in ["/reserved", "/reserved-upstream"] {
            // Any case: header names are case-insensitive.
            let upper = name.to_ascii_uppercase();
            let got = get(web(&gateway), &format!("{path}?name={upper}")).await;
            assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE, "{path} {name}: {}", got.body);
            let last_error = hostile.stats().last_error.unwrap_or_default();
            assert!(last_error.contains(&format!("header `{name}` is managed by the gateway")), "{path}: {last_error}");
        }
    }
    // Any other header is fine, both ways.
    assert_eq!(get(web(&gateway), "/reserved?name=x-mine").await.header("x-mine"), Some("1"));
    assert!(get(web(&gateway), "/reserved-upstream?name=x-mine").await.body.contains("backend=app"));
    assert_eq!(app.requests().last().unwrap().header("x-mine"), Some("1"));
    assert!(app.requests().iter().all(|r| r.target.starts_with("/reserved-upstream?name=x-mine")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routers_see_the_live_servers_and_may_log_at_every_level() {
    let app = Backend::start("app").await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let plugins = PluginDir::new().add("hostile", "hostile", "");
    let config = format!(
        "[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nrouter = \"hostile\"\n\
         [[pool]]\nname = \"app\"\nservers = [\"{}\", \"{closed}\"]\n\
         [pool.probe]\ninterval_s = 0.2\ntimeout_s = 0.2\nunhealthy_threshold = 1\n",
        app.addr
    );
    let gateway = start_gateway(&config, &plugins).await;
    wait_until("the closed server marked down", Duration::from_secs(3), || {
        gateway.pool("app").unwrap().servers.iter().any(|s| s.address == closed && !s.is_healthy())
    })
    .await;
    assert_eq!(get(web(&gateway), "/healthy").await.body, app.addr.to_string(), "healthy-servers(app)");
    let logged = get(web(&gateway), "/log").await;
    assert_eq!((logged.status, logged.body.as_str()), (StatusCode::OK, "logged"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_router_fails_open_only_where_a_default_pool_is() {
    let app = Backend::start("app").await;
    let plugins = PluginDir::new().add("hostile", "hostile", "on_error = \"allow\"\n");
    let listener = "[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nrouter = \"hostile\"\n";
    let pool = format!("[[pool]]\nname = \"app\"\nservers = [\"{}\"]\n", app.addr);
    let without = start_gateway(&format!("{listener}{pool}"), &plugins).await;
    let got = get(web(&without), "/panic").await;
    assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE, "nowhere to fail open to");
    assert_eq!(got.header("x-wasmgate-error"), Some("plugin-unavailable"));
    let with = start_gateway(&format!("{listener}default_pool = \"app\"\n{pool}"), &plugins).await;
    let got = get(web(&with), "/panic").await;
    assert_eq!(got.status, StatusCode::OK, "fails open to the default pool");
    assert!(got.body.starts_with("backend=app method=GET target=/panic "), "{}", got.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_reach_no_file_socket_or_environment() {
    let app = Backend::start("app").await;
    let plugins = PluginDir::new().add("hostile", "hostile", "");
    let config = routed_by("hostile", &app, "");
    let gateway = start_gateway(&config, &plugins).await;
    // A bare listener: any TCP connection at all would show here.
    let bait = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let got = get(web(&gateway), &format!("/escape?connect={}", bait.local_addr().unwrap())).await;
    assert_eq!(got.status, StatusCode::OK);
    let report = got.body;
    assert!(report.contains("file: Err("), "{report}");
    assert!(report.contains("dir: Err("), "{report}");
    assert!(report.contains("env: 0"), "{report}");
    assert!(report.contains("args: 0"), "{report}");
    assert!(report.contains("socket: Err("), "{report}");
    // UDP is refused at once (wasmtime's own synchronous version would have
    // panicked the worker thread).
    assert!(report.contains("udp: Err("), "{report}");
    let accepted = tokio::time::timeout(Duration::from_millis(200), bait.accept()).await;
    assert!(accepted.is_err(), "the plugin reached a socket: {accepted:?}");
    assert!(app.requests().is_empty(), "only the gateway's probes reached the backend, not the plugin");
}

/// The hostile router in a gateway process of its own, whose log the test
/// reads.
async fn hostile_process(app: &Backend, settings: &str) -> (GatewayProcess, PluginDir) {
    let plugins = PluginDir::new().add("hostile", "hostile", settings);
    let config = plugins.path().join("gateway.toml");
    std::fs::write(&config, routed_by("hostile", app, "dir = \".\"")).unwrap();
    (GatewayProcess::start(&config, &plugins.path().join("gateway.log"), 1).await, plugins)
}

/// The first line of the gateway's log that holds every one of `texts`,
/// waited for up to 5 s.
async fn log_line(gateway: &GatewayProcess, texts: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let log = gateway.log_text();
        if let Some(line) = log.lines().find(|l| texts.iter().all(|t| l.contains(t))) {
            return line.to_owned();
        }
        assert!(Instant::now() < deadline, "no log line with {texts:?}:\n{log}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The SDK's panic hook and `log` facade: what a failing plugin says reaches
/// the gateway's own log, under the plugin's name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_plugins_message_reaches_the_gateway_log_with_its_name() {
    let app = Backend::start("app").await;
    let (gateway, _plugins) = hostile_process(&app, "").await;
    assert_eq!(get(gateway.addr("web"), "/panic").await.status, StatusCode::SERVICE_UNAVAILABLE);
    let line = log_line(&gateway, &["panicked at ", "hostile plugin panics"]).await;
    assert!(line.contains("ERROR") && line.contains("plugin=hostile"), "{line}");
}

/// Guest stdout and stderr reach the log under the plugin's name, within a
/// budget of lines a second; the rest is counted, not written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugins_stdout_and_stderr_reach_the_log_within_a_budget() {
    let app = Backend::start("app").await;
    // Time for a thousand writes in a debug build on a busy machine.
    let (gateway, _plugins) = hostile_process(&app, "call_timeout_ms = 2000\n").await;
    let addr = gateway.addr("web");
    assert_eq!(get(addr, "/print").await.status, StatusCode::OK);
    let out = log_line(&gateway, &["hostile plugin prints"]).await;
    let err = log_line(&gateway, &["hostile plugin complains"]).await;
    assert!(out.contains("INFO") && out.contains("plugin=hostile") && out.contains("stream=stdout"), "{out}");
    assert!(err.contains("WARN") && err.contains("plugin=hostile") && err.contains("stream=stderr"), "{err}");

    // A flood: at most a second's budget is written, the rest counted.
    assert_eq!(get(addr, "/print-flood").await.status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(get(addr, "/print").await.status, StatusCode::OK);
    let dropped = log_line(&gateway, &["lines dropped"]).await;
    assert!(dropped.contains("plugin=hostile"), "{dropped}");
    let log = gateway.log_text();
    let written = log.lines().filter(|l| l.contains("flood line")).count();
    assert!((1..=50).contains(&written), "{written} flood lines written");
}

/// The `log` host call shares the budget of what a plugin prints, and a
/// mebibyte line is cut to one line of at most 1 KiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugins_log_calls_are_budgeted_and_cut() {
    let app = Backend::start("app").await;
    let (gateway, _plugins) = hostile_process(&app, "call_timeout_ms = 2000\n").await;
    let addr = gateway.addr("web");
    assert_eq!(get(addr, "/log-flood").await.status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(get(addr, "/log").await.status, StatusCode::OK);
    let dropped = log_line(&gateway, &["lines dropped"]).await;
    assert!(dropped.contains("plugin=hostile"), "{dropped}");
    let log = gateway.log_text();
    let written = log.lines().filter(|l| l.contains("log flood line")).count();
    assert!((1..=50).contains(&written), "{written} log lines written of 1,000");
    // The mebibyte line is one line, cut to 1 KiB of it.
    let long: Vec<&str> = log.lines().filter(|l| l.contains("yyyy")).collect();
    assert_eq!(long.len(), 1, "one line");
    assert!(long[0].len() < 1024 + 200 && long[0].contains("yyy…"), "a {} byte log line", long[0].len());
}
