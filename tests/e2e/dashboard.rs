//! The live dashboard in a real browser: headless Chromium (Debian's
//! `chromium`, installed by `scripts/test`) opens the admin listener's page,
//! and the test watches it follow the gateway through the DevTools protocol:
//! the WebSockets the test opens and the server it stops show up without a
//! reload. The test saves a screenshot.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;
use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// A headless Chromium with the DevTools protocol on a local port; killed
/// when dropped.
struct Chromium {
    child: Child,
    _profile: tempfile::TempDir,
    devtools: SocketAddr,
}

impl Drop for Chromium {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Chromium {
    async fn start() -> Chromium {
        let profile = tempfile::tempdir().unwrap();
        let child = Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--window-size=1280,1500",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromium is installed (scripts/test installs Debian's chromium)");
        // Chromium writes the port it chose into the profile directory.
        let port_file = profile.path().join("DevToolsActivePort");
        let started = Instant::now();
        let port = loop {
            if let Some(port) = std::fs::read_to_string(&port_file).ok().and_then(|t| t.lines().next()?.parse().ok()) {
                break port;
            }
            assert!(started.elapsed() < Duration::from_secs(20), "chromium did not open its DevTools port");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        Chromium { child, _profile: profile, devtools: SocketAddr::from(([127, 0, 0, 1], port)) }
    }

    /// A DevTools session on the browser's page.
    async fn page(&self) -> Page {
        let started = Instant::now();
        let url = loop {
            // DevTools answers only a Host that is an IP address or localhost.
            let host = self.devtools.to_string();
            let list = request(self.devtools, "GET", "/json/list", &[("host", &host)], Vec::new()).await;
            let targets: Value = serde_json::from_str(&list.body).unwrap_or(Value::Null);
            let page = targets.as_array().and_then(|t| t.iter().find(|t| t["type"] == "page").cloned());
            if let Some(url) = page.and_then(|p| p["webSocketDebuggerUrl"].as_str().map(str::to_owned)) {
                break url;
            }
            assert!(started.elapsed() < Duration::from_secs(10), "no page target: {}", list.body);
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let (socket, _) = tokio_tungstenite::connect_async(url).await.expect("DevTools WebSocket");
        Page { socket, next_id: 0 }
    }
}

/// One DevTools protocol session.
struct Page {
    socket: Ws,
    next_id: u64,
}

impl Page {
    /// Sends a command and returns its result.
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let command = json!({"id": id, "method": method, "params": params});
        self.socket.send(Message::text(command.to_string())).await.unwrap();
        loop {
            let message = tokio::time::timeout(Duration::from_secs(20), self.socket.next())
                .await
                .unwrap_or_else(|_| panic!("no answer to {method}"))
                .expect("DevTools session open")
                .unwrap();
            let Message::Text(text) = message else { continue };
            let answer: Value = serde_json::from_str(text.as_str()).unwrap();
            if answer["id"] == id {
                assert!(answer.get("error").is_none(), "{method}: {answer}");
                return answer["result"].clone();
            }
        }
    }

    /// Evaluates `expression` in the page; its value.
    async fn eval(&mut self, expression: &str) -> Value {
        let result = self.call("Runtime.evaluate", json!({"expression": expression, "returnByValue": true})).await;
        result["result"]["value"].clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_follows_websockets_and_server_health_live() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let config = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\nallowed_hosts = [\"gw.test\"]\n\
         [[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\ndefault_pool = \"app\"\nwaf = [\"guard\"]\n\
         [[pool]]\nname = \"app\"\nservers = [\"{}\", \"{}\"]\n\
         [pool.probe]\npath = \"/health\"\ninterval_s = 0.2\ntimeout_s = 0.1\nunhealthy_threshold = 1\n",
        a.addr, b.addr
    );
    let plugins = PluginDir::new().add("guard", "handshake-guard", "");
    let gateway = start_gateway(&config, &plugins).await;
    let (admin, web) = (gateway.admin_addr().unwrap(), web(&gateway));

    let chromium = Chromium::start().await;
    let mut page = chromium.page().await;
    page.call("Page.navigate", json!({"url": format!("http://{admin}/")})).await;
    let started = Instant::now();
    while page.eval("document.getElementById('live') && document.getElementById('live').textContent").await != "live" {
        assert!(started.elapsed() < Duration::from_secs(10), "the page never received an event");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(page.eval("document.getElementById('websockets-total').textContent").await, "0");

    // The test stops server b and opens 7 WebSockets (all on a, then).
    b.stop();
    wait_until("b marked unhealthy", Duration::from_secs(5), || {
        gateway.pool("app").unwrap().servers.iter().any(|s| s.address == b.addr.to_string() && !s.is_healthy())
    })
    .await;
    let mut sockets = Vec::new();
    for _ in 0..7 {
        sockets.push(ws_connect(web, "/ws", &[]).await.0);
    }

    // The open page shows both, with no reload.
    let probe = format!(
        "JSON.stringify({{ws: document.getElementById('websockets-total').textContent, \
         web: document.querySelector('tr[data-listener=\"web\"] td:nth-child(3)').textContent, \
         a: document.querySelector('tr[data-server=\"{}\"] td:nth-child(3)').textContent, \
         b: document.querySelector('tr[data-server=\"{}\"] td:nth-child(3)').textContent, \
         probe: document.querySelector('tr[data-server=\"{}\"] td:nth-child(6)').textContent}})",
        a.addr, b.addr, b.addr
    );
    let started = Instant::now();
    let shown = loop {
        let shown: Value = serde_json::from_str(page.eval(&probe).await.as_str().unwrap_or("{}")).unwrap();
        if shown["ws"] == "7" && shown["b"] == "unhealthy" {
            break shown;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "the page did not follow: {shown}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(shown["web"], "7", "per listener");
    assert_eq!(shown["a"], "healthy");
    assert!(shown["probe"].as_str().unwrap().contains("failed"), "{shown}");
    let plugin_row = page.eval("document.getElementById('plugins').textContent").await;
    assert!(plugin_row.as_str().unwrap().contains("guard"), "{plugin_row}");

    let shot = page.call("Page.captureScreenshot", json!({"format": "png"})).await;
    let png = base64::engine::general_purpose::STANDARD.decode(shot["data"].as_str().unwrap()).unwrap();
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "a real screenshot ({} bytes)", png.len());
    let file = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    std::fs::write(&file, &png).unwrap();
    eprintln!("dashboard screenshot: {} ({} bytes)", file.display(), png.len());
}
