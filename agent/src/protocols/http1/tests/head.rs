//! Message heads: the fields we keep, and heads cut by the capture or split over segments.

use super::fixtures::*;
use super::*;
use crate::protocols::http1::{head::MAX_HEADERS, stream::MAX_HEAD_BYTES};

#[test]
fn trace_context_and_identity_headers() {
    let mut c = Conn::new(Some(Role::Server));
    c.send(IN, 1, TRACED_GET);
    c.send(OUT, 2, PYTHON_200);
    let r = &c.out[0].request;
    assert_eq!(r.method, "GET");
    assert_eq!(r.target, "/orders/17?expand=items");
    assert_eq!(r.host.as_deref(), Some("orders.internal:8000"));
    assert_eq!(r.user_agent.as_deref(), Some("python-requests/2.31.0"));
    assert_eq!(
        r.traceparent.as_deref(),
        Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    );
    assert_eq!(
        r.tracestate.as_deref(),
        Some("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7")
    );
    assert_eq!(r.content_length, None);
    assert_eq!(c.out[0].response_body_size, 6);
}

#[test]
fn header_names_in_odd_case() {
    let mut c = Conn::new(Some(Role::Server));
    c.send(IN, 1, ODD_CASE_POST);
    c.send(OUT, 2, ODD_CASE_CHUNKED);
    let e = &c.out[0];
    assert_eq!(e.request.host.as_deref(), Some("Example.COM"));
    assert_eq!(e.request.user_agent.as_deref(), Some("OddClient/1.0"));
    assert_eq!(
        e.request.traceparent.as_deref(),
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    );
    assert_eq!(e.request.content_length, Some(5));
    assert_eq!(summary(e), s("POST", "/Submit", Some(200), 5, 3, Complete));
}

#[test]
fn absolute_form_target_kept_raw() {
    let req = b"GET http://example.com:8080/a%20b?q=1 HTTP/1.1\r\nHost: example.com:8080\r\nProxy-Connection: Keep-Alive\r\n\r\n";
    let mut c = Conn::new(Some(Role::Server));
    c.send(IN, 1, req);
    c.send(OUT, 2, NGINX_204);
    assert_eq!(c.out[0].request.target, "http://example.com:8080/a%20b?q=1");
}

#[test]
fn repeated_trace_context_fields_are_joined() {
    let mut c = Conn::new(Some(Role::Server));
    c.send(
        IN,
        1,
        b"GET / HTTP/1.1\r\ntraceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n\
tracestate: a=1\r\nTraceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n\
tracestate: b=2\r\n\r\n",
    );
    c.send(OUT, 2, NGINX_204);
    let r = &c.out[0].request;
    assert_eq!(
        r.traceparent.as_deref(),
        Some(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01,\
00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        )
    );
    assert_eq!(r.tracestate.as_deref(), Some("a=1,b=2"));
}

// ---- heads cut by the capture or split over segments ----

#[test]
fn head_cut_by_capture_is_dropped_and_resynced() {
    for role in [Role::Server, Role::Client] {
        let (rq, rs) = dirs(role);
        let mut c = Conn::new(Some(role));
        c.send(rq, 1, CURL_GET_ROOT);
        c.send(rs, 2, NGINX_200);
        // A request whose head the 64-byte capture cuts.
        let r = c.feed(partial(rq, 3, TRACED_GET.len() as u64, &TRACED_GET[..64]));
        assert!(r.headers_truncated);
        c.send(rs, 4, PYTHON_200); // its response: matched to the dropped request
        c.send(rq, 5, CURL_GET_B);
        c.send(rs, 6, NGINX_204);
        let got: Vec<_> = c.out.iter().map(summary).collect();
        assert_eq!(
            got,
            [
                s("GET", "/", Some(200), 0, 45, Complete),
                s("GET", "/b?x=1&y=2", Some(204), 0, 0, Complete)
            ],
            "{role:?}"
        );
    }
    // A response head cut by the capture keeps the exchange; its end is inferred.
    let mut c = Conn::new(Some(Role::Server));
    c.send(IN, 1, CURL_GET_ROOT);
    let r = c.feed(partial(OUT, 2, 4000, &NGINX_200[..64]));
    assert!(r.headers_truncated);
    c.feed(partial(OUT, 3, 4000, &[b'x'; 64]));
    c.send(IN, 4, CURL_GET_A);
    c.send(OUT, 5, NGINX_204);
    let got: Vec<_> = c
        .out
        .iter()
        .map(|e| (e.status, e.end, e.response_end_ns))
        .collect();
    assert_eq!(
        got,
        [
            (Some(200), Resynced, Some(3)),
            (Some(204), Complete, Some(5))
        ]
    );
}

#[test]
fn oversized_head_is_truncated() {
    // Too many headers for our slots, and too many bytes for the head buffer.
    for (count, width) in [(3000, 20), (40, 2000)] {
        oversized_head_case(count, width);
    }
}

fn oversized_head_case(count: usize, width: usize) {
    let mut head = b"GET /big HTTP/1.1\r\nHost: h\r\n".to_vec();
    for i in 0..count {
        head.extend_from_slice(format!("X-Filler-{i}: {}\r\n", "v".repeat(width)).as_bytes());
    }
    head.extend_from_slice(b"\r\n");
    assert!(head.len() > MAX_HEAD_BYTES || count > MAX_HEADERS);
    let mut c = Conn::new(Some(Role::Server));
    for (i, piece) in head.chunks(4096).enumerate() {
        c.send(IN, i as u64, piece);
    }
    assert_eq!(c.count(|r| r.headers_truncated), 1);
    c.send(
        OUT,
        100,
        b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\n\r\n",
    );
    c.send(IN, 101, CURL_GET_A);
    c.send(OUT, 102, NGINX_200);
    let got: Vec<_> = c.out.iter().map(summary).collect();
    assert_eq!(got, [s("GET", "/a", Some(200), 0, 45, Complete)]);
}

#[test]
fn split_head_costs_no_allocation_when_it_fits() {
    // Parsing straight from the segment leaves the head buffer untouched.
    let mut c = Conn::new(Some(Role::Server));
    c.send(IN, 1, CURL_GET_ROOT);
    c.send(OUT, 2, NGINX_200);
    assert!(c.s.readers.iter().all(|r| r.head.capacity() == 0));
}

#[test]
fn heads_and_bodies_dribbled_byte_by_byte() {
    for role in [Role::Server, Role::Client] {
        let (rq, rs) = dirs(role);
        let mut c = Conn::new(Some(role));
        let mut ts = 0;
        for msg in [ODD_CASE_POST] {
            for b in msg.chunks(1) {
                ts += 1;
                c.send(rq, ts, b);
            }
        }
        let req_last = ts;
        for msg in [CONTINUE_100, NODE_CHUNKED_1, NODE_CHUNKED_2] {
            for b in msg.chunks(1) {
                ts += 1;
                c.send(rs, ts, b);
            }
        }
        assert_eq!(c.out.len(), 1);
        let e = &c.out[0];
        assert_eq!(summary(e), s("POST", "/Submit", Some(200), 5, 11, Complete));
        assert_eq!((e.request_start_ns, e.request_end_ns), (1, req_last));
        assert_eq!(
            e.response_start_ns,
            Some(req_last + CONTINUE_100.len() as u64 + 1)
        );
        assert_eq!(e.response_end_ns, Some(ts));
        assert_eq!(e.request.traceparent.as_deref().map(str::len), Some(55));
    }
}

#[test]
fn head_split_then_capture_cut_is_truncated() {
    let mut c = Conn::new(Some(Role::Server));
    c.send(IN, 1, &TRACED_GET[..40]);
    let rest = &TRACED_GET[40..];
    let r = c.feed(partial(IN, 2, rest.len() as u64, &rest[..20]));
    assert!(r.headers_truncated);
    c.send(OUT, 3, NGINX_204);
    c.send(IN, 4, CURL_GET_A);
    c.send(OUT, 5, NGINX_200);
    let got: Vec<_> = c.out.iter().map(summary).collect();
    assert_eq!(got, [s("GET", "/a", Some(200), 0, 45, Complete)]);
}
