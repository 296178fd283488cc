//! Redaction: the one place that decides what of a command line, a request's path and query, or
//! a free-text value may leave the machine.
//!
//! Placeholders, each with one meaning:
//! - `REDACTED` replaces a secret or a personal datum inside an attribute value
//!   (`process.command_line`, `url.path`, `url.full`, `url.query`, `user_agent.original`).
//! - `{id}` replaces a path segment of a span name that names one thing (a number, a UUID, a
//!   token, an e-mail address): span names stay low-cardinality and carry no personal data.
//! - `?` replaces a SQL literal (`db.query.text`, and SQL given to a client on its command line):
//!   the SQL sanitizer's own placeholder (`protocols::postgres::sanitize_query`).
//!
//! Path segments fall in three classes (see [`url_path`]): plain words (kept everywhere),
//! identifiers (numbers, UUIDs, short mixed ids: `{id}` in span names, kept in `url.path` where
//! they tell which resource a request touched) and sensitive segments (e-mail addresses, JWTs,
//! opaque hex/base64-like tokens: `{id}` in span names, `REDACTED` in `url.path`/`url.full`).
//!
//! Everything here takes any text (cut anywhere, any bytes after lossy decoding), never panics,
//! and slices only at ASCII bytes, so always on character boundaries.

use std::borrow::Cow;
use std::ops::Range;

use crate::protocols::postgres::sanitize_query;

/// What replaces a secret or a personal datum in an attribute value.
pub const REDACTED: &str = "REDACTED";
/// What replaces an identifying path segment in a span name.
const ID: &str = "{id}";
/// Longest command line kept (after redaction), in bytes.
const MAX_COMMAND_LINE_LEN: usize = 4096;
/// Shell scripts (`sh -c`) inside shell scripts are followed this deep; deeper ones are
/// redacted as plain text.
const MAX_SCRIPT_DEPTH: u8 = 2;

// ---------------------------------------------------------------------------------------------
// Paths and queries

/// A request path in the two forms spans export.
#[derive(Debug, PartialEq, Eq)]
pub struct PathForms<'a> {
    /// For the span name: identifying and sensitive segments become `{id}`, matrix parameters
    /// (`;jsessionid=…`) are dropped. `/` for an empty path.
    pub template: Cow<'a, str>,
    /// For `url.path` and `url.full`: sensitive segments become `REDACTED`, matrix parameter
    /// values too; identifiers are kept.
    pub redacted: Cow<'a, str>,
}

/// Both exported forms of `path` (a request-target's path, without query). One pass; nothing
/// is allocated while every segment is a plain word.
pub fn url_path(path: &str) -> PathForms<'_> {
    if path.is_empty() {
        return PathForms {
            template: Cow::Borrowed("/"),
            redacted: Cow::Borrowed(""),
        };
    }
    // (template, redacted), started at the first segment that is not a plain word.
    let mut forms: Option<(String, String)> = None;
    let mut start = 0;
    for seg in path.split('/') {
        let end = start + seg.len();
        let (head, params) = match seg.split_once(';') {
            Some((head, params)) => (head, Some(params)),
            None => (seg, None),
        };
        let class = classify_segment(head);
        if forms.is_none() && params.is_none() && class == Segment::Plain {
            start = end + 1;
            continue;
        }
        let (template, redacted) = forms.get_or_insert_with(|| {
            let done = path.get(..start).unwrap_or_default();
            // Room for a few placeholders longer than what they replace.
            let mut template = String::with_capacity(path.len() + 16);
            let mut redacted = String::with_capacity(path.len() + 16);
            template.push_str(done);
            redacted.push_str(done);
            (template, redacted)
        });
        match class {
            Segment::Plain => {
                template.push_str(head);
                redacted.push_str(head);
            }
            Segment::Id => {
                template.push_str(ID);
                redacted.push_str(head);
            }
            Segment::Sensitive => {
                template.push_str(ID);
                redacted.push_str(REDACTED);
            }
        }
        if let Some(params) = params {
            redacted.push(';');
            redacted.push_str(&redact_params(params, ';'));
        }
        if end < path.len() {
            template.push('/');
            redacted.push('/');
        }
        start = end + 1;
    }
    match forms {
        None => PathForms {
            template: Cow::Borrowed(path),
            redacted: Cow::Borrowed(path),
        },
        Some((mut template, redacted)) => {
            if template.is_empty() {
                template.push('/');
            }
            PathForms {
                template: Cow::Owned(template),
                redacted: Cow::Owned(redacted),
            }
        }
    }
}

/// A query string (or a fragment) for `url.query`/`url.full`: every value becomes `REDACTED`
/// (query strings carry tokens and personal data); keys are kept unless they are themselves
/// sensitive (`?alice@example.com=1`, a bare token).
pub fn url_query(query: &str) -> String {
    redact_params(query, '&')
}

fn redact_params(params: &str, sep: char) -> String {
    let mut out = String::with_capacity(params.len() + 16);
    for (i, pair) in params.split(sep).enumerate() {
        if i > 0 {
            out.push(sep);
        }
        let (key, has_value) = match pair.split_once('=') {
            Some((key, _)) => (key, true),
            None => (pair, false),
        };
        if classify_segment(key) == Segment::Sensitive {
            out.push_str(REDACTED);
        } else {
            out.push_str(key);
        }
        if has_value {
            out.push('=');
            out.push_str(REDACTED);
        }
    }
    out
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Segment {
    /// A word of the route.
    Plain,
    /// Names one resource: a number, a UUID, a short mixed id, a very long segment.
    Id,
    /// Identifies a person or grants access: an e-mail address, a JWT, an opaque token.
    Sensitive,
}

fn classify_segment(seg: &str) -> Segment {
    if seg.is_empty() {
        return Segment::Plain;
    }
    let decoded = percent_decoded(seg);
    let s = decoded.as_ref();
    // The searches run only where they can match: most segments are short words.
    let sensitive = (s.contains('@') && next_email(s, 0).is_some())
        || (s.len() >= MIN_TOKEN_LEN && (next_jwt(s, 0).is_some() || is_token(s)));
    if sensitive {
        Segment::Sensitive
    } else if is_id(s) {
        Segment::Id
    } else {
        Segment::Plain
    }
}

/// `%XX` sequences decoded (others kept as they are), invalid UTF-8 replaced.
fn percent_decoded(s: &str) -> Cow<'_, str> {
    if !s.contains('%') {
        return Cow::Borrowed(s);
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        let hex = b.get(i + 1..i + 3).and_then(|h| {
            let h = std::str::from_utf8(h).ok()?;
            u8::from_str_radix(h, 16).ok()
        });
        match (c, hex) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            _ => {
                out.push(c);
                i += 1;
            }
        }
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

fn is_id(s: &str) -> bool {
    let digits = s.bytes().filter(u8::is_ascii_digit).count();
    digits == s.len() || is_uuid(s) || (s.len() >= 8 && digits * 2 >= s.len()) || s.len() > 40
}

fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// Prefixes vendors give their credentials (GitHub, GitLab, Slack, Stripe, Google, npm, PyPI,
/// Hugging Face, OpenAI-style `sk-`): a word starting with one of them is a token even when it
/// does not look random.
const TOKEN_PREFIXES: &[&str] = &[
    "ghp_",
    "gho_",
    "ghu_",
    "ghs_",
    "ghr_",
    "github_pat_",
    "glpat-",
    "xoxb-",
    "xoxp-",
    "xoxa-",
    "xoxs-",
    "sk_live_",
    "sk_test_",
    "rk_live_",
    "sk-",
    "AIza",
    "npm_",
    "pypi-",
    "hf_",
];
/// Whether `word` (at least [`MIN_TOKEN_LEN`] bytes) starts like a vendor's credential, or is
/// an AWS access key id (`AKIA` and 16 upper-case letters or digits).
fn has_token_prefix(word: &str) -> bool {
    TOKEN_PREFIXES.iter().any(|p| word.starts_with(p))
        || (word.len() == 20
            && word.starts_with("AKIA")
            && word
                .bytes()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit()))
}

/// Shortest text taken for an opaque token.
const MIN_TOKEN_LEN: usize = 16;

fn is_token_byte(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b'~' | b'+' | b'/' | b'=')
}

/// Whether the whole of `s` is an opaque credential: a vendor-prefixed token, a hex run that is
/// not a UUID, or base64-like text whose letters and digits alternate like random text does
/// (words, slugs and camel-case names change character class rarely).
fn is_token(s: &str) -> bool {
    let b = s.as_bytes();
    if b.len() < MIN_TOKEN_LEN || !b.iter().all(|&c| is_token_byte(c)) {
        return false;
    }
    if has_token_prefix(s) {
        return true;
    }
    if b.iter().all(|&c| c.is_ascii_hexdigit() || c == b'-') {
        // A number is an id, not a token; a hex token has digits and letters.
        let hex_digits = b.iter().filter(|c| c.is_ascii_hexdigit()).count();
        let letters = b.iter().filter(|c| c.is_ascii_alphabetic()).count();
        return hex_digits >= MIN_TOKEN_LEN && letters > 0 && letters < hex_digits && !is_uuid(s);
    }
    #[derive(PartialEq, Clone, Copy)]
    enum Class {
        Upper,
        Lower,
        Digit,
    }
    let mut alnum = 0usize;
    let mut digits = 0usize;
    let mut changes = 0usize;
    let mut last = None;
    for &c in b {
        let class = if c.is_ascii_uppercase() {
            Class::Upper
        } else if c.is_ascii_lowercase() {
            Class::Lower
        } else if c.is_ascii_digit() {
            digits += 1;
            Class::Digit
        } else {
            continue;
        };
        alnum += 1;
        if last.is_some_and(|l| l != class) {
            changes += 1;
        }
        last = Some(class);
    }
    // Without digits, camel-case words (`listAllOrdersForCustomer`) change case as often as
    // random letters do, but never have two capitals in a row.
    let camel_words = digits == 0 && !b.windows(2).any(|w| w.iter().all(u8::is_ascii_uppercase));
    alnum >= MIN_TOKEN_LEN
        && digits < alnum
        && !camel_words
        && ((digits > 0 && changes * 4 >= alnum) || changes * 3 >= alnum)
}

// ---------------------------------------------------------------------------------------------
// Free text

/// A free-text value (a User-Agent, an error message, a command-line argument) with what
/// identifies people or grants access replaced: the local part of e-mail addresses
/// (`REDACTED@example.com`), JWTs, the credentials after `Bearer `, vendor-prefixed tokens.
pub fn free_text(s: &str) -> Cow<'_, str> {
    if !may_hold_personal_data(s.as_bytes()) {
        return Cow::Borrowed(s);
    }
    let mut ranges = Vec::new();
    let mut from = 0;
    while let Some(email) = next_email(s, from) {
        ranges.push(email.local);
        from = email.end;
    }
    let mut from = 0;
    while let Some(jwt) = next_jwt(s, from) {
        from = jwt.end;
        ranges.push(jwt);
    }
    bearer_credentials(s, &mut ranges);
    prefixed_tokens(s, &mut ranges);
    replace_ranges(s, ranges)
}

/// Whether `b` has what [`free_text`] looks for: an at sign (or `%`), `eyJ`, `bearer` in any
/// case, or a word long enough to be a vendor token. One pass, for the common text without.
fn may_hold_personal_data(b: &[u8]) -> bool {
    let mut word = 0;
    for (i, &c) in b.iter().enumerate() {
        let next = |n: usize| b.get(i + 1..i + 1 + n);
        match c {
            b'@' | b'%' => return true,
            b'e' if next(2) == Some(b"yJ") => return true,
            b'b' | b'B' if next(5).is_some_and(|w| w.eq_ignore_ascii_case(b"earer")) => {
                return true;
            }
            _ => {}
        }
        word = if c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-') {
            word + 1
        } else {
            0
        };
        if word >= MIN_TOKEN_LEN {
            return true;
        }
    }
    false
}

/// `s` with each range replaced by `REDACTED` (overlapping ranges merged).
fn replace_ranges(s: &str, mut ranges: Vec<Range<usize>>) -> Cow<'_, str> {
    if ranges.is_empty() {
        return Cow::Borrowed(s);
    }
    ranges.sort_by_key(|r| r.start);
    let mut out = String::with_capacity(s.len());
    let mut copied = 0;
    for r in ranges {
        if r.end <= copied {
            continue;
        }
        // Overlapping the previous replacement: extend it.
        if r.start >= copied {
            out.push_str(s.get(copied..r.start).unwrap_or_default());
            out.push_str(REDACTED);
        }
        copied = r.end;
    }
    out.push_str(s.get(copied..).unwrap_or_default());
    Cow::Owned(out)
}

struct Email {
    local: Range<usize>,
    end: usize,
}

fn is_local_byte(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'%' | b'+' | b'-')
}

fn is_domain_byte(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-')
}

/// The next `local@domain.tld` (the at sign may be percent-encoded, `%40`) at or after `from`.
/// The domain needs two labels and an alphabetic top-level label, so `pkg@1.2.3` is not one.
fn next_email(s: &str, from: usize) -> Option<Email> {
    let b = s.as_bytes();
    let mut i = from;
    while let Some(&c) = b.get(i) {
        let at_len = if c == b'@' {
            1
        } else if c == b'%' && b.get(i + 1..i + 3).is_some_and(|h| h == b"40") {
            3
        } else {
            i += 1;
            continue;
        };
        let mut start = i;
        while start > from && b.get(start - 1).is_some_and(|&c| is_local_byte(c)) {
            start -= 1;
        }
        let domain_start = i + at_len;
        let mut end = domain_start;
        while b.get(end).is_some_and(|&c| is_domain_byte(c)) {
            end += 1;
        }
        while end > domain_start && matches!(b.get(end - 1), Some(b'.' | b'-')) {
            end -= 1;
        }
        if start < i && is_mail_domain(s.get(domain_start..end).unwrap_or_default()) {
            return Some(Email {
                local: start..i,
                end,
            });
        }
        i += at_len;
    }
    None
}

fn is_mail_domain(d: &str) -> bool {
    let mut labels = d.split('.');
    let Some(tld) = labels.next_back() else {
        return false;
    };
    let mut count = 1;
    for label in labels {
        if label.is_empty() {
            return false;
        }
        count += 1;
    }
    count >= 2 && tld.len() >= 2 && tld.bytes().all(|c| c.is_ascii_alphabetic())
}

/// The next JWT-like run at or after `from`: base64url text starting with `eyJ` (the encoding
/// of `{"`, how every JWT and JWS/JWE header starts), with its dot-separated parts.
fn next_jwt(s: &str, from: usize) -> Option<Range<usize>> {
    let is_jwt_byte = |c: u8| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.');
    let b = s.as_bytes();
    let mut at = from;
    while let Some(start) = find_bytes(b, at, b"eyJ") {
        let mut end = start + 3;
        while b.get(end).is_some_and(|&c| is_jwt_byte(c)) {
            end += 1;
        }
        let boundary = start == 0 || b.get(start - 1).is_some_and(|&c| !is_jwt_byte(c));
        if boundary && end - start >= MIN_TOKEN_LEN {
            return Some(start..end);
        }
        at = end;
    }
    None
}

/// The credentials after `Bearer ` (any case), up to the next whitespace or quote.
fn bearer_credentials(s: &str, out: &mut Vec<Range<usize>>) {
    let b = s.as_bytes();
    let mut at = 0;
    while let Some(found) = find_ascii_ci(s, at, "bearer") {
        let mut start = found + "bearer".len();
        at = start;
        let word_start = found == 0 || b.get(found - 1).is_some_and(|c| !c.is_ascii_alphanumeric());
        if !word_start || !b.get(start).is_some_and(|c| matches!(c, b' ' | b'\t')) {
            continue;
        }
        while b.get(start).is_some_and(|c| matches!(c, b' ' | b'\t')) {
            start += 1;
        }
        let mut end = start;
        while b
            .get(end)
            .is_some_and(|c| !c.is_ascii_whitespace() && !matches!(c, b'"' | b'\''))
        {
            end += 1;
        }
        if end > start {
            out.push(start..end);
            at = end;
        }
    }
}

/// Byte position of `needle` in `hay` at or after `from`. A plain scan: the texts are short,
/// and `str::find` sets up a two-way searcher per call.
fn find_bytes(hay: &[u8], from: usize, needle: &[u8]) -> Option<usize> {
    hay.get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|i| from + i)
}

/// Byte position of `needle` (ASCII, lower case) in `s` at or after `from`, ignoring ASCII case.
fn find_ascii_ci(s: &str, from: usize, needle: &str) -> Option<usize> {
    let hay = s.as_bytes().get(from..)?;
    hay.windows(needle.len())
        .position(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
        .map(|i| from + i)
}

/// Words (runs of `[A-Za-z0-9_-]`) that start with a vendor's token prefix.
fn prefixed_tokens(s: &str, out: &mut Vec<Range<usize>>) {
    let b = s.as_bytes();
    let is_word = |c: u8| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-');
    let mut i = 0;
    while i < b.len() {
        if !b.get(i).is_some_and(|&c| is_word(c)) {
            i += 1;
            continue;
        }
        let start = i;
        while b.get(i).is_some_and(|&c| is_word(c)) {
            i += 1;
        }
        let word = s.get(start..i).unwrap_or_default();
        if word.len() >= MIN_TOKEN_LEN && has_token_prefix(word) {
            out.push(start..i);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Command lines

/// How an option's value is redacted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Value {
    /// The whole value is a secret.
    Secret,
    /// `user<sep>password` (curl `-u alice:pw`, smbclient `-U alice%pw`): the part after the
    /// separator is the secret.
    Credentials(char),
    /// SQL text: literals become `?` (the `db.query.text` sanitizer).
    Sql,
    /// A shell script (`sh -c`): redacted word by word as a command line.
    Script,
}

/// Options whose meaning depends on the program: `-p` is a password for mysql but a port for
/// psql, `-c` is SQL for psql but a script for sh.
struct ProgramOptions {
    programs: &'static [&'static str],
    options: &'static [(&'static str, Value)],
}

const PROGRAMS: &[ProgramOptions] = &[
    ProgramOptions {
        programs: &["psql"],
        options: &[("-c", Value::Sql), ("--command", Value::Sql)],
    },
    ProgramOptions {
        programs: &[
            "mysql",
            "mariadb",
            "mysqldump",
            "mariadb-dump",
            "mysqladmin",
            "mariadb-admin",
            "mysqlimport",
            "mysqlshow",
            "mysqlcheck",
            "mysqlpump",
        ],
        options: &[
            ("-p", Value::Secret),
            ("-e", Value::Sql),
            ("--execute", Value::Sql),
        ],
    },
    ProgramOptions {
        programs: &["curl"],
        options: &[
            ("-u", Value::Credentials(':')),
            ("--user", Value::Credentials(':')),
            ("-U", Value::Credentials(':')),
            ("--proxy-user", Value::Credentials(':')),
            ("-E", Value::Credentials(':')),
            ("--cert", Value::Credentials(':')),
            ("-b", Value::Secret),
            ("--cookie", Value::Secret),
            ("--oauth2-bearer", Value::Secret),
        ],
    },
    ProgramOptions {
        programs: &["wget"],
        options: &[
            ("--user", Value::Credentials(':')),
            ("--http-user", Value::Credentials(':')),
            ("--proxy-user", Value::Credentials(':')),
        ],
    },
    ProgramOptions {
        programs: &["redis-cli", "valkey-cli"],
        options: &[("-a", Value::Secret)],
    },
    ProgramOptions {
        programs: &["sshpass"],
        options: &[("-p", Value::Secret)],
    },
    ProgramOptions {
        programs: &[
            "mongosh",
            "mongo",
            "mongodump",
            "mongorestore",
            "mongoexport",
            "mongoimport",
        ],
        options: &[("-p", Value::Secret)],
    },
    ProgramOptions {
        programs: &[
            "ldapsearch",
            "ldapmodify",
            "ldapadd",
            "ldapdelete",
            "ldapwhoami",
            "ldappasswd",
            "ldapcompare",
            "ldapmodrdn",
        ],
        options: &[("-w", Value::Secret)],
    },
    ProgramOptions {
        programs: &["sqlcmd", "bcp"],
        options: &[
            ("-P", Value::Secret),
            ("-Q", Value::Sql),
            ("-q", Value::Sql),
        ],
    },
    ProgramOptions {
        programs: &["clickhouse-client", "clickhouse"],
        options: &[("--query", Value::Sql), ("-q", Value::Sql)],
    },
    ProgramOptions {
        programs: &["cqlsh"],
        options: &[
            ("-p", Value::Secret),
            ("-e", Value::Sql),
            ("--execute", Value::Sql),
        ],
    },
    ProgramOptions {
        programs: &["zip", "unzip"],
        options: &[("-P", Value::Secret)],
    },
    ProgramOptions {
        programs: &["7z", "7za", "7zr"],
        options: &[("-p", Value::Secret)],
    },
    ProgramOptions {
        programs: &["smbclient"],
        options: &[
            ("-U", Value::Credentials('%')),
            ("--user", Value::Credentials('%')),
        ],
    },
    ProgramOptions {
        programs: SHELLS,
        options: &[("-c", Value::Script)],
    },
];

const SHELLS: &[&str] = &["sh", "bash", "dash", "zsh", "ash", "ksh", "mksh", "busybox"];

/// The program an argument names (its file name), if it is one whose options we know.
fn known_program(arg: &str) -> Option<&'static str> {
    let name = arg.rsplit('/').next().unwrap_or(arg);
    PROGRAMS
        .iter()
        .flat_map(|p| p.programs.iter())
        .find(|p| **p == name)
        .copied()
}

/// How `program` takes `flag` (with its dashes), if it is special.
fn program_option(program: Option<&str>, flag: &str) -> Option<Value> {
    let program = program?;
    if SHELLS.contains(&program)
        && flag.len() >= 2
        && !flag.starts_with("--")
        && flag[1..].bytes().all(|c| c.is_ascii_alphabetic())
        && flag.contains('c')
    {
        // `bash -lc 'script'`, `sh -ec '…'`.
        return Some(Value::Script);
    }
    PROGRAMS
        .iter()
        .filter(|p| p.programs.contains(&program))
        .flat_map(|p| p.options.iter())
        .find(|(name, _)| *name == flag)
        .map(|&(_, value)| value)
}

/// How the value of `flag` is redacted: the program's own options first, then any option whose
/// name says it holds a secret.
fn option_value(program: Option<&str>, flag: &str) -> Option<Value> {
    program_option(program, flag).or_else(|| is_secret_name(flag).then_some(Value::Secret))
}

/// Names whose value is a secret, compared after lower-casing, without leading dashes, with `_`
/// read as `-`.
const SECRET_NAMES: &[&str] = &[
    "pass",
    "pwd",
    "passin",
    "passout",
    "auth",
    "authorization",
    "creds",
    "credentials",
    "api-key",
    "apikey",
    "private-key",
    "access-key",
    "secret-key",
];
/// Last words that make a secret-sounding name a reference to one (`--password-file PATH`) or
/// a setting about one (`--token-ttl 60`): their value is kept.
const REFERENCE_WORDS: &[&str] = &[
    "file", "path", "dir", "stdin", "env", "command", "cmd", "prompt", "url", "endpoint", "length",
    "len", "ttl", "timeout", "expiry", "type", "name", "header",
];

/// Whether `name` (a flag, a `key=value` key, a header name) names a secret.
fn is_secret_name(name: &str) -> bool {
    let name = name
        .trim_start_matches('-')
        .to_ascii_lowercase()
        .replace('_', "-");
    if name.is_empty()
        || name.starts_with("no-")
        || !name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.'))
    {
        return false;
    }
    if SECRET_NAMES.contains(&name.as_str()) {
        return true;
    }
    let words: Vec<&str> = name.split(['-', '.']).filter(|w| !w.is_empty()).collect();
    if words.len() > 1 && words.last().is_some_and(|w| REFERENCE_WORDS.contains(w)) {
        return false;
    }
    // "pg.password", "PGPASSWORD", "aws-secret-access-key", "github_token", "storepass".
    words.iter().any(|w| {
        w.contains("password")
            || w.contains("passwd")
            || w.contains("passphrase")
            || (w.ends_with("pass") && !matches!(*w, "bypass" | "compass" | "surpass"))
            || w.ends_with("pwd")
            || w.contains("secret")
            || (w.contains("token") && !w.contains("tokeniz"))
            || *w == "key"
            || (w.ends_with("key")
                && ["api", "private", "access", "secret", "master", "signing"]
                    .iter()
                    .any(|p| w.starts_with(p)))
            || w.starts_with("credential")
    })
}

/// The command line with secrets and personal data replaced, arguments joined by spaces:
/// values of secret options (`--password x`, `--token=x`, mysql `-px`, curl `-u user:x`),
/// `key=value` pairs with secret keys (`PGPASSWORD=x`, libpq `password=x`), secret headers
/// (`Authorization: Bearer x`), URLs' passwords, path tokens and query values, SQL literals of
/// SQL arguments (`psql -c "…"`), e-mail addresses' local parts, JWTs and vendor tokens.
/// Programs, flags, hosts and paths are kept. At most [`MAX_COMMAND_LINE_LEN`] bytes.
pub fn command_line(args: &[String]) -> String {
    let mut out = String::new();
    redact_args(args.iter().map(String::as_str), 0, &mut out);
    if out.len() > MAX_COMMAND_LINE_LEN {
        let mut end = MAX_COMMAND_LINE_LEN;
        while !out.is_char_boundary(end) {
            end -= 1;
        }
        out.truncate(end);
        out.push('…');
    }
    out
}

fn redact_args<'a>(args: impl Iterator<Item = &'a str>, depth: u8, out: &mut String) {
    let mut program: Option<&str> = None;
    let mut pending: Option<Value> = None;
    let mut command_start = true;
    for (i, arg) in args.enumerate() {
        if out.len() > MAX_COMMAND_LINE_LEN {
            return;
        }
        if i > 0 {
            out.push(' ');
        }
        let is_flag = arg.len() > 1 && arg.starts_with('-');
        if let Some(value) = pending.take()
            && !is_flag
        {
            redact_value(value, arg, depth, out);
            continue;
        }
        if command_start {
            program = known_program(arg);
            command_start = false;
        } else if !is_flag && let Some(p) = known_program(arg) {
            // `sudo -u postgres psql …`, `env PGPASSWORD=… psql …`, `timeout 5 mysql …`.
            program = Some(p);
        }
        if is_flag {
            pending = redact_flag(program, arg, depth, out);
        } else {
            out.push_str(&redact_text(arg));
        }
        // A new command in a script: `psql -c …; curl -u …`.
        if depth > 0 && (arg.ends_with(';') || matches!(arg, "&&" | "||" | "|" | "&")) {
            command_start = true;
            program = None;
        }
    }
}

/// Writes a flag (`--name`, `--name=value`, `-Xvalue`); returns how the next argument is
/// redacted when the flag takes it as its value.
fn redact_flag(program: Option<&str>, arg: &str, depth: u8, out: &mut String) -> Option<Value> {
    match arg.split_once('=') {
        Some((name, value)) => {
            if let Some(kind) = option_value(program, name) {
                out.push_str(name);
                out.push('=');
                redact_value(kind, value, depth, out);
                return None;
            }
        }
        None => {
            if let Some(kind) = program_option(program, arg) {
                out.push_str(arg);
                return Some(kind);
            }
        }
    }
    // Short option with its value attached: mysql `-phunter2`, curl `-ualice:pw`.
    if !arg.starts_with("--")
        && let Some(short) = arg.get(..2)
        && let Some(kind @ (Value::Secret | Value::Credentials(_))) = program_option(program, short)
    {
        out.push_str(short);
        redact_value(kind, arg.get(2..).unwrap_or_default(), depth, out);
        return None;
    }
    if !arg.contains('=') && is_secret_name(arg) {
        out.push_str(arg);
        return Some(Value::Secret);
    }
    out.push_str(&redact_text(arg));
    None
}

fn redact_value(kind: Value, value: &str, depth: u8, out: &mut String) {
    match kind {
        Value::Secret if value.is_empty() => {}
        Value::Secret => out.push_str(REDACTED),
        Value::Credentials(sep) => match value.split_once(sep) {
            Some((user, _)) => {
                out.push_str(&redact_text(user));
                out.push(sep);
                out.push_str(REDACTED);
            }
            None => out.push_str(&redact_text(value)),
        },
        Value::Sql => out.push_str(&redact_text(&sanitize_query(value))),
        Value::Script if depth < MAX_SCRIPT_DEPTH => {
            let words = shell_words(value);
            redact_args(words.iter().map(String::as_str), depth + 1, out);
        }
        Value::Script => out.push_str(&redact_text(value)),
    }
}

/// Words of a shell script, the way a POSIX shell splits them (quotes removed), with `;`, `|`,
/// `&`, `&&`, `||` and newlines as words of their own so each command starts afresh.
fn shell_words(script: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = script.chars().peekable();
    let finish = |word: &mut String, in_word: &mut bool, words: &mut Vec<String>| {
        if *in_word {
            words.push(std::mem::take(word));
            *in_word = false;
        }
    };
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                for c in chars.by_ref() {
                    if c == '\'' {
                        break;
                    }
                    word.push(c);
                }
            }
            '"' => {
                in_word = true;
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' if chars
                            .peek()
                            .is_some_and(|n| matches!(n, '"' | '\\' | '$' | '`')) =>
                        {
                            word.extend(chars.next());
                        }
                        _ => word.push(c),
                    }
                }
            }
            '\\' => {
                in_word = true;
                word.extend(chars.next());
            }
            ';' | '|' | '&' | '\n' => {
                finish(&mut word, &mut in_word, &mut words);
                let mut op = c.to_string();
                if (c == '|' || c == '&') && chars.peek() == Some(&c) {
                    op.extend(chars.next());
                }
                if c == '\n' {
                    op = ";".into();
                }
                words.push(op);
            }
            c if c.is_whitespace() => finish(&mut word, &mut in_word, &mut words),
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    finish(&mut word, &mut in_word, &mut words);
    words
}

/// First words of SQL statements: an argument starting with one of them (and a space) is SQL.
const SQL_STATEMENTS: &[&str] = &[
    "SELECT", "INSERT", "UPDATE", "DELETE", "CREATE", "ALTER", "DROP", "GRANT", "REVOKE", "WITH",
    "COPY", "MERGE", "CALL", "EXECUTE", "PREPARE", "TRUNCATE", "VALUES", "UPSERT", "REPLACE",
];

fn looks_like_sql(arg: &str) -> bool {
    let trimmed = arg.trim_start();
    let word_end = trimmed
        .find(|c: char| c.is_whitespace())
        .unwrap_or(trimmed.len());
    word_end < trimmed.len()
        && SQL_STATEMENTS
            .iter()
            .any(|k| k.eq_ignore_ascii_case(&trimmed[..word_end]))
}

/// One argument (or an option's value) that no option rule took: SQL statements sanitized, URLs
/// redacted part by part, the rest as text.
fn redact_text(arg: &str) -> String {
    let sanitized;
    let arg = if looks_like_sql(arg) {
        sanitized = sanitize_query(arg);
        sanitized.as_str()
    } else {
        arg
    };
    let mut out = String::with_capacity(arg.len());
    let mut rest = arg;
    while let Some(url) = next_url(rest) {
        out.push_str(&redact_plain(&rest[..url.start]));
        out.push_str(&redact_url(&rest[url.clone()]));
        rest = &rest[url.end..];
    }
    out.push_str(&redact_plain(rest));
    out
}

/// The next `scheme://…` in `s`. It ends at whitespace, a quote, `<`, `>`, or a `,`/`;` that
/// starts another URL (`--urls=https://a/x,https://b/y`).
fn next_url(s: &str) -> Option<Range<usize>> {
    let b = s.as_bytes();
    let mut from = 0;
    while let Some(found) = s.get(from..).and_then(|r| r.find("://")) {
        let sep = from + found;
        let mut start = sep;
        while start > 0
            && b.get(start - 1)
                .is_some_and(|c| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'.' | b'-'))
        {
            start -= 1;
        }
        while start < sep && !b.get(start).is_some_and(u8::is_ascii_alphabetic) {
            start += 1;
        }
        if start == sep {
            from = sep + 3;
            continue;
        }
        let mut end = sep + 3;
        while let Some(&c) = b.get(end) {
            if c.is_ascii_whitespace() || matches!(c, b'"' | b'\'' | b'<' | b'>' | b'`') {
                break;
            }
            if matches!(c, b',' | b';') && starts_url(s.get(end + 1..).unwrap_or_default()) {
                break;
            }
            end += 1;
        }
        return Some(start..end);
    }
    None
}

fn starts_url(s: &str) -> bool {
    let scheme_len = s
        .bytes()
        .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'.' | b'-'))
        .count();
    scheme_len > 0 && s.get(scheme_len..).is_some_and(|r| r.starts_with("://"))
}

/// `scheme://user:password@host/path?query#fragment` → password, sensitive user names, path
/// tokens, query and fragment values redacted; scheme, host, port and the path's words kept.
fn redact_url(url: &str) -> String {
    let Some(sep) = url.find("://") else {
        return redact_plain(url);
    };
    let (scheme, rest) = url.split_at(sep + 3);
    let mut out = String::with_capacity(url.len() + 16);
    out.push_str(scheme);
    let auth_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, after) = rest.split_at(auth_end);
    if let Some((userinfo, host)) = authority.rsplit_once('@') {
        let (user, password) = match userinfo.split_once(':') {
            Some((user, password)) => (user, Some(password)),
            None => (userinfo, None),
        };
        if classify_segment(user) == Segment::Sensitive {
            out.push_str(REDACTED);
        } else {
            out.push_str(&free_text(user));
        }
        match password {
            Some("") => out.push(':'),
            Some(_) => {
                out.push(':');
                out.push_str(REDACTED);
            }
            None => {}
        }
        out.push('@');
        out.push_str(host);
    } else {
        out.push_str(authority);
    }
    let (before_fragment, fragment) = match after.split_once('#') {
        Some((b, f)) => (b, Some(f)),
        None => (after, None),
    };
    let (path, query) = match before_fragment.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (before_fragment, None),
    };
    out.push_str(&url_path(path).redacted);
    if let Some(query) = query {
        out.push('?');
        out.push_str(&url_query(query));
    }
    // OAuth's implicit flow returns tokens in the fragment (`#access_token=…`).
    if let Some(fragment) = fragment {
        out.push('#');
        out.push_str(&url_query(fragment));
    }
    out
}

/// Text outside URLs: secret `key=value` pairs, secret headers and `key: value`s,
/// `user:password@host` (DSNs without a scheme), then [`free_text`].
fn redact_plain(text: &str) -> String {
    let text = redact_pairs(text);
    let text = redact_headers(&text);
    let text = redact_userinfo(&text);
    free_text(&text).into_owned()
}

fn is_name_byte(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.')
}

/// End of a value starting at `start`: a quoted value (`'…'`, `"…"`, backslash escapes) ends
/// after its closing quote; any other at whitespace or one of `stops`.
fn value_end(b: &[u8], start: usize, stops: &[u8]) -> usize {
    match b.get(start) {
        Some(&q @ (b'\'' | b'"')) => {
            let mut i = start + 1;
            while let Some(&c) = b.get(i) {
                if c == b'\\' {
                    i += 2;
                } else if c == q {
                    return i + 1;
                } else {
                    i += 1;
                }
            }
            b.len()
        }
        _ => {
            let mut i = start;
            while b
                .get(i)
                .is_some_and(|c| !c.is_ascii_whitespace() && !stops.contains(c))
            {
                i += 1;
            }
            i
        }
    }
}

/// Replaces the value of every `name=value` whose name is secret (`PGPASSWORD=x`,
/// `password='a b'` in a libpq string, `Password=x;` in an ODBC string).
fn redact_pairs(s: &str) -> String {
    let b = s.as_bytes();
    let mut ranges = Vec::new();
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        if c != b'=' {
            i += 1;
            continue;
        }
        let mut name_start = i;
        while name_start > 0 && b.get(name_start - 1).is_some_and(|&c| is_name_byte(c)) {
            name_start -= 1;
        }
        let name = s.get(name_start..i).unwrap_or_default();
        let end = value_end(b, i + 1, b"&;,");
        if end > i + 1 && is_secret_name(name) {
            ranges.push(i + 1..end);
            i = end;
        } else {
            i += 1;
        }
    }
    replace_ranges(s, ranges).into_owned()
}

/// Header-like `Name: value` (also JSON's `"name": "value"`) with a secret name: credentials
/// after `Authorization:` (the scheme word kept), whole `Cookie:` values, values of
/// secret-named keys (`X-Api-Key: …`, `"password":"…"`, openssl's `pass:…`).
fn redact_headers(s: &str) -> String {
    let b = s.as_bytes();
    let mut ranges = Vec::new();
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        if c != b':' {
            i += 1;
            continue;
        }
        let mut name_end = i;
        if name_end > 0 && b.get(name_end - 1) == Some(&b'"') {
            name_end -= 1;
        }
        let mut name_start = name_end;
        while name_start > 0 && b.get(name_start - 1).is_some_and(|&c| is_name_byte(c)) {
            name_start -= 1;
        }
        let name = s
            .get(name_start..name_end)
            .unwrap_or_default()
            .to_ascii_lowercase();
        let mut start = i + 1;
        while b.get(start).is_some_and(|c| matches!(c, b' ' | b'\t')) {
            start += 1;
        }
        let line_end = s
            .get(start..)
            .and_then(|r| r.find(['\n', '\r']))
            .map_or(b.len(), |j| start + j);
        let range = match name.as_str() {
            "authorization" | "proxy-authorization" => {
                // Keep the scheme word (`Bearer`, `Basic`): it says what kind of credential.
                let scheme = s
                    .get(start..line_end)
                    .and_then(|v| v.split_once(' '))
                    .filter(|(w, rest)| {
                        !w.is_empty()
                            && !rest.is_empty()
                            && w.bytes().all(|c| c.is_ascii_alphabetic())
                    })
                    .map_or(0, |(w, _)| w.len() + 1);
                start + scheme..line_end
            }
            "cookie" | "set-cookie" => start..line_end,
            _ if is_secret_name(&name) => start..value_end(b, start, b"&;,"),
            _ => {
                i += 1;
                continue;
            }
        };
        if range.end > range.start {
            i = range.end;
            ranges.push(range);
        } else {
            i += 1;
        }
    }
    replace_ranges(s, ranges).into_owned()
}

/// `user:password@host` outside a URL (Go MySQL DSNs, `--dsn=alice:pw@tcp(db:3306)/app`): the
/// password.
fn redact_userinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut ranges = Vec::new();
    let stop = |c: u8| {
        c.is_ascii_whitespace()
            || matches!(c, b'/' | b'@' | b'"' | b'\'' | b'=' | b',' | b';' | b'(')
    };
    for (at, _) in s.match_indices('@') {
        let mut start = at;
        while start > 0 && b.get(start - 1).is_some_and(|&c| !stop(c)) {
            start -= 1;
        }
        if let Some(colon) = s.get(start..at).and_then(|u| u.find(':'))
            && start + colon + 1 < at
        {
            ranges.push(start + colon + 1..at);
        }
    }
    replace_ranges(s, ranges).into_owned()
}

#[cfg(test)]
mod tests;
