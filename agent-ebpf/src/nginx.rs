//! nginx: which client request an upstream request is written for.
//!
//! An nginx worker serves many requests on one thread, so the thread cannot tell which of
//! them an upstream request belongs to. nginx can: every upstream request is written through
//! `ngx_chain_writer(ctx, in)` (exported: dynamic modules link against it), and the upstream
//! connection it writes to names its request (`c->data == r`, set when nginx connects the
//! upstream), whose client connection has the fd the request was read on. A uprobe at its
//! entry hands the thread's writes off to that request; a uretprobe ends the hand-off.
//!
//! The three reads use the leading fields of nginx's core structs, unchanged since nginx 1.0
//! (checked on Debian's 1.22.1 with gdb): `ngx_chain_writer_ctx_t { out, last, connection }`,
//! `ngx_connection_t { data, read, write, fd }`, `ngx_http_request_t { signature, connection }`
//! with `signature == "HTTP"`, which guards against anything else in `c->data` (a stream or
//! mail module's session): no signature, no hand-off (counted).

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user, generated::bpf_ktime_get_ns},
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};

use crate::{context, maps::count};

/// `ngx_chain_writer_ctx_t.connection`.
const WRITER_CONNECTION: u64 = 16;
/// `ngx_connection_t.data` (the request, for an upstream connection of the http module).
const CONNECTION_DATA: u64 = 0;
/// `ngx_connection_t.fd`.
const CONNECTION_FD: u64 = 24;
/// `ngx_http_request_t.signature`, and its value `NGX_HTTP_MODULE` ("HTTP").
const REQUEST_SIGNATURE: u64 = 0;
const HTTP_SIGNATURE: u32 = 0x5054_5448;
/// `ngx_http_request_t.connection` (the client connection).
const REQUEST_CONNECTION: u64 = 8;

#[inline(always)]
fn read<T>(addr: u64) -> Option<T> {
    if addr == 0 {
        return None;
    }
    unsafe { bpf_probe_read_user(addr as *const T).ok() }
}

/// The fd of the client connection whose request the writer `ctx` writes upstream (four
/// reads of user memory, the largest part of the probe's cost).
#[inline(always)]
fn client_fd(writer: u64) -> Option<u32> {
    let upstream: u64 = read(writer + WRITER_CONNECTION)?;
    let request: u64 = read(upstream + CONNECTION_DATA)?;
    // The signature and the connection in one read.
    let head: [u64; 2] = read(request + REQUEST_SIGNATURE)?;
    if head[0] as u32 != HTTP_SIGNATURE {
        return None;
    }
    let client = head[((REQUEST_CONNECTION - REQUEST_SIGNATURE) / 8) as usize];
    let fd: i32 = read(client + CONNECTION_FD)?;
    (fd >= 0).then_some(fd as u32)
}

#[uprobe]
pub fn agent_nginx_upstream_write(ctx: ProbeContext) -> u32 {
    // No selection lookup: the probes are placed in selected processes only (or, tracing
    // every process, all are selected).
    let pid_tgid = bpf_get_current_pid_tgid();
    let (pid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    let writer: u64 = ctx.arg(0).unwrap_or(0);
    match client_fd(writer) {
        Some(fd) => context::hand_off_fd(pid, tid, fd, unsafe { bpf_ktime_get_ns() }),
        None => {
            context::end_hand_off(tid);
            count(|c| c.handoff_unreadable += 1);
        }
    }
    0
}

#[uretprobe]
pub fn agent_nginx_upstream_write_done(_ctx: RetProbeContext) -> u32 {
    // No selection check: the slot only ever holds a selected thread's hand-off.
    context::end_hand_off(bpf_get_current_pid_tgid() as u32);
    0
}
