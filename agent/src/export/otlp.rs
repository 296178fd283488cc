//! OTLP exporter: spans are encoded as they arrive (see `encode`), one buffer per traced
//! process's resource, and sent as one `ExportTraceServiceRequest` per flush holding one
//! `ResourceSpans` per resource (each resource encoded once and cached). Requests go out
//! concurrently (at most `MAX_IN_FLIGHT`), over one shared gRPC channel (one HTTP/2 connection)
//! or over HTTP/1.1 keep-alive connections; transient failures are retried with backoff
//! within the export timeout.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::task::{Id, JoinError, JoinSet};

use super::encode::{self, PartialSuccess, ResourcePart};
use super::transport::{GrpcTransport, HttpTransport, Transport, parse_http_url};
use super::{EndpointForm, ExportError, OtlpProtocol, Tally};
use crate::spans::model::{Resource, SpanRecord};
use crate::stats::Stats;

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

/// The endpoint a user gave, resolved for one protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedEndpoint {
    /// What the exporter connects to: as given for gRPC, `<base>/v1/traces` for HTTP.
    pub url: String,
}

/// Checks an endpoint as given (scheme, host, port) without resolving it, so that a mistake
/// stops the agent before it loads anything. Empty means the protocol's default. The message
/// never repeats the URL: it may come from a file, and carry credentials.
pub fn check_endpoint(given: &str) -> Result<(), &'static str> {
    let given = given.trim();
    if given.is_empty() {
        return Ok(());
    }
    if given.contains(char::is_whitespace) {
        return Err("it contains whitespace");
    }
    let rest = match given.split_once("://") {
        Some((scheme, rest)) => {
            if !matches!(scheme.to_ascii_lowercase().as_str(), "http" | "https") {
                return Err("the scheme must be http:// or https://");
            }
            rest
        }
        None => given,
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, hp)| hp);
    let (host, port) = match host_port.strip_prefix('[') {
        Some(v6) => {
            let (address, after) = v6.split_once(']').ok_or("an IPv6 address lacks its `]`")?;
            match after {
                "" => (address, None),
                _ => (
                    address,
                    Some(
                        after
                            .strip_prefix(':')
                            .ok_or("junk after the IPv6 address")?,
                    ),
                ),
            }
        }
        None => match host_port.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (host_port, None),
        },
    };
    if host.is_empty() {
        return Err("no host");
    }
    match port.map(str::parse::<u16>) {
        None | Some(Ok(1..)) => Ok(()),
        Some(_) => Err("the port must be a number from 1 to 65535"),
    }
}

/// Resolves `endpoint` per the OTLP exporter specification: for gRPC the URL as given (default
/// `http://localhost:4317`); for HTTP/protobuf a base URL (`OTEL_EXPORTER_OTLP_ENDPOINT`-style,
/// default `http://localhost:4318`) to which `/v1/traces` is appended unless it already ends
/// with it, or, for [`EndpointForm::TracesUrl`], the URL as given. `host:port` without a
/// scheme means `http://host:port`.
pub fn resolve_endpoint(
    endpoint: &str,
    protocol: OtlpProtocol,
    form: EndpointForm,
) -> Result<ResolvedEndpoint, ExportError> {
    let given = endpoint.trim();
    let base = if given.is_empty() {
        protocol.default_endpoint().to_owned()
    } else {
        given.to_owned()
    };
    let base = if base.contains("://") {
        base
    } else {
        format!("http://{base}")
    };
    let invalid = |reason: &str| ExportError::InvalidEndpoint {
        endpoint: endpoint.to_owned(),
        reason: reason.to_owned(),
    };
    check_endpoint(&base).map_err(invalid)?;
    let (scheme, _) = base.split_once("://").ok_or_else(|| invalid("no scheme"))?;
    match scheme.to_ascii_lowercase().as_str() {
        "http" => {}
        "https" => {
            return Err(ExportError::TlsUnsupported {
                endpoint: endpoint.to_owned(),
            });
        }
        _ => return Err(invalid("the scheme must be http://")),
    }
    let url = match protocol {
        OtlpProtocol::Grpc => base,
        OtlpProtocol::HttpProtobuf if form == EndpointForm::TracesUrl => base,
        OtlpProtocol::HttpProtobuf => {
            let trimmed = base.trim_end_matches('/');
            if trimmed.ends_with("/v1/traces") {
                trimmed.to_owned()
            } else {
                format!("{trimmed}/v1/traces")
            }
        }
    };
    Ok(ResolvedEndpoint { url })
}

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
type Outcome = (u64, Result<PartialSuccess, String>);

pub struct OtlpSink {
    endpoint: ResolvedEndpoint,
    protocol: OtlpProtocol,
    timeout: Duration,
    transport: Transport,
    max_batch: usize,
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

impl OtlpSink {
    /// Must run inside a tokio runtime (the gRPC channel spawns its connection task).
    pub fn new(
        endpoint: &str,
        protocol: OtlpProtocol,
        form: EndpointForm,
        timeout: Duration,
        max_batch: usize,
        stats: Arc<Stats>,
        tally: Arc<Tally>,
    ) -> Result<Self, ExportError> {
        let resolved = resolve_endpoint(endpoint, protocol, form)?;
        let invalid = |reason: String| ExportError::InvalidEndpoint {
            endpoint: endpoint.to_owned(),
            reason,
        };
        let transport = match protocol {
            OtlpProtocol::Grpc => {
                let ep = tonic::transport::Endpoint::from_shared(resolved.url.clone())
                    .map_err(|e| invalid(e.to_string()))?;
                let channel = ep
                    .timeout(timeout)
                    .connect_timeout(timeout)
                    .tcp_nodelay(true)
                    .connect_lazy();
                Transport::Grpc(GrpcTransport::new(channel, timeout))
            }
            OtlpProtocol::HttpProtobuf => {
                let url = parse_http_url(&resolved.url).map_err(|e| invalid(e.to_owned()))?;
                Transport::Http(HttpTransport::new(&url))
            }
        };
        Ok(Self {
            endpoint: resolved,
            protocol,
            timeout,
            transport,
            max_batch: max_batch.max(1),
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

    pub fn endpoint(&self) -> &str {
        &self.endpoint.url
    }

    /// Encodes `span` for the next request. Returns true when a request should be sent now
    /// (`max_batch` spans or `MAX_REQUEST_BYTES` are waiting).
    pub fn add(&mut self, span: SpanRecord, now: Instant) -> bool {
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
    pub fn flush_due(&self, now: Instant, interval: Duration) -> bool {
        self.pending_since
            .is_some_and(|since| now.saturating_duration_since(since) >= interval)
    }

    /// Whether requests are in flight (`next_done` has something to wait for).
    pub fn busy(&self) -> bool {
        !self.in_flight.is_empty()
    }

    /// Sends what is waiting as one request (in the background: its outcome is counted by
    /// `settle`). Waits first if `MAX_IN_FLIGHT` requests are in flight.
    pub async fn flush(&mut self) {
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
        let transport = self.transport.clone();
        let timeout = self.timeout;
        let task = self.in_flight.spawn(async move {
            (
                spans,
                send_with_retries(&transport, Bytes::from(body), timeout).await,
            )
        });
        self.in_flight_spans.insert(task.id(), spans);
    }

    /// The next request to finish (call only while `busy`).
    pub async fn next_done(&mut self) -> Option<Result<(Id, Outcome), JoinError>> {
        self.in_flight.join_next_with_id().await
    }

    /// Counts a finished request's spans as exported or failed.
    pub fn settle(&mut self, done: Result<(Id, Outcome), JoinError>) {
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
                (spans, Err(join_error.to_string()))
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

    /// Sends what is waiting and waits for every request in flight.
    pub async fn drain(&mut self) {
        self.flush().await;
        while let Some(done) = self.in_flight.join_next_with_id().await {
            self.settle(done);
        }
    }

    /// Exports `batch` now and waits for the outcome (tests).
    #[cfg(test)]
    pub async fn export(&mut self, batch: Vec<SpanRecord>) {
        let now = Instant::now();
        for span in batch {
            self.add(span, now);
        }
        self.drain().await;
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

    fn note_outcome(&mut self, failed_batches: u64, failed_spans: u64, error: Option<String>) {
        match (&mut self.streak, failed_batches) {
            (None, 0) => {}
            (None, _) => {
                let error = error.unwrap_or_default();
                let (port, other) = match self.protocol {
                    OtlpProtocol::Grpc => (
                        4317,
                        "for OTLP/HTTP on port 4318 use the HTTP/protobuf protocol",
                    ),
                    OtlpProtocol::HttpProtobuf => {
                        (4318, "for OTLP/gRPC on port 4317 use the gRPC protocol")
                    }
                };
                log::warn!(
                    "exporting spans to {} failed: {error}. Spans are dropped (counted in spans_export_failed) \
                     until the collector answers again; this is reported once per outage. Check that an \
                     OpenTelemetry collector is running and reachable there and that it accepts OTLP over {} \
                     (its default port is {port}; {other}).",
                    self.endpoint.url,
                    self.protocol,
                );
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
    pub fn tick(&mut self, now: Instant) {
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

/// Sends one request; retries transient failures with exponential backoff while the export
/// timeout allows. The error is the last attempt's.
async fn send_with_retries(
    transport: &Transport,
    body: Bytes,
    timeout: Duration,
) -> Result<PartialSuccess, String> {
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
                Err(e) => return Err(e.message),
            }
        }
    };
    match tokio::time::timeout_at(deadline, attempts).await {
        Ok(result) => result,
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(endpoint: &str, protocol: OtlpProtocol) -> String {
        match resolve_endpoint(endpoint, protocol, EndpointForm::Base) {
            Ok(r) => r.url,
            Err(e) => format!("error: {e}"),
        }
    }

    #[test]
    fn resolves_endpoints_per_protocol() {
        use OtlpProtocol::*;
        assert_eq!(url("", Grpc), "http://localhost:4317");
        assert_eq!(url("", HttpProtobuf), "http://localhost:4318/v1/traces");
        assert_eq!(url("http://collector:4317", Grpc), "http://collector:4317");
        assert_eq!(url("collector:4317", Grpc), "http://collector:4317");
        assert_eq!(
            url("http://collector:4318", HttpProtobuf),
            "http://collector:4318/v1/traces"
        );
        assert_eq!(
            url("http://collector:4318/", HttpProtobuf),
            "http://collector:4318/v1/traces"
        );
        assert_eq!(
            url("http://gw/otlp", HttpProtobuf),
            "http://gw/otlp/v1/traces"
        );
        assert_eq!(
            url("http://collector:4318/v1/traces", HttpProtobuf),
            "http://collector:4318/v1/traces"
        );
        assert!(matches!(
            resolve_endpoint("https://c:4317", Grpc, EndpointForm::Base),
            Err(ExportError::TlsUnsupported { .. })
        ));
        assert!(matches!(
            resolve_endpoint("ftp://c", Grpc, EndpointForm::Base),
            Err(ExportError::InvalidEndpoint { .. })
        ));
        assert!(matches!(
            resolve_endpoint("http://", HttpProtobuf, EndpointForm::Base),
            Err(ExportError::InvalidEndpoint { .. })
        ));
    }

    #[test]
    fn traces_url_is_used_as_given_for_http() {
        use OtlpProtocol::*;
        let traces =
            |endpoint| match resolve_endpoint(endpoint, HttpProtobuf, EndpointForm::TracesUrl) {
                Ok(r) => r.url,
                Err(e) => format!("error: {e}"),
            };
        assert_eq!(traces("http://gw/otlp/traces"), "http://gw/otlp/traces");
        assert_eq!(traces("http://c:4318/v1/traces"), "http://c:4318/v1/traces");
        assert_eq!(traces("c:4318/ingest"), "http://c:4318/ingest");
        assert!(traces("https://c/v1/traces").starts_with("error"));
        // gRPC takes every endpoint as given anyway.
        assert_eq!(
            resolve_endpoint("http://c:4317", Grpc, EndpointForm::TracesUrl)
                .map(|r| r.url)
                .ok(),
            Some("http://c:4317".to_owned())
        );
    }

    #[tokio::test]
    async fn one_cached_resource_per_process_dropped_when_idle() {
        let stats = Arc::new(Stats::default());
        let mut sink = OtlpSink::new(
            "127.0.0.1:9",
            OtlpProtocol::Grpc,
            EndpointForm::Base,
            Duration::from_secs(1),
            512,
            stats,
            Arc::default(),
        )
        .expect("sink");
        let r1 = crate::export::encode::tests::resource(1, "a");
        let r2 = crate::export::encode::tests::resource(2, "b");
        let t0 = Instant::now();
        let span = |r: &Arc<Resource>| crate::export::encode::tests::server_span(r);
        assert!(!sink.add(span(&r1), t0));
        assert!(!sink.add(span(&r1), t0));
        assert!(!sink.add(span(&r2), t0 + Duration::from_secs(10)));
        assert_eq!(sink.cached_resources(), 2);
        sink.idle_ttl = Duration::from_secs(5);
        sink.tick(t0 + Duration::from_secs(12));
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
        sink.tick(t0 + Duration::from_secs(12));
        assert_eq!(
            sink.cached_resources(),
            1,
            "r1 idle for 12s is dropped, r2 (2s) kept"
        );
        sink.tick(t0 + Duration::from_secs(20));
        assert_eq!(sink.cached_resources(), 0);
    }

    #[tokio::test]
    async fn asks_for_a_flush_at_max_batch_and_after_the_interval() {
        let mut sink = OtlpSink::new(
            "127.0.0.1:9",
            OtlpProtocol::HttpProtobuf,
            EndpointForm::Base,
            Duration::from_secs(1),
            3,
            Arc::default(),
            Arc::default(),
        )
        .expect("sink");
        let r = crate::export::encode::tests::resource(1, "a");
        let t0 = Instant::now();
        let span = crate::export::encode::tests::server_span(&r);
        assert!(!sink.flush_due(t0 + Duration::from_secs(9), Duration::from_secs(1)));
        assert!(!sink.add(span.clone(), t0));
        assert!(!sink.add(span.clone(), t0 + Duration::from_millis(500)));
        assert!(!sink.flush_due(t0 + Duration::from_millis(999), Duration::from_secs(1)));
        assert!(sink.flush_due(t0 + Duration::from_secs(1), Duration::from_secs(1)));
        assert!(sink.add(span, t0), "the third span fills the batch");
    }
}
