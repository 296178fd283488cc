//! Requests matched to their responses: every request head queues a [`Pending`] exchange,
//! response heads answer the queue in order (pipelining included), and finished exchanges leave
//! it in request order as [`HttpExchange`]s. Where an end was lost, the other direction's next
//! message proves it ([`ExchangeEnd::Resynced`]).

use super::{
    ExchangeEnd, FeedReport, HttpExchange, HttpRequestInfo, Kind, StreamState,
    body::Framing,
    head::{Head, StartLine},
    stream::{Http1Stream, ReadState},
};

/// Requests waiting for their response; beyond this the oldest is given up.
pub(super) const MAX_PENDING: usize = 32;

/// A request waiting for its response (or for its own end).
#[derive(Debug)]
pub(super) struct Pending {
    id: u64,
    /// `None`: a request whose head could not be parsed; it only keeps responses matched FIFO.
    pub(super) request: Option<HttpRequestInfo>,
    pub(super) is_head: bool,
    is_connect: bool,
    /// Sequence number of the segment that completed the request head.
    pub(super) seq: u64,
    pub(super) request_start_ns: u64,
    pub(super) request_end_ns: u64,
    pub(super) tid: u32,
    pub(super) request_body_size: u64,
    request_done: bool,
    pub(super) status: Option<u16>,
    pub(super) response_start_ns: Option<u64>,
    pub(super) response_end_ns: Option<u64>,
    pub(super) response_body_size: u64,
    pub(super) response_done: bool,
    /// Some end was inferred rather than seen.
    pub(super) inferred: bool,
}

/// A request head that just started, before it becomes a [`Pending`].
struct NewRequest {
    pub(super) info: Option<HttpRequestInfo>,
    pub(super) is_head: bool,
    is_connect: bool,
    start_ns: u64,
    pub(super) tid: u32,
}

impl Http1Stream {
    /// A complete head: record it and set up its body.
    #[allow(
        clippy::too_many_arguments,
        reason = "internal step function; the arguments are the segment walk's state"
    )]
    pub(super) fn start_message(
        &mut self,
        d: usize,
        head: Head,
        start_ts: u64,
        tid: u32,
        ts: u64,
        report: &mut FeedReport,
        out: &mut Vec<HttpExchange>,
    ) {
        self.confirm(d);
        match head {
            Head::Request(h) => {
                let is_head = h.info.method == "HEAD";
                let is_connect = h.info.method == "CONNECT";
                let id = self.begin_request(
                    d,
                    NewRequest {
                        info: Some(h.info),
                        is_head,
                        is_connect,
                        start_ns: start_ts,
                        tid,
                    },
                    report,
                    out,
                );
                self.start_body(d, Kind::Request, Some(id), h.framing, ts, out);
            }
            Head::Response(h) => {
                let target = self.begin_response(d, report, out);
                let code = h.code;
                if (100..200).contains(&code) && code != 101 {
                    // Interim response: the final one follows on the same exchange.
                    self.readers[d].state = ReadState::Boundary;
                    return;
                }
                let (mut is_head, mut is_connect) = (false, false);
                if let Some(p) = target.and_then(|id| self.pending_mut(id)) {
                    p.status = Some(code);
                    p.response_start_ns = Some(start_ts);
                    p.response_end_ns = Some(ts);
                    is_head = p.is_head;
                    is_connect = p.is_connect;
                }
                if code == 101 || (is_connect && (200..300).contains(&code)) {
                    // Upgrade or tunnel: the connection stops speaking HTTP/1.
                    self.message_done(d, Kind::Response, target, ts, out);
                    self.state = StreamState::NotHttp;
                    self.release();
                    return;
                }
                let framing = if is_head || code == 204 || code == 304 {
                    Framing::None
                } else {
                    h.framing
                };
                self.start_body(d, Kind::Response, target, framing, ts, out);
            }
        }
    }

    /// A head that the capture (or the head buffer) cut: the message is dropped, but a request
    /// keeps a placeholder so responses stay matched, and a response keeps its status.
    #[allow(
        clippy::too_many_arguments,
        reason = "internal step function; the arguments are the segment walk's state"
    )]
    pub(super) fn truncated_head(
        &mut self,
        d: usize,
        kind: Kind,
        start: StartLine,
        start_ts: u64,
        tid: u32,
        report: &mut FeedReport,
        out: &mut Vec<HttpExchange>,
    ) {
        if start.recognized {
            self.confirm(d);
        } else if self.role.is_none() {
            return;
        }
        match kind {
            Kind::Request => {
                self.begin_request(
                    d,
                    NewRequest {
                        info: None,
                        is_head: start.is_head,
                        is_connect: false,
                        start_ns: start_ts,
                        tid,
                    },
                    report,
                    out,
                );
            }
            Kind::Response => {
                let target = self.begin_response(d, report, out);
                if let Some(code) = start.code.filter(|c| *c >= 200)
                    && let Some(p) = target.and_then(|id| self.pending_mut(id))
                {
                    p.status = Some(code);
                    p.response_start_ns = Some(start_ts);
                    p.response_end_ns = Some(start_ts);
                }
            }
        }
    }

    /// A new request head on direction `d`. Ends what the request's arrival proves ended, then
    /// queues it. Returns its id.
    fn begin_request(
        &mut self,
        d: usize,
        new: NewRequest,
        report: &mut FeedReport,
        out: &mut Vec<HttpExchange>,
    ) -> u64 {
        // The previous request was lost in its body: it ended before this one.
        let last_ts = self.readers[d].last_ts;
        if let Some(back) = self.pending.back_mut()
            && !back.request_done
        {
            back.request_done = true;
            back.request_end_ns = last_ts.max(back.request_start_ns);
            back.inferred = true;
            report.resynced = true;
        }
        // Direction switch: the response we lost track of ended at the last segment the other
        // direction carried before this request.
        let rd = 1 - d;
        let other = &self.readers[rd];
        if matches!(other.state, ReadState::Lost | ReadState::Seek) {
            let (other_ts, other_seq) = (other.last_ts, other.last_seq);
            if let Some(front) = self.pending.front_mut()
                && front.request_done
                && !front.response_done
                && other_seq > front.seq
            {
                front.response_done = true;
                front.response_end_ns = Some(other_ts);
                front.inferred = true;
                report.resynced = true;
                // Already accounted for: the next status line resumes silently.
                self.readers[rd].state = ReadState::Seek;
            }
            self.try_emit(out);
        }

        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        self.pending.push_back(Pending {
            id,
            request: new.info,
            is_head: new.is_head,
            is_connect: new.is_connect,
            seq: self.seq,
            request_start_ns: new.start_ns,
            request_end_ns: new.start_ns,
            tid: new.tid,
            request_body_size: 0,
            request_done: false,
            status: None,
            response_start_ns: None,
            response_end_ns: None,
            response_body_size: 0,
            response_done: false,
            inferred: false,
        });
        if self.pending.len() > MAX_PENDING
            && let Some(oldest) = self.pending.pop_front()
        {
            log::debug!("http1: more than {MAX_PENDING} requests without response");
            self.emit(oldest, ExchangeEnd::ConnectionClosed, out);
        }
        id
    }

    /// A new response head on direction `d`; returns the pending exchange it answers.
    fn begin_response(
        &mut self,
        d: usize,
        report: &mut FeedReport,
        out: &mut Vec<HttpExchange>,
    ) -> Option<u64> {
        let qd = 1 - d;
        let request_lost = matches!(self.readers[qd].state, ReadState::Lost | ReadState::Seek);
        let request_last_ts = self.readers[qd].last_ts;
        let front = self.pending.front_mut()?;
        if front.response_done {
            // Answered already (early response, request still streaming): nobody asked.
            return None;
        }
        if !front.request_done && request_lost {
            // We lost the request in its body; the response proves it ended.
            front.request_done = true;
            front.request_end_ns = request_last_ts.max(front.request_start_ns);
            front.inferred = true;
            report.resynced = true;
            self.readers[qd].state = ReadState::Seek;
        }
        let id = front.id;
        self.try_emit(out);
        Some(id)
    }

    /// The message on direction `d` ended with the segment stamped `ts`.
    pub(super) fn message_done(
        &mut self,
        d: usize,
        kind: Kind,
        msg: Option<u64>,
        ts: u64,
        out: &mut Vec<HttpExchange>,
    ) {
        self.readers[d].state = ReadState::Boundary;
        let Some(p) = msg.and_then(|id| self.pending_mut(id)) else {
            return;
        };
        match kind {
            Kind::Request => {
                p.request_done = true;
                p.request_end_ns = ts;
            }
            Kind::Response => {
                p.response_done = true;
                p.response_end_ns = Some(ts);
            }
        }
        self.try_emit(out);
    }

    pub(super) fn pending_mut(&mut self, id: u64) -> Option<&mut Pending> {
        self.pending.iter_mut().find(|p| p.id == id)
    }

    /// Emits finished exchanges from the front of the queue, in request order.
    pub(super) fn try_emit(&mut self, out: &mut Vec<HttpExchange>) {
        while self
            .pending
            .front()
            .is_some_and(|p| p.request_done && p.response_done)
        {
            let Some(p) = self.pending.pop_front() else {
                break;
            };
            let end = if p.inferred {
                ExchangeEnd::Resynced
            } else {
                ExchangeEnd::Complete
            };
            self.emit(p, end, out);
        }
    }

    pub(super) fn emit(&self, p: Pending, end: ExchangeEnd, out: &mut Vec<HttpExchange>) {
        let (Some(role), Some(request)) = (self.role, p.request) else {
            return;
        };
        out.push(HttpExchange {
            role,
            request,
            status: p.status,
            request_start_ns: p.request_start_ns,
            request_end_ns: p.request_end_ns,
            response_start_ns: p.response_start_ns,
            response_end_ns: p.response_end_ns,
            request_body_size: p.request_body_size,
            response_body_size: p.response_body_size,
            tid: p.tid,
            end,
        });
    }
}
