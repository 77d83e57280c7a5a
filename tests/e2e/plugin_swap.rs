//! Plugins swapped while traffic flows: files replaced, broken, deleted and
//! restored in the plugin directory, with clients watching.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::common::*;
use futures_util::SinkExt;
use http::StatusCode;
use tokio_tungstenite::tungstenite::Message;
use wasmgate::Gateway;

const ROUTES: &str = "[config]\nroutes = \"* / pool=app\"\n";

fn config(app: &Backend, extra_plugins: &str) -> String {
    format!(
        "[plugins]\n{extra_plugins}\n\
         [[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nrouter = \"router\"\n\
         [[pool]]\nname = \"app\"\nservers = [\"{}\"]\n",
        app.addr
    )
}

/// Which router answered: `path-router` forwards to the backend, `head-echo`
/// answers with the request head.
fn version_of(body: &str) -> &'static str {
    if body.starts_with("backend=app") {
        "path-router"
    } else if body.starts_with("method: GET") {
        "head-echo"
    } else {
        "unknown"
    }
}

/// Replaces `dir/router.wasm` with plugin crate `krate`: in place (truncate
/// and write, as `cp` does) or by an atomic rename, as deploy tools do.
fn install(dir: &Path, krate: &str, atomic: bool) {
    let target = dir.join("router.wasm");
    if atomic {
        let temp = dir.join(".router.wasm.partial");
        std::fs::copy(plugin_wasm(krate), &temp).unwrap();
        std::fs::rename(&temp, &target).unwrap();
    } else {
        std::fs::copy(plugin_wasm(krate), &target).unwrap();
    }
}

/// Waits until `/` is answered by `expected`; returns how long that took.
async fn wait_for_version(gateway: &Gateway, expected: &str, written: Instant) -> Duration {
    loop {
        let got = get(web(gateway), "/").await;
        if version_of(&got.body) == expected {
            return written.elapsed();
        }
        assert!(written.elapsed() < Duration::from_secs(5), "{expected} never took over; last answer: {}", got.body);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_and_requests_survive_twenty_plugin_swaps() {
    let app = Backend::start("app").await;
    let plugins = PluginDir::new().add("router", "path-router", ROUTES);
    let cache = tempfile::tempdir().unwrap();
    let gateway = start_gateway(&config(&app, &format!("cache_dir = \"{}\"", cache.path().display())), &plugins).await;
    let addr = web(&gateway);

    let mut sockets = Vec::new();
    for _ in 0..5 {
        sockets.push(ws_connect(addr, "/ws", &[]).await.0);
    }

    // A client issuing requests back to back for the whole test.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let load = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let got = get(addr, "/load").await;
                if got.status == StatusCode::OK && version_of(&got.body) != "unknown" {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                    eprintln!("failed request: {} {}", got.status, got.body);
                }
            }
        })
    };

    let mut slowest = Duration::ZERO;
    for swap in 0..20 {
        let krate = if swap % 2 == 0 { "head-echo" } else { "path-router" };
        let written = Instant::now();
        install(plugins.path(), krate, swap % 4 < 2);
        let took = wait_for_version(&gateway, krate, written).await;
        slowest = slowest.max(took);
        assert!(took < Duration::from_secs(1), "swap {swap} to {krate} took {took:?}");
        // Every WebSocket opened before the first swap still echoes.
        for ws in &mut sockets {
            let text = format!("swap {swap}");
            ws.send(Message::text(text.clone())).await.unwrap();
            assert_eq!(next_message(ws).await, Message::text(text));
        }
    }
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    eprintln!("slowest swap: {slowest:?}; requests ok: {}", ok.load(Ordering::Relaxed));
    assert_eq!(failed.load(Ordering::Relaxed), 0, "no request failed during the swaps");
    assert!(ok.load(Ordering::Relaxed) > 20);
    let router = gateway.registry().get("router").unwrap();
    assert_eq!(router.identity.version, 21, "20 swaps after the first load");
}

/// Waits until the registry refused plugin `name`'s file for `reason`.
async fn refused(gateway: &Gateway, name: &str, reason: &str) {
    let registry = gateway.registry();
    let last = || registry.rejected().into_iter().find(|(n, _)| n == name).map(|(_, r)| r.reason);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !last().is_some_and(|r| r.contains(reason)) {
        assert!(Instant::now() < deadline, "{name} was never refused for `{reason}` (last: {:?})", last());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Against a `wasmgate run` process: in-process, the 4.5 s call would hold
/// one of the test runtime's two workers, and a task parked in that
/// worker's LIFO slot (the test's own, say) would wait for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_under_way_finishes_on_the_version_it_started_with() {
    let app = Backend::start("app").await;
    // `warm` has the new version's bytes, so the swap below loads it from
    // the compiled-artifact cache instead of compiling it.
    let plugins =
        PluginDir::new().add("guard", "looper", "call_timeout_ms = 6000\n").add("warm", "handshake-guard", "");
    let config = plugins.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\nallowed_hosts = [\"gw.test\"]\n[plugins]\ndir = \".\"\n\
             [[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\ndefault_pool = \"app\"\nwaf = [\"guard\"]\n\
             [[pool]]\nname = \"app\"\nservers = [\"{}\"]\n",
            app.addr
        ),
    )
    .unwrap();
    let gateway = GatewayProcess::start(&config, &plugins.path().join("gateway.log"), 2).await;
    let (addr, admin) = (gateway.addr("web"), gateway.addr("admin"));
    let sha256 = |status: serde_json::Value| {
        let plugins = status["plugins"].as_array().cloned().unwrap_or_default();
        plugins.iter().find(|p| p["name"] == "guard").map(|p| p["sha256"].as_str().unwrap_or_default().to_owned())
    };
    let looper = sha256(status(admin).await).expect("guard loaded");
    // A 4.5 s call on version 1 (which allows it)...
    let under_way = tokio::spawn(async move { get(addr, "/spin?ms=4500").await.status });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // ...while a new version, which denies every path, takes over.
    std::fs::write(plugins.path().join("guard.toml"), "[config]\ndeny_paths = \"/*\"\n").unwrap();
    std::fs::copy(plugin_wasm("handshake-guard"), plugins.path().join("guard.wasm")).unwrap();
    let swapped = Instant::now();
    loop {
        if sha256(status(admin).await).is_some_and(|sha| sha != looper) {
            break;
        }
        assert!(swapped.elapsed() < Duration::from_secs(4), "the new component never served");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!under_way.is_finished(), "the old call ended before the swap");
    assert_eq!(get(addr, "/after").await.status, StatusCode::FORBIDDEN, "new calls go to the new version");
    assert_eq!(under_way.await.unwrap(), StatusCode::OK, "the call under way finished on the version it started on");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_components_are_rejected_and_the_good_one_keeps_serving() {
    let app = Backend::start("app").await;
    let plugins = PluginDir::new().add("router", "path-router", ROUTES);
    let gateway = start_gateway(&config(&app, "cache = false"), &plugins).await;
    let good = gateway.registry().get("router").unwrap().identity.clone();

    let garbage = b"\0asm this is not a component".to_vec();
    let wrong_world = std::fs::read(plugin_wasm("handshake-guard")).unwrap();
    let traps_at_start = std::fs::read(plugin_wasm("init-trap")).unwrap();
    for (what, bytes, reason) in [
        ("garbage", garbage, "not a valid WebAssembly component"),
        ("a WAF as the router", wrong_world, "this component is a waf plugin, but `listener[0].router`"),
        ("a start-up trap", traps_at_start, "could not be instantiated"),
    ] {
        std::fs::write(plugins.path().join("router.wasm"), bytes).unwrap();
        refused(&gateway, "router", reason).await;
        let serving = gateway.registry().get("router").unwrap();
        assert_eq!(serving.identity.sha256, good.sha256, "{what}: the good version still serves");
        assert_eq!(serving.identity.version, good.version, "{what}");
        let got = get(web(&gateway), "/").await;
        assert_eq!(version_of(&got.body), "path-router", "{what}: {}", got.body);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settings_edit_its_init_refuses_is_rejected_and_the_old_version_keeps_serving() {
    let app = Backend::start("app").await;
    let plugins = PluginDir::new().add("router", "path-router", ROUTES);
    let gateway = start_gateway(&config(&app, "cache = false"), &plugins).await;
    let good = gateway.registry().get("router").unwrap().identity.clone();

    // A typo in the route table: the plugin's own `init` refuses it.
    std::fs::write(plugins.path().join("router.toml"), "[config]\nroutes = \"* / pool=app\\n* /api\"\n").unwrap();
    refused(&gateway, "router", "plugin `router` refused its configuration: bad config: `routes`: line 2: ").await;
    let serving = gateway.registry().get("router").unwrap();
    assert_eq!((serving.identity.sha256.as_str(), serving.identity.version), (good.sha256.as_str(), good.version));
    assert_eq!(serving.stats().errors, 0, "no request ever ran on the refused settings");
    let got = get(web(&gateway), "/").await;
    assert_eq!(version_of(&got.body), "path-router", "{}", got.body);

    // Put back: what is on disk is what serves, so nothing is refused any more.
    std::fs::write(plugins.path().join("router.toml"), ROUTES).unwrap();
    wait_until("the refusal is cleared", Duration::from_secs(5), || {
        gateway.registry().rejected().iter().all(|(name, _)| name != "router")
    })
    .await;
    assert_eq!(gateway.registry().get("router").unwrap().identity.version, good.version);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_plugin_follows_on_error_until_it_returns() {
    let app = Backend::start("app").await;
    let plugins = PluginDir::new().add("router", "path-router", ROUTES);
    let gateway = start_gateway(&config(&app, "cache = false"), &plugins).await;
    assert_eq!(get(web(&gateway), "/").await.status, StatusCode::OK);

    std::fs::remove_file(plugins.path().join("router.wasm")).unwrap();
    wait_until("router unloaded", Duration::from_secs(5), || gateway.registry().get("router").is_none()).await;
    let got = get(web(&gateway), "/").await;
    assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE, "on_error = deny");
    assert_eq!(got.header("x-wasmgate-error"), Some("plugin-unavailable"));

    let written = Instant::now();
    install(plugins.path(), "path-router", true);
    let took = wait_for_version(&gateway, "path-router", written).await;
    assert!(took < Duration::from_secs(1), "restored in {took:?}");
    assert_eq!(gateway.registry().get("router").unwrap().identity.version, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_waf_follows_the_failure_policy_of_its_last_version() {
    let app = Backend::start("app").await;
    let plugins = PluginDir::new().add("open", "looper", "on_error = \"allow\"\n").add("closed", "looper", "");
    let config = format!(
        "[[listener]]\nname = \"open\"\nbind = \"127.0.0.1:0\"\ndefault_pool = \"app\"\nwaf = [\"open\"]\n\
         [[listener]]\nname = \"closed\"\nbind = \"127.0.0.1:0\"\ndefault_pool = \"app\"\nwaf = [\"closed\"]\n\
         [[pool]]\nname = \"app\"\nservers = [\"{}\"]\n",
        app.addr
    );
    let gateway = start_gateway(&config, &plugins).await;
    for name in ["open", "closed"] {
        std::fs::remove_file(plugins.path().join(format!("{name}.wasm"))).unwrap();
        wait_until("unloaded", Duration::from_secs(5), || gateway.registry().get(name).is_none()).await;
    }
    assert_eq!(get(gateway.listener_addr("open").unwrap(), "/").await.status, StatusCode::OK, "fails open");
    let closed = get(gateway.listener_addr("closed").unwrap(), "/").await;
    assert_eq!(closed.status, StatusCode::SERVICE_UNAVAILABLE, "fails closed");
    assert_eq!(closed.header("x-wasmgate-error"), Some("plugin-unavailable"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_with_unchanged_plugins_loads_them_from_the_cache() {
    let app = Backend::start("app").await;
    let plugins = PluginDir::new().add("router", "path-router", ROUTES);
    let cache = tempfile::tempdir().unwrap();
    let config = config(&app, &format!("cache_dir = \"{}\"", cache.path().display()));

    let first = start_gateway(&config, &plugins).await;
    assert!(!first.registry().get("router").unwrap().identity.from_cache, "first start compiles");
    drop(first);

    let second = start_gateway(&config, &plugins).await;
    let router = second.registry().get("router").unwrap();
    assert!(router.identity.from_cache, "second start loads the compiled artifact");
    assert_eq!(version_of(&get(web(&second), "/").await.body), "path-router");
}

/// The cache holds native code the gateway runs: an entry changed on disk,
/// or another component's valid entry put in its place, is recompiled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_cache_entry_is_recompiled_not_run() {
    use sha2::Digest;
    let app = Backend::start("app").await;
    let plugins = PluginDir::new().add("router", "path-router", ROUTES).add("echo", "head-echo", "");
    let cache = tempfile::tempdir().unwrap();
    let config = config(&app, &format!("cache_dir = \"{}\"", cache.path().display()));
    drop(start_gateway(&config, &plugins).await);
    let entry = |krate: &str| {
        let sha = sha2::Sha256::digest(std::fs::read(plugin_wasm(krate)).unwrap());
        let prefix: String = sha.iter().map(|b| format!("{b:02x}")).collect();
        std::fs::read_dir(cache.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.file_name().unwrap().to_string_lossy().starts_with(&prefix))
            .unwrap_or_else(|| panic!("no cache entry for {krate}"))
    };
    let (router, echo) = (entry("path-router"), entry("head-echo"));
    // The router's entry replaced by head-echo's, which is a valid artifact
    // for this engine; one byte of head-echo's own entry changed.
    std::fs::copy(&echo, &router).unwrap();
    let mut bytes = std::fs::read(&echo).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 1;
    std::fs::write(&echo, bytes).unwrap();

    let gateway = start_gateway(&config, &plugins).await;
    for name in ["router", "echo"] {
        assert!(!gateway.registry().get(name).unwrap().identity.from_cache, "{name}: the tampered entry was used");
    }
    assert_eq!(version_of(&get(web(&gateway), "/").await.body), "path-router", "the router's own code runs");
    drop(gateway);
    // Recompiled entries replace the tampered ones.
    let again = start_gateway(&config, &plugins).await;
    assert!(again.registry().get("router").unwrap().identity.from_cache);
    assert_eq!(version_of(&get(web(&again), "/").await.body), "path-router");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_built_against_contract_0_2_is_refused_naming_the_version_and_the_fix() {
    let app = Backend::start("app").await;
    let plugins = PluginDir::new().add("router", "path-router", ROUTES);
    let gateway = start_gateway(&config(&app, "cache = false"), &plugins).await;
    let good = gateway.registry().get("router").unwrap().identity.clone();
    let old = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/hello-router-contract-0.2.wasm");
    std::fs::copy(old, plugins.path().join("router.wasm")).unwrap();
    refused(
        &gateway,
        "router",
        "exports `wasmgate:plugin/router@0.2.0`, from another version of the plugin contract; \
         this gateway speaks wasmgate:plugin@0.3.0: rebuild the plugin against the WIT files",
    )
    .await;
    assert_eq!(gateway.registry().get("router").unwrap().identity.sha256, good.sha256, "the 0.3 version serves on");
    assert_eq!(version_of(&get(web(&gateway), "/").await.body), "path-router");
}
