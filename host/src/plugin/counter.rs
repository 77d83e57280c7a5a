//! Sliding-window event counters behind the host's `count` import.
//!
//! Each key keeps two fixed buckets (the current window and the one before)
//! and reports `previous × (share of it still inside the trailing window) +
//! current`: the usual sliding-window estimate, O(1) memory per key. Keys are
//! spread over shards so concurrent requests rarely meet on one lock, and
//! stale keys are swept from a shard when it grows.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const SHARDS: usize = 32;
/// A shard is swept of expired keys whenever it grows past this many.
const SWEEP_AT: usize = 4096;
/// Keys one shard may hold: a key flood evicts windows instead of growing
/// the gateway's memory.
const MAX_KEYS_PER_SHARD: usize = 8192;
/// Longer keys are cut to this many bytes.
const MAX_KEY_BYTES: usize = 256;
/// The longest window a plugin can ask for: one day.
const MAX_WINDOW_MS: u32 = 86_400_000;

struct Window {
    length: Duration,
    start: Instant,
    current: u64,
    previous: u64,
}

/// One shard's windows, by plugin, then by key: a count of a key already
/// known looks both up by `&str` and allocates nothing.
struct Shard {
    plugins: HashMap<Box<str>, HashMap<Box<str>, Window>>,
    /// Windows held, over all plugins.
    len: usize,
    sweep_at: usize,
}

/// Counters for every plugin, namespaced by plugin name (a plugin counts
/// only its own keys, and a flood of one plugin's keys evicts only its own).
pub struct Counters {
    hasher: RandomState,
    shards: Vec<Mutex<Shard>>,
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            hasher: RandomState::new(),
            shards: (0..SHARDS)
                .map(|_| Mutex::new(Shard { plugins: HashMap::new(), len: 0, sweep_at: SWEEP_AT }))
                .collect(),
        }
    }
}

impl Counters {
    /// Counts one event for (`plugin`, `key`) and returns the events in the
    /// trailing `window_ms`, this one included.
    pub fn count(&self, plugin: &str, key: &str, window_ms: u32) -> u64 {
        self.count_at(plugin, key, window_ms, Instant::now())
    }

    fn count_at(&self, plugin: &str, key: &str, window_ms: u32, now: Instant) -> u64 {
        let length = Duration::from_millis(u64::from(window_ms.clamp(1, MAX_WINDOW_MS)));
        let key = truncate(key, MAX_KEY_BYTES);
        let shard = &self.shards[self.hasher.hash_one((plugin, key)) as usize % SHARDS];
        let mut guard = shard.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let shard = &mut *guard;
        if shard.len >= shard.sweep_at {
            for windows in shard.plugins.values_mut() {
                windows.retain(|_, w| now.duration_since(w.start) < w.length * 2);
            }
            shard.plugins.retain(|_, windows| !windows.is_empty());
            shard.len = shard.plugins.values().map(HashMap::len).sum();
            shard.sweep_at = (shard.len * 2).max(SWEEP_AT);
        }
        if !shard.plugins.contains_key(plugin) {
            shard.plugins.insert(plugin.into(), HashMap::new());
        }
        let known = shard.plugins.get(plugin).is_some_and(|windows| windows.contains_key(key));
        // Full of live keys (a key flood): make room by dropping one of this
        // plugin's own keys, or, for a plugin holding none, one of the
        // plugin holding the most: one plugin's flood never evicts another
        // plugin's counts to make room for its own.
        if !known && shard.len >= MAX_KEYS_PER_SHARD {
            let own = shard.plugins.get(plugin).and_then(|w| w.keys().next().cloned()).map(|k| (Box::from(plugin), k));
            let victim = own.or_else(|| {
                let (p, windows) = shard.plugins.iter().max_by_key(|(_, w)| w.len())?;
                windows.keys().next().map(|k| (p.clone(), k.clone()))
            });
            if let Some((victim_plugin, victim_key)) = victim
                && let Some(windows) = shard.plugins.get_mut(&victim_plugin)
                && windows.remove(&victim_key).is_some()
            {
                shard.len -= 1;
            }
        }
        let Some(windows) = shard.plugins.get_mut(plugin) else {
            unreachable!("the plugin's map was inserted above");
        };
        if !known {
            windows.insert(key.into(), Window { length, start: now, current: 0, previous: 0 });
            shard.len += 1;
        }
        let Some(window) = windows.get_mut(key) else {
            unreachable!("the window was inserted above");
        };
        if window.length != length {
            *window = Window { length, start: now, current: 0, previous: 0 };
        }
        let elapsed = now.duration_since(window.start);
        if elapsed >= length * 2 {
            window.previous = 0;
            window.current = 0;
            window.start = now;
        } else if elapsed >= length {
            window.previous = window.current;
            window.current = 0;
            window.start += length;
        }
        window.current += 1;
        let into_current = now.duration_since(window.start).as_secs_f64() / length.as_secs_f64();
        let carried = (window.previous as f64 * (1.0 - into_current)).floor() as u64;
        carried + window.current
    }
}

/// `text` cut to at most `max` bytes, on a character boundary.
fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_within_a_window_and_forgets_after_it() {
        let counters = Counters::default();
        let t0 = Instant::now();
        for i in 1..=5 {
            assert_eq!(counters.count_at("p", "ip", 1000, t0), i);
        }
        // Half a window later the previous bucket still weighs in.
        let t1 = t0 + Duration::from_millis(1500);
        let n = counters.count_at("p", "ip", 1000, t1);
        assert!((3..=4).contains(&n), "got {n}");
        // Two windows of silence forget everything.
        assert_eq!(counters.count_at("p", "ip", 1000, t1 + Duration::from_secs(3)), 1);
    }

    #[test]
    fn a_key_flood_stays_bounded() {
        let counters = Counters::default();
        let now = Instant::now();
        for i in 0..(SHARDS * MAX_KEYS_PER_SHARD + 20_000) {
            counters.count_at("p", &format!("k{i}"), 86_400_000, now);
        }
        let total: usize = counters.shards.iter().map(|s| s.lock().unwrap().len).sum();
        let held: usize =
            counters.shards.iter().map(|s| s.lock().unwrap().plugins.values().map(HashMap::len).sum::<usize>()).sum();
        assert_eq!(total, held, "the shards' counts match what they hold");
        assert!(total <= SHARDS * MAX_KEYS_PER_SHARD, "{total} keys kept");
        let long = "x".repeat(10_000);
        assert_eq!(counters.count_at("p", &long, 1000, now), 1);
        assert_eq!(counters.count_at("p", &long[..MAX_KEY_BYTES], 1000, now), 2, "long keys are cut");
    }

    #[test]
    fn keys_are_private_to_each_plugin() {
        let counters = Counters::default();
        let now = Instant::now();
        assert_eq!(counters.count_at("a", "k", 1000, now), 1);
        assert_eq!(counters.count_at("b", "k", 1000, now), 1);
        assert_eq!(counters.count_at("a", "k", 1000, now), 2);
    }

    #[test]
    fn one_plugins_key_flood_does_not_evict_another_plugins_counts() {
        let counters = Counters::default();
        let now = Instant::now();
        // A guard counting a few clients, then another plugin flooding keys.
        for client in 0..100 {
            for _ in 0..3 {
                counters.count_at("guard", &format!("client-{client}"), 60_000, now);
            }
        }
        for i in 0..(SHARDS * MAX_KEYS_PER_SHARD * 2) {
            counters.count_at("flooder", &format!("k{i}"), 60_000, now);
        }
        for client in 0..100 {
            assert_eq!(counters.count_at("guard", &format!("client-{client}"), 60_000, now), 4, "client {client}");
        }
    }
}
