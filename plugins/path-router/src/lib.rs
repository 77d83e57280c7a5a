//! `path-router`: routes by host and path prefix.
//!
//! Configured by the `routes` string in `path-router.toml`, one route per
//! line, `HOST PREFIX ACTION [OPTIONS...]`:
//!
//! ```text
//! # host         prefix    action               options
//! *              /api/     pool=api             rewrite=/v1/ set-header=x-api:yes
//! *.example.test /         pool=app
//! *              /old      redirect=308:/new
//! *              /private  respond=404
//! ```
//!
//! - HOST: `*`, an exact host (`app.example.test`) or a suffix (`*.example.test`);
//!   the port is ignored.
//! - PREFIX: the path must start with it (`/api/` does not match `/apix`).
//! - ACTION, exactly one: `pool=NAME`, `redirect=[STATUS:]LOCATION` (default
//!   308), `respond=STATUS`.
//! - OPTIONS for `pool=`: `rewrite=NEW_PREFIX` (replaces the matched prefix),
//!   `set-header=NAME:VALUE` (repeatable), `affinity=header:NAME`,
//!   `affinity=query:NAME` or `affinity=client-ip`.
//!
//! The longest matching prefix wins (the first route among equals). A request
//! no route matches gets `no-route`: the listener's `default_pool`, or 404.

use std::sync::OnceLock;

use wasmgate_sdk::*;

mod routes;

pub use routes::{Action, Affinity, Route, parse_routes, pick};

struct PathRouter;

static ROUTES: OnceLock<Vec<Route>> = OnceLock::new();

fn routes() -> &'static [Route] {
    let routes: &'static Vec<Route> = parsed_config(&ROUTES, || {
        parse_routes(&config("routes").unwrap_or_default()).map_err(|e| format!("`routes`: {e}"))
    });
    routes
}

impl Router for PathRouter {
    fn route(req: RequestHead) -> RouteDecision {
        let Some(route) = pick(routes(), &req.host(), &req.path) else {
            return RouteDecision::NoRoute;
        };
        match &route.action {
            Action::Respond(status) => RouteDecision::Respond(Response::text(*status, "not found\n")),
            Action::Redirect { status, location } => RouteDecision::Respond(Response::redirect(*status, location)),
            Action::Pool(pool) => {
                let mut upstream = Upstream::pool(pool);
                if let Some(new_prefix) = &route.rewrite {
                    upstream = upstream.rewrite(routes::rewrite(&req.path, &route.prefix, new_prefix));
                }
                for (name, value) in &route.set_headers {
                    upstream = upstream.set_header(name, value);
                }
                upstream.affinity_key = match &route.affinity {
                    None => None,
                    Some(Affinity::Header(name)) => req.header(name).map(str::to_owned),
                    Some(Affinity::Query(name)) => req.query_param(name).map(str::to_owned),
                    Some(Affinity::ClientIp) => Some(req.client_ip.clone()),
                };
                RouteDecision::Forward(upstream)
            }
        }
    }
}

export_router!(PathRouter);
