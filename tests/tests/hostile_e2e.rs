//! Hostile input (issue 9): random bytes, a 1 MiB request line, 100k headers, an HTTP/2
//! preface, a TLS ClientHello, slowloris, CL+TE smuggling, bad and repeated `traceparent`
//! headers, pipelined and split requests.
//!
//! - A traced client (selected by pid, held before its first byte) writes each of them to a
//!   server that records every byte it receives: what arrived must be exactly what was written,
//!   except the changes the header injector is allowed to make to well-formed requests
//!   ([`tests::hostile::check_delivery`]); and later requests on the same connection show
//!   whether the framing survived or was given up — never guessed.
//! - A traced server (python `http.server` and nginx) gets the same input from an untraced
//!   client and must answer exactly as it did without the agent, and stay traced.
//! - At the collector every span has valid ids, no garbage connection passes for a successful
//!   exchange, and the exit summary's counters account for what was dropped.
//!
//! Needs root and the agent binary (`AGENT_BIN`), like the other e2e tests.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::Duration;

use tests::hostile::{
    Case, CaseResult, Delivery, Expect, HostileClient, Piece, RecordingServer, check_delivery, get,
    post, target_of, valid_id,
};
use tests::process::run_to_completion;
use tests::{
    Agent, Collector, Failures, HttpServer, NginxServer, PyServer, ReceivedSpan, SpanKind, Spans,
    python_bin, require_root,
};

/// How long to wait between an answer and the next request on a keep-alive connection: the
/// injector takes a socket out of its map while an answer is read and puts it back right after
/// (`agent-ebpf/src/inject.rs`); a service rarely calls again within microseconds of an answer.
const GAP_MS: u64 = 150;

// ---------------------------------------------------------------------------------------------
// The hostile bytes.

/// Deterministic pseudo-random bytes (xorshift64*).
fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
        })
        .collect()
}

/// A request line of 1 MiB.
fn long_line_request(path: &str) -> Vec<u8> {
    let mut r = format!("GET {path}").into_bytes();
    r.extend(std::iter::repeat_n(b'a', 1 << 20));
    r.extend_from_slice(b" HTTP/1.1\r\nHost: e2e\r\n\r\n");
    r
}

/// 100 000 header lines.
fn many_headers_request(path: &str) -> Vec<u8> {
    let mut r = format!("GET {path} HTTP/1.1\r\nHost: e2e\r\n").into_bytes();
    for i in 0..100_000 {
        r.extend_from_slice(format!("X-H{i}: v\r\n").as_bytes());
    }
    r.extend_from_slice(b"\r\n");
    r
}

/// The HTTP/2 connection preface, SETTINGS, WINDOW_UPDATE and a HEADERS frame (GET / on
/// stream 1, HPACK).
fn http2_preface() -> Vec<u8> {
    let mut b = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    b.extend_from_slice(&[
        0, 0, 12, 4, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 100, 0, 4, 0, 0, 255, 255,
    ]);
    b.extend_from_slice(&[0, 0, 4, 8, 0, 0, 0, 0, 0, 0, 15, 0, 1]);
    b.extend_from_slice(&[
        0, 0, 8, 1, 5, 0, 0, 0, 1, 0x82, 0x86, 0x84, 0x41, 3, b'e', b'2', b'e',
    ]);
    b
}

/// A real TLS ClientHello, made by python's ssl module (no network).
fn tls_client_hello() -> Vec<u8> {
    let mut cmd = Command::new(python_bin());
    cmd.args([
        "-c",
        "import ssl, sys\n\
         out = ssl.MemoryBIO()\n\
         tls = ssl.create_default_context().wrap_bio(ssl.MemoryBIO(), out, server_hostname='e2e.example')\n\
         try:\n    tls.do_handshake()\n\
         except ssl.SSLWantReadError:\n    pass\n\
         sys.stdout.write(out.read().hex())\n",
    ]);
    let (status, stdout, stderr, _) = run_to_completion("tls_hello", cmd, Duration::from_secs(20));
    assert!(status.success(), "making a ClientHello failed: {stderr}");
    let hex = stdout.trim();
    let bytes: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
        .collect();
    assert!(
        bytes.len() > 100 && bytes[0] == 0x16 && bytes[5] == 0x01,
        "not a TLS handshake record with a ClientHello: {hex}"
    );
    bytes
}

/// CL+TE: by Transfer-Encoding the body is one chunk holding `inner` (then the last chunk); by
/// Content-Length (4: the chunk-size line) `inner` is the next request. (request, rest)
fn cl_te(path: &str, te_line: &str, inner: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let size = format!("{:02x}\r\n", inner.len());
    assert_eq!(size.len(), 4, "a two-digit chunk size");
    let head = post(path, &["Content-Length: 4", te_line], size.as_bytes());
    let rest = [inner, b"\r\n0\r\n\r\n"].concat();
    (head, rest)
}

/// A request head whose Content-Length servers read in different ways (RFC 9112 §6.3: an
/// unrecoverable error): by one reading its body is the `n` bytes that follow (another
/// request), by another it has none and those bytes are the next request. python's
/// `http.server` takes the first of two values, other servers the last or refuse: the
/// injector must not pick one.
fn ambiguous_length(kind: &str, path: &str, n: usize) -> Vec<u8> {
    let lines = match kind {
        "cl-twice" => vec![
            format!("Content-Length: {n}"),
            "Content-Length: 0".to_string(),
        ],
        "cl-list" => vec![format!("Content-Length: 0, {n}")],
        "cl-junk" => vec![format!("Content-Length: 0x{n:x}")],
        _ => unreachable!("{kind}"),
    };
    let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
    post(path, &lines, b"")
}

const TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const PARENT: &str = "b7ad6b7169203331";

/// `traceparent` values that are not valid W3C version-00 contexts (the injector must leave
/// them alone; a server must not continue them). A version-00 value is exactly 55 characters
/// with hex flags: `extra`, `flagsone` and `flagsbad` only look like one.
fn invalid_traceparents() -> Vec<(&'static str, String)> {
    vec![
        ("short", format!("00-{TRACE}-{}-01", &PARENT[1..])),
        ("extra", format!("00-{TRACE}-{PARENT}-01-00")),
        ("flagsone", format!("00-{TRACE}-{PARENT}-1")),
        ("flagsbad", format!("00-{TRACE}-{PARENT}-zz")),
        ("upper", format!("00-{}-{PARENT}-01", TRACE.to_uppercase())),
        ("versionff", format!("ff-{TRACE}-{PARENT}-01")),
        ("nonhex", format!("00-{}g-{PARENT}-01", &TRACE[1..])),
    ]
}

/// Valid in form, with all-zero ids: the injector rewrites them; a server must not continue
/// them.
fn zero_traceparents() -> Vec<(&'static str, String)> {
    let zt = "0".repeat(32);
    let zp = "0".repeat(16);
    vec![
        ("zerotrace", format!("00-{zt}-{PARENT}-01")),
        ("zeroparent", format!("00-{TRACE}-{zp}-01")),
        ("zeroboth", format!("00-{zt}-{zp}-01")),
    ]
}

// ---------------------------------------------------------------------------------------------
// Traced client → recording server.

/// Whether the injector must give up following a connection's requests (counted once per
/// connection as `inject_framing_lost`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Framing {
    Kept,
    Lost,
}

fn client_cases() -> Vec<(Case, Framing)> {
    use Expect::{Either, Injected, Untouched};
    use Framing::{Kept, Lost};
    let req = |bytes: Vec<u8>, e| Piece::request(bytes, e);
    let mut cases = vec![
        (
            Case::new("control")
                .write(vec![req(get("/h/control/first", &[]), Injected)])
                .answers(1)
                .pause(GAP_MS)
                .write(vec![req(get("/h/control/second", &[]), Injected)])
                .answers(1)
                .end_shutdown(),
            Kept,
        ),
        (
            Case::new("random")
                .write(vec![Piece::raw(random_bytes(64 * 1024, 1))])
                .end_shutdown(),
            Lost,
        ),
        (
            Case::new("get-then-garbage")
                .write(vec![Piece::raw(
                    [b"GET /".as_slice(), &random_bytes(4096, 2)].concat(),
                )])
                .pause(50)
                .write(vec![Piece::raw(get("/h/garbage/after", &[]))])
                .end_shutdown(),
            Lost,
        ),
        (
            Case::new("long-request-line")
                .write(vec![req(long_line_request("/h/long/"), Either)])
                .answers(1)
                .pause(GAP_MS)
                .write(vec![req(get("/h/long/after", &[]), Either)])
                .answers(1)
                .end_shutdown(),
            Lost,
        ),
        (
            Case::new("many-headers")
                .write(vec![req(many_headers_request("/h/many"), Either)])
                .answers(1)
                .pause(GAP_MS)
                .write(vec![req(get("/h/many/after", &[]), Either)])
                .answers(1)
                .end_shutdown(),
            Lost,
        ),
        (
            Case::new("http2-preface")
                .write(vec![Piece::raw(http2_preface())])
                .end_shutdown(),
            Lost,
        ),
        (
            Case::new("tls-client-hello")
                .write(vec![Piece::raw(tls_client_hello())])
                .end_shutdown(),
            Lost,
        ),
        (
            Case::new("slowloris")
                .dribble(
                    req(
                        get("/h/slow/first", &["User-Agent: slow/1", "Accept: */*"]),
                        Either,
                    ),
                    4,
                )
                .answers(1)
                .pause(GAP_MS)
                .write(vec![req(get("/h/slow/after", &[]), Either)])
                .answers(1)
                .end_shutdown(),
            Lost,
        ),
        (
            Case::new("split-head")
                .split(
                    req(get("/h/split/first", &["Accept: */*"]), Either),
                    &[5, 20, 30, 45],
                )
                .answers(1)
                .pause(GAP_MS)
                .write(vec![req(get("/h/split/after", &[]), Either)])
                .answers(1)
                .end_shutdown(),
            Lost,
        ),
    ];
    // The head in one write, the body in six: the injector follows the body by its length,
    // so the next request is injected again.
    let body = random_bytes(3000, 3);
    let split_body = post("/h/splitbody/first", &["Content-Length: 3000"], &body);
    let head = split_body.len() - body.len();
    cases.push((
        Case::new("split-body")
            .split(
                req(split_body, Injected),
                &[
                    head,
                    head + 1,
                    head + 500,
                    head + 1000,
                    head + 2000,
                    head + 2999,
                ],
            )
            .answers(1)
            .pause(GAP_MS)
            .write(vec![req(get("/h/splitbody/after", &[]), Injected)])
            .answers(1)
            .end_shutdown(),
        Kept,
    ));
    // CL+TE in every spelling of Transfer-Encoding: whatever follows is left alone.
    for (name, te) in [
        ("cl-te", "Transfer-Encoding: chunked"),
        ("cl-te-list", "Transfer-Encoding: chunked, identity"),
        ("cl-te-space", "Transfer-Encoding:  chunked"),
        ("cl-te-tab", "Transfer-Encoding:\tchunked"),
        ("cl-te-space-before-colon", "Transfer-Encoding : chunked"),
        ("cl-te-upper", "TRANSFER-ENCODING: CHUNKED"),
    ] {
        let (head, rest) = cl_te(
            &format!("/h/{name}/first"),
            te,
            &get(&format!("/h/{name}/inner"), &[]),
        );
        cases.push((
            Case::new(name)
                .write(vec![req(head, Either), Piece::raw(rest)])
                .end_shutdown(),
            Lost,
        ));
    }
    // Content-Length that servers read differently (RFC 9112 §6.3: an unrecoverable error).
    for name in ["cl-twice", "cl-list", "cl-junk"] {
        let inner = get(&format!("/h/{name}/inner"), &[]);
        let head = ambiguous_length(name, &format!("/h/{name}/first"), inner.len());
        cases.push((
            Case::new(name)
                .write(vec![req(head, Either), Piece::raw(inner)])
                .end_shutdown(),
            Lost,
        ));
    }
    // Bad, zero, valid and repeated traceparents, each the first request of a connection, a
    // good request behind it in the same write: that one shows the framing survived.
    let valid = format!("traceparent: 00-{TRACE}-{PARENT}-01");
    let mut tp_cases: Vec<(&str, Vec<String>, Expect)> = Vec::new();
    for (name, value) in invalid_traceparents() {
        tp_cases.push((name, vec![format!("traceparent: {value}")], Untouched));
    }
    for (name, value) in zero_traceparents() {
        tp_cases.push((name, vec![format!("traceparent: {value}")], Injected));
    }
    tp_cases.push(("valid", vec![valid.clone()], Injected));
    // Valid (a tab is optional whitespace too); the injector may leave it alone.
    tp_cases.push((
        "tab",
        vec![format!("traceparent:\t00-{TRACE}-{PARENT}-01")],
        Either,
    ));
    tp_cases.push(("twice", vec![valid.clone(), valid.clone()], Untouched));
    tp_cases.push((
        "twice-mixed",
        vec![
            valid.clone(),
            format!("traceparent: {}", invalid_traceparents()[0].1),
        ],
        Untouched,
    ));
    for (name, lines, expect) in tp_cases {
        let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
        cases.push((
            Case::new(&format!("tp-{name}"))
                .write(vec![
                    req(get(&format!("/h/tp/{name}"), &lines), expect),
                    req(get(&format!("/h/tp/{name}/after"), &[]), Injected),
                ])
                .answers(2)
                .end_shutdown(),
            Kept,
        ));
    }
    // Pipelined: good and hostile requests in one write; all are framed.
    let bad_tp = format!("traceparent: {}", invalid_traceparents()[0].1);
    let dup = valid;
    cases.push((
        Case::new("pipelined-mixed")
            .write(vec![
                req(get("/h/pipe/a", &[]), Injected),
                req(get("/h/pipe/b", &[&bad_tp]), Untouched),
                req(get("/h/pipe/c", &[]), Injected),
                req(get("/h/pipe/d", &[&dup, &dup]), Untouched),
                req(
                    post("/h/pipe/e", &["Content-Length: 100"], &random_bytes(100, 4)),
                    Injected,
                ),
                req(get("/h/pipe/f", &[]), Injected),
            ])
            .answers(6)
            .end_shutdown(),
        Kept,
    ));
    // More requests in one write than the injector follows: the first is injected, the rest
    // may be given up, never misplaced.
    let many: Vec<Piece> = (0..20)
        .map(|i| {
            let name = ["a", "b", "c", "d", "e"][i % 5];
            req(
                get(&format!("/h/pipe20/{name}{}", "x".repeat(i / 5)), &[]),
                if i == 0 { Injected } else { Either },
            )
        })
        .collect();
    cases.push((
        Case::new("pipelined-20")
            .write(many)
            .answers(20)
            .end_shutdown(),
        Lost,
    ));
    cases.push((
        Case::new("control-end")
            .write(vec![req(get("/h/control/end", &[]), Injected)])
            .answers(1)
            .end_shutdown(),
        Kept,
    ));
    cases
}

/// Every id of a span valid (32 / 16 lower-case hex, not all zeros; parent absent or valid).
fn id_problem(s: &ReceivedSpan) -> Option<String> {
    let ok = valid_id(s.trace_id.as_bytes(), 32)
        && valid_id(s.span_id.as_bytes(), 16)
        && s.parent_span_id
            .as_deref()
            .is_none_or(|p| valid_id(p.as_bytes(), 16));
    (!ok).then(|| format!("invalid id(s): {}", s.summary()))
}

fn counter(counters: &BTreeMap<String, u64>, name: &str) -> u64 {
    *counters.get(name).unwrap_or_else(|| {
        panic!(
            "the exit summary (--verbose) has no counter {name:?}: {:?}",
            counters.keys().collect::<Vec<_>>()
        )
    })
}

#[test]
fn hostile_requests_of_a_traced_client_arrive_byte_exact() {
    let _serial = require_root();
    let cases = client_cases();
    let collector = Collector::start();
    let recorder = RecordingServer::start();
    let plan: Vec<Case> = cases.iter().map(|(c, _)| c.clone()).collect();
    let client = HostileClient::new(recorder.port(), &plan).gated();
    let mut agent = Agent::builder()
        .pid(client.pid())
        .arg("--verbose")
        .start(&collector);
    let mut failures = Failures::default();
    let status = agent.context_propagation_status();
    failures.check(status.as_deref() == Some("on (canary passed)"), || {
        format!("context propagation is not on: {status:?}")
    });
    let results = client.run();

    // What arrived, request by request.
    let mut deliveries: Vec<(String, Vec<u8>, Delivery)> = Vec::new();
    let mut answered: BTreeSet<String> = BTreeSet::new();
    let mut wire = WireCount::default();
    for ((case, _), result) in cases.iter().zip(&results) {
        failures.check(result.error.is_none() && result.reset.is_none(), || {
            format!(
                "case {}: the client saw {:?} {:?}",
                case.name, result.error, result.reset
            )
        });
        let Some(recorded) = recorder.recorded(result.local_port) else {
            failures.check(false, || {
                format!(
                    "case {}: the recording server has nothing from port {}\n{}",
                    case.name,
                    result.local_port,
                    recorder.stderr()
                )
            });
            continue;
        };
        answered.extend(recorded.answered.iter().cloned());
        wire.add(&case.sent(), &recorded.bytes);
        match check_delivery(&case.pieces, &recorded.bytes) {
            Ok(ds) => {
                for ((request, _), d) in case.requests().zip(ds) {
                    deliveries.push((case.name.clone(), request.to_vec(), d));
                }
            }
            Err(e) => failures.check(false, || {
                format!("case {}: the bytes did not arrive as sent: {e}", case.name)
            }),
        }
    }
    agent.stop();
    let counters = agent.summary_counters();
    let spans = collector.settle();
    report(&cases, &results, &deliveries, &counters);

    // Ids: on the wire and at the collector.
    for s in &spans.0 {
        if let Some(p) = id_problem(s) {
            failures.check(false, || p);
        }
    }
    for (case, request, d) in &deliveries {
        let Some((trace, span)) = d.ids() else {
            continue;
        };
        let target = target_of(request);
        let found = spans.0.iter().find(|s| s.span_id == span);
        failures.check(
            found.is_some_and(|s| s.kind == SpanKind::Client && s.trace_id == trace),
            || {
                format!(
                    "case {case}: request {target} went out with trace {trace} span {span}, but the collector has {}",
                    found.map_or("no span with that id".to_string(), |s| s.summary())
                )
            },
        );
        // A valid incoming context is continued: same trace, the caller's span as parent.
        if let Some(s) = found
            && target == "/h/tp/valid"
        {
            failures.check(
                s.trace_id == TRACE && s.parent_span_id.as_deref() == Some(PARENT),
                || format!("case {case}: the client span must continue the request's context ({TRACE}, parent {PARENT}): {}", s.summary()),
            );
        }
    }
    // No span for bytes that were not a request (garbage read as HTTP), and nothing passes
    // for an answer the server never gave.
    let sent_targets: BTreeSet<String> = cases
        .iter()
        .flat_map(|(c, _)| c.pieces.iter().flat_map(|p| request_targets(p.bytes())))
        .collect();
    for s in &spans.0 {
        let path = s.attr_str("url.path").unwrap_or_default();
        failures.check(sent_targets.contains(path), || {
            format!("a span for a request that was never sent: {}", s.summary())
        });
    }
    for s in &spans.0 {
        if s.kind == SpanKind::Client
            && s.attr_i64("http.response.status_code") == Some(200)
            && !s.attr_str("url.path").is_some_and(|p| answered.contains(p))
        {
            failures.check(false, || {
                format!(
                    "a client span claims a 200 the server never sent: {}",
                    s.summary()
                )
            });
        }
    }

    // Counters: what the kernel did (checked against the wire), and why it dropped what it
    // dropped (checked against what was sent).
    let lost = cases.iter().filter(|(_, f)| *f == Framing::Lost).count() as u64;
    // Single invalid traceparents (the tp cases and pipelined-mixed's /b); several
    // traceparents in one request (tp-twice, tp-twice-mixed, pipelined-mixed's /d) and the
    // valid-with-a-tab one may be counted as invalid too.
    let single_invalid = invalid_traceparents().len() as u64 + 1;
    let may_count_invalid = 4;
    for (name, want, why) in [
        (
            "sockets_enrolled",
            cases.len() as u64,
            "one connection per case",
        ),
        (
            "traceparent_injected",
            wire.inserted,
            "lines added on the wire",
        ),
        (
            "traceparent_rewritten",
            wire.rewritten,
            "values rewritten on the wire",
        ),
        (
            "traceparent_invalid_rewritten",
            wire.zero_rewritten,
            "all-zero ids rewritten on the wire",
        ),
        (
            "inject_framing_lost",
            lost,
            "connections whose framing no one can know",
        ),
        ("inject_failed", 0, "nothing refused"),
        ("spans_invalid_ids_fixed", 0, "any count is a bug"),
        ("kernel_context_ids_invalid", 0, "any count is a bug"),
        (
            "connections_unrecognized",
            2,
            "random bytes, HTTP/2: never HTTP",
        ),
        (
            "connections_encrypted",
            1,
            "a TLS ClientHello from a client without a TLS library: records, no plaintext",
        ),
        (
            "http_headers_truncated",
            2,
            "the 1 MiB request line and the 100k headers",
        ),
    ] {
        let got = counter(&counters, name);
        failures.check(got == want, || {
            format!("{name} = {got}, expected {want} ({why})")
        });
    }
    let kept = counter(&counters, "traceparent_invalid_kept");
    failures.check(
        (single_invalid..=single_invalid + may_count_invalid).contains(&kept),
        || {
            format!(
                "traceparent_invalid_kept = {kept}, expected {single_invalid}..={} (the requests with one invalid traceparent)",
                single_invalid + may_count_invalid
            )
        },
    );
    let skipped = counter(&counters, "inject_skipped");
    let lost_counted = counter(&counters, "inject_framing_lost");
    failures.check(skipped >= lost_counted + kept + 2, || {
        format!(
            "inject_skipped = {skipped}: fewer than the framings lost ({lost_counted}), the invalid traceparents kept ({kept}) and the two requests with several traceparents"
        )
    });
    failures.finish("hostile input from a traced client");
}

/// The harness without the agent: the client writes each plan exactly, the recording server
/// records exactly that and answers what it should, and the judge finds every request
/// untouched. If this fails, the agent tests above mean nothing.
#[test]
fn harness_hostile_plans_arrive_untouched_without_the_agent() {
    let cases = client_cases();
    let recorder = RecordingServer::start();
    let plan: Vec<Case> = cases.iter().map(|(c, _)| c.clone()).collect();
    let results = HostileClient::new(recorder.port(), &plan).run();
    let mut failures = Failures::default();
    for ((case, _), result) in cases.iter().zip(&results) {
        let recorded = recorder.recorded(result.local_port);
        let sent = case.sent();
        failures.check(
            result.error.is_none()
                && result.reset.is_none()
                && recorded.as_ref().is_some_and(|r| {
                    r.bytes == sent && r.answered.len() == result.statuses.len()
                }),
            || {
                format!(
                    "case {}: error {:?}, reset {:?}, {} of {} bytes recorded, answered {:?}, statuses {:?}",
                    case.name,
                    result.error,
                    result.reset,
                    recorded.as_ref().map_or(0, |r| r.bytes.len()),
                    sent.len(),
                    recorded.as_ref().map(|r| &r.answered),
                    result.statuses
                )
            },
        );
        let relaxed: Vec<Piece> = case
            .pieces
            .iter()
            .map(|p| match p {
                Piece::Request { bytes, .. } => Piece::request(bytes.clone(), Expect::Either),
                Piece::Raw(bytes) => Piece::raw(bytes.clone()),
            })
            .collect();
        let received = recorded.map(|r| r.bytes).unwrap_or_default();
        let judged = check_delivery(&relaxed, &received);
        failures.check(
            judged
                .as_ref()
                .is_ok_and(|d| d.iter().all(|d| *d == Delivery::Untouched)),
            || format!("case {}: the judge says {judged:?}", case.name),
        );
    }
    failures.finish("the hostile-input harness without the agent");
}

/// `traceparent` header values in a stream, in order.
fn traceparent_values(stream: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(stream)
        .split("\r\n")
        .filter_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.trim()
                .eq_ignore_ascii_case("traceparent")
                .then(|| value.trim().to_string())
        })
        .collect()
}

/// What the injector did, read off the wire: values that arrived but were never sent are
/// either added lines or rewritten ones.
#[derive(Default, Debug)]
struct WireCount {
    inserted: u64,
    rewritten: u64,
    /// Sent values with an all-zero id that did not arrive (rewritten).
    zero_rewritten: u64,
}

impl WireCount {
    fn add(&mut self, sent: &[u8], received: &[u8]) {
        let (sent, received) = (traceparent_values(sent), traceparent_values(received));
        let new = received.iter().filter(|v| !sent.contains(v)).count() as u64;
        let inserted = (received.len() as u64).saturating_sub(sent.len() as u64);
        self.inserted += inserted;
        self.rewritten += new.saturating_sub(inserted);
        self.zero_rewritten += sent
            .iter()
            .filter(|v| {
                (v.contains(&"0".repeat(32)) || v.contains(&format!("-{}-", "0".repeat(16))))
                    && !received.contains(v)
            })
            .count() as u64;
    }
}

/// Targets of every request line in a piece (`METHOD target HTTP/1.x` at its start or after a
/// CRLF).
fn request_targets(stream: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(stream)
        .split("\r\n")
        .filter_map(|line| {
            let mut parts = line.split(' ');
            let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
            (method.bytes().all(|b| b.is_ascii_uppercase()) && version.starts_with("HTTP/1."))
                .then(|| target.to_string())
        })
        .collect()
}

fn report(
    cases: &[(Case, Framing)],
    results: &[CaseResult],
    deliveries: &[(String, Vec<u8>, Delivery)],
    counters: &BTreeMap<String, u64>,
) {
    let mut text = String::new();
    for ((case, framing), r) in cases.iter().zip(results) {
        text.push_str(&format!(
            "  {:<26} port {:>5} {framing:?} answers {:?} error {:?} reset {:?}\n",
            case.name, r.local_port, r.statuses, r.error, r.reset
        ));
    }
    for (case, request, d) in deliveries {
        text.push_str(&format!("  {case:<26} {:<32} {d:?}\n", target_of(request)));
    }
    eprintln!(
        "[e2e] hostile input from a traced client:\n{text}counters: {:?}",
        interesting(counters)
    );
}

/// The counters these tests are about, for the test output.
fn interesting(counters: &BTreeMap<String, u64>) -> BTreeMap<&String, &u64> {
    counters
        .iter()
        .filter(|(k, _)| {
            [
                "inject",
                "traceparent",
                "socket",
                "http",
                "connections",
                "invalid",
                "parked",
                "rejoin",
                "context",
                "spans",
            ]
            .iter()
            .any(|w| k.contains(w))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Untraced client → traced servers (python http.server, nginx).

/// The same hostile input, sent to a server whose requests are `base?<tag>` (each tag names
/// one request, for finding its span). Every case writes everything, shuts down its sending
/// side and reads the server's answers to the end.
fn server_cases(base: &str) -> Vec<Case> {
    let t = |tag: &str| format!("{base}?{tag}");
    let raw = |name: &str, bytes: Vec<u8>| {
        Case::new(name)
            .write(vec![Piece::raw(bytes)])
            .end_shutdown()
    };
    let mut cases = vec![
        raw("control", get(&t("first"), &[])),
        raw("random", random_bytes(64 * 1024, 1)),
        raw(
            "get-then-garbage",
            [b"GET /".as_slice(), &random_bytes(4096, 2)].concat(),
        ),
        raw("long-request-line", long_line_request(&t("long"))),
        raw("many-headers", many_headers_request(&t("many"))),
        raw("http2-preface", http2_preface()),
        raw("tls-client-hello", tls_client_hello()),
        Case::new("slowloris")
            .dribble(Piece::raw(get(&t("slow"), &["User-Agent: slow/1"])), 4)
            .pause(50)
            .write(vec![Piece::raw(get(&t("slowafter"), &[]))])
            .end_shutdown(),
        Case::new("split-head")
            .split(Piece::raw(get(&t("split"), &["Accept: */*"])), &[5, 20, 30])
            .write(vec![Piece::raw(get(&t("splitafter"), &[]))])
            .end_shutdown(),
    ];
    for (name, te) in [
        ("clte", "Transfer-Encoding: chunked"),
        ("cltelist", "Transfer-Encoding: chunked, identity"),
        ("cltespace", "Transfer-Encoding:  chunked"),
        ("cltetab", "Transfer-Encoding:\tchunked"),
    ] {
        let (head, rest) = cl_te(&t(name), te, &get(&t(&format!("{name}inner")), &[]));
        cases.push(raw(name, [head, rest].concat()));
    }
    for name in ["cl-twice", "cl-list", "cl-junk"] {
        let tag = name.replace('-', "");
        let inner = get(&t(&format!("{tag}inner")), &[]);
        let head = ambiguous_length(name, &t(&tag), inner.len());
        cases.push(raw(name, [head, inner].concat()));
    }
    for (name, lines) in server_traceparent_cases() {
        let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
        cases.push(raw(
            &format!("tp-{name}"),
            [
                get(&t(&format!("tp{name}")), &lines),
                get(&t(&format!("tp{name}after")), &[]),
            ]
            .concat(),
        ));
    }
    let bad_tp = format!("traceparent: {}", invalid_traceparents()[0].1);
    cases.push(raw(
        "pipelined-mixed",
        [
            get(&t("pipea"), &[]),
            get(&t("pipeb"), &[&bad_tp]),
            post(&t("pipec"), &["Content-Length: 100"], &random_bytes(100, 4)),
            get(&t("piped"), &[]),
        ]
        .concat(),
    ));
    cases.push(raw("control-end", get(&t("end"), &[])));
    cases
}

/// (tag, traceparent header lines) of the traceparent cases sent to servers.
fn server_traceparent_cases() -> Vec<(String, Vec<String>)> {
    let valid = format!("00-{TRACE}-{PARENT}-01");
    let mut out: Vec<(String, Vec<String>)> = invalid_traceparents()
        .into_iter()
        .chain(zero_traceparents())
        .map(|(name, v)| (name.to_string(), vec![format!("traceparent: {v}")]))
        .collect();
    out.push(("valid".into(), vec![format!("traceparent: {valid}")]));
    out.push((
        "twice".into(),
        vec![
            format!("traceparent: {valid}"),
            format!("traceparent: {valid}"),
        ],
    ));
    out
}

/// An answer as compared between runs: the `Date` header (it changes) removed.
fn normalized(answer: &[u8]) -> String {
    String::from_utf8_lossy(answer)
        .split("\r\n")
        .filter(|l| !l.starts_with("Date: "))
        .collect::<Vec<_>>()
        .join("\r\n")
}

fn describe(r: &CaseResult) -> String {
    let text = normalized(&r.received);
    let cut: String = text.chars().take(300).collect();
    format!(
        "statuses {:?}, error {:?}, reset {:?}, answer {cut:?}",
        r.statuses, r.error, r.reset
    )
}

/// The server span of the request tagged `tag` (its `url.query` is the tag: query values are
/// redacted, keys are not).
fn server_span<'a>(spans: &'a Spans, pid: u32, tag: &str) -> Option<&'a ReceivedSpan> {
    spans.0.iter().find(|s| {
        s.kind == SpanKind::Server && s.pid() == Some(pid) && s.attr_str("url.query") == Some(tag)
    })
}

#[test]
fn traced_servers_answer_hostile_requests_as_without_the_agent() {
    let _serial = require_root();
    let py = PyServer::start();
    let nginx = NginxServer::start();
    let servers: [(&str, u16, u32, &str); 2] = [
        ("python", py.port(), py.pid(), "/hello"),
        ("nginx", nginx.port(), nginx.pid(), "/hello.txt"),
    ];
    let plans: Vec<Vec<Case>> = servers.iter().map(|s| server_cases(s.3)).collect();
    // Without the agent first: what each server answers.
    let baseline: Vec<Vec<CaseResult>> = servers
        .iter()
        .zip(&plans)
        .map(|(s, plan)| HostileClient::new(s.1, plan).run())
        .collect();
    let collector = Collector::start();
    let mut agent = Agent::builder()
        .pid(py.pid())
        .pid(nginx.pid())
        .arg("--verbose")
        .start(&collector);
    let traced: Vec<Vec<CaseResult>> = servers
        .iter()
        .zip(&plans)
        .map(|(s, plan)| HostileClient::new(s.1, plan).run())
        .collect();
    agent.stop();
    let counters = agent.summary_counters();
    let spans = collector.settle();
    let mut failures = Failures::default();
    let mut text = String::new();
    let mut garbage_without_span = 0;

    for (i, (name, _, pid, _)) in servers.iter().enumerate() {
        for ((case, before), after) in plans[i].iter().zip(&baseline[i]).zip(&traced[i]) {
            let of_connection: Vec<&ReceivedSpan> = spans
                .0
                .iter()
                .filter(|s| {
                    s.pid() == Some(*pid)
                        && s.attr_i64("client.port") == Some(i64::from(after.local_port))
                })
                .collect();
            let traced_spans: Vec<String> = of_connection
                .iter()
                .map(|s| {
                    format!(
                        "{} {}",
                        s.name,
                        s.attr_i64("http.response.status_code").unwrap_or(0)
                    )
                })
                .collect();
            text.push_str(&format!(
                "  {name:<6} {:<18} port {:>5} answers {:?} error {:?} reset {:?} spans {traced_spans:?}\n",
                case.name, after.local_port, after.statuses, after.error, after.reset
            ));
            // Exactly as without the agent. (Whether a server's reset shows on the client's
            // last write or only on its read is a race either way: not compared.)
            failures.check(
                before.statuses == after.statuses
                    && normalized(&before.received) == normalized(&after.received)
                    && before.error == after.error,
                || {
                    format!(
                        "{name}, case {}: answered differently with the agent\n  without: {}\n  with:    {}",
                        case.name,
                        describe(before),
                        describe(after)
                    )
                },
            );
            // Garbage never passes for a successful exchange; without a span it is counted.
            if [
                "random",
                "get-then-garbage",
                "http2-preface",
                "tls-client-hello",
            ]
            .contains(&case.name.as_str())
            {
                garbage_without_span += u64::from(traced_spans.is_empty());
                for s in &of_connection {
                    failures.check(
                        s.attr_i64("http.response.status_code")
                            .is_some_and(|c| c >= 400),
                        || {
                            format!(
                                "{name}, case {}: a span for garbage that is not an error: {}",
                                case.name,
                                s.summary()
                            )
                        },
                    );
                }
            }
        }
        // Good requests, also those after bad ones on the same connection, are traced.
        let mut tags: Vec<String> = [
            "first",
            "slow",
            "slowafter",
            "split",
            "splitafter",
            "pipea",
            "pipeb",
            "pipec",
            "piped",
            "end",
        ]
        .map(String::from)
        .to_vec();
        for (tag, _) in server_traceparent_cases() {
            tags.push(format!("tp{tag}"));
            tags.push(format!("tp{tag}after"));
        }
        for tag in &tags {
            let span = server_span(&spans, *pid, tag);
            failures.check(span.is_some(), || {
                format!("{name}: no server span for the request tagged {tag:?}")
            });
        }
        // Incoming contexts: a valid one is continued, an invalid one never.
        for (tag, _) in server_traceparent_cases() {
            let Some(s) = server_span(&spans, *pid, &format!("tp{tag}")) else {
                continue;
            };
            match tag.as_str() {
                "valid" => failures.check(
                    s.trace_id == TRACE && s.parent_span_id.as_deref() == Some(PARENT),
                    || {
                        format!(
                            "{name}: a valid traceparent must be continued: {}",
                            s.summary()
                        )
                    },
                ),
                "twice" => {}
                _ => failures.check(s.trace_id != TRACE && s.parent_span_id.is_none(), || {
                    format!(
                        "{name}: the invalid traceparent {tag:?} must not be continued: {}",
                        s.summary()
                    )
                }),
            }
        }
    }
    for s in &spans.0 {
        if let Some(p) = id_problem(s) {
            failures.check(false, || p);
        }
    }
    eprintln!(
        "[e2e] hostile input to traced servers:\n{text}counters: {:?}",
        interesting(&counters)
    );
    // What the agent dropped, it counted.
    let n = servers.len() as u64;
    // The tp cases but the valid one, and pipelined-mixed's /pipeb.
    let bad_contexts = server_traceparent_cases()
        .iter()
        .filter(|(tag, _)| tag != "valid")
        .count() as u64
        + 1;
    for (name, want, why) in [
        ("spans_invalid_ids_fixed", 0, "any count is a bug"),
        ("kernel_context_ids_invalid", 0, "any count is a bug"),
        (
            "traceparent_invalid",
            n * bad_contexts,
            "the requests with an invalid or repeated traceparent",
        ),
        ("traceparent_honoured", n, "the request with a valid one"),
        (
            "http_headers_truncated",
            n * 2,
            "the 1 MiB request line and the 100k headers",
        ),
    ] {
        let got = counter(&counters, name);
        failures.check(got == want, || {
            format!("{name} = {got}, expected {want} ({why})")
        });
    }
    // A TLS ClientHello to a plaintext server is encrypted, and counted so (once its plaintext
    // did not come, or at the agent's exit).
    let unexplained = counter(&counters, "connections_unrecognized")
        + counter(&counters, "connections_not_http")
        + counter(&counters, "http_heads_invalid")
        + counter(&counters, "connections_encrypted");
    failures.check(unexplained >= garbage_without_span, || {
        format!(
            "{garbage_without_span} garbage connections left no span, but only {unexplained} were counted (connections_unrecognized + connections_not_http + http_heads_invalid + connections_encrypted)"
        )
    });
    failures.finish("hostile input to traced servers");
}
