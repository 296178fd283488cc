//! Trace correlation: which span is whose parent. The pipeline hands every span it builds to
//! the [`Correlator`], the one owner of correlation state: the kernel's ids waiting for their
//! request's exchange (`contexts.rs`), in-process linking (`linker.rs`), same-host pairing
//! (`pairing.rs`), and the last check of ids before the exporter.
//!
//! What it keeps per connection ([`ConnTrace`]) is stored with the connection, so the event
//! path looks a connection up once; only this module reads or changes it.

mod contexts;
mod linker;
mod pairing;

use std::{collections::VecDeque, net::SocketAddr, sync::Arc};

use agent_common::{
    CONTEXT_FLAG_LOCAL_PARENT, CONTEXT_FLAG_NOT_INJECTED, CONTEXT_SERVER, ContextEvent,
    DIR_INGRESS, DataEvent,
};

use self::{
    contexts::KernelContext,
    linker::{HOLD_NS, LinkOutcome, Linker},
    pairing::{PairKey, Pairing},
};
use crate::{
    events::first_ts,
    idmap::IdMap,
    protocols::segment::Role,
    spans::{
        context::IdGenerator,
        http::ConnInfo,
        model::{SpanId, SpanRecord},
    },
    stats::Stats,
};

/// Kernel contexts waiting for their request's exchange, per connection.
const MAX_CONTEXTS_PER_CONNECTION: usize = 64;
/// Server spans remembered as having carried their trace onward, at most (as many as the
/// pipeline follows connections).
const MAX_PROPAGATED: usize = 100_000;
/// How long such a server span is remembered (the pipeline's idle-connection time).
const PROPAGATED_TTL_NS: u64 = 300 * 1_000_000_000;

/// Where finished spans go (the exporter in production, a vector in tests).
pub trait SpanSink {
    fn send(&mut self, span: SpanRecord);
}

impl SpanSink for crate::export::ExportHandle {
    fn send(&mut self, span: SpanRecord) {
        crate::export::ExportHandle::send(self, span);
    }
}

impl SpanSink for Vec<SpanRecord> {
    fn send(&mut self, span: SpanRecord) {
        self.push(span);
    }
}

/// Per connection: the kernel's ids for its requests, and how many exchanges it has had
/// (a request's position on the connection identifies it for same-host pairing).
#[derive(Default)]
pub struct ConnTrace {
    /// Ids the kernel gave requests of this connection, oldest first.
    contexts: VecDeque<KernelContext>,
    exchanges: u64,
}

/// Where and when a span's exchange happened: what correlation needs besides the span.
#[derive(Clone, Copy)]
pub struct Origin {
    pub pid: u32,
    pub tid: u32,
    pub role: Role,
    /// Kernel time of the request's first byte.
    pub start_ns: u64,
    /// Kernel time of the response's last byte (the request's, without a response).
    pub end_ns: u64,
}

pub struct Correlator<S: SpanSink> {
    stats: Arc<Stats>,
    sink: S,
    /// A server context arrives right before the data event of its read (same timestamp).
    server_contexts: IdMap<(u32, u64), ContextEvent>,
    /// Client contexts come from the injector before the write's data event, per thread.
    client_contexts: IdMap<(u32, u32), Vec<ContextEvent>>,
    /// The agent's own canary exchange produces contexts that no data event follows.
    own_pid: u32,
    linker: Linker,
    /// Client spans the linker let go, on their way to pairing.
    released: Vec<(SpanRecord, LinkOutcome)>,
    /// Same-host pairing (None: switched off).
    pairing: Option<Pairing>,
    /// Pair keys of client spans waiting in the linker.
    held_keys: IdMap<SpanId, PairKey>,
    /// Traced connections by (local, remote) address: is a server span's peer traced here?
    by_addresses: IdMap<(SocketAddr, SocketAddr), (u32, u64)>,
    /// Server spans whose trace id the injector already wrote into a call they made (span id
    /// → when): same-host pairing must not rename their trace, or those calls' spans (here or
    /// on other hosts) would be left with a parent in another trace.
    propagated: IdMap<SpanId, u64>,
    /// Latest kernel time seen.
    now: u64,
    /// Spans on their way to the sink.
    ready: Vec<SpanRecord>,
    /// Ids for spans that would leave with a zero id.
    ids: IdGenerator,
}

/// A request's identity on its connection for same-host pairing: the client's and the
/// server's address (seen from either side) and its position; counts the exchange.
fn pair_key(info: ConnInfo, role: Role, exchanges: &mut u64) -> Option<PairKey> {
    let seq = *exchanges;
    *exchanges += 1;
    let (local, remote) = (ConnInfo::known(info.local)?, ConnInfo::known(info.remote)?);
    let (client, server) = match role {
        Role::Client => (local, remote),
        Role::Server => (remote, local),
    };
    Some(PairKey {
        client,
        server,
        seq,
    })
}

/// The kernel context of the request that started at `start_ns` in the role's request
/// direction, or — for a server exchange ending at `end_ns` — the first context a runtime
/// probe opened late within it. Contexts older than it can no longer match (exchanges end in
/// request order): they are dropped and counted.
fn take_context(
    contexts: &mut VecDeque<KernelContext>,
    role: Role,
    start_ns: u64,
    end_ns: u64,
    stats: &Stats,
) -> Option<KernelContext> {
    let server = role == Role::Server;
    let i = contexts
        .iter()
        .position(|c| c.server == server && !c.late && c.ts_ns == start_ns)
        .or_else(|| {
            contexts.iter().position(|c| {
                server && c.server && c.late && c.ts_ns > start_ns && c.ts_ns <= end_ns
            })
        })?;
    let ctx = contexts.remove(i);
    let before = contexts.len();
    contexts.retain(|c| c.server != server || c.ts_ns >= start_ns);
    Stats::add(
        &stats.kernel_contexts_unmatched,
        (before - contexts.len()) as u64,
    );
    ctx
}

/// Last line before the exporter: a span with a zero id gets valid ones. A zero trace id
/// makes it the root of a trace of its own (its parent and trace state belonged to no valid
/// trace); a zero parent is no parent.
fn repair_ids(span: &mut SpanRecord, ids: &mut IdGenerator) {
    if !span.trace_id.is_valid() {
        span.trace_id = ids.trace_id();
        span.parent_span_id = None;
        span.trace_state = None;
    }
    if !span.span_id.is_valid() {
        span.span_id = ids.span_id();
    }
    if span.parent_span_id.is_some_and(|p| !p.is_valid()) {
        span.parent_span_id = None;
    }
    if span.parent_span_id.is_none() {
        span.parent_is_remote = false;
    }
}

impl<S: SpanSink> Correlator<S> {
    pub fn new(stats: Arc<Stats>, sink: S) -> Self {
        Self {
            stats,
            sink,
            server_contexts: IdMap::default(),
            client_contexts: IdMap::default(),
            own_pid: std::process::id(),
            linker: Linker::default(),
            released: Vec::new(),
            pairing: Some(Pairing::default()),
            held_keys: IdMap::default(),
            by_addresses: IdMap::default(),
            propagated: IdMap::default(),
            now: 0,
            ready: Vec::new(),
            ids: IdGenerator::new(),
        }
    }

    /// Switches same-host pairing on or off (on by default); `ends_at_return`: this kernel
    /// stamps writes when they return (see `Pairing::ends_at_return`).
    pub fn pair_same_host(&mut self, on: bool, ends_at_return: bool) {
        self.pairing = on.then(|| {
            let mut p = Pairing::default();
            p.ends_at_return = ends_at_return;
            p
        });
    }

    /// Switches in-process linking in userspace on or off (on by default), and bounds it.
    pub fn link_in_process(&mut self, on: bool, max_age_ns: u64, max_children: u32) {
        self.linker.set_enabled(on);
        self.linker.set_bounds(max_age_ns, max_children);
    }

    /// The spans sent so far.
    #[cfg(test)]
    pub fn sink(&self) -> &S {
        &self.sink
    }

    /// Kernel time moves on (a data event's stamp).
    pub fn advance(&mut self, ts_ns: u64) {
        self.now = self.now.max(ts_ns);
    }

    pub fn on_context(&mut self, ev: ContextEvent) {
        if ev.pid == self.own_pid {
            return;
        }
        if ev.role == CONTEXT_SERVER {
            self.server_contexts.insert((ev.pid, ev.sock_cookie), ev);
        } else {
            // Ids on the wire: the parent's trace went onward (not for a request sent without).
            if ev.flags & CONTEXT_FLAG_LOCAL_PARENT != 0
                && ev.flags & CONTEXT_FLAG_NOT_INJECTED == 0
                && self.propagated.len() < MAX_PROPAGATED
            {
                self.propagated.insert(SpanId(ev.parent_id), ev.ts_ns);
            }
            let list = self.client_contexts.entry((ev.pid, ev.tid)).or_default();
            if list.len() < MAX_CONTEXTS_PER_CONNECTION {
                list.push(ev);
            } else {
                Stats::add(&self.stats.kernel_contexts_unmatched, 1);
            }
        }
    }

    /// A server context a runtime probe opened after its request's bytes were read (Go: the
    /// request's first byte came alone, so the kernel saw no request start): it joins the
    /// connection now, matched to the exchange it falls within (`take_context`).
    pub fn attach_late_context(&mut self, ev: ContextEvent, trace: Option<&mut ConnTrace>) {
        match trace {
            Some(trace) => self.keep_context(&ev, ev.ts_ns, trace),
            None => Stats::add(&self.stats.kernel_contexts_unmatched, 1),
        }
    }

    /// Whether `pid`'s threads stand for the request they read (a runtime mechanism says they
    /// do not: Go's goroutines move between threads).
    pub fn set_threads_serve(&mut self, pid: u32, serve: bool) {
        self.linker.set_threads_serve(pid, serve);
    }

    /// The connection `key` has these addresses (reported with its first event).
    pub fn connection_addresses(&mut self, key: (u32, u64), info: ConnInfo) {
        if ConnInfo::known(info.local).is_some() {
            self.by_addresses.insert((info.local, info.remote), key);
        }
    }

    /// Moves the kernel contexts that belong to this data event onto its connection.
    pub fn attach_contexts(&mut self, h: &DataEvent, info: ConnInfo, trace: &mut ConnTrace) {
        let mut found = Vec::new();
        if h.direction == DIR_INGRESS {
            if let Some(ev) = self.server_contexts.remove(&(h.pid, h.sock_cookie)) {
                if ev.ts_ns == h.ts_ns {
                    found.push((ev, h.ts_ns));
                } else {
                    Stats::add(&self.stats.kernel_contexts_unmatched, 1);
                }
            }
        } else if let Some(list) = self.client_contexts.remove(&(h.pid, h.tid)) {
            let (local, remote) = (info.local.port(), info.remote.port());
            for ev in list {
                // Ports tell whether the injector ran for this socket (a failed write
                // leaves its contexts to be discarded here).
                let known = local != 0 || remote != 0;
                if !known || (ev.local_port == local && ev.remote_port == remote) {
                    // Keyed like the exchange it belongs to: by its request's start.
                    found.push((ev, first_ts(h)));
                } else {
                    Stats::add(&self.stats.kernel_contexts_unmatched, 1);
                }
            }
        }
        for (ev, ts) in found {
            self.keep_context(&ev, ts, trace);
        }
    }

    /// Puts a kernel context on its connection, keyed by `ts` (unusable ids are counted and
    /// dropped: the request keeps ids of its own; beyond the cap the oldest goes, counted).
    fn keep_context(&self, ev: &ContextEvent, ts: u64, trace: &mut ConnTrace) {
        if KernelContext::has_zero_id(ev) {
            Stats::add(&self.stats.kernel_context_ids_invalid, 1);
        }
        let Some(ctx) = KernelContext::new(ev, ts) else {
            return;
        };
        if trace.contexts.len() == MAX_CONTEXTS_PER_CONNECTION {
            trace.contexts.pop_front();
            Stats::add(&self.stats.kernel_contexts_unmatched, 1);
        }
        trace.contexts.push_back(ctx);
    }

    /// A server-role connection received request bytes on this thread.
    pub fn note_serving(&mut self, pid: u32, tid: u32, ts_ns: u64) {
        self.linker.note_serving(pid, tid, ts_ns);
    }

    /// An HTTP exchange's span: takes the kernel's ids for its request, if any, then links
    /// and pairs it.
    pub fn http_span(
        &mut self,
        at: Origin,
        info: ConnInfo,
        trace: &mut ConnTrace,
        mut span: SpanRecord,
    ) {
        let kernel = take_context(
            &mut trace.contexts,
            at.role,
            at.start_ns,
            at.end_ns,
            &self.stats,
        );
        let pair = pair_key(info, at.role, &mut trace.exchanges);
        if let Some(ctx) = &kernel {
            Stats::add(&self.stats.kernel_contexts_adopted, 1);
            if !ctx.apply(&mut span) {
                Stats::add(&self.stats.kernel_context_mismatch, 1);
            }
        }
        match kernel {
            // The kernel already decided this client span's parent (its ids are on the
            // wire): no later re-linking.
            Some(ctx) if at.role == Role::Client => {
                Stats::add(&self.stats.spans_built, 1);
                if ctx.local_parent {
                    Stats::add(&self.stats.client_spans_linked, 1);
                    if let Some(parent) = span.parent_span_id {
                        self.linker.adopted_in_kernel(parent);
                    }
                }
                self.client_final(pair, span);
            }
            _ => self.route(at, span, pair),
        }
    }

    /// A database statement's span (the kernel gives no ids for these).
    pub fn db_span(&mut self, at: Origin, info: ConnInfo, trace: &mut ConnTrace, span: SpanRecord) {
        let pair = pair_key(info, at.role, &mut trace.exchanges);
        self.route(at, span, pair);
    }

    /// A connection ended after its last spans: its unused kernel contexts are counted.
    pub fn connection_ended(&mut self, key: (u32, u64), info: ConnInfo, trace: &ConnTrace) {
        Stats::add(
            &self.stats.kernel_contexts_unmatched,
            trace.contexts.len() as u64,
        );
        if self.by_addresses.get(&(info.local, info.remote)) == Some(&key) {
            self.by_addresses.remove(&(info.local, info.remote));
        }
    }

    /// A process exited: its held client spans go now.
    pub fn process_exited(&mut self, pid: u32) {
        self.linker.forget_process(pid, &mut self.released);
        self.drain_released();
    }

    /// Server spans go out at once (and may adopt client spans later); client spans may wait
    /// for the server span their thread is serving.
    fn route(&mut self, at: Origin, span: SpanRecord, pair: Option<PairKey>) {
        Stats::add(&self.stats.spans_built, 1);
        match at.role {
            Role::Server => {
                self.linker
                    .server_span(at.pid, at.tid, at.start_ns, at.end_ns, &span);
                let propagated = self.propagated.remove(&span.span_id).is_some();
                if propagated {
                    Stats::add(&self.stats.server_spans_kept_trace, 1);
                }
                match &mut self.pairing {
                    Some(pairing) if !propagated => {
                        // Is the other end a connection traced here?
                        let peer_is_local = pair
                            .is_some_and(|k| self.by_addresses.contains_key(&(k.client, k.server)));
                        pairing.server_span(pair, peer_is_local, span, self.now, &mut self.ready);
                    }
                    _ => self.ready.push(span),
                }
                self.send_ready();
            }
            Role::Client => {
                if let Some(key) = pair {
                    self.held_keys.insert(span.span_id, key);
                }
                self.linker.client_span(
                    at.pid,
                    at.tid,
                    at.start_ns,
                    at.end_ns,
                    span,
                    &mut self.released,
                );
                self.drain_released();
            }
        }
    }

    /// A client span whose ids will not change any more.
    fn client_final(&mut self, pair: Option<PairKey>, span: SpanRecord) {
        match &mut self.pairing {
            Some(pairing) => pairing.client_span(pair, span, self.now, &mut self.ready),
            None => self.ready.push(span),
        }
        self.send_ready();
    }

    fn send_ready(&mut self) {
        if let Some(p) = &mut self.pairing {
            Stats::add(
                &self.stats.server_spans_paired,
                std::mem::take(&mut p.report.paired),
            );
            Stats::add(
                &self.stats.server_spans_unpaired,
                std::mem::take(&mut p.report.unpaired),
            );
        }
        for mut span in self.ready.drain(..) {
            if !span.has_valid_ids() {
                Stats::add(&self.stats.spans_invalid_ids_fixed, 1);
                repair_ids(&mut span, &mut self.ids);
            }
            self.sink.send(span);
        }
    }

    fn drain_released(&mut self) {
        let released = std::mem::take(&mut self.released);
        for (span, outcome) in released {
            match outcome {
                LinkOutcome::Linked => Stats::add(&self.stats.client_spans_linked, 1),
                LinkOutcome::Ambiguous => Stats::add(&self.stats.link_ambiguous, 1),
                LinkOutcome::Bounded => Stats::add(&self.stats.link_bounded, 1),
                LinkOutcome::Unlinked => {}
            }
            let pair = self.held_keys.remove(&span.span_id);
            self.client_final(pair, span);
        }
    }

    /// Periodic work: release held client spans and server spans that waited too long.
    pub fn tick(&mut self, now_ns: u64) {
        self.advance(now_ns);
        self.linker.release(Some(now_ns), &mut self.released);
        self.drain_released();
        if let Some(p) = &mut self.pairing {
            p.tick(Some(now_ns), &mut self.ready);
        }
        self.send_ready();
    }

    /// Periodic work, after the connections that ended in this tick gave their spans: forget
    /// idle threads and old propagated server spans.
    pub fn prune(&mut self, now_ns: u64) {
        self.linker.prune(now_ns, 10 * HOLD_NS);
        self.propagated
            .retain(|_, ts| ts.saturating_add(PROPAGATED_TTL_NS) > now_ns);
    }

    /// Shutdown: every held span goes to the sink, which is handed back.
    pub fn finish(mut self) -> S {
        self.linker.release(None, &mut self.released);
        self.drain_released();
        if let Some(p) = &mut self.pairing {
            p.tick(None, &mut self.ready);
        }
        self.send_ready();
        self.held_keys.clear();
        self.sink
    }
}

/// A span of trace `[trace; 16]` with id `[id; 8]` (and parent `[parent; 8]`), from `start`
/// to `end`: for the tests of correlation's parts.
#[cfg(test)]
fn test_span(
    trace: u8,
    id: u8,
    parent: Option<u8>,
    kind: crate::spans::model::SpanKind,
    (start, end): (u64, u64),
) -> SpanRecord {
    use crate::spans::model::{Resource, SpanStatus, TraceId};
    SpanRecord {
        trace_id: TraceId([trace; 16]),
        span_id: SpanId([id; 8]),
        parent_span_id: parent.map(|p| SpanId([p; 8])),
        parent_is_remote: false,
        trace_state: None,
        name: "x".into(),
        kind,
        start_unix_nanos: start,
        end_unix_nanos: end,
        attributes: vec![],
        status: SpanStatus::Unset,
        resource: Arc::new(Resource {
            pid: 1,
            service_name: "s".into(),
            attributes: vec![],
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering::Relaxed;

    use super::*;
    use crate::spans::model::{SpanKind, TraceId};

    const ZERO_TRACE: [u8; 16] = [0; 16];
    const ZERO_SPAN: [u8; 8] = [0; 8];

    /// The last line before the exporter: whatever produced it, a span with a zero id is
    /// repaired and counted, never sent as is.
    #[test]
    fn spans_with_invalid_ids_are_repaired_before_the_sink() {
        let template = test_span(1, 2, None, SpanKind::Server, (100, 200));
        let stats = Arc::new(Stats::default());
        let mut c = Correlator::new(stats.clone(), Vec::new());
        let broken = [
            (TraceId(ZERO_TRACE), template.span_id, Some(SpanId([9; 8]))),
            (template.trace_id, SpanId(ZERO_SPAN), None),
            (template.trace_id, template.span_id, Some(SpanId(ZERO_SPAN))),
        ];
        for (trace_id, span_id, parent) in broken {
            let mut span = template.clone();
            span.trace_id = trace_id;
            span.span_id = span_id;
            span.parent_span_id = parent;
            span.parent_is_remote = true;
            span.trace_state = Some("k=v".into());
            c.ready.push(span);
        }
        c.send_ready();
        let sent = c.finish();
        assert_eq!(sent.len(), 3);
        for s in &sent {
            assert!(s.has_valid_ids(), "{s:#?}");
        }
        assert_eq!(
            sent[0].parent_span_id, None,
            "a parent in no valid trace is dropped"
        );
        assert_eq!(sent[0].trace_state, None);
        assert_eq!(
            sent[1].trace_id, template.trace_id,
            "only the bad id changes"
        );
        assert_eq!(sent[2].parent_span_id, None);
        assert!(!sent[2].parent_is_remote);
        assert_eq!(stats.spans_invalid_ids_fixed.load(Relaxed), 3);
    }
}
