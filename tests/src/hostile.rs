//! Hostile input for the header injector and for traced servers (issue 9): byte-exact plans of
//! what a client writes ([`Case`], played by `fixtures/hostile_client.py`), a server that records
//! every byte it receives (`fixtures/recording_server.py`), and the judge of whether a stream
//! arrived intact ([`check_delivery`]).
//!
//! A case's bytes are a sequence of [`Piece`]s. Only a [`Piece::Request`] — a request that starts
//! where every server agrees a request starts — may change on its way, and only as the injector
//! is allowed to change it: one `traceparent` line right after a well-formed request line (when
//! the request has no `traceparent` at all), or, when it has exactly one valid version-00
//! `traceparent`, its parent id rewritten in place (and its trace id too if that was all zeros),
//! always with valid, non-zero, lower-case ids. Everything else must arrive exactly as written.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::process::{TestDir, poll_until, run_to_completion, tail};
use crate::servers::ScriptServer;
use crate::services::Gated;
use crate::{fixture, python_bin};
use serde_json::{Value, json};

/// `traceparent: 00-<32 hex>-<16 hex>-<2 hex>\r\n`
pub const TRACEPARENT_LINE_LEN: usize = 70;

/// What the injector must do with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Add a header or rewrite its valid one: its framing is known and nothing excuses a miss.
    Injected,
    /// Leave it exactly as it is (an invalid or repeated `traceparent`).
    Untouched,
    /// Either, as long as any change is one the rules allow (framing may have been given up).
    Either,
}

#[derive(Debug, Clone)]
pub enum Piece {
    /// A request (head and body) starting at a boundary no server could place elsewhere.
    Request { bytes: Vec<u8>, expect: Expect },
    /// Bytes nothing may change: garbage, or whatever follows a request whose framing servers
    /// disagree on.
    Raw(Vec<u8>),
}

impl Piece {
    pub fn request(bytes: impl Into<Vec<u8>>, expect: Expect) -> Piece {
        Piece::Request {
            bytes: bytes.into(),
            expect,
        }
    }

    pub fn raw(bytes: impl Into<Vec<u8>>) -> Piece {
        Piece::Raw(bytes.into())
    }

    pub fn bytes(&self) -> &[u8] {
        match self {
            Piece::Request { bytes, .. } | Piece::Raw(bytes) => bytes,
        }
    }
}

/// The target of a request line (for messages and span lookups), cut to 60 characters.
pub fn target_of(request: &[u8]) -> String {
    let line = request.split(|&b| b == b'\n').next().unwrap_or_default();
    let target = line.split(|&b| b == b' ').nth(1).unwrap_or_default();
    let mut s = String::from_utf8_lossy(target).into_owned();
    if s.len() > 60 {
        s.truncate(60);
        s.push('…');
    }
    s
}

/// `GET <path> HTTP/1.1` with a Host line, then `headers` (full lines without CRLF).
pub fn get(path: &str, headers: &[&str]) -> Vec<u8> {
    let mut r = format!("GET {path} HTTP/1.1\r\nHost: e2e\r\n");
    for h in headers {
        r.push_str(h);
        r.push_str("\r\n");
    }
    r.push_str("\r\n");
    r.into_bytes()
}

/// `POST <path> HTTP/1.1` with `headers` (full lines) and `body` appended as is (the caller
/// writes any Content-Length).
pub fn post(path: &str, headers: &[&str], body: &[u8]) -> Vec<u8> {
    let mut r = format!("POST {path} HTTP/1.1\r\nHost: e2e\r\n").into_bytes();
    for h in headers {
        r.extend_from_slice(h.as_bytes());
        r.extend_from_slice(b"\r\n");
    }
    r.extend_from_slice(b"\r\n");
    r.extend_from_slice(body);
    r
}

#[derive(Debug, Clone)]
pub enum Step {
    Send(Vec<u8>),
    Dribble { bytes: Vec<u8>, gap_ms: u64 },
    Pause(u64),
    Answers(usize),
    EndShutdown,
    EndRead,
}

/// One connection: the pieces of its byte stream and how they are written.
#[derive(Debug, Clone)]
pub struct Case {
    pub name: String,
    pub pieces: Vec<Piece>,
    pub steps: Vec<Step>,
}

impl Case {
    pub fn new(name: &str) -> Case {
        Case {
            name: name.to_string(),
            pieces: Vec::new(),
            steps: Vec::new(),
        }
    }

    /// One write holding these pieces.
    pub fn write(mut self, pieces: Vec<Piece>) -> Case {
        let bytes: Vec<u8> = pieces.iter().flat_map(|p| p.bytes().to_vec()).collect();
        self.pieces.extend(pieces);
        self.steps.push(Step::Send(bytes));
        self
    }

    /// `piece` written in several writes, cut at these offsets.
    pub fn split(mut self, piece: Piece, cuts: &[usize]) -> Case {
        let bytes = piece.bytes().to_vec();
        let mut at = 0;
        for &cut in cuts.iter().chain(std::iter::once(&bytes.len())) {
            assert!(
                cut > at && cut <= bytes.len(),
                "bad cut {cut} of {}",
                bytes.len()
            );
            self.steps.push(Step::Send(bytes[at..cut].to_vec()));
            at = cut;
        }
        self.pieces.push(piece);
        self
    }

    /// `piece` written one byte per write, `gap_ms` apart.
    pub fn dribble(mut self, piece: Piece, gap_ms: u64) -> Case {
        self.steps.push(Step::Dribble {
            bytes: piece.bytes().to_vec(),
            gap_ms,
        });
        self.pieces.push(piece);
        self
    }

    pub fn pause(mut self, ms: u64) -> Case {
        self.steps.push(Step::Pause(ms));
        self
    }

    /// Wait for `n` more complete answers.
    pub fn answers(mut self, n: usize) -> Case {
        self.steps.push(Step::Answers(n));
        self
    }

    /// Shut down the sending side and read until the server closes.
    pub fn end_shutdown(mut self) -> Case {
        self.steps.push(Step::EndShutdown);
        self
    }

    /// Read until the server closes.
    pub fn end_read(mut self) -> Case {
        self.steps.push(Step::EndRead);
        self
    }

    /// Every byte the client writes, in order.
    pub fn sent(&self) -> Vec<u8> {
        self.pieces
            .iter()
            .flat_map(|p| p.bytes().to_vec())
            .collect()
    }

    /// The requests, in order.
    pub fn requests(&self) -> impl Iterator<Item = (&[u8], Expect)> {
        self.pieces.iter().filter_map(|p| match p {
            Piece::Request { bytes, expect } => Some((bytes.as_slice(), *expect)),
            Piece::Raw(_) => None,
        })
    }

    fn to_json(&self) -> Value {
        let steps: Vec<Value> = self
            .steps
            .iter()
            .map(|s| match s {
                Step::Send(b) => json!({ "send": hex(b) }),
                Step::Dribble { bytes, gap_ms } => {
                    json!({ "dribble": hex(bytes), "gap_ms": gap_ms })
                }
                Step::Pause(ms) => json!({ "pause_ms": ms }),
                Step::Answers(n) => json!({ "answers": n }),
                Step::EndShutdown => json!({ "end": "shutdown" }),
                Step::EndRead => json!({ "end": "read" }),
            })
            .collect();
        json!({ "name": self.name, "steps": steps })
    }
}

pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The judge.

/// What happened to one request on its way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    Untouched,
    /// One `traceparent` line added after the request line, carrying these ids.
    Inserted {
        trace_id: String,
        span_id: String,
    },
    /// Its `traceparent` rewritten in place: the value it arrived with.
    Rewritten {
        trace_id: String,
        span_id: String,
    },
}

impl Delivery {
    /// The ids on the wire, when the injector wrote any.
    pub fn ids(&self) -> Option<(&str, &str)> {
        match self {
            Delivery::Untouched => None,
            Delivery::Inserted { trace_id, span_id }
            | Delivery::Rewritten { trace_id, span_id } => Some((trace_id, span_id)),
        }
    }
}

/// The request line end and the `traceparent` header lines of a request head, as a server
/// reads them; `None` when the head is not well-formed enough for any change to be allowed.
struct Head {
    /// Offset just after the request line's CRLF.
    line_end: usize,
    /// (value start, value end) of each header line named `traceparent` (any case, spaces
    /// around the name ignored, so a near-miss counts as one too).
    traceparents: Vec<(usize, usize)>,
}

fn read_head(request: &[u8]) -> Option<Head> {
    let end = find(request, b"\r\n\r\n")? + 4;
    let head = &request[..end];
    let line_end = find(head, b"\r\n")? + 2;
    let line = &head[..line_end - 2];
    let parts: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
    let method_ok = |m: &[u8]| !m.is_empty() && m.iter().all(u8::is_ascii_uppercase);
    let target_ok = |t: &[u8]| !t.is_empty() && t.iter().all(|b| (0x21..0x7f).contains(b));
    if parts.len() != 3
        || !method_ok(parts[0])
        || !target_ok(parts[1])
        || !(parts[2] == b"HTTP/1.1" || parts[2] == b"HTTP/1.0")
    {
        return None;
    }
    let mut traceparents = Vec::new();
    let mut at = line_end;
    while at < end - 2 {
        let next = at + find(&head[at..], b"\n")? + 1;
        let line = &head[at..next];
        if let Some(colon) = line.iter().position(|&b| b == b':')
            && line[..colon]
                .trim_ascii()
                .eq_ignore_ascii_case(b"traceparent")
        {
            let mut v = at + colon + 1;
            while v < next && (head[v] == b' ' || head[v] == b'\t') {
                v += 1;
            }
            let mut e = next;
            while e > v && matches!(head[e - 1], b'\r' | b'\n' | b' ' | b'\t') {
                e -= 1;
            }
            traceparents.push((v, e));
        }
        at = next;
    }
    Some(Head {
        line_end,
        traceparents,
    })
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn lower_hex(s: &[u8]) -> bool {
    s.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Lower-case hex of the right length and not all zeros: a valid W3C trace or span id.
pub fn valid_id(s: &[u8], len: usize) -> bool {
    s.len() == len && lower_hex(s) && s.iter().any(|&b| b != b'0')
}

/// A version-00 `traceparent` value (W3C Trace Context level 1: exactly 55 characters), with
/// ids that may be all zeros (the injector must rewrite those).
fn rewritable(value: &[u8]) -> bool {
    value.len() == 55
        && value.starts_with(b"00-")
        && value[35] == b'-'
        && value[52] == b'-'
        && lower_hex(&value[3..35])
        && lower_hex(&value[36..52])
        && lower_hex(&value[53..55])
}

/// `traceparent: 00-<trace>-<span>-<flags>\r\n` with valid ids: (trace, span).
fn inserted_line(line: &[u8]) -> Option<(String, String)> {
    if line.len() != TRACEPARENT_LINE_LEN
        || !line.starts_with(b"traceparent: 00-")
        || line[48] != b'-'
        || line[65] != b'-'
        || !lower_hex(&line[66..68])
        || &line[68..] != b"\r\n"
    {
        return None;
    }
    let (trace, span) = (&line[16..48], &line[49..65]);
    (valid_id(trace, 32) && valid_id(span, 16)).then(|| {
        (
            String::from_utf8_lossy(trace).into_owned(),
            String::from_utf8_lossy(span).into_owned(),
        )
    })
}

/// Printable excerpt of `bytes` around `at` (40 bytes each side).
fn excerpt(bytes: &[u8], at: usize) -> String {
    let start = at.saturating_sub(40);
    let end = (at + 40).min(bytes.len());
    let mut s = String::new();
    for &b in &bytes[start..end] {
        match b {
            b'\r' => s.push_str("\\r"),
            b'\n' => s.push_str("\\n"),
            0x20..=0x7e => s.push(b as char),
            _ => {
                let _ = write!(s, "\\x{b:02x}");
            }
        }
    }
    format!("[{start}..{end}] \"{s}\"")
}

fn first_difference(a: &[u8], b: &[u8]) -> usize {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .unwrap_or(a.len().min(b.len()))
}

/// Checks that `received` is exactly what `pieces` wrote, up to the changes the injector is
/// allowed to make (see the module comment), and that each request's [`Expect`] held. Returns
/// one [`Delivery`] per [`Piece::Request`], in order; the error says where and how the stream
/// went wrong.
pub fn check_delivery(pieces: &[Piece], received: &[u8]) -> Result<Vec<Delivery>, String> {
    let mut out = Vec::new();
    let mut at = 0;
    let mut sent_at = 0;
    for (i, piece) in pieces.iter().enumerate() {
        let bytes = piece.bytes();
        let rest = &received[at..];
        let wrong = |what: String, offset: usize| {
            Err(format!(
                "piece {i} ({}), sent at byte {sent_at}: {what}\n  sent:     {}\n  received: {}",
                match piece {
                    Piece::Request { .. } => format!("request {}", target_of(bytes)),
                    Piece::Raw(_) => "raw bytes".to_string(),
                },
                excerpt(bytes, offset),
                excerpt(rest, offset)
            ))
        };
        let (delivery, used) = match piece {
            Piece::Raw(_) => {
                if !rest.starts_with(bytes) {
                    let d = first_difference(bytes, rest);
                    return wrong(format!("changed at its byte {d}"), d);
                }
                at += bytes.len();
                sent_at += bytes.len();
                continue;
            }
            Piece::Request { .. } => match judge_request(bytes, rest) {
                Ok(r) => r,
                Err((what, offset)) => return wrong(what, offset),
            },
        };
        let Piece::Request { expect, .. } = piece else {
            unreachable!()
        };
        match (expect, &delivery) {
            (Expect::Injected, Delivery::Untouched) => {
                return wrong(
                    "arrived without the injector's ids (expected: injected)".to_string(),
                    0,
                );
            }
            (Expect::Untouched, Delivery::Inserted { .. } | Delivery::Rewritten { .. }) => {
                return wrong(
                    format!("the injector changed it (expected: untouched): {delivery:?}"),
                    0,
                );
            }
            _ => {}
        }
        out.push(delivery);
        at += used;
        sent_at += bytes.len();
    }
    if at != received.len() {
        return Err(format!(
            "{} byte(s) more arrived than were sent (and injected): {}",
            received.len() - at,
            excerpt(received, at)
        ));
    }
    Ok(out)
}

/// One request at the start of `rest`: how it arrived and how many bytes it takes there, or
/// what is wrong and where (an offset into the request as sent).
fn judge_request(bytes: &[u8], rest: &[u8]) -> Result<(Delivery, usize), (String, usize)> {
    if rest.starts_with(bytes) {
        return Ok((Delivery::Untouched, bytes.len()));
    }
    let d = first_difference(bytes, rest);
    let Some(head) = read_head(bytes) else {
        return Err((
            format!("changed at its byte {d}, but it is not a request the injector may touch"),
            d,
        ));
    };
    match head.traceparents.as_slice() {
        [] => {
            // Only a whole traceparent line right after the request line.
            let le = head.line_end;
            let line = rest.get(le..le + TRACEPARENT_LINE_LEN);
            match line.and_then(inserted_line) {
                Some((trace_id, span_id))
                    if d >= le && rest[le + TRACEPARENT_LINE_LEN..].starts_with(&bytes[le..]) =>
                {
                    Ok((
                        Delivery::Inserted { trace_id, span_id },
                        bytes.len() + TRACEPARENT_LINE_LEN,
                    ))
                }
                _ => Err((
                    format!(
                        "changed at its byte {d}: not one valid traceparent line added after the request line"
                    ),
                    d,
                )),
            }
        }
        [(v, e)] if rewritable(&bytes[*v..*e]) => {
            let v = *v;
            let old = &bytes[v..v + 55];
            let Some(new) = rest.get(v..v + 55) else {
                return Err(("the stream ends inside its traceparent".to_string(), d));
            };
            let zero_trace = old[3..35].iter().all(|&b| b == b'0');
            // Bytes outside the ids that may change are as sent.
            let trace = v + 3..v + 35;
            let parent = v + 36..v + 52;
            for (k, b) in bytes.iter().enumerate() {
                let may_change = parent.contains(&k) || (zero_trace && trace.contains(&k));
                if !may_change && rest.get(k) != Some(b) {
                    return Err((
                        format!(
                            "changed at its byte {k}, outside the ids of its traceparent{}",
                            if trace.contains(&k) {
                                " (its trace id was valid: it must stay)"
                            } else {
                                ""
                            }
                        ),
                        k,
                    ));
                }
            }
            if !valid_id(&new[3..35], 32) || !valid_id(&new[36..52], 16) {
                return Err((
                    format!(
                        "its traceparent was rewritten to invalid ids: {}",
                        String::from_utf8_lossy(new)
                    ),
                    v,
                ));
            }
            Ok((
                Delivery::Rewritten {
                    trace_id: String::from_utf8_lossy(&new[3..35]).into_owned(),
                    span_id: String::from_utf8_lossy(&new[36..52]).into_owned(),
                },
                bytes.len(),
            ))
        }
        _ => Err((
            format!(
                "changed at its byte {d}, but it carries {} traceparent header(s) the injector must leave alone (invalid, or several)",
                head.traceparents.len()
            ),
            d,
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// The programs.

/// What `hostile_client.py` reported for one case.
#[derive(Debug, Clone)]
pub struct CaseResult {
    pub name: String,
    pub local_port: u16,
    /// Status of each complete answer read.
    pub statuses: Vec<u16>,
    /// Every byte read on the connection.
    pub received: Vec<u8>,
    /// A timeout (a stall), or the connection closed before the answers expected.
    pub error: Option<String>,
    /// The server reset the connection (it closed with unread data): how the client saw it.
    /// Whether the reset or the client's last write comes first is a race.
    pub reset: Option<String>,
}

fn parse_results(stdout: &str) -> Vec<CaseResult> {
    stdout
        .lines()
        .filter_map(|line| {
            let j: Value = serde_json::from_str(line).ok()?;
            Some(CaseResult {
                name: j.get("name")?.as_str()?.to_string(),
                local_port: j.get("local_port")?.as_u64()? as u16,
                statuses: j
                    .get("statuses")?
                    .as_array()?
                    .iter()
                    .filter_map(|s| s.as_u64().map(|s| s as u16))
                    .collect(),
                received: unhex(j.get("received")?.as_str()?)?,
                error: j.get("error").and_then(Value::as_str).map(str::to_string),
                reset: j.get("reset").and_then(Value::as_str).map(str::to_string),
            })
        })
        .collect()
}

/// `fixtures/hostile_client.py` with a plan of `cases` against 127.0.0.1:`port`.
pub struct HostileClient {
    cmd: Command,
    cases: usize,
    _plan: TestDir,
}

impl HostileClient {
    pub fn new(port: u16, cases: &[Case]) -> HostileClient {
        let dir = TestDir::new("hostile-plan");
        let plan: PathBuf = dir.join("plan.json");
        let json: Vec<Value> = cases.iter().map(Case::to_json).collect();
        std::fs::write(&plan, Value::from(json).to_string()).expect("write the plan");
        let mut cmd = Command::new(python_bin());
        cmd.arg(fixture("hostile_client.py"))
            .arg("127.0.0.1")
            .arg(port.to_string())
            .arg(&plan);
        HostileClient {
            cmd,
            cases: cases.len(),
            _plan: dir,
        }
    }

    /// Runs it now (untraced).
    pub fn run(self) -> Vec<CaseResult> {
        let (status, stdout, stderr, pid) =
            run_to_completion("hostile_client", self.cmd, Duration::from_secs(120));
        Self::results(self.cases, status, &stdout, &stderr, pid)
    }

    /// Started and held before its first byte (so the agent can select it by pid).
    pub fn gated(self) -> GatedHostileClient {
        GatedHostileClient {
            gated: Gated::spawn("hostile_client", self.cmd, Duration::from_secs(120)),
            cases: self.cases,
            _plan: self._plan,
        }
    }

    fn results(
        n: usize,
        status: std::process::ExitStatus,
        stdout: &str,
        stderr: &str,
        pid: u32,
    ) -> Vec<CaseResult> {
        let results = parse_results(stdout);
        assert!(
            status.success() && results.len() == n,
            "hostile_client.py (pid {pid}) failed: exit {status}, {} of {n} cases\nstderr:\n{}",
            results.len(),
            tail(stderr, 30)
        );
        results
    }
}

pub struct GatedHostileClient {
    gated: Gated,
    cases: usize,
    _plan: TestDir,
}

impl GatedHostileClient {
    pub fn pid(&self) -> u32 {
        self.gated.pid()
    }

    pub fn run(self) -> Vec<CaseResult> {
        let (status, stdout, stderr, pid) = self.gated.release();
        HostileClient::results(self.cases, status, &stdout, &stderr, pid)
    }
}

/// `fixtures/recording_server.py`: records each connection's bytes exactly.
pub struct RecordingServer {
    server: ScriptServer,
    dir: TestDir,
}

/// What the recording server got on one connection.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub bytes: Vec<u8>,
    /// Targets of the requests it answered, in order.
    pub answered: Vec<String>,
}

impl RecordingServer {
    pub fn start() -> RecordingServer {
        let dir = TestDir::new("recording");
        let mut cmd = Command::new(python_bin());
        cmd.arg(fixture("recording_server.py"))
            .arg("0")
            .arg(dir.path());
        RecordingServer {
            server: ScriptServer::start_command("recording_server", cmd),
            dir,
        }
    }

    pub fn port(&self) -> u16 {
        self.server.port()
    }

    /// The connection from `peer_port`, once the server is done with it (10 s at most).
    pub fn recorded(&self, peer_port: u16) -> Option<Recorded> {
        let prefix = format!("DONE port={peer_port} ");
        let line = poll_until(Duration::from_secs(10), || {
            self.server
                .stdout()
                .lines()
                .find(|l| l.starts_with(&prefix))
                .map(str::to_string)
        })?;
        let answered = line
            .split_whitespace()
            .find_map(|f| f.strip_prefix("answered="))
            .filter(|a| *a != "-")
            .map(|a| a.split(',').map(str::to_string).collect())
            .unwrap_or_default();
        let bytes = std::fs::read(self.dir.join(&format!("{peer_port}.bin"))).ok()?;
        Some(Recorded { bytes, answered })
    }

    pub fn stderr(&self) -> String {
        self.server.stderr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const SPAN: &str = "00f067aa0ba902b7";

    fn line(trace: &str, span: &str) -> Vec<u8> {
        format!("traceparent: 00-{trace}-{span}-01\r\n").into_bytes()
    }

    /// `request` with `extra` inserted right after its request line.
    fn with_line(request: &[u8], extra: &[u8]) -> Vec<u8> {
        let le = find(request, b"\r\n").unwrap() + 2;
        [&request[..le], extra, &request[le..]].concat()
    }

    fn replace(bytes: &[u8], from: &str, to: &str) -> Vec<u8> {
        let at = find(bytes, from.as_bytes()).expect("present");
        [&bytes[..at], to.as_bytes(), &bytes[at + from.len()..]].concat()
    }

    /// A stream with every kind of piece: garbage, injectable requests, a request with a
    /// valid traceparent, one with an all-zero traceparent, one with an invalid one.
    fn sample() -> (Vec<Piece>, Vec<u8>) {
        let a = get("/a", &["X-A: 1"]);
        let b = post("/b", &["Content-Length: 3"], b"abc");
        let c = get("/c", &[&format!("traceparent: 00-{TRACE}-{SPAN}-01")]);
        let z = get(
            "/z",
            &["traceparent: 00-00000000000000000000000000000000-0000000000000000-01"],
        );
        let bad = get("/bad", &["traceparent: 00-abc-def-01"]);
        let garbage: Vec<u8> = (0..300u32).map(|i| (i * 7 + 3) as u8).collect();
        let pieces = vec![
            Piece::request(a.clone(), Expect::Injected),
            Piece::raw(garbage.clone()),
            Piece::request(b.clone(), Expect::Either),
            Piece::request(c.clone(), Expect::Either),
            Piece::request(z.clone(), Expect::Either),
            Piece::request(bad.clone(), Expect::Untouched),
        ];
        // What a correct injector may deliver.
        let delivered = [
            with_line(
                &a,
                &line("11111111111111111111111111111111", "2222222222222222"),
            ),
            garbage,
            with_line(
                &b,
                &line("33333333333333333333333333333333", "4444444444444444"),
            ),
            replace(&c, SPAN, "5555555555555555"),
            replace(
                &z,
                "00000000000000000000000000000000-0000000000000000",
                "66666666666666666666666666666666-7777777777777777",
            ),
            bad,
        ]
        .concat();
        (pieces, delivered)
    }

    #[test]
    fn a_correct_delivery_passes_and_reports_the_ids() {
        let (pieces, delivered) = sample();
        let d = check_delivery(&pieces, &delivered).expect("a correct delivery");
        assert_eq!(d.len(), 5);
        assert_eq!(
            d[0].ids(),
            Some(("11111111111111111111111111111111", "2222222222222222"))
        );
        assert_eq!(
            d[2],
            Delivery::Rewritten {
                trace_id: TRACE.into(),
                span_id: "5555555555555555".into()
            }
        );
        assert_eq!(
            d[3].ids(),
            Some(("66666666666666666666666666666666", "7777777777777777"))
        );
        assert_eq!(d[4], Delivery::Untouched);
        // Untouched everywhere is fine too, except where injection is required.
        let sent: Vec<u8> = pieces.iter().flat_map(|p| p.bytes().to_vec()).collect();
        let err = check_delivery(&pieces, &sent).expect_err("/a must be injected");
        assert!(err.contains("expected: injected"), "{err}");
    }

    /// Every single-byte corruption of a correct delivery — a bit flipped, a byte dropped, a
    /// byte added — anywhere in the stream is caught.
    #[test]
    fn every_single_byte_corruption_is_caught() {
        let (pieces, delivered) = sample();
        for i in 0..delivered.len() {
            let mut flipped = delivered.clone();
            flipped[i] ^= 0x80;
            assert!(
                check_delivery(&pieces, &flipped).is_err(),
                "byte {i} flipped: {}",
                excerpt(&flipped, i)
            );
            let mut dropped = delivered.clone();
            dropped.remove(i);
            assert!(
                check_delivery(&pieces, &dropped).is_err(),
                "byte {i} dropped: {}",
                excerpt(&dropped, i)
            );
            let mut added = delivered.clone();
            added.insert(i, b'x');
            assert!(
                check_delivery(&pieces, &added).is_err(),
                "byte added at {i}: {}",
                excerpt(&added, i)
            );
        }
    }

    #[test]
    fn changes_the_injector_may_not_make_are_caught() {
        let req = get("/r", &["X: 1"]);
        let pieces = [Piece::request(req.clone(), Expect::Either)];
        let ok = line(TRACE, SPAN);
        let cases: Vec<(&str, Vec<u8>)> = vec![
            (
                "zero trace id",
                with_line(&req, &line(&"0".repeat(32), SPAN)),
            ),
            (
                "zero span id",
                with_line(&req, &line(TRACE, &"0".repeat(16))),
            ),
            (
                "upper-case id",
                with_line(&req, &line(&TRACE.to_uppercase(), SPAN)),
            ),
            ("short id", with_line(&req, &line(&TRACE[1..], SPAN))),
            (
                "no CRLF",
                with_line(
                    &req,
                    &ok[..ok.len() - 2]
                        .iter()
                        .chain(b"\n")
                        .copied()
                        .collect::<Vec<_>>(),
                ),
            ),
            (
                "two lines",
                with_line(&req, &[ok.clone(), ok.clone()].concat()),
            ),
            ("after the Host line", {
                let at = find(&req, b"X: 1").unwrap();
                [&req[..at], &ok, &req[at..]].concat()
            }),
            ("other header", with_line(&req, b"x-trace: 1\r\n")),
            ("truncated", req[..req.len() - 1].to_vec()),
            ("extra byte", [req.clone(), b"\r\n".to_vec()].concat()),
        ];
        for (what, received) in cases {
            assert!(
                check_delivery(&pieces, &received).is_err(),
                "{what}: {}",
                String::from_utf8_lossy(&received)
            );
        }
        // Inside raw bytes, even a perfect line is corruption.
        let raw = [Piece::raw(req.clone())];
        assert!(check_delivery(&raw, &with_line(&req, &ok)).is_err());
        // Not a request line the injector may touch.
        let h2 = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        let pieces = [Piece::request(h2.clone(), Expect::Either)];
        assert!(check_delivery(&pieces, &with_line(&h2, &ok)).is_err());
    }

    #[test]
    fn traceparents_are_rewritten_only_when_valid_and_only_in_their_ids() {
        let valid = format!("traceparent: 00-{TRACE}-{SPAN}-01");
        let req = get("/v", &[&valid]);
        let pieces = [Piece::request(req.clone(), Expect::Either)];
        // A second header next to an existing one.
        assert!(check_delivery(&pieces, &with_line(&req, &line(TRACE, SPAN))).is_err());
        // The trace id of a valid context must stay.
        let retraced = replace(&req, TRACE, "11111111111111111111111111111111");
        assert!(check_delivery(&pieces, &retraced).is_err());
        // Flags and version must stay.
        assert!(check_delivery(&pieces, &replace(&req, "-01\r\n", "-00\r\n")).is_err());
        assert!(check_delivery(&pieces, &replace(&req, " 00-", " 01-")).is_err());
        // The new parent must be valid.
        assert!(check_delivery(&pieces, &replace(&req, SPAN, "0000000000000000")).is_err());
        assert!(check_delivery(&pieces, &replace(&req, SPAN, "00F067AA0BA902B7")).is_err());
        assert!(check_delivery(&pieces, &replace(&req, SPAN, "1234567890abcdef")).is_ok());
        // Invalid values (wrong length, a 54- or 56-character value, flags not hex, version
        // ff, upper case) and repeated headers must be left alone.
        for value in [
            format!("00-{TRACE}-{}-01", &SPAN[1..]),
            format!("00-{TRACE}-{SPAN}-1"),
            format!("00-{TRACE}-{SPAN}-01x"),
            format!("00-{TRACE}-{SPAN}-zz"),
            format!("ff-{TRACE}-{SPAN}-01"),
            format!("00-{}-{SPAN}-01", TRACE.to_uppercase()),
        ] {
            let req = get("/i", &[&format!("traceparent: {value}")]);
            let pieces = [Piece::request(req.clone(), Expect::Either)];
            // One hex digit of what would be the parent id changed to another.
            let mut touched = req.clone();
            let parent = find(&req, b"traceparent: ").unwrap() + 13 + 37;
            touched[parent] = if touched[parent] == b'a' { b'b' } else { b'a' };
            assert!(check_delivery(&pieces, &touched).is_err(), "{value}");
            assert!(
                check_delivery(&pieces, &with_line(&req, &line(TRACE, SPAN))).is_err(),
                "{value}"
            );
            assert!(check_delivery(&pieces, &req).is_ok(), "{value}");
        }
        let twice = get("/t", &[&valid, &valid]);
        let pieces = [Piece::request(twice.clone(), Expect::Either)];
        let at = find(&twice, SPAN.as_bytes()).unwrap();
        let mut touched = twice.clone();
        touched[at..at + 16].copy_from_slice(b"1234567890abcdef");
        assert!(check_delivery(&pieces, &touched).is_err());
    }

    #[test]
    fn plans_split_and_dribble_the_same_bytes() {
        let a = get("/a", &[]);
        let case = Case::new("c")
            .split(Piece::request(a.clone(), Expect::Either), &[3, 10])
            .dribble(Piece::raw(b"xyz".to_vec()), 5)
            .answers(1)
            .end_shutdown();
        assert_eq!(case.sent(), [a.clone(), b"xyz".to_vec()].concat());
        let json = case.to_json().to_string();
        let parsed: Value = serde_json::from_str(&json).expect("valid JSON");
        let steps = parsed.get("steps").and_then(Value::as_array).unwrap();
        assert_eq!(steps.len(), 6);
        let written: Vec<u8> = steps[..3]
            .iter()
            .flat_map(|s| unhex(s.get("send").unwrap().as_str().unwrap()).unwrap())
            .collect();
        assert_eq!(written, a);
    }

    #[test]
    fn parses_client_results() {
        let r = parse_results(
            "WAITING pid=1\n{\"i\": 0, \"name\": \"x\", \"local_port\": 5, \"statuses\": [200], \"received\": \"6f6b\", \"error\": null}\n\
             {\"i\": 1, \"name\": \"y\", \"local_port\": 6, \"statuses\": [], \"received\": \"\", \"error\": \"timeout\", \"reset\": \"read: reset\"}\n",
        );
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].received, b"ok");
        assert_eq!(r[0].statuses, [200]);
        assert_eq!(r[0].error, None);
        assert_eq!(r[1].error.as_deref(), Some("timeout"));
        assert_eq!(r[0].reset, None);
        assert_eq!(r[1].reset.as_deref(), Some("read: reset"));
    }
}
