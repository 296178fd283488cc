//! Message heads: the start line and the header fields we keep, read with `httparse`
//! straight from the bytes, or leniently ([`super::lenient`]) where httparse refuses a head that
//! real servers answer. What a head says about its body's framing is decided here
//! (RFC 9112 §6.3); the body itself is followed in [`super::body`].

use std::mem::MaybeUninit;

use super::{HttpRequestInfo, Kind, MAX_BODY_LEN, body::Framing, lenient};

/// Header slots handed to httparse; a head with more headers is treated as unparsable.
pub(super) const MAX_HEADERS: usize = 96;

pub(super) struct RequestHead {
    pub(super) info: HttpRequestInfo,
    pub(super) framing: Framing,
}

pub(super) struct ResponseHead {
    pub(super) code: u16,
    /// Framing from the headers alone; the request method and status refine it.
    pub(super) framing: Framing,
}

pub(super) enum Head {
    Request(RequestHead),
    Response(ResponseHead),
}

/// What a partial (incomplete) head told us.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct StartLine {
    /// The whole start line (`METHOD SP target SP HTTP/1.x` / `HTTP/1.x NNN`) was readable.
    pub(super) recognized: bool,
    pub(super) is_head: bool,
    pub(super) code: Option<u16>,
}

pub(super) enum HeadParse {
    Complete(usize, Head),
    Partial(StartLine),
    Invalid,
}

/// Whether `data` starts with a complete start line of `kind` (cheap: no headers parsed when
/// httparse reads it).
pub(super) fn starts_message(kind: Kind, data: &[u8]) -> bool {
    let config = httparse::ParserConfig::default();
    // No header slots: a head with headers stops at the first one with `TooManyHeaders`, which
    // only happens once the start line has been read.
    let mut headers: [MaybeUninit<httparse::Header<'_>>; 0] = [];
    let strict = match kind {
        Kind::Request => {
            let mut req = httparse::Request::new(&mut []);
            match config.parse_request_with_uninit_headers(&mut req, data, &mut headers) {
                Ok(httparse::Status::Complete(_)) | Err(httparse::Error::TooManyHeaders) => true,
                Ok(httparse::Status::Partial) => req.version.is_some(),
                Err(_) => false,
            }
        }
        Kind::Response => {
            let mut resp = httparse::Response::new(&mut []);
            match config.parse_response_with_uninit_headers(&mut resp, data, &mut headers) {
                Ok(httparse::Status::Complete(_)) | Err(httparse::Error::TooManyHeaders) => true,
                Ok(httparse::Status::Partial) => resp.code.is_some(),
                Err(_) => false,
            }
        }
    };
    strict
        || match lenient::parse(kind, data, |_, _| {}) {
            lenient::Lenient::Complete(_) => true,
            lenient::Lenient::Partial(start) => start.recognized,
            lenient::Lenient::Invalid => false,
        }
}

/// Reads a head with httparse, or, where it refuses bytes that real servers accept (or has
/// too few header slots), leniently (see [`lenient`]).
pub(super) fn parse_head(kind: Kind, buf: &[u8]) -> HeadParse {
    strict_head(kind, buf).unwrap_or_else(|| lenient_head(kind, buf))
}

/// httparse's reading of a head; `None` when it refuses it.
fn strict_head(kind: Kind, buf: &[u8]) -> Option<HeadParse> {
    let config = httparse::ParserConfig::default();
    let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let parsed = match kind {
        Kind::Request => {
            let mut req = httparse::Request::new(&mut []);
            match config.parse_request_with_uninit_headers(&mut req, buf, &mut headers) {
                Ok(httparse::Status::Complete(n)) => {
                    let (Some(method), Some(target), Some(version)) =
                        (req.method, req.path, req.version)
                    else {
                        return None;
                    };
                    let mut fields = HeaderFields::new(true);
                    for h in req.headers.iter() {
                        fields.add(h.name.as_bytes(), h.value);
                    }
                    request_head(n, method, target.to_owned(), version, fields, false)
                }
                Ok(httparse::Status::Partial) => HeadParse::Partial(StartLine {
                    recognized: req.version.is_some(),
                    is_head: req.method == Some("HEAD"),
                    code: None,
                }),
                Err(_) => return None,
            }
        }
        Kind::Response => {
            let mut resp = httparse::Response::new(&mut []);
            match config.parse_response_with_uninit_headers(&mut resp, buf, &mut headers) {
                Ok(httparse::Status::Complete(n)) => {
                    let code = resp.code?;
                    let mut fields = HeaderFields::new(false);
                    for h in resp.headers.iter() {
                        fields.add(h.name.as_bytes(), h.value);
                    }
                    response_head(n, code, &fields, false)
                }
                Ok(httparse::Status::Partial) => HeadParse::Partial(StartLine {
                    recognized: resp.code.is_some(),
                    is_head: false,
                    code: resp.code,
                }),
                Err(_) => return None,
            }
        }
    };
    Some(parsed)
}

fn lenient_head(kind: Kind, buf: &[u8]) -> HeadParse {
    let mut fields = HeaderFields::new(kind == Kind::Request);
    match lenient::parse(kind, buf, |name, value| fields.add(name, value)) {
        lenient::Lenient::Complete(parts) => match parts.start {
            lenient::Start::Request {
                method,
                target,
                version_minor,
            } => request_head(
                parts.len,
                method,
                String::from_utf8_lossy(target).into_owned(),
                version_minor,
                fields,
                parts.framing_disputed,
            ),
            lenient::Start::Response { code } => {
                response_head(parts.len, code, &fields, parts.framing_disputed)
            }
        },
        lenient::Lenient::Partial(start) => HeadParse::Partial(start),
        lenient::Lenient::Invalid => HeadParse::Invalid,
    }
}

/// `framing_disputed`: servers may read the body's framing differently; it is then unknown.
fn request_head(
    n: usize,
    method: &str,
    target: String,
    version_minor: u8,
    fields: HeaderFields,
    framing_disputed: bool,
) -> HeadParse {
    let framing = if framing_disputed {
        Framing::Invalid
    } else if fields.te_present {
        if fields.chunked {
            Framing::Chunked
        } else {
            // A request with a transfer coding we cannot delimit (RFC 9112 §6.3).
            Framing::Invalid
        }
    } else {
        match fields.content_length {
            ContentLength::Absent => Framing::None,
            ContentLength::Valid(n) if n <= MAX_BODY_LEN => Framing::Length(n),
            _ => Framing::Invalid,
        }
    };
    HeadParse::Complete(
        n,
        Head::Request(RequestHead {
            info: HttpRequestInfo {
                method: method.to_owned(),
                target,
                version_minor,
                host: fields.host,
                user_agent: fields.user_agent,
                traceparent: fields.traceparent,
                tracestate: fields.tracestate,
                content_length: match fields.content_length {
                    ContentLength::Valid(n) => Some(n),
                    _ => None,
                },
                chunked: fields.chunked,
            },
            framing,
        }),
    )
}

fn response_head(n: usize, code: u16, fields: &HeaderFields, framing_disputed: bool) -> HeadParse {
    let framing = if framing_disputed {
        Framing::Invalid
    } else if fields.te_present {
        if fields.chunked {
            Framing::Chunked
        } else {
            Framing::UntilClose
        }
    } else {
        match fields.content_length {
            ContentLength::Absent => Framing::UntilClose,
            ContentLength::Valid(n) if n <= MAX_BODY_LEN => Framing::Length(n),
            _ => Framing::Invalid,
        }
    };
    HeadParse::Complete(n, Head::Response(ResponseHead { code, framing }))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ContentLength {
    Absent,
    Valid(u64),
    Bad,
}

/// The header fields we look at.
#[derive(Debug)]
struct HeaderFields {
    /// Also extract the request-only fields (host, user agent, trace context).
    request: bool,
    host: Option<String>,
    user_agent: Option<String>,
    traceparent: Option<String>,
    tracestate: Option<String>,
    content_length: ContentLength,
    te_present: bool,
    chunked: bool,
}

impl HeaderFields {
    fn new(request: bool) -> Self {
        Self {
            request,
            host: None,
            user_agent: None,
            traceparent: None,
            tracestate: None,
            content_length: ContentLength::Absent,
            te_present: false,
            chunked: false,
        }
    }

    /// One field as received (its value not yet trimmed).
    fn add(&mut self, name: &[u8], value: &[u8]) {
        if name.eq_ignore_ascii_case(b"content-length") {
            self.content_length = merge_content_length(self.content_length, value);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            // The last coding of the last field is the one that frames the body.
            self.te_present = true;
            self.chunked = value
                .rsplit(|&b| b == b',')
                .next()
                .is_some_and(|c| trim_ows(c).eq_ignore_ascii_case(b"chunked"));
        } else if self.request {
            self.add_request_field(name, value);
        }
    }

    fn add_request_field(&mut self, name: &[u8], value: &[u8]) {
        let value = trim_ows(value);
        if name.eq_ignore_ascii_case(b"traceparent") {
            // Several fields are one comma-joined value (RFC 9110 §5.3): two traceparents
            // make an invalid one, never a choice between them.
            append_field(&mut self.traceparent, value);
        } else if name.eq_ignore_ascii_case(b"tracestate") {
            append_field(&mut self.tracestate, value);
        } else {
            let slot = if name.eq_ignore_ascii_case(b"host") {
                &mut self.host
            } else if name.eq_ignore_ascii_case(b"user-agent") {
                &mut self.user_agent
            } else {
                return;
            };
            if slot.is_none() {
                *slot = Some(String::from_utf8_lossy(value).into_owned());
            }
        }
    }
}

/// Joins a repeated field's values with a comma, as RFC 9110 §5.3 combines them.
fn append_field(slot: &mut Option<String>, value: &[u8]) {
    let value = String::from_utf8_lossy(value);
    match slot {
        Some(joined) => {
            joined.push(',');
            joined.push_str(&value);
        }
        None => *slot = Some(value.into_owned()),
    }
}

/// Without HTTP's optional whitespace (space, tab) around it; other bytes are kept, so a
/// value with a control byte never reads as a clean number or coding.
fn trim_ows(v: &[u8]) -> &[u8] {
    let start = v.iter().take_while(|&&b| b == b' ' || b == b'\t').count();
    let v = &v[start..];
    let end = v
        .iter()
        .rev()
        .take_while(|&&b| b == b' ' || b == b'\t')
        .count();
    &v[..v.len() - end]
}

/// Folds one `Content-Length` field value (possibly a list, `5, 5`) into what we have: every
/// value must be the same non-negative decimal (RFC 9112 §6.3).
fn merge_content_length(current: ContentLength, value: &[u8]) -> ContentLength {
    let mut current = current;
    for part in value.split(|&b| b == b',') {
        let Some(n) = parse_decimal(trim_ows(part)) else {
            return ContentLength::Bad;
        };
        current = match current {
            ContentLength::Absent => ContentLength::Valid(n),
            ContentLength::Valid(m) if m == n => current,
            _ => return ContentLength::Bad,
        };
    }
    current
}

fn parse_decimal(s: &[u8]) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    s.iter().try_fold(0u64, |acc, &b| {
        if !b.is_ascii_digit() {
            return None;
        }
        acc.checked_mul(10)?.checked_add(u64::from(b - b'0'))
    })
}
