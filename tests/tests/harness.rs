//! Self-tests of the harness: collector, server fixtures and clients, without the agent and
//! without root. If these fail, the end-to-end results mean nothing.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tests::process::{TestDir, run_to_completion};
use tests::servers::{
    HELLO_BODY, LARGE_SIZE, NGINX_HELLO_BODY, NGINX_HELLO_PATH, NGINX_LARGE_PATH, NGINX_LARGE_SIZE,
    NODE_CHUNK_SIZES,
};
use tests::{
    AttrValue, Collector, Curl, HttpServer, NginxServer, NodeServer, PyServer, SpanFilter,
    SpanKind, SpanStatus, curl_bin, fixture, node_client, pipeline_client, py_client, python_bin,
};

fn process_alive(pid: u32) -> bool {
    // A reaped process has no /proc entry; a zombie would still be "alive" here, but the
    // guards reap their children.
    Path::new(&format!("/proc/{pid}")).exists()
}

const OTLP_JSON: &str = r#"{"resourceSpans":[
 {"resource":{"attributes":[
   {"key":"service.name","value":{"stringValue":"json-svc"}},
   {"key":"process.pid","value":{"intValue":"77"}}]},
  "scopeSpans":[{"scope":{"name":"harness"},"spans":[
   {"traceId":"0af7651916cd43dd8448eb211c80319c","spanId":"b7ad6b7169203331",
    "parentSpanId":"00f067aa0ba902b7","name":"GET /users/{id}","kind":2,
    "startTimeUnixNano":"1700000000000000000","endTimeUnixNano":"1700000000001000000",
    "attributes":[
      {"key":"url.path","value":{"stringValue":"/users/7"}},
      {"key":"http.response.status_code","value":{"intValue":"500"}}],
    "status":{"code":2}},
   {"traceId":"0af7651916cd43dd8448eb211c80319c","spanId":"c7ad6b7169203332",
    "name":"GET /x","kind":3,
    "startTimeUnixNano":"1700000000002000000","endTimeUnixNano":"1700000000003000000"}]}]},
 {"resource":{"attributes":[{"key":"service.name","value":{"stringValue":"json-svc-2"}}]},
  "scopeSpans":[{"scope":{"name":"harness"},"spans":[
   {"traceId":"1af7651916cd43dd8448eb211c80319c","spanId":"d7ad6b7169203333","name":"PUT /z","kind":1,
    "startTimeUnixNano":"1700000000004000000","endTimeUnixNano":"1700000000005000000"}]}]}]}"#;

#[test]
fn collector_receives_otlp_http_json_and_parses_it() {
    let collector = Collector::start();
    let mut cmd = Command::new(curl_bin());
    cmd.args([
        "-sS",
        "-f",
        "-X",
        "POST",
        "-H",
        "Content-Type: application/json",
    ])
    .arg("--data-binary")
    .arg(OTLP_JSON)
    .arg(format!("{}/v1/traces", collector.http_endpoint()));
    let (status, stdout, stderr, _) = run_to_completion("curl-otlp", cmd, Duration::from_secs(20));
    assert!(
        status.success(),
        "POST to rotel failed: {status} {stdout} {stderr}"
    );
    let spans = collector.wait_for_spans("3 spans", Duration::from_secs(10), |s| s.len() >= 3);
    let server = spans.expect_one(&SpanFilter::server().pid(77).path("/users/7"));
    assert_eq!(server.trace_id, "0af7651916cd43dd8448eb211c80319c");
    assert_eq!(server.span_id, "b7ad6b7169203331");
    assert_eq!(server.parent_span_id.as_deref(), Some("00f067aa0ba902b7"));
    assert_eq!(server.name, "GET /users/{id}");
    assert_eq!(server.status, SpanStatus::Error);
    assert_eq!(server.start_unix_nanos, 1_700_000_000_000_000_000);
    assert_eq!(server.duration_nanos(), 1_000_000);
    assert_eq!(server.attr_i64("http.response.status_code"), Some(500));
    assert_eq!(server.service_name(), Some("json-svc"));
    let client = spans.expect_one(&SpanFilter::client());
    assert_eq!(client.parent_span_id, None);
    assert_eq!(client.resource, server.resource);
    let internal = &spans[2];
    assert_eq!(internal.kind, SpanKind::Internal);
    assert_eq!(internal.service_name(), Some("json-svc-2"));
    assert_ne!(internal.resource, server.resource);
    // Nothing else arrives.
    assert_eq!(collector.settle().len(), 3);
}

/// The agent exports OTLP/gRPC by default: check rotel's gRPC receiver with a real SDK.
/// Needs `pip install opentelemetry-sdk opentelemetry-exporter-otlp-proto-grpc`.
#[test]
fn collector_receives_otlp_grpc_from_the_python_sdk() {
    let collector = Collector::start();
    let mut cmd = Command::new(python_bin());
    cmd.arg(fixture("otlp_grpc_send.py"))
        .arg(collector.grpc_endpoint());
    let (status, stdout, stderr, _) =
        run_to_completion("otlp_grpc_send", cmd, Duration::from_secs(30));
    assert!(
        status.success(),
        "otlp_grpc_send.py failed ({status}); are opentelemetry-sdk and \
         opentelemetry-exporter-otlp-proto-grpc installed?\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let sent = stdout
        .lines()
        .find_map(|l| l.strip_prefix("SENT "))
        .unwrap_or_else(|| panic!("no SENT line in {stdout:?}"));
    let field = |k: &str| {
        sent.split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("no {k} in {sent:?}"))
            .to_string()
    };
    let trace_id = field("trace_id");
    let spans = collector.wait_for(&SpanFilter::any().trace_id(&trace_id), 2);
    let server = spans.expect_one(&SpanFilter::server().trace_id(&trace_id));
    assert_eq!(server.span_id, field("server_span_id"));
    assert_eq!(server.attr_str("url.path"), Some("/users/7"));
    assert_eq!(server.attr("flag"), Some(&AttrValue::Bool(true)));
    assert_eq!(server.pid(), Some(4242));
    assert_eq!(
        server.resource_str("multi.line"),
        Some("first line\nsecond line)")
    );
    let client = spans.expect_one(&SpanFilter::client().trace_id(&trace_id));
    assert_eq!(client.span_id, field("client_span_id"));
    assert_eq!(
        client.parent_span_id.as_deref(),
        Some(server.span_id.as_str())
    );
    assert_eq!(client.status_message, "upstream failed");
}

#[test]
fn python_server_answers_every_route_on_one_keep_alive_connection() {
    let server = PyServer::start();
    assert!(process_alive(server.pid()));
    let run = py_client(
        server.port(),
        &[
            "GET:/hello",
            "GET:/large",
            "POST:/echo:307200",
            "GET:/users/42",
            "GET:/missing",
            "GET:/boom",
        ],
    );
    let got: Vec<(u16, u64)> = run
        .results
        .iter()
        .map(|r| (r.status, r.response_body))
        .collect();
    assert_eq!(
        got,
        [
            (200, HELLO_BODY.len() as u64),
            (200, LARGE_SIZE as u64),
            (200, 307200),
            (200, r#"{"id": "42"}"#.len() as u64),
            (404, 10),
            (500, 15)
        ]
    );
    let port = run.results[0].local_port;
    for r in &run.results {
        assert_eq!(r.local_port, port, "one connection: {r:?}");
        assert!(r.timing.duration_nanos > 0, "{r:?}");
        assert!(r.timing.end_unix_nanos > r.timing.start_unix_nanos, "{r:?}");
    }
    assert_ne!(run.pid, server.pid());
}

#[test]
fn server_fixtures_are_killed_on_drop() {
    let py = PyServer::start();
    let node = NodeServer::start();
    let nginx = NginxServer::start();
    let pids = [py.pid(), node.pid(), nginx.master_pid(), nginx.worker_pid()];
    assert_ne!(nginx.master_pid(), nginx.worker_pid());
    drop(py);
    drop(node);
    drop(nginx);
    for pid in pids {
        let gone = tests::process::poll_until(Duration::from_secs(5), || {
            (!process_alive(pid)).then_some(())
        });
        assert!(gone.is_some(), "pid {pid} still alive after drop");
    }
}

#[test]
fn pipeline_client_gets_every_response_in_order() {
    let server = PyServer::start();
    let run = pipeline_client(server.port(), &["/users/1", "/hello", "/users/22"]);
    let got: Vec<(&str, u16, u64)> = run
        .results
        .iter()
        .map(|r| (r.path.as_str(), r.status, r.response_body))
        .collect();
    assert_eq!(
        got,
        [
            ("/users/1", 200, 11),
            ("/hello", 200, 6),
            ("/users/22", 200, 12)
        ]
    );
    assert!(
        run.results
            .windows(2)
            .all(|w| w[0].timing.end_unix_nanos <= w[1].timing.end_unix_nanos)
    );
}

#[test]
fn node_server_chunked_and_node_client_keep_alive() {
    let server = NodeServer::start();
    // curl reports the decoded body size and the response headers.
    let dir = TestDir::new("chunked");
    let headers = dir.join("headers");
    let mut cmd = Command::new(curl_bin());
    cmd.args(["-sS", "-o", "/dev/null", "-D"])
        .arg(&headers)
        .args(["-w", "%{size_download}"])
        .arg(server.url("/chunked"));
    let (status, stdout, stderr, _) = run_to_completion("curl", cmd, Duration::from_secs(20));
    assert!(status.success(), "{stderr}");
    let head = std::fs::read_to_string(&headers).expect("headers");
    assert!(
        head.to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{head}"
    );
    assert!(
        !head.to_ascii_lowercase().contains("content-length"),
        "{head}"
    );
    assert_eq!(
        stdout.trim(),
        NODE_CHUNK_SIZES.iter().sum::<usize>().to_string()
    );

    let custom = Curl::get(server.url("/chunked?sizes=3,1,2")).run();
    assert_eq!(custom.one().size_download, 6, "chunk sizes from the query");

    let run = node_client(
        server.port(),
        &[
            "GET:/hello",
            "POST:/echo:307200",
            "GET:/chunked",
            "GET:/boom",
            "GET:/nope",
        ],
    );
    let got: Vec<(u16, u64)> = run
        .results
        .iter()
        .map(|r| (r.status, r.response_body))
        .collect();
    assert_eq!(
        got,
        [
            (200, 6),
            (200, 307200),
            (200, NODE_CHUNK_SIZES.iter().sum::<usize>() as u64),
            (500, 15),
            (404, 10)
        ]
    );
    assert!(
        run.results
            .iter()
            .all(|r| r.local_port == run.results[0].local_port)
    );
}

#[test]
fn nginx_serves_static_files_and_errors() {
    let server = NginxServer::start();
    let r = Curl::get(server.url(NGINX_HELLO_PATH))
        .then(server.url(NGINX_LARGE_PATH))
        .then(server.url("/missing"))
        .then(server.url("/boom"))
        .run();
    let got: Vec<(u16, u64, u32)> = r
        .transfers
        .iter()
        .map(|t| (t.status, t.size_download, t.num_connects))
        .collect();
    assert_eq!(
        got,
        [
            (200, NGINX_HELLO_BODY.len() as u64, 1),
            (200, NGINX_LARGE_SIZE as u64, 0),
            (404, got[2].1, 0),
            (500, got[3].1, 0)
        ],
        "one connection, right statuses and sizes"
    );
    let local = r.transfers[0].local_port;
    assert!(r.transfers.iter().all(|t| t.local_port == local));
    assert!(r.transfers.iter().all(|t| t.timing.duration_nanos > 0));
}

#[test]
fn curl_posts_bodies_and_measures() {
    let server = PyServer::start();
    let r = Curl::post(server.url("/echo"), 307200).run();
    let t = r.one();
    assert_eq!(t.status, 200);
    assert_eq!(t.size_upload, 307200);
    assert_eq!(t.size_download, 307200);
    assert!(t.timing.duration_nanos > 0);
    assert!(
        t.timing.duration_nanos <= t.timing.end_unix_nanos - t.timing.start_unix_nanos,
        "curl's time_total fits in the process window: {t:?}"
    );
    assert!(t.local_port > 0);
}
