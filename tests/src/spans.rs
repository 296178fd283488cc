//! Selecting received spans and asserting on them with context-rich panics.

use std::fmt;
use std::ops::Deref;

use crate::clients::Timing;
use crate::collector::{AttrValue, ReceivedSpan, SpanKind, SpanStatus};

/// Span duration may exceed the client's own measurement by this much (timer granularity).
pub const DURATION_TOLERANCE_NANOS: i128 = 2_000_000;
/// Span start/end may lie outside the client's wall-clock window by this much
/// (kernel monotonic → wall-clock conversion, clock reads on both sides).
pub const CLOCK_TOLERANCE_NANOS: i128 = 50_000_000;

/// Spans received by the collector. `Display` prints one line per span.
#[derive(Debug, Clone, Default)]
pub struct Spans(pub Vec<ReceivedSpan>);

impl Deref for Spans {
    type Target = Vec<ReceivedSpan>;
    fn deref(&self) -> &Vec<ReceivedSpan> {
        &self.0
    }
}

impl fmt::Display for Spans {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return writeln!(f, "  (no spans)");
        }
        for (i, span) in self.0.iter().enumerate() {
            writeln!(f, "  #{i}: {}", span.summary())?;
        }
        Ok(())
    }
}

impl Spans {
    /// The spans matching `filter`, ordered by end time then start time (the order in which
    /// a connection's responses completed).
    pub fn matching(&self, filter: &SpanFilter) -> Vec<&ReceivedSpan> {
        let mut out: Vec<&ReceivedSpan> = self.0.iter().filter(|s| filter.matches(s)).collect();
        out.sort_by_key(|s| (s.end_unix_nanos, s.start_unix_nanos));
        out
    }

    /// Exactly `n` spans match `filter`, or panic showing everything received.
    pub fn expect_n(&self, filter: &SpanFilter, n: usize) -> Vec<&ReceivedSpan> {
        let found = self.matching(filter);
        if found.len() != n {
            panic!(
                "expected exactly {n} span(s) matching {filter}, found {}; the collector received {} spans:\n{self}",
                found.len(),
                self.len()
            );
        }
        found
    }

    /// Exactly one span matches `filter`.
    pub fn expect_one(&self, filter: &SpanFilter) -> &ReceivedSpan {
        self.expect_n(filter, 1)[0]
    }

    /// No span matches `filter`.
    pub fn expect_none(&self, filter: &SpanFilter) {
        let found = self.matching(filter);
        if !found.is_empty() {
            let lines: Vec<String> = found.iter().map(|s| format!("  {}", s.summary())).collect();
            panic!(
                "expected NO span matching {filter}, found {}:\n{}\nthe collector received {} spans:\n{self}",
                found.len(),
                lines.join("\n"),
                self.len()
            );
        }
    }
}

/// A description of spans to look for; `Display` says what it looks for (used in panics).
#[derive(Debug, Clone, Default)]
pub struct SpanFilter {
    kind: Option<SpanKind>,
    pid: Option<u32>,
    path: Option<String>,
    method: Option<String>,
    status_code: Option<i64>,
    service_prefix: Option<String>,
    trace_id: Option<String>,
}

impl SpanFilter {
    pub fn any() -> SpanFilter {
        SpanFilter::default()
    }

    pub fn server() -> SpanFilter {
        SpanFilter {
            kind: Some(SpanKind::Server),
            ..SpanFilter::default()
        }
    }

    pub fn client() -> SpanFilter {
        SpanFilter {
            kind: Some(SpanKind::Client),
            ..SpanFilter::default()
        }
    }

    /// Resource `process.pid` equals `pid`.
    pub fn pid(mut self, pid: u32) -> SpanFilter {
        self.pid = Some(pid);
        self
    }

    /// `url.path` equals `path`.
    pub fn path(mut self, path: &str) -> SpanFilter {
        self.path = Some(path.to_string());
        self
    }

    pub fn method(mut self, method: &str) -> SpanFilter {
        self.method = Some(method.to_string());
        self
    }

    pub fn status_code(mut self, code: i64) -> SpanFilter {
        self.status_code = Some(code);
        self
    }

    /// Resource `service.name` starts with `prefix`.
    pub fn service_prefix(mut self, prefix: &str) -> SpanFilter {
        self.service_prefix = Some(prefix.to_string());
        self
    }

    pub fn trace_id(mut self, trace_id: &str) -> SpanFilter {
        self.trace_id = Some(trace_id.to_string());
        self
    }

    pub fn matches(&self, span: &ReceivedSpan) -> bool {
        self.kind.is_none_or(|k| span.kind == k)
            && self.pid.is_none_or(|p| span.pid() == Some(p))
            && self
                .path
                .as_deref()
                .is_none_or(|p| span.attr_str("url.path") == Some(p))
            && self
                .method
                .as_deref()
                .is_none_or(|m| span.attr_str("http.request.method") == Some(m))
            && self
                .status_code
                .is_none_or(|c| span.attr_i64("http.response.status_code") == Some(c))
            && self
                .service_prefix
                .as_deref()
                .is_none_or(|p| span.service_name().is_some_and(|s| s.starts_with(p)))
            && self.trace_id.as_deref().is_none_or(|t| span.trace_id == t)
    }
}

impl fmt::Display for SpanFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        match self.kind {
            Some(k) => parts.push(format!("kind={k:?}")),
            None => parts.push("kind=any".to_string()),
        }
        if let Some(p) = self.pid {
            parts.push(format!("resource process.pid={p}"));
        }
        if let Some(s) = &self.service_prefix {
            parts.push(format!("service.name starting with {s:?}"));
        }
        if let Some(m) = &self.method {
            parts.push(format!("http.request.method={m:?}"));
        }
        if let Some(p) = &self.path {
            parts.push(format!("url.path={p:?}"));
        }
        if let Some(c) = self.status_code {
            parts.push(format!("http.response.status_code={c}"));
        }
        if let Some(t) = &self.trace_id {
            parts.push(format!("trace_id={t}"));
        }
        write!(f, "[{}]", parts.join(", "))
    }
}

/// Soft assertions on one span: every failed check is collected, then [`Checks::finish`]
/// panics once listing all of them with the full span, so one run shows every mismatch.
pub struct Checks {
    what: String,
    span: ReceivedSpan,
    failures: Vec<String>,
}

impl Checks {
    pub fn new(what: impl Into<String>, span: &ReceivedSpan) -> Checks {
        Checks {
            what: what.into(),
            span: span.clone(),
            failures: Vec::new(),
        }
    }

    pub fn fail(&mut self, message: String) -> &mut Self {
        self.failures.push(message);
        self
    }

    pub fn check(&mut self, ok: bool, message: impl FnOnce() -> String) -> &mut Self {
        if !ok {
            self.failures.push(message());
        }
        self
    }

    /// A string span attribute equals `expected`.
    pub fn attr_str(&mut self, key: &str, expected: &str) -> &mut Self {
        let got = self.span.attr(key).cloned();
        if got.as_ref().and_then(AttrValue::as_str) != Some(expected) {
            self.failures.push(format!(
                "attribute {key}: expected Str({expected:?}), got {}",
                show(got.as_ref())
            ));
        }
        self
    }

    /// An integer span attribute equals `expected`.
    pub fn attr_int(&mut self, key: &str, expected: i64) -> &mut Self {
        let got = self.span.attr(key).cloned();
        if got.as_ref().and_then(AttrValue::as_i64) != Some(expected) {
            self.failures.push(format!(
                "attribute {key}: expected Int({expected}), got {}",
                show(got.as_ref())
            ));
        }
        self
    }

    /// The span attribute exists (any type).
    pub fn attr_present(&mut self, key: &str) -> &mut Self {
        if self.span.attr(key).is_none() {
            self.failures
                .push(format!("attribute {key}: expected present, it is missing"));
        }
        self
    }

    /// The span attribute is absent.
    pub fn attr_absent(&mut self, key: &str) -> &mut Self {
        if let Some(v) = self.span.attr(key) {
            self.failures
                .push(format!("attribute {key}: expected absent, got {v}"));
        }
        self
    }

    /// A string resource attribute equals `expected`.
    pub fn resource_str(&mut self, key: &str, expected: &str) -> &mut Self {
        let got = self.span.resource.get(key).cloned();
        if got.as_ref().and_then(AttrValue::as_str) != Some(expected) {
            self.failures.push(format!(
                "resource {key}: expected Str({expected:?}), got {}",
                show(got.as_ref())
            ));
        }
        self
    }

    /// A string resource attribute starts with `prefix`.
    pub fn resource_str_prefix(&mut self, key: &str, prefix: &str) -> &mut Self {
        let got = self.span.resource.get(key).cloned();
        if !got
            .as_ref()
            .and_then(AttrValue::as_str)
            .is_some_and(|s| s.starts_with(prefix))
        {
            self.failures.push(format!(
                "resource {key}: expected a string starting with {prefix:?}, got {}",
                show(got.as_ref())
            ));
        }
        self
    }

    /// An integer resource attribute equals `expected`.
    pub fn resource_int(&mut self, key: &str, expected: i64) -> &mut Self {
        let got = self.span.resource.get(key).cloned();
        if got.as_ref().and_then(AttrValue::as_i64) != Some(expected) {
            self.failures.push(format!(
                "resource {key}: expected Int({expected}), got {}",
                show(got.as_ref())
            ));
        }
        self
    }

    pub fn name(&mut self, expected: &str) -> &mut Self {
        if self.span.name != expected {
            self.failures.push(format!(
                "span name: expected {expected:?}, got {:?}",
                self.span.name
            ));
        }
        self
    }

    pub fn kind(&mut self, expected: SpanKind) -> &mut Self {
        if self.span.kind != expected {
            self.failures.push(format!(
                "span kind: expected {expected:?}, got {:?}",
                self.span.kind
            ));
        }
        self
    }

    pub fn status(&mut self, expected: SpanStatus) -> &mut Self {
        if self.span.status != expected {
            self.failures.push(format!(
                "span status: expected {expected:?}, got {:?} (message {:?})",
                self.span.status, self.span.status_message
            ));
        }
        self
    }

    /// Duration > 0 and ≤ the client's own measurement (+2 ms); start/end inside the client's
    /// wall-clock window (±50 ms).
    pub fn timing_within(&mut self, client: &Timing) -> &mut Self {
        let span = &self.span;
        let duration = span.duration_nanos();
        if duration <= 0 {
            self.failures.push(format!(
                "duration: expected > 0, got {duration} ns (start {} end {})",
                span.start_unix_nanos, span.end_unix_nanos
            ));
        }
        let measured = i128::from(client.duration_nanos);
        if duration > measured + DURATION_TOLERANCE_NANOS {
            self.failures.push(format!(
                "duration: expected <= client's measured {measured} ns (+{DURATION_TOLERANCE_NANOS} ns), got {duration} ns"
            ));
        }
        let start = i128::from(span.start_unix_nanos);
        let end = i128::from(span.end_unix_nanos);
        let window_start = i128::from(client.start_unix_nanos) - CLOCK_TOLERANCE_NANOS;
        let window_end = i128::from(client.end_unix_nanos) + CLOCK_TOLERANCE_NANOS;
        if start < window_start || end > window_end {
            self.failures.push(format!(
                "wall clock: span [{start}, {end}] is outside the client's window [{}, {}] (±{CLOCK_TOLERANCE_NANOS} ns): \
                 start offset {} ns, end offset {} ns",
                client.start_unix_nanos,
                client.end_unix_nanos,
                start - i128::from(client.start_unix_nanos),
                end - i128::from(client.end_unix_nanos)
            ));
        }
        self
    }

    /// Panics listing every failed check (if any) with the whole span.
    pub fn finish(&mut self) {
        if !self.failures.is_empty() {
            let list: Vec<String> = self.failures.iter().map(|f| format!("  - {f}")).collect();
            panic!(
                "{}: {} check(s) failed:\n{}\nthe span:\n{}",
                self.what,
                self.failures.len(),
                list.join("\n"),
                self.span
            );
        }
    }
}

/// Soft assertions over a whole test (many spans, requests, counters): every failure is
/// collected, then [`Failures::finish`] panics once listing all of them, so one run shows
/// everything that went wrong.
#[derive(Debug, Default)]
pub struct Failures(Vec<String>);

impl Failures {
    pub fn add(&mut self, what: impl Into<String>) {
        self.0.push(what.into());
    }

    pub fn check(&mut self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            self.0.push(what());
        }
    }

    /// Panics listing every failure (if any), numbered, under the name of `test`.
    pub fn finish(self, test: &str) {
        if !self.0.is_empty() {
            let list: Vec<String> = self
                .0
                .iter()
                .enumerate()
                .map(|(i, f)| format!("({}) {f}", i + 1))
                .collect();
            panic!(
                "{test}: {} failure(s):\n{}",
                self.0.len(),
                list.join("\n\n")
            );
        }
    }
}

fn show(value: Option<&AttrValue>) -> String {
    match value {
        None => "nothing (attribute missing)".to_string(),
        Some(AttrValue::Str(s)) => format!("Str({s:?})"),
        Some(AttrValue::Int(v)) => format!("Int({v})"),
        Some(v) => format!("{v:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_pass_when_empty_and_list_every_failure_otherwise() {
        let mut none = Failures::default();
        none.check(true, || "not reported".to_string());
        none.finish("clean");

        let mut some = Failures::default();
        some.add("first");
        some.check(true, || "not reported".to_string());
        some.check(false, || "second".to_string());
        let panic =
            std::panic::catch_unwind(move || some.finish("dirty")).expect_err("two failures panic");
        let message = panic
            .downcast_ref::<String>()
            .expect("a formatted panic message");
        assert_eq!(message, "dirty: 2 failure(s):\n(1) first\n\n(2) second");
    }
}
