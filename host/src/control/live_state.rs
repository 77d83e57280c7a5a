//! Metrics of live state, read when `/metrics` is scraped rather than
//! counted as events: each server's health, the config version in force,
//! each plugin's counters (kept by the plugin registry), whether the
//! fleet's Redis answers, what this binary is, and the process's CPU,
//! memory and descriptors.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use super::build_info;
use super::reload::View;
use crate::counting::ClusterStatus;
use crate::plugin::{PluginStats, Registry};
use crate::telemetry::metrics::PluginLabel;

/// The live state `/metrics` reads at scrape time: server health, the
/// config version, and the plugin registry's counters.
pub struct LiveState {
    pub view: Arc<View>,
    pub plugins: Arc<Registry>,
    /// Shared counting's state; `None` without `[cluster]`.
    pub cluster: Option<ClusterStatus>,
}

impl std::fmt::Debug for LiveState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveState").field("view", &self.view).finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    commit: &'static str,
    wasmtime: &'static str,
    contract: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServerLabels {
    pool: Arc<str>,
    server: String,
}

impl Collector for LiveState {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut health = encoder.encode_descriptor(
            "server_healthy",
            "1 if the server takes traffic, 0 if not, by pool and server",
            None,
            MetricType::Gauge,
        )?;
        for pool in self.view.pools.all() {
            for server in &pool.servers {
                let labels = ServerLabels { pool: pool.label.clone(), server: server.address.clone() };
                ConstGauge::new(i64::from(server.is_healthy())).encode(health.encode_family(&labels)?)?;
            }
        }
        let config =
            encoder.encode_descriptor("config_version", "Version of the config in force", None, MetricType::Gauge)?;
        ConstGauge::new(self.view.version as i64).encode(config)?;

        let plugins = self.plugins.all();
        type Field = fn(&PluginStats) -> u64;
        let counters: [(&str, &str, Field); 6] = [
            ("plugin_calls", "Calls into the plugin's current version", |s| s.calls),
            ("plugin_errors", "Failed calls (traps, timeouts, memory cap, invalid output)", |s| s.errors),
            ("plugin_timeouts", "Calls stopped at their deadline", |s| s.timeouts),
            ("plugin_memory_limit_hits", "Calls that failed on the instance's memory cap", |s| s.memory_limit_hits),
            ("plugin_instances_retired", "Instances retired between calls near their memory cap", |s| {
                s.instances_retired
            }),
            ("plugin_quarantines", "Times the crash-loop breaker quarantined the plugin", |s| s.quarantines),
        ];
        let stats: Vec<_> =
            plugins.iter().map(|p| (PluginLabel { plugin: p.name.as_str().into() }, p.stats())).collect();
        for (name, help, value) in counters {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (labels, stats) in &stats {
                ConstCounter::new(value(stats)).encode(family.encode_family(labels)?)?;
            }
        }
        let mut build = encoder.encode_descriptor(
            "build_info",
            "1, labelled with the version, git commit, wasmtime and plugin contract of this binary",
            None,
            MetricType::Gauge,
        )?;
        let labels = BuildLabels {
            version: build_info::VERSION,
            commit: build_info::COMMIT,
            wasmtime: build_info::WASMTIME,
            contract: build_info::CONTRACT,
        };
        ConstGauge::new(1).encode(build.encode_family(&labels)?)?;
        if let Some(process) = build_info::ProcessStats::read() {
            let cpu = encoder.encode_descriptor(
                "process_cpu_seconds",
                "CPU time the process has used, user and system",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(process.cpu_seconds).encode(cpu)?;
            let gauges: [(&str, &str, f64); 3] = [
                ("process_resident_memory_bytes", "Resident memory", process.resident_bytes as f64),
                ("process_open_fds", "Open file descriptors (sockets included)", process.open_fds as f64),
                ("process_start_time_seconds", "When the process started, in Unix time", process.start_time_seconds),
            ];
            for (name, help, value) in gauges {
                ConstGauge::new(value).encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)?;
            }
            if let Some(max) = process.max_fds {
                let limit =
                    encoder.encode_descriptor("process_max_fds", "The open-file limit", None, MetricType::Gauge)?;
                ConstGauge::new(max as f64).encode(limit)?;
            }
        }
        if let Some(cluster) = &self.cluster {
            let up = encoder.encode_descriptor(
                "cluster_redis_up",
                "1 if the fleet's Redis answers (counts are shared), 0 while counting locally",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(i64::from(cluster.redis == "up")).encode(up)?;
            let outages = encoder.encode_descriptor(
                "cluster_redis_outages",
                "Times Redis stopped answering",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(cluster.outages).encode(outages)?;
            let local = encoder.encode_descriptor(
                "cluster_local_counts",
                "Counts taken locally because Redis did not answer",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(cluster.local_counts).encode(local)?;
        }
        Ok(())
    }
}
