//! The agent's own span record: what a protocol produced, with kernel-derived wall-clock times,
//! explicit ids and the resource of the process it belongs to. Exporters translate it.

use std::borrow::Cow;
use std::sync::Arc;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TraceId(pub [u8; 16]);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SpanId(pub [u8; 8]);

impl TraceId {
    /// W3C trace context: an all-zero trace id means "no trace" and must never be exported.
    pub fn is_valid(self) -> bool {
        self.0 != [0; 16]
    }

    #[cfg(test)]
    pub fn to_hex(self) -> String {
        hex(&self.0)
    }
}

impl SpanId {
    /// W3C trace context: an all-zero span (or parent) id is invalid.
    pub fn is_valid(self) -> bool {
        self.0 != [0; 8]
    }

    #[cfg(test)]
    pub fn to_hex(self) -> String {
        hex(&self.0)
    }
}

#[cfg(test)]
fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpanKind {
    /// What a process received and answered.
    Server,
    /// What a process sent and got an answer to.
    Client,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SpanStatus {
    Unset,
    Error { description: String },
}

/// Text values borrow when they are constants (`"GET"`, `"tcp"`, `"ipv4"`…): a span is built
/// for every request, and allocation is a visible share of building one (see BENCHMARKS.md).
#[derive(Clone, Debug, PartialEq)]
pub enum AttrValue {
    Str(Cow<'static, str>),
    Int(i64),
    Bool(bool),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Attribute {
    pub key: &'static str,
    pub value: AttrValue,
}

impl Attribute {
    pub fn str(key: &'static str, value: impl Into<Cow<'static, str>>) -> Self {
        Self {
            key,
            value: AttrValue::Str(value.into()),
        }
    }
    pub fn int(key: &'static str, value: i64) -> Self {
        Self {
            key,
            value: AttrValue::Int(value),
        }
    }
    pub fn bool(key: &'static str, value: bool) -> Self {
        Self {
            key,
            value: AttrValue::Bool(value),
        }
    }
}

/// The OpenTelemetry resource of one traced process. Spans of two processes never share one.
#[derive(Clone, Debug, PartialEq)]
pub struct Resource {
    pub pid: u32,
    pub service_name: String,
    /// All resource attributes, service.name included.
    pub attributes: Vec<Attribute>,
}

#[derive(Clone, Debug)]
pub struct SpanRecord {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub parent_span_id: Option<SpanId>,
    /// The parent came from another process (an incoming `traceparent`).
    pub parent_is_remote: bool,
    /// W3C `tracestate` received with the parent, passed through untouched.
    pub trace_state: Option<String>,
    pub name: String,
    pub kind: SpanKind,
    pub start_unix_nanos: u64,
    pub end_unix_nanos: u64,
    pub attributes: Vec<Attribute>,
    pub status: SpanStatus,
    pub resource: Arc<Resource>,
}

impl SpanRecord {
    /// Every id is valid: trace and span ids non-zero, and a parent, if any, non-zero.
    pub fn has_valid_ids(&self) -> bool {
        self.trace_id.is_valid()
            && self.span_id.is_valid()
            && self.parent_span_id.is_none_or(SpanId::is_valid)
    }

    pub fn attr(&self, key: &str) -> Option<&AttrValue> {
        self.attributes
            .iter()
            .find(|a| a.key == key)
            .map(|a| &a.value)
    }
}
