//! The agent binary: wiring only. See docs/architecture.md for the pipeline.

mod cli;
mod config;
mod correlation;
mod elf;
mod event_loop;
mod events;
mod export;
mod idmap;
mod instance;
mod intern;
mod k8s;
mod kernel;
mod metrics;
mod pipeline;
mod proc;
mod protocols;
mod redact;
mod resources;
mod runtimes;
mod selection;
mod spans;
mod stats;
mod tls;

use std::sync::{Arc, atomic::AtomicBool};

use anyhow::Context as _;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

// mimalloc's C API, in the library the `mimalloc` crate links (its Rust binding sits behind a
// feature with a dependency we do not otherwise need).
unsafe extern "C" {
    /// "Free what you can now".
    fn mi_collect(force: bool);
    fn mi_option_get(option: std::ffi::c_int) -> std::ffi::c_long;
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
}

/// `mi_option_purge_delay` (milliseconds a freed page stays committed) in the enum
/// `mi_option_e` of the mimalloc (v3) the crate builds; checked by a test against its
/// default, 1000.
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;

/// mimalloc's purge delay once started, unless the environment sets one
/// (`MIMALLOC_PURGE_DELAY`): mimalloc v3's default (1 s) kept the pages freed under load
/// resident and set the agent's peak; measured on the nginx bench (2 pairs each): 1 s: VmHWM
/// 64.5–64.9 MiB, agent 1.52–1.61 µs per request; 100 ms: 59.6 MiB, 1.51–1.58 µs; 0 (purge at
/// once): 56–58 MiB but 1.84–2.05 µs, a madvise per freed page.
const STEADY_PURGE_DELAY_MS: std::ffi::c_long = 100;

fn purge_delay() -> std::ffi::c_long {
    // SAFETY: reads an option by its index; no pointer.
    unsafe { mi_option_get(MI_OPTION_PURGE_DELAY) }
}

fn set_purge_delay(ms: std::ffi::c_long) {
    // SAFETY: sets an option by its index; no pointer.
    unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, ms) }
}

/// Start-up (the kernel's BTF, the eBPF object, `/proc` scans) allocates and frees tens of
/// megabytes in a burst; with a purge delay the freed pages stay resident through the burst
/// and count in the agent's peak (VmHWM 55.7 → 43.4 MiB purging at once, issue 13's 64 MiB
/// target). Returns the delay to use once started.
fn purge_at_once() -> std::ffi::c_long {
    let steady = if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        purge_delay()
    } else {
        STEADY_PURGE_DELAY_MS
    };
    set_purge_delay(0);
    steady
}

/// After start-up: what start-up freed goes back now (mimalloc keeps it until this thread
/// allocates again, which it hardly does: idle RSS 57 → 38 MiB), and the steady delay is set.
fn release_start_up_memory(purge_delay: std::ffi::c_long) {
    // SAFETY: takes no pointer; mimalloc is this process's allocator (above).
    unsafe { mi_collect(true) };
    set_purge_delay(purge_delay);
}

fn main() -> std::process::ExitCode {
    // Errors are printed as sentences (with their causes), not as a debug dump with a backtrace.
    match start() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("agent: error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn start() -> anyhow::Result<()> {
    let start_up_purge_delay = purge_at_once();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_target(false)
        .init();
    let mut cli = config::load()?;
    for note in cli.adjust() {
        eprintln!("agent: note: {note}");
    }
    cli.export_config()?.check()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(run(cli, start_up_purge_delay))
}

/// `start_up_purge_delay`: mimalloc's purge delay to restore once started (see `purge_at_once`).
async fn run(cli: cli::Cli, start_up_purge_delay: std::ffi::c_long) -> anyhow::Result<()> {
    // The exporter first: a bad header or an unusable certificate file stops the agent before it
    // touches the kernel.
    let stats = Arc::new(stats::Stats::default());
    let state = Arc::new(metrics::AgentState::default());
    let export_cfg = cli.export_config()?;
    match &export_cfg.target {
        export::ExportTarget::Console => {
            eprintln!("agent: no OTLP endpoint set: printing traces here")
        }
        export::ExportTarget::Otlp {
            endpoint, protocol, ..
        } => {
            eprintln!("agent: exporting OTLP ({protocol:?}) to {endpoint}")
        }
    }
    let ignored_ports = export_port(&export_cfg.target)
        .into_iter()
        .collect::<Vec<_>>();
    for port in &ignored_ports {
        eprintln!("agent: not tracing traffic on port {port} (the OTLP export itself)");
    }
    let exporter = export::spawn_exporter(export_cfg, stats.clone())?;

    if let Some(addr) = cli.metrics_address {
        metrics::serve(addr, &state, &stats).await?;
    }
    let env = kernel::environment::prepare(cli.context_propagation.is_on())?;
    eprintln!("agent: kernel {}", env.kernel_release);
    if env.tracefs_mounted_by_us {
        eprintln!(
            "agent: tracefs was not mounted; mounted it at {}",
            kernel::environment::TRACEFS
        );
    }
    if let Some(mode) = &env.lockdown {
        eprintln!("agent: kernel lockdown mode: {mode}");
    }
    for warning in &env.warnings {
        eprintln!("agent: warning: {warning}");
    }
    // Before any probe: a second agent would trace everything again.
    let instance = instance::claim(
        std::path::Path::new(instance::LOCK_DIR),
        cli.allow_multiple_agents,
    )?;
    if let Some(note) = &instance.note {
        eprintln!("agent: {note}");
    }
    let selection = cli.selection();
    // The pod list loads on its own thread while the probes load.
    let k8s = k8s::start(&cli.kubernetes_config())?;
    let capture = kernel::clamp_capture(cli.capture_size);
    let mut load = kernel::LoadOptions {
        socket_hooks: cli.socket_hooks,
        trace_all: selection.traces_all(),
        capture_size: capture,
        context_propagation: cli.context_propagation.is_on(),
        in_process_linking: cli.in_process_linking.is_on(),
        max_trace_age_ns: cli.max_trace_age.saturating_mul(1_000_000_000),
        max_spans_per_trace: cli.max_spans_per_trace,
        sample_ratio: cli.sample_ratio,
    };
    let mut probes = kernel::Probes::load(&load)?;
    if let Some(why) = probes.propagation_failed.take() {
        // Never risk a request: reload without the injector and keep tracing.
        drop(probes);
        load.context_propagation = false;
        probes = kernel::Probes::load(&load)?;
        eprintln!("agent: context propagation: off ({why})");
    } else if load.context_propagation {
        eprintln!("agent: context propagation: on (canary passed)");
        if let Some(why) = &probes.parking {
            eprintln!(
                "agent: context propagation: client sockets leave the injector while they read \
                 an answer, because on this kernel a socket in a socket map reads differently \
                 ({why}); a request written right after an answer may go out without a header \
                 (counted: requests_sent_parked)"
            );
        }
    } else {
        eprintln!("agent: context propagation: off (--context-propagation off)");
    }
    match cli.sample_ratio {
        None => eprintln!("agent: sampling: every request traced (--sample-ratio unset)"),
        Some(_) if !load.context_propagation => eprintln!(
            "agent: sampling: off, every request traced (--sample-ratio needs context \
             propagation: the decision travels in the injected traceparent)"
        ),
        Some(_) if !probes.sampling => eprintln!(
            "agent: sampling: off, every request traced (--sample-ratio needs the \
             sock_recv_length and sock_send_length tracepoints, Linux 6.3+, and \
             --socket-hooks auto or tracepoints)"
        ),
        Some(ratio) => eprintln!(
            "agent: sampling: {} % of requests, decided in the kernel at their first bytes; a \
             request with a traceparent follows its sampled flag, calls follow their request \
             (left out: requests_unsampled, calls_unsampled)",
            ratio * 100.0
        ),
    }
    for a in &probes.attached {
        eprintln!("agent: attached {} to {}", a.program, a.hook);
    }
    for h in &probes.hooks {
        match &h.degraded {
            None => eprintln!("agent: hook: {} ← {}", h.function, h.hook),
            Some(why) => eprintln!("agent: hook: {} ← {} (degraded: {why})", h.function, h.hook),
        }
    }
    eprintln!("agent: capturing the first {capture} bytes of each socket read/write");
    state.set_probes_attached(probes.attached.len());
    let write_ends_at_return = probes.writes_stamped_at_return();

    let selected_map = if selection.traces_all() {
        None
    } else {
        Some(probes.take_selected()?)
    };
    let mut selector =
        selection::Selector::new(selection, selected_map).with_kubernetes(k8s.clone());
    if let Some(k8s) = &k8s {
        // Selection by pod and the first resources need the pod list: give it a moment.
        if k8s.store.wait_synced(std::time::Duration::from_secs(5)) {
            eprintln!(
                "agent: kubernetes: {} pod(s) on node {}",
                k8s.store.live_pods(),
                k8s.node_name().unwrap_or("?")
            );
        } else {
            eprintln!(
                "agent: kubernetes: no pod list yet (see above); processes get their pod's \
                 attributes, and are selected by pod, once it arrives"
            );
        }
    }
    if !selector.traces_all() {
        let mut comms = probes.take_selected_comms()?;
        selector
            .install_exact_comms(&mut comms)
            .context("cannot hand the --comm names to the kernel")?;
    }
    if selector.traces_all() {
        eprintln!("agent: tracing all processes (except this agent)");
    } else {
        let found = selector.scan();
        stats::Stats::add(&stats.processes_selected, found.len() as u64);
        eprintln!(
            "agent: selected {} process(es){}{}",
            found.len(),
            if found.is_empty() { "" } else { ": " },
            found
                .iter()
                .map(|(p, c)| format!("{c}[{p}]"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        for warning in selector.unmatched_warnings() {
            eprintln!("agent: warning: {warning}");
        }
    }

    let runtime_pids = match &probes.runtime_programs_failed {
        None => Some(probes.take_runtime_pids()?),
        Some(why) => {
            eprintln!("agent: runtime linking: off: its kernel programs did not load: {why}");
            None
        }
    };
    let mut runtimes =
        runtimes::Runtimes::new(&cli.runtime_linking, runtime_pids, selector.traces_all());
    // The processes traced now (every process, when tracing all).
    let traced: Vec<(u32, String)> = if selector.traces_all() {
        runtimes.candidates()
    } else {
        let mut pids: Vec<_> = selector
            .selected()
            .iter()
            .map(|(p, c)| (*p, c.clone()))
            .collect();
        pids.sort_unstable();
        pids
    };
    if runtimes.is_on() {
        for (pid, comm) in &traced {
            let outcome = runtimes.on_selected(&mut probes, *pid, &stats);
            if !selector.traces_all() || outcome.applies() {
                eprintln!("agent: runtime linking: {comm}[{pid}]: {outcome}");
            }
        }
    }
    let mut tls = match (cli.tls.is_on(), &probes.tls_programs_failed) {
        (false, _) => {
            eprintln!("agent: tls: off (--tls off): encrypted connections are counted, not read");
            None
        }
        (true, Some(why)) => {
            eprintln!("agent: tls: off: its kernel programs did not load: {why}");
            None
        }
        (true, None) => {
            let cost = match tls::uprobe_hit_ns(&mut probes) {
                Ok(ns) => format!(
                    "a uprobe hit costs {:.1} µs here, about what each TLS read or write of a \
                     traced process pays",
                    ns as f64 / 1000.0
                ),
                Err(why) => format!("the cost of a uprobe hit could not be measured: {why}"),
            };
            eprintln!(
                "agent: tls: on: OpenSSL's probes loaded ({cost}); each selected process's \
                 libraries are looked at (below, per process)"
            );
            Some(tls::TlsLibraries::new(selector.traces_all()))
        }
    };
    if let Some(tls) = tls.as_mut() {
        for (pid, comm) in &traced {
            for finding in tls.scan(&mut probes, *pid, &stats, None) {
                eprintln!("agent: tls: {comm}[{pid}]: {finding}");
            }
        }
    }
    let kernel_counters = Arc::new(probes.take_counters()?);
    metrics::publish(&state, &kernel_counters, &stats, k8s.as_ref(), &exporter);
    let stop = Arc::new(AtomicBool::new(false));
    let injector = probes.take_injector();
    let loop_cfg = event_loop::LoopConfig {
        events: probes.take_events()?,
        probes,
        counters: kernel_counters,
        selector,
        resources: resources::Resources::new(resources::host_name()).with_kubernetes(k8s.clone()),
        stats: stats.clone(),
        stop: stop.clone(),
        stats_interval: std::time::Duration::from_secs(cli.stats_interval),
        verbose: cli.verbose,
        state: state.clone(),
        ignored_ports,
        raw_db_query: cli.db_raw_query,
        injector,
        runtimes,
        tls,
        correlation: event_loop::Correlation {
            in_process_linking: cli.in_process_linking.is_on(),
            same_host_pairing: cli.same_host_pairing.is_on(),
            write_ends_at_return,
            max_trace_age_ns: cli.max_trace_age.saturating_mul(1_000_000_000),
            max_spans_per_trace: cli.max_spans_per_trace,
        },
    };
    let worker = std::thread::Builder::new()
        .name("events".into())
        .spawn(move || event_loop::run(loop_cfg, exporter))
        .context("cannot start the event thread")?;
    release_start_up_memory(start_up_purge_delay);
    eprintln!("agent ready: press Ctrl-C to stop");

    wait_for_signal().await;
    state.set_stopping();
    eprintln!("agent: stopping: detaching probes and flushing spans");
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (exporter, kernel_counts) = worker
        .join()
        .map_err(|_| anyhow::anyhow!("the event thread panicked"))?;
    let summary = exporter.shutdown().await;
    kernel::environment::restore(&env);

    eprintln!("agent: summary");
    let k8s_counts = k8s.iter().flat_map(|k| k.counters());
    let all: Vec<_> = kernel_counts
        .into_iter()
        .chain(stats.metrics())
        .chain(k8s_counts)
        .collect();
    for line in metrics::summary_lines(&all, cli.verbose) {
        eprintln!("{line}");
    }
    eprintln!(
        "  export: {} exported, {} failed, {} dropped (queue full)",
        summary.exported, summary.failed, summary.dropped
    );
    Ok(())
}

/// The TCP port of the OTLP endpoint (explicit, or the protocol's default).
fn export_port(target: &export::ExportTarget) -> Option<u16> {
    let export::ExportTarget::Otlp {
        endpoint, protocol, ..
    } = target
    else {
        return None;
    };
    let url = if endpoint.is_empty() {
        protocol.default_endpoint()
    } else {
        endpoint.as_str()
    };
    let authority = url.split("://").nth(1).unwrap_or(url).split('/').next()?;
    match authority.rsplit_once(':') {
        Some((_, port)) => port.parse().ok(),
        None if url.starts_with("https") => Some(443),
        None => Some(80),
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        }
        _ => {
            // Without signal handlers we can still stop on Ctrl-C.
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The option index is mimalloc's purge delay: its default is 1000 ms in mimalloc v3
    /// (unless the environment sets it), and what is set is what is read back.
    #[test]
    fn the_purge_delay_option_is_the_one_we_set() {
        let from_env = std::env::var_os("MIMALLOC_PURGE_DELAY").is_some();
        if !from_env {
            assert_eq!(purge_delay(), 1000);
        }
        let steady = purge_at_once();
        assert_eq!(purge_delay(), 0);
        if !from_env {
            assert_eq!(steady, STEADY_PURGE_DELAY_MS);
        }
        release_start_up_memory(steady);
        assert_eq!(purge_delay(), steady);
    }
}
