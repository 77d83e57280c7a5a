//! Test WAF: loops forever on requests whose path starts with `/loop`, traps on
//! `/trap`, grows its memory until refused on `/grow`, and allows everything
//! else. Tests use it to prove a plugin is cut
//! off at its deadline without hurting other requests.
use wasmgate_sdk::*;

struct Looper;

impl Waf for Looper {
    fn inspect(req: RequestHead) -> Verdict {
        if req.path.starts_with("/loop") {
            let mut n: u64 = 0;
            loop {
                n = std::hint::black_box(n.wrapping_add(1));
            }
        }
        if req.path.starts_with("/grow") {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(vec![1u8; 1 << 20]);
                std::hint::black_box(&hoard);
            }
        }
        if req.path.starts_with("/trap") {
            panic!("asked to trap");
        }
        Verdict::Allow
    }
}

export_waf!(Looper);
