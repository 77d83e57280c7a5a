//! Config reload of a real gateway process: under load (open WebSockets and
//! a looping client) through `POST /reload`, refusal of a broken file, and
//! the drain of a removed server's WebSockets (on SIGHUP).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::common::*;
use futures_util::{SinkExt, StreamExt};
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

const TOKEN: &str = "reload-test-token";

/// A directory with the config, the plugins and the admin token.
struct Setup {
    dir: tempfile::TempDir,
    web: SocketAddr,
    admin: SocketAddr,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let plugins = dir.path().join("plugins");
        std::fs::create_dir(&plugins).unwrap();
        let install = |name: &str, krate: &str, settings: &str| {
            std::fs::copy(plugin_wasm(krate), plugins.join(format!("{name}.wasm"))).unwrap();
            std::fs::write(plugins.join(format!("{name}.toml")), settings).unwrap();
        };
        // Two routers and two WAFs; the configs pick which serve.
        install("router-a", "path-router", "[config]\nroutes = \"\"\"\n* /which pool=one\n* / pool=app\n\"\"\"\n");
        install("router-b", "path-router", "[config]\nroutes = \"\"\"\n* /which pool=two\n* / pool=app\n\"\"\"\n");
        install("guard", "handshake-guard", "[config]\ndeny_paths = \"/never*\"\n");
        install("guard-b", "handshake-guard", "[config]\ndeny_paths = \"/blocked*\"\n");
        std::fs::write(dir.path().join("admin.token"), format!("{TOKEN}\n")).unwrap();
        // Port 0 everywhere: the real addresses are read from the log at start.
        let unbound = "127.0.0.1:0".parse().unwrap();
        Setup { dir, web: unbound, admin: unbound }
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("gateway.toml")
    }

    /// Writes the config: the admin and `web` listeners, then `rest`.
    fn write(&self, waf: &[&str], router: &str, rest: &str) {
        let waf: Vec<String> = waf.iter().map(|w| format!("\"{w}\"")).collect();
        let text = format!(
            "[admin]\nlisten = \"{}\"\nallowed_hosts = [\"gw.test\"]\ntoken_file = \"admin.token\"\n\
             [plugins]\ndir = \"plugins\"\n\
             [[listener]]\nname = \"web\"\nbind = \"{}\"\nwaf = [{}]\nrouter = \"{router}\"\n{rest}",
            "127.0.0.1:0",
            "127.0.0.1:0",
            waf.join(", ")
        );
        std::fs::write(self.config_path(), text).unwrap();
    }

    /// Starts the gateway and learns where `web` and the admin listener are.
    async fn start(&mut self) -> GatewayProcess {
        let gateway = GatewayProcess::start(&self.config_path(), &self.dir.path().join("gateway.log"), 2).await;
        (self.web, self.admin) = (gateway.addr("web"), gateway.addr("admin"));
        gateway
    }

    /// `POST /reload` with the token: the status and the JSON answer.
    async fn reload(&self) -> (StatusCode, serde_json::Value) {
        let got =
            request(self.admin, "POST", "/reload", &[("authorization", &format!("Bearer {TOKEN}"))], vec![]).await;
        let body = serde_json::from_str(&got.body).unwrap_or_else(|e| panic!("JSON answer ({e}): {:?}", got.body));
        (got.status, body)
    }

    async fn status(&self) -> serde_json::Value {
        let got = request(self.admin, "GET", "/status", &[("authorization", &format!("Bearer {TOKEN}"))], vec![]).await;
        assert_eq!(got.status, StatusCode::OK);
        serde_json::from_str(&got.body).unwrap()
    }
}

fn pools(app: &[&Backend], one: &Backend, two: &Backend) -> String {
    let app: Vec<String> = app.iter().map(|b| format!("\"{}\"", b.addr)).collect();
    format!(
        "[[pool]]\nname = \"app\"\nservers = [{}]\n\
         [[pool]]\nname = \"one\"\nservers = [\"{}\"]\n\
         [[pool]]\nname = \"two\"\nservers = [\"{}\"]\n",
        app.join(", "),
        one.addr,
        two.addr
    )
}

/// Which config answers: `A` (router-a, no /blocked rule) or `B` (router-b,
/// guard-b denies /blocked); `None` while they disagree.
async fn serving(web: SocketAddr) -> Option<char> {
    let which = get(web, "/which").await;
    let blocked = get(web, "/blocked").await;
    let body = &which.body;
    match (body.contains("backend=one"), body.contains("backend=two"), blocked.status) {
        (true, false, StatusCode::OK) => Some('A'),
        (false, true, StatusCode::FORBIDDEN) => Some('B'),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_reloads_under_load_drop_nothing_and_apply_at_once() {
    let (a, b, c) = (Backend::start("a").await, Backend::start("b").await, Backend::start("c").await);
    let (one, two) = (Backend::start("one").await, Backend::start("two").await);
    let mut setup = Setup::new();
    let config_a = |setup: &Setup| setup.write(&["guard"], "router-a", &pools(&[&a, &b], &one, &two));
    let config_b = |setup: &Setup| setup.write(&["guard", "guard-b"], "router-b", &pools(&[&a, &b, &c], &one, &two));
    config_a(&setup);
    let _gateway = setup.start().await;
    assert_eq!(serving(setup.web).await, Some('A'));

    // 200 WebSockets, on servers a and b (kept by both configs).
    let mut sockets = Vec::new();
    for _ in 0..200 {
        sockets.push(ws_connect(setup.web, "/ws", &[]).await.0);
    }

    // A client looping requests all along, counting failures.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
    let client = {
        let (stop, ok, failed, web) = (stop.clone(), ok.clone(), failed.clone(), setup.web);
        tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(120);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                match try_get_root(web).await {
                    Ok((StatusCode::OK, body)) if body.contains("backend=") => ok.fetch_add(1, Ordering::Relaxed),
                    other => {
                        eprintln!("request failed: {other:?}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        })
    };

    let mut slowest = Duration::ZERO;
    for round in 0..20 {
        let want = if round % 2 == 0 { 'B' } else { 'A' };
        if want == 'B' {
            config_b(&setup)
        } else {
            config_a(&setup)
        }
        let asked = Instant::now();
        let (status, report) = setup.reload().await;
        assert_eq!(status, StatusCode::OK, "{report}");
        assert_eq!(report["result"], "applied");
        assert_eq!(report["version"], round + 2);
        let changes = report["changes"].to_string();
        assert!(changes.contains("router") && changes.contains("waf"), "{report}");
        let server_change = if want == 'B' { "server 127.0.0.1" } else { "removed" };
        assert!(changes.contains(server_change), "{report}");
        while serving(setup.web).await != Some(want) {
            assert!(asked.elapsed() < Duration::from_secs(1), "config {want} not serving 1 s after POST /reload");
        }
        slowest = slowest.max(asked.elapsed());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    client.await.unwrap();
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));

    // Every WebSocket is still open and echoing.
    let mut closed = 0;
    for (i, ws) in sockets.iter_mut().enumerate() {
        let text = format!("still here {i}");
        let echoed = match ws.send(Message::text(text.clone())).await {
            Ok(()) => tokio::time::timeout(Duration::from_secs(5), ws.next()).await,
            Err(_) => Ok(None),
        };
        if !matches!(echoed, Ok(Some(Ok(Message::Text(t)))) if t.as_str() == text) {
            closed += 1;
        }
    }
    eprintln!(
        "20 reloads: {ok} requests ok, {failed} failed; {closed} of 200 WebSockets closed; \
         slowest POST /reload to new behaviour: {slowest:?}"
    );
    assert_eq!(failed, 0, "no request failed");
    assert!(ok > 20, "the client kept requesting: {ok}");
    assert_eq!(closed, 0, "no WebSocket was closed");
    let status = setup.status().await;
    assert_eq!(status["config_version"], 21);
    assert_eq!(status["websockets"], 200);
    assert_eq!(status["listeners"][0]["websockets"], 200);
    assert_eq!(c.handshakes(), 0, "the WebSockets stayed where they were");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_config_is_refused_and_the_old_one_keeps_serving() {
    let (a, one, two) = (Backend::start("a").await, Backend::start("one").await, Backend::start("two").await);
    let mut setup = Setup::new();
    let good = pools(&[&a], &one, &two);
    setup.write(&["guard"], "router-a", &good);
    let _gateway = setup.start().await;

    // A TOML syntax error: refused with the file and the line.
    setup.write(&["guard"], "router-a", &format!("{good}[[pool]\nname = \"broken\"\n"));
    let (status, report) = setup.reload().await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(report["result"], "refused");
    let error = report["error"].as_str().unwrap();
    assert!(error.contains("gateway.toml") && error.contains("line 21"), "{error}");

    // A valid file with an unusable value: refused with file, line, key, reason.
    setup.write(&["guard"], "router-a", &good.replace("name = \"one\"", "name = \"one\"\nrequest_timeout_s = 0"));
    let (status, report) = setup.reload().await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let error = report["error"].as_str().unwrap();
    assert!(error.contains("gateway.toml:17: `pool[1].request_timeout_s`"), "{error}");

    // A listener on a port that cannot be bound (the admin listener's).
    let taken = format!("[[listener]]\nname = \"taken\"\nbind = \"{}\"\ndefault_pool = \"app\"\n", setup.admin);
    setup.write(&["guard"], "router-a", &format!("{good}{taken}"));
    let (status, report) = setup.reload().await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let error = report["error"].as_str().unwrap();
    assert!(error.contains(&format!("listener `taken`: cannot bind {}", setup.admin)), "{error}");

    // An HTTPS listener whose certificate file is missing.
    let secure = "[[listener]]\nname = \"secure\"\nbind = \"127.0.0.1:0\"\nprotocol = \"https\"\ndefault_pool = \"app\"\n\
                  [[listener.certificate]]\nhosts = [\"gw.test\"]\ncert = \"missing.pem\"\nkey = \"missing.key\"\n";
    setup.write(&["guard"], "router-a", &format!("{good}{secure}"));
    let (status, report) = setup.reload().await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let error = report["error"].as_str().unwrap();
    assert!(error.contains("listener `secure`: certificate[0]") && error.contains("missing.pem"), "{error}");

    // A router whose own `init` refuses its settings: named, with its reason.
    let plugins = setup.dir.path().join("plugins");
    std::fs::write(plugins.join("picky.toml"), "[config]\nrefuse = \"pool `billing` is not in the table\"\n").unwrap();
    std::fs::copy(plugin_wasm("head-echo"), plugins.join("picky.wasm")).unwrap();
    setup.write(&["guard"], "picky", &good);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !setup.status().await["rejected_plugins"].as_array().unwrap().iter().any(|r| r["name"] == "picky") {
        assert!(Instant::now() < deadline, "the watcher never refused picky.wasm");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, report) = setup.reload().await;
    let error = report["error"].as_str().unwrap();
    assert!(
        error.contains("`listener[0].router`: plugin `picky` is not loaded")
            && error.contains("plugin `picky` refused its configuration: pool `billing` is not in the table"),
        "{error}"
    );

    // A plugin that is not in the directory.
    setup.write(&["guard", "no-such-waf"], "router-a", &good);
    let (_, report) = setup.reload().await;
    let error = report["error"].as_str().unwrap();
    assert!(error.contains("`listener[0].waf[1]`") && error.contains("no-such-waf"), "{error}");

    // The first config still serves, at version 1; the refusals are listed.
    assert_eq!(serving(setup.web).await, Some('A'));
    let status = setup.status().await;
    assert_eq!(status["config_version"], 1);
    let results: Vec<&str> =
        status["reloads"].as_array().unwrap().iter().map(|r| r["result"].as_str().unwrap()).collect();
    assert_eq!(results, ["applied", "refused", "refused", "refused", "refused", "refused", "refused"]);

    // `wasmgate reload` says the same and fails; a fixed file applies.
    let cli = |setup: &Setup| {
        std::process::Command::new(env!("CARGO_BIN_EXE_wasmgate"))
            .args(["reload", "--admin", &setup.admin.to_string(), "--token-file"])
            .arg(setup.dir.path().join("admin.token"))
            .output()
            .unwrap()
    };
    let refused = cli(&setup);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stdout).contains("no-such-waf"));
    setup.write(&["guard", "guard-b"], "router-b", &good);
    let applied = cli(&setup);
    assert!(applied.status.success(), "{}", String::from_utf8_lossy(&applied.stderr));
    assert!(String::from_utf8_lossy(&applied.stdout).contains("\"applied\""));
    assert_eq!(serving(setup.web).await, Some('B'));

    // POST without the token is refused.
    let anonymous = request(setup.admin, "POST", "/reload", &[], vec![]).await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_server_has_its_websockets_closed_with_1001_over_drain_s() {
    let (a, b, one, two) = (
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("one").await,
        Backend::start("two").await,
    );
    let mut setup = Setup::new();
    let drain = "[websocket]\ndrain_s = 2\n";
    setup.write(&[], "router-a", &format!("{}{drain}", pools(&[&a, &b], &one, &two)));
    let gateway = setup.start().await;

    let mut on_a = Vec::new();
    let mut on_b = Vec::new();
    for _ in 0..20 {
        let (ws, _, greeting) = ws_connect_greeted(setup.web, "/ws", &[]).await;
        if greeting.ends_with(" b") { on_b.push(ws) } else { on_a.push(ws) }
    }
    assert_eq!((on_a.len(), on_b.len()), (10, 10), "round robin over a and b");

    // b leaves the pool; SIGHUP reloads.
    setup.write(&[], "router-a", &format!("{}{drain}", pools(&[&a], &one, &two)));
    gateway.signal("HUP");
    let signalled = Instant::now();
    let closes = futures_util::future::join_all(on_b.iter_mut().map(|ws| async move {
        loop {
            match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
                Ok(Some(Ok(Message::Close(Some(frame))))) => {
                    return Some((u16::from(frame.code), frame.reason.to_string(), signalled.elapsed()));
                }
                Ok(Some(Ok(_))) => continue,
                _ => return None,
            }
        }
    }))
    .await;
    let mut times = Vec::new();
    for close in closes {
        let (code, reason, at) = close.expect("each of b's WebSockets got a Close frame");
        assert_eq!((code, reason.as_str()), (1001, "removed by a config reload"));
        times.push(at);
    }
    times.sort();
    eprintln!("b's closes after SIGHUP: first {:?}, last {:?}", times[0], times[9]);
    // Measured from kill(1): a busy machine may take a while to handle the
    // signal, so the window's 2 s are checked from the first close.
    assert!(times[0] < Duration::from_secs(2), "the drain began: {:?}", times[0]);
    assert!(times[9] - times[0] < Duration::from_millis(2100), "within drain_s (2 s): {times:?}");
    assert!(times[9] - times[0] > Duration::from_millis(300), "spread, not one burst: {times:?}");

    // a's WebSockets are untouched and b gets nothing new.
    for ws in &mut on_a {
        ws.send(Message::text("still here")).await.unwrap();
        assert_eq!(next_message(ws).await, Message::text("still here"));
    }
    let before = b.handshakes();
    for _ in 0..4 {
        let (_ws, _, greeting) = ws_connect_greeted(setup.web, "/ws", &[]).await;
        assert!(greeting.ends_with(" a"), "{greeting}");
    }
    assert_eq!(b.handshakes(), before);
    let line = format!("pool `app`: server {} removed; its 10 connection(s) close over 2s", b.addr);
    assert!(gateway.log_text().contains(&line), "the reload logs `{line}`:\n{}", gateway.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_are_added_and_removed_and_a_removed_one_ends_politely() {
    let (a, one, two) = (Backend::start("a").await, Backend::start("one").await, Backend::start("two").await);
    let mut setup = Setup::new();
    let base = format!("{}[websocket]\ndrain_s = 1\n", pools(&[&a], &one, &two));
    let with_extra = format!("{base}[[listener]]\nname = \"extra\"\nbind = \"127.0.0.1:0\"\ndefault_pool = \"app\"\n");
    setup.write(&[], "router-a", &base);
    let gateway = setup.start().await;

    // Added: bound by the reload.
    setup.write(&[], "router-a", &with_extra);
    let (status, report) = setup.reload().await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert!(report["changes"].to_string().contains("listener `extra` added"), "{report}");
    let extra = gateway.addr("extra");
    assert_eq!(get(extra, "/").await.status, StatusCode::OK);

    // On it: a WebSocket, a kept-alive connection, and a slow request.
    let (mut ws, _) = ws_connect(extra, "/ws", &[]).await;
    let stream = tokio::net::TcpStream::connect(extra).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.unwrap();
    let connection = tokio::spawn(connection);
    let first = http::Request::get("/").header("host", "extra").body(String::new()).unwrap();
    assert_eq!(sender.send_request(first).await.unwrap().status(), StatusCode::OK);
    let slow = tokio::spawn(async move { get(extra, "/slow").await.status });
    // And a connection that has sent nothing yet.
    let mut quiet = tokio::net::TcpStream::connect(extra).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Removed.
    setup.write(&[], "router-a", &base);
    let (status, report) = setup.reload().await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert!(report["changes"].to_string().contains("listener `extra` removed"), "{report}");
    // A request that comes on it a moment later, within the grace an idle
    // connection gets, is still answered, as the connection's last.
    tokio::time::sleep(Duration::from_millis(150)).await;
    quiet.write_all(b"GET / HTTP/1.1\r\nHost: extra\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), quiet.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer).to_lowercase();
    assert!(read.is_ok() && answer.starts_with("http/1.1 200"), "{read:?} {answer}");
    assert!(answer.contains("connection: close"), "{answer}");
    // The accept loop stops right after the answer.
    let stopping = Instant::now();
    while tokio::net::TcpStream::connect(extra).await.is_ok() {
        assert!(stopping.elapsed() < Duration::from_secs(1), "still accepting 1 s after the reload");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The kept-alive connection is closed by the gateway.
    tokio::time::timeout(Duration::from_secs(2), connection).await.expect("keep-alive connection closed").unwrap().ok();
    // The WebSocket gets its Close 1001 within drain_s.
    let close = loop {
        match tokio::time::timeout(Duration::from_secs(3), ws.next()).await.expect("a Close within drain_s") {
            Some(Ok(Message::Close(Some(frame)))) => break frame,
            Some(Ok(_)) => continue,
            other => panic!("expected a Close frame, got {other:?}"),
        }
    };
    assert_eq!((u16::from(close.code), close.reason.as_str()), (1001, "removed by a config reload"));
    // The request in flight finished.
    assert_eq!(slow.await.unwrap(), StatusCode::OK);
    assert_eq!(serving(setup.web).await, Some('A'), "the other listener serves on");

    // Moved: `web` to another address. The new one serves at once; the old
    // one stops accepting.
    let old_web = setup.web;
    setup.write(&[], "router-a", &base);
    let moved = std::fs::read_to_string(setup.config_path()).unwrap().replacen(
        "bind = \"127.0.0.1:0\"\nwaf",
        "bind = \"127.0.0.2:0\"\nwaf",
        1,
    );
    std::fs::write(setup.config_path(), moved).unwrap();
    let (status, report) = setup.reload().await;
    assert_eq!(status, StatusCode::OK, "{report}");
    let new_web = gateway.addr("web");
    assert_eq!(new_web.ip().to_string(), "127.0.0.2");
    assert!(
        report["changes"].to_string().contains(&format!("listener `web` moved from {old_web} to {new_web}")),
        "{report}"
    );
    assert_eq!(serving(new_web).await, Some('A'));
    let stopping = Instant::now();
    while tokio::net::TcpStream::connect(old_web).await.is_ok() {
        assert!(stopping.elapsed() < Duration::from_secs(1), "the old address still accepts");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
