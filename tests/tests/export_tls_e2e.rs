//! Privileged end-to-end tests of the export over https: the real agent traces a real server
//! and exports to an OTLP receiver that serves TLS with a CA made by the test
//! ([`TlsReceiver`]: rotel has no TLS receiver). The settings come as a user gives them: the
//! standard OTEL_EXPORTER_OTLP_* variables, or flags.
//!
//! Needs root and the agent binary (`AGENT_BIN`), python3 with grpcio and opentelemetry-proto,
//! and openssl. Run serially: `cargo test -p tests --test export_tls_e2e -- --test-threads=1`.

use std::time::{Duration, Instant};

use tests::process::{POLL, tail};
use tests::{
    Agent, Curl, HttpServer, OtlpProtocol, Pki, PyServer, TlsReceiver, TlsReceiverOptions,
    require_root,
};

const SECRET: &str = "e2e-s3cret";

#[test]
fn https_export_configured_by_the_standard_variables_reaches_a_tls_collector() {
    let _serial = require_root();
    let pki = Pki::new();
    let receiver = TlsReceiver::start(
        &pki,
        TlsReceiverOptions {
            require_client_cert: true,
            ..TlsReceiverOptions::default()
        },
    );
    let server = PyServer::start();
    let ca = pki.ca().display().to_string();
    let cert = pki.client_cert().display().to_string();
    let key = pki.client_key().display().to_string();
    let mut agent = Agent::builder()
        .pid(server.pid())
        .protocol(OtlpProtocol::HttpProtobuf)
        .env("OTEL_EXPORTER_OTLP_CERTIFICATE", &ca)
        .env("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", &cert)
        .env("OTEL_EXPORTER_OTLP_CLIENT_KEY", &key)
        .env(
            "OTEL_EXPORTER_OTLP_HEADERS",
            "x-tenant=t1,x-api-key=e2e-s3cret",
        )
        .env(
            "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
            "x-api-key=e2e-s3cret%2Ctraces",
        )
        .env("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip")
        .start_exporting_to(&receiver.http_url("localhost"));

    let curl = Curl::get(server.url("/hello")).run();
    assert_eq!(curl.one().status, 200);
    let exports = receiver.wait_for(
        "the server span of GET /hello",
        tests::SPAN_TIMEOUT,
        |exports| {
            exports
                .iter()
                .any(|e| e.spans.iter().any(|s| s.name == "GET /hello"))
        },
    );
    agent.stop();
    let e = exports
        .iter()
        .find(|e| e.spans.iter().any(|s| s.name == "GET /hello"))
        .expect("found above");
    assert_eq!(e.protocol, "http");
    assert_eq!(e.path, "/v1/traces");
    assert_eq!(e.content_encoding.as_deref(), Some("gzip"));
    assert_eq!(
        e.client_cn.as_deref(),
        Some("agent-client"),
        "the client certificate from OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE"
    );
    assert_eq!(
        e.headers.get("x-api-key").map(String::as_str),
        Some("e2e-s3cret,traces"),
        "OTEL_EXPORTER_OTLP_TRACES_HEADERS wins, percent-decoded"
    );
    assert!(
        !e.headers.contains_key("x-tenant"),
        "the traces list replaces the generic one"
    );
    let counters = agent.summary_counters();
    assert_eq!(counters.get("spans_export_failed").copied().unwrap_or(0), 0);
    let stderr = agent.stderr();
    assert!(
        stderr.contains("TLS, CA ") && stderr.contains("gzip, headers x-api-key"),
        "the start-up line describes the export: {}",
        tail(&stderr, 40)
    );
    assert!(
        !stderr.contains(SECRET),
        "a header value reached the log:\n{stderr}"
    );
}

#[test]
fn an_untrusted_collector_certificate_keeps_the_agent_running_and_counts_the_spans() {
    let _serial = require_root();
    let pki = Pki::new();
    let receiver = TlsReceiver::start(&pki, TlsReceiverOptions::default());
    let server = PyServer::start();
    let endpoint = receiver.grpc_url("127.0.0.1");
    let mut agent = Agent::builder()
        .pid(server.pid())
        .arg("--otlp-certificate")
        .arg(&pki.other_ca().display().to_string())
        .arg("--otlp-header")
        .arg(&format!("x-api-key={SECRET}"))
        .start_exporting_to(&endpoint);

    // The first request's span fails to export: one warning that says what and where.
    assert_eq!(Curl::get(server.url("/hello")).run().one().status, 200);
    let wanted = format!("exporting spans to {endpoint} failed");
    let deadline = Instant::now() + Duration::from_secs(20);
    let warning = loop {
        if let Some(line) = agent.stderr().lines().find(|l| l.contains(&wanted)) {
            break line.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no export failure reported within 20 s:\n{}",
            tail(&agent.stderr(), 40)
        );
        std::thread::sleep(POLL);
    };
    for part in [
        "invalid peer certificate: UnknownIssuer",
        "spans_export_failed",
        "--otlp-certificate (OTEL_EXPORTER_OTLP_CERTIFICATE)",
    ] {
        assert!(warning.contains(part), "{part:?} missing from: {warning}");
    }
    assert!(
        agent.is_running(),
        "an export failure must not stop the agent"
    );

    // A later request is exported again (and fails again): the agent keeps trying.
    assert_eq!(Curl::get(server.url("/users/7")).run().one().status, 200);
    std::thread::sleep(Duration::from_secs(3));
    assert!(agent.is_running());
    agent.stop();
    let counters = agent.summary_counters();
    assert_eq!(
        counters.get("spans_export_failed").copied(),
        Some(2),
        "{counters:?}"
    );
    assert_eq!(
        counters.get("export_errors").copied(),
        Some(2),
        "two failed export requests: the second span was tried on its own: {counters:?}"
    );
    assert!(receiver.spans().is_empty(), "nothing got through");
    let stderr = agent.stderr();
    assert_eq!(
        stderr.matches(&wanted).count(),
        1,
        "reported once per outage:\n{stderr}"
    );
    assert!(!stderr.contains(SECRET), "a header value reached the log");
}
