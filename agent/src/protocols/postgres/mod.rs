//! Sans-I/O PostgreSQL connection parser (frontend/backend protocol 3.0).
//!
//! One [`PgStream`] per TCP connection, fed the same [`Segment`]s as the HTTP/1 parser: the
//! exact byte count of each send/recv syscall and a captured prefix of its bytes. It follows
//! both directions message by message (every message is `tag, int32 length, body`; the
//! startup-phase packets are untagged) and turns every statement execution into a
//! [`PgStatement`].
//!
//! Design notes:
//! - Framing: message bodies are skipped by their length field; only the bodies we read
//!   (Query, Parse, Bind, Describe, Execute, Close, CommandComplete, ErrorResponse,
//!   ReadyForQuery, startup packets) are looked at, straight from the segment when the message
//!   is whole in it, else copied into a bounded per-direction buffer. DataRow, CopyData and
//!   the like are counted, never copied, so a large result or COPY only partly captured still
//!   ends at the right byte. Nothing is allocated in proportion to a length field; lengths
//!   outside the protocol's bounds (below 4, above 1 GiB, wrong for a fixed-size message) mean
//!   we are not at a message boundary.
//! - Matching: every frontend message that the server answers queues an item (Query, Parse,
//!   Bind, Describe, Execute, Close, Sync, FunctionCall); backend messages answer the front of
//!   the queue in order, which covers pipelining (many Bind/Execute before one Sync). Statement
//!   texts are remembered per prepared-statement name (bounded, least-recently-used eviction)
//!   and per portal, so every Execute of a prepared statement gets its text. An ErrorResponse
//!   in extended mode ends the failing statement and skips every other Execute up to the next
//!   Sync ([`PgOutcome::Skipped`]), including those the client sends after the error.
//! - Simple queries holding several statements yield one [`PgStatement`] per CommandComplete,
//!   each with its own text (split at top-level `;`). The first starts with the Query
//!   message, each next one where the previous one ended.
//! - Losing sync: when the next header lies in uncaptured bytes the direction is *lost* and
//!   waits for a segment whose data starts with a plausible run of messages (known tags, sane
//!   lengths, bodies consistent with their type, ending at the segment's end). Connections
//!   already open when the agent started are picked up the same way (no startup seen:
//!   database and user unknown, statements prepared earlier have no text). A statement whose
//!   end was in lost bytes ends with [`PgOutcome::Resynced`] when the next request shows it
//!   was over.
//! - `SSLRequest`/`GSSENCRequest` answered `S`/`G`: the rest is encrypted
//!   ([`PgStreamState::Encrypted`]) and ignored.

mod lru;
mod sql;
mod wire;

#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::Arc;

use self::lru::Lru;
use self::wire::{Kind, StartupKind};
use crate::protocols::segment::{Direction, Role, Segment};

/// An ErrorResponse, reduced to what a span records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PgError {
    /// Non-localized severity (`V` field) when sent, else the localized one (`S`).
    pub severity: Option<String>,
    /// SQLSTATE (`C` field), e.g. `42P01`.
    pub code: Option<String>,
    /// Primary message (`M` field), at most [`MAX_ERROR_TEXT`] bytes.
    pub message: Option<String>,
}

/// How a statement's execution ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PgOutcome {
    /// Its CommandComplete / EmptyQueryResponse / PortalSuspended / ErrorResponse was seen.
    Complete,
    /// The connection ended first.
    ConnectionClosed,
    /// An earlier statement of the same pipeline failed; the server skipped this one.
    Skipped,
    /// Its end was in bytes we could not follow; a later message showed it was over.
    Resynced,
}

/// One statement execution.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PgStatement {
    /// `Client`: the traced process is the frontend (the application); `Server`: it is the
    /// backend (postgres).
    pub role: Role,
    /// Statement text as sent (at most [`MAX_QUERY_BYTES`]); `None` when the statement was
    /// prepared (or the portal bound) before we started watching.
    pub query: Option<String>,
    /// The text was cut by the capture or by [`MAX_QUERY_BYTES`].
    pub query_truncated: bool,
    /// Prepared statement name (extended protocol, named statements only).
    pub prepared_name: Option<String>,
    /// First keyword upper-cased (`SELECT`, `INSERT`, …; for `WITH …` the main statement's),
    /// from the text, else from the CommandComplete tag.
    pub operation: Option<String>,
    /// CommandComplete tag as sent, e.g. `SELECT 3`, `INSERT 0 1`.
    pub command_tag: Option<String>,
    /// Row count from the tag.
    pub rows: Option<u64>,
    /// DataRow messages seen for this execution.
    pub data_rows: u64,
    /// The execution stopped at its row limit (PortalSuspended); a later Execute of the same
    /// portal continues it.
    pub portal_suspended: bool,
    pub error: Option<PgError>,
    /// Timestamp of the segment holding the statement's first request byte.
    pub start_ns: u64,
    /// Timestamp of the segment holding its CommandComplete / ErrorResponse / EmptyQuery /
    /// PortalSuspended (ReadyForQuery for a failed simple query).
    pub end_ns: u64,
    /// From the StartupMessage, when it was seen.
    pub database: Option<String>,
    pub user: Option<String>,
    pub application_name: Option<String>,
    /// Thread that sent the statement's first request byte.
    pub tid: u32,
    pub outcome: PgOutcome,
}

/// Classification of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PgStreamState {
    /// Nothing recognised yet.
    Detecting,
    Postgres,
    /// Not PostgreSQL; further segments are ignored.
    NotPostgres,
    /// PostgreSQL that switched to TLS or GSSAPI encryption; further segments are ignored.
    Encrypted,
}

/// What the StartupMessage told us.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PgStartup {
    pub protocol_minor: u16,
    pub user: Option<String>,
    /// The `database` parameter, defaulting to the user name as the server does.
    pub database: Option<String>,
    pub application_name: Option<String>,
    pub options: Option<String>,
}

/// What happened to a segment; the caller counts these.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PgFeedReport {
    /// The connection was recognised as PostgreSQL with this segment.
    pub became_postgres: bool,
    /// The connection was classified as not PostgreSQL with this segment.
    pub became_not_postgres: bool,
    /// The server accepted SSL/GSS encryption: nothing more can be parsed.
    pub became_encrypted: bool,
    /// A direction lost track of message boundaries.
    pub lost_sync: bool,
    /// A lost direction found a message boundary again, or statements lost in it were ended.
    pub resynced: bool,
    /// A message whose content we read (statement text, tag, error) was cut by the capture.
    pub truncated: bool,
    /// A length field outside the protocol's bounds.
    pub hostile_length: bool,
    /// Backend responses that no queued request was waiting for.
    pub unmatched_responses: u32,
    /// The connection carries a CancelRequest.
    pub cancel_request: bool,
}

/// Longest statement text we keep.
pub const MAX_QUERY_BYTES: usize = 16 * 1024;
/// Longest error message we keep.
pub const MAX_ERROR_TEXT: usize = 1024;
/// Bytes of one message body we copy when it spans segments.
const MAX_KEEP: usize = MAX_QUERY_BYTES + 512;
/// Longest statement/portal name we keep (the server's limit is 63).
const MAX_NAME_BYTES: usize = 256;
const MAX_PARAM_TEXT: usize = 256;
const MAX_TAG_TEXT: usize = 128;
/// Prepared statements remembered per connection, and their total text size.
const STATEMENT_CACHE_ENTRIES: usize = 1024;
const STATEMENT_CACHE_BYTES: usize = 1 << 20;
/// Portals remembered per connection.
const PORTAL_CACHE_ENTRIES: usize = 256;
/// Requests waiting for their response; beyond this the oldest is given up.
const MAX_PENDING: usize = 8192;
/// Statement text those requests may hold, per connection.
const MAX_PENDING_TEXT: usize = 4 * 1024 * 1024;
/// A connection picked up mid-stream gets this many segments / captured bytes to show a
/// plausible message boundary.
const PICKUP_DETECT_SEGMENTS: u32 = 64;
const PICKUP_DETECT_BYTES: u64 = 1024 * 1024;

const INGRESS: usize = 0;
const EGRESS: usize = 1;

const fn dir_index(d: Direction) -> usize {
    match d {
        Direction::Ingress => INGRESS,
        Direction::Egress => EGRESS,
    }
}

/// Whether `first_bytes` (the captured start of a connection's first segment, in either
/// direction) look like PostgreSQL: a startup-phase packet (SSLRequest, GSSENCRequest,
/// StartupMessage 3.x, CancelRequest), or — for connections picked up mid-stream — a run of
/// well-formed frontend or backend messages. Cheap: no allocation, a few bytes per message.
/// The direction does not change the answer (either side may speak first on a connection
/// picked up mid-stream); it is taken so callers need not special-case it.
pub fn looks_like_postgres(first_bytes: &[u8], direction: Direction) -> bool {
    let _ = direction;
    let total = first_bytes.len() as u64;
    wire::starts_with_startup(first_bytes)
        || wire::plausible_chain(Kind::Frontend, first_bytes, total)
        || wire::plausible_chain(Kind::Backend, first_bytes, total)
}

/// The query with every literal (strings of any kind, dollar-quoted strings, numbers)
/// replaced by `?`, comments removed and whitespace collapsed; keywords (`true`, `NULL` too),
/// identifiers, operators and `$n` parameters kept. At most [`sql::MAX_SANITIZED_LEN`] bytes.
pub fn sanitize_query(sql: &str) -> String {
    sql::sanitize_query(sql)
}

/// `(operation, collection)` for a span name such as `SELECT users`: the first keyword
/// upper-cased (for `WITH …`, the main statement's) and the one table the statement targets,
/// when it names one (`FROM` of a SELECT, `INSERT INTO`, `UPDATE`, `DELETE FROM`, `MERGE
/// INTO`, `COPY`, `TRUNCATE`, `CREATE/DROP/ALTER TABLE`). Empty operation for text without
/// a keyword.
pub fn query_summary(sql: &str) -> (String, Option<String>) {
    sql::query_summary(sql)
}

/// Per-direction reading position.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReadState {
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
struct Reader {
    state: ReadState,
    /// Startup phase of the frontend: length-prefixed packets without a tag byte.
    untagged: bool,
    hdr: [u8; 5],
    hdr_len: usize,
    /// The message being read.
    tag: u8,
    msg_len: u32,
    remaining: u64,
    keep: bool,
    truncated: bool,
    start_ts: u64,
    start_tid: u32,
    /// Kept body bytes of a message split over segments (bounded by [`MAX_KEEP`]).
    body: Vec<u8>,
    /// Timestamp and sequence number of this direction's last segment (0: none yet).
    last_ts: u64,
    last_seq: u64,
}

impl Reader {
    fn new(state: ReadState, untagged: bool) -> Self {
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

    fn reset(&mut self, state: ReadState) {
        self.state = state;
        self.hdr_len = 0;
        self.remaining = 0;
        self.truncated = false;
        self.body.clear();
    }
}

/// An Execute waiting for its completion.
#[derive(Debug)]
struct Exec {
    query: Option<Arc<str>>,
    query_truncated: bool,
    prepared_name: Option<String>,
    start_ns: u64,
    tid: u32,
    data_rows: u64,
    /// Not seen: the frontend lost sync right after the Parse/Bind of this statement, and its
    /// Execute most likely was in the lost bytes. Dropped silently if nothing completes it.
    assumed: bool,
}

/// A simple Query waiting for its ReadyForQuery.
#[derive(Debug)]
struct Simple {
    raw: Arc<str>,
    /// Its statements (byte ranges of `raw`), split at top-level `;`.
    pieces: Vec<Range<usize>>,
    truncated: bool,
    /// Index of the statement running now.
    next: usize,
    /// Start of the statement running now.
    start_ns: u64,
    tid: u32,
    data_rows: u64,
    /// The failing statement's error and when it arrived (the query ends at ReadyForQuery).
    error: Option<(PgError, u64)>,
}

#[derive(Debug)]
enum Item {
    Simple(Simple),
    Parse {
        name: Option<String>,
        query: Option<Arc<str>>,
        truncated: bool,
        start_ns: u64,
        tid: u32,
    },
    Bind,
    Describe {
        #[allow(dead_code, reason = "shown in Debug output of the request queue")]
        statement: bool,
    },
    Execute(Exec),
    Close,
    Sync,
    FunctionCall,
}

#[derive(Debug)]
struct Pending {
    /// Sequence number of the segment that completed the request.
    seq: u64,
    item: Item,
}

/// Which kind of queued request a backend message answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Want {
    Parse,
    Bind,
    Describe,
    Close,
    FunctionCall,
    /// CommandComplete / EmptyQueryResponse / PortalSuspended: an Execute or a simple Query.
    Statement,
}

impl Want {
    fn matches(self, item: &Item) -> bool {
        matches!(
            (self, item),
            (Self::Parse, Item::Parse { .. })
                | (Self::Bind, Item::Bind)
                | (Self::Describe, Item::Describe { .. })
                | (Self::Close, Item::Close)
                | (Self::FunctionCall, Item::FunctionCall)
                | (Self::Statement, Item::Execute(_) | Item::Simple(_))
        )
    }
}

/// The extended-protocol messages of the statement being assembled (Parse / Bind / Describe
/// since the last Execute or Sync): where it started and its text.
#[derive(Debug)]
struct Group {
    start_ns: u64,
    tid: u32,
    query: Option<Arc<str>>,
    query_truncated: bool,
    prepared_name: Option<String>,
}

#[derive(Clone, Debug)]
struct StatementText {
    query: Option<Arc<str>>,
    truncated: bool,
}

#[derive(Clone, Debug)]
struct Portal {
    statement: String,
    text: StatementText,
}

/// Where a finished statement ended and with what.
struct End {
    ts: u64,
    tag: Option<String>,
    error: Option<PgError>,
    suspended: bool,
    outcome: PgOutcome,
}

/// PostgreSQL parser for one TCP connection.
#[derive(Debug)]
pub struct PgStream {
    state: PgStreamState,
    role: Option<Role>,
    /// We saw the connection open (role hint given): it starts with a startup packet.
    fresh: bool,
    closed: bool,
    detect_segments: u32,
    detect_bytes: u64,
    /// Segments fed so far (sequence numbers start at 1).
    seq: u64,
    /// Indexed by [`dir_index`].
    readers: [Reader; 2],
    startup: Option<PgStartup>,
    pending: VecDeque<Pending>,
    group: Option<Group>,
    statements: Lru<StatementText>,
    portals: Lru<Portal>,
    /// After an ErrorResponse in extended mode the server ignores everything up to Sync.
    discarding: bool,
    /// The backend direction lost sync and the statements it was answering are not yet
    /// accounted for.
    backend_lost: bool,
    /// The backend resumed after losing sync: responses may skip statements whose end we
    /// missed (cleared at the next ReadyForQuery).
    backend_resumed: bool,
    /// A ReadyForQuery was seen (the first one ends the startup phase).
    seen_ready: bool,
    /// Bytes of statement text held by `pending` (bounded by [`MAX_PENDING_TEXT`]).
    pending_text: usize,
}

impl PgStream {
    /// `role_hint`: from accept()/connect() when the kernel saw it (the connection starts
    /// with a startup packet); `None` for connections opened before the agent started.
    pub fn new(role_hint: Option<Role>) -> Self {
        let (front, back) = if role_hint.is_some() {
            (
                Reader::new(ReadState::Header, true),
                Reader::new(ReadState::Header, false),
            )
        } else {
            (
                Reader::new(ReadState::Seek, false),
                Reader::new(ReadState::Seek, false),
            )
        };
        // Readers are indexed by direction; which one carries the frontend depends on the role.
        let readers = match role_hint {
            Some(Role::Server) => [front, back],
            Some(Role::Client) => [back, front],
            None => [front, back],
        };
        Self {
            state: PgStreamState::Detecting,
            role: role_hint,
            fresh: role_hint.is_some(),
            closed: false,
            detect_segments: 0,
            detect_bytes: 0,
            seq: 0,
            readers,
            startup: None,
            pending: VecDeque::new(),
            group: None,
            statements: Lru::new(STATEMENT_CACHE_ENTRIES, STATEMENT_CACHE_BYTES),
            portals: Lru::new(PORTAL_CACHE_ENTRIES, usize::MAX),
            discarding: false,
            backend_lost: false,
            backend_resumed: false,
            seen_ready: false,
            pending_text: 0,
        }
    }

    pub fn state(&self) -> PgStreamState {
        self.state
    }

    pub fn role(&self) -> Option<Role> {
        self.role
    }

    /// The StartupMessage's parameters, when it was seen.
    #[cfg(test)]
    pub fn startup(&self) -> Option<&PgStartup> {
        self.startup.as_ref()
    }

    /// Feeds one segment; finished statements are appended to `out`.
    pub fn feed(&mut self, seg: Segment<'_>, out: &mut Vec<PgStatement>) -> PgFeedReport {
        let mut report = PgFeedReport::default();
        if !self.parsing() {
            return report;
        }
        let total = seg.len.max(seg.data.len() as u64);
        if total == 0 {
            return report;
        }
        self.seq = self.seq.saturating_add(1);
        let d = dir_index(seg.direction);
        let detecting = self.state == PgStreamState::Detecting;

        if detecting && self.fresh && self.kind_of(d) == Some(Kind::Backend) {
            // The server spoke before any startup packet: not PostgreSQL.
            self.not_postgres(&mut report);
            return report;
        }

        self.process(&seg, total, &mut report, out);

        let r = &mut self.readers[d];
        r.last_ts = seg.ts_ns;
        r.last_seq = self.seq;

        if detecting && self.state == PgStreamState::Detecting {
            self.detect_segments += 1;
            self.detect_bytes = self.detect_bytes.saturating_add(seg.data.len() as u64);
            if self.detect_segments >= PICKUP_DETECT_SEGMENTS
                || self.detect_bytes >= PICKUP_DETECT_BYTES
            {
                self.not_postgres(&mut report);
            }
        }
        report
    }

    /// The connection ended: every statement still waiting ends with
    /// [`PgOutcome::ConnectionClosed`] at the last segment seen on the connection.
    pub fn close(&mut self, _ts_ns: u64, out: &mut Vec<PgStatement>) {
        if self.closed {
            return;
        }
        self.closed = true;
        let last = self.readers[0].last_ts.max(self.readers[1].last_ts);
        while let Some(p) = self.pop_pending() {
            match p.item {
                Item::Execute(e) if !e.assumed => {
                    let ts = last.max(e.start_ns);
                    self.emit_exec(e, End::plain(ts, PgOutcome::ConnectionClosed), out);
                }
                Item::Simple(s) => self.end_simple(s, last, PgOutcome::ConnectionClosed, out),
                _ => {}
            }
        }
        self.release();
    }

    fn parsing(&self) -> bool {
        !self.closed
            && matches!(
                self.state,
                PgStreamState::Detecting | PgStreamState::Postgres
            )
    }

    fn release(&mut self) {
        for r in &mut self.readers {
            r.reset(ReadState::Seek);
            r.body = Vec::new();
        }
        self.statements.clear();
        self.portals.clear();
        self.group = None;
    }

    fn not_postgres(&mut self, report: &mut PgFeedReport) {
        self.state = PgStreamState::NotPostgres;
        report.became_not_postgres = true;
        self.pending.clear();
        self.pending_text = 0;
        self.release();
    }

    fn encrypted(&mut self, report: &mut PgFeedReport) {
        self.state = PgStreamState::Encrypted;
        report.became_encrypted = true;
        self.pending.clear();
        self.pending_text = 0;
        self.release();
    }

    fn confirm(&mut self, report: &mut PgFeedReport) {
        if self.state == PgStreamState::Detecting {
            self.state = PgStreamState::Postgres;
            report.became_postgres = true;
        }
    }

    fn kind_of(&self, d: usize) -> Option<Kind> {
        self.role.map(|role| match (role, d) {
            (Role::Client, EGRESS) | (Role::Server, INGRESS) => Kind::Frontend,
            _ => Kind::Backend,
        })
    }

    fn backend_index(&self) -> Option<usize> {
        match self.role? {
            Role::Client => Some(INGRESS),
            Role::Server => Some(EGRESS),
        }
    }

    /// Direction `d` carries `kind`: sets the role if it was unknown.
    fn learn_role(&mut self, d: usize, kind: Kind) {
        if self.role.is_none() {
            self.role = Some(match (kind, d) {
                (Kind::Frontend, EGRESS) | (Kind::Backend, INGRESS) => Role::Client,
                _ => Role::Server,
            });
        }
    }

    // ---- framing ----

    /// Walks one segment of direction `d`.
    fn process(
        &mut self,
        seg: &Segment<'_>,
        total: u64,
        report: &mut PgFeedReport,
        out: &mut Vec<PgStatement>,
    ) {
        let d = dir_index(seg.direction);
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
    fn lose(&mut self, d: usize, report: &mut PgFeedReport) {
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
    fn invalid(&mut self, d: usize, report: &mut PgFeedReport) {
        if self.state == PgStreamState::Detecting && (self.fresh || self.readers[d].untagged) {
            self.not_postgres(report);
        } else {
            self.lose(d, report);
        }
    }

    // ---- startup ----

    fn on_startup_packet(&mut self, d: usize, msg: &Msg<'_>, report: &mut PgFeedReport) {
        let Some(code) = wire::be_u32(msg.body, 0) else {
            // The code is in bytes the capture cut: we cannot tell what this was.
            self.lose(d, report);
            return;
        };
        match wire::startup_kind(msg.len, code) {
            Some(StartupKind::Ssl | StartupKind::GssEnc) => {
                self.confirm(report);
                if let Some(b) = self.backend_index() {
                    let r = &mut self.readers[b];
                    if matches!(r.state, ReadState::Seek)
                        || (r.state == ReadState::Header && r.hdr_len == 0)
                    {
                        r.reset(ReadState::SslAnswer);
                    }
                }
            }
            Some(StartupKind::Cancel) => {
                self.confirm(report);
                report.cancel_request = true;
            }
            Some(StartupKind::Startup { minor, .. }) => {
                self.confirm(report);
                self.startup = Some(parse_startup(msg.body.get(4..).unwrap_or_default(), minor));
                self.readers[d].untagged = false;
            }
            None => self.invalid(d, report),
        }
    }

    // ---- frontend ----

    fn on_frontend(
        &mut self,
        msg: &Msg<'_>,
        report: &mut PgFeedReport,
        out: &mut Vec<PgStatement>,
    ) {
        let starts_request = match msg.tag {
            wire::QUERY | wire::PARSE | wire::BIND | wire::FUNCTION_CALL => true,
            wire::EXECUTE | wire::DESCRIBE => self.group.is_none(),
            _ => false,
        };
        if starts_request {
            self.request_proves_answers_done(report, out);
        }
        if self.discarding {
            self.on_frontend_discarded(msg, out);
            return;
        }
        let seq = self.seq;
        match msg.tag {
            wire::QUERY => {
                self.group = None;
                let (text, cut) = wire::cstr_or_rest(msg.body, 0);
                let room = MAX_PENDING_TEXT.saturating_sub(self.pending_text);
                let (raw, truncated) = decode(text, MAX_QUERY_BYTES.min(room));
                let truncated = truncated || cut;
                let pieces = sql::split_statements(&raw);
                self.push(
                    seq,
                    Item::Simple(Simple {
                        raw: Arc::from(raw),
                        pieces,
                        truncated,
                        next: 0,
                        start_ns: msg.start_ts,
                        tid: msg.tid,
                        data_rows: 0,
                        error: None,
                    }),
                    out,
                );
            }
            wire::PARSE => {
                let mut pos = 0;
                let name = wire::cstr(msg.body, &mut pos).map(name_of);
                let (text, cut) = match &name {
                    Some(_) => wire::cstr_or_rest(msg.body, pos),
                    None => (&[][..], true),
                };
                let (query, truncated) = decode(text, MAX_QUERY_BYTES);
                let truncated = truncated || cut;
                let query: Option<Arc<str>> = name.as_ref().map(|_| Arc::from(query));
                if let Some(n) = &name {
                    let weight = query.as_ref().map_or(0, |q| q.len()) + n.len();
                    self.statements.insert(
                        n.clone(),
                        StatementText {
                            query: query.clone(),
                            truncated,
                        },
                        weight,
                    );
                }
                let g = self.group_at(msg);
                g.query.clone_from(&query);
                g.query_truncated = truncated;
                g.prepared_name = name.clone().filter(|n| !n.is_empty());
                self.push(
                    seq,
                    Item::Parse {
                        name,
                        query,
                        truncated,
                        start_ns: msg.start_ts,
                        tid: msg.tid,
                    },
                    out,
                );
            }
            wire::BIND => {
                let mut pos = 0;
                let portal = wire::cstr(msg.body, &mut pos).map(name_of);
                let statement = wire::cstr(msg.body, &mut pos).map(name_of);
                if let (Some(portal), Some(statement)) = (portal, statement) {
                    let text = self.statement_text(&statement);
                    let g = self.group_at(msg);
                    g.query.clone_from(&text.query);
                    g.query_truncated = text.truncated;
                    g.prepared_name = Some(statement.clone()).filter(|n| !n.is_empty());
                    self.portals.insert(portal, Portal { statement, text }, 0);
                } else {
                    self.group_at(msg);
                }
                self.push(seq, Item::Bind, out);
            }
            wire::DESCRIBE => {
                self.group_at(msg);
                let statement = msg.body.first() == Some(&b'S');
                self.push(seq, Item::Describe { statement }, out);
            }
            wire::EXECUTE => {
                let exec = self.exec_for(msg);
                self.push(seq, Item::Execute(exec), out);
            }
            wire::SYNC => {
                self.group = None;
                self.push(seq, Item::Sync, out);
            }
            wire::CLOSE => {
                let mut pos = 1;
                if let Some(name) = wire::cstr(msg.body, &mut pos).map(name_of) {
                    match msg.body.first() {
                        Some(b'S') => self.statements.remove(&name),
                        Some(b'P') => self.portals.remove(&name),
                        _ => {}
                    }
                }
                self.push(seq, Item::Close, out);
            }
            wire::FUNCTION_CALL => self.push(seq, Item::FunctionCall, out),
            // Flush, Terminate, CopyData/CopyDone/CopyFail and authentication responses
            // are not answered message by message.
            _ => {}
        }
    }

    /// The server ignores everything up to Sync after an extended-protocol error: Executes
    /// sent meanwhile are skipped.
    fn on_frontend_discarded(&mut self, msg: &Msg<'_>, out: &mut Vec<PgStatement>) {
        match msg.tag {
            wire::SYNC => {
                self.discarding = false;
                self.group = None;
                let seq = self.seq;
                self.push(seq, Item::Sync, out);
            }
            wire::PARSE => {
                let mut pos = 0;
                let name = wire::cstr(msg.body, &mut pos).map(name_of);
                let (text, cut) = wire::cstr_or_rest(msg.body, pos);
                let (query, truncated) = decode(text, MAX_QUERY_BYTES);
                let g = self.group_at(msg);
                g.query = Some(Arc::from(query));
                g.query_truncated = truncated || cut;
                g.prepared_name = name.filter(|n| !n.is_empty());
            }
            wire::BIND => {
                let mut pos = 0;
                let _portal = wire::cstr(msg.body, &mut pos);
                if let Some(statement) = wire::cstr(msg.body, &mut pos).map(name_of) {
                    let known = self.group.as_ref().is_some_and(|g| {
                        g.prepared_name.as_deref().unwrap_or("") == statement && g.query.is_some()
                    });
                    if !known {
                        let text = self.statement_text(&statement);
                        let g = self.group_at(msg);
                        g.query = text.query;
                        g.query_truncated = text.truncated;
                        g.prepared_name = Some(statement).filter(|n| !n.is_empty());
                    }
                }
            }
            wire::DESCRIBE => {
                self.group_at(msg);
            }
            wire::EXECUTE => {
                let exec = self.exec_for(msg);
                self.emit_exec(exec, End::plain(msg.end_ts, PgOutcome::Skipped), out);
            }
            _ => {}
        }
    }

    /// The group of extended-protocol messages `msg` belongs to (started by it if none).
    fn group_at(&mut self, msg: &Msg<'_>) -> &mut Group {
        self.group.get_or_insert(Group {
            start_ns: msg.start_ts,
            tid: msg.tid,
            query: None,
            query_truncated: false,
            prepared_name: None,
        })
    }

    fn statement_text(&mut self, name: &str) -> StatementText {
        self.statements.get(name).cloned().unwrap_or(StatementText {
            query: None,
            truncated: false,
        })
    }

    /// The execution an Execute message starts: text from its portal (or, while discarding,
    /// from the messages just before it), start from the first message of its group.
    fn exec_for(&mut self, msg: &Msg<'_>) -> Exec {
        let group = self.group.take();
        let mut pos = 0;
        let portal = wire::cstr(msg.body, &mut pos).map(name_of);
        let from_portal = match (&portal, self.discarding) {
            (Some(p), false) => self.portals.get(p).cloned(),
            _ => None,
        };
        let (query, query_truncated, prepared_name) = match (from_portal, &group) {
            (Some(p), _) => (
                p.text.query,
                p.text.truncated,
                Some(p.statement).filter(|n| !n.is_empty()),
            ),
            (None, Some(g)) => (g.query.clone(), g.query_truncated, g.prepared_name.clone()),
            (None, None) => (None, false, None),
        };
        let (start_ns, tid) = group.map_or((msg.start_ts, msg.tid), |g| (g.start_ns, g.tid));
        Exec {
            query,
            query_truncated,
            prepared_name,
            start_ns,
            tid,
            data_rows: 0,
            assumed: false,
        }
    }

    fn push(&mut self, seq: u64, item: Item, out: &mut Vec<PgStatement>) {
        if self.pending.len() >= MAX_PENDING
            && let Some(oldest) = self.pop_pending()
        {
            log::debug!("postgres: more than {MAX_PENDING} requests without response");
            let ts = self.readers[0].last_ts.max(self.readers[1].last_ts);
            self.give_up(oldest.item, ts, out);
        }
        let item = match item {
            Item::Execute(e) => Item::Execute(self.exec_within_budget(e)),
            Item::Parse {
                name,
                query,
                truncated,
                start_ns,
                tid,
            } => {
                let fits = query.as_ref().is_none_or(|q| self.text_fits(q.len()));
                Item::Parse {
                    name,
                    query: if fits { query } else { None },
                    truncated: truncated || !fits,
                    start_ns,
                    tid,
                }
            }
            other => other,
        };
        self.push_pending(Pending { seq, item }, false);
    }

    fn text_fits(&self, len: usize) -> bool {
        self.pending_text.saturating_add(len) <= MAX_PENDING_TEXT
    }

    /// Statement texts held by queued requests are bounded per connection
    /// ([`MAX_PENDING_TEXT`]); beyond that a request keeps no text.
    fn exec_within_budget(&self, mut e: Exec) -> Exec {
        if e.query.as_ref().is_some_and(|q| !self.text_fits(q.len())) {
            e.query = None;
            e.query_truncated = true;
        }
        e
    }

    fn push_pending(&mut self, p: Pending, front: bool) {
        self.pending_text = self.pending_text.saturating_add(text_len(&p.item));
        if front {
            self.pending.push_front(p);
        } else {
            self.pending.push_back(p);
        }
    }

    fn pop_pending(&mut self) -> Option<Pending> {
        let p = self.pending.pop_front()?;
        self.pending_text = self.pending_text.saturating_sub(text_len(&p.item));
        Some(p)
    }

    /// A new request while the backend direction is lost: the statements it was answering
    /// (those queued before the backend's last segment) are over, ending at that segment.
    fn request_proves_answers_done(
        &mut self,
        report: &mut PgFeedReport,
        out: &mut Vec<PgStatement>,
    ) {
        let Some(b) = self.backend_index() else {
            return;
        };
        if !self.backend_lost || !matches!(self.readers[b].state, ReadState::Lost | ReadState::Seek)
        {
            return;
        }
        let (last_ts, last_seq) = (self.readers[b].last_ts, self.readers[b].last_seq);
        while self.pending.front().is_some_and(|p| p.seq < last_seq) {
            if let Some(p) = self.pop_pending() {
                self.give_up(p.item, last_ts, out);
            }
        }
        self.backend_lost = false;
        // Already accounted for: the next boundary resumes silently.
        self.readers[b].reset(ReadState::Seek);
        report.resynced = true;
    }

    /// A queued request whose answer we will not see: statements end as Resynced.
    fn give_up(&mut self, item: Item, ts: u64, out: &mut Vec<PgStatement>) {
        match item {
            Item::Execute(e) if !e.assumed => {
                let ts = ts.max(e.start_ns);
                self.emit_exec(e, End::plain(ts, PgOutcome::Resynced), out);
            }
            Item::Simple(s) => self.end_simple(s, ts, PgOutcome::Resynced, out),
            _ => {}
        }
    }

    // ---- backend ----

    fn on_backend(&mut self, msg: &Msg<'_>, report: &mut PgFeedReport, out: &mut Vec<PgStatement>) {
        match msg.tag {
            wire::DATA_ROW => match self.pending.front_mut().map(|p| &mut p.item) {
                Some(Item::Execute(e)) => e.data_rows = e.data_rows.saturating_add(1),
                Some(Item::Simple(s)) => s.data_rows = s.data_rows.saturating_add(1),
                _ => {}
            },
            wire::ROW_DESCRIPTION | wire::NO_DATA => {
                // In a simple query RowDescription heads each result; in the extended protocol
                // it (or NoData) answers Describe.
                let simple = matches!(self.pending.front().map(|p| &p.item), Some(Item::Simple(_)));
                if !simple {
                    self.answer(Want::Describe, msg.end_ts, report, out);
                }
            }
            wire::PARAMETER_DESCRIPTION => {
                // Followed by RowDescription/NoData, which answers the Describe.
            }
            wire::PARSE_COMPLETE => self.answer(Want::Parse, msg.end_ts, report, out),
            wire::BIND_COMPLETE => self.answer(Want::Bind, msg.end_ts, report, out),
            wire::CLOSE_COMPLETE => self.answer(Want::Close, msg.end_ts, report, out),
            wire::FUNCTION_CALL_RESPONSE => {
                self.answer(Want::FunctionCall, msg.end_ts, report, out);
            }
            wire::COMMAND_COMPLETE | wire::EMPTY_QUERY_RESPONSE | wire::PORTAL_SUSPENDED => {
                self.completion(msg, report, out);
            }
            wire::ERROR_RESPONSE => self.error_response(msg, report, out),
            wire::READY_FOR_QUERY => self.ready_for_query(msg, report, out),
            // ParameterStatus, NoticeResponse, NotificationResponse, BackendKeyData,
            // authentication, NegotiateProtocolVersion and the COPY messages come anywhere and
            // answer nothing.
            _ => {}
        }
    }

    /// Pops the queued request `want` answers. Requests before it may be passed over only if
    /// their own answers could have been lost: acknowledgements always (they only come out of
    /// order after a loss), statements only after the backend lost sync.
    fn realign(
        &mut self,
        want: Want,
        ts: u64,
        report: &mut PgFeedReport,
        out: &mut Vec<PgStatement>,
    ) -> Option<Item> {
        let resumed = self.backend_resumed;
        let idx = self.pending.iter().position(|p| {
            want.matches(&p.item)
                || match &p.item {
                    Item::Parse { .. }
                    | Item::Bind
                    | Item::Describe { .. }
                    | Item::Close
                    | Item::FunctionCall => false,
                    Item::Execute(e) => !(resumed || e.assumed),
                    Item::Simple(_) => !resumed,
                    Item::Sync => true,
                }
        })?;
        if !self.pending.get(idx).is_some_and(|p| want.matches(&p.item)) {
            return None;
        }
        if idx > 0 {
            report.resynced = true;
        }
        for _ in 0..idx {
            if let Some(p) = self.pop_pending() {
                self.give_up(p.item, ts, out);
            }
        }
        self.pop_pending().map(|p| p.item)
    }

    /// An acknowledgement (ParseComplete, BindComplete, …).
    fn answer(
        &mut self,
        want: Want,
        ts: u64,
        report: &mut PgFeedReport,
        out: &mut Vec<PgStatement>,
    ) {
        if self.realign(want, ts, report, out).is_none() {
            report.unmatched_responses = report.unmatched_responses.saturating_add(1);
        }
    }

    /// CommandComplete, EmptyQueryResponse or PortalSuspended.
    fn completion(&mut self, msg: &Msg<'_>, report: &mut PgFeedReport, out: &mut Vec<PgStatement>) {
        let tag = (msg.tag == wire::COMMAND_COMPLETE).then(|| {
            let (t, _) = wire::cstr_or_rest(msg.body, 0);
            decode(t, MAX_TAG_TEXT).0
        });
        if let Some(Item::Simple(s)) = self.pending.front_mut().map(|p| &mut p.item) {
            if msg.tag == wire::PORTAL_SUSPENDED {
                report.unmatched_responses = report.unmatched_responses.saturating_add(1);
                return;
            }
            let (query, query_truncated) = if msg.tag == wire::EMPTY_QUERY_RESPONSE {
                (Some(s.raw.clone()), s.truncated)
            } else {
                // The text we kept ends in (or before) this statement.
                let last = s.next + 1 >= s.pieces.len();
                (piece(&s.raw, s.pieces.get(s.next)), s.truncated && last)
            };
            let exec = Exec {
                query,
                query_truncated,
                prepared_name: None,
                start_ns: s.start_ns,
                tid: s.tid,
                data_rows: s.data_rows,
                assumed: false,
            };
            s.next = s.next.saturating_add(1);
            s.start_ns = msg.end_ts;
            s.data_rows = 0;
            let end = End {
                ts: msg.end_ts,
                tag,
                error: None,
                suspended: false,
                outcome: PgOutcome::Complete,
            };
            self.emit_exec(exec, end, out);
            return;
        }
        match self.realign(Want::Statement, msg.end_ts, report, out) {
            Some(Item::Execute(e)) => {
                let end = End {
                    ts: msg.end_ts,
                    tag,
                    error: None,
                    suspended: msg.tag == wire::PORTAL_SUSPENDED,
                    outcome: PgOutcome::Complete,
                };
                self.emit_exec(e, end, out);
            }
            // A simple query found behind statements whose end we lost: it is running now.
            Some(Item::Simple(s)) => {
                let p = Pending {
                    seq: self.seq,
                    item: Item::Simple(s),
                };
                self.push_pending(p, true);
                self.completion(msg, report, out);
            }
            Some(_) | None => {
                report.unmatched_responses = report.unmatched_responses.saturating_add(1);
            }
        }
    }

    fn error_response(
        &mut self,
        msg: &Msg<'_>,
        report: &mut PgFeedReport,
        out: &mut Vec<PgStatement>,
    ) {
        let err = parse_error(msg.body);
        match self.pending.front_mut().map(|p| &mut p.item) {
            None | Some(Item::Sync) => {
                // Unsolicited (FATAL at shutdown, authentication failure) or at the implicit
                // COMMIT of a Sync: no statement to attach it to.
                report.unmatched_responses = report.unmatched_responses.saturating_add(1);
            }
            Some(Item::Simple(s)) => {
                if s.error.is_none() {
                    s.error = Some((err, msg.end_ts));
                }
            }
            Some(_) => self.extended_error(err, msg.end_ts, out),
        }
    }

    /// An error in the extended protocol: it belongs to the first Execute before the next
    /// Sync (or, with none, to the failing Parse); the server skips the other Executes up to
    /// that Sync, and everything the client sends until a Sync if it has not sent it yet.
    fn extended_error(&mut self, err: PgError, ts: u64, out: &mut Vec<PgStatement>) {
        let sync_queued = self
            .pending
            .iter()
            .position(|p| matches!(p.item, Item::Sync | Item::Simple(_)));
        let barrier = sync_queued.unwrap_or(self.pending.len());
        let mut err = Some(err);
        let mut failed_parse = None;
        for i in 0..barrier {
            let Some(p) = self.pop_pending() else {
                break;
            };
            match p.item {
                Item::Execute(e) => match err.take() {
                    Some(error) => {
                        let end = End {
                            ts,
                            tag: None,
                            error: Some(error),
                            suspended: false,
                            outcome: PgOutcome::Complete,
                        };
                        self.emit_exec(e, end, out);
                    }
                    None if !e.assumed => {
                        let ts = ts.max(e.start_ns);
                        self.emit_exec(e, End::plain(ts, PgOutcome::Skipped), out);
                    }
                    None => {}
                },
                Item::Parse {
                    name,
                    query,
                    truncated,
                    start_ns,
                    tid,
                } if i == 0 => {
                    // The Parse itself failed: the statement does not exist.
                    if let Some(n) = &name {
                        self.statements.remove(n);
                    }
                    failed_parse = Some(Exec {
                        query,
                        query_truncated: truncated,
                        prepared_name: name.filter(|n| !n.is_empty()),
                        start_ns,
                        tid,
                        data_rows: 0,
                        assumed: false,
                    });
                }
                _ => {}
            }
        }
        if let (Some(error), Some(e)) = (err, failed_parse) {
            let end = End {
                ts,
                tag: None,
                error: Some(error),
                suspended: false,
                outcome: PgOutcome::Complete,
            };
            self.emit_exec(e, end, out);
        }
        if sync_queued.is_none() {
            self.discarding = true;
            self.group = None;
        }
    }

    fn ready_for_query(
        &mut self,
        msg: &Msg<'_>,
        report: &mut PgFeedReport,
        out: &mut Vec<PgStatement>,
    ) {
        if msg.body.first() == Some(&b'I') {
            // Outside a transaction block no portal survives.
            self.portals.clear();
        }
        // Everything before the first Sync / simple Query is over.
        let Some(barrier) = self
            .pending
            .iter()
            .position(|p| matches!(p.item, Item::Sync | Item::Simple(_)))
        else {
            // The one that ends the startup phase answers nothing; any other answers
            // requests we did not see.
            if !self.pending.is_empty() || self.seen_ready {
                report.unmatched_responses = report.unmatched_responses.saturating_add(1);
            }
            self.seen_ready = true;
            return;
        };
        self.seen_ready = true;
        if self.pending.iter().take(barrier).any(|p| match &p.item {
            Item::Execute(e) => !e.assumed,
            _ => true,
        }) {
            report.resynced = true;
        }
        for _ in 0..barrier {
            if let Some(p) = self.pop_pending() {
                self.give_up(p.item, msg.end_ts, out);
            }
        }
        if let Some(Pending {
            item: Item::Simple(s),
            ..
        }) = self.pop_pending()
        {
            if s.error.is_some() {
                self.end_simple(s, msg.end_ts, PgOutcome::Complete, out);
            } else if s.next == 0 && !s.pieces.is_empty() {
                // No completion at all: lost in bytes we could not follow.
                self.end_simple(s, msg.end_ts, PgOutcome::Resynced, out);
            }
        }
        self.backend_resumed = false;
        self.discarding = false;
    }

    /// A simple query ends: the statement that failed (or was running) is emitted; the
    /// statements after a failure were not executed and are not.
    fn end_simple(&mut self, s: Simple, ts: u64, outcome: PgOutcome, out: &mut Vec<PgStatement>) {
        let last = s.next + 1 >= s.pieces.len();
        let (query, query_truncated) = if s.pieces.is_empty() && s.next == 0 {
            (Some(s.raw.clone()), s.truncated)
        } else {
            (piece(&s.raw, s.pieces.get(s.next)), s.truncated && last)
        };
        if query.is_none() && s.error.is_none() {
            return;
        }
        let exec = Exec {
            query,
            query_truncated,
            prepared_name: None,
            start_ns: s.start_ns,
            tid: s.tid,
            data_rows: s.data_rows,
            assumed: false,
        };
        let end = match s.error {
            Some((error, error_ts)) => End {
                // A failed simple query ends at its ReadyForQuery (or the error, if the
                // connection closed before).
                ts: if outcome == PgOutcome::Complete {
                    ts
                } else {
                    error_ts
                },
                tag: None,
                error: Some(error),
                suspended: false,
                outcome: PgOutcome::Complete,
            },
            None => End::plain(ts.max(s.start_ns), outcome),
        };
        self.emit_exec(exec, end, out);
    }

    fn emit_exec(&self, e: Exec, end: End, out: &mut Vec<PgStatement>) {
        let Some(role) = self.role else {
            return;
        };
        let operation = e
            .query
            .as_deref()
            .and_then(sql::statement_operation)
            .or_else(|| {
                end.tag
                    .as_deref()
                    .and_then(|t| t.split(' ').next())
                    .filter(|w| !w.is_empty())
                    .map(str::to_owned)
            });
        let rows = end.tag.as_deref().and_then(wire::tag_rows);
        let startup = self.startup.as_ref();
        out.push(PgStatement {
            role,
            query: e.query.map(|q| q.to_string()),
            query_truncated: e.query_truncated,
            prepared_name: e.prepared_name,
            operation,
            command_tag: end.tag,
            rows,
            data_rows: e.data_rows,
            portal_suspended: end.suspended,
            error: end.error,
            start_ns: e.start_ns,
            end_ns: end.ts.max(e.start_ns),
            database: startup.and_then(|s| s.database.clone()),
            user: startup.and_then(|s| s.user.clone()),
            application_name: startup.and_then(|s| s.application_name.clone()),
            tid: e.tid,
            outcome: end.outcome,
        });
    }
}

impl End {
    fn plain(ts: u64, outcome: PgOutcome) -> Self {
        Self {
            ts,
            tag: None,
            error: None,
            suspended: false,
            outcome,
        }
    }
}

/// A complete message as the protocol layer sees it.
struct Msg<'a> {
    tag: u8,
    /// Length field (counting itself).
    len: u32,
    /// Body when kept (possibly only a prefix: `cut`), else empty.
    body: &'a [u8],
    #[allow(dead_code, reason = "shown in Debug output of a message")]
    cut: bool,
    /// Timestamp and thread of the segment holding the first byte.
    start_ts: u64,
    tid: u32,
    /// Timestamp of the segment holding the last byte.
    end_ts: u64,
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

/// Text of at most `max` bytes (cut on a character boundary); invalid UTF-8 is replaced.
/// Returns whether it was cut.
fn decode(bytes: &[u8], max: usize) -> (String, bool) {
    let cut = bytes.len() > max;
    let b = bytes.get(..max).unwrap_or(bytes);
    match std::str::from_utf8(b) {
        Ok(s) => (s.to_owned(), cut),
        // A multi-byte character cut at the end (by us or by the capture): drop it.
        Err(e) if e.error_len().is_none() => (
            String::from_utf8_lossy(b.get(..e.valid_up_to()).unwrap_or_default()).into_owned(),
            true,
        ),
        Err(_) => (String::from_utf8_lossy(b).into_owned(), cut),
    }
}

/// Statement text a queued request holds (counted even when shared with the cache).
fn text_len(item: &Item) -> usize {
    match item {
        Item::Simple(s) => s.raw.len(),
        Item::Parse { query, .. } => query.as_ref().map_or(0, |q| q.len()),
        Item::Execute(e) => e.query.as_ref().map_or(0, |q| q.len()),
        _ => 0,
    }
}

/// One statement of a simple query's text.
fn piece(raw: &str, range: Option<&Range<usize>>) -> Option<Arc<str>> {
    range.and_then(|r| raw.get(r.clone())).map(Arc::from)
}

fn name_of(bytes: &[u8]) -> String {
    decode(bytes, MAX_NAME_BYTES).0
}

fn opt_text(bytes: Option<&[u8]>, max: usize) -> Option<String> {
    bytes.map(|b| decode(b, max).0)
}

fn parse_error(body: &[u8]) -> PgError {
    let f = wire::error_fields(body);
    PgError {
        severity: opt_text(f.severity, MAX_PARAM_TEXT),
        code: opt_text(f.code, MAX_PARAM_TEXT),
        message: opt_text(f.message, MAX_ERROR_TEXT),
    }
}

/// StartupMessage parameters (after the protocol version): `name NUL value NUL … NUL`.
fn parse_startup(params: &[u8], minor: u16) -> PgStartup {
    let mut s = PgStartup {
        protocol_minor: minor,
        ..PgStartup::default()
    };
    let mut pos = 0;
    while let Some(name) = wire::cstr(params, &mut pos) {
        if name.is_empty() {
            break;
        }
        let Some(value) = wire::cstr(params, &mut pos) else {
            break;
        };
        let value = Some(decode(value, MAX_PARAM_TEXT).0);
        match name {
            b"user" => s.user = value,
            b"database" => s.database = value,
            b"application_name" => s.application_name = value,
            b"options" => s.options = value,
            _ => {}
        }
    }
    if s.database.is_none() {
        s.database.clone_from(&s.user);
    }
    s
}
