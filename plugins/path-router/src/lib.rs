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

use wasmgate_sdk::*;

mod routes;

pub use routes::{Action, Affinity, Route, parse_routes, pick, rewrite};

pub struct PathRouter;

static ROUTES: Parsed<Vec<Route>> = Parsed::new();

impl Router for PathRouter {
    /// A bad route table refuses the plugin at load, with the line named.
    fn init() -> Result<(), String> {
        ROUTES.init(|| parse_routes(&config("routes").unwrap_or_default()).map_err(|e| format!("`routes`: {e}")))
    }

    fn route(req: &Request) -> RouteDecision {
        let path = req.path();
        let Some(route) = pick(ROUTES.get(), &req.host(), &path) else {
            return RouteDecision::NoRoute;
        };
        match &route.action {
            Action::Respond(status) => RouteDecision::Respond(Response::text(*status, "not found\n")),
            Action::Redirect { status, location } => RouteDecision::Respond(Response::redirect(*status, location)),
            Action::Pool(pool) => {
                let mut upstream = Upstream::pool(pool);
                if let Some(new_prefix) = &route.rewrite {
                    upstream = upstream.rewrite(routes::rewrite(&path, &route.prefix, new_prefix));
                }
                for (name, value) in &route.set_headers {
                    upstream = upstream.set_header(name, value);
                }
                upstream.affinity_key = match &route.affinity {
                    None => None,
                    Some(Affinity::Header(name)) => req.header(name),
                    Some(Affinity::Query(name)) => req.query_param(name),
                    Some(Affinity::ClientIp) => Some(req.client_ip()),
                };
                RouteDecision::Forward(upstream)
            }
        }
    }
}

export_router!(PathRouter);

#[cfg(test)]
mod tests {
    use wasmgate_sdk::testing::{self, MockRequest};

    use super::*;

    #[test]
    fn routes_through_the_sdk_mock_host() {
        testing::reset();
        testing::set_config("routes", "* /api/ pool=api rewrite=/v1/ affinity=header:x-user\n* /old redirect=/new");
        PathRouter::init().unwrap();
        let api = MockRequest::get("/api/users?x=1").header("x-user", "7");
        let RouteDecision::Forward(upstream) = PathRouter::route(&api.request()) else { panic!("not forwarded") };
        assert_eq!((upstream.pool.as_str(), upstream.rewrite_path.as_deref()), ("api", Some("/v1/users")));
        assert_eq!(upstream.affinity_key.as_deref(), Some("7"));
        let RouteDecision::Respond(moved) = PathRouter::route(&MockRequest::get("/old").request()) else {
            panic!("not answered")
        };
        assert_eq!(moved.status, 308);
        assert!(matches!(PathRouter::route(&MockRequest::get("/else").request()), RouteDecision::NoRoute));
    }

    #[test]
    fn a_bad_table_is_refused_by_init_with_its_line() {
        testing::reset();
        testing::set_config("routes", "* /a pool=x\n* b pool=y");
        let error = PathRouter::init().unwrap_err();
        assert!(error.contains("`routes`: line 2"), "{error}");
    }
}
