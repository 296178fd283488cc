//! A small HTTP/1.1 responder for `GET /metrics`, `/healthz` and `/readyz`: one request per
//! connection, then close. Built for hostile input: the request head is bounded in size and
//! in time (slow clients get 408), garbage gets 400, connections beyond a limit get 503, and
//! nothing a client sends can panic it or hold up anything but its own connection.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
    task::JoinHandle,
    time::Instant,
};

use crate::stats::Stats;

/// An answer to a GET.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

/// What the responder serves: `None` for a path it does not know (404).
pub trait Routes: Send + Sync + 'static {
    fn get(&self, path: &str) -> Option<Reply>;
}

/// Bounds on what one client can make the responder do.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Bytes of request head read at most (a scraper's GET is ~200 bytes).
    pub max_request: usize,
    /// The whole request head must arrive within this (slowloris).
    pub request_timeout: Duration,
    /// The answer must be taken within this (a client that does not read).
    pub write_timeout: Duration,
    /// Connections served at once; more are answered 503 at once.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_request: 8 * 1024,
            request_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(5),
            max_connections: 16,
        }
    }
}

/// Header slots for parsing; a request with more headers is answered 431.
const MAX_HEADERS: usize = 32;

#[derive(Debug, thiserror::Error)]
#[error(
    "cannot listen on --metrics-address {addr}: {source}; choose a free port, or an address \
     of this host (0.0.0.0:PORT for every interface)"
)]
pub struct BindError {
    addr: SocketAddr,
    source: std::io::Error,
}

/// Binds the listening socket (at start-up, so a taken port stops the agent before it
/// attaches anything).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| BindError { addr, source })
}

/// Serves `routes` on `listener` until the runtime stops. Must be called inside a tokio
/// runtime.
pub fn spawn(
    listener: TcpListener,
    routes: Arc<dyn Routes>,
    stats: Arc<Stats>,
    limits: Limits,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let slots = Arc::new(Semaphore::new(limits.max_connections));
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, typically: wait instead of spinning.
                    log::warn!("metrics: cannot accept a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                Stats::add(&stats.metrics_requests_rejected, 1);
                refuse_busy(stream);
                continue;
            };
            let routes = Arc::clone(&routes);
            let stats = Arc::clone(&stats);
            tokio::spawn(async move {
                serve(stream, routes.as_ref(), &stats, limits).await;
                drop(slot);
            });
        }
    })
}

/// Answers 503 without waiting for this client: takes what it already sent (closing with
/// unread bytes would reset the connection, losing the answer), writes the answer (it fits
/// any socket buffer), and ends the connection.
fn refuse_busy(stream: TcpStream) {
    let mut scratch = [0u8; 1024];
    for _ in 0..16 {
        match stream.try_read(&mut scratch) {
            Ok(n) if n > 0 => {}
            _ => break,
        }
    }
    let _ = stream.try_write(&head(503, "text/plain; charset=utf-8", 0));
    if let Ok(stream) = stream.into_std() {
        let _ = stream.shutdown(std::net::Shutdown::Write);
    }
}

/// What the request head said.
#[derive(Debug, PartialEq, Eq)]
enum Request {
    Get { path: String, head_only: bool },
    OtherMethod,
}

/// Why no request could be read.
#[derive(Debug, PartialEq, Eq)]
enum Refusal {
    Malformed,
    TooLarge,
    TooSlow,
    /// The client closed or reset before a whole request: nobody to answer.
    Gone,
}

async fn serve(mut stream: TcpStream, routes: &dyn Routes, stats: &Stats, limits: Limits) {
    let deadline = Instant::now() + limits.request_timeout;
    let (status, content_type, body, head_only) =
        match read_request(&mut stream, deadline, limits).await {
            Ok(Request::Get { path, head_only }) => {
                Stats::add(&stats.metrics_requests, 1);
                match routes.get(&path) {
                    Some(r) => (r.status, r.content_type, r.body, head_only),
                    None => (
                        404,
                        "text/plain; charset=utf-8",
                        "not found: the paths are /metrics, /healthz and /readyz\n".to_owned(),
                        head_only,
                    ),
                }
            }
            Ok(Request::OtherMethod) => {
                Stats::add(&stats.metrics_requests, 1);
                (
                    405,
                    "text/plain; charset=utf-8",
                    "only GET and HEAD are served\n".to_owned(),
                    false,
                )
            }
            Err(Refusal::Gone) => return,
            Err(refusal) => {
                Stats::add(&stats.metrics_requests_rejected, 1);
                let (status, why) = match refusal {
                    Refusal::Malformed => (400, "not an HTTP/1.x request\n"),
                    Refusal::TooLarge => (431, "request head too large\n"),
                    _ => (408, "the request did not arrive in time\n"),
                };
                (status, "text/plain; charset=utf-8", why.to_owned(), false)
            }
        };
    let mut answer = head(status, content_type, body.len());
    if !head_only {
        answer.extend_from_slice(body.as_bytes());
    }
    let write = async {
        stream.write_all(&answer).await?;
        stream.shutdown().await
    };
    // A client that does not read its answer is dropped (its connection closes).
    let _ = tokio::time::timeout(limits.write_timeout, write).await;
}

async fn read_request(
    stream: &mut TcpStream,
    deadline: Instant,
    limits: Limits,
) -> Result<Request, Refusal> {
    let mut buf = vec![0u8; limits.max_request];
    let mut len = 0;
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.read(&mut buf[len..])).await {
            Err(_) => return Err(Refusal::TooSlow),
            Ok(Err(_)) | Ok(Ok(0)) => return Err(Refusal::Gone),
            Ok(Ok(n)) => n,
        };
        len += n;
        match parse(&buf[..len]) {
            Ok(Some(request)) => return Ok(request),
            Ok(None) if len == buf.len() => return Err(Refusal::TooLarge),
            Ok(None) => {}
            Err(refusal) => return Err(refusal),
        }
    }
}

/// The request in `bytes`: `Ok(None)` while the head is incomplete.
fn parse(bytes: &[u8]) -> Result<Option<Request>, Refusal> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(bytes) {
        Ok(httparse::Status::Partial) => Ok(None),
        Ok(httparse::Status::Complete(_)) => {
            let (Some(method), Some(target)) = (req.method, req.path) else {
                return Err(Refusal::Malformed);
            };
            if !target.starts_with('/') {
                return Err(Refusal::Malformed);
            }
            let head_only = match method {
                "GET" => false,
                "HEAD" => true,
                _ => return Ok(Some(Request::OtherMethod)),
            };
            let path = target.split(['?', '#']).next().unwrap_or_default();
            Ok(Some(Request::Get {
                path: path.to_owned(),
                head_only,
            }))
        }
        Err(httparse::Error::TooManyHeaders) => Err(Refusal::TooLarge),
        Err(_) => Err(Refusal::Malformed),
    }
}

fn head(status: u16, content_type: &str, length: usize) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Unknown",
    };
    let allow = if status == 405 {
        "Allow: GET, HEAD\r\n"
    } else {
        ""
    };
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {length}\r\n\
         Cache-Control: no-store\r\n{allow}Connection: close\r\n\r\n"
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read as _, Write as _};
    use std::net::TcpStream as StdStream;
    use std::sync::atomic::Ordering;

    struct Echo;

    impl Routes for Echo {
        fn get(&self, path: &str) -> Option<Reply> {
            (path == "/metrics").then(|| Reply {
                status: 200,
                content_type: "text/plain; version=0.0.4; charset=utf-8",
                body: "m 1\n".to_owned(),
            })
        }
    }

    fn test_limits() -> Limits {
        Limits {
            max_request: 1024,
            request_timeout: Duration::from_millis(300),
            write_timeout: Duration::from_millis(300),
            max_connections: 4,
        }
    }

    /// A responder on a runtime of its own thread (the tests talk to it with blocking
    /// sockets, as a scraper would).
    struct Running {
        addr: SocketAddr,
        stats: Arc<Stats>,
        _runtime: tokio::runtime::Runtime,
    }

    fn start(limits: Limits) -> Running {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let stats = Arc::new(Stats::default());
        let addr = runtime.block_on(async {
            let listener = bind("127.0.0.1:0".parse().expect("addr"))
                .await
                .expect("bind");
            let addr = listener.local_addr().expect("local addr");
            spawn(listener, Arc::new(Echo), Arc::clone(&stats), limits);
            addr
        });
        Running {
            addr,
            stats,
            _runtime: runtime,
        }
    }

    impl Running {
        fn connect(&self) -> StdStream {
            let s = StdStream::connect(self.addr).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            s
        }

        /// Sends `request`, returns everything the responder sent until it closed.
        fn exchange(&self, request: &[u8]) -> String {
            let mut s = self.connect();
            // The responder may answer and close before taking all of an oversized request.
            let _ = s.write_all(request);
            read_all(&mut s)
        }

        fn rejected(&self) -> u64 {
            self.stats.metrics_requests_rejected.load(Ordering::Relaxed)
        }

        fn answered(&self) -> u64 {
            self.stats.metrics_requests.load(Ordering::Relaxed)
        }
    }

    fn read_all(s: &mut StdStream) -> String {
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    fn status(answer: &str) -> Option<u16> {
        answer
            .strip_prefix("HTTP/1.1 ")?
            .split(' ')
            .next()?
            .parse()
            .ok()
    }

    #[test]
    fn get_head_and_unknown_paths() {
        let r = start(test_limits());
        let a = r.exchange(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(status(&a), Some(200), "{a}");
        assert!(a.contains("\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"));
        assert!(a.contains("\r\nContent-Length: 4\r\n"), "{a}");
        assert!(a.ends_with("\r\n\r\nm 1\n"), "{a}");
        // A query string is not part of the path; HTTP/1.0 is answered too.
        let a = r.exchange(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n");
        assert_eq!(status(&a), Some(200), "{a}");
        let a = r.exchange(b"HEAD /metrics HTTP/1.1\r\n\r\n");
        assert_eq!(status(&a), Some(200));
        assert!(a.ends_with("\r\n\r\n"), "no body for HEAD: {a}");
        let a = r.exchange(b"GET /nope HTTP/1.1\r\n\r\n");
        assert_eq!(status(&a), Some(404));
        let a = r.exchange(b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(status(&a), Some(405));
        assert!(a.contains("\r\nAllow: GET, HEAD\r\n"));
        assert_eq!(r.answered(), 5);
        assert_eq!(r.rejected(), 0);
    }

    #[test]
    fn garbage_gets_400_and_the_responder_keeps_serving() {
        let r = start(test_limits());
        let garbage: [&[u8]; 6] = [
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", // a TLS ClientHello
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",             // the HTTP/2 preface
            b"GET /metrics HTTP/9.9\r\n\r\n",
            b"GET metrics HTTP/1.1\r\n\r\n",
            b"\0\0\0\0\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\nBad Header\r\n\r\n",
        ];
        for bytes in garbage {
            let a = r.exchange(bytes);
            assert_eq!(status(&a), Some(400), "{bytes:?}: {a}");
        }
        assert_eq!(r.rejected(), 6);
        // Random bytes, whatever they are: an answer or a close, never a hang or a crash.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..50 {
            let bytes: Vec<u8> = (0..64)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            let a = r.exchange(&bytes);
            assert!(a.is_empty() || status(&a).is_some(), "{a}");
        }
        let a = r.exchange(b"GET /metrics HTTP/1.1\r\n\r\n");
        assert_eq!(status(&a), Some(200), "still serving: {a}");
    }

    #[test]
    fn oversized_requests_get_431() {
        let r = start(test_limits());
        let long_line = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(100_000));
        let a = r.exchange(long_line.as_bytes());
        assert_eq!(status(&a), Some(431), "{a}");
        let mut many = String::from("GET /metrics HTTP/1.1\r\n");
        for i in 0..40 {
            many.push_str(&format!("x{i}: y\r\n"));
        }
        many.push_str("\r\n");
        assert!(
            many.len() < 1024,
            "within the size limit, over the header limit"
        );
        let a = r.exchange(many.as_bytes());
        assert_eq!(status(&a), Some(431), "{a}");
        assert_eq!(r.rejected(), 2);
        assert_eq!(r.answered(), 0);
    }

    #[test]
    fn slow_clients_get_408_without_holding_up_others() {
        let r = start(test_limits());
        // Slowloris: a head that never ends.
        let mut slow = r.connect();
        slow.write_all(b"GET /metrics HTTP/1.1\r\nX: ")
            .expect("write");
        // Silent: connects and sends nothing.
        let mut silent = r.connect();
        // Meanwhile a scraper is answered at once.
        let a = r.exchange(b"GET /metrics HTTP/1.1\r\n\r\n");
        assert_eq!(status(&a), Some(200), "{a}");
        let a = read_all(&mut slow);
        assert_eq!(status(&a), Some(408), "{a}");
        let a = read_all(&mut silent);
        assert_eq!(status(&a), Some(408), "{a}");
        assert_eq!(r.rejected(), 2);
    }

    #[test]
    fn connections_beyond_the_limit_get_503_until_slots_free() {
        // A request timeout longer than the test: only the clients' closes free the slots.
        let r = start(Limits {
            request_timeout: Duration::from_secs(30),
            ..test_limits()
        });
        let held: Vec<StdStream> = (0..4).map(|_| r.connect()).collect();
        // Connections are accepted in order: the four hold every slot before the fifth.
        let a = r.exchange(b"GET /metrics HTTP/1.1\r\n\r\n");
        assert_eq!(status(&a), Some(503), "{a}");
        assert_eq!(r.rejected(), 1);
        drop(held);
        // The parked connections end (closed by their clients), freeing their slots.
        let started = std::time::Instant::now();
        loop {
            let a = r.exchange(b"GET /metrics HTTP/1.1\r\n\r\n");
            if status(&a) == Some(200) {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "slots never freed: {a}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn a_client_that_does_not_read_is_dropped() {
        struct Big;
        impl Routes for Big {
            fn get(&self, _: &str) -> Option<Reply> {
                Some(Reply {
                    status: 200,
                    content_type: "text/plain",
                    body: "x".repeat(32 << 20),
                })
            }
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let stats = Arc::new(Stats::default());
        let addr = runtime.block_on(async {
            let listener = bind("127.0.0.1:0".parse().expect("addr"))
                .await
                .expect("bind");
            let addr = listener.local_addr().expect("addr");
            spawn(listener, Arc::new(Big), Arc::clone(&stats), test_limits());
            addr
        });
        let mut s = StdStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        s.write_all(b"GET / HTTP/1.1\r\n\r\n").expect("write");
        // The runtime runs for 2 s only (the write timeout is 300 ms), while this client reads
        // nothing.
        runtime.block_on(async { tokio::time::sleep(Duration::from_secs(2)).await });
        // The responder gave up after its write timeout and closed: reading now ends with
        // the close, well short of the 32 MiB (only what the socket buffers held).
        let mut got = Vec::new();
        let ended = s.read_to_end(&mut got);
        assert!(ended.is_ok(), "the connection was not closed: {ended:?}");
        assert!(got.len() < 32 << 20, "{}", got.len());
        drop(runtime);
    }

    #[test]
    fn parse_cases() {
        assert_eq!(parse(b"GET /metrics HTTP/1.1\r\n"), Ok(None));
        assert_eq!(parse(b""), Ok(None));
        assert_eq!(
            parse(b"GET /healthz#x HTTP/1.1\r\n\r\n"),
            Ok(Some(Request::Get {
                path: "/healthz".into(),
                head_only: false
            }))
        );
        assert_eq!(
            parse(b"DELETE / HTTP/1.1\r\n\r\n"),
            Ok(Some(Request::OtherMethod))
        );
        assert_eq!(parse(b"GET * HTTP/1.1\r\n\r\n"), Err(Refusal::Malformed));
    }
}
