//! Whole traces across services and hosts (issue 4): parent/child linking, traceparent
//! injection, same-host pairing, OpenTelemetry SDK interop, and an injection soak.
//!
//! Needs root and the agent binary (`AGENT_BIN`). Run serially:
//! `AGENT_BIN=target/debug/agent cargo test -p tests --test traces_e2e -- --test-threads=1 --nocapture`
//! (as root), or `cargo xtask test`.
//!
//! "Hosts" are network namespaces on a bridge ([`tests::netns`]), each service with its own
//! address; the agent, the collector and curl stay in the root namespace. Services are real and
//! unmodified: nginx (reverse proxy) → threaded Python (`chain_service.py`) → Node `http`
//! (`chain_service.js`, node-postgres) → PostgreSQL. Every service prints the `traceparent`
//! headers each request carried (`SEEN` lines), so what arrived on the wire is checked next to
//! what the agent exported.
//!
//! The `harness_*` tests check the harness itself (namespaces, services, SDK export, soak
//! client) without the agent: if they fail, the other results mean nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use tests::netns::{Network, test_namespaces};
use tests::process::run_to_completion;
use tests::services::{
    ChainNode, ChainPy, ChecksumServer, HeaderClient, HeaderExchange, NginxProxy, SdkServer, Seen,
    SoakClient, SoakPlan, completeness_dir, header_client, parse_traceparent, sdk_client,
    soak_client,
};
use tests::traces::{Chain, ChainReport, Hop, Parent, contains_word};
use tests::{
    Agent, AgentBuilder, Collector, Curl, Failures, PgServer, ReceivedSpan, SpanKind, Spans,
    python_bin, require_root,
};

/// Requests of the sequential topology test (each must form one complete trace).
const SEQUENTIAL_REQUESTS: usize = 20;
/// Concurrent variant: curl loops in parallel, requests per loop.
const CONCURRENT_LOOPS: usize = 4;
const REQUESTS_PER_LOOP: usize = 25;
/// Requests of the unselected "noise" process during the sequential test.
const NOISE_REQUESTS: usize = 30;
/// How long to wait for every expected span before judging what arrived.
const TRACE_WAIT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// Topology: nginx (proxy) → python (py) → node (node) → PostgreSQL (db), each in its own host.

struct Topology {
    // Processes first: fields drop in order, the network (their namespaces) last.
    nginx: Option<NginxProxy>,
    py: ChainPy,
    node: ChainNode,
    db: PgServer,
    net: Network,
}

impl Topology {
    fn start(with_nginx: bool) -> Topology {
        let net = Network::new(&["proxy", "py", "node", "db", "client"]);
        let db = PgServer::start_in(net.host("db"));
        let node = ChainNode::start(net.host("node"), Some(&db));
        let py = ChainPy::start(net.host("py"), &node.base_url());
        let nginx = with_nginx.then(|| NginxProxy::start(net.host("proxy"), py.ip(), py.port()));
        eprintln!(
            "[e2e] topology: nginx {:?} → python pid {} ({}) → node pid {} ({}) → postgres {} ({}:{})",
            nginx.as_ref().map(|n| (n.master_pid(), n.worker_pid())),
            py.pid(),
            py.base_url(),
            node.pid(),
            node.base_url(),
            db.pid(),
            db.address(),
            db.port()
        );
        Topology {
            nginx,
            py,
            node,
            db,
            net,
        }
    }

    /// Selects every service of the chain by pid (nginx: master and worker; PostgreSQL: the
    /// postmaster, its backends as children). Nothing else: no other process on the machine
    /// gets a header injected because of this test.
    fn agent(&self) -> AgentBuilder {
        let mut b = Agent::builder()
            .pid(self.py.pid())
            .pid(self.node.pid())
            .pid(self.db.pid());
        if let Some(nginx) = &self.nginx {
            b = b.pid(nginx.master_pid()).pid(nginx.worker_pid());
        }
        b
    }

    /// Where curl sends `/chain/<id>`: nginx when there is one, else the python service.
    fn entry_url(&self, path: &str) -> String {
        match &self.nginx {
            Some(n) => n.url(path),
            None => self.py.url(path),
        }
    }

    fn chain(&self) -> Chain {
        let mut hops = Vec::new();
        let py = self.py.pid();
        let node = self.node.pid();
        let chain_path = |id: &str| format!("/chain/{id}");
        let work_path = |id: &str| format!("/work/{id}");
        let mut label = String::new();
        if let Some(nginx) = &self.nginx {
            let worker = nginx.worker_pid();
            hops.push(Hop {
                name: "nginx SERVER GET /chain/<id>".into(),
                matches: Box::new(move |s, id| {
                    http_span(s, SpanKind::Server, worker, &chain_path(id))
                }),
                parent: Parent::Root,
            });
            hops.push(Hop {
                name: "nginx CLIENT GET /chain/<id> (to python)".into(),
                matches: Box::new(move |s, id| {
                    http_span(s, SpanKind::Client, worker, &chain_path(id))
                }),
                parent: Parent::Hop(0),
            });
            label.push_str("nginx → ");
        }
        let base = hops.len();
        hops.push(Hop {
            name: "python SERVER GET /chain/<id>".into(),
            matches: Box::new(move |s, id| http_span(s, SpanKind::Server, py, &chain_path(id))),
            parent: if base == 0 {
                Parent::Root
            } else {
                Parent::Hop(base - 1)
            },
        });
        hops.push(Hop {
            name: "python CLIENT GET /work/<id> (to node)".into(),
            matches: Box::new(move |s, id| http_span(s, SpanKind::Client, py, &work_path(id))),
            parent: Parent::Hop(base),
        });
        hops.push(Hop {
            name: "node SERVER GET /work/<id>".into(),
            matches: Box::new(move |s, id| http_span(s, SpanKind::Server, node, &work_path(id))),
            parent: Parent::Hop(base + 1),
        });
        hops.push(Hop {
            name: "node CLIENT postgresql SELECT ... req_<id>".into(),
            matches: Box::new(move |s, id| {
                s.kind == SpanKind::Client && s.pid() == Some(node) && db_span_of(s, id)
            }),
            parent: Parent::Hop(base + 2),
        });
        hops.push(Hop {
            name: "postgresql SERVER SELECT ... req_<id>".into(),
            matches: Box::new(move |s, id| {
                s.kind == SpanKind::Server
                    && s.service_name() == Some("postgresql")
                    && db_span_of(s, id)
            }),
            parent: Parent::Hop(base + 3),
        });
        label.push_str("python → node → postgresql");
        Chain {
            label,
            hops,
            request_of: Box::new(request_of),
        }
    }
}

fn http_span(s: &ReceivedSpan, kind: SpanKind, pid: u32, path: &str) -> bool {
    s.kind == kind && s.pid() == Some(pid) && s.attr_str("url.path") == Some(path)
}

/// A PostgreSQL span of request `id`: its statement is `SELECT 1 AS req_<id>` (identifiers are
/// kept by the agent's literal redaction).
fn db_span_of(s: &ReceivedSpan, id: &str) -> bool {
    s.attr_str("db.system.name") == Some("postgresql")
        && s.attr_str("db.query.text")
            .is_some_and(|q| contains_word(q, &format!("req_{id}")))
}

/// The request a span belongs to: `/chain/<id>`, `/work/<id>`, or `req_<id>` in its statement.
fn request_of(s: &ReceivedSpan) -> Option<String> {
    if let Some(path) = s.attr_str("url.path") {
        for prefix in ["/chain/", "/work/"] {
            if let Some(id) = path.strip_prefix(prefix) {
                return Some(id.to_string());
            }
        }
        return None;
    }
    let q = s.attr_str("db.query.text")?;
    let i = q.find("req_")?;
    let id: String = q[i + 4..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    (!id.is_empty()).then_some(id)
}

/// Polls the collector until `done` holds or `timeout` passes; never panics (what is missing
/// is then reported precisely by the caller).
fn wait_until(collector: &Collector, timeout: Duration, done: impl Fn(&Spans) -> bool) -> Spans {
    let deadline = Instant::now() + tests::scaled(timeout);
    loop {
        let spans = collector.spans_now();
        if done(&spans) || Instant::now() >= deadline {
            return spans;
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// Every hop of every request has at least one span.
fn all_hops_present(chain: &Chain, spans: &Spans, ids: &[String]) -> bool {
    ids.iter().all(|id| {
        chain
            .hops
            .iter()
            .all(|h| spans.iter().any(|s| (h.matches)(s, id)))
    })
}

/// The `SEEN` entries of one path (a request id is used once, so normally one).
fn seen_for<'a>(seen: &'a [Seen], path: &str) -> Vec<&'a Seen> {
    seen.iter().filter(|s| s.path == path).collect()
}

/// What arrived at a service for one request must be exactly one traceparent carrying the
/// trace id of the request and the caller's client span id as parent id.
fn check_arrived_header(
    problems: &mut Vec<String>,
    service: &str,
    seen: &[&Seen],
    client: Option<&ReceivedSpan>,
    client_name: &str,
) {
    let [entry] = seen else {
        problems.push(format!(
            "header: {service} saw {} requests for this path (expected 1): {seen:?}",
            seen.len()
        ));
        return;
    };
    match entry.traceparents.as_slice() {
        [] => problems.push(format!(
            "header: {service} received NO traceparent (expected one carrying {client_name}'s ids)"
        )),
        [one] => match (parse_traceparent(one), client) {
            (None, _) => problems.push(format!(
                "header: {service} received a malformed traceparent {one:?}"
            )),
            (Some(_), None) => problems.push(format!(
                "header: {service} received traceparent {one}, but {client_name} is missing, so its ids cannot be compared"
            )),
            (Some((_, trace, parent, _)), Some(c)) => {
                if trace != c.trace_id || parent != c.span_id {
                    problems.push(format!(
                        "header: {service} received traceparent {one}, expected trace {} and parent id {} ({client_name}: {})",
                        c.trace_id,
                        c.span_id,
                        c.summary()
                    ));
                }
            }
        },
        many => problems.push(format!(
            "header: {service} received {} traceparent headers (expected exactly one): {many:?}",
            many.len()
        )),
    }
}

/// Writes `target/trace-completeness/<topology>.txt` (the figure for the docs and the closing
/// note) and returns its path.
fn write_completeness(
    topology: &str,
    report: &ChainReport<'_>,
    chain: &Chain,
    extra: &str,
) -> String {
    let dir = completeness_dir();
    std::fs::create_dir_all(&dir).expect("create target/trace-completeness");
    let path = dir.join(format!("{topology}.txt"));
    let text = format!(
        "{}\nlinked fraction per parent edge:\n{}{}\nproblems (requests with each):\n{}\n",
        report.headline(),
        report.describe_edges(chain),
        extra,
        report
            .problem_counts()
            .iter()
            .map(|(k, n)| format!("  {n:>4} x {k}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    std::fs::write(&path, &text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    eprintln!("[e2e] trace completeness ({}):\n{text}", path.display());
    path.display().to_string()
}

/// The agent's counters about linking and injection (names as the agent prints them), for
/// the test output.
fn propagation_counters(agent: &Agent) -> BTreeMap<String, u64> {
    agent
        .summary_counters()
        .into_iter()
        .filter(|(k, _)| {
            [
                "traceparent",
                "inject",
                "link",
                "pair",
                "canary",
                "adopt",
                "park",
                "rejoin",
            ]
            .iter()
            .any(|w| k.contains(w))
        })
        .collect()
}

fn expect_propagation_on(failures: &mut Failures, agent: &Agent) {
    let status = agent.context_propagation_status();
    failures.check(status.as_deref() == Some("on (canary passed)"), || {
        format!(
            "start-up: expected the line `agent: context propagation: on (canary passed)`, got {}",
            status.map_or("no such line".to_string(), |s| format!(
                "`agent: context propagation: {s}`"
            ))
        )
    });
}

/// An unselected process (python, in the "client" host) making requests to the python service
/// while the test runs: `n` GETs of `/noise`, each on a new connection.
fn noise_process(net: &Network, url: String, n: usize) -> thread::JoinHandle<u32> {
    let mut cmd = net.host("client").command(python_bin());
    cmd.args([
        "-c",
        "import sys, urllib.request\n\
         for _ in range(int(sys.argv[2])):\n\
         \x20   assert urllib.request.urlopen(sys.argv[1], timeout=30).status == 200\n",
        &url,
        &n.to_string(),
    ]);
    thread::spawn(move || {
        let (status, out, err, pid) = run_to_completion("noise", cmd, Duration::from_secs(60));
        assert!(
            status.success(),
            "the noise process failed: {status}\n{out}\n{err}"
        );
        pid
    })
}

#[test]
fn chain_nginx_python_node_postgres_sequential_one_trace_per_request() {
    let _serial = require_root();
    let collector = Collector::start();
    let topo = Topology::start(true);
    let mut agent = topo.agent().start(&collector);
    let mut failures = Failures::default();
    expect_propagation_on(&mut failures, &agent);

    // An unselected process calls the python service meanwhile.
    let noise = noise_process(&topo.net, topo.py.url("/noise"), NOISE_REQUESTS);
    let ids: Vec<String> = (0..SEQUENTIAL_REQUESTS).map(|i| i.to_string()).collect();
    // One keep-alive connection, requests spaced as from separate callers: on kernels where
    // the injector parks sockets, a request sent the moment the previous answer was read may
    // go out without a header (the soak test measures that case).
    let mut curl = Curl::get(topo.entry_url("/chain/0")).rate("5/s");
    for id in &ids[1..] {
        curl = curl.then(topo.entry_url(&format!("/chain/{id}")));
    }
    let started = Instant::now();
    let curl = curl.run();
    let noise_pid = noise.join().expect("noise thread");
    eprintln!(
        "[e2e] {} sequential requests through the chain in {:?}",
        ids.len(),
        started.elapsed()
    );
    for (i, t) in curl.transfers.iter().enumerate() {
        assert_eq!(
            t.status,
            200,
            "request /chain/{i} through the chain answered {} (python stderr:\n{}\nnode stderr:\n{})",
            t.status,
            topo.py.stderr(),
            topo.node.stderr()
        );
    }

    let chain = topo.chain();
    let py = topo.py.pid();
    wait_until(&collector, TRACE_WAIT, |spans| {
        all_hops_present(&chain, spans, &ids)
            && spans
                .iter()
                .filter(|s| http_span(s, SpanKind::Server, py, "/noise"))
                .count()
                >= NOISE_REQUESTS
    });
    let spans = agent.stop_and_collect(&collector, &[]);
    let counters = propagation_counters(&agent);
    eprintln!("[e2e] agent counters: {counters:?}");

    let mut report = chain.check(&spans, &ids);
    // The figure: linked traces (the header checks below come on top).
    write_completeness(
        "nginx-python-node-postgresql-sequential",
        &report,
        &chain,
        &format!("({SEQUENTIAL_REQUESTS} sequential requests; agent counters {counters:?})\n"),
    );
    // The headers that arrived: exactly one traceparent per hop, carrying the caller's ids.
    let py_seen = topo.py.seen();
    let node_seen = topo.node.seen();
    let client_hop = |name: &str| chain.hops.iter().position(|h| h.name.starts_with(name));
    let (nginx_client, py_client) = (
        client_hop("nginx CLIENT").expect("hop"),
        client_hop("python CLIENT").expect("hop"),
    );
    for r in &mut report.requests {
        let (nc, pc) = (r.hops[nginx_client], r.hops[py_client]);
        check_arrived_header(
            &mut r.problems,
            "python",
            &seen_for(&py_seen, &format!("/chain/{}", r.id)),
            nc,
            "nginx CLIENT span",
        );
        check_arrived_header(
            &mut r.problems,
            "node",
            &seen_for(&node_seen, &format!("/work/{}", r.id)),
            pc,
            "python CLIENT span",
        );
    }
    if report.complete() != ids.len() || !report.mislinks.is_empty() {
        failures.add(format!(
            "every sequential request must form exactly one correctly linked trace with every expected span and header:\n{}",
            report.describe_failures(5)
        ));
    }

    // Nothing from unselected processes: curl, the noise process.
    let unselected: BTreeSet<u32> = [curl.pid, noise_pid].into();
    let foreign: Vec<String> = spans
        .iter()
        .filter(|s| s.pid().is_some_and(|p| unselected.contains(&p)))
        .map(|s| s.summary())
        .collect();
    failures.check(foreign.is_empty(), || {
        format!(
            "spans from unselected processes (curl {}, noise {noise_pid}):\n  {}",
            curl.pid,
            foreign.join("\n  ")
        )
    });
    // The noise requests: served by a selected process (server spans, each its own root), but
    // nothing was injected into them (their sender is not selected).
    let noise_seen = seen_for(&py_seen, "/noise");
    failures.check(noise_seen.len() == NOISE_REQUESTS, || {
        format!(
            "python saw {} /noise requests, the noise process sent {NOISE_REQUESTS}",
            noise_seen.len()
        )
    });
    let injected: Vec<&&Seen> = noise_seen
        .iter()
        .filter(|s| !s.traceparents.is_empty())
        .collect();
    failures.check(injected.is_empty(), || {
        format!("requests of an UNSELECTED process arrived with a traceparent: {injected:?}")
    });
    let noise_spans: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| http_span(s, SpanKind::Server, py, "/noise"))
        .collect();
    failures.check(noise_spans.len() == NOISE_REQUESTS, || {
        format!(
            "expected {NOISE_REQUESTS} python SERVER spans of /noise, got {}",
            noise_spans.len()
        )
    });
    let chain_traces: BTreeSet<&str> = report
        .requests
        .iter()
        .flat_map(|r| r.hops.iter().flatten().map(|s| s.trace_id.as_str()))
        .collect();
    let bad_noise: Vec<String> = noise_spans
        .iter()
        .filter(|s| s.parent_span_id.is_some() || chain_traces.contains(s.trace_id.as_str()))
        .map(|s| s.summary())
        .collect();
    failures.check(bad_noise.is_empty(), || {
        format!(
            "a /noise SERVER span (caller unselected, no header) must be a root in its own trace:\n  {}",
            bad_noise.join("\n  ")
        )
    });
    if let Some(v) = counters.get("inject_failed") {
        failures.check(*v == 0, || format!("counter inject_failed = {v}"));
    }
    failures.finish("sequential chain nginx → python → node → postgresql");
}

#[test]
fn chain_concurrent_trace_completeness_is_measured_and_nothing_is_mislinked() {
    let _serial = require_root();
    let collector = Collector::start();
    let topo = Topology::start(true);
    let mut agent = topo.agent().start(&collector);
    let mut failures = Failures::default();

    let started = Instant::now();
    let loops: Vec<thread::JoinHandle<tests::CurlResult>> = (0..CONCURRENT_LOOPS)
        .map(|l| {
            let urls: Vec<String> = (0..REQUESTS_PER_LOOP)
                .map(|k| topo.entry_url(&format!("/chain/{}", l * REQUESTS_PER_LOOP + k)))
                .collect();
            thread::spawn(move || {
                let mut curl = Curl::get(urls[0].clone());
                for u in &urls[1..] {
                    curl = curl.then(u.clone());
                }
                curl.run()
            })
        })
        .collect();
    let results: Vec<tests::CurlResult> = loops
        .into_iter()
        .map(|h| h.join().expect("curl loop"))
        .collect();
    let n = CONCURRENT_LOOPS * REQUESTS_PER_LOOP;
    eprintln!(
        "[e2e] {n} requests in {CONCURRENT_LOOPS} parallel curl loops in {:?}",
        started.elapsed()
    );
    let bad: Vec<(usize, u16)> = results
        .iter()
        .enumerate()
        .flat_map(|(l, r)| {
            r.transfers
                .iter()
                .enumerate()
                .filter(|(_, t)| t.status != 200)
                .map(move |(k, t)| (l * REQUESTS_PER_LOOP + k, t.status))
        })
        .collect();
    assert!(bad.is_empty(), "requests that failed (id, status): {bad:?}");

    let ids: Vec<String> = (0..n).map(|i| i.to_string()).collect();
    let chain = topo.chain();
    wait_until(&collector, TRACE_WAIT, |spans| {
        all_hops_present(&chain, spans, &ids)
    });
    let spans = agent.stop_and_collect(&collector, &[]);
    let counters = propagation_counters(&agent);
    eprintln!("[e2e] agent counters: {counters:?}");

    let report = chain.check(&spans, &ids);
    let path = write_completeness(
        "nginx-python-node-postgresql-concurrent",
        &report,
        &chain,
        &format!(
            "({CONCURRENT_LOOPS} curl loops x {REQUESTS_PER_LOOP} requests in parallel; agent counters {counters:?})\n"
        ),
    );
    eprintln!("[e2e] wrote {path}");

    // Not asserted: completeness (reported). Asserted: what must hold under any concurrency.
    // 1. Every HTTP hop's span exists once per request (capture does not depend on linking).
    let http_hops: Vec<usize> = chain
        .hops
        .iter()
        .enumerate()
        .filter(|(_, h)| !h.name.contains("postgresql"))
        .map(|(i, _)| i)
        .collect();
    let missing: Vec<String> = report
        .requests
        .iter()
        .flat_map(|r| {
            http_hops
                .iter()
                .filter(|i| r.hops[**i].is_none())
                .map(|i| format!("request {}: {}", r.id, chain.hops[*i].name))
                .collect::<Vec<_>>()
        })
        .collect();
    failures.check(missing.is_empty(), || {
        format!(
            "HTTP spans missing or duplicated ({}):\n  {}",
            missing.len(),
            missing
                .iter()
                .take(20)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n  ")
        )
    });
    // 2. Ambiguity is never resolved by guessing: no span linked to another request's.
    failures.check(report.mislinks.is_empty(), || {
        format!(
            "{} mis-link(s) (a span joined ANOTHER request's trace):\n{}",
            report.mislinks.len(),
            report
                .mislinks
                .iter()
                .take(10)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        )
    });
    // 3. No request arrived anywhere with more than one traceparent.
    let doubled: Vec<String> = topo
        .py
        .seen()
        .into_iter()
        .chain(topo.node.seen())
        .filter(|s| s.traceparents.len() > 1)
        .map(|s| format!("{} {:?}", s.path, s.traceparents))
        .collect();
    failures.check(doubled.is_empty(), || {
        format!("requests with several traceparent headers: {doubled:?}")
    });
    failures.finish("concurrent chain");
}

// ---------------------------------------------------------------------------------------------
// OpenTelemetry SDK interop.

const SDK_REQUESTS: usize = 5;

#[test]
fn sdk_instrumented_caller_to_traced_server_continues_the_sdk_trace() {
    let _serial = require_root();
    let net = Network::new(&["caller", "svc"]);
    let collector = Collector::start_with(tests::collector::CollectorOptions {
        all_addresses: true,
        ..Default::default()
    });
    let svc = ChainPy::start(net.host("svc"), "");
    let mut agent = Agent::builder().pid(svc.pid()).start(&collector);
    let mut failures = Failures::default();

    let endpoint = collector.grpc_endpoint_at(net.gateway().into());
    let run = sdk_client(
        Some(net.host("caller")),
        &endpoint,
        &svc.url("/noise"),
        SDK_REQUESTS,
    );
    let sdk_traces: BTreeSet<&str> = run.requests.iter().map(|r| r.trace_id.as_str()).collect();
    let spans = wait_until(&collector, TRACE_WAIT, |spans| {
        sdk_traces
            .iter()
            .all(|t| spans.iter().filter(|s| s.trace_id == *t).count() >= 2)
    });
    drop(spans);
    let spans = agent.stop_and_collect(&collector, &[]);
    let seen = seen_for(&svc.seen(), "/noise")
        .into_iter()
        .cloned()
        .collect::<Vec<_>>();
    failures.check(seen.len() == SDK_REQUESTS, || {
        format!(
            "the service saw {} requests, sent {SDK_REQUESTS}",
            seen.len()
        )
    });

    for (r, arrived) in run.requests.iter().zip(&seen) {
        let what = format!(
            "SDK request {} (trace {}, SDK span {})",
            r.index, r.trace_id, r.span_id
        );
        // The SDK's span reached the collector (the interop baseline).
        let sdk_span: Vec<&ReceivedSpan> = spans
            .iter()
            .filter(|s| s.span_id == r.span_id && s.service_name() == Some("e2e-sdk-client"))
            .collect();
        failures.check(sdk_span.len() == 1, || {
            format!(
                "{what}: the SDK CLIENT span was received {} times (expected once)",
                sdk_span.len()
            )
        });
        // The header arrived as the SDK sent it (the caller is not traced: nothing rewritten).
        failures.check(arrived.traceparents == [r.traceparent.clone()], || {
            format!(
                "{what}: the service received {:?}, the SDK sent {:?}",
                arrived.traceparents, r.traceparent
            )
        });
        let server: Vec<&ReceivedSpan> = spans
            .iter()
            .filter(|s| {
                http_span(s, SpanKind::Server, svc.pid(), "/noise") && s.trace_id == r.trace_id
            })
            .collect();
        match server.as_slice() {
            [s] => failures.check(s.parent_span_id.as_deref() == Some(r.span_id.as_str()), || {
                format!(
                    "{what}: the agent's SERVER span must be the child of the SDK CLIENT span {}: {}",
                    r.span_id,
                    s.summary()
                )
            }),
            other => failures.add(format!(
                "{what}: expected ONE agent SERVER span in the SDK's trace, found {}; server spans received:\n  {}",
                other.len(),
                spans
                    .iter()
                    .filter(|s| s.pid() == Some(svc.pid()))
                    .map(|s| s.summary())
                    .collect::<Vec<_>>()
                    .join("\n  ")
            )),
        }
    }
    failures.finish("SDK caller → traced server");
}

#[test]
fn traced_service_to_sdk_instrumented_server_carries_the_agents_ids() {
    let _serial = require_root();
    let net = Network::new(&["svc", "sdk"]);
    let collector = Collector::start_with(tests::collector::CollectorOptions {
        all_addresses: true,
        ..Default::default()
    });
    let sdk = SdkServer::start(
        net.host("sdk"),
        &collector.grpc_endpoint_at(net.gateway().into()),
    );
    let svc = ChainPy::start(net.host("svc"), &sdk.base_url());
    let mut agent = Agent::builder().pid(svc.pid()).start(&collector);
    let mut failures = Failures::default();
    expect_propagation_on(&mut failures, &agent);

    let ids: Vec<String> = (0..SDK_REQUESTS).map(|i| i.to_string()).collect();
    // Spaced as from separate callers (see the sequential chain test).
    let mut curl = Curl::get(svc.url("/chain/0")).rate("5/s");
    for id in &ids[1..] {
        curl = curl.then(svc.url(&format!("/chain/{id}")));
    }
    let curl = curl.run();
    for t in &curl.transfers {
        assert_eq!(
            t.status,
            200,
            "request through the service to the SDK server failed; SDK server stderr:\n{}",
            sdk.stderr()
        );
    }
    let py = svc.pid();
    wait_until(&collector, TRACE_WAIT, |spans| {
        ids.iter().all(|id| {
            spans
                .iter()
                .any(|s| http_span(s, SpanKind::Server, py, &format!("/chain/{id}")))
                && spans
                    .iter()
                    .any(|s| http_span(s, SpanKind::Client, py, &format!("/work/{id}")))
                && spans.iter().any(|s| {
                    s.service_name() == Some("e2e-sdk-server")
                        && s.attr_str("url.path") == Some(format!("/work/{id}").as_str())
                })
        })
    });
    let spans = agent.stop_and_collect(&collector, &[]);
    let sdk_seen = sdk.spans();

    for id in &ids {
        let what = format!("request {id}");
        let one = |kind: SpanKind, path: String| -> Option<&ReceivedSpan> {
            let found: Vec<&ReceivedSpan> = spans
                .iter()
                .filter(|s| http_span(s, kind, py, &path))
                .collect();
            match found.as_slice() {
                [s] => Some(*s),
                _ => None,
            }
        };
        let server = one(SpanKind::Server, format!("/chain/{id}"));
        let client = one(SpanKind::Client, format!("/work/{id}"));
        let (Some(server), Some(client)) = (server, client) else {
            failures.add(format!(
                "{what}: expected one agent SERVER span /chain/{id} and one CLIENT span /work/{id}; the service's spans:\n  {}",
                spans
                    .iter()
                    .filter(|s| s.pid() == Some(py))
                    .map(|s| s.summary())
                    .collect::<Vec<_>>()
                    .join("\n  ")
            ));
            continue;
        };
        failures.check(
            client.parent_span_id.as_deref() == Some(server.span_id.as_str())
                && client.trace_id == server.trace_id,
            || {
                format!(
                    "{what}: the agent's CLIENT span must be the child of its SERVER span (same thread):\n  server {}\n  client {}",
                    server.summary(),
                    client.summary()
                )
            },
        );
        let path = format!("/work/{id}");
        let handled: Vec<_> = sdk_seen.iter().filter(|s| s.path == path).collect();
        let [h] = handled.as_slice() else {
            failures.add(format!(
                "{what}: the SDK server handled {} requests for {path}",
                handled.len()
            ));
            continue;
        };
        failures.check(h.traceparents.len() == 1, || {
            format!(
                "{what}: the SDK server received {} traceparent headers: {:?}",
                h.traceparents.len(),
                h.traceparents
            )
        });
        failures.check(
            h.trace_id == client.trace_id && h.parent_id.as_deref() == Some(client.span_id.as_str()),
            || {
                format!(
                    "{what}: the SDK SERVER span (trace {}, parent {:?}, header {:?}) must continue the agent's CLIENT span (trace {}, span {})",
                    h.trace_id, h.parent_id, h.traceparents, client.trace_id, client.span_id
                )
            },
        );
        // The SDK exported its span to the same collector, with the same ids.
        let exported: Vec<&ReceivedSpan> = spans
            .iter()
            .filter(|s| s.service_name() == Some("e2e-sdk-server") && s.span_id == h.span_id)
            .collect();
        failures.check(
            exported.len() == 1
                && exported[0].trace_id == h.trace_id
                && exported[0].parent_span_id == h.parent_id,
            || format!("{what}: the collector's copy of the SDK SERVER span differs from what the SDK printed ({h:?}): {exported:?}"),
        );
    }
    failures.finish("traced service → SDK server");
}

#[test]
fn a_request_that_already_has_a_traceparent_gets_its_parent_id_rewritten_not_a_second_header() {
    let _serial = require_root();
    let net = Network::new(&["app", "svc"]);
    let collector = Collector::start();
    let server = ChecksumServer::start(Some(net.host("svc")));
    let specs = [
        "GET:/own/0:0:tp",
        "POST:/own/1:70000:tp",
        "GET:/plain/2:0",
        "GET:/own/3:0:tp",
    ];
    // The python client, held before its first request, is selected by pid.
    let client = HeaderClient::spawn(Some(net.host("app")), &server, &specs);
    let mut agent = Agent::builder()
        .pid(server.pid())
        .pid(client.pid())
        .start(&collector);
    let mut failures = Failures::default();
    expect_propagation_on(&mut failures, &agent);
    let run = client.run();
    let client_pid = run.pid;
    wait_until(&collector, TRACE_WAIT, |spans| {
        run.exchanges.iter().all(|e| {
            spans
                .iter()
                .any(|s| http_span(s, SpanKind::Client, client_pid, &e.path))
                && spans
                    .iter()
                    .any(|s| http_span(s, SpanKind::Server, server.pid(), &e.path))
        })
    });
    let spans = agent.stop_and_collect(&collector, &[]);
    eprintln!("[e2e] agent counters: {:?}", propagation_counters(&agent));

    for e in &run.exchanges {
        let what = format!("request {} {} {}", e.index, e.method, e.path);
        check_body_and_headers(&mut failures, &what, e, true);
        let client: Vec<&ReceivedSpan> = spans
            .iter()
            .filter(|s| http_span(s, SpanKind::Client, client_pid, &e.path))
            .collect();
        let [client] = client.as_slice() else {
            failures.add(format!(
                "{what}: expected ONE CLIENT span of the python client, found {}",
                client.len()
            ));
            continue;
        };
        let [arrived] = e.server_traceparents.as_slice() else {
            failures.add(format!(
                "{what}: the server received {} traceparent headers (expected exactly one): {:?}",
                e.server_traceparents.len(),
                e.server_traceparents
            ));
            continue;
        };
        let Some((_, trace, parent, flags)) = parse_traceparent(arrived) else {
            failures.add(format!(
                "{what}: malformed traceparent arrived: {arrived:?}"
            ));
            continue;
        };
        match e.sent_header("traceparent").and_then(parse_traceparent) {
            Some((_, sent_trace, sent_parent, sent_flags)) => {
                failures.check(trace == sent_trace && flags == sent_flags, || {
                    format!(
                        "{what}: the trace id/flags were changed: sent {:?}, arrived {arrived}",
                        e.sent_header("traceparent")
                    )
                });
                failures.check(parent == client.span_id && parent != sent_parent, || {
                    format!(
                        "{what}: the parent id must be rewritten to the agent's CLIENT span id {}: sent {:?}, arrived {arrived}",
                        client.span_id,
                        e.sent_header("traceparent")
                    )
                });
                failures.check(
                    client.trace_id == sent_trace && client.parent_span_id.as_deref() == Some(sent_parent),
                    || format!("{what}: the CLIENT span must continue the caller's context (trace {sent_trace}, parent {sent_parent}): {}", client.summary()),
                );
                failures.check(
                    e.received_header("tracestate") == e.sent_header("tracestate"),
                    || {
                        format!(
                            "{what}: tracestate changed: sent {:?}, arrived {:?}",
                            e.sent_header("tracestate"),
                            e.received_header("tracestate")
                        )
                    },
                );
            }
            None => {
                failures.check(trace == client.trace_id && parent == client.span_id, || {
                    format!("{what}: the injected traceparent {arrived} must carry the CLIENT span's ids: {}", client.summary())
                });
            }
        }
        // The traced server continues from the client span.
        let server_span: Vec<&ReceivedSpan> = spans
            .iter()
            .filter(|s| http_span(s, SpanKind::Server, server.pid(), &e.path))
            .collect();
        failures.check(
            server_span.len() == 1
                && server_span[0].parent_span_id.as_deref() == Some(client.span_id.as_str())
                && server_span[0].trace_id == client.trace_id,
            || {
                format!(
                    "{what}: expected one SERVER span, child of the CLIENT span {}: {:?}",
                    client.span_id,
                    server_span.iter().map(|s| s.summary()).collect::<Vec<_>>()
                )
            },
        );
    }
    failures.finish("request with its own traceparent");
}

/// The server got the body byte-exact and the header lines exactly as sent, apart from (when
/// `injection`) one added traceparent right after the request line or an existing one whose
/// parent id changed in place.
fn check_body_and_headers(
    failures: &mut Failures,
    what: &str,
    e: &HeaderExchange,
    injection: bool,
) {
    failures.check(e.status == 200, || format!("{what}: status {}", e.status));
    failures.check(e.server_len == e.len && e.server_sha256 == e.sha256, || {
        format!(
            "{what}: body differs: sent {} bytes sha256 {}, server read {} bytes sha256 {}",
            e.len, e.sha256, e.server_len, e.server_sha256
        )
    });
    let sent_tp = e
        .sent
        .iter()
        .position(|(n, _)| n.eq_ignore_ascii_case("traceparent"));
    let mut expected: Vec<(String, String)> = e.sent.clone();
    let mut got = e.server_headers.clone();
    if injection {
        match sent_tp {
            // Rewritten in place: compare everything but that value.
            Some(i) => {
                if let Some(g) = got.get_mut(i)
                    && g.0.eq_ignore_ascii_case("traceparent")
                {
                    g.1 = expected[i].1.clone();
                }
            }
            // Added: must be the first header line.
            None => {
                if got.first().is_some_and(|(n, _)| n == "traceparent") {
                    got.remove(0);
                }
            }
        }
    } else {
        expected = e.sent.clone();
    }
    failures.check(got == expected, || {
        format!(
            "{what}: header lines differ from what was sent (expected {}):\n  sent    {:?}\n  arrived {:?}",
            if injection {
                "the same, plus one traceparent first or one rewritten in place"
            } else {
                "exactly the same"
            },
            e.sent,
            e.server_headers
        )
    });
}

// ---------------------------------------------------------------------------------------------
// Injection soak.

#[test]
fn injection_soak_100k_requests_byte_exact() {
    let _serial = require_root();
    let collector = Collector::start_quiet();
    let server = ChecksumServer::start(None);
    let mib = 1024 * 1024;
    let plan = SoakPlan {
        gets: 100_000,
        connections: 4,
        posts: 100,
        post_sizes: vec![0, 1, mib, 4 * mib, 4 * mib - 1, 65_536, 65_537],
        post_max: 4 * mib,
        small_posts: 400,
        small_max: 16 * 1024,
        chunked: 50,
        chunked_max: 512 * 1024,
        pipeline_batches: 200,
        pipeline_depth: 5,
        splits: 400,
    };
    // Client and server selected by pid (the client is held before its first request).
    let client = SoakClient::spawn(&server, &plan, Duration::from_secs(300));
    // --verbose: the summary lists zero counters too (the checks below need inject_failed).
    let mut agent = Agent::builder()
        .pid(server.pid())
        .pid(client.pid())
        .arg("--verbose")
        .start(&collector);
    let mut failures = Failures::default();
    expect_propagation_on(&mut failures, &agent);
    let started = Instant::now();
    let run = client.run();
    let elapsed = started.elapsed();

    let mut table = String::new();
    for (name, c) in &run.classes {
        table.push_str(&format!(
            "  {name:<10} {:>7} requests {:>7} ok {:>4} failed  traceparent: {:>7} x0 {:>7} x1 {:>3} x2+  ({:5.1}% injected)\n",
            c.requests,
            c.ok,
            c.failed,
            c.tp0,
            c.tp1,
            c.tp_many,
            if c.requests == 0 { 0.0 } else { 100.0 * c.tp1 as f64 / c.requests as f64 },
        ));
    }
    eprintln!(
        "[e2e] soak: {} requests in {elapsed:?} ({:.0}/s), {} failed\n{table}phases (ms): {:?}\nsample traceparents: {:?}",
        run.total,
        run.total as f64 / elapsed.as_secs_f64(),
        run.failed,
        run.phases,
        run.samples
    );
    agent.stop();
    let counters = propagation_counters(&agent);
    let all_counters = agent.summary_counters();
    // What the agent lost or cut under this load (not asserted here: this test is about the
    // requests), and how many spans reached the collector (about two per request expected).
    let losses: BTreeMap<&String, &u64> = all_counters
        .iter()
        .filter(|(k, v)| {
            **v > 0
                && [
                    "lost",
                    "dropped",
                    "failed",
                    "full",
                    "evicted",
                    "incomplete",
                    "resync",
                ]
                .iter()
                .any(|w| k.contains(w))
        })
        .collect();
    eprintln!(
        "[e2e] soak: agent counters {counters:?}\nloss counters > 0: {losses:?}\nthe collector received {} spans so far (requests x 2 = {})",
        collector.received_span_count(),
        run.total * 2
    );

    failures.check(run.total as usize == plan.total(), || {
        format!(
            "the client made {} requests, the plan has {}",
            run.total,
            plan.total()
        )
    });
    failures.check(run.total >= 100_000, || {
        format!("only {} requests", run.total)
    });
    failures.check(run.failed == 0, || {
        format!(
            "{} request(s) failed (wrong status, body, headers, or several traceparents); first ones:\n  {}",
            run.failed,
            run.failures.join("\n  ")
        )
    });
    let injected: u64 = run.classes.values().map(|c| c.tp1).sum();
    // The common shapes (keep-alive GETs, the bulk, and small POSTs in one write or head then
    // body) carry the header unless they were written while their socket was parked: a
    // keep-alive socket leaves the injector when its answer comes and rejoins once the answer
    // was read, and this client writes its next request microseconds after that (see README).
    // Every request without a header must be accounted for by the kernel; large, chunked and
    // split requests may also be skipped by design (counted as inject_skipped).
    let parked = all_counters
        .get("requests_sent_parked")
        .copied()
        .unwrap_or(0);
    let mut common_without = 0;
    for name in ["get", "small-1w", "small-2w"] {
        let c = run.classes.get(name).cloned().unwrap_or_default();
        failures.check(c.requests > 0 && c.tp1 + c.tp0 == c.requests && c.tp_many == 0, || {
            format!(
                "every {name} request must arrive with at most one header: {} with one, {} without, {} with several, of {}",
                c.tp1, c.tp0, c.tp_many, c.requests
            )
        });
        common_without += c.tp0;
    }
    failures.check(common_without <= parked, || {
        format!(
            "{common_without} common-shape requests arrived without a header but the kernel counted only {parked} requests sent while parked"
        )
    });
    let gets = run.classes.get("get").cloned().unwrap_or_default();
    failures.check(gets.tp1 > 0, || {
        "no keep-alive GET was injected at all".to_string()
    });
    eprintln!(
        "[e2e] soak: back-to-back keep-alive GETs injected: {} of {} ({:.1}%); requests sent while parked (kernel): {parked}",
        gets.tp1,
        gets.requests,
        100.0 * gets.tp1 as f64 / gets.requests.max(1) as f64
    );
    for name in ["traceparent_injected", "inject_failed"] {
        failures.check(all_counters.contains_key(name), || {
            format!(
                "the exit summary has no counter {name:?}; counters: {:?}",
                all_counters.keys().collect::<Vec<_>>()
            )
        });
    }
    if let Some(n) = all_counters.get("traceparent_injected") {
        failures.check(*n == injected, || {
            format!("the agent counted {n} injected traceparents, the server received {injected}")
        });
    }
    if let Some(n) = all_counters.get("inject_failed") {
        failures.check(*n == 0, || format!("inject_failed = {n}"));
    }
    failures.finish("injection soak");
}

// ---------------------------------------------------------------------------------------------
// Injection off: byte-exact requests, traces linked by same-host pairing.

#[test]
fn propagation_off_leaves_requests_untouched_and_pairing_still_links_the_trace() {
    let _serial = require_root();
    let collector = Collector::start();
    let topo = Topology::start(false);
    let checksum = ChecksumServer::start(Some(topo.net.host("proxy")));
    // A selected client (held before its first request): its requests must arrive exactly as
    // sent.
    let client = HeaderClient::spawn(
        Some(topo.net.host("client")),
        &checksum,
        &["GET:/off/0:0", "POST:/off/1:300000", "GET:/off/2:0:tp"],
    );
    let mut agent = topo
        .agent()
        .pid(client.pid())
        .pid(checksum.pid())
        .arg("--context-propagation")
        .arg("off")
        .start(&collector);
    let mut failures = Failures::default();
    let status = agent.context_propagation_status();
    failures.check(
        status.as_deref().is_some_and(|s| s.starts_with("off")),
        || format!("start-up: expected `agent: context propagation: off (...)`, got {status:?}"),
    );

    let ids: Vec<String> = (0..5).map(|i| i.to_string()).collect();
    let mut curl = Curl::get(topo.entry_url("/chain/0"));
    for id in &ids[1..] {
        curl = curl.then(topo.entry_url(&format!("/chain/{id}")));
    }
    let curl = curl.run();
    for t in &curl.transfers {
        assert_eq!(
            t.status, 200,
            "request through python → node → postgresql failed"
        );
    }
    let run = client.run();

    let chain = topo.chain();
    wait_until(&collector, TRACE_WAIT, |spans| {
        all_hops_present(&chain, spans, &ids)
    });
    let spans = agent.stop_and_collect(&collector, &[]);
    let counters = propagation_counters(&agent);
    eprintln!("[e2e] agent counters: {counters:?}");

    for e in &run.exchanges {
        let what = format!("request {} {} {}", e.index, e.method, e.path);
        check_body_and_headers(&mut failures, &what, e, false);
        failures.check(
            e.server_traceparents.len() == usize::from(e.sent_header("traceparent").is_some()),
            || {
                format!(
                    "{what}: traceparents arrived {:?}, sent {:?}",
                    e.server_traceparents,
                    e.sent_header("traceparent")
                )
            },
        );
    }
    let with_header: Vec<Seen> = topo
        .node
        .seen()
        .into_iter()
        .filter(|s| !s.traceparents.is_empty())
        .collect();
    failures.check(with_header.is_empty(), || {
        format!("with propagation off, node received traceparent headers: {with_header:?}")
    });
    let report = chain.check(&spans, &ids);
    write_completeness(
        "python-node-postgresql-propagation-off",
        &report,
        &chain,
        &format!(
            "(--context-propagation off, {} sequential requests; agent counters {counters:?})\n",
            ids.len()
        ),
    );
    if report.complete() != ids.len() || !report.mislinks.is_empty() {
        failures.add(format!(
            "with propagation off, in-process linking and same-host pairing must still link every request (python → node by pairing, node → postgresql by pairing):\n{}",
            report.describe_failures(5)
        ));
    }
    if let Some(n) = counters.get("traceparent_injected") {
        failures.check(*n == 0, || {
            format!("traceparent_injected = {n} with propagation off")
        });
    }
    failures.finish("propagation off");
}

// ---------------------------------------------------------------------------------------------
// The harness itself, without the agent.

#[test]
fn harness_chain_in_namespaces_without_the_agent() {
    let _serial = require_root();
    let before = test_namespaces();
    let bridge;
    {
        let topo = Topology::start(true);
        bridge = topo.net.bridge().to_string();
        assert!(tests::netns::link_exists(&bridge), "bridge {bridge} exists");
        // Each service listens on its own host's address, not on loopback.
        assert_ne!(topo.py.ip(), topo.net.host("node").ip());
        let curl = Curl::get(topo.entry_url("/chain/1"))
            .then(topo.entry_url("/chain/2"))
            .run();
        assert!(
            curl.transfers.iter().all(|t| t.status == 200),
            "chain answers: {:?}\npython stderr:\n{}\nnode stderr:\n{}",
            curl.transfers,
            topo.py.stderr(),
            topo.node.stderr()
        );
        // What each hop saw: the request ids, no traceparent (nothing injects without the agent).
        let py = topo.py.seen();
        let node = topo.node.seen();
        assert_eq!(
            py.iter().map(|s| s.path.as_str()).collect::<Vec<_>>(),
            ["/chain/1", "/chain/2"],
            "{py:?}"
        );
        assert_eq!(
            node.iter().map(|s| s.path.as_str()).collect::<Vec<_>>(),
            ["/work/1", "/work/2"],
            "{node:?}"
        );
        assert!(py.iter().chain(&node).all(|s| s.traceparents.is_empty()));
        // The queries reached PostgreSQL in its namespace, from node's address.
        let statements: Vec<String> = topo
            .db
            .statements()
            .into_iter()
            .map(|s| s.sql)
            .filter(|q| q.contains("req_"))
            .collect();
        assert_eq!(statements.len(), 2, "{statements:?}\n{}", topo.db.log());
        assert!(
            statements.iter().any(|q| contains_word(q, "req_1")),
            "{statements:?}"
        );
        let log = topo.db.log();
        let node_ip = topo.net.host("node").ip().to_string();
        assert!(
            log.contains(&format!("host={node_ip}")),
            "PostgreSQL saw a connection from node's address {node_ip}:\n{log}"
        );
    }
    // Dropping the topology removed its namespaces and bridge.
    let after = test_namespaces();
    assert_eq!(after, before, "namespaces left behind");
    assert!(
        !tests::netns::link_exists(&bridge),
        "bridge {bridge} left behind"
    );
}

#[test]
fn harness_sdk_spans_from_namespaces_reach_the_collector() {
    let _serial = require_root();
    let net = Network::new(&["caller", "svc", "sdk"]);
    let collector = Collector::start_with(tests::collector::CollectorOptions {
        all_addresses: true,
        ..Default::default()
    });
    let endpoint = collector.grpc_endpoint_at(net.gateway().into());
    let sdk = SdkServer::start(net.host("sdk"), &endpoint);
    let svc = ChainPy::start(net.host("svc"), &sdk.base_url());
    // SDK client → python service → SDK server: without the agent, the python service does not
    // propagate, so the SDK server starts new traces.
    let run = sdk_client(Some(net.host("caller")), &endpoint, &svc.url("/chain/7"), 2);
    assert!(
        run.requests.iter().all(|r| r.status == 200),
        "{:?}",
        run.requests
    );
    let seen = svc.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    for (r, s) in run.requests.iter().zip(&seen) {
        assert_eq!(
            s.traceparents,
            std::slice::from_ref(&r.traceparent),
            "the SDK's header arrived as sent"
        );
        let (_, trace, parent, _) = parse_traceparent(&r.traceparent).expect("valid traceparent");
        assert_eq!((trace, parent), (r.trace_id.as_str(), r.span_id.as_str()));
    }
    let handled = sdk.spans();
    assert_eq!(handled.len(), 2, "{handled:?}\n{}", sdk.stderr());
    assert!(
        handled
            .iter()
            .all(|h| h.traceparents.is_empty() && h.parent_id.is_none())
    );
    let spans = collector.wait_for_spans("2 SDK client and 2 SDK server spans", TRACE_WAIT, |s| {
        s.iter()
            .filter(|x| x.service_name() == Some("e2e-sdk-client"))
            .count()
            >= 2
            && s.iter()
                .filter(|x| x.service_name() == Some("e2e-sdk-server"))
                .count()
                >= 2
    });
    for r in &run.requests {
        let s = spans
            .iter()
            .find(|s| s.span_id == r.span_id)
            .unwrap_or_else(|| panic!("SDK client span {} not received:\n{spans}", r.span_id));
        assert_eq!(s.kind, SpanKind::Client);
        assert_eq!(s.trace_id, r.trace_id);
    }
    for h in &handled {
        let s = spans
            .iter()
            .find(|s| s.span_id == h.span_id)
            .unwrap_or_else(|| panic!("SDK server span {} not received:\n{spans}", h.span_id));
        assert_eq!(s.kind, SpanKind::Server);
        assert_eq!(s.attr_str("url.path"), Some(h.path.as_str()));
    }
}

#[test]
fn harness_soak_client_and_checksum_server_without_the_agent() {
    let _serial = require_root();
    let net = Network::new(&["svc"]);
    let server = ChecksumServer::start(Some(net.host("svc")));
    let plan = SoakPlan {
        gets: 2_000,
        connections: 4,
        posts: 10,
        post_sizes: vec![0, 1, 4 * 1024 * 1024],
        post_max: 300_000,
        small_posts: 20,
        small_max: 16 * 1024,
        chunked: 10,
        chunked_max: 200_000,
        pipeline_batches: 10,
        pipeline_depth: 5,
        splits: 16,
    };
    let run = soak_client(&server, &plan, Duration::from_secs(120));
    assert_eq!(run.failed, 0, "failures: {:#?}\n{}", run.failures, run.raw);
    assert_eq!(run.total as usize, plan.total(), "{}", run.raw);
    for (name, c) in &run.classes {
        assert_eq!(
            c.tp0, c.requests,
            "{name}: no traceparent without the agent: {c:?}"
        );
    }
    // The python client with its own traceparent: arrives untouched without the agent.
    let hc = header_client(
        None,
        &server,
        &["GET:/a:0:tp", "POST:/b:100000", "PUT:/c:0"],
    );
    let mut failures = Failures::default();
    for e in &hc.exchanges {
        check_body_and_headers(&mut failures, &format!("request {}", e.index), e, false);
    }
    failures.finish("header client without the agent");
    // The checksum server really compares: a different body is noticed.
    let mut probe = Command::new(tests::curl_bin());
    probe.args(["-sS", "--data-binary", "abc"]).arg(format!(
        "http://{}:{}/probe",
        server.ip(),
        server.port()
    ));
    let (_, out, _, _) = run_to_completion("curl-probe", probe, Duration::from_secs(20));
    assert!(
        out.contains("\"len\":3")
            && out.contains("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"),
        "sha256(abc) reported by the checksum server: {out}"
    );
}

// ---------------------------------------------------------------------------------------------
// Bounded linking: --max-spans-per-trace and --max-trace-age.

#[test]
fn linking_is_bounded_by_max_spans_per_trace_and_max_trace_age() {
    const CAP: usize = 3;
    const FANOUT: usize = 6;
    const MAX_AGE_S: u64 = 2;
    let _serial = require_root();
    let collector = Collector::start();
    let net = Network::new(&["py", "node"]);
    let node = ChainNode::start(net.host("node"), None);
    let py = ChainPy::start(net.host("py"), &node.base_url());
    let mut agent = Agent::builder()
        .pid(py.pid())
        .pid(node.pid())
        .arg("--max-spans-per-trace")
        .arg(&CAP.to_string())
        .arg("--max-trace-age")
        .arg(&MAX_AGE_S.to_string())
        .start(&collector);
    let mut failures = Failures::default();

    // /fanout/1: six calls while serving one request (only the first CAP may join its trace);
    // /fanout/2: one call made MAX_AGE_S + 1 s after the request arrived (too old to join).
    let curl = Curl::get(py.url(&format!("/fanout/1?n={FANOUT}")))
        .then(py.url(&format!(
            "/fanout/2?n=1&delay_ms={}",
            (MAX_AGE_S + 1) * 1000
        )))
        .run();
    for t in &curl.transfers {
        assert_eq!(t.status, 200, "fanout request failed: {}", py.stderr());
    }
    let pid = py.pid();
    let client_paths: Vec<String> = (0..FANOUT)
        .map(|k| format!("/work/{}", 100 + k))
        .chain(["/work/200".to_string()])
        .collect();
    wait_until(&collector, TRACE_WAIT, |spans| {
        ["/fanout/1", "/fanout/2"]
            .iter()
            .all(|p| spans.iter().any(|s| http_span(s, SpanKind::Server, pid, p)))
            && client_paths
                .iter()
                .all(|p| spans.iter().any(|s| http_span(s, SpanKind::Client, pid, p)))
    });
    let spans = agent.stop_and_collect(&collector, &[]);
    eprintln!("[e2e] agent counters: {:?}", propagation_counters(&agent));

    let one = |kind: SpanKind, path: &str| -> Option<&ReceivedSpan> {
        let found: Vec<&ReceivedSpan> = spans
            .iter()
            .filter(|s| http_span(s, kind, pid, path))
            .collect();
        (found.len() == 1).then(|| found[0])
    };
    let all_py = || {
        spans
            .iter()
            .filter(|s| s.pid() == Some(pid))
            .map(|s| format!("  {}", s.summary()))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let (Some(s1), Some(s2)) = (
        one(SpanKind::Server, "/fanout/1"),
        one(SpanKind::Server, "/fanout/2"),
    ) else {
        panic!(
            "expected one SERVER span each for /fanout/1 and /fanout/2:\n{}",
            all_py()
        );
    };
    let linked_to = |c: &ReceivedSpan, s: &ReceivedSpan| {
        c.parent_span_id.as_deref() == Some(s.span_id.as_str()) && c.trace_id == s.trace_id
    };
    let mut pattern = Vec::new();
    for k in 0..FANOUT {
        let path = format!("/work/{}", 100 + k);
        let Some(c) = one(SpanKind::Client, &path) else {
            failures.add(format!(
                "expected one CLIENT span for {path}:\n{}",
                all_py()
            ));
            continue;
        };
        pattern.push(linked_to(c, s1));
        if !linked_to(c, s1) {
            failures.check(c.parent_span_id.is_none() && c.trace_id != s1.trace_id, || {
                format!(
                    "call {k} of /fanout/1 is not the request's child, so it must start its own trace: {}",
                    c.summary()
                )
            });
        }
    }
    let want: Vec<bool> = (0..FANOUT).map(|k| k < CAP).collect();
    failures.check(pattern == want, || {
        format!(
            "--max-spans-per-trace {CAP}: calls 0..{CAP} of /fanout/1 must be children of its SERVER span and the rest not; linked per call: {pattern:?}\nserver {}\n{}",
            s1.summary(),
            all_py()
        )
    });
    match one(SpanKind::Client, "/work/200") {
        Some(c) => failures.check(
            c.parent_span_id.is_none() && c.trace_id != s2.trace_id,
            || {
                format!(
                    "--max-trace-age {MAX_AGE_S}: a call made {} s after its request arrived must not join that request's trace:\n  server {}\n  client {}",
                    MAX_AGE_S + 1,
                    s2.summary(),
                    c.summary()
                )
            },
        ),
        None => failures.add(format!("expected one CLIENT span for /work/200:\n{}", all_py())),
    }
    // Every call still arrived intact, with at most one traceparent carrying its own ids.
    for seen in node.seen() {
        failures.check(seen.status == 200 && seen.traceparents.len() <= 1, || {
            format!("node saw {seen:?}")
        });
        if let (Some(tp), Some(c)) = (seen.traceparents.first(), one(SpanKind::Client, &seen.path))
        {
            failures.check(
                parse_traceparent(tp).is_some_and(|(_, t, p, _)| t == c.trace_id && p == c.span_id),
                || {
                    format!(
                        "{}: arrived {tp}, its CLIENT span is {}",
                        seen.path,
                        c.summary()
                    )
                },
            );
        }
    }
    failures.finish("bounded linking");
}
