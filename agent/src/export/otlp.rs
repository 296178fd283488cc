//! OTLP exporter: one opentelemetry-otlp `SpanExporter` per traced process's resource.
//!
//! An OTLP exporter carries a single resource (`set_resource`), and every process we trace is
//! its own resource, so exporters are created lazily per resource, share one gRPC channel (one
//! HTTP/2 connection) when the protocol is gRPC, and are dropped after a while without spans.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use opentelemetry_otlp::{Protocol, WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::trace::{SpanData, SpanExporter as _};
use tokio::task::JoinSet;

use super::convert::{sdk_resource, span_data};
use super::{ExportError, OtlpProtocol, Tally};
use crate::spans::model::{Resource, SpanRecord};
use crate::stats::Stats;

/// An exporter unused for this long is dropped (its process most likely exited).
const IDLE_EXPORTER_TTL: Duration = Duration::from_secs(300);
/// Extra time given to an export call past the configured timeout before we give up on it
/// ourselves (the exporter enforces the timeout too; this is the backstop).
const EXPORT_SLACK: Duration = Duration::from_millis(500);

/// The endpoint a user gave, resolved for one protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedEndpoint {
    /// What the exporter connects to: as given for gRPC, `<base>/v1/traces` for HTTP.
    pub url: String,
}

/// Resolves `endpoint` per the OTLP exporter specification: for gRPC the URL as given (default
/// `http://localhost:4317`); for HTTP/protobuf a base URL (`OTEL_EXPORTER_OTLP_ENDPOINT`-style,
/// default `http://localhost:4318`) to which `/v1/traces` is appended. A URL that already ends
/// in `/v1/traces` is kept as is; `host:port` without a scheme means `http://host:port`.
pub fn resolve_endpoint(
    endpoint: &str,
    protocol: OtlpProtocol,
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
    let (scheme, rest) = base.split_once("://").ok_or_else(|| invalid("no scheme"))?;
    match scheme.to_ascii_lowercase().as_str() {
        "http" => {}
        "https" => {
            return Err(ExportError::TlsUnsupported {
                endpoint: endpoint.to_owned(),
            });
        }
        _ => return Err(invalid("the scheme must be http://")),
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.is_empty() {
        return Err(invalid("no host"));
    }
    if rest.contains(char::is_whitespace) {
        return Err(invalid("it contains whitespace"));
    }
    let url = match protocol {
        OtlpProtocol::Grpc => base,
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

struct Entry {
    /// Held so the allocation (whose address is our key) cannot be reused while cached.
    _resource: Arc<Resource>,
    exporter: Arc<opentelemetry_otlp::SpanExporter>,
    last_used: Instant,
}

/// A run of failed exports: warned about once, summarised when exports work again.
struct FailureStreak {
    since: Instant,
    batches: u64,
    spans: u64,
}

pub struct OtlpSink {
    endpoint: ResolvedEndpoint,
    protocol: OtlpProtocol,
    timeout: Duration,
    /// gRPC: one lazily connected channel shared by every exporter.
    channel: Option<tonic::transport::Channel>,
    /// Keyed by the address of the `Arc<Resource>` the spans carry.
    exporters: HashMap<usize, Entry>,
    idle_ttl: Duration,
    streak: Option<FailureStreak>,
    stats: Arc<Stats>,
    tally: Arc<Tally>,
}

impl OtlpSink {
    /// Must run inside a tokio runtime (the gRPC channel spawns its connection task).
    pub fn new(
        endpoint: &str,
        protocol: OtlpProtocol,
        timeout: Duration,
        stats: Arc<Stats>,
        tally: Arc<Tally>,
    ) -> Result<Self, ExportError> {
        let resolved = resolve_endpoint(endpoint, protocol)?;
        let channel =
            match protocol {
                OtlpProtocol::Grpc => {
                    let ep = tonic::transport::Endpoint::from_shared(resolved.url.clone())
                        .map_err(|e| ExportError::InvalidEndpoint {
                            endpoint: endpoint.to_owned(),
                            reason: e.to_string(),
                        })?;
                    Some(
                        ep.timeout(timeout)
                            .connect_timeout(timeout)
                            .tcp_nodelay(true)
                            .connect_lazy(),
                    )
                }
                OtlpProtocol::HttpProtobuf => None,
            };
        let sink = Self {
            endpoint: resolved,
            protocol,
            timeout,
            channel,
            exporters: HashMap::new(),
            idle_ttl: IDLE_EXPORTER_TTL,
            streak: None,
            stats,
            tally,
        };
        // Surface configuration errors now rather than at the first span.
        sink.build_exporter()?;
        Ok(sink)
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint.url
    }

    fn build_exporter(&self) -> Result<opentelemetry_otlp::SpanExporter, ExportError> {
        let built = match &self.channel {
            Some(channel) => opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_channel(channel.clone())
                .with_timeout(self.timeout)
                .build(),
            None => opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(Protocol::HttpBinary)
                .with_endpoint(self.endpoint.url.clone())
                .with_timeout(self.timeout)
                .build(),
        };
        built.map_err(|source| ExportError::Build {
            endpoint: self.endpoint.url.clone(),
            source,
        })
    }

    fn exporter_for(
        &mut self,
        resource: &Arc<Resource>,
        now: Instant,
    ) -> Result<Arc<opentelemetry_otlp::SpanExporter>, ExportError> {
        let key = Arc::as_ptr(resource) as usize;
        if let Some(entry) = self.exporters.get_mut(&key) {
            entry.last_used = now;
            return Ok(Arc::clone(&entry.exporter));
        }
        let mut exporter = self.build_exporter()?;
        exporter.set_resource(&sdk_resource(resource));
        let exporter = Arc::new(exporter);
        self.exporters.insert(
            key,
            Entry {
                _resource: Arc::clone(resource),
                exporter: Arc::clone(&exporter),
                last_used: now,
            },
        );
        Ok(exporter)
    }

    /// Exports one batch (spans of any number of processes), one request per resource, all
    /// requests concurrently. Counts every span as exported or failed.
    pub async fn export(&mut self, batch: Vec<SpanRecord>) {
        if batch.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut groups: HashMap<usize, (Arc<Resource>, Vec<SpanData>)> = HashMap::new();
        for span in &batch {
            groups
                .entry(Arc::as_ptr(&span.resource) as usize)
                .or_insert_with(|| (Arc::clone(&span.resource), Vec::new()))
                .1
                .push(span_data(span));
        }
        drop(batch);

        let mut first_error: Option<String> = None;
        let mut failed_spans = 0u64;
        let mut failed_batches = 0u64;
        let mut requests = JoinSet::new();
        let mut in_flight = 0u64;
        for (_, (resource, data)) in groups {
            let n = data.len() as u64;
            match self.exporter_for(&resource, now) {
                Ok(exporter) => {
                    let deadline = self.timeout + EXPORT_SLACK;
                    in_flight += n;
                    requests.spawn(async move {
                        let result =
                            match tokio::time::timeout(deadline, exporter.export(data)).await {
                                Ok(Ok(())) => Ok(()),
                                Ok(Err(e)) => Err(e.to_string()),
                                Err(_) => Err(format!("no answer within {deadline:?}")),
                            };
                        (n, result)
                    });
                }
                Err(e) => {
                    failed_spans += n;
                    failed_batches += 1;
                    first_error.get_or_insert_with(|| e.to_string());
                }
            }
        }
        let mut exported = 0u64;
        while let Some(joined) = requests.join_next().await {
            if let Ok((n, _)) = &joined {
                in_flight -= n;
            }
            match joined {
                Ok((n, Ok(()))) => exported += n,
                Ok((n, Err(e))) => {
                    failed_spans += n;
                    failed_batches += 1;
                    first_error.get_or_insert(e);
                }
                Err(join_error) => {
                    // The export task panicked or was cancelled: its spans are lost, count them.
                    failed_batches += 1;
                    first_error.get_or_insert_with(|| join_error.to_string());
                    log::error!("OTLP export task failed: {join_error}");
                }
            }
        }
        // Spans of a panicked export task: lost.
        failed_spans += in_flight;
        self.tally.exported(&self.stats, exported);
        if failed_batches > 0 {
            self.tally.failed(&self.stats, failed_spans, failed_batches);
        }
        self.note_outcome(failed_batches, failed_spans, first_error);
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

    /// Drops exporters of resources that sent nothing for a while.
    pub fn tick(&mut self, now: Instant) {
        self.exporters
            .retain(|_, e| now.saturating_duration_since(e.last_used) < self.idle_ttl);
    }

    #[cfg(test)]
    pub fn exporters(&self) -> usize {
        self.exporters.len()
    }

    #[cfg(test)]
    pub fn in_failure_streak(&self) -> bool {
        self.streak.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(endpoint: &str, protocol: OtlpProtocol) -> String {
        match resolve_endpoint(endpoint, protocol) {
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
            resolve_endpoint("https://c:4317", Grpc),
            Err(ExportError::TlsUnsupported { .. })
        ));
        assert!(matches!(
            resolve_endpoint("ftp://c", Grpc),
            Err(ExportError::InvalidEndpoint { .. })
        ));
        assert!(matches!(
            resolve_endpoint("http://", HttpProtobuf),
            Err(ExportError::InvalidEndpoint { .. })
        ));
    }

    #[tokio::test]
    async fn one_exporter_per_resource_dropped_when_idle() {
        let stats = Arc::new(Stats::default());
        let mut sink = OtlpSink::new(
            "127.0.0.1:9",
            OtlpProtocol::Grpc,
            Duration::from_secs(1),
            stats,
            Arc::default(),
        )
        .expect("sink");
        let r1 = Arc::new(Resource {
            pid: 1,
            service_name: "a".into(),
            attributes: vec![],
        });
        let r2 = Arc::new(Resource {
            pid: 2,
            service_name: "b".into(),
            attributes: vec![],
        });
        let t0 = Instant::now();
        let e1 = sink.exporter_for(&r1, t0).expect("exporter");
        assert!(Arc::ptr_eq(
            &e1,
            &sink.exporter_for(&r1, t0).expect("exporter")
        ));
        sink.exporter_for(&r2, t0 + Duration::from_secs(10))
            .expect("exporter");
        assert_eq!(sink.exporters(), 2);
        sink.idle_ttl = Duration::from_secs(5);
        sink.tick(t0 + Duration::from_secs(12));
        assert_eq!(
            sink.exporters(),
            1,
            "r1 idle for 12s is dropped, r2 (2s) kept"
        );
        sink.tick(t0 + Duration::from_secs(20));
        assert_eq!(sink.exporters(), 0);
    }
}
