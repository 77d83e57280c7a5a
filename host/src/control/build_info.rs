//! What this binary is: its version, the commit it was built from, the
//! wasmtime it embeds and the plugin contract it speaks (`wasmgate
//! --version`, `wasmgate_build_info` on `/metrics`).

pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The git commit (12 hex digits), or `unknown` outside a checkout.
pub const COMMIT: &str = env!("WASMGATE_COMMIT");
pub const WASMTIME: &str = env!("WASMGATE_WASMTIME");
pub const CONTRACT: &str = crate::plugin::CONTRACT_VERSION;

/// `VERSION (commit COMMIT, wasmtime WASMTIME, plugin contract CONTRACT)`,
/// what `wasmgate --version` prints.
pub const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("WASMGATE_COMMIT"),
    ", wasmtime ",
    env!("WASMGATE_WASMTIME"),
    ", plugin contract 0.3.0)"
);

/// What `/proc/self` says of this process, for `/metrics`; `None` where
/// there is no `/proc` (or it cannot be read).
#[derive(Debug, Clone, Copy)]
pub struct ProcessStats {
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub open_fds: u64,
    pub max_fds: Option<u64>,
    pub start_time_seconds: f64,
}

impl ProcessStats {
    pub fn read() -> Option<ProcessStats> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // After the command name, which may hold spaces and parentheses.
        let fields: Vec<&str> = stat.get(stat.rfind(')')? + 2..)?.split_whitespace().collect();
        let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
        let ticks = rustix::param::clock_ticks_per_second() as f64;
        let (utime, stime, started) = (field(14)?, field(15)?, field(22)?);
        let boot = std::fs::read_to_string("/proc/stat")
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("btime ").and_then(|t| t.trim().parse::<u64>().ok()))?;
        let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
        let resident_pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
        let open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
        let max_fds = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
        Some(ProcessStats {
            cpu_seconds: (utime + stime) as f64 / ticks,
            resident_bytes: resident_pages * rustix::param::page_size() as u64,
            open_fds,
            max_fds,
            start_time_seconds: boot as f64 + started as f64 / ticks,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_reads_as_itself() {
        let before = ProcessStats::read().expect("/proc/self");
        let spin = std::time::Instant::now();
        while spin.elapsed() < std::time::Duration::from_millis(50) {}
        let after = ProcessStats::read().unwrap();
        assert!(after.open_fds >= 3, "stdin, stdout and stderr at least: {after:?}");
        assert!(after.cpu_seconds >= before.cpu_seconds + 0.03, "{before:?} then {after:?}");
        assert!(after.resident_bytes > 1 << 20, "{after:?}");
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
        assert!(after.start_time_seconds <= now + 1.0 && after.start_time_seconds > now - 86_400.0 * 365.0);
        assert_ne!(COMMIT, "");
        assert!(LONG_VERSION.contains(WASMTIME));
        assert!(LONG_VERSION.ends_with(&format!("plugin contract {CONTRACT})")), "{LONG_VERSION}");
    }
}
