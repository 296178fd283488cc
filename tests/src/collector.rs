//! A real OTLP collector for the tests: rotel, printing every received span.
//!
//! rotel is started with `--exporter blackhole --debug-log traces --debug-log-verbosity detailed`
//! and its stdout goes to a file. Per batch it prints blocks like (real sample in
//! `tests/fixtures/rotel_traces_detailed.txt`):
//!
//! ```text
//! ResourceSpans #0
//! Resource attributes:
//!      -> service.name: Str(python3.11)
//!      -> process.pid: Int(4242)
//! ScopeSpans #0
//! InstrumentationScope e2e-sender 1.0
//! Span #0
//!     Trace ID       : fe0bc7e94cf816fba608d69411ffdbe4
//!     Parent ID      :
//!     ID             : 0cba72af58e40bf0
//!     Name           : GET /users/{id}
//!     Kind           : SPAN_KIND_SERVER
//! Start time: 1795394409153608990
//! End time: 1795394409161958343
//!     Status code    : STATUS_CODE_ERROR
//!     Status message :
//! Attributes:
//!      -> url.path: Str(/users/7)
//! Events:
//! SpanEvent #0
//!      -> Name: an event
//! ```
//!
//! rotel has no file/JSON exporter, so this text is the interface. Its quirks, handled by
//! [`parse_rotel_output`]: a string value containing a newline continues on the next lines
//! (`Str(first line` / `second line)`); a span without status has no status lines; events and
//! links use the same `->` arrows (with nested attributes further indented) and are skipped.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use crate::process::{ChildGuard, POLL, TestDir, read_text, tail};
use crate::spans::{SpanFilter, Spans};
use crate::{free_port, port_open, python_bin, which};

/// An attribute value as rotel prints it.
#[derive(Debug, Clone, PartialEq)]
pub enum AttrValue {
    Str(String),
    Int(i64),
    Double(f64),
    Bool(bool),
    /// Slices, maps, bytes: kept as rotel printed them, e.g. `Slice(Str(x), Str(y))`.
    Other(String),
}

impl AttrValue {
    /// Parses rotel's typed rendering, e.g. `Str(GET)`, `Int(200)`.
    pub fn parse(raw: &str) -> AttrValue {
        fn inner<'a>(raw: &'a str, prefix: &str) -> Option<&'a str> {
            raw.strip_prefix(prefix)?.strip_suffix(')')
        }
        if let Some(s) = inner(raw, "Str(") {
            return AttrValue::Str(s.to_string());
        }
        if let Some(v) = inner(raw, "Int(").and_then(|s| s.parse().ok()) {
            return AttrValue::Int(v);
        }
        if let Some(v) = inner(raw, "Double(").and_then(|s| s.parse().ok()) {
            return AttrValue::Double(v);
        }
        if let Some(v) = inner(raw, "Bool(").and_then(|s| s.parse().ok()) {
            return AttrValue::Bool(v);
        }
        AttrValue::Other(raw.to_string())
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            AttrValue::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match self {
            AttrValue::Int(v) => Some(*v),
            _ => None,
        }
    }
}

impl fmt::Display for AttrValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttrValue::Str(s) => write!(f, "{s:?}"),
            AttrValue::Int(v) => write!(f, "{v}"),
            AttrValue::Double(v) => write!(f, "{v}"),
            AttrValue::Bool(v) => write!(f, "{v}"),
            AttrValue::Other(raw) => write!(f, "{raw}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanKind {
    Unspecified,
    Internal,
    Server,
    Client,
    Producer,
    Consumer,
}

impl SpanKind {
    fn parse(text: &str) -> SpanKind {
        match text {
            "SPAN_KIND_INTERNAL" => SpanKind::Internal,
            "SPAN_KIND_SERVER" => SpanKind::Server,
            "SPAN_KIND_CLIENT" => SpanKind::Client,
            "SPAN_KIND_PRODUCER" => SpanKind::Producer,
            "SPAN_KIND_CONSUMER" => SpanKind::Consumer,
            _ => SpanKind::Unspecified,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanStatus {
    Unset,
    Ok,
    Error,
}

impl SpanStatus {
    fn parse(text: &str) -> SpanStatus {
        match text {
            "STATUS_CODE_OK" => SpanStatus::Ok,
            "STATUS_CODE_ERROR" => SpanStatus::Error,
            _ => SpanStatus::Unset,
        }
    }
}

/// One span as the collector received it, with the attributes of its resource.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedSpan {
    /// 32 lowercase hex digits.
    pub trace_id: String,
    /// 16 lowercase hex digits.
    pub span_id: String,
    /// `None` for a root span.
    pub parent_span_id: Option<String>,
    pub name: String,
    pub kind: SpanKind,
    pub start_unix_nanos: u64,
    pub end_unix_nanos: u64,
    pub attributes: BTreeMap<String, AttrValue>,
    pub status: SpanStatus,
    pub status_message: String,
    pub resource: BTreeMap<String, AttrValue>,
    /// `InstrumentationScope` line: name and version.
    pub scope: String,
}

impl ReceivedSpan {
    pub fn attr(&self, key: &str) -> Option<&AttrValue> {
        self.attributes.get(key)
    }

    pub fn attr_str(&self, key: &str) -> Option<&str> {
        self.attr(key).and_then(AttrValue::as_str)
    }

    pub fn attr_i64(&self, key: &str) -> Option<i64> {
        self.attr(key).and_then(AttrValue::as_i64)
    }

    pub fn resource_str(&self, key: &str) -> Option<&str> {
        self.resource.get(key).and_then(AttrValue::as_str)
    }

    pub fn service_name(&self) -> Option<&str> {
        self.resource_str("service.name")
    }

    /// `process.pid` of the span's resource.
    pub fn pid(&self) -> Option<u32> {
        self.resource
            .get("process.pid")
            .and_then(AttrValue::as_i64)
            .and_then(|v| u32::try_from(v).ok())
    }

    pub fn duration_nanos(&self) -> i128 {
        i128::from(self.end_unix_nanos) - i128::from(self.start_unix_nanos)
    }

    /// One line: kind, name, service/pid, ids, status, duration, attributes.
    pub fn summary(&self) -> String {
        let attrs: Vec<String> = self
            .attributes
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        format!(
            "{:?} {:?} [service={} pid={}] trace={} span={} parent={} status={:?}{} dur={}us start={} {{{}}}",
            self.kind,
            self.name,
            self.service_name().unwrap_or("?"),
            self.pid().map_or("?".to_string(), |p| p.to_string()),
            self.trace_id,
            self.span_id,
            self.parent_span_id.as_deref().unwrap_or("-"),
            self.status,
            if self.status_message.is_empty() {
                String::new()
            } else {
                format!("({:?})", self.status_message)
            },
            self.duration_nanos() / 1000,
            self.start_unix_nanos,
            attrs.join(", ")
        )
    }
}

impl fmt::Display for ReceivedSpan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{:?} span {:?}", self.kind, self.name)?;
        writeln!(
            f,
            "  trace_id={} span_id={} parent={}",
            self.trace_id,
            self.span_id,
            self.parent_span_id.as_deref().unwrap_or("-")
        )?;
        writeln!(
            f,
            "  start={} end={} duration={}ns status={:?} {:?}",
            self.start_unix_nanos,
            self.end_unix_nanos,
            self.duration_nanos(),
            self.status,
            self.status_message
        )?;
        writeln!(f, "  attributes:")?;
        for (k, v) in &self.attributes {
            writeln!(f, "    {k} = {v}")?;
        }
        writeln!(f, "  resource:")?;
        for (k, v) in &self.resource {
            writeln!(f, "    {k} = {v}")?;
        }
        Ok(())
    }
}

#[derive(Default)]
struct SpanBuilder {
    trace_id: Option<String>,
    span_id: Option<String>,
    parent_span_id: Option<String>,
    name: String,
    kind: Option<SpanKind>,
    start: u64,
    end: u64,
    status: Option<SpanStatus>,
    status_message: String,
    attributes: BTreeMap<String, AttrValue>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Section {
    None,
    ResourceAttributes,
    SpanAttributes,
    /// Events and links: their `->` lines are not span attributes.
    Skipped,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    Resource,
    Span,
}

struct Parser {
    spans: Vec<ReceivedSpan>,
    resource: BTreeMap<String, AttrValue>,
    scope: String,
    span: Option<SpanBuilder>,
    section: Section,
    /// An attribute whose value may continue on following lines (values with newlines).
    pending: Option<(Target, String, String)>,
}

impl Parser {
    fn new() -> Parser {
        Parser {
            spans: Vec::new(),
            resource: BTreeMap::new(),
            scope: String::new(),
            span: None,
            section: Section::None,
            pending: None,
        }
    }

    fn flush_pending(&mut self) {
        if let Some((target, key, raw)) = self.pending.take() {
            let value = AttrValue::parse(&raw);
            match target {
                Target::Resource => {
                    self.resource.insert(key, value);
                }
                Target::Span => {
                    if let Some(span) = self.span.as_mut() {
                        span.attributes.insert(key, value);
                    }
                }
            }
        }
    }

    fn finish_span(&mut self) {
        self.flush_pending();
        if let Some(b) = self.span.take()
            && let (Some(trace_id), Some(span_id)) = (b.trace_id, b.span_id)
        {
            self.spans.push(ReceivedSpan {
                trace_id,
                span_id,
                parent_span_id: b.parent_span_id,
                name: b.name,
                kind: b.kind.unwrap_or(SpanKind::Unspecified),
                start_unix_nanos: b.start,
                end_unix_nanos: b.end,
                attributes: b.attributes,
                status: b.status.unwrap_or(SpanStatus::Unset),
                status_message: b.status_message,
                resource: self.resource.clone(),
                scope: self.scope.clone(),
            });
        }
    }

    fn line(&mut self, line: &str) {
        let line = line.strip_suffix('\r').unwrap_or(line);
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();

        if self.pending.is_some() && !is_structural(line, trimmed) {
            // Continuation of a value that contained a newline.
            if let Some((_, _, raw)) = self.pending.as_mut() {
                raw.push('\n');
                raw.push_str(line);
            }
            return;
        }
        self.flush_pending();

        if line.starts_with("ResourceSpans #") {
            self.finish_span();
            self.resource.clear();
            self.scope.clear();
            self.section = Section::None;
        } else if line.starts_with("Resource attributes:") {
            self.section = Section::ResourceAttributes;
        } else if line.starts_with("ScopeSpans #") {
            self.finish_span();
            self.scope.clear();
            self.section = Section::None;
        } else if let Some(scope) = line.strip_prefix("InstrumentationScope ") {
            self.scope = scope.trim().to_string();
        } else if line.starts_with("Span #") {
            self.finish_span();
            self.span = Some(SpanBuilder::default());
            self.section = Section::None;
        } else if line.starts_with("Attributes:") {
            self.section = Section::SpanAttributes;
        } else if line.starts_with("Events:") || line.starts_with("Links:") {
            self.section = Section::Skipped;
        } else if let Some(rest) = trimmed.strip_prefix("-> ") {
            // Nested attributes (of events/links) are indented deeper than 5 spaces.
            if indent > 5 {
                return;
            }
            let target = match self.section {
                Section::ResourceAttributes => Target::Resource,
                Section::SpanAttributes if self.span.is_some() => Target::Span,
                _ => return,
            };
            if let Some((key, raw)) = rest.split_once(": ") {
                self.pending = Some((target, key.to_string(), raw.to_string()));
            } else if let Some(key) = rest.strip_suffix(':') {
                self.pending = Some((target, key.to_string(), String::new()));
            }
        } else if let Some(span) = self.span.as_mut()
            && let Some((key, value)) = trimmed.split_once(':')
        {
            let value = value.strip_prefix(' ').unwrap_or(value);
            match key.trim_end() {
                "Trace ID" => span.trace_id = Some(value.trim().to_string()),
                "Parent ID" => {
                    let v = value.trim();
                    span.parent_span_id = (!v.is_empty()).then(|| v.to_string());
                }
                "ID" => span.span_id = Some(value.trim().to_string()),
                "Name" => span.name = value.to_string(),
                "Kind" => span.kind = Some(SpanKind::parse(value.trim())),
                "Start time" => span.start = value.trim().parse().unwrap_or(0),
                "End time" => span.end = value.trim().parse().unwrap_or(0),
                "Status code" => span.status = Some(SpanStatus::parse(value.trim())),
                "Status message" => span.status_message = value.to_string(),
                _ => {}
            }
        }
    }

    fn finish(mut self) -> Vec<ReceivedSpan> {
        self.finish_span();
        self.spans
    }
}

/// Lines that start something new (and so end a multi-line attribute value).
fn is_structural(line: &str, trimmed: &str) -> bool {
    const HEADERS: [&str; 12] = [
        "ResourceSpans #",
        "Resource SchemaURL:",
        "Resource attributes:",
        "ScopeSpans #",
        "ScopeSpans SchemaURL:",
        "InstrumentationScope ",
        "Span #",
        "Attributes:",
        "Events:",
        "Links:",
        "SpanEvent #",
        "SpanLink #",
    ];
    HEADERS.iter().any(|h| line.starts_with(h))
        || trimmed.starts_with("-> ")
        || is_log_line(line)
        || [
            "Trace ID ",
            "Parent ID ",
            "ID ",
            "Name ",
            "Kind ",
            "Status code ",
            "Status message ",
        ]
        .iter()
        .any(|h| line.starts_with("    ") && trimmed.starts_with(h))
        || line.starts_with("Start time: ")
        || line.starts_with("End time: ")
}

/// rotel's own log lines: `2026-11-23T00:40:07.618115Z  INFO ...` (or colored).
fn is_log_line(line: &str) -> bool {
    let b = line.as_bytes();
    line.starts_with('\u{1b}')
        || (b.len() > 11
            && b[..4].iter().all(u8::is_ascii_digit)
            && b[4] == b'-'
            && b[7] == b'-'
            && b[10] == b'T')
}

/// Parses rotel's detailed trace debug output into spans, in the order received.
pub fn parse_rotel_output(text: &str) -> Vec<ReceivedSpan> {
    let mut parser = Parser::new();
    for line in text.lines() {
        parser.line(line);
    }
    parser.finish()
}

/// The rotel collector binary: `ROTEL_BIN`, `rotel`/`rotel-agent` on PATH, or the binary
/// shipped inside the `rotel` python package (`pip install rotel`).
pub fn rotel_bin() -> PathBuf {
    static ROTEL: OnceLock<PathBuf> = OnceLock::new();
    ROTEL
        .get_or_init(|| {
            if let Some(path) = std::env::var_os("ROTEL_BIN") {
                return PathBuf::from(path);
            }
            if let Some(path) = which("rotel-agent").or_else(|| which("rotel")) {
                return path;
            }
            let out = Command::new(python_bin())
                .args([
                    "-c",
                    "import os, rotel; print(os.path.join(os.path.dirname(rotel.__file__), 'rotel-agent'))",
                ])
                .output()
                .expect("run python to locate the rotel package");
            let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            assert!(
                out.status.success() && path.exists(),
                "rotel collector not found: set ROTEL_BIN or `pip install rotel==0.0.1a15` \
                 (python said: {})",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            path
        })
        .clone()
}

/// How a [`Collector`] runs.
#[derive(Debug, Clone, Copy, Default)]
pub struct CollectorOptions {
    /// Print only one line per received batch (`Received traces ... spans=N`, basic debug
    /// log) instead of every span: for soaks, where hundreds of thousands of spans would flood
    /// the disk. [`Collector::received_span_count`] still counts them; the span accessors
    /// return nothing.
    pub quiet: bool,
    /// Listen on every address (0.0.0.0) instead of 127.0.0.1 only, so that senders in other
    /// network namespaces reach it through a bridge ([`Collector::grpc_endpoint_at`]).
    pub all_addresses: bool,
}

/// A running rotel collector with OTLP gRPC and HTTP receivers on free loopback ports.
pub struct Collector {
    child: ChildGuard,
    grpc_port: u16,
    http_port: u16,
    stdout: PathBuf,
    stderr: PathBuf,
    dir: TestDir,
    options: CollectorOptions,
}

impl Collector {
    /// Starts rotel and waits until both receivers accept connections (10 s).
    pub fn start() -> Collector {
        Self::start_with(CollectorOptions::default())
    }

    /// A collector that counts spans without printing them ([`CollectorOptions::quiet`]).
    pub fn start_quiet() -> Collector {
        Self::start_with(CollectorOptions {
            quiet: true,
            ..CollectorOptions::default()
        })
    }

    pub fn start_with(options: CollectorOptions) -> Collector {
        let dir = TestDir::new("collector");
        let bind = if options.all_addresses {
            "0.0.0.0"
        } else {
            "127.0.0.1"
        };
        let verbosity = if options.quiet { "basic" } else { "detailed" };
        let mut last_error = String::new();
        for attempt in 0..3 {
            let grpc_port = free_port();
            let mut http_port = free_port();
            while http_port == grpc_port {
                http_port = free_port();
            }
            let stdout = dir.join(&format!("rotel-{attempt}.out"));
            let stderr = dir.join(&format!("rotel-{attempt}.err"));
            let mut cmd = Command::new(rotel_bin());
            cmd.arg("start")
                .args(["--exporter", "blackhole"])
                .args(["--debug-log", "traces", "--debug-log-verbosity", verbosity])
                .arg("--otlp-grpc-endpoint")
                .arg(format!("{bind}:{grpc_port}"))
                .arg("--otlp-http-endpoint")
                .arg(format!("{bind}:{http_port}"))
                .args(["--traces-batch-timeout", "50ms"])
                .arg("--pid-file")
                .arg(dir.join("rotel.pid"))
                .arg("--log-file")
                .arg(dir.join("rotel.log"))
                .env("NO_COLOR", "1");
            let mut child = ChildGuard::spawn("rotel", cmd, &stdout, &stderr);
            let deadline = Instant::now() + crate::scaled(Duration::from_secs(10));
            loop {
                if let Some(status) = child.try_wait() {
                    last_error = format!(
                        "rotel exited with {status} (attempt {attempt})\nstdout:\n{}\nstderr:\n{}",
                        tail(&read_text(&stdout), 30),
                        tail(&read_text(&stderr), 30)
                    );
                    break;
                }
                if port_open(grpc_port) && port_open(http_port) {
                    return Collector {
                        child,
                        grpc_port,
                        http_port,
                        stdout,
                        stderr,
                        dir,
                        options,
                    };
                }
                if Instant::now() >= deadline {
                    last_error = format!(
                        "rotel did not open 127.0.0.1:{grpc_port} and :{http_port} in time\nstdout:\n{}\nstderr:\n{}",
                        tail(&read_text(&stdout), 30),
                        tail(&read_text(&stderr), 30)
                    );
                    break;
                }
                thread::sleep(POLL);
            }
        }
        panic!(
            "could not start the rotel collector ({}): {last_error}",
            rotel_bin().display()
        );
    }

    /// OTLP/gRPC endpoint, e.g. `http://127.0.0.1:40123`.
    pub fn grpc_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc_port)
    }

    /// OTLP/HTTP base endpoint (exporters append `/v1/traces`).
    pub fn http_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// OTLP/gRPC endpoint at another address of this machine, e.g. a bridge's address for a
    /// sender in a network namespace (needs [`CollectorOptions::all_addresses`]).
    pub fn grpc_endpoint_at(&self, address: std::net::IpAddr) -> String {
        assert!(
            self.options.all_addresses || address.is_loopback(),
            "the collector listens on 127.0.0.1 only: start it with CollectorOptions::all_addresses"
        );
        format!("http://{address}:{}", self.grpc_port)
    }

    /// Spans received so far. Quiet mode: the sum of rotel's per-batch lines
    /// (`Received traces. ... spans=N`); detailed mode: the spans printed.
    pub fn received_span_count(&self) -> u64 {
        if self.options.quiet {
            count_received_spans(&self.raw_output())
        } else {
            self.spans_now().len() as u64
        }
    }

    pub fn grpc_port(&self) -> u16 {
        self.grpc_port
    }

    pub fn http_port(&self) -> u16 {
        self.http_port
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// The raw text rotel printed so far.
    pub fn raw_output(&self) -> String {
        read_text(&self.stdout)
    }

    /// rotel's stderr so far.
    pub fn raw_stderr(&self) -> String {
        read_text(&self.stderr)
    }

    /// Everything parsed so far. The last span may still be incomplete if rotel is printing;
    /// prefer [`Collector::wait_for_spans`] / [`Collector::settle`].
    pub fn spans_now(&self) -> Spans {
        Spans(parse_rotel_output(&complete_lines(&self.raw_output())))
    }

    /// Polls the collector's output until `predicate` holds (every 50 ms, up to `timeout`) and
    /// returns the spans it held for. Panics on timeout with `what` and everything received.
    /// A span still being printed (the output's last one while the output grows) is withheld.
    pub fn wait_for_spans(
        &self,
        what: &str,
        timeout: Duration,
        predicate: impl Fn(&Spans) -> bool,
    ) -> Spans {
        let timeout = crate::scaled(timeout);
        let deadline = Instant::now() + timeout;
        let mut previous_len = usize::MAX;
        loop {
            let text = complete_lines(&self.raw_output());
            let stable = text.len() == previous_len;
            previous_len = text.len();
            let mut spans = parse_rotel_output(&text);
            if !stable {
                spans.pop();
            }
            let spans = Spans(spans);
            if predicate(&spans) {
                return spans;
            }
            if Instant::now() >= deadline {
                let all = self.spans_now();
                panic!(
                    "timed out after {timeout:?} waiting for {what}; the collector received {} spans \
                     (the agent's stderr follows the panic):\n{all}",
                    all.len()
                );
            }
            thread::sleep(POLL);
        }
    }

    /// Waits until at least `n` received spans match `filter`.
    pub fn wait_for(&self, filter: &SpanFilter, n: usize) -> Spans {
        self.wait_for_all(&[(filter, n)])
    }

    /// Waits until, for every `(filter, n)`, at least `n` received spans match `filter`.
    pub fn wait_for_all(&self, wanted: &[(&SpanFilter, usize)]) -> Spans {
        let what: Vec<String> = wanted
            .iter()
            .map(|(filter, n)| format!("at least {n} span(s) matching {filter}"))
            .collect();
        self.wait_for_spans(&what.join(" AND "), crate::SPAN_TIMEOUT, |spans| {
            wanted
                .iter()
                .all(|(filter, n)| spans.matching(filter).len() >= *n)
        })
    }

    /// Waits until the output stopped growing for 600 ms (at most 10 s), then returns every
    /// span received. Call after the agent was stopped, before asserting exact counts or absence.
    pub fn settle(&self) -> Spans {
        let quiet = crate::scaled(Duration::from_millis(600));
        let deadline = Instant::now() + crate::scaled(Duration::from_secs(10));
        let mut len = self.raw_output().len();
        let mut since = Instant::now();
        while Instant::now() < deadline {
            thread::sleep(POLL);
            let now = self.raw_output().len();
            if now != len {
                len = now;
                since = Instant::now();
            } else if since.elapsed() >= quiet {
                break;
            }
        }
        self.spans_now()
    }

    /// Where rotel's output lives (kept when a test fails).
    pub fn output_path(&self) -> &std::path::Path {
        &self.stdout
    }

    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.child.kill();
        if thread::panicking() {
            let spans = self.spans_now();
            eprintln!(
                "[e2e] collector (rotel, output {}) received {} spans:\n{spans}",
                self.stdout.display(),
                spans.len()
            );
        }
    }
}

/// Sum of `spans=N` over rotel's `Received traces.` lines.
fn count_received_spans(text: &str) -> u64 {
    text.lines()
        .filter(|l| l.contains("Received traces."))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("spans="))
                .and_then(|n| n.parse::<u64>().ok())
        })
        .sum()
}

/// The text up to and including its last newline (rotel writes line by line).
fn complete_lines(text: &str) -> String {
    match text.rfind('\n') {
        Some(i) => text[..=i].to_string(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = include_str!("../fixtures/rotel_traces_detailed.txt");

    #[test]
    fn parses_every_span_of_the_real_sample() {
        let spans = parse_rotel_output(SAMPLE);
        let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "POST /echo",
                "GET /users/{id}",
                "GET /x",
                "GET /y",
                "PUT /z"
            ],
            "{spans:#?}"
        );
    }

    #[test]
    fn parses_span_header_fields() {
        let spans = parse_rotel_output(SAMPLE);
        let client = &spans[0];
        assert_eq!(client.trace_id, "fe0bc7e94cf816fba608d69411ffdbe4");
        assert_eq!(client.span_id, "4fcf5be9c960e0d8");
        assert_eq!(client.parent_span_id.as_deref(), Some("0cba72af58e40bf0"));
        assert_eq!(client.kind, SpanKind::Client);
        assert_eq!(client.start_unix_nanos, 1795394409153788896);
        assert_eq!(client.end_unix_nanos, 1795394409153973229);
        assert_eq!(client.status, SpanStatus::Error);
        assert_eq!(client.status_message, "upstream failed");
        assert_eq!(client.scope, "e2e-sender 1.0");
        // Link attributes are not span attributes.
        assert!(client.attributes.is_empty(), "{client}");

        let server = &spans[1];
        assert_eq!(server.parent_span_id, None);
        assert_eq!(server.kind, SpanKind::Server);
        assert_eq!(server.status, SpanStatus::Error);
        assert_eq!(server.status_message, "");
    }

    #[test]
    fn parses_typed_attributes() {
        let spans = parse_rotel_output(SAMPLE);
        let server = &spans[1];
        assert_eq!(server.attr_str("http.request.method"), Some("GET"));
        assert_eq!(server.attr_str("url.path"), Some("/users/7"));
        assert_eq!(server.attr_i64("http.response.status_code"), Some(500));
        assert_eq!(server.attr("server.port"), Some(&AttrValue::Int(8080)));
        assert_eq!(server.attr("flag"), Some(&AttrValue::Bool(true)));
        assert_eq!(server.attr("ratio"), Some(&AttrValue::Double(0.25)));
        assert_eq!(
            server.attr("list"),
            Some(&AttrValue::Other("Slice(Str(x), Str(y))".into()))
        );
        assert_eq!(server.attr_str("empty"), Some(""));
        assert_eq!(
            server.attr_str("tricky"),
            Some("value with ) and : and -> inside")
        );
        // Event attributes and names are not span attributes.
        assert!(server.attr("event.key").is_none());
        assert!(server.attr("Name").is_none());
        assert_eq!(server.attributes.len(), 9, "{server}");
    }

    #[test]
    fn parses_resources_including_multiline_values() {
        let spans = parse_rotel_output(SAMPLE);
        let sdk = &spans[0];
        assert_eq!(sdk.service_name(), Some("e2e-sdk-sender"));
        assert_eq!(sdk.pid(), Some(4242));
        assert_eq!(
            sdk.resource_str("process.command_line"),
            Some("python3 sender.py --flag 'a b'")
        );
        assert_eq!(
            sdk.resource_str("multi.line"),
            Some("first line\nsecond line)")
        );
        assert_eq!(sdk.resource_str("telemetry.sdk.language"), Some("python"));

        // Two spans in one resource share it; the next ResourceSpans starts a new one.
        assert_eq!(spans[2].service_name(), Some("json-svc"));
        assert_eq!(spans[3].service_name(), Some("json-svc"));
        assert_eq!(spans[3].pid(), Some(77));
        assert_eq!(spans[4].service_name(), Some("json-svc-2"));
        assert_eq!(spans[4].pid(), None);
        assert_eq!(spans[4].resource.len(), 1);
    }

    #[test]
    fn parses_statuses_and_spans_without_status_lines() {
        let spans = parse_rotel_output(SAMPLE);
        assert_eq!(spans[2].status, SpanStatus::Unset);
        assert_eq!(spans[2].attr_i64("http.response.status_code"), Some(404));
        assert_eq!(spans[3].status, SpanStatus::Ok);
        assert_eq!(spans[3].kind, SpanKind::Client);
        assert_eq!(spans[4].status, SpanStatus::Unset);
        assert_eq!(spans[4].kind, SpanKind::Internal);
        assert_eq!(spans[4].start_unix_nanos, 0);
        assert!(spans[4].attributes.is_empty());
    }

    #[test]
    fn every_prefix_parses_without_panicking_and_never_invents_spans() {
        let full = parse_rotel_output(SAMPLE);
        for (i, _) in SAMPLE.char_indices() {
            let partial = parse_rotel_output(&SAMPLE[..i]);
            assert!(partial.len() <= full.len());
            // Every span but the last (possibly cut) one is already complete and equal.
            if partial.len() > 1 {
                assert_eq!(partial[..partial.len() - 1], full[..partial.len() - 1]);
            }
        }
    }

    #[test]
    fn ignores_log_lines_and_colors() {
        let text = format!(
            "\u{1b}[2m2026-11-23T00:36:12.406954Z\u{1b}[0m INFO Starting Rotel.\n{SAMPLE}\n2026-11-23T00:40:09.000000Z  WARN something\n"
        );
        assert_eq!(parse_rotel_output(&text), parse_rotel_output(SAMPLE));
    }

    /// What rotel printed for the agent's spans of `curl` → python `GET /hello`.
    #[test]
    fn parses_the_agents_spans_as_rotel_printed_them() {
        let spans = parse_rotel_output(include_str!("../fixtures/rotel_agent_sample.txt"));
        assert_eq!(spans.len(), 2, "{spans:#?}");
        let (client, server) = (&spans[0], &spans[1]);
        assert_eq!(client.kind, SpanKind::Client);
        assert_eq!(client.service_name(), Some("curl"));
        assert_eq!(client.pid(), Some(14069));
        assert!(
            client
                .resource_str("process.command_line")
                .is_some_and(|c| c.contains("%{http_code}"))
        );
        assert_eq!(server.kind, SpanKind::Server);
        assert_eq!(server.name, "GET /hello");
        assert_eq!(server.pid(), Some(14065));
        assert_eq!(server.attr_i64("client.port"), Some(58996));
        assert_eq!(server.attr_i64("http.response.body.size"), Some(6));
        assert_eq!(server.attributes.len(), 16);
        assert_eq!(server.duration_nanos(), 934_603);
    }

    #[test]
    fn counts_spans_of_basic_batch_lines() {
        let text = "2026-11-23T03:29:30.935530Z  INFO Starting Rotel. grpc_endpoint=\"127.0.0.1:14317\"\n\
                    2026-11-23T03:29:34.461923Z  INFO Received traces. data_type=\"traces\" resource_spans=1 spans=3\n\
                    2026-11-23T03:29:34.475443Z  INFO Received traces. data_type=\"traces\" resource_spans=2 spans=40\n";
        assert_eq!(count_received_spans(text), 43);
        assert_eq!(count_received_spans(SAMPLE), 0);
    }

    #[test]
    fn attr_value_parse() {
        assert_eq!(AttrValue::parse("Str(a(b))"), AttrValue::Str("a(b)".into()));
        assert_eq!(AttrValue::parse("Int(-3)"), AttrValue::Int(-3));
        assert_eq!(
            AttrValue::parse("Int(x)"),
            AttrValue::Other("Int(x)".into())
        );
        assert_eq!(AttrValue::parse("Bool(false)"), AttrValue::Bool(false));
        assert_eq!(
            AttrValue::parse("Bytes(AA==)"),
            AttrValue::Other("Bytes(AA==)".into())
        );
    }
}
