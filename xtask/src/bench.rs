//! `cargo xtask bench`: what the agent costs a real server.
//!
//! nginx answers a tiny response on loopback while wrk loads it, alternately without and with
//! the agent (`agent --comm nginx`, console exporter into /dev/null, so every request is traced
//! and its span built and exported). Each pair of runs gives a throughput ratio and a p99
//! latency ratio; the with-agent run also gives the agent's CPU time per request, the BPF run
//! time per request (kernel `bpf_stats`), its memory and what it lost. Medians of the pairs
//! are reported, printed on stdout and written into BENCHMARKS.md between markers.
//!
//! Placement on the 2-core machine: the nginx master and its single worker are pinned on CPU 1,
//! wrk on CPU 0, the agent is not pinned (it takes its CPU from whichever side it lands on,
//! as it would on a loaded server).

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc::{self, RecvTimeoutError},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};

const USAGE: &str = "usage: cargo xtask bench [--pairs N] [--duration SECS] [--connections N] \
[--agent PATH] [--no-write]
  --pairs N          pairs of runs (without, with the agent; order swapped every other pair), default 6
  --duration SECS    length of each wrk run, default 10
  --connections N    wrk connections, default 16
  --agent PATH       use this agent binary instead of building target/release/agent
  --no-write         print the results only; leave BENCHMARKS.md alone
Needs root (eBPF, bpf_stats). Runs nginx on CPU 1 and wrk on CPU 0.";

const NGINX: &str = "/usr/sbin/nginx";
const NGINX_CPU: &str = "1";
const WRK_CPU: &str = "0";
const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";
const MARK_START: &str = "<!-- bench:nginx:start -->";
const MARK_END: &str = "<!-- bench:nginx:end -->";
const TARGET_THROUGHPUT_RATIO: f64 = 0.95;
const TARGET_AGENT_US_PER_TRACED: f64 = 3.0;
/// Counters of the agent's summary that count kernel events it lost (and said so).
const EVENT_LOSS_COUNTERS: &[&str] = &[
    "kernel_lost_ringbuf_full",
    "kernel_payload_copy_failed",
    "kernel_socket_map_full",
    "events_malformed",
];
/// Counters of spans built but not delivered (also on the summary's export line).
const SPAN_LOSS_COUNTERS: &[&str] = &["spans_dropped_queue_full", "spans_export_failed"];

const SIGINT: i32 = 2;
const SIGKILL: i32 = 9;
const SIGTERM: i32 = 15;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_signal: i32) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, signal: i32) -> i32;
    #[link_name = "signal"]
    fn libc_signal(signal: i32, handler: extern "C" fn(i32)) -> usize;
}

fn send_signal(pid: u32, signal: i32) {
    if let Ok(pid) = i32::try_from(pid)
        && pid > 0
    {
        // SAFETY: kill has no memory preconditions; the pid is one of our own children.
        unsafe {
            libc_kill(pid, signal);
        }
    }
}

/// Ctrl-C (or SIGTERM) stops the benchmark at the next step, so the guards below still run:
/// children stopped, bpf_stats restored, temporary files removed.
fn catch_interrupts() {
    // SAFETY: the handler only stores into an atomic, which is async-signal-safe.
    unsafe {
        libc_signal(SIGINT, on_interrupt);
        libc_signal(SIGTERM, on_interrupt);
    }
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("bench: interrupted");
    }
    Ok(())
}

struct Options {
    pairs: usize,
    duration: u64,
    connections: u32,
    agent: Option<PathBuf>,
    write: bool,
}

fn parse_args(args: &[String]) -> Result<Option<Options>> {
    let mut opts = Options {
        pairs: 6,
        duration: 10,
        connections: 16,
        agent: None,
        write: true,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| anyhow!("{name} needs a value\n{USAGE}"))
        };
        match arg.as_str() {
            "-h" | "--help" => return Ok(None),
            "--pairs" => opts.pairs = value("--pairs")?.parse().context("--pairs")?,
            "--duration" => opts.duration = value("--duration")?.parse().context("--duration")?,
            "--connections" => {
                opts.connections = value("--connections")?.parse().context("--connections")?
            }
            "--agent" => opts.agent = Some(PathBuf::from(value("--agent")?)),
            "--no-write" => opts.write = false,
            other => bail!("unknown bench option {other:?}\n{USAGE}"),
        }
    }
    if opts.pairs == 0 || opts.duration == 0 || opts.connections == 0 {
        bail!("--pairs, --duration and --connections must be at least 1");
    }
    Ok(Some(opts))
}

pub fn run(args: &[String]) -> Result<()> {
    let Some(opts) = parse_args(args)? else {
        println!("{USAGE}");
        return Ok(());
    };
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
    let env = Environment::read()?;
    if env.cpus < 2 {
        bail!(
            "the benchmark pins nginx and wrk on separate CPUs: it needs at least 2 (found {})",
            env.cpus
        );
    }

    let dir = TempDir::new()?;
    let nginx = Nginx::start(&dir.0)?;
    let mut bpf_stats = BpfStats::new()?;
    let foreign_nginx = processes_named("nginx")?
        .into_iter()
        .filter(|&pid| pid != nginx.master && pid != nginx.worker)
        .count();
    if foreign_nginx > 0 {
        eprintln!(
            "bench: warning: {foreign_nginx} other nginx process(es) running: the agent traces them too"
        );
    }
    eprintln!(
        "bench: nginx on 127.0.0.1:{} (master {}, worker {}); warming up",
        nginx.port, nginx.master, nginx.worker
    );
    let cfg = RunConfig {
        port: nginx.port,
        duration: opts.duration,
        connections: opts.connections,
        clk_tck: env.clk_tck,
    };
    run_wrk(&RunConfig { duration: 2, ..cfg })?;
    check_interrupted()?;

    let mut pairs = Vec::with_capacity(opts.pairs);
    for index in 0..opts.pairs {
        let agent_first = index % 2 == 1;
        let (without, with) = if agent_first {
            let with = run_with_agent(&cfg, &nginx, &agent_bin, &mut bpf_stats)?;
            check_interrupted()?;
            (run_without_agent(&cfg, &nginx)?, with)
        } else {
            let without = run_without_agent(&cfg, &nginx)?;
            check_interrupted()?;
            (
                without,
                run_with_agent(&cfg, &nginx, &agent_bin, &mut bpf_stats)?,
            )
        };
        check_interrupted()?;
        let pair = Pair {
            agent_first,
            without,
            with,
        };
        eprintln!(
            "bench: pair {}/{}: {:.0} req/s without, {:.0} with (ratio {:.3}), p99 {} / {}, agent {:.2} µs/req, BPF {:.0} ns/req",
            index + 1,
            opts.pairs,
            pair.without.wrk.rps,
            pair.with.run.wrk.rps,
            pair.throughput_ratio(),
            fmt_latency(pair.without.wrk.p99_us),
            fmt_latency(pair.with.run.wrk.p99_us),
            pair.with.agent_us_per_request(cfg.clk_tck),
            pair.with.bpf_ns_per_request(),
        );
        pairs.push(pair);
    }
    bpf_stats.restore();
    drop(nginx);

    let section = render(&opts, &env, &cfg, &pairs, &bpf_stats, foreign_nginx)?;
    println!("{section}");
    if opts.write {
        let path = crate::workspace_root().join("BENCHMARKS.md");
        let old = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        fs::write(&path, replace_section(&old, &section))
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("bench: results written to {}", path.display());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Runs

#[derive(Clone, Copy)]
struct RunConfig {
    port: u16,
    duration: u64,
    connections: u32,
    clk_tck: u64,
}

/// One wrk run, and how busy the machine was meanwhile.
struct Run {
    wrk: WrkStats,
    /// CPUs used by processes other than nginx, wrk, the agent and this benchmark (noise).
    other_load: f64,
    /// CPUs used by nginx (master + worker).
    nginx_load: f64,
}

struct AgentRun {
    run: Run,
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
    summary: AgentSummary,
}

impl AgentRun {
    fn agent_us_per_request(&self, clk_tck: u64) -> f64 {
        ticks_to_us(self.agent_ticks, clk_tck) / self.run.wrk.requests.max(1) as f64
    }

    fn agent_us_per_traced(&self, clk_tck: u64) -> f64 {
        ticks_to_us(self.agent_ticks, clk_tck)
            / self.summary.counter("http_exchanges").max(1) as f64
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

    fn bpf_ns_per_request(&self) -> f64 {
        self.bpf_total().run_time_ns as f64 / self.run.wrk.requests.max(1) as f64
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
        let s = &self.summary;
        s.dropped.max(s.counter("spans_dropped_queue_full"))
            + s.failed.max(s.counter("spans_export_failed"))
    }

    /// Requests wrk completed that produced no exchange, beyond the losses the agent counted,
    /// plus spans built that were neither exported nor counted as dropped or failed.
    fn unaccounted(&self) -> u64 {
        let traced = self.summary.counter("http_exchanges");
        let missing = self.run.wrk.requests.saturating_sub(traced);
        let built = self.summary.counter("spans_built");
        let settled = self.summary.exported + self.summary.failed + self.summary.dropped;
        missing.saturating_sub(self.events_lost()) + built.saturating_sub(settled)
    }
}

struct Pair {
    agent_first: bool,
    without: Run,
    with: AgentRun,
}

impl Pair {
    fn throughput_ratio(&self) -> f64 {
        self.with.run.wrk.rps / self.without.wrk.rps
    }

    fn p99_ratio(&self) -> f64 {
        self.with.run.wrk.p99_us / self.without.wrk.p99_us
    }
}

/// CPU counters read around a run.
struct Sample {
    at: Instant,
    machine_busy: u64,
    nginx: u64,
    own: u64,
    agent: u64,
}

impl Sample {
    fn take(nginx: &Nginx, agent: Option<u32>) -> Result<Self> {
        Ok(Self {
            at: Instant::now(),
            machine_busy: machine_busy_ticks()?,
            nginx: process_ticks(nginx.master)? + process_ticks(nginx.worker)?,
            // This process and the children it has reaped (wrk, once it ran).
            own: own_ticks()?,
            agent: agent.map(process_ticks).transpose()?.unwrap_or(0),
        })
    }
}

fn loads(before: &Sample, after: &Sample, clk_tck: u64) -> (f64, f64) {
    let seconds = after.at.duration_since(before.at).as_secs_f64().max(1e-3) * clk_tck as f64;
    let busy = after.machine_busy.saturating_sub(before.machine_busy);
    let nginx = after.nginx.saturating_sub(before.nginx);
    let ours =
        nginx + after.own.saturating_sub(before.own) + after.agent.saturating_sub(before.agent);
    (
        busy.saturating_sub(ours) as f64 / seconds,
        nginx as f64 / seconds,
    )
}

fn run_without_agent(cfg: &RunConfig, nginx: &Nginx) -> Result<Run> {
    let before = Sample::take(nginx, None)?;
    let wrk = run_wrk(cfg)?;
    let after = Sample::take(nginx, None)?;
    let (other_load, nginx_load) = loads(&before, &after, cfg.clk_tck);
    Ok(Run {
        wrk,
        other_load,
        nginx_load,
    })
}

fn run_with_agent(
    cfg: &RunConfig,
    nginx: &Nginx,
    agent_bin: &Path,
    bpf_stats: &mut BpfStats,
) -> Result<AgentRun> {
    let agent = Agent::start(agent_bin)?;
    let pid = agent.pid();
    // Let the start-up (process scan, first polls) finish before the baseline.
    thread::sleep(Duration::from_millis(500));
    wait_idle(pid, cfg.clk_tck)?;
    bpf_stats.enable()?;
    let bpf_before = bpf_programs(pid)?;
    let threads_before = thread_ticks(pid)?;
    let before = Sample::take(nginx, Some(pid))?;
    let wrk = run_wrk(cfg)?;
    // Count the tail of the work too: events still queued when wrk stopped.
    let settled = wait_idle(pid, cfg.clk_tck)?;
    let after = Sample::take(nginx, Some(pid))?;
    let threads_after = thread_ticks(pid)?;
    let bpf_after = bpf_programs(pid)?;
    let (vm_hwm_kb, vm_rss_kb) = memory_kb(pid)?;
    let bpf_stats_on = bpf_stats.is_on();
    bpf_stats.restore();
    let summary = agent.stop()?;

    let (other_load, nginx_load) = loads(&before, &after, cfg.clk_tck);
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
        settled,
        agent_threads,
        run: Run {
            wrk,
            other_load,
            nginx_load,
        },
        agent_ticks: after.agent.saturating_sub(before.agent),
        bpf,
        bpf_stats_on,
        vm_hwm_kb,
        vm_rss_kb,
        summary,
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
// wrk

struct WrkStats {
    requests: u64,
    rps: f64,
    p99_us: f64,
    /// Socket errors and non-2xx responses, as wrk printed them (empty: none).
    errors: String,
}

fn wrk_args(cfg: &RunConfig) -> Vec<String> {
    vec![
        "-c".into(),
        WRK_CPU.into(),
        "wrk".into(),
        "-t1".into(),
        format!("-c{}", cfg.connections),
        format!("-d{}s", cfg.duration),
        "--latency".into(),
        format!("http://127.0.0.1:{}/", cfg.port),
    ]
}

fn run_wrk(cfg: &RunConfig) -> Result<WrkStats> {
    let out = Command::new("taskset")
        .args(wrk_args(cfg))
        .stdin(Stdio::null())
        .output()
        .context("cannot run wrk (install it with `cargo xtask setup --test-deps`)")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "wrk failed with {}:\n{stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse_wrk(&stdout).with_context(|| format!("unexpected wrk output:\n{stdout}"))
}

fn parse_wrk(text: &str) -> Result<WrkStats> {
    let mut requests = None;
    let mut rps = None;
    let mut p99_us = None;
    let mut errors = Vec::new();
    for line in text.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            rps = Some(v.trim().parse::<f64>().context("Requests/sec")?);
        } else if let Some(v) = line.strip_prefix("99%") {
            p99_us = Some(parse_duration_us(v.trim())?);
        } else if line.contains(" requests in ") {
            let n = line.split_whitespace().next().unwrap_or_default();
            requests = Some(n.parse::<u64>().context("request count")?);
        } else if line.starts_with("Socket errors:") || line.starts_with("Non-2xx") {
            errors.push(line.to_string());
        }
    }
    Ok(WrkStats {
        requests: requests.ok_or_else(|| anyhow!("no \"N requests in\" line"))?,
        rps: rps.ok_or_else(|| anyhow!("no Requests/sec line"))?,
        p99_us: p99_us.ok_or_else(|| anyhow!("no 99% latency line (was --latency given?)"))?,
        errors: errors.join("; "),
    })
}

/// wrk prints durations as `812.00us`, `1.23ms`, `2.01s`, `1.50m`, `1.00h`.
fn parse_duration_us(text: &str) -> Result<f64> {
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| anyhow!("latency {text:?} has no unit"))?;
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .with_context(|| format!("latency {text:?}"))?;
    let scale = match unit {
        "us" => 1.0,
        "ms" => 1e3,
        "s" => 1e6,
        "m" => 60e6,
        "h" => 3600e6,
        _ => bail!("latency {text:?}: unknown unit {unit:?}"),
    };
    Ok(value * scale)
}

// ---------------------------------------------------------------------------------------------
// nginx

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<Self> {
        let path = std::env::temp_dir().join(format!("agent-bench-{}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn nginx_conf(dir: &Path, port: u16) -> String {
    let d = dir.display();
    format!(
        "# Written by `cargo xtask bench`.
daemon off;
master_process on;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    default_type text/plain;
    keepalive_timeout 65s;
    keepalive_requests 1000;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location / {{ return 200 \"hello\\n\"; }}
    }}
}}
"
    )
}

fn nginx_args(dir: &Path) -> Vec<String> {
    let d = dir.display();
    vec![
        "-c".into(),
        NGINX_CPU.into(),
        NGINX.into(),
        "-p".into(),
        format!("{d}/"),
        "-c".into(),
        format!("{d}/nginx.conf"),
        "-e".into(),
        format!("{d}/error.log"),
    ]
}

/// nginx (master + one worker), stopped on drop.
struct Nginx {
    child: Child,
    master: u32,
    worker: u32,
    port: u16,
}

impl Nginx {
    fn start(dir: &Path) -> Result<Self> {
        // A port picked free can be taken before nginx binds it: try a few.
        let mut last_error = anyhow!("nginx did not start");
        for _ in 0..3 {
            match Self::try_start(dir) {
                Ok(nginx) => return Ok(nginx),
                Err(e) => last_error = e,
            }
            check_interrupted()?;
        }
        Err(last_error)
    }

    fn try_start(dir: &Path) -> Result<Self> {
        let port = free_port()?;
        fs::write(dir.join("nginx.conf"), nginx_conf(dir, port)).context("writing nginx.conf")?;
        let log_path = dir.join("nginx.out");
        let log = fs::File::create(&log_path).context("creating nginx.out")?;
        // taskset execs nginx: the child's pid is the nginx master's.
        let child = Command::new("taskset")
            .args(nginx_args(dir))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {NGINX} (install nginx-light)"))?;
        let master = child.id();
        let mut nginx = Self {
            child,
            master,
            worker: 0,
            port,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = nginx.child.try_wait()? {
                let out = fs::read_to_string(&log_path).unwrap_or_default();
                let err = fs::read_to_string(dir.join("error.log")).unwrap_or_default();
                bail!("nginx exited with {status}:\n{out}{err}");
            }
            if http_ok(port) {
                break;
            }
            if Instant::now() > deadline {
                bail!("nginx did not answer on 127.0.0.1:{port} within 10 s");
            }
            check_interrupted()?;
            thread::sleep(Duration::from_millis(50));
        }
        nginx.worker = child_pids(master)?
            .into_iter()
            .next()
            .ok_or_else(|| anyhow!("the nginx master {master} has no worker process"))?;
        Ok(nginx)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: fast shutdown, the master stops its worker.
        send_signal(self.master, SIGTERM);
        if !matches!(
            wait_timeout(&mut self.child, Duration::from_secs(5)),
            Ok(Some(_))
        ) {
            send_signal(self.master, SIGKILL);
            let _ = self.child.wait();
        }
        if self.worker != 0 && Path::new(&format!("/proc/{}", self.worker)).exists() {
            send_signal(self.worker, SIGKILL);
        }
    }
}

fn free_port() -> Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("no free loopback port")?;
    Ok(listener.local_addr()?.port())
}

fn http_ok(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream
        .write_all(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer.starts_with("HTTP/1.1 200")
        && answer.contains("Server: nginx")
        && answer.ends_with("hello\n")
}

fn child_pids(parent: u32) -> Result<Vec<u32>> {
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").context("reading /proc")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the command name: state, ppid, ...
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(parent) {
            found.push(pid);
        }
    }
    found.sort_unstable();
    Ok(found)
}

/// Processes whose command name is exactly `comm`.
fn processes_named(comm: &str) -> Result<Vec<u32>> {
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").context("reading /proc")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim_end() == comm) {
            found.push(pid);
        }
    }
    Ok(found)
}

fn wait_timeout(child: &mut Child, limit: Duration) -> Result<Option<ExitStatus>> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------------
// The agent

const AGENT_ARGS: &[&str] = &["--comm", "nginx"];

/// The agent, stopped (SIGINT, then SIGKILL) on drop unless `stop` already did.
struct Agent {
    child: Child,
    lines: mpsc::Receiver<String>,
    log: Vec<String>,
    stopped: bool,
}

impl Agent {
    fn start(bin: &Path) -> Result<Self> {
        let mut child = Command::new(bin)
            .args(AGENT_ARGS)
            .stdin(Stdio::null())
            // The console exporter prints every span: into /dev/null.
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| anyhow!("agent stderr not captured"))?;
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut agent = Self {
            child,
            lines,
            log: Vec::new(),
            stopped: false,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match agent.lines.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => {
                    let ready = line.starts_with("agent ready");
                    agent.log.push(line);
                    if ready {
                        return Ok(agent);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    if let Some(status) = agent.child.try_wait()? {
                        agent.stopped = true;
                        bail!(
                            "the agent exited with {status} before it was ready:\n{}",
                            agent.log.join("\n")
                        );
                    }
                    if Instant::now() > deadline {
                        bail!(
                            "the agent was not ready within 60 s:\n{}",
                            agent.log.join("\n")
                        );
                    }
                    check_interrupted()?;
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = agent.child.wait()?;
                    agent.stopped = true;
                    bail!(
                        "the agent exited with {status} before it was ready:\n{}",
                        agent.log.join("\n")
                    );
                }
            }
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGINT, then the summary the agent prints when it stops.
    fn stop(mut self) -> Result<AgentSummary> {
        send_signal(self.pid(), SIGINT);
        let status = wait_timeout(&mut self.child, Duration::from_secs(60))?
            .ok_or_else(|| anyhow!("the agent did not stop within 60 s of SIGINT"))?;
        self.stopped = true;
        // The reader thread ends at end of file.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.log.push(line);
        }
        if !status.success() {
            bail!("the agent exited with {status}:\n{}", self.log.join("\n"));
        }
        parse_summary(&self.log).with_context(|| format!("agent output:\n{}", self.log.join("\n")))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.stopped {
            return;
        }
        send_signal(self.pid(), SIGINT);
        if !matches!(
            wait_timeout(&mut self.child, Duration::from_secs(10)),
            Ok(Some(_))
        ) {
            send_signal(self.pid(), SIGKILL);
            let _ = self.child.wait();
        }
    }
}

#[derive(Default)]
struct AgentSummary {
    counters: BTreeMap<String, u64>,
    exported: u64,
    failed: u64,
    dropped: u64,
}

impl AgentSummary {
    fn counter(&self, name: &str) -> u64 {
        self.counters.get(name).copied().unwrap_or(0)
    }
}

fn parse_summary(lines: &[String]) -> Result<AgentSummary> {
    let start = lines
        .iter()
        .position(|l| l.trim() == "agent: summary")
        .ok_or_else(|| anyhow!("no \"agent: summary\" in the agent's output"))?;
    let mut summary = AgentSummary::default();
    let mut saw_export = false;
    for line in &lines[start + 1..] {
        let Some(body) = line.strip_prefix("  ") else {
            continue;
        };
        if let Some(export) = body.trim().strip_prefix("export:") {
            // "N exported, N failed, N dropped (queue full)"
            for part in export.split(',') {
                let mut words = part.split_whitespace();
                let (Some(n), Some(what)) = (words.next(), words.next()) else {
                    continue;
                };
                let n: u64 = n.parse().with_context(|| format!("export line {line:?}"))?;
                match what {
                    "exported" => summary.exported = n,
                    "failed" => summary.failed = n,
                    "dropped" => summary.dropped = n,
                    _ => {}
                }
            }
            saw_export = true;
        } else if let [name, value] = body.split_whitespace().collect::<Vec<_>>()[..]
            && let Ok(value) = value.parse::<u64>()
        {
            summary.counters.insert(name.to_string(), value);
        }
    }
    if !saw_export || !summary.counters.contains_key("http_exchanges") {
        bail!("the agent's summary lacks the export line or the http_exchanges counter");
    }
    Ok(summary)
}

// ---------------------------------------------------------------------------------------------
// /proc and BPF statistics

/// utime + stime of a process (all its threads, including exited ones), in clock ticks.
fn process_ticks(pid: u32) -> Result<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    stat_ticks(&stat, &[11, 12])
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

struct Environment {
    date: String,
    kernel: String,
    cpus: usize,
    cpu_model: String,
    clk_tck: u64,
    loadavg: String,
    nginx_version: String,
    wrk_version: String,
}

impl Environment {
    fn read() -> Result<Self> {
        let capture = |cmd: &mut Command| {
            cmd.output()
                .ok()
                .map(|o| {
                    let mut text = String::from_utf8_lossy(&o.stdout).into_owned();
                    text.push_str(&String::from_utf8_lossy(&o.stderr));
                    text.lines().next().unwrap_or_default().trim().to_string()
                })
                .unwrap_or_default()
        };
        let clk_tck = capture(Command::new("getconf").arg("CLK_TCK"))
            .parse::<u64>()
            .context("getconf CLK_TCK")?;
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        Ok(Self {
            date: capture(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"])),
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
            nginx_version: capture(Command::new(NGINX).arg("-v"))
                .trim_start_matches("nginx version: ")
                .to_string(),
            wrk_version: capture(Command::new("wrk").arg("--version"))
                .split("Copyright")
                .next()
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

fn render(
    opts: &Options,
    env: &Environment,
    cfg: &RunConfig,
    pairs: &[Pair],
    bpf_stats: &BpfStats,
    foreign_nginx: usize,
) -> Result<String> {
    let tck = cfg.clk_tck;
    let throughput = median(pairs.iter().map(Pair::throughput_ratio).collect());
    let p99 = median(pairs.iter().map(Pair::p99_ratio).collect());
    let cpu_req = median(
        pairs
            .iter()
            .map(|p| p.with.agent_us_per_request(tck))
            .collect(),
    );
    let cpu_traced = median(
        pairs
            .iter()
            .map(|p| p.with.agent_us_per_traced(tck))
            .collect(),
    );
    let bpf_req = median(pairs.iter().map(|p| p.with.bpf_ns_per_request()).collect());
    let bpf_call = median(pairs.iter().map(|p| p.with.bpf_ns_per_call()).collect());
    let total_req = median(
        pairs
            .iter()
            .map(|p| p.with.agent_us_per_request(tck) + p.with.bpf_ns_per_request() / 1000.0)
            .collect(),
    );
    let hwm_mib = pairs.iter().map(|p| p.with.vm_hwm_kb).max().unwrap_or(0) as f64 / 1024.0;
    let rss_mib = median(
        pairs
            .iter()
            .map(|p| p.with.vm_rss_kb as f64 / 1024.0)
            .collect(),
    );
    let events_lost: u64 = pairs.iter().map(|p| p.with.events_lost()).sum();
    let spans_lost: u64 = pairs.iter().map(|p| p.with.spans_lost()).sum();
    let spans_built: u64 = pairs
        .iter()
        .map(|p| p.with.summary.counter("spans_built"))
        .sum();
    let mut by_counter: BTreeMap<&str, u64> = BTreeMap::new();
    for p in pairs {
        for name in EVENT_LOSS_COUNTERS.iter().chain(SPAN_LOSS_COUNTERS) {
            *by_counter.entry(name).or_default() += p.with.summary.counter(name);
        }
    }
    by_counter.retain(|_, n| *n > 0);
    let unaccounted: u64 = pairs.iter().map(|p| p.with.unaccounted()).sum();
    let requests: u64 = pairs.iter().map(|p| p.with.run.wrk.requests).sum();
    let traced: u64 = pairs
        .iter()
        .map(|p| p.with.summary.counter("http_exchanges"))
        .sum();
    let other_load = median(
        pairs
            .iter()
            .flat_map(|p| [p.without.other_load, p.with.run.other_load])
            .collect(),
    );
    let bpf_ok = pairs
        .iter()
        .all(|p| p.with.bpf_stats_on && p.with.bpf_total().run_cnt > 0);

    let throughput_ok = throughput >= TARGET_THROUGHPUT_RATIO;
    let cpu_ok = cpu_traced <= TARGET_AGENT_US_PER_TRACED;
    let loss_ok = unaccounted == 0;
    let all_ok = throughput_ok && cpu_ok && loss_ok;

    let mut s = String::new();
    writeln!(s, "{MARK_START}")?;
    writeln!(
        s,
        "## nginx + wrk on loopback, with and without the agent\n"
    )?;
    writeln!(
        s,
        "Measured {} on Linux {}, {} CPUs ({}), CLK_TCK {}, {} pairs of {} s runs \
         (`cargo xtask bench --pairs {} --duration {} --connections {}`). \
         Load average when it started: {}.\n",
        env.date,
        env.kernel,
        env.cpus,
        env.cpu_model,
        env.clk_tck,
        opts.pairs,
        opts.duration,
        opts.pairs,
        opts.duration,
        opts.connections,
        env.loadavg
    )?;

    writeln!(s, "### Result (medians of the per-pair values)\n")?;
    writeln!(s, "| metric | measured | target | met |")?;
    writeln!(s, "|---|---|---|---|")?;
    writeln!(
        s,
        "| throughput ratio (with agent / without) | {throughput:.3} | ≥ {TARGET_THROUGHPUT_RATIO} | {} |",
        yes_no(throughput_ok)
    )?;
    writeln!(s, "| p99 latency ratio (with / without) | {p99:.2} | — | |")?;
    writeln!(
        s,
        "| agent CPU (utime+stime) per traced request | {cpu_traced:.2} µs | ≤ {TARGET_AGENT_US_PER_TRACED} µs | {} |",
        yes_no(cpu_ok)
    )?;
    writeln!(
        s,
        "| agent CPU per completed wrk request | {cpu_req:.2} µs | — | |"
    )?;
    writeln!(
        s,
        "| BPF run time per request (bpf_stats) | {bpf_req:.0} ns ({bpf_call:.0} ns per program call) | — | |"
    )?;
    writeln!(
        s,
        "| agent CPU + BPF per request | {total_req:.2} µs | — | |"
    )?;
    writeln!(
        s,
        "| agent memory | VmHWM max {hwm_mib:.1} MiB, VmRSS median {rss_mib:.1} MiB | — | |"
    )?;
    writeln!(
        s,
        "| kernel events lost (counted by the agent) | {events_lost} | — | |"
    )?;
    writeln!(
        s,
        "| spans dropped or failed in export (counted) | {spans_lost} of {spans_built} built ({:.1} %) | — | |",
        spans_lost as f64 * 100.0 / spans_built.max(1) as f64
    )?;
    writeln!(
        s,
        "| unaccounted loss | {unaccounted} ({traced} requests traced of {requests} completed) | zero | {} |",
        yes_no(loss_ok)
    )?;
    writeln!(s)?;
    if all_ok {
        writeln!(s, "**Target met.**\n")?;
    } else {
        let mut missed = Vec::new();
        if !throughput_ok {
            missed.push(format!(
                "throughput ratio {throughput:.3} < {TARGET_THROUGHPUT_RATIO}"
            ));
        }
        if !cpu_ok {
            missed.push(format!(
                "agent CPU {cpu_traced:.2} µs per traced request > {TARGET_AGENT_US_PER_TRACED} µs"
            ));
        }
        if !loss_ok {
            missed.push(format!(
                "{unaccounted} requests or spans lost without a counter"
            ));
        }
        writeln!(
            s,
            "**Target NOT met:** {}. The agent's cost per request was {cpu_req:.2} µs of its own CPU \
             (reading events, parsing, building and exporting spans) plus {bpf_req:.0} ns of BPF \
             programs running in nginx's and wrk's threads.\n",
            missed.join("; ")
        )?;
    }
    if spans_lost > 0 {
        writeln!(
            s,
            "**Spans lost:** {spans_lost} of the {spans_built} spans built ({:.1} %) were dropped or \
             failed in export (counted, so not \"unaccounted\"): the exporter did not keep up. The \
             agent CPU above was spent on fewer exported spans than traced requests.\n",
            spans_lost as f64 * 100.0 / spans_built.max(1) as f64
        )?;
    }
    if other_load > 0.2 {
        writeln!(
            s,
            "**Noise:** the machine was not idle: other processes used a median of {other_load:.2} \
             CPUs during the runs (column \"other load\"), competing with nginx, wrk and the agent. \
             Ratios from such a run are noisier than on an idle machine.\n"
        )?;
    }
    let unsettled: Vec<String> = pairs
        .iter()
        .enumerate()
        .filter(|(_, p)| !p.with.settled)
        .map(|(i, _)| (i + 1).to_string())
        .collect();
    if !unsettled.is_empty() {
        writeln!(
            s,
            "**Note:** in pair(s) {} the agent was still busy 30 s after wrk stopped; the CPU read \
             then misses the rest of its backlog (an under-estimate).\n",
            unsettled.join(", ")
        )?;
    }
    if foreign_nginx > 0 {
        writeln!(
            s,
            "**Note:** {foreign_nginx} other nginx process(es) were running on the machine; \
             `--comm nginx` selected them too.\n"
        )?;
    }
    if !bpf_ok {
        writeln!(
            s,
            "**Note:** some with-agent runs saw no BPF statistics (bpf_stats_enabled switched off by \
             someone else?); their BPF numbers read 0.\n"
        )?;
    }

    writeln!(s, "### Per pair\n")?;
    writeln!(
        s,
        "| pair | order | req/s without | req/s with | ratio | p99 without | p99 with | p99 ratio | \
         agent µs/req | agent µs/traced | BPF ns/req | BPF ns/call | VmHWM MiB | requests (with) | \
         traced | events lost | spans lost | unaccounted | nginx CPUs w/o / with | other load w/o / with |"
    )?;
    writeln!(s, "|{}", "---|".repeat(20))?;
    for (i, p) in pairs.iter().enumerate() {
        let w = &p.with;
        writeln!(
            s,
            "| {} | {} | {:.0} | {:.0} | {:.3} | {} | {} | {:.2} | {:.2} | {:.2} | {:.0} | {:.0} | {:.1} | {} | {} | {} | {} | {} | {:.2} / {:.2} | {:.2} / {:.2} |",
            i + 1,
            if p.agent_first {
                "with, without"
            } else {
                "without, with"
            },
            p.without.wrk.rps,
            w.run.wrk.rps,
            p.throughput_ratio(),
            fmt_latency(p.without.wrk.p99_us),
            fmt_latency(w.run.wrk.p99_us),
            p.p99_ratio(),
            w.agent_us_per_request(tck),
            w.agent_us_per_traced(tck),
            w.bpf_ns_per_request(),
            w.bpf_ns_per_call(),
            w.vm_hwm_kb as f64 / 1024.0,
            w.run.wrk.requests,
            w.summary.counter("http_exchanges"),
            w.events_lost(),
            w.spans_lost(),
            w.unaccounted(),
            p.without.nginx_load,
            w.run.nginx_load,
            p.without.other_load,
            w.run.other_load,
        )?;
    }
    writeln!(
        s,
        "| **median** | | {:.0} | {:.0} | {throughput:.3} | {} | {} | {p99:.2} | {cpu_req:.2} | {cpu_traced:.2} | {bpf_req:.0} | {bpf_call:.0} | | | | | | | | |",
        median(pairs.iter().map(|p| p.without.wrk.rps).collect()),
        median(pairs.iter().map(|p| p.with.run.wrk.rps).collect()),
        fmt_latency(median(pairs.iter().map(|p| p.without.wrk.p99_us).collect())),
        fmt_latency(median(
            pairs.iter().map(|p| p.with.run.wrk.p99_us).collect()
        )),
    )?;
    writeln!(s)?;
    let errors: Vec<String> = pairs
        .iter()
        .enumerate()
        .flat_map(|(i, p)| {
            [("without", &p.without.wrk), ("with", &p.with.run.wrk)]
                .into_iter()
                .filter(|(_, w)| !w.errors.is_empty())
                .map(move |(which, w)| format!("pair {} {which}: {}", i + 1, w.errors))
        })
        .collect();
    if !by_counter.is_empty() {
        writeln!(
            s,
            "Losses counted by the agent (all with-agent runs): {}.\n",
            by_counter
                .iter()
                .map(|(name, n)| format!("`{name}` {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        )?;
    }
    if !errors.is_empty() {
        writeln!(s, "wrk reported errors: {}.\n", errors.join("; "))?;
    }

    writeln!(s, "### Agent CPU by thread (sum of all with-agent runs)\n")?;
    writeln!(s, "| thread | CPU s | µs per request |")?;
    writeln!(s, "|---|---|---|")?;
    let mut by_thread: BTreeMap<&str, u64> = BTreeMap::new();
    for p in pairs {
        for (name, ticks) in &p.with.agent_threads {
            *by_thread.entry(name.as_str()).or_default() += ticks;
        }
    }
    for (name, ticks) in &by_thread {
        writeln!(
            s,
            "| `{name}` | {:.2} | {:.2} |",
            *ticks as f64 / tck.max(1) as f64,
            ticks_to_us(*ticks, tck) / requests.max(1) as f64
        )?;
    }
    writeln!(s)?;

    writeln!(s, "### BPF programs (sum of all with-agent runs)\n")?;
    writeln!(
        s,
        "| program | calls | calls per request | ns per call | ns per request |"
    )?;
    writeln!(s, "|---|---|---|---|---|")?;
    let mut by_name: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for p in pairs {
        for prog in p.with.bpf.values() {
            let entry = by_name.entry(prog.name.clone()).or_default();
            entry.0 += prog.run_cnt;
            entry.1 += prog.run_time_ns;
        }
    }
    let reqs = requests.max(1) as f64;
    for (name, (cnt, ns)) in &by_name {
        writeln!(
            s,
            "| `{name}` | {cnt} | {:.2} | {:.0} | {:.0} |",
            *cnt as f64 / reqs,
            *ns as f64 / (*cnt).max(1) as f64,
            *ns as f64 / reqs
        )?;
    }
    writeln!(s)?;

    writeln!(s, "### How it was measured\n")?;
    let nginx_cmd = format!("taskset {}", nginx_args(Path::new("$DIR")).join(" "));
    let wrk_cmd = format!(
        "taskset {}",
        wrk_args(&RunConfig { port: 0, ..*cfg }).join(" ")
    )
    .replace("127.0.0.1:0/", "127.0.0.1:$PORT/");
    writeln!(
        s,
        "- {}, {}; nginx master + 1 worker pinned on CPU {NGINX_CPU}, wrk pinned on CPU {WRK_CPU}, \
         the agent not pinned (the scheduler puts it on either CPU, so its CPU time is taken from \
         nginx or from wrk, as on a busy server). One nginx serves all runs; a 2 s wrk warm-up precedes them.",
        env.nginx_version, env.wrk_version
    )?;
    writeln!(s, "- nginx: `{nginx_cmd}` with `$DIR/nginx.conf`:")?;
    writeln!(
        s,
        "\n```nginx\n{}```\n",
        nginx_conf(Path::new("$DIR"), 0).replace(":0;", ":$PORT;")
    )?;
    writeln!(
        s,
        "- load: `{wrk_cmd}` (Requests/sec, the 99% line of `--latency`, \"N requests in\")."
    )?;
    writeln!(
        s,
        "- agent: `target/release/agent {} > /dev/null` — a user's configuration: select nginx by \
         command name, console exporter (every span is built, formatted and written, to /dev/null). \
         Started after nginx, before each with-agent run; the run starts 0.5 s after it printed \
         `agent ready` and it is stopped with SIGINT after the run; its summary gives the counters.",
        AGENT_ARGS.join(" ")
    )?;
    writeln!(
        s,
        "- order: pair i runs without then with the agent, odd pairs the other way round (drift \
         cancels); each metric is the median over pairs of the per-pair value."
    )?;
    writeln!(
        s,
        "- agent CPU: utime+stime of all the agent's threads from `/proc/PID/stat` (in CLK_TCK \
         ticks), read after `agent ready` and again once the agent was idle after the run (so the \
         tail of queued events counts, start-up does not), divided by the requests wrk completed \
         (\"per request\") or by the agent's `http_exchanges` (\"per traced request\")."
    )?;
    writeln!(
        s,
        "- BPF: `sysctl -w kernel.bpf_stats_enabled=1` during the with-agent runs only{} (it adds \
         two clock reads per program call, so it slightly handicaps the with-agent runs); \
         `run_time_ns` and `run_cnt` of the programs the agent holds (from its `/proc/PID/fdinfo`, the \
         numbers `bpftool prog show` prints; names from bpftool), before and after the run. These \
         programs run in the traced process's and wrk's threads, not in the agent's, so they are \
         not part of the agent CPU above.",
        if bpf_stats.was_on {
            " (it was already on before the benchmark, and was left on)"
        } else {
            ", set back to 0 afterwards"
        }
    )?;
    writeln!(
        s,
        "- memory: VmHWM (peak) and VmRSS of the agent from `/proc/PID/status` at the end of each run."
    )?;
    writeln!(
        s,
        "- events lost: the agent's counters {}. Spans lost: {} (the same as the summary's \
         `export:` line). Unaccounted: requests wrk completed minus the agent's `http_exchanges` \
         minus the events lost (when positive), plus spans built but neither exported, failed nor \
         dropped. nginx also answers the requests in flight when wrk stops, so traced may exceed \
         completed by up to the connection count.",
        EVENT_LOSS_COUNTERS
            .iter()
            .map(|c| format!("`{c}`"))
            .collect::<Vec<_>>()
            .join(", "),
        SPAN_LOSS_COUNTERS
            .iter()
            .map(|c| format!("`{c}`"))
            .collect::<Vec<_>>()
            .join(", ")
    )?;
    writeln!(
        s,
        "- nginx CPUs / other load: CPU time of nginx, and of everything except nginx, wrk, the agent \
         and the benchmark itself (from `/proc/stat`), per second of the run, in CPUs."
    )?;
    writeln!(s, "{MARK_END}")?;
    Ok(s)
}

/// Replaces the section between the markers (or appends one), keeping the rest of the file.
fn replace_section(old: &str, section: &str) -> String {
    let section = section.trim_end();
    if let Some(start) = old.find(MARK_START)
        && let Some(end_rel) = old[start..].find(MARK_END)
    {
        let end = start + end_rel + MARK_END.len();
        return format!("{}{section}{}", &old[..start], &old[end..]);
    }
    let mut out = if old.trim().is_empty() {
        "# Benchmarks\n\nNumbers measured with `cargo xtask bench` (see xtask/src/bench.rs); \
         the section below is rewritten by each run.\n"
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

    const WRK: &str = "Running 10s test @ http://127.0.0.1:41234/
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   310.55us  402.12us  12.20ms   95.12%
    Req/Sec    51.93k     3.10k   56.01k    71.00%
  Latency Distribution
     50%  240.00us
     75%  301.00us
     90%  405.00us
     99%    1.52ms
  516884 requests in 10.00s, 75.43MB read
  Socket errors: connect 0, read 3, write 0, timeout 0
Requests/sec:  51684.32
Transfer/sec:      7.54MB
";

    #[test]
    fn parses_wrk_output() {
        let w = parse_wrk(WRK).expect("parse");
        assert_eq!(w.requests, 516_884);
        assert!((w.rps - 51_684.32).abs() < 1e-6);
        assert!((w.p99_us - 1520.0).abs() < 1e-6);
        assert!(w.errors.contains("read 3"));
        assert!(parse_wrk("nothing").is_err());
        assert!((parse_duration_us("812.00us").expect("us") - 812.0).abs() < 1e-9);
        assert!((parse_duration_us("2.00s").expect("s") - 2e6).abs() < 1e-6);
        assert!(parse_duration_us("2.00xs").is_err());
    }

    #[test]
    fn parses_agent_summary() {
        let lines: Vec<String> = "agent ready: press Ctrl-C to stop
agent: stopping: detaching probes and flushing spans
agent: summary
  kernel_data_events           1033772
  kernel_lost_ringbuf_full     2
  http_exchanges               516890
  spans_built                  516890
  export: 516890 exported, 0 failed, 1 dropped (queue full)"
            .lines()
            .map(String::from)
            .collect();
        let s = parse_summary(&lines).expect("parse");
        assert_eq!(s.counter("kernel_data_events"), 1_033_772);
        assert_eq!(s.counter("kernel_lost_ringbuf_full"), 2);
        assert_eq!(s.counter("http_exchanges"), 516_890);
        assert_eq!((s.exported, s.failed, s.dropped), (516_890, 0, 1));
        assert!(parse_summary(&lines[..2]).is_err());
    }

    #[test]
    fn replaces_only_the_section() {
        let old = format!("# B\n\nintro\n\n{MARK_START}\nold\n{MARK_END}\n\n## other\n");
        let new = replace_section(&old, &format!("{MARK_START}\nnew\n{MARK_END}\n"));
        assert_eq!(
            new,
            format!("# B\n\nintro\n\n{MARK_START}\nnew\n{MARK_END}\n\n## other\n")
        );
        let appended = replace_section("# B\n", &format!("{MARK_START}\nx\n{MARK_END}"));
        assert_eq!(appended, format!("# B\n\n{MARK_START}\nx\n{MARK_END}\n"));
        assert!(replace_section("", "s").starts_with("# Benchmarks"));
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
