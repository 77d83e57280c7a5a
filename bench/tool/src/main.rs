//! The backend and the WebSocket loads of `bench/compare`, the same for
//! every proxy it measures (HTTP loads are wrk's):
//!
//! - `backend ADDR`: `GET /64` (and `/`) and `GET /1k` answer 64 and 1024 bytes;
//!   `/ws` is a WebSocket echo (binary and text, no greeting).
//! - `echo ADDR --connections N --size B --seconds S`: N WebSockets, each
//!   sending a B-byte message and waiting for its echo, for S seconds.
//! - `bulk ADDR --size B --seconds S`: one WebSocket, B-byte messages, up to
//!   four in flight.
//! - `handshakes ADDR --connections N --seconds S`: N loops of connect,
//!   handshake, Close.
//! - `idle ADDR --count N --hold S`: N WebSockets opened (64 at a time),
//!   held S seconds, then closed.
//!
//! - `report RESULTS.tsv --markdown F --chart F [--date --commit --machine
//!   --versions --setup TEXT]`: the figures as bench/RESULTS.md and its chart.
//!
//! Each load prints one line of `key=value` figures on stdout; a load that
//! meets an error says so on stderr and exits 1. Every load is bounded in
//! time (and the idle one in count).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, UPGRADE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

mod report;

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// No load runs longer than this, whatever it is asked.
const LONGEST: Duration = Duration::from_secs(600);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => return fail(format!("cannot start a runtime: {e}")),
    };
    let result = match args.first().map(String::as_str) {
        Some("backend") => runtime.block_on(backend(&args[1..])),
        Some("report") => report::report(&args[1..]),
        Some(load @ ("echo" | "bulk" | "handshakes" | "idle")) => match Options::parse(&args[1..]) {
            Ok(options) => runtime.block_on(async {
                match load {
                    "echo" => echo(options).await,
                    "bulk" => bulk(options).await,
                    "handshakes" => handshakes(options).await,
                    _ => idle(options).await,
                }
            }),
            Err(e) => Err(e),
        },
        _ => Err("usage: wasmgate-bench backend ADDR | echo|bulk|handshakes|idle ADDR [--connections N] [--size B] \
                  [--seconds S] [--count N] [--hold S]"
            .into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

fn fail(message: String) -> ExitCode {
    eprintln!("wasmgate-bench: {message}");
    ExitCode::FAILURE
}

/// A load's settings.
struct Options {
    addr: SocketAddr,
    connections: usize,
    size: usize,
    seconds: Duration,
    count: usize,
    hold: Duration,
}

impl Options {
    fn parse(args: &[String]) -> Result<Options, String> {
        let addr = args.first().ok_or("no address")?;
        let addr = addr.parse().map_err(|e| format!("`{addr}` is not ip:port: {e}"))?;
        let mut options = Options {
            addr,
            connections: 64,
            size: 128,
            seconds: Duration::from_secs(5),
            count: 1000,
            hold: Duration::from_secs(5),
        };
        let mut rest = args[1..].iter();
        while let Some(flag) = rest.next() {
            let value = rest.next().ok_or_else(|| format!("{flag} needs a value"))?;
            let number: u64 = value.parse().map_err(|e| format!("{flag} {value}: {e}"))?;
            match flag.as_str() {
                "--connections" => options.connections = number.clamp(1, 10_000) as usize,
                "--size" => options.size = number.clamp(1, 64 << 20) as usize,
                "--seconds" => options.seconds = Duration::from_secs(number).min(LONGEST),
                "--count" => options.count = number.clamp(1, 19_000) as usize,
                "--hold" => options.hold = Duration::from_secs(number).min(LONGEST),
                _ => return Err(format!("unknown flag {flag}")),
            }
        }
        Ok(options)
    }
}

async fn backend(args: &[String]) -> Result<(), String> {
    let addr = args.first().ok_or("usage: wasmgate-bench backend ADDR")?;
    let listener = TcpListener::bind(addr).await.map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    eprintln!("wasmgate-bench backend: listening on {addr}");
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(answer);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
        });
    }
}

static SMALL: [u8; 64] = [b'x'; 64];
static KIB: [u8; 1024] = [b'x'; 1024];

async fn answer(mut req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let mut response = Response::new(Full::default());
    match req.uri().path() {
        // `/` too: the probes of wasmgate's pool.
        "/" | "/64" => *response.body_mut() = Full::new(Bytes::from_static(&SMALL)),
        "/1k" => *response.body_mut() = Full::new(Bytes::from_static(&KIB)),
        "/ws" => {
            let Some(key) = req.headers().get(SEC_WEBSOCKET_KEY).map(|k| derive_accept_key(k.as_bytes())) else {
                *response.status_mut() = StatusCode::BAD_REQUEST;
                return Ok(response);
            };
            let on_upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let Ok(upgraded) = on_upgrade.await else { return };
                let mut ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
                while let Some(Ok(message)) = ws.next().await {
                    if (message.is_binary() || message.is_text()) && ws.send(message).await.is_err() {
                        break;
                    }
                }
            });
            *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            let headers = response.headers_mut();
            headers.insert(UPGRADE, "websocket".parse().unwrap_or_else(|_| unreachable!()));
            headers.insert(CONNECTION, "Upgrade".parse().unwrap_or_else(|_| unreachable!()));
            if let Ok(key) = key.parse() {
                headers.insert(SEC_WEBSOCKET_ACCEPT, key);
            }
        }
        _ => *response.status_mut() = StatusCode::NOT_FOUND,
    }
    Ok(response)
}

/// A WebSocket to `/ws` at `addr`.
async fn open(addr: SocketAddr) -> Result<Socket, String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| format!("connect {addr}: {e}"))?;
    let _ = stream.set_nodelay(true);
    let url = format!("ws://{addr}/ws");
    let (socket, response) = tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(stream))
        .await
        .map_err(|e| format!("handshake through {addr}: {e}"))?;
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        return Err(format!("handshake through {addr}: {}", response.status()));
    }
    Ok(socket)
}

/// The `q` quantile of sorted microseconds.
fn quantile(sorted: &[u32], q: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

async fn echo(options: Options) -> Result<(), String> {
    let payload = Bytes::from(vec![b'e'; options.size]);
    let mut sockets = Vec::with_capacity(options.connections);
    for _ in 0..options.connections {
        sockets.push(open(options.addr).await?);
    }
    let started = Instant::now();
    let deadline = started + options.seconds;
    let tasks: Vec<_> = sockets
        .into_iter()
        .map(|mut ws| {
            let payload = payload.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                while Instant::now() < deadline && latencies.len() < 10_000_000 {
                    let sent = Instant::now();
                    ws.send(Message::Binary(payload.clone())).await.map_err(|e| format!("send: {e}"))?;
                    match ws.next().await {
                        Some(Ok(Message::Binary(back))) if back.len() == payload.len() => {}
                        other => return Err(format!("expected the echo, got {other:?}")),
                    }
                    latencies.push(sent.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                }
                let _ = ws.close(None).await;
                Ok::<_, String>(latencies)
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.map_err(|e| e.to_string())??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_unstable();
    println!(
        "messages={} seconds={elapsed:.3} per_second={:.0} p50_us={} p99_us={}",
        all.len(),
        all.len() as f64 / elapsed,
        quantile(&all, 0.5),
        quantile(&all, 0.99)
    );
    Ok(())
}

async fn bulk(options: Options) -> Result<(), String> {
    let payload = Bytes::from(vec![b'b'; options.size]);
    let (mut sink, mut stream) = open(options.addr).await?.split();
    let in_flight = Arc::new(tokio::sync::Semaphore::new(4));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let deadline = started + options.seconds;
    let sender = {
        let (in_flight, stop) = (in_flight.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let Ok(permit) = in_flight.acquire().await else { break };
                permit.forget();
                if sink.send(Message::Binary(payload.clone())).await.is_err() {
                    break;
                }
            }
            sink
        })
    };
    let mut bytes = 0u64;
    while Instant::now() < deadline {
        match tokio::time::timeout_at(deadline.into(), stream.next()).await {
            Ok(Some(Ok(Message::Binary(back)))) if back.len() == options.size => {
                bytes += back.len() as u64;
                in_flight.add_permits(1);
            }
            Ok(other) => return Err(format!("expected the echo, got {other:?}")),
            Err(_) => break,
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    in_flight.close();
    println!("bytes={bytes} seconds={elapsed:.3} mb_per_second={:.1}", bytes as f64 / elapsed / 1e6);
    if let Ok(Ok(mut sink)) = tokio::time::timeout(Duration::from_secs(5), sender).await {
        let _ = sink.close().await;
    }
    Ok(())
}

async fn handshakes(options: Options) -> Result<(), String> {
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + options.seconds;
    let tasks: Vec<_> = (0..options.connections)
        .map(|_| {
            let done = done.clone();
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    let mut ws = open(options.addr).await?;
                    ws.close(None).await.map_err(|e| format!("close: {e}"))?;
                    // The Close comes back, then the end of the stream.
                    while let Some(Ok(_)) = ws.next().await {}
                    done.fetch_add(1, Ordering::Relaxed);
                }
                Ok::<_, String>(())
            })
        })
        .collect();
    for task in tasks {
        task.await.map_err(|e| e.to_string())??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let done = done.load(Ordering::Relaxed);
    println!("handshakes={done} seconds={elapsed:.3} per_second={:.0}", done as f64 / elapsed);
    Ok(())
}

async fn idle(options: Options) -> Result<(), String> {
    let started = Instant::now();
    let mut sockets = Vec::with_capacity(options.count);
    while sockets.len() < options.count {
        let batch = (options.count - sockets.len()).min(64);
        let opened = futures_util::future::join_all((0..batch).map(|_| open(options.addr))).await;
        for socket in opened {
            sockets.push(socket?);
        }
        if started.elapsed() > LONGEST {
            return Err(format!("only {} WebSockets opened in {LONGEST:?}", sockets.len()));
        }
    }
    println!("open={} seconds={:.3}", sockets.len(), started.elapsed().as_secs_f64());
    tokio::time::sleep(options.hold).await;
    let closing = Instant::now();
    let count = sockets.len();
    futures_util::future::join_all(sockets.into_iter().map(|mut ws| async move {
        let _ = tokio::time::timeout(Duration::from_secs(10), async {
            ws.close(None).await.ok()?;
            while let Some(Ok(_)) = ws.next().await {}
            Some(())
        })
        .await;
    }))
    .await;
    println!("closed={count} seconds={:.3}", closing.elapsed().as_secs_f64());
    Ok(())
}
