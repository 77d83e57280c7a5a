//! The fleet's side of counting: a Redis server every instance names.
//!
//! - `exact`: each `count` runs [`COUNT_SCRIPT`] on a connection taken from
//!   a small pool the sync thread keeps filled, so a request never resolves
//!   a name, connects or loads the script: it only waits for one reply,
//!   each read and write bounded by `timeout_ms`. With no connection at
//!   hand it counts locally.
//! - `synced`: the sync thread publishes this process's unsent deltas on
//!   the fleet's channel every `sync_interval_ms`, and the subscriber thread
//!   merges what the others publish.
//!
//! Only the sync thread decides that Redis answers again; a request that
//! times out, or the sync thread failing, marks an outage ([`Health`], one
//! log line at most every 10 s). During an outage everything counts locally
//! and nothing waits on Redis.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Mutex, Weak};
use std::time::{Duration, Instant};

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
/// A message from the channel larger than this is not parsed.
const MAX_RECEIVED_BYTES: usize = 4 * MAX_MESSAGE_BYTES;
/// While Redis is down, how often the sync thread (and a subscriber that
/// lost its connection) tries it again.
const RETRY_EVERY: Duration = Duration::from_millis(500);
/// How long the sync thread waits for Redis to connect or answer.
const SYNC_TIMEOUT: Duration = Duration::from_secs(1);
/// After an outage, how long the sync thread holds back the counts taken
/// meanwhile: the other instances' subscribers, retrying every
/// [`RETRY_EVERY`] with up to [`SYNC_TIMEOUT`] to connect, have subscribed
/// again by then (a message published before they do is lost to them).
const RESUBSCRIBE_GRACE: Duration = Duration::from_millis(2500);
/// Outage lines are logged at most this often.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// What a synced instance publishes: its deltas, signed with its id so it
/// skips its own.
#[derive(serde::Serialize, serde::Deserialize)]
struct Batch {
    from: u64,
    deltas: Vec<Delta>,
}

const CONNECTING: u8 = 0;
const UP: u8 = 1;
const DOWN: u8 = 2;

/// Whether Redis answers, and what counting did while it did not.
pub struct Health {
    state: AtomicU8,
    /// `synced`: whether the subscriber is listening to the others.
    subscribed: AtomicBool,
    outages: AtomicU64,
    local_counts: AtomicU64,
    last_error: Mutex<Option<String>>,
    last_logged: Mutex<Option<Instant>>,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            state: AtomicU8::new(CONNECTING),
            subscribed: AtomicBool::new(false),
            outages: AtomicU64::new(0),
            local_counts: AtomicU64::new(0),
            last_error: Mutex::new(None),
            last_logged: Mutex::new(None),
        }
    }
}

impl Health {
    pub fn is_up(&self) -> bool {
        self.state.load(Ordering::Relaxed) == UP
    }

    /// `connecting` (never reached yet), `up` or `down`.
    pub fn state(&self) -> &'static str {
        match self.state.load(Ordering::Relaxed) {
            UP => "up",
            DOWN => "down",
            _ => "connecting",
        }
    }

    pub fn subscribed(&self) -> bool {
        self.subscribed.load(Ordering::Relaxed)
    }

    pub fn outages(&self) -> u64 {
        self.outages.load(Ordering::Relaxed)
    }

    /// Counts taken locally because Redis was not answering.
    pub fn local_counts(&self) -> u64 {
        self.local_counts.load(Ordering::Relaxed)
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(super) fn counted_locally(&self) {
        self.local_counts.fetch_add(1, Ordering::Relaxed);
    }

    fn note(&self, error: &redis::RedisError) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(error.to_string());
    }

    /// Whether a line may be logged now (at most one per [`LOG_EVERY`]).
    fn may_log(&self) -> bool {
        let mut last = self.last_logged.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if last.is_some_and(|at| now.duration_since(at) < LOG_EVERY) {
            return false;
        }
        *last = Some(now);
        true
    }

    /// Marks an outage (counted once, until Redis answers again).
    fn failed(&self, redis: &str, error: &redis::RedisError) {
        self.note(error);
        if self.state.swap(DOWN, Ordering::Relaxed) != DOWN {
            self.outages.fetch_add(1, Ordering::Relaxed);
            if self.may_log() {
                tracing::warn!(%redis, %error, "cluster: Redis unreachable; counting locally until it answers");
            }
        }
    }

    /// Marks Redis answering.
    fn answered(&self, redis: &str) {
        if self.state.swap(UP, Ordering::Relaxed) == DOWN {
            tracing::info!(%redis, "cluster: Redis answers again; counts are shared");
        }
    }

    fn set_subscribed(&self, redis: &str, subscribed: bool, error: Option<&redis::RedisError>) {
        if let Some(error) = error {
            self.note(error);
        }
        let before = self.subscribed.swap(subscribed, Ordering::Relaxed);
        if before && !subscribed && self.may_log() {
            tracing::warn!(%redis, "cluster: lost the subscription to the others' counts; subscribing again");
        }
    }
}

/// `url` with any password replaced, for logs and errors.
fn shown(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => format!("{}***{}", &url[..scheme + 3], &url[at..]),
        _ => url.to_owned(),
    }
}

/// The fleet's Redis, as `[cluster]` names it.
pub struct Redis {
    client: redis::Client,
    /// `wasmgate:NAME`: the prefix of every key and of the channel.
    prefix: String,
    /// The URL without its password.
    url: String,
    timeout: Duration,
    /// Tells this process's messages from the others'.
    id: u64,
    pub(super) health: Health,
    script: redis::Script,
    /// `exact`: connections ready for a count (script loaded, timeouts set),
    /// made and refilled by the sync thread.
    ready: Mutex<Vec<redis::Connection>>,
    /// How many [`Redis::ready`] holds when full.
    pool_size: usize,
}

impl Redis {
    pub fn open(config: &ClusterConfig) -> anyhow::Result<Redis> {
        let url = shown(&config.redis);
        let client =
            redis::Client::open(config.redis.trim()).map_err(|e| anyhow::anyhow!("cluster.redis `{url}`: {e}"))?;
        let mut id = [0u8; 8];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id)
            .map_err(|_| anyhow::anyhow!("no random numbers for the instance id"))?;
        // One connection per worker thread that may count at once, and spares.
        let workers = std::thread::available_parallelism().map_or(2, usize::from);
        Ok(Redis {
            client,
            prefix: format!("wasmgate:{}", config.name),
            url,
            timeout: Duration::from_millis(config.timeout_ms),
            id: u64::from_le_bytes(id),
            health: Health::default(),
            script: redis::Script::new(COUNT_SCRIPT),
            ready: Mutex::new(Vec::new()),
            pool_size: (workers * 2).clamp(2, 32),
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

    fn ready(&self) -> std::sync::MutexGuard<'_, Vec<redis::Connection>> {
        self.ready.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `exact`: counts one event in Redis and returns the totals of the
    /// current bucket (this event included) and the one before. `None`
    /// (count locally) unless Redis is up, a connection is at hand and it
    /// answers in time.
    pub(super) fn count_exact(&self, plugin: &str, key: &str, length_ms: u64, bucket: u64) -> Option<(u64, u64)> {
        if !self.health.is_up() {
            return None;
        }
        let mut connection = self.ready().pop()?;
        let key = truncate(key, MAX_KEY_BYTES);
        let name = |bucket: u64| format!("{}:{plugin}:{length_ms}:{bucket}:{key}", self.prefix);
        let outcome = self
            .script
            .key(name(bucket))
            .key(name(bucket.saturating_sub(1)))
            .arg(length_ms * 2)
            .invoke::<(u64, u64)>(&mut connection);
        match outcome {
            Ok(totals) => {
                self.ready().push(connection);
                Some(totals)
            }
            // Too slow: stop waiting on Redis until the sync thread hears
            // from it again. (A late reply could be read as the next one's,
            // so the connection is never reused.)
            Err(error) if error.is_timeout() => {
                self.health.failed(&self.url, &error);
                self.ready().clear();
                None
            }
            // This connection is gone (Redis closed an idle one, or Redis is
            // down, which the sync thread will find): it is not reused.
            Err(error) if error.is_io_error() || error.is_connection_dropped() || error.is_unrecoverable_error() => {
                self.health.note(&error);
                None
            }
            // An answer refusing the script (a read-only replica, out of
            // memory, an ACL): Redis is there, the connection is sound.
            Err(error) => {
                if self.health.may_log() {
                    tracing::warn!(redis = %self.url, %error, "cluster: Redis refused a count; counting locally");
                }
                self.health.note(&error);
                self.ready().push(connection);
                None
            }
        }
    }

    /// `exact`: fills the pool of ready connections (the sync thread, never
    /// a request, pays for name lookups, connecting and the script load).
    fn refill(&self) -> redis::RedisResult<()> {
        while self.ready().len() < self.pool_size {
            let mut connection = self.client.get_connection_with_timeout(SYNC_TIMEOUT)?;
            connection.set_read_timeout(Some(SYNC_TIMEOUT))?;
            connection.set_write_timeout(Some(SYNC_TIMEOUT))?;
            self.script.prepare_invoke().load(&mut connection)?;
            connection.set_read_timeout(Some(self.timeout))?;
            connection.set_write_timeout(Some(self.timeout))?;
            self.ready().push(connection);
        }
        Ok(())
    }
}

/// The sync thread: every `interval`, checks that Redis answers (a PING, or
/// the publication of the unsent deltas in `synced`), and in `exact` keeps
/// the pool of connections full. Ends when the counters are dropped.
pub(super) fn run_sync(shared: Weak<Shared>, interval: Duration) {
    let mut connection: Option<redis::Connection> = None;
    let mut hold_until: Option<Instant> = None;
    loop {
        let Some(shared) = shared.upgrade() else { return };
        let redis = &shared.redis;
        let outcome = (|| {
            let c = match connection.as_mut() {
                Some(c) => c,
                None => {
                    let c = connection.insert(redis.connect(SYNC_TIMEOUT)?);
                    if redis.health.state() == "down" {
                        hold_until = Some(Instant::now() + RESUBSCRIBE_GRACE);
                    }
                    c
                }
            };
            let held = hold_until.is_some_and(|until| Instant::now() < until);
            match shared.counting {
                Counting::Synced if !held => publish(redis, &shared.table, c)?,
                _ => redis::cmd("PING").query::<String>(c).map(drop)?,
            }
            if shared.counting == Counting::Exact {
                redis.refill()?;
            }
            Ok::<_, redis::RedisError>(())
        })();
        match outcome {
            Ok(()) => {
                redis.health.answered(&redis.url);
            }
            Err(error) => {
                redis.health.failed(&redis.url, &error);
                redis.ready().clear();
                connection = None;
            }
        }
        let wait = if redis.health.is_up() { interval } else { RETRY_EVERY.min(interval) };
        drop(shared);
        std::thread::sleep(wait);
    }
}

/// Publishes every unsent delta; on failure gives them back (except after a
/// timeout, when Redis may have taken the message: sending it again could
/// count it twice). With nothing to send, a PING.
fn publish(redis: &Redis, table: &Table, connection: &mut redis::Connection) -> redis::RedisResult<()> {
    let deltas = table.take_unsent(unix_ms());
    if deltas.is_empty() {
        return redis::cmd("PING").query::<String>(connection).map(drop);
    }
    let channel = redis.channel();
    let mut start = 0;
    while start < deltas.len() {
        let (mut end, mut size) = (start, 0);
        while end < deltas.len() && (end == start || size < MAX_MESSAGE_BYTES) {
            // Measured as written: JSON escapes a control character in six bytes.
            size += serde_json::to_vec(&deltas[end]).map_or(0, |d| d.len()) + 1;
            end += 1;
        }
        let batch = Batch { from: redis.id, deltas: deltas[start..end].to_vec() };
        let message = serde_json::to_vec(&batch).unwrap_or_default();
        if let Err(error) = redis::cmd("PUBLISH").arg(&channel).arg(message).query::<i64>(connection) {
            let unsent = if error.is_timeout() { &deltas[end..] } else { &deltas[start..] };
            table.unsend(unsent);
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
        let (url, channel, id) = (strong.redis.url.clone(), strong.redis.channel(), strong.redis.id);
        let mut connection = match strong.redis.connect(SYNC_TIMEOUT) {
            Ok(connection) => connection,
            Err(error) => {
                strong.redis.health.set_subscribed(&url, false, Some(&error));
                drop(strong);
                std::thread::sleep(RETRY_EVERY);
                continue;
            }
        };
        drop(strong);
        let mut pubsub = connection.as_pubsub();
        if let Err(error) = pubsub.subscribe(&channel).and_then(|()| pubsub.set_read_timeout(Some(SYNC_TIMEOUT))) {
            if let Some(shared) = shared.upgrade() {
                shared.redis.health.set_subscribed(&url, false, Some(&error));
            }
            std::thread::sleep(RETRY_EVERY);
            continue;
        }
        if let Some(shared) = shared.upgrade() {
            shared.redis.health.set_subscribed(&url, true, None);
        }
        loop {
            let message = pubsub.get_message();
            let Some(shared) = shared.upgrade() else { return };
            let message = match message {
                Ok(message) => message,
                Err(error) if error.is_timeout() => continue,
                Err(error) => {
                    shared.redis.health.set_subscribed(&url, false, Some(&error));
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
/// are merged (a plugin name a file name can be, a window the host accepts,
/// counts that cannot overflow a sum).
fn valid(delta: &Delta) -> bool {
    !delta.plugin.is_empty()
        && delta.plugin.len() <= 255
        && delta.key.len() <= MAX_KEY_BYTES
        && (1..=MAX_WINDOW_MS).contains(&delta.length_ms)
        && delta.current <= u64::from(u32::MAX)
        && delta.previous <= u64::from(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_not_shown() {
        assert_eq!(shown("redis://:s3cret@redis:6379/0"), "redis://***@redis:6379/0");
        assert_eq!(shown("redis://user:pw@10.0.0.5:6379"), "redis://***@10.0.0.5:6379");
        assert_eq!(shown("redis://redis:6379"), "redis://redis:6379");
        assert_eq!(shown("redis+unix:///run/redis.sock"), "redis+unix:///run/redis.sock");
    }

    #[test]
    fn health_counts_an_outage_once_until_redis_answers() {
        let health = Health::default();
        assert_eq!(health.state(), "connecting");
        health.answered("r");
        assert_eq!(health.state(), "up");
        let error = redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        health.failed("r", &error);
        health.failed("r", &error);
        assert_eq!((health.state(), health.outages()), ("down", 1));
        health.answered("r");
        health.failed("r", &error);
        assert_eq!(health.outages(), 2);
    }

    #[test]
    fn a_delta_from_the_channel_is_checked() {
        let delta =
            Delta { plugin: "guard".into(), key: "ip:1".into(), length_ms: 60_000, bucket: 1, current: 1, previous: 0 };
        assert!(valid(&delta));
        assert!(!valid(&Delta { plugin: String::new(), ..delta.clone() }));
        assert!(!valid(&Delta { length_ms: 0, ..delta.clone() }));
        assert!(!valid(&Delta { length_ms: MAX_WINDOW_MS + 1, ..delta.clone() }));
        assert!(!valid(&Delta { current: u64::MAX, ..delta.clone() }));
        assert!(!valid(&Delta { key: "k".repeat(MAX_KEY_BYTES + 1), ..delta }));
    }
}
