//! The cost of one plugin call on a reused instance: the request head copied
//! into the guest, the call with its deadline armed, the decision copied out
//! and validated nowhere (validation is measured with the request path).
//!
//! Needs the plugins built: `scripts/build-plugins`. Run with
//! `cargo bench -p wasmgate --bench plugin_call`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use wasmgate::config::PluginsConfig;
use wasmgate::plugin::bindings::{Header, RequestHead, TlsInfo, WebsocketHandshake};
use wasmgate::plugin::counter::Counters;
use wasmgate::plugin::host_api::HostServices;
use wasmgate::plugin::{LoadedPlugin, Loader, Runtime};

fn plugin_file(krate: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("bench executable");
    let target = exe.ancestors().nth(3).expect("target directory");
    let file = target.join("wasm32-wasip2/release").join(format!("{}.wasm", krate.replace('-', "_")));
    assert!(file.exists(), "{} is missing: run scripts/build-plugins first", file.display());
    file
}

fn head(headers: usize, websocket: bool) -> RequestHead {
    let mut list = vec![
        Header { name: "host".into(), value: "app.example.test".into() },
        Header { name: "user-agent".into(), value: "Mozilla/5.0 (X11; Linux x86_64) Chrome/156.0".into() },
        Header { name: "accept".into(), value: "*/*".into() },
        Header { name: "cookie".into(), value: "session=0123456789abcdef; theme=dark".into() },
    ];
    for i in list.len()..headers {
        list.push(Header { name: format!("x-extra-{i}"), value: "some value".into() });
    }
    list.truncate(headers);
    RequestHead {
        method: "GET".into(),
        scheme: "https".into(),
        version: "HTTP/1.1".into(),
        tls: Some(TlsInfo { sni: Some("app.example.test".into()), alpn: Some("http/1.1".into()) }),
        authority: "app.example.test".into(),
        path: "/api/users/42".into(),
        query: Some("expand=true".into()),
        headers: list,
        client_ip: "203.0.113.7".into(),
        listener: "web".into(),
        websocket: websocket.then(|| WebsocketHandshake {
            version: "13".into(),
            subprotocols: vec!["chat".into()],
            origin: Some("https://app.example.test".into()),
            extensions: vec![],
        }),
    }
}

fn load(rt: &tokio::runtime::Runtime, name: &str, settings: &str) -> (Arc<LoadedPlugin>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(format!("{name}.wasm"));
    std::fs::copy(plugin_file(name), &file).unwrap();
    std::fs::write(dir.path().join(format!("{name}.toml")), settings).unwrap();
    let plugin = rt.block_on(async {
        let runtime = Arc::new(Runtime::new().unwrap());
        let services = Arc::new(HostServices { counters: Counters::default(), pools: Default::default() });
        let defaults = PluginsConfig { dir: dir.path().to_owned(), cache: false, ..PluginsConfig::default() };
        let loader = Loader::new(runtime, defaults, services, Default::default());
        loader.load(&file, 1).await.unwrap()
    });
    (Arc::new(plugin), dir)
}

fn plugin_calls(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (router, _d1) = load(&rt, "path-router", "[config]\nroutes = \"* /api/ pool=api rewrite=/\\n* / pool=app\"\n");
    let (guard, _d2) = load(
        &rt,
        "handshake-guard",
        "[config]\nallowed_origins = \"https://app.example.test\"\ndeny_paths = \"/admin*, *.php\"\n",
    );

    let mut group = c.benchmark_group("plugin_call");
    group.measurement_time(Duration::from_secs(4));
    for headers in [0usize, 4, 10] {
        let req = head(headers, false);
        group.bench_function(format!("path-router/route/{headers}-headers"), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        std::hint::black_box(router.route(&req).await.unwrap());
                    }
                    start.elapsed()
                })
            })
        });
    }
    let handshake = head(10, true);
    group.bench_function("handshake-guard/inspect/10-headers-websocket", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    std::hint::black_box(guard.inspect(&handshake).await.unwrap());
                }
                start.elapsed()
            })
        })
    });
    group.finish();
}

criterion_group!(benches, plugin_calls);
criterion_main!(benches);
