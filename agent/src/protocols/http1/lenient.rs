//! Message heads that `httparse` refuses but real servers serve, read the way the most lenient
//! of them reads them, so that no request a server answers hides from tracing.
//!
//! Measured against nginx 1.22, Node 20 (llhttp, strict and `insecureHTTPParser`) and Python
//! 3.11's `http.server` by sending them raw heads (the cases are `tests/lenient.rs`'s
//! `heads_real_servers_answer_are_traced` test):
//! - header values: nginx takes any byte but NUL, CR and LF; llhttp's lenient mode and Python
//!   take NUL too, and Python ends a line at a bare CR. We take every byte, and split lines at
//!   a bare CR as Python does.
//! - header names: nginx skips lines whose name has visible bytes outside a token (and answers
//!   400 to control bytes), Python stops reading headers at a name with any byte outside
//!   0x21–0x7e. We skip lines whose name is not a token (see framing below).
//! - obsolete line folding (a line starting with a space or tab): llhttp's lenient mode and
//!   Python append it to the previous value. We skip it (after a framing field: disputed).
//! - request line: runs of spaces (all four) or tabs (Python) between its parts, obs-text in
//!   the target (nginx, Python), control bytes in it (Python), any `HTTP/1.x` minor version
//!   (nginx, llhttp lenient, Python). The method must be a token: other bytes there are not a
//!   request (Python answers 501, nginx 400; counted as an unreadable head).
//! - status line: `HTTP/1.x`, a three-digit code, then anything.
//!
//! Framing must stay exact: servers that disagree about a line may disagree about where the
//! body ends. A `Content-Length` or `Transfer-Encoding` field is only believed when no server
//! could read it differently: a skipped line that names one, or one that follows a line some
//! servers stop at, makes the framing disputed and the caller treats it as unknown.

use super::{Kind, head::StartLine};

pub(super) enum Lenient<'a> {
    Complete(Parts<'a>),
    /// The head may still be completed by more bytes.
    Partial(StartLine),
    /// Not a message head of this kind.
    Invalid,
}

pub(super) struct Parts<'a> {
    /// Bytes of the head, the final empty line included.
    pub len: usize,
    pub start: Start<'a>,
    /// Servers may read the body's framing differently (see the module comment).
    pub framing_disputed: bool,
}

pub(super) enum Start<'a> {
    Request {
        method: &'a str,
        /// Raw bytes: may hold anything but a line end.
        target: &'a [u8],
        version_minor: u8,
    },
    Response {
        code: u16,
    },
}

/// Reads the head at the start of `buf`, handing each well-formed header field (name, raw
/// value) to `field`.
pub(super) fn parse<'a>(
    kind: Kind,
    buf: &'a [u8],
    mut field: impl FnMut(&'a [u8], &'a [u8]),
) -> Lenient<'a> {
    let mut at = 0;
    if kind == Kind::Request {
        // Empty lines before a request line are ignored (RFC 9112 §2.2).
        loop {
            let rest = &buf[at..];
            if rest.starts_with(b"\r\n") {
                at += 2;
            } else if rest.starts_with(b"\n") {
                at += 1;
            } else if rest == b"\r" {
                return Lenient::Partial(StartLine::default());
            } else {
                break;
            }
        }
    }
    let rest = &buf[at..];
    let Some(nl) = line_end(rest) else {
        return if start_line_prefix(kind, rest) {
            Lenient::Partial(StartLine::default())
        } else {
            Lenient::Invalid
        };
    };
    let Some(start) = start_line(kind, strip_cr(&rest[..nl])) else {
        return Lenient::Invalid;
    };
    let started = match start {
        Start::Request { method, .. } => StartLine {
            recognized: true,
            is_head: method == "HEAD",
            code: None,
        },
        Start::Response { code } => StartLine {
            recognized: true,
            is_head: false,
            code: Some(code),
        },
    };
    let mut pos = at + nl + 1;
    // A line some servers skip and others stop reading headers at.
    let mut irregular = false;
    // The last field read was a framing one: a folded line after it may extend its value.
    let mut after_framing = false;
    let mut framing_disputed = false;
    loop {
        let Some(n) = line_end(&buf[pos..]) else {
            return Lenient::Partial(started);
        };
        let line = strip_cr(&buf[pos..pos + n]);
        pos += n + 1;
        if line.is_empty() {
            return Lenient::Complete(Parts {
                len: pos,
                start,
                framing_disputed,
            });
        }
        for piece in line.split(|&b| b == b'\r').filter(|p| !p.is_empty()) {
            match header_field(piece) {
                Some((name, value)) => {
                    after_framing = is_framing(name);
                    framing_disputed |= irregular && after_framing;
                    field(name, value);
                }
                None => {
                    let folded = piece.first().copied().is_some_and(is_blank);
                    framing_disputed |= names_framing(piece) || (folded && after_framing);
                    irregular = true;
                    after_framing = false;
                }
            }
        }
    }
}

fn line_end(buf: &[u8]) -> Option<usize> {
    buf.iter().position(|&b| b == b'\n')
}

fn strip_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// RFC 9110 `tchar`.
pub(super) fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_blank(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

fn trim_blank_start(s: &[u8]) -> &[u8] {
    let n = s.iter().take_while(|&&b| is_blank(b)).count();
    &s[n..]
}

fn trim_blank_end(s: &[u8]) -> &[u8] {
    let n = s.iter().rev().take_while(|&&b| is_blank(b)).count();
    &s[..s.len() - n]
}

/// `HTTP/1.x` → x.
fn http1_minor(version: &[u8]) -> Option<u8> {
    match version {
        [b'H', b'T', b'T', b'P', b'/', b'1', b'.', d] if d.is_ascii_digit() => Some(d - b'0'),
        _ => None,
    }
}

fn start_line(kind: Kind, line: &[u8]) -> Option<Start<'_>> {
    match kind {
        Kind::Request => {
            let m = line.iter().position(|&b| !is_tchar(b))?;
            if m == 0 || !is_blank(line[m]) {
                return None;
            }
            // Only tokens: ASCII.
            let method = std::str::from_utf8(&line[..m]).ok()?;
            let rest = trim_blank_start(&line[m..]);
            let last = rest.iter().rposition(|&b| is_blank(b))?;
            let version_minor = http1_minor(&rest[last + 1..])?;
            let target = trim_blank_end(&rest[..last]);
            (!target.is_empty()).then_some(Start::Request {
                method,
                target,
                version_minor,
            })
        }
        Kind::Response => {
            http1_minor(line.get(..8)?)?;
            let rest = &line[8..];
            if !rest.first().copied().is_some_and(is_blank) {
                return None;
            }
            let rest = trim_blank_start(rest);
            let digits = rest.get(..3)?;
            if !digits.iter().all(u8::is_ascii_digit) {
                return None;
            }
            if rest.get(3).is_some_and(|&b| !is_blank(b)) {
                return None;
            }
            let code = digits
                .iter()
                .fold(0u16, |n, d| n * 10 + u16::from(d - b'0'));
            Some(Start::Response { code })
        }
    }
}

/// The bytes so far (no line end yet) can begin a start line of `kind`.
fn start_line_prefix(kind: Kind, s: &[u8]) -> bool {
    match kind {
        Kind::Request => match s.iter().position(|&b| !is_tchar(b)) {
            None => true,
            Some(m) => m > 0 && is_blank(s[m]),
        },
        Kind::Response => {
            let fixed = b"HTTP/1.";
            let n = s.len().min(fixed.len());
            if s[..n] != fixed[..n] {
                return false;
            }
            match s.get(7) {
                None => true,
                Some(d) if !d.is_ascii_digit() => false,
                // Separator, then the code's digits: checked once the line is complete.
                Some(_) => s.get(8).is_none_or(|&b| is_blank(b)),
            }
        }
    }
}

/// `name: value` with a token name (nothing between name and colon).
fn header_field(line: &[u8]) -> Option<(&[u8], &[u8])> {
    let colon = line.iter().position(|&b| b == b':')?;
    let name = &line[..colon];
    (!name.is_empty() && name.iter().all(|&b| is_tchar(b))).then(|| (name, &line[colon + 1..]))
}

fn is_framing(name: &[u8]) -> bool {
    name.eq_ignore_ascii_case(b"content-length") || name.eq_ignore_ascii_case(b"transfer-encoding")
}

/// A line we skip that some server may take for a framing field (`Content-Length : 5`).
fn names_framing(line: &[u8]) -> bool {
    let has = |word: &[u8]| {
        line.windows(word.len())
            .any(|w| w.eq_ignore_ascii_case(word))
    };
    has(b"content-length") || has(b"transfer-encoding")
}
