//! `cargo xtask bench nginx-connections`: the agent's memory with many open keep-alive
//! connections (issue 13: VmHWM ≤ 64 MiB with 10,000 open traced connections).
//!
//! A traced nginx; this process opens `--open-connections` connections to it, sends one
//! request on each and reads its answer, and keeps them all open. Two runs, each with an
//! agent of its own: connections opened at a steady pace (what each open connection keeps),
//! then all at once (the same plus the burst of requests and spans). The agent's VmHWM and
//! VmRSS are read once every connection has been answered and the agent is idle.

use std::{
    fmt::Write as _,
    io::{Read as _, Write as _},
    net::TcpStream,
    path::Path,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use testkit::{Agent, HttpServer as _, NginxServer};

use super::{Environment, Options, Sink, check_interrupted, memory_kb, wait_idle};

pub(super) const MARK_START: &str = "<!-- bench:nginx-connections:start -->";
pub(super) const MARK_END: &str = "<!-- bench:nginx-connections:end -->";

/// The memory target, MiB.
const TARGET_MIB: f64 = 64.0;
/// Connections per second in the paced run.
const PACED_RATE: u32 = 500;

const CONF: &str = "# Written by `cargo xtask bench nginx-connections`.
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile @NOFILE@;
pid @PREFIX@/nginx.pid;
error_log @PREFIX@/error.log warn;
events { worker_connections @NOFILE@; }
http {
    access_log off;
    default_type text/plain;
    keepalive_timeout 600s;
    client_body_temp_path @PREFIX@/client_body;
    proxy_temp_path @PREFIX@/proxy;
    fastcgi_temp_path @PREFIX@/fastcgi;
    uwsgi_temp_path @PREFIX@/uwsgi;
    scgi_temp_path @PREFIX@/scgi;
    server {
        listen 127.0.0.1:@PORT@ backlog=16384;
        location / { return 200 \"hello\\n\"; }
    }
}
";

/// One run: how the connections were opened and what the agent held once they were.
struct Run {
    name: &'static str,
    open_secs: f64,
    ready_hwm_kb: u64,
    ready_rss_kb: u64,
    hwm_kb: u64,
    rss_kb: u64,
    exchanges: u64,
    opened: u64,
}

pub(super) fn run(opts: &Options, agent_bin: &Path, sink: &Sink) -> Result<String> {
    let env = Environment::read()?;
    let n = opts.open_connections;
    let nofile = raise_nofile(n)?;
    let conf = CONF.replace("@NOFILE@", &nofile.to_string());
    let nginx = NginxServer::start_with(&conf, Some(super::nginx::NGINX_CPU));
    eprintln!(
        "bench: nginx on 127.0.0.1:{} (worker {}); {n} connections per run",
        nginx.port(),
        nginx.worker_pid()
    );
    let mut args = vec![
        "--comm".to_string(),
        "nginx".to_string(),
        "--verbose".to_string(),
    ];
    args.extend(opts.agent_arg.iter().cloned());
    let mut runs = Vec::new();
    for (name, rate) in [("paced", Some(PACED_RATE)), ("at once", None)] {
        check_interrupted()?;
        let agent = sink.start_agent(Agent::builder().binary(agent_bin).args(&args));
        runs.push(measure(agent, name, nginx.port(), n, rate, env.clk_tck)?);
        let r = runs.last().expect("just pushed");
        eprintln!(
            "bench: {name}: {n} connections opened in {:.1} s, agent VmHWM {:.1} MiB, VmRSS {:.1} MiB",
            r.open_secs,
            mib(r.hwm_kb),
            mib(r.rss_kb)
        );
    }
    drop(nginx);
    Ok(render(opts, sink, &env, &runs))
}

fn mib(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

/// Our open-file limit raised to its hard limit; enough for `n` connections (and nginx's, which
/// inherits it), or a clear error.
fn raise_nofile(n: usize) -> Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to an rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        bail!("getrlimit(RLIMIT_NOFILE) failed");
    }
    let need = n as u64 + 256;
    if limit.rlim_max < need {
        bail!(
            "{n} connections need {need} open files, the hard limit is {}: raise it (ulimit -Hn) \
             or pass a smaller --open-connections",
            limit.rlim_max
        );
    }
    limit.rlim_cur = limit.rlim_max;
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        bail!("setrlimit(RLIMIT_NOFILE) failed");
    }
    Ok(limit.rlim_max)
}

fn measure(
    mut agent: Agent,
    name: &'static str,
    port: u16,
    n: usize,
    rate: Option<u32>,
    clk_tck: u64,
) -> Result<Run> {
    let pid = agent.pid();
    thread::sleep(Duration::from_millis(500));
    wait_idle(pid, clk_tck)?;
    let (ready_hwm_kb, ready_rss_kb) = memory_kb(pid)?;
    let started = Instant::now();
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        let mut c = TcpStream::connect(("127.0.0.1", port))
            .with_context(|| format!("connection {i} to nginx"))?;
        c.write_all(format!("GET /c/{i} HTTP/1.1\r\nHost: bench\r\n\r\n").as_bytes())?;
        if let Some(rate) = rate {
            answer(&mut c)?;
            let due = started + Duration::from_secs_f64((i + 1) as f64 / f64::from(rate));
            thread::sleep(due.saturating_duration_since(Instant::now()));
        }
        conns.push(c);
        if i % 1000 == 0 {
            check_interrupted()?;
        }
    }
    if rate.is_none() {
        for c in &mut conns {
            answer(c)?;
        }
    }
    let open_secs = started.elapsed().as_secs_f64();
    wait_idle(pid, clk_tck)?;
    // The console exporter holds a trace for a grace period before printing it.
    thread::sleep(Duration::from_secs(3));
    wait_idle(pid, clk_tck)?;
    let (hwm_kb, rss_kb) = memory_kb(pid)?;
    agent.stop();
    drop(conns);
    let summary = agent.exit_summary();
    Ok(Run {
        name,
        open_secs,
        ready_hwm_kb,
        ready_rss_kb,
        hwm_kb,
        rss_kb,
        exchanges: summary.counter("http_exchanges"),
        opened: summary.counter("connections_opened"),
    })
}

/// Reads until nginx's whole answer (`hello\n` ends it) is in.
fn answer(c: &mut TcpStream) -> Result<()> {
    c.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    while !got.ends_with(b"hello\n") {
        let k = c.read(&mut buf).context("reading nginx's answer")?;
        if k == 0 {
            bail!("nginx closed a connection before answering");
        }
        got.extend_from_slice(&buf[..k]);
    }
    Ok(())
}

fn render(opts: &Options, sink: &Sink, env: &Environment, runs: &[Run]) -> String {
    let n = opts.open_connections;
    let mut s = String::new();
    let _ = writeln!(s, "{MARK_START}");
    let _ = writeln!(
        s,
        "## Agent memory with {n} open keep-alive connections to a traced nginx{}\n",
        sink.title()
    );
    let _ = writeln!(
        s,
        "Measured {} on Linux {}, {} CPUs ({}), `cargo xtask bench nginx-connections --open-connections {n}{}{}`. Load average when it started: {}.\n",
        env.date,
        env.kernel,
        env.cpus,
        env.cpu_model,
        sink.flag(),
        opts.agent_arg_flags(),
        env.loadavg
    );
    let _ = writeln!(
        s,
        "| opened | seconds to open | agent at start: VmHWM / VmRSS MiB | with the connections open: VmHWM / VmRSS MiB | RSS per connection | exchanges / connections seen | VmHWM ≤ {TARGET_MIB} MiB |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|");
    for r in runs {
        let per_conn = (r.rss_kb as f64 - r.ready_rss_kb as f64) * 1024.0 / n as f64;
        let _ = writeln!(
            s,
            "| {} | {:.1} | {:.1} / {:.1} | {:.1} / {:.1} | {:.0} bytes | {} / {} | {} |",
            r.name,
            r.open_secs,
            mib(r.ready_hwm_kb),
            mib(r.ready_rss_kb),
            mib(r.hwm_kb),
            mib(r.rss_kb),
            per_conn,
            r.exchanges,
            r.opened,
            if mib(r.hwm_kb) <= TARGET_MIB {
                "yes"
            } else {
                "**no**"
            }
        );
    }
    let _ = writeln!(
        s,
        "\n### How it was measured\n\n- nginx (1 worker, `return 200`, keepalive 600 s) pinned \
         on CPU {}; the agent `--comm nginx` with the {}.\n- Two runs, an agent each: \
         \"paced\" opens the connections at {PACED_RATE} per second, sending one request on \
         each and reading its answer before the next; \"at once\" opens them all, then reads \
         every answer. Every connection stays open until the agent's memory is read: from \
         `/proc/PID/status` once the agent is idle again and 3 s more (the console exporter \
         holds a trace that long before printing it).\n- RSS per connection: VmRSS with the \
         connections open minus VmRSS at start, divided by the connections; exchanges and \
         connections seen are the agent's `http_exchanges` and `connections_opened`.",
        super::nginx::NGINX_CPU,
        sink.describe()
    );
    let _ = writeln!(s, "{MARK_END}");
    s
}
