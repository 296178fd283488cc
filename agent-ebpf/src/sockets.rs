//! Socket data capture at `tp_btf/sock_recv_length` and `tp_btf/sock_send_length`; where the
//! kernel lacks them, at the return of `inet_recvmsg`/`inet_sendmsg` and their IPv6 twins
//! (fexit); where it also lacks trampolines, at their entry (kprobes) and the socket syscalls'
//! exit. All three end in `on_socket_io`.

use agent_common::{
    DATA_FLAG_ADDRESSES, DATA_FLAG_COPY_FAILED, DATA_FLAG_TLS_RECORDS, DATA_FLAG_TRUNCATED,
    DATA_FLAG_UNSAMPLED, DIR_EGRESS, DIR_INGRESS, DataEvent, EventKind, MAX_CAPTURE, MAX_IOVECS,
    SOCKET_SK_OFFSET, SyscallKind, TrackedSocket,
};
use aya_ebpf::{
    cty::c_void,
    helpers::{
        bpf_probe_read_kernel,
        generated::{
            bpf_get_current_pid_tgid, bpf_get_current_task_btf, bpf_get_socket_cookie,
            bpf_ktime_get_ns, bpf_probe_read_user, bpf_ringbuf_output, bpf_task_pt_regs,
        },
    },
    macros::{btf_tracepoint, fexit, kprobe, map, tracepoint},
    maps::{LruHashMap, PerCpuArray},
    programs::{BtfTracePointContext, FExitContext, ProbeContext, TracePointContext},
};

use crate::{
    arch::{self, ARCH},
    context,
    maps::{
        BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, EVENTS, SAMPLING_MARKS, SERVER_SAMPLED,
        SERVER_UNSAMPLED, TRACKED_SOCKETS, capture_size, context_propagation, count, counters,
        decide_call, offsets, selected_tgid,
    },
};

/// The last chunk of a TCP write this CPU began to queue: which thread, socket, when (see
/// `sockets::agent_tcp_sendmsg`). Per CPU, no hashing: the write's send event normally runs on
/// the same CPU; when it does not (the thread slept and moved), it finds another stamp or a
/// stale one, which the socket's `write_stamp_floor_ns` rejects.
#[map]
pub static SEND_STARTS: PerCpuArray<SendStart> = PerCpuArray::with_max_entries(1, 0);

/// Scratch space to assemble a data event (header + payload) off the 512-byte stack.
/// The payload area is twice the largest capture so a masked offset plus a clamped length
/// always stays inside it, which is what the verifier needs to see.
#[repr(C)]
pub struct Scratch {
    pub header: DataEvent,
    pub payload: [u8; 2 * MAX_CAPTURE],
    /// What the read said of head sampling (`STARTED_*`), passed through map memory so the
    /// paths of the context code end in one verifier state before sampling's own.
    pub started: u32,
}

const STARTED_NONE: u32 = 0;
const STARTED_SAMPLED: u32 = 1;
const STARTED_UNSAMPLED: u32 = 2;

#[map]
pub static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const IPPROTO_TCP: u16 = 6;
const MSG_PEEK: i32 = 2;

/// Where the payload of the current syscall lives in user memory.
enum UserBuf {
    None,
    Flat(u64),
    Iov { iov: u64, count: u64 },
}

#[btf_tracepoint(function = "sock_recv_length")]
pub fn agent_sock_recv(ctx: BtfTracePointContext) -> i32 {
    on_recv(ctx.arg(0), ctx.arg(1), ctx.arg(2));
    0
}

/// The same with head sampling (`--sample-ratio`), loaded instead of `agent_sock_recv`. Programs
/// of their own: the data programs sit at the verifier's 1M-instruction budget on several
/// kernels, and sampling's code, even where it is never run, changed the generated code enough
/// to push the others over it. Only on kernels with these tracepoints (Linux 6.3+).
#[btf_tracepoint(function = "sock_recv_length")]
pub fn agent_sock_recv_sampled(ctx: BtfTracePointContext) -> i32 {
    on_recv_with::<true, true>(ctx.arg(0), ctx.arg(1), ctx.arg(2));
    0
}

/// See `agent_sock_recv_sampled`.
#[btf_tracepoint(function = "sock_send_length")]
pub fn agent_sock_send_sampled(ctx: BtfTracePointContext) -> i32 {
    on_send_with::<true, true>(ctx.arg(0), ctx.arg(1));
    0
}

#[btf_tracepoint(function = "sock_send_length")]
pub fn agent_sock_send(ctx: BtfTracePointContext) -> i32 {
    on_send(ctx.arg(0), ctx.arg(1));
    0
}

// Kernels without the `sock_*_length` tracepoints (before 6.3): the same points, at the
// return of the address families' socket functions (`sock_recvmsg`/`sock_sendmsg` themselves
// are inlined into most of their callers). Their first argument is a `struct socket`; its
// `sk` is read by a BTF load, so the verifier still knows it for a `struct sock` (the
// socket-cookie helper needs that).

/// `int inet_recvmsg(struct socket *sock, struct msghdr *msg, size_t size, int flags)`
#[fexit(function = "inet_recvmsg")]
pub fn agent_inet_recvmsg(ctx: FExitContext) -> i32 {
    on_recv(socket_sk(ctx.arg(0)), ctx.arg(4), ctx.arg(3));
    0
}

/// `inet6_recvmsg`: the same arguments for IPv6 sockets.
#[fexit(function = "inet6_recvmsg")]
pub fn agent_inet6_recvmsg(ctx: FExitContext) -> i32 {
    on_recv(socket_sk(ctx.arg(0)), ctx.arg(4), ctx.arg(3));
    0
}

/// `int inet_sendmsg(struct socket *sock, struct msghdr *msg, size_t size)`
#[fexit(function = "inet_sendmsg")]
pub fn agent_inet_sendmsg(ctx: FExitContext) -> i32 {
    on_send(socket_sk(ctx.arg(0)), ctx.arg(3));
    0
}

/// `inet6_sendmsg`: the same arguments for IPv6 sockets.
#[fexit(function = "inet6_sendmsg")]
pub fn agent_inet6_sendmsg(ctx: FExitContext) -> i32 {
    on_send(socket_sk(ctx.arg(0)), ctx.arg(3));
    0
}

/// `ssize_t inet_sendpage(struct socket *sock, struct page *page, int offset, size_t size,
/// int flags)`: `sendfile` on kernels that still had `sendpage` (before 6.5) sends around
/// `sendmsg` and its tracepoint (TCP over IPv4 and IPv6 alike).
#[fexit(function = "inet_sendpage")]
pub fn agent_inet_sendpage(ctx: FExitContext) -> i32 {
    on_send(socket_sk(ctx.arg(0)), ctx.arg(5));
    0
}

// Kernels with neither (arm64 before 6.4 has no trampolines for kernel functions): kprobes at
// the same functions' entry remember the socket per thread, and the socket syscalls' exit
// tracepoints see the result. Not kretprobes: the kernel follows only max(10, 2 × CPUs) calls
// in progress per kretprobe and a thread blocked in a read holds one (measured in a 6.1 guest:
// 30 threads blocked in recv, the data of 20 lost). Each program serves every function (or
// syscall) of its direction. Kprobe and tracepoint programs cannot call the socket-cookie
// helper: they read the cookie the kernel keeps in the socket, which the agent makes for every
// TCP socket (`MAKE_COOKIES`; userspace, for those open before it).

/// A socket call in progress on a thread (kprobe fallback), and the syscall it is made in.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SocketCall {
    sock: u64,
    flags: i64,
    syscall: (u64, u64),
}

#[map]
static SOCKET_CALLS: LruHashMap<u32, SocketCall> = LruHashMap::with_max_entries(16384, 0);

/// Entry of `inet_recvmsg`/`inet6_recvmsg(sock, msg, size, flags)`.
#[kprobe]
pub fn agent_recv_entry(ctx: ProbeContext) -> u32 {
    remember_call(ctx.arg(0), ctx.arg(3));
    0
}

/// Entry of `inet_sendmsg`/`inet6_sendmsg(sock, msg, size)` and `inet_sendpage(sock, ...)`.
#[kprobe]
pub fn agent_send_entry(ctx: ProbeContext) -> u32 {
    remember_call(ctx.arg(0), Some(0));
    0
}

/// Exit of read, readv, recvfrom, recvmsg.
#[tracepoint]
pub fn agent_recv_exit(ctx: TracePointContext) -> u32 {
    if let Some(call) = recall() {
        let ret = crate::lifecycle::sys_exit_ret(&ctx);
        on_recv_with::<false, false>(socket_sk_read(call.sock), ret as i32, call.flags as i32);
    }
    0
}

/// Exit of write, writev, sendto, sendmsg, sendfile64.
#[tracepoint]
pub fn agent_send_exit(ctx: TracePointContext) -> u32 {
    if let Some(call) = recall() {
        let ret = crate::lifecycle::sys_exit_ret(&ctx);
        on_send_with::<false, false>(socket_sk_read(call.sock), ret as i32);
    }
    0
}

/// The current syscall's number and first argument (the fd of the socket syscalls).
#[inline(always)]
fn current_syscall() -> (u64, u64) {
    let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) } as u64;
    match arch::syscall_regs(regs) {
        Some((nr, [fd, _, _])) if regs != 0 => (nr, fd),
        _ => (u64::MAX, u64::MAX),
    }
}

#[inline(always)]
fn remember_call(sock: Option<u64>, flags: Option<i64>) {
    let (Some(sock), Some(flags)) = (sock, flags) else {
        return;
    };
    // Unselected processes stop here, before the map is touched.
    let Some((_, tid)) = selected_tgid() else {
        return;
    };
    let syscall = current_syscall();
    // A call of another syscall still open on this thread was made where no exit tracepoint
    // follows it (io_uring, recvmmsg): its data is not captured. Calls of the same syscall
    // (sendfile sends page by page) are one.
    if let Some(open) = SOCKET_CALLS.get_ptr(&tid)
        && unsafe { (*open).syscall } != syscall
    {
        count(|c| c.kprobe_calls_unfinished += 1);
    }
    let _ = SOCKET_CALLS.insert(
        &tid,
        &SocketCall {
            sock,
            flags,
            syscall,
        },
        0,
    );
}

/// The socket call this syscall made, taken.
#[inline(always)]
fn recall() -> Option<SocketCall> {
    let tid = unsafe { bpf_get_current_pid_tgid() } as u32;
    let call = unsafe { *SOCKET_CALLS.get(&tid)? };
    let _ = SOCKET_CALLS.remove(&tid);
    if call.syscall != current_syscall() {
        count(|c| c.kprobe_calls_unfinished += 1);
        return None;
    }
    Some(call)
}

/// `socket->sk` by a plain read (the kprobe fallback's socket is not a typed pointer).
#[inline(always)]
fn socket_sk_read(sock: u64) -> u64 {
    read_kernel::<u64>(sock, SOCKET_SK_OFFSET).unwrap_or(0)
}

/// `socket->sk` as a typed load (see above); 0 for no socket.
#[inline(always)]
fn socket_sk(sock: u64) -> u64 {
    if sock == 0 {
        return 0;
    }
    unsafe { *((sock + SOCKET_SK_OFFSET as u64) as *const u64) }
}

#[inline(always)]
fn on_recv(sk: u64, ret: i32, flags: i32) {
    on_recv_with::<true, false>(sk, ret, flags);
}

#[inline(always)]
fn on_send(sk: u64, ret: i32) {
    on_send_with::<true, false>(sk, ret);
}

#[inline(always)]
fn on_recv_with<const COOKIE_HELPER: bool, const SAMPLE: bool>(sk: u64, ret: i32, flags: i32) {
    if ret <= 0 || flags & MSG_PEEK != 0 {
        return;
    }
    // Unselected processes stop here, before anything is read or copied.
    let Some(thread) = selected_tgid() else {
        return;
    };
    on_socket_io::<DIR_INGRESS, COOKIE_HELPER, SAMPLE>(sk, thread, ret as u64, None);
}

#[inline(always)]
fn on_send_with<const COOKIE_HELPER: bool, const SAMPLE: bool>(sk: u64, ret: i32) {
    let Some(thread) = selected_tgid() else {
        return;
    };
    // Taken whatever the outcome, so a failed send leaves no stamp behind.
    let started = take_send_start(thread.1, sk);
    if ret <= 0 {
        if context_propagation() {
            crate::inject::account_write(sk, thread.1, ret as i64, core::ptr::null(), 0);
        }
        return;
    }
    on_socket_io::<DIR_EGRESS, COOKIE_HELPER, SAMPLE>(sk, thread, ret as u64, started);
}

/// Where and when a thread began queueing the first and the last chunk of its current TCP
/// write.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SendStart {
    tid: u32,
    _pad: u32,
    sk: u64,
    first_ns: u64,
    last_ns: u64,
}

/// Fires in `tcp_sendmsg_locked` before each chunk of a write is queued (after any wait for
/// buffer space); the last stamp of a write is before its final bytes leave. `sock_send_length`
/// only fires once the syscall returns, and a sender held up in between (a descheduled vCPU, an
/// interrupt) would otherwise end its span after the peer already had the answer. Runs for
/// every TCP write on the host, so it only writes this CPU's slot; the send event checks it.
/// Unselected writers stop first, before the clock is read.
#[btf_tracepoint(function = "tcp_sendmsg_locked")]
pub fn agent_tcp_sendmsg(ctx: BtfTracePointContext) -> i32 {
    let Some((_, tid)) = selected_tgid() else {
        return 0;
    };
    if let Some(slot) = SEND_STARTS.get_ptr_mut(0) {
        unsafe {
            let sk: u64 = ctx.arg(0);
            let now = bpf_ktime_get_ns();
            // The same thread and socket: a further chunk of this write (or a stale stamp,
            // which the send event tells apart by its time).
            if (*slot).tid != tid || (*slot).sk != sk {
                (*slot).tid = tid;
                (*slot).sk = sk;
                (*slot).first_ns = now;
            }
            (*slot).last_ns = now;
        }
    }
    0
}

/// The stamps (first, last chunk) `agent_tcp_sendmsg` left on this CPU for this thread's write
/// on `sk`, if any. They may still be stale (a write whose send event ran on another CPU
/// leaves its stamps behind): `on_socket_io` checks them against the socket's last write.
#[inline(always)]
fn take_send_start(tid: u32, sk: u64) -> Option<(u64, u64)> {
    let slot = SEND_STARTS.get_ptr_mut(0)?;
    let stamp = unsafe { *slot };
    if stamp.tid != tid {
        return None;
    }
    unsafe { (*slot).tid = 0 };
    (stamp.sk == sk).then_some((stamp.first_ns, stamp.last_ns))
}

#[inline(always)]
fn read_kernel<T>(base: u64, off: u32) -> Option<T> {
    unsafe { bpf_probe_read_kernel((base + off as u64) as *const T).ok() }
}

#[inline(always)]
fn on_socket_io<const DIRECTION: u32, const COOKIE_HELPER: bool, const SAMPLE: bool>(
    sk: u64,
    (tgid, tid): (u32, u32),
    bytes: u64,
    queued_ns: Option<(u64, u64)>,
) {
    // A const parameter: each program keeps only its direction's code (the verifier's
    // budget does not stretch to both).
    let direction = DIRECTION;
    if sk == 0 {
        return;
    }
    let off = offsets();
    let family: u16 = read_kernel(sk, off.skc_family).unwrap_or(0);
    if family != AF_INET && family != AF_INET6 {
        return;
    }
    let protocol: u16 = read_kernel(sk, off.sk_protocol).unwrap_or(0);
    if protocol != IPPROTO_TCP {
        return;
    }

    let now = unsafe { bpf_ktime_get_ns() };
    let cookie = if COOKIE_HELPER {
        unsafe { bpf_get_socket_cookie(sk as *mut c_void) }
    } else {
        match read_kernel::<u64>(sk, off.skc_cookie) {
            Some(c) if c != 0 => c,
            _ => {
                count(|c| c.sockets_without_cookie += 1);
                return;
            }
        }
    };
    // Addresses and ports go with the first event of a socket only; userspace keeps them.
    let (send_addresses, stamp_floor_ns) = match TRACKED_SOCKETS.get_ptr_mut(&cookie) {
        Some(t) => unsafe {
            let first = (*t).addresses_sent == 0;
            (*t).addresses_sent = 1;
            let floor = (*t).write_stamp_floor_ns;
            if direction == DIR_EGRESS {
                (*t).write_stamp_floor_ns = now;
            }
            (first, floor)
        },
        None => {
            // First seen writing: nothing to check this write's stamp against.
            let t = TrackedSocket {
                pid: tgid,
                addresses_sent: 1,
                write_stamp_floor_ns: now,
            };
            if TRACKED_SOCKETS.insert(&cookie, &t, 0).is_err() {
                count(|c| c.socket_map_full += 1);
            }
            (true, 0)
        }
    };
    // Stamps taken during this write are later than the previous one's return.
    let (first_ts_ns, ts_ns) = match queued_ns {
        Some((first, last)) if last > stamp_floor_ns => {
            (if first > stamp_floor_ns { first } else { last }, last)
        }
        _ => {
            if direction == DIR_EGRESS {
                count(|c| c.writes_stamped_at_return += 1);
            }
            (now, now)
        }
    };

    let (syscall, fd, buf) = syscall_args();
    // Records of a TLS library's connection: its plaintext comes from the library's probes.
    let tls_records = crate::tls::note_socket_io(
        ((tgid as u64) << 32) | tid as u64,
        crate::tls::SocketRef {
            cookie,
            fd,
            _pad: 0,
        },
        first_ts_ns,
        ts_ns,
    );

    // The answer of a request head sampling left out, on a socket the injector does not
    // follow: neither its bytes nor an event are needed, only that the request was answered.
    if SAMPLE && direction == DIR_EGRESS && !tls_records && answer_left_out(sk) {
        if context_propagation() {
            context::on_write(tid, cookie);
        }
        if send_addresses {
            unsent_addresses(cookie);
        }
        return;
    }

    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    let scratch = unsafe { &mut *scratch };
    let ev = &mut scratch.header;
    ev.kind = EventKind::Data as u32;
    ev.direction = direction;
    ev.pid = tgid;
    ev.tid = tid;
    ev.ts_ns = ts_ns;
    ev.first_ts_ns = first_ts_ns;
    ev.sock_cookie = cookie;
    ev.bytes = bytes;
    ev.family = family as u32;
    ev.flags = if tls_records {
        DATA_FLAG_TLS_RECORDS
    } else {
        0
    };
    ev.local_addr = [0; 16];
    ev.remote_addr = [0; 16];
    ev.local_port = 0;
    ev.remote_port = 0;

    if send_addresses {
        ev.flags |= DATA_FLAG_ADDRESSES;
        if family == AF_INET {
            let l: [u8; 4] = read_kernel(sk, off.skc_rcv_saddr).unwrap_or([0; 4]);
            let r: [u8; 4] = read_kernel(sk, off.skc_daddr).unwrap_or([0; 4]);
            ev.local_addr[..4].copy_from_slice(&l);
            ev.remote_addr[..4].copy_from_slice(&r);
        } else {
            ev.local_addr = read_kernel(sk, off.skc_v6_rcv_saddr).unwrap_or([0; 16]);
            ev.remote_addr = read_kernel(sk, off.skc_v6_daddr).unwrap_or([0; 16]);
        }
        ev.local_port = read_kernel::<u16>(sk, off.skc_num).unwrap_or(0);
        ev.remote_port = u16::from_be(read_kernel::<u16>(sk, off.skc_dport).unwrap_or(0));
    }

    ev.syscall = syscall as u32;
    ev.fd = fd;

    let cap = if tls_records {
        0
    } else {
        capture_size() as u64
    };
    let want = if bytes < cap { bytes } else { cap };
    let captured = match buf {
        UserBuf::None => 0,
        UserBuf::Flat(ptr) => copy_flat(&mut scratch.payload, ptr, want),
        UserBuf::Iov { iov, count } => copy_iov(&mut scratch.payload, iov, count, want),
    };
    let ev = &mut scratch.header;
    let copy_failed = captured == 0 && want > 0 && !matches!(buf, UserBuf::None);
    if copy_failed {
        ev.flags |= DATA_FLAG_COPY_FAILED;
    }
    if captured < bytes && !tls_records && !matches!(buf, UserBuf::None) {
        ev.flags |= DATA_FLAG_TRUNCATED;
    }
    ev.captured = captured as u32;
    finish::<DIRECTION, SAMPLE>(scratch, tgid, tid, cookie, sk);
}

/// Context, then the data event. Everything comes back from the scratch map here, so the
/// many paths of the copy above end in one verifier state and this part is checked once.
#[inline(always)]
fn finish<const DIRECTION: u32, const SAMPLE: bool>(
    scratch: &mut Scratch,
    tgid: u32,
    tid: u32,
    cookie: u64,
    sk: u64,
) {
    let captured = unsafe { core::ptr::read_volatile(&scratch.header.captured) } as u64;
    let flags = unsafe { core::ptr::read_volatile(&scratch.header.flags) };
    let bytes = unsafe { core::ptr::read_volatile(&scratch.header.bytes) };
    let direction = DIRECTION;
    if SAMPLE {
        unsafe { core::ptr::write_volatile(&mut scratch.started, STARTED_NONE) };
    }
    if context_propagation() {
        if direction == DIR_EGRESS {
            crate::inject::account_write(
                sk,
                tid,
                bytes as i64,
                scratch.payload.as_ptr(),
                captured as u32,
            );
        }
        // Before the data event: userspace pairs the two by timestamp.
        if direction == DIR_INGRESS {
            if SAMPLE {
                let started = match context::on_read::<true>(
                    tgid,
                    tid,
                    cookie,
                    scratch.header.fd,
                    scratch.header.ts_ns,
                    scratch.payload.as_ptr(),
                    captured as u32,
                ) {
                    None => STARTED_NONE,
                    Some(true) => STARTED_SAMPLED,
                    Some(false) => STARTED_UNSAMPLED,
                };
                unsafe { core::ptr::write_volatile(&mut scratch.started, started) };
            } else {
                context::on_read::<false>(
                    tgid,
                    tid,
                    cookie,
                    scratch.header.fd,
                    scratch.header.ts_ns,
                    scratch.payload.as_ptr(),
                    captured as u32,
                );
            }
        } else {
            context::on_write(tid, cookie);
        }
    }
    if SAMPLE {
        match left_out::<DIRECTION>(scratch, tgid, tid, cookie, sk) {
            LEFT_OUT => return,
            LEFT_OUT_KNOWN => {
                scratch.header.flags |= DATA_FLAG_UNSAMPLED;
                unsafe { core::ptr::write_volatile(&mut scratch.header.captured, 0) };
            }
            _ => {}
        }
    }
    let captured = if SAMPLE {
        unsafe { core::ptr::read_volatile(&scratch.header.captured) as u64 }
    } else {
        captured
    };

    // Last: its two outcomes would otherwise double the verifier's walk of the scans above.
    let wake =
        direction == DIR_INGRESS && context_propagation() && crate::inject::parked_and_drained(sk);
    let ret = output(scratch, captured, wake);
    if let Some(c) = counters() {
        if ret < 0 {
            c.ringbuf_full += 1;
        } else {
            c.data_events += 1;
            c.bytes += bytes;
        }
        c.copy_failed += (flags & DATA_FLAG_COPY_FAILED != 0) as u64;
        c.truncated += (flags & DATA_FLAG_TRUNCATED != 0) as u64;
    }
}

/// The event is written as usual.
const SAMPLED: u32 = 0;
/// Head sampling left its exchange out: not written, userspace hears nothing of it.
const LEFT_OUT: u32 = 1;
/// Left out, but a write on a socket the injector follows: written without its bytes
/// (`DATA_FLAG_UNSAMPLED`), so userspace can put the socket back into the injector's map
/// after the answer (it is taken out while an answer is read, see `inject::park`).
const LEFT_OUT_KNOWN: u32 = 2;

/// Head sampling: whether this event belongs to an exchange left out. A read that starts a
/// request decides its server socket (`scratch.started`); a client request is decided by the
/// injector (`apply`, `link_unseen`) on the sockets it follows, else here by the request its
/// thread serves; every other event follows its socket's last decision.
#[inline(always)]
fn left_out<const DIRECTION: u32>(
    scratch: &mut Scratch,
    tgid: u32,
    tid: u32,
    cookie: u64,
    sk: u64,
) -> u32 {
    let direction = DIRECTION;
    if direction == DIR_INGRESS {
        match unsafe { core::ptr::read_volatile(&scratch.started) } {
            STARTED_SAMPLED => {
                mark_server(sk, SERVER_SAMPLED);
                return SAMPLED;
            }
            STARTED_UNSAMPLED => {
                mark_server(sk, SERVER_UNSAMPLED);
                count(|c| c.requests_unsampled += 1);
            }
            _ => match SAMPLING_MARKS.get_ptr(&sk) {
                None => return SAMPLED,
                Some(m) if unsafe { *m } == SERVER_SAMPLED => return SAMPLED,
                Some(_) => {}
            },
        }
    } else {
        let mark = SAMPLING_MARKS.get_ptr(&sk).map(|m| unsafe { *m });
        // The answer of a sampled request: whatever request the thread read last (an event
        // loop's), this is no client call.
        if mark == Some(SERVER_SAMPLED) {
            return SAMPLED;
        }
        let injector_decides = crate::inject::decides_sampling(sk);
        if mark != Some(SERVER_UNSAMPLED) && !injector_decides {
            let now = unsafe { bpf_ktime_get_ns() };
            match context::thread_call(tgid, tid, cookie, now) {
                context::ThreadCall::LeftOut | context::ThreadCall::Unknown => {
                    if mark.is_none() {
                        decide_call(sk, false);
                    }
                }
                context::ThreadCall::Sampled | context::ThreadCall::NoRequest => {
                    if mark.is_some() {
                        decide_call(sk, true);
                    }
                    return SAMPLED;
                }
            }
        } else if mark.is_none() {
            return SAMPLED;
        } else if injector_decides {
            return LEFT_OUT_KNOWN;
        }
    }
    if scratch.header.flags & DATA_FLAG_ADDRESSES != 0 {
        unsent_addresses(cookie);
    }
    LEFT_OUT
}

/// The socket's addresses go with its first event written: not the one left out now.
#[inline(always)]
fn unsent_addresses(cookie: u64) {
    if let Some(t) = TRACKED_SOCKETS.get_ptr_mut(&cookie) {
        unsafe { (*t).addresses_sent = 0 };
    }
}

/// A write on `sk` answers a request left out, and the injector does not follow the socket
/// (its accounting needs every write).
#[inline(always)]
fn answer_left_out(sk: u64) -> bool {
    SAMPLING_MARKS
        .get_ptr(&sk)
        .is_some_and(|m| unsafe { *m } == SERVER_UNSAMPLED)
        && !crate::inject::follows(sk)
}

/// A server socket's request was decided: its mark is set in place when it has one (a
/// keep-alive connection), inserted else.
#[inline(always)]
fn mark_server(sk: u64, mark: u32) {
    match SAMPLING_MARKS.get_ptr_mut(&sk) {
        Some(m) => unsafe {
            if *m != mark {
                *m = mark;
            }
        },
        None => {
            let _ = SAMPLING_MARKS.insert(&sk, &mark, 0);
        }
    }
}

/// Writes the data event assembled in `scratch` (header and `captured` payload bytes) to the
/// ring buffer; the helper's result (< 0: full).
#[inline(always)]
pub fn output(scratch: &mut Scratch, captured: u64, wake: bool) -> i64 {
    let size = size_of::<agent_common::DataEvent>() as u64 + (captured & (MAX_CAPTURE as u64 - 1));
    let size = if captured >= MAX_CAPTURE as u64 {
        size_of::<agent_common::DataEvent>() as u64 + MAX_CAPTURE as u64
    } else {
        size
    };
    unsafe {
        bpf_ringbuf_output(
            &EVENTS as *const _ as *mut c_void,
            scratch as *mut _ as *mut c_void,
            size,
            if wake {
                BPF_RB_FORCE_WAKEUP
            } else {
                BPF_RB_NO_WAKEUP
            },
        )
    }
}

/// The syscall being served, its fd and where its buffer is, from the saved user registers.
#[inline(always)]
fn syscall_args() -> (SyscallKind, u32, UserBuf) {
    let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) } as u64;
    if regs == 0 {
        return (SyscallKind::Other, u32::MAX, UserBuf::None);
    }
    let Some((nr, [fd, buf, count])) = arch::syscall_regs(regs) else {
        return (SyscallKind::Other, u32::MAX, UserBuf::None);
    };
    let fd = fd as u32;
    let a = &ARCH;
    if nr == a.nr_read {
        (SyscallKind::Read, fd, UserBuf::Flat(buf))
    } else if nr == a.nr_write {
        (SyscallKind::Write, fd, UserBuf::Flat(buf))
    } else if nr == a.nr_recvfrom {
        (SyscallKind::RecvFrom, fd, UserBuf::Flat(buf))
    } else if nr == a.nr_sendto {
        (SyscallKind::SendTo, fd, UserBuf::Flat(buf))
    } else if nr == a.nr_readv {
        (SyscallKind::Readv, fd, UserBuf::Iov { iov: buf, count })
    } else if nr == a.nr_writev {
        (SyscallKind::Writev, fd, UserBuf::Iov { iov: buf, count })
    } else if nr == a.nr_recvmsg || nr == a.nr_sendmsg {
        // struct user_msghdr: msg_iov at 16, msg_iovlen at 24.
        let iov: u64 = read_user::<u64>(buf + 16).unwrap_or(0);
        let count: u64 = read_user::<u64>(buf + 24).unwrap_or(0);
        let kind = if nr == a.nr_recvmsg {
            SyscallKind::RecvMsg
        } else {
            SyscallKind::SendMsg
        };
        (kind, fd, UserBuf::Iov { iov, count })
    } else if nr == a.nr_sendfile {
        (SyscallKind::SendFile, fd, UserBuf::None)
    } else {
        (SyscallKind::Other, u32::MAX, UserBuf::None)
    }
}

/// A `T` at `addr` in the current process's memory (`None`: unreadable; the helper faults
/// nothing).
#[inline(always)]
pub fn read_user<T>(addr: u64) -> Option<T> {
    unsafe { aya_ebpf::helpers::bpf_probe_read_user(addr as *const T).ok() }
}

/// Copy `want` (≤ capture size) bytes of a flat user buffer; returns the bytes copied.
#[inline(always)]
pub fn copy_flat(payload: &mut [u8; 2 * MAX_CAPTURE], ptr: u64, want: u64) -> u64 {
    let n = want & (MAX_CAPTURE as u64 - 1);
    let n = if want >= MAX_CAPTURE as u64 {
        MAX_CAPTURE as u64
    } else {
        n
    };
    if n == 0 || ptr == 0 {
        return 0;
    }
    let ret = unsafe {
        bpf_probe_read_user(
            payload.as_mut_ptr() as *mut c_void,
            n as u32,
            ptr as *const c_void,
        )
    };
    if ret < 0 { 0 } else { n }
}

/// Copy up to `want` bytes from an iovec array, in order; returns the bytes copied.
#[inline(always)]
fn copy_iov(payload: &mut [u8; 2 * MAX_CAPTURE], iov: u64, count: u64, want: u64) -> u64 {
    let mut done: u64 = 0;
    let mut i: u64 = 0;
    while i < MAX_IOVECS as u64 {
        if i >= count || done >= want {
            break;
        }
        // struct iovec { void *iov_base; size_t iov_len; }, read in one go.
        let [base, len] = read_user::<[u64; 2]>(iov + i * 16).unwrap_or([0, 0]);
        i += 1;
        if base == 0 || len == 0 {
            continue;
        }
        let left = want - done;
        let take = if len < left { len } else { left };
        // Both masks are no-ops for valid values (done < MAX, take ≤ MAX) and prove the
        // bounds to the verifier.
        let at = (done & (MAX_CAPTURE as u64 - 1)) as usize;
        let take = if take >= MAX_CAPTURE as u64 {
            MAX_CAPTURE as u32
        } else {
            (take & (MAX_CAPTURE as u64 - 1)) as u32
        };
        if take == 0 {
            break;
        }
        let dst = unsafe { payload.as_mut_ptr().add(at) };
        let ret = unsafe { bpf_probe_read_user(dst as *mut c_void, take, base as *const c_void) };
        if ret < 0 {
            break;
        }
        done += take as u64;
    }
    done
}
