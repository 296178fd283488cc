//! Maps several programs share, load-time configuration and the shared selection/counting
//! helpers. A map that one program file alone uses lives in that file.

use agent_common::{KernelOffsets, KernelStats, SendState, TrackedSocket};
use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};

/// Set by userspace at load time (read-only data: the verifier prunes what they disable).
#[unsafe(no_mangle)]
static TRACE_ALL: u32 = 0;
#[unsafe(no_mangle)]
static AGENT_PID: u32 = 0;
#[unsafe(no_mangle)]
static CAPTURE_SIZE: u32 = agent_common::DEFAULT_CAPTURE;
#[unsafe(no_mangle)]
static OFFSETS: KernelOffsets = KernelOffsets {
    skc_daddr: 0,
    skc_rcv_saddr: 0,
    skc_dport: 0,
    skc_num: 0,
    skc_family: 0,
    skc_v6_daddr: 0,
    skc_v6_rcv_saddr: 0,
    sk_protocol: 0,
    task_pid: 0,
    task_tgid: 0,
    tcp_rcv_nxt: 0,
    tcp_copied_seq: 0,
    skc_cookie: 0,
    _pad: 0,
};
/// Index 0 set (by userspace, once it chose kprobes for the socket data programs, which read
/// cookies instead of making them): every TCP socket gets its cookie made as it changes state
/// (`lifecycle::agent_sock_state`). A map, not a load-time constant: the choice is made by
/// attaching, after the object is loaded.
#[map]
pub static MAKE_COOKIES: Array<u32> = Array::with_max_entries(1, 0);

#[inline(always)]
pub fn make_cookies() -> bool {
    MAKE_COOKIES.get(0).is_some_and(|v| *v != 0)
}

/// Trace context in the kernel: server contexts on reads, `traceparent` injection (0: off).
#[unsafe(no_mangle)]
static CONTEXT_PROPAGATION: u32 = 0;
/// Client requests continue the trace of the request their thread serves (0: off).
#[unsafe(no_mangle)]
static IN_PROCESS_LINKING: u32 = 1;
/// A served request older than this is not continued (bounded trace adoption).
#[unsafe(no_mangle)]
static MAX_TRACE_AGE_NS: u64 = 300_000_000_000;
/// Client requests linked to one served request at most.
#[unsafe(no_mangle)]
static MAX_CHILDREN: u32 = 1000;
/// Head sampling (`--sample-ratio`): 0 traces every request, whatever an incoming
/// `traceparent`'s sampled flag says.
#[unsafe(no_mangle)]
static SAMPLING: u32 = 0;
/// A request without a sampled parent is sampled when a random u32 is below this (the ratio
/// times 2^32).
#[unsafe(no_mangle)]
static SAMPLE_THRESHOLD: u64 = 1 << 32;

#[inline(always)]
pub fn sampling() -> bool {
    unsafe { core::ptr::read_volatile(&SAMPLING) != 0 }
}

/// The decision for a request without a sampled parent.
#[inline(always)]
pub fn sample_root() -> bool {
    let r = unsafe { aya_ebpf::helpers::generated::bpf_get_prandom_u32() } as u64;
    r < unsafe { core::ptr::read_volatile(&SAMPLE_THRESHOLD) }
}

/// Head sampling's decision for a socket's current exchange (socket address → a mark below):
/// the events of an exchange left out are not written until the socket's next request is
/// decided. Removed at close (an address may be reused). A server socket keeps its mark when
/// its request is sampled: a keep-alive connection's decisions are then writes in place, not
/// LRU inserts and removals, and its answers are never taken for client calls.
#[map]
pub static SAMPLING_MARKS: LruHashMap<u64, u32> = LruHashMap::with_max_entries(65536, 0);
/// A server socket whose request read is sampled: its answer is written.
pub const SERVER_SAMPLED: u32 = 3;
/// A server socket: the request read and its answer are left out.
pub const SERVER_UNSAMPLED: u32 = 1;
/// A client socket: the request written and its answer are left out.
pub const CLIENT_UNSAMPLED: u32 = 2;

/// A client request on `sk` was decided: left out (`sampled` false) or not.
#[inline(always)]
pub fn decide_call(sk: u64, sampled: bool) {
    if !sampling() {
        return;
    }
    if sampled {
        let _ = SAMPLING_MARKS.remove(&sk);
    } else {
        let _ = SAMPLING_MARKS.insert(&sk, &CLIENT_UNSAMPLED, 0);
        count(|c| c.calls_unsampled += 1);
    }
}

#[inline(always)]
pub fn context_propagation() -> bool {
    unsafe { core::ptr::read_volatile(&CONTEXT_PROPAGATION) != 0 }
}

#[inline(always)]
pub fn in_process_linking() -> bool {
    unsafe { core::ptr::read_volatile(&IN_PROCESS_LINKING) != 0 }
}

#[inline(always)]
pub fn max_trace_age_ns() -> u64 {
    unsafe { core::ptr::read_volatile(&MAX_TRACE_AGE_NS) }
}

#[inline(always)]
pub fn max_children() -> u32 {
    unsafe { core::ptr::read_volatile(&MAX_CHILDREN) }
}

#[inline(always)]
pub fn capture_size() -> u32 {
    unsafe { core::ptr::read_volatile(&CAPTURE_SIZE) }
}

#[inline(always)]
pub fn offsets() -> KernelOffsets {
    unsafe { core::ptr::read_volatile(&OFFSETS) }
}

/// Ring buffer shared by all programs. Events are written without wake-ups: userspace drains it
/// every 10 ms, which 8 MiB covers up to ~800 MB/s of captured data.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(8 * 1024 * 1024, 0);

/// Processes userspace selected (tgid → 1). Unused when TRACE_ALL is set.
#[map]
pub static SELECTED: HashMap<u32, u32> = HashMap::with_max_entries(16384, 0);

/// Processes whose runtime a mechanism's probes serve (tgid → `RUNTIME_*` flags), set by
/// userspace when it attaches them, inherited by forked children (nginx's workers).
#[map]
pub static RUNTIME_PIDS: HashMap<u32, u32> = HashMap::with_max_entries(16384, 0);

/// Exact command names to select at exec (`--comm` without glob characters), NUL-padded to
/// the kernel's 16 bytes: a matching program is traced from its first instruction, before
/// userspace could react to its exec event.
#[map]
pub static SELECTED_COMMS: HashMap<[u8; 16], u32> = HashMap::with_max_entries(256, 0);

/// Sockets a traced process used (socket cookie → owner), so their close can be reported and
/// their addresses sent only once.
#[map]
pub static TRACKED_SOCKETS: LruHashMap<u64, TrackedSocket> = LruHashMap::with_max_entries(65536, 0);

/// The injector's position in each enrolled socket's outgoing stream (key: the socket's
/// address, the one identity both the sk_msg and the tracepoint programs see). A plain hash,
/// not LRU: a forgotten state would make a body look like a request boundary.
#[map]
pub static SEND_STATES: HashMap<u64, SendState> = HashMap::with_max_entries(65536, 0);

/// Per-CPU counters: one struct, one lookup per program run.
#[map]
pub static COUNTERS: PerCpuArray<KernelStats> = PerCpuArray::with_max_entries(1, 0);

/// This CPU's counters (a per-CPU slot: no other writer races the increments).
#[inline(always)]
pub fn counters() -> Option<&'static mut KernelStats> {
    COUNTERS.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

/// Updates this CPU's counters (nothing when the map slot is missing, which cannot happen
/// for a one-entry array).
#[inline(always)]
pub fn count(update: impl FnOnce(&mut KernelStats)) {
    if let Some(c) = counters() {
        update(c);
    }
}

pub fn trace_all() -> bool {
    unsafe { core::ptr::read_volatile(&TRACE_ALL) != 0 }
}

/// The current process's tgid if it is selected for tracing.
#[inline(always)]
pub fn selected_tgid() -> Option<(u32, u32)> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let tid = pid_tgid as u32;
    if tgid == 0 {
        return None;
    }
    if unsafe { core::ptr::read_volatile(&TRACE_ALL) } != 0 {
        if tgid == unsafe { core::ptr::read_volatile(&AGENT_PID) } {
            return None;
        }
        return Some((tgid, tid));
    }
    if SELECTED.get_ptr(&tgid).is_some() {
        Some((tgid, tid))
    } else {
        None
    }
}

/// Userspace polls on its own timer: no wake-up per event.
pub const BPF_RB_NO_WAKEUP: u64 = 1;
/// Wakes userspace now (a parked socket may rejoin the injector's map).
pub const BPF_RB_FORCE_WAKEUP: u64 = 2;

/// Write a fixed-size event; count it, or count the loss.
#[inline(always)]
pub fn emit<T: 'static>(event: T) {
    emit_with::<T, BPF_RB_NO_WAKEUP>(event)
}

/// The same, waking userspace now (it must act before the process goes on for long).
#[inline(always)]
pub fn emit_now<T: 'static>(event: T) {
    emit_with::<T, BPF_RB_FORCE_WAKEUP>(event)
}

#[inline(always)]
fn emit_with<T: 'static, const WAKEUP: u64>(event: T) {
    let written = match EVENTS.reserve::<T>(0) {
        Some(mut entry) => {
            entry.write(event);
            entry.submit(WAKEUP);
            true
        }
        None => false,
    };
    if let Some(c) = counters() {
        if written {
            c.other_events += 1;
        } else {
            c.ringbuf_full += 1;
        }
    }
}
