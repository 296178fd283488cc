//! Trace context chosen in the kernel, so the ids written into an outgoing request are known
//! before the request leaves: a request a thread reads gets its server span's ids here (the
//! trace id of its `traceparent`, or a new one), and the thread remembers it until it answers.
//! A client request the thread sends meanwhile continues that trace, unless another request
//! was in flight on the thread (an event loop serving several): then nobody guesses.

use agent_common::{
    CONTEXT_FLAG_PARENT, CONTEXT_SERVER, ContextEvent, EventKind, THREAD_FLAG_AMBIGUOUS,
    THREAD_FLAG_ANSWERED, ThreadContext,
};
use aya_ebpf::{helpers::generated::bpf_get_prandom_u32, macros::map, maps::LruHashMap};

use crate::{
    http_head::{self, HEAD_BAD, HEAD_BAD_TRACEPARENT, HEAD_MANY_TRACEPARENTS},
    maps::{count, emit, in_process_linking, max_children, max_trace_age_ns},
};

/// The request each thread of a selected process is serving (thread id → context).
#[map]
pub static THREAD_CONTEXTS: LruHashMap<u32, ThreadContext> = LruHashMap::with_max_entries(65536, 0);

/// Requests each process served since its last client request (see `context::pure_server`).
#[map]
pub static SERVED_WITHOUT_CALLS: LruHashMap<u32, u32> = LruHashMap::with_max_entries(16384, 0);

#[inline(always)]
pub fn random_id<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    let mut i = 0;
    while i < N {
        let r = unsafe { bpf_get_prandom_u32() }.to_le_bytes();
        let mut j = 0;
        while j < 4 && i + j < N {
            out[i + j] = r[j];
            j += 1;
        }
        i += 4;
    }
    // An all-zero id is invalid in W3C trace context.
    out[0] |= (out[0] == 0) as u8;
    out
}

/// A read on a socket by a selected thread: if it starts a request, choose the server span's
/// ids, remember them for the thread and tell userspace (before the data event, same `ts`).
#[inline(always)]
pub fn on_read(pid: u32, tid: u32, cookie: u64, ts: u64, buf: *const u8, captured: u32) {
    if !http_head::starts_request(buf, captured) {
        return;
    }
    if pure_server(pid) {
        return;
    }
    let Some(head) = http_head::scan(buf, captured, http_head::SCAN_READ) else {
        return;
    };
    if head.flags & HEAD_BAD != 0 || head.line_end == 0 {
        return;
    }
    let mut ev = ContextEvent {
        kind: EventKind::Context as u32,
        role: CONTEXT_SERVER,
        pid,
        tid,
        ts_ns: ts,
        sock_cookie: cookie,
        local_port: 0,
        remote_port: 0,
        flags: 0,
        trace_id: [0; 16],
        span_id: random_id(),
        parent_id: [0; 8],
    };
    let incoming = head.traceparent != 0
        && head.flags & (HEAD_MANY_TRACEPARENTS | HEAD_BAD_TRACEPARENT) == 0
        && http_head::decode_hex(buf, head.traceparent + 3, &mut ev.trace_id)
        && http_head::decode_hex(buf, head.traceparent + 36, &mut ev.parent_id)
        && ev.trace_id != [0; 16]
        && ev.parent_id != [0; 8];
    if incoming {
        ev.flags = CONTEXT_FLAG_PARENT;
    } else {
        ev.trace_id = random_id();
        ev.parent_id = [0; 8];
    }
    if in_process_linking() {
        remember(tid, cookie, ts, &ev);
    }
    count(|c| c.server_contexts += 1);
    emit(ev);
}

/// Requests a process serves without making a client request before the kernel stops
/// choosing their ids: the ids only matter for calls made under them, and a server that
/// makes none (a static web server) would pay ~0.5 µs per request for nothing. A client
/// request by the process turns them back on (that one request goes unlinked).
const PURE_SERVER_AFTER: u32 = 1000;

/// Counts a served request; true when the process looks like a pure server.
#[inline(always)]
fn pure_server(pid: u32) -> bool {
    match SERVED_WITHOUT_CALLS.get_ptr_mut(&pid) {
        Some(n) => unsafe {
            if *n >= PURE_SERVER_AFTER {
                return true;
            }
            *n += 1;
            false
        },
        None => {
            let _ = SERVED_WITHOUT_CALLS.insert(&pid, &1, 0);
            false
        }
    }
}

/// The process makes client requests: its served requests need ids again.
#[inline(always)]
pub fn makes_calls(pid: u32) {
    if let Some(n) = SERVED_WITHOUT_CALLS.get_ptr_mut(&pid) {
        unsafe { *n = 0 };
    }
}

/// The thread now serves this request. If it was still serving another (not answered, not
/// too old), two requests are in flight on it: its client calls cannot be attributed.
#[inline(always)]
fn remember(tid: u32, cookie: u64, ts: u64, ev: &ContextEvent) {
    let mut flags = 0;
    if let Some(old) = THREAD_CONTEXTS.get_ptr(&tid) {
        let old = unsafe { &*old };
        if old.flags & THREAD_FLAG_ANSWERED == 0
            && ts.saturating_sub(old.ts_ns) < max_trace_age_ns()
        {
            flags = THREAD_FLAG_AMBIGUOUS;
        }
    }
    let ctx = ThreadContext {
        sock_cookie: cookie,
        ts_ns: ts,
        trace_id: ev.trace_id,
        span_id: ev.span_id,
        flags,
        children: 0,
    };
    let _ = THREAD_CONTEXTS.insert(&tid, &ctx, 0);
}

/// A write on a socket: on the socket the thread's request came in on, it is the answer.
#[inline(always)]
pub fn on_write(tid: u32, cookie: u64) {
    if let Some(ctx) = THREAD_CONTEXTS.get_ptr_mut(&tid) {
        let ctx = unsafe { &mut *ctx };
        if ctx.sock_cookie == cookie {
            ctx.flags |= THREAD_FLAG_ANSWERED;
        }
    }
}

/// A client request the thread sent without the injector (its socket was parked): userspace
/// may link it to the request the thread serves, so it counts against that request's bound
/// like an injected one.
#[inline(always)]
pub fn note_unseen_call(tid: u32) {
    if !in_process_linking() {
        return;
    }
    if let Some(ctx) = THREAD_CONTEXTS.get_ptr_mut(&tid) {
        let ctx = unsafe { &mut *ctx };
        if ctx.flags & THREAD_FLAG_ANSWERED == 0 {
            ctx.children += 1;
        }
    }
}

/// The server span a client request sent now by `tid` belongs to: (trace id, span id), or
/// `None` (not serving, answered, ambiguous, too old, or the trace reached its cap).
#[inline(always)]
pub fn serving(tid: u32, now: u64) -> Option<([u8; 16], [u8; 8])> {
    if !in_process_linking() {
        return None;
    }
    let ctx = THREAD_CONTEXTS.get_ptr_mut(&tid)?;
    let ctx = unsafe { &mut *ctx };
    if ctx.flags & THREAD_FLAG_ANSWERED != 0 {
        return None;
    }
    if ctx.flags & THREAD_FLAG_AMBIGUOUS != 0
        || now.saturating_sub(ctx.ts_ns) >= max_trace_age_ns()
        || ctx.children >= max_children()
    {
        count(|c| c.link_ambiguous += 1);
        return None;
    }
    ctx.children += 1;
    count(|c| c.link_kernel += 1);
    Some((ctx.trace_id, ctx.span_id))
}
