//! Sans-I/O PostgreSQL connection parser (frontend/backend protocol 3.0).
//!
//! One [`PgStream`] per TCP connection, fed the same [`Segment`](super::segment::Segment)s as
//! the HTTP/1 parser: the exact byte count of each send/recv syscall and a captured prefix of its bytes. It follows
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
//!
//! Files: `stream.rs` holds the per-connection parser and its startup phase, `framing.rs`
//! reads messages out of segments (and loses / regains sync), `frontend.rs` queues requests,
//! `backend.rs` matches responses to them and emits statements, `lru.rs` remembers statement
//! and portal names, `wire.rs` the message formats, `sql.rs` statement text (split, sanitize,
//! summarize).

mod backend;
mod framing;
mod frontend;
mod lru;
mod sql;
mod stream;
mod wire;

#[cfg(test)]
mod tests;

pub use self::stream::PgStream;
use self::wire::Kind;
use crate::protocols::segment::{Direction, Role};

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
/// Longest statement/portal name we keep (the server's limit is 63).
const MAX_NAME_BYTES: usize = 256;
const MAX_PARAM_TEXT: usize = 256;

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

fn name_of(bytes: &[u8]) -> String {
    decode(bytes, MAX_NAME_BYTES).0
}
