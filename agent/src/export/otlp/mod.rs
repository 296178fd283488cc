//! OTLP exporter: spans are encoded as they arrive (see `encode`), one buffer per traced
//! process's resource, and sent as one `ExportTraceServiceRequest` per flush holding one
//! `ResourceSpans` per resource (each resource encoded once and cached). Requests go out
//! concurrently (at most `MAX_IN_FLIGHT`), over one shared gRPC channel (one HTTP/2 connection)
//! or over HTTP/1.1 keep-alive connections, TLS for `https://`; transient failures are retried
//! with backoff within the export timeout.
//!
//! - `endpoint`: the endpoint a user gives, checked and resolved per protocol.
//! - `encode`: spans straight to protobuf bytes, no intermediate messages.
//! - `transport`: tonic (gRPC) or hyper (HTTP/1.1), one hyper-rustls connector for both.
//! - `tls`: the rustls client configuration from the user's CA and client certificate files.
//! - `headers`: the user's headers for every request (values never logged).

pub(super) mod encode;
mod endpoint;
pub(super) mod headers;
pub(super) mod tls;
mod transport;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::task::{Id, JoinError, JoinSet};

use super::worker::{Sink, Tally};
use super::{Compression, ExportConfig, ExportError, ExportTarget, OtlpOptions, OtlpProtocol};
use crate::spans::model::{Resource, SpanRecord};
use crate::stats::Stats;
use encode::{PartialSuccess, ResourcePart};
pub use endpoint::{ResolvedEndpoint, check_endpoint, resolve_endpoint};
use transport::{SendError, Transport, TransportOptions};

/// A cached resource unused for this long is dropped (its process most likely exited).
const IDLE_RESOURCE_TTL: Duration = Duration::from_secs(300);
/// Export requests in flight at once; past this, flushing waits for one to finish.
pub const MAX_IN_FLIGHT: usize = 4;
/// A request is sent once this many bytes of spans are waiting, whatever their number:
/// collectors commonly refuse gRPC messages over 4 MiB.
const MAX_REQUEST_BYTES: usize = 2 * 1024 * 1024;
/// Retries of a transiently failed request (within the export timeout), and the first delay
/// (doubled each time).
const MAX_RETRIES: u32 = 3;
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// A traced process's resource: encoded once, plus the spans encoded for the next request.
struct ResourceEntry {
    /// `Arc::as_ptr` of the resource: its identity.
    key: usize,
    /// Held so the allocation (whose address is our key) cannot be reused while cached.
    _resource: Arc<Resource>,
    /// `ResourceSpans.resource`, encoded.
    field: Vec<u8>,
    /// Spans waiting for the next request, encoded back to back.
    spans: Vec<u8>,
    count: usize,
    last_used: Instant,
}

/// A run of failed exports: warned about once, summarised when exports work again.
struct FailureStreak {
    since: Instant,
    batches: u64,
    spans: u64,
}

/// What one request task reports: how many spans it carried and how it went.
type Outcome = (u64, Result<PartialSuccess, SendError>);

pub struct OtlpSink {
    endpoint: ResolvedEndpoint,
    protocol: OtlpProtocol,
    timeout: Duration,
    transport: Arc<Transport>,
    max_batch: usize,
    flush_interval: Duration,
    resources: Vec<ResourceEntry>,
    /// Index in `resources` by the address of the `Arc<Resource>` the spans carry, and the
    /// last one used (consecutive spans mostly come from the same process).
    index: HashMap<usize, usize>,
    last: Option<(usize, usize)>,
    idle_ttl: Duration,
    /// Spans (and their encoded bytes) waiting for the next request, and since when.
    pending_spans: usize,
    pending_bytes: usize,
    pending_since: Option<Instant>,
    in_flight: JoinSet<Outcome>,
    /// Spans of each request in flight, for a task that panics.
    in_flight_spans: HashMap<Id, u64>,
    streak: Option<FailureStreak>,
    partial_warned: bool,
    stats: Arc<Stats>,
    tally: Arc<Tally>,
}

impl Sink for OtlpSink {
    async fn take(&mut self, spans: &mut Vec<SpanRecord>, now: Instant) {
        for span in spans.drain(..) {
            if self.add(span, now) {
                self.flush().await;
            }
        }
    }

    async fn tick(&mut self, now: Instant) {
        if self.flush_due(now, self.flush_interval) {
            self.flush().await;
        }
        self.forget_idle(now);
    }

    /// Requests are in flight.
    fn busy(&self) -> bool {
        !self.in_flight.is_empty()
    }

    async fn settle_next(&mut self) {
        if let Some(done) = self.in_flight.join_next_with_id().await {
            self.settle(done);
        }
    }

    /// Sends what is waiting and waits for every request in flight.
    async fn finish(&mut self) {
        self.flush().await;
        while let Some(done) = self.in_flight.join_next_with_id().await {
            self.settle(done);
        }
    }
}

impl OtlpSink {
    /// The sink for `cfg`'s OTLP target. Reads the TLS files it names (an unusable file is an
    /// error now, not a failed export later). Must run inside a tokio runtime (the gRPC channel
    /// spawns its connection task).
    pub fn new(
        cfg: &ExportConfig,
        stats: Arc<Stats>,
        tally: Arc<Tally>,
    ) -> Result<Self, ExportError> {
        let ExportTarget::Otlp {
            endpoint,
            protocol,
            form,
            options,
        } = &cfg.target
        else {
            return Err(ExportError::InvalidConfig("not an OTLP target"));
        };
        let (protocol, timeout) = (*protocol, cfg.timeout);
        let resolved = resolve_endpoint(endpoint, protocol, *form, options.insecure)?;
        let tls = tls::client_config(&options.tls)?;
        let transport = Transport::new(
            &resolved.url,
            TransportOptions {
                protocol,
                timeout,
                headers: &options.headers,
                compression: options.compression,
                tls,
            },
        )
        .map_err(|reason| ExportError::InvalidEndpoint {
            endpoint: endpoint.clone(),
            reason,
        })?;
        log::info!(
            "exporting spans over OTLP/{protocol} to {}{}",
            resolved.url,
            describe_options(&resolved, options)
        );
        if !resolved.tls && options.tls.any() {
            log::warn!(
                "TLS files are set (--otlp-certificate, --otlp-client-certificate, --otlp-client-key) \
                 but {} is plain http://: they are not used; use an https:// endpoint to export over TLS",
                resolved.url
            );
        }
        Ok(Self {
            endpoint: resolved,
            protocol,
            timeout,
            transport: Arc::new(transport),
            max_batch: cfg.max_batch.max(1),
            flush_interval: cfg.flush_interval,
            resources: Vec::new(),
            index: HashMap::new(),
            last: None,
            idle_ttl: IDLE_RESOURCE_TTL,
            pending_spans: 0,
            pending_bytes: 0,
            pending_since: None,
            in_flight: JoinSet::new(),
            in_flight_spans: HashMap::new(),
            streak: None,
            partial_warned: false,
            stats,
            tally,
        })
    }

    /// Encodes `span` for the next request. Returns true when a request should be sent now
    /// (`max_batch` spans or `MAX_REQUEST_BYTES` are waiting).
    fn add(&mut self, span: SpanRecord, now: Instant) -> bool {
        let key = Arc::as_ptr(&span.resource) as usize;
        let i = match self.last {
            Some((last, i)) if last == key => i,
            _ => {
                let i = match self.index.get(&key) {
                    Some(&i) => i,
                    None => {
                        self.resources.push(ResourceEntry {
                            key,
                            field: encode::resource_field(&span.resource),
                            _resource: Arc::clone(&span.resource),
                            spans: Vec::new(),
                            count: 0,
                            last_used: now,
                        });
                        self.index.insert(key, self.resources.len() - 1);
                        self.resources.len() - 1
                    }
                };
                self.last = Some((key, i));
                i
            }
        };
        let entry = &mut self.resources[i];
        entry.last_used = now;
        entry.count += 1;
        self.pending_bytes += encode::put_span(&mut entry.spans, 2, &span);
        self.pending_spans += 1;
        self.pending_since.get_or_insert(now);
        self.pending_spans >= self.max_batch || self.pending_bytes >= MAX_REQUEST_BYTES
    }

    /// Spans have waited `interval` or longer.
    fn flush_due(&self, now: Instant, interval: Duration) -> bool {
        self.pending_since
            .is_some_and(|since| now.saturating_duration_since(since) >= interval)
    }

    /// Sends what is waiting as one request (in the background: its outcome is counted by
    /// `settle`). Waits first if `MAX_IN_FLIGHT` requests are in flight.
    async fn flush(&mut self) {
        if self.pending_spans == 0 {
            return;
        }
        while self.in_flight.len() >= MAX_IN_FLIGHT {
            if let Some(done) = self.in_flight.join_next_with_id().await {
                self.settle(done);
            }
        }
        let body = {
            let parts: Vec<ResourcePart<'_>> = self
                .resources
                .iter()
                .filter(|e| e.count > 0)
                .map(|e| ResourcePart {
                    resource: &e.field,
                    spans: &e.spans,
                })
                .collect();
            encode::request(&parts)
        };
        for entry in self.resources.iter_mut().filter(|e| e.count > 0) {
            entry.spans.clear();
            entry.count = 0;
            // A burst of large spans should not pin its buffer for ever.
            if entry.spans.capacity() > 2 * MAX_REQUEST_BYTES {
                entry.spans.shrink_to(MAX_REQUEST_BYTES);
            }
        }
        let spans = self.pending_spans as u64;
        self.pending_spans = 0;
        self.pending_bytes = 0;
        self.pending_since = None;
        let transport = Arc::clone(&self.transport);
        let timeout = self.timeout;
        let task = self.in_flight.spawn(async move {
            (
                spans,
                send_with_retries(&transport, Bytes::from(body), timeout).await,
            )
        });
        self.in_flight_spans.insert(task.id(), spans);
    }

    /// Counts a finished request's spans as exported or failed.
    fn settle(&mut self, done: Result<(Id, Outcome), JoinError>) {
        let (spans, result) = match done {
            Ok((id, outcome)) => {
                self.in_flight_spans.remove(&id);
                outcome
            }
            Err(join_error) => {
                // The request task panicked or was cancelled: its spans are lost, count them.
                log::error!("OTLP export task failed: {join_error}");
                let spans = self
                    .in_flight_spans
                    .remove(&join_error.id())
                    .unwrap_or_default();
                let error = SendError {
                    message: join_error.to_string(),
                    retryable: false,
                    hint: None,
                };
                (spans, Err(error))
            }
        };
        match result {
            Ok(partial) => {
                let rejected = u64::try_from(partial.rejected_spans)
                    .unwrap_or(0)
                    .min(spans);
                self.tally.exported(&self.stats, spans - rejected);
                if rejected > 0 {
                    self.tally.failed(&self.stats, rejected, 0);
                }
                if rejected > 0 || !partial.error_message.is_empty() {
                    self.note_partial_success(rejected, &partial.error_message);
                }
                self.note_outcome(0, 0, None);
            }
            Err(error) => {
                self.tally.failed(&self.stats, spans, 1);
                self.note_outcome(1, spans, Some(error));
            }
        }
    }

    /// Exports `batch` now and waits for the outcome (tests).
    #[cfg(test)]
    pub async fn export(&mut self, batch: Vec<SpanRecord>) {
        let now = Instant::now();
        for span in batch {
            self.add(span, now);
        }
        self.finish().await;
    }

    fn note_partial_success(&mut self, rejected: u64, message: &str) {
        if self.partial_warned {
            log::debug!(
                "{} rejected {rejected} spans of an export request: {message}",
                self.endpoint.url
            );
            return;
        }
        self.partial_warned = true;
        log::warn!(
            "the collector at {} rejected {rejected} spans of an export request: {message:?}; they are \
             counted in spans_export_failed (this is reported once)",
            self.endpoint.url
        );
    }

    fn note_outcome(&mut self, failed_batches: u64, failed_spans: u64, error: Option<SendError>) {
        match (&mut self.streak, failed_batches) {
            (None, 0) => {}
            (None, _) => {
                let warning = match &error {
                    Some(error) => outage_warning(&self.endpoint.url, self.protocol, error),
                    None => format!("exporting spans to {} failed", self.endpoint.url),
                };
                log::warn!("{warning}");
                self.streak = Some(FailureStreak {
                    since: Instant::now(),
                    batches: failed_batches,
                    spans: failed_spans,
                });
            }
            (Some(streak), 0) => {
                log::info!(
                    "exporting spans to {} works again after {:.1}s: {} batches ({} spans) were lost",
                    self.endpoint.url,
                    streak.since.elapsed().as_secs_f64(),
                    streak.batches,
                    streak.spans
                );
                self.streak = None;
            }
            (Some(streak), _) => {
                streak.batches += failed_batches;
                streak.spans += failed_spans;
            }
        }
    }

    /// Drops cached resources of processes that sent nothing for a while.
    fn forget_idle(&mut self, now: Instant) {
        let ttl = self.idle_ttl;
        let before = self.resources.len();
        self.resources
            .retain(|e| e.count > 0 || now.saturating_duration_since(e.last_used) < ttl);
        if self.resources.len() != before {
            self.index = (self.resources.iter().enumerate())
                .map(|(i, e)| (e.key, i))
                .collect();
            self.last = None;
        }
    }

    #[cfg(test)]
    pub fn cached_resources(&self) -> usize {
        self.resources.len()
    }

    #[cfg(test)]
    pub fn in_failure_streak(&self) -> bool {
        self.streak.is_some()
    }
}

/// The warning at the start of an outage: what failed, where, and what to check.
pub fn outage_warning(url: &str, protocol: OtlpProtocol, error: &SendError) -> String {
    let check = match error.hint {
        Some(hint) => format!("Check: {hint}."),
        None => {
            let (port, other) = match protocol {
                OtlpProtocol::Grpc => (
                    4317,
                    "for OTLP/HTTP on port 4318 use the HTTP/protobuf protocol",
                ),
                OtlpProtocol::HttpProtobuf => {
                    (4318, "for OTLP/gRPC on port 4317 use the gRPC protocol")
                }
            };
            format!(
                "Check that an OpenTelemetry collector is running and reachable there and that it \
                 accepts OTLP over {protocol} (its default port is {port}; {other})."
            )
        }
    };
    format!(
        "exporting spans to {url} failed: {}. Spans are dropped (counted in spans_export_failed) \
         until the collector answers again; this is reported once per outage. {check}",
        error.message
    )
}

/// How the log shows the exporter's settings: `(TLS, CA /etc/ca.pem, gzip, headers x-api-key)`.
/// Header names only: values are secrets.
fn describe_options(resolved: &ResolvedEndpoint, options: &OtlpOptions) -> String {
    let mut parts = Vec::new();
    if resolved.tls {
        parts.push("TLS".to_owned());
        match &options.tls.certificate {
            Some(ca) => parts.push(format!("CA {}", ca.display())),
            None => parts.push("public root CAs".to_owned()),
        }
        if let Some(cert) = &options.tls.client_certificate {
            parts.push(format!("client certificate {}", cert.display()));
        }
    }
    if options.compression == Compression::Gzip {
        parts.push("gzip".to_owned());
    }
    if !options.headers.is_empty() {
        parts.push(format!("headers {}", options.headers.names()));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!(" ({})", parts.join(", "))
    }
}

/// Sends one request; retries transient failures with exponential backoff while the export
/// timeout allows. The error is the last attempt's.
async fn send_with_retries(
    transport: &Transport,
    body: Bytes,
    timeout: Duration,
) -> Result<PartialSuccess, SendError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let attempts = async {
        let mut backoff = FIRST_BACKOFF;
        let mut retries = 0;
        loop {
            match transport.send(body.clone()).await {
                Ok(partial) => return Ok(partial),
                Err(e)
                    if e.retryable
                        && retries < MAX_RETRIES
                        && tokio::time::Instant::now() + backoff < deadline =>
                {
                    log::debug!(
                        "OTLP export attempt failed, retrying in {backoff:?}: {}",
                        e.message
                    );
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                    retries += 1;
                }
                Err(e) => return Err(e),
            }
        }
    };
    match tokio::time::timeout_at(deadline, attempts).await {
        Ok(result) => result,
        Err(_) => Err(SendError {
            message: format!("no answer within {timeout:?}"),
            retryable: true,
            hint: None,
        }),
    }
}

#[cfg(test)]
mod tls_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::EndpointForm;

    fn config(endpoint: &str, protocol: OtlpProtocol, max_batch: usize) -> ExportConfig {
        ExportConfig {
            max_batch,
            timeout: Duration::from_secs(1),
            ..ExportConfig::new(ExportTarget::Otlp {
                endpoint: endpoint.to_owned(),
                protocol,
                form: EndpointForm::Base,
                options: OtlpOptions::default(),
            })
        }
    }

    #[tokio::test]
    async fn one_cached_resource_per_process_dropped_when_idle() {
        let stats = Arc::new(Stats::default());
        let mut sink = OtlpSink::new(
            &config("http://127.0.0.1:9", OtlpProtocol::Grpc, 512),
            stats,
            Arc::default(),
        )
        .expect("sink");
        let r1 = encode::tests::resource(1, "a");
        let r2 = encode::tests::resource(2, "b");
        let t0 = Instant::now();
        let span = |r: &Arc<Resource>| encode::tests::server_span(r);
        assert!(!sink.add(span(&r1), t0));
        assert!(!sink.add(span(&r1), t0));
        assert!(!sink.add(span(&r2), t0 + Duration::from_secs(10)));
        assert_eq!(sink.cached_resources(), 2);
        sink.idle_ttl = Duration::from_secs(5);
        sink.forget_idle(t0 + Duration::from_secs(12));
        assert_eq!(
            sink.cached_resources(),
            2,
            "spans are waiting: nothing dropped"
        );
        // Forget the waiting spans without sending them.
        for e in &mut sink.resources {
            e.count = 0;
            e.spans.clear();
        }
        sink.forget_idle(t0 + Duration::from_secs(12));
        assert_eq!(
            sink.cached_resources(),
            1,
            "r1 idle for 12s is dropped, r2 (2s) kept"
        );
        sink.forget_idle(t0 + Duration::from_secs(20));
        assert_eq!(sink.cached_resources(), 0);
    }

    #[tokio::test]
    async fn asks_for_a_flush_at_max_batch_and_after_the_interval() {
        let mut sink = OtlpSink::new(
            &config("127.0.0.1:9", OtlpProtocol::HttpProtobuf, 3),
            Arc::default(),
            Arc::default(),
        )
        .expect("sink");
        let r = encode::tests::resource(1, "a");
        let t0 = Instant::now();
        let span = encode::tests::server_span(&r);
        assert!(!sink.flush_due(t0 + Duration::from_secs(9), Duration::from_secs(1)));
        assert!(!sink.add(span.clone(), t0));
        assert!(!sink.add(span.clone(), t0 + Duration::from_millis(500)));
        assert!(!sink.flush_due(t0 + Duration::from_millis(999), Duration::from_secs(1)));
        assert!(sink.flush_due(t0 + Duration::from_secs(1), Duration::from_secs(1)));
        assert!(sink.add(span, t0), "the third span fills the batch");
    }
}
