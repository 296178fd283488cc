//! Message framing: every message is `tag, int32 length, body` (startup packets have no tag).
//! Bodies are skipped by length; only those we read are kept, straight from the segment when
//! whole in it, else copied into a bounded buffer. Where the next header lies in bytes we do not
//! have, the direction is lost until a plausible run of messages starts a segment.

use super::{
    MAX_QUERY_BYTES, PgFeedReport, PgStatement, PgStreamState,
    frontend::{Exec, Item, Pending},
    stream::PgStream,
    wire::{self, Kind},
};
use crate::protocols::segment::Segment;

/// Bytes of one message body we copy when it spans segments.
const MAX_KEEP: usize = MAX_QUERY_BYTES + 512;

/// Per-direction reading position.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ReadState {
    /// Reading a message header (`hdr_len` bytes of it so far).
    Header,
    /// Inside a message body.
    Body,
    /// Waiting for the server's one-byte answer to SSLRequest / GSSENCRequest.
    SslAnswer,
    /// Unknown position (connection picked up mid-stream, or the end of what we lost was
    /// already accounted for): resuming is not reported.
    Seek,
    /// Lost sync: resuming is reported.
    Lost,
}

#[derive(Debug)]
pub(super) struct Reader {
    pub(super) state: ReadState,
    /// Startup phase of the frontend: length-prefixed packets without a tag byte.
    pub(super) untagged: bool,
    hdr: [u8; 5],
    pub(super) hdr_len: usize,
    /// The message being read.
    pub(super) tag: u8,
    msg_len: u32,
    remaining: u64,
    keep: bool,
    pub(super) truncated: bool,
    pub(super) start_ts: u64,
    start_tid: u32,
    /// Kept body bytes of a message split over segments (bounded by [`MAX_KEEP`]).
    pub(super) body: Vec<u8>,
    /// Timestamp and sequence number of this direction's last segment (0: none yet).
    pub(super) last_ts: u64,
    pub(super) last_seq: u64,
}

impl Reader {
    pub(super) fn new(state: ReadState, untagged: bool) -> Self {
        Self {
            state,
            untagged,
            hdr: [0; 5],
            hdr_len: 0,
            tag: 0,
            msg_len: 0,
            remaining: 0,
            keep: false,
            truncated: false,
            start_ts: 0,
            start_tid: 0,
            body: Vec::new(),
            last_ts: 0,
            last_seq: 0,
        }
    }

    pub(super) fn reset(&mut self, state: ReadState) {
        self.state = state;
        self.hdr_len = 0;
        self.remaining = 0;
        self.truncated = false;
        self.body.clear();
    }
}

/// A complete message as the protocol layer sees it.
pub(super) struct Msg<'a> {
    pub(super) tag: u8,
    /// Length field (counting itself).
    pub(super) len: u32,
    /// Body when kept (possibly only a prefix: `cut`), else empty.
    pub(super) body: &'a [u8],
    #[allow(dead_code, reason = "shown in Debug output of a message")]
    pub(super) cut: bool,
    /// Timestamp and thread of the segment holding the first byte.
    pub(super) start_ts: u64,
    pub(super) tid: u32,
    /// Timestamp of the segment holding the last byte.
    pub(super) end_ts: u64,
}

impl PgStream {
    /// Walks one segment of direction `d`.
    pub(super) fn process(
        &mut self,
        seg: &Segment<'_>,
        total: u64,
        report: &mut PgFeedReport,
        out: &mut Vec<PgStatement>,
    ) {
        let d = seg.direction.index();
        let mut pos = 0u64;
        while pos < total && self.parsing() {
            let next = match self.readers[d].state {
                ReadState::Seek | ReadState::Lost => {
                    if pos == 0 && self.resume(d, seg.data, total, report) {
                        Some(0)
                    } else {
                        None
                    }
                }
                ReadState::SslAnswer => self.ssl_answer(d, seg.data, pos, report),
                ReadState::Header => self.read_header(d, seg, pos, total, report, out),
                ReadState::Body => Some(self.read_body(d, seg, pos, total, report, out)),
            };
            match next {
                Some(p) => pos = p,
                None => return,
            }
        }
    }

    /// A direction of unknown position gets a segment: resume when its data starts with a
    /// plausible message boundary.
    fn resume(&mut self, d: usize, data: &[u8], total: u64, report: &mut PgFeedReport) -> bool {
        let kind = self.kind_of(d);
        if self.state == PgStreamState::Detecting
            && kind != Some(Kind::Backend)
            && wire::starts_with_startup(data)
        {
            // A connection that opened just as we started watching.
            self.learn_role(d, Kind::Frontend);
            let r = &mut self.readers[d];
            r.reset(ReadState::Header);
            r.untagged = true;
            return true;
        }
        let fits = |k| wire::plausible_chain(k, data, total);
        let k = match kind {
            Some(k) if fits(k) => k,
            Some(_) => return false,
            None => match (fits(Kind::Frontend), fits(Kind::Backend)) {
                (true, false) => Kind::Frontend,
                (false, true) => Kind::Backend,
                // Neither, or ambiguous: wait for a segment that tells.
                _ => return false,
            },
        };
        self.learn_role(d, k);
        let r = &mut self.readers[d];
        let was_lost = r.state == ReadState::Lost;
        r.reset(ReadState::Header);
        r.untagged = false;
        if was_lost {
            report.resynced = true;
            if k == Kind::Backend {
                if self.backend_lost {
                    self.backend_resumed = true;
                }
                self.backend_lost = false;
            }
        }
        self.confirm(report);
        true
    }

    /// The server's answer to SSLRequest / GSSENCRequest.
    fn ssl_answer(
        &mut self,
        d: usize,
        data: &[u8],
        pos: u64,
        report: &mut PgFeedReport,
    ) -> Option<u64> {
        let Some(&b) = usize::try_from(pos).ok().and_then(|p| data.get(p)) else {
            // The answer is in uncaptured bytes: it was almost certainly a refusal followed by
            // more messages (an acceptance is one byte alone), but we cannot tell where we are.
            self.lose(d, report);
            return None;
        };
        match b {
            wire::ENCRYPTION_REFUSED => {
                self.readers[d].reset(ReadState::Header);
                Some(pos + 1)
            }
            wire::SSL_ACCEPTED | wire::GSSENC_ACCEPTED => {
                self.encrypted(report);
                None
            }
            // A server that does not understand the request answers with an ErrorResponse.
            wire::ERROR_RESPONSE => {
                self.readers[d].reset(ReadState::Header);
                Some(pos)
            }
            _ => {
                self.invalid(d, report);
                None
            }
        }
    }

    fn read_header(
        &mut self,
        d: usize,
        seg: &Segment<'_>,
        pos: u64,
        total: u64,
        report: &mut PgFeedReport,
        out: &mut Vec<PgStatement>,
    ) -> Option<u64> {
        let Some(kind) = self.kind_of(d) else {
            self.lose(d, report);
            return None;
        };
        let r = &mut self.readers[d];
        let need = if r.untagged { 4 } else { 5 };
        if r.hdr_len == 0 {
            r.start_ts = seg.ts_ns;
            r.start_tid = seg.tid;
        }
        let mut p = pos;
        while r.hdr_len < need {
            let Some(&b) = usize::try_from(p).ok().and_then(|i| seg.data.get(i)) else {
                break;
            };
            if let Some(slot) = r.hdr.get_mut(r.hdr_len) {
                *slot = b;
            }
            r.hdr_len += 1;
            p += 1;
        }
        if r.hdr_len < need {
            if p < total {
                // The rest of the header is in bytes we do not have.
                self.lose(d, report);
                return None;
            }
            return Some(p);
        }
        r.hdr_len = 0;
        let (tag, len, valid) = if r.untagged {
            let len = wire::be_u32(&r.hdr, 0).unwrap_or(0);
            (0, len, (8..=wire::MAX_STARTUP_LEN).contains(&len))
        } else {
            let tag = r.hdr[0];
            let len = wire::be_u32(&r.hdr, 1).unwrap_or(0);
            (tag, len, wire::header_ok(kind, tag, len))
        };
        if !valid {
            if !(4..=wire::MAX_MESSAGE_LEN).contains(&len) {
                report.hostile_length = true;
            }
            self.invalid(d, report);
            return None;
        }
        r.tag = tag;
        r.msg_len = len;
        r.remaining = u64::from(len) - 4;
        r.keep = r.untagged || keeps_body(kind, tag);
        r.truncated = false;
        r.body.clear();
        r.state = ReadState::Body;
        if r.remaining == 0 {
            self.finish_message(d, seg.ts_ns, &[], false, report, out);
        }
        Some(p)
    }

    fn read_body(
        &mut self,
        d: usize,
        seg: &Segment<'_>,
        pos: u64,
        total: u64,
        report: &mut PgFeedReport,
        out: &mut Vec<PgStatement>,
    ) -> u64 {
        let r = &mut self.readers[d];
        let take = r.remaining.min(total.saturating_sub(pos));
        let end = pos + take;
        if r.keep {
            let clamp = |v: u64| usize::try_from(v).unwrap_or(usize::MAX).min(seg.data.len());
            let chunk = seg.data.get(clamp(pos)..clamp(end)).unwrap_or_default();
            if r.body.is_empty() && !r.truncated && take == r.remaining {
                // The whole (rest of the) message is in this segment: read it in place.
                let kept = chunk.get(..MAX_KEEP).unwrap_or(chunk);
                let cut = (kept.len() as u64) < take;
                r.remaining = 0;
                self.finish_message(d, seg.ts_ns, kept, cut, report, out);
                return end;
            }
            if !r.truncated {
                let room = MAX_KEEP.saturating_sub(r.body.len());
                let piece = chunk.get(..room).unwrap_or(chunk);
                r.body.extend_from_slice(piece);
                if (piece.len() as u64) < take {
                    r.truncated = true;
                }
            }
        }
        r.remaining -= take;
        if r.remaining == 0 {
            let body = std::mem::take(&mut r.body);
            let cut = r.truncated;
            self.finish_message(d, seg.ts_ns, &body, cut, report, out);
            let r = &mut self.readers[d];
            if r.body.is_empty() {
                r.body = body;
                r.body.clear();
            }
        }
        end
    }

    /// A message of direction `d` ended in the segment stamped `end_ts`; `body` is its body
    /// when kept (`cut`: only a prefix of it).
    fn finish_message(
        &mut self,
        d: usize,
        end_ts: u64,
        body: &[u8],
        cut: bool,
        report: &mut PgFeedReport,
        out: &mut Vec<PgStatement>,
    ) {
        let r = &mut self.readers[d];
        r.state = ReadState::Header;
        r.truncated = false;
        let msg = Msg {
            tag: r.tag,
            len: r.msg_len,
            body,
            cut,
            start_ts: r.start_ts,
            tid: r.start_tid,
            end_ts,
        };
        if cut && r.keep {
            report.truncated = true;
        }
        if r.untagged {
            self.on_startup_packet(d, &msg, report);
            return;
        }
        match self.kind_of(d) {
            Some(Kind::Frontend) => self.on_frontend(&msg, report, out),
            Some(Kind::Backend) => self.on_backend(&msg, report, out),
            None => {}
        }
    }

    /// Direction `d` can no longer tell where the next message starts.
    pub(super) fn lose(&mut self, d: usize, report: &mut PgFeedReport) {
        if self.state == PgStreamState::Detecting {
            self.readers[d].reset(ReadState::Seek);
            return;
        }
        self.readers[d].reset(ReadState::Lost);
        report.lost_sync = true;
        match self.kind_of(d) {
            Some(Kind::Frontend) => {
                // The statement being assembled most likely had its Execute in the lost bytes
                // (a large Bind and the messages after it in one write).
                if let Some(g) = self.group.take()
                    && !self.discarding
                {
                    // One item over MAX_PENDING at most: the next push trims the queue.
                    let item = Item::Execute(self.exec_within_budget(Exec {
                        query: g.query,
                        query_truncated: g.query_truncated,
                        prepared_name: g.prepared_name,
                        start_ns: g.start_ns,
                        tid: g.tid,
                        data_rows: 0,
                        assumed: true,
                    }));
                    self.push_pending(
                        Pending {
                            seq: self.seq,
                            item,
                        },
                        false,
                    );
                }
                // The Sync that ends a discarded pipeline may have been in the lost bytes.
                self.discarding = false;
            }
            Some(Kind::Backend) => self.backend_lost = true,
            None => {}
        }
    }

    /// Bytes that cannot be a message where one must start.
    pub(super) fn invalid(&mut self, d: usize, report: &mut PgFeedReport) {
        if self.state == PgStreamState::Detecting && (self.fresh || self.readers[d].untagged) {
            self.not_postgres(report);
        } else {
            self.lose(d, report);
        }
    }
}

/// Whether we read the body of this message (else it is only skipped by length).
fn keeps_body(kind: Kind, tag: u8) -> bool {
    match kind {
        Kind::Frontend => matches!(
            tag,
            wire::QUERY | wire::PARSE | wire::BIND | wire::DESCRIBE | wire::EXECUTE | wire::CLOSE
        ),
        Kind::Backend => matches!(
            tag,
            wire::COMMAND_COMPLETE | wire::ERROR_RESPONSE | wire::READY_FOR_QUERY
        ),
    }
}
