//! Active health probes: one task per pool probes each of its servers every
//! `interval_s`, spread over the interval with jitter so servers are not all
//! hit at once, never two probes in flight for one server.
//!
//! Probes use the pool's TLS settings. An HTTP probe sends `method path` with the configured `Host` and passes
//! when the status is in `match_status` (and the body contains `match_body`).
//! A WebSocket probe performs a real upgrade handshake, checks the 101 and the
//! accept key, then sends a Close frame: it catches a server that answers
//! HTTP but refuses upgrades. After `unhealthy_threshold` consecutive failures
//! a healthy server turns unhealthy; after `healthy_threshold` consecutive
//! passes an unhealthy one comes back. A failed probe never touches
//! established connections (unless the pool says `close_on_unhealthy`).

use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use super::budget::Budgets;
use super::connect::{self, SendError};
use super::pool::{Pool, Server};
use super::tls::PoolTls;
use crate::config::{ProbeConfig, ProbeKind};
use crate::http::headers::new_websocket_key;

/// Body bytes an HTTP probe reads for `match_body`.
const MAX_PROBE_BODY: usize = 64 * 1024;

/// Starts the probing task of `pool`; dropping the handle does not stop it,
/// aborting does.
pub fn spawn_prober(pool: Arc<Pool>) -> JoinHandle<()> {
    tokio::spawn(probe_pool(pool))
}

/// Probes every server of `pool` forever.
async fn probe_pool(pool: Arc<Pool>) {
    let config = Arc::new(pool.probe.clone());
    let interval = Duration::from_secs_f64(config.interval_s);
    let n = pool.servers.len().max(1) as u32;
    let random = RandomState::new();
    let jitter = |i: u64| interval.mul_f64(0.1 * (random.hash_one(i) % 1000) as f64 / 1000.0);

    let start = Instant::now();
    // First probes spread evenly over one interval, plus up to 10% jitter.
    let mut due: Vec<Instant> =
        (0..pool.servers.len()).map(|i| start + interval / n * i as u32 + jitter(i as u64)).collect();
    let mut busy = vec![false; pool.servers.len()];
    let mut streaks = vec![Streak::default(); pool.servers.len()];
    let mut in_flight: JoinSet<(usize, Result<(), String>)> = JoinSet::new();
    let mut round: u64 = 0;
    loop {
        let next = (0..pool.servers.len()).filter(|&i| !busy[i]).min_by_key(|&i| due[i]);
        tokio::select! {
            _ = sleep_until_opt(next.map(|i| due[i])) => {
                let Some(i) = next else { continue };
                busy[i] = true;
                round += 1;
                due[i] += interval;
                // Stay within one interval of now if probes ran late.
                if due[i] < Instant::now() {
                    due[i] = Instant::now() + jitter(round);
                }
                let (server, config, pool) = (pool.servers[i].clone(), config.clone(), pool.clone());
                in_flight.spawn(async move { (i, probe_once(&server, pool.tls.as_ref(), &pool.budgets, &config).await) });
            }
            Some(done) = in_flight.join_next(), if !in_flight.is_empty() => {
                let Ok((i, outcome)) = done else { continue };
                busy[i] = false;
                streaks[i].record(&pool.servers[i], &config, outcome);
            }
        }
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Consecutive results of one server's probes.
#[derive(Debug, Clone, Copy, Default)]
struct Streak {
    passes: u32,
    failures: u32,
    /// The server's health when the streak last counted: if something else
    /// (a refused connection) changed it since, the streak starts over.
    was_healthy: Option<bool>,
}

/// How a probe that this host could not even start (out of descriptors or
/// ports) says so: it counts neither way, the server's health is untouched.
const LOCAL: &str = "this host is out of resources: ";

impl Streak {
    fn record(&mut self, server: &Server, config: &ProbeConfig, outcome: Result<(), String>) {
        if let Err(reason) = &outcome
            && reason.starts_with(LOCAL)
        {
            tracing::warn!(pool = %server.pool, server = %server.address, %reason, "probe not run; health unchanged");
            return;
        }
        server.record_probe(&outcome);
        let healthy = server.is_healthy();
        if self.was_healthy.is_some_and(|was| was != healthy) {
            (self.passes, self.failures) = (0, 0);
        }
        match outcome {
            Ok(()) => {
                self.passes += 1;
                self.failures = 0;
                if !server.is_healthy() && self.passes >= config.healthy_threshold {
                    server.set_healthy(true, &format!("{} consecutive probes passed", self.passes));
                }
            }
            Err(reason) => {
                self.failures += 1;
                self.passes = 0;
                tracing::debug!(pool = %server.pool, server = %server.address, %reason, "probe failed");
                if server.is_healthy() && self.failures >= config.unhealthy_threshold {
                    server.set_healthy(false, &format!("{} consecutive probes failed, last: {reason}", self.failures));
                }
            }
        }
        self.was_healthy = Some(server.is_healthy());
    }
}

/// One probe of `server`: `Ok` if it passed, else why not.
pub async fn probe_once(
    server: &Server,
    tls: Option<&PoolTls>,
    budgets: &Budgets,
    config: &ProbeConfig,
) -> Result<(), String> {
    let timeout = Duration::from_secs_f64(config.timeout_s);
    match tokio::time::timeout(timeout, probe_inner(server, tls, budgets, config)).await {
        Ok(result) => result,
        Err(_) => Err(format!("timed out after {timeout:?}")),
    }
}

async fn probe_inner(
    server: &Server,
    tls: Option<&PoolTls>,
    budgets: &Budgets,
    config: &ProbeConfig,
) -> Result<(), String> {
    let connect_timeout = Duration::from_secs_f64(config.timeout_s);
    let io = connect::connect(&server.address, tls, connect_timeout, budgets).await.map_err(|e| match e {
        SendError::Connect(e) => format!("connect: {e}"),
        SendError::Local(e) => format!("{LOCAL}{e}"),
        SendError::Tls(e) => format!("tls: {e}"),
        SendError::Failed(e) => e,
        SendError::Timeout => "timed out".into(),
    })?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(io)).await.map_err(|e| format!("http: {e}"))?;
    let connection = tokio::spawn(connection.with_upgrades());

    let host = config.host.as_deref().unwrap_or(&server.address);
    let mut request = Request::builder()
        .uri(config.path.as_str())
        .header(header::HOST, host)
        .header(header::USER_AGENT, "wasmgate-probe");
    let key = match config.kind {
        ProbeKind::Http => {
            request = request.method(Method::from_bytes(config.method.as_bytes()).unwrap_or(Method::GET));
            None
        }
        ProbeKind::Websocket => {
            let key = new_websocket_key();
            request = request
                .method(Method::GET)
                .header(header::CONNECTION, "Upgrade")
                .header(header::UPGRADE, "websocket")
                .header(header::SEC_WEBSOCKET_VERSION, "13")
                .header(header::SEC_WEBSOCKET_KEY, key.as_str());
            Some(key)
        }
    };
    let request = request.body(Empty::<Bytes>::new()).map_err(|e| format!("probe request: {e}"))?;
    let mut response = sender.send_request(request).await.map_err(|e| format!("http: {e}"))?;
    let status = response.status();

    let Some(key) = key else {
        if !config.match_status.matches(status.as_u16()) {
            connection.abort();
            return Err(format!("status {}", status.as_u16()));
        }
        if let Some(needle) = &config.match_body {
            let body = Limited::new(response.into_body(), MAX_PROBE_BODY)
                .collect()
                .await
                .map_err(|e| format!("reading body: {e}"))?
                .to_bytes();
            if !String::from_utf8_lossy(&body).contains(needle.as_str()) {
                return Err(format!("body does not contain {needle:?}"));
            }
        }
        return Ok(());
    };

    if status != StatusCode::SWITCHING_PROTOCOLS {
        connection.abort();
        return Err(format!("upgrade refused: status {}", status.as_u16()));
    }
    let expected = tungstenite::handshake::derive_accept_key(key.as_bytes());
    if response.headers().get(header::SEC_WEBSOCKET_ACCEPT) != HeaderValue::from_str(&expected).ok().as_ref() {
        connection.abort();
        return Err("upgrade answered with a wrong Sec-WebSocket-Accept".into());
    }
    // Close cleanly: a masked Close frame (1000), then wait for the server's
    // Close or end of stream.
    let upgraded = hyper::upgrade::on(&mut response).await.map_err(|e| format!("upgrade: {e}"))?;
    let mut io = TokioIo::new(upgraded);
    let mask = [0x5a, 0x17, 0xc3, 0x3e];
    let code = 1000u16.to_be_bytes();
    let frame = [0x88, 0x82, mask[0], mask[1], mask[2], mask[3], code[0] ^ mask[0], code[1] ^ mask[1]];
    io.write_all(&frame).await.map_err(|e| format!("close: {e}"))?;
    let mut buf = [0u8; 256];
    let _ = io.read(&mut buf).await;
    Ok(())
}
