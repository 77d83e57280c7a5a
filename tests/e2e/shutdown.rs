//! Graceful shutdown of a real gateway process: SIGTERM lets the request in
//! flight finish and closes every WebSocket with Close 1001, spread over the
//! drain window, then the process exits 0.

use std::time::{Duration, Instant};

use crate::common::*;
use futures_util::StreamExt;
use http::StatusCode;
use tokio_tungstenite::tungstenite::Message;

/// The tests here time real processes; run one at a time so the other's
/// load does not skew the timing.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_requests_and_drains_websockets_with_close_1001() {
    let _one = ONE_AT_A_TIME.lock().await;
    let app = Backend::start("app").await;
    let dir = tempfile::tempdir().unwrap();
    let gateway = spawn_gateway(dir.path(), "gateway", 0, &app, 2).await;
    assert!(gateway.log_text().contains("threads=\"one worker per CPU\""), "{}", gateway.log_text());
    drains_websockets_and_finishes_requests(gateway).await;
}

/// The same on one CPU, where the gateway runs a single current-thread
/// runtime: requests, 100 WebSockets, their spread Close 1001s on SIGTERM
/// and the process's exit all happen on that one thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_one_cpu_the_single_threaded_gateway_serves_and_drains_the_same() {
    let _one = ONE_AT_A_TIME.lock().await;
    let app = Backend::start("app").await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "gateway", 0, &app, 2);
    let gateway = GatewayProcess::start_on_one_cpu(&config, &dir.path().join("gateway.log"), 1).await;
    assert!(gateway.log_text().contains("cpus=1 threads=\"one (current-thread)\""), "{}", gateway.log_text());
    drains_websockets_and_finishes_requests(gateway).await;
}

/// SIGTERM with 100 WebSockets open and a slow request in flight: the
/// request finishes, every WebSocket gets a Close 1001 at its own moment of
/// the 2 s window, and the process exits 0.
async fn drains_websockets_and_finishes_requests(mut gateway: GatewayProcess) {
    let addr = gateway.addr("web");

    let mut sockets = Vec::new();
    for _ in 0..100 {
        sockets.push(ws_connect(addr, "/ws", &[]).await.0);
    }
    let slow = tokio::spawn(async move { get(addr, "/slow").await });
    tokio::time::sleep(Duration::from_millis(200)).await;

    let terminated = Instant::now();
    gateway.signal("TERM");

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
    eprintln!("closes after SIGTERM: first {first:?}, median {median:?}, last {last:?}");
    // The window opens when the process handles the signal, which a busy
    // machine can delay; the spread is measured from the first close (the
    // earliest of 100 uniform draws lies ~1% into the window).
    assert!(first < Duration::from_secs(2), "draining started: {first:?}");
    let (median, last) = (median - first, last - first);
    assert!(last < Duration::from_millis(2300), "all within the 2 s window: {last:?}");
    assert!(last > Duration::from_millis(1200), "not in one burst: {last:?}");
    assert!(median > Duration::from_millis(500) && median < Duration::from_millis(1500), "uniform spread: {median:?}");

    let exit = gateway.exited(Duration::from_secs(10)).await;
    assert!(exit.success(), "exit status {exit}");
}

/// Starts `wasmgate run` on `port` (0: any) in front of `backend`; returns
/// once it listens (another process may already listen there).
async fn spawn_gateway(
    dir: &std::path::Path,
    name: &str,
    port: u16,
    backend: &Backend,
    drain_s: u64,
) -> GatewayProcess {
    let config = write_config(dir, name, port, backend, drain_s);
    GatewayProcess::start(&config, &dir.join(format!("{name}.log")), 1).await
}

/// The config [`spawn_gateway`] runs: listener `web` on `port` in front of
/// `backend`, WebSockets drained over `drain_s`.
fn write_config(dir: &std::path::Path, name: &str, port: u16, backend: &Backend, drain_s: u64) -> std::path::PathBuf {
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            "[plugins]\ndir = \"plugins\"\n\
             [[listener]]\nname = \"web\"\nbind = \"127.0.0.1:{port}\"\ndefault_pool = \"app\"\n\
             [[pool]]\nname = \"app\"\nservers = [\"{}\"]\n[websocket]\ndrain_s = {drain_s}\n",
            backend.addr
        ),
    )
    .unwrap();
    config
}

/// Sets `net.ipv4.tcp_migrate_req` (Linux ≥ 5.14) for the test and puts the
/// old value back after: with it, connections queued on a closing
/// SO_REUSEPORT listener move to the new process instead of being reset.
/// The README's handover procedure asks operators for the same setting.
struct MigrateRequests(String);

const MIGRATE_REQ: &str = "/proc/sys/net/ipv4/tcp_migrate_req";

impl MigrateRequests {
    fn enable() -> MigrateRequests {
        let old = std::fs::read_to_string(MIGRATE_REQ).expect("Linux 5.14+ with net.ipv4.tcp_migrate_req");
        std::fs::write(MIGRATE_REQ, "1").expect("setting net.ipv4.tcp_migrate_req needs root (CI runs as root)");
        MigrateRequests(old)
    }
}

impl Drop for MigrateRequests {
    fn drop(&mut self) {
        let _ = std::fs::write(MIGRATE_REQ, self.0.trim());
    }
}

/// What the looping client of the handover test has seen so far.
#[derive(Default)]
struct Tally {
    ok: std::sync::atomic::AtomicU32,
    failed: std::sync::atomic::AtomicU32,
    from_new: std::sync::atomic::AtomicU32,
}

impl Tally {
    fn get(counter: &std::sync::atomic::AtomicU32) -> u32 {
        counter.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn done(&self) -> u32 {
        Self::get(&self.ok) + Self::get(&self.failed)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_process_takes_over_the_port_without_a_failed_request() {
    use std::sync::atomic::Ordering::Relaxed;
    let _one = ONE_AT_A_TIME.lock().await;
    let _migrate = MigrateRequests::enable();
    let (old_backend, new_backend) = (Backend::start("old").await, Backend::start("new").await);
    let dir = tempfile::tempdir().unwrap();
    let mut old = spawn_gateway(dir.path(), "old", 0, &old_backend, 1).await;
    let addr = old.addr("web");

    // A client looping requests, each on a new connection, for the whole
    // handover: counted, so the phases below are measured in requests.
    let tally = std::sync::Arc::new(Tally::default());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client = {
        let (tally, stop) = (tally.clone(), stop.clone());
        tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(Relaxed) && Instant::now() < deadline {
                match try_get(addr).await {
                    Some(body) => {
                        tally.ok.fetch_add(1, Relaxed);
                        tally.from_new.fetch_add(u32::from(body.contains("backend=new")), Relaxed);
                    }
                    None => _ = tally.failed.fetch_add(1, Relaxed),
                }
            }
        })
    };
    let after = |n: u32| {
        let tally = tally.clone();
        async move { wait_until(&format!("{n} requests"), Duration::from_secs(30), || tally.done() >= n).await }
    };
    after(250).await;
    assert_eq!(Tally::get(&tally.from_new), 0, "only the old process serves before the new one starts");

    // The new process binds the same port; then the old one is told to stop.
    let mut new = spawn_gateway(dir.path(), "new", addr.port(), &new_backend, 1).await;
    after(tally.done() + 250).await;
    old.signal("TERM");
    assert!(old.exited(Duration::from_secs(10)).await.success(), "the old process exits 0");
    // From here on only the new process can answer.
    let (exited_at, new_at_exit) = (tally.done(), Tally::get(&tally.from_new));
    after(exited_at.max(1750) + 250).await;
    stop.store(true, Relaxed);
    client.await.unwrap();
    let (ok, failed, from_new) = (Tally::get(&tally.ok), Tally::get(&tally.failed), Tally::get(&tally.from_new));
    eprintln!("handover: {ok} requests ok, {failed} failed, {from_new} answered by the new process");
    new.signal("TERM");
    let _ = new.exited(Duration::from_secs(10)).await;
    assert_eq!(failed, 0, "no request failed during the handover");
    assert!(ok >= 2000, "{ok} requests");
    // Every request that started after the old process exited (one may have
    // been under way at that moment) was answered by the new one.
    assert!(from_new - new_at_exit + 1 >= ok - exited_at, "{from_new} from new, {new_at_exit} at exit, {exited_at}");
    assert!(from_new * 4 >= ok * 3, "about three quarters from the new process: {from_new} of {ok}");
}

/// One GET over a new connection; `None` (and why, on stderr) if it failed.
async fn try_get(addr: std::net::SocketAddr) -> Option<String> {
    match try_get_root(addr).await {
        Ok((StatusCode::OK, body)) => Some(body),
        Ok((status, _)) => {
            eprintln!("request failed: status {status}");
            None
        }
        Err(why) => {
            eprintln!("request failed: {why}");
            None
        }
    }
}
