//! Extra request headers of the OTLP exporter (`--otlp-header`, `OTEL_EXPORTER_OTLP_HEADERS`):
//! usually an API key, so a value is never shown — not in logs, not in errors, not in `Debug`.
//!
//! Each entry is `KEY=VALUE`; the value is percent-decoded (the specification's format for the
//! variable, a W3C baggage list without properties) from every source alike, so one value
//! works as a flag, a variable or a config key. Whitespace around key and value is dropped.

use std::fmt;

use http::{HeaderName, HeaderValue};

/// One `KEY=VALUE` entry as given, unchecked: the command line keeps it opaque (its `Debug`
/// shows no value) and [`Headers::parse`] checks it with errors that quote no value.
#[derive(Clone, PartialEq, Eq)]
pub struct HeaderArg(String);

impl HeaderArg {
    /// clap's value parser: never fails, since clap would quote the value in its error.
    pub fn parse(text: &str) -> Result<Self, std::convert::Infallible> {
        Ok(Self(text.to_owned()))
    }
}

impl fmt::Debug for HeaderArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.split_once('=') {
            Some((key, _)) if HeaderName::from_bytes(key.trim().as_bytes()).is_ok() => {
                write!(f, "{}=<redacted>", key.trim())
            }
            _ => f.write_str("<redacted>"),
        }
    }
}

/// Checked headers, in the order given (a later entry with the same name replaces an earlier).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Headers(Vec<(HeaderName, HeaderValue)>);

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error(
        "OTLP header entry {position} has no `=`: expected KEY=VALUE (entries are not shown: they \
         may hold secrets)"
    )]
    NoEquals { position: usize },
    #[error(
        "OTLP header entry {position}: its name is not a valid HTTP header name (letters, digits \
         and !#$%&'*+-.^_`|~ only; entries are not shown: they may hold secrets)"
    )]
    BadName { position: usize },
    #[error("OTLP header `{name}`: {problem}")]
    BadValue { name: String, problem: &'static str },
    #[error("OTLP header `{name}` is set by the exporter itself and cannot be given")]
    Reserved { name: String },
}

/// Headers the transports set themselves, or that HTTP/2 and gRPC forbid from users.
fn reserved(name: &HeaderName) -> bool {
    const RESERVED: [&str; 10] = [
        "host",
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
        "te",
        "content-type",
        "content-length",
        "content-encoding",
    ];
    RESERVED.contains(&name.as_str()) || name.as_str().starts_with("grpc-")
}

impl Headers {
    pub fn parse(entries: &[HeaderArg]) -> Result<Self, HeaderError> {
        let mut headers: Vec<(HeaderName, HeaderValue)> = Vec::new();
        for (i, HeaderArg(entry)) in entries.iter().enumerate() {
            let position = i + 1;
            let (key, value) = entry
                .split_once('=')
                .ok_or(HeaderError::NoEquals { position })?;
            let name = HeaderName::from_bytes(key.trim().as_bytes())
                .map_err(|_| HeaderError::BadName { position })?;
            if reserved(&name) {
                return Err(HeaderError::Reserved {
                    name: name.to_string(),
                });
            }
            let bad = |problem| HeaderError::BadValue {
                name: name.to_string(),
                problem,
            };
            let decoded = percent_encoding::percent_decode_str(value.trim())
                .decode_utf8()
                .map_err(|_| bad("its value is not UTF-8 once percent-decoded"))?;
            // Printable ASCII and tab: what both HTTP/1.1 and gRPC metadata carry.
            let printable = decoded
                .bytes()
                .all(|b| b == b'\t' || (b' '..=b'~').contains(&b));
            let mut value = HeaderValue::from_str(&decoded)
                .ok()
                .filter(|_| printable)
                .ok_or_else(|| {
                    bad(
                        "its value (percent-decoded) holds a control character or non-ASCII text, \
                         which HTTP headers and gRPC metadata cannot carry",
                    )
                })?;
            // HPACK then never indexes it, and `Debug` shows no value.
            value.set_sensitive(true);
            headers.retain(|(n, _)| *n != name);
            headers.push((name, value));
        }
        Ok(Self(headers))
    }

    pub fn iter(&self) -> impl Iterator<Item = (&HeaderName, &HeaderValue)> {
        self.0.iter().map(|(n, v)| (n, v))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The names, for logs: `x-api-key, x-tenant`.
    pub fn names(&self) -> String {
        let names: Vec<&str> = self.0.iter().map(|(n, _)| n.as_str()).collect();
        names.join(", ")
    }
}

impl fmt::Debug for Headers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.iter().map(|(n, _)| (n.as_str(), "<redacted>")))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(entries: &[&str]) -> Result<Headers, HeaderError> {
        let args: Vec<HeaderArg> = entries
            .iter()
            .map(|e| HeaderArg::parse(e).unwrap_or_else(|never| match never {}))
            .collect();
        Headers::parse(&args)
    }

    fn pairs(headers: &Headers) -> Vec<(String, String)> {
        headers
            .iter()
            .map(|(n, v)| {
                (
                    n.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect()
    }

    #[test]
    fn values_are_percent_decoded_and_trimmed() {
        let h = parse(&[
            "api-key = s3cr3t%2Cwith%20comma ",
            "Authorization=Basic dXNlcjpwYXNz==",
            "x-empty=",
            "x-plus=a+b%25c",
        ])
        .expect("valid");
        assert_eq!(
            pairs(&h),
            [
                ("api-key".into(), "s3cr3t,with comma".into()),
                ("authorization".into(), "Basic dXNlcjpwYXNz==".into()),
                ("x-empty".into(), String::new()),
                ("x-plus".into(), "a+b%c".into()),
            ]
        );
        assert_eq!(h.names(), "api-key, authorization, x-empty, x-plus");
    }

    #[test]
    fn a_later_entry_replaces_an_earlier_one() {
        let h = parse(&["x-a=1", "x-b=2", "X-A=3"]).expect("valid");
        assert_eq!(
            pairs(&h),
            [("x-b".into(), "2".into()), ("x-a".into(), "3".into())]
        );
    }

    #[test]
    fn bad_entries_are_refused_without_showing_a_value() {
        let secret = "hunter2";
        for (entries, want) in [
            (
                vec!["Bearer hunter2"],
                HeaderError::NoEquals { position: 1 },
            ),
            (
                vec!["ok=1", "Authorization: Bearer hunter2=x"],
                HeaderError::BadName { position: 2 },
            ),
            (
                vec!["x-key=hunter2%0d%0aInjected: 1"],
                HeaderError::BadValue {
                    name: "x-key".into(),
                    problem: "",
                },
            ),
            (
                vec!["x-key=hunter2%ff"],
                HeaderError::BadValue {
                    name: "x-key".into(),
                    problem: "",
                },
            ),
            (
                vec!["x-key=hunter2é"],
                HeaderError::BadValue {
                    name: "x-key".into(),
                    problem: "",
                },
            ),
            (
                vec!["content-type=hunter2"],
                HeaderError::Reserved {
                    name: "content-type".into(),
                },
            ),
            (
                vec!["grpc-timeout=hunter2"],
                HeaderError::Reserved {
                    name: "grpc-timeout".into(),
                },
            ),
        ] {
            let err = parse(&entries).expect_err("refused");
            match (&err, &want) {
                (
                    HeaderError::BadValue { name, .. },
                    HeaderError::BadValue {
                        name: want_name, ..
                    },
                ) => assert_eq!(name, want_name),
                _ => assert_eq!(err, want, "{entries:?}"),
            }
            assert!(!err.to_string().contains(secret), "{err}");
        }
    }

    #[test]
    fn debug_never_shows_values() {
        let h = parse(&["x-api-key=hunter2"]).expect("valid");
        let shown = format!("{h:?} {:?}", h.iter().collect::<Vec<_>>());
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("x-api-key"), "{shown}");
        let arg = HeaderArg::parse("x-api-key=hunter2").unwrap_or_else(|never| match never {});
        assert_eq!(format!("{arg:?}"), "x-api-key=<redacted>");
        let arg = HeaderArg::parse("Bearer hunter2").unwrap_or_else(|never| match never {});
        assert_eq!(format!("{arg:?}"), "<redacted>");
    }
}
