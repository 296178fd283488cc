//! Protocol parsers (sans-I/O: segments in, exchanges out) and the choice between them.
//!
//! Adding a protocol: a module here, a variant of [`Stream`] and of [`Outputs`], and the
//! compiler shows every place that must handle it.

pub mod http1;
pub mod postgres;
pub mod segment;

use self::{
    http1::{FeedReport, Http1Stream, HttpExchange, StreamState},
    postgres::{PgFeedReport, PgStatement, PgStream, PgStreamState, looks_like_postgres},
    segment::{Role, Segment},
};

/// One connection's parser, chosen from its first captured bytes.
pub enum Stream {
    /// No captured byte seen yet; the role hint from accept()/connect(), if any.
    Undecided(Option<Role>),
    // Boxed: a connection map entry stays small whichever protocol it speaks.
    Http(Box<Http1Stream>),
    Postgres(Box<PgStream>),
    /// Neither protocol: further bytes are ignored.
    Unrecognized,
    /// Encrypted (TLS records, or PostgreSQL after its `SSLRequest` was accepted): these bytes
    /// are ignored; the plaintext may come from a TLS library's probes instead. The role, as
    /// far as known.
    Encrypted(Option<Role>),
}

/// What parsers produced, drained by the pipeline after each segment.
#[derive(Default)]
pub struct Outputs {
    pub http: Vec<HttpExchange>,
    pub postgres: Vec<PgStatement>,
}

impl Outputs {
    pub fn is_empty(&self) -> bool {
        self.http.is_empty() && self.postgres.is_empty()
    }
}

/// What happened to a segment, for counting.
#[derive(Default)]
pub struct StreamReport {
    pub http: FeedReport,
    pub postgres: PgFeedReport,
    /// The connection was given up as not a protocol we parse.
    pub unrecognized: bool,
    /// The connection turned out to be encrypted.
    pub encrypted: bool,
}

/// A TLS record header (content type, version 3.x): what a TLS connection's first bytes are.
pub fn looks_like_tls(data: &[u8]) -> bool {
    matches!(data, [0x14..=0x17, 0x03, 0x00..=0x04, ..])
}

impl Stream {
    pub fn new(role_hint: Option<Role>) -> Self {
        Self::Undecided(role_hint)
    }

    pub fn is_unrecognized(&self) -> bool {
        matches!(self, Self::Unrecognized)
    }

    /// No byte seen yet that tells the protocol.
    pub fn is_undecided(&self) -> bool {
        matches!(self, Self::Undecided(_))
    }

    pub fn is_encrypted(&self) -> bool {
        matches!(self, Self::Encrypted(_))
    }

    /// Which side the traced process is, as far as known (a new parser for the same
    /// connection's plaintext starts from it).
    pub fn role(&self) -> Option<Role> {
        match self {
            Self::Undecided(hint) | Self::Encrypted(hint) => *hint,
            Self::Http(s) => s.role(),
            Self::Postgres(s) => s.role(),
            Self::Unrecognized => None,
        }
    }

    /// An HTTP request is still waiting for (the end of) its response. (PostgreSQL clients do
    /// not half-close: their connections end when the kernel says so.)
    pub fn awaits_response(&self) -> bool {
        match self {
            Self::Http(s) => s.awaits_response(),
            Self::Undecided(_) | Self::Postgres(_) | Self::Unrecognized | Self::Encrypted(_) => {
                false
            }
        }
    }

    /// An idle connection gives back what its parser holds for the next exchange.
    pub fn release_idle_buffers(&mut self) {
        match self {
            Self::Http(s) => s.release_idle_buffers(),
            Self::Postgres(s) => s.release_idle_buffers(),
            Self::Undecided(_) | Self::Unrecognized | Self::Encrypted(_) => {}
        }
    }

    /// The process is the server side (it receives requests).
    pub fn serves(&self) -> bool {
        match self {
            Self::Http(s) => s.role() == Some(Role::Server),
            Self::Postgres(s) => s.role() == Some(Role::Server),
            Self::Undecided(_) | Self::Unrecognized | Self::Encrypted(_) => false,
        }
    }

    /// An HTTP connection between exchanges: no request waits for its answer and no message
    /// is partly read in either direction.
    pub fn http_idle(&self) -> bool {
        match self {
            Self::Http(s) => s.idle(),
            Self::Undecided(_) | Self::Postgres(_) | Self::Unrecognized | Self::Encrypted(_) => {
                false
            }
        }
    }

    pub fn feed(&mut self, seg: Segment<'_>, out: &mut Outputs) -> StreamReport {
        let mut report = StreamReport::default();
        if let Self::Undecided(hint) = *self {
            if seg.data.is_empty() {
                return report;
            }
            if looks_like_tls(seg.data) {
                *self = Self::Encrypted(hint);
                report.encrypted = true;
                return report;
            }
            // HTTP never passes the PostgreSQL check: its first bytes read as a length > 1 GiB.
            *self = if looks_like_postgres(seg.data, seg.direction) {
                Self::Postgres(Box::new(PgStream::new(hint)))
            } else {
                Self::Http(Box::new(Http1Stream::new(hint)))
            };
        }
        match self {
            Self::Http(s) => {
                report.http = s.feed(seg, &mut out.http);
                if s.state() == StreamState::NotHttp && report.http.became_not_http {
                    // Perhaps PostgreSQL picked up mid-stream: give it the next segments.
                    *self = Self::Postgres(Box::new(PgStream::new(None)));
                }
            }
            Self::Postgres(s) => {
                report.postgres = s.feed(seg, &mut out.postgres);
                match s.state() {
                    PgStreamState::NotPostgres => {
                        *self = Self::Unrecognized;
                        report.unrecognized = true;
                    }
                    PgStreamState::Encrypted => {
                        *self = Self::Encrypted(s.role());
                        report.encrypted = true;
                    }
                    _ => {}
                }
            }
            Self::Undecided(_) | Self::Unrecognized | Self::Encrypted(_) => {}
        }
        report
    }

    /// The connection ended: pending work is emitted. Returns true when its bytes were never
    /// recognised as a protocol we parse (an exchange that never started is not silently lost).
    pub fn close(&mut self, ts_ns: u64, out: &mut Outputs) -> bool {
        match self {
            Self::Http(s) => {
                s.close(ts_ns, &mut out.http);
                s.state() == StreamState::Detecting
            }
            Self::Postgres(s) => {
                s.close(ts_ns, &mut out.postgres);
                false
            }
            Self::Undecided(_) | Self::Unrecognized | Self::Encrypted(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocols::segment::Direction;

    fn seg(direction: Direction, data: &[u8]) -> Segment<'_> {
        Segment {
            direction,
            ts_ns: 1,
            first_ts_ns: 1,
            len: data.len() as u64,
            data,
            tid: 1,
        }
    }

    #[test]
    fn chooses_http_for_http() {
        for first in [
            &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            b"POST /a HTTP/1.1\r\n",
            b"PATCH /a HTTP/1.1\r\n",
            b"HEAD / HTTP/1.0\r\n",
        ] {
            let mut s = Stream::new(None);
            s.feed(seg(Direction::Ingress, first), &mut Outputs::default());
            assert!(
                matches!(s, Stream::Http(_)),
                "{:?}",
                String::from_utf8_lossy(first)
            );
        }
    }

    #[test]
    fn a_connection_closed_before_any_message_was_recognised_is_reported() {
        let mut out = Outputs::default();
        // HTTP/0.9: nginx and Python answer it, but it is no HTTP/1 message.
        let mut s = Stream::new(Some(Role::Server));
        s.feed(seg(Direction::Ingress, b"GET /\r\n"), &mut out);
        s.feed(seg(Direction::Egress, b"hello\n"), &mut out);
        assert!(s.close(2, &mut out));
        assert!(out.is_empty());
        // A recognised connection is not.
        let mut s = Stream::new(Some(Role::Server));
        s.feed(seg(Direction::Ingress, b"GET / HTTP/1.1\r\n\r\n"), &mut out);
        assert!(!s.close(2, &mut out));
        assert_eq!(out.http.len(), 1);
    }

    #[test]
    fn chooses_postgres_for_a_startup_message() {
        let ssl_request = b"\x00\x00\x00\x08\x04\xd2\x16\x2f";
        let mut s = Stream::new(Some(Role::Client));
        s.feed(seg(Direction::Egress, ssl_request), &mut Outputs::default());
        assert!(matches!(s, Stream::Postgres(_)));
    }

    #[test]
    fn garbage_ends_unrecognized_and_stays_quiet() {
        let mut s = Stream::new(Some(Role::Server));
        let mut out = Outputs::default();
        let mut unrecognized = 0;
        for i in 0..200u32 {
            let junk: Vec<u8> = (0..64u32)
                .map(|j| (i.wrapping_mul(31) ^ j.wrapping_mul(17)) as u8 | 0x80)
                .collect();
            unrecognized += u32::from(
                s.feed(seg(Direction::Ingress, &junk), &mut out)
                    .unrecognized,
            );
        }
        assert!(s.is_unrecognized());
        assert_eq!(unrecognized, 1, "given up once");
        assert!(out.is_empty());
    }
}
