//! Where a request goes once routed: a pool, and what to change on the way.
//! Made by the route phase from the router plugin's decision (checked in
//! [`super::validate`]) or from the listener's `default_pool`.

use std::sync::Arc;

use http::header::{HeaderName, HeaderValue};
use http::uri::PathAndQuery;

use crate::upstream::Pool;

/// Where a request goes: a pool, and what to change on the way.
#[derive(Debug)]
pub struct Route {
    pub pool: Arc<Pool>,
    /// A new origin-form target; without a query the request's own is kept.
    pub rewrite: Option<PathAndQuery>,
    pub set_headers: Vec<(HeaderName, HeaderValue)>,
    /// For pools that balance by hash.
    pub affinity_key: Option<String>,
}

impl Route {
    /// To `pool`, unchanged.
    pub fn to_pool(pool: Arc<Pool>) -> Route {
        Route { pool, rewrite: None, set_headers: Vec::new(), affinity_key: None }
    }
}
