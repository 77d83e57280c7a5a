//! The cost of plugin calls, release build: one call of a router that reads
//! host, path and one header, with 0, 10 and 50 headers present (what is
//! not read must cost nothing); WAF + router as the request path calls them
//! (registry lookups and the request view included); and starting an
//! instance (instantiation and `init`). Before the timings it prints the
//! host's heap allocations per call, counted by a counting allocator.
//!
//! Needs the plugins built: `scripts/build-plugins --languages`. Run with
//! `cargo bench -p wasmgate --bench plugin_call`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use wasmgate::config::{OnError, PluginsConfig};
use wasmgate::counting::Counters;
use wasmgate::http::{ConnInfo, TlsDetails};
use wasmgate::plugin::host_api::HostServices;
use wasmgate::plugin::{Loader, Registry, RequestView, Runtime};

/// Counts every allocation the process makes.
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn plugin_file(krate: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("bench executable");
    let target = exe.ancestors().nth(3).expect("target directory");
    let file = target.join("wasm32-wasip2/release").join(format!("{}.wasm", krate.replace('-', "_")));
    assert!(file.exists(), "{} is missing: run scripts/build-plugins --languages first", file.display());
    file
}

/// A browser-like request with `headers` header lines in all.
fn request(headers: usize, websocket: bool) -> RequestView {
    let mut builder = http::Request::builder().uri("/api/users/42?expand=true");
    let base = [
        ("host", "app.example.test"),
        ("user-agent", "Mozilla/5.0 (X11; Linux x86_64) Chrome/156.0"),
        ("accept", "*/*"),
        ("cookie", "session=0123456789abcdef; theme=dark"),
        ("x-user", "user-42"),
        ("origin", "https://app.example.test"),
    ];
    for (name, value) in base.iter().take(headers) {
        builder = builder.header(*name, *value);
    }
    for i in base.len()..headers {
        builder = builder.header(format!("x-extra-{i}"), "some value");
    }
    let parts = builder.body(()).unwrap().into_parts().0;
    let tls = TlsDetails { sni: Some("app.example.test".into()), alpn: Some("http/1.1".into()) };
    let client = Arc::new(ConnInfo::new("203.0.113.7:50000".parse().unwrap(), Some(tls)));
    RequestView::new(parts, client, Arc::from("web"), websocket)
}

struct Loaded {
    registry: Registry,
    _dir: tempfile::TempDir,
    _rt: tokio::runtime::Runtime,
}

fn load() -> Loaded {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (name, settings) in [
        ("hostile", ""),
        ("path-router", "[config]\nroutes = \"* /api/ pool=api rewrite=/ affinity=header:x-user\\n* / pool=app\"\n"),
        (
            "handshake-guard",
            "[config]\nallowed_origins = \"https://app.example.test\"\ndeny_paths = \"/admin*, *.php\"\nrate_limit = \"1000000/10s\"\n",
        ),
    ] {
        std::fs::copy(plugin_file(name), dir.path().join(format!("{name}.wasm"))).unwrap();
        if !settings.is_empty() {
            std::fs::write(dir.path().join(format!("{name}.toml")), settings).unwrap();
        }
    }
    let registry = Registry::new(OnError::Deny);
    rt.block_on(async {
        let runtime = Arc::new(Runtime::new().unwrap());
        let services = Arc::new(HostServices { counters: Counters::default(), pools: Default::default() });
        let defaults = PluginsConfig { dir: dir.path().to_owned(), cache: false, ..PluginsConfig::default() };
        let loader = Loader::new(runtime, defaults, services, Default::default());
        let report = registry.reconcile(&loader).await;
        assert!(report.rejected.is_empty(), "{:?}", report.rejected);
    });
    Loaded { registry, _dir: dir, _rt: rt }
}

/// Host allocations per call of `call`, over 10,000 calls (after a warm-up).
fn allocations_per_call(mut call: impl FnMut()) -> f64 {
    for _ in 0..1000 {
        call();
    }
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    for _ in 0..10_000 {
        call();
    }
    (ALLOCATIONS.load(Ordering::Relaxed) - before) as f64 / 10_000.0
}

fn plugin_calls(c: &mut Criterion) {
    let loaded = load();
    let registry = &loaded.registry;
    let router = registry.get("path-router").unwrap();
    let guard = registry.get("handshake-guard").unwrap();

    for headers in [6usize, 10, 50] {
        let mut req = request(headers, false);
        let per_call = allocations_per_call(|| {
            router.route(&mut req).unwrap();
        });
        eprintln!("path-router/route/{headers}-headers: {per_call:.1} host allocations per call");
    }
    let mut handshake = request(10, true);
    let per_call = allocations_per_call(|| {
        guard.inspect(&mut handshake).unwrap();
    });
    eprintln!("handshake-guard/inspect/10-headers-websocket: {per_call:.1} host allocations per call");

    let mut group = c.benchmark_group("plugin_call");
    // The fixed cost of a call: the test plugin `hostile` on a path it only
    // forwards reads one field (the path) and names one pool.
    let floor = registry.get("hostile").unwrap();
    let mut plain = request(6, false);
    group.bench_function("floor/route/one-accessor", |b| {
        b.iter(|| std::hint::black_box(floor.route(&mut plain).unwrap()))
    });
    group.measurement_time(Duration::from_secs(4));
    for headers in [6usize, 10, 50] {
        // Host, path and one header (`x-user`, for affinity) are read.
        let mut req = request(headers, false);
        group.bench_function(format!("path-router/route/{headers}-headers"), |b| {
            b.iter(|| std::hint::black_box(router.route(&mut req).unwrap()))
        });
    }
    let mut handshake = request(10, true);
    group.bench_function("handshake-guard/inspect/10-headers-websocket", |b| {
        b.iter(|| std::hint::black_box(guard.inspect(&mut handshake).unwrap()))
    });
    // As the request path calls them: each plugin read from the slot the
    // listener's rules hold, the head lent as a view and taken back.
    let mut parts = Some(request(10, false).parts);
    let client = request(0, false).client;
    let listener: Arc<str> = Arc::from("web");
    let (waf_slot, router_slot) = (registry.slot("handshake-guard"), registry.slot("path-router"));
    let mut request_path = || {
        let mut view = RequestView::new(parts.take().unwrap(), client.clone(), listener.clone(), false);
        let waf = waf_slot.load();
        std::hint::black_box(waf.as_deref().unwrap().inspect(&mut view).unwrap());
        let router = router_slot.load();
        std::hint::black_box(router.as_deref().unwrap().route(&mut view).unwrap());
        parts = Some(view.parts);
    };
    let per_call = allocations_per_call(&mut request_path);
    eprintln!("waf+router/request-path/10-headers: {per_call:.1} host allocations per request");
    group.bench_function("waf+router/request-path/10-headers", |b| b.iter(&mut request_path));
    group.bench_function("path-router/start-instance (instantiate + init)", |b| {
        b.iter(|| router.start_instance().unwrap())
    });
    group.finish();
}

/// The example plugins in each language: component size, first load
/// (compile + instantiate + init), load from the compiled-artifact cache,
/// and the call itself.
fn languages(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let examples = [
        ("rust", "path-router", "[config]\nroutes = \"* / pool=app\"\n", false),
        ("python", "api-key-guard", "[config]\napi_keys = \"demo=demo-key-0123456789\"\n", true),
        ("js", "canary-router", "[config]\ncanary = \"canary\"\npercent = \"30\"\n", false),
        ("c", "ip-filter", "[config]\ndeny_cidrs = \"10.0.0.0/8\"\ndeny_paths = \"/admin\"\n", true),
    ];
    let mut group = c.benchmark_group("languages");
    group.measurement_time(Duration::from_secs(3));
    for (language, name, settings, websocket) in examples {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(format!("{name}.wasm"));
        std::fs::copy(plugin_file(name), &file).unwrap();
        std::fs::write(dir.path().join(format!("{name}.toml")), settings).unwrap();
        let size = std::fs::metadata(&file).unwrap().len();
        let defaults = PluginsConfig {
            dir: dir.path().to_owned(),
            cache_dir: Some(cache.path().to_owned()),
            ..PluginsConfig::default()
        };
        let services = Arc::new(HostServices { counters: Counters::default(), pools: Default::default() });
        let loader = rt
            .block_on(async { Loader::new(Arc::new(Runtime::new().unwrap()), defaults, services, Default::default()) });
        let started = std::time::Instant::now();
        rt.block_on(loader.load(&file, 1)).unwrap();
        let compiled = started.elapsed();
        let started = std::time::Instant::now();
        let plugin = rt.block_on(loader.load(&file, 2)).unwrap();
        let cached = started.elapsed();
        assert!(plugin.identity.from_cache);
        eprintln!(
            "{language} {name}: {:.1} MB, first load {compiled:.2?} (compile, instantiate, init), from the cache {cached:.2?}",
            size as f64 / 1e6
        );
        let mut req = request(10, websocket);
        if name == "api-key-guard" {
            req.parts.headers.insert("x-api-key", "demo-key-0123456789".parse().unwrap());
        }
        // A failed call (a fresh instance replaces the failed one) is
        // counted, not fatal: how often it happens is part of the result.
        let mut call = || match plugin.kind {
            wasmgate::config::PluginKind::Router => plugin.route(&mut req).map(drop),
            wasmgate::config::PluginKind::Waf => plugin.inspect(&mut req).map(drop),
        };
        let failures = (0..100_000).filter(|_| call().is_err()).count();
        eprintln!("{language} {name}: {failures} of 100,000 calls failed; last error: {:?}", plugin.stats().last_error);
        group.bench_function(format!("{language}/{name}/call"), |b| b.iter(|| std::hint::black_box(call())));

        // Memory per instance: threads that each start an instance (one
        // call), against threads that do nothing, measured while all live.
        let resident = |with_instance: bool| {
            resident_growth(INSTANCES, || {
                if with_instance {
                    let mut req = request(10, websocket);
                    if name == "api-key-guard" {
                        req.parts.headers.insert("x-api-key", "demo-key-0123456789".parse().unwrap());
                    }
                    let _ = match plugin.kind {
                        wasmgate::config::PluginKind::Router => plugin.route(&mut req).map(drop),
                        wasmgate::config::PluginKind::Waf => plugin.inspect(&mut req).map(drop),
                    };
                }
            })
        };
        let per_instance = (resident(true).saturating_sub(resident(false))) / INSTANCES as u64;
        eprintln!("{language} {name}: {:.2} MiB resident per instance", per_instance as f64 / (1 << 20) as f64);
    }
    group.finish();
}

/// How many instances the memory measure starts at once.
const INSTANCES: usize = 8;

/// This process's resident memory, in bytes (VmRSS of /proc/self/status).
fn resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kib * 1024
}

/// How much resident memory grows while `threads` threads have each run
/// `work` and are all still alive.
fn resident_growth(threads: usize, work: impl Fn() + Sync) -> u64 {
    let ready = std::sync::Barrier::new(threads + 1);
    let done = std::sync::Barrier::new(threads + 1);
    let before = resident_bytes();
    let mut after = 0;
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                work();
                ready.wait();
                done.wait();
            });
        }
        ready.wait();
        after = resident_bytes();
        done.wait();
    });
    after.saturating_sub(before)
}

criterion_group!(benches, plugin_calls, languages);
criterion_main!(benches);
