//! `cargo xtask bench`: what the agent costs a real server.
//!
//! Benchmarks run alternately without and with the agent (the release binary, console
//! exporter into /dev/null, so every request is traced and its span built and exported):
//!
//! - [`nginx`]: nginx answers a tiny response on loopback while wrk loads it
//!   (`agent --comm nginx`).
//! - [`pg`]: a throwaway PostgreSQL answers `pgbench -S` on loopback
//!   (`agent --pid <postmaster> --comm pgbench`: the backends and the client are both traced).
//! - [`proxy`]: an nginx reverse proxy in front of a second nginx, the agent in every run,
//!   runtime linking on against off (what the mechanism costs per request).
//! - [`connections`]: the agent's memory with many open keep-alive connections (no pairs: two
//!   runs with the agent, connections opened at a pace and all at once).
//!
//! Each pair of runs gives a throughput ratio and latency ratios; the with-agent run also gives
//! the agent's CPU time per request, the BPF run time per request (kernel `bpf_stats`), its
//! memory and what it lost. Medians of the pairs are reported, printed on stdout and written
//! into BENCHMARKS.md between markers (one pair of markers per benchmark).
//!
//! This module holds what both benchmarks share: options, the with/without-agent measurement,
//! /proc and BPF statistics, the report helpers. The servers, the agent runner and the process
//! guards are the end-to-end tests' harness (the `tests` crate's lib, `testkit` here): the
//! agent runs as a [`testkit::Agent`] with its console exporter, the servers as
//! [`testkit::NginxServer`] and [`testkit::PgServer`] with the benchmark's settings. Like the
//! tests, these panic on a broken set-up (a server that does not start); their guards still
//! stop every process.

mod connections;
mod nginx;
mod pg;
mod proxy;

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use clap::builder::RangedU64ValueParser;
use testkit::{Agent, AgentBuilder, Collector, ExitSummary, ExportTotals};

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";
/// Counters of the agent's summary that count kernel events it lost (and said so).
const EVENT_LOSS_COUNTERS: &[&str] = &[
    "kernel_lost_ringbuf_full",
    "kernel_payload_copy_failed",
    "kernel_socket_map_full",
    "events_malformed",
];
/// Counters of spans built but not delivered (also on the summary's export line).
const SPAN_LOSS_COUNTERS: &[&str] = &["spans_dropped_queue_full", "spans_export_failed"];

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_signal: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Ctrl-C (or SIGTERM) stops the benchmark at the next step, so the guards below still run:
/// children stopped, bpf_stats restored, temporary files removed.
fn catch_interrupts() {
    // SAFETY: the handler only stores into an atomic, which is async-signal-safe.
    unsafe {
        let handler = on_interrupt as extern "C" fn(libc::c_int) as libc::sighandler_t;
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("bench: interrupted");
    }
    Ok(())
}

/// A benchmark.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum Bench {
    Nginx,
    #[value(alias = "postgres", alias = "postgresql")]
    Pg,
    /// What runtime linking costs: an nginx reverse proxy, linking on vs off.
    Proxy,
    /// nginx over https (TLS plaintext read through OpenSSL's probes).
    #[value(alias = "https")]
    NginxHttps,
    /// nginx while the agent selects only another (idle) process: what untraced processes pay.
    #[value(alias = "untraced")]
    NginxUntraced,
    /// The agent's memory with many open keep-alive connections to a traced nginx.
    #[value(alias = "connections")]
    NginxConnections,
}

/// How a with-agent run starts the agent: `bin args`, exporting to `sink`.
pub(super) struct WithAgent<'a> {
    pub bin: &'a Path,
    pub args: &'a [String],
    pub sink: &'a Sink,
}

/// Where the agent's spans go in the with-agent runs (`--export`).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, clap::ValueEnum)]
pub enum Export {
    /// The console exporter, into /dev/null (every span built, formatted and written)
    #[default]
    Console,
    /// OTLP/gRPC to a real collector on loopback (rotel, discarding what it receives)
    Otlp,
}

/// The with-agent runs' span destination, up for the whole benchmark.
pub(super) enum Sink {
    Console,
    Otlp(Collector),
}

impl Sink {
    fn start(export: Export) -> Self {
        match export {
            Export::Console => Sink::Console,
            Export::Otlp => {
                let collector = Collector::start_quiet();
                eprintln!(
                    "bench: exporting to a rotel collector at {}",
                    collector.grpc_endpoint()
                );
                Sink::Otlp(collector)
            }
        }
    }

    fn start_agent(&self, builder: AgentBuilder) -> Agent {
        match self {
            Sink::Console => builder.start_console(),
            Sink::Otlp(collector) => builder.start(collector),
        }
    }

    /// This sink's section marker: the console's are the plain ones, so an OTLP run keeps
    /// its own section beside them.
    pub(super) fn mark(&self, mark: &str) -> String {
        match self {
            Sink::Console => mark.to_string(),
            Sink::Otlp(_) => otlp_mark(mark),
        }
    }

    /// What a section's title adds.
    pub(super) fn title(&self) -> &'static str {
        match self {
            Sink::Console => "",
            Sink::Otlp(_) => ", spans exported over OTLP/gRPC",
        }
    }

    /// How the agent's spans left it, for "How it was measured".
    pub(super) fn describe(&self) -> &'static str {
        match self {
            Sink::Console => {
                "console exporter (every span is built, formatted and written, to /dev/null)"
            }
            Sink::Otlp(_) => {
                "OTLP/gRPC exporter (`--otlp-endpoint`) to a rotel collector on loopback that \
                 discards what it receives (`--exporter blackhole`, one log line per batch); \
                 the collector's CPU is counted in \"other load\", not in the agent's"
            }
        }
    }

    /// The command-line flag that chose it.
    pub(super) fn flag(&self) -> &'static str {
        match self {
            Sink::Console => "",
            Sink::Otlp(_) => " --export otlp",
        }
    }
}

/// `<!-- bench:NAME:start -->` → `<!-- bench:NAME+otlp:start -->` (and `:end`).
fn otlp_mark(mark: &str) -> String {
    tagged_mark(mark, "+otlp")
}

/// A section measured with `--agent-arg`s is a section of its own: its markers name them
/// (`bench:nginx+sample-ratio=0.1:start`), so it does not replace the default run's.
fn agent_arg_mark(mark: &str, args: &[String]) -> String {
    let tag: String = args
        .iter()
        .map(|a| format!("+{}", a.trim_start_matches('-').replace(' ', "=")))
        .collect();
    tagged_mark(mark, &tag)
}

fn tagged_mark(mark: &str, tag: &str) -> String {
    mark.replace(":start -->", &format!("{tag}:start -->"))
        .replace(":end -->", &format!("{tag}:end -->"))
}

/// Options of `cargo xtask bench`.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Needs root (eBPF, bpf_stats). Runs the server on CPU 1 and the load \
generator on CPU 0; PostgreSQL runs as the `postgres` OS user."
)]
pub struct Options {
    /// Run only this benchmark (default: all of them, in the order listed)
    #[arg(value_enum, conflicts_with = "only")]
    bench: Option<Bench>,
    /// The same as the positional BENCH
    #[arg(long, value_enum, value_name = "BENCH")]
    only: Option<Bench>,
    /// Pairs of runs (without, with the agent; order swapped every other pair)
    #[arg(long, value_name = "N", default_value_t = 6, value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    pairs: usize,
    /// Length of each load run (wrk, pgbench -T), in seconds
    #[arg(long, value_name = "SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    duration: u64,
    /// wrk connections (nginx)
    #[arg(long, value_name = "N", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    connections: u32,
    /// pgbench clients (pg)
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    clients: u32,
    /// pgbench query modes, comma-separated; each mode runs its own pairs
    #[arg(
        long,
        value_name = "LIST",
        value_enum,
        value_delimiter = ',',
        default_value = "prepared"
    )]
    pg_modes: Vec<pg::Mode>,
    /// Where the agent sends its spans in the with-agent runs (an OTLP run writes sections of
    /// its own)
    #[arg(long, value_enum, value_name = "SINK", default_value = "console")]
    export: Export,
    /// One more argument for the agent in the with-agent runs (repeat for more), e.g.
    /// `--agent-arg=--tls=off`, to measure what a switch costs
    #[arg(long = "agent-arg", value_name = "ARG", allow_hyphen_values = true)]
    agent_arg: Vec<String>,
    /// Connections kept open (nginx-connections)
    #[arg(long, value_name = "N", default_value_t = 10_000, value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    open_connections: usize,
    /// Use this agent binary instead of building target/release/agent
    #[arg(long, value_name = "PATH")]
    agent: Option<PathBuf>,
    /// Print the results only; leave BENCHMARKS.md alone
    #[arg(long = "no-write", action = clap::ArgAction::SetFalse)]
    write: bool,
}

impl Options {
    fn runs(&self, bench: Bench) -> bool {
        self.only.or(self.bench).is_none_or(|b| b == bench)
    }

    /// The `--agent-arg`s as given on the command line (empty without any).
    pub(super) fn agent_arg_flags(&self) -> String {
        self.agent_arg
            .iter()
            .map(|a| format!(" --agent-arg={a}"))
            .collect()
    }

    /// `--pg-modes` in the order given, each once.
    fn dedup_pg_modes(&mut self) {
        let mut modes = Vec::new();
        for &mode in &self.pg_modes {
            if !modes.contains(&mode) {
                modes.push(mode);
            }
        }
        self.pg_modes = modes;
    }
}

pub fn run(mut opts: Options) -> Result<()> {
    opts.dedup_pg_modes();
    if !crate::is_root() {
        bail!(
            "the benchmark loads eBPF programs and enables bpf_stats: run `sudo -E cargo xtask bench`"
        );
    }
    catch_interrupts();
    crate::setup::run(true)?;
    let agent_bin = match &opts.agent {
        Some(path) => path.clone(),
        None => crate::build_agent()?,
    };
    if !agent_bin.is_file() {
        bail!("agent binary {} not found", agent_bin.display());
    }
    let cpus = thread::available_parallelism().map_or(1, |n| n.get());
    if cpus < 2 {
        bail!(
            "the benchmark pins the server and its load generator on separate CPUs: it needs at \
             least 2 (found {cpus})"
        );
    }
    let mut bpf_stats = BpfStats::new()?;
    let sink = Sink::start(opts.export);
    let run_nginx = |variant: nginx::Variant, bpf_stats: &mut BpfStats| -> Result<()> {
        let section = nginx::run(&opts, &agent_bin, bpf_stats, &sink, variant)?;
        publish(
            &opts,
            &sink,
            &section,
            variant.mark_start(),
            variant.mark_end(),
        )
    };
    if opts.runs(Bench::Nginx) {
        run_nginx(nginx::Variant::Http, &mut bpf_stats)?;
    }
    if opts.runs(Bench::Pg) {
        check_interrupted()?;
        let section = pg::run(&opts, &agent_bin, &mut bpf_stats, &sink)?;
        publish(&opts, &sink, &section, pg::MARK_START, pg::MARK_END)?;
    }
    if opts.runs(Bench::Proxy) {
        check_interrupted()?;
        let section = proxy::run(&opts, &agent_bin, &mut bpf_stats, &sink)?;
        publish(&opts, &sink, &section, proxy::MARK_START, proxy::MARK_END)?;
    }
    if opts.runs(Bench::NginxHttps) {
        check_interrupted()?;
        run_nginx(nginx::Variant::Https, &mut bpf_stats)?;
    }
    if opts.runs(Bench::NginxUntraced) {
        check_interrupted()?;
        run_nginx(nginx::Variant::Untraced, &mut bpf_stats)?;
    }
    if opts.runs(Bench::NginxConnections) {
        check_interrupted()?;
        let section = connections::run(&opts, &agent_bin, &sink)?;
        publish(
            &opts,
            &sink,
            &section,
            connections::MARK_START,
            connections::MARK_END,
        )?;
    }
    Ok(())
}

/// Prints a benchmark's section and (unless `--no-write`) puts it into BENCHMARKS.md at once,
/// so the results of one benchmark survive a failure of the next.
/// The section is written with `sink`'s markers (those in `section` included).
fn publish(opts: &Options, sink: &Sink, section: &str, start: &str, end: &str) -> Result<()> {
    let (start_mark, end_mark) = (
        agent_arg_mark(&sink.mark(start), &opts.agent_arg),
        agent_arg_mark(&sink.mark(end), &opts.agent_arg),
    );
    let section = section.replace(start, &start_mark).replace(end, &end_mark);
    let (start, end) = (start_mark.as_str(), end_mark.as_str());
    println!("{section}");
    if !opts.write {
        return Ok(());
    }
    let path = crate::workspace_root().join("BENCHMARKS.md");
    let old = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    fs::write(&path, replace_section(&old, &section, start, end))
        .with_context(|| format!("writing {}", path.display()))?;
    eprintln!("bench: results written to {}", path.display());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Measuring one run, without or with the agent

/// One load run and how busy the machine was meanwhile; `client` is what the load generator
/// reported.
struct Measured<T> {
    client: T,
    /// CPUs used by processes other than the server, the load generator, the agent and this
    /// benchmark (noise).
    other_load: f64,
    /// CPUs used by the server's processes.
    server_load: f64,
}

/// A with-agent run: the load run and what the agent spent and counted meanwhile.
struct AgentRun<T> {
    run: Measured<T>,
    /// utime + stime of the agent between "ready" and idle after the load.
    agent_ticks: u64,
    /// Whether the agent went idle after the run (else its CPU time misses the tail).
    settled: bool,
    /// The same, by thread name (threads alive at the end of the run).
    agent_threads: BTreeMap<String, u64>,
    /// BPF run time and calls of each of the agent's programs during the run, by program id.
    bpf: BTreeMap<u32, ProgStat>,
    bpf_stats_on: bool,
    vm_hwm_kb: u64,
    vm_rss_kb: u64,
    summary: ExitSummary,
    export: ExportTotals,
}

impl<T> AgentRun<T> {
    /// Agent CPU time (all threads) in µs, divided by `n`.
    fn agent_us_per(&self, n: u64, clk_tck: u64) -> f64 {
        ticks_to_us(self.agent_ticks, clk_tck) / n.max(1) as f64
    }

    fn bpf_total(&self) -> ProgStat {
        self.bpf
            .values()
            .fold(ProgStat::default(), |acc, p| ProgStat {
                name: String::new(),
                run_time_ns: acc.run_time_ns + p.run_time_ns,
                run_cnt: acc.run_cnt + p.run_cnt,
            })
    }

    /// BPF run time in ns, divided by `n`.
    fn bpf_ns_per(&self, n: u64) -> f64 {
        self.bpf_total().run_time_ns as f64 / n.max(1) as f64
    }

    fn bpf_ns_per_call(&self) -> f64 {
        let total = self.bpf_total();
        total.run_time_ns as f64 / total.run_cnt.max(1) as f64
    }

    /// Kernel events the agent counted as lost.
    fn events_lost(&self) -> u64 {
        EVENT_LOSS_COUNTERS
            .iter()
            .map(|c| self.summary.counter(c))
            .sum()
    }

    /// Spans built but dropped (export queue full) or failed, as counted by the agent.
    fn spans_lost(&self) -> u64 {
        let (s, e) = (&self.summary, &self.export);
        e.dropped.max(s.counter("spans_dropped_queue_full"))
            + e.failed.max(s.counter("spans_export_failed"))
    }

    /// Spans built that were neither exported nor counted as dropped or failed.
    fn spans_unsettled(&self) -> u64 {
        let e = &self.export;
        self.summary
            .counter("spans_built")
            .saturating_sub(e.exported + e.failed + e.dropped)
    }
}

/// CPU counters read around a run.
struct Sample {
    at: Instant,
    machine_busy: u64,
    server: u64,
    own: u64,
    agent: u64,
}

impl Sample {
    fn take(server_ticks: &dyn Fn() -> Result<u64>, agent: Option<u32>) -> Result<Self> {
        Ok(Self {
            at: Instant::now(),
            machine_busy: machine_busy_ticks()?,
            server: server_ticks()?,
            // This process and the children it has reaped (the load generator, once it ran).
            own: own_ticks()?,
            agent: agent.map(process_ticks).transpose()?.unwrap_or(0),
        })
    }
}

/// (other load, server load) in CPUs between two samples.
fn loads(before: &Sample, after: &Sample, clk_tck: u64) -> (f64, f64) {
    let seconds = after.at.duration_since(before.at).as_secs_f64().max(1e-3) * clk_tck as f64;
    let busy = after.machine_busy.saturating_sub(before.machine_busy);
    let server = after.server.saturating_sub(before.server);
    let ours =
        server + after.own.saturating_sub(before.own) + after.agent.saturating_sub(before.agent);
    (
        busy.saturating_sub(ours) as f64 / seconds,
        server as f64 / seconds,
    )
}

/// Runs the load without the agent. `server_ticks` gives the server's CPU ticks so far.
fn measure_without<T>(
    clk_tck: u64,
    server_ticks: &dyn Fn() -> Result<u64>,
    load: impl FnOnce() -> Result<T>,
) -> Result<Measured<T>> {
    let before = Sample::take(server_ticks, None)?;
    let client = load()?;
    let after = Sample::take(server_ticks, None)?;
    let (other_load, server_load) = loads(&before, &after, clk_tck);
    Ok(Measured {
        client,
        other_load,
        server_load,
    })
}

/// Starts the agent, runs the load, stops the agent: the agent's CPU from `agent ready` (plus
/// 0.5 s and idle) to idle after the load, its BPF programs' statistics over the same window
/// (bpf_stats switched on for it only), its memory, and its exit summary.
fn measure_with_agent<T>(
    agent: &WithAgent<'_>,
    clk_tck: u64,
    bpf_stats: &mut BpfStats,
    server_ticks: &dyn Fn() -> Result<u64>,
    load: impl FnOnce() -> Result<T>,
) -> Result<AgentRun<T>> {
    let mut agent = agent
        .sink
        .start_agent(Agent::builder().binary(agent.bin).args(agent.args));
    let pid = agent.pid();
    // Let the start-up (process scan, first polls) finish before the baseline.
    thread::sleep(Duration::from_millis(500));
    wait_idle(pid, clk_tck)?;
    bpf_stats.enable()?;
    let bpf_before = bpf_programs(pid)?;
    let threads_before = thread_ticks(pid)?;
    let before = Sample::take(server_ticks, Some(pid))?;
    let client = load()?;
    // Count the tail of the work too: events still queued when the load stopped.
    let settled = wait_idle(pid, clk_tck)?;
    let after = Sample::take(server_ticks, Some(pid))?;
    let threads_after = thread_ticks(pid)?;
    let bpf_after = bpf_programs(pid)?;
    let (vm_hwm_kb, vm_rss_kb) = memory_kb(pid)?;
    let bpf_stats_on = bpf_stats.is_on();
    bpf_stats.restore();
    agent.stop();
    let summary = agent.exit_summary();
    let (Some(export), true) = (summary.export, summary.counters.contains_key("spans_built"))
    else {
        bail!(
            "the agent's summary lacks the export line or the spans_built counter:\n{}",
            agent.stderr()
        );
    };

    let (other_load, server_load) = loads(&before, &after, clk_tck);
    let mut bpf = BTreeMap::new();
    for (id, end) in bpf_after {
        let start = bpf_before.get(&id).cloned().unwrap_or_default();
        bpf.insert(
            id,
            ProgStat {
                name: end.name,
                run_time_ns: end.run_time_ns.saturating_sub(start.run_time_ns),
                run_cnt: end.run_cnt.saturating_sub(start.run_cnt),
            },
        );
    }
    let mut agent_threads = BTreeMap::new();
    for (tid, (name, end)) in threads_after {
        let start = threads_before.get(&tid).map_or(0, |(_, t)| *t);
        *agent_threads.entry(name).or_default() += end.saturating_sub(start);
    }
    Ok(AgentRun {
        run: Measured {
            client,
            other_load,
            server_load,
        },
        agent_ticks: after.agent.saturating_sub(before.agent),
        settled,
        agent_threads,
        bpf,
        bpf_stats_on,
        vm_hwm_kb,
        vm_rss_kb,
        summary,
        export,
    })
}

/// One pair of load runs: without and with the agent.
struct Pair<T> {
    /// The with-agent run came first.
    agent_first: bool,
    without: Measured<T>,
    with: AgentRun<T>,
}

/// Runs pair number `index` of `load`: without then with the agent (`agent_bin agent_args`),
/// the other way round for odd pairs, so that drift cancels.
fn run_pair<T>(
    index: usize,
    agent: &WithAgent<'_>,
    clk_tck: u64,
    bpf_stats: &mut BpfStats,
    server_ticks: &dyn Fn() -> Result<u64>,
    load: impl Fn() -> Result<T>,
) -> Result<Pair<T>> {
    let agent_first = index % 2 == 1;
    let mut with = || measure_with_agent(agent, clk_tck, bpf_stats, server_ticks, &load);
    let (without, with) = if agent_first {
        let with = with()?;
        check_interrupted()?;
        (measure_without(clk_tck, server_ticks, &load)?, with)
    } else {
        let without = measure_without(clk_tck, server_ticks, &load)?;
        check_interrupted()?;
        (without, with()?)
    };
    check_interrupted()?;
    Ok(Pair {
        agent_first,
        without,
        with,
    })
}

/// Waits (at most 30 s) until the agent has used no CPU for 200 ms; false if it never settled.
fn wait_idle(pid: u32, clk_tck: u64) -> Result<bool> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let step = Duration::from_millis(100);
    let mut last = process_ticks(pid)?;
    let mut quiet = 0;
    while quiet < 2 && Instant::now() < deadline {
        thread::sleep(step);
        let now = process_ticks(pid)?;
        // One tick of slack at 100 Hz: a tick can land on an idle poll.
        quiet = if now.saturating_sub(last) <= clk_tck / 100 {
            quiet + 1
        } else {
            0
        };
        last = now;
        check_interrupted()?;
    }
    Ok(quiet >= 2)
}

// ---------------------------------------------------------------------------------------------
// /proc and BPF statistics

/// Processes whose command name is exactly `comm`.
fn processes_named(comm: &str) -> Vec<u32> {
    testkit::process::pids()
        .into_iter()
        .filter(|pid| {
            fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim_end() == comm)
        })
        .collect()
}

/// utime + stime of a process (all its threads, including exited ones), in clock ticks.
fn process_ticks(pid: u32) -> Result<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    stat_ticks(&stat, &[11, 12])
}

/// utime + stime + cutime + cstime of a process: its own CPU and that of the children it
/// has reaped.
fn process_and_reaped_ticks(pid: u32) -> Result<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    stat_ticks(&stat, &[11, 12, 13, 14])
}

/// utime + stime of each thread of a process, by thread id: (thread name, ticks).
fn thread_ticks(pid: u32) -> Result<BTreeMap<u32, (String, u64)>> {
    let dir = format!("/proc/{pid}/task");
    let mut threads = BTreeMap::new();
    for entry in fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let Ok(entry) = entry else { continue };
        let Some(tid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let (Ok(name), Ok(stat)) = (
            fs::read_to_string(format!("{dir}/{tid}/comm")),
            fs::read_to_string(format!("{dir}/{tid}/stat")),
        ) else {
            continue;
        };
        threads.insert(
            tid,
            (name.trim().to_string(), stat_ticks(&stat, &[11, 12])?),
        );
    }
    Ok(threads)
}

/// utime + stime + cutime + cstime of this process (reaped children included).
fn own_ticks() -> Result<u64> {
    let stat = fs::read_to_string("/proc/self/stat").context("reading /proc/self/stat")?;
    stat_ticks(&stat, &[11, 12, 13, 14])
}

/// Sums fields of a /proc/PID/stat line, counted from the first field after the command name
/// (state = 0, so utime = 11, stime = 12, cutime = 13, cstime = 14).
fn stat_ticks(stat: &str, fields: &[usize]) -> Result<u64> {
    let (_, rest) = stat
        .rsplit_once(')')
        .ok_or_else(|| anyhow!("malformed stat {stat:?}"))?;
    let values: Vec<&str> = rest.split_whitespace().collect();
    fields
        .iter()
        .map(|&i| {
            values
                .get(i)
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(|| anyhow!("malformed stat {stat:?}"))
        })
        .sum()
}

/// Busy ticks of all CPUs (user, nice, system, irq, softirq, steal) from /proc/stat.
fn machine_busy_ticks() -> Result<u64> {
    let stat = fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .ok_or_else(|| anyhow!("no cpu line in /proc/stat"))?;
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse::<u64>().unwrap_or(0))
        .collect();
    Ok([0, 1, 2, 5, 6, 7]
        .iter()
        .filter_map(|&i| values.get(i))
        .sum())
}

/// (VmHWM, VmRSS) in kB.
fn memory_kb(pid: u32) -> Result<(u64, u64)> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| anyhow!("no {name} in /proc/{pid}/status"))
    };
    Ok((field("VmHWM:")?, field("VmRSS:")?))
}

#[derive(Clone, Default)]
struct ProgStat {
    name: String,
    run_time_ns: u64,
    run_cnt: u64,
}

/// The BPF programs the agent holds (its `bpf-prog` file descriptors), with their cumulative
/// run time and call count. Reading the agent's own descriptors, rather than every program
/// named `agent_*`, keeps other agents running on the machine out of the numbers.
fn bpf_programs(pid: u32) -> Result<BTreeMap<u32, ProgStat>> {
    let mut progs = BTreeMap::new();
    let fd_dir = format!("/proc/{pid}/fd");
    for entry in fs::read_dir(&fd_dir).with_context(|| format!("reading {fd_dir}"))? {
        let Ok(entry) = entry else { continue };
        let is_prog = fs::read_link(entry.path())
            .is_ok_and(|target| target.to_string_lossy().contains("bpf-prog"));
        if !is_prog {
            continue;
        }
        let fd = entry.file_name();
        let Ok(info) = fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", fd.to_string_lossy()))
        else {
            continue;
        };
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        let (Some(id), Some(run_time_ns), Some(run_cnt)) =
            (field("prog_id:"), field("run_time_ns:"), field("run_cnt:"))
        else {
            continue;
        };
        let Ok(id) = u32::try_from(id) else { continue };
        progs.insert(
            id,
            ProgStat {
                name: prog_name(id),
                run_time_ns,
                run_cnt,
            },
        );
    }
    if progs.is_empty() {
        bail!("the agent (pid {pid}) holds no BPF programs");
    }
    Ok(progs)
}

/// The program's name as bpftool shows it (the kernel keeps 15 characters).
fn prog_name(id: u32) -> String {
    let shown = Command::new("bpftool")
        .args(["prog", "show", "id", &id.to_string()])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    shown
        .as_deref()
        .and_then(|text| {
            let mut words = text.split_whitespace();
            words.find(|w| *w == "name")?;
            words.next().map(str::to_string)
        })
        .unwrap_or_else(|| format!("prog {id}"))
}

/// `kernel.bpf_stats_enabled`: switched on for the with-agent runs, put back as found
/// afterwards and on every exit path.
struct BpfStats {
    previous: String,
    /// Whether it was already on before the benchmark (someone else uses it).
    was_on: bool,
}

impl BpfStats {
    fn new() -> Result<Self> {
        let previous = fs::read_to_string(BPF_STATS)
            .with_context(|| format!("reading {BPF_STATS}"))?
            .trim()
            .to_string();
        Ok(Self {
            was_on: previous != "0",
            previous,
        })
    }

    fn enable(&mut self) -> Result<()> {
        fs::write(BPF_STATS, "1").with_context(|| format!("enabling {BPF_STATS}"))
    }

    fn is_on(&self) -> bool {
        fs::read_to_string(BPF_STATS).is_ok_and(|v| v.trim() != "0")
    }

    fn restore(&mut self) {
        let _ = fs::write(BPF_STATS, &self.previous);
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        self.restore();
    }
}

// ---------------------------------------------------------------------------------------------
// Report

/// The machine, read when a benchmark starts.
struct Environment {
    date: String,
    kernel: String,
    cpus: usize,
    cpu_model: String,
    clk_tck: u64,
    loadavg: String,
}

/// The first line a command prints (stdout, else stderr), trimmed; empty if it cannot run.
fn first_line(cmd: &mut Command) -> String {
    cmd.output()
        .ok()
        .map(|o| {
            let mut text = String::from_utf8_lossy(&o.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&o.stderr));
            text.lines().next().unwrap_or_default().trim().to_string()
        })
        .unwrap_or_default()
}

impl Environment {
    fn read() -> Result<Self> {
        let clk_tck = first_line(Command::new("getconf").arg("CLK_TCK"))
            .parse::<u64>()
            .context("getconf CLK_TCK")?;
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        Ok(Self {
            date: first_line(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"])),
            kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_string(),
            cpus: thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model: cpuinfo
                .lines()
                .find_map(|l| l.strip_prefix("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
                .unwrap_or_default(),
            clk_tck,
            loadavg: fs::read_to_string("/proc/loadavg")
                .unwrap_or_default()
                .trim()
                .to_string(),
        })
    }
}

fn ticks_to_us(ticks: u64, clk_tck: u64) -> f64 {
    ticks as f64 * 1e6 / clk_tck.max(1) as f64
}

fn median(mut values: Vec<f64>) -> f64 {
    values.retain(|v| v.is_finite());
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len().is_multiple_of(2) {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    }
}

fn fmt_latency(us: f64) -> String {
    if us >= 1000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{us:.0} µs")
    }
}

fn yes_no(ok: bool) -> &'static str {
    if ok { "**yes**" } else { "**no**" }
}

/// Agent CPU by thread name over some with-agent runs, per unit of work (`per`: its name,
/// `units`: how many over those runs).
fn render_threads<'a, T: 'a>(
    s: &mut String,
    runs: impl Iterator<Item = &'a AgentRun<T>>,
    clk_tck: u64,
    per: &str,
    units: u64,
) -> Result<()> {
    writeln!(s, "| thread | CPU s | µs per {per} |")?;
    writeln!(s, "|---|---|---|")?;
    let mut by_thread: BTreeMap<&str, u64> = BTreeMap::new();
    for run in runs {
        for (name, ticks) in &run.agent_threads {
            *by_thread.entry(name.as_str()).or_default() += ticks;
        }
    }
    for (name, ticks) in &by_thread {
        writeln!(
            s,
            "| `{name}` | {:.2} | {:.2} |",
            *ticks as f64 / clk_tck.max(1) as f64,
            ticks_to_us(*ticks, clk_tck) / units.max(1) as f64
        )?;
    }
    writeln!(s)?;
    Ok(())
}

/// BPF programs' calls and run time over some with-agent runs, per unit of work.
fn render_bpf_programs<'a, T: 'a>(
    s: &mut String,
    runs: impl Iterator<Item = &'a AgentRun<T>>,
    per: &str,
    units: u64,
) -> Result<()> {
    writeln!(
        s,
        "| program | calls | calls per {per} | ns per call | ns per {per} |"
    )?;
    writeln!(s, "|---|---|---|---|---|")?;
    let mut by_name: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for run in runs {
        for prog in run.bpf.values() {
            let entry = by_name.entry(prog.name.clone()).or_default();
            entry.0 += prog.run_cnt;
            entry.1 += prog.run_time_ns;
        }
    }
    let units = units.max(1) as f64;
    for (name, (cnt, ns)) in &by_name {
        writeln!(
            s,
            "| `{name}` | {cnt} | {:.2} | {:.0} | {:.0} |",
            *cnt as f64 / units,
            *ns as f64 / (*cnt).max(1) as f64,
            *ns as f64 / units
        )?;
    }
    writeln!(s)?;
    Ok(())
}

/// The agent's loss counters that are not zero over some runs, as "`name` n, ...".
fn nonzero_loss_counters<'a, T: 'a>(runs: impl Iterator<Item = &'a AgentRun<T>>) -> String {
    let mut by_counter: BTreeMap<&str, u64> = BTreeMap::new();
    for run in runs {
        for name in EVENT_LOSS_COUNTERS.iter().chain(SPAN_LOSS_COUNTERS) {
            *by_counter.entry(name).or_default() += run.summary.counter(name);
        }
    }
    by_counter
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(name, n)| format!("`{name}` {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn code_list(names: &[&str]) -> String {
    names
        .iter()
        .map(|c| format!("`{c}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Replaces the section between the markers (or appends one), keeping the rest of the file.
fn replace_section(old: &str, section: &str, mark_start: &str, mark_end: &str) -> String {
    let section = section.trim_end();
    if let Some(start) = old.find(mark_start)
        && let Some(end_rel) = old[start..].find(mark_end)
    {
        let end = start + end_rel + mark_end.len();
        return format!("{}{section}{}", &old[..start], &old[end..]);
    }
    let mut out = if old.trim().is_empty() {
        "# Benchmarks\n\nNumbers measured with `cargo xtask bench` (see xtask/src/bench.rs); \
         the sections between markers are rewritten by each run.\n"
            .to_string()
    } else {
        old.trim_end().to_string() + "\n"
    };
    out.push('\n');
    out.push_str(section);
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_only_the_section() {
        let (a, b) = ("<!-- bench:x:start -->", "<!-- bench:x:end -->");
        let old = format!("# B\n\nintro\n\n{a}\nold\n{b}\n\n## other\n");
        let new = replace_section(&old, &format!("{a}\nnew\n{b}\n"), a, b);
        assert_eq!(new, format!("# B\n\nintro\n\n{a}\nnew\n{b}\n\n## other\n"));
        let appended = replace_section("# B\n", &format!("{a}\nx\n{b}"), a, b);
        assert_eq!(appended, format!("# B\n\n{a}\nx\n{b}\n"));
        assert!(replace_section("", "s", a, b).starts_with("# Benchmarks"));
        // Another benchmark's section is left alone.
        let (c, d) = ("<!-- bench:y:start -->", "<!-- bench:y:end -->");
        let both = replace_section(&new, &format!("{c}\ny\n{d}"), c, d);
        assert!(
            both.contains(&format!("{a}\nnew\n{b}")) && both.ends_with(&format!("{c}\ny\n{d}\n"))
        );
    }

    #[test]
    fn a_run_with_agent_args_writes_a_section_of_its_own() {
        let start = "<!-- bench:nginx:start -->";
        assert_eq!(agent_arg_mark(start, &[]), start);
        assert_eq!(
            agent_arg_mark(&otlp_mark(start), &["--sample-ratio=0.1".to_string()]),
            "<!-- bench:nginx+otlp+sample-ratio=0.1:start -->"
        );
        assert_eq!(
            agent_arg_mark(
                "<!-- bench:pg:end -->",
                &["--tls off".to_string(), "--verbose".to_string()]
            ),
            "<!-- bench:pg+tls=off+verbose:end -->"
        );
    }

    #[test]
    fn an_otlp_run_writes_a_section_of_its_own() {
        let (start, end) = ("<!-- bench:nginx:start -->", "<!-- bench:nginx:end -->");
        assert_eq!(otlp_mark(start), "<!-- bench:nginx+otlp:start -->");
        let console = format!("{start}\nconsole\n{end}");
        let old = format!("# Benchmarks\n\n{console}\n");
        let otlp = format!("{}\notlp\n{}", otlp_mark(start), otlp_mark(end));
        let new = replace_section(&old, &otlp, &otlp_mark(start), &otlp_mark(end));
        assert!(new.contains(&console) && new.contains(&otlp), "{new}");
        let again = replace_section(
            &new,
            &otlp.replace("otlp\n", "2\n"),
            &otlp_mark(start),
            &otlp_mark(end),
        );
        assert!(
            again.contains(&console) && !again.contains("\notlp\n"),
            "{again}"
        );
    }

    #[test]
    fn parses_options() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            options: Options,
        }
        let parse = |line: &str| {
            <Cli as clap::Parser>::try_parse_from(
                std::iter::once("bench").chain(line.split_whitespace()),
            )
            .map(|mut cli| {
                cli.options.dedup_pg_modes();
                cli.options
            })
        };
        let o = parse("").expect("options");
        assert!(o.runs(Bench::Nginx) && o.runs(Bench::Pg));
        assert_eq!(o.pg_modes, vec![pg::Mode::Prepared]);
        assert_eq!(
            (o.pairs, o.duration, o.connections, o.clients),
            (6, 10, 16, 4)
        );
        assert!(o.write && o.agent.is_none());
        let o = parse("pg --pairs 2 --pg-modes prepared,simple,prepared").expect("options");
        assert!(!o.runs(Bench::Nginx) && o.runs(Bench::Pg));
        assert_eq!(o.pairs, 2);
        assert_eq!(o.pg_modes, vec![pg::Mode::Prepared, pg::Mode::Simple]);
        let o = parse("--only nginx --no-write --agent /x/agent --agent-arg --tls=off")
            .expect("options");
        assert_eq!(o.agent_arg, ["--tls=off"]);
        assert_eq!(o.agent_arg_flags(), " --agent-arg=--tls=off");
        assert!(o.runs(Bench::Nginx) && !o.runs(Bench::Pg));
        assert!(!o.write && o.agent.as_deref() == Some(Path::new("/x/agent")));
        assert!(parse("--only postgresql").expect("alias").runs(Bench::Pg));
        assert!(parse("--only mysql").is_err());
        assert!(parse("--pg-modes fast").is_err());
        assert!(parse("--pairs 0").is_err());
        assert!(parse("--duration 0").is_err());
        assert!(parse("nginx --only pg").is_err());
        for mode in [pg::Mode::Prepared, pg::Mode::Simple, pg::Mode::Extended] {
            let name = mode.as_str();
            assert_eq!(
                parse(&format!("--pg-modes {name}")).expect(name).pg_modes,
                [mode]
            );
        }
        assert_eq!(
            parse("--help").err().map(|e| e.kind()),
            Some(clap::error::ErrorKind::DisplayHelp)
        );
    }

    #[test]
    fn reads_stat_fields_after_the_command_name() {
        let stat = "42 (we ird) S 1 42 42 0 -1 4194560 100 0 0 0 7 3 5 2 20 0 1 0";
        assert_eq!(stat_ticks(stat, &[11, 12]).expect("ticks"), 10);
        assert_eq!(stat_ticks(stat, &[11, 12, 13, 14]).expect("ticks"), 17);
        assert!((median(vec![3.0, 1.0, 2.0, 10.0]) - 2.5).abs() < 1e-9);
        assert!((median(vec![3.0, 1.0, 2.0]) - 2.0).abs() < 1e-9);
    }
}
