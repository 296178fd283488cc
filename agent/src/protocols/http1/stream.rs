//! The per-connection state machine: both directions of a connection followed segment by
//! segment (message boundary, head, body, lost), the connection classified as HTTP or not, and
//! the role learnt from the first request. Heads are read in [`super::head`], bodies followed
//! in [`super::body`], requests matched to responses in [`super::matching`].

use std::collections::VecDeque;

use super::{
    ExchangeEnd, FeedReport, HttpExchange, Kind, StreamState,
    body::Body,
    head::{HeadParse, StartLine, parse_head, starts_message},
    matching::Pending,
};
use crate::protocols::segment::{Direction, Role, Segment};

/// Longest head we buffer across segments.
pub(super) const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Non-HTTP segments / captured bytes tolerated at the start of a connection we saw open.
const FRESH_DETECT_SEGMENTS: u32 = 4;
const FRESH_DETECT_BYTES: u64 = 8 * 1024;
/// Same for connections opened before the agent started, which may begin in the middle of a
/// large body: more patience before giving up.
const PICKUP_DETECT_SEGMENTS: u32 = 64;
const PICKUP_DETECT_BYTES: u64 = 1024 * 1024;

/// Per-direction reading position.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) enum ReadState {
    /// The next byte starts a message.
    Boundary,
    /// A head is being collected in `Reader::head`.
    Head,
    /// Inside a body. `msg` is the id of the pending exchange it belongs to (`None`: a response
    /// nobody asked for, followed only to stay in sync).
    Body { msg: Option<u64>, body: Body },
    /// Looking for a segment starting with a message (new connection of unknown position, or
    /// after an end was already inferred); resuming is not reported.
    #[default]
    Seek,
    /// Lost sync; resuming is reported as a resync.
    Lost,
}

#[derive(Debug, Default)]
pub(super) struct Reader {
    pub(super) state: ReadState,
    /// Bytes of a head split over segments (empty otherwise).
    pub(super) head: Vec<u8>,
    /// Timestamp and thread of the segment holding the buffered head's first byte.
    head_ts: u64,
    head_tid: u32,
    /// What the buffered head's start line told us so far.
    head_start: StartLine,
    /// Timestamp and sequence number of the last segment of this direction (`0`: none yet).
    pub(super) last_ts: u64,
    pub(super) last_seq: u64,
}

/// Outcome of one step of the per-segment loop.
pub(super) enum Step {
    /// Go on at this offset of the segment.
    At(u64),
    /// Nothing more to do with this segment.
    Stop,
}

/// HTTP/1.x parser for one TCP connection.
#[derive(Debug)]
pub struct Http1Stream {
    pub(super) state: StreamState,
    pub(super) role: Option<Role>,
    /// We saw the connection open (role hint given): it starts at a message boundary.
    fresh: bool,
    closed: bool,
    detect_segments: u32,
    detect_bytes: u64,
    /// Segments fed so far (sequence numbers start at 1).
    pub(super) seq: u64,
    pub(super) next_id: u64,
    /// Indexed by [`Direction::index`].
    pub(super) readers: [Reader; 2],
    pub(super) pending: VecDeque<Pending>,
    /// Heads that could not be read before the connection was known to be HTTP: reported
    /// once it is (a connection found not to be HTTP is counted as such instead).
    invalid_heads_unreported: u32,
}

impl Http1Stream {
    /// `role_hint`: from accept()/connect() when the kernel saw it; `None` for connections
    /// opened before the agent started (which may be picked up in the middle of a message).
    pub fn new(role_hint: Option<Role>) -> Self {
        let initial = if role_hint.is_some() {
            ReadState::Boundary
        } else {
            ReadState::Seek
        };
        let reader = || Reader {
            state: initial,
            ..Reader::default()
        };
        Self {
            state: StreamState::Detecting,
            role: role_hint,
            fresh: role_hint.is_some(),
            closed: false,
            detect_segments: 0,
            detect_bytes: 0,
            seq: 0,
            next_id: 0,
            readers: [reader(), reader()],
            pending: VecDeque::new(),
            invalid_heads_unreported: 0,
        }
    }

    pub fn state(&self) -> StreamState {
        self.state
    }

    pub fn role(&self) -> Option<Role> {
        self.role
    }

    /// Gives back the buffers the connection holds between exchanges (the queue of requests
    /// awaiting answers, a split head's bytes) when they are empty: an idle keep-alive
    /// connection would keep ~1 KB it may not use for minutes (issue 13: 10,000 of them).
    pub fn release_idle_buffers(&mut self) {
        if self.pending.is_empty() && self.pending.capacity() > 0 {
            self.pending = VecDeque::new();
        }
        for r in &mut self.readers {
            if r.head.is_empty() && r.head.capacity() > 0 {
                r.head = Vec::new();
            }
        }
    }

    /// HTTP, open, between exchanges: nothing pending, both directions at a message boundary.
    pub fn idle(&self) -> bool {
        self.state == StreamState::Http
            && !self.closed
            && self.pending.is_empty()
            && self
                .readers
                .iter()
                .all(|r| r.state == ReadState::Boundary && r.head.is_empty())
    }

    /// A request is still waiting for (the end of) its response.
    pub fn awaits_response(&self) -> bool {
        !self.closed && !self.pending.is_empty()
    }

    /// Feeds one segment; completed exchanges are appended to `out`.
    pub fn feed(&mut self, seg: Segment<'_>, out: &mut Vec<HttpExchange>) -> FeedReport {
        let mut report = FeedReport::default();
        if self.closed || self.state == StreamState::NotHttp {
            return report;
        }
        let total = seg.len.max(seg.data.len() as u64);
        if total == 0 {
            return report;
        }
        self.seq = self.seq.saturating_add(1);
        let d = seg.direction.index();
        let detecting = self.state == StreamState::Detecting;

        self.process(&seg, total, &mut report, out);

        let reader = &mut self.readers[d];
        reader.last_ts = seg.ts_ns;
        reader.last_seq = self.seq;

        if detecting && self.state == StreamState::Detecting {
            // A head still being collected is a valid prefix: it costs bytes, not segments.
            if reader.state != ReadState::Head {
                self.detect_segments += 1;
            }
            self.detect_bytes = self.detect_bytes.saturating_add(seg.data.len() as u64);
            let (max_segments, max_bytes) = if self.fresh {
                (FRESH_DETECT_SEGMENTS, FRESH_DETECT_BYTES)
            } else {
                (PICKUP_DETECT_SEGMENTS, PICKUP_DETECT_BYTES)
            };
            if self.detect_segments >= max_segments || self.detect_bytes >= max_bytes {
                self.state = StreamState::NotHttp;
                self.pending.clear();
                self.release();
                report.became_not_http = true;
            }
        }
        if self.state == StreamState::Http {
            report.invalid_heads += std::mem::take(&mut self.invalid_heads_unreported);
        }
        report
    }

    /// A head neither parser could read: counted once the connection is known to be HTTP.
    fn invalid_head(&mut self, d: usize) {
        self.invalid_heads_unreported = self.invalid_heads_unreported.saturating_add(1);
        self.lose(d);
    }

    /// The connection ended: emits every request still pending. A close-delimited response
    /// completes here; anything else unfinished ends with [`ExchangeEnd::ConnectionClosed`].
    /// End timestamps come from the last segments seen, not from `_ts_ns`.
    pub fn close(&mut self, _ts_ns: u64, out: &mut Vec<HttpExchange>) {
        if self.closed {
            return;
        }
        self.closed = true;
        for d in 0..2 {
            if let ReadState::Body {
                msg,
                body: Body::UntilClose,
            } = self.readers[d].state
            {
                let ts = self.readers[d].last_ts;
                self.message_done(d, Kind::Response, msg, ts, out);
            }
        }
        while let Some(p) = self.pending.pop_front() {
            let end = if p.response_done {
                if p.inferred {
                    ExchangeEnd::Resynced
                } else {
                    ExchangeEnd::Complete
                }
            } else {
                ExchangeEnd::ConnectionClosed
            };
            self.emit(p, end, out);
        }
        self.release();
    }

    /// Frees per-direction buffers (the stream will not parse again).
    pub(super) fn release(&mut self) {
        for r in &mut self.readers {
            r.head = Vec::new();
            r.state = ReadState::Seek;
        }
    }

    fn kind_of(&self, d: usize) -> Kind {
        match (self.role, d) {
            (None, _) | (Some(Role::Server), 0) | (Some(Role::Client), 1) => Kind::Request,
            _ => Kind::Response,
        }
    }

    /// Walks one segment of direction `d`.
    fn process(
        &mut self,
        seg: &Segment<'_>,
        total: u64,
        report: &mut FeedReport,
        out: &mut Vec<HttpExchange>,
    ) {
        let d = seg.direction.index();
        let mut pos = 0u64;
        while pos < total && self.state != StreamState::NotHttp {
            let kind = self.kind_of(d);
            let step = match self.readers[d].state {
                ReadState::Seek | ReadState::Lost => {
                    if pos == 0 && self.resume(d, kind, seg.data, report, out) {
                        Step::At(0)
                    } else {
                        Step::Stop
                    }
                }
                ReadState::Boundary => self.at_boundary(d, kind, seg, pos, total, report, out),
                ReadState::Head => self.continue_head(d, kind, seg, total, report, out),
                ReadState::Body { msg, body } => {
                    self.in_body(d, kind, msg, body, seg, pos, total, out)
                }
            };
            match step {
                Step::At(p) => pos = p,
                Step::Stop => return,
            }
        }
    }

    /// A lost direction gets a segment: resume when its data starts a message.
    fn resume(
        &mut self,
        d: usize,
        kind: Kind,
        data: &[u8],
        report: &mut FeedReport,
        out: &mut Vec<HttpExchange>,
    ) -> bool {
        if !starts_message(kind, data) {
            return false;
        }
        if kind == Kind::Response {
            let waiting = self.pending.len();
            if let Some(front) = self.pending.front_mut()
                && front.response_start_ns.is_some()
                && !front.response_done
            {
                // We lost track inside this response. A status line now only means a new
                // response if another request is waiting for one; otherwise it is just body
                // bytes that happen to look like one.
                if waiting < 2 {
                    return false;
                }
                front.response_done = true;
                front.response_end_ns = Some(self.readers[d].last_ts);
                front.inferred = true;
                report.resynced = true;
                self.try_emit(out);
            }
        }
        if self.readers[d].state == ReadState::Lost {
            report.resynced = true;
        }
        self.readers[d].state = ReadState::Boundary;
        true
    }

    #[allow(
        clippy::too_many_arguments,
        reason = "internal step function; the arguments are the segment walk's state"
    )]
    fn at_boundary(
        &mut self,
        d: usize,
        kind: Kind,
        seg: &Segment<'_>,
        pos: u64,
        total: u64,
        report: &mut FeedReport,
        out: &mut Vec<HttpExchange>,
    ) -> Step {
        // The next message starts in bytes we do not have.
        let Some(buf) = usize::try_from(pos).ok().and_then(|p| seg.data.get(p..)) else {
            self.lose(d);
            return Step::Stop;
        };
        if buf.is_empty() {
            self.lose(d);
            return Step::Stop;
        }
        let captured_to_end = seg.data.len() as u64 == total;
        match parse_head(kind, buf) {
            HeadParse::Complete(n, head) => {
                self.start_message(d, head, seg.first_ts_ns, seg.tid, seg.ts_ns, report, out);
                Step::At(pos.saturating_add(n as u64))
            }
            HeadParse::Partial(start) => {
                if !captured_to_end || buf.len() >= MAX_HEAD_BYTES {
                    report.headers_truncated = true;
                    self.truncated_head(d, kind, start, seg.ts_ns, seg.tid, report, out);
                    self.lose(d);
                } else {
                    if start.recognized {
                        self.confirm(d);
                    }
                    let r = &mut self.readers[d];
                    r.head.clear();
                    r.head.extend_from_slice(buf);
                    r.head_ts = seg.first_ts_ns;
                    r.head_tid = seg.tid;
                    r.head_start = start;
                    r.state = ReadState::Head;
                }
                Step::Stop
            }
            HeadParse::Invalid => {
                self.invalid_head(d);
                Step::Stop
            }
        }
    }

    /// A head started in an earlier segment; this segment (from offset 0) continues it.
    fn continue_head(
        &mut self,
        d: usize,
        kind: Kind,
        seg: &Segment<'_>,
        total: u64,
        report: &mut FeedReport,
        out: &mut Vec<HttpExchange>,
    ) -> Step {
        let mut head = std::mem::take(&mut self.readers[d].head);
        let (start_ts, tid) = (self.readers[d].head_ts, self.readers[d].head_tid);
        let old = head.len();
        let take = seg.data.len().min(MAX_HEAD_BYTES.saturating_sub(old));
        head.extend_from_slice(seg.data.get(..take).unwrap_or_default());
        // Re-parsing the whole buffer for every piece would be quadratic in the head size (a
        // peer can dribble a head byte by byte). A head can only complete where the new bytes
        // (with 3 bytes of look-back) hold an empty line, and its start line only becomes
        // readable at a space or newline: parse only then.
        let known = self.readers[d].head_start;
        let new_bytes = head.get(old.saturating_sub(3)..).unwrap_or_default();
        let may_complete = new_bytes.windows(2).any(|w| w == b"\n\n" || w == b"\n\r");
        let may_recognize = !known.recognized && new_bytes.iter().any(|&b| b == b' ' || b == b'\n');
        let parsed = if may_complete || may_recognize {
            parse_head(kind, &head)
        } else {
            HeadParse::Partial(known)
        };
        let step = match parsed {
            HeadParse::Complete(n, parsed) => match n.checked_sub(old) {
                Some(used) if used > 0 => {
                    self.start_message(d, parsed, start_ts, tid, seg.ts_ns, report, out);
                    Step::At(used as u64)
                }
                // Cannot happen (the buffered bytes alone were incomplete); stay safe anyway.
                _ => {
                    self.lose(d);
                    Step::Stop
                }
            },
            HeadParse::Partial(start) => {
                let truncated = take < seg.data.len()
                    || (seg.data.len() as u64) < total
                    || head.len() >= MAX_HEAD_BYTES;
                if truncated {
                    report.headers_truncated = true;
                    self.truncated_head(d, kind, start, start_ts, tid, report, out);
                    self.lose(d);
                } else if start.recognized {
                    self.readers[d].head_start = start;
                    self.confirm(d);
                }
                Step::Stop
            }
            HeadParse::Invalid => {
                self.invalid_head(d);
                Step::Stop
            }
        };
        if self.readers[d].state == ReadState::Head {
            self.readers[d].head = head;
        } else {
            head.clear();
            // Keep a small buffer for the next split head; give big ones back.
            if head.capacity() <= 4096 {
                self.readers[d].head = head;
            }
        }
        step
    }

    /// The direction can no longer tell where the next message starts.
    pub(super) fn lose(&mut self, d: usize) {
        let r = &mut self.readers[d];
        r.head.clear();
        r.state = if self.state == StreamState::Detecting {
            ReadState::Seek
        } else {
            ReadState::Lost
        };
    }

    /// A message start was recognised on direction `d`: this is HTTP, and if the role was
    /// unknown, a request on `d` decides it.
    pub(super) fn confirm(&mut self, d: usize) {
        if self.role.is_none() {
            self.role = Some(if d == Direction::Ingress.index() {
                Role::Server
            } else {
                Role::Client
            });
            // The other direction was looking for requests; it now carries responses.
            let other = &mut self.readers[1 - d];
            other.head.clear();
            other.state = ReadState::Seek;
        }
        if self.state == StreamState::Detecting {
            self.state = StreamState::Http;
        }
    }
}
