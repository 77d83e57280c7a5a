//! What a plugin's `count` costs in each counting mode: alone, `synced`
//! and `exact` (the second and third against a `redis-server` of the
//! bench's own, on a Unix socket; skipped with a note when Debian's
//! redis-server is not installed).
//!
//! `cargo bench -p wasmgate --bench counting`

use std::path::Path;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use wasmgate::config::{ClusterConfig, Counting};
use wasmgate::counting::Counters;

/// A `redis-server` for the bench, stopped when dropped (and the
/// directory of its socket, removed after it).
struct RedisServer {
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    fn start() -> Option<(RedisServer, String)> {
        let dir = tempfile::tempdir().ok()?;
        let socket = dir.path().join("redis.sock");
        let child = std::process::Command::new("redis-server")
            .args(["--port", "0", "--save", "", "--appendonly", "no", "--unixsocket"])
            .arg(&socket)
            .stdout(std::process::Stdio::null())
            .spawn()
            .ok()?;
        let server = RedisServer { child, _dir: dir };
        for _ in 0..500 {
            if Path::new(&socket).exists() {
                return Some((server, format!("redis+unix://{}", socket.display())));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn cluster(redis: &str, counting: Counting) -> ClusterConfig {
    ClusterConfig { redis: redis.to_owned(), name: "bench".into(), counting, sync_interval_ms: 100, timeout_ms: 5 }
}

fn counting(c: &mut Criterion) {
    let mut group = c.benchmark_group("count");
    // 1,000 client addresses, as a rate limit per client IP sees them.
    let keys: Vec<String> = (0..1000).map(|i| format!("ip:10.0.{}.{}", i / 256, i % 256)).collect();
    let mut next = 0;
    let mut key = move || {
        next = (next + 1) % 1000;
        next
    };

    let alone = Counters::default();
    group.bench_function("alone", |b| b.iter(|| alone.count("guard", &keys[key()], 60_000)));

    let Some((_redis, url)) = RedisServer::start() else {
        eprintln!("count/synced and count/exact skipped: no redis-server (apt: redis-server)");
        return;
    };
    let synced = Counters::shared(&cluster(&url, Counting::Synced)).expect("synced counters");
    group.bench_function("synced", |b| b.iter(|| synced.count("guard", &keys[key()], 60_000)));
    let exact = Counters::shared(&cluster(&url, Counting::Exact)).expect("exact counters");
    // Let the sync thread reach Redis first.
    std::thread::sleep(Duration::from_millis(200));
    group.bench_function("exact", |b| b.iter(|| exact.count("guard", &keys[key()], 60_000)));
    let status = exact.status().expect("shared");
    assert!(status.redis == "up" && status.local_counts == 0, "the exact bench counted through Redis: {status:?}");
    group.finish();
}

criterion_group!(benches, counting);
criterion_main!(benches);
