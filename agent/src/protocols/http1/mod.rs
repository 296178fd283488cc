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
mod tests;
