//! Test router that misbehaves on demand, one way per path, so the tests can
//! prove each misbehaviour is contained. Any other path is forwarded to the
//! `app` pool.
use std::sync::atomic::{AtomicU32, Ordering};

use wasmgate_sdk::*;

struct Hostile;

#[allow(unconditional_recursion)] // the point: it never returns
fn recurse(depth: u64) -> u64 {
    // Not a tail call: every level keeps a frame.
    std::hint::black_box(recurse(std::hint::black_box(depth + 1))) + 1
}

/// What `/hoard` keeps across calls.
static HOARD: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());

/// The raw number of a request handle kept from an earlier call (`/keep`).
static KEPT: AtomicU32 = AtomicU32::new(0);

/// Reads the path through a raw request handle number, as a plugin that
/// kept one would. `forget`: the handle was only ever borrowed.
#[cfg(target_arch = "wasm32")]
fn path_through(handle: u32) -> String {
    use wasmgate_sdk::bindings::wasmgate::plugin::types::Request as Raw;
    // SAFETY: deliberately unsound use of a handle the plugin does not hold;
    // the host must refuse it or answer only for the call under way.
    let raw = unsafe { Raw::from_handle(handle) };
    let path = raw.path();
    std::mem::forget(raw);
    path
}

#[cfg(not(target_arch = "wasm32"))]
fn path_through(_handle: u32) -> String {
    unreachable!("only components hold request handles")
}

/// Tries every way out of the sandbox and reports what happened.
fn escape(req: &Request) -> String {
    let mut report = String::new();
    report.push_str(&format!("file: {:?}\n", std::fs::read_to_string("/etc/passwd").map(|s| s.len())));
    report.push_str(&format!("dir: {:?}\n", std::fs::read_dir("/").map(|d| d.count())));
    report.push_str(&format!("env: {}\n", std::env::vars().count()));
    report.push_str(&format!("args: {}\n", std::env::args().count()));
    let target = req.query_param("connect").unwrap_or_else(|| "127.0.0.1:9".into());
    report.push_str(&format!("socket: {:?}\n", std::net::TcpStream::connect(target).map(|_| "connected")));
    report.push_str(&format!("udp: {:?}\n", std::net::UdpSocket::bind("127.0.0.1:0").map(|_| "bound")));
    report
}

impl Router for Hostile {
    /// With `[config] stale_in_init = "true"`, reads a request in `init`,
    /// where there is none, through the handle number every call's request
    /// gets: the host must refuse, and so the plugin.
    fn init() -> Result<(), String> {
        if config("stale_in_init").as_deref() == Some("true") {
            return Err(format!("read a request in init: {}", path_through(1)));
        }
        Ok(())
    }

    fn route(req: &Request) -> RouteDecision {
        match req.path().as_str() {
            // Keeps the request's handle number past the call...
            "/keep" => {
                KEPT.store(req.raw_handle(), Ordering::Relaxed);
                RouteDecision::Respond(Response::text(200, format!("kept {}", req.raw_handle())))
            }
            // ... and reads a path through it in a later call: never `/keep`.
            "/stale" => match KEPT.load(Ordering::Relaxed) {
                0 => RouteDecision::Respond(Response::text(200, "nothing kept")),
                kept => {
                    RouteDecision::Respond(Response::text(200, format!("stale handle reads {}", path_through(kept))))
                }
            },
            "/loop" => loop {
                std::hint::black_box(());
            },
            "/grow" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            "/sleep" => {
                // Blocks in a WASI poll, where no epoch deadline can fire.
                std::thread::sleep(std::time::Duration::from_secs(3600));
                RouteDecision::NoRoute
            }
            "/recurse" => RouteDecision::Respond(Response::text(200, recurse(0).to_string())),
            "/panic" => panic!("hostile plugin panics"),
            // The host's body cap is 1 MiB: one byte over it, well within memory.
            "/big-body" => {
                RouteDecision::Respond(Response { status: 200, headers: vec![], body: vec![b'x'; (1 << 20) + 1] })
            }
            "/max-body" => RouteDecision::Respond(Response { status: 200, headers: vec![], body: vec![b'x'; 1 << 20] }),
            // Past the memory cap before the host ever sees it.
            "/huge-body" => {
                RouteDecision::Respond(Response { status: 200, headers: vec![], body: vec![b'x'; 100 << 20] })
            }
            "/crlf" => RouteDecision::Respond(Response::text(200, "hi").with_header("x-evil", "a\r\nx-injected: 1")),
            "/bad-header-name" => RouteDecision::Respond(Response::text(200, "hi").with_header("bad name", "x")),
            "/status-101" => RouteDecision::Respond(Response::text(101, "")),
            "/unknown-pool" => RouteDecision::Forward(Upstream::pool("no-such-pool")),
            "/bad-rewrite" => RouteDecision::Forward(Upstream::pool("app").rewrite("http://elsewhere/")),
            "/escape" => RouteDecision::Respond(Response::text(200, escape(req))),
            // What the host offers: the live servers of `app`, and logging.
            // Keeps 4 MiB more with every call (a leak), then forwards.
            "/hoard" => {
                HOARD.lock().unwrap_or_else(|p| p.into_inner()).push(vec![1u8; 4 << 20]);
                RouteDecision::Forward(Upstream::pool("app"))
            }
            // Prints a line to stdout and one to stderr, then forwards.
            "/print" => {
                println!("hostile plugin prints");
                eprintln!("hostile plugin complains");
                RouteDecision::Forward(Upstream::pool("app"))
            }
            // A thousand lines at once, then forwards.
            "/print-flood" => {
                for i in 0..1000 {
                    println!("flood line {i}");
                }
                RouteDecision::Forward(Upstream::pool("app"))
            }
            "/healthy" => RouteDecision::Respond(Response::text(200, healthy_servers("app").join(","))),
            // A log line of a mebibyte, then a thousand more.
            "/log-flood" => {
                log(Level::Warn, &"y".repeat(1 << 20));
                for _ in 0..1000 {
                    log(Level::Info, "log flood line");
                }
                RouteDecision::Respond(Response::text(200, "flooded"))
            }
            "/log" => {
                for level in [Level::Trace, Level::Debug, Level::Info, Level::Warn, Level::Error] {
                    log(level, "hostile plugin logs");
                }
                RouteDecision::Respond(Response::text(200, "logged"))
            }
            // A rewrite carrying its own query replaces the client's.
            "/rewrite-query" => RouteDecision::Forward(Upstream::pool("app").rewrite("/new?from=plugin")),
            // A header the gateway manages, named by `?name=`, on the answer or upstream.
            "/reserved" => RouteDecision::Respond(
                Response::text(200, "hi").with_header(req.query_param("name").unwrap_or_default(), "1"),
            ),
            "/reserved-upstream" => RouteDecision::Forward(
                Upstream::pool("app").set_header(req.query_param("name").unwrap_or_default(), "1"),
            ),
            _ => RouteDecision::Forward(Upstream::pool("app")),
        }
    }
}

export_router!(Hostile);
