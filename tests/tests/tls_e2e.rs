//! Privileged end-to-end tests of TLS tracing (issue 11): the agent reads the plaintext that
//! real, unmodified programs hand to OpenSSL (nginx, curl, python's `ssl` with http.client and
//! requests, psql/libpq, psycopg's bundled libpq and libssl, PostgreSQL's backends), and the
//! spans must be the same as over plaintext, except `url.scheme` `https` and client
//! `url.full` starting with `https://`. Certificates are made by the test (openssl CLI);
//! every client verifies the server against the test CA.
//!
//! The agent probes a process's TLS library when it finds it, saying
//! `tls: <comm>[<pid>]: OpenSSL: attached (<library>)`; a library loaded later (python imports
//! `ssl` lazily) is found by a rescan every 2 s. So every traced client is held after loading
//! its library until that line names it (`run_gated`), and servers started before the agent
//! are awaited the same way, before any traffic.
//!
//! Needs root and the agent binary (`AGENT_BIN`). Run serially:
//! `cargo test -p tests --test tls_e2e -- --test-threads=1`.

use tests::servers::{NGINX_HELLO_BODY, NGINX_HELLO_PATH, NGINX_LARGE_PATH, NGINX_LARGE_SIZE};
use tests::tls::{
    AccessEntry, Certs, HttpsMode, TlsNginx, TlsVersion, attached, attached_to, https_client,
    tls_attachments, wait_attached,
};
use tests::{
    Agent, Checks, Collector, Curl, CurlResult, ExitSummary, Failures, HttpServer, NodeServer,
    PgServer, PyServer, ReceivedSpan, SpanFilter, SpanKind, SpanStatus, Spans, python_exe_name,
    require_root,
};

const LOOPBACK: &str = "127.0.0.1";
/// The system's OpenSSL 3 (nginx, curl, python's `ssl`, psql and PostgreSQL link it).
const SYSTEM_LIBSSL: &str = "libssl.so.3";
/// psycopg's binary wheel bundles its own libpq and libssl (`libssl-<hash>.so.3`).
const PSYCOPG_LIBSSL: &str = "psycopg_binary.libs/libssl";

/// Checks of a server span over TLS: the plaintext checks of http_e2e, with `https`.
#[allow(clippy::too_many_arguments)]
fn check_server_span(
    what: &str,
    span: &ReceivedSpan,
    server: &dyn HttpServer,
    method: &str,
    path: &str,
    status: i64,
    client_port: u16,
    response_body: u64,
) -> Checks {
    let mut c = Checks::new(what.to_string(), span);
    c.kind(SpanKind::Server)
        .attr_str("http.request.method", method)
        .attr_str("url.path", path)
        .attr_str("url.scheme", "https")
        .attr_int("http.response.status_code", status)
        .attr_int("http.response.body.size", response_body as i64)
        .attr_str("network.protocol.version", "1.1")
        .attr_int("server.port", i64::from(server.port()))
        .attr_str("client.address", LOOPBACK)
        .attr_int("client.port", i64::from(client_port))
        .attr_str("network.peer.address", LOOPBACK)
        .attr_int("network.peer.port", i64::from(client_port))
        .attr_absent("url.full")
        .resource_int("process.pid", i64::from(server.pid()))
        .status(if status >= 500 {
            SpanStatus::Error
        } else {
            SpanStatus::Unset
        });
    c.check(span.name.starts_with(&format!("{method} ")), || {
        format!(
            "span name: expected \"{method} <route or path>\", got {:?}",
            span.name
        )
    });
    c
}

/// Checks of a client span over TLS to 127.0.0.1:`server_port`.
fn check_client_span(
    what: &str,
    span: &ReceivedSpan,
    server_port: u16,
    method: &str,
    path: &str,
    status: i64,
    response_body: u64,
) -> Checks {
    let mut c = Checks::new(what.to_string(), span);
    c.kind(SpanKind::Client)
        .attr_str("http.request.method", method)
        .attr_str("url.path", path)
        .attr_str("url.scheme", "https")
        .attr_str(
            "url.full",
            &format!("https://{LOOPBACK}:{server_port}{path}"),
        )
        .attr_int("http.response.status_code", status)
        .attr_int("http.response.body.size", response_body as i64)
        .attr_str("network.protocol.version", "1.1")
        .attr_str("server.address", LOOPBACK)
        .attr_int("server.port", i64::from(server_port))
        .attr_str("network.peer.address", LOOPBACK)
        .attr_int("network.peer.port", i64::from(server_port))
        .status(if status >= 400 {
            SpanStatus::Error
        } else {
            SpanStatus::Unset
        });
    c.check(span.name.starts_with(method), || {
        format!(
            "span name: expected to start with {method:?}, got {:?}",
            span.name
        )
    });
    c
}

/// The TLS counters of the exit summary for traced TLS connections: `tls` connections seen
/// through the library (exactly: one per traced end of each connection), none left
/// encrypted, no plaintext without its socket.
fn check_tls_counters(summary: &ExitSummary, connections_tls: u64, failures: &mut Failures) {
    for (name, want) in [
        ("connections_tls", connections_tls),
        ("connections_encrypted", 0),
        ("kernel_tls_unassociated", 0),
    ] {
        let got = summary.counter(name);
        failures.check(got == want, || {
            format!("exit summary: {name} = {got}, expected {want}")
        });
    }
}

fn print_counters(test: &str, summary: &ExitSummary) {
    let tls: Vec<String> = summary
        .counters
        .iter()
        .filter(|(k, _)| k.contains("tls") || k.contains("encrypted") || k.starts_with("spans"))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    eprintln!("[e2e] {test}: counters {}", tls.join(" "));
}

/// The libraries the agent attached for `comm[pid]` include `library`.
fn expect_library(agent: &Agent, comm: &str, pid: u32, library: &str) {
    let libraries = tls_attachments(&agent.stderr(), comm, pid);
    assert!(
        libraries.iter().any(|l| l.contains(library)),
        "{comm}[{pid}]: expected the agent to attach to {library}, it reported {libraries:?}"
    );
}

/// The access log's entry for each request of a keep-alive client on local port `port`.
fn logged_requests(nginx: &TlsNginx, port: u16, n: usize) -> Vec<AccessEntry> {
    let entries: Vec<AccessEntry> = nginx
        .access_log()
        .into_iter()
        .filter(|e| e.remote_port == port)
        .collect();
    assert_eq!(
        entries.len(),
        n,
        "nginx logged {} requests from port {port}, expected {n}: {entries:?}",
        entries.len()
    );
    entries
}

/// curl, keep-alive over TLS `version`: four requests on one connection (a small file, a
/// body of ~300 KiB split over many TLS records, a 404 and a 500), spans on both sides.
fn nginx_and_curl(version: TlsVersion) {
    let _serial = require_root();
    let certs = Certs::new();
    let collector = Collector::start();
    let nginx = TlsNginx::start(&certs);
    let mut agent = Agent::builder()
        .comm("nginx")
        .comm("curl")
        .start(&collector);
    wait_attached(&agent, "nginx", nginx.worker_pid());
    expect_library(&agent, "nginx", nginx.worker_pid(), SYSTEM_LIBSSL);

    let paths = [NGINX_HELLO_PATH, NGINX_LARGE_PATH, "/missing", "/boom"];
    let mut curl = Curl::get(nginx.url(paths[0]));
    for path in &paths[1..] {
        curl = curl.then(nginx.url(path));
    }
    curl = curl.arg("--cacert").arg(certs.ca().display().to_string());
    for a in version.curl_args() {
        curl = curl.arg(a);
    }
    let curl: CurlResult = curl.run_gated(attached(&agent, "curl"));
    expect_library(&agent, "curl", curl.pid, SYSTEM_LIBSSL);
    let statuses: Vec<u16> = curl.transfers.iter().map(|t| t.status).collect();
    assert_eq!(statuses, [200, 200, 404, 500]);
    let connects: Vec<u32> = curl.transfers.iter().map(|t| t.num_connects).collect();
    assert_eq!(connects, [1, 0, 0, 0], "curl kept one connection");
    assert_eq!(curl.transfers[1].size_download, NGINX_LARGE_SIZE as u64);
    let port = curl.transfers[0].local_port;
    let logged = logged_requests(&nginx, port, paths.len());
    assert!(
        logged.iter().all(|e| e.protocol == version.name()),
        "nginx's access log: every request over {}: {logged:?}",
        version.name()
    );

    let server_spans = SpanFilter::server().pid(nginx.worker_pid());
    let curl_spans = SpanFilter::client().pid(curl.pid);
    let spans = agent.stop_and_collect(&collector, &[(&server_spans, 4), (&curl_spans, 4)]);
    let summary = agent.exit_summary();
    print_counters(&format!("nginx_and_curl {}", version.name()), &summary);

    let served = spans.expect_n(&server_spans, 4);
    let sent = spans.expect_n(&curl_spans, 4);
    for (i, path) in paths.iter().enumerate() {
        let t = &curl.transfers[i];
        let status = i64::from(t.status);
        let body = logged[i].body_bytes_sent;
        check_server_span(
            &format!("nginx SERVER span #{i} ({path}) over {}", version.name()),
            served[i],
            &nginx,
            "GET",
            path,
            status,
            t.local_port,
            body,
        )
        .resource_str("service.name", "nginx")
        .timing_within(&t.timing)
        .finish();
        check_client_span(
            &format!("curl CLIENT span #{i} ({path}) over {}", version.name()),
            sent[i],
            nginx.port(),
            "GET",
            path,
            status,
            body,
        )
        .resource_str("service.name", "curl")
        .timing_within(&t.timing)
        .finish();
    }
    // Nothing else from these processes (no span parsed from ciphertext), none from the master.
    spans.expect_n(&SpanFilter::any().pid(nginx.worker_pid()), 4);
    spans.expect_n(&SpanFilter::any().pid(curl.pid), 4);
    spans.expect_none(&SpanFilter::any().pid(nginx.master_pid()));
    let mut failures = Failures::default();
    check_tls_counters(&summary, 2, &mut failures);
    failures.finish("nginx and curl over TLS");
}

#[test]
fn nginx_and_curl_over_tls_1_3_keep_alive() {
    nginx_and_curl(TlsVersion::V1_3);
}

#[test]
fn nginx_and_curl_over_tls_1_2_keep_alive() {
    nginx_and_curl(TlsVersion::V1_2);
}

/// A python client (http.client or requests, python's `ssl`: SSL_read_ex/SSL_write_ex) with
/// three requests on one connection to nginx: spans on both sides.
fn nginx_and_python(mode: HttpsMode, version: TlsVersion) {
    let _serial = require_root();
    let python = python_exe_name();
    let certs = Certs::new();
    let collector = Collector::start();
    let nginx = TlsNginx::start(&certs);
    let mut agent = Agent::builder()
        .comm("nginx")
        .comm(&python)
        .start(&collector);
    wait_attached(&agent, "nginx", nginx.worker_pid());

    let specs = [
        "GET:/hello.txt",
        "GET:/large.bin",
        "GET:/missing",
        "GET:/hello.txt",
    ];
    let client = https_client(
        mode,
        nginx.port(),
        &certs.ca(),
        version,
        &specs,
        attached(&agent, &python),
    );
    let run = &client.run;
    expect_library(&agent, &python, run.pid, SYSTEM_LIBSSL);
    assert_eq!(client.tls_version, version.name(), "negotiated protocol");
    let port = run.results[0].local_port;
    let logged = logged_requests(&nginx, port, specs.len());
    assert!(logged.iter().all(|e| e.protocol == version.name()));
    assert_eq!(run.results[1].response_body, NGINX_LARGE_SIZE as u64);

    let server_spans = SpanFilter::server().pid(nginx.worker_pid());
    let client_spans = SpanFilter::client().pid(run.pid);
    let n = specs.len();
    let spans = agent.stop_and_collect(&collector, &[(&server_spans, n), (&client_spans, n)]);
    let summary = agent.exit_summary();
    print_counters(&format!("nginx_and_python {mode:?}"), &summary);

    let served = spans.expect_n(&server_spans, n);
    let sent = spans.expect_n(&client_spans, n);
    for (i, r) in run.results.iter().enumerate() {
        let status = i64::from(r.status);
        check_server_span(
            &format!("nginx SERVER span #{i} ({}) for python {mode:?}", r.path),
            served[i],
            &nginx,
            "GET",
            &r.path,
            status,
            r.local_port,
            logged[i].body_bytes_sent,
        )
        .timing_within(&r.timing)
        .finish();
        check_client_span(
            &format!("python {mode:?} CLIENT span #{i} ({})", r.path),
            sent[i],
            nginx.port(),
            "GET",
            &r.path,
            status,
            r.response_body,
        )
        .resource_str("process.executable.name", &python)
        .timing_within(&r.timing)
        .finish();
    }
    spans.expect_n(&SpanFilter::any().pid(run.pid), n);
    let mut failures = Failures::default();
    check_tls_counters(&summary, 2, &mut failures);
    failures.finish("nginx and python over TLS");
}

#[test]
fn nginx_and_python_http_client_over_tls_1_2_keep_alive() {
    nginx_and_python(HttpsMode::HttpClient, TlsVersion::V1_2);
}

#[test]
fn nginx_and_python_requests_over_tls_1_3_keep_alive() {
    nginx_and_python(HttpsMode::Requests, TlsVersion::V1_3);
}

/// Three requests in ONE SSL_write (one TLS record); nginx answers them in order: three
/// server spans.
#[test]
fn pipelined_requests_in_one_tls_write() {
    let _serial = require_root();
    let certs = Certs::new();
    let collector = Collector::start();
    let nginx = TlsNginx::start(&certs);
    let mut agent = Agent::builder().comm("nginx").start(&collector);
    wait_attached(&agent, "nginx", nginx.worker_pid());

    let specs = ["GET:/hello.txt", "GET:/missing", "GET:/large.bin"];
    // The client is not traced: nothing to wait for.
    let client = https_client(
        HttpsMode::Pipeline,
        nginx.port(),
        &certs.ca(),
        TlsVersion::V1_3,
        &specs,
        |_| true,
    );
    let run = &client.run;
    let statuses: Vec<u16> = run.results.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [200, 404, 200]);
    let logged = logged_requests(&nginx, run.results[0].local_port, 3);

    let server_spans = SpanFilter::server().pid(nginx.worker_pid());
    let spans = agent.stop_and_collect(&collector, &[(&server_spans, 3)]);
    let summary = agent.exit_summary();
    print_counters("pipelined", &summary);
    let served = spans.expect_n(&server_spans, 3);
    for (i, r) in run.results.iter().enumerate() {
        check_server_span(
            &format!("pipelined nginx SERVER span #{i} ({})", r.path),
            served[i],
            &nginx,
            "GET",
            &r.path,
            i64::from(r.status),
            r.local_port,
            logged[i].body_bytes_sent,
        )
        .timing_within(&r.timing)
        .finish();
    }
    spans.expect_none(&SpanFilter::any().pid(run.pid));
    let mut failures = Failures::default();
    check_tls_counters(&summary, 1, &mut failures);
    failures.finish("pipelined over TLS");
}

/// A python HTTPS server (python's `ssl` on the server side) and a python http.client
/// POSTing 100 KiB over TLS (many records), then a GET on the same connection.
#[test]
fn python_server_and_client_post_body_over_tls() {
    let _serial = require_root();
    let python = python_exe_name();
    let certs = Certs::new();
    let collector = Collector::start();
    let (cert, key) = (certs.server_cert(), certs.server_key());
    let (cert, key) = (cert.display().to_string(), key.display().to_string());
    let server = PyServer::start_with_env(&[("E2E_TLS_CERT", &cert), ("E2E_TLS_KEY", &key)]);
    let mut agent = Agent::builder()
        .pid(server.pid())
        .comm(&python)
        .start(&collector);
    wait_attached(&agent, &python, server.pid());

    let size = 100 * 1024;
    let post = format!("POST:/echo:{size}");
    let client = https_client(
        HttpsMode::HttpClient,
        server.port(),
        &certs.ca(),
        TlsVersion::V1_3,
        &[&post, "GET:/hello"],
        attached(&agent, &python),
    );
    let run = &client.run;
    assert_eq!(run.results[0].response_body, size as u64, "echoed");

    let server_spans = SpanFilter::server().pid(server.pid());
    let client_spans = SpanFilter::client().pid(run.pid);
    let spans = agent.stop_and_collect(&collector, &[(&server_spans, 2), (&client_spans, 2)]);
    let summary = agent.exit_summary();
    print_counters("python POST", &summary);
    let served = spans.expect_n(&server_spans, 2);
    let sent = spans.expect_n(&client_spans, 2);
    for (i, r) in run.results.iter().enumerate() {
        let mut c = check_server_span(
            &format!("python SERVER span #{i} ({} {})", r.method, r.path),
            served[i],
            &server,
            &r.method,
            &r.path,
            i64::from(r.status),
            r.local_port,
            r.response_body,
        );
        c.attr_int("http.request.body.size", r.request_body as i64)
            .timing_within(&r.timing)
            .finish();
        let mut c = check_client_span(
            &format!("python CLIENT span #{i} ({} {})", r.method, r.path),
            sent[i],
            server.port(),
            &r.method,
            &r.path,
            i64::from(r.status),
            r.response_body,
        );
        c.attr_int("http.request.body.size", r.request_body as i64)
            .timing_within(&r.timing)
            .finish();
    }
    let mut failures = Failures::default();
    check_tls_counters(&summary, 2, &mut failures);
    failures.finish("python POST over TLS");
}

/// Only nginx is selected: curl's TLS connection gives nginx's server spans and nothing
/// from curl (its library calls are not traced).
#[test]
fn tls_client_of_an_unselected_process_gives_no_spans() {
    let _serial = require_root();
    let certs = Certs::new();
    let collector = Collector::start();
    let nginx = TlsNginx::start(&certs);
    let mut agent = Agent::builder().comm("nginx").start(&collector);
    wait_attached(&agent, "nginx", nginx.worker_pid());

    let curl = Curl::get(nginx.url(NGINX_HELLO_PATH))
        .then(nginx.url("/missing"))
        .arg("--cacert")
        .arg(certs.ca().display().to_string())
        .run();
    let server_spans = SpanFilter::server().pid(nginx.worker_pid());
    let spans = agent.stop_and_collect(&collector, &[(&server_spans, 2)]);
    let summary = agent.exit_summary();
    print_counters("unselected client", &summary);

    let served = spans.expect_n(&server_spans, 2);
    for (i, (path, body)) in [
        (NGINX_HELLO_PATH, NGINX_HELLO_BODY.len() as u64),
        (
            "/missing",
            logged_requests(&nginx, curl.transfers[0].local_port, 2)[1].body_bytes_sent,
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let t = &curl.transfers[i];
        check_server_span(
            &format!("nginx SERVER span of {path}"),
            served[i],
            &nginx,
            "GET",
            path,
            i64::from(t.status),
            t.local_port,
            body,
        )
        .finish();
    }
    spans.expect_none(&SpanFilter::any().pid(curl.pid));
    assert!(
        tls_attachments(&agent.stderr(), "curl", curl.pid).is_empty(),
        "the agent attached to the TLS library of unselected curl[{}]",
        curl.pid
    );
    let mut failures = Failures::default();
    check_tls_counters(&summary, 1, &mut failures);
    failures.finish("unselected TLS client");
}

/// `--tls off`: no probes on TLS libraries; the HTTPS exchanges give no span (their bytes
/// are ciphertext) and the connections are counted encrypted.
#[test]
fn tls_off_gives_no_spans_over_tls_and_counts_encrypted_connections() {
    let _serial = require_root();
    let certs = Certs::new();
    let collector = Collector::start();
    let nginx = TlsNginx::start(&certs);
    let mut agent = Agent::builder()
        .comm("nginx")
        .comm("curl")
        .arg("--tls")
        .arg("off")
        .start(&collector);

    let curl = Curl::get(nginx.url(NGINX_HELLO_PATH))
        .then(nginx.url(NGINX_LARGE_PATH))
        .arg("--cacert")
        .arg(certs.ca().display().to_string())
        .run();
    assert_eq!(curl.transfers[0].status, 200);
    let spans = agent.stop_and_collect(&collector, &[]);
    let summary = agent.exit_summary();
    print_counters("tls off", &summary);

    spans.expect_none(&SpanFilter::any().pid(nginx.worker_pid()));
    spans.expect_none(&SpanFilter::any().pid(curl.pid));
    let stderr = agent.stderr();
    let attach_lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("OpenSSL: attached"))
        .collect();
    let mut failures = Failures::default();
    failures.check(attach_lines.is_empty(), || {
        format!("--tls off, yet the agent attached: {attach_lines:?}")
    });
    let encrypted = summary.counter("connections_encrypted");
    failures.check(encrypted > 0, || {
        "--tls off: connections_encrypted is 0, expected the HTTPS connections counted".to_string()
    });
    let tls = summary.counter("connections_tls");
    failures.check(tls == 0, || format!("--tls off: connections_tls = {tls}"));
    failures.finish("--tls off");
}

// ---------------------------------------------------------------------------------------
// PostgreSQL over TLS

/// psql's script: the demo statements, then the session's own view of its encryption.
const SSL_CHECK: &str = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()";

/// A connection to PostgreSQL (started before the agent) whose backend makes the agent put
/// libssl's probes on every process mapping it (a per-process probe does not follow the
/// postmaster's fork), so that the backends of the connections under test are read from
/// their first byte. It is not encrypted: the README says this first new connection's
/// backend may be missed, and its psql is a short-lived client started after the agent.
fn warm_up_forked_backends(server: &PgServer, agent: &Agent) {
    let mut psql = server.client_command(tests::postgres::pg_bin("psql"), "postgres");
    psql.env("PGSSLMODE", "disable")
        .env("PGAPPNAME", "e2e-admin")
        .args(["-X", "-q", "-c", "SELECT 1"]);
    let out = psql.output().expect("run psql for the warm-up connection");
    assert!(
        out.status.success(),
        "the warm-up psql failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let switched = tests::process::poll_until(std::time::Duration::from_secs(10), || {
        agent
            .stderr()
            .contains("probes now on every process mapping it")
            .then_some(())
    });
    assert!(
        switched.is_some(),
        "the agent did not say it put the probes on every process mapping libssl after \
         the postmaster forked a backend"
    );
}

/// Spans of `kind` whose resource is process `pid`, in end order.
fn of_process(spans: &Spans, kind: SpanKind, pid: u32) -> Vec<&ReceivedSpan> {
    let mut v: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| s.kind == kind && s.pid() == Some(pid))
        .collect();
    v.sort_by_key(|s| (s.end_unix_nanos, s.start_unix_nanos));
    v
}

/// One span per statement, in order, with the `db.*` attributes postgres_e2e asserts over
/// plaintext.
fn check_statements(
    side: &str,
    got: &[&ReceivedSpan],
    statements: &[&str],
    errors: &[(usize, &str)],
    failures: &mut Failures,
) {
    let names: Vec<&str> = got.iter().map(|s| s.name.as_str()).collect();
    if got.len() != statements.len() {
        failures.add(format!(
            "{side}: expected one span per statement ({} statements), got {} spans {names:?}",
            statements.len(),
            got.len()
        ));
        return;
    }
    for (i, (span, sql)) in got.iter().zip(statements).enumerate() {
        let what = format!("{side} span #{i} for {sql:?}");
        let operation = sql.split_whitespace().next().unwrap_or_default();
        let mut c = Checks::new(what.clone(), span);
        c.attr_str("db.system.name", "postgresql")
            .attr_str("db.operation.name", operation)
            .attr_present("db.query.text");
        match errors.iter().find(|(at, _)| *at == i) {
            Some((_, sqlstate)) => {
                c.attr_str("db.response.status_code", sqlstate)
                    .status(SpanStatus::Error);
            }
            None => {
                c.attr_absent("db.response.status_code");
                c.check(span.status != SpanStatus::Error, || {
                    "status: expected not Error".to_string()
                });
            }
        }
        let text = span.attr_str("db.query.text").unwrap_or_default();
        c.check(!text.contains("'one'") && !text.contains("'TWO'"), || {
            format!("literals must be redacted: {text}")
        });
        if let Err(panic) = std::panic::catch_unwind(move || c.finish()) {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .unwrap_or_else(|| what.clone());
            failures.add(message);
        }
    }
}

#[test]
fn postgres_over_tls_psql_client_and_backend_spans() {
    use tests::postgres::{PSQL_DEMO, PSQL_DEMO_ERRORS, psql_run_gated};

    let _serial = require_root();
    let certs = Certs::new();
    let collector = Collector::start();
    let server = PgServer::start_tls(&certs.server_cert(), &certs.server_key());
    let mut agent = Agent::builder()
        .pid(server.pid())
        .comm("psql")
        .start(&collector);
    wait_attached(&agent, "postgres", server.pid());
    warm_up_forked_backends(&server, &agent);
    expect_library(&agent, "postgres", server.pid(), SYSTEM_LIBSSL);

    let mut statements: Vec<&str> = PSQL_DEMO.to_vec();
    statements.push(SSL_CHECK);
    let run = psql_run_gated(&server, "postgres", &statements, attached(&agent, "psql"));
    assert!(
        run.stdout.contains("\n t\n(1 row)"),
        "pg_stat_ssl: psql's own session must be encrypted:\n{}",
        run.stdout
    );
    let backend = server
        .statements()
        .iter()
        .find(|s| s.application == "psql")
        .map(|s| s.backend_pid)
        .expect("the server logged psql's statements");
    let authorized = server
        .log_entries()
        .into_iter()
        .find(|e| e.pid == backend && e.message.starts_with("connection authorized"))
        .map(|e| e.message)
        .unwrap_or_default();
    assert!(
        authorized.contains("SSL enabled"),
        "the server must log psql's connection as encrypted, it logged {authorized:?}"
    );
    let n = statements.len();
    collector.wait_for_spans(
        "psql client and backend spans over TLS",
        std::time::Duration::from_secs(15),
        |spans| {
            of_process(spans, SpanKind::Client, run.pid).len() >= n
                && of_process(spans, SpanKind::Server, backend).len() >= n
        },
    );
    let spans = agent.stop_and_collect(&collector, &[]);
    let summary = agent.exit_summary();
    print_counters("psql", &summary);

    let mut failures = Failures::default();
    let client = of_process(&spans, SpanKind::Client, run.pid);
    let served = of_process(&spans, SpanKind::Server, backend);
    check_statements(
        "psql CLIENT",
        &client,
        &statements,
        &PSQL_DEMO_ERRORS,
        &mut failures,
    );
    check_statements(
        "postgres backend SERVER",
        &served,
        &statements,
        &PSQL_DEMO_ERRORS,
        &mut failures,
    );
    for (side, list) in [("psql CLIENT", &client), ("backend SERVER", &served)] {
        if let Some(select) = list.get(2) {
            failures.check(
                select.attr_i64("db.response.returned_rows") == Some(2)
                    && select.name == "SELECT e2e_items",
                || {
                    format!(
                        "{side}: the SELECT returning two rows: {}",
                        select.summary()
                    )
                },
            );
        }
    }
    if let (Some(c), Some(s)) = (client.first(), served.first()) {
        failures.check(c.service_name() == Some("psql"), || {
            format!("client resource: {}", c.summary())
        });
        failures.check(s.service_name() == Some("postgresql"), || {
            format!("backend resource: {}", s.summary())
        });
    }
    for span in &client {
        failures.check(
            span.start_unix_nanos >= run.timing.start_unix_nanos
                && span.end_unix_nanos <= run.timing.end_unix_nanos,
            || format!("client span outside psql's run window: {}", span.summary()),
        );
    }
    // psql's session, both ends (the warm-up's is plaintext).
    check_tls_counters(&summary, 2, &mut failures);
    failures.finish("psql over TLS");
}

#[test]
fn postgres_over_tls_psycopg_with_its_bundled_libssl() {
    use tests::postgres::{PsycopgPlan, StatementOutcome, psycopg_client_gated};

    let _serial = require_root();
    let python = python_exe_name();
    let certs = Certs::new();
    let collector = Collector::start();
    let server = PgServer::start_tls(&certs.server_cert(), &certs.server_key());
    let mut agent = Agent::builder()
        .pid(server.pid())
        .comm(&python)
        .start(&collector);
    wait_attached(&agent, "postgres", server.pid());
    warm_up_forked_backends(&server, &agent);

    let plan = PsycopgPlan {
        simple: 2,
        prepared: 3,
        pipeline: 4,
        pipeline_fail_at: 2,
    };
    let run = psycopg_client_gated(
        &server,
        "postgres",
        plan,
        attached_to(&agent, &python, PSYCOPG_LIBSSL),
    );
    assert!(run.ssl_in_use, "psycopg's connection must be encrypted");
    let n = run.statements.len();
    collector.wait_for_spans(
        "psycopg client and backend spans over TLS",
        std::time::Duration::from_secs(15),
        |spans| {
            of_process(spans, SpanKind::Client, run.pid).len() >= n
                && of_process(spans, SpanKind::Server, run.backend_pid).len() >= n
        },
    );
    let spans = agent.stop_and_collect(&collector, &[]);
    let summary = agent.exit_summary();
    print_counters("psycopg", &summary);

    let mut failures = Failures::default();
    for (side, got) in [
        (
            "psycopg CLIENT",
            of_process(&spans, SpanKind::Client, run.pid),
        ),
        (
            "backend SERVER",
            of_process(&spans, SpanKind::Server, run.backend_pid),
        ),
    ] {
        failures.check(got.len() == n, || {
            format!(
                "{side}: {} spans for {n} statements: {:?}",
                got.len(),
                got.iter().map(|s| &s.name).collect::<Vec<_>>()
            )
        });
        let service = if side.starts_with("backend") {
            "postgresql".to_string()
        } else {
            python.clone()
        };
        for s in &got {
            failures.check(
                s.attr_str("db.system.name") == Some("postgresql")
                    && s.service_name() == Some(service.as_str()),
                || {
                    format!(
                        "{side}: expected db.system.name postgresql, service.name {service}: {}",
                        s.summary()
                    )
                },
            );
        }
        for outcome in [
            StatementOutcome::Ok,
            StatementOutcome::Error,
            StatementOutcome::Skipped,
        ] {
            let want = run
                .statements
                .iter()
                .filter(|s| s.outcome == outcome)
                .count();
            let have = got
                .iter()
                .filter(|s| match outcome {
                    StatementOutcome::Ok => s.status != SpanStatus::Error,
                    StatementOutcome::Error => {
                        s.attr_str("db.response.status_code") == Some("42P01")
                    }
                    StatementOutcome::Skipped => s.attr("agent.db.skipped").is_some(),
                })
                .count();
            failures.check(have == want, || {
                format!("{side}: {have} spans with outcome {outcome:?}, expected {want}")
            });
        }
    }
    // psycopg's session, both ends (the warm-up's is plaintext).
    check_tls_counters(&summary, 2, &mut failures);
    failures.finish("psycopg over TLS");
}

/// A client started after the agent, as a user runs one: curl maps libssl at start and
/// connects within milliseconds, before the 2 s rescan. Its TLS library must be probed from
/// its first request (the exec is seen in the kernel; the libraries are mapped by the
/// dynamic loader right after it).
#[test]
#[ignore = "race with per-process probes: a curl started after the agent can exit before its \
            libssl is attached (read in 5 of 6 runs at 914ab0d, 0 of 3 at 6496631; 2 of 2 with \
            the reverted per-file probes of eabc388); run with --ignored"]
fn curl_started_after_the_agent_is_traced_without_waiting() {
    let _serial = require_root();
    let certs = Certs::new();
    let collector = Collector::start();
    let nginx = TlsNginx::start(&certs);
    let mut agent = Agent::builder()
        .comm("nginx")
        .comm("curl")
        .start(&collector);
    wait_attached(&agent, "nginx", nginx.worker_pid());

    let curl = Curl::get(nginx.url(NGINX_HELLO_PATH))
        .then(nginx.url("/missing"))
        .arg("--cacert")
        .arg(certs.ca().display().to_string())
        .run();
    let logged = logged_requests(&nginx, curl.transfers[0].local_port, 2);
    let server_spans = SpanFilter::server().pid(nginx.worker_pid());
    let curl_spans = SpanFilter::client().pid(curl.pid);
    let spans = agent.stop_and_collect(&collector, &[(&server_spans, 2), (&curl_spans, 2)]);
    let summary = agent.exit_summary();
    print_counters("ungated curl", &summary);

    let sent = spans.expect_n(&curl_spans, 2);
    for (i, path) in [NGINX_HELLO_PATH, "/missing"].into_iter().enumerate() {
        let t = &curl.transfers[i];
        check_client_span(
            &format!("CLIENT span #{i} ({path}) of a curl started after the agent"),
            sent[i],
            nginx.port(),
            "GET",
            path,
            i64::from(t.status),
            logged[i].body_bytes_sent,
        )
        .timing_within(&t.timing)
        .finish();
    }
    spans.expect_n(&server_spans, 2);
    let mut failures = Failures::default();
    check_tls_counters(&summary, 2, &mut failures);
    failures.finish("ungated curl");
}

/// Node.js links OpenSSL statically and exports it: the agent attaches to the node binary and
/// follows node's own socket I/O (memory BIOs, `TLSWrap`). A keep-alive `https` client with
/// two requests to nginx: spans on both sides.
#[test]
fn node_https_client_and_nginx() {
    use tests::tls::node_https_client;

    let _serial = require_root();
    let certs = Certs::new();
    let collector = Collector::start();
    let nginx = TlsNginx::start(&certs);
    let mut agent = Agent::builder()
        .comm("nginx")
        .comm("node")
        .start(&collector);
    wait_attached(&agent, "nginx", nginx.worker_pid());

    let run = node_https_client(
        nginx.port(),
        &certs.ca(),
        &["GET:/hello.txt", "GET:/missing"],
        attached(&agent, "node"),
    );
    let node_exe = tests::node_bin().display().to_string();
    expect_library(&agent, "node", run.pid, &node_exe);
    let logged = logged_requests(&nginx, run.results[0].local_port, 2);
    let server_spans = SpanFilter::server().pid(nginx.worker_pid());
    let client_spans = SpanFilter::client().pid(run.pid);
    let spans = agent.stop_and_collect(&collector, &[(&server_spans, 2), (&client_spans, 2)]);
    let summary = agent.exit_summary();
    print_counters("node https", &summary);

    let served = spans.expect_n(&server_spans, 2);
    let sent = spans.expect_n(&client_spans, 2);
    for (i, r) in run.results.iter().enumerate() {
        let body = logged[i].body_bytes_sent;
        check_server_span(
            &format!("nginx SERVER span #{i} ({}) for node https", r.path),
            served[i],
            &nginx,
            "GET",
            &r.path,
            i64::from(r.status),
            r.local_port,
            body,
        )
        .timing_within(&r.timing)
        .finish();
        check_client_span(
            &format!("node https CLIENT span #{i} ({})", r.path),
            sent[i],
            nginx.port(),
            "GET",
            &r.path,
            i64::from(r.status),
            body,
        )
        .resource_str("process.executable.name", &tests::node_exe_name())
        .timing_within(&r.timing)
        .finish();
    }
    spans.expect_n(&SpanFilter::any().pid(run.pid), 2);
    let mut failures = Failures::default();
    check_tls_counters(&summary, 2, &mut failures);
    failures.finish("node https client");
}

/// The client's first request arrives in the same segment as its last handshake record
/// (TLS 1.3 Finished), as node's and asyncio's clients (memory BIOs) send it: nginx reads
/// both in one `read` inside the handshake, and its first SSL_read is served from OpenSSL's
/// buffer without a socket call. That request still needs its server span. (The client is
/// not traced: memory BIOs are a known limit on the client side.)
#[test]
fn first_request_sent_with_the_tls_handshake_gets_its_server_span() {
    let _serial = require_root();
    let certs = Certs::new();
    let collector = Collector::start();
    let nginx = TlsNginx::start(&certs);
    let mut agent = Agent::builder().comm("nginx").start(&collector);
    wait_attached(&agent, "nginx", nginx.worker_pid());

    let client = https_client(
        HttpsMode::Coalesced,
        nginx.port(),
        &certs.ca(),
        TlsVersion::V1_3,
        &["GET:/hello.txt", "GET:/missing", "GET:/hello.txt"],
        |_| true,
    );
    let run = &client.run;
    let logged = logged_requests(&nginx, run.results[0].local_port, 3);
    let server_spans = SpanFilter::server().pid(nginx.worker_pid());
    let spans = agent.stop_and_collect(&collector, &[(&server_spans, 3)]);
    let summary = agent.exit_summary();
    print_counters("coalesced", &summary);

    let served = spans.expect_n(&server_spans, 3);
    for (i, r) in run.results.iter().enumerate() {
        check_server_span(
            &format!(
                "nginx SERVER span #{i} ({}), request #0 sent with the handshake",
                r.path
            ),
            served[i],
            &nginx,
            "GET",
            &r.path,
            i64::from(r.status),
            r.local_port,
            logged[i].body_bytes_sent,
        )
        .timing_within(&r.timing)
        .finish();
    }
    let mut failures = Failures::default();
    check_tls_counters(&summary, 1, &mut failures);
    failures.finish("first request sent with the handshake");
}

/// One curl process (its libssl probed) with a plaintext connection to a python server and a
/// TLS connection to nginx: each span says its own scheme, the plaintext connection is
/// parsed from the socket as before (not counted TLS), nothing twice.
#[test]
fn one_client_with_a_plaintext_and_a_tls_connection() {
    let _serial = require_root();
    let certs = Certs::new();
    let collector = Collector::start();
    let nginx = TlsNginx::start(&certs);
    let plain = PyServer::start();
    let mut agent = Agent::builder()
        .comm("nginx")
        .pid(plain.pid())
        .comm("curl")
        .start(&collector);
    wait_attached(&agent, "nginx", nginx.worker_pid());

    let curl = Curl::get(plain.url("/hello"))
        .then(nginx.url(NGINX_HELLO_PATH))
        .arg("--cacert")
        .arg(certs.ca().display().to_string())
        .run_gated(attached(&agent, "curl"));
    let (t_plain, t_tls) = (&curl.transfers[0], &curl.transfers[1]);
    assert_eq!((t_plain.status, t_tls.status), (200, 200));
    let curl_spans = SpanFilter::client().pid(curl.pid);
    let plain_spans = SpanFilter::server().pid(plain.pid());
    let tls_spans = SpanFilter::server().pid(nginx.worker_pid());
    let spans = agent.stop_and_collect(
        &collector,
        &[(&curl_spans, 2), (&plain_spans, 1), (&tls_spans, 1)],
    );
    let summary = agent.exit_summary();
    print_counters("plaintext and TLS", &summary);

    let plain_client = spans.expect_one(&curl_spans.clone().path("/hello"));
    let mut c = Checks::new("curl CLIENT span of the plaintext request", plain_client);
    c.attr_str("url.scheme", "http")
        .attr_str("url.full", &plain.url("/hello"))
        .attr_int("http.response.status_code", 200)
        .attr_int("http.response.body.size", 6)
        .attr_int("server.port", i64::from(plain.port()))
        .timing_within(&t_plain.timing)
        .finish();
    let plain_server = spans.expect_one(&plain_spans);
    let mut c = Checks::new("python SERVER span of the plaintext request", plain_server);
    c.attr_str("url.scheme", "http")
        .attr_str("url.path", "/hello")
        .attr_int("client.port", i64::from(t_plain.local_port))
        .timing_within(&t_plain.timing)
        .finish();
    let tls_client = spans.expect_one(&curl_spans.clone().path(NGINX_HELLO_PATH));
    check_client_span(
        "curl CLIENT span of the TLS request",
        tls_client,
        nginx.port(),
        "GET",
        NGINX_HELLO_PATH,
        200,
        NGINX_HELLO_BODY.len() as u64,
    )
    .timing_within(&t_tls.timing)
    .finish();
    check_server_span(
        "nginx SERVER span of the TLS request",
        spans.expect_one(&tls_spans),
        &nginx,
        "GET",
        NGINX_HELLO_PATH,
        200,
        t_tls.local_port,
        NGINX_HELLO_BODY.len() as u64,
    )
    .timing_within(&t_tls.timing)
    .finish();
    spans.expect_n(&SpanFilter::any().pid(curl.pid), 2);
    let mut failures = Failures::default();
    // The TLS connection's two ends; the plaintext one is not TLS.
    check_tls_counters(&summary, 2, &mut failures);
    failures.finish("plaintext and TLS in one client");
}

/// A Node `https` server and a Node `https` client (both OpenSSL linked into node, both with
/// their socket I/O done by Node's TLSWrap, outside the library's calls): spans on both sides,
/// the server span of each request the child of its client span (same-host pairing), a large
/// body read through several `SSL_read` calls.
#[test]
fn node_https_server_and_client() {
    use tests::tls::node_https_client;

    let _serial = require_root();
    let certs = Certs::new();
    let collector = Collector::start();
    let (cert, key) = (certs.server_cert(), certs.server_key());
    let (cert, key) = (cert.display().to_string(), key.display().to_string());
    let server = NodeServer::start_with_env(&[("E2E_TLS_CERT", &cert), ("E2E_TLS_KEY", &key)]);
    let mut agent = Agent::builder().comm("node").start(&collector);
    wait_attached(&agent, "node", server.pid());

    let specs = ["GET:/hello", "GET:/large", "GET:/missing"];
    let run = node_https_client(server.port(), &certs.ca(), &specs, attached(&agent, "node"));
    let server_spans = SpanFilter::server().pid(server.pid());
    let client_spans = SpanFilter::client().pid(run.pid);
    let spans = agent.stop_and_collect(&collector, &[(&server_spans, 3), (&client_spans, 3)]);
    let summary = agent.exit_summary();
    print_counters("node https server", &summary);

    let served = spans.expect_n(&server_spans, 3);
    let sent = spans.expect_n(&client_spans, 3);
    for (i, r) in run.results.iter().enumerate() {
        check_server_span(
            &format!("node SERVER span #{i} ({})", r.path),
            served[i],
            &server,
            "GET",
            &r.path,
            i64::from(r.status),
            r.local_port,
            r.response_body,
        )
        .timing_within(&r.timing)
        .finish();
        check_client_span(
            &format!("node CLIENT span #{i} ({})", r.path),
            sent[i],
            server.port(),
            "GET",
            &r.path,
            i64::from(r.status),
            r.response_body,
        )
        .timing_within(&r.timing)
        .finish();
        assert_eq!(
            served[i].parent_span_id.as_deref(),
            Some(sent[i].span_id.as_str()),
            "node SERVER span #{i} is the child of its client span (same-host pairing)"
        );
        assert_eq!(served[i].trace_id, sent[i].trace_id);
    }
    let mut failures = Failures::default();
    check_tls_counters(&summary, 2, &mut failures);
    failures.finish("node https server and client");
}
