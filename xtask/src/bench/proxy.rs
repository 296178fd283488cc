//! What runtime linking costs: a front (traced) forwards every request to an nginx backend (not
//! traced) over keep-alive while wrk loads the front; one run per mechanism: an nginx reverse
//! proxy (uprobes on `ngx_chain_writer`) and a Go `net/http` front with a shared `http.Client`
//! (the goroutine uprobes). The agent runs in every run; runs alternate between the mechanism on
//! (`--runtime-linking nginx` or `go`) and `--runtime-linking none`, so the difference is the
//! mechanism's BPF and agent CPU per request.
//!
//! Placement as in the nginx benchmark: the front and the backend on CPU 1, wrk on CPU 0, the
//! agent not pinned.

use std::{
    fmt::Write as _,
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};
use testkit::{HttpServer as _, NginxServer};

use super::{
    AgentRun, BpfStats, Environment, Options, Sink, WithAgent, check_interrupted, fmt_latency,
    measure_with_agent, median, process_ticks,
};

const NGINX_CPU: &str = "1";
const WRK_CPU: &str = "0";
pub(super) const MARK_START: &str = "<!-- bench:proxy:start -->";
pub(super) const MARK_END: &str = "<!-- bench:proxy:end -->";
/// The ceiling for what linking may add per request.
const LIMIT_BPF_NS: f64 = 300.0;
const LIMIT_AGENT_US: f64 = 0.5;

/// The front: a reverse proxy with upstream keep-alive (`@UPSTREAM@`: the backend's port).
const FRONT_CONF: &str = "# Written by `cargo xtask bench` (proxy front).
daemon off;
master_process on;
worker_processes 1;
pid @PREFIX@/nginx.pid;
error_log @PREFIX@/error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    keepalive_timeout 65s;
    keepalive_requests 100000;
    client_body_temp_path @PREFIX@/client_body;
    proxy_temp_path @PREFIX@/proxy;
    fastcgi_temp_path @PREFIX@/fastcgi;
    uwsgi_temp_path @PREFIX@/uwsgi;
    scgi_temp_path @PREFIX@/scgi;
    upstream backend {
        server 127.0.0.1:@UPSTREAM@;
        keepalive 32;
    }
    server {
        listen 127.0.0.1:@PORT@;
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
        }
    }
}
";

struct Wrk {
    requests: u64,
    rps: f64,
    p99_us: f64,
}

fn run_wrk(port: u16, path: &str, duration: u64, connections: u32) -> Result<Wrk> {
    let out = Command::new("taskset")
        .args(["-c", WRK_CPU, "wrk", "--latency", "-t", "1"])
        .arg(format!("-c{connections}"))
        .arg(format!("-d{duration}s"))
        .arg(format!("http://127.0.0.1:{port}{path}"))
        .stdin(Stdio::null())
        .output()
        .context("cannot run wrk (install it with `cargo xtask setup --test-deps`)")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("wrk failed with {}:\n{stdout}", out.status);
    }
    let stats = super::nginx::parse_wrk(&stdout)
        .with_context(|| format!("unexpected wrk output:\n{stdout}"))?;
    if !stats.errors.is_empty() {
        bail!("wrk reported errors through the proxy: {}", stats.errors);
    }
    Ok(Wrk {
        requests: stats.requests,
        rps: stats.rps,
        p99_us: stats.p99_us,
    })
}

/// One run's figures.
struct Figures {
    rps: f64,
    p99_us: f64,
    agent_us: f64,
    bpf_ns: f64,
    handoffs: u64,
    requests: u64,
}

fn figures(run: &AgentRun<Wrk>, clk_tck: u64) -> Figures {
    let n = run.run.client.requests;
    Figures {
        rps: run.run.client.rps,
        p99_us: run.run.client.p99_us,
        agent_us: run.agent_us_per(n, clk_tck),
        bpf_ns: run.bpf_ns_per(n),
        handoffs: run.summary.counter("kernel_link_handoff"),
        requests: n,
    }
}

/// Runs the proxy benchmark; returns its BENCHMARKS.md section.
/// A traced front under load, with what the agent selects and the mechanism it tests.
struct Front {
    label: &'static str,
    /// `--runtime-linking` value that turns its mechanism on.
    mechanism: &'static str,
    /// BPF program name prefix of the mechanism's own programs.
    programs: &'static str,
    pids: Vec<u32>,
    port: u16,
    path: &'static str,
    /// Keeps the front's processes alive.
    _guard: Box<dyn std::any::Any>,
}

/// Go version of the Go front (Debian's golang-1.23-go, installed by the test set-up).
const GO_VERSION: &str = "1.23";

/// Runs the proxy benchmark for each front (nginx, Go); returns its BENCHMARKS.md section.
pub(super) fn run(
    opts: &Options,
    agent_bin: &Path,
    bpf_stats: &mut BpfStats,
    sink: &Sink,
) -> Result<String> {
    let env = Environment::read()?;
    // The backend answers like the nginx benchmark's server.
    let backend = NginxServer::start_with(&super::nginx::Variant::Http.conf(), Some(NGINX_CPU));
    let mut s = String::new();
    let _ = writeln!(s, "{MARK_START}");
    for kind in ["nginx", "go"] {
        let front = match kind {
            "nginx" => {
                let conf = FRONT_CONF.replace("@UPSTREAM@", &backend.port().to_string());
                let nginx = NginxServer::start_with(&conf, Some(NGINX_CPU));
                Front {
                    label: "nginx reverse proxy (upstream keep-alive 32)",
                    mechanism: "nginx",
                    programs: "agent_nginx_",
                    pids: vec![nginx.master_pid(), nginx.worker_pid()],
                    port: nginx.port(),
                    path: "/",
                    _guard: Box::new(nginx),
                }
            }
            _ => {
                let go = testkit::services::GoFront::start_on_loopback(
                    GO_VERSION,
                    false,
                    &format!("http://127.0.0.1:{}", backend.port()),
                    Some(NGINX_CPU),
                );
                Front {
                    label: "Go 1.23 net/http front (shared http.Client)",
                    mechanism: "go",
                    programs: "agent_go_",
                    pids: vec![go.pid()],
                    port: go.port(),
                    path: "/work/1",
                    _guard: Box::new(go),
                }
            }
        };
        let section = run_front(
            opts,
            &env,
            agent_bin,
            bpf_stats,
            sink,
            &front,
            backend.port(),
        )?;
        s.push_str(&section);
    }
    let _ = writeln!(s, "{MARK_END}");
    Ok(s)
}

fn run_front(
    opts: &Options,
    env: &Environment,
    agent_bin: &Path,
    bpf_stats: &mut BpfStats,
    sink: &Sink,
    front: &Front,
    backend_port: u16,
) -> Result<String> {
    eprintln!(
        "bench: proxy: {} on 127.0.0.1:{} (pids {:?}) → backend nginx on {backend_port}; warming up",
        front.label, front.port, front.pids
    );
    run_wrk(front.port, front.path, 2, opts.connections)?;
    check_interrupted()?;
    let args = |mechanism: &str| -> Vec<String> {
        let mut args: Vec<String> = front
            .pids
            .iter()
            .flat_map(|p| ["--pid".to_string(), p.to_string()])
            .collect();
        args.extend(["--runtime-linking".to_string(), mechanism.to_string()]);
        args.extend(opts.agent_arg.iter().cloned());
        args
    };
    let (on_args, off_args) = (args(front.mechanism), args("none"));
    let front_ticks = || {
        front
            .pids
            .iter()
            .try_fold(0, |sum, &p| Ok(sum + process_ticks(p)?))
    };
    let mut runs: Vec<(AgentRun<Wrk>, AgentRun<Wrk>)> = Vec::with_capacity(opts.pairs);
    let mut pairs: Vec<(Figures, Figures)> = Vec::with_capacity(opts.pairs);
    for index in 0..opts.pairs {
        let mut measure = |a: &[String]| -> Result<AgentRun<Wrk>> {
            let with_agent = WithAgent {
                bin: agent_bin,
                args: a,
                sink,
            };
            let run =
                measure_with_agent(&with_agent, env.clk_tck, bpf_stats, &front_ticks, || {
                    run_wrk(front.port, front.path, opts.duration, opts.connections)
                })?;
            check_interrupted()?;
            Ok(run)
        };
        let (on, off) = if index % 2 == 0 {
            let on = measure(&on_args)?;
            (on, measure(&off_args)?)
        } else {
            let off = measure(&off_args)?;
            (measure(&on_args)?, off)
        };
        let (on_run, off_run) = (on, off);
        let (on, off) = (
            figures(&on_run, env.clk_tck),
            figures(&off_run, env.clk_tck),
        );
        runs.push((on_run, off_run));
        if on.handoffs == 0 {
            bail!(
                "{}: runtime linking on, but no client request was handed off (kernel_link_handoff 0): the mechanism did not attach",
                front.label
            );
        }
        eprintln!(
            "bench: proxy ({}) pair {}/{}: linking on {:.0} req/s, agent {:.2} µs/req, BPF {:.0} ns/req; off {:.0} req/s, agent {:.2} µs/req, BPF {:.0} ns/req",
            front.mechanism,
            index + 1,
            opts.pairs,
            on.rps,
            on.agent_us,
            on.bpf_ns,
            off.rps,
            off.agent_us,
            off.bpf_ns
        );
        pairs.push((on, off));
    }
    bpf_stats.restore();
    Ok(render(opts, sink, env, front, &pairs, &runs))
}

/// Counters of the runs with linking on that say how the upstream requests went.
const LINK_COUNTERS: &[&str] = &[
    "kernel_link_handoff",
    "kernel_handoff_not_in_flight",
    "kernel_handoff_unreadable",
    "inject_framing_lost",
    "inject_skipped",
    "inject_failed",
    "kernel_link_match_ambiguous",
    "kernel_link_ambiguous",
    "client_spans_linked",
    "traceparent_injected",
    "requests_sent_parked",
    "sockets_parked",
    "sockets_rejoined",
];

fn render(
    opts: &Options,
    sink: &Sink,
    env: &Environment,
    front: &Front,
    pairs: &[(Figures, Figures)],
    runs: &[(AgentRun<Wrk>, AgentRun<Wrk>)],
) -> String {
    let med = |f: &dyn Fn(&(Figures, Figures)) -> f64| median(pairs.iter().map(f).collect());
    let bpf_delta = med(&|(on, off)| on.bpf_ns - off.bpf_ns);
    let agent_delta = med(&|(on, off)| on.agent_us - off.agent_us);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "### Runtime linking: {}{}, {} ({} pairs × {} s, wrk -c{})\n",
        front.label,
        sink.title(),
        env.date,
        opts.pairs,
        opts.duration,
        opts.connections
    );
    let _ = writeln!(
        s,
        "Machine: {} CPUs ({}), kernel {}. The front (traced: `--pid`) → backend nginx (not traced), both on CPU 1, keep-alive; wrk on CPU 0. Every run has the agent; runs alternate between `--runtime-linking {}` and `none`. Medians of the pairs; the difference is what the mechanism costs per request (limit: {LIMIT_BPF_NS:.0} ns BPF, {LIMIT_AGENT_US} µs agent).\n",
        env.cpus, env.cpu_model, env.kernel, front.mechanism
    );
    let _ = writeln!(
        s,
        "| | req/s | p99 | agent µs/req | BPF ns/req | client requests handed off |\n|---|---|---|---|---|---|"
    );
    fn on(p: &(Figures, Figures)) -> &Figures {
        &p.0
    }
    fn off(p: &(Figures, Figures)) -> &Figures {
        &p.1
    }
    for (label, get) in [
        ("linking on", on as fn(&(Figures, Figures)) -> &Figures),
        ("linking off", off),
    ] {
        let handed: u64 = pairs.iter().map(|p| get(p).handoffs).sum();
        let requests: u64 = pairs.iter().map(|p| get(p).requests).sum();
        let _ = writeln!(
            s,
            "| {label} | {:.0} | {} | {:.2} | {:.0} | {handed} of {requests} |",
            med(&|p| get(p).rps),
            fmt_latency(med(&|p| get(p).p99_us)),
            med(&|p| get(p).agent_us),
            med(&|p| get(p).bpf_ns),
        );
    }
    let (own_ns, on_requests) = runs.iter().fold((0u64, 0u64), |(ns, n), (on, _)| {
        let own: u64 = on
            .bpf
            .values()
            .filter(|p| p.name.starts_with(front.programs))
            .map(|p| p.run_time_ns)
            .sum();
        (ns + own, n + on.run.client.requests)
    });
    let own = own_ns as f64 / on_requests.max(1) as f64;
    let _ = writeln!(
        s,
        "\nThe mechanism's own programs: {own:.0} ns per request ({}). Not in these figures: the uprobe traps themselves.",
        if own <= LIMIT_BPF_NS {
            "within the limit"
        } else {
            "OVER the limit"
        },
    );
    let _ = writeln!(
        s,
        "\nCost of linking per request, everything included (median of the pairs' differences, noisy: the shared programs' run time varies between runs more than the mechanism costs): BPF {bpf_delta:+.0} ns ({}), agent {agent_delta:+.2} µs ({}).",
        if bpf_delta <= LIMIT_BPF_NS {
            "within the limit"
        } else {
            "OVER the limit"
        },
        if agent_delta <= LIMIT_AGENT_US {
            "within the limit"
        } else {
            "OVER the limit"
        },
    );
    let counters: Vec<String> = LINK_COUNTERS
        .iter()
        .map(|c| {
            let on: u64 = runs.iter().map(|(r, _)| r.summary.counter(c)).sum();
            let off: u64 = runs.iter().map(|(_, r)| r.summary.counter(c)).sum();
            format!("`{c}` {on} / {off}")
        })
        .collect();
    let _ = writeln!(
        s,
        "\nCounters (on / off, all runs): {}.",
        counters.join(", ")
    );
    for (label, pick) in [("on", true), ("off", false)] {
        let requests: u64 = runs
            .iter()
            .map(|(a, b)| if pick { a } else { b }.run.client.requests)
            .sum();
        let _ = writeln!(s, "\nBPF programs, linking {label}:\n");
        let _ = super::render_bpf_programs(
            &mut s,
            runs.iter().map(|(a, b)| if pick { a } else { b }),
            "request",
            requests,
        );
    }
    let _ = writeln!(s, "Pairs (on / off):\n");
    for (i, (on, off)) in pairs.iter().enumerate() {
        let _ = writeln!(
            s,
            "- {}: {:.0} / {:.0} req/s, agent {:.2} / {:.2} µs/req, BPF {:.0} / {:.0} ns/req",
            i + 1,
            on.rps,
            off.rps,
            on.agent_us,
            off.agent_us,
            on.bpf_ns,
            off.bpf_ns
        );
    }
    s
}
