//! Loading and attaching the kernel programs, and reading what they report.

pub mod btf;
mod cookies;
pub mod environment;
pub mod propagation;

use agent_common::{KernelStats, MAX_CAPTURE};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf, SockHash},
    programs::{
        BtfTracePoint, FExit, KProbe, TracePoint, UProbe,
        uprobe::{UProbeAttachLocation, UProbeLink, UProbeScope},
    },
};
use thiserror::Error;

use crate::stats::Metric;

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
    #[error("this agent's kernel programs support x86_64 and aarch64 (found {0})")]
    UnsupportedArch(&'static str),
    #[error("{0}")]
    Unsupported(String),
}

/// Which hooks capture socket data (see `DataHook`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SocketHooks {
    /// The best this kernel offers.
    Auto,
    Tracepoints,
    Fexit,
    Kprobes,
}

/// What the caller chose to load.
pub struct LoadOptions {
    pub socket_hooks: SocketHooks,
    pub trace_all: bool,
    pub capture_size: u32,
    /// Trace context in the kernel and `traceparent` injection.
    pub context_propagation: bool,
    pub in_process_linking: bool,
    pub max_trace_age_ns: u64,
    pub max_spans_per_trace: u32,
    /// Head sampling's ratio (`None`: every request traced); only with context propagation.
    pub sample_ratio: Option<f64>,
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
    /// Which hook serves each function, and what a missing hook costs.
    pub hooks: Vec<HookChoice>,
    /// Injection asked for but not possible (attach or canary failed): why. The caller
    /// reloads without it.
    pub propagation_failed: Option<String>,
    /// Injection parks sockets while their answer is read (why: what the canary saw).
    pub parking: Option<String>,
    /// What the start-up canary added to the injection counters (not the user's traffic).
    canary_counts: KernelStats,
    /// The injector is attached and passed its canary.
    injecting: bool,
    /// Why the runtime mechanisms' programs could not be loaded (none then attach).
    pub runtime_programs_failed: Option<String>,
    /// Why the TLS library programs could not be loaded (no TLS plaintext then).
    pub tls_programs_failed: Option<String>,
    /// Head sampling is on in the kernel (asked for, with context propagation, and the
    /// kernel has the socket tracepoints its programs need).
    pub sampling: bool,
}

/// The uprobe programs of the runtime mechanisms (see `runtimes`): loaded at start, attached
/// to a program file when a selected process runs it.
const RUNTIME_UPROBES: &[&str] = &[
    "agent_nginx_upstream_write",
    "agent_nginx_upstream_write_done",
    "agent_go_fd_read",
    "agent_go_serve",
    "agent_go_round_trip",
    "agent_go_request_write",
    "agent_go_fd_write",
    "agent_go_exit",
    "agent_go_spawn",
    "agent_go_spawned",
];

/// The uprobe programs for TLS libraries (see `tls`): loaded at start, attached to a library
/// file when a selected process maps it.
const TLS_UPROBES: &[&str] = &[
    "agent_ssl_read",
    "agent_ssl_read_ex",
    "agent_ssl_write",
    "agent_ssl_write_ex",
    "agent_ssl_read_ret",
    "agent_ssl_write_ret",
    "agent_ssl_new_ret",
    "agent_ssl_learn",
    "agent_ssl_learn_ret",
    "agent_node_wrap_enter",
    "agent_node_enc_out_enter",
    "agent_node_wrap_leave",
    "agent_loader_state",
    "agent_go_tls_read",
    "agent_go_tls_write",
    "agent_go_tls_read_ret",
];

const TP_BTF: &[(&str, &str)] = &[
    ("agent_sock_state", "inet_sock_set_state"),
    ("agent_process_fork", "sched_process_fork"),
];

/// One direction of socket data and its possible hooks, best first: the `sock_*_length`
/// tracepoint (Linux >= 6.3); else fexit on the address families' socket functions that
/// tracepoint's caller calls (same arguments, same point in the call; needs BPF trampolines
/// for kernel functions: x86_64 since 5.5, arm64 since 6.4); else kprobes on the same
/// functions (an entry program remembers the socket, a return program sees the result).
struct DataHook {
    function: &'static str,
    tracepoint: (&'static str, &'static str),
    /// The tracepoint's program with head sampling.
    sampled: &'static str,
    fexit: [(&'static str, &'static str); 2],
    kprobe: Kprobes,
    /// `sendfile` reaches this direction through `inet_sendpage` where the kernel has it.
    sendpage: bool,
}

/// The kprobe fallback of one direction: an entry kprobe on the functions, a tracepoint
/// program on the exits of the syscalls that call them.
struct Kprobes {
    entry: &'static str,
    exit: &'static str,
    syscalls: &'static [&'static str],
}

const DATA_HOOKS: [DataHook; 2] = [
    DataHook {
        function: "socket reads",
        tracepoint: ("agent_sock_recv", "sock_recv_length"),
        sampled: "agent_sock_recv_sampled",
        fexit: [
            ("agent_inet_recvmsg", "inet_recvmsg"),
            ("agent_inet6_recvmsg", "inet6_recvmsg"),
        ],
        kprobe: Kprobes {
            entry: "agent_recv_entry",
            exit: "agent_recv_exit",
            syscalls: &["read", "readv", "recvfrom", "recvmsg"],
        },
        sendpage: false,
    },
    DataHook {
        function: "socket writes",
        tracepoint: ("agent_sock_send", "sock_send_length"),
        sampled: "agent_sock_send_sampled",
        fexit: [
            ("agent_inet_sendmsg", "inet_sendmsg"),
            ("agent_inet6_sendmsg", "inet6_sendmsg"),
        ],
        kprobe: Kprobes {
            entry: "agent_send_entry",
            exit: "agent_send_exit",
            syscalls: &["write", "writev", "sendto", "sendmsg", "sendfile64"],
        },
        sendpage: true,
    },
];

/// `sendfile` on kernels that still have `sendpage` (before 6.5) reaches TCP sockets through
/// this function, around `sendmsg` and its tracepoint (fexit, else the writes' kprobes).
const SENDPAGE_FEXIT: (&str, &str) = ("agent_inet_sendpage", "inet_sendpage");

/// Which hook serves one of the agent's functions on this kernel (the start-up report).
pub struct HookChoice {
    pub function: &'static str,
    pub hook: String,
    /// What this kernel costs in precision, and why.
    pub degraded: Option<String>,
}

/// Optional: stamps writes as their chunks are queued (see `agent_tcp_sendmsg`); without it,
/// writes are stamped when the syscall returns.
const WRITE_STAMP_TP_BTF: (&str, &str) = ("agent_tcp_sendmsg", "tcp_sendmsg_locked");

const TRACEPOINTS: &[(&str, &str, &str)] = &[
    ("agent_exit_accept4", "syscalls", "sys_exit_accept4"),
    ("agent_exit_accept", "syscalls", "sys_exit_accept"),
    ("agent_process_exec", "sched", "sched_process_exec"),
    ("agent_process_exit", "sched", "sched_process_exit"),
];

/// Loads and attaches one `fexit` program.
fn attach_fexit(
    ebpf: &mut Ebpf,
    btf: &aya::Btf,
    name: &'static str,
    function: &str,
) -> Result<Attached, KernelError> {
    let prog: &mut FExit = ebpf
        .program_mut(name)
        .ok_or(KernelError::MissingProgram { name })?
        .try_into()
        .map_err(|source| program_error(name, "is not an fexit program", source))?;
    prog.load(function, btf)
        .map_err(|source| program_error(name, &format!("loading fexit/{function}"), source))?;
    prog.attach()
        .map_err(|source| program_error(name, &format!("attaching fexit/{function}"), source))?;
    Ok(Attached {
        program: name,
        hook: format!("fexit/{function}"),
    })
}

/// A random u32 below this samples a request: 2^32 samples all.
const SAMPLE_ALL: u64 = 1 << 32;

/// The kernel's threshold for a sample ratio (0..=1).
pub fn sample_threshold(ratio: f64) -> u64 {
    (ratio.clamp(0.0, 1.0) * SAMPLE_ALL as f64).round() as u64
}

/// What loading asks of the kernel's BTF beyond the offsets (read with our own reader).
struct BtfFacts {
    /// `struct socket`'s `sk` offset.
    socket_sk: u32,
    has_sendpage: bool,
    /// The BTF tracepoints a hook may use, each with whether this kernel has it.
    tracepoints: Vec<(&'static str, bool)>,
}

impl BtfFacts {
    fn read(btf: &btf::Btf) -> Result<Self, KernelError> {
        let tracepoints = DATA_HOOKS
            .iter()
            .map(|hook| hook.tracepoint.1)
            .chain([WRITE_STAMP_TP_BTF.1])
            .map(|tp| (tp, btf.has_tracepoint(tp)))
            .collect();
        Ok(Self {
            socket_sk: btf.member_offset("socket", "sk")?,
            has_sendpage: btf.has_function(SENDPAGE_FEXIT.1),
            tracepoints,
        })
    }

    fn has_tracepoint(&self, tp: &str) -> bool {
        self.tracepoints.iter().any(|&(t, have)| t == tp && have)
    }
}

/// Attaches the socket data programs, per direction the best hook this kernel offers (see
/// `DataHook`); chosen by what the kernel's BTF offers and what attaches, not by its version.
fn attach_data_hooks(
    choice: SocketHooks,
    sampling: bool,
    ebpf: &mut Ebpf,
    kernel_btf: &aya::Btf,
    facts: &BtfFacts,
    attached: &mut Vec<Attached>,
    hooks: &mut Vec<HookChoice>,
) -> Result<(), KernelError> {
    let sk = facts.socket_sk;
    if sk != agent_common::SOCKET_SK_OFFSET {
        return Err(KernelError::Unsupported(format!(
            "this kernel's struct socket keeps sk at byte {sk}, not {} as the kernel programs \
             read it",
            agent_common::SOCKET_SK_OFFSET
        )));
    }
    let kernel_has_sendpage = facts.has_sendpage;
    let mut kprobes = false;
    for hook in &DATA_HOOKS {
        let sendpage = kernel_has_sendpage && hook.sendpage;
        let (name, tp) = if sampling {
            (hook.sampled, hook.tracepoint.1)
        } else {
            hook.tracepoint
        };
        let have_tp = facts.has_tracepoint(tp);
        if choice == SocketHooks::Tracepoints && !have_tp {
            return Err(KernelError::Unsupported(format!(
                "--socket-hooks tracepoints: this kernel has no {tp} tracepoint (Linux >= 6.3); \
                 use --socket-hooks auto"
            )));
        }
        if have_tp && matches!(choice, SocketHooks::Auto | SocketHooks::Tracepoints) {
            let a = attach_tp_btf(ebpf, kernel_btf, name, tp)?;
            hooks.push(HookChoice {
                function: hook.function,
                hook: a.hook.clone(),
                degraded: None,
            });
            attached.push(a);
            if sendpage {
                // Linux 6.3 and 6.4: the tracepoint, and sendfile still around it.
                let (name, function) = SENDPAGE_FEXIT;
                let choice = match attach_fexit(ebpf, kernel_btf, name, function) {
                    Ok(a) => {
                        let hook = a.hook.clone();
                        attached.push(a);
                        HookChoice {
                            function: "sendfile writes",
                            hook,
                            degraded: None,
                        }
                    }
                    Err(e) => HookChoice {
                        function: "sendfile writes",
                        hook: "none".into(),
                        degraded: Some(format!(
                            "{e}: bytes sent with sendfile are not seen, so a response sent \
                             that way never completes its span"
                        )),
                    },
                };
                hooks.push(choice);
            }
            continue;
        }
        let no_tp = if have_tp {
            "chosen by --socket-hooks".to_owned()
        } else {
            format!("no {tp} tracepoint on this kernel")
        };
        let mut fexits = hook.fexit.to_vec();
        if sendpage {
            fexits.push(SENDPAGE_FEXIT);
        }
        let fexit = if choice == SocketHooks::Kprobes {
            Err(KernelError::Unsupported("--socket-hooks kprobes".into()))
        } else {
            attach_all_fexit(ebpf, kernel_btf, &fexits)
        };
        let fexit_failed = match fexit {
            Ok(mut done) => {
                // The same arguments at the same point: nothing lost but the trampoline's cost.
                hooks.push(HookChoice {
                    function: hook.function,
                    hook: format!(
                        "{} ({no_tp})",
                        done.iter()
                            .map(|a| a.hook.as_str())
                            .collect::<Vec<_>>()
                            .join(" + ")
                    ),
                    degraded: None,
                });
                attached.append(&mut done);
                continue;
            }
            Err(e) if choice == SocketHooks::Fexit => {
                return Err(KernelError::Unsupported(format!(
                    "--socket-hooks fexit: {e}; use --socket-hooks auto"
                )));
            }
            Err(e) => e,
        };
        let mut functions: Vec<&str> = hook.fexit.iter().map(|&(_, f)| f).collect();
        if sendpage {
            functions.push(SENDPAGE_FEXIT.1);
        }
        let mut done = attach_kprobes(ebpf, &hook.kprobe, &functions).map_err(|e| {
            KernelError::Unsupported(format!(
                "{}: this kernel has no {tp} tracepoint (Linux >= 6.3), fexit failed \
                 ({fexit_failed}) and kprobes failed: {e}\n  hint: the kernel needs \
                 CONFIG_KPROBES=y, or BPF trampolines for its functions",
                hook.function
            ))
        })?;
        kprobes = true;
        hooks.push(HookChoice {
            function: hook.function,
            hook: format!(
                "kprobes on {}, results at the exit of {} ({no_tp}; no fexit: {fexit_failed})",
                functions.join(", "),
                hook.kprobe.syscalls.join(", ")
            ),
            degraded: Some(
                "socket calls made outside these syscalls (io_uring, recvmmsg/sendmmsg) are not \
                 captured (counted: kernel_kprobe_calls_unfinished)"
                    .into(),
            ),
        });
        attached.append(&mut done);
    }
    if kprobes {
        hooks.push(cookies::make_cookies(ebpf)?);
    }
    Ok(())
}

/// Attaches every fexit program of `programs`, or none (the ones already attached are
/// unloaded again when one fails).
fn attach_all_fexit(
    ebpf: &mut Ebpf,
    kernel_btf: &aya::Btf,
    programs: &[(&'static str, &'static str)],
) -> Result<Vec<Attached>, KernelError> {
    let mut done = Vec::new();
    for &(name, function) in programs {
        match attach_fexit(ebpf, kernel_btf, name, function) {
            Ok(a) => done.push(a),
            Err(e) => {
                for a in &done {
                    let prog: Option<&mut FExit> =
                        ebpf.program_mut(a.program).and_then(|p| p.try_into().ok());
                    if let Some(prog) = prog {
                        let _ = prog.unload();
                    }
                }
                return Err(e);
            }
        }
    }
    Ok(done)
}

/// Loads the kprobe fallback of one direction: its entry program on each function, its exit
/// program on each syscall's exit tracepoint.
fn attach_kprobes(
    ebpf: &mut Ebpf,
    kprobes: &Kprobes,
    functions: &[&str],
) -> Result<Vec<Attached>, KernelError> {
    let mut done = Vec::new();
    let name = kprobes.entry;
    let prog: &mut KProbe = ebpf
        .program_mut(name)
        .ok_or(KernelError::MissingProgram { name })?
        .try_into()
        .map_err(|source| program_error(name, "is not a kprobe program", source))?;
    prog.load()
        .map_err(|source| program_error(name, "loading", source))?;
    for function in functions {
        prog.attach(function, 0)
            .map_err(|source| program_error(name, &format!("attaching to {function}"), source))?;
        done.push(Attached {
            program: name,
            hook: format!("kprobe/{function}"),
        });
    }
    let name = kprobes.exit;
    let prog: &mut TracePoint = ebpf
        .program_mut(name)
        .ok_or(KernelError::MissingProgram { name })?
        .try_into()
        .map_err(|source| program_error(name, "is not a tracepoint program", source))?;
    prog.load()
        .map_err(|source| program_error(name, "loading", source))?;
    for syscall in kprobes.syscalls {
        let tp = format!("sys_exit_{syscall}");
        prog.attach("syscalls", &tp).map_err(|source| {
            program_error(name, &format!("attaching tracepoint syscalls/{tp}"), source)
        })?;
        done.push(Attached {
            program: name,
            hook: format!("tracepoint/syscalls/{tp}"),
        });
    }
    Ok(done)
}

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
        if !cfg!(any(target_arch = "x86_64", target_arch = "aarch64")) {
            return Err(KernelError::UnsupportedArch(std::env::consts::ARCH));
        }
        let btf = btf::Btf::from_sys_fs()?;
        let offsets = btf.kernel_offsets()?;
        let facts = BtfFacts::read(&btf)?;
        // Gone before aya parses its own copy: with both at once (ours 18 MiB, aya's 20 MiB
        // on this 6.18 kernel) start-up was the agent's peak, VmHWM 64 MiB for 36 when ready.
        drop(btf);
        let trace_all: u32 = opts.trace_all.into();
        let agent_pid = std::process::id();
        let capture = clamp_capture(opts.capture_size);
        let propagation: u32 = opts.context_propagation.into();
        let linking: u32 = opts.in_process_linking.into();
        // Sampling travels in the injected header: without propagation there is none. Its
        // data programs are the tracepoints' (see `agent_sock_recv_sampled`).
        let sampling_hooks = matches!(
            opts.socket_hooks,
            SocketHooks::Auto | SocketHooks::Tracepoints
        ) && DATA_HOOKS
            .iter()
            .all(|hook| facts.has_tracepoint(hook.tracepoint.1));
        let sample_threshold = opts
            .sample_ratio
            .filter(|_| opts.context_propagation && sampling_hooks)
            .map(sample_threshold);
        let sampling: u32 = sample_threshold.is_some().into();
        let sample_threshold = sample_threshold.unwrap_or(SAMPLE_ALL);
        // Parsed once, for the loader's relocations and the attachments.
        let kernel_btf = aya::Btf::from_sys_fs()?;
        let mut ebpf = EbpfLoader::new()
            .btf(&kernel_btf)
            .override_global("TRACE_ALL", &trace_all, true)
            .override_global("AGENT_PID", &agent_pid, true)
            .override_global("CAPTURE_SIZE", &capture, true)
            .override_global("OFFSETS", &offsets, true)
            .override_global("CONTEXT_PROPAGATION", &propagation, true)
            .override_global("IN_PROCESS_LINKING", &linking, true)
            .override_global("MAX_TRACE_AGE_NS", &opts.max_trace_age_ns, true)
            .override_global("MAX_CHILDREN", &opts.max_spans_per_trace, true)
            .override_global("SAMPLING", &sampling, true)
            .override_global("SAMPLE_THRESHOLD", &sample_threshold, true)
            .load(aya::include_bytes_aligned!(concat!(
                env!("OUT_DIR"),
                "/agent"
            )))?;

        let mut attached = Vec::new();
        let mut hooks = Vec::new();
        attach_data_hooks(
            opts.socket_hooks,
            sampling == 1,
            &mut ebpf,
            &kernel_btf,
            &facts,
            &mut attached,
            &mut hooks,
        )?;
        for &(name, tp) in TP_BTF {
            attached.push(attach_tp_btf(&mut ebpf, &kernel_btf, name, tp)?);
        }
        let (name, tp) = WRITE_STAMP_TP_BTF;
        let stamps_at_return = |why: String| HookChoice {
            function: "write stamps",
            hook: "at the write's return".into(),
            degraded: Some(format!(
                "{why}: a sender held up between queueing its last bytes and returning ends \
                 its span late"
            )),
        };
        if !facts.has_tracepoint(tp) {
            hooks.push(stamps_at_return(format!(
                "no {tp} tracepoint on this kernel"
            )));
        } else {
            match attach_tp_btf(&mut ebpf, &kernel_btf, name, tp) {
                Ok(a) => {
                    hooks.push(HookChoice {
                        function: "write stamps",
                        hook: a.hook.clone(),
                        degraded: None,
                    });
                    attached.push(a);
                }
                Err(e) => hooks.push(stamps_at_return(e.to_string())),
            }
        }
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
        let runtime_programs_failed = RUNTIME_UPROBES
            .iter()
            .find_map(|&name| load_uprobe(&mut ebpf, name).err())
            .map(|e| e.to_string());
        let tls_programs_failed = TLS_UPROBES
            .iter()
            .find_map(|&name| load_uprobe(&mut ebpf, name).err())
            .map(|e| e.to_string());
        Ok(Self {
            ebpf,
            attached,
            hooks,
            propagation_failed,
            parking,
            canary_counts,
            injecting,
            runtime_programs_failed,
            tls_programs_failed,
            sampling: sampling == 1,
        })
    }

    /// Writes are stamped when they return: no hook stamps them as they are queued.
    pub fn writes_stamped_at_return(&self) -> bool {
        self.hooks
            .iter()
            .any(|h| h.function == "write stamps" && h.degraded.is_some())
    }

    /// Attaches a loaded runtime uprobe at `at` in the program file `target`, for process
    /// `pid` only (its breakpoint is not even placed in other processes running the file) or,
    /// with `None`, for every process that runs it; dropping the link detaches it.
    pub fn attach_uprobe(
        &mut self,
        name: &'static str,
        target: &std::path::Path,
        at: UprobeAt<'_>,
        pid: Option<std::num::NonZeroU32>,
    ) -> Result<UprobeAttachment, KernelError> {
        let prog = uprobe_program(&mut self.ebpf, name)?;
        let (location, symbol) = match at {
            UprobeAt::Symbol(s) => (UProbeAttachLocation::Symbol(s), s),
            UprobeAt::FileOffset { offset, function } => {
                (UProbeAttachLocation::AbsoluteOffset(offset), function)
            }
        };
        let what = || format!("attaching to {symbol} in {}", target.display());
        let id = prog
            .attach(
                [location],
                target,
                pid.map_or(UProbeScope::AllProcesses, UProbeScope::OneProcess),
            )
            .map_err(|source| program_error(name, &what(), source))?;
        prog.take_link(id)
            .map(|link| UprobeAttachment { link: Some(link) })
            .map_err(|source| program_error(name, &what(), source))
    }

    /// Tells the socket programs which TLS probes are attached (`TLS_ATTACHED_*` bits, added to
    /// those set before; until then they skip looking for library calls).
    pub fn enable_tls_lookups(&mut self, bits: u32) -> Result<(), KernelError> {
        let name = "TLS_ATTACHED";
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(KernelError::MissingMap(name))?;
        let mut array =
            Array::<_, u32>::try_from(map).map_err(|source| KernelError::Map { name, source })?;
        let now = array.get(&0, 0).unwrap_or(0);
        array
            .set(0, &(now | bits), 0)
            .map_err(|source| KernelError::Map { name, source })
    }

    /// The map of processes served by runtime probes (taken once, by the runtimes).
    pub fn take_runtime_pids(&mut self) -> Result<RuntimePids, KernelError> {
        let map = self
            .ebpf
            .take_map("RUNTIME_PIDS")
            .ok_or(KernelError::MissingMap("RUNTIME_PIDS"))?;
        HashMap::try_from(map)
            .map(RuntimePids)
            .map_err(|source| KernelError::Map {
                name: "RUNTIME_PIDS",
                source,
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

/// Where a runtime uprobe goes in a program file.
pub enum UprobeAt<'a> {
    /// At a symbol of its ELF symbol tables.
    Symbol(&'a str),
    /// At a file offset the caller found (`function`: its name, for messages).
    FileOffset { offset: u64, function: &'a str },
}

/// A uprobe attached to a program file: dropping it detaches the probe, on a thread of its
/// own. Detaching waits for the kernel's grace periods (measured: 6.5 s for 90 probes, the
/// OpenSSL probes of six processes), and the event thread must not stall meanwhile (parked
/// sockets would miss their rejoin, and requests their header).
pub struct UprobeAttachment {
    link: Option<UProbeLink>,
}

impl Drop for UprobeAttachment {
    fn drop(&mut self) {
        if let Some(link) = self.link.take() {
            detach_later(link);
        }
    }
}

fn detach_later(link: UProbeLink) {
    static DETACHER: std::sync::OnceLock<Option<std::sync::mpsc::Sender<UProbeLink>>> =
        std::sync::OnceLock::new();
    let tx = DETACHER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<UProbeLink>();
        std::thread::Builder::new()
            .name("detach".into())
            .spawn(move || rx.into_iter().for_each(drop))
            .ok()
            .map(|_| tx)
    });
    // Without the thread (or once it is gone), here: slow, but detached all the same.
    if let Some(tx) = tx {
        let _ = tx.send(link);
    }
}

/// `RUNTIME_PIDS`: the processes a runtime mechanism's probes serve, with its flags.
pub struct RuntimePids(HashMap<MapData, u32, u32>);

impl RuntimePids {
    pub fn mark(&mut self, pid: u32, flags: u32) -> Result<(), KernelError> {
        self.0
            .insert(&pid, &flags, 0)
            .map_err(|source| KernelError::Map {
                name: "RUNTIME_PIDS",
                source,
            })
    }

    /// The kernel removes an exiting process itself; this is for a process no longer served.
    pub fn unmark(&mut self, pid: u32) {
        let _ = self.0.remove(&pid);
    }
}

fn uprobe_program<'e>(
    ebpf: &'e mut Ebpf,
    name: &'static str,
) -> Result<&'e mut UProbe, KernelError> {
    ebpf.program_mut(name)
        .ok_or(KernelError::MissingProgram { name })?
        .try_into()
        .map_err(|source| program_error(name, "is not a uprobe program", source))
}

fn load_uprobe(ebpf: &mut Ebpf, name: &'static str) -> Result<(), KernelError> {
    uprobe_program(ebpf, name)?
        .load()
        .map_err(|source| program_error(name, "loading", source))
}

fn program_error(name: &str, what: &str, source: aya::programs::ProgramError) -> KernelError {
    let text = source.to_string();
    let hint = if text.contains("EPERM") || text.contains("Operation not permitted") {
        "\n  hint: run as root; the kernel may also be in lockdown mode"
    } else if text.contains("tracefs") || text.contains("No such file") {
        "\n  hint: tracefs must be mounted at /sys/kernel/tracing (the agent mounts it when it can)"
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
            add(&mut sum, c);
        }
    }
    sum
}

/// Adds one CPU's counters to `sum`.
fn add(sum: &mut KernelStats, c: &KernelStats) {
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
    sum.sockets_without_cookie += c.sockets_without_cookie;
    sum.kprobe_calls_unfinished += c.kprobe_calls_unfinished;
    sum.tls_plaintext += c.tls_plaintext;
    sum.tls_unassociated += c.tls_unassociated;
    sum.go_tls_unassociated += c.go_tls_unassociated;
    sum.sockets_parked += c.sockets_parked;
    sum.requests_sent_parked += c.requests_sent_parked;
    sum.traceparent_invalid_rewritten += c.traceparent_invalid_rewritten;
    sum.traceparent_invalid_kept += c.traceparent_invalid_kept;
    sum.link_forwarded_trace += c.link_forwarded_trace;
    sum.link_request_line += c.link_request_line;
    sum.link_match_ambiguous += c.link_match_ambiguous;
    sum.link_handoff += c.link_handoff;
    sum.handoff_not_in_flight += c.handoff_not_in_flight;
    sum.handoff_unreadable += c.handoff_unreadable;
    sum.go_serves_known += c.go_serves_known;
    sum.go_serves_unknown += c.go_serves_unknown;
    sum.go_split_starts += c.go_split_starts;
    sum.go_calls_owned += c.go_calls_owned;
    sum.go_calls_unowned += c.go_calls_unowned;
    sum.go_spawns_followed += c.go_spawns_followed;
    sum.go_calls_spawned += c.go_calls_spawned;
    sum.go_writes_handed_off += c.go_writes_handed_off;
    sum.requests_unsampled += c.requests_unsampled;
    sum.calls_unsampled += c.calls_unsampled;
}

impl KernelCounters {
    pub fn snapshot(&self) -> Vec<Metric> {
        metrics(&self.read())
    }
}

/// The kernel's counters under their summary names; the help texts are the doc comments of
/// `KernelStats` (agent-common), which a test keeps equal.
fn metrics(s: &KernelStats) -> Vec<Metric> {
    vec![
        Metric::counter(
            "kernel_data_events",
            "Data events written to the ring buffer.",
            s.data_events,
        ),
        Metric::counter(
            "kernel_lifecycle_events",
            "Lifecycle and process events written.",
            s.other_events,
        ),
        Metric::counter(
            "kernel_bytes",
            "Bytes moved on traced sockets (sum of `bytes` of the data events written).",
            s.bytes,
        ),
        Metric::counter(
            "kernel_lost_ringbuf_full",
            "Events lost because the ring buffer was full.",
            s.ringbuf_full,
        ),
        Metric::counter(
            "kernel_payload_truncated",
            "Data events whose payload was cut to the capture size (normal for bodies; reported).",
            s.truncated,
        ),
        Metric::counter(
            "kernel_payload_copy_failed",
            "User buffers that could not be read.",
            s.copy_failed,
        ),
        Metric::counter(
            "kernel_socket_map_full",
            "The tracked-socket map was full (closes of those sockets are not reported).",
            s.socket_map_full,
        ),
        Metric::counter(
            "kernel_server_contexts",
            "Server requests given a trace context in the kernel.",
            s.server_contexts,
        ),
        Metric::counter(
            "sockets_enrolled",
            "Client sockets enrolled for header injection (connected by a selected process).",
            s.sockets_enrolled,
        ),
        Metric::counter(
            "sockets_enroll_failed",
            "Sockets that could not be enrolled (a map was full).",
            s.enroll_failed,
        ),
        Metric::counter(
            "traceparent_injected",
            "`traceparent` headers inserted into outgoing requests.",
            s.traceparent_injected,
        ),
        Metric::counter(
            "traceparent_rewritten",
            "Outgoing requests that carried a `traceparent`: its parent id was rewritten in place.",
            s.traceparent_rewritten,
        ),
        Metric::counter(
            "inject_skipped",
            "Outgoing requests left untouched: not HTTP, header block split over writes or \
             larger than the window, several `traceparent` headers, or the socket's framing \
             was lost earlier.",
            s.inject_skipped,
        ),
        Metric::counter(
            "inject_failed",
            "Injection attempts the kernel refused (push/pull of message data failed).",
            s.inject_failed,
        ),
        Metric::counter(
            "inject_framing_lost",
            "Connections whose request framing the injector stopped following (chunked body, \
             head not found): later requests on them are not injected.",
            s.inject_framing_lost,
        ),
        Metric::counter(
            "kernel_client_links",
            "Client requests linked in the kernel to the request their thread serves.",
            s.link_kernel,
        ),
        Metric::counter(
            "kernel_link_ambiguous",
            "Client requests sent while the thread's serving request was ambiguous (several in \
             flight) or too old: started a trace of their own.",
            s.link_ambiguous,
        ),
        Metric::counter(
            "kernel_writes_stamped_at_return",
            "TCP writes of traced threads stamped when the syscall returned instead of when \
             their last chunk was queued (the thread changed CPUs mid-write, several threads \
             wrote on the socket at once, or no `tcp_sendmsg_locked`).",
            s.writes_stamped_at_return,
        ),
        Metric::counter(
            "kernel_sockets_without_cookie",
            "Socket I/O the kprobe fallback saw on a socket the kernel had no cookie for yet \
             (opened before the agent, whose start-up could not list it): not traced.",
            s.sockets_without_cookie,
        ),
        Metric::counter(
            "kernel_kprobe_calls_unfinished",
            "Socket calls the kprobe fallback saw start but not end in a socket syscall \
             (io_uring, recvmmsg/sendmmsg): their data was not captured.",
            s.kprobe_calls_unfinished,
        ),
        Metric::counter(
            "kernel_tls_plaintext",
            "TLS library calls (OpenSSL `SSL_read`/`SSL_write`) whose plaintext was captured.",
            s.tls_plaintext,
        ),
        Metric::counter(
            "kernel_tls_unassociated",
            "TLS library calls that moved plaintext for a connection whose socket the kernel \
             could not tell (the library did no socket I/O in the call and none earlier: a memory \
             BIO, as Node.js and Python's asyncio use): not traced.",
            s.tls_unassociated,
        ),
        Metric::counter(
            "kernel_go_tls_unassociated",
            "Go `crypto/tls` calls on a connection whose socket the kernel could not tell (it \
             does not run over a `*net.TCPConn`, or its fd could not be read): not traced.",
            s.go_tls_unassociated,
        ),
        Metric::counter(
            "requests_unsampled",
            "Requests read by a traced server that head sampling left out (`--sample-ratio`, or \
             an incoming `traceparent` not sampled): the kernel sent none of their bytes.",
            s.requests_unsampled,
        ),
        Metric::counter(
            "calls_unsampled",
            "Client requests made for a request left out by sampling: not sampled either (their \
             `traceparent` says so), none of their bytes sent.",
            s.calls_unsampled,
        ),
        Metric::counter(
            "sockets_parked",
            "Enrolled client sockets taken out of the injector's map when their peer answered, \
             so the answer is read exactly as without the agent (see `SEND_FLAG_PARKED`).",
            s.sockets_parked,
        ),
        Metric::counter(
            "requests_sent_parked",
            "Requests written while their socket was out of the injector's map (sent right after \
             an answer, before it rejoined): not injected; their head tells where the next one \
             starts.",
            s.requests_sent_parked,
        ),
        Metric::counter(
            "traceparent_invalid_rewritten",
            "Outgoing `traceparent` headers whose trace id or parent id was all zeros: rewritten \
             in place with valid ids.",
            s.traceparent_invalid_rewritten,
        ),
        Metric::counter(
            "traceparent_invalid_kept",
            "Outgoing `traceparent` headers not in the version-00 form (or not hex): left as \
             they were, the request's span keeps ids of its own.",
            s.traceparent_invalid_kept,
        ),
        Metric::counter(
            "kernel_link_forwarded_trace",
            "Client requests of a thread serving several requests at once, linked to the one \
             in-flight request of the process whose trace id their `traceparent` forwards.",
            s.link_forwarded_trace,
        ),
        Metric::counter(
            "kernel_link_request_line",
            "Client requests of a thread serving several requests at once, linked to the one \
             in-flight request of the process with the same method and target (a proxy \
             forwarding).",
            s.link_request_line,
        ),
        Metric::counter(
            "kernel_link_match_ambiguous",
            "Client requests whose forwarded trace id or request line matched several in-flight \
             requests of the process: not linked.",
            s.link_match_ambiguous,
        ),
        Metric::counter(
            "kernel_link_handoff",
            "Client requests linked to the served request a runtime mechanism named when the \
             runtime wrote them (nginx: the request an upstream request is written for).",
            s.link_handoff,
        ),
        Metric::counter(
            "kernel_handoff_not_in_flight",
            "Client requests a runtime mechanism named a served request for that was no longer \
             in flight, unknown, too old or at its cap of children: not linked.",
            s.handoff_not_in_flight,
        ),
        Metric::counter(
            "kernel_handoff_unreadable",
            "Runtime probes that fired on memory they could not read or that was not what they \
             expected (an nginx request without its signature): no hand-off.",
            s.handoff_unreadable,
        ),
        Metric::counter(
            "kernel_go_serves_known",
            "Go: handlers started (`serverHandler.ServeHTTP`) for a request the kernel read on the \
             goroutine's connection.",
            s.go_serves_known,
        ),
        Metric::counter(
            "kernel_go_serves_unknown",
            "Go: handlers started for a request the kernel does not know (its start was not seen, \
             or not on the goroutine's last read socket): their client requests go unlinked.",
            s.go_serves_unknown,
        ),
        Metric::counter(
            "kernel_go_split_starts",
            "Go: requests whose first byte the connection's background read took alone, opened \
             (given their server context) when their handler started.",
            s.go_split_starts,
        ),
        Metric::counter(
            "kernel_go_calls_owned",
            "Go: client requests started (`persistConn.roundTrip`) by a goroutine serving a \
             request.",
            s.go_calls_owned,
        ),
        Metric::counter(
            "kernel_go_calls_unowned",
            "Go: client requests started by a goroutine that works for no request in flight (a \
             background goroutine, one whose request was answered or not seen, or one created \
             while its creator's was not in flight): written unlinked.",
            s.go_calls_unowned,
        ),
        Metric::counter(
            "kernel_go_spawns_followed",
            "Go: goroutines created by one working for a request in flight \
             (`runtime.newproc1`): they work for it too.",
            s.go_spawns_followed,
        ),
        Metric::counter(
            "kernel_go_calls_spawned",
            "Go: client requests (of `kernel_go_calls_owned`) started by such a created goroutine.",
            s.go_calls_spawned,
        ),
        Metric::counter(
            "kernel_go_writes_handed_off",
            "Go: socket writes of a Go transport's write goroutine handed off to the served \
             request its client request was started for.",
            s.go_writes_handed_off,
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_thresholds_cover_the_whole_range_of_a_random_u32() {
        // A random u32 r is sampled when r < threshold.
        assert_eq!(sample_threshold(0.0), 0, "ratio 0 samples nothing");
        assert_eq!(sample_threshold(1.0), 1 << 32, "ratio 1 samples every u32");
        assert_eq!(sample_threshold(0.5), 1 << 31);
        assert_eq!(sample_threshold(0.1), 429_496_730);
        // Out of range (the CLI refuses these; the kernel must still get a sane value).
        assert_eq!(sample_threshold(-1.0), 0);
        assert_eq!(sample_threshold(7.0), 1 << 32);
    }

    /// The `u64` fields of `KernelStats`, with their doc comments (joined into one line), read
    /// from agent-common's source: the struct is shared with the kernel programs.
    fn kernel_stats_fields() -> Vec<(String, String)> {
        let source = include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../agent-common/src/lib.rs"
        ));
        let body = source
            .split("pub struct KernelStats {")
            .nth(1)
            .and_then(|rest| rest.split("\n}").next())
            .expect("agent-common defines KernelStats");
        let mut fields = Vec::new();
        let mut doc: Vec<&str> = Vec::new();
        for line in body.lines().map(str::trim) {
            if let Some(text) = line.strip_prefix("///") {
                doc.push(text.trim());
            } else if let Some(field) = line.strip_prefix("pub ") {
                let (name, ty) = field.split_once(':').expect("name: type");
                assert_eq!(ty.trim(), "u64,", "KernelStats.{name} is a u64 counter");
                fields.push((name.to_owned(), doc.join(" ")));
                doc.clear();
            }
        }
        fields
    }

    /// Fills every field of `KernelStats` with a distinct value (field i gets `base + i`):
    /// the struct is `repr(C)` with u64 fields only (the test above checks).
    fn distinct(base: u64) -> KernelStats {
        let mut s = KernelStats::default();
        let n = size_of::<KernelStats>() / size_of::<u64>();
        let words = std::ptr::from_mut(&mut s).cast::<u64>();
        for i in 0..n {
            // SAFETY: KernelStats is repr(C), all u64: n words, each written once in bounds.
            unsafe { words.add(i).write(base + i as u64) };
        }
        s
    }

    #[test]
    fn every_kernel_counter_is_reported_with_its_doc_comment() {
        let fields = kernel_stats_fields();
        assert_eq!(
            fields.len() * size_of::<u64>(),
            size_of::<KernelStats>(),
            "every field of KernelStats was read"
        );
        let reported = metrics(&distinct(1000));
        assert_eq!(
            reported.len(),
            fields.len(),
            "one metric per kernel counter"
        );
        for (i, (field, doc)) in fields.iter().enumerate() {
            let value = 1000 + i as u64;
            let m = reported
                .iter()
                .find(|m| m.value == value)
                .unwrap_or_else(|| panic!("KernelStats.{field} is not reported"));
            let help = m.help.split_whitespace().collect::<Vec<_>>().join(" ");
            assert_eq!(help, *doc, "help of {} (KernelStats.{field})", m.name);
        }
    }

    #[test]
    fn every_kernel_counter_is_summed_over_cpus() {
        let mut sum = distinct(1);
        add(&mut sum, &distinct(1000));
        let fields = kernel_stats_fields();
        let values: Vec<u64> = metrics(&sum).iter().map(|m| m.value).collect();
        for i in 0..fields.len() as u64 {
            let want = (1 + i) + (1000 + i);
            assert!(
                values.contains(&want),
                "field {} not summed",
                fields[i as usize].0
            );
        }
    }
}
