//! A plugin that loops or traps costs one request an error, never the
//! gateway or other requests.

use std::time::{Duration, Instant};

use crate::common::*;
use http::StatusCode;

fn config(app: &Backend) -> String {
    format!(
        "[plugins]\ncall_timeout_ms = 50\nquarantine_after_failures = 100\n\
         [[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\ndefault_pool = \"app\"\nwaf = [\"looper\"]\n\
         [[pool]]\nname = \"app\"\nservers = [\"{}\"]\n",
        app.addr
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn looping_plugin_is_cut_off_and_other_requests_are_served() {
    let app = Backend::start("app").await;
    let plugins = PluginDir::new().add("looper", "looper", "");
    let gateway = start_gateway(&config(&app), &plugins).await;
    let addr = web(&gateway);
    // No plugin ran for a while: the epoch ticker is asleep, and the first
    // call must wake it for its deadline to hold.
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Ten looping requests at once, with normal requests alongside.
    let loops: Vec<_> = (0..10)
        .map(|_| {
            tokio::spawn(async move {
                let started = Instant::now();
                (get(addr, "/loop").await, started.elapsed())
            })
        })
        .collect();
    for _ in 0..10 {
        assert_eq!(get(addr, "/fine").await.status, StatusCode::OK);
    }
    let deadline = Duration::from_millis(50);
    for handle in loops {
        let (got, took) = handle.await.unwrap();
        assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(got.header("x-wasmgate-error"), Some("plugin-unavailable"));
        assert!(took >= deadline, "ran until its deadline, not less: {took:?}");
        // The deadline counts the plugin's CPU time: ten loops on two
        // worker threads of a busy machine wait for each other and for a core.
        assert!(took < deadline * 10 + CI_MARGIN * 2, "cut off at its deadline, took {took:?}");
    }
    let stats = gateway.registry().get("looper").unwrap().stats();
    assert_eq!(stats.timeouts, 10, "each loop was stopped by the deadline");
    assert!(stats.last_error.unwrap_or_default().contains("ran past its 50 ms deadline"));
    assert_eq!(app.requests().iter().filter(|r| r.target == "/loop").count(), 0);
    assert_eq!(get(addr, "/after").await.status, StatusCode::OK, "the gateway keeps serving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trapping_plugin_follows_its_failure_policy() {
    let app = Backend::start("app").await;
    let closed = PluginDir::new().add("looper", "looper", "");
    let gateway = start_gateway(&config(&app), &closed).await;
    let trapped = get(web(&gateway), "/trap").await;
    assert_eq!(trapped.status, StatusCode::SERVICE_UNAVAILABLE, "fails closed by default");
    assert_eq!(trapped.header("x-wasmgate-error"), Some("plugin-unavailable"));
    assert_eq!(get(web(&gateway), "/fine").await.status, StatusCode::OK, "a fresh instance serves the next request");

    let open = PluginDir::new().add("looper", "looper", "on_error = \"allow\"\n");
    let gateway = start_gateway(&config(&app), &open).await;
    let passed = get(web(&gateway), "/trap").await;
    assert_eq!(passed.status, StatusCode::OK, "on_error = allow fails open");
    assert!(passed.body.contains("target=/trap"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waf_denying_with_an_invalid_answer_follows_its_failure_policy() {
    let app = Backend::start("app").await;
    let plugins = PluginDir::new().add("looper", "looper", "");
    let gateway = start_gateway(&config(&app), &plugins).await;
    let got = get(web(&gateway), "/bad-deny").await;
    assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE, "never a 101 from a plugin");
    assert_eq!(got.header("x-wasmgate-error"), Some("plugin-unavailable"));
    let stats = gateway.registry().get("looper").unwrap().stats();
    assert!(stats.last_error.unwrap_or_default().contains("status 101 is not 200-599"));
    assert_eq!(stats.errors, 1);
    assert!(app.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_bomb_is_stopped_at_its_memory_cap() {
    let app = Backend::start("app").await;
    // Per-plugin limits, both different from the [plugins] defaults (32 MiB, 50 ms).
    let plugins = PluginDir::new().add("looper", "looper", "memory_limit_mb = 8\ncall_timeout_ms = 300\n");
    let gateway = start_gateway(&config(&app), &plugins).await;
    let looper = gateway.registry().get("looper").unwrap();
    let started = Instant::now();
    let bomb = get(web(&gateway), "/grow").await;
    assert_eq!(bomb.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(bomb.header("x-wasmgate-error"), Some("plugin-unavailable"));
    // Refused by its own 8 MiB cap, not by a deadline.
    assert!(started.elapsed() < CI_MARGIN, "took {:?}", started.elapsed());
    let stats = looper.stats();
    assert_eq!((stats.memory_limit_hits, stats.timeouts), (1, 0), "{stats:?}");
    assert!(stats.last_error.unwrap_or_default().contains("hit its 8 MiB memory cap"), "{:?}", looper.stats());
    assert_eq!(get(web(&gateway), "/fine").await.status, StatusCode::OK);

    // Its own deadline too: 300 ms, not the default 50 ms.
    let started = Instant::now();
    assert_eq!(get(web(&gateway), "/loop").await.status, StatusCode::SERVICE_UNAVAILABLE);
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(300) && took < Duration::from_millis(300) + CI_MARGIN, "took {took:?}");
    let stats = looper.stats();
    assert_eq!((stats.memory_limit_hits, stats.timeouts), (1, 1), "{stats:?}");
    assert!(stats.last_error.unwrap_or_default().contains("ran past its 300 ms deadline"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_looping_plugin_is_quarantined_then_recovers() {
    let app = Backend::start("app").await;
    let plugins = PluginDir::new().add("looper", "looper", "");
    let config = config(&app).replace("quarantine_after_failures = 100\n", "").replace(
        "call_timeout_ms = 50",
        "call_timeout_ms = 50\nquarantine_after_failures = 3\nquarantine_initial_ms = 400\nquarantine_max_ms = 1000",
    ) + "[admin]\nlisten = \"127.0.0.1:0\"\nallowed_hosts = [\"gw.test\"]\n";
    let gateway = start_gateway(&config, &plugins).await;
    let addr = web(&gateway);
    // Three traps, every call, from two clients: it fails for everyone.
    for source in ["127.0.0.1", "127.0.0.2", "127.0.0.1"] {
        let answer =
            raw_exchange_from(source.parse().unwrap(), addr, "GET /trap HTTP/1.1\r\nHost: gw.test\r\n\r\n").await;
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    }
    let looper = gateway.registry().get("looper").unwrap();
    assert!(looper.stats().quarantined);
    assert_eq!(
        status(gateway.admin_addr().unwrap()).await["plugins"][0]["quarantine_reason"],
        "3 of 3 calls failed within 10 s, from 2 or more clients"
    );
    let calls = looper.stats().calls;
    // Quarantined: even a good request gets the on_error outcome, and the
    // plugin is not called.
    let refused = get(addr, "/fine").await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(looper.stats().calls, calls, "not called while quarantined");

    // The backoff ends; the trial call succeeds and the breaker closes.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(get(addr, "/fine").await.status, StatusCode::OK);
    assert!(!looper.stats().quarantined);
    assert_eq!(looper.stats().quarantines, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traps_from_one_client_do_not_quarantine_a_plugin_that_serves_others() {
    let app = Backend::start("app").await;
    let plugins = PluginDir::new().add("looper", "looper", "");
    let config = config(&app).replace("quarantine_after_failures = 100\n", "quarantine_after_failures = 5\n");
    let gateway = start_gateway(&config, &plugins).await;
    let addr = web(&gateway);
    // One client makes the plugin trap, again and again: its own requests fail...
    for _ in 0..20 {
        let answer =
            raw_exchange_from("127.0.0.9".parse().unwrap(), addr, "GET /trap HTTP/1.1\r\nHost: gw.test\r\n\r\n").await;
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    }
    // ...and only those: the plugin still serves everyone else.
    let looper = gateway.registry().get("looper").unwrap();
    assert!(!looper.stats().quarantined, "{:?}", looper.stats());
    assert_eq!(looper.stats().quarantines, 0);
    for _ in 0..5 {
        assert_eq!(get(addr, "/fine").await.status, StatusCode::OK);
    }
}

// One worker thread: the gateway (in this process) runs every call on it,
// so every call meets that thread's instance of the plugin.
#[tokio::test(flavor = "current_thread")]
async fn instances_are_reused_but_a_trapped_one_never_is() {
    let app = Backend::start("app").await;
    let plugins = PluginDir::new().add("looper", "looper", "");
    let gateway = start_gateway(&config(&app), &plugins).await;
    let addr = web(&gateway);
    // Sequential calls run on the thread's instance: its count goes up.
    let first: u32 = get(addr, "/count").await.body.parse().unwrap();
    let second: u32 = get(addr, "/count").await.body.parse().unwrap();
    assert_eq!(second, first + 1, "the instance was reused");
    assert_eq!(get(addr, "/trap").await.status, StatusCode::SERVICE_UNAVAILABLE);
    // The trapped instance is gone: the next call starts on a fresh one.
    assert_eq!(get(addr, "/count").await.body, "1", "a fresh instance after the trap");
}

// One worker thread, so `/stale` runs on the instance that ran `/keep`.
#[tokio::test(flavor = "current_thread")]
async fn a_request_handle_kept_past_its_call_never_reads_that_request_again() {
    let app = Backend::start("app").await;
    let plugins = PluginDir::new().add("hostile", "hostile", "");
    let gateway = start_gateway(&routed_by("hostile", &app, "cache = false"), &plugins).await;
    let addr = web(&gateway);
    let kept = get(addr, "/keep").await;
    assert!(kept.body.starts_with("kept "), "{}", kept.body);
    // The component model ends a borrow when its call returns: the kept
    // number is either unknown now (a trap) or names the request of the
    // call under way. Never the one it was kept from.
    let stale = get(addr, "/stale").await;
    let hostile = gateway.registry().get("hostile").unwrap();
    match stale.status {
        StatusCode::OK => assert_eq!(stale.body, "stale handle reads /stale"),
        status => {
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{}", stale.body);
            let error = hostile.stats().last_error.unwrap();
            assert!(error.contains("unknown handle index"), "{error}");
        }
    }

    // `init` runs with no request at all: a handle number used there is
    // refused, and so is the plugin.
    std::fs::write(plugins.path().join("hostile.toml"), "[config]\nstale_in_init = \"true\"\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let reason = loop {
        if let Some((_, rejected)) = gateway.registry().rejected().into_iter().find(|(name, _)| name == "hostile") {
            break rejected.reason;
        }
        assert!(Instant::now() < deadline, "hostile.toml's edit was never refused");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(reason.contains("could not be instantiated") && reason.contains("unknown handle index 1"), "{reason}");
    assert_eq!(gateway.registry().get("hostile").unwrap().identity.version, hostile.identity.version);
}

// One worker thread: every call meets the same instance until it is retired.
#[tokio::test(flavor = "current_thread")]
async fn an_instance_near_its_memory_cap_is_retired_between_calls_not_failed() {
    let app = Backend::start("app").await;
    // /hoard keeps 4 MiB more on every call: a leaking plugin.
    // (A generous deadline: filling 4 MiB must not time out on a busy machine.)
    let plugins = PluginDir::new().add("hostile", "hostile", "memory_limit_mb = 32\ncall_timeout_ms = 2000\n");
    let gateway = start_gateway(&routed_by("hostile", &app, ""), &plugins).await;
    let addr = web(&gateway);
    for i in 0..30 {
        assert_eq!(get(addr, "/hoard").await.status, StatusCode::OK, "call {i}");
    }
    let stats = gateway.registry().get("hostile").unwrap().stats();
    assert_eq!((stats.errors, stats.memory_limit_hits), (0, 0), "no call reached the cap");
    assert!(stats.instances_retired >= 3, "retired past 24 MiB every few calls: {stats:?}");
}
