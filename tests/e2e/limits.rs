//! Limits a client cannot get around: a slowloris cannot hold the gateway,
//! oversized heads are refused, and past the connection cap new connections
//! are refused cleanly while the ones already in keep being served.

use std::time::{Duration, Instant};

use crate::common::*;
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn config(app: &Backend, limits: &str) -> String {
    format!(
        "[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\ndefault_pool = \"app\"\n\
         [[pool]]\nname = \"app\"\nservers = [\"{}\"]\n[limits]\n{limits}\n",
        app.addr
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_slowloris_connections_neither_delay_requests_nor_stay() {
    let app = Backend::start("app").await;
    let gateway = start_gateway(&config(&app, "header_read_timeout_s = 1"), &PluginDir::new()).await;
    let addr = web(&gateway);

    // 1,000 clients that start a request head and never finish it.
    let mut slow = Vec::new();
    for _ in 0..1000 {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        stream.write_all(b"GET / HTTP/1.1\r\nHost: gw.test\r\nX-Slow: ").await.unwrap();
        slow.push(stream);
    }
    // Normal requests are served at once meanwhile.
    for _ in 0..20 {
        let started = Instant::now();
        assert_eq!(get(addr, "/").await.status, StatusCode::OK);
        assert!(started.elapsed() < Duration::from_millis(500), "took {:?}", started.elapsed());
    }
    // One more, timed on its own: open until its 1 s header timeout, closed
    // within the README's bound after it.
    let mut last = tokio::net::TcpStream::connect(addr).await.expect("connect");
    last.write_all(b"GET / HTTP/1.1\r\nHost: gw.test\r\nX-Slow: ").await.unwrap();
    let last_started = Instant::now();
    let mut buf = [0u8; 512];
    let early = tokio::time::timeout(Duration::from_millis(800), last.read(&mut buf)).await;
    assert!(early.is_err(), "closed before its header timeout: {early:?}");
    loop {
        match tokio::time::timeout(Duration::from_secs(5), last.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(_)) => continue, // a 408 before the close is fine
            Err(_) => panic!("still open 5.8 s after its head started"),
        }
    }
    let lived = last_started.elapsed();
    assert!(lived < Duration::from_secs(1) + CI_MARGIN, "closed {lived:?} after its head started, not at 1 s");

    // By now every earlier slow connection is closed too.
    let started = Instant::now();
    for stream in &mut slow {
        let mut buf = [0u8; 512];
        let closed = loop {
            match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break true,
                Ok(Ok(_)) => continue, // a 408 before the close is fine
                Err(_) => break false,
            }
        };
        assert!(closed, "a slowloris connection was still open");
    }
    assert!(started.elapsed() < CI_MARGIN, "the earlier ones were closed already");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_request_head_is_refused() {
    let app = Backend::start("app").await;
    let gateway = start_gateway(&config(&app, "max_header_bytes = 16384"), &PluginDir::new()).await;
    let big = "x".repeat(20_000);
    let raw = format!("GET / HTTP/1.1\r\nHost: gw.test\r\nX-Big: {big}\r\n\r\n");
    let answer = raw_exchange(web(&gateway), &raw).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{}", &answer[..answer.len().min(200)]);
    assert!(app.requests().is_empty());
    assert_eq!(get(web(&gateway), "/").await.status, StatusCode::OK, "normal heads still pass");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_connection_cap_new_connections_are_refused() {
    let app = Backend::start("app").await;
    let gateway = start_gateway(&config(&app, "max_connections = 3"), &PluginDir::new()).await;
    let addr = web(&gateway);
    // Three WebSockets fill the cap.
    let mut sockets = Vec::new();
    for _ in 0..3 {
        sockets.push(ws_connect(addr, "/ws", &[]).await.0);
    }
    // A fourth connection is closed at once, without an answer.
    let mut extra = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _ = extra.write_all(b"GET / HTTP/1.1\r\nHost: gw.test\r\n\r\n").await;
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(2), extra.read(&mut buf)).await.expect("closed promptly");
    assert!(matches!(read, Ok(0) | Err(_)), "refused, not served: {read:?}");
    // The ones in keep working; when one closes, a new client gets in.
    futures_util::SinkExt::send(&mut sockets[0], tokio_tungstenite::tungstenite::Message::text("in")).await.unwrap();
    assert_eq!(next_message(&mut sockets[0]).await, tokio_tungstenite::tungstenite::Message::text("in"));
    drop(sockets.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(Ok((status, _))) = tokio::time::timeout(Duration::from_secs(1), try_get_root(addr)).await {
            assert_eq!(status, StatusCode::OK);
            break;
        }
        assert!(Instant::now() < deadline, "never admitted again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads until the peer closes; how long that took (panics after `limit`).
async fn closed_within(stream: &mut tokio::net::TcpStream, limit: Duration) -> Duration {
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(limit, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return started.elapsed(),
            Ok(Ok(_)) => continue, // a GOAWAY or settings before the close
            Err(_) => panic!("still open {limit:?} later"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_preface_only_connections_are_closed_at_the_header_timeout() {
    let app = Backend::start("app").await;
    let gateway = start_gateway(&config(&app, "header_read_timeout_s = 1"), &PluginDir::new()).await;
    let addr = web(&gateway);
    // Connects and sends nothing: the protocol is never sniffed.
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    // Sends the HTTP/2 preface and an empty SETTINGS frame, then nothing.
    let mut preface = tokio::net::TcpStream::connect(addr).await.unwrap();
    preface.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00").await.unwrap();
    for (what, stream) in [("silent", &mut silent), ("preface only", &mut preface)] {
        let lived = closed_within(stream, Duration::from_secs(10)).await;
        assert!(lived < Duration::from_secs(1) + Duration::from_secs(1) + CI_MARGIN, "{what}: closed after {lived:?}");
    }
    assert_eq!(get(addr, "/").await.status, StatusCode::OK, "others are served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keep_alive_connection_left_idle_is_closed_at_the_idle_timeout() {
    let app = Backend::start("app").await;
    let gateway = start_gateway(&config(&app, "client_idle_timeout_s = 1"), &PluginDir::new()).await;
    let mut stream = tokio::net::TcpStream::connect(web(&gateway)).await.unwrap();
    stream.write_all(b"GET / HTTP/1.1\r\nHost: gw.test\r\n\r\n").await.unwrap();
    let mut head = Vec::new();
    while !String::from_utf8_lossy(&head).contains("checksum=") {
        let mut buf = [0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "closed before answering");
        head.extend_from_slice(&buf[..n]);
    }
    // Kept alive past a short pause, then closed once idle for 1 s.
    let lived = closed_within(&mut stream, Duration::from_secs(10)).await;
    assert!(lived >= Duration::from_millis(900), "closed after {lived:?}, before the idle timeout");
    assert!(lived < Duration::from_secs(1) + Duration::from_secs(1) + CI_MARGIN, "closed after {lived:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_is_503_and_never_ejects_the_backend() {
    let app = Backend::start("app").await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\nallowed_hosts = [\"gw.test\"]\n[limits]\nmax_connections = 1000\nmax_concurrent_streams = 200\n\
             [[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\ndefault_pool = \"app\"\n\
             [[pool]]\nname = \"app\"\nservers = [\"{}\"]\nrequest_timeout_s = 10\n",
            app.addr
        ),
    )
    .unwrap();
    // 120 open files in all: one HTTP/2 connection asking for 150 slow
    // responses at once (its stream limit raised to 200 for this) needs
    // more upstream sockets than that. With max_connections above the
    // limit, the process's upstream budget is a quarter of it (30).
    let gateway = GatewayProcess::start_limited(&config, &dir.path().join("gateway.log"), 2, Some(120)).await;
    let answers = h2_burst(gateway.addr("web"), "/slow/", 150).await;
    let short = answers.get(&(StatusCode::SERVICE_UNAVAILABLE, Some("out-of-resources".to_owned()))).copied();
    assert!(short.is_some_and(|n| n > 0), "the descriptors ran out: {answers:?}");
    assert!(answers.get(&(StatusCode::OK, None)).is_some_and(|n| *n > 0), "{answers:?}");
    assert_eq!(answers.len(), 2, "only served or out-of-resources: {answers:?}");

    // The backend did nothing wrong: still healthy, and serving.
    let status = status(gateway.addr("admin")).await;
    assert_eq!(status["pools"][0]["servers"][0]["healthy"], true, "{status}");
    assert_eq!(get(gateway.addr("web"), "/after").await.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_clients_are_told_the_stream_limit() {
    let app = Backend::start("app").await;
    let gateway = start_gateway(&config(&app, "max_concurrent_streams = 7"), &PluginDir::new()).await;
    let mut stream = tokio::net::TcpStream::connect(web(&gateway)).await.unwrap();
    stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00").await.unwrap();
    // The server's first frame is its SETTINGS: 9-byte header, then
    // 6-byte (identifier, value) pairs.
    let mut header = [0u8; 9];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut header)).await.unwrap().unwrap();
    assert_eq!(header[3], 0x4, "a SETTINGS frame first");
    let length = usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
    let mut payload = vec![0u8; length];
    stream.read_exact(&mut payload).await.unwrap();
    let settings: Vec<(u16, u32)> = payload
        .chunks(6)
        .map(|p| (u16::from_be_bytes([p[0], p[1]]), u32::from_be_bytes([p[2], p[3], p[4], p[5]])))
        .collect();
    // SETTINGS_MAX_CONCURRENT_STREAMS (0x3).
    assert!(settings.contains(&(0x3, 7)), "{settings:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_protocol_is_told_right_when_the_first_bytes_come_in_pieces() {
    let app = Backend::start("app").await;
    let gateway = start_gateway(&config(&app, ""), &PluginDir::new()).await;
    // The gateway reads what has come before it serves: a first piece that
    // may still be HTTP/2's preface is not taken for HTTP/1.1, nor the
    // other way round.
    let pieces: [(&str, bool, &[&[u8]]); 3] = [
        (
            "h2c, the preface cut short",
            true,
            &[b"PRI * HT", b"TP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00"],
        ),
        ("h2c, one byte first", true, &[b"P", b"RI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00"]),
        ("HTTP/1.1, one byte first", false, &[b"G", b"ET /split HTTP/1.1\r\nHost: gw.test\r\n\r\n"]),
    ];
    for (what, h2, pieces) in pieces {
        let mut stream = tokio::net::TcpStream::connect(web(&gateway)).await.unwrap();
        for piece in pieces {
            stream.write_all(piece).await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut head = [0u8; 12];
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut head)).await.unwrap().unwrap();
        if h2 {
            assert_eq!(head[3], 0x4, "{what}: a SETTINGS frame first, got {:?}", String::from_utf8_lossy(&head));
        } else {
            assert_eq!(&head, b"HTTP/1.1 200", "{what}");
        }
    }
}

/// Sends `n` requests for `path` at once on one HTTP/2 connection to
/// `addr`; returns how many got each (status, `x-wasmgate-error`).
async fn h2_burst(
    addr: std::net::SocketAddr,
    path: &str,
    n: usize,
) -> std::collections::BTreeMap<(StatusCode, Option<String>), usize> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (h2, connection) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tcp))
            .await
            .expect("h2c handshake");
    tokio::spawn(connection);
    let streams: Vec<_> = (0..n)
        .map(|i| {
            let mut h2 = h2.clone();
            let uri = format!("http://gw.test{path}{i}");
            tokio::spawn(async move {
                let request =
                    http::Request::builder().uri(uri).body(http_body_util::Empty::<bytes::Bytes>::new()).unwrap();
                let response = h2.send_request(request).await.expect("an answer");
                let code = response.headers().get("x-wasmgate-error").map(|v| v.to_str().unwrap().to_owned());
                (response.status(), code)
            })
        })
        .collect();
    let mut answers = std::collections::BTreeMap::new();
    for stream in streams {
        *answers.entry(stream.await.unwrap()).or_insert(0) += 1;
    }
    answers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pools_connection_limit_holds_against_one_clients_streams_and_ejects_nothing() {
    let (app, other) = (Backend::start("app").await, Backend::start("other").await);
    let config = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\nallowed_hosts = [\"gw.test\"]\n\
         [[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\ndefault_pool = \"app\"\n\
         [[listener]]\nname = \"side\"\nbind = \"127.0.0.1:0\"\ndefault_pool = \"other\"\n\
         [[pool]]\nname = \"app\"\nservers = [\"{}\"]\nmax_connections = 4\n[pool.probe]\ninterval_s = 3600\n\
         [[pool]]\nname = \"other\"\nservers = [\"{}\"]\n",
        app.addr, other.addr
    );
    let gateway = start_gateway(&config, &PluginDir::new()).await;
    let admin = gateway.admin_addr().expect("admin");
    // 20 slow requests (3 s each) at once on one HTTP/2 connection.
    let burst = tokio::spawn(h2_burst(web(&gateway), "/slow/", 20));
    // Well inside the 3 s the slow requests take.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let during = status(admin).await;
    let pool = during["pools"].as_array().unwrap().iter().find(|p| p["name"] == "app").unwrap().clone();
    assert_eq!(pool["upstream_connections"], serde_json::json!({"open": 4, "limit": 4}), "{during}");
    assert!(during["upstream_connections"]["open"].as_u64().unwrap() >= 4, "{during}");
    // The other pool is not held up.
    assert_eq!(get(gateway.listener_addr("side").unwrap(), "/").await.status, StatusCode::OK);

    let answers = burst.await.unwrap();
    assert_eq!(answers.get(&(StatusCode::OK, None)), Some(&4), "{answers:?}");
    assert_eq!(answers.get(&(StatusCode::SERVICE_UNAVAILABLE, Some("out-of-resources".to_owned()))), Some(&16));
    // Nothing was the backend's fault: healthy, and serving.
    let after = status(admin).await;
    let pool = after["pools"].as_array().unwrap().iter().find(|p| p["name"] == "app").unwrap().clone();
    assert_eq!(pool["servers"][0]["healthy"], true, "{after}");
    assert_eq!(get(web(&gateway), "/after").await.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_body_that_drips_is_cut_at_the_pools_request_timeout() {
    let app = Backend::start("app").await;
    let config = format!(
        "[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\ndefault_pool = \"app\"\n\
         [[pool]]\nname = \"app\"\nservers = [\"{}\"]\nrequest_timeout_s = 2\n",
        app.addr
    );
    let gateway = start_gateway(&config, &PluginDir::new()).await;
    let mut stream = tokio::net::TcpStream::connect(web(&gateway)).await.unwrap();
    stream.write_all(b"POST /upload HTTP/1.1\r\nHost: gw.test\r\nContent-Length: 1000\r\n\r\n").await.unwrap();
    let started = Instant::now();
    // One byte every 200 ms: always moving, never done. The backend reads
    // the whole body before it answers, so no response head comes.
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while started.elapsed() < Duration::from_secs(10) {
        if stream.write_all(b"x").await.is_err() {
            break;
        }
        match tokio::time::timeout(Duration::from_millis(200), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => answer.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
    }
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 504"), "{text}");
    assert!(text.contains("x-wasmgate-error: backend-timeout"), "{text}");
    let lived = started.elapsed();
    assert!(lived < Duration::from_secs(2) + Duration::from_secs(1) + CI_MARGIN, "cut after {lived:?}");
    assert!(app.requests().is_empty(), "the backend never had a whole request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_never_take_the_places_another_server_needs() {
    let backends = [Backend::start("a").await, Backend::start("b").await, Backend::start("c").await];
    let servers: Vec<String> = backends.iter().map(|b| format!("\"{}\"", b.addr)).collect();
    let config = format!(
        "[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\ndefault_pool = \"app\"\n\
         [[pool]]\nname = \"app\"\nservers = [{}]\nbalance = \"round-robin\"\nmax_connections = 2\n\
         [pool.probe]\ninterval_s = 3600\n",
        servers.join(", ")
    );
    let gateway = start_gateway(&config, &PluginDir::new()).await;
    // One at a time, round-robin over three servers with a limit of two:
    // no idle connection to one server may leave none for the next.
    for i in 0..9 {
        let got = get(web(&gateway), &format!("/{i}")).await;
        assert_eq!(got.status, StatusCode::OK, "request {i}: {:?}", got.header("x-wasmgate-error"));
    }
    assert!(backends.iter().all(|b| b.requests().len() == 3));
}
