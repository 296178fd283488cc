//! Go `crypto/tls`: the plaintext of `(*Conn).Read` and `(*Conn).Write`, sent as data events
//! of the connection ([`DATA_FLAG_TLS_PLAINTEXT`](agent_common::DATA_FLAG_TLS_PLAINTEXT)),
//! named by its fd (userspace resolves the fd to the socket it moved bytes on last).
//!
//! No uretprobes (Go moves goroutine stacks, which breaks them): an entry probe keeps the
//! call's receiver and buffer, keyed by goroutine (`g`: a goroutine parks inside `Read` and
//! resumes on another thread, and threads run many goroutines), and a probe on each RET
//! instruction of the function (found by userspace) reads the result (`n`) and sends it.
//!
//! Which fd: the socket I/O `internal/poll.(*FD).Read`/`Write` does on the call's goroutine
//! during the call is the connection's (`agent_go_tls_fd_io`). A `Read` served from the
//! connection's buffer does none: the fd seen last for that `*Conn` is kept
//! (`GO_TLS_CONN_FDS`), also from its handshake's I/O, and forgotten when a handshake
//! starts on that address (a `*Conn` address is reused for another connection once
//! collected, and every connection handshakes before its first plaintext). I/O on two fds in
//! one call, or on a file, names nothing: counted (`go_tls_unassociated`), never guessed.

use agent_common::{DIR_EGRESS, DIR_INGRESS, GO_FD_IS_FILE_OFFSET, GO_FD_SYSFD_OFFSET};
use aya_ebpf::{
    helpers::{bpf_probe_read_user, generated::bpf_ktime_get_ns},
    macros::{map, uprobe},
    maps::LruHashMap,
    programs::ProbeContext,
};

use crate::{
    arch::{self, ARCH},
    maps::{count, selected_tgid},
    tls::{Plaintext, emit_plaintext},
};

/// A goroutine (`g`) or a `*Conn` of one process.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct GoKey {
    pid: u32,
    _pad: u32,
    addr: u64,
}

#[inline(always)]
fn key(pid: u32, addr: u64) -> GoKey {
    GoKey { pid, _pad: 0, addr }
}

/// No fd seen yet.
const NO_FD: u32 = u32::MAX;
/// Several fds, or I/O whose fd could not be read: the call names none.
const MANY_FDS: u32 = u32::MAX - 1;

/// A `Read`, `Write` or handshake in progress on a goroutine.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct GoTlsCall {
    conn: u64,
    buf: u64,
    /// The goroutine stack's top (`g.stack.hi`) at entry when `buf` is on that stack (0: it
    /// is not): the stack may move during the call, the buffer with it.
    stack_hi: u64,
    start_ns: u64,
    /// `len(b)`.
    len: u64,
    /// The fd the goroutine did I/O on during the call ([`NO_FD`], [`MANY_FDS`]).
    fd: u32,
    direction: u16,
    /// A write's plaintext was sent already (at its first socket write).
    sent: u16,
}

/// One entry per goroutine inside `Read`/`Write`: a server's idle keep-alive connection is a
/// goroutine parked in `Read`, hence the size (an evicted call sends nothing).
#[map]
static GO_TLS_CALLS: LruHashMap<GoKey, GoTlsCall> = LruHashMap::with_max_entries(65536, 0);

#[map]
static GO_TLS_HANDSHAKES: LruHashMap<GoKey, GoTlsCall> = LruHashMap::with_max_entries(16384, 0);

/// The fd each `*Conn` did its last I/O on (during a call or its handshake).
#[map]
static GO_TLS_CONN_FDS: LruHashMap<GoKey, u32> = LruHashMap::with_max_entries(65536, 0);

#[inline(always)]
fn g(ctx: &ProbeContext) -> u64 {
    arch::uprobe_reg(ctx, ARCH.go_g_slot)
}

#[inline(always)]
fn arg(ctx: &ProbeContext, n: usize) -> u64 {
    arch::uprobe_reg(ctx, ARCH.go_arg_slots[n])
}

/// The goroutine's stack, `(lo, hi)` (`g.stack`).
#[inline(always)]
fn stack(g: u64) -> Option<[u64; 2]> {
    unsafe { bpf_probe_read_user((g + agent_common::GO_G_STACK_OFFSET) as *const [u64; 2]).ok() }
}

#[inline(always)]
fn enter(ctx: &ProbeContext, direction: u32) {
    let Some((pid, _)) = selected_tgid() else {
        return;
    };
    let (g, conn, buf, len) = (g(ctx), arg(ctx, 0), arg(ctx, 1), arg(ctx, 2));
    let stack_hi = match stack(g) {
        Some([lo, hi]) if buf >= lo && buf < hi => hi,
        _ => 0,
    };
    let call = GoTlsCall {
        conn,
        buf,
        stack_hi,
        start_ns: unsafe { bpf_ktime_get_ns() },
        len,
        fd: NO_FD,
        direction: direction as u16,
        sent: 0,
    };
    // Replaces whatever an earlier call of the goroutine left (one that panicked).
    let _ = GO_TLS_CALLS.insert(&key(pid, g), &call, 0);
}

/// `crypto/tls.(*Conn).Read(c, b []byte)` entry: RAX = c, RBX = b's data, RCX = len(b).
#[uprobe]
pub fn agent_go_tls_read(ctx: ProbeContext) -> u32 {
    enter(&ctx, DIR_INGRESS);
    0
}

/// `crypto/tls.(*Conn).Write(c, b []byte)` entry.
#[uprobe]
pub fn agent_go_tls_write(ctx: ProbeContext) -> u32 {
    enter(&ctx, DIR_EGRESS);
    0
}

/// A RET of `(*Conn).Read`: RAX = n.
#[uprobe]
pub fn agent_go_tls_read_ret(ctx: ProbeContext) -> u32 {
    leave(&ctx, DIR_INGRESS);
    0
}

/// A RET of `(*Conn).Write`: RAX = n.
#[uprobe]
pub fn agent_go_tls_write_ret(ctx: ProbeContext) -> u32 {
    leave(&ctx, DIR_EGRESS);
    0
}

#[inline(always)]
fn leave(ctx: &ProbeContext, direction: u32) {
    let Some((pid, tid)) = selected_tgid() else {
        return;
    };
    let g = g(ctx);
    let k = key(pid, g);
    let Some(call) = (unsafe { GO_TLS_CALLS.get(&k) }).copied() else {
        return;
    };
    let _ = GO_TLS_CALLS.remove(&k);
    let n = arg(ctx, 0) as i64;
    // The other direction's RET with this goroutine's record: a nested call's leftovers.
    if call.direction != direction as u16 || n <= 0 || call.sent != 0 {
        return;
    }
    let conn = key(pid, call.conn);
    let fd = match call.fd {
        NO_FD => match unsafe { GO_TLS_CONN_FDS.get(&conn) } {
            Some(fd) => *fd,
            None => NO_FD,
        },
        MANY_FDS => MANY_FDS,
        fd => {
            let _ = GO_TLS_CONN_FDS.insert(&conn, &fd, 0);
            fd
        }
    };
    if fd == NO_FD || fd == MANY_FDS {
        count(|c| c.go_tls_unassociated += 1);
        return;
    }
    send(&call, g, pid, tid, fd, n as u64);
}

/// Sends a call's plaintext, `bytes` of it, as its connection's (named by `fd`).
#[inline(always)]
fn send(call: &GoTlsCall, g: u64, pid: u32, tid: u32, fd: u32, bytes: u64) {
    // The stack moved during the call (grown or shrunk, copied whole): the buffer is at the
    // same distance from its top.
    let buf = if call.stack_hi != 0 {
        match stack(g) {
            Some([_, hi]) => call.buf.wrapping_add(hi.wrapping_sub(call.stack_hi)),
            None => return,
        }
    } else {
        call.buf
    };
    let now = unsafe { bpf_ktime_get_ns() };
    let direction = call.direction as u32;
    emit_plaintext(&Plaintext {
        direction,
        pid_tgid: ((pid as u64) << 32) | tid as u64,
        sock_cookie: 0,
        fd,
        socket_fd: fd,
        buf,
        bytes,
        // A write's bytes go out from its start; a read's were all there at its return.
        first_ns: if direction == DIR_EGRESS {
            call.start_ns
        } else {
            now
        },
        last_ns: now,
    });
}

/// `crypto/tls.(*Conn).clientHandshake(c, ctx)` and `serverHandshake(c, ctx)` entry: the
/// address is a new connection's from here on.
#[uprobe]
pub fn agent_go_tls_handshake(ctx: ProbeContext) -> u32 {
    let Some((pid, _)) = selected_tgid() else {
        return 0;
    };
    let (g, conn) = (g(&ctx), arg(&ctx, 0));
    let _ = GO_TLS_CONN_FDS.remove(&key(pid, conn));
    let call = GoTlsCall {
        conn,
        buf: 0,
        stack_hi: 0,
        start_ns: 0,
        len: 0,
        fd: NO_FD,
        direction: 0,
        sent: 0,
    };
    let _ = GO_TLS_HANDSHAKES.insert(&key(pid, g), &call, 0);
    0
}

/// A RET of either handshake: the connection's fd is the one its handshake used.
#[uprobe]
pub fn agent_go_tls_handshake_ret(ctx: ProbeContext) -> u32 {
    let Some((pid, _)) = selected_tgid() else {
        return 0;
    };
    let k = key(pid, g(&ctx));
    let Some(call) = (unsafe { GO_TLS_HANDSHAKES.get(&k) }).copied() else {
        return 0;
    };
    let _ = GO_TLS_HANDSHAKES.remove(&k);
    if call.fd != NO_FD && call.fd != MANY_FDS {
        let _ = GO_TLS_CONN_FDS.insert(&key(pid, call.conn), &call.fd, 0);
    }
    0
}

/// `internal/poll.(*FD).Read(fd, p)` and `(*FD).Write(fd, p)` entry: RAX = fd. The I/O of a
/// goroutine inside a TLS call or handshake is that connection's.
///
/// A `Write`'s plaintext is sent at its first socket write, before its records go out, when
/// that fd is the connection's already (its handshake's or an earlier call's: userspace has
/// seen the socket move bytes on it, so the fd names it). Sent at the return instead, it
/// could come after the peer's answer (the writing goroutine descheduled after its write),
/// and a request would follow its response.
#[uprobe]
pub fn agent_go_tls_fd_io(ctx: ProbeContext) -> u32 {
    let Some((pid, tid)) = selected_tgid() else {
        return 0;
    };
    let g = g(&ctx);
    let k = key(pid, g);
    let fd = arg(&ctx, 0);
    // Each record checked on its own (the verifier refuses a test of both pointers at once).
    if let Some(handshake) = GO_TLS_HANDSHAKES.get_ptr_mut(&k) {
        let seen = fd_of(fd);
        unsafe { note(&mut (*handshake).fd, seen) };
        // A handshake inside a call: its writes are not the call's plaintext.
        if let Some(call) = GO_TLS_CALLS.get_ptr_mut(&k) {
            unsafe { note(&mut (*call).fd, seen) };
        }
        return 0;
    }
    if let Some(call) = GO_TLS_CALLS.get_ptr_mut(&k) {
        let seen = fd_of(fd);
        let call = unsafe { &mut *call };
        note(&mut call.fd, seen);
        if call.direction == DIR_EGRESS as u16
            && call.sent == 0
            && call.fd == seen
            && seen != MANY_FDS
            && call.len > 0
            && unsafe { GO_TLS_CONN_FDS.get(&key(pid, call.conn)) }.is_some_and(|c| *c == seen)
        {
            call.sent = 1;
            let copy = *call;
            send(&copy, g, pid, tid, seen, copy.len);
        }
    }
    0
}

/// The socket fd of an `internal/poll.FD` ([`MANY_FDS`]: unreadable, or a file).
#[inline(always)]
fn fd_of(fd: u64) -> u32 {
    let sysfd = unsafe { bpf_probe_read_user((fd + GO_FD_SYSFD_OFFSET) as *const i64) };
    let is_file = unsafe { bpf_probe_read_user((fd + GO_FD_IS_FILE_OFFSET) as *const u8) };
    match (sysfd, is_file) {
        (Ok(sysfd), Ok(0)) if (0..MANY_FDS as i64).contains(&sysfd) => sysfd as u32,
        _ => MANY_FDS,
    }
}

#[inline(always)]
fn note(fd: &mut u32, seen: u32) {
    if *fd == NO_FD {
        *fd = seen;
    } else if *fd != seen {
        *fd = MANY_FDS;
    }
}
