//! Backend pools: the servers that can take a request, their health, and the
//! choice of one.
//!
//! A server is healthy or unhealthy. Probes ([`super::probe`]) move it between
//! the two after their thresholds; a refused connection ([`Server::connect_failed`])
//! marks it unhealthy at once. Only healthy servers are picked, by the pool's
//! balancing method. Every transition is logged once, with its reason.
//!
//! A reload ([`Pools::update`]) keeps every server that stays in its pool —
//! the same object, with its health, counts and live WebSockets — and
//! retires the servers it removes: they take nothing new and their
//! WebSockets are closed over the drain window.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::budget::{Budgets, SocketBudget};
use super::connect::{self, Forwarder, MAX_IDLE_PER_SERVER};
use super::tls::PoolTls;
use crate::config::{Balance, PoolConfig, ProbeConfig};
use crate::shutdown::{Spread, Stop, StopCause, StopList};

/// One backend server of a pool.
#[derive(Debug)]
pub struct Server {
    /// `host:port`, as configured.
    pub address: String,
    /// The address as a URI authority, parsed once (`None` if it is not
    /// one; requests to the server then fail as they would have).
    pub authority: Option<http::uri::Authority>,
    /// The pool it belongs to (for logs).
    pub pool: String,
    healthy: AtomicBool,
    /// In-flight requests plus live WebSockets.
    active: AtomicUsize,
    /// Live WebSockets alone (for status and the dashboard).
    websockets: AtomicUsize,
    /// The outcome of the latest probe: when, and `None` if it passed or
    /// why it failed.
    last_probe: Mutex<Option<(std::time::SystemTime, Option<String>)>>,
    /// Why the server last changed state (for status and logs).
    last_reason: Mutex<String>,
    /// Fired when the server turns unhealthy in a pool that closes
    /// WebSockets of unhealthy servers (and reset when it recovers).
    eject: StopList,
    close_on_unhealthy: AtomicBool,
    /// Set when a reload removes the server: its WebSockets close over it.
    removal: Spread,
}

/// Holds a server's connection count up while a request or WebSocket lives.
pub struct ActiveGuard {
    server: Arc<Server>,
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.server.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Holds a server's WebSocket count up while a relay lives.
pub struct WebSocketGuard {
    server: Arc<Server>,
}

impl Drop for WebSocketGuard {
    fn drop(&mut self) {
        self.server.websockets.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Server {
    fn new(address: &str, pool: &PoolConfig) -> Server {
        Server {
            address: address.to_owned(),
            authority: address.parse().ok(),
            pool: pool.name.clone(),
            healthy: AtomicBool::new(pool.probe.start_healthy),
            active: AtomicUsize::new(0),
            websockets: AtomicUsize::new(0),
            last_probe: Mutex::new(None),
            last_reason: Mutex::new(if pool.probe.start_healthy { "starting" } else { "not probed yet" }.into()),
            eject: StopList::new(StopCause::ServerUnhealthy),
            close_on_unhealthy: AtomicBool::new(pool.close_on_unhealthy),
            removal: Spread::new(StopCause::Removed),
        }
    }

    /// Takes no new traffic from now on, and closes its WebSockets, each at
    /// a random moment of `window`.
    pub fn retire(&self, window: Duration) {
        self.removal.begin(window);
    }

    /// Fires `stop` when this server's WebSockets must close: at once when
    /// it is ejected (unhealthy in a pool with `close_on_unhealthy`), at a
    /// random moment of the drain window when a reload removes it.
    pub fn add_stop(&self, stop: &Arc<Stop>) {
        self.eject.add(stop);
        self.removal.add(stop);
    }

    /// A WebSocket whose stop signal was added here ended.
    pub fn stop_ended(&self) {
        self.eject.ended();
        self.removal.ended();
    }

    fn takes_traffic(&self) -> bool {
        self.is_healthy() && !self.removal.has_begun()
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    /// In-flight requests plus live WebSockets.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// Live WebSockets relayed to this server.
    pub fn websockets(&self) -> usize {
        self.websockets.load(Ordering::Acquire)
    }

    /// Counts a relayed WebSocket until the guard drops.
    pub fn websocket(self: &Arc<Self>) -> WebSocketGuard {
        self.websockets.fetch_add(1, Ordering::AcqRel);
        WebSocketGuard { server: self.clone() }
    }

    /// Notes a probe's outcome (`Err` with why it failed).
    pub fn record_probe(&self, outcome: &Result<(), String>) {
        let failure = outcome.as_ref().err().cloned();
        *self.last_probe.lock().unwrap_or_else(|p| p.into_inner()) = Some((std::time::SystemTime::now(), failure));
    }

    /// The latest probe: when, and why it failed (`None`: it passed).
    pub fn last_probe(&self) -> Option<(std::time::SystemTime, Option<String>)> {
        self.last_probe.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Counts a request or WebSocket on this server until the guard drops.
    pub fn begin(self: &Arc<Self>) -> ActiveGuard {
        self.active.fetch_add(1, Ordering::AcqRel);
        ActiveGuard { server: self.clone() }
    }

    /// Why the server last changed state.
    pub fn last_reason(&self) -> String {
        self.last_reason.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Sets the server's health; logs and returns `true` if it changed.
    pub fn set_healthy(&self, healthy: bool, reason: &str) -> bool {
        let changed = self.healthy.swap(healthy, Ordering::AcqRel) != healthy;
        *self.last_reason.lock().unwrap_or_else(|p| p.into_inner()) = reason.to_owned();
        if changed {
            if healthy {
                tracing::info!(pool = %self.pool, server = %self.address, %reason, "server healthy");
            } else {
                tracing::warn!(pool = %self.pool, server = %self.address, %reason, "server unhealthy");
            }
        }
        self.update_eject();
        changed
    }

    /// Sets whether the server's WebSockets close while it is unhealthy (a
    /// reload may change it for a kept server).
    pub fn set_close_on_unhealthy(&self, close: bool) {
        self.close_on_unhealthy.store(close, Ordering::Release);
        self.update_eject();
    }

    /// Ejected exactly while unhealthy in a pool that closes WebSockets of
    /// unhealthy servers.
    fn update_eject(&self) {
        let eject = self.close_on_unhealthy.load(Ordering::Acquire) && !self.is_healthy();
        self.eject.set(eject);
    }

    /// A connection to the server failed: it takes no new traffic until
    /// probes bring it back.
    pub fn connect_failed(&self, error: &str) {
        self.set_healthy(false, &format!("connection failed: {error}"));
    }
}

/// A configured pool.
#[derive(Debug)]
pub struct Pool {
    pub name: String,
    /// The name as a metrics label.
    pub label: Arc<str>,
    /// What it was built from: an unchanged pool survives a reload whole.
    pub config: PoolConfig,
    pub servers: Vec<Arc<Server>>,
    pub balance: Balance,
    pub request_timeout: Duration,
    pub retries: u32,
    pub probe: ProbeConfig,
    /// TLS to the servers, for `https` pools.
    pub tls: Option<PoolTls>,
    /// The pooled client plain requests to this pool's servers go through.
    pub forwarder: Forwarder,
    /// Where its upstream connections count (the process's budget and its
    /// own `max_connections`).
    pub budgets: Budgets,
    next: AtomicUsize,
}

impl Pool {
    /// Whether a request that cannot reach one server may be sent to
    /// another: the pool retries and has another server.
    pub fn may_retry(&self) -> bool {
        self.retries > 0 && self.servers.len() > 1
    }

    /// Builds a pool whose connections count in `process`; fails if its TLS
    /// settings cannot be loaded (`ca`).
    pub fn new(config: &PoolConfig, process: &Arc<SocketBudget>) -> Result<Pool, String> {
        Pool::reusing(config, None, process)
    }

    /// Builds a pool, taking the servers `old` also has from it.
    fn reusing(config: &PoolConfig, old: Option<&Pool>, process: &Arc<SocketBudget>) -> Result<Pool, String> {
        let tls = PoolTls::for_pool(config).map_err(|e| format!("pool `{}`: {e}", config.name))?;
        let server = |address: &String| match old.and_then(|old| old.servers.iter().find(|s| &s.address == address)) {
            // Its settings change when the new pools are committed
            // ([`Pools::commit`]), not before: a refused config changes nothing.
            Some(kept) => kept.clone(),
            None => Arc::new(Server::new(address, config)),
        };
        // A changed pool keeps counting in its budget: its connections
        // still open (WebSockets, requests under way) hold their places.
        let pool_budget = config.max_connections.map(|limit| match old.and_then(|old| old.budgets.pool.clone()) {
            Some(budget) => {
                budget.set_limit(limit);
                budget
            }
            None => SocketBudget::new(format!("pool `{}`", config.name), limit),
        });
        let budgets = Budgets { process: process.clone(), pool: pool_budget };
        // Idle connections per server: with a pool limit, an even share of
        // half of it (none if that rounds to zero), so idle connections can
        // never take the places new ones to another server need.
        let max_idle = match config.max_connections {
            Some(limit) => (limit / 2 / config.servers.len().max(1)).min(MAX_IDLE_PER_SERVER),
            None => MAX_IDLE_PER_SERVER,
        };
        Ok(Pool {
            name: config.name.clone(),
            label: config.name.as_str().into(),
            config: config.clone(),
            servers: config.servers.iter().map(server).collect(),
            balance: config.balance,
            request_timeout: Duration::from_secs(config.request_timeout_s),
            retries: config.retries,
            probe: config.probe.clone(),
            forwarder: Forwarder::new(
                &config.servers,
                tls.as_ref(),
                connect::connect_timeout(Duration::from_secs(config.request_timeout_s)),
                budgets.clone(),
                max_idle,
            ),
            budgets,
            tls,
            next: AtomicUsize::new(0),
        })
    }

    /// A healthy server not in `exclude`, by the pool's balancing method, or
    /// `None` if there is none.
    pub fn pick(&self, affinity_key: Option<&str>, exclude: &[Arc<Server>]) -> Option<Arc<Server>> {
        let eligible = |s: &Arc<Server>| s.takes_traffic() && !exclude.iter().any(|e| Arc::ptr_eq(e, s));
        let n = self.servers.len();
        if n == 0 {
            return None;
        }
        match (self.balance, affinity_key) {
            (Balance::Hash, Some(key)) => {
                self.servers.iter().filter(|s| eligible(s)).max_by_key(|s| rendezvous_weight(key, &s.address)).cloned()
            }
            (Balance::LeastConnections, _) => {
                // Start at a rotating offset so ties spread instead of piling
                // onto the first server.
                let start = self.next.fetch_add(1, Ordering::Relaxed);
                (0..n)
                    .map(|i| &self.servers[(start + i) % n])
                    .filter(|s| eligible(s))
                    .min_by_key(|s| s.active())
                    .cloned()
            }
            (Balance::RoundRobin | Balance::Hash, _) => {
                let start = self.next.fetch_add(1, Ordering::Relaxed);
                (0..n).map(|i| &self.servers[(start + i) % n]).find(|s| eligible(s)).cloned()
            }
        }
    }
}

/// The weight of `server` for `key`: the highest-weight server takes the key.
fn rendezvous_weight(key: &str, server: &str) -> u64 {
    // XXH3, whose output its specification fixes: every gateway instance,
    // every restart and every build (whatever the Rust release) maps a key
    // to the same server. (std's DefaultHasher promises no such thing.)
    let mut hasher = xxhash_rust::xxh3::Xxh3Default::new();
    hasher.update(key.as_bytes());
    hasher.update(&[0xff]);
    hasher.update(server.as_bytes());
    hasher.digest()
}

/// Every pool by name.
#[derive(Debug)]
pub struct Pools {
    by_name: HashMap<String, Arc<Pool>>,
    /// The process's budget of upstream connections, which every pool's
    /// connections count in.
    process: Arc<SocketBudget>,
}

/// What [`Pools::update`] changed.
#[derive(Debug, Default)]
pub struct PoolChanges {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Pools whose settings or membership changed (rebuilt around the kept servers).
    pub changed: Vec<String>,
    pub servers_added: Vec<(String, String)>,
    /// Servers no pool has any more; the caller retires them.
    pub servers_removed: Vec<Arc<Server>>,
}

/// No pools, and no limit on upstream connections: for checking configs
/// and plugins, where nothing connects.
impl Default for Pools {
    fn default() -> Pools {
        Pools::empty(SocketBudget::new("the process", usize::MAX))
    }
}

impl Pools {
    /// No pools yet; their connections will count in `process`.
    pub fn empty(process: Arc<SocketBudget>) -> Pools {
        Pools { by_name: HashMap::new(), process }
    }

    /// The pools for `configs`, with no limit on upstream connections but
    /// their own: for checking a config, where nothing connects.
    pub fn new(configs: &[PoolConfig]) -> Result<Pools, String> {
        Ok(Pools::default().update(configs)?.0)
    }

    /// The process's budget of upstream connections.
    pub fn process_budget(&self) -> &Arc<SocketBudget> {
        &self.process
    }

    /// The pools for `configs`, built from these: an unchanged pool is kept
    /// whole (its pooled connections too), a changed one is rebuilt around
    /// the servers it keeps. Nothing is retired here; the caller retires
    /// [`PoolChanges::servers_removed`] once the new pools are in use.
    pub fn update(&self, configs: &[PoolConfig]) -> Result<(Pools, PoolChanges), String> {
        let mut by_name = HashMap::new();
        let mut changes = PoolChanges::default();
        for config in configs {
            let old = self.by_name.get(&config.name);
            let pool = match old {
                Some(old) if old.config == *config => old.clone(),
                Some(old) => {
                    changes.changed.push(config.name.clone());
                    Arc::new(Pool::reusing(config, Some(old), &self.process)?)
                }
                None => {
                    changes.added.push(config.name.clone());
                    Arc::new(Pool::new(config, &self.process)?)
                }
            };
            for server in &pool.servers {
                if !old.is_some_and(|old| old.servers.iter().any(|s| Arc::ptr_eq(s, server))) {
                    changes.servers_added.push((pool.name.clone(), server.address.clone()));
                }
            }
            by_name.insert(config.name.clone(), pool);
        }
        for (name, old) in &self.by_name {
            let new = by_name.get(name);
            if new.is_none() {
                changes.removed.push(name.clone());
            }
            for server in &old.servers {
                if !new.is_some_and(|new| new.servers.iter().any(|s| Arc::ptr_eq(s, server))) {
                    changes.servers_removed.push(server.clone());
                }
            }
        }
        for list in [&mut changes.added, &mut changes.removed, &mut changes.changed] {
            list.sort();
        }
        changes.servers_added.sort();
        changes.servers_removed.sort_by(|a, b| (&a.pool, &a.address).cmp(&(&b.pool, &b.address)));
        Ok((Pools { by_name, process: self.process.clone() }, changes))
    }

    /// Puts these pools' settings into effect on their servers (a server
    /// kept by a reload may have new ones).
    pub fn commit(&self) {
        for pool in self.by_name.values() {
            for server in &pool.servers {
                server.set_close_on_unhealthy(pool.config.close_on_unhealthy);
            }
        }
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Pool>> {
        self.by_name.get(name)
    }

    pub fn all(&self) -> impl Iterator<Item = &Arc<Pool>> {
        self.by_name.values()
    }

    /// The healthy servers of `pool`; empty for an unknown pool.
    pub fn healthy_servers(&self, pool: &str) -> Vec<String> {
        self.by_name
            .get(pool)
            .map(|p| p.servers.iter().filter(|s| s.is_healthy()).map(|s| s.address.clone()).collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(balance: &str, servers: &[&str]) -> Pool {
        let text = format!(
            "name = \"app\"\nservers = [{}]\nbalance = \"{balance}\"\n",
            servers.iter().map(|s| format!("\"{s}\"")).collect::<Vec<_>>().join(", ")
        );
        Pool::new(&toml::from_str::<PoolConfig>(&text).unwrap(), &SocketBudget::new("the process", 100)).unwrap()
    }

    fn addr(server: Option<Arc<Server>>) -> String {
        server.map(|s| s.address.clone()).unwrap_or_default()
    }

    #[test]
    fn round_robin_takes_each_healthy_server_in_turn() {
        let pool = pool("round-robin", &["a:1", "b:2", "c:3"]);
        let picked: Vec<String> = (0..6).map(|_| addr(pool.pick(None, &[]))).collect();
        assert_eq!(picked, ["a:1", "b:2", "c:3", "a:1", "b:2", "c:3"]);
        pool.servers[1].set_healthy(false, "test");
        let picked: Vec<String> = (0..4).map(|_| addr(pool.pick(None, &[]))).collect();
        assert!(picked.iter().all(|a| a != "b:2"), "{picked:?}");
        pool.servers[0].set_healthy(false, "test");
        pool.servers[2].set_healthy(false, "test");
        assert!(pool.pick(None, &[]).is_none());
    }

    #[test]
    fn least_connections_prefers_the_idlest_server() {
        let pool = pool("least-connections", &["a:1", "b:2"]);
        let _busy = [pool.servers[0].begin(), pool.servers[0].begin()];
        let _one = pool.servers[1].begin();
        for _ in 0..4 {
            assert_eq!(addr(pool.pick(None, &[])), "b:2");
        }
    }

    #[test]
    fn hash_keeps_keys_and_moves_only_the_new_servers_share() {
        let two = pool("hash", &["a:1", "b:2"]);
        let three = pool("hash", &["a:1", "b:2", "c:3"]);
        let keys: Vec<String> = (0..3000).map(|i| format!("user-{i}")).collect();
        let mut moved = 0;
        for key in &keys {
            let before = addr(two.pick(Some(key), &[]));
            assert_eq!(before, addr(two.pick(Some(key), &[])), "stable");
            let after = addr(three.pick(Some(key), &[]));
            if after != before {
                assert_eq!(after, "c:3", "a key only ever moves to the new server");
                moved += 1;
            }
        }
        // About a third of the keys move to the third server.
        assert!((800..1200).contains(&moved), "{moved} of 3000 keys moved");
    }

    #[test]
    fn rendezvous_weights_are_fixed_by_the_hash_specification() {
        // XXH3-64 (seed 0) of "user-42" 0xff "10.0.0.1:8080": the same on
        // every build and machine; a change here remaps every affinity key.
        let mut input = b"user-42".to_vec();
        input.push(0xff);
        input.extend_from_slice(b"10.0.0.1:8080");
        assert_eq!(rendezvous_weight("user-42", "10.0.0.1:8080"), xxhash_rust::xxh3::xxh3_64(&input));
        // The value the reference implementation (Python's `xxhash`, over
        // the C library) gives for the same bytes.
        assert_eq!(rendezvous_weight("user-42", "10.0.0.1:8080"), 7_192_698_035_205_052_000);
    }

    #[test]
    fn a_changed_pool_keeps_counting_its_open_connections() {
        let configs = |limit: usize, retries: u32| -> Vec<PoolConfig> {
            let text = format!("name = \"app\"\nservers = [\"a:1\"]\nmax_connections = {limit}\nretries = {retries}\n");
            vec![toml::from_str(&text).unwrap()]
        };
        let before = Pools::new(&configs(2, 1)).unwrap();
        let held = before.get("app").unwrap().budgets.take().unwrap();
        let (after, changes) = before.update(&configs(3, 2)).unwrap();
        assert_eq!(changes.changed, ["app"]);
        let budget = after.get("app").unwrap().budgets.pool.clone().unwrap();
        assert_eq!((budget.open(), budget.limit()), (1, 3), "the WebSocket still open counts under the new limit");
        drop(held);
        assert_eq!(budget.open(), 0);
    }

    #[test]
    fn a_reload_keeps_servers_and_applies_their_settings_only_when_committed() {
        let configs = |close: bool| -> Vec<PoolConfig> {
            let text = format!("name = \"app\"\nservers = [\"a:1\"]\nclose_on_unhealthy = {close}\n");
            vec![toml::from_str(&text).unwrap()]
        };
        // Whether a WebSocket opened on the server now is closed at once.
        let ejected = |server: &Server| {
            let stop = Arc::new(Stop::default());
            server.add_stop(&stop);
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            stop.poll_fired(&mut cx).is_ready()
        };
        let strict = Pools::new(&configs(true)).unwrap();
        let server = strict.get("app").unwrap().servers[0].clone();
        assert!(!ejected(&server));
        server.set_healthy(false, "down");
        assert!(ejected(&server), "ejected while unhealthy");

        let (relaxed, changes) = strict.update(&configs(false)).unwrap();
        assert_eq!(changes.changed, ["app"]);
        assert!(changes.servers_removed.is_empty() && changes.servers_added.is_empty());
        assert!(Arc::ptr_eq(&relaxed.get("app").unwrap().servers[0], &server), "the same server, health and all");
        assert!(!server.is_healthy());
        assert!(ejected(&server), "an uncommitted (maybe refused) config changes nothing");
        relaxed.commit();
        assert!(!ejected(&server), "no longer ejected once the new setting is in force");
        server.set_healthy(true, "up");
        server.set_healthy(false, "down again");
        assert!(!ejected(&server));
    }

    #[test]
    fn excluded_servers_are_skipped() {
        let pool = pool("round-robin", &["a:1", "b:2"]);
        let a = pool.servers[0].clone();
        for _ in 0..4 {
            assert_eq!(addr(pool.pick(None, std::slice::from_ref(&a))), "b:2");
        }
    }
}
