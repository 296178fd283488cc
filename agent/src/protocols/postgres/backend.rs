//! Backend messages answer the queued requests in order (pipelining included): statements end
//! at CommandComplete, EmptyQueryResponse, PortalSuspended or ErrorResponse and leave as
//! [`PgStatement`]s; ReadyForQuery closes what is before it. Where the backend lost sync,
//! requests whose answers were in the lost bytes end as [`PgOutcome::Resynced`].

use std::ops::Range;
use std::sync::Arc;

use super::{
    MAX_ERROR_TEXT, MAX_PARAM_TEXT, PgError, PgFeedReport, PgOutcome, PgStatement, decode,
    framing::Msg,
    frontend::{Exec, Item, Pending, Simple},
    sql,
    stream::PgStream,
    wire,
};

/// Longest CommandComplete tag we keep.
const MAX_TAG_TEXT: usize = 128;

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

/// Where a finished statement ended and with what.
pub(super) struct End {
    pub(super) ts: u64,
    pub(super) tag: Option<String>,
    pub(super) error: Option<PgError>,
    suspended: bool,
    pub(super) outcome: PgOutcome,
}

impl PgStream {
    pub(super) fn on_backend(
        &mut self,
        msg: &Msg<'_>,
        report: &mut PgFeedReport,
        out: &mut Vec<PgStatement>,
    ) {
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
    pub(super) fn end_simple(
        &mut self,
        s: Simple,
        ts: u64,
        outcome: PgOutcome,
        out: &mut Vec<PgStatement>,
    ) {
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

    pub(super) fn emit_exec(&self, e: Exec, end: End, out: &mut Vec<PgStatement>) {
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
    pub(super) fn plain(ts: u64, outcome: PgOutcome) -> Self {
        Self {
            ts,
            tag: None,
            error: None,
            suspended: false,
            outcome,
        }
    }
}

/// One statement of a simple query's text.
fn piece(raw: &str, range: Option<&Range<usize>>) -> Option<Arc<str>> {
    range.and_then(|r| raw.get(r.clone())).map(Arc::from)
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
