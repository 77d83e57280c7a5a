//! Graceful shutdown of a real gateway process: SIGTERM lets the request in
//! flight finish and closes every WebSocket with Close 1001, spread over the
//! drain window, then the process exits 0.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use http::StatusCode;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_requests_and_drains_websockets_with_close_1001() {
    let app = Backend::start("app").await;
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[plugins]\ndir = \"plugins\"\n\
             [[listener]]\nname = \"web\"\nbind = \"127.0.0.1:{port}\"\ndefault_pool = \"app\"\n\
             [[pool]]\nname = \"app\"\nservers = [\"{}\"]\n[websocket]\ndrain_s = 2\n",
            app.addr
        ),
    )
    .unwrap();
    let mut gateway = Command::new(env!("CARGO_BIN_EXE_wasmgate"))
        .args(["run", "--config"])
        .arg(&config)
        .env("XDG_CACHE_HOME", dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start wasmgate");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let started = Instant::now();
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(started.elapsed() < Duration::from_secs(10), "gateway never listened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let mut sockets = Vec::new();
    for _ in 0..100 {
        sockets.push(ws_connect(addr, "/ws", &[]).await.0);
    }
    let slow = tokio::spawn(async move { get(addr, "/slow").await });
    tokio::time::sleep(Duration::from_millis(200)).await;

    let terminated = Instant::now();
    let status = Command::new("kill").args(["-TERM", &gateway.id().to_string()]).status().unwrap();
    assert!(status.success());

    // Every client gets a Close 1001; note when.
    let closes = futures_util::future::join_all(sockets.into_iter().map(|mut ws| async move {
        loop {
            match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
                Ok(Some(Ok(Message::Close(Some(frame))))) => {
                    return Some((u16::from(frame.code), frame.reason.to_string(), terminated.elapsed()));
                }
                Ok(Some(Ok(_))) => continue,
                _ => return None,
            }
        }
    }))
    .await;
    let slow = slow.await.unwrap();
    assert_eq!(slow.status, StatusCode::OK, "the request in flight finished");

    let mut times = Vec::new();
    for close in &closes {
        let (code, reason, at) = close.clone().expect("every WebSocket got a Close frame");
        assert_eq!((code, reason.as_str()), (1001, "gateway shutting down"));
        times.push(at);
    }
    times.sort();
    let (first, median, last) = (times[0], times[50], times[99]);
    eprintln!("closes: first {first:?}, median {median:?}, last {last:?}");
    assert!(last < Duration::from_millis(2600), "all within the 2 s window: {last:?}");
    assert!(median > Duration::from_millis(600) && median < Duration::from_millis(1400), "spread: {median:?}");
    assert!(last - first > Duration::from_millis(1200), "not in one burst: {first:?}..{last:?}");

    let deadline = Instant::now() + Duration::from_secs(10);
    let exit = loop {
        if let Some(status) = gateway.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "gateway did not exit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(exit.success(), "exit status {exit}");
}
