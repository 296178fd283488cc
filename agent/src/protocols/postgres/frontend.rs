//! Frontend messages: every message the server answers (Query, Parse, Bind, Describe, Execute,
//! Close, Sync, FunctionCall) queues a request, in order; statement texts are remembered by
//! prepared-statement name and by portal, so every Execute gets its text. After an error in the
//! extended protocol the server skips everything up to Sync, and so do we.

use std::ops::Range;
use std::sync::Arc;

use super::{
    MAX_QUERY_BYTES, PgError, PgFeedReport, PgOutcome, PgStatement,
    backend::End,
    decode,
    framing::{Msg, ReadState},
    name_of, sql,
    stream::PgStream,
    wire,
};

/// Requests waiting for their response; beyond this the oldest is given up.
const MAX_PENDING: usize = 8192;
/// Statement text those requests may hold, per connection.
pub(super) const MAX_PENDING_TEXT: usize = 4 * 1024 * 1024;

/// An Execute waiting for its completion.
#[derive(Debug)]
pub(super) struct Exec {
    pub(super) query: Option<Arc<str>>,
    pub(super) query_truncated: bool,
    pub(super) prepared_name: Option<String>,
    pub(super) start_ns: u64,
    pub(super) tid: u32,
    pub(super) data_rows: u64,
    /// Not seen: the frontend lost sync right after the Parse/Bind of this statement, and its
    /// Execute most likely was in the lost bytes. Dropped silently if nothing completes it.
    pub(super) assumed: bool,
}

/// A simple Query waiting for its ReadyForQuery.
#[derive(Debug)]
pub(super) struct Simple {
    pub(super) raw: Arc<str>,
    /// Its statements (byte ranges of `raw`), split at top-level `;`.
    pub(super) pieces: Vec<Range<usize>>,
    pub(super) truncated: bool,
    /// Index of the statement running now.
    pub(super) next: usize,
    /// Start of the statement running now.
    pub(super) start_ns: u64,
    pub(super) tid: u32,
    pub(super) data_rows: u64,
    /// The failing statement's error and when it arrived (the query ends at ReadyForQuery).
    pub(super) error: Option<(PgError, u64)>,
}

#[derive(Debug)]
pub(super) enum Item {
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
pub(super) struct Pending {
    /// Sequence number of the segment that completed the request.
    pub(super) seq: u64,
    pub(super) item: Item,
}

/// The extended-protocol messages of the statement being assembled (Parse / Bind / Describe
/// since the last Execute or Sync): where it started and its text.
#[derive(Debug)]
pub(super) struct Group {
    pub(super) start_ns: u64,
    pub(super) tid: u32,
    pub(super) query: Option<Arc<str>>,
    pub(super) query_truncated: bool,
    pub(super) prepared_name: Option<String>,
}

#[derive(Clone, Debug)]
pub(super) struct StatementText {
    pub(super) query: Option<Arc<str>>,
    pub(super) truncated: bool,
}

#[derive(Clone, Debug)]
pub(super) struct Portal {
    pub(super) statement: String,
    pub(super) text: StatementText,
}

impl PgStream {
    pub(super) fn on_frontend(
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

    pub(super) fn push(&mut self, seq: u64, item: Item, out: &mut Vec<PgStatement>) {
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
    pub(super) fn exec_within_budget(&self, mut e: Exec) -> Exec {
        if e.query.as_ref().is_some_and(|q| !self.text_fits(q.len())) {
            e.query = None;
            e.query_truncated = true;
        }
        e
    }

    pub(super) fn push_pending(&mut self, p: Pending, front: bool) {
        self.pending_text = self.pending_text.saturating_add(text_len(&p.item));
        if front {
            self.pending.push_front(p);
        } else {
            self.pending.push_back(p);
        }
    }

    pub(super) fn pop_pending(&mut self) -> Option<Pending> {
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
    pub(super) fn give_up(&mut self, item: Item, ts: u64, out: &mut Vec<PgStatement>) {
        match item {
            Item::Execute(e) if !e.assumed => {
                let ts = ts.max(e.start_ns);
                self.emit_exec(e, End::plain(ts, PgOutcome::Resynced), out);
            }
            Item::Simple(s) => self.end_simple(s, ts, PgOutcome::Resynced, out),
            _ => {}
        }
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
