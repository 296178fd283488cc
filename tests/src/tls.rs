//! TLS fixtures for the tests of plaintext capture through OpenSSL: a test PKI made with the
//! openssl CLI, nginx with an `ssl` listener, a python HTTPS client, and the agent's
//! `tls: <comm>[<pid>]: OpenSSL: attached (<library>)` lines that tell a test when a process's
//! TLS library is probed (libraries loaded with dlopen are found by a rescan, seconds later:
//! clients are held at a gate until then, see [`crate::process::run_gated`]).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::agent::Agent;
use crate::clients::{ClientRun, parse_result_line};
use crate::process::{TestDir, poll_until, run_gated, run_to_completion, tail};
use crate::servers::{HttpServer, NGINX_HELLO_BODY, NGINX_LARGE_SIZE, NginxServer};
use crate::{fixture, python_bin};

const OPENSSL_HINT: &str = "the openssl command is needed (apt-get install openssl)";
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the agent may take to report a process's TLS library: a rescan every 2 s.
pub const ATTACH_TIMEOUT: Duration = Duration::from_secs(15);

/// A CA and a server certificate for `127.0.0.1` and `localhost` (subjectAltName) signed by
/// it, made with the openssl CLI: PEM files in a private directory.
pub struct Certs {
    dir: TestDir,
}

impl Certs {
    pub fn new() -> Certs {
        let dir = TestDir::new("tls-certs");
        let run = |args: &[&str]| {
            let mut cmd = Command::new("openssl");
            cmd.args(args).current_dir(dir.path());
            let (status, stdout, stderr, _) =
                run_to_completion("openssl", cmd, Duration::from_secs(30));
            assert!(
                status.success(),
                "openssl {args:?} failed ({status}): {OPENSSL_HINT}\nstdout:\n{}\nstderr:\n{}",
                tail(&stdout, 20),
                tail(&stderr, 20)
            );
        };
        run(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=e2e test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ]);
        run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ]);
        fs::write(
            dir.join("server.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
        )
        .expect("write server.ext");
        run(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "server.ext",
            "-out",
            "server.pem",
        ]);
        Certs { dir }
    }

    /// The CA that signed the server certificate: what clients verify against.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    pub fn server_cert(&self) -> PathBuf {
        self.dir.join("server.pem")
    }

    pub fn server_key(&self) -> PathBuf {
        self.dir.join("server.key")
    }
}

impl Default for Certs {
    fn default() -> Self {
        Self::new()
    }
}

/// The TLS protocol version a client offers (only that one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsVersion {
    V1_2,
    V1_3,
}

impl TlsVersion {
    /// As OpenSSL names it (nginx's `$ssl_protocol`, python's `SSLSocket.version()`).
    pub fn name(self) -> &'static str {
        match self {
            TlsVersion::V1_2 => "TLSv1.2",
            TlsVersion::V1_3 => "TLSv1.3",
        }
    }

    /// curl's options offering only this version.
    pub fn curl_args(self) -> [&'static str; 3] {
        match self {
            TlsVersion::V1_2 => ["--tlsv1.2", "--tls-max", "1.2"],
            TlsVersion::V1_3 => ["--tlsv1.3", "--tls-max", "1.3"],
        }
    }

    fn python_arg(self) -> &'static str {
        match self {
            TlsVersion::V1_2 => "1.2",
            TlsVersion::V1_3 => "1.3",
        }
    }
}

/// The libraries the agent said it attached to for process `comm[pid]`: the paths of its
/// `tls: <comm>[<pid>]: OpenSSL: attached (<path>)` lines in `stderr`.
pub fn tls_attachments(stderr: &str, comm: &str, pid: u32) -> Vec<String> {
    let marker = format!("tls: {comm}[{pid}]: OpenSSL: attached (");
    stderr
        .lines()
        .filter_map(|line| {
            let at = line.find(&marker)?;
            let rest = &line[at + marker.len()..];
            Some(rest.strip_suffix(')').unwrap_or(rest).to_string())
        })
        .collect()
}

/// A gate for [`crate::process::run_gated`]: open once `agent` reported attaching to a TLS
/// library of the process (`comm` is its command name, e.g. `curl`, `python3.11`).
pub fn attached<'a>(agent: &'a Agent, comm: &'a str) -> impl FnMut(u32) -> bool + 'a {
    move |pid| !tls_attachments(&agent.stderr(), comm, pid).is_empty()
}

/// Like [`attached`], but only for a library whose path contains `library` (e.g. the copy
/// of libssl a python wheel bundles).
pub fn attached_to<'a>(
    agent: &'a Agent,
    comm: &'a str,
    library: &'a str,
) -> impl FnMut(u32) -> bool + 'a {
    move |pid| {
        tls_attachments(&agent.stderr(), comm, pid)
            .iter()
            .any(|path| path.contains(library))
    }
}

/// Waits ([`ATTACH_TIMEOUT`]) until `agent` reported attaching to a TLS library of the
/// running process `comm[pid]` (e.g. a server started before the agent); returns the
/// libraries. Panics with the agent's `tls:` lines otherwise.
pub fn wait_attached(agent: &Agent, comm: &str, pid: u32) -> Vec<String> {
    poll_until(ATTACH_TIMEOUT, || {
        let found = tls_attachments(&agent.stderr(), comm, pid);
        (!found.is_empty()).then_some(found)
    })
    .unwrap_or_else(|| {
        let stderr = agent.stderr();
        let tls_lines: Vec<&str> = stderr.lines().filter(|l| l.contains("tls")).collect();
        panic!(
            "the agent did not report attaching to the TLS library of {comm}[{pid}] within \
             {:?} (expected a line `tls: {comm}[{pid}]: OpenSSL: attached (<library>)`); its \
             lines about tls:\n{}",
            crate::scaled(ATTACH_TIMEOUT),
            tls_lines.join("\n")
        )
    })
}

/// One line of the TLS nginx's access log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessEntry {
    pub remote_port: u16,
    /// `$ssl_protocol`, e.g. `TLSv1.3`.
    pub protocol: String,
    pub method: String,
    pub uri: String,
    pub status: u16,
    /// `$body_bytes_sent`.
    pub body_bytes_sent: u64,
}

/// nginx (master + 1 worker) with one `ssl` listener (TLS 1.2 and 1.3) on 127.0.0.1 serving
/// the certificate of a [`Certs`]: static `/hello.txt` and `/large.bin` (as
/// [`NginxServer::start`]; larger than OpenSSL's 16 KiB records: many SSL_write calls on
/// one side, SSL_read calls on the other), `/boom` → 500, else 404. Its access log names the
/// negotiated protocol of each request.
pub struct TlsNginx {
    server: NginxServer,
    _html: TestDir,
}

impl TlsNginx {
    pub fn start(certs: &Certs) -> TlsNginx {
        let html = TestDir::new("nginx-tls-html");
        fs::write(html.join("hello.txt"), NGINX_HELLO_BODY).expect("write hello.txt");
        let large: Vec<u8> = (0..NGINX_LARGE_SIZE).map(|i| (i % 251) as u8).collect();
        fs::write(html.join("large.bin"), large).expect("write large.bin");
        let template = NGINX_TLS_TEMPLATE
            .replace("@HTML@", &html.path().display().to_string())
            .replace("@CERT@", &certs.server_cert().display().to_string())
            .replace("@KEY@", &certs.server_key().display().to_string());
        let server = NginxServer::start_with(&template, None);
        TlsNginx {
            server,
            _html: html,
        }
    }

    pub fn worker_pid(&self) -> u32 {
        self.server.worker_pid()
    }

    pub fn master_pid(&self) -> u32 {
        self.server.master_pid()
    }

    /// Every request nginx logged so far.
    pub fn access_log(&self) -> Vec<AccessEntry> {
        let text = crate::process::read_text(&self.server.prefix().join("access.log"));
        text.lines()
            .filter_map(|line| {
                let f: Vec<&str> = line.split_whitespace().collect();
                let [port, protocol, method, uri, status, sent] = f.as_slice() else {
                    return None;
                };
                Some(AccessEntry {
                    remote_port: port.parse().ok()?,
                    protocol: protocol.to_string(),
                    method: method.to_string(),
                    uri: uri.to_string(),
                    status: status.parse().ok()?,
                    body_bytes_sent: sent.parse().ok()?,
                })
            })
            .collect()
    }
}

impl HttpServer for TlsNginx {
    fn port(&self) -> u16 {
        self.server.port()
    }
    fn pid(&self) -> u32 {
        self.server.worker_pid()
    }
    fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.port())
    }
}

const NGINX_TLS_TEMPLATE: &str = "\
daemon off;
master_process on;
worker_processes 1;
pid @PREFIX@/nginx.pid;
error_log @PREFIX@/error.log info;
events { worker_connections 256; }
http {
    log_format e2e_tls '$remote_port $ssl_protocol $request_method $uri $status $body_bytes_sent';
    access_log @PREFIX@/access.log e2e_tls;
    client_body_temp_path @PREFIX@/tmp_client_body;
    proxy_temp_path @PREFIX@/tmp_proxy;
    fastcgi_temp_path @PREFIX@/tmp_fastcgi;
    uwsgi_temp_path @PREFIX@/tmp_uwsgi;
    scgi_temp_path @PREFIX@/tmp_scgi;
    default_type application/octet-stream;
    sendfile on;
    keepalive_timeout 65;
    keepalive_requests 1000;
    server {
        listen 127.0.0.1:@PORT@ ssl;
        server_name localhost;
        ssl_certificate @CERT@;
        ssl_certificate_key @KEY@;
        ssl_protocols TLSv1.2 TLSv1.3;
        root @HTML@;
        location / { try_files $uri =404; }
        location = /boom { return 500; }
    }
}
";

/// How [`https_client`] speaks HTTP (`tests/fixtures/https_client.py`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpsMode {
    /// `http.client.HTTPSConnection`, keep-alive.
    HttpClient,
    /// A `requests.Session`, keep-alive.
    Requests,
    /// Every GET in ONE write on a TLS socket, the responses read in order.
    Pipeline,
    /// OpenSSL through memory BIOs (as asyncio and node do): the handshake's last record
    /// (TLS 1.3: the client's Finished) and the first request leave in ONE send, so the
    /// server reads its first request with the handshake, before its first SSL_read.
    Coalesced,
}

/// The outcome of [`https_client`]: the requests and the protocol the client negotiated.
#[derive(Debug, Clone)]
pub struct HttpsRun {
    pub run: ClientRun,
    pub tls_version: String,
}

/// Runs `tests/fixtures/https_client.py` against 127.0.0.1:`port` (certificate verified
/// against `ca`, only `version` offered), held after loading its TLS library until
/// `open(pid)` says go. `specs`: `METHOD:PATH[:BODY_SIZE]`.
pub fn https_client(
    mode: HttpsMode,
    port: u16,
    ca: &Path,
    version: TlsVersion,
    specs: &[&str],
    open: impl FnMut(u32) -> bool,
) -> HttpsRun {
    let mode_arg = match mode {
        HttpsMode::HttpClient => "http.client",
        HttpsMode::Requests => "requests",
        HttpsMode::Pipeline => "pipeline",
        HttpsMode::Coalesced => "coalesced",
    };
    let mut cmd = Command::new(python_bin());
    cmd.arg(fixture("https_client.py"))
        .arg(mode_arg)
        .arg("127.0.0.1")
        .arg(port.to_string())
        .arg(ca)
        .arg(version.python_arg())
        .args(specs)
        .env("E2E_TLS_GATE", "1");
    let name = "https_client";
    let (status, stdout, stderr, pid) = run_gated(name, cmd, open, b"go\n", CLIENT_TIMEOUT);
    let results: Vec<_> = stdout.lines().filter_map(parse_result_line).collect();
    let tls_version = stdout
        .lines()
        .find_map(|l| l.strip_prefix("TLS version="))
        .unwrap_or_default()
        .to_string();
    if !status.success() || results.len() != specs.len() {
        panic!(
            "{name} {mode_arg} (pid {pid}) failed: exit {status}, {} of {} results (is \
             `requests` installed? `cargo xtask setup --test-deps`)\nstdout:\n{}\nstderr:\n{}",
            results.len(),
            specs.len(),
            tail(&stdout, 40),
            tail(&stderr, 40)
        );
    }
    HttpsRun {
        run: ClientRun {
            pid,
            results,
            stderr,
        },
        tls_version,
    }
}

/// `tests/fixtures/node_client.js` over HTTPS (node's `https`, a keep-alive Agent; the
/// server verified against `ca`), held before its first request until `open(pid)` says go.
/// `specs`: `METHOD:PATH[:BODY_SIZE]`.
pub fn node_https_client(
    port: u16,
    ca: &Path,
    specs: &[&str],
    open: impl FnMut(u32) -> bool,
) -> ClientRun {
    let mut cmd = Command::new(crate::node_bin());
    cmd.arg(fixture("node_client.js"))
        .arg("127.0.0.1")
        .arg(port.to_string())
        .args(specs)
        .env("E2E_HTTPS_CA", ca)
        .env("E2E_TLS_GATE", "1");
    let (status, stdout, stderr, pid) =
        run_gated("node_client", cmd, open, b"go\n", CLIENT_TIMEOUT);
    let results: Vec<_> = stdout.lines().filter_map(parse_result_line).collect();
    if !status.success() || results.len() != specs.len() {
        panic!(
            "node_client over https (pid {pid}) failed: exit {status}, {} of {} results\nstdout:\n{}\nstderr:\n{}",
            results.len(),
            specs.len(),
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
