//! Replays of real PostgreSQL 15 sessions recorded with
//! `agent/tests-fixtures/postgres/record_proxy.py` (see `record_all.sh` there), plus
//! robustness sweeps and hand-built edge cases, one file per kind; the fixtures and the replay
//! helpers are here.

mod cache_cost;
mod capture;
mod corners;
mod hostile;
mod sessions;
mod sweeps;

use super::frontend::MAX_PENDING_TEXT;
use super::stream::{PICKUP_DETECT_SEGMENTS, STATEMENT_CACHE_ENTRIES};
use super::*;
use crate::protocols::segment::Segment;

// ---- fixtures: real wire bytes, one line per chunk the recording proxy received ----

/// psql 15 (`psql -f psql_simple.sql`, sslmode=disable): simple queries, errors, multi-statement
/// strings, COPY FROM STDIN / TO STDOUT, a 5 KB INSERT, 5 KB DataRows, NOTICE, LISTEN/NOTIFY,
/// an empty query.
const PSQL_SIMPLE: &str = include_str!("../../../../tests-fixtures/postgres/psql_simple-1.hex");
/// psql 15 with sslmode=prefer against a server with ssl=off: SSLRequest answered `N`.
const PSQL_SSL_PREFER: &str =
    include_str!("../../../../tests-fixtures/postgres/psql_ssl_prefer-1.hex");
/// pgbench's setup connection (simple queries), in the `-M extended` and `-M prepared` runs.
const PGBENCH_EXTENDED_SETUP: &str =
    include_str!("../../../../tests-fixtures/postgres/pgbench_extended-1.hex");
const PGBENCH_PREPARED_SETUP: &str =
    include_str!("../../../../tests-fixtures/postgres/pgbench_prepared-1.hex");
/// pgbench -M extended: unnamed statements, Parse/Bind/Describe/Execute/Sync per statement.
const PGBENCH_EXTENDED: &str =
    include_str!("../../../../tests-fixtures/postgres/pgbench_extended-2.hex");
/// pgbench -M prepared: named statements P_0…P_6 prepared once, then Bind/Execute only.
const PGBENCH_PREPARED: &str =
    include_str!("../../../../tests-fixtures/postgres/pgbench_prepared-2.hex");
/// psycopg 3.3: a prepared statement executed 4 times, a pipeline, a pipeline whose second
/// statement fails, COPY FROM STDIN and a COPY aborted with CopyFail.
const PSYCOPG: &str = include_str!("../../../../tests-fixtures/postgres/psycopg-1.hex");
/// asyncpg: a cursor with prefetch=3 in a transaction: Execute with a row limit, PortalSuspended.
const ASYNCPG: &str = include_str!("../../../../tests-fixtures/postgres/asyncpg-1.hex");

const ALL_FIXTURES: [(&str, &str); 7] = [
    ("psql_simple", PSQL_SIMPLE),
    ("psql_ssl_prefer", PSQL_SSL_PREFER),
    ("pgbench_extended_setup", PGBENCH_EXTENDED_SETUP),
    ("pgbench_extended", PGBENCH_EXTENDED),
    ("pgbench_prepared", PGBENCH_PREPARED),
    ("psycopg", PSYCOPG),
    ("asyncpg", ASYNCPG),
];

#[derive(Clone, Debug)]
struct Chunk {
    /// Sent by the frontend (client).
    frontend: bool,
    bytes: Vec<u8>,
}

fn unhex(s: &str) -> Vec<u8> {
    assert!(s.len().is_multiple_of(2), "odd hex length");
    (0..s.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(&s[i..i + 2], 16).unwrap_or_else(|e| panic!("bad hex at {i}: {e}"))
        })
        .collect()
}

fn load(text: &str) -> Vec<Chunk> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (marker, hex) = l
                .split_once(' ')
                .unwrap_or_else(|| panic!("fixture line without marker: {l:.40}"));
            assert!(marker == ">" || marker == "<", "bad marker {marker:?}");
            Chunk {
                frontend: marker == ">",
                bytes: unhex(hex.trim()),
            }
        })
        .collect()
}

fn direction(role: Role, frontend: bool) -> Direction {
    match (role, frontend) {
        (Role::Client, true) | (Role::Server, false) => Direction::Egress,
        _ => Direction::Ingress,
    }
}

/// One segment to feed: direction, timestamp, exact length, captured bytes.
#[derive(Clone, Debug)]
struct Seg {
    frontend: bool,
    ts: u64,
    len: u64,
    data: Vec<u8>,
}

/// Chunks as segments stamped 10, 20, 30…, captured up to `capture` bytes.
fn segments(chunks: &[Chunk], capture: usize) -> Vec<Seg> {
    chunks
        .iter()
        .enumerate()
        .map(|(i, c)| Seg {
            frontend: c.frontend,
            ts: (i as u64 + 1) * 10,
            len: c.bytes.len() as u64,
            data: c.bytes[..c.bytes.len().min(capture)].to_vec(),
        })
        .collect()
}

struct Replay {
    stream: PgStream,
    out: Vec<PgStatement>,
    reports: Vec<PgFeedReport>,
}

impl Replay {
    fn new(hint: Option<Role>) -> Self {
        Self {
            stream: PgStream::new(hint),
            out: Vec::new(),
            reports: Vec::new(),
        }
    }

    fn feed(&mut self, role: Role, s: &Seg) {
        let seg = Segment {
            direction: direction(role, s.frontend),
            ts_ns: s.ts,
            first_ts_ns: s.ts,
            len: s.len,
            data: &s.data,
            tid: 1000 + (s.ts / 10) as u32,
        };
        let r = self.stream.feed(seg, &mut self.out);
        self.reports.push(r);
    }

    fn any(&self, f: impl Fn(&PgFeedReport) -> bool) -> bool {
        self.reports.iter().any(f)
    }
}

fn run(segs: &[Seg], role: Role, hint: Option<Role>) -> Replay {
    let mut r = Replay::new(hint);
    for s in segs {
        r.feed(role, s);
    }
    let last = segs.last().map_or(0, |s| s.ts);
    r.stream.close(last + 1, &mut r.out);
    r
}

fn replay(fixture: &str, role: Role) -> Replay {
    run(&segments(&load(fixture), usize::MAX), role, Some(role))
}

/// One line per statement, for exact comparisons.
fn brief(s: &PgStatement) -> String {
    let q = s.query.as_deref().map(|q| {
        if q.len() > 70 {
            format!("{}…({} bytes)", &q[..60], q.len())
        } else {
            q.to_owned()
        }
    });
    let mut line = format!("{:?} {}", s.outcome, s.operation.as_deref().unwrap_or("-"));
    match q {
        Some(q) => line += &format!(" q={q:?}"),
        None => line += " q=None",
    }
    if let Some(n) = &s.prepared_name {
        line += &format!(" name={n}");
    }
    if let Some(t) = &s.command_tag {
        line += &format!(" tag={t:?}");
    }
    if let Some(r) = s.rows {
        line += &format!(" rows={r}");
    }
    if s.data_rows > 0 {
        line += &format!(" dr={}", s.data_rows);
    }
    if s.portal_suspended {
        line += " suspended";
    }
    if let Some(e) = &s.error {
        line += &format!(" err={}", e.code.as_deref().unwrap_or("?"));
    }
    if s.query_truncated {
        line += " truncated";
    }
    line
}

fn briefs(out: &[PgStatement]) -> Vec<String> {
    out.iter().map(brief).collect()
}

fn expect(out: &[PgStatement], expected: &[&str]) {
    let got = briefs(out);
    if got != expected {
        let mut msg = String::from("statements differ\n--- got:\n");
        for g in &got {
            msg += &format!("    {g:?},\n");
        }
        msg += "--- expected:\n";
        for e in expected {
            msg += &format!("    {e:?},\n");
        }
        panic!("{msg}");
    }
}

fn seg_of(frontend: bool, ts: u64, bytes: &[u8]) -> Seg {
    Seg {
        frontend,
        ts,
        len: bytes.len() as u64,
        data: bytes.to_vec(),
    }
}

/// A tagged message, for hand-built edge cases (the fixtures above are the real bytes).
fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    v.extend_from_slice(body);
    v
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

const SSL_REQUEST: &[u8] = b"\x00\x00\x00\x08\x04\xd2\x16\x2f";
const GSSENC_REQUEST: &[u8] = b"\x00\x00\x00\x08\x04\xd2\x16\x30";
const STARTUP: &[u8] =
    b"\x00\x00\x00\x29\x00\x03\x00\x00user\x00postgres\x00database\x00postgres\x00\x00";
const AUTH_OK_READY: &[u8] = b"R\x00\x00\x00\x08\x00\x00\x00\x00Z\x00\x00\x00\x05I";

/// The chunks of a fixture from the one whose bytes contain `needle` on.
fn from_chunk_containing(chunks: &[Chunk], needle: &[u8], nth: usize) -> usize {
    chunks
        .iter()
        .enumerate()
        .filter(|(_, c)| c.bytes.windows(needle.len()).any(|w| w == needle))
        .nth(nth)
        .map(|(i, _)| i)
        .unwrap_or_else(|| {
            panic!(
                "no chunk #{nth} containing {:?}",
                String::from_utf8_lossy(needle)
            )
        })
}
