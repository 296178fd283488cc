//! `SpanRecord` → OpenTelemetry SDK `SpanData`, and our `Resource` → SDK `Resource`.
//!
//! We do not use the SDK tracer: our spans carry kernel timestamps, explicit ids and remote
//! parents, so they are converted field by field and handed straight to an OTLP exporter.

use std::borrow::Cow;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry::trace::{self as otel, TraceFlags, TraceState};
use opentelemetry::{InstrumentationScope, Key, KeyValue, Value};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks};

use crate::process::DISTRO_NAME;
use crate::spans::model::{AttrValue, Attribute, Resource, SpanKind, SpanRecord, SpanStatus};

/// The instrumentation scope of every span we export.
pub fn scope() -> &'static InstrumentationScope {
    static SCOPE: OnceLock<InstrumentationScope> = OnceLock::new();
    SCOPE.get_or_init(|| {
        InstrumentationScope::builder(DISTRO_NAME)
            .with_version(env!("CARGO_PKG_VERSION"))
            .build()
    })
}

pub fn key_value(attr: &Attribute) -> KeyValue {
    let value = match &attr.value {
        AttrValue::Str(s) => Value::from(s.clone()),
        AttrValue::Int(i) => Value::I64(*i),
        AttrValue::Bool(b) => Value::Bool(*b),
    };
    KeyValue::new(Key::from_static_str(attr.key), value)
}

pub fn sdk_resource(resource: &Resource) -> opentelemetry_sdk::Resource {
    opentelemetry_sdk::Resource::builder_empty()
        .with_attributes(resource.attributes.iter().map(key_value))
        .build()
}

fn unix_nanos(nanos: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(nanos)
}

pub fn span_data(span: &SpanRecord) -> SpanData {
    // A `tracestate` we cannot parse is dropped rather than forwarded half-understood.
    let trace_state = span
        .trace_state
        .as_deref()
        .and_then(|s| s.parse::<TraceState>().ok())
        .unwrap_or_default();
    let span_context = otel::SpanContext::new(
        otel::TraceId::from_bytes(span.trace_id.0),
        otel::SpanId::from_bytes(span.span_id.0),
        TraceFlags::SAMPLED,
        false,
        trace_state,
    );
    let parent = span.parent_span_id.map(|p| otel::SpanId::from_bytes(p.0));
    SpanData {
        span_context,
        parent_span_id: parent.unwrap_or(otel::SpanId::INVALID),
        parent_span_is_remote: parent.is_some() && span.parent_is_remote,
        span_kind: match span.kind {
            SpanKind::Server => otel::SpanKind::Server,
            SpanKind::Client => otel::SpanKind::Client,
        },
        name: Cow::Owned(span.name.clone()),
        start_time: unix_nanos(span.start_unix_nanos),
        // A clock step must not produce a negative duration.
        end_time: unix_nanos(span.end_unix_nanos.max(span.start_unix_nanos)),
        attributes: span.attributes.iter().map(key_value).collect(),
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status: match &span.status {
            SpanStatus::Unset => otel::Status::Unset,
            SpanStatus::Error { description } => otel::Status::error(description.clone()),
        },
        instrumentation_scope: scope().clone(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::spans::model::{SpanId, TraceId};

    pub(crate) fn resource(pid: u32, service: &str) -> Arc<Resource> {
        Arc::new(Resource {
            pid,
            service_name: service.to_owned(),
            attributes: vec![
                Attribute::str("service.name", service),
                Attribute::int("process.pid", i64::from(pid)),
                Attribute::str("host.name", "testhost"),
            ],
        })
    }

    pub(crate) fn server_span(resource: &Arc<Resource>) -> SpanRecord {
        SpanRecord {
            trace_id: TraceId([
                0x4b, 0xf9, 0x2f, 0x35, 0x77, 0xb3, 0x4d, 0xa6, 0xa3, 0xce, 0x92, 0x9d, 0x0e, 0x0e,
                0x47, 0x36,
            ]),
            span_id: SpanId([0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]),
            parent_span_id: Some(SpanId([1, 2, 3, 4, 5, 6, 7, 8])),
            parent_is_remote: true,
            trace_state: Some("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7".to_owned()),
            name: "GET /users/{id}".to_owned(),
            kind: SpanKind::Server,
            start_unix_nanos: 1_700_000_000_123_456_789,
            end_unix_nanos: 1_700_000_000_135_756_789,
            attributes: vec![
                Attribute::str("http.request.method", "GET"),
                Attribute::str("http.route", "/users/{id}"),
                Attribute::str("url.path", "/users/42"),
                Attribute::int("http.response.status_code", 200),
                Attribute::bool("test.flag", true),
            ],
            status: SpanStatus::Unset,
            resource: Arc::clone(resource),
        }
    }

    #[test]
    fn converts_ids_times_parent_and_trace_state() {
        let span = server_span(&resource(4242, "python3"));
        let data = span_data(&span);
        assert_eq!(
            data.span_context.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(data.span_context.span_id().to_string(), "00f067aa0ba902b7");
        assert!(data.span_context.is_sampled());
        assert!(!data.span_context.is_remote());
        assert_eq!(
            data.span_context.trace_state().header(),
            "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
        );
        assert_eq!(data.parent_span_id.to_string(), "0102030405060708");
        assert!(data.parent_span_is_remote);
        assert_eq!(data.span_kind, otel::SpanKind::Server);
        assert_eq!(data.name, "GET /users/{id}");
        assert_eq!(
            data.start_time
                .duration_since(UNIX_EPOCH)
                .ok()
                .map(|d| d.as_nanos()),
            Some(1_700_000_000_123_456_789)
        );
        assert_eq!(
            data.end_time.duration_since(data.start_time).ok(),
            Some(Duration::from_nanos(12_300_000))
        );
        assert_eq!(data.status, otel::Status::Unset);
        assert_eq!(data.instrumentation_scope.name(), "ebpf-agent");
        assert_eq!(
            data.instrumentation_scope.version(),
            Some(env!("CARGO_PKG_VERSION"))
        );
    }

    #[test]
    fn converts_attributes_and_status() {
        let mut span = server_span(&resource(1, "svc"));
        span.status = SpanStatus::Error {
            description: "connection reset".to_owned(),
        };
        let data = span_data(&span);
        let get = |k: &str| {
            data.attributes
                .iter()
                .find(|kv| kv.key.as_str() == k)
                .map(|kv| kv.value.clone())
        };
        assert_eq!(get("http.request.method"), Some(Value::from("GET")));
        assert_eq!(get("http.response.status_code"), Some(Value::I64(200)));
        assert_eq!(get("test.flag"), Some(Value::Bool(true)));
        assert_eq!(data.attributes.len(), 5);
        assert_eq!(data.status, otel::Status::error("connection reset"));
    }

    #[test]
    fn root_span_has_no_parent_and_bad_trace_state_is_dropped() {
        let mut span = server_span(&resource(1, "svc"));
        span.parent_span_id = None;
        span.parent_is_remote = true; // inconsistent input: no parent means nothing remote
        span.trace_state = Some("not a tracestate,,=".to_owned());
        span.end_unix_nanos = span.start_unix_nanos - 5; // clock went backwards
        let data = span_data(&span);
        assert_eq!(data.parent_span_id, otel::SpanId::INVALID);
        assert!(!data.parent_span_is_remote);
        assert_eq!(data.span_context.trace_state().header(), "");
        assert_eq!(data.end_time, data.start_time);
    }

    #[test]
    fn converts_resource() {
        let r = sdk_resource(&resource(4242, "python3"));
        assert_eq!(
            r.get(&Key::from_static_str("service.name")),
            Some(Value::from("python3"))
        );
        assert_eq!(
            r.get(&Key::from_static_str("process.pid")),
            Some(Value::I64(4242))
        );
        assert_eq!(
            r.get(&Key::from_static_str("host.name")),
            Some(Value::from("testhost"))
        );
        assert_eq!(r.len(), 3);
    }
}
