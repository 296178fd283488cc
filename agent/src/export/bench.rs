//! A micro-benchmark of the export path, meant to run under callgrind (instruction counts are
//! deterministic, wall-clock times on this machine are not):
//!
//! ```text
//! cargo test --release -p agent --no-run      # note the test binary's path
//! BENCH_MODE=grpc BENCH_ENDPOINT=http://127.0.0.1:4317 BENCH_SPANS=20000 \
//!   valgrind --tool=callgrind <test binary> --ignored --exact export::bench::export_path
//! ```
//!
//! `BENCH_MODE`: `none` (build the spans, export nothing: the harness's own cost), `console`
//! (stdout: redirect it to /dev/null), `grpc` or `http` (to `BENCH_ENDPOINT`, e.g. a
//! `rotel-agent --exporter blackhole`). Instructions per span = (mode − none) / spans.

use std::sync::Arc;
use std::time::Duration;

use super::worker::ExportSummary;
use super::*;
use crate::spans::model::{Attribute, Resource, SpanId, SpanKind, SpanRecord, SpanStatus, TraceId};
use crate::stats::Stats;

pub(super) fn resource() -> Arc<Resource> {
    Arc::new(Resource {
        pid: 4242,
        service_name: "nginx".to_owned(),
        attributes: vec![
            Attribute::str("service.name", "nginx"),
            Attribute::str("service.instance.id", "benchhost:4242"),
            Attribute::int("process.pid", 4242),
            Attribute::str("process.executable.name", "nginx"),
            Attribute::str("process.executable.path", "/usr/sbin/nginx"),
            Attribute::str("process.command_line", "nginx: worker process"),
            Attribute::str("process.owner", "www-data"),
            Attribute::str("host.name", "benchhost"),
            Attribute::str("telemetry.sdk.name", "opentelemetry"),
            Attribute::str("telemetry.sdk.language", "rust"),
            Attribute::str("telemetry.sdk.version", "0.33.1"),
            Attribute::str("telemetry.distro.name", "ebpf-agent"),
            Attribute::str("telemetry.distro.version", "0.1.0"),
        ],
    })
}

/// A server span as the HTTP/1 builder makes it for nginx answering wrk.
pub(super) fn span(resource: &Arc<Resource>, i: u64) -> SpanRecord {
    let mut trace = [0u8; 16];
    trace[..8].copy_from_slice(&i.to_be_bytes());
    trace[8..].copy_from_slice(&(i ^ 0x5a5a_5a5a_5a5a_5a5a).to_le_bytes());
    let start = 1_700_000_000_000_000_000 + i * 50_000;
    SpanRecord {
        trace_id: TraceId(trace),
        span_id: SpanId((i.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1).to_be_bytes()),
        parent_span_id: None,
        parent_is_remote: false,
        trace_state: None,
        name: "GET /".to_owned(),
        kind: SpanKind::Server,
        start_unix_nanos: start,
        end_unix_nanos: start + 41_000,
        attributes: vec![
            Attribute::str("http.request.method", "GET"),
            Attribute::str("url.path", "/"),
            Attribute::str("url.scheme", "http"),
            Attribute::str("network.protocol.version", "1.1"),
            Attribute::str("network.transport", "tcp"),
            Attribute::str("network.type", "ipv4"),
            Attribute::str("network.peer.address", "127.0.0.1"),
            Attribute::int("network.peer.port", 40000 + (i % 16) as i64),
            Attribute::str("server.address", "127.0.0.1"),
            Attribute::int("server.port", 8080),
            Attribute::str("client.address", "127.0.0.1"),
            Attribute::int("client.port", 40000 + (i % 16) as i64),
            Attribute::str("user_agent.original", "wrk/4.1.0"),
            Attribute::int("http.request.body.size", 0),
            Attribute::int("http.response.body.size", 6),
            Attribute::int("http.response.status_code", 200),
        ],
        status: SpanStatus::Unset,
        resource: Arc::clone(resource),
    }
}

pub(super) fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

#[test]
#[ignore = "a benchmark: run it under callgrind, see the module docs"]
fn export_path() {
    let mode = var("BENCH_MODE").unwrap_or_else(|| "none".to_owned());
    let n: u64 = var("BENCH_SPANS")
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async move {
        let resource = resource();
        let spans: Vec<SpanRecord> = (0..n).map(|i| span(&resource, i)).collect();
        let target = match mode.as_str() {
            "none" => {
                drop(spans);
                return;
            }
            "console" => ExportTarget::Console,
            "grpc" | "http" => ExportTarget::Otlp {
                endpoint: var("BENCH_ENDPOINT").expect("BENCH_ENDPOINT"),
                protocol: if mode == "grpc" {
                    OtlpProtocol::Grpc
                } else {
                    OtlpProtocol::HttpProtobuf
                },
                form: EndpointForm::Base,
                options: OtlpOptions::default(),
            },
            other => panic!("unknown BENCH_MODE {other}"),
        };
        let cfg = ExportConfig {
            queue_capacity: usize::try_from(n).unwrap_or(usize::MAX).max(1),
            // Callgrind runs ~50x slower than native.
            timeout: Duration::from_secs(600),
            ..ExportConfig::new(target)
        };
        let stats = Arc::new(Stats::default());
        let handle = spawn_exporter(cfg, Arc::clone(&stats)).expect("spawn the exporter");
        // Batches of spans with pauses, as from the event thread under load.
        for (i, span) in spans.into_iter().enumerate() {
            handle.send(span);
            if i % 1000 == 999 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        let summary = handle.shutdown().await;
        assert_eq!(
            summary,
            ExportSummary {
                exported: n,
                failed: 0,
                dropped: 0
            },
            "{mode}"
        );
    });
}
