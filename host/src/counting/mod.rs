//! The host's `count`: sliding-window event counters, kept in this process
//! ([`window`]) and, with `[cluster]`, shared with the fleet's other
//! instances through Redis ([`redis`]).

mod redis;
pub mod window;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use self::redis::Health;
use self::redis::Redis;
use self::window::{Table, estimate, window_length};
use crate::config::{ClusterConfig, Counting};

/// Milliseconds since 1970: the clock the buckets are cut by.
fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

struct Shared {
    table: Table,
    redis: Redis,
    counting: Counting,
}

/// Every plugin's counters: local, or shared as `[cluster]` says.
pub struct Counters {
    local: Table,
    shared: Option<Arc<Shared>>,
}

impl Default for Counters {
    /// Counters of this process alone.
    fn default() -> Self {
        Counters { local: Table::default(), shared: None }
    }
}

/// What `/status` and `/metrics` say about shared counting.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClusterStatus {
    pub counting: &'static str,
    /// `connecting` (not reached yet), `up` or `down`.
    pub redis: &'static str,
    /// `synced`: whether this instance hears the others' counts.
    pub subscribed: Option<bool>,
    pub outages: u64,
    pub local_counts: u64,
    pub last_error: Option<String>,
}

impl Counters {
    /// Checks `cluster` as far as it can be without Redis (the URL).
    pub fn check(cluster: &ClusterConfig) -> anyhow::Result<()> {
        Redis::open(cluster).map(drop)
    }

    /// Counters shared as `cluster` says, with their sync threads started
    /// (they end when the counters are dropped). Redis need not be up.
    pub fn shared(cluster: &ClusterConfig) -> anyhow::Result<Counters> {
        let shared =
            Arc::new(Shared { table: Table::default(), redis: Redis::open(cluster)?, counting: cluster.counting });
        let interval = Duration::from_millis(cluster.sync_interval_ms);
        let weak = Arc::downgrade(&shared);
        std::thread::Builder::new().name("cluster-sync".into()).spawn(move || redis::run_sync(weak, interval))?;
        if cluster.counting == Counting::Synced {
            let weak = Arc::downgrade(&shared);
            std::thread::Builder::new().name("cluster-subscribe".into()).spawn(move || redis::run_subscriber(weak))?;
        }
        Ok(Counters { local: Table::default(), shared: Some(shared) })
    }

    /// Counts one event for (`plugin`, `key`) and returns the events in the
    /// trailing `window_ms`, this one included (the fleet's, when shared).
    pub fn count(&self, plugin: &str, key: &str, window_ms: u32) -> u64 {
        let now = unix_ms();
        let Some(shared) = &self.shared else {
            return self.local.count(plugin, key, window_ms, now);
        };
        // The table counts every event, so an outage starts from this
        // process's own counts rather than from nothing.
        let local = shared.table.count(plugin, key, window_ms, now);
        let health = &shared.redis.health;
        match shared.counting {
            Counting::Exact => {
                let length = window_length(window_ms);
                let bucket = now / length;
                if let Some((current, previous)) = shared.redis.count_exact(plugin, key, length, bucket) {
                    return estimate(previous, current, length, bucket * length, now);
                }
                health.counted_locally();
            }
            Counting::Synced if !health.is_up() || !health.subscribed() => health.counted_locally(),
            Counting::Synced => {}
        }
        local
    }

    /// Shared counting's state; `None` for a process counting alone.
    pub fn status(&self) -> Option<ClusterStatus> {
        let shared = self.shared.as_ref()?;
        let health = &shared.redis.health;
        Some(ClusterStatus {
            counting: match shared.counting {
                Counting::Synced => "synced",
                Counting::Exact => "exact",
            },
            redis: health.state(),
            subscribed: (shared.counting == Counting::Synced).then(|| health.subscribed()),
            outages: health.outages(),
            local_counts: health.local_counts(),
            last_error: health.last_error(),
        })
    }
}
