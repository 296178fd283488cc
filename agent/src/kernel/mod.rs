//! Loading and attaching the kernel programs, and reading what they report.

pub mod btf;
pub mod environment;
pub mod propagation;

use agent_common::{KernelStats, MAX_CAPTURE};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray, RingBuf, SockHash},
    programs::{BtfTracePoint, TracePoint},
};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum KernelError {
    #[error(transparent)]
    Btf(#[from] btf::BtfError),
    #[error("cannot read the kernel's BTF for tp_btf programs: {0}")]
    AyaBtf(#[from] aya::BtfError),
    #[error(
        "the kernel refused to load the eBPF object: {0}\n  hint: run as root (or with CAP_BPF, CAP_PERFMON and CAP_SYS_RESOURCE)"
    )]
    Load(#[from] aya::EbpfError),
    #[error("program {name} is missing from the eBPF object (build mismatch): rebuild the agent")]
    MissingProgram { name: &'static str },
    #[error("map {0} is missing from the eBPF object (build mismatch): rebuild the agent")]
    MissingMap(&'static str),
    #[error("{what}: {source}{hint}")]
    Program {
        what: String,
        source: aya::programs::ProgramError,
        hint: &'static str,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("this agent's kernel programs support x86_64 only (found {0})")]
    UnsupportedArch(&'static str),
}

/// What the caller chose to load.
pub struct LoadOptions {
    pub trace_all: bool,
    pub capture_size: u32,
    /// Trace context in the kernel and `traceparent` injection.
    pub context_propagation: bool,
    pub in_process_linking: bool,
    pub max_trace_age_ns: u64,
    pub max_spans_per_trace: u32,
}

/// One attached program, for the start-up report.
pub struct Attached {
    pub program: &'static str,
    pub hook: String,
}

/// The loaded object: keeps programs attached for as long as it lives (dropping it detaches).
pub struct Probes {
    ebpf: Ebpf,
    pub attached: Vec<Attached>,
    /// Why writes are stamped at the syscall's return instead of as their chunks are queued.
    pub write_stamps_at_return: Option<String>,
    /// Injection asked for but not possible (attach or canary failed): why. The caller
    /// reloads without it.
    pub propagation_failed: Option<String>,
    /// Injection parks sockets while their answer is read (why: what the canary saw).
    pub parking: Option<String>,
    /// What the start-up canary added to the injection counters (not the user's traffic).
    canary_counts: KernelStats,
    /// The injector is attached and passed its canary.
    injecting: bool,
}

const TP_BTF: &[(&str, &str)] = &[
    ("agent_sock_recv", "sock_recv_length"),
    ("agent_sock_send", "sock_send_length"),
    ("agent_sock_state", "inet_sock_set_state"),
    ("agent_process_fork", "sched_process_fork"),
];

/// Optional: stamps writes as their chunks are queued (see `agent_tcp_sendmsg`); without it,
/// writes are stamped when the syscall returns.
const WRITE_STAMP_TP_BTF: (&str, &str) = ("agent_tcp_sendmsg", "tcp_sendmsg_locked");

const TRACEPOINTS: &[(&str, &str, &str)] = &[
    ("agent_exit_accept4", "syscalls", "sys_exit_accept4"),
    ("agent_exit_accept", "syscalls", "sys_exit_accept"),
    ("agent_process_exec", "sched", "sched_process_exec"),
    ("agent_process_exit", "sched", "sched_process_exit"),
];

/// Loads and attaches one `tp_btf` program.
fn attach_tp_btf(
    ebpf: &mut Ebpf,
    btf: &aya::Btf,
    name: &'static str,
    tp: &str,
) -> Result<Attached, KernelError> {
    let prog: &mut BtfTracePoint = ebpf
        .program_mut(name)
        .ok_or(KernelError::MissingProgram { name })?
        .try_into()
        .map_err(|source| program_error(name, "is not a tp_btf program", source))?;
    prog.load(tp, btf)
        .map_err(|source| program_error(name, &format!("loading tp_btf/{tp}"), source))?;
    prog.attach()
        .map_err(|source| program_error(name, &format!("attaching tp_btf/{tp}"), source))?;
    Ok(Attached {
        program: name,
        hook: format!("tp_btf/{tp}"),
    })
}

/// The smallest capture: a request line and a few headers.
pub const MIN_CAPTURE: u32 = 64;

/// Capture sizes are clamped to what one event can carry.
pub fn clamp_capture(size: u32) -> u32 {
    size.clamp(MIN_CAPTURE, MAX_CAPTURE as u32)
}

impl Probes {
    pub fn load(opts: &LoadOptions) -> Result<Self, KernelError> {
        if !cfg!(target_arch = "x86_64") {
            return Err(KernelError::UnsupportedArch(std::env::consts::ARCH));
        }
        let offsets = btf::Btf::from_sys_fs()?.kernel_offsets()?;
        let trace_all: u32 = opts.trace_all.into();
        let agent_pid = std::process::id();
        let capture = clamp_capture(opts.capture_size);
        let propagation: u32 = opts.context_propagation.into();
        let linking: u32 = opts.in_process_linking.into();
        let mut ebpf = EbpfLoader::new()
            .override_global("TRACE_ALL", &trace_all, true)
            .override_global("AGENT_PID", &agent_pid, true)
            .override_global("CAPTURE_SIZE", &capture, true)
            .override_global("OFFSETS", &offsets, true)
            .override_global("CONTEXT_PROPAGATION", &propagation, true)
            .override_global("IN_PROCESS_LINKING", &linking, true)
            .override_global("MAX_TRACE_AGE_NS", &opts.max_trace_age_ns, true)
            .override_global("MAX_CHILDREN", &opts.max_spans_per_trace, true)
            .load(aya::include_bytes_aligned!(concat!(
                env!("OUT_DIR"),
                "/agent"
            )))?;

        let kernel_btf = aya::Btf::from_sys_fs()?;
        let mut attached = Vec::new();
        for &(name, tp) in TP_BTF {
            attached.push(attach_tp_btf(&mut ebpf, &kernel_btf, name, tp)?);
        }
        let (name, tp) = WRITE_STAMP_TP_BTF;
        let write_stamps_at_return = match attach_tp_btf(&mut ebpf, &kernel_btf, name, tp) {
            Ok(a) => {
                attached.push(a);
                None
            }
            Err(e) => Some(format!(
                "{e}: writes are stamped when they return, so a sender held up in between \
                 ends its span late"
            )),
        };
        for &(name, category, tp) in TRACEPOINTS {
            let prog: &mut TracePoint = ebpf
                .program_mut(name)
                .ok_or(KernelError::MissingProgram { name })?
                .try_into()
                .map_err(|source| program_error(name, "is not a tracepoint program", source))?;
            prog.load().map_err(|source| {
                program_error(name, &format!("loading {category}/{tp}"), source)
            })?;
            prog.attach(category, tp).map_err(|source| {
                program_error(
                    name,
                    &format!("attaching tracepoint {category}/{tp}"),
                    source,
                )
            })?;
            attached.push(Attached {
                program: name,
                hook: format!("tracepoint/{category}/{tp}"),
            });
        }
        let mut propagation_failed = None;
        let mut canary_counts = KernelStats::default();
        let mut parking = None;
        if opts.context_propagation {
            match propagation::start(&mut ebpf) {
                Ok(started) => {
                    attached.extend(started.attached);
                    parking = started.parking;
                    if let Some(map) = ebpf.map("COUNTERS")
                        && let Ok(array) = PerCpuArray::<_, KernelStats>::try_from(map)
                    {
                        canary_counts = sum_cpus(&array);
                    }
                }
                Err(why) => propagation_failed = Some(why),
            }
        }
        let injecting = opts.context_propagation && propagation_failed.is_none();
        Ok(Self {
            ebpf,
            attached,
            write_stamps_at_return,
            propagation_failed,
            parking,
            canary_counts,
            injecting,
        })
    }

    /// The ring buffer all events arrive on (taken once, by the event loop).
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>, KernelError> {
        let map = self
            .ebpf
            .take_map("EVENTS")
            .ok_or(KernelError::MissingMap("EVENTS"))?;
        RingBuf::try_from(map).map_err(|source| KernelError::Map {
            name: "EVENTS",
            source,
        })
    }

    /// The selected-process map (taken once, by the selector).
    pub fn take_selected(&mut self) -> Result<HashMap<MapData, u32, u32>, KernelError> {
        let map = self
            .ebpf
            .take_map("SELECTED")
            .ok_or(KernelError::MissingMap("SELECTED"))?;
        HashMap::try_from(map).map_err(|source| KernelError::Map {
            name: "SELECTED",
            source,
        })
    }

    /// Exact command names the kernel selects at exec (taken once, by the selector).
    pub fn take_selected_comms(&mut self) -> Result<HashMap<MapData, [u8; 16], u32>, KernelError> {
        let map = self
            .ebpf
            .take_map("SELECTED_COMMS")
            .ok_or(KernelError::MissingMap("SELECTED_COMMS"))?;
        HashMap::try_from(map).map_err(|source| KernelError::Map {
            name: "SELECTED_COMMS",
            source,
        })
    }

    /// Userspace's part of the injector (taken once; `None` when injection is off): sockets
    /// found not to speak HTTP leave its map, parked sockets rejoin it.
    pub fn take_injector(&mut self) -> Option<propagation::Injector> {
        if !self.injecting {
            return None;
        }
        let sockets = SockHash::try_from(self.ebpf.take_map("SOCKETS_TO_INJECT")?).ok()?;
        let states = HashMap::try_from(self.ebpf.take_map("SEND_STATES")?).ok()?;
        Some(propagation::Injector::new(sockets, states))
    }

    /// The per-CPU counters (taken once).
    pub fn take_counters(&mut self) -> Result<KernelCounters, KernelError> {
        let map = self
            .ebpf
            .take_map("COUNTERS")
            .ok_or(KernelError::MissingMap("COUNTERS"))?;
        let array = PerCpuArray::try_from(map).map_err(|source| KernelError::Map {
            name: "COUNTERS",
            source,
        })?;
        Ok(KernelCounters {
            array,
            canary_counts: self.canary_counts,
        })
    }
}

fn program_error(name: &str, what: &str, source: aya::programs::ProgramError) -> KernelError {
    let text = source.to_string();
    let hint = if text.contains("EPERM") || text.contains("Operation not permitted") {
        "\n  hint: run as root; the kernel may also be in lockdown mode"
    } else if text.contains("tracefs") || text.contains("No such file") {
        "\n  hint: tracefs must be mounted at /sys/kernel/tracing (the agent mounts it when it can)"
    } else if text.contains("btf_trace_") {
        "\n  hint: this tracepoint needs Linux >= 6.3 with BTF (CONFIG_DEBUG_INFO_BTF=y)"
    } else {
        ""
    };
    KernelError::Program {
        what: format!("{name}: {what}"),
        source,
        hint,
    }
}

/// Sums of the kernel's per-CPU counters.
pub struct KernelCounters {
    array: PerCpuArray<MapData, KernelStats>,
    canary_counts: KernelStats,
}

impl KernelCounters {
    pub fn read(&self) -> KernelStats {
        let mut sum = sum_cpus(&self.array);
        // The injector's counters during the canary are its own exchange's (traced processes
        // rarely open connections in those milliseconds).
        let c = &self.canary_counts;
        sum.sockets_enrolled = sum.sockets_enrolled.saturating_sub(c.sockets_enrolled);
        sum.traceparent_injected = sum
            .traceparent_injected
            .saturating_sub(c.traceparent_injected);
        sum.traceparent_rewritten = sum
            .traceparent_rewritten
            .saturating_sub(c.traceparent_rewritten);
        sum.sockets_parked = sum.sockets_parked.saturating_sub(c.sockets_parked);
        sum
    }
}

fn sum_cpus<T: std::borrow::Borrow<MapData>>(array: &PerCpuArray<T, KernelStats>) -> KernelStats {
    let mut sum = KernelStats::default();
    if let Ok(per_cpu) = array.get(&0, 0) {
        for c in per_cpu.iter() {
            sum.data_events += c.data_events;
            sum.other_events += c.other_events;
            sum.bytes += c.bytes;
            sum.ringbuf_full += c.ringbuf_full;
            sum.truncated += c.truncated;
            sum.copy_failed += c.copy_failed;
            sum.socket_map_full += c.socket_map_full;
            sum.server_contexts += c.server_contexts;
            sum.sockets_enrolled += c.sockets_enrolled;
            sum.enroll_failed += c.enroll_failed;
            sum.traceparent_injected += c.traceparent_injected;
            sum.traceparent_rewritten += c.traceparent_rewritten;
            sum.inject_skipped += c.inject_skipped;
            sum.inject_failed += c.inject_failed;
            sum.inject_framing_lost += c.inject_framing_lost;
            sum.link_ambiguous += c.link_ambiguous;
            sum.link_kernel += c.link_kernel;
            sum.writes_stamped_at_return += c.writes_stamped_at_return;
            sum.sockets_parked += c.sockets_parked;
            sum.requests_sent_parked += c.requests_sent_parked;
            sum.traceparent_invalid_rewritten += c.traceparent_invalid_rewritten;
            sum.traceparent_invalid_kept += c.traceparent_invalid_kept;
        }
    }
    sum
}

impl KernelCounters {
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let s = self.read();
        vec![
            ("kernel_data_events", s.data_events),
            ("kernel_lifecycle_events", s.other_events),
            ("kernel_bytes", s.bytes),
            ("kernel_lost_ringbuf_full", s.ringbuf_full),
            ("kernel_payload_truncated", s.truncated),
            ("kernel_payload_copy_failed", s.copy_failed),
            ("kernel_socket_map_full", s.socket_map_full),
            ("kernel_server_contexts", s.server_contexts),
            ("sockets_enrolled", s.sockets_enrolled),
            ("sockets_enroll_failed", s.enroll_failed),
            ("traceparent_injected", s.traceparent_injected),
            ("traceparent_rewritten", s.traceparent_rewritten),
            ("inject_skipped", s.inject_skipped),
            ("inject_failed", s.inject_failed),
            ("inject_framing_lost", s.inject_framing_lost),
            ("kernel_client_links", s.link_kernel),
            ("kernel_link_ambiguous", s.link_ambiguous),
            (
                "kernel_writes_stamped_at_return",
                s.writes_stamped_at_return,
            ),
            ("sockets_parked", s.sockets_parked),
            ("requests_sent_parked", s.requests_sent_parked),
            (
                "traceparent_invalid_rewritten",
                s.traceparent_invalid_rewritten,
            ),
            ("traceparent_invalid_kept", s.traceparent_invalid_kept),
        ]
    }
}
