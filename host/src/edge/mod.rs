//! Where clients come in: the accept loops with the connection cap and
//! hyper's HTTP/1.1 + HTTP/2 server ([`listener`]), and the certificates of
//! HTTPS listeners with SNI ([`tls`]). Nothing here routes.

pub mod listener;
pub mod proxy_protocol;
pub mod tls;
