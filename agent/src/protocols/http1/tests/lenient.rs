//! Heads httparse refuses but real servers answer: read leniently, framing never guessed, and
//! every byte anywhere in a head either traced or counted.

use proptest::prelude::*;

use super::fixtures::*;
use super::*;
use crate::protocols::http1::{head::MAX_HEADERS, lenient};

/// Requests nginx 1.22, Node 20 (llhttp, strict or `insecureHTTPParser`) or Python 3.11
/// `http.server` answered when sent raw (which ones, measured, in the comment). Each is
/// traced, and the connection stays in step for the next request.
#[test]
fn heads_real_servers_answer_are_traced() {
    let many_headers: Vec<u8> = [
        &b"GET /v HTTP/1.1\r\nHost: x\r\n"[..],
        &(0..MAX_HEADERS + 10)
            .flat_map(|i| format!("X-{i}: v\r\n").into_bytes())
            .collect::<Vec<u8>>(),
        b"\r\n",
    ]
    .concat();
    let cases: [(&str, &[u8]); 17] = [
        // nginx, llhttp lenient, Python.
        (
            "0x01 in a value",
            b"GET /v HTTP/1.1\r\nHost: x\r\nX-T: a\x01b\r\n\r\n",
        ),
        (
            "ESC in a value",
            b"GET /v HTTP/1.1\r\nX-T: \x1b[31mred\x1b[0m\r\n\r\n",
        ),
        (
            "DEL in a value",
            b"GET /v HTTP/1.1\r\nHost: x\r\nX-T: a\x7f\r\n\r\n",
        ),
        // llhttp lenient, Python.
        (
            "NUL in a value",
            b"GET /v HTTP/1.1\r\nHost: x\r\nX-T: a\x00b\r\n\r\n",
        ),
        // Python.
        (
            "bare CR in a value",
            b"GET /v HTTP/1.1\r\nHost: x\r\nX-T: a\rb\r\n\r\n",
        ),
        // llhttp lenient, Python.
        (
            "folded line",
            b"GET /v HTTP/1.1\r\nX-T: a\r\n b\r\nHost: x\r\n\r\n",
        ),
        (
            "space before the first field",
            b"GET /v HTTP/1.1\r\n Host: x\r\n\r\n",
        ),
        // nginx, Python.
        (
            "line without colon",
            b"GET /v HTTP/1.1\r\nHost: x\r\nFoo\r\n\r\n",
        ),
        (
            "name not a token",
            b"GET /v HTTP/1.1\r\nHost: x\r\nX(T)@: v\r\n\r\n",
        ),
        (
            "obs-text in a name",
            b"GET /v HTTP/1.1\r\nX-\xe9: v\r\n\r\n",
        ),
        (
            "obs-text in the target",
            b"GET /v\xff HTTP/1.1\r\nHost: x\r\n\r\n",
        ),
        // Python.
        (
            "space before colon",
            b"GET /v HTTP/1.1\r\nHost: x\r\nFoo : bar\r\n\r\n",
        ),
        (
            "control byte in the target",
            b"GET /v\x01 HTTP/1.1\r\nHost: x\r\n\r\n",
        ),
        (
            "tabs in the request line",
            b"GET\t/v\tHTTP/1.1\r\nHost: x\r\n\r\n",
        ),
        // All four.
        (
            "runs of spaces in the request line",
            b"GET  /v  HTTP/1.1\r\n\r\n",
        ),
        // nginx, llhttp lenient, Python.
        ("HTTP/1.2", b"GET /v HTTP/1.2\r\nHost: x\r\n\r\n"),
        // More fields than httparse has slots for (all four).
        ("many headers", &many_headers),
    ];
    for (what, request) in cases {
        for role in [Role::Server, Role::Client] {
            let (rq, rs) = dirs(role);
            let mut c = Conn::new(Some(role));
            c.send(rq, 1, request);
            c.send(rs, 2, NGINX_204);
            c.send(rq, 3, CURL_GET_A);
            c.send(rs, 4, NGINX_200);
            let got: Vec<_> = c.out.iter().map(|e| (e.status, e.end)).collect();
            assert_eq!(
                got,
                [(Some(204), Complete), (Some(200), Complete)],
                "{what} ({role:?})"
            );
            let e = &c.out[0];
            assert!(e.request.target.starts_with("/v"), "{what}: {e:?}");
            assert_eq!(e.request.method, "GET", "{what}");
            assert_eq!(c.count(|r| *r != FeedReport::default()), 0, "{what}");
        }
    }
}

#[test]
fn lenient_heads_keep_what_they_say() {
    let mut c = Conn::new(Some(Role::Server));
    c.send(
        IN,
        1,
        b"POST  /v\x01w?q=1  HTTP/1.0\r\nHost: h:81\r\nX: \x1b\r\nUser-Agent: ua\x7f\r\n\
traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n\
Content-Length: 3\r\n\r\nabc",
    );
    c.send(
        OUT,
        2,
        b"HTTP/1.1 201  Created \x01\r\nContent-Length: 2\r\nX: \x00\r\n\r\nok",
    );
    let e = &c.out[0];
    assert_eq!(
        summary(e),
        s("POST", "/v\u{1}w?q=1", Some(201), 3, 2, Complete)
    );
    assert_eq!(e.request.version_minor, 0);
    assert_eq!(e.request.host.as_deref(), Some("h:81"));
    assert_eq!(e.request.user_agent.as_deref(), Some("ua\u{7f}"));
    assert_eq!(
        e.request.traceparent.as_deref(),
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    );
}

/// A control byte elsewhere in a head leaves its framing exact; framing that servers may
/// read differently is not guessed: the exchange stays, the next request is found again.
#[test]
fn lenient_heads_never_misframe() {
    let mut c = Conn::new(Some(Role::Server));
    c.send(
        IN,
        1,
        b"POST /p HTTP/1.1\r\nX: a\x01b\r\nContent-Length: 5\r\n\r\nhelloGET /a HTTP/1.1\r\n\r\n",
    );
    c.send(OUT, 2, &[NGINX_201, NGINX_204].concat());
    let got: Vec<_> = c.out.iter().map(summary).collect();
    assert_eq!(
        got,
        [
            s("POST", "/p", Some(201), 5, 9, Complete),
            s("GET", "/a", Some(204), 0, 0, Complete)
        ]
    );

    for (what, head) in [
        ("space before colon", &b"Content-Length : 5\r\n"[..]),
        (
            "after a line Python stops at",
            b"Foo\r\nContent-Length: 5\r\n",
        ),
        (
            "after a name nginx skips",
            b"X T: v\r\nContent-Length: 5\r\n",
        ),
        ("a folded length", b"Content-Length: 5\r\n 6\r\n"),
        ("a control byte in the length", b"Content-Length: 5\x01\r\n"),
        ("a form feed after the length", b"Content-Length: 5\x0c\r\n"),
        (
            "a control byte in the coding",
            b"Transfer-Encoding: chunked\x01\r\n",
        ),
        (
            "a folded coding",
            b"Transfer-Encoding: gzip\r\n\tchunked\r\n",
        ),
    ] {
        let mut c = Conn::new(Some(Role::Server));
        let request = [&b"POST /p HTTP/1.1\r\nHost: x\r\n"[..], head, b"\r\nhello"].concat();
        c.send(IN, 1, &request);
        c.send(OUT, 2, NGINX_204);
        c.send(IN, 3, CURL_GET_A);
        c.send(OUT, 4, NGINX_200);
        let got: Vec<_> = c.out.iter().map(|e| (e.status, e.end)).collect();
        assert_eq!(
            got,
            [(Some(204), Resynced), (Some(200), Complete)],
            "{what}"
        );
        assert_eq!(c.count(|r| r.resynced), 1, "{what}");
    }
}

/// Where a head cannot be read at all, the count says so.
#[test]
fn unreadable_heads_are_counted() {
    for (what, head) in [
        ("HTTP/0.9", &b"GET /v\r\n\r\n"[..]),
        ("LF in the target", b"GET /v\nw HTTP/1.1\r\n\r\n"),
        ("control byte in the method", b"GE\x01 /v HTTP/1.1\r\n\r\n"),
        ("HTTP/2", b"GET /v HTTP/2.0\r\n\r\n"),
    ] {
        // On a connection known to be HTTP, and as its first message.
        let mut c = Conn::new(Some(Role::Server));
        c.send(IN, 1, CURL_GET_A);
        c.send(OUT, 2, NGINX_204);
        c.send(IN, 3, head);
        c.send(
            OUT,
            4,
            b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n",
        );
        assert_eq!(c.out.len(), 1, "{what}");
        assert_eq!(
            c.reports.iter().map(|r| r.invalid_heads).sum::<u32>(),
            1,
            "{what}"
        );

        let mut c = Conn::new(Some(Role::Server));
        c.send(IN, 1, head);
        assert_eq!(c.s.state(), StreamState::Detecting);
        c.send(
            OUT,
            2,
            b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n",
        );
        assert_eq!(
            c.reports.iter().map(|r| r.invalid_heads).sum::<u32>(),
            1,
            "{what}"
        );
    }
}

/// Where one byte goes in [`odd_request`].
#[derive(Clone, Copy, Debug)]
enum Place {
    Target,
    Name,
    Value,
}

/// A POST with a body and a request after it in the same write, with `bytes` in its
/// target, in a header name or in a header value (before the framing field: the worst
/// place).
fn odd_request(place: Place, bytes: &[u8]) -> Vec<u8> {
    let none: &[u8] = b"";
    let (target, name, value) = match place {
        Place::Target => (bytes, none, none),
        Place::Name => (none, bytes, none),
        Place::Value => (none, none, bytes),
    };
    [
        &b"POST /t"[..],
        target,
        b"u HTTP/1.1\r\nHost: x\r\nX-N",
        name,
        b"m: v",
        value,
        b"w\r\nContent-Length: 5\r\n\r\nhelloGET /next HTTP/1.1\r\n\r\n",
    ]
    .concat()
}

/// Feeds [`odd_request`] and two answers; returns the exchanges and whether a reason for
/// a missing one was counted.
fn run_odd(role: Role, request: &[u8]) -> (Vec<HttpExchange>, bool) {
    let (rq, rs) = dirs(role);
    let mut c = Conn::new(Some(role));
    c.send(rq, 1, request);
    c.send(rs, 2, &[NGINX_201, NGINX_204].concat());
    c.close(3);
    let counted = c
        .reports
        .iter()
        .any(|r| r.invalid_heads > 0 || r.resynced || r.headers_truncated || r.became_not_http)
        || c.s.state() == StreamState::Detecting;
    (c.out, counted)
}

/// Bytes that cannot change how any server frames the request, where they are.
fn harmless(place: Place, b: u8) -> bool {
    match place {
        Place::Target => b != b'\n',
        Place::Value => b != b'\n' && b != b'\r',
        Place::Name => b == b':' || lenient::is_tchar(b),
    }
}

fn assert_exact(out: &[HttpExchange], what: &str) {
    let got: Vec<_> = out
        .iter()
        .map(|e| {
            (
                e.request.method.as_str(),
                e.status,
                e.request_body_size,
                e.end,
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("POST", Some(201), 5, Complete),
            ("GET", Some(204), 0, Complete)
        ],
        "{what}"
    );
}

/// Every byte 0x00–0xff in a request target, a header name or a header value: the request
/// is traced with exact framing, or (where servers may disagree on it) a reason is counted.
#[test]
fn every_byte_anywhere_is_traced_or_counted() {
    for place in [Place::Target, Place::Name, Place::Value] {
        for b in 0..=255u8 {
            for role in [Role::Server, Role::Client] {
                let what = format!("{b:#04x} in the {place:?} ({role:?})");
                let (out, counted) = run_odd(role, &odd_request(place, &[b]));
                if harmless(place, b) {
                    assert_exact(&out, &what);
                    assert!(!counted, "{what}");
                } else {
                    assert!(counted, "{what}: nothing counted, {out:#?}");
                }
            }
        }
    }
}

proptest! {
    /// Any bytes in a target, a header name or value: traced (exactly, when every byte is
    /// harmless where it is), or a reason is counted. Never silently dropped.
    #[test]
    fn any_bytes_anywhere_are_traced_or_counted(
        place in prop_oneof![Just(Place::Target), Just(Place::Name), Just(Place::Value)],
        bytes in prop::collection::vec(any::<u8>(), 0..12),
        server in any::<bool>(),
    ) {
        let role = if server { Role::Server } else { Role::Client };
        let (out, counted) = run_odd(role, &odd_request(place, &bytes));
        if bytes.iter().all(|&b| harmless(place, b)) {
            assert_exact(&out, &format!("{bytes:?} in the {place:?}"));
        }
        prop_assert!(!out.is_empty() || counted, "{:?} in the {:?}", bytes, place);
    }
}
