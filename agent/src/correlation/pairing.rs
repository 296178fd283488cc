//! Same-host pairing: when both ends of a connection are traced here, the callee's server
//! span becomes the child of the caller's client span by connection identity, with no header
//! (PostgreSQL, HTTP with injection off).
//!
//! Identity: the connection's two addresses and the request's position on it (both sides see
//! the same requests in the same order), checked by what was asked and by time: both spans
//! must have the same name (method and path template, or the statement's summary: both sides
//! parse the same bytes), and the server's exchange must lie within the client's (one kernel
//! clock). A position alone is not enough: an exchange one side lost (a TLS read the agent
//! missed, a ring buffer loss) shifts every later one on the connection.
//!
//! The callee's span often ends before the caller's client span is final (a client span may
//! wait in the in-process linker), and the callee's own children carry its trace id. So a
//! server span that a local client will claim is held, with every span of its trace, until
//! the pair is made (or a deadline passes); then the trace is renamed to the caller's, and
//! spans of the old trace that arrive later are renamed too.

use std::{collections::VecDeque, net::SocketAddr};

use crate::{
    idmap::IdMap,
    spans::model::{SpanId, SpanRecord, TraceId},
};

/// How long a server span waits for its local client span (kernel ns).
pub const WAIT_NS: u64 = 5_000_000_000;
/// How long a server span whose peer is not (yet) known to be traced here waits: the caller's
/// first write can reach us after the callee's answer (events of two CPUs), so "not known"
/// is not "not local" at once.
pub const GRACE_NS: u64 = 50_000_000;
/// How long a final client span is remembered.
const REMEMBER_NS: u64 = 30_000_000_000;
/// How long a renamed trace is remembered, and how many at most: one is made per pair, and
/// both ends of a busy PostgreSQL pool pair tens of thousands of times a second (30 s of them
/// was a map of a million entries, scanned every tick: pgbench VmHWM 88-96 MiB; with 65,536,
/// forgetting the oldest was still 5 % of the agent's CPU samples). A span of the old trace
/// later than this stays in it (its trace is split, not mis-linked).
const RENAME_MEMORY_NS: u64 = 5_000_000_000;
const MAX_RENAMED: usize = 8_192;
/// Bounds on what is held: beyond them the oldest is released as is.
const MAX_WAITING: usize = 10_000;
const MAX_HELD_PER_TRACE: usize = 1_000;

/// A request's identity on a connection: (client address, server address, position).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PairKey {
    pub client: SocketAddr,
    pub server: SocketAddr,
    pub seq: u64,
}

#[derive(Clone, Copy)]
struct ClientEnd {
    trace_id: TraceId,
    span_id: SpanId,
    start: u64,
    end: u64,
    seen: u64,
    /// What was asked: a hash of the span's name.
    asked: u64,
}

fn asked(span: &SpanRecord) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    span.name.hash(&mut h);
    h.finish()
}

struct Waiting {
    span: SpanRecord,
    deadline: u64,
    /// The peer was known to be traced here: not pairing it is worth counting.
    expected: bool,
}

/// What happened, for counting.
#[derive(Default, Debug, PartialEq, Eq)]
pub struct PairingReport {
    pub paired: u64,
    /// A server span waited for a local client span that never matched.
    pub unpaired: u64,
}

#[derive(Default)]
pub struct Pairing {
    clients: IdMap<PairKey, ClientEnd>,
    waiting: IdMap<PairKey, Waiting>,
    /// Traces whose root waits for its pair: their spans are held.
    held: IdMap<TraceId, Vec<SpanRecord>>,
    /// Renamed traces: old id → (new id, forget after).
    renamed: IdMap<TraceId, (TraceId, u64)>,
    /// The same (old id, forget after), oldest first.
    rename_order: VecDeque<(TraceId, u64)>,
    pub report: PairingReport,
    /// This kernel stamps writes when they return (no `tcp_sendmsg_locked`): a server's last
    /// write may be stamped after its client read the answer, by however long the server
    /// took to return (4 ms seen in an emulated 6.1 guest).
    pub ends_at_return: bool,
}

impl Pairing {
    /// A server span. `key`: its request's identity when the connection was followed from
    /// its start; `peer_is_local`: the other end is a connection traced here.
    pub fn server_span(
        &mut self,
        key: Option<PairKey>,
        peer_is_local: bool,
        mut span: SpanRecord,
        now: u64,
        out: &mut Vec<SpanRecord>,
    ) {
        // A span of an invalid trace never has other spans held or renamed into it.
        let Some(key) = key.filter(|_| span.parent_span_id.is_none() && span.trace_id.is_valid())
        else {
            self.pass(span, out);
            return;
        };
        if let Some(client) = self.clients.get(&key).copied()
            && encloses(&client, &span, self.ends_at_return)
        {
            self.clients.remove(&key);
            self.join(&mut span, &client, now);
            self.pass(span, out);
            return;
        }
        // A peer not known to be traced here can still be, on a connection's first request
        // only: later, its connection would be known.
        if (!peer_is_local && key.seq > 0) || self.waiting.len() >= MAX_WAITING {
            self.pass(span, out);
            return;
        }
        self.held.entry(span.trace_id).or_default();
        let wait = if peer_is_local { WAIT_NS } else { GRACE_NS };
        let earlier = self.waiting.insert(
            key,
            Waiting {
                span,
                deadline: now.saturating_add(wait),
                expected: peer_is_local,
            },
        );
        if let Some(w) = earlier {
            // Same identity twice (addresses reused quickly): the older one goes as is.
            self.report.unpaired += u64::from(w.expected);
            self.release(w.span, out);
        }
    }

    /// A client span whose ids are final. `key` as for [`Pairing::server_span`].
    pub fn client_span(
        &mut self,
        key: Option<PairKey>,
        span: SpanRecord,
        now: u64,
        out: &mut Vec<SpanRecord>,
    ) {
        // A client span with an invalid id adopts nobody: its ids would spread.
        let key = key.filter(|_| span.trace_id.is_valid() && span.span_id.is_valid());
        if let Some(key) = key {
            let mut client = ClientEnd {
                trace_id: span.trace_id,
                span_id: span.span_id,
                start: span.start_unix_nanos,
                end: span.end_unix_nanos,
                seen: now,
                asked: asked(&span),
            };
            // The client's own trace may be renamed already (it waits for its own pair).
            client.trace_id = self.final_trace(client.trace_id);
            match self.waiting.remove(&key) {
                Some(w) if encloses(&client, &w.span, self.ends_at_return) => {
                    let mut server = w.span;
                    let old = server.trace_id;
                    self.join(&mut server, &client, now);
                    let spans = self.held.remove(&old).unwrap_or_default();
                    self.pass(server, out);
                    for s in spans {
                        self.pass(s, out);
                    }
                }
                Some(w) => {
                    // Same position, not the same exchange: the server span goes as is.
                    self.release(w.span, out);
                    self.report.unpaired += 1;
                }
                None => {
                    self.clients.insert(key, client);
                }
            }
        }
        self.pass(span, out);
    }

    /// Any other span: renamed if its trace was, held if its trace waits.
    pub fn pass(&mut self, mut span: SpanRecord, out: &mut Vec<SpanRecord>) {
        if self.held.is_empty() && self.renamed.is_empty() {
            out.push(span);
            return;
        }
        span.trace_id = self.final_trace(span.trace_id);
        if let Some(list) = self.held.get_mut(&span.trace_id)
            && list.len() < MAX_HELD_PER_TRACE
        {
            list.push(span);
            return;
        }
        out.push(span);
    }

    /// Releases what waited too long (`now` in kernel ns; `None`: everything) and forgets old
    /// client spans and renames.
    pub fn tick(&mut self, now: Option<u64>, out: &mut Vec<SpanRecord>) {
        if self.waiting.is_empty() && self.clients.is_empty() && self.renamed.is_empty() {
            return;
        }
        let expired: Vec<PairKey> = self
            .waiting
            .iter()
            .filter(|(_, w)| now.is_none_or(|n| w.deadline <= n))
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            if let Some(w) = self.waiting.remove(&key) {
                self.report.unpaired += u64::from(w.expected);
                self.release(w.span, out);
            }
        }
        let now = now.unwrap_or(u64::MAX);
        self.clients
            .retain(|_, c| c.seen.saturating_add(REMEMBER_NS) > now);
        while self
            .rename_order
            .front()
            .is_some_and(|(_, until)| *until <= now)
        {
            self.forget_oldest_rename();
        }
    }

    fn forget_oldest_rename(&mut self) {
        if let Some((old, until)) = self.rename_order.pop_front()
            // Renamed again since: that later entry has its own place in the order.
            && self.renamed.get(&old).is_some_and(|(_, u)| *u == until)
        {
            self.renamed.remove(&old);
        }
    }

    /// A waiting server span goes out unpaired, with the spans held for its trace.
    fn release(&mut self, span: SpanRecord, out: &mut Vec<SpanRecord>) {
        let spans = self.held.remove(&span.trace_id).unwrap_or_default();
        out.push(span);
        out.extend(spans);
    }

    fn join(&mut self, server: &mut SpanRecord, client: &ClientEnd, now: u64) {
        if server.trace_id != client.trace_id {
            if self.rename_order.len() >= MAX_RENAMED {
                self.forget_oldest_rename();
            }
            let until = now.saturating_add(RENAME_MEMORY_NS);
            self.renamed
                .insert(server.trace_id, (client.trace_id, until));
            self.rename_order.push_back((server.trace_id, until));
        }
        server.trace_id = client.trace_id;
        server.parent_span_id = Some(client.span_id);
        server.parent_is_remote = true;
        self.report.paired += 1;
    }

    fn final_trace(&self, mut trace: TraceId) -> TraceId {
        // Chains are short (one rename per hop); the bound only guards against a cycle.
        for _ in 0..16 {
            match self.renamed.get(&trace) {
                Some((next, _)) if *next != trace => trace = *next,
                _ => break,
            }
        }
        trace
    }
}

/// Writes are stamped before their bytes leave (a message's start at its write's first chunk,
/// its end at the last) and reads after they arrived, so the server's exchange normally lies
/// inside the client's. Kernels without `tcp_sendmsg_locked`, and writes the kernel could not
/// stamp so (counted), are stamped when the syscall returns: the ends may cross by a little;
/// the request's position on the connection is what identifies the pair.
const CLOCK_SLACK_NS: u64 = 2_000_000;

/// The server's exchange lies within the client's (same host, one clock), give or take the
/// stamping slack. Where writes are stamped at their return the server's end says nothing;
/// that it began before the client had its answer still tells a request from the next one
/// on the connection (which the server can only read after the client had this answer).
/// Whatever the stamps, the server read the request before the client had the answer: no slack
/// there (a shifted pair, the server's next exchange, began after the client's ended).
fn encloses(client: &ClientEnd, server: &SpanRecord, ends_at_return: bool) -> bool {
    if client.asked != asked(server) || server.start_unix_nanos > client.end {
        return false;
    }
    let began_within = client.start <= server.start_unix_nanos.saturating_add(CLOCK_SLACK_NS);
    let end = if ends_at_return {
        server.start_unix_nanos
    } else {
        server.end_unix_nanos
    };
    began_within && end <= client.end.saturating_add(CLOCK_SLACK_NS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{correlation::test_span, spans::model::SpanKind};

    fn span(trace: u8, id: u8, parent: Option<u8>, start: u64, end: u64) -> SpanRecord {
        test_span(trace, id, parent, SpanKind::Server, (start, end))
    }

    fn key(seq: u64) -> PairKey {
        PairKey {
            client: "127.0.0.1:40000".parse().expect("addr"),
            server: "127.0.0.1:5432".parse().expect("addr"),
            seq,
        }
    }

    #[test]
    fn server_first_waits_then_joins_the_client_trace_with_its_children() {
        let mut p = Pairing::default();
        let mut out = Vec::new();
        // The callee's server span (trace 2) ends first; a child of it arrives later.
        p.server_span(Some(key(0)), true, span(2, 20, None, 110, 190), 1, &mut out);
        p.pass(span(2, 21, Some(20), 120, 130), &mut out);
        assert!(out.is_empty(), "held until the client span is final");
        // The caller's client span (trace 1) becomes final.
        p.client_span(Some(key(0)), span(1, 10, Some(9), 100, 200), 2, &mut out);
        assert_eq!(out.len(), 3);
        assert!(out.iter().all(|s| s.trace_id == TraceId([1; 16])));
        let server = out
            .iter()
            .find(|s| s.span_id == SpanId([20; 8]))
            .expect("server");
        assert_eq!(server.parent_span_id, Some(SpanId([10; 8])));
        // A late span of the callee's old trace is renamed as well.
        out.clear();
        p.pass(span(2, 22, Some(20), 140, 150), &mut out);
        assert_eq!(out[0].trace_id, TraceId([1; 16]));
        assert_eq!(p.report.paired, 1);
    }

    /// Pairs `p` once (server span of trace `old`, client span of trace `new`) at `now`.
    fn pair_once(p: &mut Pairing, seq: u64, old: [u8; 16], new: [u8; 16], now: u64) {
        let mut out = Vec::new();
        let mut server = span(0, 20, None, 110, 190);
        server.trace_id = TraceId(old);
        let mut client = span(0, 10, Some(9), 100, 200);
        client.trace_id = TraceId(new);
        p.server_span(Some(key(seq)), true, server, now, &mut out);
        p.client_span(Some(key(seq)), client, now, &mut out);
        assert!(out.iter().all(|s| s.trace_id == TraceId(new)));
    }

    fn late_span_trace(p: &mut Pairing, old: [u8; 16]) -> TraceId {
        let mut late = span(0, 22, Some(20), 140, 150);
        late.trace_id = TraceId(old);
        let mut out = Vec::new();
        p.pass(late, &mut out);
        out[0].trace_id
    }

    #[test]
    fn a_rename_is_forgotten_after_its_memory_time() {
        let mut p = Pairing::default();
        pair_once(&mut p, 0, [2; 16], [1; 16], 1);
        p.tick(Some(RENAME_MEMORY_NS), &mut Vec::new());
        assert_eq!(late_span_trace(&mut p, [2; 16]), TraceId([1; 16]));
        p.tick(Some(RENAME_MEMORY_NS + 1), &mut Vec::new());
        assert_eq!(late_span_trace(&mut p, [2; 16]), TraceId([2; 16]));
        assert!(p.renamed.is_empty() && p.rename_order.is_empty());
    }

    #[test]
    fn renames_are_bounded_oldest_first() {
        let mut p = Pairing::default();
        let id = |n: usize| {
            let mut t = [0x80; 16];
            t[..8].copy_from_slice(&(n as u64).to_be_bytes());
            t
        };
        for n in 0..=MAX_RENAMED {
            pair_once(&mut p, n as u64, id(n), [1; 16], 1);
        }
        assert_eq!(p.renamed.len(), MAX_RENAMED);
        assert_eq!(late_span_trace(&mut p, id(0)), TraceId(id(0)));
        assert_eq!(late_span_trace(&mut p, id(1)), TraceId([1; 16]));
        assert_eq!(late_span_trace(&mut p, id(MAX_RENAMED)), TraceId([1; 16]));
    }

    #[test]
    fn late_server_ends_pair_only_where_writes_are_stamped_at_return() {
        // The server's last write returned 4 ms after its client read the answer.
        let slow_return = 4_000_000 + 200;
        for (ends_at_return, pairs) in [(false, false), (true, true)] {
            let mut p = Pairing {
                ends_at_return,
                ..Pairing::default()
            };
            let mut out = Vec::new();
            p.client_span(Some(key(0)), span(1, 10, None, 100, 200), 1, &mut out);
            p.server_span(
                Some(key(0)),
                true,
                span(2, 20, None, 110, slow_return),
                2,
                &mut out,
            );
            assert_eq!(
                p.report.paired,
                u64::from(pairs),
                "ends at return: {ends_at_return}"
            );
        }
        // A server span that began after its client had the answer (the next request, were
        // the positions off by one) never pairs.
        let mut p = Pairing {
            ends_at_return: true,
            ..Pairing::default()
        };
        let mut out = Vec::new();
        p.client_span(Some(key(0)), span(1, 10, None, 100, 200), 1, &mut out);
        p.server_span(
            Some(key(0)),
            true,
            span(
                2,
                20,
                None,
                200 + CLOCK_SLACK_NS + 1,
                200 + CLOCK_SLACK_NS + 50,
            ),
            2,
            &mut out,
        );
        assert_eq!(p.report.paired, 0);
    }

    #[test]
    fn client_first_is_remembered() {
        let mut p = Pairing::default();
        let mut out = Vec::new();
        p.client_span(Some(key(3)), span(1, 10, None, 100, 200), 1, &mut out);
        p.server_span(Some(key(3)), true, span(2, 20, None, 110, 190), 2, &mut out);
        let server = out
            .iter()
            .find(|s| s.span_id == SpanId([20; 8]))
            .expect("server");
        assert_eq!(server.trace_id, TraceId([1; 16]));
        assert_eq!(server.parent_span_id, Some(SpanId([10; 8])));
    }

    #[test]
    fn no_pair_without_time_containment_or_with_a_header_parent() {
        let mut p = Pairing::default();
        let mut out = Vec::new();
        p.client_span(Some(key(0)), span(1, 10, None, 100, 200), 1, &mut out);
        // Well outside the client's interval: a different exchange.
        p.server_span(
            Some(key(0)),
            false,
            span(2, 20, None, 30_000_000, 40_000_000),
            2,
            &mut out,
        );
        p.tick(Some(2 + GRACE_NS), &mut out);
        let server = out
            .iter()
            .find(|s| s.span_id == SpanId([20; 8]))
            .expect("server");
        assert_eq!(server.parent_span_id, None);
        assert_eq!(p.report.unpaired, 0, "its peer was not known to be local");
        // A server span with a parent from a header is never re-parented.
        p.client_span(Some(key(1)), span(1, 11, None, 100, 200), 3, &mut out);
        p.server_span(
            Some(key(1)),
            true,
            span(3, 30, Some(7), 110, 190),
            4,
            &mut out,
        );
        let s = out
            .iter()
            .find(|s| s.span_id == SpanId([30; 8]))
            .expect("server");
        assert_eq!(s.parent_span_id, Some(SpanId([7; 8])));
    }

    #[test]
    fn spans_with_invalid_ids_never_pair() {
        let mut p = Pairing::default();
        let mut out = Vec::new();
        // A client span on a zero trace id adopts nobody.
        p.client_span(Some(key(0)), span(0, 10, None, 100, 200), 1, &mut out);
        p.server_span(Some(key(0)), true, span(2, 20, None, 110, 190), 2, &mut out);
        p.tick(None, &mut out);
        let server = out
            .iter()
            .find(|s| s.span_id == SpanId([20; 8]))
            .expect("server");
        assert_eq!(server.trace_id, TraceId([2; 16]));
        assert_eq!(server.parent_span_id, None);
        // A server span on a zero trace id holds nothing back and is renamed by nobody.
        out.clear();
        p.server_span(Some(key(1)), true, span(0, 30, None, 110, 190), 3, &mut out);
        assert_eq!(out.len(), 1, "passed at once");
        p.pass(span(0, 31, Some(30), 120, 130), &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(p.report.paired, 0);
    }

    #[test]
    fn a_waiting_server_span_is_released_after_the_deadline() {
        let mut p = Pairing::default();
        let mut out = Vec::new();
        p.server_span(Some(key(0)), true, span(2, 20, None, 110, 190), 0, &mut out);
        p.pass(span(2, 21, Some(20), 120, 130), &mut out);
        p.tick(Some(WAIT_NS - 1), &mut out);
        assert!(out.is_empty());
        p.tick(Some(WAIT_NS), &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(p.report.unpaired, 1);
    }

    #[test]
    fn a_client_whose_write_arrives_after_the_answer_still_pairs() {
        let mut p = Pairing::default();
        let mut out = Vec::new();
        // The callee's span comes before any event of the caller's connection.
        p.server_span(
            Some(key(0)),
            false,
            span(2, 20, None, 110, 190),
            1,
            &mut out,
        );
        assert!(out.is_empty(), "held for the grace period");
        p.client_span(Some(key(0)), span(1, 10, None, 100, 200), 2, &mut out);
        let server = out
            .iter()
            .find(|s| s.span_id == SpanId([20; 8]))
            .expect("server");
        assert_eq!(server.parent_span_id, Some(SpanId([10; 8])));
    }

    #[test]
    fn ends_stamped_on_two_cpus_may_cross_a_little() {
        let mut p = Pairing::default();
        let mut out = Vec::new();
        // The callee's last write was stamped 13 µs after the caller read it.
        p.client_span(
            Some(key(0)),
            span(1, 10, None, 1_000_000, 1_918_000),
            1,
            &mut out,
        );
        p.server_span(
            Some(key(0)),
            true,
            span(2, 20, None, 1_084_000, 1_931_000),
            2,
            &mut out,
        );
        let server = out
            .iter()
            .find(|s| s.span_id == SpanId([20; 8]))
            .expect("server");
        assert_eq!(server.parent_span_id, Some(SpanId([10; 8])));
    }

    #[test]
    fn a_shifted_pair_is_refused_by_what_was_asked_and_by_time() {
        // One side lost an exchange: the server's second request holds the client's first
        // position. Another request: refused by its name, whatever the times.
        let mut p = Pairing::default();
        let mut out = Vec::new();
        let mut client = span(1, 10, None, 100, 2_000_000);
        client.name = "GET /hello.txt".into();
        p.client_span(Some(key(0)), client, 1, &mut out);
        let mut server = span(2, 20, None, 200, 1_900_000);
        server.name = "GET /large.bin".into();
        p.server_span(Some(key(0)), true, server, 2, &mut out);
        assert_eq!(p.report.paired, 0);
        // The same request again (a repeated GET), begun 458 µs after the client had its
        // answer (within the stamping slack): the server read it after, so not this one.
        let mut p = Pairing::default();
        let mut client = span(1, 11, None, 100, 1_000_000);
        client.name = "GET /hello.txt".into();
        p.client_span(Some(key(0)), client.clone(), 1, &mut out);
        let mut server = span(2, 21, None, 1_458_000, 1_700_000);
        server.name = "GET /hello.txt".into();
        p.server_span(Some(key(0)), true, server.clone(), 2, &mut out);
        assert_eq!(p.report.paired, 0);
        // Begun while the client waited: paired.
        let mut p = Pairing::default();
        p.client_span(Some(key(0)), client, 1, &mut out);
        server.start_unix_nanos = 300_000;
        server.end_unix_nanos = 900_000;
        p.server_span(Some(key(0)), true, server, 2, &mut out);
        assert_eq!(p.report.paired, 1);
    }

    #[test]
    fn chained_pairs_rename_through() {
        let mut p = Pairing::default();
        let mut out = Vec::new();
        let k2 = PairKey {
            seq: 0,
            client: "127.0.0.1:40001".parse().expect("addr"),
            server: "127.0.0.1:8080".parse().expect("addr"),
        };
        // B (trace 2) waits for A's client; B's own client call (trace 2) pairs C (trace 3).
        p.server_span(Some(key(0)), true, span(2, 20, None, 110, 190), 1, &mut out);
        p.server_span(Some(k2), true, span(3, 30, None, 130, 150), 1, &mut out);
        p.client_span(Some(k2), span(2, 21, Some(20), 120, 160), 2, &mut out);
        assert!(out.is_empty(), "all of trace 2 waits for A");
        p.client_span(Some(key(0)), span(1, 10, None, 100, 200), 3, &mut out);
        assert_eq!(out.len(), 4, "{out:#?}");
        assert!(
            out.iter().all(|s| s.trace_id == TraceId([1; 16])),
            "{out:#?}"
        );
    }
}
