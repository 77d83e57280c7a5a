//! The router plugin from the README's tour of the SDK.
use wasmgate_sdk::*;

struct HelloRouter;

impl Router for HelloRouter {
    fn route(req: &Request) -> RouteDecision {
        // Canary: users with the header go to the new pool.
        if req.header("x-canary").as_deref() == Some("1") {
            return RouteDecision::Forward(Upstream::pool("canary"));
        }
        let path = req.path();
        if path.starts_with("/api/") {
            let rest = &path["/api".len()..];
            return RouteDecision::Forward(Upstream::pool("api").rewrite(rest).set_header("x-via", "hello"));
        }
        if req.is_websocket() && req.host() != "chat.example.test" {
            return RouteDecision::Respond(Response::text(404, "no chat here"));
        }
        RouteDecision::NoRoute // the listener's default_pool, or 404
    }
}

export_router!(HelloRouter);
