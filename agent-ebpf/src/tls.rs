//! TLS libraries (OpenSSL 1.1/3: `SSL_read`, `SSL_read_ex`, `SSL_write`, `SSL_write_ex`): the
//! plaintext a selected process hands to the library or gets from it, sent as data events of
//! the connection's socket ([`DATA_FLAG_TLS_PLAINTEXT`]) so the same parsers see it.
//!
//! Which socket: the library reads and writes its socket itself, inside the call and on the
//! calling thread (socket BIOs, and libpq's and PostgreSQL's own BIOs, which call recv/send).
//! The socket hooks see that I/O (`note_socket_io`): its cookie and stamps go with the call,
//! and the `SSL *` is remembered with the socket for calls served from the library's buffer.
//! A library that never touches the socket in its calls (memory BIOs) is followed only where
//! its owner says which socket: Node.js's `TLSWrap` (one per TLS socket) makes the library
//! calls in its methods, and writes the records to its socket in `EncOut` (the handshake's
//! first, so before any plaintext): probes on those methods tell the `SSL *` → `TLSWrap` →
//! socket. Other memory BIOs (Python's asyncio) are counted (`tls_unassociated`), never
//! guessed.
//!
//! Entry probes keep the arguments; return probes (uretprobes: C code, its stack never moves)
//! see the result and copy the plaintext.

use agent_common::{
    DATA_FLAG_COPY_FAILED, DATA_FLAG_TLS_PLAINTEXT, DATA_FLAG_TRUNCATED, DIR_EGRESS, DIR_INGRESS,
    EventKind, SyscallKind, TLS_ATTACHED_NODE,
};
use aya_ebpf::{
    helpers::{
        bpf_probe_read_user,
        generated::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    },
    macros::{map, uprobe, uretprobe},
    maps::{Array, LruHashMap},
    programs::{ProbeContext, RetProbeContext},
};

use crate::{
    maps::{capture_size, context_propagation, count, counters, selected_tgid},
    sockets::{SCRATCH, copy_flat, output},
};

/// Index 0: `TLS_ATTACHED_*` bits, set by userspace as it attaches the probes; until then the
/// socket hooks skip the lookups below.
#[map]
pub static TLS_ATTACHED: Array<u32> = Array::with_max_entries(1, 0);

/// A library call in progress on a thread (key: pid_tgid).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TlsCall {
    ssl: u64,
    /// The Node.js `TLSWrap` whose method made the call (0: none).
    wrap: u64,
    buf: u64,
    /// `SSL_*_ex`: where the library writes the byte count (0: the return value is it).
    count_at: u64,
    /// The socket the call read or wrote (cookie 0: none yet), and when its bytes moved.
    socket: SocketRef,
    first_ns: u64,
    last_ns: u64,
}

#[map]
static TLS_CALLS: LruHashMap<u64, TlsCall> = LruHashMap::with_max_entries(16384, 0);

/// A process's `SSL *`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SessionKey {
    tgid: u32,
    _pad: u32,
    ssl: u64,
}

/// A socket: its cookie, and the fd its process used for it.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SocketRef {
    pub cookie: u64,
    pub fd: u32,
    pub _pad: u32,
}

/// The socket each `SSL *` was last seen using, for calls the library serves from its buffer
/// (forgotten when `SSL_new` returns the same address for a new connection).
#[map]
static TLS_SESSIONS: LruHashMap<SessionKey, SocketRef> = LruHashMap::with_max_entries(65536, 0);

/// Sockets whose bytes a probed library moves (cookie → 1): their records are counted, not
/// copied.
#[map]
static TLS_SOCKETS: LruHashMap<u64, u32> = LruHashMap::with_max_entries(65536, 0);

/// Node.js: the `TLSWrap` methods in progress on a thread, innermost last (JavaScript run from
/// one may enter another's).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct WrapStack {
    depth: u32,
    _pad: u32,
    wraps: [u64; WRAP_DEPTH],
    /// Per frame: 1 when it is `EncOut` (the records' write to the wrap's socket).
    enc_out: [u8; WRAP_DEPTH],
}
const WRAP_DEPTH: usize = 8;

#[map]
static NODE_WRAPS: LruHashMap<u64, WrapStack> = LruHashMap::with_max_entries(16384, 0);

/// Node.js: the socket each `TLSWrap` writes its records to (key: pid, wrap address).
#[map]
static WRAP_SOCKETS: LruHashMap<SessionKey, SocketRef> = LruHashMap::with_max_entries(65536, 0);

#[inline(always)]
fn attached() -> u32 {
    TLS_ATTACHED.get(0).copied().unwrap_or(0)
}

/// The innermost `TLSWrap` method on this thread: (wrap, is `EncOut`).
#[inline(always)]
fn current_wrap(pid_tgid: u64) -> Option<(u64, bool)> {
    let stack = unsafe { NODE_WRAPS.get(&pid_tgid)? };
    let top = stack.depth as usize;
    if top == 0 || top > WRAP_DEPTH {
        return None;
    }
    let i = (top - 1) & (WRAP_DEPTH - 1);
    Some((stack.wraps[i], stack.enc_out[i] != 0))
}

/// The socket hooks saw socket I/O of a selected thread: when a library call is in progress on
/// it, the I/O is that call's. Returns whether the socket's bytes are TLS records a probed
/// library handles (then only counted).
#[inline(always)]
pub fn note_socket_io(pid_tgid: u64, socket: SocketRef, first_ns: u64, last_ns: u64) -> bool {
    let cookie = socket.cookie;
    let attached = attached();
    if attached == 0 {
        return false;
    }
    if let Some(call) = TLS_CALLS.get_ptr_mut(&pid_tgid) {
        unsafe {
            if (*call).socket.cookie == 0 {
                (*call).socket = socket;
                (*call).first_ns = first_ns;
            }
            // Another socket in the same call: no library does that; claim none.
            if (*call).socket.cookie != cookie {
                (*call).socket.cookie = u64::MAX;
            }
            (*call).last_ns = last_ns;
        }
        let _ = TLS_SOCKETS.insert(&cookie, &1, 0);
        return true;
    }
    if attached & TLS_ATTACHED_NODE != 0
        && let Some((wrap, true)) = current_wrap(pid_tgid)
    {
        let key = SessionKey {
            tgid: (pid_tgid >> 32) as u32,
            _pad: 0,
            ssl: wrap,
        };
        let _ = WRAP_SOCKETS.insert(&key, &socket, 0);
        let _ = TLS_SOCKETS.insert(&cookie, &1, 0);
        return true;
    }
    TLS_SOCKETS.get_ptr(&cookie).is_some()
}

#[inline(always)]
fn wrap_enter(ctx: &ProbeContext, enc_out: u8) {
    if selected_tgid().is_none() {
        return;
    }
    let Some(wrap) = ctx.arg::<u64>(0) else {
        return;
    };
    let key = unsafe { bpf_get_current_pid_tgid() };
    let stack = match NODE_WRAPS.get_ptr_mut(&key) {
        Some(s) => s,
        None => {
            let empty = WrapStack {
                depth: 0,
                _pad: 0,
                wraps: [0; WRAP_DEPTH],
                enc_out: [0; WRAP_DEPTH],
            };
            if NODE_WRAPS.insert(&key, &empty, 0).is_err() {
                return;
            }
            match NODE_WRAPS.get_ptr_mut(&key) {
                Some(s) => s,
                None => return,
            }
        }
    };
    let stack = unsafe { &mut *stack };
    let depth = stack.depth as usize;
    // Deeper than the stack: counted by depth only, so the returns still pair up.
    if depth < WRAP_DEPTH {
        stack.wraps[depth & (WRAP_DEPTH - 1)] = wrap;
        stack.enc_out[depth & (WRAP_DEPTH - 1)] = enc_out;
    }
    stack.depth += 1;
}

#[inline(always)]
fn wrap_leave() {
    let key = unsafe { bpf_get_current_pid_tgid() };
    if let Some(stack) = NODE_WRAPS.get_ptr_mut(&key) {
        unsafe {
            if (*stack).depth > 0 {
                (*stack).depth -= 1;
            }
        }
    }
}

/// Entry of Node.js's `TLSWrap::ClearOut`, `ClearIn` and `DoWrite` (`this` first): the library
/// calls they make are this wrap's.
#[uprobe]
pub fn agent_node_wrap_enter(ctx: ProbeContext) -> u32 {
    wrap_enter(&ctx, 0);
    0
}

/// Entry of `TLSWrap::EncOut`: socket writes inside it carry this wrap's records.
#[uprobe]
pub fn agent_node_enc_out_enter(ctx: ProbeContext) -> u32 {
    wrap_enter(&ctx, 1);
    0
}

/// Return of the four `TLSWrap` methods.
#[uretprobe]
pub fn agent_node_wrap_leave(_ctx: RetProbeContext) -> u32 {
    wrap_leave();
    0
}

#[inline(always)]
fn enter(ctx: &ProbeContext, ex: bool) {
    if selected_tgid().is_none() {
        return;
    }
    let (Some(ssl), Some(buf)) = (ctx.arg::<u64>(0), ctx.arg::<u64>(1)) else {
        return;
    };
    let count_at = if ex {
        ctx.arg::<u64>(3).unwrap_or(0)
    } else {
        0
    };
    if ex && count_at == 0 {
        return;
    }
    let key = unsafe { bpf_get_current_pid_tgid() };
    let wrap = if attached() & TLS_ATTACHED_NODE != 0 {
        current_wrap(key).map_or(0, |(w, _)| w)
    } else {
        0
    };
    let call = TlsCall {
        ssl,
        wrap,
        buf,
        count_at,
        socket: SocketRef {
            cookie: 0,
            fd: u32::MAX,
            _pad: 0,
        },
        first_ns: 0,
        last_ns: 0,
    };
    let _ = TLS_CALLS.insert(&key, &call, 0);
}

/// Entry of `SSL_do_handshake(SSL *)` (also under `SSL_accept`/`SSL_connect`), `SSL_peek` and
/// `SSL_peek_ex`: no plaintext is sent for them, but the socket I/O they do tells the `SSL *`'s
/// socket, for a read later served from the library's buffer (records read ahead during the
/// handshake, or a peek).
#[uprobe]
pub fn agent_ssl_learn(ctx: ProbeContext) -> u32 {
    enter(&ctx, false);
    0
}

/// Return of the calls `agent_ssl_learn` follows.
#[uretprobe]
pub fn agent_ssl_learn_ret(_ctx: RetProbeContext) -> u32 {
    let key = unsafe { bpf_get_current_pid_tgid() };
    let Some(call) = (unsafe { TLS_CALLS.get(&key) }).copied() else {
        return 0;
    };
    let _ = TLS_CALLS.remove(&key);
    if call.socket.cookie != 0 && call.socket.cookie != u64::MAX {
        let session = SessionKey {
            tgid: (key >> 32) as u32,
            _pad: 0,
            ssl: call.ssl,
        };
        let _ = TLS_SESSIONS.insert(&session, &call.socket, 0);
    }
    0
}

/// `int SSL_read(SSL *ssl, void *buf, int num)`
#[uprobe]
pub fn agent_ssl_read(ctx: ProbeContext) -> u32 {
    enter(&ctx, false);
    0
}

/// `int SSL_read_ex(SSL *ssl, void *buf, size_t num, size_t *readbytes)`
#[uprobe]
pub fn agent_ssl_read_ex(ctx: ProbeContext) -> u32 {
    enter(&ctx, true);
    0
}

/// `int SSL_write(SSL *ssl, const void *buf, int num)`
#[uprobe]
pub fn agent_ssl_write(ctx: ProbeContext) -> u32 {
    enter(&ctx, false);
    0
}

/// `int SSL_write_ex(SSL *ssl, const void *buf, size_t num, size_t *written)`
#[uprobe]
pub fn agent_ssl_write_ex(ctx: ProbeContext) -> u32 {
    enter(&ctx, true);
    0
}

/// The dynamic loader's `_dl_debug_state`, called (for debuggers) whenever the libraries of a
/// process change: a selected process's new libraries are looked at at once, not at the next
/// rescan (a library loaded by `dlopen` would otherwise miss the calls until then).
#[uprobe]
pub fn agent_loader_state(_ctx: ProbeContext) -> u32 {
    let Some((tgid, _)) = selected_tgid() else {
        return 0;
    };
    // At once: the process is about to use its new libraries.
    crate::maps::emit_now(agent_common::ProcessEvent {
        kind: EventKind::Libraries as u32,
        pid: tgid,
        ts_ns: unsafe { bpf_ktime_get_ns() },
        comm: aya_ebpf::helpers::bpf_get_current_comm().unwrap_or([0; 16]),
        parent: 0,
        _pad: 0,
    });
    0
}

/// Return of `SSL_new(SSL_CTX *)`: a new connection's `SSL *`, perhaps at the address of a freed
/// one, whose socket must not be taken for this one's (its first read may come from the
/// library's buffer, filled during the handshake).
#[uretprobe]
pub fn agent_ssl_new_ret(ctx: RetProbeContext) -> u32 {
    let Some((tgid, _)) = selected_tgid() else {
        return 0;
    };
    let ssl: u64 = ctx.ret();
    let _ = TLS_SESSIONS.remove(&SessionKey { tgid, _pad: 0, ssl });
    0
}

/// Return of `SSL_read` and `SSL_read_ex`.
#[uretprobe]
pub fn agent_ssl_read_ret(ctx: RetProbeContext) -> u32 {
    leave::<DIR_INGRESS>(&ctx);
    0
}

/// Return of `SSL_write` and `SSL_write_ex`.
#[uretprobe]
pub fn agent_ssl_write_ret(ctx: RetProbeContext) -> u32 {
    leave::<DIR_EGRESS>(&ctx);
    0
}

#[inline(always)]
fn leave<const DIRECTION: u32>(ctx: &RetProbeContext) {
    let key = unsafe { bpf_get_current_pid_tgid() };
    let Some(call) = (unsafe { TLS_CALLS.get(&key) }).copied() else {
        return;
    };
    let _ = TLS_CALLS.remove(&key);
    let ret = ctx.ret::<i64>() as i32;
    // Both forms return > 0 on success; `_ex` returns 1 and writes the count.
    if ret <= 0 {
        return;
    }
    let bytes = if call.count_at != 0 {
        match unsafe { bpf_probe_read_user(call.count_at as *const u64) } {
            Ok(n) => n,
            Err(_) => return,
        }
    } else {
        ret as u64
    };
    if bytes == 0 {
        return;
    }
    let tgid = (key >> 32) as u32;
    let session = SessionKey {
        tgid,
        _pad: 0,
        ssl: call.ssl,
    };
    let none = SocketRef {
        cookie: 0,
        fd: u32::MAX,
        _pad: 0,
    };
    let socket = match call.socket.cookie {
        0 => match unsafe { TLS_SESSIONS.get(&session) } {
            Some(s) => *s,
            None if call.wrap != 0 => {
                let wrap = SessionKey {
                    tgid,
                    _pad: 0,
                    ssl: call.wrap,
                };
                unsafe { WRAP_SOCKETS.get(&wrap) }.copied().unwrap_or(none)
            }
            None => none,
        },
        u64::MAX => none,
        _ => {
            let _ = TLS_SESSIONS.insert(&session, &call.socket, 0);
            call.socket
        }
    };
    let cookie = socket.cookie;
    if cookie == 0 {
        count(|c| c.tls_unassociated += 1);
        return;
    }
    let (first_ns, last_ns) = if call.last_ns != 0 {
        (call.first_ns, call.last_ns)
    } else {
        let now = unsafe { bpf_ktime_get_ns() };
        (now, now)
    };
    // A read's bytes were all there at its last socket read; a write began with its first.
    let first_ns = if DIRECTION == DIR_EGRESS {
        first_ns
    } else {
        last_ns
    };
    emit_plaintext(&Plaintext {
        direction: DIRECTION,
        pid_tgid: key,
        sock_cookie: cookie,
        fd: u32::MAX,
        socket_fd: socket.fd,
        buf: call.buf,
        bytes,
        first_ns,
        last_ns,
    });
}

/// Plaintext a TLS library moved in one call, for [`emit_plaintext`].
pub struct Plaintext {
    pub direction: u32,
    pub pid_tgid: u64,
    /// The connection's socket, or 0 when `fd` names it (userspace resolves it to the socket
    /// that fd moved bytes on last).
    pub sock_cookie: u64,
    pub fd: u32,
    /// The socket's fd as the kernel's trace context knows it (with a cookie).
    pub socket_fd: u32,
    /// Where the plaintext is in the process's memory.
    pub buf: u64,
    pub bytes: u64,
    /// When its first byte and its last byte moved.
    pub first_ns: u64,
    pub last_ns: u64,
}

/// Sends a TLS library call's plaintext as a data event of its connection
/// ([`DATA_FLAG_TLS_PLAINTEXT`]), its first `capture_size` bytes copied, and counts it.
#[inline(always)]
pub fn emit_plaintext(p: &Plaintext) {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    let scratch = unsafe { &mut *scratch };
    let bytes = p.bytes;
    let ev = &mut scratch.header;
    ev.kind = EventKind::Data as u32;
    ev.direction = p.direction;
    ev.pid = (p.pid_tgid >> 32) as u32;
    ev.tid = p.pid_tgid as u32;
    ev.fd = p.fd;
    ev.syscall = SyscallKind::Other as u32;
    ev.ts_ns = p.last_ns;
    ev.first_ts_ns = p.first_ns;
    ev.sock_cookie = p.sock_cookie;
    ev.bytes = bytes;
    ev.family = 0;
    ev.local_addr = [0; 16];
    ev.remote_addr = [0; 16];
    ev.local_port = 0;
    ev.remote_port = 0;
    ev.flags = DATA_FLAG_TLS_PLAINTEXT;
    let cap = capture_size() as u64;
    let want = if bytes < cap { bytes } else { cap };
    let captured = copy_flat(&mut scratch.payload, p.buf, want);
    let ev = &mut scratch.header;
    if captured == 0 {
        ev.flags |= DATA_FLAG_COPY_FAILED;
    }
    if captured < bytes {
        ev.flags |= DATA_FLAG_TRUNCATED;
    }
    ev.captured = captured as u32;
    // Back from the scratch map, so the copy's outcomes (failed, short, whole) reach the head
    // scan below as one verifier state: otherwise 6.1's verifier walks it once per outcome
    // and gives up (1M instructions) on the return probes.
    let captured = unsafe { core::ptr::read_volatile(&scratch.header.captured) } as u64;
    let flags = unsafe { core::ptr::read_volatile(&scratch.header.flags) };
    // The plaintext is where a request starts (ids chosen for it, the thread serves it) or is
    // answered, as on a plaintext socket; before the data event, which userspace pairs with it.
    // Plaintext named by its fd alone (Go) has no cookie for it: userspace names its socket.
    if context_propagation() && p.sock_cookie != 0 {
        let tid = p.pid_tgid as u32;
        if p.direction == DIR_INGRESS {
            // Head sampling decides socket data only: TLS plaintext is always traced.
            crate::context::on_read::<false>(
                (p.pid_tgid >> 32) as u32,
                tid,
                p.sock_cookie,
                p.socket_fd,
                p.last_ns,
                scratch.payload.as_ptr(),
                captured as u32,
            );
        } else {
            crate::context::on_write(tid, p.sock_cookie);
        }
    }
    let written = output(scratch, captured, false) >= 0;
    if let Some(c) = counters() {
        if written {
            c.data_events += 1;
            c.tls_plaintext += 1;
            c.bytes += bytes;
        } else {
            c.ringbuf_full += 1;
        }
        c.copy_failed += (flags & DATA_FLAG_COPY_FAILED != 0) as u64;
        c.truncated += (flags & DATA_FLAG_TRUNCATED != 0) as u64;
    }
}
