//! Backend pools that heal themselves: probes, health, balancing, failover.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::common::*;
use futures_util::SinkExt;
use http::StatusCode;
use tokio_tungstenite::tungstenite::Message;
use wasmgate::Gateway;

fn pool_toml(name: &str, servers: &[String], extra: &str) -> String {
    let servers: Vec<String> = servers.iter().map(|s| format!("\"{s}\"")).collect();
    format!("[[pool]]\nname = \"{name}\"\nservers = [{}]\n{extra}\n", servers.join(", "))
}

fn listener(default_pool: &str) -> String {
    format!("[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\ndefault_pool = \"{default_pool}\"\n")
}

fn server_healthy(gateway: &Gateway, pool: &str, address: &str) -> bool {
    let pool = gateway.pool(pool).expect("pool");
    pool.servers.iter().find(|s| s.address == address).expect("server").is_healthy()
}

fn last_reason(gateway: &Gateway, pool: &str, address: &str) -> String {
    let pool = gateway.pool(pool).expect("pool");
    pool.servers.iter().find(|s| s.address == address).expect("server").last_reason()
}

/// Probes every 0.2 s; a probe may take the whole interval (a loaded CI
/// machine delays answers), so only a server that is really down fails.
const FAST_PROBE: &str = "[pool.probe]\npath = \"/health\"\ninterval_s = 0.2\ntimeout_s = 0.2\nunhealthy_threshold = 2\nhealthy_threshold = 2\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_server_leaves_the_pool_and_returns_when_it_recovers() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let config =
        format!("{}{}", listener("app"), pool_toml("app", &[a.addr.to_string(), b.addr.to_string()], FAST_PROBE));
    let gateway = start_gateway(&config, &PluginDir::new()).await;
    let addr = web(&gateway);

    let b_addr = b.addr.to_string();

    // Probes alone (no traffic to notice it): removed within interval 0.2 s ×
    // threshold 2 + timeout 0.1 s, with scheduling slack.
    b.stop();
    let removed =
        wait_until("b marked unhealthy", Duration::from_secs(3), || !server_healthy(&gateway, "app", &b_addr)).await;
    eprintln!("dead server removed by probes after {removed:?}");
    assert!(removed < Duration::from_millis(900), "removed after {removed:?}");
    for _ in 0..20 {
        assert!(get(addr, "/after-death").await.body.contains("backend=a"));
    }

    b.restart().await;
    let back = wait_until("b healthy again", Duration::from_secs(3), || server_healthy(&gateway, "app", &b_addr)).await;
    eprintln!("recovered server back after {back:?}");
    let deadline = Instant::now() + Duration::from_secs(3);
    while !get(addr, "/back").await.body.contains("backend=b") {
        assert!(Instant::now() < deadline, "b never got traffic again");
    }

    // Now with a client looping requests: it dies again, and the client sees
    // no error (a refused connect is retried on the other server at once).
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicU64::new(0));
    let client = {
        let (stop, failed) = (stop.clone(), failed.clone());
        tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                if get(addr, "/work").await.status != StatusCode::OK {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    b.stop();
    wait_until("b marked unhealthy", Duration::from_secs(3), || !server_healthy(&gateway, "app", &b_addr)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    client.await.unwrap();
    assert_eq!(failed.load(Ordering::Relaxed), 0, "no client saw an error: refused connects were retried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_probes_mark_servers_unhealthy_with_their_reason() {
    let (sick, wrong, slow, no_ws, good_ws) = (
        Backend::start("sick").await,
        Backend::start("wrong").await,
        Backend::start("slow").await,
        Backend::start("no-ws").await,
        Backend::start("good-ws").await,
    );
    sick.health.store(500, Ordering::Relaxed);
    let probe =
        |extra: &str| format!("[pool.probe]\ninterval_s = 0.2\ntimeout_s = 0.15\nunhealthy_threshold = 1\n{extra}\n");
    let config = format!(
        "{}{}{}{}{}{}",
        listener("sick"),
        pool_toml("sick", &[sick.addr.to_string()], &probe("path = \"/health\"")),
        pool_toml("wrong", &[wrong.addr.to_string()], &probe("match_body = \"all systems go\"")),
        pool_toml("slow", &[slow.addr.to_string()], &probe("path = \"/slow\"")),
        pool_toml("no-ws", &[no_ws.addr.to_string()], &probe("kind = \"websocket\"\npath = \"/reject-upgrade\"")),
        pool_toml("good-ws", &[good_ws.addr.to_string()], &probe("kind = \"websocket\"\npath = \"/ws\"")),
    );
    let gateway = start_gateway(&config, &PluginDir::new()).await;
    for (pool, backend, reason) in [
        ("sick", &sick, "status 500"),
        ("wrong", &wrong, "body does not contain \"all systems go\""),
        ("slow", &slow, "timed out"),
        ("no-ws", &no_ws, "upgrade refused: status 403"),
    ] {
        let address = backend.addr.to_string();
        wait_until(pool, Duration::from_secs(3), || !server_healthy(&gateway, pool, &address)).await;
        let why = last_reason(&gateway, pool, &address);
        assert!(why.contains(reason), "{pool}: {why}");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(server_healthy(&gateway, "good-ws", &good_ws.addr.to_string()), "a real WebSocket server passes");
    let probes = good_ws.probes();
    assert!(probes.len() >= 2, "the WebSocket probe made real handshakes");
    assert!(probes.iter().all(|p| p.header("upgrade") == Some("websocket")));

    let refused = get(web(&gateway), "/").await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.header("x-wasmgate-error"), Some("no-healthy-server"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_connections_spreads_long_lived_websockets() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let config = format!(
        "{}{}",
        listener("app"),
        pool_toml("app", &[a.addr.to_string(), b.addr.to_string()], "balance = \"least-connections\"")
    );
    let gateway = start_gateway(&config, &PluginDir::new()).await;
    let addr = web(&gateway);
    let mut sockets = Vec::new();
    for i in 0..20 {
        sockets.push(ws_connect(addr, "/ws", &[]).await.0);
        // Short requests in between must not skew the count.
        for _ in 0..(i % 3) {
            assert_eq!(get(addr, "/short").await.status, StatusCode::OK);
        }
    }
    assert_eq!((a.handshakes(), b.handshakes()), (10, 10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_balancing_keeps_a_key_on_its_server() {
    let backends = [Backend::start("a").await, Backend::start("b").await, Backend::start("c").await];
    let addrs: Vec<String> = backends.iter().map(|b| b.addr.to_string()).collect();
    let plugins = || {
        PluginDir::new().add(
            "path-router",
            "path-router",
            "[config]\nroutes = \"* / pool=app affinity=header:x-user\"\n",
        )
    };
    let config = |servers: &[String]| {
        format!(
            "[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nrouter = \"path-router\"\n{}",
            pool_toml("app", servers, "balance = \"hash\"")
        )
    };
    let (two_plugins, three_plugins) = (plugins(), plugins());
    let two = start_gateway(&config(&addrs[..2]), &two_plugins).await;
    let three = start_gateway(&config(&addrs), &three_plugins).await;

    let server_of = |body: &str| body.split_whitespace().next().unwrap_or("").to_owned();
    let first = server_of(&request(web(&two), "GET", "/", &[("x-user", "alice")], vec![]).await.body);
    for _ in 0..100 {
        let again = request(web(&two), "GET", "/", &[("x-user", "alice")], vec![]).await;
        assert_eq!(server_of(&again.body), first, "alice stays on her server");
    }

    let mut moved = 0;
    for i in 0..150 {
        let user = format!("user-{i}");
        let before = server_of(&request(web(&two), "GET", "/", &[("x-user", &user)], vec![]).await.body);
        let after = server_of(&request(web(&three), "GET", "/", &[("x-user", &user)], vec![]).await.body);
        if before != after {
            assert_eq!(after, "backend=c", "a key only moves to the added server");
            moved += 1;
        }
    }
    eprintln!("{moved} of 150 keys moved when a third server was added");
    assert!((25..=75).contains(&moved), "about a third of the keys move: {moved}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connection_fails_over_and_marks_the_server() {
    let live = Backend::start("live").await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let slow_probe = "[pool.probe]\ninterval_s = 60\ntimeout_s = 1\nunhealthy_threshold = 3";
    let config =
        format!("{}{}", listener("app"), pool_toml("app", &[closed.clone(), live.addr.to_string()], slow_probe));
    let gateway = start_gateway(&config, &PluginDir::new()).await;
    assert!(server_healthy(&gateway, "app", &closed), "starts healthy");

    // Round-robin starts with the closed server: the handshake fails over.
    let (mut ws, response) = ws_connect(web(&gateway), "/ws", &[]).await;
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    ws.send(Message::text("through the failover")).await.unwrap();
    assert_eq!(next_message(&mut ws).await, Message::text("through the failover"));
    assert!(!server_healthy(&gateway, "app", &closed), "the refused server is marked at once");
    assert!(last_reason(&gateway, "app", &closed).contains("connection failed"));
}

/// A server that accepts a connection, reads one request head (and any
/// body bytes that came with it), counts it, and closes without answering:
/// the request may have reached it, so it must never be sent again.
async fn dropper() -> (String, Arc<AtomicU64>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let seen = Arc::new(AtomicU64::new(0));
    let count = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else { return };
            let count = count.clone();
            tokio::spawn(async move {
                let Some(head) = read_head(&mut socket).await else { return };
                if !head.contains("wasmgate-probe") {
                    count.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    (addr, seen)
}

fn method_count(backend: &Backend, method: &str) -> usize {
    backend.requests().iter().filter(|r| r.method == method).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_may_have_reached_a_server_is_sent_again_only_if_safe() {
    let good = Backend::start("good").await;
    let (dropper, dropped) = dropper().await;
    let slow_probe = "retries = 1\n[pool.probe]\ninterval_s = 60\ntimeout_s = 1";
    let servers = [dropper.clone(), good.addr.to_string()];
    let config = format!("{}{}", listener("app"), pool_toml("app", &servers, slow_probe));
    let gateway = start_gateway(&config, &PluginDir::new()).await;
    let addr = web(&gateway);

    // A GET without a body is idempotent: one the dropper took is sent
    // again to the good server, which sees each GET exactly once.
    for _ in 0..4 {
        assert_eq!(get(addr, "/get").await.status, StatusCode::OK);
    }
    assert!(dropped.load(Ordering::Relaxed) >= 1, "the dropper got some of them first");
    assert_eq!(method_count(&good, "GET"), 4);
    assert!(server_healthy(&gateway, "app", &dropper), "a dropped request is not a refused connection");

    // With a body, or not idempotent: each is sent once, to one server; the
    // ones the dropper took are 502, never retried.
    for (method, body) in [("POST", b"a=1".to_vec()), ("PUT", b"x".to_vec()), ("POST", vec![]), ("PATCH", vec![])] {
        let before = (dropped.load(Ordering::Relaxed), method_count(&good, method));
        let mut failed = 0;
        for _ in 0..4 {
            let status = request(addr, method, "/once", &[], body.clone()).await.status;
            assert!(status == StatusCode::OK || status == StatusCode::BAD_GATEWAY, "{method}: {status}");
            failed += usize::from(status == StatusCode::BAD_GATEWAY);
        }
        let to_dropper = (dropped.load(Ordering::Relaxed) - before.0) as usize;
        let to_good = method_count(&good, method) - before.1;
        assert_eq!(to_dropper + to_good, 4, "{method} {body:?}: each request was sent exactly once");
        assert_eq!(failed, to_dropper, "{method} {body:?}: what the dropper took failed, and was not retried");
        assert!(to_dropper >= 1, "{method} {body:?}: the dropper was tried");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_bounds_how_many_other_servers_are_tried() {
    let good = Backend::start("good").await;
    let droppers = [dropper().await, dropper().await, dropper().await];
    let mut servers: Vec<String> = droppers.iter().map(|(addr, _)| addr.clone()).collect();
    servers.push(good.addr.to_string());
    let attempts = || droppers.iter().map(|(_, n)| n.load(Ordering::Relaxed) as usize).sum::<usize>();
    for retries in [0, 1, 3] {
        let extra = format!("retries = {retries}\n[pool.probe]\ninterval_s = 60\ntimeout_s = 1");
        let config = format!("{}{}", listener("app"), pool_toml("app", &servers, &extra));
        let gateway = start_gateway(&config, &PluginDir::new()).await;
        let before = (attempts(), method_count(&good, "GET"));
        let mut failed = 0;
        for _ in 0..8 {
            failed += usize::from(get(web(&gateway), "/r").await.status == StatusCode::BAD_GATEWAY);
        }
        let (on_droppers, on_good) = (attempts() - before.0, method_count(&good, "GET") - before.1);
        assert_eq!(on_good + failed, 8, "retries = {retries}: every request ends served or 502");
        // A failed request tried exactly 1 + retries servers; a served one at most that.
        assert!(on_droppers >= failed * (1 + retries), "retries = {retries}: {on_droppers} attempts, {failed} failed");
        assert!(on_droppers + on_good <= 8 * (1 + retries), "retries = {retries}: at most 1 + retries tries each");
        if retries == 0 {
            assert_eq!(on_droppers + on_good, 8, "no retry at all");
        }
        if retries == 3 {
            assert_eq!(failed, 0, "with a try for every server, the good one is always reached");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_servers_down_is_a_quick_503() {
    let closed: Vec<String> =
        (0..2).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string()).collect();
    let probe = "[pool.probe]\ninterval_s = 0.1\ntimeout_s = 0.05\nunhealthy_threshold = 1";
    let config = format!("{}{}", listener("app"), pool_toml("app", &closed, probe));
    let gateway = start_gateway(&config, &PluginDir::new()).await;
    wait_until("both marked down", Duration::from_secs(3), || {
        closed.iter().all(|s| !server_healthy(&gateway, "app", s))
    })
    .await;
    let started = Instant::now();
    let got = get(web(&gateway), "/").await;
    assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(got.header("x-wasmgate-error"), Some("no-healthy-server"));
    assert!(started.elapsed() < Duration::from_millis(500), "took {:?}", started.elapsed());
    let refused = ws_refused(web(&gateway), "/ws", &[]).await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
}

/// Opens a WebSocket and fails its server's probes: the next message the
/// client gets (after sending one, if the WebSocket is to stay open), and
/// the backend.
async fn websocket_after_probe_failure(close_on_unhealthy: bool) -> (Message, Backend) {
    let app = Backend::start("app").await;
    let extra = format!("close_on_unhealthy = {close_on_unhealthy}\n{FAST_PROBE}");
    let config = format!("{}{}", listener("app"), pool_toml("app", &[app.addr.to_string()], &extra));
    let gateway = start_gateway(&config, &PluginDir::new()).await;
    let (mut ws, _) = ws_connect(web(&gateway), "/ws", &[]).await;
    app.health.store(503, Ordering::Relaxed);
    let address = app.addr.to_string();
    wait_until("probe marks it unhealthy", Duration::from_secs(3), || !server_healthy(&gateway, "app", &address)).await;
    if !close_on_unhealthy {
        ws.send(Message::text("still there?")).await.unwrap();
    }
    (next_message(&mut ws).await, app)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_websocket_survives_a_failing_probe() {
    let (got, app) = websocket_after_probe_failure(false).await;
    assert_eq!(got, Message::text("still there?"), "a probe failure is not a connection failure");
    assert!(app.closes.lock().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_on_unhealthy_closes_the_servers_websockets() {
    let (got, app) = websocket_after_probe_failure(true).await;
    match got {
        Message::Close(Some(frame)) => {
            assert_eq!((u16::from(frame.code), frame.reason.as_str()), (1001, "server unhealthy"))
        }
        other => panic!("expected the gateway's Close 1001, got {other:?}"),
    }
    wait_until("the backend got its Close", Duration::from_secs(2), || {
        app.closes.lock().unwrap().contains(&(1001, "server unhealthy".to_owned()))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_failing_its_probe_gets_no_new_requests_or_handshakes() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let config =
        format!("{}{}", listener("app"), pool_toml("app", &[a.addr.to_string(), b.addr.to_string()], FAST_PROBE));
    let gateway = start_gateway(&config, &PluginDir::new()).await;
    let addr = web(&gateway);
    // b keeps listening and answering, but its health check fails.
    b.health.store(500, Ordering::Relaxed);
    let b_addr = b.addr.to_string();
    let removed = wait_until("b out", Duration::from_secs(3), || !server_healthy(&gateway, "app", &b_addr)).await;
    assert!(removed < Duration::from_millis(900), "removed after {removed:?}");
    let before = b.requests().len();
    for _ in 0..20 {
        assert!(get(addr, "/x").await.body.contains("backend=a"));
    }
    let _ws = ws_connect(addr, "/ws", &[]).await;
    assert_eq!(b.requests().len(), before, "no new request or handshake reached it");
    assert!(last_reason(&gateway, "app", &b_addr).contains("status 500"));
}

/// A backend that numbers its connections and the requests on each: it
/// answers `c{connection}-r{request}` (and `x-connection: c{connection}`),
/// a 32 MiB body for `/big` (more than the sockets between a client and
/// the gateway hold), and closes a
/// connection (idle, between responses, without saying so) after `per_connection`
/// requests on it. The gateway's probes get connections of their own.
async fn numbering_backend(per_connection: usize) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        let mut connections = 0;
        while let Ok((mut socket, _)) = listener.accept().await {
            let connection = connections;
            connections += 1;
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                for request in 0..per_connection {
                    let Some(head) = read_head(&mut socket).await else { return };
                    let body = if head.starts_with("GET /big ") {
                        vec![b'x'; 32 << 20]
                    } else {
                        format!("c{connection}-r{request}").into_bytes()
                    };
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\nx-connection: c{connection}\r\ncontent-length: {}\r\n\r\n",
                        body.len()
                    );
                    if socket.write_all(answer.as_bytes()).await.is_err() || socket.write_all(&body).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_reused_and_replaced_once_the_server_closes_them() {
    let backend = numbering_backend(3).await;
    let config = format!("{}{}", listener("app"), pool_toml("app", &[backend], "[pool.probe]\ninterval_s = 3600"));
    let gateway = start_gateway(&config, &PluginDir::new()).await;
    let mut answers = Vec::new();
    for _ in 0..9 {
        let got = get(web(&gateway), "/").await;
        assert_eq!(got.status, StatusCode::OK, "{:?}", got.header("x-wasmgate-error"));
        answers.push(got.body);
        // Time for the gateway to see a connection its server closed.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Three requests over each connection (one each would be no reuse), and
    // no request lost to the connections the server closed after three.
    let connection = |answer: &str| answer.split_once('-').map(|(c, _)| c.to_owned()).unwrap();
    for group in answers.chunks(3) {
        assert!(group.iter().all(|a| connection(a) == connection(&group[0])), "{answers:?}");
        let requests: Vec<&str> = group.iter().map(|a| a.split_once('-').unwrap().1).collect();
        assert_eq!(requests, ["r0", "r1", "r2"], "{answers:?}");
    }
    assert_ne!(connection(&answers[0]), connection(&answers[3]), "{answers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_whose_response_was_not_read_to_the_end_is_never_reused() {
    let backend = numbering_backend(100).await;
    let config = format!("{}{}", listener("app"), pool_toml("app", &[backend], "[pool.probe]\ninterval_s = 3600"));
    let gateway = start_gateway(&config, &PluginDir::new()).await;
    assert_eq!(get(web(&gateway), "/").await.status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(50)).await;
    // A client that reads the head of a 32 MiB answer and leaves.
    let cut = {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut client = tokio::net::TcpStream::connect(web(&gateway)).await.unwrap();
        client.write_all(b"GET /big HTTP/1.1\r\nHost: gw.test\r\n\r\n").await.unwrap();
        let mut head = [0u8; 1024];
        let n = client.read(&mut head).await.unwrap();
        let head = String::from_utf8_lossy(&head[..n]).into_owned();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let connection = head.lines().find_map(|l| l.strip_prefix("x-connection: ")).map(str::to_owned);
        connection.unwrap_or_else(|| panic!("{head}"))
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The next requests get whole, right answers of their own: the rest of
    // the 32 MiB never reaches them, because that connection was closed.
    let mut answers = Vec::new();
    for _ in 0..3 {
        let next = get(web(&gateway), "/").await;
        assert_eq!(next.status, StatusCode::OK);
        assert!(next.body.starts_with('c') && next.body.len() < 32, "{}", &next.body[..next.body.len().min(64)]);
        answers.push(next.body);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let connection = |answer: &str| answer.split_once('-').map(|(c, _)| c.to_owned()).unwrap();
    assert!(answers.iter().all(|a| connection(a) != cut), "{cut} was reused: {answers:?}");
    assert!(
        answers.iter().all(|a| connection(a) == connection(&answers[0])),
        "reused after whole answers: {answers:?}"
    );
}
