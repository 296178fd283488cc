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

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::io::{self, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::worker::{Sink, Tally};
use crate::spans::model::{AttrValue, SpanId, SpanKind, SpanRecord, SpanStatus, TraceId};
use crate::stats::Stats;

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
/// The text buffer kept between prints is trimmed back to this.
const MAX_KEPT_TEXT: usize = 1024 * 1024;

struct Pending {
    spans: Vec<SpanRecord>,
    /// Arrival order of the trace (strictly increasing; `first_seen` order).
    seq: u64,
    first_seen: Instant,
    root_ended: Option<Instant>,
}

/// Groups spans per trace and decides when a fragment is complete enough to print.
///
/// Every operation is O(1) amortised per span (plus sorting what is printed together): besides
/// the map of pending traces, queues in time order say which trace is the oldest (`arrivals`)
/// and whose grace period ends next (`roots`). Entries of traces already taken are skipped
/// when they reach the front (their `seq` no longer matches).
#[derive(Default)]
pub struct TraceBuffer {
    pending: HashMap<TraceId, Pending, TraceIdHash>,
    /// (seq, trace) in arrival order.
    arrivals: VecDeque<(u64, TraceId)>,
    /// (when a local root ended, seq, trace) in order of ending.
    roots: VecDeque<(Instant, u64, TraceId)>,
    /// Traces that reached `MAX_SPANS_PER_TRACE`.
    full: Vec<(u64, TraceId)>,
    next_seq: u64,
}

impl TraceBuffer {
    /// Adds a finished span. Returns a fragment that had to be printed early to bound memory.
    pub fn add(&mut self, span: SpanRecord, now: Instant) -> Option<Vec<SpanRecord>> {
        let mut evicted = None;
        let trace_id = span.trace_id;
        let is_local_root = span.parent_span_id.is_none() || span.parent_is_remote;
        if self.pending.len() >= MAX_PENDING_TRACES && !self.pending.contains_key(&trace_id) {
            if is_local_root {
                // Full (thousands of traces a second): a root none of whose spans waits is
                // printed now rather than pushing an older trace out before its grace period,
                // which also spares the map an insert and a removal per span under load.
                return Some(vec![span]);
            }
            evicted = self.evict_oldest();
        }
        let entry = match self.pending.entry(trace_id) {
            Entry::Occupied(o) => o.into_mut(),
            Entry::Vacant(v) => {
                let seq = self.next_seq;
                self.next_seq += 1;
                self.arrivals.push_back((seq, trace_id));
                v.insert(Pending {
                    // Most traces here are a single span.
                    spans: Vec::with_capacity(1),
                    seq,
                    first_seen: now,
                    root_ended: None,
                })
            }
        };
        if is_local_root {
            entry.root_ended = Some(now);
            self.roots.push_back((now, entry.seq, trace_id));
        }
        entry.spans.push(span);
        if entry.spans.len() == MAX_SPANS_PER_TRACE {
            self.full.push((entry.seq, trace_id));
        }
        evicted
    }

    fn evict_oldest(&mut self) -> Option<Vec<SpanRecord>> {
        while let Some((seq, id)) = self.arrivals.pop_front() {
            if let Entry::Occupied(o) = self.pending.entry(id)
                && o.get().seq == seq
            {
                return Some(o.remove().spans);
            }
        }
        None
    }

    /// Fragments ready to print at `now`, oldest first.
    pub fn take_ready(&mut self, now: Instant) -> Vec<Vec<SpanRecord>> {
        let mut ready: Vec<(u64, TraceId)> = std::mem::take(&mut self.full);
        while let Some(&(ended, seq, id)) = self.roots.front() {
            if now < ended + ROOT_GRACE {
                break;
            }
            self.roots.pop_front();
            // A later local root of the same trace restarted its grace period.
            if self
                .pending
                .get(&id)
                .is_some_and(|p| p.seq == seq && p.root_ended == Some(ended))
            {
                ready.push((seq, id));
            }
        }
        while let Some(&(seq, id)) = self.arrivals.front() {
            match self.pending.get(&id) {
                Some(p) if p.seq == seq => {
                    if now < p.first_seen + MAX_WAIT {
                        break;
                    }
                    ready.push((seq, id));
                }
                _ => {} // taken already
            }
            self.arrivals.pop_front();
        }
        // Entries of taken traces wait behind a live one; keep them from piling up.
        if self.arrivals.len() > 2 * self.pending.len() + 1024 {
            let pending = &self.pending;
            self.arrivals
                .retain(|(seq, id)| pending.get(id).is_some_and(|p| p.seq == *seq));
        }
        ready.sort_unstable_by_key(|(seq, _)| *seq);
        ready.dedup_by_key(|(seq, _)| *seq);
        let mut fragments = Vec::with_capacity(ready.len());
        for (seq, id) in ready {
            if let Entry::Occupied(o) = self.pending.entry(id)
                && o.get().seq == seq
            {
                fragments.push(o.remove().spans);
            }
        }
        fragments
    }

    /// Everything held, for shutdown.
    pub fn take_all(&mut self) -> Vec<Vec<SpanRecord>> {
        let mut all: Vec<Pending> = self.pending.drain().map(|(_, p)| p).collect();
        self.arrivals.clear();
        self.roots.clear();
        self.full.clear();
        all.sort_unstable_by_key(|p| p.seq);
        all.into_iter().map(|p| p.spans).collect()
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.pending.len()
    }
}

/// Prints fragments to a writer (stdout in production); their spans count as exported, or as
/// failed when the write fails.
pub struct ConsoleSink {
    buffer: TraceBuffer,
    out: Box<dyn Write + Send>,
    /// Fragments to print at the next `print`.
    ready: Vec<Vec<SpanRecord>>,
    /// Reused between prints.
    text: String,
    /// A write failed (reported once).
    write_failed: bool,
    stats: Arc<Stats>,
    tally: Arc<Tally>,
}

impl Sink for ConsoleSink {
    async fn take(&mut self, spans: &mut Vec<SpanRecord>, now: Instant) {
        for span in spans.drain(..) {
            if let Some(evicted) = self.buffer.add(span, now) {
                self.ready.push(evicted);
            }
        }
        // Fragments printed early to bound memory, if any.
        self.print();
    }

    async fn tick(&mut self, now: Instant) {
        let ready = self.buffer.take_ready(now);
        self.ready.extend(ready);
        self.print();
    }

    async fn finish(&mut self) {
        let all = self.buffer.take_all();
        self.ready.extend(all);
        self.print();
    }
}

impl ConsoleSink {
    pub fn new(out: Box<dyn Write + Send>, stats: Arc<Stats>, tally: Arc<Tally>) -> Self {
        Self {
            buffer: TraceBuffer::default(),
            out,
            ready: Vec::new(),
            text: String::new(),
            write_failed: false,
            stats,
            tally,
        }
    }

    /// Prints the fragments taken since the last call and counts their spans.
    fn print(&mut self) {
        let (spans, result) = self.write_ready();
        match result {
            Ok(()) => self.tally.exported(&self.stats, spans as u64),
            Err(e) => {
                self.tally.failed(&self.stats, spans as u64, 1);
                if !self.write_failed {
                    self.write_failed = true;
                    log::error!("cannot print spans to stdout: {e}; spans are counted as failed");
                }
            }
        }
    }

    /// Writes the fragments taken since the last call, with one write; returns how many spans
    /// were written.
    fn write_ready(&mut self) -> (usize, io::Result<()>) {
        if self.ready.is_empty() {
            return (0, Ok(()));
        }
        self.text.clear();
        let mut spans = 0;
        for fragment in self.ready.drain(..) {
            spans += fragment.len();
            render_fragment_into(&fragment, &mut self.text);
        }
        let result = self
            .out
            .write_all(self.text.as_bytes())
            .and_then(|()| self.out.flush());
        if self.text.capacity() > MAX_KEPT_TEXT {
            self.text = String::new();
        }
        (spans, result)
    }
}

/// Renders the spans of one trace fragment as a tree, one line per span. Children (spans whose
/// `parent_span_id` is another span of the fragment) are indented under their parent; spans
/// whose parent is not in the fragment are top-level lines and carry the trace id.
#[cfg(test)]
pub fn render_fragment(spans: &[SpanRecord]) -> String {
    let mut out = String::new();
    render_fragment_into(spans, &mut out);
    out
}

fn render_fragment_into(spans: &[SpanRecord], out: &mut String) {
    if let [span] = spans {
        // The common case: a trace of one span.
        span_line(out, span, true, true);
        out.push('\n');
        return;
    }
    let tree = Tree::new(spans);
    let mut seen = vec![false; spans.len()];
    for &i in &tree.by_start {
        if tree.parent[i].is_none() {
            render_node(spans, &tree, i, None, "", &mut seen, out);
        }
    }
    // Spans caught in a parent cycle (bad input) were never reached from a root.
    for i in 0..spans.len() {
        if !seen[i] {
            render_node(spans, &tree, i, None, "", &mut seen, out);
        }
    }
}

/// Parent/child links within one fragment.
struct Tree {
    /// The parent of each span, when it is another span of the fragment.
    parent: Vec<Option<usize>>,
    /// Span indexes by start time (ties: in input order).
    by_start: Vec<usize>,
    /// The children of span `i`, by start time: `kids[offsets[i]..offsets[i + 1]]`.
    kids: Vec<usize>,
    offsets: Vec<usize>,
}

impl Tree {
    /// Fragments up to this size find parents by a linear scan rather than a hash map.
    const SMALL: usize = 16;

    fn new(spans: &[SpanRecord]) -> Self {
        let n = spans.len();
        // When span ids repeat (bad input), the last span with the id is the parent.
        let parent: Vec<Option<usize>> = if n <= Self::SMALL {
            let find = |id: SpanId| (0..n).rev().find(|&j| spans[j].span_id == id);
            (spans.iter().enumerate())
                .map(|(i, s)| s.parent_span_id.and_then(find).filter(|&p| p != i))
                .collect()
        } else {
            let index: HashMap<SpanId, usize> = (spans.iter().enumerate())
                .map(|(i, s)| (s.span_id, i))
                .collect();
            (spans.iter().enumerate())
                .map(|(i, s)| {
                    (s.parent_span_id)
                        .and_then(|p| index.get(&p).copied())
                        .filter(|&p| p != i)
                })
                .collect()
        };
        let mut by_start: Vec<usize> = (0..n).collect();
        by_start.sort_by_key(|&i| spans[i].start_unix_nanos);
        let mut offsets = vec![0usize; n + 1];
        for &p in parent.iter().flatten() {
            offsets[p + 1] += 1;
        }
        for i in 0..n {
            offsets[i + 1] += offsets[i];
        }
        let mut next = offsets.clone();
        let mut kids = vec![0; offsets[n]];
        for &child in &by_start {
            if let Some(p) = parent[child] {
                kids[next[p]] = child;
                next[p] += 1;
            }
        }
        Self {
            parent,
            by_start,
            kids,
            offsets,
        }
    }

    fn children(&self, i: usize) -> &[usize] {
        &self.kids[self.offsets[i]..self.offsets[i + 1]]
    }
}

/// `parent`: the parent's index and whether this node is its last child.
fn render_node(
    spans: &[SpanRecord],
    tree: &Tree,
    i: usize,
    parent: Option<(usize, bool)>,
    prefix: &str,
    seen: &mut [bool],
    out: &mut String,
) {
    if std::mem::replace(&mut seen[i], true) {
        return;
    }
    let span = &spans[i];
    let child_prefix = match parent {
        None => {
            span_line(out, span, true, true);
            "  "
        }
        Some((p, last)) => {
            out.push_str(prefix);
            out.push_str(if last { "└─ " } else { "├─ " });
            // Same process as the parent: the service is implied.
            let show_service = spans[p].resource.pid != span.resource.pid;
            span_line(out, span, show_service, false);
            if last { "   " } else { "│  " }
        }
    };
    out.push('\n');
    let kids = tree.children(i);
    if kids.is_empty() {
        return;
    }
    let child_prefix = format!("{prefix}{child_prefix}");
    for (n, &kid) in kids.iter().enumerate() {
        render_node(
            spans,
            tree,
            kid,
            Some((i, n + 1 == kids.len())),
            &child_prefix,
            seen,
            out,
        );
    }
}

fn write_error_marker(out: &mut String, span: &SpanRecord) {
    match &span.status {
        SpanStatus::Unset => {}
        SpanStatus::Error { description } if description.is_empty() => out.push_str(" ERROR"),
        SpanStatus::Error { description } => {
            out.push_str(" ERROR: ");
            let mut chars = description.chars();
            out.extend(chars.by_ref().take(MAX_ERROR_CHARS));
            if chars.next().is_some() {
                out.push('…');
            }
        }
    }
}

/// An attribute's value as printed (borrowed: nothing is allocated).
enum AttrText<'a> {
    Str(&'a str),
    Int(i64),
    Bool(bool),
}

impl AttrText<'_> {
    fn push_to(&self, out: &mut String) {
        match self {
            AttrText::Str(s) => out.push_str(s),
            AttrText::Int(i) => push_int(out, *i),
            AttrText::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        }
    }
}

/// `write!(out, "{n}")` without the formatting machinery.
fn push_uint(out: &mut String, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend(digits[i..].iter().map(|&d| char::from(d)));
}

fn push_int(out: &mut String, n: i64) {
    if n < 0 {
        out.push('-');
    }
    push_uint(out, n.unsigned_abs());
}

/// `write!(out, "{:.1}", nanos as f64 / 1e6)`: milliseconds with one decimal. Done in integers
/// unless the float's rounding could differ (an exact tie, or a value so large that the
/// division's rounding error could cross a tie).
fn push_millis(out: &mut String, nanos: u64) {
    let (tenths, rest) = (nanos / 100_000, nanos % 100_000);
    if nanos >= 1_000_000_000_000_000 || rest == 50_000 {
        let _ = write!(out, "{:.1}", nanos as f64 / 1e6);
        return;
    }
    let tenths = tenths + u64::from(rest > 50_000);
    push_uint(out, tenths / 10);
    out.push('.');
    out.push(char::from(b'0' + (tenths % 10) as u8));
}

/// The attribute's value; `None` when absent or an empty string.
fn attr_text<'a>(span: &'a SpanRecord, key: &str) -> Option<AttrText<'a>> {
    match span.attr(key)? {
        AttrValue::Str(s) if s.is_empty() => None,
        AttrValue::Str(s) => Some(AttrText::Str(s)),
        AttrValue::Int(i) => Some(AttrText::Int(*i)),
        AttrValue::Bool(b) => Some(AttrText::Bool(*b)),
    }
}

/// What the span did: `GET /users/{id}` for HTTP, else the span name.
fn write_description(out: &mut String, span: &SpanRecord) {
    let Some(method) = attr_text(span, "http.request.method") else {
        out.push_str(&span.name);
        return;
    };
    method.push_to(out);
    match span.kind {
        SpanKind::Server => {
            if let Some(target) =
                attr_text(span, "http.route").or_else(|| attr_text(span, "url.path"))
            {
                out.push(' ');
                target.push_to(out);
            }
        }
        SpanKind::Client => {
            let path = attr_text(span, "url.path");
            match attr_text(span, "server.address") {
                Some(host) => {
                    out.push(' ');
                    host.push_to(out);
                    if let Some(port) = attr_text(span, "server.port") {
                        out.push(':');
                        port.push_to(out);
                    }
                    if let Some(path) = path {
                        path.push_to(out);
                    }
                }
                None => {
                    if let Some(target) = attr_text(span, "url.full").or(path) {
                        out.push(' ');
                        target.push_to(out);
                    }
                }
            }
        }
    }
}

/// One span's line, without indentation or newline: `[service[pid] ]KIND what status 1.2ms`,
/// then ` trace=0123abcd…` on top-level lines, then ` ERROR[: description]` for failed spans.
fn span_line(out: &mut String, span: &SpanRecord, with_service: bool, with_trace: bool) {
    if with_service {
        out.push_str(&span.resource.service_name);
        out.push('[');
        push_uint(out, u64::from(span.resource.pid));
        out.push_str("] ");
    }
    out.push_str(match span.kind {
        SpanKind::Server => "SERVER ",
        SpanKind::Client => "CLIENT ",
    });
    write_description(out, span);
    match attr_text(span, "http.response.status_code") {
        Some(status) => {
            out.push(' ');
            status.push_to(out);
        }
        None => out.push_str(" -"),
    }
    out.push(' ');
    push_millis(
        out,
        span.end_unix_nanos.saturating_sub(span.start_unix_nanos),
    );
    out.push_str("ms");
    if with_trace {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        out.push_str(" trace=");
        for b in &span.trace_id.0[..4] {
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        }
        out.push('…');
    }
    write_error_marker(out, span);
}

/// A keyed hash for trace ids (which can come from incoming `traceparent` headers, so are
/// not trusted to be random): the two halves mixed with random keys by a folded 128-bit
/// multiply. Much cheaper than SipHash for a 16-byte key.
#[derive(Clone)]
pub struct TraceIdHash {
    keys: [u64; 2],
}

impl Default for TraceIdHash {
    fn default() -> Self {
        use std::hash::BuildHasher as _;
        let random = std::collections::hash_map::RandomState::new();
        Self {
            keys: [random.hash_one(1u8) | 1, random.hash_one(2u8)],
        }
    }
}

impl std::hash::BuildHasher for TraceIdHash {
    type Hasher = TraceIdHasher;

    fn build_hasher(&self) -> TraceIdHasher {
        TraceIdHasher {
            keys: self.keys,
            state: self.keys[1],
        }
    }
}

pub struct TraceIdHasher {
    keys: [u64; 2],
    state: u64,
}

impl TraceIdHasher {
    fn mix(&mut self, word: u64) {
        let product = u128::from(self.state ^ word) * u128::from(self.keys[0]);
        self.state = (product as u64) ^ ((product >> 64) as u64);
    }
}

impl std::hash::Hasher for TraceIdHasher {
    fn write(&mut self, bytes: &[u8]) {
        let (words, rest) = bytes.as_chunks::<8>();
        for word in words {
            self.mix(u64::from_le_bytes(*word));
        }
        if !rest.is_empty() {
            let mut word = [0u8; 8];
            word[..rest.len()].copy_from_slice(rest);
            self.mix(u64::from_le_bytes(word) ^ (rest.len() as u64) << 59);
        }
    }

    fn write_usize(&mut self, n: usize) {
        self.mix(n as u64);
    }

    fn finish(&self) -> u64 {
        let product = u128::from(self.state) * u128::from(self.keys[1] | 1);
        (product as u64) ^ ((product >> 64) as u64)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::export::otlp::encode::tests::{resource, server_span};
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
    fn large_fragments_render_like_small_ones() {
        // The same tree, once within Tree::SMALL spans and once padded past it with orphans.
        let r = resource(4242, "python3");
        let server = server_span(&r);
        let mut small = vec![server.clone()];
        for n in 1..6 {
            small.push(client_of(&server, n, u64::from(7 - n), 1_000));
        }
        // A grandchild.
        let mut grandchild = client_of(&small[2], 40, 3, 10);
        grandchild.parent_span_id = Some(small[2].span_id);
        small.push(grandchild);
        let mut orphans = Vec::new();
        for n in 100..120 {
            let mut orphan = client_of(&server, n, 50, 10);
            orphan.parent_span_id = Some(SpanId([0xee; 8]));
            orphans.push(orphan);
        }
        let mut large = small.clone();
        large.extend(orphans.iter().cloned());
        assert!(large.len() > Tree::SMALL && small.len() <= Tree::SMALL);
        let mut expected = render_fragment(&small);
        for orphan in &orphans {
            expected.push_str(&render_fragment(std::slice::from_ref(orphan)));
        }
        assert_eq!(render_fragment(&large), expected);
        assert!(expected.contains("  │  └─ CLIENT"), "{expected}");
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
    fn integer_formatting_matches_the_formatter() {
        let mut values: Vec<u64> = vec![
            0,
            1,
            49_999,
            50_000,
            50_001,
            99_999,
            100_000,
            149_999,
            150_000,
            12_350_000,
            12_250_000,
            999_950_000,
            u64::MAX,
            999_999_999_999_999,
            1_000_000_000_000_000,
        ];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            values.push(x % 10_000_000_000);
            values.push(x % 1_000_000);
            values.push(x >> (x % 64));
        }
        for nanos in values {
            let mut out = String::new();
            push_millis(&mut out, nanos);
            assert_eq!(out, format!("{:.1}", nanos as f64 / 1e6), "{nanos}");
        }
        for n in [0, 7, -7, 200, i64::MAX, i64::MIN] {
            let mut out = String::new();
            push_int(&mut out, n);
            assert_eq!(out, n.to_string());
        }
    }

    #[test]
    fn trace_id_hash_depends_on_every_byte() {
        use std::hash::BuildHasher as _;
        let hash = TraceIdHash::default();
        let base = hash.hash_one(TraceId([7; 16]));
        for i in 0..16 {
            let mut id = [7; 16];
            id[i] ^= 1;
            assert_ne!(hash.hash_one(TraceId(id)), base, "byte {i}");
        }
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

    /// Full, a new trace's root goes out at once and every waiting trace keeps waiting; a
    /// span that is not a root still makes room by printing the oldest trace early.
    #[test]
    fn a_full_buffer_prints_new_roots_at_once() {
        let r = resource(1, "svc");
        let t0 = Instant::now();
        let mut buf = TraceBuffer::default();
        let with_trace = |n: usize| {
            let mut s = server_span(&r);
            s.trace_id = TraceId((n as u128 + 1).to_be_bytes());
            s
        };
        for n in 0..MAX_PENDING_TRACES {
            assert!(buf.add(with_trace(n), t0).is_none());
        }
        let late = with_trace(MAX_PENDING_TRACES);
        let out = buf.add(late.clone(), t0).expect("printed at once");
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].trace_id, late.trace_id);
        assert_eq!(buf.len(), MAX_PENDING_TRACES);
        let child = client_of(&with_trace(MAX_PENDING_TRACES + 1), 1, 1, 1_000);
        let out = buf.add(child, t0).expect("the oldest trace, early");
        assert_eq!(out[0].trace_id, with_trace(0).trace_id);
        assert_eq!(buf.len(), MAX_PENDING_TRACES);
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
