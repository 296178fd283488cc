//! Talking to the agent's `--metrics-address`: a plain HTTP/1.1 GET, and a reader of the
//! Prometheus text format written from its specification (not from the agent's writer).

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// An HTTP answer: status, headers (lower-case names), body.
#[derive(Debug, Clone)]
pub struct HttpAnswer {
    pub status: u16,
    pub headers: BTreeMap<String, String>,
    pub body: String,
}

/// Sends `request` as is and reads the answer until the server closes. Panics with context
/// when nothing sensible comes back within 10 s.
pub fn http_raw(addr: SocketAddr, request: &[u8]) -> HttpAnswer {
    let mut stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    stream
        .write_all(request)
        .unwrap_or_else(|e| panic!("send to {addr}: {e}"));
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .unwrap_or_else(|e| panic!("read the answer of {addr}: {e}"));
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP head in {text:?}"));
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .strip_prefix("HTTP/1.1 ")
        .and_then(|s| s.get(..3))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    HttpAnswer {
        status,
        headers,
        body: body.to_owned(),
    }
}

/// `GET path`.
pub fn http_get(addr: SocketAddr, path: &str) -> HttpAnswer {
    http_raw(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: e2e\r\n\r\n").as_bytes(),
    )
}

/// One metric family of an exposition.
#[derive(Debug, Clone)]
pub struct Family {
    pub help: String,
    /// `counter`, `gauge`, …
    pub kind: String,
    /// Sample lines: (labels between the braces, value).
    pub samples: Vec<(String, f64)>,
}

impl Family {
    /// The value of the family's single unlabelled sample.
    pub fn value(&self) -> f64 {
        match self.samples.as_slice() {
            [(labels, v)] if labels.is_empty() => *v,
            other => panic!("expected one unlabelled sample, found {other:?}"),
        }
    }
}

/// Parses the text format (0.0.4): `# HELP name text`, `# TYPE name kind`, then
/// `name{labels} value` lines. Every sample must belong to a family announced by HELP and
/// TYPE; panics otherwise, naming the line.
pub fn parse_exposition(text: &str) -> BTreeMap<String, Family> {
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            assert!(
                !families.contains_key(name),
                "family {name} announced twice"
            );
            families.insert(
                name.to_owned(),
                Family {
                    help: help.to_owned(),
                    kind: String::new(),
                    samples: Vec::new(),
                },
            );
            current = Some(name.to_owned());
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert_eq!(
                current.as_deref(),
                Some(name),
                "TYPE {name} without its HELP"
            );
            families.get_mut(name).expect("announced").kind = kind.to_owned();
        } else if line.starts_with('#') || line.is_empty() {
            continue;
        } else {
            let (series, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("sample without a value: {line:?}"));
            let (name, labels) = match series.split_once('{') {
                Some((name, labels)) => (name, labels.trim_end_matches('}')),
                None => (series, ""),
            };
            assert_eq!(
                current.as_deref(),
                Some(name),
                "sample {line:?} outside its family"
            );
            let value = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v
                    .parse()
                    .unwrap_or_else(|_| panic!("bad value in {line:?}")),
            };
            families
                .get_mut(name)
                .expect("announced")
                .samples
                .push((labels.to_owned(), value));
        }
    }
    families
}
