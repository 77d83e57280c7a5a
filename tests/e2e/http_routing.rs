//! Plain HTTP through the gateway: routing by the `path-router` plugin,
//! rewrites and headers, forwarding headers, bodies, and the request head
//! plugins see.

use crate::common::*;
use http::StatusCode;

const ROUTES: &str = r#"
[config]
routes = """
*   /api/       pool=api  rewrite=/v1/  set-header=x-routed-by:path-router
*   /old        redirect=308:/new
*   /private    respond=404
*   /           pool=app
"""
"#;

fn config(app: &Backend, api: &Backend) -> String {
    format!(
        r#"
        [[listener]]
        name = "web"
        bind = "127.0.0.1:0"
        router = "path-router"

        [[pool]]
        name = "app"
        servers = ["{}"]

        [[pool]]
        name = "api"
        servers = ["{}"]
        request_timeout_s = 1
        "#,
        app.addr, api.addr
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_and_post_reach_the_pool_chosen_by_path_router() {
    let (app, api) = (Backend::start("app").await, Backend::start("api").await);
    let plugins = PluginDir::new().add("path-router", "path-router", ROUTES);
    let gateway = start_gateway(&config(&app, &api), &plugins).await;
    let addr = web(&gateway);

    let home = get(addr, "/index.html").await;
    assert_eq!(home.status, StatusCode::OK);
    assert!(home.body.starts_with("backend=app "), "{}", home.body);

    let users = request(addr, "GET", "/api/users?limit=2", &[("x-forwarded-for", "203.0.113.9")], vec![]).await;
    assert_eq!(users.status, StatusCode::OK);
    assert!(users.body.contains("backend=api"), "{}", users.body);
    let seen = api.requests().pop().expect("api saw the request");
    assert_eq!(seen.target, "/v1/users?limit=2", "path rewritten, query kept");
    assert_eq!(seen.header("x-routed-by"), Some("path-router"));
    assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"), "a client's own is replaced");
    assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
    assert_eq!(seen.header("x-forwarded-host"), Some(format!("gw.test:{}", addr.port()).as_str()));
    assert_eq!(seen.header("host"), Some(format!("gw.test:{}", addr.port()).as_str()), "Host is preserved");
    assert!(app.requests().iter().all(|r| !r.target.contains("users")), "app never saw the api request");

    let body: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
    let checksum: u64 = body.iter().map(|&b| u64::from(b)).sum();
    let posted = request(addr, "POST", "/api/upload", &[], body).await;
    assert_eq!(posted.status, StatusCode::OK);
    assert!(posted.body.contains("method=POST target=/v1/upload body_len=1048576"), "{}", posted.body);
    assert!(posted.body.contains(&format!("checksum={checksum}")), "{}", posted.body);
    let upload = api.requests().into_iter().find(|r| r.target == "/v1/upload").expect("api saw the upload");
    assert_eq!(upload.body_len, 1 << 20, "the backend received the whole body, once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_can_answer_itself() {
    let (app, api) = (Backend::start("app").await, Backend::start("api").await);
    let plugins = PluginDir::new().add("path-router", "path-router", ROUTES);
    let gateway = start_gateway(&config(&app, &api), &plugins).await;
    let addr = web(&gateway);

    let old = get(addr, "/old/page").await;
    assert_eq!(old.status, StatusCode::PERMANENT_REDIRECT);
    assert_eq!(old.header("location"), Some("/new"));
    assert_eq!(old.header("x-wasmgate-error"), None, "a plugin's own answer is not a gateway error");

    let private = get(addr, "/private").await;
    assert_eq!(private.status, StatusCode::NOT_FOUND);
    assert!(app.requests().is_empty() && api.requests().is_empty(), "no backend saw them");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_route_without_default_pool_is_404() {
    let app = Backend::start("app").await;
    let plugins = PluginDir::new().add("path-router", "path-router", "[config]\nroutes = \"* /app/ pool=app\"\n");
    let config = routed_by("path-router", &app, "");
    let gateway = start_gateway(&config, &plugins).await;
    let missing = get(web(&gateway), "/elsewhere").await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert_eq!(missing.header("x-wasmgate-error"), Some("no-route"));
    assert!(get(web(&gateway), "/app/x").await.body.contains("backend=app"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_are_not_forwarded() {
    let app = Backend::start("app").await;
    let config = format!(
        "[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\ndefault_pool = \"app\"\n\
         [[pool]]\nname = \"app\"\nservers = [\"{}\"]\n",
        app.addr
    );
    let gateway = start_gateway(&config, &PluginDir::new()).await;
    let headers = [
        ("connection", "keep-alive, x-hop-secret"),
        ("x-hop-secret", "1"),
        ("keep-alive", "timeout=5"),
        ("x-kept", "yes"),
    ];
    let got = request(web(&gateway), "GET", "/", &headers, vec![]).await;
    assert_eq!(got.status, StatusCode::OK);
    let seen = app.requests().pop().unwrap();
    assert_eq!(seen.header("x-kept"), Some("yes"));
    assert_eq!(seen.header("x-hop-secret"), None);
    assert_eq!(seen.header("keep-alive"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_backend_gets_504_after_request_timeout() {
    let (app, api) = (Backend::start("app").await, Backend::start("api").await);
    let plugins = PluginDir::new().add("path-router", "path-router", ROUTES);
    let gateway = start_gateway(&config(&app, &api), &plugins).await;
    let started = std::time::Instant::now();
    let slow = get(web(&gateway), "/api/slow").await;
    let took = started.elapsed();
    assert_eq!(slow.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(slow.header("x-wasmgate-error"), Some("backend-timeout"));
    // The backend needs 3 s; the pool waits its request_timeout_s = 1, no less.
    let timeout = std::time::Duration::from_secs(1);
    assert!(took >= timeout && took < timeout + CI_MARGIN, "cut at request_timeout_s = 1, after {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewrite_with_its_own_query_replaces_the_clients() {
    let app = Backend::start("app").await;
    let plugins = PluginDir::new().add("hostile", "hostile", "");
    let config = routed_by("hostile", &app, "");
    let gateway = start_gateway(&config, &plugins).await;
    let got = get(web(&gateway), "/rewrite-query?from=client").await;
    assert!(got.body.contains("target=/new?from=plugin "), "{}", got.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_see_the_whole_request_head() {
    let app = Backend::start("app").await;
    let plugins = PluginDir::new().add("head-echo", "head-echo", "");
    let config = routed_by("head-echo", &app, "");
    let gateway = start_gateway(&config, &plugins).await;
    let addr = web(&gateway);

    let got = request(addr, "DELETE", "/items/7?force=yes&x=%20", &[("x-custom", "Value 1")], vec![]).await;
    let expect = [
        "method: DELETE".to_string(),
        "scheme: http".into(),
        "version: HTTP/1.1".into(),
        "tls: none".into(),
        format!("authority: gw.test:{}", addr.port()),
        "path: /items/7".into(),
        "query: Some(\"force=yes&x=%20\")".into(),
        "client-ip: 127.0.0.1".into(),
        "listener: web".into(),
        "websocket: none".into(),
        "header x-custom: Value 1".into(),
    ];
    for line in expect {
        assert!(got.body.lines().any(|l| l == line), "missing `{line}` in:\n{}", got.body);
    }

    // One header by name: every line of it, joined as a backend reads them.
    let got =
        request(addr, "GET", "/h?header=X-Tag", &[("x-tag", "a"), ("x-tag", "b"), ("x-other", "c")], vec![]).await;
    assert!(got.body.lines().any(|l| l == "header(X-Tag): Some(\"a, b\")"), "{}", got.body);
    let got = request(addr, "GET", "/h?header=cookie", &[("cookie", "s=1"), ("cookie", "t=2")], vec![]).await;
    assert!(got.body.lines().any(|l| l == "header(cookie): Some(\"s=1; t=2\")"), "{}", got.body);
    let got = request(addr, "GET", "/h?header=x-absent", &[], vec![]).await;
    assert!(got.body.lines().any(|l| l == "header(x-absent): None"), "{}", got.body);

    // HTTP/1.0 is shown as such.
    let old = raw_exchange(addr, "GET /old HTTP/1.0\r\nHost: gw.test\r\n\r\n").await;
    assert!(old.contains("\nversion: HTTP/1.0\n"), "{old}");

    // A handshake: the router answers it itself, so the client gets 200 and
    // the body shows the websocket fields.
    let raw = "GET /chat HTTP/1.1\r\nHost: gw.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: chat, superchat\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\
         Origin: https://app.example.test\r\n\r\n";
    let answer = raw_exchange(addr, raw).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.contains(
            "websocket: version=13 subprotocols=[\"chat\", \"superchat\"] origin=Some(\"https://app.example.test\") extensions=[\"permessage-deflate\"]"
        ),
        "{answer}"
    );
    assert!(app.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_router_routes_as_the_readme_says() {
    let (app, api, canary) = (Backend::start("app").await, Backend::start("api").await, Backend::start("canary").await);
    let plugins = PluginDir::new().add("hello-router", "hello-router", "");
    let config = format!(
        "[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nrouter = \"hello-router\"\ndefault_pool = \"app\"\n\
         [[pool]]\nname = \"app\"\nservers = [\"{}\"]\n[[pool]]\nname = \"api\"\nservers = [\"{}\"]\n\
         [[pool]]\nname = \"canary\"\nservers = [\"{}\"]\n",
        app.addr, api.addr, canary.addr
    );
    let gateway = start_gateway(&config, &plugins).await;
    let addr = web(&gateway);
    assert!(request(addr, "GET", "/x", &[("x-canary", "1")], vec![]).await.body.contains("backend=canary"));
    let via_api = get(addr, "/api/items").await;
    assert!(via_api.body.contains("backend=api method=GET target=/items "), "{}", via_api.body);
    assert_eq!(api.requests()[0].header("x-via"), Some("hello"));
    assert!(get(addr, "/other").await.body.contains("backend=app"), "no route falls back to default_pool");
    let refused = ws_refused(addr, "/ws", &[]).await;
    assert_eq!(refused.status, StatusCode::NOT_FOUND);
    assert_eq!(refused.body, "no chat here");
}

/// One request followed across the fleet: its `X-Request-Id` (kept only
/// from a trusted proxy) and W3C `traceparent` (continued under the
/// gateway's own span, or started) reach the backend, the request ID comes
/// back to the client, and the access log has both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_id_and_trace_context_reach_the_backend_the_client_and_the_log() {
    let app = Backend::start("app").await;
    let plugins = PluginDir::new();
    let log = plugins.path().join("access.log");
    let config = format!(
        "[log]\naccess = \"json\"\naccess_file = \"{}\"\n\
         [[listener]]\nname = \"edge\"\nbind = \"127.0.0.1:0\"\ndefault_pool = \"app\"\n\
         [[listener]]\nname = \"behind-lb\"\nbind = \"127.0.0.1:0\"\ndefault_pool = \"app\"\ntrusted_proxies = [\"127.0.0.1/32\"]\n\
         [[pool]]\nname = \"app\"\nservers = [\"{}\"]\n",
        log.display(),
        app.addr
    );
    let gateway = start_gateway(&config, &plugins).await;
    let (edge, behind) = (gateway.listener_addr("edge").unwrap(), gateway.listener_addr("behind-lb").unwrap());
    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));

    // From a client: its request ID is replaced, its trace continued.
    let got = request(edge, "GET", "/a", &[("x-request-id", "forged"), ("traceparent", parent)], vec![]).await;
    let seen = app.requests().pop().unwrap();
    let id = seen.header("x-request-id").unwrap().to_owned();
    assert!(hex(&id, 32), "a new request ID: {id}");
    assert_eq!(got.header("x-request-id"), Some(id.as_str()), "the client gets the ID the backend got");
    let sent = seen.header("traceparent").unwrap();
    assert!(sent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-") && sent.ends_with("-01"), "{sent}");
    assert!(hex(&sent[36..52], 16) && &sent[36..52] != "00f067aa0ba902b7", "the gateway's span: {sent}");

    // From a trusted proxy: its request ID is kept. No traceparent: one starts.
    let got = request(behind, "GET", "/b", &[("x-request-id", "lb-7f3a-0001")], vec![]).await;
    let seen = app.requests().pop().unwrap();
    assert_eq!(seen.header("x-request-id"), Some("lb-7f3a-0001"));
    assert_eq!(got.header("x-request-id"), Some("lb-7f3a-0001"));
    let started = seen.header("traceparent").unwrap();
    assert!(started.starts_with("00-") && hex(&started[3..35], 32) && started.ends_with("-00"), "{started}");

    // An answer the gateway makes itself carries one too, and so does a 101.
    let refused = request(edge, "GET", "/a%2fb", &[], vec![]).await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    assert!(hex(refused.header("x-request-id").unwrap(), 32));
    let (_ws, upgraded) = ws_connect(edge, "/ws", &[]).await;
    let ws_id = upgraded.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(app.requests().pop().unwrap().header("x-request-id"), Some(ws_id.as_str()));

    // The access log has each line's request ID and trace ID.
    let lines = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_until("three access lines", std::time::Duration::from_secs(5), || lines().lines().count() >= 3).await;
    let entries: Vec<serde_json::Value> = lines().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(entries[0]["request_id"], id.as_str());
    assert_eq!(entries[0]["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(entries[1]["request_id"], "lb-7f3a-0001");
    assert_eq!(entries[1]["trace_id"], &started[3..35]);
}

/// An OTLP/HTTP collector for the test: it decodes every export request
/// with the protocol's own types and keeps the spans.
struct Collector {
    addr: std::net::SocketAddr,
    spans: std::sync::Arc<std::sync::Mutex<Vec<(String, opentelemetry_proto::tonic::trace::v1::Span)>>>,
}

impl Collector {
    async fn start() -> Collector {
        use http_body_util::BodyExt;
        use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
        use prost::Message as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let spans = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = spans.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let kept = kept.clone();
                let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let kept = kept.clone();
                    async move {
                        assert_eq!(req.uri().path(), "/v1/traces");
                        assert_eq!(req.headers()["content-type"], "application/x-protobuf");
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let export = ExportTraceServiceRequest::decode(body).expect("an OTLP export request");
                        for resource in export.resource_spans {
                            let service = resource
                                .resource
                                .iter()
                                .flat_map(|r| &r.attributes)
                                .find(|a| a.key == "service.name")
                                .and_then(|a| a.value.as_ref()?.value.clone());
                            let service = match service {
                                Some(opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(s)) => s,
                                _ => String::new(),
                            };
                            for scope in resource.scope_spans {
                                kept.lock().unwrap().extend(scope.spans.into_iter().map(|s| (service.clone(), s)));
                            }
                        }
                        Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(
                            bytes::Bytes::new(),
                        )))
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
                );
            }
        });
        Collector { addr, spans }
    }
}

fn text_attribute(span: &opentelemetry_proto::tonic::trace::v1::Span, key: &str) -> Option<String> {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    span.attributes.iter().find(|a| a.key == key).and_then(|a| match a.value.as_ref()?.value.as_ref()? {
        Value::StringValue(s) => Some(s.clone()),
        Value::IntValue(n) => Some(n.to_string()),
        _ => None,
    })
}

/// With `[otlp]`, a request is a span (the backend's `traceparent` names it
/// as the parent), each plugin call a child span, and a WebSocket a child
/// span from its 101 to its end, all in the client's trace, sent to a
/// collector over OTLP/HTTP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_otlp_requests_plugin_calls_and_websockets_are_spans_of_one_trace() {
    let app = Backend::start("app").await;
    let collector = Collector::start().await;
    let plugins = PluginDir::new().add("guard", "handshake-guard", "[config]\ndeny_paths = \"/blocked*\"\n");
    let config = format!(
        "[otlp]\nendpoint = \"http://{}/v1/traces\"\nservice_name = \"edge-test\"\n\
         [[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\ndefault_pool = \"app\"\nwaf = [\"guard\"]\n\
         [[pool]]\nname = \"app\"\nservers = [\"{}\"]\n",
        collector.addr, app.addr
    );
    let gateway = start_gateway(&config, &plugins).await;
    let web = gateway.listener_addr("web").unwrap();
    let client_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = format!("00-{client_trace}-00f067aa0ba902b7-01");
    assert_eq!(request(web, "GET", "/a", &[("traceparent", &parent)], vec![]).await.status, StatusCode::OK);
    let backend_parent = app.requests().pop().unwrap().header("traceparent").unwrap()[36..52].to_owned();
    assert_eq!(request(web, "GET", "/blocked", &[], vec![]).await.status, StatusCode::FORBIDDEN);
    let (mut ws, _) = ws_connect(web, "/ws", &[("traceparent", &parent)]).await;
    futures_util::SinkExt::send(&mut ws, tokio_tungstenite::tungstenite::Message::text("hello")).await.unwrap();
    next_message(&mut ws).await;
    ws.close(None).await.unwrap();
    while futures_util::StreamExt::next(&mut ws).await.is_some() {}
    drop(ws);

    // Exports go out at least once a second.
    let spans = || collector.spans.lock().unwrap().clone();
    let started = std::time::Instant::now();
    while spans().len() < 7 {
        let names: Vec<String> = spans().iter().map(|(_, s)| s.name.clone()).collect();
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "3 requests, 3 plugin calls, 1 WebSocket: {names:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let spans = spans();
    assert!(spans.iter().all(|(service, _)| service == "edge-test"));
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let request_span = spans
        .iter()
        .map(|(_, s)| s)
        .find(|s| text_attribute(s, "url.path").as_deref() == Some("/a"))
        .expect("the request's span");
    assert_eq!(hex(&request_span.trace_id), client_trace, "the client's trace is continued");
    assert_eq!(hex(&request_span.parent_span_id), "00f067aa0ba902b7");
    assert_eq!(hex(&request_span.span_id), backend_parent, "the backend's parent is this span");
    assert_eq!(text_attribute(request_span, "http.response.status_code").as_deref(), Some("200"));
    assert!(request_span.end_time_unix_nano > request_span.start_time_unix_nano);
    let children = |of: &opentelemetry_proto::tonic::trace::v1::Span| -> Vec<_> {
        spans.iter().map(|(_, s)| s.clone()).filter(|s| s.parent_span_id == of.span_id).collect()
    };
    let plugin = &children(request_span)[0];
    assert_eq!(plugin.name, "plugin guard");
    assert_eq!(text_attribute(plugin, "wasmgate.plugin.outcome").as_deref(), Some("allow"));
    assert!(plugin.start_time_unix_nano >= request_span.start_time_unix_nano);
    let denied = spans
        .iter()
        .map(|(_, s)| s)
        .find(|s| text_attribute(s, "url.path").as_deref() == Some("/blocked"))
        .expect("the denied request's span");
    assert_eq!(text_attribute(denied, "wasmgate.error").as_deref(), Some("waf-deny"));
    assert_eq!(text_attribute(&children(denied)[0], "wasmgate.plugin.outcome").as_deref(), Some("deny"));
    let handshake = spans
        .iter()
        .map(|(_, s)| s)
        .find(|s| text_attribute(s, "url.path").as_deref() == Some("/ws"))
        .expect("the handshake's span");
    let websocket = children(handshake).into_iter().find(|s| s.name == "WebSocket").expect("the WebSocket's span");
    assert_eq!(hex(&websocket.trace_id), client_trace);
    assert_eq!(text_attribute(&websocket, "wasmgate.websocket.close").as_deref(), Some("client"));
    let up: u64 = text_attribute(&websocket, "wasmgate.websocket.bytes_up").unwrap().parse().unwrap();
    assert!(up > 5, "{up} bytes up");
}

/// A request through two gateways in a chain (an edge tier in front of an
/// inner tier that trusts it) keeps one request ID and one trace: the inner
/// gateway keeps the edge's request ID and continues its trace, and both
/// access logs name the same ones the backend got.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_through_two_gateways_keeps_one_request_id_and_one_trace() {
    let app = Backend::start("app").await;
    let plugins = PluginDir::new();
    let logs = tempfile::tempdir().unwrap();
    let tier = |name: &str, extra: &str, servers: String| {
        format!(
            "[log]\naccess = \"json\"\naccess_file = \"{}\"\n\
             [[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\ndefault_pool = \"next\"\n{extra}\n\
             [[pool]]\nname = \"next\"\nservers = [\"{servers}\"]\n",
            logs.path().join(format!("{name}.log")).display()
        )
    };
    let inner =
        start_gateway(&tier("inner", "trusted_proxies = [\"127.0.0.1/32\"]", app.addr.to_string()), &plugins).await;
    let inner_addr = inner.listener_addr("web").unwrap();
    let edge = start_gateway(&tier("edge", "", inner_addr.to_string()), &plugins).await;
    let got = request(edge.listener_addr("web").unwrap(), "GET", "/x", &[("x-request-id", "forged")], vec![]).await;
    assert_eq!(got.status, StatusCode::OK);
    let seen = app.requests().pop().unwrap();
    let id = seen.header("x-request-id").unwrap().to_owned();
    assert_ne!(id, "forged");
    assert_eq!(got.header("x-request-id"), Some(id.as_str()), "the client gets the edge's ID back");
    let trace = seen.header("traceparent").unwrap()[3..35].to_owned();
    let entry = |name: &str| -> serde_json::Value {
        let file = logs.path().join(format!("{name}.log"));
        let text = std::fs::read_to_string(file).unwrap_or_default();
        text.lines().next().map(|l| serde_json::from_str(l).unwrap()).unwrap_or_default()
    };
    wait_until("both access lines", std::time::Duration::from_secs(5), || {
        !entry("edge").is_null() && !entry("inner").is_null()
    })
    .await;
    for tier in ["edge", "inner"] {
        assert_eq!(entry(tier)["request_id"], id.as_str(), "{tier}");
        assert_eq!(entry(tier)["trace_id"], trace.as_str(), "{tier}");
    }
}
