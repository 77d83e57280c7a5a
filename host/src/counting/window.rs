//! Sliding-window event counters: the table behind the host's `count`.
//!
//! Each key keeps two fixed buckets (the current window and the one before)
//! and reports `previous × (share of it still inside the trailing window) +
//! current`: the usual sliding-window estimate, O(1) memory per key. Buckets
//! are aligned on the wall clock (bucket `n` of a 60 s window is the `n`th
//! minute since 1970), so every instance of a fleet cuts them alike. A
//! bucket holds this process's own events and, when counts are shared, what
//! the other instances counted (`others`, merged from their deltas), and
//! how many of its own events it has sent them (`sent`). Keys are spread
//! over shards so concurrent requests rarely meet on one lock, and stale
//! keys are swept from a shard when it grows.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Mutex;

const SHARDS: usize = 32;
/// A shard is swept of expired keys whenever it grows past this many.
const SWEEP_AT: usize = 4096;
/// Keys one shard may hold: a key flood evicts windows instead of growing
/// the gateway's memory.
const MAX_KEYS_PER_SHARD: usize = 8192;
/// Longer keys are cut to this many bytes.
pub const MAX_KEY_BYTES: usize = 256;
/// The longest window a plugin can ask for: one day.
pub const MAX_WINDOW_MS: u64 = 86_400_000;

/// A window's length in milliseconds, as the table keeps it.
pub fn window_length(window_ms: u32) -> u64 {
    u64::from(window_ms).clamp(1, MAX_WINDOW_MS)
}

/// The sliding-window estimate from the two buckets' totals, `now_ms` into
/// the bucket that starts at `start_ms`.
pub fn estimate(previous: u64, current: u64, length_ms: u64, start_ms: u64, now_ms: u64) -> u64 {
    let into_current = now_ms.saturating_sub(start_ms) as f64 / length_ms as f64;
    let carried = (previous as f64 * (1.0 - into_current.min(1.0))).floor() as u64;
    carried.saturating_add(current)
}

/// Index 0 is the current bucket, 1 the one before it.
#[derive(Default, Clone, Copy)]
struct Bucket {
    own: u64,
    sent: u64,
    others: u64,
}

struct Window {
    length_ms: u64,
    /// The current bucket's number (`now_ms / length_ms`).
    bucket: u64,
    buckets: [Bucket; 2],
}

impl Window {
    fn new(length_ms: u64, bucket: u64) -> Window {
        Window { length_ms, bucket, buckets: [Bucket::default(); 2] }
    }

    /// Moves the buckets on to bucket `now`. A clock stepped back (NTP, a
    /// resumed VM) starts the window afresh rather than freezing it in a
    /// bucket the clock will not reach again for as long as it stepped.
    fn roll(&mut self, now: u64) {
        match now.checked_sub(self.bucket) {
            Some(0) => {}
            Some(1) => self.buckets = [Bucket::default(), self.buckets[0]],
            _ => self.buckets = [Bucket::default(); 2],
        }
        self.bucket = now;
    }

    /// Which of the two buckets `bucket` is, if it is either.
    fn slot(&self, bucket: u64) -> Option<usize> {
        match self.bucket.checked_sub(bucket) {
            Some(0) => Some(0),
            Some(1) => Some(1),
            _ => None,
        }
    }

    fn estimate(&self, now_ms: u64) -> u64 {
        let total = |b: &Bucket| b.own.saturating_add(b.others);
        estimate(total(&self.buckets[1]), total(&self.buckets[0]), self.length_ms, self.bucket * self.length_ms, now_ms)
    }

    fn live(&self, now_bucket_of: impl Fn(u64) -> u64) -> bool {
        now_bucket_of(self.length_ms) <= self.bucket + 1
    }
}

/// Events of one key this process counted and has not yet sent, by bucket:
/// what a synced instance publishes, and takes back if publishing fails.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Delta {
    pub plugin: String,
    pub key: String,
    pub length_ms: u64,
    /// The bucket `current` belongs to; `previous` belongs to the one before.
    pub bucket: u64,
    pub current: u64,
    pub previous: u64,
}

/// One shard's windows, by plugin, then by key: a count of a key already
/// known looks both up by `&str` and allocates nothing.
struct Shard {
    plugins: HashMap<Box<str>, HashMap<Box<str>, Window>>,
    /// Windows held, over all plugins.
    len: usize,
    sweep_at: usize,
    /// When it was last swept (Unix ms): a full shard is swept at most
    /// once per [`FULL_SWEEP_EVERY_MS`], not on every count of a flood.
    swept_ms: u64,
}

/// How often a shard full of live keys may be swept again.
const FULL_SWEEP_EVERY_MS: u64 = 1000;

impl Shard {
    /// Drops the windows whose buckets have both passed.
    fn sweep(&mut self, now_ms: u64) {
        let bucket_of = |length_ms: u64| now_ms / length_ms;
        for windows in self.plugins.values_mut() {
            windows.retain(|_, w| w.live(bucket_of));
        }
        self.plugins.retain(|_, windows| !windows.is_empty());
        self.len = self.plugins.values().map(HashMap::len).sum();
        // Never past the cap, or a full shard would never be swept again.
        self.sweep_at = (self.len * 2).clamp(SWEEP_AT, MAX_KEYS_PER_SHARD);
        self.swept_ms = now_ms;
    }

    /// The window of (`plugin`, `key`), made and rolled on to `now_ms`. A
    /// full shard is swept first; if it is still full, a count evicts a key
    /// (`evict`), and a peer's delta (not `evict`) is dropped: another
    /// process's keys never push out this one's.
    fn window(&mut self, plugin: &str, key: &str, length_ms: u64, now_ms: u64, evict: bool) -> Option<&mut Window> {
        let bucket_of = |length_ms: u64| now_ms / length_ms;
        let full = self.len >= MAX_KEYS_PER_SHARD;
        if self.len >= self.sweep_at && (!full || now_ms.saturating_sub(self.swept_ms) >= FULL_SWEEP_EVERY_MS) {
            self.sweep(now_ms);
        }
        let known = self.plugins.get(plugin).is_some_and(|windows| windows.contains_key(key));
        if !known && self.len >= MAX_KEYS_PER_SHARD && !evict {
            return None;
        }
        if !self.plugins.contains_key(plugin) {
            self.plugins.insert(plugin.into(), HashMap::new());
        }
        // Full of live keys (a key flood): make room by dropping one of this
        // plugin's own keys, or, for a plugin holding none, one of the
        // plugin holding the most: one plugin's flood never evicts another
        // plugin's counts to make room for its own.
        if !known && self.len >= MAX_KEYS_PER_SHARD {
            let own = self.plugins.get(plugin).and_then(|w| w.keys().next().cloned()).map(|k| (Box::from(plugin), k));
            let victim = own.or_else(|| {
                let (p, windows) = self.plugins.iter().max_by_key(|(_, w)| w.len())?;
                windows.keys().next().map(|k| (p.clone(), k.clone()))
            });
            if let Some((victim_plugin, victim_key)) = victim
                && let Some(windows) = self.plugins.get_mut(&victim_plugin)
                && windows.remove(&victim_key).is_some()
            {
                self.len -= 1;
            }
        }
        let Some(windows) = self.plugins.get_mut(plugin) else {
            unreachable!("the plugin's map was inserted above");
        };
        if !known {
            windows.insert(key.into(), Window::new(length_ms, bucket_of(length_ms)));
            self.len += 1;
        }
        let Some(window) = windows.get_mut(key) else {
            unreachable!("the window was inserted above");
        };
        if window.length_ms != length_ms {
            // A plugin counting the key over another window starts it
            // afresh; a peer's delta for another window is dropped (two
            // versions of a setting, mid-rollout, would reset each other).
            if !evict {
                return None;
            }
            *window = Window::new(length_ms, bucket_of(length_ms));
        }
        window.roll(bucket_of(length_ms));
        Some(window)
    }
}

/// Counters for every plugin, namespaced by plugin name (a plugin counts
/// only its own keys, and a flood of one plugin's keys evicts only its own).
pub struct Table {
    hasher: RandomState,
    shards: Vec<Mutex<Shard>>,
}

impl Default for Table {
    fn default() -> Self {
        Table {
            hasher: RandomState::new(),
            shards: (0..SHARDS)
                .map(|_| Mutex::new(Shard { plugins: HashMap::new(), len: 0, sweep_at: SWEEP_AT, swept_ms: 0 }))
                .collect(),
        }
    }
}

impl Table {
    fn shard(&self, plugin: &str, key: &str) -> std::sync::MutexGuard<'_, Shard> {
        let shard = &self.shards[self.hasher.hash_one((plugin, key)) as usize % SHARDS];
        shard.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Counts one event for (`plugin`, `key`) at `now_ms` (Unix time) and
    /// returns the events in the trailing window, this one included: this
    /// process's own and what the others counted, as last merged.
    pub fn count(&self, plugin: &str, key: &str, window_ms: u32, now_ms: u64) -> u64 {
        let key = truncate(key, MAX_KEY_BYTES);
        let mut shard = self.shard(plugin, key);
        let Some(window) = shard.window(plugin, key, window_length(window_ms), now_ms, true) else {
            unreachable!("a count always gets a window");
        };
        window.buckets[0].own += 1;
        window.estimate(now_ms)
    }

    /// Takes every key's events not yet sent, rolled on to `now_ms`, and
    /// counts them as sent.
    pub fn take_unsent(&self, now_ms: u64) -> Vec<Delta> {
        let mut deltas = Vec::new();
        for shard in &self.shards {
            let mut shard = shard.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            for (plugin, windows) in &mut shard.plugins {
                for (key, window) in windows.iter_mut() {
                    window.roll(now_ms / window.length_ms);
                    let [current, previous] = window.buckets.each_mut().map(|b| {
                        let unsent = b.own - b.sent;
                        b.sent = b.own;
                        unsent
                    });
                    if current + previous > 0 {
                        deltas.push(Delta {
                            plugin: plugin.to_string(),
                            key: key.to_string(),
                            length_ms: window.length_ms,
                            bucket: window.bucket,
                            current,
                            previous,
                        });
                    }
                }
            }
        }
        deltas
    }

    /// Gives back deltas [`Table::take_unsent`] took and that could not be
    /// sent, so they go with the next send (those whose buckets have passed
    /// meanwhile are dropped: they no longer count).
    pub fn unsend(&self, deltas: &[Delta]) {
        for delta in deltas {
            let mut shard = self.shard(&delta.plugin, &delta.key);
            let Some(window) = shard.plugins.get_mut(delta.plugin.as_str()).and_then(|w| w.get_mut(delta.key.as_str()))
            else {
                continue;
            };
            if window.length_ms != delta.length_ms {
                continue;
            }
            let previous_bucket = delta.bucket.checked_sub(1);
            for (bucket, unsent) in [(Some(delta.bucket), delta.current), (previous_bucket, delta.previous)] {
                if let Some(slot) = bucket.and_then(|b| window.slot(b)) {
                    let b = &mut window.buckets[slot];
                    b.sent = b.sent.saturating_sub(unsent);
                }
            }
        }
    }

    /// Merges what another instance counted. Its buckets are placed by
    /// number; a bucket this process has already passed (or not yet
    /// reached: a clock ahead of ours) is dropped, and so is a delta for a
    /// window of another length, or one that would push out a key of ours.
    pub fn merge(&self, delta: &Delta, now_ms: u64) {
        let key = truncate(&delta.key, MAX_KEY_BYTES);
        let length_ms = delta.length_ms.clamp(1, MAX_WINDOW_MS);
        let now = now_ms / length_ms;
        let lands = |bucket: u64, events: u64| events > 0 && (bucket == now || bucket.checked_add(1) == Some(now));
        if !lands(delta.bucket, delta.current) && !lands(delta.bucket.wrapping_sub(1), delta.previous) {
            return;
        }
        let mut shard = self.shard(&delta.plugin, key);
        let Some(window) = shard.window(&delta.plugin, key, length_ms, now_ms, false) else { return };
        let previous_bucket = delta.bucket.checked_sub(1);
        for (bucket, events) in [(Some(delta.bucket), delta.current), (previous_bucket, delta.previous)] {
            if let Some(slot) = bucket.and_then(|b| window.slot(b)) {
                let b = &mut window.buckets[slot];
                b.others = b.others.saturating_add(events);
            }
        }
    }
}

/// `text` cut to at most `max` bytes, on a character boundary.
pub fn truncate(text: &str, max: usize) -> &str {
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

    /// A moment at the start of a 1 s bucket.
    const T0: u64 = 1_764_000_000_000;

    #[test]
    fn counts_within_a_window_and_forgets_after_it() {
        let table = Table::default();
        for i in 1..=5 {
            assert_eq!(table.count("p", "ip", 1000, T0), i);
        }
        // Half a window later the previous bucket still weighs in.
        let t1 = T0 + 1500;
        let n = table.count("p", "ip", 1000, t1);
        assert!((3..=4).contains(&n), "got {n}");
        // Two windows of silence forget everything.
        assert_eq!(table.count("p", "ip", 1000, t1 + 3000), 1);
    }

    #[test]
    fn a_key_flood_stays_bounded() {
        let table = Table::default();
        for i in 0..(SHARDS * MAX_KEYS_PER_SHARD + 20_000) {
            table.count("p", &format!("k{i}"), 86_400_000, T0);
        }
        let total: usize = table.shards.iter().map(|s| s.lock().unwrap().len).sum();
        let held: usize =
            table.shards.iter().map(|s| s.lock().unwrap().plugins.values().map(HashMap::len).sum::<usize>()).sum();
        assert_eq!(total, held, "the shards' counts match what they hold");
        assert!(total <= SHARDS * MAX_KEYS_PER_SHARD, "{total} keys kept");
        let long = "x".repeat(10_000);
        assert_eq!(table.count("p", &long, 1000, T0), 1);
        assert_eq!(table.count("p", &long[..MAX_KEY_BYTES], 1000, T0), 2, "long keys are cut");
    }

    #[test]
    fn keys_are_private_to_each_plugin() {
        let table = Table::default();
        assert_eq!(table.count("a", "k", 1000, T0), 1);
        assert_eq!(table.count("b", "k", 1000, T0), 1);
        assert_eq!(table.count("a", "k", 1000, T0), 2);
    }

    #[test]
    fn one_plugins_key_flood_does_not_evict_another_plugins_counts() {
        let table = Table::default();
        // A guard counting a few clients, then another plugin flooding keys.
        for client in 0..100 {
            for _ in 0..3 {
                table.count("guard", &format!("client-{client}"), 60_000, T0);
            }
        }
        for i in 0..(SHARDS * MAX_KEYS_PER_SHARD * 2) {
            table.count("flooder", &format!("k{i}"), 60_000, T0);
        }
        for client in 0..100 {
            assert_eq!(table.count("guard", &format!("client-{client}"), 60_000, T0), 4, "client {client}");
        }
    }

    #[test]
    fn deltas_sent_are_merged_by_the_others_and_failed_sends_go_again() {
        let (a, b) = (Table::default(), Table::default());
        for _ in 0..3 {
            a.count("p", "k", 1000, T0);
        }
        let deltas = a.take_unsent(T0 + 10);
        assert_eq!(deltas.len(), 1);
        assert_eq!((deltas[0].current, deltas[0].previous), (3, 0));
        assert!(a.take_unsent(T0 + 20).is_empty(), "sent events are not sent twice");
        for delta in &deltas {
            b.merge(delta, T0 + 30);
        }
        assert_eq!(b.count("p", "k", 1000, T0 + 40), 4, "b counts a's three and its own");

        // A send that fails is given back and goes with the next one, in
        // the bucket it belongs to even after the buckets have moved on.
        a.count("p", "k", 1000, T0 + 50);
        let failed = a.take_unsent(T0 + 60);
        a.unsend(&failed);
        a.count("p", "k", 1000, T0 + 1100);
        let again = a.take_unsent(T0 + 1200);
        assert_eq!(again.len(), 1);
        assert_eq!((again[0].bucket, again[0].current, again[0].previous), (T0 / 1000 + 1, 1, 1));
        for delta in &again {
            b.merge(delta, T0 + 1300);
        }
        // b: previous bucket 3 (a) + 1 (own) + 1 (a, late), current 1 (a).
        let n = b.count("p", "k", 1000, T0 + 1300);
        assert_eq!(n, (5.0_f64 * 0.7).floor() as u64 + 2);
    }

    #[test]
    fn a_clock_stepped_back_starts_windows_afresh() {
        let table = Table::default();
        for _ in 0..10 {
            table.count("p", "k", 60_000, T0);
        }
        // An hour back: the window is not frozen at 10 for that hour.
        assert_eq!(table.count("p", "k", 60_000, T0 - 3_600_000), 1);
    }

    #[test]
    fn a_full_shard_of_passed_windows_is_swept_and_never_stops_sweeping() {
        let table = Table::default();
        // Every shard full (twice the keys they hold, spread by hash).
        for i in 0..(SHARDS * MAX_KEYS_PER_SHARD * 2) {
            table.count("p", &format!("old{i}"), 1000, T0);
        }
        assert!(table.shards.iter().all(|s| s.lock().unwrap().len == MAX_KEYS_PER_SHARD));
        // Ten seconds on, every window has passed: each full shard is swept
        // on its next count rather than evicting, and stays sweepable.
        let later = T0 + 10_000;
        table.count("guard", "client", 60_000, later);
        for i in 0..(SHARDS * 100) {
            table.count("p", &format!("new{i}"), 1000, later);
        }
        for shard in &table.shards {
            let shard = shard.lock().unwrap();
            assert!(shard.sweep_at <= MAX_KEYS_PER_SHARD, "sweep_at {}", shard.sweep_at);
            assert!(shard.len < MAX_KEYS_PER_SHARD, "a shard kept its passed windows: {}", shard.len);
        }
        assert_eq!(table.count("guard", "client", 60_000, later), 2);
        // A sweep that finds more than half the cap alive never sets the
        // next one past the cap (where a full shard would never sweep again).
        let mut shard = Shard { plugins: HashMap::new(), len: 0, sweep_at: MAX_KEYS_PER_SHARD, swept_ms: 0 };
        for i in 0..6000 {
            shard.window("p", &format!("k{i}"), 60_000, T0, true);
        }
        shard.sweep(T0);
        assert_eq!(shard.len, 6000);
        assert!(shard.sweep_at <= MAX_KEYS_PER_SHARD, "sweep_at {}", shard.sweep_at);
    }

    #[test]
    fn a_peers_delta_never_resets_evicts_or_makes_useless_windows() {
        let table = Table::default();
        let delta = |length_ms: u64, bucket: u64, current: u64| Delta {
            plugin: "p".into(),
            key: "k".into(),
            length_ms,
            bucket,
            current,
            previous: 0,
        };
        for _ in 0..3 {
            table.count("p", "k", 60_000, T0);
        }
        // The same key over another window (a setting mid-rollout): dropped,
        // our own counts kept.
        table.merge(&delta(30_000, T0 / 30_000, 50), T0);
        assert_eq!(table.count("p", "k", 60_000, T0), 4);
        // Stale, future, empty and absurd deltas make no window at all.
        table.merge(&delta(60_000, T0 / 60_000 - 5, 9), T0);
        table.merge(&delta(60_000, T0 / 60_000 + 1, 9), T0);
        table.merge(&delta(60_000, u64::MAX, 9), T0);
        table.merge(&Delta { key: "other".into(), ..delta(60_000, T0 / 60_000, 0) }, T0);
        let held: usize = table.shards.iter().map(|s| s.lock().unwrap().len).sum();
        assert_eq!(held, 1, "only our own key is held");
        // A full shard drops a peer's new key instead of evicting ours.
        let full = Table::default();
        for i in 0..(SHARDS * MAX_KEYS_PER_SHARD * 2) {
            full.count("p", &format!("k{i}"), 60_000, T0);
        }
        let before: usize = full.shards.iter().map(|s| s.lock().unwrap().len).sum();
        for i in 0..10_000 {
            full.merge(&Delta { key: format!("peer{i}"), ..delta(60_000, T0 / 60_000, 1) }, T0);
        }
        let after: usize = full.shards.iter().map(|s| s.lock().unwrap().len).sum();
        assert_eq!(before, after);
        let peer_keys: usize = full
            .shards
            .iter()
            .map(|s| {
                s.lock().unwrap().plugins.values().flat_map(|w| w.keys()).filter(|k| k.starts_with("peer")).count()
            })
            .sum();
        assert_eq!(peer_keys, 0, "a peer's key pushed out one of ours");
    }

    #[test]
    fn a_peers_stale_or_future_buckets_are_dropped() {
        let table = Table::default();
        let at = |bucket: u64| Delta {
            plugin: "p".into(),
            key: "k".into(),
            length_ms: 1000,
            bucket,
            current: 100,
            previous: 100,
        };
        table.merge(&at(T0 / 1000 - 5), T0);
        table.merge(&at(T0 / 1000 + 3), T0);
        assert_eq!(table.count("p", "k", 1000, T0), 1);
    }
}
