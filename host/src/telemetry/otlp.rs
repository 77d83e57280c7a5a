//! OTLP trace export (`[otlp]`, off by default): one span per request, one
//! per WebSocket (from its 101 to its end), and one per plugin call, as
//! children of their request's span. The spans carry the IDs the request's
//! `traceparent` carries ([`crate::http::trace`] is not imported here: the
//! caller passes the IDs), so the backend's spans join the same trace.
//!
//! Spans are encoded with the OpenTelemetry protocol's own generated types
//! (`opentelemetry-proto`) and posted as OTLP/HTTP protobuf by one task, in
//! batches of up to [`BATCH`] or every [`FLUSH_EVERY`]. Recording never
//! waits: past [`QUEUE`] spans waiting, spans are dropped and counted. With
//! `[otlp]` unset nothing here exists and the request path builds no span.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status, span, status};
use prost::Message as _;
use tokio::sync::mpsc;

use crate::config::OtlpConfig;

/// Spans waiting to be sent, at most.
const QUEUE: usize = 8192;
/// Spans in one export request, at most.
const BATCH: usize = 512;
/// How often a partial batch is sent.
const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// How long one export may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// One finished span, as the request path records it.
#[derive(Debug, Clone)]
pub struct SpanRecord {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent_id: Option<[u8; 8]>,
    pub flags: u8,
    pub name: String,
    /// A request's span is the server's side of it; the others are internal.
    pub server: bool,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<(&'static str, Attribute)>,
    /// Why the span failed, if it did.
    pub error: Option<String>,
}

#[derive(Debug, Clone)]
pub enum Attribute {
    Text(String),
    Int(i64),
}

impl From<&str> for Attribute {
    fn from(text: &str) -> Self {
        Attribute::Text(text.to_owned())
    }
}

impl From<String> for Attribute {
    fn from(text: String) -> Self {
        Attribute::Text(text)
    }
}

impl From<u64> for Attribute {
    fn from(n: u64) -> Self {
        Attribute::Int(i64::try_from(n).unwrap_or(i64::MAX))
    }
}

/// The exporter: a queue and the task that empties it.
pub struct Otlp {
    queue: mpsc::Sender<SpanRecord>,
    dropped: Arc<AtomicU64>,
    exported: Arc<AtomicU64>,
}

impl Otlp {
    /// Starts the export task (on the current tokio runtime).
    pub fn start(config: &OtlpConfig) -> anyhow::Result<Otlp> {
        let endpoint: http::Uri =
            config.endpoint.parse().map_err(|e| anyhow::anyhow!("otlp.endpoint `{}`: {e}", config.endpoint))?;
        let (queue, spans) = mpsc::channel(QUEUE);
        let (dropped, exported) = (Arc::default(), Arc::new(AtomicU64::new(0)));
        let resource = Resource {
            attributes: vec![
                attribute("service.name", Attribute::from(config.service_name.as_str())),
                attribute("service.version", Attribute::from(env!("CARGO_PKG_VERSION"))),
            ],
            ..Default::default()
        };
        tokio::spawn(export(endpoint, resource, spans, exported.clone()));
        Ok(Otlp { queue, dropped, exported })
    }

    /// Queues `span` for export; drops it (and counts it) if the queue is full.
    pub fn record(&self, span: SpanRecord) {
        if self.queue.try_send(span).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Spans dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Spans the collector accepted.
    pub fn exported(&self) -> u64 {
        self.exported.load(Ordering::Relaxed)
    }
}

fn attribute(key: &str, value: Attribute) -> KeyValue {
    let value = match value {
        Attribute::Text(text) => any_value::Value::StringValue(text),
        Attribute::Int(n) => any_value::Value::IntValue(n),
    };
    KeyValue { key: key.to_owned(), value: Some(AnyValue { value: Some(value) }), ..Default::default() }
}

fn nanos(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

fn encode(span: SpanRecord) -> Span {
    let kind = if span.server { span::SpanKind::Server } else { span::SpanKind::Internal };
    let status = match span.error {
        Some(message) => Status { message, code: status::StatusCode::Error as i32 },
        None => Status::default(),
    };
    Span {
        trace_id: span.trace_id.to_vec(),
        span_id: span.span_id.to_vec(),
        parent_span_id: span.parent_id.map(|p| p.to_vec()).unwrap_or_default(),
        flags: u32::from(span.flags),
        name: span.name,
        kind: kind as i32,
        start_time_unix_nano: nanos(span.start),
        end_time_unix_nano: nanos(span.end),
        attributes: span.attributes.into_iter().map(|(k, v)| attribute(k, v)).collect(),
        status: Some(status),
        ..Default::default()
    }
}

/// The export task: batches what is queued and posts it; ends when the
/// exporter is dropped (after sending what is left).
async fn export(
    endpoint: http::Uri,
    resource: Resource,
    mut spans: mpsc::Receiver<SpanRecord>,
    exported: Arc<AtomicU64>,
) {
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut failures_logged_at: Option<std::time::Instant> = None;
    let mut open = true;
    while open {
        let mut batch = Vec::new();
        let deadline = tokio::time::sleep(FLUSH_EVERY);
        tokio::pin!(deadline);
        while batch.len() < BATCH {
            tokio::select! {
                span = spans.recv() => match span {
                    Some(span) => batch.push(encode(span)),
                    None => { open = false; break; }
                },
                _ = &mut deadline => break,
            }
        }
        if batch.is_empty() {
            continue;
        }
        let count = batch.len() as u64;
        let request = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(resource.clone()),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "wasmgate".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                        ..Default::default()
                    }),
                    spans: batch,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        let post = http::Request::post(endpoint.clone())
            .header(http::header::CONTENT_TYPE, "application/x-protobuf")
            .body(Full::new(Bytes::from(request.encode_to_vec())))
            .expect("a valid request");
        let outcome = tokio::time::timeout(EXPORT_TIMEOUT, async {
            let response = client.request(post).await.map_err(|e| e.to_string())?;
            let status = response.status();
            let _ = response.into_body().collect().await;
            if status.is_success() { Ok(()) } else { Err(format!("the collector answered {status}")) }
        })
        .await
        .unwrap_or_else(|_| Err("no answer in 10 s".into()));
        match outcome {
            Ok(()) => {
                exported.fetch_add(count, Ordering::Relaxed);
            }
            Err(error) => {
                let now = std::time::Instant::now();
                if failures_logged_at.is_none_or(|at| now.duration_since(at) > Duration::from_secs(60)) {
                    failures_logged_at = Some(now);
                    tracing::warn!(%endpoint, %error, spans = count, "otlp: export failed; these spans are dropped");
                }
            }
        }
    }
}
