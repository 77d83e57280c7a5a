//! Test WAF: loops forever on requests whose path starts with `/loop`, traps on
//! `/trap`, grows its memory until refused on `/grow`, answers `/count` with
//! the number of calls its instance has served, spins on `/spin` (`?ms=`, default 800), denies
//! with an invalid 101 on `/bad-deny`, and
//! allows everything else. Tests use it to prove a plugin is cut
//! off at its deadline without hurting other requests.
use std::sync::atomic::{AtomicU32, Ordering};

use wasmgate_sdk::*;

struct Looper;

/// Calls this instance has served: shows whether an instance was reused.
static CALLS: AtomicU32 = AtomicU32::new(0);

impl Waf for Looper {
    fn inspect(req: &Request) -> Verdict {
        let calls = CALLS.fetch_add(1, Ordering::Relaxed) + 1;
        let path = req.path();
        if path.starts_with("/count") {
            return Verdict::Deny(Response::text(418, calls.to_string()));
        }
        if path.starts_with("/loop") {
            let mut n: u64 = 0;
            loop {
                n = std::hint::black_box(n.wrapping_add(1));
            }
        }
        if path.starts_with("/grow") {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(vec![1u8; 1 << 20]);
                std::hint::black_box(&hoard);
            }
        }
        if path.starts_with("/trap") {
            panic!("asked to trap");
        }
        if path.starts_with("/bad-deny") {
            // A denial the gateway must refuse to send: a 101.
            return Verdict::Deny(Response::text(101, "switching?"));
        }
        if path.starts_with("/spin") {
            // Busy for `?ms=` milliseconds (800 by default), then allows: a
            // call that is long under way.
            let ms = req.query_param("ms").and_then(|ms| ms.parse().ok()).unwrap_or(800);
            let started = std::time::Instant::now();
            while started.elapsed() < std::time::Duration::from_millis(ms) {
                std::hint::black_box(());
            }
        }
        Verdict::Allow
    }
}

export_waf!(Looper);
