//! Real HTTP clients. Each measures its own wall-clock window and duration per request, so
//! tests can check a span's timing against what the client saw.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::process::{TestDir, run_gated, run_to_completion, tail};
use crate::{curl_bin, fixture, node_bin, python_bin};

const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

/// A client's own measurement of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// Wall clock just before the request was sent (a lower bound of any span start).
    pub start_unix_nanos: u64,
    /// Wall clock just after the response was read (an upper bound of any span end).
    pub end_unix_nanos: u64,
    /// The client's own duration of the exchange (curl's `time_total`; a monotonic interval
    /// around send → response read for the script clients).
    pub duration_nanos: u64,
}

impl Timing {
    /// A window from a client's JSON summary: `start_ns`, `end_ns` and `dur_ns` (else end −
    /// start), each a number or a string of digits (node prints integers beyond 2^53 as strings).
    pub(crate) fn from_json(o: &serde_json::Value) -> Option<Timing> {
        let nanos = |key: &str| {
            let v = o.get(key)?;
            v.as_u64().or_else(|| v.as_str()?.parse().ok())
        };
        let (start, end) = (nanos("start_ns")?, nanos("end_ns")?);
        let duration = match o.get("dur_ns") {
            Some(_) => nanos("dur_ns")?,
            None => end.checked_sub(start)?,
        };
        Some(Timing {
            start_unix_nanos: start,
            end_unix_nanos: end,
            duration_nanos: duration,
        })
    }
}

pub fn unix_nanos_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos() as u64
}

/// One request made by a script client (`RESULT ...` line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestResult {
    pub index: usize,
    pub method: String,
    pub path: String,
    pub status: u16,
    pub request_body: u64,
    pub response_body: u64,
    pub timing: Timing,
    /// The client's local port (the server span's `client.port`).
    pub local_port: u16,
}

/// The outcome of running a script client: its pid and one result per request.
#[derive(Debug, Clone)]
pub struct ClientRun {
    pub pid: u32,
    pub results: Vec<RequestResult>,
    pub stderr: String,
}

pub(crate) fn parse_result_line(line: &str) -> Option<RequestResult> {
    let rest = line.strip_prefix("RESULT ")?;
    let fields: BTreeMap<&str, &str> = rest
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .collect();
    let num = |k: &str| fields.get(k).and_then(|v| v.parse::<u64>().ok());
    Some(RequestResult {
        index: num("i")? as usize,
        method: fields.get("method")?.to_string(),
        path: fields.get("path")?.to_string(),
        status: num("status")? as u16,
        request_body: num("req_body")?,
        response_body: num("resp_body")?,
        timing: Timing {
            start_unix_nanos: num("start_ns")?,
            end_unix_nanos: num("end_ns")?,
            duration_nanos: num("dur_ns")?,
        },
        local_port: num("local_port")? as u16,
    })
}

fn run_script_client(name: &str, cmd: Command, expected: usize) -> ClientRun {
    let (status, stdout, stderr, pid) = run_to_completion(name, cmd, CLIENT_TIMEOUT);
    let results: Vec<RequestResult> = stdout.lines().filter_map(parse_result_line).collect();
    if !status.success() || results.len() != expected {
        panic!(
            "{name} (pid {pid}) failed: exit {status}, {} of {expected} results\nstdout:\n{}\nstderr:\n{}",
            results.len(),
            tail(&stdout, 40),
            tail(&stderr, 40)
        );
    }
    ClientRun {
        pid,
        results,
        stderr,
    }
}

/// `tests/fixtures/py_client.py`: http.client, every request on one keep-alive connection.
/// `specs`: `METHOD:PATH[:BODY_SIZE]`, e.g. `GET:/hello`, `POST:/echo:307200`.
pub fn py_client(port: u16, specs: &[&str]) -> ClientRun {
    let mut cmd = Command::new(python_bin());
    cmd.arg(fixture("py_client.py"))
        .arg("127.0.0.1")
        .arg(port.to_string())
        .args(specs);
    run_script_client("py_client", cmd, specs.len())
}

/// `tests/fixtures/node_client.js`: node http with a keepAlive Agent (one socket).
pub fn node_client(port: u16, specs: &[&str]) -> ClientRun {
    let mut cmd = Command::new(node_bin());
    cmd.arg(fixture("node_client.js"))
        .arg("127.0.0.1")
        .arg(port.to_string())
        .args(specs);
    run_script_client("node_client", cmd, specs.len())
}

/// `tests/fixtures/pipeline_client.py`: all GET requests in ONE send on one socket, then the
/// responses are read in order.
pub fn pipeline_client(port: u16, paths: &[&str]) -> ClientRun {
    let mut cmd = Command::new(python_bin());
    cmd.arg(fixture("pipeline_client.py"))
        .arg("127.0.0.1")
        .arg(port.to_string())
        .args(paths);
    run_script_client("pipeline_client", cmd, paths.len())
}

/// How `raw_client` treats each connection after sending its request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawMode {
    /// Read the answer to the end of the connection.
    Read,
    /// `shutdown(SHUT_WR)` right after the request; read the answer 0.3 s later, after the
    /// server's answer and FIN arrived.
    HalfClose,
    /// Close right after the request, reading nothing.
    Close,
}

/// `tests/fixtures/raw_client.py`: each request's exact bytes on a connection of its own (ask
/// the server to close it: the answer is read to the end of the connection).
pub fn raw_client(port: u16, mode: RawMode, requests: &[&[u8]]) -> ClientRun {
    let hex = |r: &[u8]| r.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let mode = match mode {
        RawMode::Read => "read",
        RawMode::HalfClose => "half-close",
        RawMode::Close => "close",
    };
    let mut cmd = Command::new(python_bin());
    cmd.arg(fixture("raw_client.py"))
        .arg("127.0.0.1")
        .arg(port.to_string())
        .arg(mode)
        .args(requests.iter().map(|r| hex(r)));
    run_script_client("raw_client", cmd, requests.len())
}

/// A curl invocation; several URLs in one invocation share a keep-alive connection.
#[derive(Debug, Clone)]
pub struct Curl {
    urls: Vec<String>,
    method: Option<String>,
    headers: Vec<String>,
    body_size: Option<usize>,
    user_agent: String,
    http10: bool,
    rate: Option<String>,
    user: Option<String>,
    extra: Vec<String>,
}

/// One transfer as curl reported it (`-w`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CurlTransfer {
    pub status: u16,
    /// Window: the curl process's lifetime; duration: curl's `time_total` for this transfer.
    pub timing: Timing,
    pub local_port: u16,
    pub size_download: u64,
    pub size_upload: u64,
    /// New connections curl opened for this transfer (0 when it reused one).
    pub num_connects: u32,
}

#[derive(Debug, Clone)]
pub struct CurlResult {
    pub pid: u32,
    pub transfers: Vec<CurlTransfer>,
}

impl CurlResult {
    /// The only transfer.
    pub fn one(&self) -> &CurlTransfer {
        assert_eq!(self.transfers.len(), 1, "expected one curl transfer");
        &self.transfers[0]
    }
}

pub const CURL_USER_AGENT: &str = "e2e-curl/1";

impl Curl {
    pub fn get(url: impl Into<String>) -> Curl {
        Curl {
            urls: vec![url.into()],
            method: None,
            headers: Vec::new(),
            body_size: None,
            user_agent: CURL_USER_AGENT.to_string(),
            http10: false,
            rate: None,
            user: None,
            extra: Vec::new(),
        }
    }

    /// Spaces the transfers out (`--rate`, e.g. `"20/s"`): requests one after the other, as
    /// from separate callers, rather than each one the moment the previous answer ended.
    pub fn rate(mut self, rate: &str) -> Curl {
        self.rate = Some(rate.to_string());
        self
    }

    /// POST a body of `size` bytes.
    pub fn post(url: impl Into<String>, size: usize) -> Curl {
        let mut curl = Curl::get(url);
        curl.method = Some("POST".to_string());
        curl.body_size = Some(size);
        curl
    }

    /// Another URL fetched after the previous ones, on the same connection.
    pub fn then(mut self, url: impl Into<String>) -> Curl {
        self.urls.push(url.into());
        self
    }

    /// A raw header line, e.g. `traceparent: 00-...`.
    pub fn header(mut self, header: &str) -> Curl {
        self.headers.push(header.to_string());
        self
    }

    /// Speak HTTP/1.0 (`--http1.0`).
    pub fn http10(mut self) -> Curl {
        self.http10 = true;
        self
    }

    /// Basic authentication, `-u user:password`.
    pub fn user(mut self, credentials: &str) -> Curl {
        self.user = Some(credentials.to_string());
        self
    }

    pub fn user_agent(mut self, ua: &str) -> Curl {
        self.user_agent = ua.to_string();
        self
    }

    /// Any other option, e.g. `--cacert <file>` or `--tlsv1.3` (before the URLs).
    pub fn arg(mut self, arg: impl Into<String>) -> Curl {
        self.extra.push(arg.into());
        self
    }

    /// Runs curl; panics if it fails or reports fewer transfers than URLs.
    pub fn run(self) -> CurlResult {
        let dir = TestDir::new("curl");
        let cmd = self.command(&dir);
        let window_start = unix_nanos_now();
        let (status, stdout, stderr, pid) = run_to_completion("curl", cmd, CLIENT_TIMEOUT);
        self.result(window_start, status, &stdout, &stderr, pid)
    }

    /// Runs curl held before its first transfer (`-K -`: it reads a configuration from
    /// stdin first, after its libraries are loaded) until `open(pid)` says go, e.g. until
    /// the agent attached to its TLS library. The timing window starts at the gate.
    pub fn run_gated(self, mut open: impl FnMut(u32) -> bool) -> CurlResult {
        let dir = TestDir::new("curl");
        let mut cmd = Command::new(curl_bin());
        cmd.args(["-K", "-"]);
        let rest = self.command(&dir);
        cmd.args(rest.get_args());
        let mut window_start = 0;
        let (status, stdout, stderr, pid) = run_gated(
            "curl",
            cmd,
            |pid| {
                window_start = unix_nanos_now();
                open(pid)
            },
            b"",
            CLIENT_TIMEOUT,
        );
        self.result(window_start, status, &stdout, &stderr, pid)
    }

    fn result(
        &self,
        window_start: u64,
        status: std::process::ExitStatus,
        stdout: &str,
        stderr: &str,
        pid: u32,
    ) -> CurlResult {
        let window_end = unix_nanos_now();
        let transfers: Vec<CurlTransfer> = stdout
            .lines()
            .filter_map(|l| parse_curl_line(l, window_start, window_end))
            .collect();
        if !status.success() || transfers.len() != self.urls.len() {
            panic!(
                "curl {:?} failed: exit {status}, {} of {} transfers\nstdout:\n{}\nstderr:\n{}",
                self.urls,
                transfers.len(),
                self.urls.len(),
                tail(stdout, 20),
                tail(stderr, 20)
            );
        }
        CurlResult { pid, transfers }
    }

    /// The command line (body file in `dir`).
    fn command(&self, dir: &TestDir) -> Command {
        let mut cmd = Command::new(curl_bin());
        cmd.args(["-sS", "--max-time", "30", "-A", &self.user_agent]);
        cmd.args([
            "-w",
            "CURL status=%{http_code} time_total=%{time_total} local_port=%{local_port} \
             size_download=%{size_download} size_upload=%{size_upload} num_connects=%{num_connects}\\n",
        ]);
        if self.http10 {
            cmd.arg("--http1.0");
        }
        if let Some(rate) = &self.rate {
            cmd.args(["--rate", rate]);
        }
        if let Some(user) = &self.user {
            cmd.args(["-u", user]);
        }
        for h in &self.headers {
            cmd.args(["-H", h]);
        }
        if let Some(method) = &self.method {
            cmd.args(["-X", method]);
        }
        if let Some(size) = self.body_size {
            let body_path = dir.join("body.bin");
            let body: Vec<u8> = (0..size).map(|i| (i % 253) as u8).collect();
            std::fs::write(&body_path, body).expect("write curl body");
            cmd.arg("--data-binary")
                .arg(format!("@{}", body_path.display()));
            cmd.args([
                "-H",
                "Content-Type: application/octet-stream",
                "-H",
                "Expect:",
            ]);
        }
        cmd.args(&self.extra);
        for url in &self.urls {
            cmd.args(["-o", "/dev/null", url]);
        }
        cmd
    }
}

fn parse_curl_line(line: &str, window_start: u64, window_end: u64) -> Option<CurlTransfer> {
    let rest = line.strip_prefix("CURL ")?;
    let fields: BTreeMap<&str, &str> = rest
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .collect();
    let seconds: f64 = fields.get("time_total")?.parse().ok()?;
    Some(CurlTransfer {
        status: fields.get("status")?.parse().ok()?,
        timing: Timing {
            start_unix_nanos: window_start,
            end_unix_nanos: window_end,
            duration_nanos: (seconds * 1e9).round() as u64,
        },
        local_port: fields.get("local_port")?.parse().ok()?,
        size_download: fields.get("size_download")?.parse().ok()?,
        size_upload: fields.get("size_upload")?.parse().ok()?,
        num_connects: fields.get("num_connects")?.parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_client_result_lines() {
        let r = parse_result_line(
            "RESULT i=2 method=POST path=/echo status=200 req_body=307200 resp_body=307200 \
             start_ns=1795394319008795487 end_ns=1795394319010253677 dur_ns=1455816 local_port=36980 pid=13021",
        )
        .expect("parses");
        assert_eq!(r.index, 2);
        assert_eq!(r.method, "POST");
        assert_eq!(r.path, "/echo");
        assert_eq!(r.status, 200);
        assert_eq!(r.request_body, 307200);
        assert_eq!(r.timing.duration_nanos, 1455816);
        assert_eq!(r.local_port, 36980);
        assert!(parse_result_line("garbage").is_none());
    }

    #[test]
    fn parses_curl_write_out() {
        let t = parse_curl_line(
            "CURL status=404 time_total=0.001234 local_port=5555 size_download=10 size_upload=0 num_connects=1",
            1,
            2,
        )
        .expect("parses");
        assert_eq!(t.status, 404);
        assert_eq!(t.timing.duration_nanos, 1_234_000);
        assert_eq!(t.local_port, 5555);
        assert_eq!(t.num_connects, 1);
    }
}
