//! nginx answers a tiny response on loopback while wrk loads it, alternately without and with
//! the agent (`agent --comm nginx`, console exporter into /dev/null or `--export otlp`, so
//! every request is traced and its span built and exported). Each pair of runs gives a throughput ratio and a p99
//! latency ratio; the with-agent run also gives the agent's CPU time per request, the BPF run
//! time per request (kernel `bpf_stats`), its memory and what it lost.
//!
//! Placement on the 2-core machine: the nginx master and its single worker are pinned on CPU 1,
//! wrk on CPU 0, the agent is not pinned (it takes its CPU from whichever side it lands on,
//! as it would on a loaded server).

use std::{
    fmt::Write as _,
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, anyhow, bail};
use testkit::{HttpServer as _, NginxServer, nginx_bin};

use super::{
    AgentRun, BpfStats, EVENT_LOSS_COUNTERS, Environment, Options, Pair, SPAN_LOSS_COUNTERS, Sink,
    WithAgent, check_interrupted, code_list, fmt_latency, median, nonzero_loss_counters,
    process_ticks, processes_named, render_bpf_programs, render_threads, run_pair, yes_no,
};

pub(super) const NGINX_CPU: &str = "1";
const WRK_CPU: &str = "0";
/// Plain HTTP, HTTPS (nginx's `ssl` listener with a certificate made for the run; the agent
/// reads the plaintext through its OpenSSL probes), or plain HTTP while the agent selects
/// another process (what every process on a node pays for the agent being there).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Variant {
    Http,
    Https,
    Untraced,
}

impl Variant {
    pub(super) fn mark_start(self) -> &'static str {
        match self {
            Variant::Http => "<!-- bench:nginx:start -->",
            Variant::Https => "<!-- bench:nginx-https:start -->",
            Variant::Untraced => "<!-- bench:nginx-untraced:start -->",
        }
    }

    pub(super) fn mark_end(self) -> &'static str {
        match self {
            Variant::Http => "<!-- bench:nginx:end -->",
            Variant::Https => "<!-- bench:nginx-https:end -->",
            Variant::Untraced => "<!-- bench:nginx-untraced:end -->",
        }
    }

    /// The URL scheme wrk uses.
    fn scheme(self) -> &'static str {
        match self {
            Variant::Http | Variant::Untraced => "http",
            Variant::Https => "https",
        }
    }

    /// The `cargo xtask bench` argument that runs it.
    fn bench_name(self) -> &'static str {
        match self {
            Variant::Http => "nginx",
            Variant::Https => "nginx-https",
            Variant::Untraced => "nginx-untraced",
        }
    }

    /// nginx.conf with the listener for this variant (`@CERT_DIR@` still to be filled).
    pub(super) fn conf(self) -> String {
        let (listen, tls) = match self {
            Variant::Http | Variant::Untraced => ("", ""),
            Variant::Https => (
                " ssl",
                "\n        ssl_certificate @CERT_DIR@/cert.pem;\n        ssl_certificate_key @CERT_DIR@/key.pem;",
            ),
        };
        NGINX_CONF.replace("@SSL@", listen).replace("@TLS@", tls)
    }
}

/// A self-signed certificate for 127.0.0.1 (the openssl CLI), in a directory of its own.
struct Certificate {
    dir: std::path::PathBuf,
}

impl Certificate {
    fn make() -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("agent-bench-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let out = Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            ])
            .args([
                "-subj",
                "/CN=127.0.0.1",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
            ])
            .arg("-keyout")
            .arg(dir.join("key.pem"))
            .arg("-out")
            .arg(dir.join("cert.pem"))
            .stdin(Stdio::null())
            .output()
            .context("cannot run openssl (the openssl CLI makes the benchmark's certificate)")?;
        if !out.status.success() {
            bail!(
                "openssl could not make a certificate: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(Self { dir })
    }
}

impl Drop for Certificate {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
/// Issue 13's targets on this machine kind (`None`: none set).
struct Targets {
    throughput_ratio: f64,
    agent_us_per_traced: Option<f64>,
    bpf_ns_per_request: f64,
    vm_hwm_mib: Option<f64>,
}

impl Variant {
    fn targets(self) -> Targets {
        match self {
            // Every request traced (the https run is judged by the same numbers).
            Variant::Http | Variant::Https => Targets {
                throughput_ratio: 0.80,
                agent_us_per_traced: Some(0.8),
                bpf_ns_per_request: 450.0,
                vm_hwm_mib: Some(64.0),
            },
            Variant::Untraced => Targets {
                throughput_ratio: 0.97,
                agent_us_per_traced: None,
                bpf_ns_per_request: 150.0,
                vm_hwm_mib: None,
            },
        }
    }
}

/// The target column of a result row: `≤ 0.8 µs`, or `—` when none is set.
fn at_most(target: Option<f64>, unit: &str) -> String {
    target.map_or_else(|| "—".to_string(), |t| format!("≤ {t} {unit}"))
}

/// Runs the nginx benchmark; returns its BENCHMARKS.md section.
pub(super) fn run(
    opts: &Options,
    agent_bin: &Path,
    bpf_stats: &mut BpfStats,
    sink: &Sink,
    variant: Variant,
) -> Result<String> {
    let env = Environment::read()?;
    let versions = Versions::read();
    let certificate = match variant {
        Variant::Https => Some(Certificate::make()?),
        Variant::Http | Variant::Untraced => None,
    };
    let conf = variant.conf().replace(
        "@CERT_DIR@",
        &certificate
            .as_ref()
            .map(|c| c.dir.display().to_string())
            .unwrap_or_default(),
    );
    let nginx = NginxServer::start_with(&conf, Some(NGINX_CPU));
    let (master, worker) = (nginx.master_pid(), nginx.worker_pid());
    let foreign_nginx = processes_named("nginx")
        .into_iter()
        .filter(|&pid| pid != master && pid != worker)
        .count();
    if foreign_nginx > 0 {
        eprintln!(
            "bench: warning: {foreign_nginx} other nginx process(es) running: the agent traces them too"
        );
    }
    eprintln!(
        "bench: nginx ({}) on 127.0.0.1:{} (master {master}, worker {worker}); warming up",
        variant.scheme(),
        nginx.port()
    );
    let cfg = RunConfig {
        variant,
        port: nginx.port(),
        duration: opts.duration,
        connections: opts.connections,
        clk_tck: env.clk_tck,
    };
    run_wrk(&RunConfig { duration: 2, ..cfg })?;
    check_interrupted()?;

    let idle = match variant {
        Variant::Untraced => Some(IdleProcess::start()?),
        Variant::Http | Variant::Https => None,
    };
    let agent_args = agent_args(opts, idle.as_ref());
    let with_agent = WithAgent {
        bin: agent_bin,
        args: &agent_args,
        sink,
    };
    let nginx_ticks = || Ok(process_ticks(master)? + process_ticks(worker)?);
    let mut pairs = Vec::with_capacity(opts.pairs);
    for index in 0..opts.pairs {
        let pair = run_pair(
            index,
            &with_agent,
            cfg.clk_tck,
            bpf_stats,
            &nginx_ticks,
            || run_wrk(&cfg),
        )?;
        eprintln!(
            "bench: pair {}/{}: {:.0} req/s without, {:.0} with (ratio {:.3}), p99 {} / {}, agent {:.2} µs/req, BPF {:.0} ns/req",
            index + 1,
            opts.pairs,
            pair.without.client.rps,
            pair.with.run.client.rps,
            pair.throughput_ratio(),
            fmt_latency(pair.without.client.p99_us),
            fmt_latency(pair.with.run.client.p99_us),
            pair.with.agent_us_per_request(cfg.clk_tck),
            pair.with.bpf_ns_per_request(),
        );
        pairs.push(pair);
    }
    bpf_stats.restore();
    drop(nginx);

    render(
        opts,
        sink,
        &env,
        &versions,
        &cfg,
        &pairs,
        bpf_stats,
        foreign_nginx,
        &agent_args,
    )
}

/// Versions of the programs, for the report.
struct Versions {
    nginx: String,
    wrk: String,
}

impl Versions {
    fn read() -> Self {
        Self {
            nginx: super::first_line(Command::new(nginx_bin()).arg("-v"))
                .trim_start_matches("nginx version: ")
                .to_string(),
            wrk: super::first_line(Command::new("wrk").arg("--version"))
                .split("Copyright")
                .next()
                .unwrap_or_default()
                .trim()
                .to_string(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Runs

#[derive(Clone, Copy)]
struct RunConfig {
    variant: Variant,
    port: u16,
    duration: u64,
    connections: u32,
    clk_tck: u64,
}

impl AgentRun<WrkStats> {
    fn agent_us_per_request(&self, clk_tck: u64) -> f64 {
        self.agent_us_per(self.run.client.requests, clk_tck)
    }

    fn agent_us_per_traced(&self, clk_tck: u64) -> f64 {
        self.agent_us_per(self.summary.counter("http_exchanges"), clk_tck)
    }

    fn bpf_ns_per_request(&self) -> f64 {
        self.bpf_ns_per(self.run.client.requests)
    }

    /// Requests wrk completed that produced no exchange, beyond the losses the agent counted,
    /// plus spans built that were neither exported nor counted as dropped or failed.
    fn unaccounted(&self) -> u64 {
        // Requests head sampling left out (`--sample-ratio`) are counted, not lost.
        let traced =
            self.summary.counter("http_exchanges") + self.summary.counter("requests_unsampled");
        let missing = self.run.client.requests.saturating_sub(traced);
        missing.saturating_sub(self.events_lost()) + self.spans_unsettled()
    }
}

impl Pair<WrkStats> {
    fn throughput_ratio(&self) -> f64 {
        self.with.run.client.rps / self.without.client.rps
    }

    fn p99_ratio(&self) -> f64 {
        self.with.run.client.p99_us / self.without.client.p99_us
    }
}

// ---------------------------------------------------------------------------------------------
// wrk

pub(super) struct WrkStats {
    pub(super) requests: u64,
    pub(super) rps: f64,
    pub(super) p99_us: f64,
    /// Socket errors and non-2xx responses, as wrk printed them (empty: none).
    pub(super) errors: String,
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
        format!("{}://127.0.0.1:{}/", cfg.variant.scheme(), cfg.port),
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

pub(super) fn parse_wrk(text: &str) -> Result<WrkStats> {
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

/// nginx's configuration: `@PREFIX@` is its private directory, `@PORT@` a free loopback port.
const NGINX_CONF: &str = "# Written by `cargo xtask bench`.
daemon off;
master_process on;
worker_processes 1;
pid @PREFIX@/nginx.pid;
error_log @PREFIX@/error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    default_type text/plain;
    keepalive_timeout 65s;
    keepalive_requests 1000;
    client_body_temp_path @PREFIX@/client_body;
    proxy_temp_path @PREFIX@/proxy;
    fastcgi_temp_path @PREFIX@/fastcgi;
    uwsgi_temp_path @PREFIX@/uwsgi;
    scgi_temp_path @PREFIX@/scgi;
    server {
        listen 127.0.0.1:@PORT@@SSL@;@TLS@
        location / { return 200 \"hello\\n\"; }
    }
}
";

/// What the agent selects: nginx by command name (a user's configuration), or only the idle
/// process `idle`; then any `--agent-arg`.
fn agent_args(opts: &Options, idle: Option<&IdleProcess>) -> Vec<String> {
    let mut args = match idle {
        None => vec!["--comm".to_string(), "nginx".to_string()],
        // --verbose: the summary lists counters at zero too (spans_built is read from it).
        Some(idle) => vec![
            "--pid".to_string(),
            idle.0.id().to_string(),
            "--verbose".to_string(),
        ],
    };
    args.extend(opts.agent_arg.iter().cloned());
    args
}

/// A process that does nothing (`sleep infinity`), for the agent to select instead of nginx;
/// killed when dropped.
struct IdleProcess(std::process::Child);

impl IdleProcess {
    fn start() -> Result<Self> {
        let child = Command::new("sleep")
            .arg("infinity")
            .stdin(Stdio::null())
            .spawn()
            .context(
                "cannot start `sleep infinity` (the process the agent selects instead of nginx)",
            )?;
        Ok(Self(child))
    }
}

impl Drop for IdleProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[allow(clippy::too_many_arguments)] // a section's inputs, each read once
fn render(
    opts: &Options,
    sink: &Sink,
    env: &Environment,
    versions: &Versions,
    cfg: &RunConfig,
    pairs: &[Pair<WrkStats>],
    bpf_stats: &BpfStats,
    foreign_nginx: usize,
    agent_args: &[String],
) -> Result<String> {
    let tck = cfg.clk_tck;
    let throughput = median(pairs.iter().map(|p| p.throughput_ratio()).collect());
    let p99 = median(pairs.iter().map(|p| p.p99_ratio()).collect());
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
    let loss_counters = nonzero_loss_counters(pairs.iter().map(|p| &p.with));
    let unaccounted: u64 = pairs.iter().map(|p| p.with.unaccounted()).sum();
    let requests: u64 = pairs.iter().map(|p| p.with.run.client.requests).sum();
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

    let targets = cfg.variant.targets();
    let throughput_ok = throughput >= targets.throughput_ratio;
    let cpu_ok = targets.agent_us_per_traced.is_none_or(|t| cpu_traced <= t);
    let bpf_cost_ok = bpf_req <= targets.bpf_ns_per_request;
    let memory_ok = targets.vm_hwm_mib.is_none_or(|t| hwm_mib <= t);
    // Untraced: nothing of nginx may reach the agent.
    let untraced = cfg.variant == Variant::Untraced;
    let loss_ok = if untraced {
        traced == 0 && spans_built == 0
    } else {
        unaccounted == 0
    };
    let all_ok = throughput_ok && cpu_ok && bpf_cost_ok && memory_ok && loss_ok;

    let mut s = String::new();
    writeln!(s, "{}", cfg.variant.mark_start())?;
    match cfg.variant {
        Variant::Http => writeln!(
            s,
            "## nginx + wrk on loopback, with and without the agent{}\n",
            sink.title()
        )?,
        Variant::Https => writeln!(
            s,
            "## nginx over https (TLS) + wrk on loopback, with and without the agent{}\n\n\
             The agent reads the plaintext through its OpenSSL probes (uprobes on `SSL_read`, \
             `SSL_write` and their `_ex` forms in `libssl.so.3`); everything else as in the \
             plain HTTP benchmark.\n",
            sink.title()
        )?,
        Variant::Untraced => writeln!(
            s,
            "## nginx + wrk on loopback, with and without the agent selecting another process{}\n\n\
             The agent runs but selects only an idle `sleep` (`--pid`): what every process on a \
             node pays for the agent being there. Nothing of nginx's may be traced.\n",
            sink.title()
        )?,
    }
    writeln!(
        s,
        "Measured {} on Linux {}, {} CPUs ({}), CLK_TCK {}, {} pairs of {} s runs \
         (`cargo xtask bench {} --pairs {} --duration {} --connections {}{}{}`). \
         Load average when it started: {}.\n",
        env.date,
        env.kernel,
        env.cpus,
        env.cpu_model,
        env.clk_tck,
        opts.pairs,
        opts.duration,
        cfg.variant.bench_name(),
        opts.pairs,
        opts.duration,
        opts.connections,
        sink.flag(),
        opts.agent_arg_flags(),
        env.loadavg
    )?;

    writeln!(s, "### Result (medians of the per-pair values)\n")?;
    writeln!(s, "| metric | measured | target | met |")?;
    writeln!(s, "|---|---|---|---|")?;
    writeln!(
        s,
        "| throughput ratio (with agent / without) | {throughput:.3} | ≥ {} | {} |",
        targets.throughput_ratio,
        yes_no(throughput_ok)
    )?;
    writeln!(s, "| p99 latency ratio (with / without) | {p99:.2} | — | |")?;
    if !untraced {
        writeln!(
            s,
            "| agent CPU (utime+stime) per traced request | {cpu_traced:.2} µs | {} | {} |",
            at_most(targets.agent_us_per_traced, "µs"),
            yes_no(cpu_ok)
        )?;
    }
    writeln!(
        s,
        "| agent CPU per completed wrk request | {cpu_req:.2} µs | — | |"
    )?;
    writeln!(
        s,
        "| BPF run time per request (bpf_stats) | {bpf_req:.0} ns ({bpf_call:.0} ns per program call) | ≤ {} ns | {} |",
        targets.bpf_ns_per_request,
        yes_no(bpf_cost_ok)
    )?;
    writeln!(
        s,
        "| agent CPU + BPF per request | {total_req:.2} µs | — | |"
    )?;
    writeln!(
        s,
        "| agent memory | VmHWM max {hwm_mib:.1} MiB, VmRSS median {rss_mib:.1} MiB | VmHWM {} | {} |",
        at_most(targets.vm_hwm_mib, "MiB"),
        yes_no(memory_ok)
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
    if untraced {
        writeln!(
            s,
            "| nginx requests traced, spans built | {traced}, {spans_built} | zero | {} |",
            yes_no(loss_ok)
        )?;
    } else {
        writeln!(
            s,
            "| unaccounted loss | {unaccounted} ({traced} requests traced of {requests} completed) | zero | {} |",
            yes_no(loss_ok)
        )?;
    }
    writeln!(s)?;
    if all_ok {
        writeln!(s, "**Target met.**\n")?;
    } else {
        let mut missed = Vec::new();
        if !throughput_ok {
            missed.push(format!(
                "throughput ratio {throughput:.3} < {}",
                targets.throughput_ratio
            ));
        }
        if let Some(t) = targets.agent_us_per_traced
            && !cpu_ok
        {
            missed.push(format!(
                "agent CPU {cpu_traced:.2} µs per traced request > {t} µs"
            ));
        }
        if !bpf_cost_ok {
            missed.push(format!(
                "BPF {bpf_req:.0} ns per request > {} ns",
                targets.bpf_ns_per_request
            ));
        }
        if let Some(t) = targets.vm_hwm_mib
            && !memory_ok
        {
            missed.push(format!("agent VmHWM {hwm_mib:.1} MiB > {t} MiB"));
        }
        if untraced && !loss_ok {
            missed.push(format!(
                "{traced} nginx requests traced, {spans_built} spans built (an unselected process)"
            ));
        } else if !loss_ok {
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
    if foreign_nginx > 0 && !untraced {
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

    // Figures per traced request mean nothing when nothing is traced.
    let if_traced = |value: String| if untraced { "—".to_string() } else { value };
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
            "| {} | {} | {:.0} | {:.0} | {:.3} | {} | {} | {:.2} | {:.2} | {} | {:.0} | {:.0} | {:.1} | {} | {} | {} | {} | {} | {:.2} / {:.2} | {:.2} / {:.2} |",
            i + 1,
            if p.agent_first {
                "with, without"
            } else {
                "without, with"
            },
            p.without.client.rps,
            w.run.client.rps,
            p.throughput_ratio(),
            fmt_latency(p.without.client.p99_us),
            fmt_latency(w.run.client.p99_us),
            p.p99_ratio(),
            w.agent_us_per_request(tck),
            if_traced(format!("{:.2}", w.agent_us_per_traced(tck))),
            w.bpf_ns_per_request(),
            w.bpf_ns_per_call(),
            w.vm_hwm_kb as f64 / 1024.0,
            w.run.client.requests,
            w.summary.counter("http_exchanges"),
            w.events_lost(),
            w.spans_lost(),
            if_traced(w.unaccounted().to_string()),
            p.without.server_load,
            w.run.server_load,
            p.without.other_load,
            w.run.other_load,
        )?;
    }
    writeln!(
        s,
        "| **median** | | {:.0} | {:.0} | {throughput:.3} | {} | {} | {p99:.2} | {cpu_req:.2} | {} | {bpf_req:.0} | {bpf_call:.0} | | | | | | | | |",
        median(pairs.iter().map(|p| p.without.client.rps).collect()),
        median(pairs.iter().map(|p| p.with.run.client.rps).collect()),
        fmt_latency(median(
            pairs.iter().map(|p| p.without.client.p99_us).collect()
        )),
        fmt_latency(median(
            pairs.iter().map(|p| p.with.run.client.p99_us).collect()
        )),
        if_traced(format!("{cpu_traced:.2}")),
    )?;
    writeln!(s)?;
    let errors: Vec<String> = pairs
        .iter()
        .enumerate()
        .flat_map(|(i, p)| {
            [("without", &p.without.client), ("with", &p.with.run.client)]
                .into_iter()
                .filter(|(_, w)| !w.errors.is_empty())
                .map(move |(which, w)| format!("pair {} {which}: {}", i + 1, w.errors))
        })
        .collect();
    if !loss_counters.is_empty() {
        writeln!(
            s,
            "Losses counted by the agent (all with-agent runs): {loss_counters}.\n"
        )?;
    }
    if !errors.is_empty() {
        writeln!(s, "wrk reported errors: {}.\n", errors.join("; "))?;
    }

    writeln!(s, "### Agent CPU by thread (sum of all with-agent runs)\n")?;
    render_threads(
        &mut s,
        pairs.iter().map(|p| &p.with),
        tck,
        "request",
        requests,
    )?;

    writeln!(s, "### BPF programs (sum of all with-agent runs)\n")?;
    render_bpf_programs(&mut s, pairs.iter().map(|p| &p.with), "request", requests)?;

    writeln!(s, "### How it was measured\n")?;
    let nginx_cmd = format!(
        "taskset -c {NGINX_CPU} {} -p $DIR -c $DIR/nginx.conf -e $DIR/error.log",
        nginx_bin().display()
    );
    let wrk_cmd = format!(
        "taskset {}",
        wrk_args(&RunConfig { port: 0, ..*cfg }).join(" ")
    )
    .replace("127.0.0.1:0/", "127.0.0.1:$PORT/");
    if cfg.variant == Variant::Https {
        writeln!(
            s,
            "- certificate: `openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=127.0.0.1 \
             -addext subjectAltName=IP:127.0.0.1` into `$CERT_DIR` (self-signed; wrk does not \
             verify it). wrk keeps its connections: the TLS handshakes happen once per connection, \
             at the start of each run."
        )?;
    }
    writeln!(
        s,
        "- {}, {}; nginx master + 1 worker pinned on CPU {NGINX_CPU}, wrk pinned on CPU {WRK_CPU}, \
         the agent not pinned (the scheduler puts it on either CPU, so its CPU time is taken from \
         nginx or from wrk, as on a busy server). One nginx serves all runs; a 2 s wrk warm-up precedes them.",
        versions.nginx, versions.wrk
    )?;
    writeln!(s, "- nginx: `{nginx_cmd}` with `$DIR/nginx.conf`:")?;
    writeln!(
        s,
        "\n```nginx\n{}```\n",
        cfg.variant
            .conf()
            .replace("@PREFIX@", "$DIR")
            .replace("@PORT@", "$PORT")
            .replace("@CERT_DIR@", "$CERT_DIR")
    )?;
    writeln!(
        s,
        "- load: `{wrk_cmd}` (Requests/sec, the 99% line of `--latency`, \"N requests in\")."
    )?;
    writeln!(
        s,
        "- agent: `target/release/agent {} > /dev/null` — {}, {}. Started after nginx, before \
         each with-agent run; the run starts 0.5 s after it printed `agent ready` and it is \
         stopped with SIGTERM after the run; its summary gives the counters.",
        agent_args.join(" "),
        match cfg.variant {
            Variant::Untraced => "selecting only an idle `sleep infinity` by its pid",
            Variant::Http | Variant::Https =>
                "a user's configuration: select nginx by command name",
        },
        sink.describe()
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
        code_list(EVENT_LOSS_COUNTERS),
        code_list(SPAN_LOSS_COUNTERS)
    )?;
    writeln!(
        s,
        "- nginx CPUs / other load: CPU time of nginx, and of everything except nginx, wrk, the agent \
         and the benchmark itself (from `/proc/stat`), per second of the run, in CPUs."
    )?;
    writeln!(s, "{}", cfg.variant.mark_end())?;
    Ok(s)
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
}
