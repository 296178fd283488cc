//! SQL text helpers: a small PostgreSQL lexer, top-level statement splitting for simple-query
//! strings, literal sanitizing and `operation collection` summaries for span names.
//!
//! Everything here works on text that may be cut anywhere (the capture is a prefix), never
//! panics, and bounds its output.

use std::borrow::Cow;
use std::ops::Range;

/// Longest sanitized query we return (bytes, cut on a character boundary).
pub const MAX_SANITIZED_LEN: usize = 2048;
/// Longest collection name we return.
const MAX_COLLECTION_LEN: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Tok {
    /// Whitespace run.
    Space,
    /// `-- …` or (nested) `/* … */`.
    Comment,
    /// Keyword or unquoted identifier.
    Word,
    /// `"…"` (or `U&"…"`).
    QuotedIdent,
    /// `'…'`, `E'…'`, `B'…'`, `X'…'`, `N'…'`, `U&'…'`.
    Str,
    /// `$tag$…$tag$`.
    DollarStr,
    Number,
    /// `$1`.
    Param,
    Semicolon,
    OpenParen,
    CloseParen,
    Dot,
    Comma,
    /// Any other byte (operators, casts, brackets…).
    Other,
}

/// Byte-level lexer. Token boundaries always fall on ASCII bytes or the end of the input, so
/// slicing the `&str` at them is always on a character boundary.
pub(super) struct Lexer<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Lexer<'a> {
    pub(super) fn new(s: &'a str) -> Self {
        Self {
            b: s.as_bytes(),
            pos: 0,
        }
    }

    fn at(&self, i: usize) -> Option<u8> {
        self.b.get(i).copied()
    }

    /// End of a quoted run starting at `start` (the opening quote), `q` doubled to escape;
    /// with `backslash`, `\x` escapes too. Unterminated: the end of the input.
    fn quoted_end(&self, start: usize, q: u8, backslash: bool) -> usize {
        let mut i = start.saturating_add(1);
        while let Some(c) = self.at(i) {
            if backslash && c == b'\\' {
                i = i.saturating_add(2);
            } else if c == q {
                if self.at(i + 1) == Some(q) {
                    i += 2;
                } else {
                    return i + 1;
                }
            } else {
                i += 1;
            }
        }
        self.b.len()
    }

    /// `$tag$` starting at `start`: the end of the opening delimiter, if it is one.
    fn dollar_tag_end(&self, start: usize) -> Option<usize> {
        let mut i = start + 1;
        match self.at(i) {
            Some(b'$') => return Some(i + 1),
            Some(c) if is_ident_start(c) => i += 1,
            _ => return None,
        }
        while let Some(c) = self.at(i) {
            if c == b'$' {
                return Some(i + 1);
            }
            if !is_ident_char(c) || c == b'$' {
                return None;
            }
            i += 1;
        }
        None
    }

    fn number_end(&self, start: usize) -> usize {
        let mut i = start;
        let digits = |mut i: usize, this: &Self| {
            while this.at(i).is_some_and(|c| c.is_ascii_digit() || c == b'_') {
                i += 1;
            }
            i
        };
        if self.at(i) == Some(b'0')
            && matches!(
                self.at(i + 1),
                Some(b'x' | b'X' | b'o' | b'O' | b'b' | b'B')
            )
            && self.at(i + 2).is_some_and(|c| c.is_ascii_hexdigit())
        {
            i += 2;
            while self
                .at(i)
                .is_some_and(|c| c.is_ascii_hexdigit() || c == b'_')
            {
                i += 1;
            }
            return i;
        }
        i = digits(i, self);
        if self.at(i) == Some(b'.') && self.at(i + 1) != Some(b'.') {
            i = digits(i + 1, self);
        }
        if matches!(self.at(i), Some(b'e' | b'E')) {
            let mut j = i + 1;
            if matches!(self.at(j), Some(b'+' | b'-')) {
                j += 1;
            }
            if self.at(j).is_some_and(|c| c.is_ascii_digit()) {
                i = digits(j, self);
            }
        }
        i
    }
}

fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c >= 0x80
}

fn is_ident_char(c: u8) -> bool {
    is_ident_start(c) || c.is_ascii_digit() || c == b'$'
}

impl Iterator for Lexer<'_> {
    /// Kind and byte range.
    type Item = (Tok, usize, usize);

    fn next(&mut self) -> Option<Self::Item> {
        let start = self.pos;
        let c = self.at(start)?;
        let next = self.at(start + 1);
        let (kind, end) = match c {
            b' ' | b'\t' | b'\n' | b'\r' | b'\x0c' => {
                let mut i = start + 1;
                while matches!(self.at(i), Some(b' ' | b'\t' | b'\n' | b'\r' | b'\x0c')) {
                    i += 1;
                }
                (Tok::Space, i)
            }
            b'-' if next == Some(b'-') => {
                let mut i = start + 2;
                while self.at(i).is_some_and(|c| c != b'\n') {
                    i += 1;
                }
                (Tok::Comment, i)
            }
            b'/' if next == Some(b'*') => {
                let mut depth = 1u32;
                let mut i = start + 2;
                while i < self.b.len() && depth > 0 {
                    match (self.at(i), self.at(i + 1)) {
                        (Some(b'/'), Some(b'*')) => {
                            depth += 1;
                            i += 2;
                        }
                        (Some(b'*'), Some(b'/')) => {
                            depth -= 1;
                            i += 2;
                        }
                        _ => i += 1,
                    }
                }
                (Tok::Comment, i.min(self.b.len()))
            }
            b'\'' => (Tok::Str, self.quoted_end(start, b'\'', false)),
            b'"' => (Tok::QuotedIdent, self.quoted_end(start, b'"', false)),
            b'e' | b'E' if next == Some(b'\'') => {
                (Tok::Str, self.quoted_end(start + 1, b'\'', true))
            }
            b'b' | b'B' | b'x' | b'X' | b'n' | b'N' if next == Some(b'\'') => {
                (Tok::Str, self.quoted_end(start + 1, b'\'', false))
            }
            b'u' | b'U' if next == Some(b'&') && self.at(start + 2) == Some(b'\'') => {
                (Tok::Str, self.quoted_end(start + 2, b'\'', false))
            }
            b'u' | b'U' if next == Some(b'&') && self.at(start + 2) == Some(b'"') => {
                (Tok::QuotedIdent, self.quoted_end(start + 2, b'"', false))
            }
            b'$' if next.is_some_and(|c| c.is_ascii_digit()) => {
                let mut i = start + 1;
                while self.at(i).is_some_and(|c| c.is_ascii_digit()) {
                    i += 1;
                }
                (Tok::Param, i)
            }
            b'$' => match self.dollar_tag_end(start) {
                Some(open_end) => {
                    let tag = self.b.get(start..open_end).unwrap_or_default();
                    let body = self.b.get(open_end..).unwrap_or_default();
                    let end = find(body, tag).map_or(self.b.len(), |i| open_end + i + tag.len());
                    (Tok::DollarStr, end)
                }
                None => (Tok::Other, start + 1),
            },
            b'0'..=b'9' => (Tok::Number, self.number_end(start)),
            b'.' if next.is_some_and(|c| c.is_ascii_digit()) => {
                (Tok::Number, self.number_end(start))
            }
            c if is_ident_start(c) => {
                let mut i = start + 1;
                while self.at(i).is_some_and(is_ident_char) {
                    i += 1;
                }
                (Tok::Word, i)
            }
            b';' => (Tok::Semicolon, start + 1),
            b'(' => (Tok::OpenParen, start + 1),
            b')' => (Tok::CloseParen, start + 1),
            b'.' => (Tok::Dot, start + 1),
            b',' => (Tok::Comma, start + 1),
            _ => (Tok::Other, start + 1),
        };
        // Always make progress, never run past the end.
        let end = end.clamp(start + 1, self.b.len());
        self.pos = end;
        Some((kind, start, end))
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return None;
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

fn slice(s: &str, start: usize, end: usize) -> &str {
    s.get(start..end).unwrap_or_default()
}

/// Splits a simple-query string into its statements at top-level `;` (outside quotes,
/// dollar quotes, comments and `BEGIN ATOMIC … END` bodies), the way the server counts them:
/// empty statements are dropped. Each piece (a byte range of `sql`, on character
/// boundaries) is trimmed of surrounding whitespace.
pub(super) fn split_statements(sql: &str) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut piece_start: Option<usize> = None;
    let mut piece_end = 0;
    // Inside a SQL-standard function body: depth of CASE … END nesting plus one.
    let mut atomic = 0u32;
    let mut prev_word_begin = false;
    for (tok, start, end) in Lexer::new(sql) {
        match tok {
            Tok::Space | Tok::Comment => {
                if tok == Tok::Comment && piece_start.is_none() {
                    piece_start = Some(start);
                    piece_end = end;
                }
                continue;
            }
            Tok::Semicolon if atomic == 0 => {
                if let Some(s) = piece_start.take() {
                    out.push(s..piece_end);
                }
                prev_word_begin = false;
                continue;
            }
            Tok::Word => {
                let w = slice(sql, start, end);
                if atomic == 0 {
                    if prev_word_begin && w.eq_ignore_ascii_case("ATOMIC") {
                        atomic = 1;
                    }
                } else if w.eq_ignore_ascii_case("CASE") {
                    atomic = atomic.saturating_add(1);
                } else if w.eq_ignore_ascii_case("END") {
                    atomic -= 1;
                }
                prev_word_begin = w.eq_ignore_ascii_case("BEGIN");
            }
            _ => prev_word_begin = false,
        }
        if piece_start.is_none() {
            piece_start = Some(start);
        }
        piece_end = end;
    }
    if let Some(s) = piece_start {
        out.push(s..piece_end);
    }
    // A piece holding only comments is not a statement.
    out.retain(|r| {
        Lexer::new(slice(sql, r.start, r.end))
            .any(|(t, _, _)| !matches!(t, Tok::Space | Tok::Comment))
    });
    out
}

/// The query with every literal (strings of any kind, dollar-quoted strings, numbers)
/// replaced by `?`, comments removed and whitespace collapsed to single spaces. Keywords,
/// identifiers, operators and `$n` parameters are kept. At most [`MAX_SANITIZED_LEN`] bytes.
pub fn sanitize_query(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len().min(MAX_SANITIZED_LEN));
    let mut space = false;
    for (tok, start, end) in Lexer::new(sql) {
        let text = match tok {
            Tok::Space | Tok::Comment => {
                space = true;
                continue;
            }
            Tok::Str | Tok::DollarStr | Tok::Number => "?",
            _ => slice(sql, start, end),
        };
        let need = text.len() + usize::from(space && !out.is_empty());
        if out.len() + need > MAX_SANITIZED_LEN {
            if space && !out.is_empty() && out.len() < MAX_SANITIZED_LEN {
                out.push(' ');
            }
            let room = MAX_SANITIZED_LEN.saturating_sub(out.len());
            out.push_str(truncate_str(text, room));
            break;
        }
        if space && !out.is_empty() {
            out.push(' ');
        }
        out.push_str(text);
        space = false;
    }
    out
}

/// `s` cut to at most `max` bytes on a character boundary.
pub(super) fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while end > 0 && !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or_default()
}

/// Significant tokens (no whitespace/comments) with their text.
fn significant(sql: &str) -> impl Iterator<Item = (Tok, &str)> {
    Lexer::new(sql)
        .filter(|(t, _, _)| !matches!(t, Tok::Space | Tok::Comment))
        .map(move |(t, s, e)| (t, slice(sql, s, e)))
}

/// First keyword of a statement, upper-cased (leading parentheses skipped).
pub(super) fn first_keyword(sql: &str) -> Option<String> {
    for (tok, text) in significant(sql) {
        match tok {
            Tok::OpenParen => continue,
            Tok::Word => return Some(text.to_ascii_uppercase()),
            _ => return None,
        }
    }
    None
}

/// `(operation, collection)` for a span name such as `SELECT users`: the statement's first
/// keyword upper-cased (for `WITH …` the keyword of the main statement after the CTEs) and,
/// for statements that name one target table, that table as written (quotes removed, schema
/// kept: `public.users`). The operation is empty when the text has no keyword.
///
/// Examples: `SELECT * FROM users WHERE …` → `("SELECT", Some("users"))`,
/// `INSERT INTO orders …` → `("INSERT", Some("orders"))`, `BEGIN` → `("BEGIN", None)`.
pub fn query_summary(sql: &str) -> (String, Option<String>) {
    let toks: Vec<(Tok, &str)> = significant(sql).take(4096).collect();
    let mut i = 0;
    while toks.get(i).is_some_and(|(t, _)| *t == Tok::OpenParen) {
        i += 1;
    }
    let Some((Tok::Word, first)) = toks.get(i) else {
        return (String::new(), None);
    };
    let mut op = first.to_ascii_uppercase();
    i += 1;
    if op == "WITH" {
        // Skip the CTE list: the main statement is the first of these keywords at depth 0.
        let mut depth = 0u32;
        let mut found = None;
        for (j, (t, text)) in toks.iter().enumerate().skip(i) {
            match t {
                Tok::OpenParen => depth += 1,
                Tok::CloseParen => depth = depth.saturating_sub(1),
                Tok::Word if depth == 0 => {
                    let up = text.to_ascii_uppercase();
                    if matches!(
                        up.as_str(),
                        "SELECT" | "INSERT" | "UPDATE" | "DELETE" | "MERGE" | "VALUES" | "TABLE"
                    ) {
                        found = Some((j, up));
                        break;
                    }
                }
                Tok::Semicolon => break,
                _ => {}
            }
        }
        match found {
            Some((j, up)) => {
                op = up;
                i = j + 1;
            }
            None => return (op, None),
        }
    }
    let rest = toks.get(i..).unwrap_or_default();
    let collection = match op.as_str() {
        "SELECT" => after_top_level_from(rest),
        "INSERT" | "MERGE" => {
            expect_word(rest, "INTO").and_then(|r| table_name(skip_word(r, "ONLY")))
        }
        "UPDATE" => table_name(skip_word(rest, "ONLY")),
        "DELETE" => expect_word(rest, "FROM").and_then(|r| table_name(skip_word(r, "ONLY"))),
        "COPY" | "TABLE" => table_name(skip_word(rest, "ONLY")),
        "TRUNCATE" => table_name(skip_word(skip_word(rest, "TABLE"), "ONLY")),
        "CREATE" | "DROP" | "ALTER" => ddl_table(rest),
        _ => None,
    };
    (op, collection)
}

fn is_word(tok: Option<&(Tok, &str)>, w: &str) -> bool {
    matches!(tok, Some((Tok::Word, t)) if t.eq_ignore_ascii_case(w))
}

fn skip_word<'t, 's>(toks: &'t [(Tok, &'s str)], w: &str) -> &'t [(Tok, &'s str)] {
    if is_word(toks.first(), w) {
        toks.get(1..).unwrap_or_default()
    } else {
        toks
    }
}

fn expect_word<'t, 's>(toks: &'t [(Tok, &'s str)], w: &str) -> Option<&'t [(Tok, &'s str)]> {
    is_word(toks.first(), w).then(|| toks.get(1..).unwrap_or_default())
}

/// `CREATE [TEMP|TEMPORARY|UNLOGGED] TABLE [IF NOT EXISTS] x`, `DROP TABLE [IF EXISTS] x`,
/// `ALTER TABLE [IF EXISTS] [ONLY] x`.
fn ddl_table(toks: &[(Tok, &str)]) -> Option<String> {
    let mut t = toks;
    for w in ["GLOBAL", "LOCAL", "TEMP", "TEMPORARY", "UNLOGGED"] {
        t = skip_word(t, w);
    }
    let t = expect_word(t, "TABLE")?;
    let t = skip_word(t, "IF");
    let t = skip_word(t, "NOT");
    let t = skip_word(t, "EXISTS");
    table_name(skip_word(t, "ONLY"))
}

/// The first table after the `FROM` at depth 0 of a SELECT (None for a subquery or a
/// function in FROM, or no FROM).
fn after_top_level_from(toks: &[(Tok, &str)]) -> Option<String> {
    let mut depth = 0u32;
    for (j, (t, text)) in toks.iter().enumerate() {
        match t {
            Tok::OpenParen => depth += 1,
            Tok::CloseParen => depth = depth.saturating_sub(1),
            Tok::Semicolon => return None,
            Tok::Word if depth == 0 && text.eq_ignore_ascii_case("FROM") => {
                let rest = skip_word(toks.get(j + 1..).unwrap_or_default(), "ONLY");
                let (name, next) = qualified_name(rest)?;
                // `FROM generate_series(…)`: a function, not a table.
                return (!matches!(rest.get(next), Some((Tok::OpenParen, _)))).then_some(name);
            }
            _ => {}
        }
    }
    None
}

/// A possibly schema-qualified table name at the start of `toks`.
fn table_name(toks: &[(Tok, &str)]) -> Option<String> {
    qualified_name(toks).map(|(name, _)| name)
}

/// A possibly schema-qualified name at the start of `toks`, and the index after it.
fn qualified_name(toks: &[(Tok, &str)]) -> Option<(String, usize)> {
    let mut name = String::new();
    let mut i = 0;
    loop {
        let part = match toks.get(i) {
            Some((Tok::Word, w)) => Cow::Borrowed(*w),
            Some((Tok::QuotedIdent, q)) => unquote_ident(q),
            _ => return None,
        };
        name.push_str(&part);
        i += 1;
        if matches!(toks.get(i), Some((Tok::Dot, _))) {
            name.push('.');
            i += 1;
        } else {
            break;
        }
    }
    Some((truncate_str(&name, MAX_COLLECTION_LEN).to_owned(), i))
}

fn unquote_ident(q: &str) -> Cow<'_, str> {
    let inner = q
        .strip_prefix("U&")
        .or_else(|| q.strip_prefix("u&"))
        .unwrap_or(q);
    let inner = inner.strip_prefix('"').unwrap_or(inner);
    let inner = inner.strip_suffix('"').unwrap_or(inner);
    if inner.contains("\"\"") {
        Cow::Owned(inner.replace("\"\"", "\""))
    } else {
        Cow::Borrowed(inner)
    }
}

/// The operation recorded on a statement: the summary's operation (which resolves `WITH`),
/// `None` for text without a keyword.
pub(super) fn statement_operation(sql: &str) -> Option<String> {
    let kw = first_keyword(sql)?;
    if kw == "WITH" {
        let (op, _) = query_summary(sql);
        return (!op.is_empty()).then_some(op);
    }
    Some(kw)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn split_statements(sql: &str) -> Vec<&str> {
        super::split_statements(sql)
            .into_iter()
            .map(|r| &sql[r])
            .collect()
    }

    #[test]
    fn splits_top_level_semicolons_only() {
        assert_eq!(
            split_statements("SELECT 1; SELECT 2"),
            ["SELECT 1", "SELECT 2"]
        );
        assert_eq!(
            split_statements("SELECT 'a;b' AS s ; SELECT * FROM nope ; SELECT 4;"),
            ["SELECT 'a;b' AS s", "SELECT * FROM nope", "SELECT 4"]
        );
        assert_eq!(
            split_statements("DO $$ BEGIN RAISE NOTICE 'x;'; END $$; SELECT 1"),
            ["DO $$ BEGIN RAISE NOTICE 'x;'; END $$", "SELECT 1"]
        );
        assert_eq!(
            split_statements("SELECT $f$a;b$f$; -- c;\nSELECT /* ; */ 2;;"),
            ["SELECT $f$a;b$f$", "-- c;\nSELECT /* ; */ 2"]
        );
        assert_eq!(
            split_statements("SELECT \"a;\"\"b\" FROM t"),
            ["SELECT \"a;\"\"b\" FROM t"]
        );
        assert_eq!(
            split_statements("SELECT E'it\\'s;'; SELECT 2"),
            ["SELECT E'it\\'s;'", "SELECT 2"]
        );
        assert!(split_statements(" ; ;; -- only a comment").is_empty());
        assert!(split_statements("").is_empty());
        assert_eq!(
            split_statements(
                "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT CASE WHEN true THEN 1 END; SELECT 2; END; SELECT f()"
            ),
            [
                "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT CASE WHEN true THEN 1 END; SELECT 2; END",
                "SELECT f()"
            ]
        );
        // Cut by the capture inside a string: the rest is one unterminated piece.
        assert_eq!(
            split_statements("SELECT 1; SELECT 'abc;"),
            ["SELECT 1", "SELECT 'abc;"]
        );
    }

    #[test]
    fn sanitizes_literals_and_comments() {
        assert_eq!(
            sanitize_query(
                "SELECT * FROM users WHERE id = 42 AND name = 'bob' -- hi\n AND x > 1.5e3"
            ),
            "SELECT * FROM users WHERE id = ? AND name = ? AND x > ?"
        );
        assert_eq!(
            sanitize_query(
                "insert into t values (E'a\\'b', $q$x'y$q$, B'0101', X'1F', -7, true, NULL)"
            ),
            "insert into t values (?, ?, ?, ?, -?, true, NULL)"
        );
        assert_eq!(
            sanitize_query("SELECT $1::int + 1 /* c /* nested */ */"),
            "SELECT $1::int + ?"
        );
        assert_eq!(
            sanitize_query("SELECT t1.c2 FROM t1"),
            "SELECT t1.c2 FROM t1"
        );
        assert_eq!(sanitize_query("  \n\t "), "");
        assert_eq!(sanitize_query("SELECT 'unterminated"), "SELECT ?");
        assert_eq!(
            sanitize_query("SELECT \"Weird\"\"Col\" FROM x"),
            "SELECT \"Weird\"\"Col\" FROM x"
        );
        let long = format!("SELECT {}", "a, ".repeat(2000));
        let s = sanitize_query(&long);
        assert!(s.len() <= MAX_SANITIZED_LEN);
        let multibyte = format!("SELECT {}", "é".repeat(3000));
        assert!(sanitize_query(&multibyte).len() <= MAX_SANITIZED_LEN);
    }

    #[test]
    fn summaries() {
        let s = |q: &str| query_summary(q);
        assert_eq!(
            s("SELECT * FROM users WHERE id = 1"),
            ("SELECT".into(), Some("users".into()))
        );
        assert_eq!(
            s("select a from public.\"Users\" u"),
            ("SELECT".into(), Some("public.Users".into()))
        );
        assert_eq!(
            s("INSERT INTO orders (a) VALUES (1)"),
            ("INSERT".into(), Some("orders".into()))
        );
        assert_eq!(s("UPDATE x SET a = 1"), ("UPDATE".into(), Some("x".into())));
        assert_eq!(
            s("UPDATE ONLY x SET a = 1"),
            ("UPDATE".into(), Some("x".into()))
        );
        assert_eq!(
            s("DELETE FROM x WHERE a = 1"),
            ("DELETE".into(), Some("x".into()))
        );
        assert_eq!(s("BEGIN"), ("BEGIN".into(), None));
        assert_eq!(s("commit;"), ("COMMIT".into(), None));
        assert_eq!(s("SELECT 1"), ("SELECT".into(), None));
        assert_eq!(
            s("SELECT (SELECT max(a) FROM t2), extract(year from now()) FROM t1"),
            ("SELECT".into(), Some("t1".into()))
        );
        assert_eq!(
            s("SELECT g FROM generate_series(1, 7) AS g"),
            ("SELECT".into(), None)
        );
        assert_eq!(s("SELECT * FROM (SELECT 1) s"), ("SELECT".into(), None));
        assert_eq!(
            s(
                "WITH a AS (SELECT * FROM b), c AS MATERIALIZED (DELETE FROM d RETURNING *) SELECT * FROM a JOIN c USING (id)"
            ),
            ("SELECT".into(), Some("a".into()))
        );
        assert_eq!(
            s("WITH RECURSIVE r(n) AS (VALUES (1)) INSERT INTO t SELECT n FROM r"),
            ("INSERT".into(), Some("t".into()))
        );
        assert_eq!(s("COPY t FROM STDIN"), ("COPY".into(), Some("t".into())));
        assert_eq!(s("COPY (SELECT 1) TO STDOUT"), ("COPY".into(), None));
        assert_eq!(
            s("TRUNCATE TABLE pgbench_history"),
            ("TRUNCATE".into(), Some("pgbench_history".into()))
        );
        assert_eq!(
            s("CREATE TEMP TABLE IF NOT EXISTS t (id int)"),
            ("CREATE".into(), Some("t".into()))
        );
        assert_eq!(
            s("DROP TABLE IF EXISTS s.t"),
            ("DROP".into(), Some("s.t".into()))
        );
        assert_eq!(s("CREATE INDEX i ON t (a)"), ("CREATE".into(), None));
        assert_eq!(s("/* app */ (SELECT 1)"), ("SELECT".into(), None));
        assert_eq!(
            s("MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE"),
            ("MERGE".into(), Some("t".into()))
        );
        assert_eq!(s(""), (String::new(), None));
        assert_eq!(s("42"), (String::new(), None));
        assert_eq!(
            statement_operation("WITH x AS (SELECT 1) UPDATE t SET a = 1"),
            Some("UPDATE".into())
        );
        assert_eq!(
            statement_operation("  -- c\n vacuum t"),
            Some("VACUUM".into())
        );
        assert_eq!(statement_operation(";"), None);
    }

    proptest! {
        #[test]
        fn helpers_never_panic_and_stay_bounded(s in "\\PC{0,300}") {
            let out = sanitize_query(&s);
            prop_assert!(out.len() <= MAX_SANITIZED_LEN);
            let _ = query_summary(&s);
            let _ = statement_operation(&s);
            for piece in split_statements(&s) {
                prop_assert!(!piece.is_empty());
            }
        }

        #[test]
        fn helpers_on_sql_like_bytes(s in "[a-zA-Z0-9 ;'\"$()\\.,*/\\-\\\\E\n]{0,200}") {
            let _ = sanitize_query(&s);
            let _ = query_summary(&s);
            let pieces = split_statements(&s);
            // Splitting never invents text: every piece is a substring of the input.
            for p in pieces {
                prop_assert!(s.contains(p));
            }
        }
    }
}
