//! Privileged end-to-end tests of the agent as a service: Prometheus metrics and health probes
//! on `--metrics-address`, and the exit summary without its zero counters.
//!
//! Needs root and the agent binary (`AGENT_BIN`, default `target/release/agent`):
//! `cargo test -p tests --test metrics_e2e -- --test-threads=1` (as root), or `cargo xtask test`.

use std::net::TcpListener;
use std::process::Command;
use std::time::{Duration, Instant};

use tests::agent::agent_bin;
use tests::metrics::{Family, http_get, http_raw, parse_exposition};
use tests::{Agent, Collector, Curl, HttpServer, PyServer, SpanFilter, require_root};

/// Polls `/metrics` until `done` holds for the families (or panics after 10 s with the last
/// scrape).
fn scrape_until(
    agent: &Agent,
    what: &str,
    done: impl Fn(&std::collections::BTreeMap<String, Family>) -> bool,
) -> std::collections::BTreeMap<String, Family> {
    let addr = agent.metrics_address();
    let started = Instant::now();
    loop {
        let answer = http_get(addr, "/metrics");
        assert_eq!(answer.status, 200, "GET /metrics: {answer:?}");
        let families = parse_exposition(&answer.body);
        if done(&families) {
            return families;
        }
        if started.elapsed() > Duration::from_secs(10) {
            panic!("/metrics never showed {what}:\n{}", answer.body);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn value(families: &std::collections::BTreeMap<String, Family>, name: &str) -> f64 {
    families
        .get(name)
        .unwrap_or_else(|| {
            panic!(
                "no {name} in /metrics; families: {:?}",
                families.keys().collect::<Vec<_>>()
            )
        })
        .value()
}

#[test]
fn metrics_and_health_follow_a_traced_request_and_the_summary_hides_zero_counters() {
    let _serial = require_root();
    let collector = Collector::start();
    let server = PyServer::start();
    let mut agent = Agent::builder()
        .pid(server.pid())
        .comm("curl")
        .arg("--metrics-address")
        .arg("127.0.0.1:0")
        .start(&collector);
    let addr = agent.metrics_address();

    let live = http_get(addr, "/healthz");
    assert_eq!(live.status, 200, "/healthz of a running agent: {live:?}");
    assert!(live.body.starts_with("live: "), "{live:?}");
    let ready = http_get(addr, "/readyz");
    assert_eq!(ready.status, 200, "/readyz after `agent ready`: {ready:?}");
    assert!(ready.body.starts_with("ready: "), "{ready:?}");
    assert_eq!(
        ready.body.trim_end().lines().count(),
        1,
        "one line: {ready:?}"
    );

    let before = parse_exposition(&http_get(addr, "/metrics").body);
    let exchanges_before = value(&before, "ebpf_agent_http_exchanges_total");

    let curl = Curl::get(server.url("/hello")).run();
    assert_eq!(curl.one().status, 200);
    let server_spans = SpanFilter::server().pid(server.pid());
    let curl_spans = SpanFilter::client().pid(curl.pid);
    collector.wait_for_all(&[(&server_spans, 1), (&curl_spans, 1)]);

    // The collector has both spans; the agent counts them exported when it reads the reply.
    let families = scrape_until(&agent, "both spans exported", |f| {
        f.get("ebpf_agent_spans_exported_total")
            .is_some_and(|s| s.value() >= 2.0)
    });
    let exchanges = value(&families, "ebpf_agent_http_exchanges_total");
    assert!(
        exchanges >= exchanges_before + 2.0,
        "the server's and curl's exchanges: {exchanges_before} -> {exchanges}"
    );
    assert!(value(&families, "ebpf_agent_kernel_data_events_total") >= 4.0);
    assert!(value(&families, "ebpf_agent_kernel_bytes_total") > 0.0);
    assert!(value(&families, "ebpf_agent_spans_built_total") >= 2.0);
    assert_eq!(value(&families, "ebpf_agent_up"), 1.0);
    assert_eq!(value(&families, "ebpf_agent_ready"), 1.0);
    assert!(value(&families, "ebpf_agent_probes_attached") >= 5.0);
    assert!(value(&families, "ebpf_agent_selected_processes") >= 1.0);
    assert!(families.contains_key("ebpf_agent_open_connections"));
    assert_eq!(value(&families, "ebpf_agent_export_failing_seconds"), 0.0);
    assert!(
        value(
            &families,
            "ebpf_agent_export_last_success_timestamp_seconds"
        ) > 1.7e9
    );
    assert!(value(&families, "ebpf_agent_event_thread_heartbeat_age_seconds") < 5.0);
    // Every family: a valid, conventional name with its HELP and TYPE.
    for (name, f) in &families {
        assert!(name.starts_with("ebpf_agent_"), "{name}");
        assert!(
            name.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
            "{name} is not snake_case"
        );
        assert!(!f.help.trim().is_empty(), "{name} has no HELP");
        match f.kind.as_str() {
            "counter" => assert!(name.ends_with("_total"), "counter {name}"),
            "gauge" => assert!(!name.ends_with("_total"), "gauge {name}"),
            other => panic!("{name}: unexpected type {other:?}"),
        }
    }
    let answer = http_get(addr, "/metrics");
    assert_eq!(
        answer.headers.get("content-type").map(String::as_str),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    // A hostile request is refused, counted, and the agent keeps serving.
    let garbage = http_raw(addr, b"\x16\x03\x01\x00\xff garbage\r\n\r\n");
    assert_eq!(garbage.status, 400, "{garbage:?}");
    let families = scrape_until(&agent, "the refused request counted", |f| {
        f.get("ebpf_agent_metrics_requests_rejected_total")
            .is_some_and(|s| s.value() >= 1.0)
    });

    agent.stop();
    let summary = agent.summary_counters();
    // Every counter /metrics showed is in the summary when it is not zero, and only then.
    for (name, f) in &families {
        let Some(short) = name
            .strip_prefix("ebpf_agent_")
            .and_then(|n| n.strip_suffix("_total"))
        else {
            continue;
        };
        if f.value() > 0.0 {
            let at_exit = summary.get(short).copied().unwrap_or(0);
            assert!(
                at_exit as f64 >= f.value(),
                "{short}: {} on /metrics, {at_exit} in the summary",
                f.value()
            );
        }
    }
    for (name, v) in &summary {
        assert!(*v > 0, "the summary shows {name} = 0 without --verbose");
    }
    assert!(summary.get("http_exchanges").is_some_and(|n| *n >= 2));
    assert!(summary.get("metrics_requests").is_some_and(|n| *n >= 5));
    let zeros = families
        .iter()
        .filter(|(n, f)| n.ends_with("_total") && f.value() == 0.0)
        .count() as u64;
    let hidden = agent.summary_hidden_zero_counters().unwrap_or_else(|| {
        panic!(
            "the summary does not say how many zero counters it hid:\n{}",
            agent.stderr()
        )
    });
    assert!(
        zeros > 0 && hidden > 0,
        "zeros on /metrics: {zeros}, hidden: {hidden}"
    );
    assert!(
        hidden <= zeros,
        "{hidden} counters hidden, but only {zeros} were zero at the last scrape"
    );
}

#[test]
fn a_metrics_address_in_use_stops_the_agent_before_it_attaches_anything() {
    let _serial = require_root();
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let out = Command::new(agent_bin())
        .args(["--metrics-address", &addr.to_string(), "--pid", "1"])
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .output()
        .expect("run the agent");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot listen on --metrics-address {addr}")),
        "{stderr}"
    );
    assert!(
        !stderr.contains("attached"),
        "nothing attached first: {stderr}"
    );
}
