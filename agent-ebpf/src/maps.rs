//! Maps, load-time configuration and the shared selection/counting helpers.

use agent_common::{COUNTER_COUNT, Counter, DataEvent, KernelOffsets, MAX_CAPTURE};
use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid,
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuArray, RingBuf},
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
};

#[inline(always)]
pub fn capture_size() -> u32 {
    unsafe { core::ptr::read_volatile(&CAPTURE_SIZE) }
}

#[inline(always)]
pub fn offsets() -> KernelOffsets {
    unsafe { core::ptr::read_volatile(&OFFSETS) }
}

/// Ring buffer shared by all programs; userspace drains it on a timer (events are written
/// without wake-ups) and on the forced wake-up sent when it is a quarter full.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(8 * 1024 * 1024, 0);

/// Processes userspace selected (tgid → 1). Unused when TRACE_ALL is set.
#[map]
pub static SELECTED: HashMap<u32, u32> = HashMap::with_max_entries(16384, 0);

/// Sockets a traced process used (socket cookie → tgid), so their close can be reported.
#[map]
pub static TRACKED_SOCKETS: LruHashMap<u64, u32> = LruHashMap::with_max_entries(65536, 0);

/// Per-CPU counters indexed by [`Counter`].
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_COUNT, 0);

/// Scratch space to assemble a data event (header + payload) off the 512-byte stack.
/// The payload area is twice the largest capture so a masked offset plus a clamped length
/// always stays inside it, which is what the verifier needs to see.
#[repr(C)]
pub struct Scratch {
    pub header: DataEvent,
    pub payload: [u8; 2 * MAX_CAPTURE],
}

#[map]
pub static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
pub fn count(counter: Counter, n: u64) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // Per-CPU slot: no other writer can race this increment.
        unsafe { *slot += n };
    }
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

/// Wake userspace only when the ring buffer fills up; otherwise it polls on its own timer,
/// which saves a wake-up per event.
#[inline(always)]
pub fn ringbuf_flags() -> u64 {
    const BPF_RB_NO_WAKEUP: u64 = 1;
    const BPF_RB_FORCE_WAKEUP: u64 = 2;
    const BPF_RB_AVAIL_DATA: u64 = 0;
    if EVENTS.query(BPF_RB_AVAIL_DATA) > 2 * 1024 * 1024 {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    }
}

/// Write a fixed-size event; count it, or count the loss.
#[inline(always)]
pub fn emit<T: 'static>(event: T) {
    match EVENTS.reserve::<T>(0) {
        Some(mut entry) => {
            entry.write(event);
            entry.submit(ringbuf_flags());
            count(Counter::OtherEvents, 1);
        }
        None => count(Counter::RingbufFull, 1),
    }
}
