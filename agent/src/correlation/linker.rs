//! In-process linking: a client span made by a thread while it served a request becomes the
//! child of that request's server span (thread-per-request servers).
//!
//! Server spans are known only once their response ends, after the client calls they caused.
//! So a client span made on a thread that has been serving is held for a short while; then, if
//! exactly one server span of that thread encloses it in time, it joins that span's trace.
//! Several candidates (an event loop serving concurrent requests) is ambiguous: we do not
//! guess, the client span stays a root and the case is counted. So is any client span of a
//! thread that served overlapping requests within the trace age: on such a thread the
//! enclosing server spans known when a client span is decided need not be all of them (one may
//! not have ended yet, older ones leave the bounded history), and a single survivor would be a
//! guess.

use std::collections::VecDeque;

use crate::{
    idmap::IdMap,
    spans::model::{SpanId, SpanRecord, TraceId},
};

/// How long a client span waits for its enclosing server span to end (kernel ns).
pub const HOLD_NS: u64 = 1_000_000_000;
/// Server spans remembered per thread for matching.
const RECENT_SERVERS: usize = 64;
/// Held client spans per thread before the oldest is released unlinked.
const MAX_HELD: usize = 1024;

#[derive(Clone, Copy)]
struct ServerInterval {
    start: u64,
    end: u64,
    trace_id: TraceId,
    span_id: SpanId,
}

struct Held {
    span: SpanRecord,
    start: u64,
    end: u64,
}

#[derive(Default)]
struct ThreadState {
    /// Kernel time of the latest request bytes this thread received as a server.
    serving_since: Option<u64>,
    servers: VecDeque<ServerInterval>,
    held: VecDeque<Held>,
    /// Latest end of a server span of this thread (kernel ns).
    latest_end: u64,
    /// Start of the latest server span that overlapped an earlier one: the thread serves
    /// several requests at once.
    overlap_at: Option<u64>,
}

/// What happened to a released client span.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkOutcome {
    Linked,
    Ambiguous,
    Unlinked,
    /// The serving request was too old or had adopted its maximum of client spans.
    Bounded,
}

pub struct Linker {
    threads: IdMap<(u32, u32), ThreadState>,
    /// Processes whose threads do not stand for the request they read (Go: goroutines move
    /// between threads): their client spans are never linked by thread.
    threadless: std::collections::HashSet<u32>,
    enabled: bool,
    limits: Limits,
}

/// Bounded adoption, so a long-lived request cannot grow a mega-trace.
struct Limits {
    /// A server span older than this (client start − server start) adopts no client span.
    max_age_ns: u64,
    /// Client spans one server span adopts at most.
    max_children: u32,
    /// Client spans adopted so far, per server span (pruned with the threads).
    children: IdMap<SpanId, u32>,
}

impl Default for Linker {
    fn default() -> Self {
        Self {
            threads: IdMap::default(),
            threadless: std::collections::HashSet::new(),
            enabled: true,
            limits: Limits {
                max_age_ns: 300_000_000_000,
                max_children: 1000,
                children: IdMap::default(),
            },
        }
    }
}

impl Linker {
    pub fn set_enabled(&mut self, on: bool) {
        self.enabled = on;
    }

    /// Bounded adoption: no linking into a request older than `max_age_ns`, nor beyond
    /// `max_children` client spans per request.
    pub fn set_bounds(&mut self, max_age_ns: u64, max_children: u32) {
        self.limits.max_age_ns = max_age_ns;
        self.limits.max_children = max_children;
    }

    /// A client span was linked to `parent` in the kernel: it counts against the same bound
    /// (a request's calls are linked by either mechanism, `--max-spans-per-trace` in all).
    pub fn adopted_in_kernel(&mut self, parent: SpanId) {
        *self.limits.children.entry(parent).or_default() += 1;
    }

    /// Whether `pid`'s threads stand for the request they read (true unless told otherwise).
    pub fn set_threads_serve(&mut self, pid: u32, serve: bool) {
        if serve {
            self.threadless.remove(&pid);
        } else {
            self.threadless.insert(pid);
        }
    }

    /// A server-role connection received request bytes on this thread.
    pub fn note_serving(&mut self, pid: u32, tid: u32, ts: u64) {
        self.threads.entry((pid, tid)).or_default().serving_since = Some(ts);
    }

    /// A server span ended; it may adopt held client spans later (see `release`).
    pub fn server_span(&mut self, pid: u32, tid: u32, start: u64, end: u64, span: &SpanRecord) {
        if !span.trace_id.is_valid() || !span.span_id.is_valid() {
            // Children must never inherit an invalid id.
            return;
        }
        let t = self.threads.entry((pid, tid)).or_default();
        if start < t.latest_end {
            t.overlap_at = Some(start);
        }
        t.latest_end = t.latest_end.max(end);
        if t.servers.len() == RECENT_SERVERS {
            t.servers.pop_front();
        }
        t.servers.push_back(ServerInterval {
            start,
            end,
            trace_id: span.trace_id,
            span_id: span.span_id,
        });
    }

    /// A client span ended. Returned when it cannot have a local parent (the thread never
    /// served); otherwise held until `release`.
    pub fn client_span(
        &mut self,
        pid: u32,
        tid: u32,
        start: u64,
        end: u64,
        span: SpanRecord,
        out: &mut Vec<(SpanRecord, LinkOutcome)>,
    ) {
        if !self.enabled || self.threadless.contains(&pid) {
            out.push((span, LinkOutcome::Unlinked));
            return;
        }
        let Some(t) = self.threads.get_mut(&(pid, tid)) else {
            out.push((span, LinkOutcome::Unlinked));
            return;
        };
        if t.serving_since.is_none() {
            out.push((span, LinkOutcome::Unlinked));
            return;
        }
        if t.held.len() >= MAX_HELD
            && let Some(old) = t.held.pop_front()
        {
            out.push(self.limits.decide(t, old));
        }
        t.held.push_back(Held { span, start, end });
    }

    /// Releases held client spans whose wait is over (`now` in kernel ns), or all with `None`.
    pub fn release(&mut self, now: Option<u64>, out: &mut Vec<(SpanRecord, LinkOutcome)>) {
        for t in self.threads.values_mut() {
            while let Some(h) = t.held.front() {
                if now.is_some_and(|n| h.end.saturating_add(HOLD_NS) > n) {
                    break;
                }
                if let Some(h) = t.held.pop_front() {
                    out.push(self.limits.decide(t, h));
                }
            }
        }
    }

    /// Forget a process's threads (it exited).
    pub fn forget_process(&mut self, pid: u32, out: &mut Vec<(SpanRecord, LinkOutcome)>) {
        self.threadless.remove(&pid);
        let keys: Vec<_> = self
            .threads
            .keys()
            .filter(|(p, _)| *p == pid)
            .copied()
            .collect();
        for k in keys {
            if let Some(mut t) = self.threads.remove(&k) {
                while let Some(h) = t.held.pop_front() {
                    out.push(self.limits.decide(&t, h));
                }
            }
        }
    }

    /// Drop state of threads idle for long (nothing held, last server long ago).
    pub fn prune(&mut self, now: u64, idle_ns: u64) {
        if self.threads.is_empty() {
            self.limits.children.clear();
        }
        if self.limits.children.len() > 100_000 {
            // Counts of long-finished requests; forgetting them only loosens the cap.
            self.limits.children.clear();
        }
        self.threads.retain(|_, t| {
            !t.held.is_empty()
                || t.serving_since
                    .is_some_and(|s| s.saturating_add(idle_ns) > now)
                || t.servers
                    .back()
                    .is_some_and(|s| s.end.saturating_add(idle_ns) > now)
        });
    }
}

impl Limits {
    fn decide(&mut self, thread: &ThreadState, held: Held) -> (SpanRecord, LinkOutcome) {
        if thread
            .overlap_at
            .is_some_and(|o| held.start < o.saturating_add(self.max_age_ns))
        {
            return (held.span, LinkOutcome::Ambiguous);
        }
        let mut found: Option<ServerInterval> = None;
        let mut count = 0;
        for s in &thread.servers {
            if s.start <= held.start && held.end <= s.end {
                count += 1;
                found = Some(*s);
            }
        }
        let mut span = held.span;
        match (count, found) {
            (1, Some(parent)) => {
                let adopted = self.children.entry(parent.span_id).or_default();
                if held.start.saturating_sub(parent.start) >= self.max_age_ns
                    || *adopted >= self.max_children
                {
                    return (span, LinkOutcome::Bounded);
                }
                *adopted += 1;
                span.trace_id = parent.trace_id;
                span.parent_span_id = Some(parent.span_id);
                span.parent_is_remote = false;
                (span, LinkOutcome::Linked)
            }
            (0, _) => (span, LinkOutcome::Unlinked),
            _ => (span, LinkOutcome::Ambiguous),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{correlation::test_span, spans::model::SpanKind};

    fn span(id: u8, kind: SpanKind) -> SpanRecord {
        test_span(id, id, None, kind, (0, 0))
    }

    #[test]
    fn client_inside_one_server_is_linked() {
        let mut l = Linker::default();
        let mut out = Vec::new();
        l.note_serving(1, 2, 100);
        l.client_span(1, 2, 200, 300, span(9, SpanKind::Client), &mut out);
        assert!(out.is_empty(), "held while the thread serves");
        l.server_span(1, 2, 100, 400, &span(5, SpanKind::Server));
        l.release(Some(300 + HOLD_NS), &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].1, LinkOutcome::Linked);
        assert_eq!(out[0].0.trace_id, TraceId([5; 16]));
        assert_eq!(out[0].0.parent_span_id, Some(SpanId([5; 8])));
    }

    #[test]
    fn a_process_whose_threads_do_not_serve_is_never_linked_by_thread() {
        let mut l = Linker::default();
        let mut out = Vec::new();
        l.set_threads_serve(1, false);
        l.note_serving(1, 2, 100);
        l.client_span(1, 2, 200, 300, span(9, SpanKind::Client), &mut out);
        assert_eq!(out.len(), 1, "not held: nothing may adopt it");
        assert_eq!(out[0].1, LinkOutcome::Unlinked);
        assert_eq!(out[0].0.parent_span_id, None);
        // Told otherwise (its program changed), thread linking applies again.
        l.set_threads_serve(1, true);
        out.clear();
        l.client_span(1, 2, 200, 300, span(9, SpanKind::Client), &mut out);
        l.server_span(1, 2, 100, 400, &span(5, SpanKind::Server));
        l.release(None, &mut out);
        assert_eq!(out[0].1, LinkOutcome::Linked);
    }

    #[test]
    fn a_server_span_with_an_invalid_id_adopts_nobody() {
        let mut l = Linker::default();
        let mut out = Vec::new();
        l.note_serving(1, 2, 100);
        l.client_span(1, 2, 200, 300, span(9, SpanKind::Client), &mut out);
        l.server_span(1, 2, 100, 400, &span(0, SpanKind::Server));
        l.release(None, &mut out);
        assert_eq!(out[0].1, LinkOutcome::Unlinked);
        assert_eq!(out[0].0.trace_id, TraceId([9; 16]));
        assert_eq!(out[0].0.parent_span_id, None);
    }

    #[test]
    fn thread_that_never_served_is_not_held() {
        let mut l = Linker::default();
        let mut out = Vec::new();
        l.client_span(1, 3, 200, 300, span(9, SpanKind::Client), &mut out);
        assert_eq!(out[0].1, LinkOutcome::Unlinked);
    }

    #[test]
    fn two_enclosing_servers_are_ambiguous() {
        let mut l = Linker::default();
        let mut out = Vec::new();
        l.note_serving(1, 2, 100);
        l.client_span(1, 2, 200, 300, span(9, SpanKind::Client), &mut out);
        l.server_span(1, 2, 100, 400, &span(5, SpanKind::Server));
        l.server_span(1, 2, 150, 500, &span(6, SpanKind::Server));
        l.release(None, &mut out);
        assert_eq!(out[0].1, LinkOutcome::Ambiguous);
        assert_eq!(out[0].0.parent_span_id, None);
    }

    #[test]
    fn not_released_before_hold_time() {
        let mut l = Linker::default();
        let mut out = Vec::new();
        l.note_serving(1, 2, 100);
        l.client_span(1, 2, 200, 300, span(9, SpanKind::Client), &mut out);
        l.release(Some(301), &mut out);
        assert!(out.is_empty());
        l.release(None, &mut out);
        assert_eq!(out[0].1, LinkOutcome::Unlinked);
    }

    /// An event loop: a slow request A (its call written late) and a fast one B overlap. When
    /// the call is decided, only B has ended and encloses it: one candidate, but a guess.
    #[test]
    fn a_thread_that_served_overlapping_requests_links_nothing_by_time_alone() {
        let mut l = Linker::default();
        let mut out = Vec::new();
        l.note_serving(1, 2, 100);
        l.server_span(1, 2, 100, 200, &span(4, SpanKind::Server));
        l.server_span(1, 2, 150, 600, &span(5, SpanKind::Server));
        // A's call, enclosed by B only (A has not ended yet).
        l.client_span(1, 2, 300, 400, span(9, SpanKind::Client), &mut out);
        l.release(None, &mut out);
        assert_eq!(out[0].1, LinkOutcome::Ambiguous);
        assert_eq!(out[0].0.parent_span_id, None);
    }

    #[test]
    fn a_thread_serving_one_request_at_a_time_keeps_linking() {
        let mut l = Linker::default();
        let mut out = Vec::new();
        l.note_serving(1, 2, 100);
        for k in 0..100u64 {
            let base = 1_000 * k;
            l.client_span(
                1,
                2,
                base + 200,
                base + 300,
                span(9, SpanKind::Client),
                &mut out,
            );
            l.server_span(1, 2, base + 100, base + 400, &span(5, SpanKind::Server));
            l.release(None, &mut out);
        }
        assert_eq!(out.len(), 100);
        assert!(out.iter().all(|(_, o)| *o == LinkOutcome::Linked));
    }
}
