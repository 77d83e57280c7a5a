//! The access log: one line per request and one per closed WebSocket, as
//! text or JSON (`[log] access`), to a file or standard output.
//!
//! Lines go through `tracing-appender`'s non-blocking writer: the request
//! path formats a line and hands it to a channel; a worker thread writes.
//! If the disk cannot keep up, lines are dropped (and counted by the
//! writer) rather than the request path waiting. SIGUSR1 reopens the file
//! by name ([`AccessLog::reopen`]), for logrotate.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tracing_appender::non_blocking::{NonBlocking, WorkerGuard};

use crate::config::{AccessFormat, LogConfig};

/// An open access log.
pub struct AccessLog {
    json: bool,
    writer: NonBlocking,
    /// Set by [`AccessLog::reopen`]: the file is opened again by name
    /// before the next line (`access_file` only).
    reopen: Option<Arc<AtomicBool>>,
    /// Flushes what is queued when the log is dropped.
    _guard: WorkerGuard,
}

/// One answered request.
#[derive(Serialize)]
pub struct RequestEntry<'a> {
    pub listener: &'a str,
    pub client: SocketAddr,
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
    /// Empty when nothing was routed.
    pub pool: &'a str,
    /// Empty when no server answered.
    pub server: &'a str,
    /// Request head to response head.
    pub duration_ms: f64,
    /// The response's `Content-Length`, when it has one (streamed bodies do not).
    pub bytes: Option<u64>,
    /// The `x-wasmgate-error` code of a response the gateway made itself.
    pub error: Option<&'a str>,
    /// `X-Request-Id`, as the backend and the client got it.
    pub request_id: &'a str,
    /// The W3C trace this request belongs to.
    pub trace_id: &'a str,
}

/// One relayed WebSocket, when it ends.
#[derive(Serialize)]
pub struct WebSocketEntry<'a> {
    pub listener: &'a str,
    pub client: SocketAddr,
    pub path: &'a str,
    pub pool: &'a str,
    pub server: &'a str,
    pub duration_ms: f64,
    pub client_to_server: u64,
    pub server_to_client: u64,
    /// `client`, `server`, `idle`, `lifetime`, `drain`, `removed`,
    /// `unhealthy` or `error`.
    pub close: &'a str,
    /// The handshake's `X-Request-Id`.
    pub request_id: &'a str,
}

#[derive(Serialize)]
struct Line<'a, E: Serialize> {
    time: &'a str,
    kind: &'static str,
    #[serde(flatten)]
    entry: E,
}

impl AccessLog {
    /// Opens the log `config` asks for; `None` when it is off.
    pub fn open(config: &LogConfig) -> anyhow::Result<Option<AccessLog>> {
        let json = match config.access {
            AccessFormat::Off => return Ok(None),
            AccessFormat::Text => false,
            AccessFormat::Json => true,
        };
        let (writer, guard, reopen) = match &config.access_file {
            Some(path) => {
                let file = append(path).map_err(|e| anyhow::anyhow!("[log] access_file {}: {e}", path.display()))?;
                let reopen = Arc::new(AtomicBool::new(false));
                let file = Reopening { path: path.clone(), file, reopen: reopen.clone(), failing: false };
                let (writer, guard) = tracing_appender::non_blocking(file);
                (writer, guard, Some(reopen))
            }
            None => {
                let (writer, guard) = tracing_appender::non_blocking(std::io::stdout());
                (writer, guard, None)
            }
        };
        Ok(Some(AccessLog { json, writer, reopen, _guard: guard }))
    }

    /// Opens `access_file` again by name before the next line (SIGUSR1,
    /// after logrotate renamed it); lines already queued go to the old file.
    /// `false` when the log goes to standard output (nothing to reopen).
    pub fn reopen(&self) -> bool {
        match &self.reopen {
            Some(reopen) => {
                reopen.store(true, Ordering::Release);
                true
            }
            None => false,
        }
    }

    pub fn request(&self, e: &RequestEntry<'_>) {
        let text = || {
            format!(
                "{} \"{} {}\" {} {} pool={} server={} {:.3}ms{} id={}",
                e.client,
                e.method,
                e.path,
                e.status,
                e.bytes.map_or("-".to_owned(), |b| b.to_string()),
                dash(e.pool),
                dash(e.server),
                e.duration_ms,
                e.error.map(|code| format!(" error={code}")).unwrap_or_default(),
                dash(e.request_id),
            )
        };
        self.write("request", e.listener, e, text);
    }

    pub fn websocket(&self, e: &WebSocketEntry<'_>) {
        let text = || {
            format!(
                "{} \"WEBSOCKET {}\" pool={} server={} {:.3}s up={} down={} close={} id={}",
                e.client,
                e.path,
                dash(e.pool),
                dash(e.server),
                e.duration_ms / 1000.0,
                e.client_to_server,
                e.server_to_client,
                e.close,
                dash(e.request_id),
            )
        };
        self.write("websocket", e.listener, e, text);
    }

    fn write<E: Serialize>(&self, kind: &'static str, listener: &str, entry: &E, text: impl FnOnce() -> String) {
        let time = now_rfc3339();
        let mut line = if self.json {
            serde_json::to_string(&Line { time: &time, kind, entry }).unwrap_or_default()
        } else {
            format!("{time} {listener} {}", text())
        };
        line.push('\n');
        // The non-blocking writer only queues the line; it never waits.
        let _ = self.writer.clone().write_all(line.as_bytes());
    }
}

/// Milliseconds of a duration, for entries.
pub fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

fn append(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new().create(true).append(true).open(path)
}

/// The access file, opened again by name when asked (on the writer's own
/// thread, between two lines). If it cannot be opened, lines keep going to
/// the old file and the next line tries again.
struct Reopening {
    path: std::path::PathBuf,
    file: std::fs::File,
    reopen: Arc<AtomicBool>,
    /// A reopen failed and was logged; the retries until it works are not.
    failing: bool,
}

impl Write for Reopening {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.reopen.swap(false, Ordering::AcqRel) {
            match append(&self.path) {
                Ok(file) => {
                    self.file = file;
                    self.failing = false;
                }
                Err(error) => {
                    self.reopen.store(true, Ordering::Release);
                    if !std::mem::replace(&mut self.failing, true) {
                        tracing::warn!(file = %self.path.display(), %error, "cannot reopen the access log; writing to the old file until it can");
                    }
                }
            }
        }
        self.file.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

fn dash(value: &str) -> &str {
    if value.is_empty() { "-" } else { value }
}

fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::from(SystemTime::now());
    now.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}
