//! Tests of the HTTP/1 parser, fed segments the way the pipeline feeds it. One file per part of
//! the parser they exercise; fixtures and helpers here.

mod body;
mod fixtures;
mod head;
mod lenient;
mod matching;
mod properties;
mod stream;

use super::{ExchangeEnd, FeedReport, Http1Stream, HttpExchange, StreamState};
use crate::protocols::segment::{Direction, Role, Segment};
use ExchangeEnd::{Complete, ConnectionClosed, Resynced};

const IN: Direction = Direction::Ingress;
const OUT: Direction = Direction::Egress;

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

type Summary = (String, String, Option<u16>, u64, u64, ExchangeEnd);

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
