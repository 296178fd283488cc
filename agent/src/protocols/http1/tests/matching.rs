//! Requests paired with responses: keep-alive, pipelining, interim responses, connections closed
//! mid-exchange, ends inferred from the other direction, and the bounded queue.

use super::fixtures::*;
use super::*;
use crate::protocols::http1::matching::MAX_PENDING;

#[test]
fn keep_alive_three_gets_both_roles() {
    for role in [Role::Server, Role::Client] {
        let (rq, rs) = dirs(role);
        let mut c = Conn::new(Some(role));
        for (i, req) in [CURL_GET_ROOT, CURL_GET_A, CURL_GET_B].iter().enumerate() {
            let t = 1000 * (i as u64 + 1);
            c.send(rq, t, req);
            assert_eq!(c.out.len(), i, "no exchange before the response");
            c.send(rs, t + 500, NGINX_200);
            assert_eq!(c.out.len(), i + 1);
        }
        assert_eq!(c.s.state(), StreamState::Http);
        assert_eq!(c.s.role(), Some(role));
        let targets: Vec<_> = c.out.iter().map(|e| e.request.target.as_str()).collect();
        assert_eq!(targets, ["/", "/a", "/b?x=1&y=2"]);
        for (i, e) in c.out.iter().enumerate() {
            let t = 1000 * (i as u64 + 1);
            assert_eq!(e.role, role);
            assert_eq!(e.status, Some(200));
            assert_eq!(e.request.method, "GET");
            assert_eq!(e.request.version_minor, 1);
            assert_eq!(e.request.host.as_deref(), Some("localhost:8080"));
            assert_eq!(e.request.user_agent.as_deref(), Some("curl/7.88.1"));
            assert_eq!(e.request_start_ns, t);
            assert_eq!(e.request_end_ns, t);
            assert_eq!(e.response_start_ns, Some(t + 500));
            assert_eq!(e.response_end_ns, Some(t + 500));
            assert_eq!(e.request_body_size, 0);
            assert_eq!(e.response_body_size, 45);
            assert_eq!(e.tid, 100 + t as u32);
            assert_eq!(e.end, Complete);
        }
        c.close(9999);
        assert_eq!(c.out.len(), 3, "nothing pending, nothing emitted at close");
        assert_eq!(c.count(|r| *r != FeedReport::default()), 0);
    }
}

#[test]
fn pipelined_requests_in_one_segment() {
    let mut reqs = Vec::new();
    reqs.extend_from_slice(CURL_GET_ROOT);
    reqs.extend_from_slice(CURL_HEAD);
    reqs.extend_from_slice(CURL_GET_B);
    let mut resps = Vec::new();
    resps.extend_from_slice(NGINX_200);
    resps.extend_from_slice(NGINX_HEAD_200);
    resps.extend_from_slice(NGINX_304);

    let expected = vec![
        s("GET", "/", Some(200), 0, 45, Complete),
        s("HEAD", "/", Some(200), 0, 0, Complete),
        s("GET", "/b?x=1&y=2", Some(304), 0, 0, Complete),
    ];

    // Responses in one segment.
    let mut c = Conn::new(Some(Role::Server));
    c.send(IN, 10, &reqs);
    c.send(OUT, 20, &resps);
    assert_eq!(c.out.iter().map(summary).collect::<Vec<_>>(), expected);
    assert!(
        c.out
            .iter()
            .all(|e| e.request_start_ns == 10 && e.request_end_ns == 10)
    );
    assert!(c.out.iter().all(|e| e.response_end_ns == Some(20)));

    // Responses in three segments.
    let mut c = Conn::new(Some(Role::Server));
    c.send(IN, 10, &reqs);
    c.send(OUT, 20, NGINX_200);
    assert_eq!(c.out.len(), 1);
    c.send(OUT, 30, NGINX_HEAD_200);
    assert_eq!(c.out.len(), 2);
    c.send(OUT, 40, NGINX_304);
    assert_eq!(c.out.iter().map(summary).collect::<Vec<_>>(), expected);
    let ends: Vec<_> = c.out.iter().map(|e| e.response_end_ns).collect();
    assert_eq!(ends, [Some(20), Some(30), Some(40)]);

    // Client side: the same bytes the other way round, requests sent before any response.
    let mut c = Conn::new(Some(Role::Client));
    c.send(OUT, 10, CURL_GET_ROOT);
    c.send(OUT, 11, CURL_HEAD);
    c.send(OUT, 12, CURL_GET_B);
    c.send(IN, 20, &resps);
    assert_eq!(c.out.iter().map(summary).collect::<Vec<_>>(), expected);
    let starts: Vec<_> = c.out.iter().map(|e| e.request_start_ns).collect();
    assert_eq!(starts, [10, 11, 12]);
}

#[test]
fn continue_100_then_final() {
    let body = [b'q'; 2000];
    for role in [Role::Server, Role::Client] {
        let (rq, rs) = dirs(role);
        let mut c = Conn::new(Some(role));
        c.send(rq, 1, CURL_POST_EXPECT);
        c.send(rs, 2, CONTINUE_100);
        assert!(c.out.is_empty());
        c.send(rq, 3, &body[..1000]);
        c.send(rq, 4, &body[1000..]);
        c.send(rs, 5, NGINX_201);
        assert_eq!(c.out.len(), 1);
        let e = &c.out[0];
        assert_eq!(
            summary(e),
            s("POST", "/upload", Some(201), 2000, 9, Complete)
        );
        assert_eq!(e.request_end_ns, 4);
        assert_eq!(
            e.response_start_ns,
            Some(5),
            "the final response, not the 100"
        );
        // 100 and final response in one segment.
        let mut both = CONTINUE_100.to_vec();
        both.extend_from_slice(NGINX_204);
        c.send(rq, 6, CURL_POST_HEAD);
        c.send(rq, 7, CURL_POST_BODY);
        c.send(rs, 8, &both);
        assert_eq!(
            summary(&c.out[1]),
            s("POST", "/api/items", Some(204), 26, 0, Complete)
        );
    }
}

#[test]
fn close_mid_request_and_mid_response() {
    // Mid-request: head and part of the body, no response.
    let mut c = Conn::new(Some(Role::Server));
    c.send(IN, 1, CURL_POST_EXPECT);
    c.send(IN, 2, &[b'q'; 300]);
    c.close(3);
    assert_eq!(c.out.len(), 1);
    let e = &c.out[0];
    assert_eq!(
        summary(e),
        s("POST", "/upload", None, 300, 0, ConnectionClosed)
    );
    assert_eq!(
        (e.request_end_ns, e.response_start_ns, e.response_end_ns),
        (2, None, None)
    );

    // Mid-response: status seen, body cut short.
    let mut c = Conn::new(Some(Role::Client));
    c.send(OUT, 1, CURL_GET_ROOT);
    c.send(IN, 2, &NGINX_200[..NGINX_200.len() - 20]);
    c.close(3);
    let e = &c.out[0];
    assert_eq!(
        summary(e),
        s("GET", "/", Some(200), 0, 25, ConnectionClosed)
    );
    assert_eq!((e.response_start_ns, e.response_end_ns), (Some(2), Some(2)));

    // Mid-response head: no status yet.
    let mut c = Conn::new(Some(Role::Client));
    c.send(OUT, 1, CURL_GET_ROOT);
    c.send(IN, 2, &NGINX_200[..30]);
    c.close(3);
    assert_eq!(
        summary(&c.out[0]),
        s("GET", "/", None, 0, 0, ConnectionClosed)
    );

    // Pipelined: one answered, two not.
    let mut c = Conn::new(Some(Role::Client));
    c.send(OUT, 1, CURL_GET_ROOT);
    c.send(OUT, 2, CURL_GET_A);
    c.send(OUT, 3, CURL_GET_B);
    c.send(IN, 4, NGINX_204);
    c.close(5);
    let got: Vec<_> = c
        .out
        .iter()
        .map(|e| (e.request.target.clone(), e.end))
        .collect();
    assert_eq!(
        got,
        [
            ("/".to_owned(), Complete),
            ("/a".to_owned(), ConnectionClosed),
            ("/b?x=1&y=2".to_owned(), ConnectionClosed)
        ]
    );
    // Closing again or feeding after close does nothing.
    c.close(6);
    c.send(OUT, 7, CURL_GET_ROOT);
    assert_eq!(c.out.len(), 3);
}

#[test]
fn request_not_yet_answered_is_not_emitted_early() {
    let mut c = Conn::new(Some(Role::Server));
    c.send(IN, 1, CURL_GET_ROOT);
    c.close(2);
    assert_eq!(
        summary(&c.out[0]),
        s("GET", "/", None, 0, 0, ConnectionClosed)
    );
    let mut c = Conn::new(Some(Role::Server));
    c.close(2);
    assert!(c.out.is_empty(), "nothing pending, nothing emitted");
}

/// A chunked upload whose capture loses the chunk framing: the response proves the request
/// ended at the last request segment before it.
#[test]
fn lost_request_body_ends_when_response_starts() {
    let head = b"POST /upload HTTP/1.1\r\n\
Host: storage:9000\r\n\
User-Agent: Go-http-client/1.1\r\n\
Transfer-Encoding: chunked\r\n\
Accept-Encoding: gzip\r\n\
\r\n";
    for role in [Role::Server, Role::Client] {
        let (rq, rs) = dirs(role);
        let mut c = Conn::new(Some(role));
        c.send(rq, 1, head);
        c.feed(partial(rq, 2, 40_000, b"8000\r\nxxxxxxxxxxxxxxxx"));
        c.feed(partial(rq, 3, 40_000, b"xxxxxxxxxxxxxxxx"));
        let r = c.send(rs, 4, NGINX_201);
        assert!(r.resynced);
        assert_eq!(c.out.len(), 1);
        let e = &c.out[0];
        assert_eq!(
            (e.status, e.end, e.request_end_ns),
            (Some(201), Resynced, 3)
        );
        assert_eq!(e.response_end_ns, Some(4));
        c.send(rq, 5, CURL_GET_A);
        c.send(rs, 6, NGINX_200);
        assert_eq!(
            summary(&c.out[1]),
            s("GET", "/a", Some(200), 0, 45, Complete)
        );
    }
}

/// While lost inside a response, a body segment that happens to start with a status line
/// is not taken for a new response when no other request waits for one.
#[test]
fn status_line_inside_lost_body_is_not_a_response() {
    let mut c = Conn::new(Some(Role::Server));
    c.send(IN, 1, CURL_GET_ROOT);
    c.feed(partial(
        OUT,
        2,
        100_000,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n0123456789abcdef\r\n",
    ));
    // A proxied log file that contains a response.
    c.feed(partial(
        OUT,
        3,
        100_000,
        b"HTTP/1.1 500 Internal Server Error\r\n\r\nlog",
    ));
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

    // With a pipelined request waiting, the status line does start its response.
    let mut c = Conn::new(Some(Role::Server));
    c.send(IN, 1, &[CURL_GET_ROOT, CURL_GET_A].concat());
    c.feed(partial(
        OUT,
        2,
        100_000,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n0123456789abcdef\r\n",
    ));
    let r = c.send(OUT, 3, NGINX_204);
    assert!(r.resynced);
    let got: Vec<_> = c
        .out
        .iter()
        .map(|e| (e.status, e.end, e.response_end_ns))
        .collect();
    assert_eq!(
        got,
        [
            (Some(200), Resynced, Some(2)),
            (Some(204), Complete, Some(3))
        ]
    );
}

/// The server answers before the upload is over (nginx rejecting a too large body) and the
/// client keeps sending until the connection closes.
#[test]
fn early_response_while_request_body_streams() {
    let head = b"POST /upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: 10000000\r\n\r\n";
    let resp = b"HTTP/1.1 413 Request Entity Too Large\r\n\
Server: nginx/1.22.1\r\n\
Date: Mon, 06 May 2024 10:15:10 GMT\r\n\
Content-Type: text/html\r\n\
Content-Length: 0\r\n\
Connection: close\r\n\
\r\n";
    let mut c = Conn::new(Some(Role::Server));
    c.send(IN, 1, head);
    c.feed(partial(IN, 2, 65_536, &[0u8; 64]));
    c.send(OUT, 3, resp);
    c.feed(partial(IN, 4, 65_536, &[0u8; 64]));
    assert!(c.out.is_empty(), "emitted once the request is over");
    c.close(5);
    let e = &c.out[0];
    assert_eq!(
        summary(e),
        s("POST", "/upload", Some(413), 131_072, 0, Complete)
    );
    assert_eq!((e.request_end_ns, e.response_end_ns), (4, Some(3)));
}

#[test]
fn many_unanswered_requests_stay_bounded() {
    let mut c = Conn::new(Some(Role::Client));
    for i in 0..(MAX_PENDING as u64 + 5) {
        c.send(OUT, i, CURL_GET_A);
    }
    assert_eq!(c.s.pending.len(), MAX_PENDING);
    assert_eq!(c.out.len(), 5);
    assert!(c.out.iter().all(|e| e.end == ConnectionClosed));
}
