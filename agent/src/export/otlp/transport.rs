//! Sending an encoded `ExportTraceServiceRequest` to the collector: OTLP/gRPC over a shared
//! tonic channel (one HTTP/2 connection), or OTLP/HTTP (protobuf) as HTTP/1.1 POSTs from
//! hyper's client and its pool of keep-alive connections. Both connect through one
//! hyper-rustls connector: TLS for `https://` (see `tls`), plain TCP for `http://`. Every
//! request carries the user's headers, and is gzip-compressed if asked.
//!
//! Both take the request as bytes (see `encode`): nothing is converted or re-encoded here.

use std::error::Error as StdError;
use std::io::Write as _;
use std::time::Duration;

use bytes::{Buf as _, BufMut as _, Bytes};
use http::header::{CONTENT_ENCODING, CONTENT_TYPE, HeaderValue, USER_AGENT};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tonic::codec::{Codec, CompressionEncoding, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;

use super::encode::{PartialSuccess, decode_response};
use super::headers::Headers;
use super::tls;
use crate::export::{Compression, OtlpProtocol};

/// Why one attempt failed, and whether OTLP allows trying again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendError {
    pub message: String,
    /// A transient failure (unreachable, overloaded, timed out): OTLP says retry with backoff.
    pub retryable: bool,
    /// What the user should check (TLS failures, refused credentials).
    pub hint: Option<&'static str>,
}

impl SendError {
    fn retryable(message: String) -> Self {
        Self {
            message,
            retryable: true,
            hint: None,
        }
    }
}

/// How a transport sends: everything but the collector's URL.
pub struct TransportOptions<'a> {
    pub protocol: OtlpProtocol,
    /// Limit of one attempt (and of connecting).
    pub timeout: Duration,
    pub headers: &'a Headers,
    pub compression: Compression,
    /// Used for `https://` URLs; without ALPN (set here per protocol).
    pub tls: rustls::ClientConfig,
}

/// What a failed attempt can tell about TLS, for its hint.
#[derive(Clone, Copy)]
struct TlsUse {
    /// The URL is `https://`.
    on: bool,
    /// A client certificate is configured (mTLS).
    client_certificate: bool,
}

impl TlsUse {
    /// The hint for `error`: from the TLS error inside it, or, when a TLS connection was closed
    /// before any answer (a server refusing a client certificate may close without an alert),
    /// the likely causes.
    fn hint(self, error: &(dyn StdError + 'static)) -> Option<&'static str> {
        if let Some(hint) = tls::hint(error) {
            return Some(hint);
        }
        if !self.on || !closed_unanswered(error) {
            return None;
        }
        Some(if self.client_certificate {
            "the collector closed the TLS connection without answering: check that it trusts \
             the CA of the client certificate given with --otlp-client-certificate"
        } else {
            "the collector closed the TLS connection without answering: if it requires a client \
             certificate (mTLS), set --otlp-client-certificate and --otlp-client-key"
        })
    }
}

/// The connection closed before the collector answered: hyper's own errors, or the I/O error
/// under them (rustls reports a close without close_notify as an unexpected EOF).
fn closed_unanswered(error: &(dyn StdError + 'static)) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(h) = e.downcast_ref::<hyper::Error>()
            && (h.is_canceled() || h.is_closed() || h.is_incomplete_message())
        {
            return true;
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && matches!(
                io.kind(),
                UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe
            )
        {
            return true;
        }
        next = e.source();
    }
    false
}

/// Shared by the request tasks (behind an `Arc`).
pub enum Transport {
    Grpc(GrpcTransport),
    Http(Box<HttpTransport>),
}

impl Transport {
    /// A transport to `url` (`http://` or `https://`). Connects lazily, on the first send.
    /// Must run inside a tokio runtime (the gRPC channel spawns its connection task).
    pub fn new(url: &str, options: TransportOptions<'_>) -> Result<Self, String> {
        let http2 = options.protocol == OtlpProtocol::Grpc;
        let tls_use = TlsUse {
            on: url
                .get(..8)
                .is_some_and(|s| s.eq_ignore_ascii_case("https://")),
            client_certificate: options.tls.client_auth_cert_resolver.has_certs(),
        };
        let connector = connector(options.tls, http2, options.timeout);
        Ok(match options.protocol {
            OtlpProtocol::Grpc => {
                let endpoint = tonic::transport::Endpoint::from_shared(url.to_owned())
                    .map_err(|e| e.to_string())?
                    .timeout(options.timeout)
                    .connect_timeout(options.timeout);
                let mut metadata = http::HeaderMap::new();
                for (name, value) in options.headers.iter() {
                    metadata.insert(name.clone(), value.clone());
                }
                Transport::Grpc(GrpcTransport {
                    tls_use,
                    channel: endpoint.connect_with_connector_lazy(connector),
                    timeout: options.timeout,
                    metadata: tonic::metadata::MetadataMap::from_headers(metadata),
                    gzip: options.compression == Compression::Gzip,
                })
            }
            OtlpProtocol::HttpProtobuf => {
                let uri: http::Uri = url
                    .parse()
                    .map_err(|e: http::uri::InvalidUri| e.to_string())?;
                let mut headers = http::HeaderMap::new();
                headers.insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("application/x-protobuf"),
                );
                let agent = format!(
                    "{}/{}",
                    crate::resources::DISTRO_NAME,
                    env!("CARGO_PKG_VERSION")
                );
                if let Ok(agent) = HeaderValue::from_str(&agent) {
                    headers.insert(USER_AGENT, agent);
                }
                if options.compression == Compression::Gzip {
                    headers.insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
                }
                for (name, value) in options.headers.iter() {
                    headers.insert(name.clone(), value.clone());
                }
                let client = Client::builder(TokioExecutor::new())
                    .pool_max_idle_per_host(MAX_IDLE_CONNECTIONS)
                    .build(connector);
                Transport::Http(Box::new(HttpTransport {
                    tls_use,
                    client,
                    uri,
                    headers,
                    gzip: options.compression == Compression::Gzip,
                }))
            }
        })
    }

    /// One attempt: send `body` (an encoded `ExportTraceServiceRequest`).
    pub async fn send(&self, body: Bytes) -> Result<PartialSuccess, SendError> {
        match self {
            Transport::Grpc(grpc) => grpc.send(body).await,
            Transport::Http(http) => http.send(body).await,
        }
    }
}

/// TCP (nodelay), then TLS for `https://` URLs, offering `h2` (gRPC) or nothing (HTTP/1.1)
/// in ALPN.
fn connector(
    tls: rustls::ClientConfig,
    http2: bool,
    timeout: Duration,
) -> HttpsConnector<HttpConnector> {
    let mut tcp = HttpConnector::new();
    tcp.enforce_http(false);
    tcp.set_nodelay(true);
    tcp.set_connect_timeout(Some(timeout));
    let builder = HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http();
    if http2 {
        builder.enable_http2().wrap_connector(tcp)
    } else {
        builder.enable_http1().wrap_connector(tcp)
    }
}

/// An error and its causes in one line, skipping causes whose words it already shows (layers
/// often repeat their cause: "tcp connect error: tcp connect error").
fn describe(error: &(dyn StdError + 'static)) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}

// ------------------------------------------------------------------------------------------
// gRPC

const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

pub struct GrpcTransport {
    tls_use: TlsUse,
    channel: tonic::transport::Channel,
    timeout: Duration,
    /// The user's headers, sent with every call.
    metadata: tonic::metadata::MetadataMap,
    gzip: bool,
}

impl GrpcTransport {
    async fn send(&self, body: Bytes) -> Result<PartialSuccess, SendError> {
        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        if self.gzip {
            grpc = grpc.send_compressed(CompressionEncoding::Gzip);
        }
        grpc.ready().await.map_err(|e| SendError {
            hint: self.tls_use.hint(&e),
            ..SendError::retryable(format!("the gRPC channel is not ready: {}", describe(&e)))
        })?;
        let mut request =
            tonic::Request::from_parts(self.metadata.clone(), tonic::Extensions::default(), body);
        request.set_timeout(self.timeout);
        match grpc
            .unary(request, PathAndQuery::from_static(EXPORT_PATH), RawCodec)
            .await
        {
            Ok(response) => Ok(response.into_inner()),
            Err(status) => Err(grpc_error(&status, self.tls_use)),
        }
    }
}

fn grpc_error(status: &tonic::Status, tls_use: TlsUse) -> SendError {
    use tonic::Code::*;
    let mut message = format!("gRPC status {:?}", status.code());
    if !status.message().is_empty() {
        message.push_str(": ");
        message.push_str(status.message());
    }
    // Transport errors (connection refused, TLS, …) carry their cause as the source.
    if let Some(cause) = status.source() {
        let text = describe(cause);
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
    }
    SendError {
        message,
        // The codes OTLP/gRPC lists as retryable (RESOURCE_EXHAUSTED only with RetryInfo,
        // which we do not parse: not retried), and every failure of the transport itself (a
        // status with a cause: tonic reports a dropped connection as UNKNOWN), which is no
        // verdict of the collector.
        retryable: status.source().is_some()
            || matches!(
                status.code(),
                Cancelled | DeadlineExceeded | Aborted | OutOfRange | Unavailable | DataLoss
            ),
        hint: tls_use.hint(status).or(match status.code() {
            Unauthenticated | PermissionDenied => Some(
                "the collector refused the credentials: check the headers given with \
                 --otlp-header (OTEL_EXPORTER_OTLP_HEADERS)",
            ),
            _ => None,
        }),
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
/// Longest response body read (an OTLP response is a few bytes).
const MAX_RESPONSE_BODY: usize = 1024 * 1024;

pub struct HttpTransport {
    tls_use: TlsUse,
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    uri: http::Uri,
    /// Content type, user agent, content encoding, and the user's headers.
    headers: http::HeaderMap,
    gzip: bool,
}

/// `body` gzip-compressed (the default level, as the OpenTelemetry SDKs use).
fn gzip(body: &[u8]) -> std::io::Result<Bytes> {
    let mut encoder = flate2::write::GzEncoder::new(
        Vec::with_capacity(body.len() / 4 + 64),
        flate2::Compression::default(),
    );
    encoder.write_all(body)?;
    encoder.finish().map(Bytes::from)
}

impl HttpTransport {
    fn authority(&self) -> &str {
        self.uri.authority().map_or("", |a| a.as_str())
    }

    async fn send(&self, body: Bytes) -> Result<PartialSuccess, SendError> {
        let body = if self.gzip {
            gzip(&body).map_err(|e| SendError {
                retryable: false,
                ..SendError::retryable(format!("cannot gzip the request: {e}"))
            })?
        } else {
            body
        };
        let mut request = http::Request::new(Full::new(body));
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = self.uri.clone();
        *request.headers_mut() = self.headers.clone();
        let response = self.client.request(request).await.map_err(|e| {
            let what = if e.is_connect() {
                "cannot connect to"
            } else {
                "the request failed at"
            };
            SendError {
                hint: self.tls_use.hint(&e),
                ..SendError::retryable(format!("{what} {}: {}", self.authority(), describe(&e)))
            }
        })?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_RESPONSE_BODY)
            .collect()
            .await
            .map_err(|e| {
                SendError::retryable(format!(
                    "bad response from {}: {}",
                    self.authority(),
                    describe(e.as_ref())
                ))
            })?
            .to_bytes();
        if status.is_success() {
            return Ok(decode_response(&body));
        }
        // The body may echo request details (credentials): not logged.
        Err(SendError {
            message: format!("the collector answered HTTP {status}"),
            // OTLP/HTTP: retry on 429, 502, 503 and 504 only.
            retryable: matches!(status.as_u16(), 429 | 502 | 503 | 504),
            hint: matches!(status.as_u16(), 401 | 403).then_some(
                "the collector refused the credentials: check the headers given with \
                 --otlp-header (OTEL_EXPORTER_OTLP_HEADERS)",
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpListener;

    /// What the test server does after answering a request.
    #[derive(Clone, Copy, PartialEq)]
    enum Then {
        KeepOpen,
        Close,
    }

    /// A request the test server received.
    struct Seen {
        /// Lowercased.
        head: String,
        body: Vec<u8>,
    }

    struct Server {
        url: String,
        seen: Arc<Mutex<Vec<Seen>>>,
        task: tokio::task::JoinHandle<usize>,
    }

    impl Server {
        fn seen(&self) -> std::sync::MutexGuard<'_, Vec<Seen>> {
            self.seen.lock().unwrap_or_else(|p| p.into_inner())
        }

        /// Connections accepted, once every answer was given.
        async fn connections(self) -> usize {
            self.task.await.unwrap_or(usize::MAX)
        }
    }

    /// A server that answers the requests it receives, on whatever connection they come,
    /// with the next canned response, then keeps or closes that connection.
    async fn serve(script: Vec<(&'static [u8], Then)>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = Arc::clone(&seen);
        let task = tokio::spawn(async move {
            let mut accepted = 0;
            let mut script = script.into_iter();
            'connections: while let Ok((mut conn, _)) = listener.accept().await {
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
                            Ok(0) | Err(_) => continue 'connections,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
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
                            Ok(0) | Err(_) => continue 'connections,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let body = buf[head_end..head_end + len].to_vec();
                    buf.drain(..head_end + len);
                    record
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(Seen { head, body });
                    let Some((response, then)) = script.next() else {
                        return accepted;
                    };
                    if conn.write_all(response).await.is_err() {
                        continue 'connections;
                    }
                    if script.len() == 0 {
                        return accepted;
                    }
                    if then == Then::Close {
                        continue 'connections;
                    }
                }
            }
            accepted
        });
        Server {
            url: format!("http://{addr}/v1/traces"),
            seen,
            task,
        }
    }

    fn transport(url: &str, headers: &Headers, compression: Compression) -> Transport {
        let tls = tls::client_config(&tls::TlsFiles::default()).expect("default TLS");
        Transport::new(
            url,
            TransportOptions {
                protocol: OtlpProtocol::HttpProtobuf,
                timeout: Duration::from_secs(2),
                headers,
                compression,
                tls,
            },
        )
        .expect("transport")
    }

    const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";

    #[tokio::test]
    async fn http_keeps_the_connection_and_reads_every_framing() {
        use Then::*;
        let server = serve(vec![
            (
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
                KeepOpen,
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n\x0a\x02\x08\x10\r\n0\r\n\r\n",
                KeepOpen,
            ),
            (
                b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 5\r\n\r\nbusy!",
                KeepOpen,
            ),
            (
                b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                KeepOpen,
            ),
            (OK, KeepOpen),
        ])
        .await;
        let t = transport(&server.url, &Headers::default(), Compression::None);
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
        assert!(t.send(Bytes::new()).await.is_ok());
        drop(t);
        assert_eq!(
            server.connections().await,
            2,
            "one connection for the first four; `Connection: close` honoured"
        );
    }

    #[tokio::test]
    async fn http_reconnects_after_the_collector_closed_an_idle_connection() {
        let server = serve(vec![(OK, Then::Close), (OK, Then::Close)]).await;
        let t = transport(&server.url, &Headers::default(), Compression::None);
        assert!(t.send(Bytes::from_static(b"1")).await.is_ok());
        tokio::time::sleep(Duration::from_millis(100)).await;
        let second = t.send(Bytes::from_static(b"2")).await;
        assert!(second.is_ok(), "{second:?}");
        drop(t);
        assert_eq!(server.connections().await, 2);
    }

    #[tokio::test]
    async fn http_sends_the_users_headers_and_gzips_when_asked() {
        // Two clients, so two connections: the server serves one at a time.
        let server = serve(vec![(OK, Then::Close), (OK, Then::Close)]).await;
        let headers =
            Headers::parse(&[
                super::super::headers::HeaderArg::parse("x-api-key=s3cr%2Ct")
                    .unwrap_or_else(|never| match never {}),
            ])
            .expect("headers");
        let body = Bytes::from(b"spans spans spans spans spans spans spans".repeat(20));
        let gz = transport(&server.url, &headers, Compression::Gzip);
        assert!(gz.send(body.clone()).await.is_ok());
        let plain = transport(&server.url, &Headers::default(), Compression::None);
        assert!(plain.send(body.clone()).await.is_ok());
        let seen = server.seen();
        assert_eq!(seen.len(), 2);
        let (first, second) = (&seen[0], &seen[1]);
        assert!(
            first.head.starts_with("post /v1/traces http/1.1\r\n"),
            "{}",
            first.head
        );
        for line in [
            "content-encoding: gzip\r\n",
            "x-api-key: s3cr,t\r\n",
            "content-type: application/x-protobuf\r\n",
        ] {
            assert!(
                first.head.contains(line),
                "{line:?} missing: {}",
                first.head
            );
        }
        assert!(
            first.body.len() < body.len() / 4,
            "compressed: {}",
            first.body.len()
        );
        let mut unzipped = Vec::new();
        std::io::Read::read_to_end(
            &mut flate2::read::GzDecoder::new(&first.body[..]),
            &mut unzipped,
        )
        .expect("valid gzip");
        assert_eq!(unzipped, body);
        assert!(!second.head.contains("content-encoding"), "{}", second.head);
        assert!(!second.head.contains("x-api-key"), "{}", second.head);
        assert_eq!(second.body, body);
    }

    #[tokio::test]
    async fn http_connection_refused_is_retryable() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("port");
        let t = transport(
            &format!("http://127.0.0.1:{port}/v1/traces"),
            &Headers::default(),
            Compression::None,
        );
        let err = t.send(Bytes::new()).await.expect_err("refused");
        assert!(err.retryable);
        assert!(
            err.message.contains("cannot connect to 127.0.0.1"),
            "{err:?}"
        );
        assert_eq!(err.hint, None);
    }

    #[test]
    fn grpc_failures_of_the_transport_are_retried_verdicts_of_the_collector_by_code() {
        let plain = TlsUse {
            on: false,
            client_certificate: false,
        };
        // tonic turns a dropped connection into UNKNOWN with the I/O error as its cause.
        let dropped = tonic::Status::from_error(Box::new(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "peer closed connection without sending TLS close_notify",
        )));
        assert_eq!(dropped.code(), tonic::Code::Unknown);
        assert!(grpc_error(&dropped, plain).retryable);
        let tls = TlsUse {
            on: true,
            client_certificate: false,
        };
        assert!(
            grpc_error(&dropped, tls)
                .hint
                .is_some_and(|h| h.contains("--otlp-client-certificate"))
        );
        assert_eq!(
            grpc_error(&dropped, plain).hint,
            None,
            "plain TCP: no TLS hint"
        );
        // The collector's own answers.
        assert!(!grpc_error(&tonic::Status::unknown("bad"), plain).retryable);
        assert!(grpc_error(&tonic::Status::unavailable("busy"), plain).retryable);
        let denied = grpc_error(&tonic::Status::unauthenticated("no key"), plain);
        assert!(!denied.retryable);
        assert!(denied.hint.is_some_and(|h| h.contains("--otlp-header")));
    }

    #[tokio::test]
    async fn https_to_a_plain_http_server_fails_with_a_hint() {
        // A plain HTTP server answers the ClientHello as the garbage it is.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let _ = conn
                    .write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                    .await;
            }
        });
        let url = format!("https://{addr}/v1/traces");
        let t = transport(&url, &Headers::default(), Compression::None);
        let err = t.send(Bytes::new()).await.expect_err("no TLS there");
        server.abort();
        assert!(err.retryable, "{err:?}");
        assert!(
            err.hint.is_some_and(|h| h.contains("does not speak TLS")),
            "{err:?}"
        );
    }
}
