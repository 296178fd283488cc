//! Body framing: lengths split over segments and beyond the capture, chunked bodies, bodies
//! without content (HEAD, 204, 304), close-delimited responses, hostile lengths.

use super::fixtures::*;
use super::*;

#[test]
fn post_body_split_over_many_segments() {
    let mut c = Conn::new(Some(Role::Server));
    // Head split in three, then the body a few bytes at a time.
    c.send(IN, 1, &CURL_POST_HEAD[..10]);
    c.send(IN, 2, &CURL_POST_HEAD[10..40]);
    c.send(IN, 3, &CURL_POST_HEAD[40..]);
    for (i, piece) in CURL_POST_BODY.chunks(7).enumerate() {
        c.send(IN, 10 + i as u64, piece);
    }
    c.send(OUT, 50, NGINX_201);
    assert_eq!(c.out.len(), 1);
    let e = &c.out[0];
    assert_eq!(e.request.method, "POST");
    assert_eq!(e.request.target, "/api/items");
    assert_eq!(e.request.content_length, Some(26));
    assert!(!e.request.chunked);
    assert_eq!(e.request_body_size, 26);
    assert_eq!(e.request_start_ns, 1);
    assert_eq!(e.tid, 101);
    assert_eq!(
        e.request_end_ns, 13,
        "the fourth body piece holds the last byte"
    );
    assert_eq!(e.status, Some(201));
    assert_eq!(e.response_body_size, 9);
    assert_eq!(e.end, Complete);
}

#[test]
fn a_large_write_starts_its_message_at_its_first_chunk_and_ends_at_its_last() {
    // A client writes head and body in one syscall that TCP queued in chunks from time 5
    // to time 9: the request started at 5 and was sent by 9.
    let mut request = CURL_POST_HEAD.to_vec();
    request.extend_from_slice(CURL_POST_BODY);
    let mut c = Conn::new(Some(Role::Client));
    c.feed(Segment {
        first_ts_ns: 5,
        ..seg(OUT, 9, &request)
    });
    // The server answers in one large write too; its head starts the response at 20.
    c.feed(Segment {
        first_ts_ns: 20,
        ..seg(IN, 24, NGINX_201)
    });
    assert_eq!(c.out.len(), 1);
    let e = &c.out[0];
    assert_eq!(e.request_start_ns, 5);
    assert_eq!(e.request_end_ns, 9);
    assert_eq!(e.response_end_ns, Some(24));
    assert_eq!(e.end, Complete);
}

#[test]
fn three_segment_request_ends_at_third_segment() {
    let mut c = Conn::new(Some(Role::Client));
    c.send(OUT, 100, &CURL_GET_A[..5]);
    c.send(OUT, 200, &CURL_GET_A[5..30]);
    c.send(OUT, 300, &CURL_GET_A[30..]);
    c.send(IN, 400, PYTHON_200);
    assert_eq!(c.out.len(), 1);
    let e = &c.out[0];
    assert_eq!(
        (e.request_start_ns, e.request_end_ns, e.tid),
        (100, 300, 200)
    );
    assert_eq!(e.response_start_ns, Some(400));
    assert_eq!(e.status, Some(200));
    assert_eq!(e.response_body_size, 6);
}

/// 300 KiB upload in 64 KiB syscalls of which only 4 KiB are captured, then a second
/// request that must parse.
#[test]
fn large_body_counted_by_length_not_capture() {
    const BODY: u64 = 300 * 1024;
    const CAPTURE: usize = 4096;
    let head = b"PUT /blobs/7 HTTP/1.1\r\n\
Host: localhost:8080\r\n\
User-Agent: curl/7.88.1\r\n\
Accept: */*\r\n\
Content-Length: 307200\r\n\
Content-Type: application/octet-stream\r\n\
\r\n";
    let payload = vec![0xa5u8; CAPTURE];
    for role in [Role::Server, Role::Client] {
        let (rq, rs) = dirs(role);
        let mut c = Conn::new(Some(role));
        c.send(rq, 1, head);
        let mut left = BODY;
        let mut ts = 2;
        while left > 0 {
            let len = left.min(64 * 1024);
            c.feed(partial(rq, ts, len, &payload));
            left -= len;
            ts += 1;
        }
        let last_body_ts = ts - 1;
        c.send(rs, 50, NGINX_201);
        c.send(rq, 60, CURL_GET_A);
        c.send(rs, 70, NGINX_200);
        assert_eq!(c.out.len(), 2, "{role:?}");
        assert_eq!(
            summary(&c.out[0]),
            s("PUT", "/blobs/7", Some(201), BODY, 9, Complete)
        );
        assert_eq!(c.out[0].request_end_ns, last_body_ts);
        assert_eq!(
            summary(&c.out[1]),
            s("GET", "/a", Some(200), 0, 45, Complete)
        );
        assert_eq!(c.count(|r| r.resynced || r.headers_truncated), 0);
    }
}

/// The body ends inside a syscall whose remaining bytes are the next (pipelined) request.
#[test]
fn body_end_inside_segment_then_next_message() {
    let head = b"POST /ingest HTTP/1.1\r\nHost: h\r\nContent-Length: 70000\r\n\r\n";
    let mut c = Conn::new(Some(Role::Server));
    c.send(IN, 1, head);
    c.feed(partial(IN, 2, 69_000, &[b'x'; 4096]));
    // Last 1000 body bytes and a whole request, all captured.
    let mut tail = vec![b'y'; 1000];
    tail.extend_from_slice(CURL_GET_A);
    c.send(IN, 3, &tail);
    c.send(OUT, 4, NGINX_201);
    c.send(OUT, 5, NGINX_200);
    let got: Vec<_> = c.out.iter().map(summary).collect();
    assert_eq!(
        got,
        [
            s("POST", "/ingest", Some(201), 70_000, 9, Complete),
            s("GET", "/a", Some(200), 0, 45, Complete)
        ]
    );
    assert_eq!((c.out[0].request_end_ns, c.out[1].request_start_ns), (3, 3));

    // Same, but the tail's capture stops inside the body: the next request is lost, and
    // the stream resyncs on the next segment that starts with a request line.
    let mut c = Conn::new(Some(Role::Server));
    c.send(IN, 1, head);
    c.feed(partial(IN, 2, 69_000, &[b'x'; 64]));
    c.feed(partial(IN, 3, tail.len() as u64, &tail[..64]));
    c.send(OUT, 4, NGINX_201);
    c.send(OUT, 5, NGINX_200); // answers the request we could not see: dropped
    c.send(IN, 6, CURL_GET_B);
    c.send(OUT, 7, NGINX_204);
    let got: Vec<_> = c.out.iter().map(summary).collect();
    assert_eq!(
        got,
        [
            s("POST", "/ingest", Some(201), 70_000, 9, Complete),
            s("GET", "/b?x=1&y=2", Some(204), 0, 0, Complete)
        ]
    );
    assert!(c.count(|r| r.resynced) >= 1);
}

#[test]
fn chunked_response_with_sizes_split_across_segments() {
    // Node: head + first chunk, then the rest.
    let mut c = Conn::new(Some(Role::Server));
    c.send(IN, 1, CURL_GET_ROOT);
    c.send(OUT, 2, NODE_CHUNKED_1);
    assert!(c.out.is_empty());
    c.send(OUT, 3, NODE_CHUNKED_2);
    assert_eq!(
        summary(&c.out[0]),
        s("GET", "/", Some(200), 0, 11, Complete)
    );
    assert_eq!(c.out[0].response_end_ns, Some(3));

    // Multi-digit sizes split inside the digits, inside CRLFs and inside the terminator.
    let mut body = Vec::new();
    body.extend_from_slice(b"1f4\r\n");
    body.extend_from_slice(&[b'a'; 0x1f4]);
    body.extend_from_slice(b"\r\nA;name=\"v\"\r\n0123456789\r\n0\r\nX-Checksum: abc\r\n\r\n");
    let head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
    for cut1 in 0..body.len() {
        let cut2 = (cut1 + 3).min(body.len());
        let mut c = Conn::new(Some(Role::Client));
        c.send(OUT, 1, CURL_GET_ROOT);
        c.send(IN, 2, head);
        c.send(IN, 3, &body[..cut1]);
        c.send(IN, 4, &body[cut1..cut2]);
        c.send(IN, 5, &body[cut2..]);
        c.send(OUT, 6, CURL_GET_A);
        c.send(IN, 7, NGINX_200);
        let got: Vec<_> = c.out.iter().map(summary).collect();
        assert_eq!(
            got,
            [
                s("GET", "/", Some(200), 0, 0x1f4 + 10, Complete),
                s("GET", "/a", Some(200), 0, 45, Complete)
            ],
            "cut at {cut1}"
        );
    }
}

#[test]
fn chunked_request_body() {
    // Node's http.request with req.write() twice and req.end(): chunked upload.
    let req = b"POST /events HTTP/1.1\r\n\
Host: collector:4318\r\n\
Transfer-Encoding: chunked\r\n\
Connection: keep-alive\r\n\
\r\n\
c\r\n{\"event\":1}\n\r\n\
c\r\n{\"event\":2}\n\r\n\
0\r\n\r\n";
    let mut c = Conn::new(Some(Role::Client));
    c.send(OUT, 1, &req[..70]);
    c.send(OUT, 2, &req[70..]);
    c.send(IN, 3, NGINX_204);
    assert_eq!(
        summary(&c.out[0]),
        s("POST", "/events", Some(204), 24, 0, Complete)
    );
    assert!(c.out[0].request.chunked);
    assert_eq!(c.out[0].request_end_ns, 2);
}

/// A chunked response whose chunk-size lines fall in uncaptured bytes: the direction is
/// lost until the next request shows the response ended at the last egress segment.
#[test]
fn chunked_truncated_capture_resyncs_on_direction_switch() {
    let mut first = Vec::new();
    first.extend_from_slice(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n",
    );
    first.extend_from_slice(b"4000\r\n");
    first.extend_from_slice(&[b'z'; 200]);
    for role in [Role::Server, Role::Client] {
        let (rq, rs) = dirs(role);
        let mut c = Conn::new(Some(role));
        c.send(rq, 1, CURL_GET_ROOT);
        // 64 KiB write, 256 bytes captured: chunk data, then sizes we never see.
        c.feed(partial(rs, 2, 65_536, &first[..256.min(first.len())]));
        let r = c.feed(partial(rs, 3, 65_536, &[b'z'; 256]));
        assert!(!r.resynced);
        c.feed(partial(rs, 4, 1000, &[b'z'; 256]));
        assert!(c.out.is_empty());
        let r = c.send(rq, 5, CURL_GET_A);
        assert!(r.resynced, "{role:?}");
        assert_eq!(c.out.len(), 1);
        let e = &c.out[0];
        assert_eq!(e.end, Resynced);
        assert_eq!(e.status, Some(200));
        assert_eq!(e.response_start_ns, Some(2));
        assert_eq!(e.response_end_ns, Some(4));
        c.send(rs, 6, NGINX_200);
        assert_eq!(
            summary(&c.out[1]),
            s("GET", "/a", Some(200), 0, 45, Complete)
        );
        c.close(7);
        assert_eq!(c.out.len(), 2);
    }
}

#[test]
fn chunk_larger_than_capture_in_its_own_write_keeps_exact_size() {
    // Node writes one chunk per writev: size line, data, CRLF. With a 4 KiB capture the
    // 30000-byte chunk's closing CRLF is not captured; the next write starts a new chunk.
    let head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n";
    let mut big = b"7530\r\n".to_vec();
    big.extend_from_slice(&[b'c'; 4090]);
    for role in [Role::Server, Role::Client] {
        let (rq, rs) = dirs(role);
        let mut c = Conn::new(Some(role));
        c.send(rq, 1, CURL_GET_ROOT);
        c.send(rs, 2, head);
        c.send(rs, 3, b"64\r\n");
        c.send(rs, 3, &[b'a'; 100]);
        c.send(rs, 3, b"\r\n");
        let r = c.feed(partial(rs, 4, 30_008, &big));
        assert!(!r.resynced);
        // The CRLF split: one byte at the end of a write, one at the start of the next.
        let mut tail = vec![b'd'; 5];
        tail.extend_from_slice(b"\r");
        c.send(rs, 5, b"5\r\n");
        c.feed(partial(rs, 5, 6, &tail[..3]));
        c.send(rs, 6, b"\n0\r\n\r\n");
        assert_eq!(c.out.len(), 1, "{role:?}");
        assert_eq!(c.out[0].end, Complete);
        assert_eq!(c.out[0].response_body_size, 100 + 30_000 + 5);
        assert_eq!(c.out[0].response_end_ns, Some(6));
    }
}

#[test]
fn head_response_has_no_body() {
    let mut c = Conn::new(Some(Role::Server));
    c.send(IN, 1, CURL_HEAD);
    c.send(OUT, 2, NGINX_HEAD_200);
    c.send(IN, 3, CURL_GET_A);
    c.send(OUT, 4, NGINX_200);
    let got: Vec<_> = c.out.iter().map(summary).collect();
    assert_eq!(
        got,
        [
            s("HEAD", "/", Some(200), 0, 0, Complete),
            s("GET", "/a", Some(200), 0, 45, Complete)
        ]
    );
}

#[test]
fn no_content_and_not_modified() {
    let inm = b"GET / HTTP/1.1\r\n\
Host: localhost:8080\r\n\
User-Agent: curl/7.88.1\r\n\
Accept: */*\r\n\
If-None-Match: \"6638aa73-2d\"\r\n\
\r\n";
    let mut c = Conn::new(Some(Role::Client));
    c.send(OUT, 1, CURL_GET_A);
    c.send(IN, 2, NGINX_204);
    c.send(OUT, 3, inm);
    c.send(IN, 4, NGINX_304);
    c.send(OUT, 5, CURL_GET_B);
    c.send(IN, 6, NGINX_200);
    let got: Vec<_> = c.out.iter().map(summary).collect();
    assert_eq!(
        got,
        [
            s("GET", "/a", Some(204), 0, 0, Complete),
            s("GET", "/", Some(304), 0, 0, Complete),
            s("GET", "/b?x=1&y=2", Some(200), 0, 45, Complete)
        ]
    );
}

#[test]
fn response_delimited_by_close() {
    let mut c = Conn::new(Some(Role::Client));
    let req = b"GET /stream HTTP/1.0\r\nHost: localhost:8000\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n";
    c.send(OUT, 1, req);
    c.send(IN, 2, PYTHON_CLOSE_HEAD);
    c.send(IN, 3, b"line 1\n");
    c.feed(partial(IN, 4, 10_000, b"line 2\n"));
    assert!(c.out.is_empty());
    c.close(9);
    assert_eq!(c.out.len(), 1);
    let e = &c.out[0];
    assert_eq!(
        summary(e),
        s("GET", "/stream", Some(200), 0, 10_007, Complete)
    );
    assert_eq!(e.request.version_minor, 0);
    assert_eq!(e.response_start_ns, Some(2));
    assert_eq!(e.response_end_ns, Some(4));
    // Head and body in one segment, server side.
    let mut c = Conn::new(Some(Role::Server));
    c.send(IN, 1, req);
    let mut resp = PYTHON_CLOSE_HEAD.to_vec();
    resp.extend_from_slice(b"done\n");
    c.send(OUT, 2, &resp);
    c.close(3);
    assert_eq!(
        summary(&c.out[0]),
        s("GET", "/stream", Some(200), 0, 5, Complete)
    );
}

// ---- hostile lengths ----

#[test]
fn huge_and_garbage_content_lengths() {
    for cl in [
        "18446744073709551615",
        "18446744073709551616",
        "99999999999999999999999",
        "-1",
        "12abc",
        "",
        "5, 6",
        "0x10",
    ] {
        for role in [Role::Server, Role::Client] {
            let (rq, rs) = dirs(role);
            let resp = format!("HTTP/1.1 200 OK\r\nContent-Length: {cl}\r\n\r\nsome bytes");
            let mut c = Conn::new(Some(role));
            c.send(rq, 1, CURL_GET_ROOT);
            c.send(rs, 2, resp.as_bytes());
            c.feed(partial(rs, 3, u64::MAX, b"more bytes"));
            c.send(rq, 4, CURL_GET_A);
            c.send(rs, 5, NGINX_200);
            let got: Vec<_> = c.out.iter().map(|e| (e.status, e.end)).collect();
            assert_eq!(got, [(Some(200), Resynced), (Some(200), Complete)], "{cl}");
            assert_eq!(c.out[0].response_end_ns, Some(3));

            // Same length on a request: the response proves it ended.
            let req = format!("POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: {cl}\r\n\r\nabc");
            let mut c = Conn::new(Some(role));
            c.send(rq, 1, req.as_bytes());
            c.feed(partial(rq, 2, u64::MAX, b"def"));
            c.send(rs, 3, NGINX_204);
            c.send(rq, 4, CURL_GET_A);
            c.send(rs, 5, NGINX_200);
            let got: Vec<_> = c.out.iter().map(|e| (e.status, e.end)).collect();
            assert_eq!(got, [(Some(204), Resynced), (Some(200), Complete)], "{cl}");
            assert_eq!(c.out[0].request_end_ns, 2);
        }
    }
    // A Content-Length list with equal values is fine.
    let mut c = Conn::new(Some(Role::Client));
    c.send(OUT, 1, CURL_GET_ROOT);
    c.send(IN, 2, b"HTTP/1.1 200 OK\r\nContent-Length: 3, 3\r\n\r\nabc");
    assert_eq!(summary(&c.out[0]), s("GET", "/", Some(200), 0, 3, Complete));
}

#[test]
fn chunk_size_overflow_and_garbage() {
    for chunk in [
        "10000000000000000\r\n",    // 17 hex digits
        "fffffffffffffffff\r\n",    // overflow
        "ffffffffffffffff\r\n",     // fits u64, far too large
        "zz\r\n",                   // not hex
        "\r\n",                     // empty size
        "5 x\r\nhello\r\n",         // junk after size
        "5\r\nhelloXX0\r\n\r\n",    // missing CRLF after data
        "-5\r\nhello\r\n0\r\n\r\n", // negative
    ] {
        let resp = format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{chunk}");
        let mut c = Conn::new(Some(Role::Server));
        c.send(IN, 1, CURL_GET_ROOT);
        c.send(OUT, 2, resp.as_bytes());
        c.send(OUT, 3, b"0\r\n\r\n");
        c.send(IN, 4, CURL_GET_A);
        c.send(OUT, 5, NGINX_200);
        let got: Vec<_> = c.out.iter().map(|e| (e.status, e.end)).collect();
        assert_eq!(
            got,
            [(Some(200), Resynced), (Some(200), Complete)],
            "{chunk:?}"
        );
    }
}

#[test]
fn huge_segment_lengths_do_not_overflow() {
    let mut c = Conn::new(Some(Role::Server));
    c.send(
        IN,
        1,
        b"POST / HTTP/1.1\r\nContent-Length: 1099511627776\r\n\r\n",
    );
    c.feed(partial(IN, 2, u64::MAX, b"xx"));
    c.feed(partial(IN, 3, u64::MAX, b"xx"));
    c.close(4);
    assert_eq!(c.out[0].request_body_size, 1 << 40);
    assert_eq!(c.out[0].end, ConnectionClosed);
}
