//! Connection and process lifecycle: accept, connect, close, exec, exit.

use agent_common::{ConnEvent, EventKind, ProcessEvent, TrackedSocket};
use aya_ebpf::{
    cty::c_void,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_probe_read_kernel,
        generated::{bpf_get_socket_cookie, bpf_ktime_get_ns},
    },
    macros::{btf_tracepoint, tracepoint},
    programs::{BtfTracePointContext, TracePointContext},
};

use crate::maps::{
    RUNTIME_PIDS, SAMPLING_MARKS, SELECTED, SELECTED_COMMS, SEND_STATES, TRACKED_SOCKETS, emit,
    make_cookies, offsets, sampling, selected_tgid, trace_all,
};

const TCP_SYN_SENT: i32 = 2;
const TCP_CLOSE: i32 = 7;
const IPPROTO_TCP: u16 = 6;
/// `ret` of a `sys_exit_*` tracepoint record.
const SYS_EXIT_RET_OFFSET: usize = 16;

/// The return value a `sys_exit_*` tracepoint reports (-1 if unreadable).
#[inline(always)]
pub fn sys_exit_ret(ctx: &TracePointContext) -> i64 {
    unsafe { ctx.read_at(SYS_EXIT_RET_OFFSET) }.unwrap_or(-1)
}

fn on_accept(ctx: &TracePointContext) {
    let Some((tgid, tid)) = selected_tgid() else {
        return;
    };
    let ret = sys_exit_ret(ctx);
    if ret < 0 {
        return;
    }
    emit(ConnEvent {
        kind: EventKind::Accept as u32,
        pid: tgid,
        tid,
        fd: ret as u32,
        ts_ns: unsafe { bpf_ktime_get_ns() },
        sock_cookie: 0,
        ret,
    });
}

#[tracepoint(category = "syscalls", name = "sys_exit_accept4")]
pub fn agent_exit_accept4(ctx: TracePointContext) -> u32 {
    on_accept(&ctx);
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_accept")]
pub fn agent_exit_accept(ctx: TracePointContext) -> u32 {
    on_accept(&ctx);
    0
}

/// TCP state changes: SYN_SENT is a connect by the current process; CLOSE ends a socket we
/// saw data on (or a connect we reported), whatever context the kernel is in.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn agent_sock_state(ctx: BtfTracePointContext) -> i32 {
    let sk: u64 = ctx.arg(0);
    let newstate: i32 = ctx.arg(2);
    if sk == 0 {
        return 0;
    }
    if make_cookies() && newstate != TCP_CLOSE {
        // Made here (an atomic counter), read by the kprobe fallback's data programs.
        unsafe { bpf_get_socket_cookie(sk as *mut c_void) };
    }
    if newstate != TCP_SYN_SENT && newstate != TCP_CLOSE {
        return 0;
    }
    let protocol: u16 =
        unsafe { bpf_probe_read_kernel((sk + offsets().sk_protocol as u64) as *const u16) }
            .unwrap_or(0);
    if protocol != IPPROTO_TCP {
        return 0;
    }
    let cookie = unsafe { bpf_get_socket_cookie(sk as *mut c_void) };
    if newstate == TCP_SYN_SENT {
        let Some((tgid, tid)) = selected_tgid() else {
            return 0;
        };
        let owner = TrackedSocket {
            pid: tgid,
            addresses_sent: 0,
            write_stamp_floor_ns: unsafe { bpf_ktime_get_ns() },
        };
        let _ = TRACKED_SOCKETS.insert(&cookie, &owner, 0);
        crate::context::makes_calls(tgid);
        emit(ConnEvent {
            kind: EventKind::Connect as u32,
            pid: tgid,
            tid,
            fd: u32::MAX,
            ts_ns: unsafe { bpf_ktime_get_ns() },
            sock_cookie: cookie,
            ret: 0,
        });
        return 0;
    }
    let Some(owner) = TRACKED_SOCKETS.get_ptr(&cookie) else {
        return 0;
    };
    let pid = unsafe { (*owner).pid };
    let _ = TRACKED_SOCKETS.remove(&cookie);
    let _ = SEND_STATES.remove(&sk);
    // Here, after `sk`'s last use as a pointer: a key's stack copy of it is a plain number to
    // the verifier, which then refuses it to the cookie helper (Linux 6.1, 6.12).
    if sampling() {
        let _ = SAMPLING_MARKS.remove(&sk);
    }
    // A request still in flight on a closed server socket is over.
    crate::context::release_inflight(cookie);
    emit(ConnEvent {
        kind: EventKind::Close as u32,
        pid,
        tid: 0,
        fd: u32::MAX,
        ts_ns: unsafe { bpf_ktime_get_ns() },
        sock_cookie: cookie,
        ret: 0,
    });
    0
}

#[tracepoint(category = "sched", name = "sched_process_exec")]
pub fn agent_process_exec(_ctx: TracePointContext) -> u32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let comm = bpf_get_current_comm().unwrap_or([0; 16]);
    if !trace_all() && SELECTED_COMMS.get_ptr(&comm).is_some() {
        let _ = SELECTED.insert(&tgid, &1, 0);
    }
    emit(ProcessEvent {
        kind: EventKind::Exec as u32,
        pid: tgid,
        ts_ns: unsafe { bpf_ktime_get_ns() },
        comm,
        parent: 0,
        _pad: 0,
    });
    0
}

#[tracepoint(category = "sched", name = "sched_process_exit")]
pub fn agent_process_exit(_ctx: TracePointContext) -> u32 {
    let Some((tgid, tid)) = selected_tgid() else {
        return 0;
    };
    if tgid != tid {
        // A thread ended, not the process.
        return 0;
    }
    emit(ProcessEvent {
        kind: EventKind::ProcessExit as u32,
        pid: tgid,
        ts_ns: unsafe { bpf_ktime_get_ns() },
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
        parent: 0,
        _pad: 0,
    });
    // Unselect here, not only when userspace reads the event: pids are reused (pid_max may be
    // 32768), and a new process must not inherit the selection, even for a moment.
    if !trace_all() {
        let _ = SELECTED.remove(&tgid);
    }
    let _ = RUNTIME_PIDS.remove(&tgid);
    0
}

/// A selected process forked: the child (a new process, not a thread) is selected here, in the
/// kernel, so a pre-forked worker or a PostgreSQL backend is traced from its first byte.
#[btf_tracepoint(function = "sched_process_fork")]
pub fn agent_process_fork(ctx: BtfTracePointContext) -> i32 {
    let Some((parent, _)) = selected_tgid() else {
        return 0;
    };
    let runtime = RUNTIME_PIDS.get_ptr(&parent).map(|f| unsafe { *f });
    if trace_all() && runtime.is_none() {
        return 0;
    }
    let child: u64 = ctx.arg(1);
    if child == 0 {
        return 0;
    }
    let off = offsets();
    let pid: i32 =
        unsafe { bpf_probe_read_kernel((child + off.task_pid as u64) as *const i32) }.unwrap_or(0);
    let tgid: i32 = unsafe { bpf_probe_read_kernel((child + off.task_tgid as u64) as *const i32) }
        .unwrap_or(-1);
    if pid <= 0 || pid != tgid {
        // A new thread of a selected process: already covered by its tgid.
        return 0;
    }
    let child_pid = pid as u32;
    // Same program, same runtime probes (nginx's workers are forked by its master).
    if let Some(flags) = runtime {
        let _ = RUNTIME_PIDS.insert(&child_pid, &flags, 0);
    }
    if trace_all() {
        return 0;
    }
    if SELECTED.insert(&child_pid, &1, 0).is_err() {
        return 0;
    }
    emit(ProcessEvent {
        kind: EventKind::Fork as u32,
        pid: child_pid,
        ts_ns: unsafe { bpf_ktime_get_ns() },
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
        parent,
        _pad: 0,
    });
    0
}
