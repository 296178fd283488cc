//! The services and clients of the multi-host trace tests: a chain of real, unmodified services
//! in network namespaces ([`crate::netns`]), an OpenTelemetry-SDK-instrumented caller and
//! callee, a checksum server and the clients of the injection tests.
//!
//! - [`NginxProxy`]: nginx reverse proxy (`fixtures/nginx_proxy.conf.template`).
//! - [`ChainPy`]: threaded Python service (`fixtures/chain_service.py`), `GET /chain/<id>` calls
//!   `GET <downstream>/work/<id>` on the serving thread.
//! - [`ChainNode`]: Node `http` service (`fixtures/chain_service.js`), `GET /work/<id>` runs
//!   `SELECT 1 AS req_<id>` on PostgreSQL with node-postgres.
//! - [`GoFront`]: Go `net/http` service (`fixtures/go_front/main.go`, built by the test with a
//!   given Go from Debian, optionally stripped), `GET /work/<id>` calls `GET <downstream>/same`.
//! - [`SdkServer`] / [`sdk_client`]: the OpenTelemetry Python SDK on each side
//!   (`fixtures/sdk_server.py`, `fixtures/sdk_client.py`).
//! - [`ChecksumServer`] (`fixtures/checksum_server.js`) with [`header_client`] (python, every
//!   header line known) and [`soak_client`] (node, raw sockets, every request shape).
//!
//! Each service prints one `SEEN ...` line per request with the `traceparent` headers it got
//! ([`Seen`]): what arrived on the wire, independent of the agent's own account.

use std::collections::BTreeMap;
use std::fs;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;
use std::thread;
use std::time::Duration;

use crate::netns::{Host, wait_tcp};
use crate::pg_clients::node_pg_dir;
use crate::postgres::PgServer;
use crate::process::{ChildGuard, TestDir, poll_until, read_text, run_to_completion, tail};
use crate::servers::{ScriptServer, children_of};
use crate::{fixture, nginx_bin, node_bin, python_bin};
use serde_json::Value;

const START_TIMEOUT: Duration = Duration::from_secs(15);

/// One request as a service saw it (`SEEN path=.. traceparent=a|b tracestate=.. status=..`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub path: String,
    /// Every `traceparent` header of the request, in order (empty: none).
    pub traceparents: Vec<String>,
    pub tracestates: Vec<String>,
    pub status: u16,
}

/// The `SEEN` lines of a service's stdout.
pub fn parse_seen(stdout: &str) -> Vec<Seen> {
    stdout
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("SEEN ")?;
            let fields: BTreeMap<&str, &str> = rest
                .split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .collect();
            let list = |key: &str| -> Vec<String> {
                match fields.get(key) {
                    None | Some(&"-") => Vec::new(),
                    Some(v) => v.split('|').map(str::to_string).collect(),
                }
            };
            Some(Seen {
                path: fields.get("path")?.to_string(),
                traceparents: list("traceparent"),
                tracestates: list("tracestate"),
                status: fields.get("status")?.parse().ok()?,
            })
        })
        .collect()
}

/// A W3C traceparent split into its fields: (version, trace id, parent id, flags).
pub fn parse_traceparent(value: &str) -> Option<(&str, &str, &str, &str)> {
    let mut parts = value.split('-');
    let (v, t, p, f) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    (parts.next().is_none() && hex(v, 2) && hex(t, 32) && hex(p, 16) && hex(f, 2))
        .then_some((v, t, p, f))
}

/// `tests/fixtures/chain_service.py` in `host`, calling `downstream` (`http://ip:port`).
pub struct ChainPy {
    server: ScriptServer,
    ip: Ipv4Addr,
}

impl ChainPy {
    pub fn start(host: &Host, downstream: &str) -> ChainPy {
        let mut cmd = host.command(python_bin());
        cmd.arg(fixture("chain_service.py"))
            .arg(host.ip().to_string())
            .arg("0")
            .env("E2E_DOWNSTREAM", downstream)
            .env_remove("OTEL_SERVICE_NAME");
        let server = ScriptServer::start_command(&format!("chain_py-{}", host.label()), cmd);
        wait_tcp("chain_service.py", host.ip(), server.port(), START_TIMEOUT);
        ChainPy {
            server,
            ip: host.ip(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.server.pid()
    }

    pub fn port(&self) -> u16 {
        self.server.port()
    }

    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// `http://<ip>:<port>`
    pub fn base_url(&self) -> String {
        format!("http://{}:{}", self.ip, self.port())
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url())
    }

    pub fn seen(&self) -> Vec<Seen> {
        parse_seen(&self.server.stdout())
    }

    pub fn stderr(&self) -> String {
        self.server.stderr()
    }
}

/// `tests/fixtures/chain_service.js` in `host`; with `db`, one query per request.
pub struct ChainNode {
    server: ScriptServer,
    ip: Ipv4Addr,
}

impl ChainNode {
    pub fn start(host: &Host, db: Option<&PgServer>) -> ChainNode {
        let modules = node_pg_dir().join("node_modules");
        let mut cmd = host.command(node_bin());
        cmd.arg(fixture("chain_service.js"))
            .arg(host.ip().to_string())
            .arg("0")
            .env("NODE_PATH", &modules)
            .env_remove("OTEL_SERVICE_NAME");
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PG") {
                cmd.env_remove(key);
            }
        }
        if let Some(db) = db {
            cmd.env("E2E_PG_HOST", db.address())
                .env("E2E_PG_PORT", db.port().to_string());
        }
        let server = ScriptServer::start_command(&format!("chain_node-{}", host.label()), cmd);
        wait_tcp("chain_service.js", host.ip(), server.port(), START_TIMEOUT);
        ChainNode {
            server,
            ip: host.ip(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.server.pid()
    }

    pub fn port(&self) -> u16 {
        self.server.port()
    }

    pub fn base_url(&self) -> String {
        format!("http://{}:{}", self.ip, self.port())
    }

    pub fn seen(&self) -> Vec<Seen> {
        parse_seen(&self.server.stdout())
    }

    pub fn stderr(&self) -> String {
        self.server.stderr()
    }
}

/// nginx (master + 1 worker) in `host`, listening on `<host ip>:8080`, proxying everything to
/// `upstream` (HTTP/1.1, upstream keep-alive).
pub struct NginxProxy {
    child: ChildGuard,
    ip: Ipv4Addr,
    port: u16,
    worker_pid: u32,
    dir: TestDir,
}

/// The port every [`NginxProxy`] listens on (each host has its own addresses).
pub const NGINX_PROXY_PORT: u16 = 8080;

impl NginxProxy {
    pub fn start(host: &Host, upstream_ip: Ipv4Addr, upstream_port: u16) -> NginxProxy {
        Self::start_with(host, upstream_ip, upstream_port, "")
    }

    /// With extra directives in the proxied location (e.g. a rewrite of what goes upstream).
    pub fn start_with(
        host: &Host,
        upstream_ip: Ipv4Addr,
        upstream_port: u16,
        location: &str,
    ) -> NginxProxy {
        let dir = TestDir::new("nginx-proxy");
        let prefix = dir.path();
        fs::create_dir_all(prefix.join("tmp")).expect("create nginx tmp dir");
        let template = fs::read_to_string(fixture("nginx_proxy.conf.template"))
            .expect("read nginx_proxy.conf.template");
        let port = NGINX_PROXY_PORT;
        let conf = prefix.join("nginx.conf");
        fs::write(
            &conf,
            template
                .replace("@PREFIX@", &prefix.display().to_string())
                .replace("@LISTEN@", &format!("{}:{port}", host.ip()))
                .replace("@UPSTREAM@", &format!("{upstream_ip}:{upstream_port}"))
                .replace("@LOCATION@", location),
        )
        .expect("write nginx.conf");
        let mut cmd = host.command(nginx_bin());
        cmd.arg("-p")
            .arg(prefix)
            .arg("-c")
            .arg(&conf)
            .arg("-e")
            .arg(prefix.join("error.log"));
        let mut child = ChildGuard::spawn(
            "nginx-proxy",
            cmd,
            &dir.join("nginx.out"),
            &dir.join("nginx.err"),
        );
        let master = child.pid();
        let addr = std::net::SocketAddr::from((host.ip(), port));
        let ready = poll_until(START_TIMEOUT, || {
            if child.try_wait().is_some() {
                return Some(None);
            }
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
            children_of(master).first().map(|w| Some(*w))
        });
        let Some(Some(worker_pid)) = ready else {
            panic!(
                "nginx proxy in {} did not start: exited={:?}\nstderr:\n{}\nerror.log:\n{}",
                host.ns(),
                child.try_wait(),
                tail(&read_text(&dir.join("nginx.err")), 20),
                tail(&read_text(&prefix.join("error.log")), 20)
            );
        };
        NginxProxy {
            child,
            ip: host.ip(),
            port,
            worker_pid,
            dir,
        }
    }

    pub fn master_pid(&self) -> u32 {
        self.child.pid()
    }

    pub fn worker_pid(&self) -> u32 {
        self.worker_pid
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}:{}{path}", self.ip, self.port)
    }

    pub fn error_log(&self) -> String {
        read_text(&self.dir.join("error.log"))
    }
}

impl Drop for NginxProxy {
    fn drop(&mut self) {
        self.child.kill();
        if thread::panicking() {
            eprintln!(
                "[e2e] nginx proxy (master {}, worker {}) error.log:\n{}",
                self.child.pid(),
                self.worker_pid,
                tail(&self.error_log(), 30)
            );
        }
    }
}

/// `tests/fixtures/go_front/main.go` in `host`, built with `/usr/lib/go-<version>` (with
/// `-ldflags="-s -w"` when `stripped`): `GET /work/<id>` calls `GET <downstream>/same` with
/// `X-Origin-Uri: /work/<id>` through one shared `http.Client` (keep-alive pool).
pub struct GoFront {
    server: ScriptServer,
    ip: Ipv4Addr,
    binary: PathBuf,
}

impl GoFront {
    pub fn start(host: &Host, version: &str, stripped: bool, downstream: &str) -> GoFront {
        let binary = build_go_front(version, stripped);
        let mut cmd = host.command(&binary);
        cmd.arg(host.ip().to_string()).arg("0").arg(downstream);
        let label = format!(
            "go_front-{version}{}",
            if stripped { "-stripped" } else { "" }
        );
        let server = ScriptServer::start_command(&label, cmd);
        wait_tcp("go_front", host.ip(), server.port(), START_TIMEOUT);
        GoFront {
            server,
            ip: host.ip(),
            binary,
        }
    }

    /// The same on this host's loopback, pinned to `cpu` when given (the benchmark's front).
    pub fn start_on_loopback(
        version: &str,
        stripped: bool,
        downstream: &str,
        cpu: Option<&str>,
    ) -> GoFront {
        let binary = build_go_front(version, stripped);
        let mut cmd = match cpu {
            Some(cpu) => {
                let mut cmd = Command::new("taskset");
                cmd.args(["-c", cpu]).arg(&binary);
                cmd
            }
            None => Command::new(&binary),
        };
        cmd.arg("127.0.0.1").arg("0").arg(downstream);
        let server = ScriptServer::start_command("go_front", cmd);
        let ip = Ipv4Addr::LOCALHOST;
        wait_tcp("go_front", ip, server.port(), START_TIMEOUT);
        GoFront { server, ip, binary }
    }

    pub fn pid(&self) -> u32 {
        self.server.pid()
    }

    pub fn port(&self) -> u16 {
        self.server.port()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}:{}{path}", self.ip, self.server.port())
    }

    pub fn binary(&self) -> &std::path::Path {
        &self.binary
    }

    pub fn stderr(&self) -> String {
        self.server.stderr()
    }
}

/// Builds the Go front with one Go version (the standard library only: no module proxy
/// here), into the target directory; Go's own build cache makes a rebuild quick.
fn build_go_front(version: &str, stripped: bool) -> PathBuf {
    let go = PathBuf::from(format!("/usr/lib/go-{version}/bin/go"));
    assert!(
        go.exists(),
        "{} is missing: cargo xtask setup installs golang-{version}-go",
        go.display()
    );
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/go-tests")
        .join(format!("go-front-{version}"));
    fs::create_dir_all(&dir).expect("go build directory");
    let out = dir.join(if stripped {
        "go_front-stripped"
    } else {
        "go_front"
    });
    let mut cmd = Command::new(&go);
    cmd.current_dir(fixture("go_front"))
        .env("GOCACHE", dir.join("cache"))
        .env("GO111MODULE", "off")
        .env("GOFLAGS", "")
        .args(["build", "-o"])
        .arg(&out);
    if stripped {
        cmd.arg("-ldflags=-s -w");
    }
    cmd.arg("main.go");
    let output = cmd.output().expect("run go build");
    assert!(
        output.status.success(),
        "go build with Go {version} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    out
}

/// `tests/fixtures/checksum_server.js`: answers every request with what arrived (body length
/// and sha256, the header lines as received, the traceparent values).
pub struct ChecksumServer {
    server: ScriptServer,
    ip: Ipv4Addr,
}

impl ChecksumServer {
    /// In `host`, or on 127.0.0.1 of the root namespace.
    pub fn start(host: Option<&Host>) -> ChecksumServer {
        let ip = host.map_or(Ipv4Addr::LOCALHOST, Host::ip);
        let mut cmd = match host {
            Some(h) => h.command(node_bin()),
            None => Command::new(node_bin()),
        };
        cmd.arg(fixture("checksum_server.js"))
            .arg(ip.to_string())
            .arg("0")
            .env_remove("OTEL_SERVICE_NAME");
        let server = ScriptServer::start_command("checksum_server", cmd);
        wait_tcp("checksum_server.js", ip, server.port(), START_TIMEOUT);
        ChecksumServer { server, ip }
    }

    pub fn pid(&self) -> u32 {
        self.server.pid()
    }

    pub fn port(&self) -> u16 {
        self.server.port()
    }

    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    pub fn stderr(&self) -> String {
        self.server.stderr()
    }
}

/// `tests/fixtures/sdk_server.py` in `host`: an OpenTelemetry-SDK-instrumented server
/// exporting to `otlp_endpoint` (reachable from that host).
pub struct SdkServer {
    server: ScriptServer,
    ip: Ipv4Addr,
}

/// One request as the SDK server handled it (`SDK_SERVER ...` line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SdkServerSpan {
    pub path: String,
    pub trace_id: String,
    pub span_id: String,
    /// `None` when the request carried no (valid) context.
    pub parent_id: Option<String>,
    pub traceparents: Vec<String>,
    /// The `X-Origin-Uri` header (a proxy's incoming request), if any.
    pub origin: Option<String>,
}

impl SdkServer {
    pub fn start(host: &Host, otlp_endpoint: &str) -> SdkServer {
        let mut cmd = host.command(python_bin());
        cmd.arg(fixture("sdk_server.py"))
            .arg(host.ip().to_string())
            .arg("0")
            .arg(otlp_endpoint);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("OTEL_") {
                cmd.env_remove(key);
            }
        }
        let server = ScriptServer::start_command("sdk_server", cmd);
        wait_tcp("sdk_server.py", host.ip(), server.port(), START_TIMEOUT);
        SdkServer {
            server,
            ip: host.ip(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.server.pid()
    }

    pub fn base_url(&self) -> String {
        format!("http://{}:{}", self.ip, self.server.port())
    }

    /// Its address and port, for a proxy's configuration.
    pub fn address(&self) -> (Ipv4Addr, u16) {
        (self.ip, self.server.port())
    }

    /// The requests handled so far.
    pub fn spans(&self) -> Vec<SdkServerSpan> {
        self.server
            .stdout()
            .lines()
            .filter_map(|line| {
                let fields = kv_fields(line.strip_prefix("SDK_SERVER ")?);
                let opt = |k: &str| {
                    fields
                        .get(k)
                        .filter(|v| v.as_str() != "-")
                        .map(|v| v.to_string())
                };
                Some(SdkServerSpan {
                    path: fields.get("path")?.clone(),
                    trace_id: fields.get("trace_id")?.clone(),
                    span_id: fields.get("span_id")?.clone(),
                    parent_id: opt("parent_id"),
                    traceparents: opt("traceparent")
                        .map(|v| v.split('|').map(str::to_string).collect())
                        .unwrap_or_default(),
                    origin: opt("origin"),
                })
            })
            .collect()
    }

    pub fn stderr(&self) -> String {
        self.server.stderr()
    }
}

fn kv_fields(text: &str) -> BTreeMap<String, String> {
    text.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// One request of [`sdk_client`] (`SDK_CLIENT ...` line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SdkClientRequest {
    pub index: usize,
    pub trace_id: String,
    pub span_id: String,
    /// The traceparent value the SDK put in the request.
    pub traceparent: String,
    pub status: u16,
    pub local_port: u16,
}

#[derive(Debug, Clone)]
pub struct SdkClientRun {
    pub pid: u32,
    pub requests: Vec<SdkClientRequest>,
}

/// Runs `tests/fixtures/sdk_client.py`: `n` GETs of `url` on one connection, each in an SDK
/// CLIENT span whose context is injected in the request; spans exported to `otlp_endpoint`.
/// In `host` (or the root namespace).
pub fn sdk_client(host: Option<&Host>, otlp_endpoint: &str, url: &str, n: usize) -> SdkClientRun {
    let mut cmd = match host {
        Some(h) => h.command(python_bin()),
        None => Command::new(python_bin()),
    };
    cmd.arg(fixture("sdk_client.py"))
        .arg(otlp_endpoint)
        .arg(url)
        .arg(n.to_string());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("OTEL_") {
            cmd.env_remove(key);
        }
    }
    let (status, stdout, stderr, pid) =
        run_to_completion("sdk_client", cmd, Duration::from_secs(60));
    let requests: Vec<SdkClientRequest> = stdout
        .lines()
        .filter_map(|line| {
            let f = kv_fields(line.strip_prefix("SDK_CLIENT ")?);
            Some(SdkClientRequest {
                index: f.get("i")?.parse().ok()?,
                trace_id: f.get("trace_id")?.clone(),
                span_id: f.get("span_id")?.clone(),
                traceparent: f.get("traceparent")?.clone(),
                status: f.get("status")?.parse().ok()?,
                local_port: f.get("local_port")?.parse().ok()?,
            })
        })
        .collect();
    assert!(
        status.success() && requests.len() == n,
        "sdk_client.py (pid {pid}) failed: exit {status}, {} of {n} requests\nstdout:\n{}\nstderr:\n{}",
        requests.len(),
        tail(&stdout, 20),
        tail(&stderr, 30)
    );
    SdkClientRun { pid, requests }
}

/// One exchange of [`header_client`]: what was sent and what the checksum server saw.
#[derive(Debug, Clone)]
pub struct HeaderExchange {
    pub index: usize,
    pub method: String,
    pub path: String,
    /// Header lines as sent, in order.
    pub sent: Vec<(String, String)>,
    pub len: u64,
    pub sha256: String,
    pub local_port: u16,
    pub status: u16,
    /// The server's account: header lines as received, in order.
    pub server_headers: Vec<(String, String)>,
    pub server_len: u64,
    pub server_sha256: String,
    /// Every traceparent value the server received, in order.
    pub server_traceparents: Vec<String>,
    pub raw: String,
}

impl HeaderExchange {
    /// The value of a header as sent (first occurrence).
    pub fn sent_header(&self, name: &str) -> Option<&str> {
        self.sent
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The value of a header as the server received it (first occurrence).
    pub fn received_header(&self, name: &str) -> Option<&str> {
        self.server_headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, Clone)]
pub struct HeaderClientRun {
    pub pid: u32,
    pub exchanges: Vec<HeaderExchange>,
}

fn string_pairs(value: Option<&Value>) -> Option<Vec<(String, String)>> {
    let items = value?.as_array()?;
    // Either [[n, v], ...] or the flat [n, v, n, v, ...] of node's rawHeaders.
    if items.iter().all(|i| i.as_array().is_some()) {
        items
            .iter()
            .map(|pair| {
                let pair = pair.as_array()?;
                Some((
                    pair.first()?.as_str()?.to_string(),
                    pair.get(1)?.as_str()?.to_string(),
                ))
            })
            .collect()
    } else {
        items
            .chunks(2)
            .map(|c| {
                Some((
                    c.first()?.as_str()?.to_string(),
                    c.get(1)?.as_str()?.to_string(),
                ))
            })
            .collect()
    }
}

fn parse_exchange(line: &str) -> Option<HeaderExchange> {
    let j: Value = serde_json::from_str(line).ok()?;
    let server = j.get("server")?;
    Some(HeaderExchange {
        index: j.get("i")?.as_u64()? as usize,
        method: j.get("method")?.as_str()?.to_string(),
        path: j.get("path")?.as_str()?.to_string(),
        sent: string_pairs(j.get("sent"))?,
        len: j.get("len")?.as_u64()?,
        sha256: j.get("sha256")?.as_str()?.to_string(),
        local_port: j.get("local_port")?.as_u64()? as u16,
        status: j.get("status")?.as_u64()? as u16,
        server_headers: string_pairs(server.get("raw")).unwrap_or_default(),
        server_len: server
            .get("len")
            .and_then(Value::as_u64)
            .unwrap_or(u64::MAX),
        server_sha256: server
            .get("sha256")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
        server_traceparents: server
            .get("tp")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default(),
        raw: line.to_string(),
    })
}

/// A client process started but held before its first request (`E2E_GO_FILE`): its pid is
/// known before it sends anything, so the agent can select exactly it (`--pid`), not every
/// process with the same name on the machine. [`Gated::release`] lets it run.
pub struct Gated {
    name: String,
    child: ChildGuard,
    go: PathBuf,
    stdout: PathBuf,
    stderr: PathBuf,
    timeout: Duration,
    _dir: TestDir,
}

impl Gated {
    /// Spawns `cmd` with `E2E_GO_FILE` set and waits (15 s) for its `WAITING` line.
    pub fn spawn(name: &str, mut cmd: Command, timeout: Duration) -> Gated {
        let dir = TestDir::new(name);
        let go = dir.join("go");
        let stdout = dir.join("stdout");
        let stderr = dir.join("stderr");
        cmd.env("E2E_GO_FILE", &go);
        let mut child = ChildGuard::spawn(name, cmd, &stdout, &stderr);
        let waiting = poll_until(START_TIMEOUT, || {
            if child.try_wait().is_some() {
                return Some(false);
            }
            read_text(&stdout)
                .lines()
                .any(|l| l.starts_with("WAITING"))
                .then_some(true)
        });
        assert!(
            waiting == Some(true),
            "{name} did not get ready (exit {:?})\nstdout:\n{}\nstderr:\n{}",
            child.try_wait(),
            tail(&read_text(&stdout), 20),
            tail(&read_text(&stderr), 20)
        );
        Gated {
            name: name.to_string(),
            child,
            go,
            stdout,
            stderr,
            timeout,
            _dir: dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// Lets it run and waits for it: (exit status, stdout, stderr, pid). Panics on timeout.
    pub fn release(mut self) -> (std::process::ExitStatus, String, String, u32) {
        fs::write(&self.go, b"go").expect("write the go file");
        let pid = self.child.pid();
        let status = self.child.wait_timeout(self.timeout);
        let (out, err) = (read_text(&self.stdout), read_text(&self.stderr));
        match status {
            Some(status) => (status, out, err, pid),
            None => panic!(
                "{} (pid {pid}) did not finish within {:?}\nstdout:\n{}\nstderr:\n{}",
                self.name,
                self.timeout,
                tail(&out, 20),
                tail(&err, 30)
            ),
        }
    }
}

/// `tests/fixtures/header_client.py` against a [`ChecksumServer`] (in `host`, or the root
/// namespace), held before its first request: `specs` are `METHOD:PATH:BODY_SIZE[:tp]`.
pub struct HeaderClient {
    gated: Gated,
    specs: usize,
    server_stderr: String,
}

impl HeaderClient {
    pub fn spawn(host: Option<&Host>, server: &ChecksumServer, specs: &[&str]) -> HeaderClient {
        let mut cmd = match host {
            Some(h) => h.command(python_bin()),
            None => Command::new(python_bin()),
        };
        cmd.arg(fixture("header_client.py"))
            .arg(server.ip().to_string())
            .arg(server.port().to_string())
            .args(specs);
        HeaderClient {
            gated: Gated::spawn("header_client", cmd, Duration::from_secs(60)),
            specs: specs.len(),
            server_stderr: server.stderr(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.gated.pid()
    }

    /// Sends the requests; panics unless every exchange completed.
    pub fn run(self) -> HeaderClientRun {
        let n = self.specs;
        let server_stderr = self.server_stderr;
        let (status, stdout, stderr, pid) = self.gated.release();
        let exchanges: Vec<HeaderExchange> = stdout.lines().filter_map(parse_exchange).collect();
        assert!(
            status.success() && exchanges.len() == n,
            "header_client.py (pid {pid}) failed: exit {status}, {} of {n} exchanges\nstdout:\n{}\nstderr:\n{}\nserver stderr (at start):\n{}",
            exchanges.len(),
            tail(&stdout, 20),
            tail(&stderr, 30),
            tail(&server_stderr, 20)
        );
        HeaderClientRun { pid, exchanges }
    }
}

/// [`HeaderClient`] spawned and run at once.
pub fn header_client(
    host: Option<&Host>,
    server: &ChecksumServer,
    specs: &[&str],
) -> HeaderClientRun {
    HeaderClient::spawn(host, server, specs).run()
}

/// What [`soak_client`] runs (see `tests/fixtures/soak_client.js`).
#[derive(Debug, Clone)]
pub struct SoakPlan {
    pub gets: usize,
    pub connections: usize,
    pub posts: usize,
    /// Sizes of the first POST bodies; the others are random in `0..=post_max`.
    pub post_sizes: Vec<usize>,
    pub post_max: usize,
    /// Small POSTs (typical API calls): bodies random in `0..=small_max`.
    pub small_posts: usize,
    pub small_max: usize,
    pub chunked: usize,
    pub chunked_max: usize,
    pub pipeline_batches: usize,
    pub pipeline_depth: usize,
    pub splits: usize,
}

impl SoakPlan {
    pub fn total(&self) -> usize {
        self.gets
            + self.posts
            + self.small_posts
            + self.chunked
            + self.pipeline_batches * self.pipeline_depth
            + self.splits
    }

    fn to_json(&self) -> String {
        serde_json::json!({
            "gets": self.gets,
            "connections": self.connections,
            "posts": self.posts,
            "post_sizes": self.post_sizes,
            "post_max": self.post_max,
            "small_posts": self.small_posts,
            "small_max": self.small_max,
            "chunked": self.chunked,
            "chunked_max": self.chunked_max,
            "pipeline_batches": self.pipeline_batches,
            "pipeline_depth": self.pipeline_depth,
            "splits": self.splits,
        })
        .to_string()
    }
}

/// Per class of request: counts of the soak.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SoakClass {
    pub requests: u64,
    pub ok: u64,
    pub failed: u64,
    /// Requests that arrived with no / exactly one / several traceparent headers.
    pub tp0: u64,
    pub tp1: u64,
    pub tp_many: u64,
}

#[derive(Debug, Clone)]
pub struct SoakRun {
    pub pid: u32,
    pub elapsed_ms: u64,
    pub total: u64,
    pub failed: u64,
    pub classes: BTreeMap<String, SoakClass>,
    /// Wall time of each phase (`post`, `small`, `chunked`, `pipelined`, `split`, `get`), ms.
    pub phases: BTreeMap<String, u64>,
    /// The first failures, one message each.
    pub failures: Vec<String>,
    /// A few traceparent values the server received.
    pub samples: Vec<String>,
    pub raw: String,
}

/// `tests/fixtures/soak_client.js` against a [`ChecksumServer`] (root namespace), held before
/// its first request.
pub struct SoakClient {
    gated: Gated,
    server_stderr_path: String,
}

impl SoakClient {
    pub fn spawn(server: &ChecksumServer, plan: &SoakPlan, timeout: Duration) -> SoakClient {
        let mut cmd = Command::new(node_bin());
        cmd.arg(fixture("soak_client.js"))
            .arg(server.ip().to_string())
            .arg(server.port().to_string())
            .arg(plan.to_json());
        SoakClient {
            gated: Gated::spawn("soak_client", cmd, timeout),
            server_stderr_path: server.stderr(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.gated.pid()
    }

    /// Runs the soak. Panics only when the client crashed or printed no summary; failed
    /// requests are in the result.
    pub fn run(self) -> SoakRun {
        let server_stderr = self.server_stderr_path;
        let (status, stdout, stderr, pid) = self.gated.release();
        parse_soak(status, &stdout, &stderr, pid, &server_stderr)
    }
}

/// [`SoakClient`] spawned and run at once.
pub fn soak_client(server: &ChecksumServer, plan: &SoakPlan, timeout: Duration) -> SoakRun {
    SoakClient::spawn(server, plan, timeout).run()
}

fn parse_soak(
    status: std::process::ExitStatus,
    stdout: &str,
    stderr: &str,
    pid: u32,
    server_stderr: &str,
) -> SoakRun {
    let summary = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<Value>(l).ok())
        .unwrap_or_else(|| {
            panic!(
                "soak_client.js (pid {pid}) printed no summary: exit {status}\nstdout:\n{}\nstderr:\n{}\nserver stderr:\n{}",
                tail(stdout, 20),
                tail(stderr, 30),
                tail(server_stderr, 20)
            )
        });
    assert!(
        status.success(),
        "soak_client.js (pid {pid}) exited with {status}\nstderr:\n{}",
        tail(stderr, 30)
    );
    let num = |j: &Value, k: &str| j.get(k).and_then(Value::as_u64).unwrap_or(0);
    let mut classes = BTreeMap::new();
    if let Some(Value::Object(fields)) = summary.get("classes") {
        for (name, c) in fields {
            classes.insert(
                name.clone(),
                SoakClass {
                    requests: num(c, "requests"),
                    ok: num(c, "ok"),
                    failed: num(c, "failed"),
                    tp0: num(c, "tp0"),
                    tp1: num(c, "tp1"),
                    tp_many: num(c, "tp_many"),
                },
            );
        }
    }
    let mut phases = BTreeMap::new();
    if let Some(Value::Object(fields)) = summary.get("phases") {
        for (name, ms) in fields {
            phases.insert(name.clone(), ms.as_u64().unwrap_or(0));
        }
    }
    let strings = |k: &str| -> Vec<String> {
        summary
            .get(k)
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    SoakRun {
        pid,
        elapsed_ms: num(&summary, "elapsed_ms"),
        total: num(&summary, "total"),
        failed: num(&summary, "failed"),
        classes,
        phases,
        failures: strings("failures"),
        samples: strings("samples"),
        raw: stdout.lines().last().unwrap_or("").to_string(),
    }
}

/// Where the completeness figures go: `<workspace>/target/trace-completeness/`.
pub fn completeness_dir() -> PathBuf {
    crate::workspace_dir().join("target/trace-completeness")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_seen_lines() {
        let seen = parse_seen(
            "READY port=1 pid=2\n\
             SEEN path=/chain/3 traceparent=00-aa-bb-01|00-cc-dd-01 tracestate=- status=200\n\
             SEEN path=/noise traceparent=- tracestate=x=1 status=404\n",
        );
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[0].path, "/chain/3");
        assert_eq!(seen[0].traceparents, ["00-aa-bb-01", "00-cc-dd-01"]);
        assert!(seen[0].tracestates.is_empty());
        assert!(seen[1].traceparents.is_empty());
        assert_eq!(seen[1].tracestates, ["x=1"]);
        assert_eq!(seen[1].status, 404);
    }

    #[test]
    fn parses_traceparent() {
        let v = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        assert_eq!(
            parse_traceparent(v),
            Some((
                "00",
                "0af7651916cd43dd8448eb211c80319c",
                "b7ad6b7169203331",
                "01"
            ))
        );
        assert_eq!(parse_traceparent("00-0af7-b7ad-01"), None);
        assert_eq!(parse_traceparent(&format!("{v}-x")), None);
        assert_eq!(parse_traceparent(&v.to_uppercase()), None);
    }

    #[test]
    fn parses_header_client_lines() {
        let line = r#"{"i": 1, "method": "POST", "path": "/x", "sent": [["Host", "h:1"], ["X-Req", "1"]], "len": 3, "sha256": "ab", "local_port": 5, "status": 200, "server": {"method": "POST", "path": "/x", "len": 3, "sha256": "ab", "raw": ["traceparent", "00-a-b-01", "Host", "h:1", "X-Req", "1"], "tp": ["00-a-b-01"]}}"#;
        let e = parse_exchange(line).expect("parses");
        assert_eq!(e.index, 1);
        assert_eq!(
            e.sent,
            [("Host".into(), "h:1".into()), ("X-Req".into(), "1".into())]
        );
        assert_eq!(e.server_headers.len(), 3);
        assert_eq!(e.server_headers[0].0, "traceparent");
        assert_eq!(e.server_traceparents, ["00-a-b-01"]);
        assert_eq!(e.received_header("x-req"), Some("1"));
        assert_eq!(e.server_len, 3);
    }
}
