//! Go `crypto/tls`: the plaintext of `(*Conn).Read` and `(*Conn).Write`, sent as data events
//! of the connection ([`DATA_FLAG_TLS_PLAINTEXT`](agent_common::DATA_FLAG_TLS_PLAINTEXT)),
//! named by its fd (userspace resolves the fd to the socket it moved bytes on last).
//!
//! No uretprobes (Go moves goroutine stacks, which breaks them): `Read`'s entry probe keeps the
//! call's buffer, keyed by goroutine (`g`: a goroutine parks inside `Read` and resumes on
//! another thread, and threads run many goroutines), and a probe on each RET instruction of
//! the function (found by userspace) reads the result (`n`) and sends it. `Write`'s plaintext
//! is sent at its entry, before its records go out (sent at its return, it could come after
//! the peer's answer, and a request would follow its response).
//!
//! Which fd: the connection's own, read from the `*Conn` at each call's entry:
//! `Conn.conn` (a `net.Conn` interface) holds a `*net.TCPConn` — told by its itab's type hash,
//! [`GO_TCPCONN_TYPE_HASH`] — whose `conn.fd` is a `*net.netFD` starting with its
//! `internal/poll.FD`. Any other `net.Conn` (a wrapper, a Unix socket) names nothing: counted
//! (`go_tls_unassociated`), never guessed. No probe on the program's socket I/O: a Go program
//! that makes no TLS call pays nothing.

use agent_common::{
    DIR_EGRESS, DIR_INGRESS, GO_FD_IS_FILE_OFFSET, GO_FD_SYSFD_OFFSET, GO_TCPCONN_TYPE_HASH,
    GO_TLS_CONN_NET_CONN_OFFSET,
};
use aya_ebpf::{
    helpers::{bpf_probe_read_user, generated::bpf_ktime_get_ns},
    macros::{map, uprobe},
    maps::LruHashMap,
    programs::ProbeContext,
};

use crate::{
    go::{GoKey, arg, g, key},
    maps::{count, selected_tgid},
    sockets::read_user,
    tls::{Plaintext, emit_plaintext},
};

/// A `Read` in progress on a goroutine.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct GoTlsRead {
    buf: u64,
    /// The goroutine stack's top (`g.stack.hi`) at entry when `buf` is on that stack (0: it
    /// is not): the stack may move during the call, the buffer with it.
    stack_hi: u64,
    /// The connection's socket fd.
    fd: u32,
    _pad: u32,
}

/// One entry per goroutine inside `Read`: a server's idle keep-alive connection is a goroutine
/// parked in `Read`, hence the size (an evicted call sends nothing).
#[map]
static GO_TLS_READS: LruHashMap<GoKey, GoTlsRead> = LruHashMap::with_max_entries(65536, 0);

/// The goroutine's stack, `(lo, hi)` (`g.stack`). The helper is called here, not through
/// `read_user`: that way the compiler compared the bounds on the failed-read path too, which
/// the verifier refuses (`!read_ok`).
#[inline(always)]
fn stack(g: u64) -> Option<[u64; 2]> {
    unsafe { bpf_probe_read_user((g + agent_common::GO_G_STACK_OFFSET) as *const [u64; 2]).ok() }
}

/// The socket fd of TLS connection `conn` (a `*crypto/tls.Conn`) when it runs over a
/// `*net.TCPConn`.
#[inline(always)]
fn socket_fd(conn: u64) -> Option<u32> {
    // `net.Conn` is an interface: its itab, then its value.
    let [itab, tcp_conn] = read_user::<[u64; 2]>(conn + GO_TLS_CONN_NET_CONN_OFFSET)?;
    // `itab { inter, _type *_type, hash uint32, ... }`: `hash` is the type's.
    if read_user::<u32>(itab + 16)? != GO_TCPCONN_TYPE_HASH {
        return None;
    }
    // `TCPConn { conn { fd *netFD } }`, `netFD { pfd poll.FD, ... }`.
    let net_fd = read_user::<u64>(tcp_conn)?;
    let sysfd = read_user::<i64>(net_fd + GO_FD_SYSFD_OFFSET)?;
    let is_file = read_user::<u8>(net_fd + GO_FD_IS_FILE_OFFSET)?;
    (is_file == 0 && (0..i32::MAX as i64).contains(&sysfd)).then_some(sysfd as u32)
}

/// `crypto/tls.(*Conn).Read(c, b []byte)` entry: RAX = c, RBX = b's data, RCX = len(b).
#[uprobe]
pub fn agent_go_tls_read(ctx: ProbeContext) -> u32 {
    let Some((pid, _)) = selected_tgid() else {
        return 0;
    };
    let (g, conn, buf) = (g(&ctx), arg(&ctx, 0), arg(&ctx, 1));
    let k = key(pid, g);
    let Some(fd) = socket_fd(conn) else {
        // Replaces whatever an earlier call of the goroutine left (one that panicked).
        let _ = GO_TLS_READS.remove(&k);
        count(|c| c.go_tls_unassociated += 1);
        return 0;
    };
    let stack_hi = match stack(g) {
        Some([lo, hi]) if buf >= lo && buf < hi => hi,
        _ => 0,
    };
    let read = GoTlsRead {
        buf,
        stack_hi,
        fd,
        _pad: 0,
    };
    let _ = GO_TLS_READS.insert(&k, &read, 0);
    0
}

/// A RET of `(*Conn).Read`: RAX = n.
#[uprobe]
pub fn agent_go_tls_read_ret(ctx: ProbeContext) -> u32 {
    let Some((pid, tid)) = selected_tgid() else {
        return 0;
    };
    let g = g(&ctx);
    let k = key(pid, g);
    let Some(read) = (unsafe { GO_TLS_READS.get(&k) }).copied() else {
        return 0;
    };
    let _ = GO_TLS_READS.remove(&k);
    let n = arg(&ctx, 0) as i64;
    if n <= 0 {
        return 0;
    }
    // The stack moved during the call (grown or shrunk, copied whole): the buffer is at the
    // same distance from its top.
    let buf = if read.stack_hi != 0 {
        match stack(g) {
            Some([_, hi]) => read.buf.wrapping_add(hi.wrapping_sub(read.stack_hi)),
            None => return 0,
        }
    } else {
        read.buf
    };
    // A read's bytes were all there at its return.
    let now = unsafe { bpf_ktime_get_ns() };
    send(DIR_INGRESS, pid, tid, read.fd, buf, n as u64, now);
    0
}

/// `crypto/tls.(*Conn).Write(c, b []byte)` entry: RAX = c, RBX = b's data, RCX = len(b). Its
/// plaintext is sent now, before any of its records goes out (see the module's comment).
#[uprobe]
pub fn agent_go_tls_write(ctx: ProbeContext) -> u32 {
    let Some((pid, tid)) = selected_tgid() else {
        return 0;
    };
    let (conn, buf, len) = (arg(&ctx, 0), arg(&ctx, 1), arg(&ctx, 2));
    if len == 0 {
        return 0;
    }
    let Some(fd) = socket_fd(conn) else {
        count(|c| c.go_tls_unassociated += 1);
        return 0;
    };
    let now = unsafe { bpf_ktime_get_ns() };
    send(DIR_EGRESS, pid, tid, fd, buf, len, now);
    0
}

/// Sends a call's plaintext, `bytes` at `buf`, as its connection's (named by `fd`).
#[inline(always)]
fn send(direction: u32, pid: u32, tid: u32, fd: u32, buf: u64, bytes: u64, now: u64) {
    emit_plaintext(&Plaintext {
        direction,
        pid_tgid: ((pid as u64) << 32) | tid as u64,
        sock_cookie: 0,
        fd,
        socket_fd: fd,
        buf,
        bytes,
        first_ns: now,
        last_ns: now,
    });
}
