//! The agent must not change what a traced program sees on its sockets. With header injection
//! on, a traced client's socket is enrolled in a socket map; on some kernels such a socket
//! reads differently (`FIONREAD` counts only the map's own queue, readiness wake-ups have been
//! reported lost). Real clients — python (epoll, FIONREAD, select, MSG_PEEK), Node.js (libuv's
//! epoll), Java (`available()`, NIO `Selector`) and nginx as a reverse proxy (its upstream
//! keep-alive sockets) — run once without the agent and once traced by it, and must see exactly
//! the same. Each traced run must also show that the injector really worked on the client's
//! socket (a `traceparent` reached the server), or the comparison would prove nothing.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use tests::{
    Agent, Collector, Curl,
    netns::Network,
    process::tail,
    require_root,
    servers::ScriptServer,
    services::{Gated, NginxProxy},
};

/// Requests per client run, their answer's body size, and the pause between them (as between
/// a service's calls; the injector puts a parked socket back between answer and next request).
const COUNT: usize = 12;
const SIZE: usize = 3000;
const GAP_MS: u64 = 30;

/// `tests/fixtures/reads_server.py`: fixed answers, each in one write; prints what it saw.
struct ReadsServer(ScriptServer);

impl ReadsServer {
    fn start(cmd: Command) -> ReadsServer {
        ReadsServer(ScriptServer::start_command("reads_server", cmd))
    }

    fn local() -> ReadsServer {
        let mut cmd = Command::new(tests::python_bin());
        cmd.arg(tests::fixture("reads_server.py"))
            .arg("0")
            .env("E2E_BIND", "127.0.0.1");
        Self::start(cmd)
    }

    fn port(&self) -> u16 {
        self.0.port()
    }

    /// Requests that arrived with a `traceparent` header.
    fn with_traceparent(&self) -> usize {
        self.0
            .stdout()
            .lines()
            .filter(|l| l.starts_with("SEEN ") && l.ends_with("traceparent=1"))
            .count()
    }
}

/// A client fixture's command line against `port` on loopback.
#[derive(Clone, Copy, Debug)]
enum Client {
    Python,
    Node,
    Java,
}

impl Client {
    fn command(self, port: u16) -> Command {
        let mut cmd = match self {
            Client::Python => {
                let mut c = Command::new(tests::python_bin());
                c.arg(tests::fixture("reads_client.py"));
                c
            }
            Client::Node => {
                let mut c = Command::new(tests::node_bin());
                c.arg(tests::fixture("reads_client.js"));
                c
            }
            Client::Java => {
                let mut c = Command::new(tests::which("java").expect("java (Debian's JDK)"));
                c.arg(tests::fixture("ReadsClient.java"));
                c
            }
        };
        cmd.args([
            "127.0.0.1".to_string(),
            port.to_string(),
            COUNT.to_string(),
            SIZE.to_string(),
            GAP_MS.to_string(),
        ]);
        cmd
    }
}

/// What one run of a client saw (its JSON lines), how many of its requests carried a
/// `traceparent`, and the agent's counters when it was traced.
struct Run {
    lines: Vec<String>,
    injected: usize,
    counters: std::collections::BTreeMap<String, u64>,
}

fn run(client: Client, traced: bool) -> Run {
    let server = ReadsServer::local();
    let gated = Gated::spawn(
        &format!("reads_client-{client:?}"),
        client.command(server.port()),
        Duration::from_secs(60),
    );
    let collector = traced.then(Collector::start_quiet);
    let mut agent = collector
        .as_ref()
        .map(|c| Agent::builder().pid(gated.pid()).start(c));
    let (status, stdout, stderr, pid) = gated.release();
    assert!(
        status.success(),
        "{client:?} client (pid {pid}) failed: {status}\nstdout:\n{}\nstderr:\n{}",
        tail(&stdout, 20),
        tail(&stderr, 20)
    );
    let counters = match agent.as_mut() {
        Some(a) => {
            a.stop();
            a.summary_counters()
        }
        None => Default::default(),
    };
    Run {
        lines: stdout
            .lines()
            .filter(|l| l.starts_with('{'))
            .map(str::to_string)
            .collect(),
        injected: server.with_traceparent(),
        counters,
    }
}

/// The value of `"key":` in a JSON line of the fixtures (numbers and booleans only).
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    let marker = format!("\"{key}\":");
    let at = line
        .find(&marker)
        .unwrap_or_else(|| panic!("no {key} in {line}"))
        + marker.len();
    line[at..]
        .trim_start()
        .split([',', '}'])
        .next()
        .unwrap_or("")
        .trim()
}

/// Runs `client` without and with the agent; both runs must see exactly the same, `expect`
/// must hold for every line, and the traced run's socket must really have been injected.
fn same_with_and_without_the_agent(client: Client, expect: impl Fn(&str) -> Result<(), String>) {
    let _serial = require_root();
    let plain = run(client, false);
    let traced = run(client, true);
    let mut failures = Vec::new();
    for (name, r) in [("without the agent", &plain), ("traced", &traced)] {
        for line in &r.lines {
            if let Err(why) = expect(line) {
                failures.push(format!("{name}: {why}: {line}"));
            }
        }
    }
    if plain.lines != traced.lines {
        failures.push(format!(
            "the traced client saw something else:\nwithout the agent:\n  {}\ntraced:\n  {}",
            plain.lines.join("\n  "),
            traced.lines.join("\n  ")
        ));
    }
    if traced.injected == 0 {
        failures.push(format!(
            "no request of the traced client carried a traceparent: the injector never worked on its socket, so this proves nothing (counters {:?})",
            traced.counters
        ));
    }
    let parked = traced.counters.get("sockets_parked").copied().unwrap_or(0);
    eprintln!(
        "[e2e] {client:?}: {} observations identical: {}; {} of {} requests injected; sockets parked {parked}",
        traced.lines.len(),
        plain.lines == traced.lines,
        traced.injected,
        traced.lines.len()
    );
    assert!(failures.is_empty(), "{client:?}:\n{}", failures.join("\n"));
}

fn check(ok: bool, what: &str) -> Result<(), String> {
    if ok { Ok(()) } else { Err(what.to_string()) }
}

#[test]
fn python_sees_fionread_peek_select_and_epoll_as_without_the_agent() {
    same_with_and_without_the_agent(Client::Python, |line| {
        let answer = field(line, "answer");
        check(
            field(line, "epoll") == "true",
            "epoll did not report it readable",
        )?;
        check(
            field(line, "select") == "true",
            "select did not report it readable",
        )?;
        check(
            field(line, "fionread") == answer,
            "FIONREAD did not count the waiting answer",
        )?;
        check(
            field(line, "peek") == answer,
            "MSG_PEEK did not return the waiting answer",
        )?;
        check(
            field(line, "read") == answer,
            "the answer was not read whole",
        )
    });
}

#[test]
fn node_gets_every_answer_on_time_as_without_the_agent() {
    same_with_and_without_the_agent(Client::Node, |line| {
        check(
            field(line, "timed_out") == "false",
            "an answer did not arrive within 3 s (lost readiness)",
        )?;
        check(field(line, "status") == "200", "not a 200")?;
        let i: usize = field(line, "i").parse().unwrap_or(0);
        let size = if i + 3 >= COUNT {
            5 * 1024 * 1024
        } else {
            SIZE
        };
        check(
            field(line, "bytes") == size.to_string(),
            "the body is not whole",
        )
    });
}

#[test]
fn java_sees_available_and_selector_readiness_as_without_the_agent() {
    same_with_and_without_the_agent(Client::Java, |line| {
        let answer = field(line, "answer");
        if line.contains("\"api\":\"io\"") {
            check(
                field(line, "available") == answer,
                "InputStream.available() (FIONREAD) did not count the waiting answer",
            )?;
        } else {
            check(
                field(line, "ready") == "true",
                "the NIO Selector did not report the channel readable",
            )?;
        }
        check(
            field(line, "read") == answer,
            "the answer was not read whole",
        )
    });
}

/// nginx as a reverse proxy with upstream keep-alive: its upstream sockets are the traced
/// clients. Small answers at a steady pace, then large ones (read in many parts while the
/// socket is out of the injector's map): every transfer complete and on time, the same with and
/// without the agent.
#[test]
fn nginx_upstream_answers_arrive_whole_and_on_time_as_without_the_agent() {
    let _serial = require_root();
    let net = Network::new(&["proxy", "backend", "client"]);
    let run = |traced: bool| -> (Vec<(u16, u64)>, usize, Duration) {
        let backend = {
            let mut cmd = net.host("backend").command(tests::python_bin());
            cmd.arg(tests::fixture("reads_server.py")).arg("0");
            ReadsServer::start(cmd)
        };
        let proxy = NginxProxy::start(net.host("proxy"), net.host("backend").ip(), backend.port());
        let collector = traced.then(Collector::start_quiet);
        let mut agent = collector.as_ref().map(|c| {
            Agent::builder()
                .pid(proxy.master_pid())
                .pid(proxy.worker_pid())
                .start(c)
        });
        let started = Instant::now();
        let mut curl = Curl::get(proxy.url(&format!("/size/{SIZE}"))).rate("30/s");
        for i in 1..COUNT {
            let size = if i + 3 >= COUNT {
                5 * 1024 * 1024
            } else {
                SIZE
            };
            curl = curl.then(proxy.url(&format!("/size/{size}")));
        }
        let result = curl.run();
        let elapsed = started.elapsed();
        if let Some(a) = agent.as_mut() {
            a.stop();
        }
        let transfers = result
            .transfers
            .iter()
            .map(|t| (t.status, t.size_download))
            .collect();
        (transfers, backend.with_traceparent(), elapsed)
    };
    let (plain, _, plain_time) = run(false);
    let (traced, injected, traced_time) = run(true);
    eprintln!(
        "[e2e] nginx upstream: {} transfers, without the agent {plain_time:?}, traced {traced_time:?}; {injected} upstream requests injected",
        traced.len()
    );
    for (status, size) in &plain {
        assert_eq!(*status, 200, "without the agent: {plain:?}");
        assert!(
            *size == SIZE as u64 || *size == 5 * 1024 * 1024,
            "{plain:?}"
        );
    }
    assert_eq!(
        plain, traced,
        "nginx answered differently when traced (status, bytes per transfer)"
    );
    assert!(
        injected > 0,
        "no upstream request of nginx carried a traceparent: the injector never worked on its upstream socket"
    );
}
