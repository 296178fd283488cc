//! Wire-level facts of the PostgreSQL frontend/backend protocol 3.0: message tags, length
//! bounds, plausibility checks for finding message boundaries, and body field readers.
//!
//! Every function here takes untrusted bytes and returns `None`/`false` rather than panicking.

// ---- frontend (client → server) message tags ----
pub const QUERY: u8 = b'Q';
pub const PARSE: u8 = b'P';
pub const BIND: u8 = b'B';
pub const DESCRIBE: u8 = b'D';
pub const EXECUTE: u8 = b'E';
pub const SYNC: u8 = b'S';
pub const CLOSE: u8 = b'C';
pub const FLUSH: u8 = b'H';
pub const FUNCTION_CALL: u8 = b'F';
pub const TERMINATE: u8 = b'X';
pub const COPY_FAIL: u8 = b'f';
/// PasswordMessage, SASLInitialResponse, SASLResponse, GSSResponse.
pub const PASSWORD: u8 = b'p';

// ---- shared by both directions ----
pub const COPY_DATA: u8 = b'd';
pub const COPY_DONE: u8 = b'c';

// ---- backend (server → client) message tags ----
pub const AUTHENTICATION: u8 = b'R';
pub const PARAMETER_STATUS: u8 = b'S';
pub const BACKEND_KEY_DATA: u8 = b'K';
pub const READY_FOR_QUERY: u8 = b'Z';
pub const ROW_DESCRIPTION: u8 = b'T';
pub const DATA_ROW: u8 = b'D';
pub const COMMAND_COMPLETE: u8 = b'C';
pub const EMPTY_QUERY_RESPONSE: u8 = b'I';
pub const ERROR_RESPONSE: u8 = b'E';
pub const NOTICE_RESPONSE: u8 = b'N';
pub const NOTIFICATION_RESPONSE: u8 = b'A';
pub const PARSE_COMPLETE: u8 = b'1';
pub const BIND_COMPLETE: u8 = b'2';
pub const CLOSE_COMPLETE: u8 = b'3';
pub const NO_DATA: u8 = b'n';
pub const PORTAL_SUSPENDED: u8 = b's';
pub const PARAMETER_DESCRIPTION: u8 = b't';
pub const COPY_IN_RESPONSE: u8 = b'G';
pub const COPY_OUT_RESPONSE: u8 = b'H';
pub const COPY_BOTH_RESPONSE: u8 = b'W';
pub const FUNCTION_CALL_RESPONSE: u8 = b'V';
pub const NEGOTIATE_PROTOCOL_VERSION: u8 = b'v';

// ---- untagged startup-phase packets: int32 length, int32 code ----
pub const SSL_REQUEST_CODE: u32 = 80_877_103;
pub const GSSENC_REQUEST_CODE: u32 = 80_877_104;
pub const CANCEL_REQUEST_CODE: u32 = 80_877_102;
/// Major version 3 in the high 16 bits of a StartupMessage's code.
pub const PROTOCOL_MAJOR_3: u16 = 3;

/// The server's one-byte answers to SSLRequest / GSSENCRequest.
pub const SSL_ACCEPTED: u8 = b'S';
pub const GSSENC_ACCEPTED: u8 = b'G';
pub const ENCRYPTION_REFUSED: u8 = b'N';

/// The server rejects any message longer than this (`MaxAllocSize`): a longer length field
/// means we are not looking at a message boundary.
pub const MAX_MESSAGE_LEN: u32 = 0x3fff_ffff;
/// The server's limit on a startup packet (`MAX_STARTUP_PACKET_LENGTH`).
pub const MAX_STARTUP_LEN: u32 = 10_000;
/// Messages that only carry names and small fields: far below this in practice.
const MAX_SMALL_LEN: u32 = 64 * 1024;
/// When looking for a message boundary in bytes of unknown position, longer messages are not
/// believed (real ones exist, but rarely start exactly where we look).
pub const MAX_PLAUSIBLE_LEN: u32 = 64 * 1024 * 1024;
/// Longest cancel secret key (protocol 3.2; 4 bytes in 3.0).
const MAX_CANCEL_KEY_LEN: u32 = 256;
/// Columns a row can have (`MaxTupleAttributeNumber`).
const MAX_COLUMNS: u16 = 1664;

/// Which side of the protocol a direction carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Client messages.
    Frontend,
    /// Server messages.
    Backend,
}

pub fn be_u32(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes(s.try_into().ok()?))
}

pub fn be_u16(b: &[u8], at: usize) -> Option<u16> {
    let s = b.get(at..at.checked_add(2)?)?;
    Some(u16::from_be_bytes(s.try_into().ok()?))
}

/// Whether a tagged header (`tag`, length field `len` counting itself) is acceptable for the
/// direction's kind: a known tag and a length within what the protocol allows for it.
pub fn header_ok(kind: Kind, tag: u8, len: u32) -> bool {
    if !(4..=MAX_MESSAGE_LEN).contains(&len) {
        return false;
    }
    match kind {
        Kind::Frontend => match tag {
            QUERY => len >= 5,
            PARSE => len >= 8,
            BIND => len >= 12,
            DESCRIBE | CLOSE => (6..=MAX_SMALL_LEN).contains(&len),
            EXECUTE => (9..=MAX_SMALL_LEN).contains(&len),
            SYNC | FLUSH | COPY_DONE | TERMINATE => len == 4,
            COPY_DATA | PASSWORD => true,
            COPY_FAIL => (5..=MAX_SMALL_LEN).contains(&len),
            FUNCTION_CALL => len >= 14,
            _ => false,
        },
        Kind::Backend => match tag {
            AUTHENTICATION => (8..=MAX_SMALL_LEN).contains(&len),
            PARAMETER_STATUS => (6..=MAX_SMALL_LEN).contains(&len),
            // Protocol 3.2 (PostgreSQL 18) allows secret keys of up to 256 bytes.
            BACKEND_KEY_DATA => (12..=MAX_CANCEL_KEY_LEN + 8).contains(&len),
            READY_FOR_QUERY => len == 5,
            ROW_DESCRIPTION | DATA_ROW | PARAMETER_DESCRIPTION => len >= 6,
            COMMAND_COMPLETE => (5..=MAX_SMALL_LEN).contains(&len),
            EMPTY_QUERY_RESPONSE | PARSE_COMPLETE | BIND_COMPLETE | CLOSE_COMPLETE | NO_DATA
            | PORTAL_SUSPENDED | COPY_DONE => len == 4,
            ERROR_RESPONSE | NOTICE_RESPONSE => len >= 5,
            NOTIFICATION_RESPONSE => len >= 10,
            COPY_IN_RESPONSE | COPY_OUT_RESPONSE | COPY_BOTH_RESPONSE => {
                (7..=MAX_SMALL_LEN).contains(&len)
            }
            COPY_DATA => true,
            FUNCTION_CALL_RESPONSE => len >= 8,
            NEGOTIATE_PROTOCOL_VERSION => (12..=MAX_SMALL_LEN).contains(&len),
            _ => false,
        },
    }
}

/// Content checks on a complete body, used only when deciding whether bytes of unknown
/// position start a message (stricter than what we require of messages once in sync).
fn body_plausible(kind: Kind, tag: u8, body: &[u8]) -> bool {
    let ends_nul = body.last() == Some(&0);
    match (kind, tag) {
        (Kind::Frontend, QUERY) => ends_nul,
        (Kind::Frontend, DESCRIBE | CLOSE) => {
            matches!(body.first(), Some(b'S' | b'P')) && ends_nul && nul_count(body) == 1
        }
        (Kind::Frontend, EXECUTE) => {
            body.len() >= 5
                && body.get(body.len() - 5) == Some(&0)
                && nul_pos(body) == Some(body.len() - 5)
        }
        (Kind::Frontend, PARSE) => nul_count(body) >= 2,
        (Kind::Frontend, BIND) => nul_count(body) >= 2,
        (Kind::Backend, READY_FOR_QUERY) => matches!(body, [b'I' | b'T' | b'E']),
        (Kind::Backend, COMMAND_COMPLETE) => {
            ends_nul
                && body.first().is_some_and(u8::is_ascii_uppercase)
                && body
                    .iter()
                    .take(body.len().saturating_sub(1))
                    .all(|&c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == b' ')
        }
        (Kind::Backend, PARAMETER_STATUS) => ends_nul && nul_count(body) == 2,
        (Kind::Backend, ERROR_RESPONSE | NOTICE_RESPONSE) => fields_well_formed(body),
        (Kind::Backend, DATA_ROW | ROW_DESCRIPTION) => {
            be_u16(body, 0).is_some_and(|n| n <= MAX_COLUMNS)
        }
        (Kind::Backend, AUTHENTICATION) => be_u32(body, 0).is_some_and(|c| c <= 12),
        _ => true,
    }
}

fn nul_count(b: &[u8]) -> usize {
    b.iter().filter(|&&c| c == 0).count()
}

fn nul_pos(b: &[u8]) -> Option<usize> {
    b.iter().position(|&c| c == 0)
}

/// ErrorResponse / NoticeResponse body: `(code byte, string NUL)*` then a final NUL, ending
/// exactly at the end of the body.
fn fields_well_formed(body: &[u8]) -> bool {
    let mut i = 0;
    let mut fields = 0;
    loop {
        match body.get(i) {
            Some(0) => return i + 1 == body.len() && fields > 0,
            Some(c) if c.is_ascii_alphabetic() => {
                let Some(n) = body.get(i + 1..).and_then(nul_pos) else {
                    return false;
                };
                i = i + 1 + n + 1;
                fields += 1;
            }
            _ => return false,
        }
    }
}

/// Whether a segment whose first byte is at an unknown position of a `kind` stream starts
/// with a message boundary: every message whose header is captured must have a valid header
/// and, when its body is captured too, a plausible body; at least one message must be complete
/// and captured; and the last message must end exactly at the segment's end or run past the
/// captured bytes (into uncaptured bytes or the next segment).
pub fn plausible_chain(kind: Kind, data: &[u8], total: u64) -> bool {
    let mut pos: u64 = 0;
    let mut complete = 0u32;
    loop {
        if pos == total {
            return complete > 0;
        }
        let Some(at) = usize::try_from(pos).ok() else {
            return false;
        };
        let (Some(&tag), Some(len)) = (data.get(at), be_u32(data, at.saturating_add(1))) else {
            // The next header is cut by the capture or by the segment's end.
            return complete > 0;
        };
        if len > MAX_PLAUSIBLE_LEN || !header_ok(kind, tag, len) {
            return false;
        }
        let end = pos + 1 + u64::from(len);
        let body = usize::try_from(end).ok().and_then(|e| data.get(at + 5..e));
        match body {
            Some(body) => {
                if !body_plausible(kind, tag, body) {
                    return false;
                }
                complete += 1;
            }
            // Runs past the captured bytes: its body cannot be checked.
            None => return complete > 0,
        }
        pos = end;
    }
}

/// What a startup-phase packet is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartupKind {
    Ssl,
    GssEnc,
    Cancel,
    /// StartupMessage with this protocol version.
    Startup {
        major: u16,
        minor: u16,
    },
}

/// Classifies an untagged packet from its length field and code.
pub fn startup_kind(len: u32, code: u32) -> Option<StartupKind> {
    match code {
        SSL_REQUEST_CODE if len == 8 => Some(StartupKind::Ssl),
        GSSENC_REQUEST_CODE if len == 8 => Some(StartupKind::GssEnc),
        CANCEL_REQUEST_CODE if (16..=MAX_CANCEL_KEY_LEN + 12).contains(&len) => {
            Some(StartupKind::Cancel)
        }
        _ => {
            let major = (code >> 16) as u16;
            let minor = (code & 0xffff) as u16;
            (major == PROTOCOL_MAJOR_3 && (9..=MAX_STARTUP_LEN).contains(&len))
                .then_some(StartupKind::Startup { major, minor })
        }
    }
}

/// Whether `data` starts with a complete-looking startup-phase packet.
pub fn starts_with_startup(data: &[u8]) -> bool {
    let (Some(len), Some(code)) = (be_u32(data, 0), be_u32(data, 4)) else {
        return false;
    };
    match startup_kind(len, code) {
        Some(StartupKind::Startup { .. }) => {
            // Parameters are NUL-terminated strings; the captured part must look like text.
            let end = usize::try_from(len).unwrap_or(usize::MAX).min(data.len());
            let params = data.get(8..end).unwrap_or_default();
            !params.is_empty() && params.iter().all(|&c| c == 0 || c >= 0x20 || c == b'\t')
        }
        Some(_) => true,
        None => false,
    }
}

/// Reads a NUL-terminated string at `*pos`, advancing past the NUL. `None` when there is no
/// NUL (cut by the capture).
pub fn cstr<'a>(body: &'a [u8], pos: &mut usize) -> Option<&'a [u8]> {
    let rest = body.get(*pos..)?;
    let n = nul_pos(rest)?;
    *pos = pos.checked_add(n)?.checked_add(1)?;
    rest.get(..n)
}

/// The text before the first NUL (or all of it when cut before the NUL) and whether it was cut.
pub fn cstr_or_rest(body: &[u8], pos: usize) -> (&[u8], bool) {
    let rest = body.get(pos..).unwrap_or_default();
    match nul_pos(rest) {
        Some(n) => (rest.get(..n).unwrap_or_default(), false),
        None => (rest, true),
    }
}

/// The fields of an ErrorResponse/NoticeResponse we keep.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ErrorFields<'a> {
    /// The non-localized `V` field when present, else `S`.
    pub severity: Option<&'a [u8]>,
    /// SQLSTATE (`C`).
    pub code: Option<&'a [u8]>,
    /// Primary message (`M`).
    pub message: Option<&'a [u8]>,
}

/// Reads the fields we keep of an ErrorResponse/NoticeResponse body (possibly cut).
pub fn error_fields(body: &[u8]) -> ErrorFields<'_> {
    let (mut sev_s, mut sev_v, mut code, mut msg) = (None, None, None, None);
    let mut i = 0;
    while let Some(&t) = body.get(i) {
        if t == 0 {
            break;
        }
        i += 1;
        let (value, cut) = cstr_or_rest(body, i);
        match t {
            b'S' => sev_s = Some(value),
            b'V' => sev_v = Some(value),
            b'C' => code = Some(value),
            b'M' => msg = Some(value),
            _ => {}
        }
        if cut {
            break;
        }
        i = i.saturating_add(value.len()).saturating_add(1);
    }
    ErrorFields {
        severity: sev_v.or(sev_s),
        code,
        message: msg,
    }
}

/// Rows affected/returned, from a CommandComplete tag: `INSERT oid rows`, `SELECT rows`,
/// `UPDATE rows`, `DELETE rows`, `MERGE rows`, `FETCH rows`, `MOVE rows`, `COPY rows`.
pub fn tag_rows(tag: &str) -> Option<u64> {
    let mut words = tag.split(' ');
    let cmd = words.next()?;
    let args: Vec<&str> = words.take(3).collect();
    let n = match (cmd, args.as_slice()) {
        ("INSERT", [_oid, n]) => n,
        ("SELECT" | "UPDATE" | "DELETE" | "MERGE" | "FETCH" | "MOVE" | "COPY", [n]) => n,
        _ => return None,
    };
    n.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_bounds() {
        assert!(header_ok(Kind::Frontend, QUERY, 5));
        assert!(!header_ok(Kind::Frontend, QUERY, 4));
        assert!(!header_ok(Kind::Frontend, QUERY, 3));
        assert!(!header_ok(Kind::Frontend, QUERY, MAX_MESSAGE_LEN + 1));
        assert!(!header_ok(Kind::Frontend, QUERY, u32::MAX));
        assert!(header_ok(Kind::Frontend, SYNC, 4));
        assert!(!header_ok(Kind::Frontend, SYNC, 5));
        assert!(!header_ok(Kind::Backend, SYNC, 4));
        assert!(header_ok(Kind::Backend, READY_FOR_QUERY, 5));
        assert!(!header_ok(Kind::Backend, b'x', 5));
        assert!(!header_ok(Kind::Frontend, b'Z', 5));
    }

    #[test]
    fn tags_and_rows() {
        assert_eq!(tag_rows("INSERT 0 1"), Some(1));
        assert_eq!(tag_rows("SELECT 3"), Some(3));
        assert_eq!(tag_rows("COPY 120"), Some(120));
        assert_eq!(tag_rows("UPDATE 18446744073709551615"), Some(u64::MAX));
        assert_eq!(tag_rows("UPDATE 18446744073709551616"), None);
        assert_eq!(tag_rows("CREATE TABLE"), None);
        assert_eq!(tag_rows("BEGIN"), None);
        assert_eq!(tag_rows("SELECT x"), None);
        assert_eq!(tag_rows(""), None);
    }

    #[test]
    fn error_field_reader_handles_cuts() {
        let body = b"SERROR\0VERROR\0C42P01\0Mrelation \"nope\" does not exist\0\0";
        let f = error_fields(body);
        assert_eq!(f.severity, Some(&b"ERROR"[..]));
        assert_eq!(f.code, Some(&b"42P01"[..]));
        assert_eq!(f.message, Some(&b"relation \"nope\" does not exist"[..]));
        for cut in 0..body.len() {
            let _ = error_fields(&body[..cut]);
        }
        assert!(fields_well_formed(body));
        assert!(!fields_well_formed(&body[..body.len() - 1]));
    }

    #[test]
    fn startup_kinds() {
        assert_eq!(startup_kind(8, SSL_REQUEST_CODE), Some(StartupKind::Ssl));
        assert_eq!(startup_kind(9, SSL_REQUEST_CODE), None);
        assert_eq!(
            startup_kind(41, 0x0003_0000),
            Some(StartupKind::Startup { major: 3, minor: 0 })
        );
        assert_eq!(startup_kind(41, 0x0002_0000), None);
        assert_eq!(startup_kind(20_000, 0x0003_0000), None);
        assert_eq!(
            startup_kind(16, CANCEL_REQUEST_CODE),
            Some(StartupKind::Cancel)
        );
    }
}
