//! Console exporter: prints each finished trace fragment as a small tree.
//!
//! ```text
//! python3[4242] SERVER GET /users/{id} 200 12.3ms trace=4bf92f35…
//!   └─ CLIENT GET api.internal:8080/v1/items 200 3.1ms
//! ```
//!
//! Client spans usually end before the server span they belong to, so spans are held per
//! trace until its local root (a span whose parent is absent or remote) has ended, plus a
//! short grace period, or at most `MAX_WAIT`. Spans whose parent never shows up print on
//! their own.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::io::{self, Write};
use std::time::{Duration, Instant};

use crate::spans::model::{AttrValue, SpanId, SpanKind, SpanRecord, SpanStatus, TraceId};

/// How long to wait for late spans (e.g. of another process) after a local root ended.
pub const ROOT_GRACE: Duration = Duration::from_millis(300);
/// The longest a span waits before its trace is printed anyway.
pub const MAX_WAIT: Duration = Duration::from_secs(2);
/// Traces held at once; past this the oldest is printed early.
const MAX_PENDING_TRACES: usize = 4096;
/// Spans held for one trace; past this the trace is printed early.
const MAX_SPANS_PER_TRACE: usize = 1024;
/// Longest error description printed.
const MAX_ERROR_CHARS: usize = 120;

struct Pending {
    spans: Vec<SpanRecord>,
    first_seen: Instant,
    root_ended: Option<Instant>,
}

impl Pending {
    fn is_ready(&self, now: Instant) -> bool {
        self.spans.len() >= MAX_SPANS_PER_TRACE
            || self.root_ended.is_some_and(|t| now >= t + ROOT_GRACE)
            || now >= self.first_seen + MAX_WAIT
    }
}

/// Groups spans per trace and decides when a fragment is complete enough to print.
#[derive(Default)]
pub struct TraceBuffer {
    pending: HashMap<TraceId, Pending>,
}

impl TraceBuffer {
    /// Adds a finished span. Returns a fragment that had to be printed early to bound memory.
    pub fn add(&mut self, span: SpanRecord, now: Instant) -> Option<Vec<SpanRecord>> {
        let mut evicted = None;
        if !self.pending.contains_key(&span.trace_id) && self.pending.len() >= MAX_PENDING_TRACES {
            let oldest = self
                .pending
                .iter()
                .min_by_key(|(_, p)| p.first_seen)
                .map(|(id, _)| *id);
            evicted = oldest
                .and_then(|id| self.pending.remove(&id))
                .map(|p| p.spans);
        }
        let is_local_root = span.parent_span_id.is_none() || span.parent_is_remote;
        let entry = self
            .pending
            .entry(span.trace_id)
            .or_insert_with(|| Pending {
                spans: Vec::new(),
                first_seen: now,
                root_ended: None,
            });
        if is_local_root {
            entry.root_ended = Some(now);
        }
        entry.spans.push(span);
        evicted
    }

    /// Fragments ready to print at `now`, oldest first.
    pub fn take_ready(&mut self, now: Instant) -> Vec<Vec<SpanRecord>> {
        let mut ready: Vec<(Instant, TraceId)> = self
            .pending
            .iter()
            .filter(|(_, p)| p.is_ready(now))
            .map(|(id, p)| (p.first_seen, *id))
            .collect();
        ready.sort_by_key(|(t, _)| *t);
        ready
            .into_iter()
            .filter_map(|(_, id)| self.pending.remove(&id))
            .map(|p| p.spans)
            .collect()
    }

    /// Everything held, for shutdown.
    pub fn take_all(&mut self) -> Vec<Vec<SpanRecord>> {
        let mut all: Vec<Pending> = self.pending.drain().map(|(_, p)| p).collect();
        all.sort_by_key(|p| p.first_seen);
        all.into_iter().map(|p| p.spans).collect()
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.pending.len()
    }
}

/// Prints fragments to a writer (stdout in production).
pub struct ConsoleSink {
    buffer: TraceBuffer,
    out: Box<dyn Write + Send>,
}

impl ConsoleSink {
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        Self {
            buffer: TraceBuffer::default(),
            out,
        }
    }

    pub fn buffer(&mut self) -> &mut TraceBuffer {
        &mut self.buffer
    }

    /// Writes the fragments; returns how many spans were written.
    pub fn print(&mut self, fragments: Vec<Vec<SpanRecord>>) -> (usize, io::Result<()>) {
        let mut text = String::new();
        let mut spans = 0;
        for fragment in &fragments {
            spans += fragment.len();
            text.push_str(&render_fragment(fragment));
        }
        if text.is_empty() {
            return (0, Ok(()));
        }
        let result = self
            .out
            .write_all(text.as_bytes())
            .and_then(|()| self.out.flush());
        (spans, result)
    }
}

/// Renders the spans of one trace fragment as a tree, one line per span. Children (spans whose
/// `parent_span_id` is another span of the fragment) are indented under their parent; spans
/// whose parent is not in the fragment are top-level lines and carry the trace id.
pub fn render_fragment(spans: &[SpanRecord]) -> String {
    let index: HashMap<SpanId, usize> = spans
        .iter()
        .enumerate()
        .map(|(i, s)| (s.span_id, i))
        .collect();
    let mut children: HashMap<usize, Vec<usize>> = HashMap::new();
    let mut roots = Vec::new();
    for (i, span) in spans.iter().enumerate() {
        match span
            .parent_span_id
            .and_then(|p| index.get(&p))
            .copied()
            .filter(|&p| p != i)
        {
            Some(parent) => children.entry(parent).or_default().push(i),
            None => roots.push(i),
        }
    }
    let by_start =
        |a: &usize, b: &usize| spans[*a].start_unix_nanos.cmp(&spans[*b].start_unix_nanos);
    roots.sort_by(by_start);
    for list in children.values_mut() {
        list.sort_by(by_start);
    }

    let mut out = String::new();
    let mut seen = HashSet::new();
    for &root in &roots {
        render_node(spans, &children, root, None, "", &mut seen, &mut out);
    }
    // Spans caught in a parent cycle (bad input) were never reached from a root.
    for i in 0..spans.len() {
        if !seen.contains(&i) {
            render_node(spans, &children, i, None, "", &mut seen, &mut out);
        }
    }
    out
}

/// `parent`: the parent's index and whether this node is its last child.
fn render_node(
    spans: &[SpanRecord],
    children: &HashMap<usize, Vec<usize>>,
    i: usize,
    parent: Option<(usize, bool)>,
    prefix: &str,
    seen: &mut HashSet<usize>,
    out: &mut String,
) {
    if !seen.insert(i) {
        return;
    }
    let span = &spans[i];
    let child_prefix = match parent {
        None => {
            out.push_str(&span_line(span, true, true));
            "  ".to_owned()
        }
        Some((p, last)) => {
            out.push_str(prefix);
            out.push_str(if last { "└─ " } else { "├─ " });
            // Same process as the parent: the service is implied.
            let show_service = spans[p].resource.pid != span.resource.pid;
            out.push_str(&span_line(span, show_service, false));
            format!("{prefix}{}", if last { "   " } else { "│  " })
        }
    };
    out.push('\n');
    let kids = children.get(&i).map(Vec::as_slice).unwrap_or_default();
    for (n, &kid) in kids.iter().enumerate() {
        render_node(
            spans,
            children,
            kid,
            Some((i, n + 1 == kids.len())),
            &child_prefix,
            seen,
            out,
        );
    }
}

fn error_marker(span: &SpanRecord) -> String {
    match &span.status {
        SpanStatus::Unset => String::new(),
        SpanStatus::Error { description } if description.is_empty() => " ERROR".to_owned(),
        SpanStatus::Error { description } => {
            let mut d: String = description.chars().take(MAX_ERROR_CHARS).collect();
            if description.chars().count() > MAX_ERROR_CHARS {
                d.push('…');
            }
            format!(" ERROR: {d}")
        }
    }
}

fn attr_text(span: &SpanRecord, key: &str) -> Option<String> {
    match span.attr(key)? {
        AttrValue::Str(s) if s.is_empty() => None,
        AttrValue::Str(s) => Some(s.clone()),
        AttrValue::Int(i) => Some(i.to_string()),
        AttrValue::Bool(b) => Some(b.to_string()),
    }
}

/// What the span did: `GET /users/{id}` for HTTP, else the span name.
fn describe(span: &SpanRecord) -> String {
    let Some(method) = attr_text(span, "http.request.method") else {
        return span.name.clone();
    };
    let target = match span.kind {
        SpanKind::Server => attr_text(span, "http.route").or_else(|| attr_text(span, "url.path")),
        SpanKind::Client => {
            let path = attr_text(span, "url.path").unwrap_or_default();
            match (
                attr_text(span, "server.address"),
                attr_text(span, "server.port"),
            ) {
                (Some(host), Some(port)) => Some(format!("{host}:{port}{path}")),
                (Some(host), None) => Some(format!("{host}{path}")),
                _ => attr_text(span, "url.full").or(Some(path).filter(|p| !p.is_empty())),
            }
        }
    };
    match target {
        Some(t) => format!("{method} {t}"),
        None => method,
    }
}

/// One span's line, without indentation or newline: `[service[pid] ]KIND what status 1.2ms`,
/// then ` trace=0123abcd…` on top-level lines, then ` ERROR[: description]` for failed spans.
fn span_line(span: &SpanRecord, with_service: bool, with_trace: bool) -> String {
    let mut line = String::new();
    if with_service {
        let _ = write!(
            line,
            "{}[{}] ",
            span.resource.service_name, span.resource.pid
        );
    }
    let kind = match span.kind {
        SpanKind::Server => "SERVER",
        SpanKind::Client => "CLIENT",
    };
    let status = attr_text(span, "http.response.status_code").unwrap_or_else(|| "-".to_owned());
    let nanos = span.end_unix_nanos.saturating_sub(span.start_unix_nanos);
    let _ = write!(
        line,
        "{kind} {} {status} {:.1}ms",
        describe(span),
        nanos as f64 / 1e6
    );
    if with_trace {
        let trace = span.trace_id.to_hex();
        let _ = write!(line, " trace={}…", trace.get(..8).unwrap_or(&trace));
    }
    line.push_str(&error_marker(span));
    line
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::export::convert::tests::{resource, server_span};
    use crate::spans::model::{Attribute, Resource};

    fn client_of(server: &SpanRecord, id: u8, start_ms: u64, dur_us: u64) -> SpanRecord {
        SpanRecord {
            span_id: SpanId([0xc0, 0, 0, 0, 0, 0, 0, id]),
            parent_span_id: Some(server.span_id),
            parent_is_remote: false,
            trace_state: None,
            name: "GET".to_owned(),
            kind: SpanKind::Client,
            start_unix_nanos: server.start_unix_nanos + start_ms * 1_000_000,
            end_unix_nanos: server.start_unix_nanos + start_ms * 1_000_000 + dur_us * 1_000,
            attributes: vec![
                Attribute::str("http.request.method", "GET"),
                Attribute::str("server.address", "api.internal"),
                Attribute::int("server.port", 8080),
                Attribute::str("url.path", format!("/v1/items/{id}")),
                Attribute::int("http.response.status_code", 200),
            ],
            ..server.clone()
        }
    }

    #[test]
    fn renders_server_with_client_children() {
        let r = resource(4242, "python3");
        let server = server_span(&r);
        let c2 = client_of(&server, 2, 6, 2_000);
        let c1 = client_of(&server, 1, 1, 3_100);
        // Clients arrive first (they ended first); order of input must not matter.
        let text = render_fragment(&[c2, c1, server]);
        assert_eq!(
            text,
            "python3[4242] SERVER GET /users/{id} 200 12.3ms trace=4bf92f35…\n\
             \x20 ├─ CLIENT GET api.internal:8080/v1/items/1 200 3.1ms\n\
             \x20 └─ CLIENT GET api.internal:8080/v1/items/2 200 2.0ms\n"
        );
    }

    #[test]
    fn renders_orphans_on_their_own_and_other_processes_nested() {
        let a = resource(4242, "python3");
        let b = Arc::new(Resource {
            pid: 7,
            service_name: "items".to_owned(),
            ..(*resource(7, "items")).clone()
        });
        let server = server_span(&a);
        let client = client_of(&server, 1, 1, 3_100);
        // Process B's server span: child of A's client span (a remote parent).
        let mut remote_server = server_span(&b);
        remote_server.span_id = SpanId([0xbb; 8]);
        remote_server.parent_span_id = Some(client.span_id);
        remote_server.start_unix_nanos = client.start_unix_nanos + 100_000;
        remote_server.end_unix_nanos = client.end_unix_nanos - 100_000;
        remote_server.attributes.retain(|a| a.key != "http.route");
        // An orphan: its parent is not in the fragment.
        let mut orphan = client_of(&server, 9, 20, 500);
        orphan.parent_span_id = Some(SpanId([0xee; 8]));

        let text = render_fragment(&[orphan, remote_server, client, server]);
        assert_eq!(
            text,
            "python3[4242] SERVER GET /users/{id} 200 12.3ms trace=4bf92f35…\n\
             \x20 └─ CLIENT GET api.internal:8080/v1/items/1 200 3.1ms\n\
             \x20    └─ items[7] SERVER GET /users/42 200 2.9ms\n\
             python3[4242] CLIENT GET api.internal:8080/v1/items/9 200 0.5ms trace=4bf92f35…\n"
        );
    }

    #[test]
    fn marks_errors() {
        let r = resource(1, "svc");
        let mut server = server_span(&r);
        server.status = SpanStatus::Error {
            description: String::new(),
        };
        let mut client = client_of(&server, 1, 1, 1_000);
        client.status = SpanStatus::Error {
            description: "connection refused".to_owned(),
        };
        client
            .attributes
            .retain(|a| a.key != "http.response.status_code");
        let text = render_fragment(&[server, client]);
        assert_eq!(
            text,
            "svc[1] SERVER GET /users/{id} 200 12.3ms trace=4bf92f35… ERROR\n\
             \x20 └─ CLIENT GET api.internal:8080/v1/items/1 - 1.0ms ERROR: connection refused\n"
        );
    }

    #[test]
    fn non_http_spans_use_their_name() {
        let r = resource(1, "svc");
        let mut span = server_span(&r);
        span.attributes.clear();
        span.name = "SELECT users".to_owned();
        assert_eq!(
            render_fragment(&[span]),
            "svc[1] SERVER SELECT users - 12.3ms trace=4bf92f35…\n"
        );
    }

    #[test]
    fn buffer_waits_for_local_root_then_grace() {
        let r = resource(1, "svc");
        let server = server_span(&r);
        let client = client_of(&server, 1, 1, 1_000);
        let t0 = Instant::now();
        let mut buf = TraceBuffer::default();
        assert!(buf.add(client, t0).is_none());
        assert!(
            buf.take_ready(t0 + Duration::from_millis(500)).is_empty(),
            "client alone waits for its root"
        );
        buf.add(server, t0 + Duration::from_millis(600));
        assert!(
            buf.take_ready(t0 + Duration::from_millis(800)).is_empty(),
            "grace period"
        );
        let ready = buf.take_ready(t0 + Duration::from_millis(950));
        assert_eq!(ready.len(), 1);
        assert_eq!(ready[0].len(), 2);
        assert_eq!(buf.len(), 0);
    }

    #[test]
    fn buffer_gives_up_waiting_after_max_wait() {
        let r = resource(1, "svc");
        let client = client_of(&server_span(&r), 1, 1, 1_000);
        let t0 = Instant::now();
        let mut buf = TraceBuffer::default();
        buf.add(client, t0);
        assert!(
            buf.take_ready(t0 + MAX_WAIT - Duration::from_millis(1))
                .is_empty()
        );
        assert_eq!(buf.take_ready(t0 + MAX_WAIT).len(), 1);
    }
}
