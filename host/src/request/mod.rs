//! The life of a request, phases in order: [`proxy`] sequences them; the
//! detail of each lives in the file named for it — [`target`] (the method,
//! authority and path settled first), [`route`] (where a request goes),
//! [`validate`] (a plugin's output turned into HTTP, as strictly as a
//! client's), [`forward`] (the request head sent upstream) and [`outcome`]
//! (how the request ended, for the logging phase).

pub mod forward;
pub mod outcome;
pub mod proxy;
pub mod route;
pub mod target;
pub mod validate;

pub use proxy::{HttpsTarget, ListenerProxy, ListenerRules, Shared};
