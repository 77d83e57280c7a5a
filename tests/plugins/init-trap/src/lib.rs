//! Test router whose start-up code traps: the component type-checks as a
//! router, but instantiating it fails. The gateway must reject it.
use wasmgate_sdk::*;

struct InitTrap;

impl Router for InitTrap {
    fn route(_req: &Request) -> RouteDecision {
        RouteDecision::NoRoute
    }
}

export_router!(InitTrap);

/// A reactor's initializer: the component runs it while being instantiated.
#[cfg(target_arch = "wasm32")]
#[unsafe(no_mangle)]
pub extern "C" fn _initialize() {
    core::arch::wasm32::unreachable()
}
