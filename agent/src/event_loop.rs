//! The event thread: drains the ring buffer, runs the pipeline, keeps the selection current.

use std::{
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};

use crate::{
    events,
    export::ExportHandle,
    kernel::{
        KernelCounters, Probes,
        propagation::{Injector, Rejoin},
    },
    metrics::{self, AgentState, Metric},
    pipeline::{Pipeline, ProcessChange, RejoinOutcome},
    resources::Resources,
    runtimes::Runtimes,
    selection::Selector,
    spans::context::Clock,
    stats::Stats,
    tls::TlsLibraries,
};

pub struct LoopConfig {
    pub events: RingBuf<MapData>,
    /// The kernel programs: held until the loop ends (dropping them detaches them), and used
    /// to attach runtime probes as processes are selected.
    pub probes: Probes,
    pub runtimes: Runtimes,
    /// TLS libraries of traced processes (`None`: `--tls off`, or its programs did not load).
    pub tls: Option<TlsLibraries>,
    pub counters: Arc<KernelCounters>,
    pub selector: Selector,
    pub resources: Resources,
    pub stats: Arc<Stats>,
    pub stop: Arc<AtomicBool>,
    pub stats_interval: Duration,
    /// `--verbose`: zero counters too in the `--stats-interval` lines.
    pub verbose: bool,
    /// Heartbeat and gauges for /healthz and /metrics.
    pub state: Arc<AgentState>,
    /// Ports whose traffic is not traced (the OTLP endpoint's).
    pub ignored_ports: Vec<u16>,
    pub raw_db_query: bool,
    pub correlation: Correlation,
    /// Userspace's part of the header injector, when injection is on.
    pub injector: Option<Injector>,
}

/// Trace correlation switches and bounds (from the command line).
pub struct Correlation {
    pub in_process_linking: bool,
    pub same_host_pairing: bool,
    /// The kernel stamps writes when they return (no `tcp_sendmsg_locked` hook).
    pub write_ends_at_return: bool,
    pub max_trace_age_ns: u64,
    pub max_spans_per_trace: u32,
}

/// Kernel events are written without wake-ups; we poll at this period (the kernel forces a
/// wake-up when the buffer fills faster).
const POLL_PERIOD_MS: i32 = 10;
const TICK: Duration = Duration::from_millis(100);
const RESCAN: Duration = Duration::from_secs(2);
/// Tracing every process, their mapped files are rescanned for TLS libraries at this period.
const RESCAN_ALL: Duration = Duration::from_secs(10);

/// Records read between two heartbeats while the ring buffer keeps the thread busy.
const BEAT_EVERY: u64 = 1024;

/// Runs until `stop` is set; returns the exporter handle (for flushing) and the final kernel
/// counters.
pub fn run(cfg: LoopConfig, exporter: ExportHandle) -> (ExportHandle, Vec<Metric>) {
    let LoopConfig {
        mut events,
        mut probes,
        mut runtimes,
        mut tls,
        counters,
        mut selector,
        resources,
        stats,
        stop,
        stats_interval,
        verbose,
        state,
        ignored_ports,
        raw_db_query,
        correlation,
        mut injector,
    } = cfg;
    let mut pipeline = Pipeline::new(resources, stats.clone(), exporter);
    for port in ignored_ports {
        pipeline.ignore_port(port);
    }
    pipeline.record_raw_db_query(raw_db_query);
    pipeline.pair_same_host(
        correlation.same_host_pairing,
        correlation.write_ends_at_return,
    );
    pipeline.link_in_process(
        correlation.in_process_linking,
        correlation.max_trace_age_ns,
        correlation.max_spans_per_trace,
    );
    sync_threads(&mut runtimes, &mut pipeline);
    let (mut last_tick, mut last_scan, mut last_stats) =
        (Instant::now(), Instant::now(), Instant::now());
    let mut last_tls_scan = Instant::now();
    let fd = events.as_raw_fd();
    let mut records = 0u64;
    loop {
        state.beat();
        let stopping = stop.load(Ordering::SeqCst);
        while let Some(record) = events.next() {
            Stats::add(&stats.events_read, 1);
            records += 1;
            if records.is_multiple_of(BEAT_EVERY) {
                state.beat();
            }
            match events::decode(&record) {
                Ok(event) => {
                    if let Some(change) = pipeline.on_event(event) {
                        if let (ProcessChange::Exit { pid }, Some(injector)) =
                            (&change, injector.as_mut())
                        {
                            injector.forget_process(*pid);
                        }
                        let mut procs = Processes {
                            selector: &mut selector,
                            runtimes: &mut runtimes,
                            tls: &mut tls,
                            probes: &mut probes,
                        };
                        apply(change, &mut procs, &mut pipeline, &stats);
                    }
                }
                Err(err) => {
                    Stats::add(&stats.events_malformed, 1);
                    log::debug!("malformed kernel event: {err}");
                }
            }
        }
        if let Some(injector) = injector.as_mut() {
            for cookie in pipeline.take_not_http() {
                // Absent for sockets never enrolled (servers, sockets of other kinds) or
                // parked: fine.
                if injector.remove(cookie) {
                    Stats::add(&stats.sockets_unenrolled, 1);
                }
            }
            rejoin_parked(injector, &mut pipeline, &stats);
        }
        if stopping {
            break;
        }
        if last_tick.elapsed() >= TICK {
            pipeline.tick(Clock::monotonic_ns());
            last_tick = Instant::now();
            state.set_open_connections(pipeline.open_connections());
            state.set_selected_processes(
                (!selector.traces_all()).then(|| selector.selected().len()),
            );
            for (pid, comm) in selector.poll_kubernetes() {
                log::info!("selected {comm}[{pid}] (its pod is now known)");
                Stats::add(&stats.processes_selected, 1);
                attach_runtime(&mut runtimes, &mut probes, pid, &comm, &stats);
                scan_tls(&mut tls, &mut probes, pid, &comm, &stats);
            }
        }
        if !selector.traces_all() && last_scan.elapsed() >= RESCAN {
            for (pid, comm) in selector.scan() {
                log::info!("selected {comm}[{pid}]");
                Stats::add(&stats.processes_selected, 1);
                attach_runtime(&mut runtimes, &mut probes, pid, &comm, &stats);
            }
            last_scan = Instant::now();
        }
        let tls_period = if selector.traces_all() {
            RESCAN_ALL
        } else {
            RESCAN
        };
        if tls.is_some() && last_tls_scan.elapsed() >= tls_period {
            // Libraries loaded since the last look (dlopen).
            let pids: Vec<(u32, String)> = if selector.traces_all() {
                runtimes.candidates()
            } else {
                selector
                    .selected()
                    .iter()
                    .map(|(p, c)| (*p, c.clone()))
                    .collect()
            };
            for (pid, comm) in pids {
                scan_tls(&mut tls, &mut probes, pid, &comm, &stats);
            }
            last_tls_scan = Instant::now();
        }
        sync_threads(&mut runtimes, &mut pipeline);
        if !stats_interval.is_zero() && last_stats.elapsed() >= stats_interval {
            let all: Vec<Metric> = counters
                .snapshot()
                .into_iter()
                .chain(stats.metrics())
                .collect();
            log::info!(
                "open_connections={} {}",
                pipeline.open_connections(),
                metrics::log_line(&all, verbose)
            );
            last_stats = Instant::now();
        }
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; a failure (EINTR) just means we loop again.
        unsafe { libc::poll(&mut pfd, 1, POLL_PERIOD_MS) };
    }
    let exporter = pipeline.finish();
    (exporter, counters.snapshot())
}

/// What follows the processes: which are traced, and the runtime probes they need.
struct Processes<'a> {
    selector: &'a mut Selector,
    runtimes: &'a mut Runtimes,
    tls: &'a mut Option<TlsLibraries>,
    probes: &'a mut Probes,
}

fn apply(
    change: ProcessChange,
    procs: &mut Processes<'_>,
    pipeline: &mut Pipeline<ExportHandle>,
    stats: &Stats,
) {
    let selector = &mut *procs.selector;
    match change {
        ProcessChange::Exec { pid, comm } => {
            let newly = !selector.traces_all() && !selector.selected().contains_key(&pid);
            // A new program in the same process: its old program's probes no longer apply.
            procs.runtimes.on_exit(pid);
            if let Some(tls) = procs.tls.as_mut() {
                tls.on_exit(pid);
            }
            if selector.on_exec(pid, &comm) {
                if newly {
                    log::info!("selected {comm}[{pid}] (started after the agent)");
                    Stats::add(&stats.processes_selected, 1);
                }
                pipeline.preload(pid);
                attach_runtime(procs.runtimes, procs.probes, pid, &comm, stats);
                scan_tls(procs.tls, procs.probes, pid, &comm, stats);
            }
        }
        ProcessChange::Fork { pid, parent, comm } => {
            if selector.adopt(pid, comm.clone()) {
                log::info!("selected {comm}[{pid}] (forked by a selected process)");
                Stats::add(&stats.processes_selected, 1);
            }
            attach_runtime(procs.runtimes, procs.probes, pid, &comm, stats);
            scan_tls_of(procs.tls, procs.probes, pid, &comm, stats, Some(parent));
        }
        ProcessChange::Libraries { pid } => {
            let comm = selector.selected().get(&pid).cloned();
            if let Some(comm) = comm.or_else(|| selector.traces_all().then(String::new)) {
                scan_tls(procs.tls, procs.probes, pid, &comm, stats);
            }
        }
        ProcessChange::Exit { pid } => {
            selector.on_exit(pid);
            procs.runtimes.on_exit(pid);
            if let Some(tls) = procs.tls.as_mut() {
                tls.on_exit(pid);
            }
        }
    }
    sync_threads(procs.runtimes, pipeline);
}

/// Tells the pipeline which processes' threads stopped standing for a request (as soon as a
/// runtime mechanism attaches, before their next events).
fn sync_threads(runtimes: &mut Runtimes, pipeline: &mut Pipeline<ExportHandle>) {
    for (pid, threadless) in runtimes.take_thread_changes() {
        pipeline.set_threads_serve(pid, !threadless);
    }
}

/// A process is newly traced: its runtime mechanism, if one applies, says so in the log.
fn attach_runtime(
    runtimes: &mut Runtimes,
    probes: &mut Probes,
    pid: u32,
    comm: &str,
    stats: &Stats,
) {
    let outcome = runtimes.on_selected(probes, pid, stats);
    if outcome.applies() {
        log::info!("runtime linking: {comm}[{pid}]: {outcome}");
    }
}

/// A traced process's TLS libraries not looked at yet: each one found is in the log.
fn scan_tls(
    tls: &mut Option<TlsLibraries>,
    probes: &mut Probes,
    pid: u32,
    comm: &str,
    stats: &Stats,
) {
    scan_tls_of(tls, probes, pid, comm, stats, None);
}

/// `forked`: the process was just forked by this selected one (see `TlsLibraries::scan`).
fn scan_tls_of(
    tls: &mut Option<TlsLibraries>,
    probes: &mut Probes,
    pid: u32,
    comm: &str,
    stats: &Stats,
    forked: Option<u32>,
) {
    let Some(tls) = tls.as_mut() else {
        return;
    };
    for finding in tls.scan(probes, pid, stats, forked) {
        log::info!("tls: {comm}[{pid}]: {finding}");
    }
}

/// Parked sockets whose answer has been read go back into the injector's map.
fn rejoin_parked(injector: &mut Injector, pipeline: &mut Pipeline<ExportHandle>, stats: &Stats) {
    for candidate in pipeline.rejoin_candidates() {
        let outcome = match injector.rejoin(&candidate) {
            Rejoin::Rejoined => RejoinOutcome::Rejoined,
            Rejoin::NotYet(why) => {
                log::trace!("socket {} not rejoined yet: {why}", candidate.sock_cookie);
                RejoinOutcome::NotYet
            }
            Rejoin::Undone => {
                Stats::add(&stats.rejoins_undone, 1);
                RejoinOutcome::NotYet
            }
            Rejoin::Gone => RejoinOutcome::Gone,
            Rejoin::Never(why) => {
                log::debug!(
                    "socket {} of process {} stays out of the injector: {why}",
                    candidate.sock_cookie,
                    candidate.pid
                );
                RejoinOutcome::Never
            }
        };
        pipeline.rejoin_done(candidate, outcome);
    }
}
