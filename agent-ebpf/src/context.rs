//! Trace context chosen in the kernel, so the ids written into an outgoing request are known
//! before the request leaves: a request a thread reads gets its server span's ids here (the
//! trace id of its `traceparent`, or a new one), and the thread remembers it until it answers.
//! A client request the thread sends meanwhile continues that trace, unless another request
//! was in flight on the thread (an event loop serving several): then nobody guesses.

use agent_common::{
    CONTEXT_FLAG_PARENT, CONTEXT_FLAG_SPLIT_START, CONTEXT_SERVER, ContextEvent, EventKind,
    RUNTIME_GO, RUNTIME_REQUESTS_BY_FD, THREAD_FLAG_AMBIGUOUS, THREAD_FLAG_ANSWERED,
    THREAD_FLAG_UNSAMPLED, ThreadContext,
};
use aya_ebpf::{
    helpers::generated::bpf_get_prandom_u32,
    macros::map,
    maps::{LruHashMap, PerCpuArray},
};

use crate::{
    http_head::{self, HEAD_BAD, HEAD_BAD_TRACEPARENT, HEAD_MANY_TRACEPARENTS},
    maps::{
        RUNTIME_PIDS, count, emit, in_process_linking, max_children, max_trace_age_ns, sample_root,
        sampling,
    },
};

/// Head sampling's decision for the request being opened on this CPU (see `open_request`).
#[map]
static DECISION: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// The request each thread of a selected process is serving (thread id → context).
#[map]
pub static THREAD_CONTEXTS: LruHashMap<u32, ThreadContext> = LruHashMap::with_max_entries(65536, 0);

/// The requests each process is serving, by the trace id they arrived with and by their
/// method and target (see [`inflight_match`]).
#[map]
static INFLIGHT: LruHashMap<InflightKey, Inflight> = LruHashMap::with_max_entries(65536, 0);

/// The in-flight request each server socket carries (socket cookie → its keys in
/// [`INFLIGHT`]), so its answer, or its close, releases it.
#[map]
static SERVER_REQUESTS: LruHashMap<u64, ServerRequest> = LruHashMap::with_max_entries(65536, 0);

const BY_TRACE: u32 = 1;
const BY_LINE: u32 = 2;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct InflightKey {
    pid: u32,
    kind: u32,
    hash: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Inflight {
    ts_ns: u64,
    trace_id: [u8; 16],
    span_id: [u8; 8],
    /// Requests in flight under this key.
    count: u32,
    /// 1 while the ids above are those of the one request in flight: once two overlap, which
    /// of them an answer ends is unknown, so the entry names nobody until both are gone.
    named: u8,
    /// 1: head sampling left that request out.
    unsampled: u8,
    /// Client requests linked to it (bounded like a thread's).
    children: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct ServerRequest {
    pid: u32,
    has_trace: u32,
    line: u64,
    trace: u64,
    ts_ns: u64,
    trace_id: [u8; 16],
    span_id: [u8; 8],
    /// Client requests a runtime hand-off linked to it (bounded like a thread's).
    children: u32,
    /// 1: head sampling left it out.
    unsampled: u32,
}

/// The server socket each request was read from, by the process's fd for it, for processes
/// whose runtime mechanism names a served request by its fd (`RUNTIME_REQUESTS_BY_FD`).
#[map]
static REQUESTS_BY_FD: LruHashMap<FdKey, u64> = LruHashMap::with_max_entries(65536, 0);

#[repr(C)]
#[derive(Clone, Copy)]
pub struct FdKey {
    pid: u32,
    fd: u32,
}

/// What a runtime probe said a thread is writing now: set when the runtime starts writing a
/// client request for a served one, cleared when that write returns. Per CPU, one slot per
/// thread id modulo `HANDOFF_SLOTS`, tagged with the thread: a hash map keyed by thread cost
/// ~4× as much per request. The write follows the probe on the same CPU unless the thread
/// migrates in between, and another thread on that CPU (Go runs many) only takes the slot when
/// its id falls on the same one; either way the tag no longer matches and the write is left to
/// other evidence (never to another thread's hand-off). A one-shot hand-off (Go) left behind by
/// a goroutine that moved threads before its write is overwritten by the next probe on that
/// slot; it could only be taken by the same thread writing a client request there without
/// passing a probe first, within `HANDOFF_ONCE_MAX_NS` (a Go write always passes
/// `poll.FD.Write` first).
#[map]
static HANDOFFS: PerCpuArray<Handoff> = PerCpuArray::with_max_entries(HANDOFF_SLOTS, 0);

const HANDOFF_SLOTS: u32 = 64;

#[inline(always)]
fn slot_of(tid: u32) -> u32 {
    tid & (HANDOFF_SLOTS - 1)
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Handoff {
    /// The thread writing (0: the slot is free).
    tid: u32,
    pid: u32,
    /// `HANDOFF_ONCE`: for the next client request only (see [`hand_off_once`]).
    flags: u32,
    _pad: u32,
    /// The served request's socket (0: the runtime named a request the kernel does not know).
    server_cookie: u64,
    /// Which request on that socket ([`request_id`]); 0: whichever is in flight.
    request: u64,
    ts_ns: u64,
}

/// A hand-off older than this was left by a thread that migrated or died inside the runtime's
/// write (a non-blocking write call takes microseconds): ignored.
const HANDOFF_MAX_NS: u64 = 10_000_000;

const HANDOFF_ONCE: u32 = 1;
/// A one-shot hand-off is set microseconds before its write: older, it was left by a write
/// that did not reach the socket on this thread (its goroutine moved): unlinked.
const HANDOFF_ONCE_MAX_NS: u64 = 20_000_000;

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
/// `None` when it starts no request; else whether the request is sampled (always, unless
/// `SAMPLE`: the caller found head sampling on).
#[inline(always)]
pub fn on_read<const SAMPLE: bool>(
    pid: u32,
    tid: u32,
    cookie: u64,
    fd: u32,
    ts: u64,
    buf: *const u8,
    captured: u32,
) -> Option<bool> {
    if !http_head::starts_request(buf, captured) {
        return None;
    }
    Some(open_request::<SAMPLE>(
        pid, tid, cookie, fd, ts, buf, captured, 0,
    ))
}

/// A runtime probe: the request now served on `cookie` was not opened at its read (its first
/// byte came alone, in an earlier read); `buf` holds its head, copied from the program's
/// buffer. Opened now (`CONTEXT_FLAG_SPLIT_START`, `ts` the probe's time). True when it did.
#[inline(always)]
pub fn open_late_request(
    pid: u32,
    tid: u32,
    cookie: u64,
    fd: u32,
    ts: u64,
    buf: *const u8,
) -> bool {
    if !http_head::starts_request(buf, http_head::HEAD_WINDOW) {
        return false;
    }
    // Its first byte was already sent to userspace: sampled.
    open_request::<false>(
        pid,
        tid,
        cookie,
        fd,
        ts,
        buf,
        http_head::HEAD_WINDOW,
        CONTEXT_FLAG_SPLIT_START,
    );
    // Opened unless its head did not scan (or linking is off).
    in_flight(cookie)
}

/// Whether `pid` looks like a pure server (see [`pure_server`]), without counting a request.
#[inline(always)]
pub fn serves_without_calls(pid: u32) -> bool {
    SERVED_WITHOUT_CALLS
        .get_ptr(&pid)
        .is_some_and(|n| unsafe { *n } >= PURE_SERVER_AFTER)
}

/// Whether the request last read on `cookie` is still in flight (not answered, not closed).
#[inline(always)]
pub fn in_flight(cookie: u64) -> bool {
    SERVER_REQUESTS.get_ptr(&cookie).is_some()
}

/// A request starts at `buf` (the read's first `captured` bytes): choose the server span's
/// ids, remember them and tell userspace. With `SAMPLE`, decide whether it is sampled: as its
/// `traceparent` says if it has a valid one (parent-based), else at the configured ratio. A
/// request left out gets ids all the same (its calls carry them, not sampled) but userspace
/// hears nothing of it. Returns whether it is sampled (a head that does not scan is). A const
/// parameter: without sampling the code is what it was before sampling, which the verifier's
/// budget on Linux 6.1 (arm64) needs.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn open_request<const SAMPLE: bool>(
    pid: u32,
    tid: u32,
    cookie: u64,
    fd: u32,
    ts: u64,
    buf: *const u8,
    captured: u32,
    split: u32,
) -> bool {
    let sample = SAMPLE;
    if !sample && pure_server(pid) {
        return true;
    }
    let Some(head) = http_head::scan(buf, captured, http_head::SCAN_READ) else {
        return true;
    };
    if head.flags & HEAD_BAD != 0 || head.line_end == 0 {
        return true;
    }
    // A pure server's ids are not needed, but its decision is (asked after the scan: a flag
    // live across it would have the verifier walk the scan twice).
    let pure = sample && pure_server(pid);
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
    // Without sampling a constant, so the verifier walks one path.
    let sampled = if !sample {
        true
    } else {
        let mut parent_flags = [0u8; 1];
        let decided =
            if incoming && http_head::decode_hex(buf, head.traceparent + 53, &mut parent_flags) {
                parent_flags[0] & 1 != 0
            } else {
                sample_root()
            };
        // Through map memory: the ways of deciding end in one verifier state (the program's
        // budget does not stretch to the rest of this function once per way).
        match DECISION.get_ptr_mut(0) {
            Some(d) => unsafe {
                core::ptr::write_volatile(d, decided as u32);
                core::ptr::read_volatile(d) != 0
            },
            None => true,
        }
    };
    if pure {
        return sampled;
    }
    if incoming {
        ev.flags = CONTEXT_FLAG_PARENT;
    } else {
        ev.trace_id = random_id();
        ev.parent_id = [0; 8];
    }
    if in_process_linking() {
        remember(tid, cookie, ts, &ev, sampled);
        let line = http_head::line_hash(buf, head.line_end);
        note_inflight(pid, cookie, ts, &ev, line, incoming, sampled);
        if RUNTIME_PIDS
            .get_ptr(&pid)
            .is_some_and(|f| unsafe { *f } & RUNTIME_REQUESTS_BY_FD != 0)
        {
            let _ = REQUESTS_BY_FD.insert(&FdKey { pid, fd }, &cookie, 0);
        }
    }
    if !sampled {
        return false;
    }
    count(|c| c.server_contexts += 1);
    ev.flags |= split;
    emit(ev);
    true
}

#[inline(always)]
fn trace_hash(trace: &[u8; 16]) -> u64 {
    let a = u64::from_le_bytes([
        trace[0], trace[1], trace[2], trace[3], trace[4], trace[5], trace[6], trace[7],
    ]);
    let b = u64::from_le_bytes([
        trace[8], trace[9], trace[10], trace[11], trace[12], trace[13], trace[14], trace[15],
    ]);
    a ^ b.rotate_left(32)
}

/// A request read on `cookie` is in flight in `pid` (the socket's previous one, if still
/// there, is given up: a pipelined request is not followed).
#[inline(always)]
fn note_inflight(
    pid: u32,
    cookie: u64,
    ts: u64,
    ev: &ContextEvent,
    line: u64,
    incoming: bool,
    sampled: bool,
) {
    release_inflight(cookie);
    let request = ServerRequest {
        pid,
        has_trace: incoming as u32,
        line,
        trace: trace_hash(&ev.trace_id),
        ts_ns: ts,
        trace_id: ev.trace_id,
        span_id: ev.span_id,
        children: 0,
        unsampled: !sampled as u32,
    };
    add_inflight(
        InflightKey {
            pid,
            kind: BY_LINE,
            hash: line,
        },
        ts,
        ev,
        sampled,
    );
    if incoming {
        add_inflight(
            InflightKey {
                pid,
                kind: BY_TRACE,
                hash: request.trace,
            },
            ts,
            ev,
            sampled,
        );
    }
    let _ = SERVER_REQUESTS.insert(&cookie, &request, 0);
}

#[inline(always)]
fn add_inflight(key: InflightKey, ts: u64, ev: &ContextEvent, sampled: bool) {
    if let Some(e) = INFLIGHT.get_ptr_mut(&key) {
        let e = unsafe { &mut *e };
        if ts.saturating_sub(e.ts_ns) < max_trace_age_ns() {
            e.count += 1;
            e.named = 0;
            e.ts_ns = ts;
            return;
        }
    }
    let fresh = Inflight {
        ts_ns: ts,
        trace_id: ev.trace_id,
        span_id: ev.span_id,
        count: 1,
        named: 1,
        unsampled: !sampled as u8,
        children: 0,
    };
    let _ = INFLIGHT.insert(&key, &fresh, 0);
}

/// The request on server socket `cookie` was answered (or the socket closed).
#[inline(always)]
pub fn release_inflight(cookie: u64) {
    let Some(r) = SERVER_REQUESTS.get_ptr(&cookie) else {
        return;
    };
    let r = unsafe { *r };
    let _ = SERVER_REQUESTS.remove(&cookie);
    drop_inflight(InflightKey {
        pid: r.pid,
        kind: BY_LINE,
        hash: r.line,
    });
    if r.has_trace != 0 {
        drop_inflight(InflightKey {
            pid: r.pid,
            kind: BY_TRACE,
            hash: r.trace,
        });
    }
}

#[inline(always)]
fn drop_inflight(key: InflightKey) {
    if let Some(e) = INFLIGHT.get_ptr_mut(&key) {
        let e = unsafe { &mut *e };
        if e.count > 1 {
            e.count -= 1;
            return;
        }
    }
    let _ = INFLIGHT.remove(&key);
}

/// The one request `pid` is serving whose trace id is `forwarded`, or (without) whose method
/// and target hash to `line`. Nothing when several match (counted) or none does.
#[inline(always)]
fn inflight_match(pid: u32, now: u64, forwarded: Option<&[u8; 16]>, line: u64) -> Option<Parent> {
    if !in_process_linking() {
        return None;
    }
    let key = match forwarded {
        Some(trace) => InflightKey {
            pid,
            kind: BY_TRACE,
            hash: trace_hash(trace),
        },
        None => InflightKey {
            pid,
            kind: BY_LINE,
            hash: line,
        },
    };
    let e = INFLIGHT.get_ptr_mut(&key)?;
    let e = unsafe { &mut *e };
    if now.saturating_sub(e.ts_ns) >= max_trace_age_ns() {
        return None;
    }
    if e.count != 1 || e.named == 0 {
        count(|c| c.link_match_ambiguous += 1);
        return None;
    }
    if let Some(trace) = forwarded
        && e.trace_id != *trace
    {
        return None;
    }
    if e.children as u32 >= max_children() {
        return None;
    }
    e.children = e.children.saturating_add(1);
    if forwarded.is_some() {
        count(|c| c.link_forwarded_trace += 1);
    } else {
        count(|c| c.link_request_line += 1);
    }
    Some(Parent {
        trace_id: e.trace_id,
        span_id: e.span_id,
        unsampled: e.unsampled as u32,
    })
}

/// The served request a client request belongs to.
#[derive(Clone, Copy)]
pub struct Parent {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    /// Nonzero when head sampling left it out (see [`Parent::left_out`]). Kept as the raw
    /// value: a comparison is a branch in BPF, and with sampling off the verifier must not
    /// walk the linking code once per outcome of it.
    pub unsampled: u32,
}

impl Parent {
    /// Head sampling left it out: so is the client request.
    #[inline(always)]
    pub fn left_out(&self) -> bool {
        sampling() && self.unsampled != 0
    }
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
fn remember(tid: u32, cookie: u64, ts: u64, ev: &ContextEvent, sampled: bool) {
    let mut flags = if sampled { 0 } else { THREAD_FLAG_UNSAMPLED };
    if let Some(old) = THREAD_CONTEXTS.get_ptr(&tid) {
        let old = unsafe { &*old };
        // A thread that read a request before answering the previous one serves several at
        // once (an event loop): from then on its latest request is not necessarily the one a
        // call is for, even after that previous one was answered (an earlier request may still
        // be waiting, its call written later), so it stays ambiguous while its requests keep
        // coming within the trace age.
        if (old.flags & THREAD_FLAG_ANSWERED == 0 || old.flags & THREAD_FLAG_AMBIGUOUS != 0)
            && ts.saturating_sub(old.ts_ns) < max_trace_age_ns()
        {
            flags |= THREAD_FLAG_AMBIGUOUS;
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
    // Whatever thread writes the answer (an event loop's, a worker's).
    release_inflight(cookie);
}

/// What the kernel knows of the request a client request sent now by a thread belongs to.
pub enum Local {
    /// The request the thread serves.
    Serving(Parent),
    /// The thread has served requests but cannot tell which one this call is for (several in
    /// flight on an event loop, or the last one answered): other evidence may decide.
    Unknown,
    /// No request: the thread never served one, linking is off, or the request is too old or
    /// reached its cap of children.
    None,
}

/// A runtime probe: `tid` starts writing a client request for the request the process read on
/// `fd` (whatever other requests its thread serves).
#[inline(always)]
pub fn hand_off_fd(pid: u32, tid: u32, fd: u32, now: u64) {
    let server_cookie = request_on_fd(pid, fd).unwrap_or(0);
    set_hand_off(pid, tid, 0, server_cookie, 0, now);
}

/// The request in flight on server socket `cookie`, as a runtime probe may name it: a request
/// answered meanwhile is not the same as the next one on the socket (its server span id).
#[inline(always)]
pub fn request_id(cookie: u64) -> Option<u64> {
    let r = SERVER_REQUESTS.get_ptr(&cookie)?;
    Some(u64::from_ne_bytes(unsafe { (*r).span_id }))
}

/// The server socket of the last request `pid` read on `fd`.
#[inline(always)]
pub fn request_on_fd(pid: u32, fd: u32) -> Option<u64> {
    REQUESTS_BY_FD
        .get_ptr(&FdKey { pid, fd })
        .map(|c| unsafe { *c })
}

/// A runtime probe: the next client request `tid` writes belongs to request `request`
/// ([`request_id`]) read on server socket `server_cookie`; the hand-off ends with it (or when
/// it is overwritten).
#[inline(always)]
pub fn hand_off_once(pid: u32, tid: u32, server_cookie: u64, request: u64, now: u64) {
    set_hand_off(pid, tid, HANDOFF_ONCE, server_cookie, request, now);
}

#[inline(always)]
fn set_hand_off(pid: u32, tid: u32, flags: u32, server_cookie: u64, request: u64, now: u64) {
    let Some(slot) = HANDOFFS.get_ptr_mut(slot_of(tid)) else {
        return;
    };
    // The tag last: a reader on this CPU never sees this thread's tag with a stale request.
    unsafe {
        core::ptr::write_volatile(&mut (*slot).tid, 0);
        (*slot).pid = pid;
        (*slot).flags = flags;
        (*slot).server_cookie = server_cookie;
        (*slot).request = request;
        (*slot).ts_ns = now;
        core::ptr::write_volatile(&mut (*slot).tid, tid);
    }
}

/// The runtime's write returned.
#[inline(always)]
pub fn end_hand_off(tid: u32) {
    if let Some(slot) = HANDOFFS.get_ptr_mut(slot_of(tid))
        && unsafe { (*slot).tid } == tid
    {
        unsafe { core::ptr::write_volatile(&mut (*slot).tid, 0) };
    }
}

/// What a runtime probe says the client request `tid` writes now belongs to: `None` when no
/// probe spoke (other evidence decides); `Some(None)` when it named a request that is not in
/// flight (answered, unknown, too old, at its cap): unlinked, never another request.
#[inline(always)]
fn handed_off(pid: u32, tid: u32, now: u64) -> Option<Option<Parent>> {
    let h = HANDOFFS.get_ptr(slot_of(tid))?;
    let h = unsafe { *h };
    if h.tid != tid || h.pid != pid {
        return None;
    }
    let age = now.saturating_sub(h.ts_ns);
    if h.flags & HANDOFF_ONCE != 0 {
        end_hand_off(tid);
        if age >= HANDOFF_ONCE_MAX_NS {
            count(|c| c.handoff_not_in_flight += 1);
            return Some(None);
        }
    } else if age >= HANDOFF_MAX_NS {
        return None;
    }
    let named = if h.server_cookie == 0 {
        None
    } else {
        SERVER_REQUESTS.get_ptr_mut(&h.server_cookie)
    };
    let Some(r) = named else {
        count(|c| c.handoff_not_in_flight += 1);
        return Some(None);
    };
    let r = unsafe { &mut *r };
    if r.pid != pid
        || (h.request != 0 && u64::from_ne_bytes(r.span_id) != h.request)
        || now.saturating_sub(r.ts_ns) >= max_trace_age_ns()
        || r.children >= max_children()
    {
        count(|c| c.handoff_not_in_flight += 1);
        return Some(None);
    }
    r.children += 1;
    count(|c| c.link_handoff += 1);
    Some(Some(Parent {
        trace_id: r.trace_id,
        span_id: r.span_id,
        unsampled: r.unsampled,
    }))
}

/// The server span a client request sent now by `tid` belongs to, as far as the thread tells.
#[inline(always)]
pub fn serving(tid: u32, now: u64) -> Local {
    if !in_process_linking() {
        return Local::None;
    }
    let Some(ctx) = THREAD_CONTEXTS.get_ptr_mut(&tid) else {
        return Local::None;
    };
    let ctx = unsafe { &mut *ctx };
    if now.saturating_sub(ctx.ts_ns) >= max_trace_age_ns() || ctx.children >= max_children() {
        count(|c| c.link_ambiguous += 1);
        return Local::None;
    }
    if ctx.flags & (THREAD_FLAG_ANSWERED | THREAD_FLAG_AMBIGUOUS) != 0 {
        if ctx.flags & THREAD_FLAG_AMBIGUOUS != 0 {
            count(|c| c.link_ambiguous += 1);
        }
        return Local::Unknown;
    }
    ctx.children += 1;
    count(|c| c.link_kernel += 1);
    Local::Serving(Parent {
        trace_id: ctx.trace_id,
        span_id: ctx.span_id,
        unsampled: ctx.flags & THREAD_FLAG_UNSAMPLED,
    })
}

/// What thread `tid`'s context says of a client write on `cookie` the injector does not
/// decide (a socket it does not follow, such as PostgreSQL's), with head sampling on.
pub enum ThreadCall {
    /// For the request the thread serves, sampled.
    Sampled,
    /// For the request the thread serves, left out.
    LeftOut,
    /// The thread has served requests but cannot tell which this write is for (several in
    /// flight, or its request answered): userspace, which does not see the requests left
    /// out, must not link it by thread either, so it is left out too.
    Unknown,
    /// The thread stands for no request (never served one, a Go thread, or not the writer of
    /// a client request): userspace cannot link it by thread.
    NoRequest,
}

/// See [`ThreadCall`]; nothing counted, no child taken.
#[inline(always)]
pub fn thread_call(pid: u32, tid: u32, cookie: u64, now: u64) -> ThreadCall {
    if RUNTIME_PIDS
        .get_ptr(&pid)
        .is_some_and(|f| unsafe { *f } & RUNTIME_GO != 0)
    {
        return ThreadCall::NoRequest;
    }
    let Some(ctx) = THREAD_CONTEXTS.get_ptr(&tid) else {
        return ThreadCall::NoRequest;
    };
    let ctx = unsafe { &*ctx };
    if ctx.sock_cookie == cookie {
        // Its own answer.
        return ThreadCall::NoRequest;
    }
    // A client write: the process's served requests need their ids (not a pure server).
    makes_calls(pid);
    if now.saturating_sub(ctx.ts_ns) >= max_trace_age_ns() {
        return ThreadCall::NoRequest;
    }
    if ctx.flags & (THREAD_FLAG_ANSWERED | THREAD_FLAG_AMBIGUOUS) != 0 {
        return ThreadCall::Unknown;
    }
    if ctx.flags & THREAD_FLAG_UNSAMPLED != 0 {
        ThreadCall::LeftOut
    } else {
        ThreadCall::Sampled
    }
}

/// The request a client request sent now belongs to: the one a runtime probe named, else the
/// thread's, else — on a thread that
/// serves requests but cannot tell which — the one in-flight request of the process whose
/// trace id the call forwards (`forwarded`) or, for a call without one, whose method and
/// target it forwards (`line`, a proxy). A thread that never served a request gets no match
/// by line (a background poller calling the same path is not a forward).
#[inline(always)]
pub fn belongs_to(
    pid: u32,
    tid: u32,
    now: u64,
    forwarded: Option<&[u8; 16]>,
    line: impl FnOnce() -> u64,
) -> Option<Parent> {
    if !in_process_linking() {
        return None;
    }
    if let Some(named) = handed_off(pid, tid, now) {
        return named;
    }
    // A Go thread never stands for a request: goroutines move between threads, and a write
    // whose goroutine moved after its hand-off was set arrives on a thread without one.
    let local = if RUNTIME_PIDS
        .get_ptr(&pid)
        .is_some_and(|f| unsafe { *f } & RUNTIME_GO != 0)
    {
        Local::None
    } else {
        serving(tid, now)
    };
    match local {
        Local::Serving(parent) => Some(parent),
        Local::Unknown => inflight_match(pid, now, forwarded, forwarded.map_or_else(line, |_| 0)),
        Local::None => forwarded.and_then(|t| inflight_match(pid, now, Some(t), 0)),
    }
}
