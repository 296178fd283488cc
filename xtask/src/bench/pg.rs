//! A throwaway PostgreSQL answers `pgbench -S` (one primary-key SELECT per transaction) on
//! loopback, alternately without and with the agent (`agent --pid <postmaster> --comm pgbench`,
//! console exporter into /dev/null, or OTLP with `--export otlp`). Both ends are traced: the
//! backends (forked by the postmaster during the run, selected by the kernel at fork) and
//! pgbench (selected by name at exec), so every query gives two `db_statements` and two spans.
//!
//! The cluster: the end-to-end tests' [`PgServer`] (a copy of a cluster made once by `initdb -A
//! trust` as the `postgres` OS user, on tmpfs) with the benchmark's settings
//! ([`PgServer::start_bench`]: `fsync=off`, `autovacuum=off`, no statement log, default
//! shared_buffers) on 127.0.0.1:<free port>, filled once with `pgbench -i -s 1`, stopped (fast
//! shutdown, then SIGKILL of its process group) and removed at the end, also on errors and
//! Ctrl-C.
//!
//! Placement on the 2-core machine: the postmaster, and so every backend and auxiliary process
//! it forks, is pinned on CPU 1; pgbench (`-j 1`, one thread) on CPU 0; the agent is not pinned.
//! With 4 clients the 4 backends share CPU 1 and are the bottleneck while pgbench leaves part of
//! CPU 0 idle, as nginx and wrk do in the nginx benchmark.

use std::{
    fmt::Write as _,
    fs,
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, anyhow, bail};
use testkit::postgres::{INITDB_OPTIONS, PG_USER, SERVER_SETTINGS, pg_bin};
use testkit::process::{TestDir, kill_with_parent, tail};
use testkit::servers::children_of;
use testkit::{PgServer, pgbench_init};

use super::{
    AgentRun, BpfStats, EVENT_LOSS_COUNTERS, Environment, Options, Pair, SPAN_LOSS_COUNTERS, Sink,
    WithAgent, check_interrupted, code_list, first_line, fmt_latency, median,
    nonzero_loss_counters, process_and_reaped_ticks, process_ticks, processes_named,
    render_bpf_programs, render_threads, run_pair, yes_no,
};

pub(super) const MARK_START: &str = "<!-- bench:pg:start -->";
pub(super) const MARK_END: &str = "<!-- bench:pg:end -->";
const PG_CPU: &str = "1";
const PGBENCH_CPU: &str = "0";
const DATABASE: &str = "postgres";
/// `pgbench -i -s 1`: 100 000 accounts (13 MB of table), all in the default shared_buffers.
const SCALE: u32 = 1;
const WARM_UP_SECS: u64 = 2;
// Issue 13's targets on this machine kind (`-S -M prepared`, both ends traced).
const TARGET_TPS_RATIO: f64 = 0.80;
const TARGET_AGENT_US_PER_QUERY: f64 = 2.5;
const TARGET_BPF_NS_PER_QUERY: f64 = 1000.0;
const TARGET_VM_HWM_MIB: f64 = 64.0;
/// Statements pgbench runs on its setup connection before the clients connect (a builtin
/// script with `-n`): `select count(*) from pgbench_branches` and a partitioning query.
const PGBENCH_SETUP_STATEMENTS: u64 = 2;
/// Spans (and `db_statements`) per query: the client's and the server's.
const SIDES: u64 = 2;

/// pgbench's `-M`.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub(super) enum Mode {
    Simple,
    Extended,
    Prepared,
}

impl Mode {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Self::Simple => "simple",
            Self::Extended => "extended",
            Self::Prepared => "prepared",
        }
    }
}

/// Runs the PostgreSQL benchmark (every mode of `--pg-modes`); returns its BENCHMARKS.md section.
pub(super) fn run(
    opts: &Options,
    agent_bin: &Path,
    bpf_stats: &mut BpfStats,
    sink: &Sink,
) -> Result<String> {
    let env = Environment::read()?;
    let versions = Versions {
        postgres: first_line(Command::new(pg_bin("postgres")).arg("--version")),
        pgbench: first_line(Command::new(pg_bin("pgbench")).arg("--version")),
    };
    let dir = TestDir::new("bench-pgbench");
    let server = PgServer::start_bench(PG_CPU);
    eprintln!(
        "bench: PostgreSQL on 127.0.0.1:{} (postmaster {}); pgbench -i -s {SCALE}",
        server.port(),
        server.pid()
    );
    pgbench_init(&server, DATABASE, SCALE);
    let foreign_pgbench = processes_named("pgbench").len();
    if foreign_pgbench > 0 {
        eprintln!(
            "bench: warning: {foreign_pgbench} other pgbench process(es) running: the agent traces them too"
        );
    }

    let agent_args = agent_args(server.pid(), &opts.agent_arg);
    let with_agent = WithAgent {
        bin: agent_bin,
        args: &agent_args,
        sink,
    };
    let server_ticks = || server_ticks(&server);
    let mut results = Vec::with_capacity(opts.pg_modes.len());
    for &mode in &opts.pg_modes {
        let cfg = RunConfig {
            mode,
            duration: opts.duration,
            clients: opts.clients,
            clk_tck: env.clk_tck,
        };
        eprintln!("bench: pgbench -M {}: warming up", mode.as_str());
        run_pgbench(
            &server,
            &RunConfig {
                duration: WARM_UP_SECS,
                ..cfg
            },
            dir.path(),
        )?;
        check_interrupted()?;
        let mut pairs = Vec::with_capacity(opts.pairs);
        for index in 0..opts.pairs {
            let pair = run_pair(
                index,
                &with_agent,
                cfg.clk_tck,
                bpf_stats,
                &server_ticks,
                || run_pgbench(&server, &cfg, dir.path()),
            )?;
            check_alive(&server)?;
            eprintln!(
                "bench: -M {} pair {}/{}: {:.0} TPS without, {:.0} with (ratio {:.3}), p99 {} / {}, \
                 agent {:.2} µs/query, BPF {:.0} ns/query, {} db_statements for {} queries",
                mode.as_str(),
                index + 1,
                opts.pairs,
                pair.without.client.tps,
                pair.with.run.client.tps,
                pair.tps_ratio(),
                fmt_latency(pair.without.client.p99_us),
                fmt_latency(pair.with.run.client.p99_us),
                pair.with.agent_us_per_query(cfg.clk_tck),
                pair.with.bpf_ns_per_query(),
                pair.with.summary.counter("db_statements"),
                pair.with.queries(),
            );
            pairs.push(pair);
        }
        results.push(ModeResult { cfg, pairs });
    }
    bpf_stats.restore();
    drop(server);

    render(
        opts,
        sink,
        &env,
        &versions,
        &results,
        bpf_stats,
        foreign_pgbench,
    )
}

fn agent_args(postmaster: u32, extra: &[String]) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "--pid".into(),
        postmaster.to_string(),
        "--comm".into(),
        "pgbench".into(),
    ];
    args.extend(extra.iter().cloned());
    args
}

struct Versions {
    postgres: String,
    pgbench: String,
}

// ---------------------------------------------------------------------------------------------
// Runs

#[derive(Clone, Copy)]
struct RunConfig {
    mode: Mode,
    duration: u64,
    clients: u32,
    clk_tck: u64,
}

struct ModeResult {
    cfg: RunConfig,
    pairs: Vec<Pair<PgbenchStats>>,
}

impl Pair<PgbenchStats> {
    fn tps_ratio(&self) -> f64 {
        self.with.run.client.tps / self.without.client.tps
    }

    fn avg_latency_ratio(&self) -> f64 {
        self.with.run.client.latency_avg_us / self.without.client.latency_avg_us
    }

    fn p99_ratio(&self) -> f64 {
        self.with.run.client.p99_us / self.without.client.p99_us
    }
}

impl AgentRun<PgbenchStats> {
    /// Queries pgbench completed (`-S`: one statement per transaction).
    fn queries(&self) -> u64 {
        self.run.client.processed
    }

    fn agent_us_per_query(&self, clk_tck: u64) -> f64 {
        self.agent_us_per(self.queries(), clk_tck)
    }

    /// Per statement the agent saw (client and server side each count one).
    fn agent_us_per_statement(&self, clk_tck: u64) -> f64 {
        self.agent_us_per(self.summary.counter("db_statements"), clk_tck)
    }

    fn bpf_ns_per_query(&self) -> f64 {
        self.bpf_ns_per(self.queries())
    }

    /// Statements the agent should have seen: every query and pgbench's setup statements, on
    /// both sides.
    fn expected_statements(&self) -> u64 {
        SIDES * (self.queries() + PGBENCH_SETUP_STATEMENTS)
    }

    /// Statements expected but not seen, beyond the kernel events the agent counted as lost,
    /// plus spans built that were neither exported nor counted as dropped or failed.
    fn unaccounted(&self) -> u64 {
        let seen = self.summary.counter("db_statements");
        self.expected_statements()
            .saturating_sub(seen)
            .saturating_sub(self.events_lost())
            + self.spans_unsettled()
    }
}

// ---------------------------------------------------------------------------------------------
// pgbench

struct PgbenchStats {
    /// `number of transactions actually processed`.
    processed: u64,
    /// `tps = … (without initial connection time)`.
    tps: f64,
    /// `latency average = … ms`, in µs.
    latency_avg_us: f64,
    /// From the per-transaction log (`-l`).
    p50_us: f64,
    p99_us: f64,
    /// Transactions in the log (should equal `processed`).
    logged: u64,
}

/// pgbench's options for a run, the connection options and database excluded.
fn pgbench_args(cfg: &RunConfig, log_prefix: &str) -> Vec<String> {
    vec![
        "-n".into(),
        "-S".into(),
        "-M".into(),
        cfg.mode.as_str().into(),
        "-c".into(),
        cfg.clients.to_string(),
        "-j".into(),
        "1".into(),
        "-T".into(),
        cfg.duration.to_string(),
        "-l".into(),
        format!("--log-prefix={log_prefix}"),
    ]
}

/// `taskset -c 0 pgbench` of `server` (its client environment: TCP, database superuser, no
/// SSL/GSS, so the first bytes on the wire are the startup message), killed if we die.
fn pgbench_command(server: &PgServer) -> Command {
    let mut cmd = server.client_command("taskset", DATABASE);
    cmd.args(["-c", PGBENCH_CPU])
        .arg(pg_bin("pgbench"))
        .stdin(Stdio::null());
    kill_with_parent(&mut cmd);
    cmd
}

fn run_pgbench(server: &PgServer, cfg: &RunConfig, dir: &Path) -> Result<PgbenchStats> {
    let log_dir = dir.join("pgbench-log");
    let _ = fs::remove_dir_all(&log_dir);
    fs::create_dir_all(&log_dir).with_context(|| format!("creating {}", log_dir.display()))?;
    let prefix = log_dir.join("txn");
    let out = pgbench_command(server)
        .args(pgbench_args(cfg, &prefix.to_string_lossy()))
        .arg(DATABASE)
        .current_dir(&log_dir)
        .output()
        .context("cannot run pgbench")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!(
            "pgbench failed with {}:\n{}\n{}",
            out.status,
            tail(&stdout, 20),
            tail(&stderr, 20)
        );
    }
    let mut latencies = Vec::new();
    for entry in fs::read_dir(&log_dir).with_context(|| format!("reading {}", log_dir.display()))? {
        let entry = entry?;
        if !entry.file_name().to_string_lossy().starts_with("txn.") {
            continue;
        }
        let text = fs::read_to_string(entry.path())
            .with_context(|| format!("reading {}", entry.path().display()))?;
        latencies.extend(text.lines().filter_map(parse_log_latency_us));
    }
    let _ = fs::remove_dir_all(&log_dir);
    parse_pgbench(&stdout, latencies).with_context(|| {
        format!(
            "unexpected pgbench output:\n{stdout}\n{}",
            tail(&stderr, 10)
        )
    })
}

/// The latency (µs) of one line of pgbench's per-transaction log:
/// `client_id transaction_no time script_no time_epoch time_us`.
fn parse_log_latency_us(line: &str) -> Option<u64> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    if fields.len() < 6 {
        return None;
    }
    fields[2].parse().ok()
}

fn parse_pgbench(stdout: &str, mut latencies: Vec<u64>) -> Result<PgbenchStats> {
    let mut processed = None;
    let mut failed = 0;
    let mut tps = None;
    let mut latency_avg_us = None;
    for line in stdout.lines().map(str::trim) {
        let number = |text: &str| {
            text.split_whitespace()
                .next()
                .and_then(|n| n.parse::<f64>().ok())
        };
        if let Some(v) = line.strip_prefix("number of transactions actually processed:") {
            // "123456" or "123456/200000" (with -t).
            processed = v
                .trim()
                .split('/')
                .next()
                .and_then(|n| n.parse::<u64>().ok());
        } else if let Some(v) = line.strip_prefix("number of failed transactions:") {
            failed = number(v).unwrap_or(0.0) as u64;
        } else if let Some(v) = line.strip_prefix("latency average =") {
            latency_avg_us = number(v).map(|ms| ms * 1000.0);
        } else if let Some(v) = line.strip_prefix("tps =")
            && (v.contains("without initial connection time") || tps.is_none())
        {
            tps = number(v);
        }
    }
    let processed =
        processed.ok_or_else(|| anyhow!("no \"number of transactions actually processed\""))?;
    if processed == 0 || failed > 0 {
        bail!("pgbench processed {processed} transactions, {failed} failed");
    }
    latencies.sort_unstable();
    let percentile = |p: f64| -> f64 {
        if latencies.is_empty() {
            return f64::NAN;
        }
        let rank = ((p * latencies.len() as f64).ceil() as usize).clamp(1, latencies.len());
        latencies[rank - 1] as f64
    };
    Ok(PgbenchStats {
        processed,
        tps: tps.ok_or_else(|| anyhow!("no \"tps =\" line"))?,
        latency_avg_us: latency_avg_us.ok_or_else(|| anyhow!("no \"latency average\" line"))?,
        p50_us: percentile(0.50),
        p99_us: percentile(0.99),
        logged: latencies.len() as u64,
    })
}

// ---------------------------------------------------------------------------------------------
// The server

/// CPU ticks of the server: the postmaster, the children it reaped (backends of finished runs)
/// and its live children.
fn server_ticks(server: &PgServer) -> Result<u64> {
    let mut ticks = process_and_reaped_ticks(server.pid())?;
    for pid in children_of(server.pid()) {
        // A backend may exit between the listing and the read.
        ticks += process_ticks(pid).unwrap_or(0);
    }
    Ok(ticks)
}

/// Fails if the postmaster has exited (a zombie until the server's drop reaps it).
fn check_alive(server: &PgServer) -> Result<()> {
    let stat = fs::read_to_string(format!("/proc/{}/stat", server.pid())).unwrap_or_default();
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    if !matches!(state, Some(s) if s != "Z" && s != "X") {
        bail!("the postmaster exited:\n{}", tail(&server.log(), 30));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Report

/// The medians of one mode's pairs.
struct Summary {
    tps_without: f64,
    tps_with: f64,
    tps_ratio: f64,
    avg_ratio: f64,
    avg_without: f64,
    avg_with: f64,
    p50_without: f64,
    p50_with: f64,
    p99_ratio: f64,
    p99_without: f64,
    p99_with: f64,
    cpu_query: f64,
    cpu_statement: f64,
    bpf_query: f64,
    bpf_call: f64,
    total_query: f64,
    hwm_mib: f64,
    rss_mib: f64,
    events_lost: u64,
    spans_lost: u64,
    spans_built: u64,
    statements: u64,
    queries: u64,
    unaccounted: u64,
    other_load: f64,
}

impl Summary {
    fn of(r: &ModeResult) -> Self {
        let tck = r.cfg.clk_tck;
        let p = &r.pairs;
        let med = |f: &dyn Fn(&Pair<PgbenchStats>) -> f64| median(p.iter().map(f).collect());
        let sum = |f: &dyn Fn(&Pair<PgbenchStats>) -> u64| p.iter().map(f).sum::<u64>();
        Self {
            tps_without: med(&|p| p.without.client.tps),
            tps_with: med(&|p| p.with.run.client.tps),
            tps_ratio: med(&Pair::<PgbenchStats>::tps_ratio),
            avg_ratio: med(&Pair::<PgbenchStats>::avg_latency_ratio),
            avg_without: med(&|p| p.without.client.latency_avg_us),
            avg_with: med(&|p| p.with.run.client.latency_avg_us),
            p50_without: med(&|p| p.without.client.p50_us),
            p50_with: med(&|p| p.with.run.client.p50_us),
            p99_ratio: med(&Pair::<PgbenchStats>::p99_ratio),
            p99_without: med(&|p| p.without.client.p99_us),
            p99_with: med(&|p| p.with.run.client.p99_us),
            cpu_query: med(&|p| p.with.agent_us_per_query(tck)),
            cpu_statement: med(&|p| p.with.agent_us_per_statement(tck)),
            bpf_query: med(&|p| p.with.bpf_ns_per_query()),
            bpf_call: med(&|p| p.with.bpf_ns_per_call()),
            total_query: med(&|p| {
                p.with.agent_us_per_query(tck) + p.with.bpf_ns_per_query() / 1000.0
            }),
            hwm_mib: p.iter().map(|p| p.with.vm_hwm_kb).max().unwrap_or(0) as f64 / 1024.0,
            rss_mib: med(&|p| p.with.vm_rss_kb as f64 / 1024.0),
            events_lost: sum(&|p| p.with.events_lost()),
            spans_lost: sum(&|p| p.with.spans_lost()),
            spans_built: sum(&|p| p.with.summary.counter("spans_built")),
            statements: sum(&|p| p.with.summary.counter("db_statements")),
            queries: sum(&|p| p.with.queries()),
            unaccounted: sum(&|p| p.with.unaccounted()),
            other_load: median(
                p.iter()
                    .flat_map(|p| [p.without.other_load, p.with.run.other_load])
                    .collect(),
            ),
        }
    }
}

fn mode_flag(mode: Mode) -> String {
    format!("`-M {}`", mode.as_str())
}

fn render(
    opts: &Options,
    sink: &Sink,
    env: &Environment,
    versions: &Versions,
    results: &[ModeResult],
    bpf_stats: &BpfStats,
    foreign_pgbench: usize,
) -> Result<String> {
    let tck = env.clk_tck;
    let sums: Vec<Summary> = results.iter().map(Summary::of).collect();
    let modes: Vec<&str> = opts.pg_modes.iter().map(|m| m.as_str()).collect();

    let mut s = String::new();
    writeln!(s, "{MARK_START}")?;
    writeln!(
        s,
        "## PostgreSQL + pgbench on loopback, with and without the agent{}\n",
        sink.title()
    )?;
    writeln!(
        s,
        "Measured {} on Linux {}, {} CPUs ({}), CLK_TCK {}, {} pairs of {} s runs per query mode \
         (`cargo xtask bench pg --pairs {} --duration {} --clients {} --pg-modes {}{}{}`); {}, {}. \
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
        opts.clients,
        modes.join(","),
        sink.flag(),
        opts.agent_arg_flags(),
        versions.postgres,
        versions.pgbench,
        env.loadavg
    )?;

    writeln!(s, "### Result (medians of the per-pair values)\n")?;
    let header: Vec<String> = results.iter().map(|r| mode_flag(r.cfg.mode)).collect();
    writeln!(s, "| metric | {} | target |", header.join(" | "))?;
    writeln!(s, "|---|{}---|", "---|".repeat(results.len()))?;
    let mut row = |name: &str, target: &str, cell: &dyn Fn(&Summary) -> String| {
        let cells: Vec<String> = sums.iter().map(cell).collect();
        writeln!(s, "| {name} | {} | {target} |", cells.join(" | "))
    };
    row(
        "TPS ratio (with agent / without)",
        &format!("≥ {TARGET_TPS_RATIO}"),
        &|m| {
            format!(
                "{:.3} {}",
                m.tps_ratio,
                yes_no(m.tps_ratio >= TARGET_TPS_RATIO)
            )
        },
    )?;
    row("TPS without → with", "", &|m| {
        format!("{:.0} → {:.0}", m.tps_without, m.tps_with)
    })?;
    row("average latency ratio (pgbench)", "—", &|m| {
        format!(
            "{:.2} ({} → {})",
            m.avg_ratio,
            fmt_latency(m.avg_without),
            fmt_latency(m.avg_with)
        )
    })?;
    row("p99 latency ratio (`-l` log)", "—", &|m| {
        format!(
            "{:.2} ({} → {})",
            m.p99_ratio,
            fmt_latency(m.p99_without),
            fmt_latency(m.p99_with)
        )
    })?;
    row(
        "agent CPU (utime+stime) per query",
        &format!("≤ {TARGET_AGENT_US_PER_QUERY} µs"),
        &|m| {
            format!(
                "{:.2} µs {}",
                m.cpu_query,
                yes_no(m.cpu_query <= TARGET_AGENT_US_PER_QUERY)
            )
        },
    )?;
    row(
        "agent CPU per traced statement (÷ `db_statements`)",
        "—",
        &|m| format!("{:.2} µs", m.cpu_statement),
    )?;
    row(
        "BPF run time per query (bpf_stats)",
        &format!("≤ {TARGET_BPF_NS_PER_QUERY} ns"),
        &|m| {
            format!(
                "{:.0} ns ({:.0} ns per program call) {}",
                m.bpf_query,
                m.bpf_call,
                yes_no(m.bpf_query <= TARGET_BPF_NS_PER_QUERY)
            )
        },
    )?;
    row("agent CPU + BPF per query", "—", &|m| {
        format!("{:.2} µs", m.total_query)
    })?;
    row(
        "agent memory",
        &format!("VmHWM ≤ {TARGET_VM_HWM_MIB} MiB"),
        &|m| {
            format!(
                "VmHWM max {:.1} MiB, VmRSS median {:.1} MiB {}",
                m.hwm_mib,
                m.rss_mib,
                yes_no(m.hwm_mib <= TARGET_VM_HWM_MIB)
            )
        },
    )?;
    row("kernel events lost (counted by the agent)", "—", &|m| {
        m.events_lost.to_string()
    })?;
    row(
        "`db_statements` / `spans_built` per query (all with-agent runs)",
        "2 / 2",
        &|m| {
            let q = m.queries.max(1) as f64;
            format!(
                "{:.3} / {:.3} ({} / {} for {} queries)",
                m.statements as f64 / q,
                m.spans_built as f64 / q,
                m.statements,
                m.spans_built,
                m.queries
            )
        },
    )?;
    row("spans dropped or failed in export (counted)", "—", &|m| {
        format!(
            "{} of {} built ({:.1} %)",
            m.spans_lost,
            m.spans_built,
            m.spans_lost as f64 * 100.0 / m.spans_built.max(1) as f64
        )
    })?;
    row("unaccounted loss", "zero", &|m| {
        format!("{} {}", m.unaccounted, yes_no(m.unaccounted == 0))
    })?;
    writeln!(s)?;

    for (r, m) in results.iter().zip(&sums) {
        let flag = mode_flag(r.cfg.mode);
        let tps_ok = m.tps_ratio >= TARGET_TPS_RATIO;
        let cpu_ok = m.cpu_query <= TARGET_AGENT_US_PER_QUERY;
        let bpf_ok = m.bpf_query <= TARGET_BPF_NS_PER_QUERY;
        let memory_ok = m.hwm_mib <= TARGET_VM_HWM_MIB;
        let loss_ok = m.unaccounted == 0;
        if tps_ok && cpu_ok && bpf_ok && memory_ok && loss_ok {
            writeln!(s, "**{flag}: target met.**\n")?;
        } else {
            let mut missed = Vec::new();
            if !tps_ok {
                missed.push(format!("TPS ratio {:.3} < {TARGET_TPS_RATIO}", m.tps_ratio));
            }
            if !cpu_ok {
                missed.push(format!(
                    "agent CPU {:.2} µs per query > {TARGET_AGENT_US_PER_QUERY} µs",
                    m.cpu_query
                ));
            }
            if !bpf_ok {
                missed.push(format!(
                    "BPF {:.0} ns per query > {TARGET_BPF_NS_PER_QUERY} ns",
                    m.bpf_query
                ));
            }
            if !memory_ok {
                missed.push(format!(
                    "agent VmHWM {:.1} MiB > {TARGET_VM_HWM_MIB} MiB",
                    m.hwm_mib
                ));
            }
            if !loss_ok {
                missed.push(format!(
                    "{} statements or spans lost without a counter",
                    m.unaccounted
                ));
            }
            writeln!(
                s,
                "**{flag}: target NOT met:** {}. The agent's cost per query was {:.2} µs of its own \
                 CPU (reading events, parsing both directions of both connections, building and \
                 exporting two spans) plus {:.0} ns of BPF programs running in the backends' and \
                 pgbench's threads.\n",
                missed.join("; "),
                m.cpu_query,
                m.bpf_query
            )?;
        }
        if m.spans_lost > 0 {
            writeln!(
                s,
                "**{flag}: spans lost:** {} of the {} spans built ({:.1} %) were dropped or failed \
                 in export (counted, so not \"unaccounted\").\n",
                m.spans_lost,
                m.spans_built,
                m.spans_lost as f64 * 100.0 / m.spans_built.max(1) as f64
            )?;
        }
        if m.other_load > 0.2 {
            writeln!(
                s,
                "**Noise ({flag}):** the machine was not idle: other processes used a median of \
                 {:.2} CPUs during the runs (column \"other load\"), competing with PostgreSQL, \
                 pgbench and the agent. Ratios from such a run are noisier than on an idle machine.\n",
                m.other_load
            )?;
        }
        let unsettled: Vec<String> = r
            .pairs
            .iter()
            .enumerate()
            .filter(|(_, p)| !p.with.settled)
            .map(|(i, _)| (i + 1).to_string())
            .collect();
        if !unsettled.is_empty() {
            writeln!(
                s,
                "**Note ({flag}):** in pair(s) {} the agent was still busy 30 s after pgbench \
                 stopped; the CPU read then misses the rest of its backlog (an under-estimate).\n",
                unsettled.join(", ")
            )?;
        }
        let unlogged: u64 = r
            .pairs
            .iter()
            .flat_map(|p| [&p.without.client, &p.with.run.client])
            .map(|c| c.processed.abs_diff(c.logged))
            .sum();
        if unlogged > 0 {
            writeln!(
                s,
                "**Note ({flag}):** pgbench's per-transaction logs and its processed counts differ \
                 by {unlogged} transactions over all runs; the p99 comes from the logs.\n"
            )?;
        }
        if !r
            .pairs
            .iter()
            .all(|p| p.with.bpf_stats_on && p.with.bpf_total().run_cnt > 0)
        {
            writeln!(
                s,
                "**Note ({flag}):** some with-agent runs saw no BPF statistics (bpf_stats_enabled \
                 switched off by someone else?); their BPF numbers read 0.\n"
            )?;
        }
    }
    if foreign_pgbench > 0 {
        writeln!(
            s,
            "**Note:** {foreign_pgbench} other pgbench process(es) were running on the machine; \
             `--comm pgbench` selected them too.\n"
        )?;
    }

    for (r, m) in results.iter().zip(&sums) {
        render_mode(&mut s, r, m, tck)?;
    }

    render_method(&mut s, opts, sink, versions, results, bpf_stats)?;
    writeln!(s, "{MARK_END}")?;
    Ok(s)
}

fn render_mode(s: &mut String, r: &ModeResult, m: &Summary, tck: u64) -> Result<()> {
    let flag = mode_flag(r.cfg.mode);
    let pairs = &r.pairs;
    writeln!(s, "### {flag}: per pair\n")?;
    writeln!(
        s,
        "| pair | order | TPS without | TPS with | ratio | avg latency without / with | \
         p50 without / with | p99 without | p99 with | p99 ratio | agent µs/query | agent µs/statement | BPF ns/query | \
         BPF ns/call | VmHWM MiB | queries (with) | db_statements | spans built | events lost | \
         spans lost | unaccounted | postgres CPUs w/o / with | other load w/o / with |"
    )?;
    writeln!(s, "|{}", "---|".repeat(23))?;
    for (i, p) in pairs.iter().enumerate() {
        let w = &p.with;
        writeln!(
            s,
            "| {} | {} | {:.0} | {:.0} | {:.3} | {} / {} | {} / {} | {} | {} | {:.2} | {:.2} | {:.2} | {:.0} | \
             {:.0} | {:.1} | {} | {} | {} | {} | {} | {} | {:.2} / {:.2} | {:.2} / {:.2} |",
            i + 1,
            if p.agent_first {
                "with, without"
            } else {
                "without, with"
            },
            p.without.client.tps,
            w.run.client.tps,
            p.tps_ratio(),
            fmt_latency(p.without.client.latency_avg_us),
            fmt_latency(w.run.client.latency_avg_us),
            fmt_latency(p.without.client.p50_us),
            fmt_latency(w.run.client.p50_us),
            fmt_latency(p.without.client.p99_us),
            fmt_latency(w.run.client.p99_us),
            p.p99_ratio(),
            w.agent_us_per_query(tck),
            w.agent_us_per_statement(tck),
            w.bpf_ns_per_query(),
            w.bpf_ns_per_call(),
            w.vm_hwm_kb as f64 / 1024.0,
            w.queries(),
            w.summary.counter("db_statements"),
            w.summary.counter("spans_built"),
            w.events_lost(),
            w.spans_lost(),
            w.unaccounted(),
            p.without.server_load,
            w.run.server_load,
            p.without.other_load,
            w.run.other_load,
        )?;
    }
    writeln!(
        s,
        "| **median** | | {:.0} | {:.0} | {:.3} | {} / {} | {} / {} | {} | {} | {:.2} | {:.2} | {:.2} | {:.0} | \
         {:.0} | | | | | | | | | |",
        m.tps_without,
        m.tps_with,
        m.tps_ratio,
        fmt_latency(m.avg_without),
        fmt_latency(m.avg_with),
        fmt_latency(m.p50_without),
        fmt_latency(m.p50_with),
        fmt_latency(m.p99_without),
        fmt_latency(m.p99_with),
        m.p99_ratio,
        m.cpu_query,
        m.cpu_statement,
        m.bpf_query,
        m.bpf_call,
    )?;
    writeln!(s)?;
    let losses = nonzero_loss_counters(pairs.iter().map(|p| &p.with));
    if !losses.is_empty() {
        writeln!(
            s,
            "Losses counted by the agent (all with-agent runs): {losses}.\n"
        )?;
    }
    let queries: u64 = pairs.iter().map(|p| p.with.queries()).sum();
    writeln!(
        s,
        "#### {flag}: agent CPU by thread (sum of all with-agent runs)\n"
    )?;
    render_threads(s, pairs.iter().map(|p| &p.with), tck, "query", queries)?;
    writeln!(
        s,
        "#### {flag}: BPF programs (sum of all with-agent runs)\n"
    )?;
    render_bpf_programs(s, pairs.iter().map(|p| &p.with), "query", queries)?;
    Ok(())
}

fn render_method(
    s: &mut String,
    opts: &Options,
    sink: &Sink,
    versions: &Versions,
    results: &[ModeResult],
    bpf_stats: &BpfStats,
) -> Result<()> {
    writeln!(s, "### How it was measured\n")?;
    writeln!(
        s,
        "- {}, {}; the postmaster is pinned on CPU {PG_CPU} (every backend and auxiliary process \
         it forks inherits that), pgbench (`-j 1`: one thread) on CPU {PGBENCH_CPU}, the agent \
         not pinned. With {} clients the backends share CPU {PG_CPU} and are the bottleneck; \
         pgbench leaves part of CPU {PGBENCH_CPU} idle, and the scheduler runs the agent where \
         it finds room, so its CPU time is taken from the server or from pgbench, as on a busy \
         server. One cluster serves all runs.",
        versions.postgres, versions.pgbench, opts.clients
    )?;
    let settings: String = SERVER_SETTINGS.iter().map(|s| format!(" -c {s}")).collect();
    writeln!(
        s,
        "- cluster: a copy of a cluster made by `initdb -D $DATA {}` as the `{PG_USER}` OS user \
         (made once, kept on tmpfs), then `taskset -c {PG_CPU} {} -D $DATA -p $PORT -c \
         listen_addresses=127.0.0.1 -c unix_socket_directories=$DIR{settings}` as `{PG_USER}` \
         (default shared_buffers, 128 MB; no statement logging), filled once with `pgbench -i -q \
         -s {SCALE}` (100 000 accounts, 13 MB: every query is served from shared buffers); a \
         {WARM_UP_SECS} s pgbench run per mode precedes its pairs. Removed at the end (fast \
         shutdown, then SIGKILL of its process group).",
        INITDB_OPTIONS.join(" "),
        pg_bin("postgres").display(),
    )?;
    for r in results {
        writeln!(
            s,
            "- load ({}): `taskset -c {PGBENCH_CPU} pgbench {} {DATABASE}` with `PGHOST=127.0.0.1 \
             PGPORT=$PORT PGUSER={PG_USER} PGSSLMODE=disable PGGSSENCMODE=disable` — `-S`: one `SELECT abalance FROM pgbench_accounts WHERE aid = $1` per \
             transaction, so transactions = queries. TPS is pgbench's `tps = … (without initial \
             connection time)`, the average latency its `latency average`, the p99 the 99th \
             percentile of the per-transaction log `-l` (every transaction; pgbench writes it to a \
             file in both kinds of runs, the agent does not trace file writes).",
            mode_flag(r.cfg.mode),
            pgbench_args(&r.cfg, "$DIR/txn").join(" ")
        )?;
    }
    writeln!(
        s,
        "- agent: `target/release/agent {} > /dev/null` — the postmaster by pid (the backends it \
         forks during the run are selected by the kernel at fork), pgbench by command name (at \
         exec); {}. Both ends of every connection are traced: each query is one client \
         statement (pgbench) and one server statement (backend), 2 `db_statements` and 2 spans. Started before each \
         with-agent run; the run starts 0.5 s after it printed `agent ready` and once it is idle; \
         it is stopped with SIGTERM after the run and its summary gives the counters.",
        agent_args(0, &opts.agent_arg)
            .join(" ")
            .replace("--pid 0", "--pid $POSTMASTER"),
        sink.describe()
    )?;
    writeln!(
        s,
        "- order: pair i runs without then with the agent, odd pairs the other way round (drift \
         cancels); each metric is the median over pairs of the per-pair value."
    )?;
    writeln!(
        s,
        "- agent CPU: utime+stime of all the agent's threads from `/proc/PID/stat` (CLK_TCK \
         ticks), read once the agent was idle after `agent ready` and again once it was idle after \
         the run (the tail of queued events counts, start-up does not), divided by the queries \
         pgbench completed (\"per query\") or by the agent's `db_statements` (\"per statement\", \
         two per query)."
    )?;
    writeln!(
        s,
        "- BPF: `kernel.bpf_stats_enabled=1` during the with-agent runs only{} (it adds two \
         clock reads per program call, a slight handicap for the with-agent runs); `run_time_ns` \
         and `run_cnt` of the programs the agent holds (its `/proc/PID/fdinfo`), before and after \
         the run, divided by the queries. They run in the backends' and pgbench's threads, not in \
         the agent's, so they are not part of the agent CPU.",
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
        "- events lost: the agent's counters {}. Spans lost: {}. Unaccounted: the statements \
         expected (2 × (queries + the {PGBENCH_SETUP_STATEMENTS} statements of pgbench's setup \
         connection)) minus the agent's `db_statements` minus the events lost, when positive, plus \
         spans built but neither exported, failed nor dropped. The backends may also answer a \
         query in flight when pgbench stops, so `db_statements` may exceed the expected count by \
         a few.",
        code_list(EVENT_LOSS_COUNTERS),
        code_list(SPAN_LOSS_COUNTERS)
    )?;
    writeln!(
        s,
        "- postgres CPUs / other load: CPU time of the postmaster and its children (live ones, and \
         the backends it reaped: its cutime/cstime), and of everything except PostgreSQL, \
         pgbench, the agent and the benchmark itself (from `/proc/stat`), per second of the run, \
         in CPUs."
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PGBENCH: &str = "pgbench (15.18 (Debian 15.18-0+deb12u1))
transaction type: <builtin: select only>
scaling factor: 1
query mode: prepared
number of clients: 4
number of threads: 1
maximum number of tries: 1
duration: 5 s
number of transactions actually processed: 20071
number of failed transactions: 0 (0.000%)
latency average = 0.989 ms
initial connection time = 40.200 ms
tps = 4042.784915 (without initial connection time)
";

    #[test]
    fn parses_pgbench_output_and_log() {
        let log = "0 1 10899 0 1795399891 576419\n2 1 2023 0 1795399891 576451\nbad line\n";
        let latencies: Vec<u64> = log.lines().filter_map(parse_log_latency_us).collect();
        assert_eq!(latencies, vec![10899, 2023]);
        let mut many: Vec<u64> = (1..=1000).rev().collect();
        many.extend(&latencies);
        let p = parse_pgbench(PGBENCH, many).expect("parse");
        assert_eq!(p.processed, 20071);
        assert!((p.tps - 4042.784915).abs() < 1e-6);
        assert!((p.latency_avg_us - 989.0).abs() < 1e-6);
        assert_eq!(p.logged, 1002);
        // 1002 values: 1..=1000, 2023, 10899; p99 is the 992nd.
        assert!((p.p99_us - 992.0).abs() < 1e-9);
        assert!((p.p50_us - 501.0).abs() < 1e-9);
        assert!(parse_pgbench("nothing", vec![]).is_err());
        let failed = PGBENCH.replace(
            "failed transactions: 0 (0.000%)",
            "failed transactions: 3 (0.010%)",
        );
        assert!(parse_pgbench(&failed, vec![1]).is_err());
    }
}
