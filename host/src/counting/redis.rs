//! The fleet's side of counting: a Redis server every instance names.
//!
//! - `exact`: each `count` runs [`COUNT_SCRIPT`] on a connection of the
//!   calling thread's own (a plugin call is synchronous, so the thread waits
//!   for one round trip, bounded by `timeout_ms`).
//! - `synced`: a sync thread publishes this process's unsent deltas on the
//!   fleet's channel every `sync_interval_ms`, and a subscriber thread merges
//!   what the others publish.
//!
//! When Redis cannot be reached, counting goes on locally: [`Health`] marks
//! the outage (one log line), nothing waits on Redis until the sync thread
//! reaches it again, and the counts taken meanwhile are counted.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, Weak};
use std::time::Duration;

use super::window::{Delta, MAX_KEY_BYTES, MAX_WINDOW_MS, Table, truncate};
use super::{Shared, unix_ms};
use crate::config::{ClusterConfig, Counting};

/// One event for `KEYS[1]` (the current bucket) and the total of
/// `KEYS[2]` (the one before), in one round trip: the sliding window is
/// computed from both by the caller. Each bucket lives two windows.
const COUNT_SCRIPT: &str = r"
local current = redis.call('INCR', KEYS[1])
if current == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
local previous = tonumber(redis.call('GET', KEYS[2]) or '0')
return {current, previous}
";

/// Largest message published at once; a sync sends several when it has more.
const MAX_MESSAGE_BYTES: usize = 256 * 1024;
/// A message from the channel larger than this is not read.
const MAX_RECEIVED_BYTES: usize = 4 * MAX_MESSAGE_BYTES;
/// While Redis is down, how often the sync thread (and a subscriber that
/// lost its connection) tries it again.
const RETRY_EVERY: Duration = Duration::from_millis(500);
/// After an outage, how long the sync thread holds back the counts taken
/// meanwhile: the other instances' subscribers, retrying every
/// [`RETRY_EVERY`], have subscribed again by then (a message published
/// before they do is lost to them).
const RESUBSCRIBE_GRACE: Duration = Duration::from_millis(1500);

/// What a synced instance publishes: its deltas, signed with its id so it
/// skips its own.
#[derive(serde::Serialize, serde::Deserialize)]
struct Batch {
    from: u64,
    deltas: Vec<Delta>,
}

/// Whether Redis answers, and what counting did while it did not.
#[derive(Default)]
pub struct Health {
    down: AtomicBool,
    outages: AtomicU64,
    local_counts: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl Health {
    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::Relaxed)
    }

    pub fn outages(&self) -> u64 {
        self.outages.load(Ordering::Relaxed)
    }

    /// Counts taken locally because Redis was down.
    pub fn local_counts(&self) -> u64 {
        self.local_counts.load(Ordering::Relaxed)
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(super) fn counted_locally(&self) {
        self.local_counts.fetch_add(1, Ordering::Relaxed);
    }

    /// Marks an outage; only its first failure is logged.
    fn failed(&self, redis: &str, error: &redis::RedisError) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(error.to_string());
        if !self.down.swap(true, Ordering::Relaxed) {
            self.outages.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%redis, %error, "cluster: Redis unreachable; counting locally until it answers");
        }
    }

    fn recovered(&self, redis: &str) {
        if self.down.swap(false, Ordering::Relaxed) {
            tracing::info!(%redis, "cluster: Redis answers again; counts are shared");
        }
    }
}

/// The fleet's Redis, as `[cluster]` names it.
pub struct Redis {
    client: redis::Client,
    /// `wasmgate:NAME`: the prefix of every key and of the channel.
    prefix: String,
    url: String,
    timeout: Duration,
    /// Tells this process's messages from the others'.
    id: u64,
    pub(super) health: Health,
    script: redis::Script,
}

thread_local! {
    /// The calling thread's connection for `exact` counts, with the id of
    /// the [`Redis`] it belongs to and the outage count when it was made
    /// (a connection made before an outage is stale: its server may be gone).
    static CONNECTION: RefCell<Option<(u64, u64, redis::Connection)>> = const { RefCell::new(None) };
}

impl Redis {
    pub fn open(config: &ClusterConfig) -> anyhow::Result<Redis> {
        let client = redis::Client::open(config.redis.trim())
            .map_err(|e| anyhow::anyhow!("cluster.redis `{}`: {e}", config.redis))?;
        let mut id = [0u8; 8];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id)
            .map_err(|_| anyhow::anyhow!("no random numbers for the instance id"))?;
        Ok(Redis {
            client,
            prefix: format!("wasmgate:{}", config.name),
            url: config.redis.clone(),
            timeout: Duration::from_millis(config.timeout_ms),
            id: u64::from_le_bytes(id),
            health: Health::default(),
            script: redis::Script::new(COUNT_SCRIPT),
        })
    }

    fn connect(&self, timeout: Duration) -> redis::RedisResult<redis::Connection> {
        let connection = self.client.get_connection_with_timeout(timeout)?;
        connection.set_read_timeout(Some(timeout))?;
        connection.set_write_timeout(Some(timeout))?;
        Ok(connection)
    }

    fn channel(&self) -> String {
        format!("{}:counts", self.prefix)
    }

    /// `exact`: counts one event in Redis and returns the totals of the
    /// current bucket (this event included) and the one before. `None`
    /// while Redis is down or when this call fails (then marked down).
    pub(super) fn count_exact(&self, plugin: &str, key: &str, length_ms: u64, bucket: u64) -> Option<(u64, u64)> {
        if self.health.is_down() {
            return None;
        }
        let key = truncate(key, MAX_KEY_BYTES);
        let name = |bucket: u64| format!("{}:{plugin}:{length_ms}:{bucket}:{key}", self.prefix);
        let outages = self.health.outages();
        let result = CONNECTION.with_borrow_mut(|slot| {
            if !matches!(slot, Some((id, made, _)) if *id == self.id && *made == outages) {
                *slot = Some((self.id, outages, self.connect(self.timeout)?));
            }
            let Some((_, _, connection)) = slot.as_mut() else { unreachable!("set above") };
            let outcome = self
                .script
                .key(name(bucket))
                .key(name(bucket.saturating_sub(1)))
                .arg(length_ms * 2)
                .invoke::<(u64, u64)>(connection);
            if outcome.is_err() {
                // A timed-out reply could arrive later and be read as the
                // next one's: never reuse the connection after a failure.
                *slot = None;
            }
            outcome
        });
        match result {
            Ok(totals) => Some(totals),
            Err(error) => {
                self.health.failed(&self.url, &error);
                None
            }
        }
    }
}

/// The sync thread: every `interval`, publishes the unsent deltas
/// (`synced`), or while Redis is down tries it again. Ends when the
/// counters are dropped.
pub(super) fn run_sync(shared: Weak<Shared>, interval: Duration) {
    let mut connection: Option<redis::Connection> = None;
    let mut hold_until: Option<std::time::Instant> = None;
    loop {
        let Some(shared) = shared.upgrade() else { return };
        let redis = &shared.redis;
        let wait = if redis.health.is_down() { RETRY_EVERY.min(interval) } else { interval };
        if connection.is_none() {
            match redis.connect(Duration::from_secs(1)).and_then(|mut c| {
                redis::cmd("PING").query::<String>(&mut c)?;
                Ok(c)
            }) {
                Ok(c) => {
                    connection = Some(c);
                    if redis.health.is_down() {
                        hold_until = Some(std::time::Instant::now() + RESUBSCRIBE_GRACE);
                    }
                    redis.health.recovered(&redis.url);
                }
                Err(error) => redis.health.failed(&redis.url, &error),
            }
        }
        if let Some(c) = connection.as_mut() {
            let held = hold_until.is_some_and(|until| std::time::Instant::now() < until);
            let outcome = match shared.counting {
                Counting::Synced if !held => publish(redis, &shared.table, c),
                // `exact` counts need no sending (nor held ones yet); a PING
                // keeps the health true.
                _ => redis::cmd("PING").query::<String>(c).map(drop),
            };
            match outcome {
                Ok(()) => redis.health.recovered(&redis.url),
                Err(error) => {
                    redis.health.failed(&redis.url, &error);
                    connection = None;
                }
            }
        }
        drop(shared);
        std::thread::sleep(wait);
    }
}

/// Publishes every unsent delta; on failure gives them back. With nothing
/// to send, a PING keeps the health true.
fn publish(redis: &Redis, table: &Table, connection: &mut redis::Connection) -> redis::RedisResult<()> {
    let deltas = table.take_unsent(unix_ms());
    if deltas.is_empty() {
        return redis::cmd("PING").query::<String>(connection).map(drop);
    }
    let channel = redis.channel();
    let mut start = 0;
    while start < deltas.len() {
        // Chunks of about MAX_MESSAGE_BYTES (a delta is a few hundred bytes at most).
        let mut end = start;
        let mut size = 0;
        while end < deltas.len() && size < MAX_MESSAGE_BYTES {
            size += deltas[end].plugin.len() + deltas[end].key.len() + 96;
            end += 1;
        }
        let batch = Batch { from: redis.id, deltas: deltas[start..end].to_vec() };
        let message = serde_json::to_vec(&batch).unwrap_or_default();
        if let Err(error) = redis::cmd("PUBLISH").arg(&channel).arg(message).query::<i64>(connection) {
            table.unsend(&deltas[start..]);
            return Err(error);
        }
        start = end;
    }
    Ok(())
}

/// The subscriber thread (`synced`): merges the others' deltas into the
/// table, reconnecting after failures. Ends when the counters are dropped.
pub(super) fn run_subscriber(shared: Weak<Shared>) {
    let mut warned_bad_message = false;
    'connect: loop {
        let Some(strong) = shared.upgrade() else { return };
        let Ok(mut connection) = strong.redis.connect(Duration::from_secs(1)) else {
            drop(strong);
            std::thread::sleep(RETRY_EVERY);
            continue;
        };
        let channel = strong.redis.channel();
        let id = strong.redis.id;
        drop(strong);
        let mut pubsub = connection.as_pubsub();
        if pubsub.subscribe(&channel).is_err() || pubsub.set_read_timeout(Some(Duration::from_secs(1))).is_err() {
            std::thread::sleep(RETRY_EVERY);
            continue;
        }
        loop {
            let message = pubsub.get_message();
            let Some(shared) = shared.upgrade() else { return };
            let message = match message {
                Ok(message) => message,
                Err(error) if error.is_timeout() => continue,
                Err(_) => {
                    drop(shared);
                    std::thread::sleep(RETRY_EVERY);
                    continue 'connect;
                }
            };
            let payload = message.get_payload_bytes();
            let batch = (payload.len() <= MAX_RECEIVED_BYTES).then(|| serde_json::from_slice::<Batch>(payload));
            match batch {
                Some(Ok(batch)) if batch.from != id => {
                    let now = unix_ms();
                    for delta in batch.deltas.iter().filter(|d| valid(d)) {
                        shared.table.merge(delta, now);
                    }
                }
                Some(Ok(_)) => {}
                _ if !warned_bad_message => {
                    warned_bad_message = true;
                    tracing::warn!(
                        channel,
                        bytes = payload.len(),
                        "cluster: a message on the channel is not a batch of counts; ignored (and others like it)"
                    );
                }
                _ => {}
            }
        }
    }
}

/// A delta from the channel is another process's word: only plausible ones
/// are merged (a plugin name as the config allows, a window the host
/// accepts, counts that cannot overflow a sum).
fn valid(delta: &Delta) -> bool {
    !delta.plugin.is_empty()
        && delta.plugin.len() <= 128
        && delta.key.len() <= MAX_KEY_BYTES
        && (1..=MAX_WINDOW_MS).contains(&delta.length_ms)
        && delta.current <= u64::from(u32::MAX)
        && delta.previous <= u64::from(u32::MAX)
}
