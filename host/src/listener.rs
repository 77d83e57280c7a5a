//! Listeners: accept TCP connections and serve HTTP/1.1 on them, handing each
//! request to the listener's [`ListenerProxy`]. Upgrades are enabled on every
//! connection, so WebSocket works on every listener with no switch.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::proxy::ListenerProxy;

/// How long a client may take to send a complete request head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Accepts connections on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, proxy: Arc<ListenerProxy>) {
    loop {
        let (stream, client) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors or similar: back off instead of spinning.
                tracing::warn!(listener = %proxy.name, %error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let service = service_fn(|req| {
                let proxy = proxy.clone();
                async move { Ok::<_, Infallible>(proxy.handle(req, client).await) }
            });
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            if let Err(error) = connection.await {
                tracing::debug!(listener = %proxy.name, %client, %error, "client connection ended with an error");
            }
        });
    }
}
