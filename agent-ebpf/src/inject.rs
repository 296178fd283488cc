//! `traceparent` injection into outgoing HTTP/1.x requests of selected processes.
//!
//! A cgroup `sock_ops` program enrolls a client socket into `SOCKETS_TO_INJECT` when its
//! connection is established, if a selected process connected it (the connect tracepoint put
//! its cookie in `TRACKED_SOCKETS`). The `sk_msg` program then sees every message written on
//! it. It follows the request framing of the byte stream (head, Content-Length body) and, at
//! each request start whose whole head it can see, inserts one header line right after the
//! request line — or, when the request already carries a `traceparent`, rewrites that
//! header's parent id in place (same length). Anything it cannot frame with certainty (not
//! HTTP, a head split over writes or larger than the window, a chunked body) makes it stop
//! injecting on that socket: it never guesses where a request starts.
//!
//! Some kernels' socket maps change how a socket reads (FIONREAD counts only the map's own
//! queue; readiness wake-ups have been reported lost). There, chosen at start-up by the canary,
//! the application must never read from a socket in the map ("parking"): the sock_ops program
//! takes it out as soon as the peer answers — the ACK of our bytes, or data — before the
//! answer can be read, and userspace puts it back once the answer has been read and nothing is
//! pending. A write made while parked is not injected; the send path accounts for its bytes
//! (`account_write`), so the framing stays exact or is declared lost.

use agent_common::{
    CONTEXT_CLIENT, CONTEXT_FLAG_LOCAL_PARENT, CONTEXT_FLAG_NOT_INJECTED, CONTEXT_FLAG_PARENT,
    CONTEXT_FLAG_REWRITTEN, ContextEvent, EventKind, ParkEvent, SEND_BODY, SEND_BOUNDARY,
    SEND_FLAG_PARKED, SEND_LOST, SendState, TRACEPARENT_LINE_LEN,
};
use aya_ebpf::{
    bindings::{BPF_ANY, bpf_sock_ops, sk_action::SK_PASS},
    cty::c_void,
    helpers::{
        bpf_get_current_pid_tgid,
        generated::{
            bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_map_delete_elem, bpf_msg_pull_data,
            bpf_probe_read_kernel,
        },
    },
    macros::{map, sk_msg, sock_ops},
    maps::{Array, PerCpuArray, ProgramArray, SockHash},
    programs::{SkMsgContext, SockOpsContext},
};

use crate::{
    context::{self, random_id},
    http_head::{
        self, HEAD_BAD, HEAD_BAD_TRACEPARENT, HEAD_CHUNKED, HEAD_MANY_TRACEPARENTS, HEAD_WINDOW,
    },
    maps::{SEND_STATES, TRACKED_SOCKETS, count, decide_call, emit},
};

/// Client sockets enrolled for injection (socket cookie → socket); `agent_sk_msg` is attached
/// to it. A socket is in it only while it writes requests: it leaves when its peer answers
/// (`inject::park`) and userspace puts it back once the answer was read. Entries also leave
/// with their socket.
#[map]
pub static SOCKETS_TO_INJECT: SockHash<u64> = SockHash::with_max_entries(65536, 0);

/// 1: enrolled sockets leave the map when their peer answers (`inject::park`). Set by userspace
/// before the sock_ops program is attached, on kernels whose socket maps change how a socket
/// reads (its start-up canary found out); 0: sockets stay in the map for their lifetime.
#[map]
pub static INJECT_PARKING: Array<u32> = Array::with_max_entries(1, 0);

#[inline(always)]
pub fn parking() -> bool {
    INJECT_PARKING.get(0).is_some_and(|v| *v != 0)
}

/// The injector itself (slot 0), tail-called for each further request of a message.
#[map]
pub static INJECT_PROGRAMS: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// Where the injector's walk of the current message goes on after its tail call.
#[map]
pub static INJECT_CONTINUATION: PerCpuArray<Continuation> = PerCpuArray::with_max_entries(1, 0);

/// Copy of the head of an outgoing request, for scanning (window + room for 8-byte loads).
#[map]
pub static INJECT_SCRATCH: PerCpuArray<[u8; 8192 + 64]> = PerCpuArray::with_max_entries(1, 0);

const BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB: u32 = 4;
/// An ACK of our bytes with a round-trip sample (`BPF_SOCK_OPS_RTT_CB_FLAG`).
const BPF_SOCK_OPS_RTT_CB: u32 = 12;
/// A received segment that took the slow path (`BPF_SOCK_OPS_PARSE_ALL_HDR_OPT_CB_FLAG`): data
/// that acknowledges nothing new (a server that speaks first) arrives here, not as an RTT.
const BPF_SOCK_OPS_PARSE_HDR_OPT_CB: u32 = 13;
const BPF_SOCK_OPS_RTT_CB_FLAG: u32 = 1 << 3;
const BPF_SOCK_OPS_PARSE_ALL_HDR_OPT_CB_FLAG: u32 = 1 << 4;
/// Requests handled in one message (pipelining); more makes the socket's framing lost.
const MAX_REQUESTS_PER_MESSAGE: u32 = 16;

#[sock_ops]
pub fn agent_sock_ops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => enroll(&ctx),
        BPF_SOCK_OPS_RTT_CB | BPF_SOCK_OPS_PARSE_HDR_OPT_CB => park(&ctx),
        _ => {}
    }
    1
}

#[inline(always)]
fn enroll(ctx: &SockOpsContext) {
    let ops = ctx.ops;
    let mut cookie = unsafe { bpf_get_socket_cookie(ops as *mut c_void) };
    if TRACKED_SOCKETS.get_ptr(&cookie).is_none() {
        return;
    }
    let sk = unsafe { (*ops).__bindgen_anon_2.sk } as u64;
    if sk == 0 {
        return;
    }
    let fresh = SendState {
        mode: SEND_BOUNDARY,
        ..SendState::default()
    };
    let enrolled = SEND_STATES.insert(&sk, &fresh, 0).is_ok()
        && SOCKETS_TO_INJECT
            .update(
                &mut cookie,
                unsafe { &mut *(ops as *mut bpf_sock_ops) },
                BPF_ANY as u64,
            )
            .is_ok()
        // Tell us when the peer answers (see `park`); without it the socket cannot stay.
        && (!parking()
            || ctx
                .set_cb_flags(
                    (ctx.cb_flags()
                        | BPF_SOCK_OPS_RTT_CB_FLAG
                        | BPF_SOCK_OPS_PARSE_ALL_HDR_OPT_CB_FLAG) as i32,
                )
                .is_ok());
    if !enrolled {
        unsafe {
            bpf_map_delete_elem(
                &SOCKETS_TO_INJECT as *const _ as *mut c_void,
                &cookie as *const u64 as *const c_void,
            )
        };
    }
    count(|c| {
        if enrolled {
            c.sockets_enrolled += 1;
        } else {
            c.enroll_failed += 1;
        }
    });
}

/// The peer answered: take the socket out of the injector's map before the answer can be read
/// (this runs in the receive path, before the segment's data is queued or anyone is woken).
#[inline(always)]
fn park(ctx: &SockOpsContext) {
    let ops = ctx.ops;
    let cookie = unsafe { bpf_get_socket_cookie(ops as *mut c_void) };
    let removed = unsafe {
        bpf_map_delete_elem(
            &SOCKETS_TO_INJECT as *const _ as *mut c_void,
            &cookie as *const u64 as *const c_void,
        )
    } == 0;
    if !removed {
        // Parked already, or never enrolled.
        return;
    }
    let sk = unsafe { (*ops).__bindgen_anon_2.sk } as u64;
    let (mode, writes) = match SEND_STATES.get_ptr_mut(&sk) {
        Some(state) => unsafe {
            (*state).flags |= SEND_FLAG_PARKED;
            ((*state).mode, (*state).writes)
        },
        None => (SEND_LOST, 0),
    };
    let pid = TRACKED_SOCKETS
        .get_ptr(&cookie)
        .map(|t| unsafe { (*t).pid })
        .unwrap_or(0);
    count(|c| c.sockets_parked += 1);
    emit(ParkEvent {
        kind: EventKind::Parked as u32,
        mode,
        pid,
        _pad: 0,
        sock_cookie: cookie,
        sk,
        writes,
        ts_ns: unsafe { bpf_ktime_get_ns() },
    });
}

/// The send path's view of one write on an enrolled socket, when it returns (`ret` < 0: it
/// failed): the injector must have seen exactly its bytes. Bytes it did not see (the socket
/// was parked, or left the map in the middle of the write) are accounted here: inside a body
/// they only shorten it; a request that starts unseen went out without a header, and its head
/// (in `buf`, the write's first `captured` bytes) tells where the next one starts.
#[inline(always)]
pub fn account_write(sk: u64, tid: u32, ret: i64, buf: *const u8, captured: u32) {
    let Some(state) = SEND_STATES.get_ptr_mut(&sk) else {
        return;
    };
    let state = unsafe { &mut *state };
    // Counted like the data events userspace gets (one per write that moved bytes).
    state.writes += (ret > 0) as u64;
    let seen = state.seen;
    state.seen = 0;
    let bytes = if ret > 0 { ret as u64 } else { 0 };
    if seen == bytes || state.mode == SEND_LOST {
        return;
    }
    if seen > bytes {
        // The injector framed bytes the write did not send (a failed or short write that
        // the caller will repeat): its position is wrong from here.
        lose(state);
        return;
    }
    let missed = bytes - seen;
    if state.mode == SEND_BODY && missed <= state.remaining {
        state.remaining -= missed;
        if state.remaining == 0 {
            state.mode = SEND_BOUNDARY;
        }
        return;
    }
    // A request starts in the unseen bytes, after the rest of the body (if any).
    let start = seen
        + if state.mode == SEND_BODY {
            state.remaining
        } else {
            0
        };
    count(|c| c.requests_sent_parked += 1);
    frame_unseen(state, sk, tid, buf, captured, start, bytes);
}

/// Follows a request the injector did not see, starting at `start` of a write of `bytes`
/// whose first `captured` bytes are in `buf` (the send path's scratch copy): its head must be
/// there in full, and it must be the write's last request.
#[inline(always)]
fn frame_unseen(
    state: &mut SendState,
    sk: u64,
    tid: u32,
    buf: *const u8,
    captured: u32,
    start: u64,
    bytes: u64,
) {
    // Offsets into the scratch copy stay within its bounds for the verifier (see `scan`).
    if start >= UNSEEN_START_LIMIT || start >= captured as u64 {
        lose(state);
        return;
    }
    let start = start as u32 & (UNSEEN_START_LIMIT as u32 - 1);
    let p = unsafe { buf.add(start as usize) };
    let n = captured - start;
    if !http_head::starts_request(p, n) {
        lose(state);
        return;
    }
    let Some(head) = http_head::scan(p, n, http_head::SCAN_SEND) else {
        lose(state);
        return;
    };
    if head.flags & (HEAD_BAD | HEAD_CHUNKED) != 0 || head.head_end == 0 {
        lose(state);
        return;
    }
    link_unseen(sk, tid, p, head);
    let next = start as u64 + head.head_end as u64 + head.content_length;
    if next > bytes {
        state.mode = SEND_BODY;
        state.remaining = next - bytes;
    } else if next == bytes {
        state.mode = SEND_BOUNDARY;
        state.remaining = 0;
    } else {
        // Several requests in one unseen write: not followed here.
        lose(state);
    }
}

/// A request that went out without a header still gets its place in the trace here: the
/// request its thread serves, or the one in-flight request it forwards. Its ids (not on the
/// wire) go to userspace as a client context.
#[inline(always)]
fn link_unseen(sk: u64, tid: u32, buf: *const u8, head: &http_head::Head) {
    let pid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let now = unsafe { bpf_ktime_get_ns() };
    let mut trace = [0u8; 16];
    let forwarded = head.traceparent != 0
        && head.flags & HEAD_MANY_TRACEPARENTS == 0
        && http_head::decode_hex(buf, head.traceparent + 3, &mut trace)
        && trace != [0; 16];
    let linked = context::belongs_to(pid, tid, now, forwarded.then_some(&trace), || {
        http_head::line_hash(buf, head.line_end)
    });
    decide_call(sk, !linked.is_some_and(|p| p.left_out()));
    let Some(parent) = linked else {
        return;
    };
    if parent.left_out() {
        return;
    }
    let off = crate::maps::offsets();
    let read = |at: u32| unsafe {
        aya_ebpf::helpers::bpf_probe_read_kernel((sk + at as u64) as *const u16).unwrap_or(0)
    };
    emit(ContextEvent {
        kind: EventKind::Context as u32,
        role: CONTEXT_CLIENT,
        pid,
        tid,
        ts_ns: now,
        sock_cookie: 0,
        local_port: read(off.skc_num),
        remote_port: u16::from_be(read(off.skc_dport)),
        flags: CONTEXT_FLAG_PARENT | CONTEXT_FLAG_LOCAL_PARENT | CONTEXT_FLAG_NOT_INJECTED,
        trace_id: parent.trace_id,
        span_id: random_id(),
        parent_id: parent.span_id,
    });
}

/// A request in unseen bytes is followed only if it starts this early in its write.
const UNSEEN_START_LIMIT: u64 = 4096;

/// Whether the injector keeps state for `sk` (its framing, even if lost).
#[inline(always)]
pub fn follows(sk: u64) -> bool {
    SEND_STATES.get_ptr(&sk).is_some()
}

/// Whether the injector decides head sampling for `sk`'s requests: it follows the socket's
/// framing (its requests pass `apply` or, parked, `link_unseen`).
#[inline(always)]
pub fn decides_sampling(sk: u64) -> bool {
    SEND_STATES
        .get_ptr(&sk)
        .is_some_and(|s| unsafe { (*s).mode } != SEND_LOST)
}

/// A read on a parked socket left nothing unread: userspace may put the socket back now if the
/// answer is complete, so its event wakes userspace at once (it is otherwise read on a timer).
/// Not a socket whose framing is lost: it never goes back, and waking userspace on each of its
/// reads cost a PostgreSQL client 2.3 µs of BPF per read (the wake-up runs in the program).
#[inline(always)]
pub fn parked_and_drained(sk: u64) -> bool {
    let Some(state) = SEND_STATES.get_ptr(&sk) else {
        return false;
    };
    let (flags, mode) = unsafe { ((*state).flags, (*state).mode) };
    if flags & SEND_FLAG_PARKED == 0 || mode == SEND_LOST {
        return false;
    }
    let off = crate::maps::offsets();
    let read = |at: u32| unsafe {
        aya_ebpf::helpers::bpf_probe_read_kernel((sk + at as u64) as *const u32).ok()
    };
    matches!(
        (read(off.tcp_rcv_nxt), read(off.tcp_copied_seq)),
        (Some(a), Some(b)) if a == b
    )
}

#[sk_msg]
pub fn agent_sk_msg(ctx: SkMsgContext) -> u32 {
    inject(&ctx);
    SK_PASS
}

/// What happened to one request start.
enum Outcome {
    /// Injected or rewritten; the head is `added` bytes longer than it was.
    Done { added: u32 },
    /// Left untouched but framed (several traceparents): go on after it; counted by the caller.
    Skipped,
    /// Cannot frame: stop on this socket.
    Lost,
}

/// Where a message's walk goes on after a tail call (one request per program run keeps the
/// verifier's work to one head scan; pipelined requests in one message continue here).
#[repr(C)]
pub struct Continuation {
    active: u32,
    off: u32,
    size: u32,
    k: u32,
}

#[inline(always)]
fn inject(ctx: &SkMsgContext) {
    let sk = unsafe { (*ctx.msg).__bindgen_anon_3.sk } as u64;
    if sk == 0 {
        return;
    }
    let Some(cont) = INJECT_CONTINUATION.get_ptr_mut(0) else {
        return;
    };
    let cont = unsafe { &mut *cont };
    let state = match SEND_STATES.get_ptr_mut(&sk) {
        Some(s) => s,
        None => {
            // Enrolled without a state: the start-up canary's socket (added from userspace
            // before any byte was written), which starts at a request boundary.
            let fresh = SendState::default();
            if SEND_STATES.insert(&sk, &fresh, 0).is_err() {
                return;
            }
            match SEND_STATES.get_ptr_mut(&sk) {
                Some(s) => s,
                None => return,
            }
        }
    };
    let state = unsafe { &mut *state };
    let (off, size, k) = if cont.active != 0 {
        cont.active = 0;
        (cont.off, cont.size, cont.k)
    } else {
        let size = ctx.size();
        // The write's return checks that the injector saw all of it (`account_write`).
        state.seen += size as u64;
        state.flags &= !SEND_FLAG_PARKED;
        match state.mode {
            SEND_BOUNDARY => (0, size, 0),
            SEND_BODY => {
                if state.remaining >= size as u64 {
                    state.remaining -= size as u64;
                    if state.remaining == 0 {
                        // A body that ends with the message: the next byte starts a request
                        // (userspace reads this mode before a parked socket rejoins).
                        state.mode = SEND_BOUNDARY;
                    }
                    return;
                }
                let off = state.remaining as u32;
                state.mode = SEND_BOUNDARY;
                state.remaining = 0;
                (off, size, 0)
            }
            _ => {
                count(|c| c.inject_skipped += 1);
                return;
            }
        }
    };
    if off >= size {
        return;
    }
    let Some(head) = request_at(ctx, off, size) else {
        lose(state);
        return;
    };
    let added = match apply(ctx, sk, off, head) {
        Outcome::Done { added } => added,
        Outcome::Skipped => {
            count(|c| c.inject_skipped += 1);
            0
        }
        Outcome::Lost => {
            lose(state);
            return;
        }
    };
    let size = size + added;
    if head.flags & HEAD_CHUNKED != 0 {
        // Chunked framing is not followed: later requests stay untouched.
        lose(state);
        return;
    }
    let next = off as u64 + head.head_end as u64 + added as u64 + head.content_length;
    if next > size as u64 {
        state.mode = SEND_BODY;
        state.remaining = next - size as u64;
        return;
    }
    if next == size as u64 {
        return;
    }
    // Another request starts in this message: go on in a fresh run of this program.
    if k + 1 >= MAX_REQUESTS_PER_MESSAGE {
        lose(state);
        return;
    }
    cont.active = 1;
    cont.off = next as u32;
    cont.size = size;
    cont.k = k + 1;
    unsafe { INJECT_PROGRAMS.tail_call(ctx, 0) };
    // Only reached when the tail call failed.
    cont.active = 0;
    lose(state);
}

#[inline(always)]
fn lose(state: &mut SendState) {
    state.mode = SEND_LOST;
    count(|c| {
        c.inject_framing_lost += 1;
        c.inject_skipped += 1;
    });
}

/// The request head starting at `off`, copied and scanned; `None` when it is not a request
/// whose whole head lies in this message within the window.
#[inline(always)]
fn request_at(ctx: &SkMsgContext, off: u32, size: u32) -> Option<&'static mut http_head::Head> {
    let left = size - off;
    let want = if left > HEAD_WINDOW {
        HEAD_WINDOW
    } else {
        left
    };
    if unsafe { bpf_msg_pull_data(ctx.msg, off, off + want, 0) } != 0 {
        count(|c| c.inject_failed += 1);
        return None;
    }
    let (data, end) = (ctx.data(), ctx.data_end());
    let avail = end.saturating_sub(data) as u32;
    let n = if avail < want { avail } else { want };
    let scratch = INJECT_SCRATCH.get_ptr_mut(0)?;
    let scratch = unsafe { &mut *scratch };
    // Through memory: the compiler knows `n <= want` and would drop the mask, and verifiers
    // like 6.1's cannot carry that bound from a comparison of two registers.
    let n = unsafe { core::ptr::read_volatile(&n) } & (HEAD_WINDOW * 2 - 1);
    if n > HEAD_WINDOW {
        return None;
    }
    let copied = unsafe {
        bpf_probe_read_kernel(
            scratch.as_mut_ptr() as *mut c_void,
            n,
            data as *const c_void,
        )
    };
    if copied != 0 {
        return None;
    }
    let buf = scratch.as_ptr();
    if !http_head::starts_request(buf, n) {
        return None;
    }
    let head = http_head::scan(buf, n, http_head::SCAN_INJECT)?;
    if head.flags & HEAD_BAD != 0 || head.line_end == 0 || head.head_end == 0 {
        return None;
    }
    Some(head)
}

/// Writes the ids into the request at `off` and reports them to userspace (unless head
/// sampling left out the request it is made for: then its header says so, and userspace hears
/// nothing of it).
#[inline(always)]
fn apply(ctx: &SkMsgContext, sk: u64, off: u32, head: &http_head::Head) -> Outcome {
    if head.flags & HEAD_BAD_TRACEPARENT != 0 {
        // Not a version-00 value we could rewrite in place: left as it is (the callee will
        // ignore it); our span keeps ids of its own.
        count(|c| c.traceparent_invalid_kept += 1);
        return Outcome::Skipped;
    }
    if head.flags & HEAD_MANY_TRACEPARENTS != 0 {
        return Outcome::Skipped;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let now = unsafe { bpf_ktime_get_ns() };
    let mut ev = ContextEvent {
        kind: EventKind::Context as u32,
        role: CONTEXT_CLIENT,
        pid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        ts_ns: now,
        sock_cookie: 0,
        local_port: unsafe { (*ctx.msg).local_port } as u16,
        remote_port: u32::from_be(unsafe { (*ctx.msg).remote_port }) as u16,
        flags: 0,
        trace_id: [0; 16],
        span_id: random_id(),
        parent_id: [0; 8],
    };
    let scratch = match INJECT_SCRATCH.get_ptr(0) {
        Some(s) => s as *const u8,
        None => return Outcome::Lost,
    };
    context::makes_calls(ev.pid);
    let added;
    let mut sampled = true;
    if head.traceparent != 0 {
        // Keep the caller's trace; our client span becomes the callee's parent.
        let mut parent = [0u8; 8];
        if !http_head::decode_hex(scratch, head.traceparent + 3, &mut ev.trace_id)
            || !http_head::decode_hex(scratch, head.traceparent + 36, &mut parent)
        {
            count(|c| c.traceparent_invalid_kept += 1);
            return Outcome::Skipped;
        }
        let trace = ev.trace_id;
        ev.flags = CONTEXT_FLAG_REWRITTEN;
        let forwarded = (trace != [0; 16]).then_some(&trace);
        let local = context::belongs_to(ev.pid, ev.tid, now, forwarded, || {
            http_head::line_hash(scratch, head.line_end)
        });
        // Left out with the request it is made for, when it continues that request's trace.
        sampled = match local {
            Some(p) if trace == [0; 16] || p.trace_id == trace => !p.left_out(),
            _ => true,
        };
        if trace == [0; 16] {
            // An all-zero trace id is invalid: the request gets the ids it would have had
            // without a header (our served request's trace, or a new one), written over the
            // invalid ones in place.
            match local {
                Some(p) => {
                    ev.trace_id = p.trace_id;
                    ev.parent_id = p.span_id;
                    ev.flags |= CONTEXT_FLAG_PARENT | CONTEXT_FLAG_LOCAL_PARENT;
                }
                None => ev.trace_id = random_id(),
            }
            if !write_hex(ctx, head.traceparent + 3, &ev.trace_id) {
                count(|c| c.inject_failed += 1);
                return Outcome::Lost;
            }
            count(|c| c.traceparent_invalid_rewritten += 1);
        } else {
            match local {
                Some(p) if p.trace_id == trace => {
                    ev.parent_id = p.span_id;
                    ev.flags |= CONTEXT_FLAG_PARENT | CONTEXT_FLAG_LOCAL_PARENT;
                }
                // An all-zero parent id means no parent: it is replaced below anyway.
                _ if parent == [0; 8] => count(|c| c.traceparent_invalid_rewritten += 1),
                _ => {
                    ev.parent_id = parent;
                    ev.flags |= CONTEXT_FLAG_PARENT;
                }
            }
        }
        if !write_hex(ctx, head.traceparent + 36, &ev.span_id)
            || (!sampled && !write_hex(ctx, head.traceparent + 53, &[0u8]))
        {
            count(|c| c.inject_failed += 1);
            return Outcome::Lost;
        }
        count(|c| c.traceparent_rewritten += 1);
        added = 0;
    } else {
        let local = context::belongs_to(ev.pid, ev.tid, now, None, || {
            http_head::line_hash(scratch, head.line_end)
        });
        match local {
            Some(p) => {
                ev.trace_id = p.trace_id;
                ev.parent_id = p.span_id;
                ev.flags = CONTEXT_FLAG_PARENT | CONTEXT_FLAG_LOCAL_PARENT;
                sampled = !p.left_out();
            }
            None => ev.trace_id = random_id(),
        }
        if !insert_line(ctx, off, head, &ev.trace_id, &ev.span_id, sampled) {
            count(|c| c.inject_failed += 1);
            return Outcome::Lost;
        }
        count(|c| c.traceparent_injected += 1);
        added = TRACEPARENT_LINE_LEN;
    }
    decide_call(sk, sampled);
    if sampled {
        emit(ev);
    }
    Outcome::Done { added }
}

/// Overwrites `2 * N` hex digits at message offset `at` with `id` (the data window from the
/// last pull starts at the request, so `at` is relative to it).
#[inline(always)]
fn write_hex<const N: usize>(ctx: &SkMsgContext, at: u32, id: &[u8; N]) -> bool {
    let at = (at & (HEAD_WINDOW - 1)) as usize;
    let data = ctx.data();
    let end = ctx.data_end();
    if data + at + 2 * N > end {
        return false;
    }
    let p = (data + at) as *mut u8;
    let mut i = 0;
    while i < N {
        unsafe {
            *p.add(2 * i) = http_head::hex_digit(id[i] >> 4);
            *p.add(2 * i + 1) = http_head::hex_digit(id[i]);
        }
        i += 1;
    }
    true
}

/// Inserts `traceparent: 00-<trace>-<span>-01\r\n` (`-00` when not `sampled`) after the
/// request line of the request at message offset `off`.
#[inline(always)]
fn insert_line(
    ctx: &SkMsgContext,
    off: u32,
    head: &http_head::Head,
    trace: &[u8; 16],
    span: &[u8; 8],
    sampled: bool,
) -> bool {
    let at = off + head.line_end;
    if ctx.push_data(at, TRACEPARENT_LINE_LEN, 0).is_err() {
        return false;
    }
    if unsafe { bpf_msg_pull_data(ctx.msg, at, at + TRACEPARENT_LINE_LEN, 0) } != 0 {
        return false;
    }
    let data = ctx.data();
    let end = ctx.data_end();
    if data + TRACEPARENT_LINE_LEN as usize > end {
        return false;
    }
    let p = data as *mut u8;
    let put = |i: usize, b: u8| unsafe { *p.add(i) = b };
    for (i, b) in b"traceparent: 00-".iter().enumerate() {
        put(i, *b);
    }
    let mut i = 0;
    while i < 16 {
        put(16 + 2 * i, http_head::hex_digit(trace[i] >> 4));
        put(17 + 2 * i, http_head::hex_digit(trace[i]));
        i += 1;
    }
    put(48, b'-');
    let mut i = 0;
    while i < 8 {
        put(49 + 2 * i, http_head::hex_digit(span[i] >> 4));
        put(50 + 2 * i, http_head::hex_digit(span[i]));
        i += 1;
    }
    for (i, b) in b"-01\r\n".iter().enumerate() {
        put(65 + i, *b);
    }
    if !sampled {
        put(67, b'0');
    }
    // The insertion split the message's data; join the head again so it leaves in one
    // segment. Split, its second part would wait behind Nagle for the peer's delayed ACK
    // (40 ms on every keep-alive request of a client without TCP_NODELAY).
    let size = ctx.size();
    let end = if size <= JOIN_LIMIT {
        size
    } else {
        off + head.head_end + TRACEPARENT_LINE_LEN
    };
    if unsafe { bpf_msg_pull_data(ctx.msg, off, end, 0) } != 0 {
        count(|c| c.inject_failed += 1);
    }
    true
}

/// Messages up to this size are made one piece again after an insertion.
const JOIN_LIMIT: u32 = 16384;
