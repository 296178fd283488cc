//! Privileged end-to-end tests: the real agent traces real, unmodified HTTP/1.x servers and
//! clients; a real OTLP collector (rotel) receives the spans.
//!
//! Needs root and the agent binary (`AGENT_BIN`, default `target/release/agent`). Run serially:
//! `cargo test -p tests --test http_e2e -- --test-threads=1` (as root), or `cargo xtask test`.
//!
//! Shape of each test: collector → server → agent (selecting processes) → requests →
//! `agent.stop_and_collect(&collector, expected)` (wait for the expected spans, stop the agent:
//! SIGTERM flushes, settle) → exact assertions.

use tests::clients::CURL_USER_AGENT;
use tests::servers::{
    HELLO_BODY, LARGE_SIZE, NGINX_HELLO_BODY, NGINX_HELLO_PATH, NGINX_LARGE_PATH, NGINX_LARGE_SIZE,
    NODE_CHUNK_SIZES,
};
use tests::{
    Agent, Checks, ClientRun, Collector, Curl, HttpServer, NginxServer, NodeServer, OtlpProtocol,
    PyServer, RawMode, ReceivedSpan, RequestResult, SpanFilter, SpanKind, SpanStatus, Spans,
    node_client, node_exe_name, pipeline_client, py_client, python_bin, python_exe_name,
    raw_client, require_root,
};

const LOOPBACK: &str = "127.0.0.1";

/// Checks common to every server span for a request from `client_port` to `server`.
fn check_server_span(
    what: &str,
    span: &ReceivedSpan,
    server: &dyn HttpServer,
    method: &str,
    path: &str,
    status: i64,
    client_port: u16,
) -> Checks {
    let mut c = Checks::new(what.to_string(), span);
    c.kind(SpanKind::Server)
        .attr_str("http.request.method", method)
        .attr_str("url.path", path)
        .attr_str("url.scheme", "http")
        .attr_int("http.response.status_code", status)
        .attr_str("network.protocol.version", "1.1")
        .attr_int("server.port", i64::from(server.port()))
        .attr_str("client.address", LOOPBACK)
        .attr_int("client.port", i64::from(client_port))
        .attr_str("network.peer.address", LOOPBACK)
        .attr_int("network.peer.port", i64::from(client_port))
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

/// Checks common to every client span for a request to `server_port`.
fn check_client_span(
    what: &str,
    span: &ReceivedSpan,
    server_port: u16,
    method: &str,
    path: &str,
    status: i64,
) -> Checks {
    let mut c = Checks::new(what.to_string(), span);
    c.kind(SpanKind::Client)
        .attr_str("http.request.method", method)
        .attr_str("url.path", path)
        .attr_int("http.response.status_code", status)
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

/// The spans matching `filter` (ordered by end time) must be exactly one per client request,
/// in the same order, with the requests' paths.
fn spans_per_request<'a>(
    spans: &'a Spans,
    filter: &SpanFilter,
    run: &ClientRun,
) -> Vec<(&'a ReceivedSpan, RequestResult)> {
    let found = spans.expect_n(filter, run.results.len());
    let got: Vec<&str> = found
        .iter()
        .map(|s| s.attr_str("url.path").unwrap_or("<no url.path>"))
        .collect();
    let want: Vec<&str> = run.results.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(
        got, want,
        "spans matching {filter} (ordered by end time) must have the requests' paths in order; \
         the collector received:\n{spans}"
    );
    found.into_iter().zip(run.results.iter().cloned()).collect()
}

fn hex_of_len(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[test]
fn python_server_and_curl_get_hello() {
    let _serial = require_root();
    let collector = Collector::start();
    let server = PyServer::start();
    let mut agent = Agent::builder()
        .pid(server.pid())
        .comm("curl")
        .start(&collector);

    let curl = Curl::get(server.url("/hello")).run();
    let t = curl.one().clone();
    assert_eq!(t.status, 200);

    let server_spans = SpanFilter::server().pid(server.pid());
    let curl_spans = SpanFilter::client().pid(curl.pid);
    let spans = agent.stop_and_collect(&collector, &[(&server_spans, 1), (&curl_spans, 1)]);

    let s = spans.expect_one(&server_spans);
    check_server_span(
        "python SERVER span of GET /hello",
        s,
        &server,
        "GET",
        "/hello",
        200,
        t.local_port,
    )
    .name("GET /hello")
    .resource_str_prefix("service.name", "python3")
    .resource_str("process.executable.name", &python_exe_name())
    .attr_str("user_agent.original", CURL_USER_AGENT)
    .attr_int("http.response.body.size", HELLO_BODY.len() as i64)
    .timing_within(&t.timing)
    .finish();
    assert!(
        hex_of_len(&s.trace_id, 32) && hex_of_len(&s.span_id, 16),
        "ids must be lowercase hex: {s}"
    );

    let c = spans.expect_one(&curl_spans);
    check_client_span(
        "curl CLIENT span of GET /hello",
        c,
        server.port(),
        "GET",
        "/hello",
        200,
    )
    .resource_str("service.name", "curl")
    .resource_str("process.executable.name", "curl")
    .attr_str("user_agent.original", CURL_USER_AGENT)
    .attr_int("http.response.body.size", HELLO_BODY.len() as i64)
    .timing_within(&t.timing)
    .finish();
    assert_ne!(
        s.resource, c.resource,
        "server and client processes must have different resources"
    );
}

#[test]
fn http_1_0_request_reports_protocol_version_1_0() {
    let _serial = require_root();
    let collector = Collector::start();
    let server = PyServer::start();
    let mut agent = Agent::builder()
        .pid(server.pid())
        .comm("curl")
        .start(&collector);

    let curl = Curl::get(server.url("/users/10")).http10().run();
    let t = curl.one().clone();
    assert_eq!(t.status, 200);
    let server_spans = SpanFilter::server().pid(server.pid());
    let curl_spans = SpanFilter::client().pid(curl.pid);
    let spans = agent.stop_and_collect(&collector, &[(&server_spans, 1), (&curl_spans, 1)]);

    for (what, filter) in [
        ("python SERVER", &server_spans),
        ("curl CLIENT", &curl_spans),
    ] {
        let s = spans.expect_one(filter);
        Checks::new(format!("{what} span of an HTTP/1.0 request"), s)
            .attr_str("network.protocol.version", "1.0")
            .attr_str("url.path", "/users/10")
            .attr_int("http.response.status_code", 200)
            .timing_within(&t.timing)
            .finish();
    }
}

#[test]
fn python_client_keep_alive_five_requests_on_one_connection() {
    let _serial = require_root();
    let collector = Collector::start();
    let server = PyServer::start();
    // --verbose: the summary lists zero counters too (the check below reads one usually 0).
    let mut agent = Agent::builder()
        .pid(server.pid())
        .comm(&python_exe_name())
        .arg("--verbose")
        .start(&collector);

    let run = py_client(
        server.port(),
        &[
            "GET:/hello",
            "GET:/users/1",
            "GET:/users/2",
            "GET:/users/3",
            "GET:/missing",
        ],
    );
    let server_spans = SpanFilter::server().pid(server.pid());
    let client_spans = SpanFilter::client().pid(run.pid);
    let spans = agent.stop_and_collect(&collector, &[(&server_spans, 5), (&client_spans, 5)]);

    // Writes are stamped as they are queued (tcp_sendmsg_locked), not when they return; a
    // thread that changes CPUs mid-write is the rare exception (5 requests, 5 responses here,
    // each one or two writes). A kernel without that tracepoint says so at start-up.
    let counters = agent.summary_counters();
    let at_return = counters.get("kernel_writes_stamped_at_return").copied();
    let stderr = agent.stderr();
    if stderr.contains("agent: hook: write stamps ← tp_btf/tcp_sendmsg_locked\n") {
        assert!(
            at_return.is_some_and(|n| n <= 2),
            "writes stamped at return instead of at queueing: {at_return:?} (counters: {counters:?})"
        );
    } else {
        assert!(
            stderr.contains("agent: hook: write stamps ← at the write's return (degraded: "),
            "write stamps neither at queueing nor reported degraded:\n{stderr}"
        );
        assert!(at_return.is_some_and(|n| n >= 10), "{counters:?}");
    }

    for (span, r) in spans_per_request(&spans, &server_spans, &run) {
        check_server_span(
            &format!("python SERVER span #{} ({})", r.index, r.path),
            span,
            &server,
            "GET",
            &r.path,
            i64::from(r.status),
            r.local_port,
        )
        .timing_within(&r.timing)
        .finish();
    }
    for (span, r) in spans_per_request(&spans, &client_spans, &run) {
        check_client_span(
            &format!("python CLIENT span #{} ({})", r.index, r.path),
            span,
            server.port(),
            "GET",
            &r.path,
            i64::from(r.status),
        )
        .resource_str("process.executable.name", &python_exe_name())
        .timing_within(&r.timing)
        .finish();
    }
}

#[test]
fn pipelined_requests_in_one_write() {
    let _serial = require_root();
    let collector = Collector::start();
    let server = PyServer::start();
    let mut agent = Agent::builder().pid(server.pid()).start(&collector);

    let run = pipeline_client(server.port(), &["/users/1", "/hello", "/users/22"]);
    let server_spans = SpanFilter::server().pid(server.pid());
    let spans = agent.stop_and_collect(&collector, &[(&server_spans, 3)]);

    for (span, r) in spans_per_request(&spans, &server_spans, &run) {
        check_server_span(
            &format!("pipelined SERVER span #{} ({})", r.index, r.path),
            span,
            &server,
            "GET",
            &r.path,
            200,
            r.local_port,
        )
        .attr_int("http.response.body.size", r.response_body as i64)
        .timing_within(&r.timing)
        .finish();
    }
}

#[test]
fn large_bodies_then_another_request_on_the_same_connection() {
    let _serial = require_root();
    let collector = Collector::start();
    let server = PyServer::start();
    let mut agent = Agent::builder()
        .pid(server.pid())
        .comm(&python_exe_name())
        .start(&collector);

    let size = LARGE_SIZE.to_string();
    let post = format!("POST:/echo:{size}");
    let run = py_client(server.port(), &["GET:/large", &post, "GET:/hello"]);
    let server_spans = SpanFilter::server().pid(server.pid());
    let client_spans = SpanFilter::client().pid(run.pid);
    let spans = agent.stop_and_collect(&collector, &[(&server_spans, 3), (&client_spans, 3)]);

    let expected_sizes = [
        (None, LARGE_SIZE as i64),
        (Some(LARGE_SIZE as i64), LARGE_SIZE as i64),
        (None, HELLO_BODY.len() as i64),
    ];
    for ((span, r), (req, resp)) in spans_per_request(&spans, &server_spans, &run)
        .into_iter()
        .zip(expected_sizes)
    {
        let mut c = check_server_span(
            &format!("python SERVER span #{} ({} {})", r.index, r.method, r.path),
            span,
            &server,
            &r.method,
            &r.path,
            200,
            r.local_port,
        );
        c.attr_int("http.response.body.size", resp)
            .timing_within(&r.timing);
        if let Some(req) = req {
            c.attr_int("http.request.body.size", req);
        }
        c.finish();
    }
    for ((span, r), (req, resp)) in spans_per_request(&spans, &client_spans, &run)
        .into_iter()
        .zip(expected_sizes)
    {
        let mut c = check_client_span(
            &format!("python CLIENT span #{} ({} {})", r.index, r.method, r.path),
            span,
            server.port(),
            &r.method,
            &r.path,
            200,
        );
        c.attr_int("http.response.body.size", resp)
            .timing_within(&r.timing);
        if let Some(req) = req {
            c.attr_int("http.request.body.size", req);
        }
        c.finish();
    }
}

#[test]
fn node_chunked_response_then_another_request() {
    let _serial = require_root();
    let collector = Collector::start();
    let server = NodeServer::start();
    let mut agent = Agent::builder().pid(server.pid()).start(&collector);

    let curl = Curl::get(server.url("/chunked"))
        .then(server.url("/hello"))
        .run();
    assert_eq!(
        curl.transfers[1].num_connects, 0,
        "curl reused the connection"
    );
    let server_spans = SpanFilter::server().pid(server.pid());
    let spans = agent.stop_and_collect(&collector, &[(&server_spans, 2)]);

    let found = spans.expect_n(&server_spans, 2);
    let chunked_total: usize = NODE_CHUNK_SIZES.iter().sum();
    check_server_span(
        "node SERVER span of the chunked response",
        found[0],
        &server,
        "GET",
        "/chunked",
        200,
        curl.transfers[0].local_port,
    )
    .resource_str("service.name", &node_exe_name())
    .attr_int("http.response.body.size", chunked_total as i64)
    .timing_within(&curl.transfers[0].timing)
    .finish();
    check_server_span(
        "node SERVER span of GET /hello after the chunked response",
        found[1],
        &server,
        "GET",
        "/hello",
        200,
        curl.transfers[1].local_port,
    )
    .attr_int("http.response.body.size", HELLO_BODY.len() as i64)
    .timing_within(&curl.transfers[1].timing)
    .finish();
}

/// Every chunk smaller than the capture size (the default chunk list has one chunk larger
/// than the capture): separates "chunked framing" from "chunk larger than the capture".
#[test]
fn node_chunked_response_with_small_chunks() {
    let _serial = require_root();
    let collector = Collector::start();
    let server = NodeServer::start();
    let mut agent = Agent::builder().pid(server.pid()).start(&collector);

    let sizes = [100usize, 2000, 7, 1, 300];
    let list: Vec<String> = sizes.iter().map(usize::to_string).collect();
    let curl = Curl::get(server.url(&format!("/chunked?sizes={}", list.join(","))))
        .then(server.url("/hello"))
        .run();
    let total: usize = sizes.iter().sum();
    assert_eq!(curl.transfers[0].size_download, total as u64);
    let server_spans = SpanFilter::server().pid(server.pid());
    let spans = agent.stop_and_collect(&collector, &[(&server_spans, 2)]);

    let found = spans.expect_n(&server_spans, 2);
    check_server_span(
        "node SERVER span of a chunked response with small chunks",
        found[0],
        &server,
        "GET",
        "/chunked",
        200,
        curl.transfers[0].local_port,
    )
    .attr_int("http.response.body.size", total as i64)
    .attr_absent("agent.http.end_inferred")
    .timing_within(&curl.transfers[0].timing)
    .finish();
    check_server_span(
        "node SERVER span of GET /hello after the chunked response",
        found[1],
        &server,
        "GET",
        "/hello",
        200,
        curl.transfers[1].local_port,
    )
    .timing_within(&curl.transfers[1].timing)
    .finish();
}

#[test]
fn python_404_and_500_statuses() {
    let _serial = require_root();
    let collector = Collector::start();
    let server = PyServer::start();
    let mut agent = Agent::builder()
        .pid(server.pid())
        .comm("curl")
        .start(&collector);

    let curl = Curl::get(server.url("/missing"))
        .then(server.url("/boom"))
        .run();
    let statuses: Vec<u16> = curl.transfers.iter().map(|t| t.status).collect();
    assert_eq!(statuses, [404, 500]);
    let server_spans = SpanFilter::server().pid(server.pid());
    let curl_spans = SpanFilter::client().pid(curl.pid);
    let spans = agent.stop_and_collect(&collector, &[(&server_spans, 2), (&curl_spans, 2)]);

    for (i, (path, status)) in [("/missing", 404), ("/boom", 500)].into_iter().enumerate() {
        let t = &curl.transfers[i];
        let s = spans.expect_one(&server_spans.clone().path(path));
        // check_server_span expects Unset for 404 and Error for 500.
        check_server_span(
            &format!("python SERVER span of {path}"),
            s,
            &server,
            "GET",
            path,
            status,
            t.local_port,
        )
        .timing_within(&t.timing)
        .finish();
        let c = spans.expect_one(&curl_spans.clone().path(path));
        // check_client_span expects Error for both.
        check_client_span(
            &format!("curl CLIENT span of {path}"),
            c,
            server.port(),
            "GET",
            path,
            status,
        )
        .timing_within(&t.timing)
        .finish();
    }
}

#[test]
fn nginx_200_404_500_statuses() {
    let _serial = require_root();
    let collector = Collector::start();
    let server = NginxServer::start();
    let mut agent = Agent::builder()
        .comm("nginx")
        .comm("curl")
        .start(&collector);

    let curl = Curl::get(server.url(NGINX_HELLO_PATH))
        .then(server.url("/missing"))
        .then(server.url("/boom"))
        .run();
    let statuses: Vec<u16> = curl.transfers.iter().map(|t| t.status).collect();
    assert_eq!(statuses, [200, 404, 500]);
    let server_spans = SpanFilter::server().pid(server.worker_pid());
    let curl_spans = SpanFilter::client().pid(curl.pid);
    let spans = agent.stop_and_collect(&collector, &[(&server_spans, 3), (&curl_spans, 3)]);

    let cases = [(NGINX_HELLO_PATH, 200), ("/missing", 404), ("/boom", 500)];
    for (i, (path, status)) in cases.into_iter().enumerate() {
        let t = &curl.transfers[i];
        let s = spans.expect_one(&server_spans.clone().path(path));
        let mut c = check_server_span(
            &format!("nginx SERVER span of {path}"),
            s,
            &server,
            "GET",
            path,
            status,
            t.local_port,
        );
        c.resource_str("service.name", "nginx")
            .resource_str("process.executable.name", "nginx")
            .timing_within(&t.timing);
        if status == 200 {
            c.attr_int("http.response.body.size", NGINX_HELLO_BODY.len() as i64);
        }
        c.finish();
        let c = spans.expect_one(&curl_spans.clone().path(path));
        check_client_span(
            &format!("curl CLIENT span of nginx {path}"),
            c,
            server.port(),
            "GET",
            path,
            status,
        )
        .timing_within(&t.timing)
        .finish();
    }
    // The master never accepts: no span may carry its pid.
    spans.expect_none(&SpanFilter::any().pid(server.master_pid()));
}

#[test]
fn nginx_large_static_file_via_sendfile_then_another_request() {
    let _serial = require_root();
    let collector = Collector::start();
    let server = NginxServer::start();
    let mut agent = Agent::builder().comm("nginx").start(&collector);

    let curl = Curl::get(server.url(NGINX_LARGE_PATH))
        .then(server.url(NGINX_HELLO_PATH))
        .run();
    assert_eq!(curl.transfers[0].size_download, NGINX_LARGE_SIZE as u64);
    let server_spans = SpanFilter::server().pid(server.worker_pid());
    let spans = agent.stop_and_collect(&collector, &[(&server_spans, 2)]);

    let found = spans.expect_n(&server_spans, 2);
    check_server_span(
        "nginx SERVER span of the large static file",
        found[0],
        &server,
        "GET",
        NGINX_LARGE_PATH,
        200,
        curl.transfers[0].local_port,
    )
    .attr_int("http.response.body.size", NGINX_LARGE_SIZE as i64)
    .timing_within(&curl.transfers[0].timing)
    .finish();
    check_server_span(
        "nginx SERVER span of the request after the large file",
        found[1],
        &server,
        "GET",
        NGINX_HELLO_PATH,
        200,
        curl.transfers[1].local_port,
    )
    .attr_int("http.response.body.size", NGINX_HELLO_BODY.len() as i64)
    .timing_within(&curl.transfers[1].timing)
    .finish();
}

#[test]
fn incoming_valid_traceparent_makes_the_server_span_a_child() {
    let _serial = require_root();
    let collector = Collector::start();
    let server = PyServer::start();
    // Only the server: no client span of ours may become the parent.
    let mut agent = Agent::builder().pid(server.pid()).start(&collector);

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent_id = "00f067aa0ba902b7";
    let curl = Curl::get(server.url("/users/1"))
        .header(&format!("traceparent: 00-{trace_id}-{parent_id}-01"))
        .run();
    assert_eq!(curl.one().status, 200);
    let server_spans = SpanFilter::server().pid(server.pid());
    let spans = agent.stop_and_collect(&collector, &[(&server_spans, 1)]);

    let s = spans.expect_one(&server_spans);
    let mut c = Checks::new("SERVER span of a request carrying a valid traceparent", s);
    c.check(s.trace_id == trace_id, || {
        format!(
            "trace id: expected {trace_id} (from the header), got {}",
            s.trace_id
        )
    })
    .check(s.parent_span_id.as_deref() == Some(parent_id), || {
        format!(
            "parent span id: expected {parent_id} (from the header), got {:?}",
            s.parent_span_id
        )
    })
    .check(s.span_id != parent_id && hex_of_len(&s.span_id, 16), || {
        format!("span id: expected a fresh 16-hex id, got {}", s.span_id)
    })
    .attr_str("url.path", "/users/1")
    .finish();
}

#[test]
fn incoming_invalid_traceparent_is_ignored() {
    let _serial = require_root();
    let collector = Collector::start();
    let server = PyServer::start();
    let mut agent = Agent::builder().pid(server.pid()).start(&collector);

    let invalid = [
        // All-zero trace id.
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        // All-zero parent id.
        "00-4bf92f3577b34da6a3ce929d0e0e4731-0000000000000000-01",
        // Version ff is forbidden.
        "ff-4bf92f3577b34da6a3ce929d0e0e4732-00f067aa0ba902b7-01",
        // Not hex.
        "00-4bf92f3577b34da6a3ce929d0e0e47zz-00f067aa0ba902b7-01",
        // Too short.
        "00-4bf92f3577b34da6-00f067aa0ba902b7-01",
        // Garbage.
        "hello",
    ];
    let mut curls = Vec::new();
    for (i, header) in invalid.iter().enumerate() {
        let r = Curl::get(server.url(&format!("/users/{i}")))
            .header(&format!("traceparent: {header}"))
            .run();
        assert_eq!(r.one().status, 200);
        curls.push(r);
    }
    let server_spans = SpanFilter::server().pid(server.pid());
    collector.wait_for(&server_spans, invalid.len());
    let spans = agent.stop_and_collect(&collector, &[]);

    let mut trace_ids = Vec::new();
    for (i, header) in invalid.iter().enumerate() {
        let s = spans.expect_one(&server_spans.clone().path(&format!("/users/{i}")));
        let header_trace = header.split('-').nth(1).unwrap_or("");
        Checks::new(
            format!("SERVER span of a request with invalid traceparent {header:?}"),
            s,
        )
        .check(s.parent_span_id.is_none(), || {
            format!(
                "parent: expected none (fresh root), got {:?}",
                s.parent_span_id
            )
        })
        .check(s.trace_id != header_trace, || {
            format!(
                "trace id: must not be taken from the invalid header, got {}",
                s.trace_id
            )
        })
        .check(
            hex_of_len(&s.trace_id, 32) && s.trace_id != "0".repeat(32),
            || format!("trace id: expected a fresh valid id, got {}", s.trace_id),
        )
        .finish();
        trace_ids.push(s.trace_id.clone());
    }
    let mut unique = trace_ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(
        unique.len(),
        trace_ids.len(),
        "every root span needs its own trace id: {trace_ids:?}"
    );
}

/// The kernel (which chooses a served request's ids before the request is parsed) and userspace
/// read `traceparent` alike: whitespace after the colon, a later version with more fields, and
/// values W3C rejects (too long for version 00, upper-case hex, non-hex flags).
#[test]
fn kernel_and_userspace_read_every_traceparent_form_alike() {
    let _serial = require_root();
    let collector = Collector::start();
    let server = PyServer::start();
    let mut agent = Agent::builder()
        .pid(server.pid())
        .arg("--verbose")
        .start(&collector);
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "00f067aa0ba902b7";
    // (header line, honoured?)
    let cases = [
        (format!("traceparent:\t00-{trace}-{parent}-01"), true),
        (format!("traceparent:  00-{trace}-{parent}-01"), true),
        (format!("traceparent: 01-{trace}-{parent}-01-future"), true),
        (format!("traceparent: 00-{trace}-{parent}-01x"), false),
        (
            format!("traceparent: 00-{}-{parent}-01", trace.to_uppercase()),
            false,
        ),
        (format!("traceparent: 00-{trace}-{parent}-zz"), false),
    ];
    for (i, (header, _)) in cases.iter().enumerate() {
        let r = Curl::get(server.url(&format!("/users/{i}")))
            .header(header)
            .run();
        assert_eq!(r.one().status, 200);
    }
    let server_spans = SpanFilter::server().pid(server.pid());
    collector.wait_for(&server_spans, cases.len());
    let spans = agent.stop_and_collect(&collector, &[]);
    let counters = agent.summary_counters();
    let mut failures = Vec::new();
    for (i, (header, honoured)) in cases.iter().enumerate() {
        let s = spans.expect_one(&server_spans.clone().path(&format!("/users/{i}")));
        let took = s.trace_id == trace && s.parent_span_id.as_deref() == Some(parent);
        if took != *honoured {
            failures.push(format!(
                "{header:?}: expected {}, got trace {} parent {:?}",
                if *honoured {
                    "the header's trace and parent"
                } else {
                    "a fresh root"
                },
                s.trace_id,
                s.parent_span_id
            ));
        }
    }
    let mismatch = counters.get("kernel_context_mismatch").copied();
    if mismatch != Some(0) {
        failures.push(format!(
            "kernel and userspace disagreed on a traceparent: kernel_context_mismatch = {mismatch:?}"
        ));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn node_client_keep_alive_against_node_server() {
    let _serial = require_root();
    let collector = Collector::start();
    let server = NodeServer::start();
    let mut agent = Agent::builder().comm(&node_exe_name()).start(&collector);

    let run = node_client(
        server.port(),
        &["GET:/hello", "POST:/echo:5000", "GET:/users/5"],
    );
    let server_spans = SpanFilter::server().pid(server.pid());
    let client_spans = SpanFilter::client().pid(run.pid);
    let spans = agent.stop_and_collect(&collector, &[(&server_spans, 3), (&client_spans, 3)]);

    for (span, r) in spans_per_request(&spans, &server_spans, &run) {
        let mut c = check_server_span(
            &format!("node SERVER span #{} ({} {})", r.index, r.method, r.path),
            span,
            &server,
            &r.method,
            &r.path,
            200,
            r.local_port,
        );
        c.resource_str("service.name", &node_exe_name())
            .attr_int("http.response.body.size", r.response_body as i64)
            .timing_within(&r.timing);
        if r.request_body > 0 {
            c.attr_int("http.request.body.size", r.request_body as i64);
        }
        c.finish();
    }
    for (span, r) in spans_per_request(&spans, &client_spans, &run) {
        let mut c = check_client_span(
            &format!("node CLIENT span #{} ({} {})", r.index, r.method, r.path),
            span,
            server.port(),
            &r.method,
            &r.path,
            200,
        );
        c.resource_str("service.name", &node_exe_name())
            .attr_int("http.response.body.size", r.response_body as i64)
            .timing_within(&r.timing);
        if r.request_body > 0 {
            c.attr_int("http.request.body.size", r.request_body as i64);
        }
        c.finish();
    }
}

#[test]
fn pid_selection_excludes_the_other_server() {
    let _serial = require_root();
    let collector = Collector::start();
    let selected = PyServer::start();
    let other = PyServer::start();
    let mut agent = Agent::builder().pid(selected.pid()).start(&collector);

    for server in [&selected, &other] {
        let r = Curl::get(server.url("/hello"))
            .then(server.url("/users/3"))
            .run();
        assert!(r.transfers.iter().all(|t| t.status == 200));
    }
    let selected_spans = SpanFilter::server().pid(selected.pid());
    let spans = agent.stop_and_collect(&collector, &[(&selected_spans, 2)]);

    spans.expect_one(&selected_spans.clone().path("/hello"));
    spans.expect_one(&selected_spans.clone().path("/users/3"));
    spans.expect_none(&SpanFilter::any().pid(other.pid()));
    // Nothing but the selected process was traced (curl was not selected).
    let strays: Vec<String> = spans
        .iter()
        .filter(|s| s.pid() != Some(selected.pid()))
        .map(ReceivedSpan::summary)
        .collect();
    assert!(
        strays.is_empty(),
        "only pid {} was selected, yet spans of other processes arrived:\n{}",
        selected.pid(),
        strays.join("\n")
    );
}

#[test]
fn port_selection_traces_only_that_server() {
    let _serial = require_root();
    let collector = Collector::start();
    let selected = PyServer::start();
    let other = PyServer::start();
    let mut agent = Agent::builder().port(selected.port()).start(&collector);

    for server in [&selected, &other] {
        let r = Curl::get(server.url("/hello")).run();
        assert_eq!(r.one().status, 200);
    }
    let selected_spans = SpanFilter::server().pid(selected.pid());
    let spans = agent.stop_and_collect(&collector, &[(&selected_spans, 1)]);

    spans.expect_one(&selected_spans.clone().path("/hello"));
    spans.expect_none(&SpanFilter::any().pid(other.pid()));
}

#[test]
fn two_server_processes_have_two_resources() {
    let _serial = require_root();
    let collector = Collector::start();
    let py = PyServer::start();
    let node = NodeServer::start();
    let mut agent = Agent::builder()
        .pid(py.pid())
        .pid(node.pid())
        .start(&collector);

    Curl::get(py.url("/hello")).run();
    Curl::get(node.url("/hello")).run();
    let py_spans = SpanFilter::server().pid(py.pid());
    let node_spans = SpanFilter::server().pid(node.pid());
    let spans = agent.stop_and_collect(&collector, &[(&py_spans, 1), (&node_spans, 1)]);

    let p = spans.expect_one(&py_spans);
    let n = spans.expect_one(&node_spans);
    Checks::new("resource of the python server's span", p)
        .resource_str_prefix("service.name", "python3")
        .resource_int("process.pid", i64::from(py.pid()))
        .resource_str("process.executable.name", &python_exe_name())
        .check(
            p.resource_str("process.command_line")
                .is_some_and(|c| c.contains("py_server.py")),
            || "resource process.command_line: expected to contain py_server.py".to_string(),
        )
        .check(
            p.resource_str("host.name").is_some_and(|h| !h.is_empty()),
            || "resource host.name: expected non-empty".to_string(),
        )
        .check(
            p.resource.keys().any(|k| k.starts_with("telemetry.sdk.")),
            || "resource telemetry.sdk.*: expected present".to_string(),
        )
        .finish();
    Checks::new("resource of the node server's span", n)
        .resource_str("service.name", &node_exe_name())
        .resource_int("process.pid", i64::from(node.pid()))
        .resource_str("process.executable.name", &node_exe_name())
        .check(
            n.resource_str("process.command_line")
                .is_some_and(|c| c.contains("node_server.js")),
            || "resource process.command_line: expected to contain node_server.js".to_string(),
        )
        .finish();
    assert_ne!(
        p.resource, n.resource,
        "two processes must not share a resource"
    );
    assert_eq!(
        p.resource_str("host.name"),
        n.resource_str("host.name"),
        "same host"
    );
}

#[test]
fn otel_service_name_env_of_the_process_names_the_service() {
    let _serial = require_root();
    let collector = Collector::start();
    let server = PyServer::start_with_env(&[("OTEL_SERVICE_NAME", "e2e-checkout")]);
    let mut agent = Agent::builder().pid(server.pid()).start(&collector);

    Curl::get(server.url("/hello")).run();
    let server_spans = SpanFilter::server().pid(server.pid());
    let spans = agent.stop_and_collect(&collector, &[(&server_spans, 1)]);

    let s = spans.expect_one(&server_spans);
    Checks::new(
        "SERVER span of a process with OTEL_SERVICE_NAME=e2e-checkout",
        s,
    )
    .resource_str("service.name", "e2e-checkout")
    .resource_str("process.executable.name", &python_exe_name())
    .finish();
}

#[test]
fn exports_over_otlp_http_protobuf_configured_by_env() {
    let _serial = require_root();
    let collector = Collector::start();
    let server = PyServer::start();
    let mut agent = Agent::builder()
        .pid(server.pid())
        .protocol(OtlpProtocol::HttpProtobuf)
        .endpoint_via_env()
        .start(&collector);

    let curl = Curl::get(server.url("/hello")).run();
    let server_spans = SpanFilter::server().pid(server.pid());
    let spans = agent.stop_and_collect(&collector, &[(&server_spans, 1)]);

    let s = spans.expect_one(&server_spans);
    check_server_span(
        "SERVER span exported over OTLP/HTTP protobuf",
        s,
        &server,
        "GET",
        "/hello",
        200,
        curl.one().local_port,
    )
    .finish();
}

/// Secrets and personal data in request targets and command lines never reach the collector
/// (README, "What is redacted"): ids are templated in span names and kept in url.path, e-mail
/// addresses and JWTs become `{id}` in names and `REDACTED` in url.path/url.full, query values
/// are redacted, and both traced processes' command lines lose their passwords, SQL literals,
/// credentials and headers.
#[test]
fn secrets_and_personal_data_never_reach_the_collector() {
    let _serial = require_root();
    // Every secret below contains this marker: it must appear nowhere the collector received,
    // nor the e-mail address's local part, nor any part of the JWT.
    const MARK: &str = "s3cr3t";
    const JWT: &str =
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZUBleGFtcGxlLmNvbSJ9.c2lnbmF0dXJlLXNpZw";
    let collector = Collector::start();
    let server = PyServer::start_with_args(&[
        "--db-password",
        "py-s3cr3t",
        "postgresql://app:url-s3cr3t@db.internal/shop",
        "ALTER ROLE app PASSWORD 'sql-s3cr3t'",
        "--admin-email",
        "alice@example.com",
    ]);
    let mut agent = Agent::builder()
        .pid(server.pid())
        .comm("curl")
        .start(&collector);

    let curl = Curl::get(server.url("/users/9?token=q-s3cr3t&page=2"))
        .then(server.url(&format!("/u/alice@example.com/token/{JWT}?k=k-s3cr3t")))
        .user("bob:pw-s3cr3t")
        .header("X-Api-Key: key-s3cr3t")
        .run();
    let statuses: Vec<u16> = curl.transfers.iter().map(|t| t.status).collect();
    assert_eq!(statuses, [200, 404], "curl transfers");
    let server_spans = SpanFilter::server().pid(server.pid());
    let curl_spans = SpanFilter::client().pid(curl.pid);
    let spans = agent.stop_and_collect(&collector, &[(&server_spans, 2), (&curl_spans, 2)]);

    let redacted_path = "/u/REDACTED/token/REDACTED";
    let ids = spans.expect_one(&server_spans.clone().path("/users/9"));
    Checks::new(
        "SERVER span of a request with an id and a query string",
        ids,
    )
    .name("GET /users/{id}")
    .attr_str("url.query", "token=REDACTED&page=REDACTED")
    .finish();
    let personal = spans.expect_one(&server_spans.clone().path(redacted_path));
    let py_command = personal.resource_str("process.command_line").unwrap_or("");
    let mut c = Checks::new(
        "SERVER span of a request with an e-mail address and a JWT in its path",
        personal,
    );
    c.name("GET /u/{id}/token/{id}")
        .attr_str("url.query", "k=REDACTED");
    for kept in [
        "py_server.py 0 --db-password REDACTED",
        "postgresql://app:REDACTED@db.internal/shop",
        "ALTER ROLE app PASSWORD ?",
        "--admin-email REDACTED@example.com",
    ] {
        c.check(py_command.contains(kept), || {
            format!(
                "resource process.command_line: expected to contain {kept:?}, got {py_command:?}"
            )
        });
    }
    c.finish();
    let client = spans.expect_one(&curl_spans.clone().path(redacted_path));
    let curl_command = client.resource_str("process.command_line").unwrap_or("");
    let mut c = Checks::new("curl CLIENT span of the same request", client);
    c.name("GET /u/{id}/token/{id}").attr_str(
        "url.full",
        &format!(
            "http://127.0.0.1:{}{redacted_path}?k=REDACTED",
            server.port()
        ),
    );
    // curl overwrites its own `-u` argument with spaces soon after it starts: the agent reads
    // either the credentials (then redacted) or the blanks, depending on when it looks.
    c.check(
        curl_command.contains("-u bob:REDACTED") || curl_command.contains("-u     "),
        || format!("resource process.command_line: expected \"-u bob:REDACTED\" (or curl's own blanks), got {curl_command:?}"),
    );
    for kept in [
        "-H X-Api-Key: REDACTED",
        "/users/9?token=REDACTED&page=REDACTED",
        "/u/REDACTED/token/REDACTED?k=REDACTED",
    ] {
        c.check(curl_command.contains(kept), || {
            format!(
                "resource process.command_line: expected to contain {kept:?}, got {curl_command:?}"
            )
        });
    }
    c.finish();

    // Nowhere: no span name, attribute, resource attribute or status message of any span, and
    // nothing in the collector's whole output.
    let leaks = [MARK, "alice", "eyJ", "c2lnbmF0dXJl"];
    for span in spans.iter() {
        let texts = std::iter::once(("name".to_string(), span.name.clone()))
            .chain(std::iter::once((
                "status message".to_string(),
                span.status_message.clone(),
            )))
            .chain(
                span.attributes
                    .iter()
                    .map(|(k, v)| (k.clone(), v.to_string())),
            )
            .chain(
                span.resource
                    .iter()
                    .map(|(k, v)| (format!("resource {k}"), v.to_string())),
            );
        for (key, text) in texts {
            for leak in leaks {
                assert!(
                    !text.contains(leak),
                    "{key} of span {:?} leaks {leak:?}: {text}",
                    span.name
                );
            }
        }
    }
    let raw = collector.raw_output();
    for leak in leaks {
        assert!(
            !raw.contains(leak),
            "the collector received {leak:?}:\n{raw}"
        );
    }
}

#[test]
fn late_started_process_is_picked_up_by_comm() {
    let _serial = require_root();
    let collector = Collector::start();
    let mut agent = Agent::builder().comm(&node_exe_name()).start(&collector);
    // Started after the agent is ready.
    let server = NodeServer::start();

    let curl = Curl::get(server.url("/users/77")).run();
    let server_spans = SpanFilter::server().pid(server.pid());
    let spans = agent.stop_and_collect(&collector, &[(&server_spans, 1)]);

    let s = spans.expect_one(&server_spans);
    check_server_span(
        "SERVER span of a node server started after the agent",
        s,
        &server,
        "GET",
        "/users/77",
        200,
        curl.one().local_port,
    )
    .resource_str("service.name", &node_exe_name())
    .finish();
}

#[test]
fn exe_selection_by_path() {
    let _serial = require_root();
    let collector = Collector::start();
    let server = PyServer::start();
    let exe = python_bin().display().to_string();
    let mut agent = Agent::builder().exe(&exe).start(&collector);

    let curl = Curl::get(server.url("/hello")).run();
    let server_spans = SpanFilter::server().pid(server.pid());
    let spans = agent.stop_and_collect(&collector, &[(&server_spans, 1)]);

    let s = spans.expect_one(&server_spans);
    check_server_span(
        &format!("SERVER span of a python server selected with --exe {exe}"),
        s,
        &server,
        "GET",
        "/hello",
        200,
        curl.one().local_port,
    )
    .finish();
    // curl's executable is not the python one.
    spans.expect_none(&SpanFilter::any().pid(curl.pid));
}

/// `--exe python3` and `--exe /usr/bin/python3` (a symlink to python3.X) select a python
/// started as `python3`, whose /proc/PID/exe is the versioned file; the exit summary counts the
/// processes the start-up report listed.
#[test]
fn exe_by_name_and_by_symlink_select_the_real_python() {
    let _serial = require_root();
    let link = std::path::Path::new("/usr/bin/python3");
    let real = std::fs::canonicalize(link).unwrap_or_else(|e| {
        panic!("this test needs Debian's /usr/bin/python3 (apt-get install python3): {e}")
    });
    assert!(
        link.is_symlink() && real.file_name() != link.file_name(),
        "/usr/bin/python3 should be a symlink to a versioned python, found {}",
        real.display()
    );
    let collector = Collector::start();
    let server = PyServer::start_program("python3", std::path::Path::new("/usr/bin:/bin"));
    let exe = std::fs::read_link(format!("/proc/{}/exe", server.pid())).expect("exe");
    assert_eq!(exe, real, "the server runs the file the symlink names");

    let mut agent = Agent::builder()
        .exe("python3")
        .exe("/usr/bin/python3")
        .start(&collector);
    let (at_start, _) = agent.selection_report();
    assert!(
        at_start.contains(&server.pid()),
        "the start-up report lists the server (pid {}): {at_start:?}",
        server.pid()
    );
    assert!(
        !agent.stderr().contains("agent: warning: --exe"),
        "both values select the server:\n{}",
        agent.stderr()
    );

    let curl = Curl::get(server.url("/hello")).run();
    let server_spans = SpanFilter::server().pid(server.pid());
    let spans = agent.stop_and_collect(&collector, &[(&server_spans, 1)]);
    let s = spans.expect_one(&server_spans);
    check_server_span(
        "SERVER span of a python selected with --exe python3",
        s,
        &server,
        "GET",
        "/hello",
        200,
        curl.one().local_port,
    )
    .finish();

    let (at_start, later) = agent.selection_report();
    assert_eq!(
        agent.summary_counters().get("processes_selected").copied(),
        Some(at_start.len() as u64 + later),
        "processes_selected counts the start-up report ({at_start:?}) and the {later} \
         selected later\n{}",
        agent.stderr()
    );
}

/// A second agent on the host is refused while the first runs (before loading any probe),
/// starts beside it when asked to, and starts normally once the first was killed -9.
#[test]
fn a_second_agent_is_refused_while_one_runs() {
    let _serial = require_root();
    let collector = Collector::start();
    let agent = || Agent::builder().comm("e2e-no-such");
    let mut first = agent().start(&collector);

    let (status, stderr) = agent().run_expecting_exit(&collector);
    assert_eq!(status.code(), Some(1), "refused:\n{stderr}");
    let refusal = format!(
        "agent: error: another agent is already running on this host (pid {}, holding \
         /run/ebpf-agent/agent.lock)",
        first.pid()
    );
    assert!(
        stderr.contains(&refusal),
        "expected {refusal:?} in:\n{stderr}"
    );
    assert!(stderr.contains("--allow-multiple-agents"), "{stderr}");
    assert!(
        !stderr.contains("agent: attached"),
        "refused before loading a probe:\n{stderr}"
    );

    let mut beside = agent().arg("--allow-multiple-agents").start(&collector);
    let note = format!(
        "agent: warning: another agent is running on this host (pid {}); running beside it",
        first.pid()
    );
    assert!(beside.stderr().contains(&note), "{}", beside.stderr());
    beside.stop();

    // kill -9 leaves no stale lock behind.
    first.kill();
    let mut next = agent().start(&collector);
    assert!(
        !next.stderr().contains("another agent"),
        "{}",
        next.stderr()
    );
    next.stop();
}

/// A `--comm` that matches nothing is named at start-up; when such a process starts, a line
/// says it now matches, and the process is traced.
#[test]
fn a_comm_that_matches_nothing_is_warned_about_then_reported_when_it_starts() {
    const NAME: &str = "e2e-late-py";
    let _serial = require_root();
    let collector = Collector::start();
    // A python whose command name is NAME: started through a symlink of that name.
    let bin = tests::process::TestDir::new("late-comm");
    std::os::unix::fs::symlink(python_bin(), bin.join(NAME)).expect("symlink");

    let mut agent = Agent::builder().comm(NAME).start(&collector);
    let warning = format!("agent: warning: --comm {NAME} selects no running process");
    assert!(
        agent.stderr().contains(&warning),
        "expected {warning:?} in:\n{}",
        agent.stderr()
    );

    let server = PyServer::start_program(NAME, bin.path());
    let matched = format!("--comm {NAME} now matches {NAME}[{}]", server.pid());
    tests::process::poll_until(std::time::Duration::from_secs(10), || {
        agent.stderr().contains(&matched).then_some(())
    })
    .unwrap_or_else(|| panic!("expected {matched:?} in:\n{}", agent.stderr()));

    let curl = Curl::get(server.url("/hello")).run();
    let server_spans = SpanFilter::server().pid(server.pid());
    let spans = agent.stop_and_collect(&collector, &[(&server_spans, 1)]);
    check_server_span(
        "SERVER span of a process that matched --comm after start-up",
        spans.expect_one(&server_spans),
        &server,
        "GET",
        "/hello",
        200,
        curl.one().local_port,
    )
    .finish();
    assert_eq!(
        agent.stderr().matches("now matches").count(),
        1,
        "reported once:\n{}",
        agent.stderr()
    );
}

/// Root whose capability set lacks CAP_BPF and CAP_PERFMON (and CAP_SYS_ADMIN) is stopped
/// before loading anything, told what is missing and what the agent needs; a non-root user
/// given the capabilities the systemd unit grants runs.
#[test]
fn privileges_are_checked_by_capability_not_by_uid() {
    let _serial = require_root();
    let collector = Collector::start();
    let (status, stderr) = Agent::builder()
        .wrapped_in(
            "setpriv",
            &["--bounding-set=-bpf,-perfmon,-sys_admin", "--"],
        )
        .run_expecting_exit(&collector);
    assert_eq!(status.code(), Some(1), "{stderr}");
    let wanted = "agent: error: this process lacks CAP_BPF and CAP_PERFMON, without which it \
                  cannot load eBPF programs (uid 0). Run the agent as root (`sudo agent`), or \
                  give it CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN, CAP_SYS_PTRACE and \
                  CAP_DAC_READ_SEARCH";
    assert!(stderr.contains(wanted), "expected {wanted:?} in:\n{stderr}");

    const CAPS: &str = "+bpf,+perfmon,+net_admin,+sys_ptrace,+dac_read_search";
    let mut agent = Agent::builder()
        .comm("e2e-no-such")
        .wrapped_in(
            "setpriv",
            &[
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                &format!("--inh-caps={CAPS}"),
                &format!("--ambient-caps={CAPS}"),
                "--",
            ],
        )
        .start(&collector);
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.pid())).expect("status");
    assert!(
        status.lines().any(|l| l.starts_with("Uid:\t65534")),
        "the agent runs as uid 65534:\n{status}"
    );
    agent.stop();
}

#[test]
fn forked_child_of_a_selected_process_is_traced_from_its_first_request() {
    use std::io::{BufRead as _, BufReader, Write as _};
    use std::process::{Command, Stdio};

    let _serial = require_root();
    let collector = Collector::start();
    let server = PyServer::start();
    let mut forker = Command::new(python_bin())
        .arg(tests::fixture("py_forker.py"))
        .arg(server.url("/hello"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start py_forker.py");
    let mut stdin = forker.stdin.take().expect("forker stdin");
    let mut lines = BufReader::new(forker.stdout.take().expect("forker stdout")).lines();
    let mut next_line = |what: &str| -> String {
        lines
            .next()
            .and_then(Result::ok)
            .unwrap_or_else(|| panic!("py_forker.py ended before printing {what}"))
    };
    let parent_pid: u32 = next_line("READY")
        .strip_prefix("READY ")
        .and_then(|p| p.parse().ok())
        .expect("READY <pid>");
    // Only the parent is selected; its child exists only after the agent is ready and makes
    // its request at once, long before any /proc rescan could find it.
    let mut agent = Agent::builder().pid(parent_pid).start(&collector);
    writeln!(stdin, "go").expect("tell the forker to fork");
    let child_pid: u32 = next_line("CHILD")
        .strip_prefix("CHILD ")
        .and_then(|p| p.parse().ok())
        .expect("CHILD <pid>");
    let done = next_line("DONE");
    assert_eq!(done, "DONE 0", "the forked child's request failed");
    let _ = forker.wait();

    let child_spans = SpanFilter::client().pid(child_pid);
    let spans = agent.stop_and_collect(&collector, &[(&child_spans, 1)]);

    let s = spans.expect_one(&child_spans);
    check_client_span(
        "CLIENT span of a process forked by the selected one",
        s,
        server.port(),
        "GET",
        "/hello",
        200,
    )
    .resource_int("process.pid", i64::from(child_pid))
    .finish();
    // The server was not selected.
    spans.expect_none(&SpanFilter::any().pid(server.pid()));
}

/// A valid W3C id: lowercase hex of the right length, not all zeros.
fn valid_id(id: &str, len: usize) -> bool {
    hex_of_len(id, len) && id.bytes().any(|b| b != b'0')
}

/// A traced client sends a `traceparent` with an all-zero trace or parent id to a traced
/// server: neither span carries an invalid id, and the server span is still the child of
/// the client span (through the rewritten header or same-host pairing).
#[test]
fn traced_client_sending_zero_ids_exports_only_valid_ids() {
    let _serial = require_root();
    let collector = Collector::start();
    let server = PyServer::start();
    let mut agent = Agent::builder()
        .pid(server.pid())
        .comm("curl")
        .start(&collector);

    let headers = [
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        "00-00000000000000000000000000000000-0000000000000000-01",
    ];
    let mut runs = Vec::new();
    for (i, header) in headers.iter().enumerate() {
        let run = Curl::get(server.url(&format!("/users/{i}")))
            .header(&format!("traceparent: {header}"))
            .run();
        assert_eq!(run.one().status, 200);
        runs.push(run);
    }
    let server_spans = SpanFilter::server().pid(server.pid());
    let mut wanted: Vec<(SpanFilter, usize)> = vec![(server_spans.clone(), headers.len())];
    wanted.extend(runs.iter().map(|r| (SpanFilter::client().pid(r.pid), 1)));
    let wanted: Vec<(&SpanFilter, usize)> = wanted.iter().map(|(f, n)| (f, *n)).collect();
    collector.wait_for_all(&wanted);
    let spans = agent.stop_and_collect(&collector, &[]);

    let zero_parent = "0".repeat(16);
    for (i, (header, run)) in headers.iter().zip(&runs).enumerate() {
        let path = format!("/users/{i}");
        let client = spans.expect_one(&SpanFilter::client().pid(run.pid));
        let server = spans.expect_one(&server_spans.clone().path(&path));
        for (what, s) in [("CLIENT", client), ("SERVER", server)] {
            Checks::new(
                format!("{what} span of a request sent with traceparent {header}"),
                s,
            )
            .check(valid_id(&s.trace_id, 32), || {
                format!("trace id: expected a valid id, got {}", s.trace_id)
            })
            .check(valid_id(&s.span_id, 16), || {
                format!("span id: expected a valid id, got {}", s.span_id)
            })
            .check(
                s.parent_span_id.as_deref().is_none_or(|p| valid_id(p, 16)),
                || {
                    format!(
                        "parent: expected none or a valid id, got {:?}",
                        s.parent_span_id
                    )
                },
            )
            .attr_str("url.path", &path)
            .finish();
        }
        Checks::new(
            format!("SERVER span of a request sent with traceparent {header}"),
            server,
        )
        .check(
            server.trace_id == client.trace_id
                && server.parent_span_id.as_deref() == Some(client.span_id.as_str()),
            || format!("expected the child of the CLIENT span {}", client.summary()),
        )
        .finish();
        assert_ne!(client.parent_span_id.as_deref(), Some(zero_parent.as_str()));
    }
}

/// Header values with bytes httparse refuses but nginx serves (0x01, ESC, DEL), and one
/// nginx refuses with a 400 (NUL): every request gets its spans on both sides.
#[test]
fn requests_with_control_bytes_in_header_values_are_traced() {
    let _serial = require_root();
    let collector = Collector::start();
    let server = NginxServer::start();
    let mut agent = Agent::builder()
        .comm("nginx")
        .comm(&python_exe_name())
        .start(&collector);

    let cases: [(&str, &[u8], u16); 4] = [
        ("ctl01", b"a\x01b", 200),
        ("esc", b"\x1b[31mred\x1b[0m", 200),
        ("del", b"a\x7fb", 200),
        ("nul", b"a\x00b", 400),
    ];
    let requests: Vec<Vec<u8>> = cases
        .iter()
        .map(|(query, value, _)| {
            [
                format!(
                    "GET {NGINX_HELLO_PATH}?{query} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nX-Odd: ",
                    server.port()
                )
                .as_bytes(),
                value,
                b"\r\nConnection: close\r\n\r\n",
            ]
            .concat()
        })
        .collect();
    let requests: Vec<&[u8]> = requests.iter().map(Vec::as_slice).collect();
    let run = raw_client(server.port(), RawMode::Read, &requests);
    let statuses: Vec<u16> = run.results.iter().map(|r| r.status).collect();
    let expected: Vec<u16> = cases.iter().map(|c| c.2).collect();
    assert_eq!(statuses, expected, "nginx's answers");
    let server_spans = SpanFilter::server().pid(server.worker_pid());
    let client_spans = SpanFilter::client().pid(run.pid);
    let spans = agent.stop_and_collect(
        &collector,
        &[(&server_spans, cases.len()), (&client_spans, cases.len())],
    );

    for ((query, _, status), r) in cases.iter().zip(&run.results) {
        for (what, filter) in [
            ("nginx SERVER", &server_spans),
            ("python CLIENT", &client_spans),
        ] {
            let found: Vec<&ReceivedSpan> = spans
                .matching(filter)
                .into_iter()
                .filter(|s| s.attr_str("url.query") == Some(query))
                .collect();
            let [s] = found.as_slice() else {
                panic!(
                    "expected one {what} span of the request with {query}, found {}; the \
                     collector received:\n{spans}",
                    found.len()
                );
            };
            Checks::new(format!("{what} span of the request with {query}"), s)
                .attr_str("url.path", NGINX_HELLO_PATH)
                .attr_int("http.response.status_code", i64::from(*status))
                .timing_within(&r.timing)
                .finish();
        }
    }
}

/// A client that shuts down its sending side before reading the answer gets a normal span;
/// one that closes before any answer still gets an error span.
#[test]
fn half_closed_client_gets_a_normal_span_and_a_real_close_an_error() {
    let _serial = require_root();
    let collector = Collector::start();
    let server = PyServer::start();
    let mut agent = Agent::builder()
        .pid(server.pid())
        .comm(&python_exe_name())
        .start(&collector);

    let request = |path: &str| {
        format!(
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\n\r\n",
            server.port()
        )
    };
    let half = raw_client(
        server.port(),
        RawMode::HalfClose,
        &[request("/users/1").as_bytes()],
    );
    assert_eq!(half.results[0].status, 200);
    let closed = raw_client(
        server.port(),
        RawMode::Close,
        &[request("/users/2").as_bytes()],
    );
    let half_spans = SpanFilter::client().pid(half.pid);
    let closed_spans = SpanFilter::client().pid(closed.pid);
    let spans = agent.stop_and_collect(&collector, &[(&half_spans, 1), (&closed_spans, 1)]);

    check_client_span(
        "CLIENT span of a request whose client half-closed before reading",
        spans.expect_one(&half_spans),
        server.port(),
        "GET",
        "/users/1",
        200,
    )
    .timing_within(&half.results[0].timing)
    .finish();
    Checks::new(
        "CLIENT span of a request whose client closed before any answer",
        spans.expect_one(&closed_spans),
    )
    .kind(SpanKind::Client)
    .attr_str("url.path", "/users/2")
    .attr_absent("http.response.status_code")
    .attr_str("error.type", "connection_closed")
    .status(SpanStatus::Error)
    .finish();
}
