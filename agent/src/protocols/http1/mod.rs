//! Sans-I/O HTTP/1.x connection parser.
//!
//! One [`Http1Stream`] per TCP connection. The kernel hands us one
//! [`Segment`](super::segment::Segment) per send/recv
//! syscall: the exact number of bytes the syscall moved (`len`) and only a captured prefix of
//! them (`data`). The stream follows both directions of the connection byte by byte, counting
//! uncaptured bytes by length, and turns every request/response pair into an [`HttpExchange`].
//!
//! Design notes:
//! - Message heads are parsed with `httparse`, straight from the segment when the head fits in
//!   it; only a head split over several segments is copied into a bounded per-direction buffer.
//!   Bodies are never copied: they are skipped by length (`Content-Length`, chunk sizes).
//! - Body framing follows RFC 9112 §6: `Transfer-Encoding: chunked`, `Content-Length`, no body
//!   for HEAD / 1xx / 204 / 304 responses, close-delimited responses.
//! - When the position of the next message cannot be known (a chunk-size line in uncaptured
//!   bytes, a head cut by the capture, bytes that do not parse) the direction is *lost*: it
//!   skips segments until one whose captured data starts with a message start line. Where a lost
//!   message ended is inferred from the other direction (a new request means the previous
//!   response ended at the last segment sent before it); such exchanges end with
//!   [`ExchangeEnd::Resynced`].
//! - Every length read from the wire is capped ([`MAX_BODY_LEN`]) and all arithmetic on lengths
//!   is checked or saturating; nothing is allocated in proportion to a length field.
//!
//! Files: `stream.rs` walks segments (the per-connection state machine), `head.rs` reads
//! message heads (`lenient.rs` where httparse refuses them), `body.rs` follows bodies (length,
//! chunked, until close), `matching.rs` pairs requests with responses into exchanges.

// The span pipeline that consumes this parser is wired in separately; until then the binary
// does not reach these items outside of tests.
#![cfg_attr(
    not(test),
    allow(
        dead_code,
        reason = "consumed by the span pipeline, wired in by main.rs"
    )
)]

mod body;
mod head;
mod lenient;
mod matching;
mod stream;

pub use self::stream::Http1Stream;
use super::segment::Role;

/// What we keep of a request head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpRequestInfo {
    pub method: String,
    /// Raw request-target, e.g. `/a/b?x=1` or an absolute-form URI.
    pub target: String,
    /// `1` for HTTP/1.1, `0` for HTTP/1.0.
    pub version_minor: u8,
    pub host: Option<String>,
    pub user_agent: Option<String>,
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
    /// Value of a well-formed `Content-Length` header (even one too large to follow).
    pub content_length: Option<u64>,
    /// The final transfer coding is `chunked`.
    pub chunked: bool,
}

/// How an exchange ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExchangeEnd {
    /// Request and response were followed to their last byte.
    Complete,
    /// The connection ended before the response ended (or no response was seen).
    ConnectionClosed,
    /// An end was inferred at a resync point: the response's (or the request's) last byte was
    /// in bytes we could not follow, and the next message on the connection told us it was over.
    Resynced,
}

/// One request/response pair.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpExchange {
    pub role: Role,
    pub request: HttpRequestInfo,
    /// Final (non-1xx) status; `None` when no final response head was seen.
    pub status: Option<u16>,
    /// Timestamp of the segment holding the request's first byte.
    pub request_start_ns: u64,
    /// Timestamp of the segment holding the request's last byte (the last request segment seen
    /// when the request did not complete).
    pub request_end_ns: u64,
    /// Timestamp of the segment holding the first byte of the final response head.
    pub response_start_ns: Option<u64>,
    /// Timestamp of the segment holding the response's last byte (the last response-direction
    /// segment seen when the end was inferred or the connection closed first).
    pub response_end_ns: Option<u64>,
    /// Body bytes, counted from lengths rather than captured bytes. For chunked bodies this is
    /// the sum of the chunk sizes (framing not included).
    pub request_body_size: u64,
    pub response_body_size: u64,
    /// Thread of the segment holding the request's first byte.
    pub tid: u32,
    pub end: ExchangeEnd,
}

/// Classification of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamState {
    /// No HTTP message recognised yet.
    Detecting,
    /// HTTP/1.x.
    Http,
    /// Not HTTP/1.x (or no longer: upgraded / tunnelled); further segments are ignored.
    NotHttp,
}

/// What happened to a segment; the caller counts these (each is a counter in the agent's stats).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FeedReport {
    /// The connection was classified as not HTTP with this segment.
    pub became_not_http: bool,
    /// A direction that had lost sync found a message start again, or the end of a message we
    /// lost track of was inferred.
    pub resynced: bool,
    /// A message head could not be parsed because the capture (or the head buffer) ended first.
    pub headers_truncated: bool,
    /// Message heads of an HTTP connection that could not be read even leniently: their
    /// exchanges are not traced.
    pub invalid_heads: u32,
}

/// Larger body or chunk lengths are treated as lost sync: nothing real is that big, and a
/// connection stuck counting down such a length could never resync.
const MAX_BODY_LEN: u64 = 1 << 40;

/// The kind of message a direction carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Request,
    Response,
}

#[cfg(test)]
mod tests {
    use super::head::MAX_HEADERS;
    use super::matching::MAX_PENDING;
    use super::stream::MAX_HEAD_BYTES;
    use super::*;
    use crate::protocols::segment::{Direction, Segment};
    use proptest::prelude::*;

    const IN: Direction = Direction::Ingress;
    const OUT: Direction = Direction::Egress;

    // ---- wire fixtures, written out as the real programs send them ----

    /// curl 7.88.1, `curl http://localhost:8080/` (keep-alive by default in HTTP/1.1).
    const CURL_GET_ROOT: &[u8] = b"GET / HTTP/1.1\r\n\
Host: localhost:8080\r\n\
User-Agent: curl/7.88.1\r\n\
Accept: */*\r\n\
\r\n";

    /// curl 7.88.1 reusing the connection for a second and third URL.
    const CURL_GET_A: &[u8] = b"GET /a HTTP/1.1\r\n\
Host: localhost:8080\r\n\
User-Agent: curl/7.88.1\r\n\
Accept: */*\r\n\
\r\n";
    const CURL_GET_B: &[u8] = b"GET /b?x=1&y=2 HTTP/1.1\r\n\
Host: localhost:8080\r\n\
User-Agent: curl/7.88.1\r\n\
Accept: */*\r\n\
\r\n";

    /// `curl -I http://localhost:8080/`.
    const CURL_HEAD: &[u8] = b"HEAD / HTTP/1.1\r\n\
Host: localhost:8080\r\n\
User-Agent: curl/7.88.1\r\n\
Accept: */*\r\n\
\r\n";

    /// `curl -H 'Content-Type: application/json' -d '{"name":"widget","qty":12}' .../api/items`.
    const CURL_POST_HEAD: &[u8] = b"POST /api/items HTTP/1.1\r\n\
Host: localhost:8080\r\n\
User-Agent: curl/7.88.1\r\n\
Accept: */*\r\n\
Content-Type: application/json\r\n\
Content-Length: 26\r\n\
\r\n";
    const CURL_POST_BODY: &[u8] = br#"{"name":"widget","qty":12}"#;

    /// curl 7.88.1 uploading a large file (`--data-binary @big`) sends Expect: 100-continue.
    const CURL_POST_EXPECT: &[u8] = b"POST /upload HTTP/1.1\r\n\
Host: localhost:8080\r\n\
User-Agent: curl/7.88.1\r\n\
Accept: */*\r\n\
Content-Length: 2000\r\n\
Content-Type: application/x-www-form-urlencoded\r\n\
Expect: 100-continue\r\n\
\r\n";

    /// nginx 1.22.1 serving a 45-byte static file.
    const NGINX_200: &[u8] = b"HTTP/1.1 200 OK\r\n\
Server: nginx/1.22.1\r\n\
Date: Mon, 06 May 2024 10:15:02 GMT\r\n\
Content-Type: text/html\r\n\
Content-Length: 45\r\n\
Last-Modified: Mon, 06 May 2024 09:58:11 GMT\r\n\
Connection: keep-alive\r\n\
ETag: \"6638aa73-2d\"\r\n\
Accept-Ranges: bytes\r\n\
\r\n\
<html><body><h1>It works!</h1></body></html>\n";

    /// nginx 1.22.1 answering `curl -I`: the length of the file, no body.
    const NGINX_HEAD_200: &[u8] = b"HTTP/1.1 200 OK\r\n\
Server: nginx/1.22.1\r\n\
Date: Mon, 06 May 2024 10:15:03 GMT\r\n\
Content-Type: text/html\r\n\
Content-Length: 45\r\n\
Last-Modified: Mon, 06 May 2024 09:58:11 GMT\r\n\
Connection: keep-alive\r\n\
ETag: \"6638aa73-2d\"\r\n\
Accept-Ranges: bytes\r\n\
\r\n";

    /// nginx 1.22.1, `location /ping { return 204; }`.
    const NGINX_204: &[u8] = b"HTTP/1.1 204 No Content\r\n\
Server: nginx/1.22.1\r\n\
Date: Mon, 06 May 2024 10:15:04 GMT\r\n\
Connection: keep-alive\r\n\
\r\n";

    /// nginx 1.22.1 answering a matching If-None-Match.
    const NGINX_304: &[u8] = b"HTTP/1.1 304 Not Modified\r\n\
Server: nginx/1.22.1\r\n\
Date: Mon, 06 May 2024 10:15:05 GMT\r\n\
Last-Modified: Mon, 06 May 2024 09:58:11 GMT\r\n\
Connection: keep-alive\r\n\
ETag: \"6638aa73-2d\"\r\n\
\r\n";

    /// nginx 1.22.1 proxying to an app that created something.
    const NGINX_201: &[u8] = b"HTTP/1.1 201 Created\r\n\
Server: nginx/1.22.1\r\n\
Date: Mon, 06 May 2024 10:15:06 GMT\r\n\
Content-Type: application/json\r\n\
Content-Length: 9\r\n\
Connection: keep-alive\r\n\
\r\n\
{\"id\":42}";

    const CONTINUE_100: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

    /// Python 3.11 `http.server` (SimpleHTTPRequestHandler) serving a 6-byte file.
    const PYTHON_200: &[u8] = b"HTTP/1.0 200 OK\r\n\
Server: SimpleHTTP/0.6 Python/3.11.2\r\n\
Date: Mon, 06 May 2024 10:15:07 GMT\r\n\
Content-type: text/plain\r\n\
Content-Length: 6\r\n\
Last-Modified: Mon, 06 May 2024 09:58:11 GMT\r\n\
\r\n\
hello\n";

    /// Python 3.11 BaseHTTPRequestHandler whose do_GET writes a body without Content-Length:
    /// the body ends when the server closes the connection.
    const PYTHON_CLOSE_HEAD: &[u8] = b"HTTP/1.0 200 OK\r\n\
Server: BaseHTTP/0.6 Python/3.11.2\r\n\
Date: Mon, 06 May 2024 10:15:08 GMT\r\n\
Content-Type: text/plain\r\n\
\r\n";

    /// Node 20 `res.write('hello'); res.end(' world')`: head and first chunk in one write,
    /// then the last chunk with the terminator.
    const NODE_CHUNKED_1: &[u8] = b"HTTP/1.1 200 OK\r\n\
Content-Type: text/plain\r\n\
Date: Mon, 06 May 2024 10:15:09 GMT\r\n\
Connection: keep-alive\r\n\
Keep-Alive: timeout=5\r\n\
Transfer-Encoding: chunked\r\n\
\r\n\
5\r\nhello\r\n";
    const NODE_CHUNKED_2: &[u8] = b"6\r\n world\r\n0\r\n\r\n";

    /// A Python `requests` client (urllib3) sending trace context.
    const TRACED_GET: &[u8] = b"GET /orders/17?expand=items HTTP/1.1\r\n\
Host: orders.internal:8000\r\n\
User-Agent: python-requests/2.31.0\r\n\
Accept-Encoding: gzip, deflate\r\n\
Accept: */*\r\n\
Connection: keep-alive\r\n\
traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n\
tracestate: congo=t61rcWkgMzE,rojo=00f067aa0ba902b7\r\n\
\r\n";

    /// Header names in odd case (hand-rolled clients, old proxies).
    const ODD_CASE_POST: &[u8] = b"POST /Submit HTTP/1.1\r\n\
HOST: Example.COM\r\n\
uSeR-aGeNt: OddClient/1.0\r\n\
TRACEPARENT: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n\
Content-LENGTH: 5\r\n\
\r\n\
hello";

    /// Odd-case chunked response.
    const ODD_CASE_CHUNKED: &[u8] = b"HTTP/1.1 200 OK\r\n\
transfer-ENCODING: Chunked\r\n\
\r\n\
3\r\nabc\r\n0\r\n\r\n";

    /// First bytes of a TLS 1.3 ClientHello (curl 7.88 / OpenSSL 3).
    const TLS_CLIENT_HELLO: &[u8] = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\
\x8e\x1a\x5c\x92\x07\x3b\x41\x9d\xe0\x11\x6a\x7f\x2c\x90\x31\x55\
\x4b\x0c\x77\xd2\x18\xa9\x6e\x03\xbf\x42\xc1\x39\x58\xee\x0d\x21\
\x20\x6b\x3e\x11\x90\x2d\x7c\x4a\x88\x05\x13\x02\x13\x03\x13\x01\
\x00\x2f\x00\x35\x01\x00\x01\x93\x00\x00\x00\x0e\x00\x0c\x00\x00\x09localhost";
    /// First bytes of the ServerHello that answers it.
    const TLS_SERVER_HELLO: &[u8] = b"\x16\x03\x03\x00\x7a\x02\x00\x00\x76\x03\x03\
\x5d\x2e\x61\x0a\x93\x41\x17\xc8\x2b\x6e\x00\x13\x01\x00\x00\x2e\x00\x2b\x00\x02\x03\x04";
    /// TLS application data record header and some ciphertext.
    const TLS_APP_DATA: &[u8] = b"\x17\x03\x03\x00\x35\xa1\x9f\x42\x0e\x77\x81\x2c\xd3\x5b\x00\x10";

    /// libpq: SSLRequest, then (after the server's 'N') the StartupMessage for protocol 3.0.
    const PG_SSL_REQUEST: &[u8] = b"\x00\x00\x00\x08\x04\xd2\x16\x2f";
    const PG_STARTUP: &[u8] = b"\x00\x00\x00\x29\x00\x03\x00\x00\
user\x00postgres\x00database\x00postgres\x00\x00";
    const PG_AUTH_OK: &[u8] = b"R\x00\x00\x00\x08\x00\x00\x00\x00";

    // ---- helpers ----

    fn seg(direction: Direction, ts_ns: u64, data: &[u8]) -> Segment<'_> {
        Segment {
            direction,
            ts_ns,
            first_ts_ns: ts_ns,
            len: data.len() as u64,
            data,
            tid: 100 + ts_ns as u32,
        }
    }

    /// A syscall that moved `len` bytes of which only `data` was captured.
    fn partial(direction: Direction, ts_ns: u64, len: u64, data: &[u8]) -> Segment<'_> {
        Segment {
            direction,
            ts_ns,
            first_ts_ns: ts_ns,
            len,
            data,
            tid: 100 + ts_ns as u32,
        }
    }

    struct Conn {
        s: Http1Stream,
        out: Vec<HttpExchange>,
        reports: Vec<FeedReport>,
    }

    impl Conn {
        fn new(hint: Option<Role>) -> Self {
            Self {
                s: Http1Stream::new(hint),
                out: Vec::new(),
                reports: Vec::new(),
            }
        }
        fn feed(&mut self, s: Segment<'_>) -> FeedReport {
            let r = self.s.feed(s, &mut self.out);
            self.reports.push(r);
            r
        }
        fn send(&mut self, direction: Direction, ts: u64, data: &[u8]) -> FeedReport {
            self.feed(seg(direction, ts, data))
        }
        fn close(&mut self, ts: u64) {
            self.s.close(ts, &mut self.out);
        }
        fn count(&self, f: impl Fn(&FeedReport) -> bool) -> usize {
            self.reports.iter().filter(|r| f(r)).count()
        }
    }

    /// (request direction, response direction) for a role.
    fn dirs(role: Role) -> (Direction, Direction) {
        match role {
            Role::Server => (IN, OUT),
            Role::Client => (OUT, IN),
        }
    }

    fn summary(e: &HttpExchange) -> (String, String, Option<u16>, u64, u64, ExchangeEnd) {
        (
            e.request.method.clone(),
            e.request.target.clone(),
            e.status,
            e.request_body_size,
            e.response_body_size,
            e.end,
        )
    }

    fn s(
        method: &str,
        target: &str,
        status: Option<u16>,
        req_body: u64,
        resp_body: u64,
        end: ExchangeEnd,
    ) -> (String, String, Option<u16>, u64, u64, ExchangeEnd) {
        (
            method.to_owned(),
            target.to_owned(),
            status,
            req_body,
            resp_body,
            end,
        )
    }

    use ExchangeEnd::{Complete, ConnectionClosed, Resynced};

    // ---- keep-alive, pipelining ----

    #[test]
    fn fixtures_are_self_consistent() {
        assert_eq!(CURL_POST_BODY.len(), 26);
        assert!(NGINX_200.ends_with(b"\r\n\r\n<html><body><h1>It works!</h1></body></html>\n"));
        assert_eq!(b"<html><body><h1>It works!</h1></body></html>\n".len(), 45);
    }

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

    // ---- bodies ----

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
        let head =
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n";
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

    // ---- role detection, mid-stream pickup ----

    #[test]
    fn role_detected_from_first_request() {
        let mut c = Conn::new(None);
        assert_eq!(c.s.state(), StreamState::Detecting);
        c.send(IN, 1, CURL_GET_ROOT);
        assert_eq!(
            (c.s.role(), c.s.state()),
            (Some(Role::Server), StreamState::Http)
        );
        c.send(OUT, 2, NGINX_200);
        assert_eq!(c.out[0].role, Role::Server);

        let mut c = Conn::new(None);
        c.send(OUT, 1, CURL_GET_ROOT);
        assert_eq!(c.s.role(), Some(Role::Client));
        c.send(IN, 2, NGINX_200);
        assert_eq!(
            summary(&c.out[0]),
            s("GET", "/", Some(200), 0, 45, Complete)
        );
        assert_eq!(c.out[0].role, Role::Client);
    }

    #[test]
    fn mid_stream_pickup() {
        // Agent started while a server was receiving an upload and answering it.
        let mut c = Conn::new(None);
        c.send(IN, 1, br#"3,"qty":4},{"id":4,"qty":1}]}"#);
        c.feed(partial(IN, 2, 60_000, &[0x00, 0x13, 0x77, 0xfe]));
        c.send(OUT, 3, NGINX_201); // answers a request we never saw
        assert_eq!(c.s.state(), StreamState::Detecting);
        assert_eq!(c.s.role(), None);
        c.send(IN, 4, CURL_GET_A);
        assert_eq!(
            (c.s.role(), c.s.state()),
            (Some(Role::Server), StreamState::Http)
        );
        c.send(OUT, 5, NGINX_200);
        c.send(IN, 6, CURL_HEAD);
        c.send(OUT, 7, NGINX_HEAD_200);
        let got: Vec<_> = c.out.iter().map(summary).collect();
        assert_eq!(
            got,
            [
                s("GET", "/a", Some(200), 0, 45, Complete),
                s("HEAD", "/", Some(200), 0, 0, Complete)
            ]
        );
        assert_eq!(c.count(|r| r.became_not_http || r.resynced), 0);

        // Picked up in the middle of a response body on the client side: the response's
        // remaining bytes are skipped, the next request/response pair is parsed.
        let mut c = Conn::new(None);
        c.send(IN, 1, b"</html>\n");
        c.send(OUT, 2, CURL_GET_B);
        c.send(IN, 3, NGINX_200);
        assert_eq!(
            summary(&c.out[0]),
            s("GET", "/b?x=1&y=2", Some(200), 0, 45, Complete)
        );
        assert_eq!(c.out[0].role, Role::Client);
    }

    #[test]
    fn hinted_role_with_response_side_start() {
        // A status line on the response side also proves HTTP once the role is known.
        let mut c = Conn::new(Some(Role::Server));
        c.send(OUT, 1, NGINX_204);
        assert_eq!(c.s.state(), StreamState::Http);
        c.send(IN, 2, CURL_GET_ROOT);
        c.send(OUT, 3, NGINX_200);
        assert_eq!(
            summary(&c.out[0]),
            s("GET", "/", Some(200), 0, 45, Complete)
        );
    }

    // ---- not HTTP ----

    fn assert_not_http(c: &Conn) {
        assert!(c.out.is_empty());
        assert!(matches!(
            c.s.state(),
            StreamState::NotHttp | StreamState::Detecting
        ));
        assert!(c.count(|r| r.became_not_http) <= 1);
    }

    #[test]
    fn tls_is_not_http() {
        for hint in [Some(Role::Client), Some(Role::Server), None] {
            let mut c = Conn::new(hint);
            c.send(OUT, 1, TLS_CLIENT_HELLO);
            c.send(IN, 2, TLS_SERVER_HELLO);
            for i in 0..10 {
                c.send(OUT, 3 + 2 * i, TLS_APP_DATA);
                c.send(IN, 4 + 2 * i, TLS_APP_DATA);
            }
            if hint.is_some() {
                // Even something HTTP-looking is ignored once classified.
                c.send(OUT, 50, CURL_GET_ROOT);
                c.send(IN, 51, NGINX_200);
            }
            c.close(52);
            if hint.is_some() {
                assert_eq!(c.s.state(), StreamState::NotHttp);
                assert_eq!(c.count(|r| r.became_not_http), 1);
            }
            assert_not_http(&c);
        }
    }

    #[test]
    fn postgres_is_not_http() {
        for hint in [Some(Role::Client), None] {
            let mut c = Conn::new(hint);
            c.send(OUT, 1, PG_SSL_REQUEST);
            c.send(IN, 2, b"N");
            c.send(OUT, 3, PG_STARTUP);
            c.send(IN, 4, PG_AUTH_OK);
            c.send(OUT, 5, b"Q\x00\x00\x00\x0dSELECT 1\x00");
            c.close(6);
            if hint.is_some() {
                assert_eq!(c.s.state(), StreamState::NotHttp);
            }
            assert_not_http(&c);
        }
    }

    #[test]
    fn random_bytes_are_not_http() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for hint in [Some(Role::Server), Some(Role::Client), None] {
            let mut c = Conn::new(hint);
            for i in 0..40u64 {
                let data: Vec<u8> = (0..(next() % 300)).map(|_| next() as u8).collect();
                let dir = if next() % 2 == 0 { IN } else { OUT };
                c.feed(partial(dir, i, data.len() as u64 + next() % 50, &data));
            }
            c.close(99);
            assert_not_http(&c);
        }
        // Text that is not HTTP (SMTP greeting and commands).
        let mut c = Conn::new(Some(Role::Client));
        c.send(
            IN,
            1,
            b"220 mail.example.com ESMTP Postfix (Debian/GNU)\r\n",
        );
        c.send(OUT, 2, b"EHLO client.example.com\r\n");
        c.send(
            IN,
            3,
            b"250-mail.example.com\r\n250-PIPELINING\r\n250 SIZE 10240000\r\n",
        );
        c.send(OUT, 4, b"QUIT\r\n");
        assert_eq!(c.s.state(), StreamState::NotHttp);
        assert_not_http(&c);
    }

    #[test]
    fn not_http_after_eight_kib_of_garbage() {
        let mut c = Conn::new(Some(Role::Server));
        let r = c.feed(partial(IN, 1, 20_000, &[0xffu8; 9000]));
        assert!(r.became_not_http);
        assert_eq!(c.s.state(), StreamState::NotHttp);
    }

    #[test]
    fn upgrade_leaves_http() {
        let req = b"GET /chat HTTP/1.1\r\n\
Host: localhost:3000\r\n\
Upgrade: websocket\r\n\
Connection: Upgrade\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
Sec-WebSocket-Version: 13\r\n\
\r\n";
        let resp = b"HTTP/1.1 101 Switching Protocols\r\n\
Upgrade: websocket\r\n\
Connection: Upgrade\r\n\
Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\
\r\n\
\x81\x05hello";
        let mut c = Conn::new(Some(Role::Server));
        c.send(IN, 1, req);
        c.send(OUT, 2, resp);
        assert_eq!(
            summary(&c.out[0]),
            s("GET", "/chat", Some(101), 0, 0, Complete)
        );
        assert_eq!(c.s.state(), StreamState::NotHttp);
        c.send(IN, 3, b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58");
        c.close(4);
        assert_eq!(c.out.len(), 1);
        assert_eq!(
            c.count(|r| r.became_not_http),
            0,
            "an upgrade is not a misclassification"
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

    // ---- headers ----

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

    // ---- heads httparse refuses but real servers answer ----

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
        let counted =
            c.reports.iter().any(|r| {
                r.invalid_heads > 0 || r.resynced || r.headers_truncated || r.became_not_http
            }) || c.s.state() == StreamState::Detecting;
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

    // ---- property tests ----

    /// Several keep-alive and pipelined exchanges: (request bytes, response bytes) per round;
    /// each round's requests all go before its responses.
    fn rounds() -> Vec<(Vec<u8>, Vec<u8>)> {
        let cat = |parts: &[&[u8]]| parts.concat();
        let chunked_req: &[u8] =
            b"POST /events HTTP/1.1\r\nHost: c\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n10;ext=1\r\n0123456789abcdef\r\n0\r\nTrailer-A: x\r\n\r\n";
        vec![
            (CURL_GET_ROOT.to_vec(), NGINX_200.to_vec()),
            (
                cat(&[CURL_GET_A, CURL_POST_HEAD, CURL_POST_BODY, CURL_HEAD]),
                cat(&[NODE_CHUNKED_1, NODE_CHUNKED_2, NGINX_201, NGINX_HEAD_200]),
            ),
            (chunked_req.to_vec(), NGINX_204.to_vec()),
            (
                cat(&[CURL_POST_EXPECT, &[b'q'; 2000]]),
                cat(&[CONTINUE_100, PYTHON_200]),
            ),
            (
                cat(&[TRACED_GET, CURL_GET_B]),
                cat(&[NGINX_304, ODD_CASE_CHUNKED]),
            ),
        ]
    }

    type Summary = (String, String, Option<u16>, u64, u64, ExchangeEnd);

    fn expected_rounds() -> Vec<Summary> {
        vec![
            s("GET", "/", Some(200), 0, 45, Complete),
            s("GET", "/a", Some(200), 0, 11, Complete),
            s("POST", "/api/items", Some(201), 26, 9, Complete),
            s("HEAD", "/", Some(200), 0, 0, Complete),
            s("POST", "/events", Some(204), 19, 0, Complete),
            s("POST", "/upload", Some(200), 2000, 6, Complete),
            s("GET", "/orders/17?expand=items", Some(304), 0, 0, Complete),
            s("GET", "/b?x=1&y=2", Some(200), 0, 3, Complete),
        ]
    }

    /// Feeds the rounds with each direction's bytes cut at the given points.
    fn feed_rounds(role: Role, cuts: &[Vec<usize>]) -> Vec<HttpExchange> {
        let (rq, rs) = dirs(role);
        let mut stream = Http1Stream::new(Some(role));
        let mut out = Vec::new();
        let mut ts = 0;
        let mut piece = 0;
        for (req, resp) in rounds() {
            for (dir, bytes) in [(rq, &req), (rs, &resp)] {
                let mut points: Vec<usize> = cuts
                    .get(piece)
                    .map(|c| c.iter().map(|p| p % (bytes.len() + 1)).collect())
                    .unwrap_or_default();
                piece += 1;
                points.push(0);
                points.push(bytes.len());
                points.sort_unstable();
                points.dedup();
                for w in points.windows(2) {
                    ts += 1;
                    stream.feed(seg(dir, ts, &bytes[w[0]..w[1]]), &mut out);
                }
            }
        }
        stream.close(ts + 1, &mut out);
        out
    }

    #[test]
    fn unsplit_rounds_parse_as_expected() {
        for role in [Role::Server, Role::Client] {
            let got: Vec<_> = feed_rounds(role, &[]).iter().map(summary).collect();
            assert_eq!(got, expected_rounds(), "{role:?}");
        }
    }

    proptest! {
        #[test]
        fn splitting_never_changes_the_exchanges(
            server in any::<bool>(),
            cuts in prop::collection::vec(prop::collection::vec(0usize..5000, 0..12), 10),
        ) {
            let role = if server { Role::Server } else { Role::Client };
            let got: Vec<_> = feed_rounds(role, &cuts).iter().map(summary).collect();
            prop_assert_eq!(got, expected_rounds());
        }

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

        #[test]
        fn random_segments_never_panic(
            hint in prop_oneof![Just(None), Just(Some(Role::Server)), Just(Some(Role::Client))],
            segs in prop::collection::vec(
                (any::<bool>(), prop::collection::vec(any::<u8>(), 0..300), 0u64..100_000, any::<bool>()),
                0..40,
            ),
        ) {
            let mut stream = Http1Stream::new(hint);
            let mut out = Vec::new();
            for (i, (ingress, data, extra, full)) in segs.iter().enumerate() {
                let direction = if *ingress { IN } else { OUT };
                let len = data.len() as u64 + if *full { 0 } else { *extra };
                stream.feed(partial(direction, i as u64, len, data), &mut out);
            }
            stream.close(1_000_000, &mut out);
        }

        #[test]
        fn http_fragments_and_noise_never_panic(
            hint in prop_oneof![Just(None), Just(Some(Role::Server)), Just(Some(Role::Client))],
            picks in prop::collection::vec((0usize..16, any::<bool>(), 0usize..400, 0u64..70_000), 0..40),
        ) {
            let pieces: [&[u8]; 16] = [
                CURL_GET_ROOT, CURL_HEAD, CURL_POST_HEAD, CURL_POST_BODY, CURL_POST_EXPECT,
                NGINX_200, NGINX_HEAD_200, NGINX_204, NGINX_304, CONTINUE_100, PYTHON_CLOSE_HEAD,
                NODE_CHUNKED_1, NODE_CHUNKED_2, ODD_CASE_CHUNKED, TLS_CLIENT_HELLO, b"0\r\n\r\n",
            ];
            let mut stream = Http1Stream::new(hint);
            let mut out = Vec::new();
            for (i, (which, ingress, cut, extra)) in picks.iter().enumerate() {
                let bytes = pieces[*which];
                let data = &bytes[..(*cut).min(bytes.len())];
                let direction = if *ingress { IN } else { OUT };
                stream.feed(partial(direction, i as u64, bytes.len() as u64 + extra, data), &mut out);
            }
            stream.close(1_000_000, &mut out);
        }
    }

    /// A ~500-byte two-way stream as (direction, bytes) segments.
    fn sweep_stream() -> Vec<(Direction, Vec<u8>)> {
        vec![
            (IN, CURL_POST_HEAD.to_vec()),
            (IN, CURL_POST_BODY.to_vec()),
            (OUT, NODE_CHUNKED_1.to_vec()),
            (OUT, NODE_CHUNKED_2.to_vec()),
            (IN, [CURL_HEAD, CURL_GET_A].concat()),
            (OUT, [NGINX_HEAD_200, NGINX_204].concat()),
        ]
    }

    fn run_stream(hint: Option<Role>, segs: &[(Direction, Vec<u8>, u64)]) -> Vec<HttpExchange> {
        let mut stream = Http1Stream::new(hint);
        let mut out = Vec::new();
        for (i, (d, data, len)) in segs.iter().enumerate() {
            stream.feed(partial(*d, i as u64, *len, data), &mut out);
        }
        stream.close(999, &mut out);
        out
    }

    #[test]
    fn sweep_prefixes_mutations_and_captures() {
        let base = sweep_stream();
        let total: usize = base.iter().map(|(_, b)| b.len()).sum();
        assert!((400..=1200).contains(&total), "{total}");
        let full: Vec<_> = base
            .iter()
            .map(|(d, b)| (*d, b.clone(), b.len() as u64))
            .collect();
        let reference = run_stream(Some(Role::Server), &full);
        assert_eq!(reference.len(), 3, "{reference:#?}");

        // Position `k` of the whole stream as (segment, offset).
        let locate = |k: usize| {
            let mut k = k;
            for (i, (_, b)) in base.iter().enumerate() {
                if k < b.len() {
                    return (i, k);
                }
                k -= b.len();
            }
            (base.len(), 0)
        };

        for hint in [Some(Role::Server), Some(Role::Client), None] {
            for k in 0..=total {
                let (si, off) = locate(k);
                // Prefix: everything before byte k.
                let mut prefix: Vec<_> = full[..si.min(full.len())].to_vec();
                if si < base.len() && off > 0 {
                    let b = base[si].1[..off].to_vec();
                    prefix.push((base[si].0, b, off as u64));
                }
                let out = run_stream(hint, &prefix);
                assert!(out.len() <= reference.len());

                if si == base.len() {
                    continue;
                }
                // Capture ends at byte k (the syscall still moved the whole segment).
                let mut cut = full.clone();
                cut[si].1.truncate(off);
                run_stream(hint, &cut);

                // Single-byte mutations at byte k.
                let original = base[si].1[off];
                for v in [
                    0x00,
                    0xff,
                    b'\r',
                    b'\n',
                    b' ',
                    b'0',
                    b'9',
                    b'f',
                    b':',
                    original ^ 0x20,
                ] {
                    let mut m = full.clone();
                    m[si].1[off] = v;
                    let out = run_stream(hint, &m);
                    assert!(out.len() <= reference.len() + 1, "k={k} v={v}");
                }
            }
        }
    }
}
