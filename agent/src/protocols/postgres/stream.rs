//! The per-connection parser: [`PgStream`] and its life (startup packets, the SSL/GSS answer,
//! classification as PostgreSQL, not PostgreSQL or encrypted, the role, close). Messages are
//! framed in [`super::framing`]; frontend messages queue requests ([`super::frontend`]) that
//! backend messages answer ([`super::backend`]).

use std::collections::VecDeque;

use super::{
    MAX_PARAM_TEXT, PgFeedReport, PgOutcome, PgStartup, PgStatement, PgStreamState,
    backend::End,
    decode,
    framing::{Msg, ReadState, Reader},
    frontend::{Group, Item, Pending, Portal, StatementText},
    lru::Lru,
    wire::{self, Kind, StartupKind},
};
use crate::protocols::segment::{Direction, Role, Segment};

/// Prepared statements remembered per connection, and their total text size.
pub(super) const STATEMENT_CACHE_ENTRIES: usize = 1024;
const STATEMENT_CACHE_BYTES: usize = 1 << 20;
/// Portals remembered per connection.
const PORTAL_CACHE_ENTRIES: usize = 256;
/// A connection picked up mid-stream gets this many segments / captured bytes to show a
/// plausible message boundary.
pub(super) const PICKUP_DETECT_SEGMENTS: u32 = 64;
const PICKUP_DETECT_BYTES: u64 = 1024 * 1024;

/// Reader indices: [`Direction::index`].
const INGRESS: usize = Direction::Ingress.index();
const EGRESS: usize = Direction::Egress.index();

/// PostgreSQL parser for one TCP connection.
#[derive(Debug)]
pub struct PgStream {
    pub(super) state: PgStreamState,
    pub(super) role: Option<Role>,
    /// We saw the connection open (role hint given): it starts with a startup packet.
    pub(super) fresh: bool,
    closed: bool,
    detect_segments: u32,
    detect_bytes: u64,
    /// Segments fed so far (sequence numbers start at 1).
    pub(super) seq: u64,
    /// Indexed by [`Direction::index`].
    pub(super) readers: [Reader; 2],
    pub(super) startup: Option<PgStartup>,
    pub(super) pending: VecDeque<Pending>,
    pub(super) group: Option<Group>,
    pub(super) statements: Lru<StatementText>,
    pub(super) portals: Lru<Portal>,
    /// After an ErrorResponse in extended mode the server ignores everything up to Sync.
    pub(super) discarding: bool,
    /// The backend direction lost sync and the statements it was answering are not yet
    /// accounted for.
    pub(super) backend_lost: bool,
    /// The backend resumed after losing sync: responses may skip statements whose end we
    /// missed (cleared at the next ReadyForQuery).
    pub(super) backend_resumed: bool,
    /// A ReadyForQuery was seen (the first one ends the startup phase).
    pub(super) seen_ready: bool,
    /// Bytes of statement text held by `pending` (bounded by [`MAX_PENDING_TEXT`]).
    pub(super) pending_text: usize,
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

    /// Gives back the queue of statements awaiting answers when it is empty (see
    /// `Http1Stream::release_idle_buffers`).
    pub fn release_idle_buffers(&mut self) {
        if self.pending.is_empty() && self.pending.capacity() > 0 {
            self.pending = VecDeque::new();
        }
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
        let d = seg.direction.index();
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

    pub(super) fn parsing(&self) -> bool {
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

    pub(super) fn not_postgres(&mut self, report: &mut PgFeedReport) {
        self.state = PgStreamState::NotPostgres;
        report.became_not_postgres = true;
        self.pending.clear();
        self.pending_text = 0;
        self.release();
    }

    pub(super) fn encrypted(&mut self, report: &mut PgFeedReport) {
        self.state = PgStreamState::Encrypted;
        report.became_encrypted = true;
        self.pending.clear();
        self.pending_text = 0;
        self.release();
    }

    pub(super) fn confirm(&mut self, report: &mut PgFeedReport) {
        if self.state == PgStreamState::Detecting {
            self.state = PgStreamState::Postgres;
            report.became_postgres = true;
        }
    }

    pub(super) fn kind_of(&self, d: usize) -> Option<Kind> {
        self.role.map(|role| match (role, d) {
            (Role::Client, EGRESS) | (Role::Server, INGRESS) => Kind::Frontend,
            _ => Kind::Backend,
        })
    }

    pub(super) fn backend_index(&self) -> Option<usize> {
        match self.role? {
            Role::Client => Some(INGRESS),
            Role::Server => Some(EGRESS),
        }
    }

    /// Direction `d` carries `kind`: sets the role if it was unknown.
    pub(super) fn learn_role(&mut self, d: usize, kind: Kind) {
        if self.role.is_none() {
            self.role = Some(match (kind, d) {
                (Kind::Frontend, EGRESS) | (Kind::Backend, INGRESS) => Role::Client,
                _ => Role::Server,
            });
        }
    }

    pub(super) fn on_startup_packet(&mut self, d: usize, msg: &Msg<'_>, report: &mut PgFeedReport) {
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
