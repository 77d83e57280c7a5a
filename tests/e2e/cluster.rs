//! Running more than one instance: three `wasmgate run` processes share
//! their rate-limit counts through a real `redis-server` (Debian's, on a
//! Unix socket in the test's directory), keep serving while it is down, and
//! share again when it is back.

use std::path::{Path, PathBuf};
use std::time::Duration;

use http::StatusCode;

use crate::common::*;

/// A `redis-server` of the test's own, stopped when dropped.
struct RedisServer {
    child: std::process::Child,
    socket: PathBuf,
}

impl RedisServer {
    async fn start(dir: &Path) -> RedisServer {
        let socket = dir.join("redis.sock");
        let _ = std::fs::remove_file(&socket);
        let child = std::process::Command::new("redis-server")
            .args(["--port", "0", "--save", "", "--appendonly", "no", "--unixsocket"])
            .arg(&socket)
            .args(["--dir"])
            .arg(dir)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (apt: redis-server; scripts/test installs it)");
        let ready = socket.clone();
        wait_until("redis-server's socket", Duration::from_secs(10), || ready.exists()).await;
        RedisServer { child, socket }
    }

    fn url(&self) -> String {
        format!("redis+unix://{}", self.socket.display())
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Ten requests per client address a day, counted by the first-party WAF:
/// the outage test, whose steps are seconds apart. Every guard here has a
/// 100 ms call deadline: a debug build's first call, under the whole
/// suite's load, once overran the default 10 ms (a 503 that says nothing
/// about counting).
const GUARD: &str = "call_timeout_ms = 100\n[config]\nrate_limit = \"10/86400s\"\n";

/// A hundred requests per client address per 10 s: the burst tests.
const BURST_LIMIT: usize = 100;
const BURST_GUARD: &str = "call_timeout_ms = 100\n[config]\nrate_limit = \"100/10s\"\n";
const BURST: usize = 600;

/// Waits for the start of a 10 s bucket (they are cut by the wall clock),
/// so a burst of a second or two stays inside one window.
async fn start_of_a_window() {
    let into = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() % 10_000;
    if into > 300 {
        tokio::time::sleep(Duration::from_millis((10_000 - into + 20) as u64)).await;
    }
}

/// Buckets are cut by the wall clock: a one-day window's bucket ends at
/// midnight UTC. A test that would run across it waits until it has passed.
async fn away_from_midnight() {
    let into_day = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() % 86_400;
    let left = 86_400 - into_day;
    if left < 120 {
        tokio::time::sleep(Duration::from_secs(left + 2)).await;
    }
}

/// Three gateways in `dir` sharing counts through `redis` as `counting`
/// says (syncing every 20 ms), each with its own admin listener.
async fn fleet(dir: &Path, app: &Backend, redis: &RedisServer, counting: &str) -> Vec<GatewayProcess> {
    fleet_syncing(dir, app, redis, counting, 20).await
}

async fn fleet_syncing(
    dir: &Path,
    app: &Backend,
    redis: &RedisServer,
    counting: &str,
    sync_interval_ms: u64,
) -> Vec<GatewayProcess> {
    let mut gateways = Vec::new();
    for i in 1..=3 {
        let config = dir.join(format!("gateway-{i}.toml"));
        std::fs::write(
            &config,
            format!(
                "[cluster]\nredis = \"{}\"\nname = \"test\"\ncounting = \"{counting}\"\nsync_interval_ms = {sync_interval_ms}\n\
                 timeout_ms = 250\n\
                 [plugins]\ndir = \".\"\n\
                 [admin]\nlisten = \"127.0.0.1:0\"\nallowed_hosts = [\"gw.test\"]\n\
                 [[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\ndefault_pool = \"app\"\nwaf = [\"handshake-guard\"]\n\
                 [[pool]]\nname = \"app\"\nservers = [\"{}\"]\n",
                redis.url(),
                app.addr
            ),
        )
        .unwrap();
        gateways.push(GatewayProcess::start(&config, &dir.join(format!("gateway-{i}.log")), 2).await);
    }
    gateways
}

/// Sends `n` GETs round-robin over the gateways, `gap` apart; returns how
/// many were let through (200) and how many were limited (429). Any other
/// answer fails the test: no request fails because of counting.
async fn round_robin(gateways: &[GatewayProcess], n: usize, gap: Duration) -> (usize, usize) {
    let (mut allowed, mut limited) = (0, 0);
    for i in 0..n {
        let got = get(gateways[i % gateways.len()].addr("web"), "/").await;
        match got.status {
            StatusCode::OK => allowed += 1,
            StatusCode::TOO_MANY_REQUESTS => limited += 1,
            other => panic!("request {i}: {other} {}", got.body),
        }
        tokio::time::sleep(gap).await;
    }
    (allowed, limited)
}

async fn cluster_status(gateway: &GatewayProcess) -> serde_json::Value {
    status(gateway.addr("admin")).await["cluster"].clone()
}

/// Waits until every gateway's `/status` says Redis is `state` (and, for
/// `up` in `synced`, that it hears the others).
async fn redis_is(gateways: &[GatewayProcess], state: &str) {
    let started = std::time::Instant::now();
    for gateway in gateways {
        loop {
            let cluster = cluster_status(gateway).await;
            if cluster["redis"] == state && (state != "up" || cluster["subscribed"] != false) {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(20), "Redis never `{state}` in /status");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_counting_holds_three_instances_to_one_limit_and_survives_a_redis_outage() {
    let app = Backend::start("app").await;
    let plugins = PluginDir::new().add("handshake-guard", "handshake-guard", BURST_GUARD);
    let mut redis = RedisServer::start(plugins.path()).await;
    let gateways = fleet(plugins.path(), &app, &redis, "exact").await;
    redis_is(&gateways, "up").await;

    // 600 requests over three instances in one window: the limit is the
    // fleet's, not each one's (alone, each would let 100 through: 300).
    start_of_a_window().await;
    assert_eq!(round_robin(&gateways, BURST, Duration::ZERO).await, (BURST_LIMIT, BURST - BURST_LIMIT));
    let cluster = cluster_status(&gateways[0]).await;
    assert_eq!(cluster["counting"], "exact");
    assert_eq!(cluster["redis"], "up");

    // `[cluster]` is read at start: a reload that changes it says so.
    let config = plugins.path().join("gateway-1.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("counting = \"exact\"", "counting = \"synced\"")).unwrap();
    gateways[0].signal("HUP");
    let admin = gateways[0].addr("admin");
    let started = std::time::Instant::now();
    loop {
        let reloads = status(admin).await["reloads"].clone();
        if let Some(last) = reloads.as_array().and_then(|r| r.last())
            && last["version"].as_u64() > Some(1)
        {
            assert_eq!(last["restart_required"], serde_json::json!(["cluster"]), "{last}");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "no reload in /status: {reloads}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(cluster_status(&gateways[0]).await["counting"], "exact", "still counting as it started");

    // Redis goes away: every request is still answered (each instance counts
    // locally, from its own counts), none waits for Redis.
    drop(redis);
    let started = std::time::Instant::now();
    let (allowed, limited) = round_robin(&gateways, 30, Duration::ZERO).await;
    assert_eq!(allowed + limited, 30);
    assert!(started.elapsed() < Duration::from_secs(5), "requests waited for Redis: {:?}", started.elapsed());
    redis_is(&gateways, "down").await;
    let cluster = cluster_status(&gateways[0]).await;
    assert!(cluster["local_counts"].as_u64().unwrap() >= 1, "{cluster}");
    assert_eq!(cluster["outages"], 1);
    let metrics = get(gateways[0].addr("admin"), "/metrics").await.body;
    assert!(metrics.contains("cluster_redis_up 0"), "{metrics}");
    for gateway in &gateways {
        assert_eq!(gateway.log_text().matches("Redis unreachable").count(), 1, "one line per outage");
    }

    // Back (empty): counting is shared again, from zero.
    redis = RedisServer::start(plugins.path()).await;
    redis_is(&gateways, "up").await;
    start_of_a_window().await;
    assert_eq!(round_robin(&gateways, BURST, Duration::ZERO).await, (BURST_LIMIT, BURST - BURST_LIMIT));
    drop(redis);
}

/// `synced` at its default interval (100 ms), 600 requests as fast as one
/// client sends them over three instances: at least the limit gets through,
/// and at most the limit plus what the fleet receives in one interval and
/// Redis's delivery (50 ms allowed), the bound this mode promises.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synced_counting_overshoots_a_burst_by_at_most_one_interval_of_requests() {
    let app = Backend::start("app").await;
    let plugins = PluginDir::new().add("handshake-guard", "handshake-guard", BURST_GUARD);
    let redis = RedisServer::start(plugins.path()).await;
    let gateways = fleet_syncing(plugins.path(), &app, &redis, "synced", 100).await;
    redis_is(&gateways, "up").await;
    start_of_a_window().await;
    let started = std::time::Instant::now();
    let (allowed, limited) = round_robin(&gateways, BURST, Duration::ZERO).await;
    let elapsed = started.elapsed().as_secs_f64();
    assert_eq!(allowed + limited, BURST);
    let per_second = BURST as f64 / elapsed;
    let bound = BURST_LIMIT + (per_second * (0.100 + 0.050)).ceil() as usize;
    eprintln!(
        "synced burst: {allowed} of {BURST} let through in {elapsed:.2} s ({per_second:.0} requests/s): \
         overshoot {}, bound {bound}",
        allowed.saturating_sub(BURST_LIMIT)
    );
    assert!((BURST_LIMIT..=bound).contains(&allowed), "{allowed} let through; the bound is {bound}");
    drop(redis);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synced_counting_merges_every_instances_counts_and_loses_none_to_an_outage() {
    away_from_midnight().await;
    let app = Backend::start("app").await;
    let plugins = PluginDir::new().add("handshake-guard", "handshake-guard", GUARD);
    let mut redis = RedisServer::start(plugins.path()).await;
    let gateways = fleet(plugins.path(), &app, &redis, "synced").await;
    redis_is(&gateways, "up").await;
    assert_eq!(cluster_status(&gateways[0]).await["counting"], "synced");

    // Requests further apart than the sync interval (20 ms) with a margin:
    // each instance has merged the others' counts before its next one.
    let gap = Duration::from_millis(150);
    assert_eq!(round_robin(&gateways, 6, gap).await, (6, 0));

    // Three more while Redis is down, one per instance: counted locally.
    drop(redis);
    redis_is(&gateways, "down").await;
    assert_eq!(round_robin(&gateways, 3, gap).await, (3, 0));

    // Back: the counts taken during the outage are sent then, so the fleet
    // has seen 9 and lets exactly one more through. (Had they been lost,
    // each instance would know only its own 3 and the others' first 4, and
    // let three more through.)
    redis = RedisServer::start(plugins.path()).await;
    redis_is(&gateways, "up").await;
    // The held counts go out 2.5 s after Redis answers, once the others
    // have subscribed again.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(round_robin(&gateways, 6, gap).await, (1, 5));
    drop(redis);
}

#[test]
fn a_cluster_section_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.toml");
    for (cluster, complaint) in [
        ("redis = \"http://redis:6379\"", "cluster.redis"),
        ("redis = \"redis://redis:6379\"\nname = \"a b\"", "cluster.name"),
        ("redis = \"redis://redis:6379\"\ncounting = \"sometimes\"", "counting"),
        ("redis = \"redis://redis:6379\"\nsync_interval_ms = 0", "cluster.sync_interval_ms"),
    ] {
        std::fs::write(
            &config,
            format!(
                "[cluster]\n{cluster}\n[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\ndefault_pool = \"app\"\n\
                 [[pool]]\nname = \"app\"\nservers = [\"127.0.0.1:9\"]\n"
            ),
        )
        .unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_wasmgate"))
            .args(["check", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{cluster}: accepted");
        assert!(stderr.contains(complaint), "{cluster}: {stderr}");
    }
}

/// Instances agree on config and plugins the Kubernetes way: both come
/// from ConfigMap volumes, and an update (a `..data` link swapped) is
/// picked up without a restart or a signal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configmap_updates_reload_the_config_and_swap_plugin_settings() {
    let (one, two) = (Backend::start("one").await, Backend::start("two").await);
    let guard = |denied: &str| format!("[config]\ndeny_paths = \"{denied}\"\n");
    let wasm = std::fs::read(plugin_wasm("handshake-guard")).unwrap();
    let mut plugins =
        KubeVolume::new(&[("handshake-guard.wasm", &wasm), ("handshake-guard.toml", guard("/blocked*").as_bytes())]);
    let config = |default_pool: &str| {
        format!(
            "watch_config = true\n\
             [plugins]\ndir = \"{}\"\n\
             [admin]\nlisten = \"127.0.0.1:0\"\nallowed_hosts = [\"gw.test\"]\n\
             [[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\ndefault_pool = \"{default_pool}\"\nwaf = [\"handshake-guard\"]\n\
             [[pool]]\nname = \"one\"\nservers = [\"{}\"]\n[[pool]]\nname = \"two\"\nservers = [\"{}\"]\n",
            plugins.path().display(),
            one.addr,
            two.addr
        )
    };
    let mut configmap = KubeVolume::new(&[("gateway.toml", config("one").as_bytes())]);
    let logs = tempfile::tempdir().unwrap();
    let gateway =
        GatewayProcess::start(&configmap.path().join("gateway.toml"), &logs.path().join("gateway.log"), 2).await;
    let web = gateway.addr("web");
    assert!(get(web, "/").await.body.contains("backend=one"));
    assert_eq!(get(web, "/blocked").await.status, StatusCode::FORBIDDEN);

    // The ConfigMap holding gateway.toml is updated: the new config serves.
    configmap.update(&[("gateway.toml", config("two").as_bytes())]);
    let swapped = std::time::Instant::now();
    while !get(web, "/").await.body.contains("backend=two") {
        assert!(swapped.elapsed() < Duration::from_secs(1) + CI_MARGIN, "the updated config was not applied");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A broken update is refused like a broken SIGHUP reload: the config
    // in force keeps serving and /status says why.
    configmap.update(&[("gateway.toml", b"[[listener]]\nname = 7\n")]);
    let admin = gateway.addr("admin");
    let started = std::time::Instant::now();
    loop {
        let reloads = status(admin).await["reloads"].clone();
        if reloads.as_array().and_then(|r| r.last()).is_some_and(|last| last["result"] == "refused") {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(1) + CI_MARGIN, "no refused reload: {reloads}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(get(web, "/").await.body.contains("backend=two"));

    // The plugins' ConfigMap is updated: the new settings apply.
    plugins.update(&[("handshake-guard.wasm", &wasm), ("handshake-guard.toml", guard("/other*").as_bytes())]);
    let swapped = std::time::Instant::now();
    while get(web, "/blocked").await.status == StatusCode::FORBIDDEN {
        assert!(swapped.elapsed() < Duration::from_secs(2) + CI_MARGIN, "the updated settings were not applied");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(get(web, "/other").await.status, StatusCode::FORBIDDEN);
}
