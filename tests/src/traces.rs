//! Whole traces: does each request form ONE trace whose spans are linked exactly as the calls
//! happened? A [`Chain`] lists the spans one request must produce (hops) and who the parent of
//! each is; [`Chain::check`] finds them per request and reports every deviation precisely, the
//! trace-completeness figure (share of requests that form one correctly linked trace), and
//! mis-links (a span whose parent, or trace, belongs to ANOTHER request: a wrong guess, worse
//! than no link).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use crate::collector::ReceivedSpan;
use crate::spans::Spans;

/// Who the parent of a hop's span must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parent {
    /// No parent: the trace starts here.
    Root,
    /// The span of hop number `i` of the same request.
    Hop(usize),
}

/// Selects, for request `id`, the spans of one hop.
pub type HopMatcher = Box<dyn Fn(&ReceivedSpan, &str) -> bool>;

/// One span every request must produce.
pub struct Hop {
    pub name: String,
    pub matches: HopMatcher,
    pub parent: Parent,
}

/// Tells which request a span belongs to, if the span says.
pub type RequestOf = Box<dyn Fn(&ReceivedSpan) -> Option<String>>;

/// The spans one request produces, in call order, with their parents.
pub struct Chain {
    /// What the chain is, for messages (e.g. `nginx → python → node → postgresql`).
    pub label: String,
    pub hops: Vec<Hop>,
    /// The request a span belongs to, if it tells (for mis-link detection and messages).
    pub request_of: RequestOf,
}

/// The verdict for one request.
#[derive(Debug, Clone)]
pub struct RequestTrace<'a> {
    pub id: String,
    /// The span found for each hop (exactly one), `None` when missing or ambiguous.
    pub hops: Vec<Option<&'a ReceivedSpan>>,
    /// Everything wrong; empty when the request formed one correctly linked trace.
    pub problems: Vec<String>,
}

impl RequestTrace<'_> {
    pub fn complete(&self) -> bool {
        self.problems.is_empty()
    }
}

/// The verdicts of every request, and the spans they were judged on.
pub struct ChainReport<'a> {
    pub label: String,
    pub hop_names: Vec<String>,
    pub requests: Vec<RequestTrace<'a>>,
    /// Links (parent ids, shared trace ids) between spans of different requests.
    pub mislinks: Vec<String>,
    spans: &'a Spans,
    request_of: &'a dyn Fn(&ReceivedSpan) -> Option<String>,
}

impl<'a> ChainReport<'a> {
    /// Requests that formed one correctly linked trace.
    pub fn complete(&self) -> usize {
        self.requests.iter().filter(|r| r.complete()).count()
    }

    /// complete / requests (0 when there were no requests).
    pub fn completeness(&self) -> f64 {
        if self.requests.is_empty() {
            0.0
        } else {
            self.complete() as f64 / self.requests.len() as f64
        }
    }

    /// How often each kind of problem occurred (the text before the first `:`), e.g. to print
    /// what most incomplete traces lack.
    pub fn problem_counts(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for r in &self.requests {
            let kinds: BTreeSet<String> = r
                .problems
                .iter()
                .map(|p| p.split(':').next().unwrap_or(p).to_string())
                .collect();
            for k in kinds {
                *counts.entry(k).or_insert(0) += 1;
            }
        }
        counts
    }

    /// Per parent edge (hop with a parent hop): (`child ← parent`, requests where the child's
    /// parent is exactly that span, requests where both spans were found).
    pub fn edge_stats(&self, chain: &Chain) -> Vec<(String, usize, usize)> {
        chain
            .hops
            .iter()
            .enumerate()
            .filter_map(|(i, hop)| match hop.parent {
                Parent::Hop(p) => Some((i, p)),
                Parent::Root => None,
            })
            .map(|(i, p)| {
                let mut linked = 0;
                let mut both = 0;
                for r in &self.requests {
                    if let (Some(child), Some(parent)) = (r.hops[i], r.hops[p]) {
                        both += 1;
                        if child.parent_span_id.as_deref() == Some(parent.span_id.as_str())
                            && child.trace_id == parent.trace_id
                        {
                            linked += 1;
                        }
                    }
                }
                (
                    format!("{} <- {}", chain.hops[i].name, chain.hops[p].name),
                    linked,
                    both,
                )
            })
            .collect()
    }

    /// [`ChainReport::edge_stats`] as lines `  linked/both (pct) child <- parent`.
    pub fn describe_edges(&self, chain: &Chain) -> String {
        let mut out = String::new();
        for (edge, linked, both) in self.edge_stats(chain) {
            let pct = if both == 0 {
                0.0
            } else {
                100.0 * linked as f64 / both as f64
            };
            let _ = writeln!(out, "  {linked:>4}/{both:<4} ({pct:5.1}%) {edge}");
        }
        out
    }

    /// One line: `label: 17/20 requests (85.0%) formed one correctly linked trace`.
    pub fn headline(&self) -> String {
        format!(
            "{}: {}/{} requests ({:.1}%) formed one correctly linked trace; {} mis-link(s)",
            self.label,
            self.complete(),
            self.requests.len(),
            100.0 * self.completeness(),
            self.mislinks.len()
        )
    }

    /// The headline, counts of problem kinds, then for up to `max` failing requests their
    /// problems and every span that belongs to them.
    pub fn describe_failures(&self, max: usize) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "{}", self.headline());
        let _ = writeln!(out, "expected hops, per request:");
        for (i, name) in self.hop_names.iter().enumerate() {
            let _ = writeln!(out, "  [{i}] {name}");
        }
        let counts = self.problem_counts();
        if !counts.is_empty() {
            let _ = writeln!(out, "problems (number of requests with each):");
            for (k, n) in &counts {
                let _ = writeln!(out, "  {n:>4} x {k}");
            }
        }
        for m in self.mislinks.iter().take(max) {
            let _ = writeln!(out, "MIS-LINK: {m}");
        }
        for r in self.requests.iter().filter(|r| !r.complete()).take(max) {
            let _ = writeln!(out, "request {}:", r.id);
            for p in &r.problems {
                let _ = writeln!(out, "  - {p}");
            }
            let _ = writeln!(out, "  its spans (by start time):");
            let mut own: Vec<&ReceivedSpan> = self
                .spans
                .iter()
                .filter(|s| (self.request_of)(s).as_deref() == Some(r.id.as_str()))
                .collect();
            own.sort_by_key(|s| s.start_unix_nanos);
            for s in own {
                let _ = writeln!(out, "    {}", s.summary());
            }
        }
        out
    }
}

impl Chain {
    /// Judges every request in `ids` on `spans`.
    pub fn check<'a>(&'a self, spans: &'a Spans, ids: &[String]) -> ChainReport<'a> {
        let requests = ids.iter().map(|id| self.check_one(spans, id)).collect();
        ChainReport {
            label: self.label.clone(),
            hop_names: self.hops.iter().map(|h| h.name.clone()).collect(),
            requests,
            mislinks: self.mislinks(spans),
            spans,
            request_of: &*self.request_of,
        }
    }

    fn check_one<'a>(&self, spans: &'a Spans, id: &str) -> RequestTrace<'a> {
        let mut problems = Vec::new();
        let mut found: Vec<Option<&'a ReceivedSpan>> = Vec::new();
        for hop in &self.hops {
            let candidates: Vec<&ReceivedSpan> =
                spans.iter().filter(|s| (hop.matches)(s, id)).collect();
            match candidates.len() {
                1 => found.push(Some(candidates[0])),
                0 => {
                    problems.push(format!("missing span: {}", hop.name));
                    found.push(None);
                }
                n => {
                    let list: Vec<String> = candidates.iter().map(|s| s.summary()).collect();
                    problems.push(format!(
                        "duplicate spans: {n} spans for {}:\n      {}",
                        hop.name,
                        list.join("\n      ")
                    ));
                    found.push(None);
                }
            }
        }
        // One trace: that of the first hop found.
        let trace = found.iter().flatten().next().map(|s| s.trace_id.clone());
        if let Some(trace) = &trace {
            for (hop, span) in self.hops.iter().zip(&found) {
                if let Some(span) = span
                    && &span.trace_id != trace
                {
                    problems.push(format!(
                        "trace split: {} is in trace {}, the request's first span in trace {trace}",
                        hop.name, span.trace_id
                    ));
                }
            }
        }
        // Parent edges.
        for (hop, span) in self.hops.iter().zip(&found) {
            let Some(span) = span else { continue };
            match &hop.parent {
                Parent::Root => {
                    if let Some(p) = &span.parent_span_id {
                        problems.push(format!(
                            "wrong parent: {} should be the root of the trace, its parent is {p}{}",
                            hop.name,
                            describe_id(spans, p)
                        ));
                    }
                }
                Parent::Hop(i) => {
                    let parent_hop = &self.hops[*i];
                    let Some(parent) = found[*i] else {
                        // Already reported as missing; say what the link points to instead.
                        if span.parent_span_id.is_none() {
                            problems.push(format!(
                                "missing parent edge: {} has no parent (expected {})",
                                hop.name, parent_hop.name
                            ));
                        }
                        continue;
                    };
                    match &span.parent_span_id {
                        None => problems.push(format!(
                            "missing parent edge: {} has no parent, expected {} (span {})",
                            hop.name, parent_hop.name, parent.span_id
                        )),
                        Some(p) if p != &parent.span_id => problems.push(format!(
                            "wrong parent: {} has parent {p}{}, expected {} (span {})",
                            hop.name,
                            describe_id(spans, p),
                            parent_hop.name,
                            parent.span_id
                        )),
                        Some(_) => {}
                    }
                }
            }
        }
        // Nothing else in the trace.
        if let Some(trace) = &trace {
            let ours: BTreeSet<&str> = found.iter().flatten().map(|s| s.span_id.as_str()).collect();
            let extra: Vec<String> = spans
                .iter()
                .filter(|s| &s.trace_id == trace && !ours.contains(s.span_id.as_str()))
                .map(|s| s.summary())
                .collect();
            if !extra.is_empty() {
                problems.push(format!(
                    "extra spans in the trace: {} span(s) in trace {trace} are none of the expected hops:\n      {}",
                    extra.len(),
                    extra.join("\n      ")
                ));
            }
        }
        RequestTrace {
            id: id.to_string(),
            hops: found,
            problems,
        }
    }

    /// Parent links and shared traces between spans of different requests.
    fn mislinks(&self, spans: &Spans) -> Vec<String> {
        let by_id: BTreeMap<&str, &ReceivedSpan> =
            spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
        let mut out = Vec::new();
        let mut trace_owner: BTreeMap<&str, (String, &ReceivedSpan)> = BTreeMap::new();
        for span in spans.iter() {
            let Some(req) = (self.request_of)(span) else {
                continue;
            };
            if let Some(parent) = span.parent_span_id.as_deref().and_then(|p| by_id.get(p))
                && let Some(parent_req) = (self.request_of)(parent)
                && parent_req != req
            {
                out.push(format!(
                    "a span of request {req} has a parent of request {parent_req}:\n      child  {}\n      parent {}",
                    span.summary(),
                    parent.summary()
                ));
            }
            match trace_owner.get(span.trace_id.as_str()) {
                Some((other, first)) if *other != req => out.push(format!(
                    "requests {other} and {req} share trace {}:\n      {}\n      {}",
                    span.trace_id,
                    first.summary(),
                    span.summary()
                )),
                Some(_) => {}
                None => {
                    trace_owner.insert(span.trace_id.as_str(), (req, span));
                }
            }
        }
        out
    }
}

/// ` (= <summary of that span>)` when the id is a received span, else ` (no such span received)`.
fn describe_id(spans: &Spans, id: &str) -> String {
    match spans.iter().find(|s| s.span_id == id) {
        Some(s) => format!(" (= {})", s.summary()),
        None => " (no span with this id was received)".to_string(),
    }
}

/// True when `text` contains `word` not followed by another identifier character: `req_1`
/// matches `AS req_1` but not `AS req_10`.
pub fn contains_word(text: &str, word: &str) -> bool {
    text.match_indices(word).any(|(i, _)| {
        let after = text[i + word.len()..].chars().next();
        let before = text[..i].chars().next_back();
        !after.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
            && !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collector::{AttrValue, SpanKind, SpanStatus};

    fn span(id: &str, trace: &str, parent: Option<&str>, path: &str) -> ReceivedSpan {
        let mut attributes = BTreeMap::new();
        attributes.insert("url.path".to_string(), AttrValue::Str(path.to_string()));
        ReceivedSpan {
            trace_id: trace.to_string(),
            span_id: id.to_string(),
            parent_span_id: parent.map(str::to_string),
            name: format!("GET {path}"),
            kind: SpanKind::Server,
            start_unix_nanos: 1,
            end_unix_nanos: 2,
            attributes,
            status: SpanStatus::Unset,
            status_message: String::new(),
            resource: BTreeMap::new(),
            scope: String::new(),
        }
    }

    fn chain() -> Chain {
        Chain {
            label: "a → b".into(),
            hops: vec![
                Hop {
                    name: "a".into(),
                    matches: Box::new(|s, id| s.attr_str("url.path") == Some(&format!("/a/{id}"))),
                    parent: Parent::Root,
                },
                Hop {
                    name: "b".into(),
                    matches: Box::new(|s, id| s.attr_str("url.path") == Some(&format!("/b/{id}"))),
                    parent: Parent::Hop(0),
                },
            ],
            request_of: Box::new(|s| {
                s.attr_str("url.path")
                    .and_then(|p| p.rsplit('/').next())
                    .map(str::to_string)
            }),
        }
    }

    #[test]
    fn complete_broken_and_mislinked_requests() {
        let spans = Spans(vec![
            // Request 1: linked right.
            span("a1", "t1", None, "/a/1"),
            span("b1", "t1", Some("a1"), "/b/1"),
            // Request 2: b is unlinked (its own trace).
            span("a2", "t2", None, "/a/2"),
            span("b2", "t9", None, "/b/2"),
            // Request 3: b linked to request 1's span: a mis-link.
            span("a3", "t3", None, "/a/3"),
            span("b3", "t1", Some("a1"), "/b/3"),
            // Request 4: nothing.
        ]);
        let c = chain();
        let ids: Vec<String> = ["1", "2", "3", "4"].iter().map(|s| s.to_string()).collect();
        let report = c.check(&spans, &ids);
        // Request 1 is linked right, but request 3's span joined its trace.
        assert_eq!(report.complete(), 0);
        let p1 = report.requests[0].problems.join("\n");
        assert!(p1.starts_with("extra spans in the trace"), "{p1}");
        let p2 = report.requests[1].problems.join("\n");
        assert!(
            p2.contains("trace split") && p2.contains("missing parent edge"),
            "{p2}"
        );
        let p3 = report.requests[2].problems.join("\n");
        assert!(
            p3.contains("wrong parent") && p3.contains("trace split"),
            "{p3}"
        );
        assert_eq!(
            report.requests[3].problems.len(),
            2,
            "{:?}",
            report.requests[3]
        );
        // b3's parent is request 1's; b3 shares request 1's trace.
        assert_eq!(report.mislinks.len(), 2, "{:?}", report.mislinks);
        let text = report.describe_failures(10);
        assert!(text.contains("0/4 requests (0.0%)"), "{text}");
        // b <- a: linked for request 1 only; both spans found for requests 1-3.
        assert_eq!(report.edge_stats(&c), [("b <- a".to_string(), 1, 3)]);
        assert!(text.contains("MIS-LINK"), "{text}");
    }

    #[test]
    fn extra_spans_in_a_trace_are_reported() {
        let spans = Spans(vec![
            span("a1", "t1", None, "/a/1"),
            span("b1", "t1", Some("a1"), "/b/1"),
            span("x", "t1", Some("b1"), "/other"),
        ]);
        let c = chain();
        let report = c.check(&spans, &["1".to_string()]);
        assert!(!report.requests[0].complete());
        assert!(report.requests[0].problems[0].starts_with("extra spans in the trace"));
    }

    #[test]
    fn words() {
        assert!(contains_word("SELECT ? AS req_1", "req_1"));
        assert!(!contains_word("SELECT ? AS req_10", "req_1"));
        assert!(!contains_word("SELECT ? AS xreq_1", "req_1"));
        assert!(contains_word("req_1;", "req_1"));
    }
}
