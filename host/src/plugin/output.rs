//! A plugin's stdout and stderr, written to the gateway's log: a log line
//! per line the plugin prints (stdout at `info`, stderr at `warn`), tagged
//! with the plugin's name, escaped and cut like every plugin message. Each
//! plugin may print at most [`LINES_PER_SECOND`] lines a second; lines past
//! that are counted, and the count is logged once the second is over.
//!
//! Writes never wait: the stream is always ready, and what the plugin
//! writes is only ever buffered up to one line.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::Bytes;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

use super::host_api::printable;

/// Lines one plugin may print to the log per second (stdout and stderr
/// together, all its instances together).
pub const LINES_PER_SECOND: u64 = 50;

/// The longest line kept; the rest of a longer line is dropped.
const MAX_LINE: usize = 1024;

/// Which of the two streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// The per-plugin budget of printed lines, shared by all its instances.
pub struct PrintBudget {
    started: Instant,
    /// The second (since `started`) the counts below are about.
    second: AtomicU64,
    printed: AtomicU64,
    dropped: AtomicU64,
}

impl Default for PrintBudget {
    fn default() -> Self {
        PrintBudget {
            started: Instant::now(),
            second: AtomicU64::new(0),
            printed: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }
}

impl PrintBudget {
    /// Whether one more line may be logged now; reports what the previous
    /// second dropped when a new second begins.
    pub(crate) fn take(&self, plugin: &str) -> bool {
        let now = self.started.elapsed().as_secs();
        let second = self.second.load(Ordering::Relaxed);
        if now != second && self.second.compare_exchange(second, now, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
            self.printed.store(0, Ordering::Relaxed);
            let dropped = self.dropped.swap(0, Ordering::Relaxed);
            if dropped > 0 {
                tracing::warn!(
                    plugin = %plugin,
                    dropped,
                    "plugin printed over {LINES_PER_SECOND} lines a second; lines dropped"
                );
            }
        }
        if self.printed.fetch_add(1, Ordering::Relaxed) < LINES_PER_SECOND {
            true
        } else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            false
        }
    }
}

/// What a plugin's WASI context gets as its stdout or stderr.
#[derive(Clone)]
pub struct PluginOutput {
    plugin: Arc<str>,
    stream: Stream,
    budget: Arc<PrintBudget>,
}

impl PluginOutput {
    pub fn new(plugin: Arc<str>, stream: Stream, budget: Arc<PrintBudget>) -> PluginOutput {
        PluginOutput { plugin, stream, budget }
    }
}

impl IsTerminal for PluginOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for PluginOutput {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(LineWriter { output: self.clone(), line: Vec::new() })
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(LineWriter { output: self.clone(), line: Vec::new() })
    }
}

/// One open stream: collects bytes up to a newline, then logs the line.
struct LineWriter {
    output: PluginOutput,
    line: Vec<u8>,
}

impl LineWriter {
    fn take(&mut self, bytes: &[u8]) {
        for chunk in bytes.split_inclusive(|b| *b == b'\n') {
            let room = MAX_LINE.saturating_sub(self.line.len());
            self.line.extend_from_slice(&chunk[..chunk.len().min(room)]);
            if chunk.ends_with(b"\n") {
                self.emit();
            }
        }
    }

    fn emit(&mut self) {
        let text = String::from_utf8_lossy(&self.line);
        let text = text.trim_end_matches(['\n', '\r']);
        let plugin = &*self.output.plugin;
        if self.output.budget.take(plugin) {
            let message = printable(text);
            match self.output.stream {
                Stream::Stdout => tracing::info!(plugin = %plugin, stream = %"stdout", "{message}"),
                Stream::Stderr => tracing::warn!(plugin = %plugin, stream = %"stderr", "{message}"),
            }
        }
        self.line.clear();
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        if !self.line.is_empty() {
            self.emit();
        }
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for LineWriter {
    async fn ready(&mut self) {}
}

impl OutputStream for LineWriter {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.take(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 * 1024)
    }
}

impl tokio::io::AsyncWrite for LineWriter {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.take(buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_allows_so_many_lines_a_second() {
        let budget = PrintBudget::default();
        let allowed = (0..LINES_PER_SECOND * 3).filter(|_| budget.take("p")).count() as u64;
        assert_eq!(allowed, LINES_PER_SECOND);
        assert_eq!(budget.dropped.load(Ordering::Relaxed), LINES_PER_SECOND * 2);
    }

    #[test]
    fn lines_are_cut_and_split_on_newlines() {
        let output = PluginOutput::new("p".into(), Stream::Stdout, Arc::default());
        let mut writer = LineWriter { output, line: Vec::new() };
        writer.take(b"partial ");
        assert_eq!(writer.line, b"partial ");
        writer.take(b"line\nnext");
        assert_eq!(writer.line, b"next", "the finished line was emitted");
        writer.take(&vec![b'x'; 5000]);
        assert_eq!(writer.line.len(), MAX_LINE, "a long line is cut");
    }
}
