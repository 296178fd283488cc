//! Go (`net/http`): which served request a client request is written for.
//!
//! A Go server serves each connection on a goroutine of its own and runs the handler on it;
//! goroutines move between threads, so the thread tells nothing. The goroutine does: `g`, the
//! running goroutine, has a register of its own in all Go code of the register ABI (Go 1.17+;
//! R14 on amd64), and arguments are in registers at a function's entry (`arch::ARCH`).
//!
//! 1. `internal/poll.(*FD).Read` (entry): the fd each goroutine read last.
//! 2. `net/http.serverHandler.ServeHTTP` (entry), on the connection's goroutine once its
//!    request is read: the goroutine serves the request the kernel read last on that fd. A
//!    request whose first byte the connection's background read took alone was not opened at
//!    its read; it is opened here, from its head in the goroutine's read buffer.
//! 3. `(*persistConn).roundTrip` (entry) runs on the handler's goroutine: the `*Request` it
//!    sends (`transportRequest` embeds it as its first field) is owned by that request.
//! 4. `(*Request).write` (entry) runs on the connection's `writeLoop` goroutine: that
//!    goroutine's next socket write is for the owner.
//! 5. `internal/poll.(*FD).Write` (entry): the goroutine's thread hands its write off to the
//!    owner (one shot, consumed by the first client request on the thread, short-lived), or
//!    has any hand-off removed. Without a hand-off, a Go thread never stands for a request
//!    (`context::belongs_to`): only a forwarded trace id can link the call.
//!
//! 6. `runtime.goexit0` (entry): a goroutine ended; its `g` is forgotten before reuse.
//! 7. `runtime.newproc1` (entry, then each of its RETs): a goroutine creates another (a
//!    handler fanning out its calls). While the creator works for a request still in flight,
//!    so does the new goroutine, for that request only: owners name the request (its server
//!    span id), not just its socket, so a call made after it was answered is never given the
//!    next request on the connection.
//!
//! No uretprobes: Go moves goroutine stacks, which breaks them (`newproc1` runs on the
//! scheduler's stack, which does not move, but its result is read at its RETs all the same).

use agent_common::{GO_FD_SYSFD_OFFSET, GO_TRANSPORT_REQUEST_OFFSET};
use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_probe_read_user, bpf_probe_read_user_buf,
        generated::bpf_ktime_get_ns,
    },
    macros::{map, uprobe},
    maps::{LruHashMap, PerCpuArray},
    programs::ProbeContext,
};

use crate::{
    arch::{self, ARCH},
    context, http_head,
    maps::{count, selected_tgid},
};

/// The fd and buffer each goroutine read last (`poll.FD.Read`).
#[map]
static LAST_READ: LruHashMap<GoKey, LastRead> = LruHashMap::with_max_entries(65536, 0);

#[repr(C)]
#[derive(Clone, Copy)]
pub struct LastRead {
    fd: u32,
    _pad: u32,
    /// Where the read put its bytes (`p`'s data).
    buf: u64,
}

/// Per-CPU room for a request head copied from the program (sized for the scan's masked
/// loads, `MASK + 1 + 32`).
#[map]
static HEAD_COPY: PerCpuArray<[u8; http_head::MASK as usize + 1 + 32]> =
    PerCpuArray::with_max_entries(1, 0);

/// The request socket each goroutine serves.
#[map]
static SERVING: LruHashMap<GoKey, u64> = LruHashMap::with_max_entries(65536, 0);

/// The served request each client request in flight was started for (by `*Request`).
#[map]
static OWNERS: LruHashMap<GoKey, Owner> = LruHashMap::with_max_entries(65536, 0);

/// The served request a write goroutine's next write is for.
#[map]
static WRITERS: LruHashMap<GoKey, Owner> = LruHashMap::with_max_entries(65536, 0);

/// The served request each goroutine created while it was in flight works for (by `g`).
#[map]
static SPAWNED: LruHashMap<GoKey, Owner> = LruHashMap::with_max_entries(65536, 0);

/// The served request of the goroutine each thread is creating one for now (`newproc1`'s
/// entry to its return, on one thread: it runs on the scheduler's stack, not preempted).
#[map]
static SPAWNING: LruHashMap<u64, Owner> = LruHashMap::with_max_entries(16384, 0);

/// A served request: its socket and which request on it (`context::request_id`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Owner {
    cookie: u64,
    request: u64,
}

/// A goroutine (`g`) or a `*Request` of one process (also the Go TLS probes' key).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct GoKey {
    pid: u32,
    _pad: u32,
    addr: u64,
}

#[inline(always)]
pub fn key(pid: u32, addr: u64) -> GoKey {
    GoKey { pid, _pad: 0, addr }
}

/// The running goroutine.
#[inline(always)]
pub fn g(ctx: &ProbeContext) -> u64 {
    arch::uprobe_reg(ctx, ARCH.go_g_slot)
}

/// The `n`th integer argument at a function's entry (register ABI).
#[inline(always)]
pub fn arg(ctx: &ProbeContext, n: usize) -> u64 {
    arch::uprobe_reg(ctx, ARCH.go_arg_slots[n])
}

/// `internal/poll.(*FD).Read(fd, p)`: RAX = fd, R14 = g.
#[uprobe]
pub fn agent_go_fd_read(ctx: ProbeContext) -> u32 {
    let Some((pid, _)) = selected_tgid() else {
        return 0;
    };
    let (g, fd, buf) = (g(&ctx), arg(&ctx, 0), arg(&ctx, 1));
    match unsafe { bpf_probe_read_user((fd + GO_FD_SYSFD_OFFSET) as *const i64) } {
        Ok(sysfd) if (0..=i32::MAX as i64).contains(&sysfd) => {
            let k = key(pid, g);
            // In place when the goroutine is known (most reads): an LRU update costs more.
            match LAST_READ.get_ptr_mut(&k) {
                Some(last) => unsafe {
                    (*last).fd = sysfd as u32;
                    (*last).buf = buf;
                },
                None => {
                    let last = LastRead {
                        fd: sysfd as u32,
                        _pad: 0,
                        buf,
                    };
                    let _ = LAST_READ.insert(&k, &last, 0);
                }
            }
        }
        _ => {
            let _ = LAST_READ.remove(&key(pid, g));
            count(|c| c.handoff_unreadable += 1);
        }
    }
    0
}

/// `net/http.serverHandler.ServeHTTP(sh, rw, req)`: R14 = the connection's goroutine, which
/// read the request (or had it buffered from its last read, on the same connection).
#[uprobe]
pub fn agent_go_serve(ctx: ProbeContext) -> u32 {
    let Some((pid, tid)) = selected_tgid() else {
        return 0;
    };
    let g = g(&ctx);
    let k = key(pid, g);
    let Some(last) = LAST_READ.get_ptr(&k).map(|l| unsafe { *l }) else {
        let _ = SERVING.remove(&k);
        count(|c| c.go_serves_unknown += 1);
        return 0;
    };
    let fd = last.fd;
    let Some(cookie) = context::request_on_fd(pid, fd) else {
        let _ = SERVING.remove(&k);
        count(|c| c.go_serves_unknown += 1);
        return 0;
    };
    // No request in flight on the socket: its start was not seen, because its first byte
    // came alone (read ahead by the connection's background goroutine, straight into the
    // buffer the goroutine's last read then filled after it). Open it now, before the
    // handler runs, from the head in that buffer.
    if !context::in_flight(cookie) && open_late(pid, tid, cookie, fd, last.buf) {
        count(|c| c.go_split_starts += 1);
    }
    match SERVING.get_ptr_mut(&k) {
        Some(serving) => unsafe { *serving = cookie },
        None => {
            let _ = SERVING.insert(&k, &cookie, 0);
        }
    }
    count(|c| c.go_serves_known += 1);
    0
}

#[inline(always)]
fn open_late(pid: u32, tid: u32, cookie: u64, fd: u32, read_at: u64) -> bool {
    let Some(head) = HEAD_COPY.get_ptr_mut(0) else {
        return false;
    };
    let head = unsafe { &mut *head };
    let dst = &mut head[..http_head::HEAD_WINDOW as usize];
    let src = read_at.wrapping_sub(1) as *const u8;
    // A pure server gets no contexts (as at its reads); and the 4 KiB copy only when a
    // method's first letter is there.
    if read_at == 0 || context::serves_without_calls(pid) {
        return false;
    }
    match unsafe { bpf_probe_read_user(src) } {
        Ok(b'G' | b'P' | b'H' | b'D' | b'O') => {}
        _ => return false,
    }
    if unsafe { bpf_probe_read_user_buf(src, dst) }.is_err() {
        return false;
    }
    context::open_late_request(
        pid,
        tid,
        cookie,
        fd,
        unsafe { bpf_ktime_get_ns() },
        head.as_ptr(),
    )
}

/// `runtime.goexit0(gp)`: RAX = the goroutine that ended (on the scheduler's stack). Its `g`
/// will be reused for another goroutine, which must not inherit what this one read, served
/// or was about to write (a handler goroutine of HTTP/2 never reads before serving).
#[uprobe]
pub fn agent_go_exit(ctx: ProbeContext) -> u32 {
    let Some((pid, _)) = selected_tgid() else {
        return 0;
    };
    let k = key(pid, arg(&ctx, 0));
    let _ = LAST_READ.remove(&k);
    let _ = SERVING.remove(&k);
    let _ = WRITERS.remove(&k);
    let _ = SPAWNED.remove(&k);
    0
}

/// The request goroutine `g` of `pid` works for: the one it serves, if still in flight, else
/// the one it was created for (`true`: inherited so).
#[inline(always)]
fn works_for(pid: u32, g: u64) -> Option<(Owner, bool)> {
    let k = key(pid, g);
    match SERVING.get_ptr(&k) {
        Some(cookie) => {
            let cookie = unsafe { *cookie };
            context::request_id(cookie).map(|request| (Owner { cookie, request }, false))
        }
        None => SPAWNED.get_ptr(&k).map(|o| (unsafe { *o }, true)),
    }
}

/// `runtime.newproc1(fn, callergp, ...)`: RBX = the creating goroutine (R14 is the scheduler's
/// own here).
#[uprobe]
pub fn agent_go_spawn(ctx: ProbeContext) -> u32 {
    let Some((pid, _)) = selected_tgid() else {
        return 0;
    };
    let thread = bpf_get_current_pid_tgid();
    match works_for(pid, arg(&ctx, 1)) {
        Some((owner, _)) => {
            let _ = SPAWNING.insert(&thread, &owner, 0);
        }
        None => {
            let _ = SPAWNING.remove(&thread);
        }
    }
    0
}

/// A RET of `runtime.newproc1`: RAX = the new goroutine.
#[uprobe]
pub fn agent_go_spawned(ctx: ProbeContext) -> u32 {
    let Some((pid, _)) = selected_tgid() else {
        return 0;
    };
    let thread = bpf_get_current_pid_tgid();
    let Some(owner) = SPAWNING.get_ptr(&thread).map(|o| unsafe { *o }) else {
        return 0;
    };
    let _ = SPAWNING.remove(&thread);
    // A new goroutine's `g` left `goexit0` with nothing of its previous life.
    let _ = SPAWNED.insert(&key(pid, arg(&ctx, 0)), &owner, 0);
    count(|c| c.go_spawns_followed += 1);
    0
}

/// `net/http.(*persistConn).roundTrip(pc, treq)`: RAX = pc, RBX = treq, R14 = g.
#[uprobe]
pub fn agent_go_round_trip(ctx: ProbeContext) -> u32 {
    let Some((pid, _)) = selected_tgid() else {
        return 0;
    };
    let (g, treq) = (g(&ctx), arg(&ctx, 1));
    // `transportRequest { *Request; ... }`.
    let req: u64 =
        match unsafe { bpf_probe_read_user((treq + GO_TRANSPORT_REQUEST_OFFSET) as *const u64) } {
            Ok(req) if req != 0 => req,
            _ => {
                count(|c| c.handoff_unreadable += 1);
                return 0;
            }
        };
    // A goroutine serving a request that is not in flight now (answered, or never opened in
    // the kernel) owns nothing: the request its socket carries at the write may be the next.
    match works_for(pid, g) {
        Some((owner, inherited)) => {
            let _ = OWNERS.insert(&key(pid, req), &owner, 0);
            count(|c| {
                c.go_calls_owned += 1;
                c.go_calls_spawned += inherited as u64;
            });
        }
        None => {
            // A `*Request` address is reused once collected: never leave an old owner on it.
            let _ = OWNERS.remove(&key(pid, req));
            count(|c| c.go_calls_unowned += 1);
        }
    }
    0
}

/// `net/http.(*Request).write(r, w, ...)`: RAX = r, R14 = the transport's write goroutine.
#[uprobe]
pub fn agent_go_request_write(ctx: ProbeContext) -> u32 {
    let Some((pid, _)) = selected_tgid() else {
        return 0;
    };
    let (g, req) = (g(&ctx), arg(&ctx, 0));
    let owner = OWNERS.get_ptr(&key(pid, req)).map(|o| unsafe { *o });
    let _ = OWNERS.remove(&key(pid, req));
    match owner {
        Some(owner) => {
            let _ = WRITERS.insert(&key(pid, g), &owner, 0);
        }
        None => {
            let _ = WRITERS.remove(&key(pid, g));
        }
    }
    0
}

/// `internal/poll.(*FD).Write(fd, p)`: R14 = the writing goroutine.
#[uprobe]
pub fn agent_go_fd_write(ctx: ProbeContext) -> u32 {
    let Some((pid, tid)) = selected_tgid() else {
        return 0;
    };
    let g = g(&ctx);
    let k = key(pid, g);
    let Some(owner) = WRITERS.get_ptr(&k).map(|o| unsafe { *o }) else {
        // Whatever this thread handed off before is not this goroutine's.
        context::end_hand_off(tid);
        return 0;
    };
    // The request's head is in this write (bufio flushes it whole): later writes of the same
    // request (its body) are not requests.
    let _ = WRITERS.remove(&k);
    context::hand_off_once(pid, tid, owner.cookie, owner.request, unsafe {
        bpf_ktime_get_ns()
    });
    count(|c| c.go_writes_handed_off += 1);
    0
}
