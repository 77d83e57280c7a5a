//! The admin listener: liveness, readiness that turns false while draining,
//! and a status document that matches the live state.

use std::time::Duration;

use crate::common::*;
use http::StatusCode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_the_live_state_and_readyz_turns_false_while_draining() {
    let app = Backend::start("app").await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let config = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\nallowed_hosts = [\"gw.test\"]\n\
         [[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\ndefault_pool = \"app\"\nwaf = [\"handshake-guard\"]\n\
         [[pool]]\nname = \"app\"\nservers = [\"{}\", \"{closed}\"]\n\
         [pool.probe]\ninterval_s = 0.2\ntimeout_s = 0.1\nunhealthy_threshold = 1\n",
        app.addr
    );
    let plugins = PluginDir::new().add("handshake-guard", "handshake-guard", "");
    let gateway = start_gateway(&config, &plugins).await;
    let admin = gateway.admin_addr().expect("admin listener");
    let closed_text = closed.to_string();
    wait_until("the closed server marked down", Duration::from_secs(3), || {
        gateway.pool("app").unwrap().servers.iter().any(|s| s.address == closed_text && !s.is_healthy())
    })
    .await;
    let (_a, _) = ws_connect(web(&gateway), "/ws", &[]).await;
    let (_b, _) = ws_connect(web(&gateway), "/ws", &[]).await;

    assert_eq!(get(admin, "/healthz").await.status, StatusCode::OK);
    assert_eq!(get(admin, "/readyz").await.status, StatusCode::OK);
    let status: serde_json::Value = serde_json::from_str(&get(admin, "/status").await.body).expect("JSON");
    assert_eq!(status["listeners"][0]["name"], "web");
    assert_eq!(status["listeners"][0]["addr"], web(&gateway).to_string());
    assert_eq!(status["websockets"], 2);
    let servers = status["pools"][0]["servers"].as_array().unwrap();
    let server = |addr: &str| servers.iter().find(|s| s["address"] == addr).unwrap().clone();
    assert_eq!(server(&app.addr.to_string())["healthy"], true);
    assert_eq!(server(&app.addr.to_string())["active"], 2, "the two WebSockets");
    assert_eq!(server(&closed_text)["healthy"], false);
    assert!(server(&closed_text)["last_reason"].as_str().unwrap().contains("connect"), "{status}");
    let plugin = &status["plugins"][0];
    assert_eq!(plugin["name"], "handshake-guard");
    assert_eq!(plugin["kind"], "waf");
    assert_eq!(plugin["sha256"].as_str().unwrap().len(), 64);
    assert_eq!(plugin["version"], 1);
    assert_eq!(plugin["calls"], 2, "one call per handshake");

    gateway.drain().await;
    let ready = get(admin, "/readyz").await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE, "not ready while draining");
    assert_eq!(get(admin, "/healthz").await.status, StatusCode::OK, "still alive");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_file_guards_every_admin_endpoint() {
    let app = Backend::start("app").await;
    let plugins = PluginDir::new();
    let token = plugins.path().join("admin-token");
    std::fs::write(&token, "s3cret+/token=\n").unwrap();
    let config = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\nallowed_hosts = [\"gw.test\"]\ntoken_file = \"{}\"\n\
         [[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\ndefault_pool = \"app\"\n\
         [[pool]]\nname = \"app\"\nservers = [\"{}\"]\n",
        token.display(),
        app.addr
    );
    let gateway = start_gateway(&config, &plugins).await;
    let admin = gateway.admin_addr().unwrap();
    assert_eq!(get(admin, "/status").await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(get(admin, "/metrics").await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(request(admin, "POST", "/reload", &[], vec![]).await.status, StatusCode::UNAUTHORIZED);
    // An orchestrator's probes need none: they learn only "ok" and "ready".
    assert_eq!(get(admin, "/healthz").await.body, "ok\n");
    assert_eq!(get(admin, "/readyz").await.body, "ready\n");
    let wrong = request(admin, "GET", "/status", &[("authorization", "Bearer nope")], vec![]).await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    let right = request(admin, "GET", "/status", &[("authorization", "Bearer s3cret+/token=")], vec![]).await;
    assert_eq!(right.status, StatusCode::OK);
    // A browser passes it percent-encoded in the query (the dashboard does).
    assert_eq!(get(admin, "/status?access_token=s3cret%2B%2Ftoken%3D").await.status, StatusCode::OK);
    assert_eq!(get(admin, "/status?access_token=s3cret").await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(get(admin, "/status?access_token=").await.status, StatusCode::UNAUTHORIZED);

    // An empty token file would guard nothing: the gateway refuses to start.
    std::fs::write(&token, "\n").unwrap();
    let mut config = wasmgate::Config::from_toml(std::path::Path::new("test.toml"), &config).unwrap();
    config.plugins.dir = plugins.path().to_owned();
    let error = wasmgate::Gateway::start(config).await.err().expect("refused").to_string();
    assert!(error.contains("is empty"), "{error}");
}

/// A metric's value from a parsed scrape: the sum of the samples named
/// `name` whose labels include all of `labels` (there must be one); for a
/// histogram, its count of observations.
fn sample(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let found = sample_if_any(scrape, name, labels);
    found.unwrap_or_else(|| panic!("no sample {name} with {labels:?}"))
}

/// [`sample`], or `None` when no sample matches (a labelled family before
/// its first value).
fn sample_if_any(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    use prometheus_parse::Value;
    let matching =
        scrape.samples.iter().filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)));
    let (mut sum, mut histogram_count, mut found) = (0.0, 0.0f64, false);
    for s in matching {
        found = true;
        match &s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => sum += v,
            // One sample per bucket line, each holding the cumulative counts.
            Value::Histogram(buckets) => {
                histogram_count = buckets.iter().map(|b| b.count).fold(histogram_count, f64::max)
            }
            Value::Summary(_) => panic!("no summaries here"),
        }
    }
    found.then_some(sum + histogram_count)
}

/// Checks that every metric `deploy/grafana/wasmgate.json` names (those
/// `which` picks) is in `scrape`: a renamed metric breaks the dashboard.
fn dashboard_reads_only(scrape: &prometheus_parse::Scrape, which: impl Fn(&str) -> bool) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/wasmgate.json");
    let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut named = std::collections::BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let words = expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'));
            named
                .extend(words.filter(|w| w.starts_with("wasmgate_")).map(|w| w.trim_end_matches("_bucket").to_owned()));
        }
    }
    assert!(named.len() >= 15, "{named:?}");
    let missing: Vec<_> =
        named.iter().filter(|n| which(n) && !scrape.samples.iter().any(|s| &s.metric == *n)).collect();
    assert!(missing.is_empty(), "the dashboard reads metrics /metrics does not have: {missing:?}");
}

pub(crate) async fn scrape(admin: std::net::SocketAddr) -> prometheus_parse::Scrape {
    let got = get(admin, "/metrics").await;
    assert_eq!(got.status, StatusCode::OK);
    assert!(got.header("content-type").unwrap().starts_with("application/openmetrics-text"));
    assert!(got.body.ends_with("# EOF\n"), "OpenMetrics ends with # EOF");
    prometheus_parse::Scrape::parse(got.body.lines().map(|l| Ok(l.to_owned()))).expect("a valid exposition")
}

/// A counter's value on the admin listener's `/metrics` (0 before its
/// first sample).
pub(crate) async fn counter(admin: std::net::SocketAddr, name: &str) -> f64 {
    sample_if_any(&scrape(admin).await, name, &[]).unwrap_or(0.0)
}

/// Waits until `n` WebSockets ended (their bytes are counted then).
pub(crate) async fn websockets_closed(admin: std::net::SocketAddr, n: f64) {
    let limit = std::time::Instant::now() + Duration::from_secs(5);
    while counter(admin, "wasmgate_websocket_closes_total").await < n {
        assert!(std::time::Instant::now() < limit, "{n} WebSockets counted closed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_as_the_traffic_says() {
    let app = Backend::start("app").await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let config = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\nallowed_hosts = [\"gw.test\"]\n\
         [[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nwaf = [\"guard\"]\nrouter = \"router\"\n\
         [[pool]]\nname = \"app\"\nservers = [\"{}\"]\n\
         [[pool]]\nname = \"dead\"\nservers = [\"{closed}\"]\n[pool.probe]\ninterval_s = 60\n",
        app.addr
    );
    let plugins = PluginDir::new().add("guard", "handshake-guard", "[config]\ndeny_paths = \"/blocked*\"\n").add(
        "router",
        "path-router",
        "[config]\nroutes = \"\"\"\n* /dead pool=dead\n* / pool=app\n\"\"\"\n",
    );
    let gateway = start_gateway(&config, &plugins).await;
    let (admin, web) = (gateway.admin_addr().unwrap(), web(&gateway));

    for _ in 0..5 {
        assert_eq!(get(web, "/hello").await.status, StatusCode::OK);
    }
    for _ in 0..2 {
        assert_eq!(get(web, "/blocked").await.status, StatusCode::FORBIDDEN);
    }
    assert_eq!(get(web, "/dead").await.status, StatusCode::BAD_GATEWAY);
    let mut sockets = Vec::new();
    for _ in 0..3 {
        sockets.push(ws_connect(web, "/ws", &[]).await.0);
    }
    assert_eq!(ws_refused(web, "/blocked-ws", &[]).await.status, StatusCode::FORBIDDEN);
    // One WebSocket carries a message and is closed by its client.
    let mut first = sockets.remove(0);
    futures_util::SinkExt::send(&mut first, tokio_tungstenite::tungstenite::Message::text("twelve bytes"))
        .await
        .unwrap();
    next_message(&mut first).await;
    first.close(None).await.unwrap();
    while futures_util::StreamExt::next(&mut first).await.is_some() {}
    drop(first);
    wait_until("the closed WebSocket counted", Duration::from_secs(3), || {
        gateway.pool("app").unwrap().servers[0].active() == 2
    })
    .await;

    let m = scrape(admin).await;
    let web_app = [("listener", "web"), ("pool", "app")];
    assert_eq!(sample(&m, "wasmgate_requests_total", &[web_app[0], web_app[1], ("class", "2xx")]), 5.0);
    assert_eq!(
        sample(&m, "wasmgate_requests_total", &[("pool", ""), ("class", "4xx")]),
        3.0,
        "2 GET + 1 handshake denied"
    );
    assert_eq!(sample(&m, "wasmgate_requests_total", &[("pool", "dead"), ("class", "5xx")]), 1.0);
    assert_eq!(sample(&m, "wasmgate_request_duration_seconds", &[("listener", "web")]), 12.0, "every request timed");
    assert_eq!(sample(&m, "wasmgate_upstream_connect_errors_total", &[("pool", "dead"), ("kind", "connect")]), 1.0);
    assert_eq!(sample(&m, "wasmgate_websocket_handshakes_total", &[("result", "upgraded")]), 3.0);
    assert_eq!(sample(&m, "wasmgate_websocket_handshakes_total", &[("result", "waf_denied")]), 1.0);
    assert_eq!(sample(&m, "wasmgate_websockets_active", &web_app), 2.0);
    assert_eq!(sample(&m, "wasmgate_websocket_closes_total", &[("reason", "client")]), 1.0);
    let up = sample(&m, "wasmgate_websocket_relayed_bytes_total", &[("direction", "client_to_server")]);
    let down = sample(&m, "wasmgate_websocket_relayed_bytes_total", &[("direction", "server_to_client")]);
    // A masked 12-byte message and the Close went up; greeting, echo and Close came down.
    assert!((18.0..100.0).contains(&up) && (30.0..100.0).contains(&down), "up {up}, down {down}");
    assert_eq!(sample(&m, "wasmgate_plugin_calls_total", &[("plugin", "guard")]), 12.0);
    assert_eq!(sample(&m, "wasmgate_plugin_calls_total", &[("plugin", "router")]), 9.0, "not for WAF denials");
    assert_eq!(sample(&m, "wasmgate_plugin_call_duration_seconds", &[("plugin", "guard")]), 12.0);
    assert_eq!(sample(&m, "wasmgate_plugin_errors_total", &[("plugin", "guard")]), 0.0);
    let healthy =
        |pool: &str, addr: String| sample(&m, "wasmgate_server_healthy", &[("pool", pool), ("server", &addr)]);
    assert_eq!(healthy("app", app.addr.to_string()), 1.0);
    assert_eq!(healthy("dead", closed.to_string()), 0.0, "a refused connection marks it down");
    assert_eq!(sample(&m, "wasmgate_config_version", &[]), 1.0);
    assert_eq!(sample(&m, "wasmgate_reloads_total", &[]), 0.0, "starting is not a reload");
    // Every metric the Grafana dashboard reads is there (the cluster's, in
    // the test of a gateway with [cluster]).
    dashboard_reads_only(&m, |name| !name.starts_with("wasmgate_cluster_"));

    // /status agrees with the metrics.
    let status: serde_json::Value = serde_json::from_str(&get(admin, "/status").await.body).unwrap();
    assert_eq!(status["websockets"], 2);
    assert_eq!(status["listeners"][0]["websockets"], 2);
    assert_eq!(status["config_version"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_has_a_line_per_request_and_per_closed_websocket() {
    let app = Backend::start("app").await;
    let plugins = PluginDir::new().add("guard", "handshake-guard", "[config]\ndeny_paths = \"/blocked*\"\n");
    let lines = |file: &std::path::Path| -> Vec<String> {
        std::fs::read_to_string(file).unwrap_or_default().lines().map(str::to_owned).collect()
    };
    for format in ["json", "text"] {
        let file = plugins.path().join(format!("access-{format}.log"));
        let config = format!(
            "[log]\naccess = \"{format}\"\naccess_file = \"{}\"\n\
             [[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\ndefault_pool = \"app\"\nwaf = [\"guard\"]\n\
             [[pool]]\nname = \"app\"\nservers = [\"{}\"]\n",
            file.display(),
            app.addr
        );
        let gateway = start_gateway(&config, &plugins).await;
        let web = web(&gateway);
        assert_eq!(get(web, "/hello?x=1").await.status, StatusCode::OK);
        assert_eq!(get(web, "/blocked").await.status, StatusCode::FORBIDDEN);
        let (mut ws, _) = ws_connect(web, "/ws/chat", &[]).await;
        futures_util::SinkExt::send(&mut ws, tokio_tungstenite::tungstenite::Message::text("hi")).await.unwrap();
        next_message(&mut ws).await;
        ws.close(None).await.unwrap();
        let closed = tokio::time::timeout(Duration::from_secs(5), async {
            while futures_util::StreamExt::next(&mut ws).await.is_some() {}
        });
        closed.await.expect("the WebSocket closed");
        drop(ws);
        wait_until("four access lines", Duration::from_secs(5), || lines(&file).len() >= 4).await;
        // An answer the gateway makes itself carries its code.
        let answer = raw_exchange(
            web,
            "GET /ws HTTP/1.1\r\nHost: gw.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n",
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 426"), "{answer}");
        wait_until("five access lines", Duration::from_secs(5), || lines(&file).len() >= 5).await;
        let lines = lines(&file);
        assert_eq!(lines.len(), 5, "{lines:#?}");
        if format == "text" {
            assert!(lines[0].contains(" web 127.0.0.1:") && lines[0].contains("\"GET /hello\" 200"), "{}", lines[0]);
            assert!(lines[1].contains("\"GET /blocked\" 403") && lines[1].contains("error=waf-deny"), "{}", lines[1]);
            assert!(lines[3].contains("\"WEBSOCKET /ws/chat\"") && lines[3].contains("close=client"), "{}", lines[3]);
            assert!(
                lines[4].contains(" 426 ") && lines[4].contains("error=unsupported-websocket-version"),
                "{}",
                lines[4]
            );
            continue;
        }
        let json: Vec<serde_json::Value> =
            lines.iter().map(|l| serde_json::from_str(l).expect("one JSON object a line")).collect();
        let hello = &json[0];
        assert_eq!(
            (hello["kind"].as_str(), hello["method"].as_str(), hello["path"].as_str()),
            (Some("request"), Some("GET"), Some("/hello"))
        );
        assert_eq!((hello["status"].as_u64(), hello["pool"].as_str()), (Some(200), Some("app")));
        assert_eq!(hello["server"], app.addr.to_string());
        assert_eq!(hello["listener"], "web");
        assert!(hello["bytes"].as_u64().unwrap() > 10 && hello["duration_ms"].as_f64().unwrap() > 0.0);
        assert!(hello["time"].as_str().unwrap().starts_with("20"), "RFC 3339: {hello}");
        assert_eq!(
            (json[1]["status"].as_u64(), json[1]["error"].as_str(), json[1]["pool"].as_str()),
            (Some(403), Some("waf-deny"), Some(""))
        );
        assert_eq!((json[2]["status"].as_u64(), json[2]["path"].as_str()), (Some(101), Some("/ws/chat")));
        let closed = &json[3];
        assert_eq!((closed["kind"].as_str(), closed["close"].as_str()), (Some("websocket"), Some("client")));
        assert_eq!((closed["path"].as_str(), closed["pool"].as_str()), (Some("/ws/chat"), Some("app")));
        assert!(closed["client_to_server"].as_u64().unwrap() > 0 && closed["server_to_client"].as_u64().unwrap() > 0);
        assert_eq!(
            (json[4]["status"].as_u64(), json[4]["error"].as_str()),
            (Some(426), Some("unsupported-websocket-version"))
        );
    }
}

fn admin_only(extra: &str) -> String {
    format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n{extra}\n\
         [[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\ndefault_pool = \"app\"\n\
         [[pool]]\nname = \"app\"\nservers = [\"127.0.0.1:9\"]\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_on_a_rebinding_name_cannot_read_the_admin() {
    let gateway = start_gateway(&admin_only("allowed_hosts = [\"gw.internal\"]"), &PluginDir::new()).await;
    let admin = gateway.admin_addr().unwrap();
    let asked = |host: &str| format!("GET /status HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    // What a browser sends for http://attacker.example:PORT/ once the name
    // resolves to 127.0.0.1.
    let rebound = raw_exchange(admin, &asked(&format!("attacker.example:{}", admin.port()))).await;
    assert!(rebound.starts_with("HTTP/1.1 421"), "{rebound}");
    assert!(!rebound.contains("\"listeners\""), "no status leaked: {rebound}");
    for host in [admin.to_string(), format!("localhost:{}", admin.port()), "gw.internal".to_owned()] {
        let answer = raw_exchange(admin, &asked(&host)).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{host}: {answer}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_event_streams_and_connections_are_capped() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gateway = start_gateway(&admin_only(""), &PluginDir::new()).await;
    let admin = gateway.admin_addr().unwrap();
    // Sixteen open dashboards...
    let mut streams = Vec::new();
    for _ in 0..16 {
        let mut stream = tokio::net::TcpStream::connect(admin).await.unwrap();
        stream.write_all(b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 256];
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await.unwrap().unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&buf[..n]));
        streams.push(stream);
    }
    // ...and the seventeenth is turned away.
    let refused = raw_exchange(admin, "GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").await;
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    drop(streams);

    // 64 connections at once; the 65th is closed without an answer.
    let mut held = Vec::new();
    for _ in 0..64 {
        held.push(tokio::net::TcpStream::connect(admin).await.unwrap());
    }
    let mut extra = tokio::net::TcpStream::connect(admin).await.unwrap();
    let _ = extra.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").await;
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(5), extra.read(&mut buf)).await.expect("closed in time");
    assert!(matches!(read, Ok(0) | Err(_)), "the 65th connection was served");
    drop(held);
}

/// A cluster's log pipeline and logrotate: the gateway's own lines as JSON
/// objects; SIGUSR1 reopens the access log by name; SIGUSR2 kills nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_and_sigusr1_reopens_the_access_log_for_logrotate() {
    let app = Backend::start("app").await;
    let dir = tempfile::tempdir().unwrap();
    let (config, access) = (dir.path().join("gateway.toml"), dir.path().join("access.log"));
    std::fs::write(
        &config,
        format!(
            "[log]\nformat = \"json\"\naccess = \"text\"\naccess_file = \"{}\"\n\
             [[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\ndefault_pool = \"app\"\n\
             [[pool]]\nname = \"app\"\nservers = [\"{}\"]\n",
            access.display(),
            app.addr
        ),
    )
    .unwrap();
    let mut gateway = GatewayProcess::start(&config, &dir.path().join("gateway.log"), 1).await;
    let log = gateway.log_text();
    let mut web = None;
    for line in log.lines() {
        let object: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        for key in ["timestamp", "level", "target", "fields"] {
            assert!(object.get(key).is_some(), "no {key}: {line}");
        }
        if object["fields"]["listener"] == "web" && object["fields"]["message"].as_str().unwrap().contains("listening")
        {
            web = object["fields"]["addr"].as_str().map(|a| a.parse::<std::net::SocketAddr>().unwrap());
        }
    }
    let web = web.unwrap_or_else(|| panic!("no listening line for web:\n{log}"));
    let read = |path: &std::path::Path| std::fs::read_to_string(path).unwrap_or_default();

    assert_eq!(get(web, "/before").await.status, StatusCode::OK);
    wait_until("the first access line", Duration::from_secs(5), || read(&access).contains("/before")).await;
    // logrotate renames the file, then signals.
    let rotated = dir.path().join("access.log.1");
    std::fs::rename(&access, &rotated).unwrap();
    gateway.signal("USR1");
    wait_until("the reopen logged", Duration::from_secs(5), || gateway.log_text().contains("reopening the access log"))
        .await;
    assert_eq!(get(web, "/after").await.status, StatusCode::OK);
    wait_until("a new access file", Duration::from_secs(5), || read(&access).contains("/after")).await;
    assert!(!read(&access).contains("/before"), "{}", read(&access));
    assert!(!read(&rotated).contains("/after"), "{}", read(&rotated));

    gateway.signal("USR2");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(gateway.child.try_wait().unwrap().is_none(), "SIGUSR2 killed the gateway");
    assert_eq!(get(web, "/still").await.status, StatusCode::OK);
}

/// logrotate's SIGUSR1 or an operator's SIGHUP while the gateway is still
/// compiling its plugins does not kill it (their default action would).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_during_start_up_do_not_kill_the_gateway() {
    let app = Backend::start("app").await;
    let plugins = PluginDir::new().add("router", "path-router", "[config]\nroutes = \"* / pool=app\"\n");
    let config = plugins.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[plugins]\ndir = \".\"\n[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nrouter = \"router\"\n\
             [[pool]]\nname = \"app\"\nservers = [\"{}\"]\n",
            app.addr
        ),
    )
    .unwrap();
    // A new cache directory (under the config's): the start compiles.
    let gateway = GatewayProcess::spawn(&config, &plugins.path().join("gateway.log"));
    wait_until("the compile started", Duration::from_secs(20), || gateway.log_text().contains("compiling plugin"))
        .await;
    for signal in ["USR1", "HUP", "USR2"] {
        gateway.signal(signal);
    }
    let gateway = gateway.listening(1).await;
    assert_eq!(get(gateway.addr("web"), "/").await.status, StatusCode::OK);
}

/// What the binary is and what the process uses, on `/metrics` for a
/// fleet's dashboards: `wasmgate_build_info` and the process's CPU, memory
/// and descriptors (the same numbers `/proc` has for the process).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_say_which_build_runs_and_what_the_process_uses() {
    let app = Backend::start("app").await;
    // Shared counting through a Redis that is not there: its metrics say so.
    let nothing = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let config = format!(
        "[cluster]\nredis = \"redis://{nothing}\"\n\
         [admin]\nlisten = \"127.0.0.1:0\"\nallowed_hosts = [\"gw.test\"]\n\
         [[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\ndefault_pool = \"app\"\n\
         [[pool]]\nname = \"app\"\nservers = [\"{}\"]\n",
        app.addr
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("gateway.toml"), config).unwrap();
    let gateway = GatewayProcess::start(&dir.path().join("gateway.toml"), &dir.path().join("gateway.log"), 2).await;
    let scrape = scrape(gateway.addr("admin")).await;
    let build = scrape.samples.iter().find(|s| s.metric == "wasmgate_build_info").expect("wasmgate_build_info");
    let version = std::process::Command::new(env!("CARGO_BIN_EXE_wasmgate")).arg("--version").output().unwrap();
    let version = String::from_utf8(version.stdout).unwrap();
    for label in ["version", "commit", "wasmtime", "contract"] {
        let value = build.labels.get(label).unwrap_or_else(|| panic!("no {label} label"));
        assert!(!value.is_empty() && version.contains(value), "{label}={value} is not in `{version}`");
    }
    assert_eq!(build.labels.get("contract"), Some("0.3.0"));
    // The process's own numbers, as /proc says them.
    let pid = gateway.child.id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss_kib: f64 =
        status.lines().find_map(|l| l.strip_prefix("VmRSS:")).unwrap().trim().trim_end_matches(" kB").parse().unwrap();
    let rss = sample(&scrape, "wasmgate_process_resident_memory_bytes", &[]);
    assert!((rss / 1024.0 - rss_kib).abs() < rss_kib * 0.5, "RSS {rss} bytes, /proc says {rss_kib} KiB");
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count() as f64;
    let open = sample(&scrape, "wasmgate_process_open_fds", &[]);
    assert!(open >= 5.0 && (open - fds).abs() <= 4.0, "{open} open descriptors, /proc has {fds}");
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<f64> =
        stat[stat.rfind(')').unwrap() + 2..].split_whitespace().map(|f| f.parse().unwrap_or(0.0)).collect();
    // utime and stime, in the kernel's 100 ticks a second.
    let cpu_then = (fields[11] + fields[12]) / 100.0;
    let cpu = sample(&scrape, "wasmgate_process_cpu_seconds_total", &[]);
    assert!(cpu <= cpu_then + 0.01 && cpu >= cpu_then - 0.5, "{cpu} s of CPU, /proc said {cpu_then} s");
    assert!(sample(&scrape, "wasmgate_process_max_fds", &[]) >= open);
    assert_eq!(sample(&scrape, "wasmgate_cluster_redis_up", &[]), 0.0);
    dashboard_reads_only(&scrape, |name| {
        name.starts_with("wasmgate_cluster_") || name.starts_with("wasmgate_process_")
    });
}
