//! Backend pools: the servers that can take a request, and the choice of one.
//!
//! Today every configured server is eligible and servers are taken in
//! round-robin order; health probes and other balancing methods extend
//! [`Pool::pick`].

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::config::PoolConfig;

/// One backend server of a pool.
#[derive(Debug)]
pub struct Server {
    /// `host:port`, as configured.
    pub address: String,
}

/// A configured pool.
#[derive(Debug)]
pub struct Pool {
    pub name: String,
    pub servers: Vec<Arc<Server>>,
    pub request_timeout: Duration,
    next: AtomicUsize,
}

impl Pool {
    pub fn new(config: &PoolConfig) -> Pool {
        Pool {
            name: config.name.clone(),
            servers: config.servers.iter().map(|address| Arc::new(Server { address: address.clone() })).collect(),
            request_timeout: Duration::from_secs(config.request_timeout_s),
            next: AtomicUsize::new(0),
        }
    }

    /// The next server in round-robin order, or `None` if none can take traffic.
    pub fn pick(&self) -> Option<Arc<Server>> {
        if self.servers.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.servers.len();
        Some(self.servers[i].clone())
    }
}

/// Every pool by name.
#[derive(Debug, Default)]
pub struct Pools {
    by_name: HashMap<String, Arc<Pool>>,
}

impl Pools {
    pub fn new(configs: &[PoolConfig]) -> Pools {
        Pools { by_name: configs.iter().map(|c| (c.name.clone(), Arc::new(Pool::new(c)))).collect() }
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Pool>> {
        self.by_name.get(name)
    }

    /// The servers of `pool` that may take traffic (all of them until health
    /// probes exist); empty for an unknown pool.
    pub fn healthy_servers(&self, pool: &str) -> Vec<String> {
        self.by_name.get(pool).map(|p| p.servers.iter().map(|s| s.address.clone()).collect()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_takes_each_server_in_turn() {
        let pool = Pool::new(&PoolConfig {
            name: "app".into(),
            servers: vec!["a:1".into(), "b:2".into(), "c:3".into()],
            balance: Default::default(),
            protocol: Default::default(),
            request_timeout_s: 1,
        });
        let picked: Vec<String> = (0..6).map(|_| pool.pick().unwrap().address.clone()).collect();
        assert_eq!(picked, ["a:1", "b:2", "c:3", "a:1", "b:2", "c:3"]);
    }
}
