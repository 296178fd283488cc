//! An OTLP receiver over TLS (gRPC and HTTP), with a test PKI made by the openssl CLI: for the
//! tests of the agent's https export. rotel has no TLS on its receivers, so this is
//! `fixtures/otlp_tls_receiver.py` (grpcio, http.server + ssl, opentelemetry-proto), which
//! records every export request it decodes: headers, compression, client certificate, spans.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::process::{ChildGuard, POLL, TestDir, read_text, tail};
use crate::{fixture, python_bin};
use serde_json::Value;

const INSTALL: &str = "the TLS receiver needs python3 with grpcio and opentelemetry-proto \
     (`cargo xtask setup --test-deps`) and the openssl command (apt-get install openssl)";

/// A CA, a server certificate for 127.0.0.1 and localhost signed by it, a client certificate
/// (CN `agent-client`) signed by it, and an unrelated CA. PEM files in a private directory.
pub struct Pki {
    dir: TestDir,
}

impl Pki {
    pub fn new() -> Pki {
        let dir = TestDir::new("pki");
        let out = Command::new(python_bin())
            .arg(fixture("otlp_tls_receiver.py"))
            .arg("pki")
            .arg(dir.path())
            .output()
            .unwrap_or_else(|e| panic!("cannot run python3 ({e}): {INSTALL}"));
        assert!(
            out.status.success(),
            "making the test PKI failed: {}\n{INSTALL}",
            String::from_utf8_lossy(&out.stderr)
        );
        Pki { dir }
    }

    /// The CA that signed the server and client certificates.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// A CA that signed nothing here.
    pub fn other_ca(&self) -> PathBuf {
        self.dir.join("other-ca.pem")
    }

    pub fn client_cert(&self) -> PathBuf {
        self.dir.join("client.pem")
    }

    pub fn client_key(&self) -> PathBuf {
        self.dir.join("client.key")
    }
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}

/// How a [`TlsReceiver`] runs.
#[derive(Debug, Clone, Copy, Default)]
pub struct TlsReceiverOptions {
    /// Clients must present a certificate signed by the test CA (mTLS).
    pub require_client_cert: bool,
    /// The gRPC server refuses gzip-compressed messages (UNIMPLEMENTED): a sender that
    /// compresses fails, one that does not succeeds.
    pub refuse_gzip: bool,
}

/// One span of an export request, as decoded by the receiver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSpan {
    pub trace_id: String,
    pub span_id: String,
    pub name: String,
    /// `service.name` of its resource.
    pub service: String,
}

/// One export request the receiver decoded.
#[derive(Debug, Clone)]
pub struct TlsExport {
    /// `grpc` or `http`.
    pub protocol: String,
    pub path: String,
    /// Lowercased names.
    pub headers: BTreeMap<String, String>,
    /// HTTP `Content-Encoding` (gRPC compression shows through `refuse_gzip`).
    pub content_encoding: Option<String>,
    /// CN of the client certificate the sender presented.
    pub client_cn: Option<String>,
    pub spans: Vec<TlsSpan>,
}

/// The running receiver; killed on drop.
pub struct TlsReceiver {
    _child: ChildGuard,
    dir: PathBuf,
    grpc_port: u16,
    http_port: u16,
}

impl TlsReceiver {
    /// Starts serving with `pki`'s server certificate and waits (10 s) until both ports listen.
    pub fn start(pki: &Pki, options: TlsReceiverOptions) -> TlsReceiver {
        let dir = pki.dir.path().join(format!(
            "receiver-{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        std::fs::create_dir_all(&dir).expect("receiver directory");
        for file in ["server.pem", "server.key"] {
            std::fs::copy(pki.dir.join(file), dir.join(file)).expect("server certificate");
        }
        let mut cmd = Command::new(python_bin());
        cmd.arg(fixture("otlp_tls_receiver.py"))
            .arg("serve")
            .arg(&dir);
        if options.require_client_cert {
            cmd.arg("--client-ca").arg(pki.ca());
        }
        if options.refuse_gzip {
            cmd.arg("--refuse-gzip");
        }
        let log = dir.join("receiver.log");
        let mut child = ChildGuard::spawn("otlp-tls-receiver", cmd, &log, &log);
        let ports = dir.join("ports.json");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(text) = std::fs::read_to_string(&ports) {
                let parsed: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                let port = |name| {
                    parsed
                        .get(name)
                        .and_then(Value::as_u64)
                        .and_then(|p| u16::try_from(p).ok())
                };
                if let (Some(grpc_port), Some(http_port)) = (port("grpc"), port("http")) {
                    return TlsReceiver {
                        _child: child,
                        dir,
                        grpc_port,
                        http_port,
                    };
                }
            }
            if let Some(status) = child.try_wait() {
                panic!(
                    "the TLS receiver exited with {status}:\n{}\n{INSTALL}",
                    tail(&read_text(&log), 30)
                );
            }
            assert!(
                Instant::now() < deadline,
                "the TLS receiver did not start within 10 s:\n{}",
                tail(&read_text(&log), 30)
            );
            std::thread::sleep(POLL);
        }
    }

    /// `https://<host>:<gRPC port>`; `host` is `127.0.0.1` or `localhost` (both in the
    /// certificate).
    pub fn grpc_url(&self, host: &str) -> String {
        format!("https://{host}:{}", self.grpc_port)
    }

    /// `https://<host>:<HTTP port>` (a base URL: exporters append `/v1/traces`).
    pub fn http_url(&self, host: &str) -> String {
        format!("https://{host}:{}", self.http_port)
    }

    /// Every export request decoded so far, in order.
    pub fn exports(&self) -> Vec<TlsExport> {
        read_text(&self.dir.join("received.jsonl"))
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .map(|entry| export(&entry))
            .collect()
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<TlsSpan> {
        self.exports().into_iter().flat_map(|e| e.spans).collect()
    }

    /// Waits (up to `timeout`) until `done` holds for the exports received; returns them.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&[TlsExport]) -> bool,
    ) -> Vec<TlsExport> {
        let deadline = Instant::now() + timeout;
        loop {
            let exports = self.exports();
            if done(&exports) {
                return exports;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}; the TLS receiver decoded \
                 {exports:#?}\nits log:\n{}",
                tail(&read_text(&self.dir.join("receiver.log")), 30)
            );
            std::thread::sleep(POLL);
        }
    }
}

fn text(entry: &Value, key: &str) -> Option<String> {
    entry.get(key).and_then(Value::as_str).map(str::to_owned)
}

fn export(entry: &Value) -> TlsExport {
    let headers = match entry.get("headers") {
        Some(Value::Object(fields)) => fields
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
            .collect(),
        _ => BTreeMap::new(),
    };
    let spans = entry
        .get("spans")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|s| TlsSpan {
            trace_id: text(s, "trace_id").unwrap_or_default(),
            span_id: text(s, "span_id").unwrap_or_default(),
            name: text(s, "name").unwrap_or_default(),
            service: text(s, "service").unwrap_or_default(),
        })
        .collect();
    TlsExport {
        protocol: text(entry, "protocol").unwrap_or_default(),
        path: text(entry, "path").unwrap_or_default(),
        headers,
        content_encoding: text(entry, "content_encoding"),
        client_cn: text(entry, "client_cn"),
        spans,
    }
}
