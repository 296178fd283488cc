//! Privileged end-to-end tests of Go `crypto/tls` (issue 11): a Go https server and a Go https
//! client (`tests/fixtures/go_tls/main.go`, standard library only, built by the test with
//! Debian's Go 1.19 and 1.23, stripped or not) under the agent: the same spans as plaintext,
//! `url.scheme` https, exact counts, and same-host pairing linking each client span to its
//! server span.
//!
//! Needs root and the agent binary (`AGENT_BIN`). Run serially, holding the host lock:
//! `flock /tmp/agent-e2e.lock env AGENT_BIN=$PWD/target/debug/agent cargo test -p tests --test
//! go_tls_e2e -- --test-threads=1`.

use std::path::PathBuf;
use std::process::Command;

use tests::process::TestDir;
use tests::servers::ScriptServer;
use tests::{Agent, Checks, Collector, ReceivedSpan, SpanFilter, SpanKind, SpanStatus, Spans};

/// The fixture's large body, both ways (more than a TLS record and the capture size).
const LARGE: i64 = 300 * 1024;

/// (method, path, status, request body bytes, response body bytes), in the client's order,
/// over one keep-alive connection.
const EXCHANGES: [(&str, &str, i64, i64, i64); 6] = [
    ("GET", "/hello", 200, 0, 15),
    ("GET", "/hello", 200, 0, 15),
    ("GET", "/hello", 200, 0, 15),
    ("POST", "/upload", 201, LARGE, 17),
    ("GET", "/large", 200, 0, LARGE),
    ("GET", "/missing", 404, 0, 19),
];

#[test]
fn go_1_19_https_server_and_client_give_paired_spans() {
    run("1.19", false);
}

#[test]
fn go_1_23_https_server_and_client_give_paired_spans() {
    run("1.23", false);
}

#[test]
fn go_1_19_stripped_https_server_and_client_give_paired_spans() {
    run("1.19", true);
}

#[test]
fn go_1_23_stripped_https_server_and_client_give_paired_spans() {
    run("1.23", true);
}

#[test]
fn go_1_23_concurrent_connections_are_never_mixed() {
    concurrent("1.23", false);
}

#[test]
fn go_1_19_stripped_concurrent_connections_are_never_mixed() {
    concurrent("1.19", true);
}

/// Builds the fixture with one Go version into the target directory (Go's build cache makes a
/// rebuild quick); the module proxy is not reachable here: standard library only.
fn build(version: &str, stripped: bool) -> PathBuf {
    let go = PathBuf::from(format!("/usr/lib/go-{version}/bin/go"));
    assert!(
        go.exists(),
        "{} is missing: cargo xtask setup installs golang-{version}-go",
        go.display()
    );
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/go-tests")
        .join(format!("go-tls-{version}"));
    std::fs::create_dir_all(&dir).expect("go build directory");
    let out = dir.join(if stripped {
        "go_tls-stripped"
    } else {
        "go_tls"
    });
    let mut cmd = Command::new(&go);
    cmd.current_dir(tests::fixture("go_tls"))
        .env("GOCACHE", dir.join("cache"))
        .env("GO111MODULE", "off")
        .env("GOFLAGS", "")
        .args(["build", "-o"])
        .arg(&out);
    if stripped {
        cmd.arg("-ldflags=-s -w");
    }
    let output = cmd.arg("main.go").output().expect("run go build");
    assert!(
        output.status.success(),
        "go build with Go {version} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // As the agent names it (from /proc: no `..`).
    std::fs::canonicalize(&out).expect("the built program")
}

/// A self-signed certificate for 127.0.0.1 (the client trusts it as its only root).
fn certificate(dir: &TestDir) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let out = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args(["-subj", "/CN=127.0.0.1"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("the openssl command (apt-get install openssl)");
    assert!(
        out.status.success(),
        "openssl req failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert, key)
}

/// A Go https server under the agent, which selects its program file (the client runs it too).
struct Setup {
    _dir: TestDir,
    cert: PathBuf,
    binary: PathBuf,
    collector: Collector,
    server: ScriptServer,
    agent: Agent,
}

impl Setup {
    fn start(version: &str, stripped: bool) -> Setup {
        let dir = TestDir::new("go-tls");
        let (cert, key) = certificate(&dir);
        let binary = build(version, stripped);
        let collector = Collector::start();
        let mut cmd = Command::new(&binary);
        cmd.args(["server", "127.0.0.1"]).arg(&cert).arg(&key);
        let server = ScriptServer::start_command("go_tls-server", cmd);
        let agent = Agent::builder()
            .exe(binary.to_str().expect("utf-8 path"))
            .start(&collector);
        let attached = format!(
            "Go crypto/tls: attached ({}: Go go{version}",
            binary.display()
        );
        let source = if stripped { ".gopclntab" } else { ".symtab" };
        let report = agent.stderr();
        assert!(
            report.lines().any(
                |l| l.contains(&attached) && l.ends_with(&format!("functions from {source})"))
            ),
            "the start-up report must say `{attached}..., functions from {source})`:\n{report}"
        );
        Setup {
            _dir: dir,
            cert,
            binary,
            collector,
            server,
            agent,
        }
    }

    /// Runs the Go client with `args` after the base URL and the CA; its stdout.
    fn client(&self, mode: &str, args: &[&str]) -> String {
        let out = Command::new(&self.binary)
            .args([mode, &format!("https://127.0.0.1:{}", self.server.port())])
            .arg(&self.cert)
            .args(args)
            // The probes are on the file already; the wait covers the agent selecting it.
            .env("GO_TLS_START_DELAY_MS", "500")
            .output()
            .expect("run the Go client");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "the Go client failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }
}

fn run(version: &str, stripped: bool) {
    let _root = tests::require_root();
    let mut setup = Setup::start(version, stripped);
    let port = setup.server.port();
    let stdout = setup.client("client", &[]);
    let expected: Vec<String> = EXCHANGES
        .iter()
        .map(|(m, p, status, _, size)| format!("{m} {p} {status} {size}"))
        .chain(["DONE".to_string()])
        .collect();
    assert_eq!(stdout.lines().collect::<Vec<_>>(), expected);

    let servers = SpanFilter::server().pid(setup.server.pid());
    let clients = SpanFilter::client();
    let spans = setup
        .agent
        .stop_and_collect(&setup.collector, &[(&servers, 6), (&clients, 6)]);
    let server_spans = spans.expect_n(&servers, 6);
    let client_spans = spans.expect_n(&clients, 6);
    check(&spans, &server_spans, &client_spans, port);

    let summary = setup.agent.exit_summary();
    assert_eq!(summary.counter("kernel_go_tls_unassociated"), 0);
    assert_eq!(summary.counter("tls_plaintext_unassociated"), 0);
    assert_eq!(
        summary.counter("connections_tls"),
        2,
        "{}",
        setup.agent.stderr()
    );
    assert_eq!(
        summary.counter("server_spans_paired"),
        6,
        "{}",
        setup.agent.stderr()
    );
}

/// Each exchange once on each side, with its method, path, status, sizes and https; each
/// client span the parent of its server span.
fn check(spans: &Spans, servers: &[&ReceivedSpan], clients: &[&ReceivedSpan], port: u16) {
    let mut failures = tests::Failures::default();
    for (i, (method, path, status, request, response)) in EXCHANGES.iter().enumerate() {
        // Spans come sorted by their end: the client's order.
        for (kind, span) in [
            (SpanKind::Server, servers[i]),
            (SpanKind::Client, clients[i]),
        ] {
            let mut c = Checks::new(format!("{kind:?} span of {method} {path} (#{i})"), span);
            c.kind(kind)
                .attr_str("http.request.method", method)
                .attr_str("url.path", path)
                .attr_str("url.scheme", "https")
                .attr_int("http.response.status_code", *status)
                .attr_int("http.response.body.size", *response)
                .attr_str("network.protocol.version", "1.1")
                .status(if kind == SpanKind::Client && *status >= 400 {
                    SpanStatus::Error
                } else {
                    SpanStatus::Unset
                });
            if *request > 0 {
                c.attr_int("http.request.body.size", *request);
            }
            if kind == SpanKind::Client {
                c.attr_int("server.port", i64::from(port))
                    .attr_str("url.full", &format!("https://127.0.0.1:{port}{path}"));
            } else {
                c.attr_int("server.port", i64::from(port));
            }
            c.finish();
        }
        let (server, client) = (servers[i], clients[i]);
        failures.check(
            server.trace_id == client.trace_id
                && server.parent_span_id.as_deref() == Some(client.span_id.as_str()),
            || {
                format!(
                    "{method} {path} (#{i}): server span {} is not the child of client span \
                     {}:\n{spans}",
                    server.summary(),
                    client.summary()
                )
            },
        );
    }
    failures.finish("go_tls_e2e");
}

/// Eight connections at once, each with its own paths: every span has its own path and the
/// size of its answer (the path), and each server span's parent is the client span of the same
/// path: plaintext of one connection never lands on another.
fn concurrent(version: &str, stripped: bool) {
    const WORKERS: usize = 8;
    const EACH: usize = 25;
    let _root = tests::require_root();
    let mut setup = Setup::start(version, stripped);
    let stdout = setup.client("concurrent", &[&WORKERS.to_string(), &EACH.to_string()]);
    assert_eq!(stdout.trim(), format!("OK {}", WORKERS * EACH));
    let servers = SpanFilter::server().pid(setup.server.pid());
    let clients = SpanFilter::client();
    let n = WORKERS * EACH;
    let spans = setup
        .agent
        .stop_and_collect(&setup.collector, &[(&servers, n), (&clients, n)]);
    let server_spans = spans.expect_n(&servers, n);
    let client_spans = spans.expect_n(&clients, n);
    let mut expected: Vec<String> = (0..WORKERS)
        .flat_map(|w| (0..EACH).map(move |i| format!("/echo/{w}/{i}")))
        .collect();
    expected.sort();
    let mut failures = tests::Failures::default();
    for (side, list) in [("server", &server_spans), ("client", &client_spans)] {
        let mut paths: Vec<String> = list
            .iter()
            .map(|s| s.attr_str("url.path").unwrap_or("").to_string())
            .collect();
        paths.sort();
        failures.check(paths == expected, || {
            format!("{side} spans' paths are not each request's once:\n{spans}")
        });
        for span in list.iter() {
            let path = span.attr_str("url.path").unwrap_or("");
            failures.check(
                span.attr_i64("http.response.body.size") == i64::try_from(path.len()).ok()
                    && span.attr_str("url.scheme") == Some("https"),
                || format!("{side} span with another answer's size: {}", span.summary()),
            );
        }
    }
    let by_id: std::collections::HashMap<&str, &ReceivedSpan> = client_spans
        .iter()
        .map(|c| (c.span_id.as_str(), *c))
        .collect();
    for server in &server_spans {
        let parent = server.parent_span_id.as_deref().and_then(|p| by_id.get(p));
        failures.check(
            parent.is_some_and(|c| c.attr_str("url.path") == server.attr_str("url.path")),
            || {
                format!(
                    "server span not paired with its own client span: {}",
                    server.summary()
                )
            },
        );
    }
    failures.finish("go_tls_e2e concurrent");
    let summary = setup.agent.exit_summary();
    assert_eq!(summary.counter("kernel_go_tls_unassociated"), 0);
    assert_eq!(summary.counter("tls_plaintext_unassociated"), 0);
    assert_eq!(summary.counter("connections_tls"), 2 * WORKERS as u64);
}
