//! Exporters: the end of the pipeline. Spans are queued (bounded, never blocking the event
//! thread) and a tokio task prints them (console) or sends them over OTLP, one resource per
//! traced process.
//!
//! - `worker`: the queue, the one task that hands spans to a sink (console or OTLP) in chunks,
//!   and the counts of what became of them (summary, `Stats`, the status `/readyz` reads).
//! - `console`: trace fragments as compact trees on stdout (the default).
//! - `otlp/`: OTLP over gRPC (tonic) or HTTP/protobuf (HTTP/1.1, hyper), spans encoded straight
//!   to protobuf (`otlp/encode`) and sent by `otlp/transport`, over TLS (`otlp/tls`) for
//!   `https://`, with the user's `otlp/headers`.

mod console;
mod otlp;
mod worker;

pub use otlp::check_endpoint;
pub use otlp::headers::{HeaderArg, HeaderError, Headers};
pub use otlp::tls::{TlsError, TlsFiles};
pub use worker::{ExportHandle, ExportState, ExportStatus, spawn_exporter};

use std::time::Duration;

/// Where spans go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExportTarget {
    /// Compact trace trees on stdout.
    Console,
    /// An OTLP receiver (an OpenTelemetry collector). `endpoint`: for gRPC the URL as is
    /// (e.g. `http://localhost:4317`); for HTTP/protobuf see [`EndpointForm`]. Empty: the
    /// protocol's default.
    Otlp {
        endpoint: String,
        protocol: OtlpProtocol,
        form: EndpointForm,
        options: OtlpOptions,
    },
}

/// The OTLP exporter settings of the specification besides endpoint, protocol and timeout.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OtlpOptions {
    /// Sent with every export request (API keys).
    pub headers: Headers,
    pub compression: Compression,
    /// For `https://` endpoints.
    pub tls: TlsFiles,
    /// A gRPC endpoint given without a scheme (`collector:4317`) is plain HTTP/2 instead of
    /// TLS (the specification's `insecure`; a URL's own scheme always wins).
    pub insecure: bool,
}

/// Compression of export requests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Compression {
    #[default]
    None,
    Gzip,
}

/// What an HTTP/protobuf endpoint names (the OTLP exporter specification's two variables).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EndpointForm {
    /// A base URL (`--otlp-endpoint`, `OTEL_EXPORTER_OTLP_ENDPOINT`, e.g.
    /// `http://localhost:4318`): `/v1/traces` is appended unless the URL already ends with it.
    #[default]
    Base,
    /// The traces URL itself (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`): used as is.
    TracesUrl,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    Grpc,
    HttpProtobuf,
}

impl std::fmt::Display for OtlpProtocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            OtlpProtocol::Grpc => "gRPC",
            OtlpProtocol::HttpProtobuf => "HTTP/protobuf",
        })
    }
}

impl OtlpProtocol {
    pub fn default_endpoint(self) -> &'static str {
        match self {
            OtlpProtocol::Grpc => "http://localhost:4317",
            OtlpProtocol::HttpProtobuf => "http://localhost:4318",
        }
    }
}

#[derive(Debug, Clone)]
pub struct ExportConfig {
    pub target: ExportTarget,
    /// Spans per OTLP export request (at most).
    pub max_batch: usize,
    /// Queued spans are exported at least this often.
    pub flush_interval: Duration,
    /// Spans waiting for the exporter; more are dropped (and counted).
    pub queue_capacity: usize,
    /// Limit of one export request, and of `ExportHandle::shutdown`.
    pub timeout: Duration,
}

impl ExportConfig {
    pub fn new(target: ExportTarget) -> Self {
        Self {
            target,
            max_batch: 2048,
            flush_interval: Duration::from_millis(200),
            // About 1 s of spans at 30k/s: a collector's hiccup is absorbed. Its memory grows
            // with its use only; full (a stalled collector), it holds ~40 MiB of spans.
            queue_capacity: 32768,
            timeout: Duration::from_secs(10),
        }
    }
}

impl ExportConfig {
    /// Checks what can be checked before the exporter starts (the endpoint), so that a
    /// mistake stops the agent before it loads its probes. `spawn_exporter` checks it again.
    pub fn check(&self) -> Result<(), ExportError> {
        match &self.target {
            ExportTarget::Console => Ok(()),
            ExportTarget::Otlp {
                endpoint,
                protocol,
                form,
                options,
            } => otlp::resolve_endpoint(endpoint, *protocol, *form, options.insecure).map(|_| ()),
        }
    }
}

impl Default for ExportConfig {
    fn default() -> Self {
        Self::new(ExportTarget::Console)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(
        "the exporter must be started inside a tokio runtime (call spawn_exporter from async code)"
    )]
    NoRuntime,
    #[error(
        "invalid OTLP endpoint {endpoint:?}: {reason}; pass a URL such as http://localhost:4317 (gRPC) \
         or http://localhost:4318 (HTTP/protobuf)"
    )]
    InvalidEndpoint { endpoint: String, reason: String },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Header(#[from] HeaderError),
    #[error("invalid export configuration: {0}")]
    InvalidConfig(&'static str),
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod bench;
