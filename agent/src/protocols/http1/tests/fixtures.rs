//! Wire fixtures, written out as the real programs send them.

/// curl 7.88.1, `curl http://localhost:8080/` (keep-alive by default in HTTP/1.1).
pub(super) const CURL_GET_ROOT: &[u8] = b"GET / HTTP/1.1\r\n\
Host: localhost:8080\r\n\
User-Agent: curl/7.88.1\r\n\
Accept: */*\r\n\
\r\n";

/// curl 7.88.1 reusing the connection for a second and third URL.
pub(super) const CURL_GET_A: &[u8] = b"GET /a HTTP/1.1\r\n\
Host: localhost:8080\r\n\
User-Agent: curl/7.88.1\r\n\
Accept: */*\r\n\
\r\n";
pub(super) const CURL_GET_B: &[u8] = b"GET /b?x=1&y=2 HTTP/1.1\r\n\
Host: localhost:8080\r\n\
User-Agent: curl/7.88.1\r\n\
Accept: */*\r\n\
\r\n";

/// `curl -I http://localhost:8080/`.
pub(super) const CURL_HEAD: &[u8] = b"HEAD / HTTP/1.1\r\n\
Host: localhost:8080\r\n\
User-Agent: curl/7.88.1\r\n\
Accept: */*\r\n\
\r\n";

/// `curl -H 'Content-Type: application/json' -d '{"name":"widget","qty":12}' .../api/items`.
pub(super) const CURL_POST_HEAD: &[u8] = b"POST /api/items HTTP/1.1\r\n\
Host: localhost:8080\r\n\
User-Agent: curl/7.88.1\r\n\
Accept: */*\r\n\
Content-Type: application/json\r\n\
Content-Length: 26\r\n\
\r\n";
pub(super) const CURL_POST_BODY: &[u8] = br#"{"name":"widget","qty":12}"#;

/// curl 7.88.1 uploading a large file (`--data-binary @big`) sends Expect: 100-continue.
pub(super) const CURL_POST_EXPECT: &[u8] = b"POST /upload HTTP/1.1\r\n\
Host: localhost:8080\r\n\
User-Agent: curl/7.88.1\r\n\
Accept: */*\r\n\
Content-Length: 2000\r\n\
Content-Type: application/x-www-form-urlencoded\r\n\
Expect: 100-continue\r\n\
\r\n";

/// nginx 1.22.1 serving a 45-byte static file.
pub(super) const NGINX_200: &[u8] = b"HTTP/1.1 200 OK\r\n\
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
pub(super) const NGINX_HEAD_200: &[u8] = b"HTTP/1.1 200 OK\r\n\
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
pub(super) const NGINX_204: &[u8] = b"HTTP/1.1 204 No Content\r\n\
Server: nginx/1.22.1\r\n\
Date: Mon, 06 May 2024 10:15:04 GMT\r\n\
Connection: keep-alive\r\n\
\r\n";

/// nginx 1.22.1 answering a matching If-None-Match.
pub(super) const NGINX_304: &[u8] = b"HTTP/1.1 304 Not Modified\r\n\
Server: nginx/1.22.1\r\n\
Date: Mon, 06 May 2024 10:15:05 GMT\r\n\
Last-Modified: Mon, 06 May 2024 09:58:11 GMT\r\n\
Connection: keep-alive\r\n\
ETag: \"6638aa73-2d\"\r\n\
\r\n";

/// nginx 1.22.1 proxying to an app that created something.
pub(super) const NGINX_201: &[u8] = b"HTTP/1.1 201 Created\r\n\
Server: nginx/1.22.1\r\n\
Date: Mon, 06 May 2024 10:15:06 GMT\r\n\
Content-Type: application/json\r\n\
Content-Length: 9\r\n\
Connection: keep-alive\r\n\
\r\n\
{\"id\":42}";

pub(super) const CONTINUE_100: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// Python 3.11 `http.server` (SimpleHTTPRequestHandler) serving a 6-byte file.
pub(super) const PYTHON_200: &[u8] = b"HTTP/1.0 200 OK\r\n\
Server: SimpleHTTP/0.6 Python/3.11.2\r\n\
Date: Mon, 06 May 2024 10:15:07 GMT\r\n\
Content-type: text/plain\r\n\
Content-Length: 6\r\n\
Last-Modified: Mon, 06 May 2024 09:58:11 GMT\r\n\
\r\n\
hello\n";

/// Python 3.11 BaseHTTPRequestHandler whose do_GET writes a body without Content-Length:
/// the body ends when the server closes the connection.
pub(super) const PYTHON_CLOSE_HEAD: &[u8] = b"HTTP/1.0 200 OK\r\n\
Server: BaseHTTP/0.6 Python/3.11.2\r\n\
Date: Mon, 06 May 2024 10:15:08 GMT\r\n\
Content-Type: text/plain\r\n\
\r\n";

/// Node 20 `res.write('hello'); res.end(' world')`: head and first chunk in one write,
/// then the last chunk with the terminator.
pub(super) const NODE_CHUNKED_1: &[u8] = b"HTTP/1.1 200 OK\r\n\
Content-Type: text/plain\r\n\
Date: Mon, 06 May 2024 10:15:09 GMT\r\n\
Connection: keep-alive\r\n\
Keep-Alive: timeout=5\r\n\
Transfer-Encoding: chunked\r\n\
\r\n\
5\r\nhello\r\n";
pub(super) const NODE_CHUNKED_2: &[u8] = b"6\r\n world\r\n0\r\n\r\n";

/// A Python `requests` client (urllib3) sending trace context.
pub(super) const TRACED_GET: &[u8] = b"GET /orders/17?expand=items HTTP/1.1\r\n\
Host: orders.internal:8000\r\n\
User-Agent: python-requests/2.31.0\r\n\
Accept-Encoding: gzip, deflate\r\n\
Accept: */*\r\n\
Connection: keep-alive\r\n\
traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n\
tracestate: congo=t61rcWkgMzE,rojo=00f067aa0ba902b7\r\n\
\r\n";

/// Header names in odd case (hand-rolled clients, old proxies).
pub(super) const ODD_CASE_POST: &[u8] = b"POST /Submit HTTP/1.1\r\n\
HOST: Example.COM\r\n\
uSeR-aGeNt: OddClient/1.0\r\n\
TRACEPARENT: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n\
Content-LENGTH: 5\r\n\
\r\n\
hello";

/// Odd-case chunked response.
pub(super) const ODD_CASE_CHUNKED: &[u8] = b"HTTP/1.1 200 OK\r\n\
transfer-ENCODING: Chunked\r\n\
\r\n\
3\r\nabc\r\n0\r\n\r\n";

/// First bytes of a TLS 1.3 ClientHello (curl 7.88 / OpenSSL 3).
pub(super) const TLS_CLIENT_HELLO: &[u8] = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\
\x8e\x1a\x5c\x92\x07\x3b\x41\x9d\xe0\x11\x6a\x7f\x2c\x90\x31\x55\
\x4b\x0c\x77\xd2\x18\xa9\x6e\x03\xbf\x42\xc1\x39\x58\xee\x0d\x21\
\x20\x6b\x3e\x11\x90\x2d\x7c\x4a\x88\x05\x13\x02\x13\x03\x13\x01\
\x00\x2f\x00\x35\x01\x00\x01\x93\x00\x00\x00\x0e\x00\x0c\x00\x00\x09localhost";
/// First bytes of the ServerHello that answers it.
pub(super) const TLS_SERVER_HELLO: &[u8] = b"\x16\x03\x03\x00\x7a\x02\x00\x00\x76\x03\x03\
\x5d\x2e\x61\x0a\x93\x41\x17\xc8\x2b\x6e\x00\x13\x01\x00\x00\x2e\x00\x2b\x00\x02\x03\x04";
/// TLS application data record header and some ciphertext.
pub(super) const TLS_APP_DATA: &[u8] =
    b"\x17\x03\x03\x00\x35\xa1\x9f\x42\x0e\x77\x81\x2c\xd3\x5b\x00\x10";

/// libpq: SSLRequest, then (after the server's 'N') the StartupMessage for protocol 3.0.
pub(super) const PG_SSL_REQUEST: &[u8] = b"\x00\x00\x00\x08\x04\xd2\x16\x2f";
pub(super) const PG_STARTUP: &[u8] = b"\x00\x00\x00\x29\x00\x03\x00\x00\
user\x00postgres\x00database\x00postgres\x00\x00";
pub(super) const PG_AUTH_OK: &[u8] = b"R\x00\x00\x00\x08\x00\x00\x00\x00";

#[test]
fn fixtures_are_self_consistent() {
    assert_eq!(CURL_POST_BODY.len(), 26);
    assert!(NGINX_200.ends_with(b"\r\n\r\n<html><body><h1>It works!</h1></body></html>\n"));
    assert_eq!(b"<html><body><h1>It works!</h1></body></html>\n".len(), 45);
}
