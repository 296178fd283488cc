//! Sending an encoded `ExportTraceServiceRequest` to the collector: OTLP/gRPC over a shared
//! tonic channel (one HTTP/2 connection), or OTLP/HTTP (protobuf) as an HTTP/1.1 POST over a
//! small pool of keep-alive connections.
//!
//! Both take the request as bytes (see `encode`): nothing is converted or re-encoded here.

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf as _, BufMut as _, Bytes};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;

use super::encode::{PartialSuccess, decode_response};

/// Why one attempt failed, and whether OTLP allows trying again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendError {
    pub message: String,
    /// A transient failure (unreachable, overloaded, timed out): OTLP says retry with backoff.
    pub retryable: bool,
}

impl SendError {
    fn retryable(message: String) -> Self {
        Self {
            message,
            retryable: true,
        }
    }
}

#[derive(Clone)]
pub enum Transport {
    Grpc(GrpcTransport),
    Http(HttpTransport),
}

impl Transport {
    /// One attempt: send `body` (an encoded `ExportTraceServiceRequest`).
    pub async fn send(&self, body: Bytes) -> Result<PartialSuccess, SendError> {
        match self {
            Transport::Grpc(grpc) => grpc.send(body).await,
            Transport::Http(http) => http.send(body).await,
        }
    }
}

// ------------------------------------------------------------------------------------------
// gRPC

const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

#[derive(Clone)]
pub struct GrpcTransport {
    channel: tonic::transport::Channel,
    timeout: Duration,
}

impl GrpcTransport {
    pub fn new(channel: tonic::transport::Channel, timeout: Duration) -> Self {
        Self { channel, timeout }
    }

    async fn send(&self, body: Bytes) -> Result<PartialSuccess, SendError> {
        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        grpc.ready()
            .await
            .map_err(|e| SendError::retryable(format!("the gRPC channel is not ready: {e}")))?;
        let mut request = tonic::Request::new(body);
        request.set_timeout(self.timeout);
        match grpc
            .unary(request, PathAndQuery::from_static(EXPORT_PATH), RawCodec)
            .await
        {
            Ok(response) => Ok(response.into_inner()),
            Err(status) => Err(grpc_error(&status)),
        }
    }
}

fn grpc_error(status: &tonic::Status) -> SendError {
    use tonic::Code::*;
    let mut message = format!("gRPC status {:?}", status.code());
    if !status.message().is_empty() {
        message.push_str(": ");
        message.push_str(status.message());
    }
    // Transport errors (connection refused, …) carry their cause as the source.
    let mut source = std::error::Error::source(status);
    while let Some(cause) = source {
        // Layers often repeat their cause's words ("tcp connect error: tcp connect error").
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    SendError {
        message,
        // The codes OTLP/gRPC lists as retryable. RESOURCE_EXHAUSTED only with RetryInfo,
        // which we do not parse: not retried.
        retryable: matches!(
            status.code(),
            Cancelled | DeadlineExceeded | Aborted | OutOfRange | Unavailable | DataLoss
        ),
    }
}

/// A tonic codec whose request is already-encoded protobuf and whose response is decoded as
/// an `ExportTraceServiceResponse`.
struct RawCodec;

struct RawEncoder;

struct ResponseDecoder;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = PartialSuccess;
    type Encoder = RawEncoder;
    type Decoder = ResponseDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        RawEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        ResponseDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = tonic::Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Self::Error> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for ResponseDecoder {
    type Item = PartialSuccess;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Self::Error> {
        let body = src.copy_to_bytes(src.remaining());
        Ok(Some(decode_response(&body)))
    }
}

// ------------------------------------------------------------------------------------------
// HTTP/1.1

/// Idle keep-alive connections kept for the next request.
const MAX_IDLE_CONNECTIONS: usize = 8;
/// Longest response head (status line and headers) accepted.
const MAX_RESPONSE_HEAD: usize = 16 * 1024;
/// Longest response body read (an OTLP response is a few bytes).
const MAX_RESPONSE_BODY: usize = 1024 * 1024;
const MAX_RESPONSE_HEADERS: usize = 64;

#[derive(Clone)]
pub struct HttpTransport {
    inner: Arc<HttpInner>,
}

struct HttpInner {
    /// What to connect to: `host:port`.
    connect_to: String,
    /// The request head up to (excluding) the `Content-Length` value.
    head_prefix: String,
    idle: Mutex<Vec<TcpStream>>,
}

/// The parts of an `http://` URL we need.
#[derive(Debug, PartialEq, Eq)]
pub struct HttpUrl {
    /// `host[:port]` as written (the `Host` header).
    pub authority: String,
    /// `host:port` with the default port 80 filled in.
    pub connect_to: String,
    /// Path and query, at least `/`.
    pub target: String,
}

/// Splits an `http://authority/path?query` URL (already checked to start with `http://` in
/// any case). Userinfo is refused: the agent sends no credentials.
pub fn parse_http_url(url: &str) -> Result<HttpUrl, &'static str> {
    let rest = url
        .split_once("://")
        .map(|(_, rest)| rest)
        .ok_or("no scheme")?;
    let rest = rest.split('#').next().unwrap_or_default();
    let (authority, target) = match rest.find(['/', '?']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if authority.is_empty() {
        return Err("no host");
    }
    if authority.contains('@') {
        return Err("credentials in the URL are not supported");
    }
    if authority.contains(char::is_whitespace) || target.contains(char::is_whitespace) {
        return Err("it contains whitespace");
    }
    // `[v6]:port`, `[v6]`, `host:port`, `host`.
    let has_port = match authority.rfind(']') {
        Some(close) => authority[close..].contains(':'),
        None => authority.contains(':'),
    };
    if has_port {
        let port = authority
            .rsplit_once(':')
            .map(|(_, p)| p)
            .unwrap_or_default();
        if port.parse::<u16>().is_err() {
            return Err("the port is not a number from 0 to 65535");
        }
    }
    let connect_to = if has_port {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    let target = if target.starts_with('/') {
        target.to_owned()
    } else {
        format!("/{target}")
    };
    Ok(HttpUrl {
        authority: authority.to_owned(),
        connect_to,
        target,
    })
}

impl HttpTransport {
    pub fn new(url: &HttpUrl) -> Self {
        let head_prefix = format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: {}/{}\r\nContent-Type: application/x-protobuf\r\nContent-Length: ",
            url.target,
            url.authority,
            crate::process::DISTRO_NAME,
            env!("CARGO_PKG_VERSION"),
        );
        Self {
            inner: Arc::new(HttpInner {
                connect_to: url.connect_to.clone(),
                head_prefix,
                idle: Mutex::new(Vec::new()),
            }),
        }
    }

    fn take_idle(&self) -> Option<TcpStream> {
        self.inner
            .idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
    }

    fn put_idle(&self, conn: TcpStream) {
        let mut idle = self.inner.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE_CONNECTIONS {
            idle.push(conn);
        }
    }

    async fn connect(&self) -> Result<TcpStream, SendError> {
        let conn = TcpStream::connect(&self.inner.connect_to)
            .await
            .map_err(|e| {
                SendError::retryable(format!("cannot connect to {}: {e}", self.inner.connect_to))
            })?;
        // Best effort: without it the request still goes out, only later.
        let _ = conn.set_nodelay(true);
        Ok(conn)
    }

    async fn send(&self, body: Bytes) -> Result<PartialSuccess, SendError> {
        let mut head = String::with_capacity(self.inner.head_prefix.len() + 24);
        head.push_str(&self.inner.head_prefix);
        head.push_str(&body.len().to_string());
        head.push_str("\r\n\r\n");
        loop {
            let (mut conn, reused) = match self.take_idle() {
                Some(conn) => (conn, true),
                None => (self.connect().await?, false),
            };
            match exchange(&mut conn, head.as_bytes(), &body).await {
                Ok(response) => {
                    if response.keep_alive {
                        self.put_idle(conn);
                    }
                    return response.into_result();
                }
                // A kept-alive connection the collector closed meanwhile: try a fresh one.
                Err(Failure::BeforeResponse(_)) if reused => continue,
                Err(Failure::BeforeResponse(e)) => {
                    return Err(SendError::retryable(format!(
                        "the connection to {} failed: {e}",
                        self.inner.connect_to
                    )));
                }
                Err(Failure::Response(message)) => {
                    return Err(SendError::retryable(format!(
                        "bad response from {}: {message}",
                        self.inner.connect_to
                    )));
                }
            }
        }
    }
}

enum Failure {
    /// Nothing was received: the connection failed or was closed.
    BeforeResponse(io::Error),
    /// The response was cut short or malformed.
    Response(String),
}

struct HttpResponse {
    status: u16,
    reason: String,
    body: Vec<u8>,
    keep_alive: bool,
}

impl HttpResponse {
    fn into_result(self) -> Result<PartialSuccess, SendError> {
        if (200..300).contains(&self.status) {
            return Ok(decode_response(&self.body));
        }
        // The body may echo request details (credentials): not logged.
        Err(SendError {
            message: format!(
                "the collector answered HTTP {} {}",
                self.status, self.reason
            ),
            // OTLP/HTTP: retry on 429, 502, 503 and 504 only.
            retryable: matches!(self.status, 429 | 502 | 503 | 504),
        })
    }
}

/// Bytes read from a connection and not consumed yet.
struct ReadBuf {
    data: Vec<u8>,
    pos: usize,
}

impl ReadBuf {
    fn available(&self) -> &[u8] {
        &self.data[self.pos..]
    }

    /// Reads more; `Ok(false)` at end of stream.
    async fn fill(&mut self, conn: &mut TcpStream) -> io::Result<bool> {
        if self.pos > 0 && self.pos == self.data.len() {
            self.data.clear();
            self.pos = 0;
        }
        self.data.reserve(8192);
        Ok(conn.read_buf(&mut self.data).await? > 0)
    }

    /// Makes `n` bytes available, or fails at end of stream.
    async fn need(&mut self, conn: &mut TcpStream, n: usize) -> Result<(), Failure> {
        while self.available().len() < n {
            match self.fill(conn).await {
                Ok(true) => {}
                Ok(false) => return Err(Failure::Response("the response was cut short".into())),
                Err(e) => return Err(Failure::Response(e.to_string())),
            }
        }
        Ok(())
    }
}

async fn exchange(conn: &mut TcpStream, head: &[u8], body: &[u8]) -> Result<HttpResponse, Failure> {
    conn.write_all(head)
        .await
        .map_err(Failure::BeforeResponse)?;
    conn.write_all(body)
        .await
        .map_err(Failure::BeforeResponse)?;
    let mut buf = ReadBuf {
        data: Vec::with_capacity(1024),
        pos: 0,
    };
    // The head, skipping interim (1xx) responses.
    let (status, reason, framing, keep_alive) = loop {
        let mut headers = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(buf.available()) {
            Ok(httparse::Status::Complete(len)) => {
                let status = response.code.unwrap_or(0);
                let parsed = parse_head(&response);
                buf.pos += len;
                if (100..200).contains(&status) && status != 101 {
                    continue;
                }
                break parsed;
            }
            Ok(httparse::Status::Partial) => {
                if buf.available().len() > MAX_RESPONSE_HEAD {
                    return Err(Failure::Response("the response head is too long".into()));
                }
                let nothing_yet = buf.data.is_empty();
                match buf.fill(conn).await {
                    Ok(true) => {}
                    Ok(false) if nothing_yet => {
                        return Err(Failure::BeforeResponse(io::ErrorKind::UnexpectedEof.into()));
                    }
                    Ok(false) => {
                        return Err(Failure::Response("the response was cut short".into()));
                    }
                    Err(e) if nothing_yet => return Err(Failure::BeforeResponse(e)),
                    Err(e) => return Err(Failure::Response(e.to_string())),
                }
            }
            Err(e) => return Err(Failure::Response(format!("not an HTTP response: {e}"))),
        }
    };
    let mut keep_alive = keep_alive;
    let body = match framing {
        _ if status == 204 || status == 304 => Vec::new(),
        Framing::Length(len) => {
            if len > MAX_RESPONSE_BODY {
                return Err(Failure::Response(format!(
                    "the response body is too long ({len} bytes)"
                )));
            }
            buf.need(conn, len).await?;
            let body = buf.available()[..len].to_vec();
            buf.pos += len;
            body
        }
        Framing::Chunked => read_chunked(conn, &mut buf).await?,
        Framing::UntilClose => {
            keep_alive = false;
            loop {
                if buf.available().len() > MAX_RESPONSE_BODY {
                    return Err(Failure::Response("the response body is too long".into()));
                }
                match buf.fill(conn).await {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(e) => return Err(Failure::Response(e.to_string())),
                }
            }
            buf.available().to_vec()
        }
    };
    // Bytes past the response (a pipelining server?): do not reuse the connection.
    if !buf.available().is_empty() {
        keep_alive = false;
    }
    Ok(HttpResponse {
        status,
        reason,
        body,
        keep_alive,
    })
}

enum Framing {
    Length(usize),
    Chunked,
    UntilClose,
}

fn parse_head(response: &httparse::Response<'_, '_>) -> (u16, String, Framing, bool) {
    let mut framing = Framing::UntilClose;
    let mut keep_alive = response.version == Some(1);
    for header in response.headers.iter() {
        let value = String::from_utf8_lossy(header.value);
        let value = value.trim();
        if header.name.eq_ignore_ascii_case("content-length") {
            if let (Framing::UntilClose, Ok(len)) = (&framing, value.parse::<usize>()) {
                framing = Framing::Length(len);
            }
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            if value
                .rsplit(',')
                .next()
                .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"))
            {
                framing = Framing::Chunked;
            }
        } else if header.name.eq_ignore_ascii_case("connection")
            && value
                .split(',')
                .any(|token| token.trim().eq_ignore_ascii_case("close"))
        {
            keep_alive = false;
        }
    }
    (
        response.code.unwrap_or(0),
        response.reason.unwrap_or_default().to_owned(),
        framing,
        keep_alive,
    )
}

async fn read_chunked(conn: &mut TcpStream, buf: &mut ReadBuf) -> Result<Vec<u8>, Failure> {
    let mut body = Vec::new();
    loop {
        let (consumed, size) = loop {
            match httparse::parse_chunk_size(buf.available()) {
                Ok(httparse::Status::Complete(found)) => break found,
                Ok(httparse::Status::Partial) => {
                    let more = buf.available().len() + 1;
                    buf.need(conn, more).await?;
                }
                Err(_) => return Err(Failure::Response("bad chunk size".into())),
            }
        };
        buf.pos += consumed;
        if size == 0 {
            break;
        }
        let size = usize::try_from(size)
            .ok()
            .filter(|s| body.len() + s <= MAX_RESPONSE_BODY)
            .ok_or_else(|| Failure::Response("the response body is too long".into()))?;
        buf.need(conn, size + 2).await?;
        body.extend_from_slice(&buf.available()[..size]);
        buf.pos += size + 2;
    }
    // Trailer lines, up to an empty line.
    loop {
        let line_end = loop {
            if let Some(i) = buf.available().windows(2).position(|w| w == b"\r\n") {
                break i;
            }
            if buf.available().len() > MAX_RESPONSE_HEAD {
                return Err(Failure::Response(
                    "the response trailers are too long".into(),
                ));
            }
            let more = buf.available().len() + 1;
            buf.need(conn, more).await?;
        };
        buf.pos += line_end + 2;
        if line_end == 0 {
            return Ok(body);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[test]
    fn parses_http_urls() {
        let ok = |url: &str| parse_http_url(url).map(|u| (u.authority, u.connect_to, u.target));
        assert_eq!(
            ok("http://c:4318/v1/traces"),
            Ok(("c:4318".into(), "c:4318".into(), "/v1/traces".into()))
        );
        assert_eq!(
            ok("http://c/v1/traces"),
            Ok(("c".into(), "c:80".into(), "/v1/traces".into()))
        );
        assert_eq!(
            ok("http://[::1]:4318/x?y=1#frag"),
            Ok(("[::1]:4318".into(), "[::1]:4318".into(), "/x?y=1".into()))
        );
        assert_eq!(
            ok("http://[::1]?q"),
            Ok(("[::1]".into(), "[::1]:80".into(), "/?q".into()))
        );
        assert!(ok("http://user:pw@c:4318/").is_err());
        assert!(ok("http://c:99999/").is_err());
        assert!(ok("http:///v1/traces").is_err());
    }

    /// A server that answers each request on one connection with the next canned response.
    async fn serve(responses: Vec<&'static [u8]>) -> (String, tokio::task::JoinHandle<usize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let mut accepted = 0;
            let mut responses = responses.into_iter();
            while let Ok((mut conn, _)) = listener.accept().await {
                accepted += 1;
                let mut buf = Vec::new();
                loop {
                    // One request: head, then Content-Length bytes.
                    let head_end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        let mut chunk = [0u8; 4096];
                        match conn.read(&mut chunk).await {
                            Ok(0) | Err(_) => break 0,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    if head_end == 0 {
                        break;
                    }
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
                    let len: usize = head
                        .split("content-length: ")
                        .nth(1)
                        .and_then(|v| v.split("\r\n").next())
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    while buf.len() < head_end + len {
                        let mut chunk = [0u8; 65536];
                        match conn.read(&mut chunk).await {
                            Ok(0) | Err(_) => return accepted,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    buf.drain(..head_end + len);
                    let Some(response) = responses.next() else {
                        return accepted;
                    };
                    if response.is_empty() {
                        break; // close without answering
                    }
                    if conn.write_all(response).await.is_err() {
                        break;
                    }
                }
                if responses.len() == 0 {
                    break;
                }
            }
            accepted
        });
        (format!("http://{addr}/v1/traces"), task)
    }

    fn transport(url: &str) -> HttpTransport {
        HttpTransport::new(&parse_http_url(url).expect("url"))
    }

    #[tokio::test]
    async fn http_keeps_the_connection_and_reads_every_framing() {
        let (url, server) = serve(vec![
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n\x0a\x02\x08\x10\r\n0\r\n\r\n",
            b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 5\r\n\r\nbusy!",
            b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        ])
        .await;
        let t = transport(&url);
        assert_eq!(
            t.send(Bytes::from_static(b"abc")).await,
            Ok(PartialSuccess::default())
        );
        // `ExportTraceServiceResponse { partial_success { rejected_spans: 16 } }`, chunked.
        let got = t.send(Bytes::from_static(b"def")).await;
        assert_eq!(got.map(|p| p.rejected_spans), Ok(16));
        let err = t.send(Bytes::new()).await.expect_err("503");
        assert!(err.retryable, "{err:?}");
        assert!(err.message.contains("503"), "{err:?}");
        let err = t.send(Bytes::new()).await.expect_err("400");
        assert!(!err.retryable, "{err:?}");
        assert!(t.take_idle().is_none(), "Connection: close is honoured");
        drop(t);
        assert_eq!(server.await.ok(), Some(1), "one connection for all four");
    }

    #[tokio::test]
    async fn http_retries_a_kept_alive_connection_the_server_closed() {
        // First connection: one answer, then closed after the second request.
        let (url, server) = serve(vec![
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
            b"",
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        ])
        .await;
        let t = transport(&url);
        assert!(t.send(Bytes::from_static(b"1")).await.is_ok());
        assert!(t.send(Bytes::from_static(b"2")).await.is_ok());
        drop(t);
        server.abort();
    }

    #[tokio::test]
    async fn http_connection_refused_is_retryable() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("port");
        let t = transport(&format!("http://127.0.0.1:{port}/v1/traces"));
        let err = t.send(Bytes::new()).await.expect_err("refused");
        assert!(err.retryable);
        assert!(err.message.contains("cannot connect"), "{err:?}");
    }
}
