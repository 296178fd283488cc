//! Harness for the agent's end-to-end tests.
//!
//! The shape of every test: start a real OTLP collector ([`Collector`], rotel), a real server
//! (python `http.server`, nginx, node), the agent ([`Agent`]) selecting it, drive real requests
//! with real clients (curl, python, node, a raw pipelining client) that measure their own
//! timings, then check the spans the collector received.
//!
//! Every child process is killed on drop (also when a test panics) and every wait has a timeout.
//! When a test panics, the agent's stderr and a summary of what the collector received are
//! printed with the failure.

pub mod agent;
pub mod clients;
pub mod collector;
pub mod hostile;
pub mod metrics;
pub mod netns;
pub mod pg_clients;
pub mod postgres;
pub mod process;
pub mod servers;
pub mod services;
pub mod spans;
pub mod tls;
pub mod tls_receiver;
pub mod traces;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

pub use agent::{Agent, AgentBuilder, ExitSummary, ExportTotals, OtlpProtocol};
pub use clients::{
    ClientRun, Curl, CurlResult, CurlTransfer, RawMode, RequestResult, Timing, node_client,
    pipeline_client, py_client, raw_client,
};
pub use collector::{AttrValue, Collector, ReceivedSpan, SpanKind, SpanStatus, parse_rotel_output};
pub use postgres::{
    PgBackend, PgServer, PgbenchMode, PgbenchOptions, PgbenchRun, PgbenchScript, PsqlRun,
    PsycopgPlan, PsycopgRun, ServerStatement, pgbench, pgbench_init, psql_run, psycopg_client,
};
pub use servers::{HttpServer, NginxServer, NodeServer, PyServer};
pub use spans::{Checks, Failures, SpanFilter, Spans};
pub use tls_receiver::{Pki, TlsExport, TlsReceiver, TlsReceiverOptions, TlsSpan};

/// The factor every wait of the harness is multiplied by: `E2E_TIME_SCALE` (a whole number,
/// default 1). For slow machines, e.g. the kernel matrix's guests (QEMU without KVM runs
/// programs 17–57× slower). Only waits scale: no test asserts on how long something took.
pub fn time_scale() -> u32 {
    static SCALE: OnceLock<u32> = OnceLock::new();
    *SCALE.get_or_init(|| match std::env::var("E2E_TIME_SCALE") {
        Err(_) => 1,
        Ok(v) => v
            .trim()
            .parse()
            .ok()
            .filter(|n| *n >= 1)
            .unwrap_or_else(|| {
                panic!("E2E_TIME_SCALE={v:?}: expected a whole number of at least 1")
            }),
    })
}

/// `timeout` multiplied by [`time_scale`].
pub fn scaled(timeout: Duration) -> Duration {
    timeout * time_scale()
}

/// How long a test waits for expected spans to reach the collector. The agent flushes at
/// least every second; rotel prints a batch within 50 ms. Short enough that a suite where
/// nothing arrives still ends in a few minutes.
pub const SPAN_TIMEOUT: Duration = Duration::from_secs(10);

/// The workspace root (parent of this crate).
pub fn workspace_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests crate has a parent directory")
        .to_path_buf()
}

/// A file under `tests/fixtures/`.
pub fn fixture(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name);
    assert!(path.exists(), "fixture {} is missing", path.display());
    path
}

/// Held for the whole of an end-to-end test: the tests of one binary run one at a time even
/// without `--test-threads=1` (one agent traces the whole host; concurrent runs would see each
/// other's processes and compete for CPU).
#[must_use = "hold the guard for the whole test"]
pub struct SerialGuard(#[allow(dead_code)] MutexGuard<'static, ()>);

/// Preflight of every privileged test: panics unless it runs as root (the agent loads eBPF
/// programs; these tests must not pass silently when they cannot run), then serializes the
/// test with the other e2e tests of the binary.
pub fn require_root() -> SerialGuard {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        panic!(
            "this end-to-end test needs root (the agent loads eBPF programs), but euid is {euid}. \
             Run it as root, e.g. `cargo xtask test`, or \
             `sudo -E AGENT_BIN=target/release/agent cargo test -p tests --test http_e2e -- --test-threads=1`"
        );
    }
    static SERIAL: Mutex<()> = Mutex::new(());
    // A previous test panicking while holding the lock is no reason to fail this one.
    SerialGuard(SERIAL.lock().unwrap_or_else(PoisonError::into_inner))
}

/// A TCP port that was free a moment ago on 127.0.0.1 (for programs that cannot report the
/// port they bound; callers retry on a bind race).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

/// True when something accepts TCP connections on 127.0.0.1:`port`.
pub fn port_open(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// Finds a program on PATH.
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

fn required_tool(program: &str, env_override: &str, hint: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(env_override) {
        return PathBuf::from(path);
    }
    which(program).unwrap_or_else(|| {
        panic!("`{program}` not found on PATH (or set {env_override}); install it: {hint}")
    })
}

/// The real python interpreter (not a pyenv shim), so that the process's `comm` and
/// executable are the interpreter itself. Override with `E2E_PYTHON`.
pub fn python_bin() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let launcher = required_tool("python3", "E2E_PYTHON", "apt-get install python3");
        let out = Command::new(&launcher)
            .args(["-c", "import sys; print(sys.executable)"])
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", launcher.display()));
        let exe = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(
            out.status.success() && !exe.is_empty(),
            "{} could not report sys.executable: {}",
            launcher.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::canonicalize(&exe).unwrap_or_else(|_| PathBuf::from(exe))
    })
}

/// The file name of the python interpreter's executable, e.g. `python3.11` — what the agent
/// reports as `process.executable.name` and the process's `comm`.
pub fn python_exe_name() -> String {
    python_bin()
        .file_name()
        .expect("python path has a file name")
        .to_string_lossy()
        .into_owned()
}

/// The node binary (canonical path). Override with `E2E_NODE`.
pub fn node_bin() -> &'static Path {
    static NODE: OnceLock<PathBuf> = OnceLock::new();
    NODE.get_or_init(|| {
        let node = required_tool("node", "E2E_NODE", "apt-get install nodejs");
        std::fs::canonicalize(&node).unwrap_or(node)
    })
}

/// The file name of the node executable (`node`).
pub fn node_exe_name() -> String {
    node_bin()
        .file_name()
        .expect("node path has a file name")
        .to_string_lossy()
        .into_owned()
}

/// The nginx binary. Override with `E2E_NGINX`.
pub fn nginx_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("E2E_NGINX") {
        return PathBuf::from(path);
    }
    which("nginx")
        .or_else(|| Some(PathBuf::from("/usr/sbin/nginx")).filter(|p| is_executable(p)))
        .unwrap_or_else(|| {
            panic!("nginx not found (or set E2E_NGINX); apt-get install nginx-light")
        })
}

/// The curl binary. Override with `E2E_CURL`.
pub fn curl_bin() -> PathBuf {
    required_tool("curl", "E2E_CURL", "apt-get install curl")
}
