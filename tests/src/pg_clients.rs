//! More real PostgreSQL clients for the end-to-end tests, each reporting what it sent: node-postgres
//! ([`node_pg_client`], `tests/fixtures/pg_node/`) and tokio-postgres ([`tokio_pg_client`],
//! `tests/fixtures/pg_tokio/`, a standalone crate built on first use).
//!
//! Both print a JSON summary (pid, statements in order with outcome, SQLSTATE, rows and timing),
//! parsed into a [`PgClientRun`]. Both connect to 127.0.0.1 without SSL, as the database
//! superuser, with an `application_name` of their own, so that [`PgServer::statements`] finds
//! their backend.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use crate::clients::{Timing, unix_nanos_now};
use crate::postgres::{PG_USER, PgServer, StatementOutcome};
use crate::process::{run_to_completion, tail};
use crate::{node_bin, which, workspace_dir};

const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);
/// `npm ci` of the node fixture (a few seconds from the registry; far less from npm's cache).
const INSTALL_TIMEOUT: Duration = Duration::from_secs(300);
/// `cargo build --release` of the tokio fixture: about 2 minutes from scratch on this VM's
/// 2 cores (crates downloaded), a fraction of a second once built.
const BUILD_TIMEOUT: Duration = Duration::from_secs(900);

/// `application_name` of [`node_pg_client`].
pub const NODE_PG_APP: &str = "e2e-node-pg";
/// `application_name` of [`tokio_pg_client`] on tokio's multi-thread runtime.
pub const TOKIO_PG_APP: &str = "e2e-tokio-pg";
/// `application_name` of [`tokio_pg_client`] on tokio's current-thread runtime.
pub const TOKIO_PG_CURRENT_APP: &str = "e2e-tokio-pg-current";
/// The tokio-postgres client's executable name, hence its `comm`.
pub const TOKIO_PG_EXE: &str = "pg_tokio";

/// One statement a client ran, from its summary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgClientStatement {
    /// The client's phase: `simple`, `params`, `error`, `named` (node); `pipeline`, `error`
    /// (tokio).
    pub phase: String,
    /// Within its phase.
    pub index: usize,
    /// The text the server receives (`$1` placeholders).
    pub query: String,
    pub params: Vec<String>,
    /// `Ok` or `Error` (neither client sends statements the server can skip).
    pub outcome: StatementOutcome,
    pub sqlstate: Option<String>,
    /// Rows received (0 for an error).
    pub rows: u64,
    /// The statement's own window (call → result); for pipelined statements the window of the
    /// whole pipeline.
    pub timing: Timing,
}

/// The outcome of [`node_pg_client`] or [`tokio_pg_client`].
#[derive(Debug, Clone)]
pub struct PgClientRun {
    /// The client process.
    pub pid: u32,
    /// The connection's `application_name`.
    pub application: String,
    /// The backend pid the client was told (BackendKeyData): node-postgres only.
    pub backend_pid: Option<u32>,
    pub statements: Vec<PgClientStatement>,
    /// The pipeline's window: tokio-postgres only.
    pub pipeline: Option<Timing>,
    /// Connect → close, as the client measured it.
    pub timing: Timing,
    /// From before the process was spawned to after it exited.
    pub process: Timing,
    /// The JSON summary as printed.
    pub json: String,
}

impl PgClientRun {
    pub fn phase(&self, phase: &str) -> Vec<&PgClientStatement> {
        self.statements
            .iter()
            .filter(|s| s.phase == phase)
            .collect()
    }

    /// (index, SQLSTATE) of the failed statements.
    pub fn errors(&self) -> Vec<(usize, &str)> {
        self.statements
            .iter()
            .enumerate()
            .filter_map(|(i, s)| Some((i, s.sqlstate.as_deref()?)))
            .collect()
    }
}

/// What [`node_pg_client`] runs on its one connection (see `tests/fixtures/pg_node/pg_client.js`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodePgPlan {
    /// `SELECT <i> AS simple` without values: simple query protocol.
    pub simple: usize,
    /// `SELECT generate_series(1, $1::int) AS n` with value i + 1 (i + 1 rows): extended
    /// protocol, unnamed statement.
    pub params: usize,
    /// Executions of the named statement `get` (`SELECT $1::int * 2 AS doubled`), parsed with
    /// the first one. One failing statement (`SELECT * FROM nope WHERE id = $1`, 42P01 at Parse)
    /// runs between the `params` and these.
    pub named: usize,
}

impl NodePgPlan {
    /// Statements sent: simple + params + 1 failing + named.
    pub fn statements(&self) -> usize {
        self.simple + self.params + 1 + self.named
    }
}

impl Default for NodePgPlan {
    fn default() -> Self {
        NodePgPlan {
            simple: 3,
            params: 3,
            named: 4,
        }
    }
}

/// tokio's runtime in [`tokio_pg_client`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokioRuntime {
    /// Two worker threads (`tokio-runtime-w`); the connection task runs on one of them.
    MultiThread,
    /// Everything on the main thread: every pipelined request is queued before the first write.
    CurrentThread,
}

/// What [`tokio_pg_client`] runs (see `tests/fixtures/pg_tokio/src/main.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokioPgPlan {
    pub runtime: TokioRuntime,
    /// Executions of the prepared `SELECT n * 1000 / $1::int AS q FROM generate_series(1, $2::int)
    /// AS n` issued at once on one connection; execution i returns i + 1 rows.
    pub pipeline: usize,
    /// The pipelined execution whose divisor is 0 (22012 at execution). A failing
    /// `SELECT * FROM nope` (42P01 at Parse) follows the pipeline.
    pub fail_at: usize,
}

impl TokioPgPlan {
    /// Executions sent: the pipeline + 1 failing (the `prepare` alone executes nothing).
    pub fn statements(&self) -> usize {
        self.pipeline + 1
    }

    pub fn application(&self) -> &'static str {
        match self.runtime {
            TokioRuntime::MultiThread => TOKIO_PG_APP,
            TokioRuntime::CurrentThread => TOKIO_PG_CURRENT_APP,
        }
    }
}

impl Default for TokioPgPlan {
    fn default() -> Self {
        TokioPgPlan {
            runtime: TokioRuntime::MultiThread,
            pipeline: 6,
            fail_at: 2,
        }
    }
}

/// A client command without any inherited `PG*` variable (libpq's and node-postgres's
/// defaults): everything the clients need is on their command line.
fn clean_command(program: &Path) -> Command {
    let mut cmd = Command::new(program);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PG") {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// `tests/fixtures/pg_node`, with its `node_modules` installed (`npm ci --omit=dev` from the
/// committed lock file, once, when missing). Override npm with `E2E_NPM`.
pub fn node_pg_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = workspace_dir().join("tests/fixtures/pg_node");
        if dir.join("node_modules/pg/package.json").exists() {
            return dir;
        }
        let npm = std::env::var_os("E2E_NPM")
            .map(PathBuf::from)
            .or_else(|| which("npm"))
            .unwrap_or_else(|| {
                panic!("`npm` not found on PATH (or set E2E_NPM): apt-get install npm")
            });
        let mut cmd = Command::new(npm);
        cmd.args(["ci", "--omit=dev", "--no-audit", "--no-fund"])
            .current_dir(&dir);
        let (status, stdout, stderr, _) = run_to_completion("npm-ci", cmd, INSTALL_TIMEOUT);
        assert!(
            status.success() && dir.join("node_modules/pg/package.json").exists(),
            "npm ci in {} failed ({status})\nstdout:\n{}\nstderr:\n{}",
            dir.display(),
            tail(&stdout, 20),
            tail(&stderr, 30)
        );
        dir
    })
}

/// The tokio-postgres client, built once per test binary with `cargo build --release --locked`
/// into `target/pg_tokio` (a no-op once built). Override cargo with `CARGO` (set by `cargo test`).
pub fn pg_tokio_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let root = workspace_dir();
        let manifest = root.join("tests/fixtures/pg_tokio/Cargo.toml");
        let target = root.join("target/pg_tokio");
        let cargo = std::env::var_os("CARGO").map_or_else(|| PathBuf::from("cargo"), PathBuf::from);
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--release", "--locked", "--manifest-path"])
            .arg(&manifest)
            .arg("--target-dir")
            .arg(&target)
            .current_dir(manifest.parent().expect("manifest has a directory"))
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("CARGO_BUILD_TARGET_DIR");
        let (status, stdout, stderr, _) = run_to_completion("pg_tokio-build", cmd, BUILD_TIMEOUT);
        let bin = target.join("release").join(TOKIO_PG_EXE);
        assert!(
            status.success() && bin.exists(),
            "building {} failed ({status})\nstdout:\n{}\nstderr:\n{}",
            manifest.display(),
            tail(&stdout, 20),
            tail(&stderr, 40)
        );
        bin
    })
}

/// Runs `tests/fixtures/pg_node/pg_client.js` (node-postgres, one connection,
/// application_name [`NODE_PG_APP`]) with `plan`. Panics unless it exits 0 with a summary that
/// matches the plan.
pub fn node_pg_client(server: &PgServer, db: &str, plan: NodePgPlan) -> PgClientRun {
    let dir = node_pg_dir();
    let mut cmd = clean_command(node_bin());
    cmd.arg(dir.join("pg_client.js"))
        .arg(server.port().to_string())
        .arg(db)
        .args([
            plan.simple.to_string(),
            plan.params.to_string(),
            plan.named.to_string(),
        ])
        .current_dir(dir);
    let run = run_client("pg_client.js", cmd, NODE_PG_APP);
    let expected = plan.statements();
    assert!(
        run.statements.len() == expected && run.backend_pid.is_some(),
        "pg_client.js (pid {}) reported {} statements, expected {expected}, and backend {:?}: {}",
        run.pid,
        run.statements.len(),
        run.backend_pid,
        run.json
    );
    run
}

/// Runs the tokio-postgres client (one connection, application_name
/// [`TokioPgPlan::application`]) with `plan`, building it first if needed ([`pg_tokio_bin`]).
/// Panics unless it exits 0 with a summary that matches the plan.
pub fn tokio_pg_client(server: &PgServer, db: &str, plan: TokioPgPlan) -> PgClientRun {
    let application = plan.application();
    let conninfo = format!(
        "host=127.0.0.1 port={} user={PG_USER} dbname={db} application_name={application} \
         sslmode=disable",
        server.port()
    );
    let runtime = match plan.runtime {
        TokioRuntime::MultiThread => "multi",
        TokioRuntime::CurrentThread => "current",
    };
    let mut cmd = clean_command(pg_tokio_bin());
    cmd.arg(conninfo)
        .arg(runtime)
        .args([plan.pipeline.to_string(), plan.fail_at.to_string()]);
    let run = run_client(TOKIO_PG_EXE, cmd, application);
    let expected = plan.statements();
    assert!(
        run.statements.len() == expected && run.pipeline.is_some(),
        "{TOKIO_PG_EXE} (pid {}) reported {} statements, expected {expected}: {}",
        run.pid,
        run.statements.len(),
        run.json
    );
    run
}

fn run_client(name: &str, cmd: Command, application: &str) -> PgClientRun {
    let start = unix_nanos_now();
    let (status, stdout, stderr, pid) = run_to_completion(name, cmd, CLIENT_TIMEOUT);
    let end = unix_nanos_now();
    let process = Timing {
        start_unix_nanos: start,
        end_unix_nanos: end,
        duration_nanos: end - start,
    };
    let line = stdout.lines().rev().find(|l| l.starts_with('{'));
    let parsed = line
        .ok_or_else(|| "no JSON line".to_string())
        .and_then(|l| {
            let value: Value = serde_json::from_str(l).map_err(|e| e.to_string())?;
            parse_summary(&value, l, application, process)
                .ok_or_else(|| format!("unexpected JSON shape: {l}"))
        });
    match (status.success(), parsed) {
        (true, Ok(run)) if run.pid == pid => run,
        (_, parsed) => panic!(
            "{name} (pid {pid}) failed: exit {status} ({:?})\nstdout:\n{}\nstderr:\n{}",
            parsed.map(|run| format!("reported pid {}", run.pid)),
            tail(&stdout, 20),
            tail(&stderr, 40)
        ),
    }
}

fn parse_summary(v: &Value, raw: &str, application: &str, process: Timing) -> Option<PgClientRun> {
    let timing = Timing::from_json;
    let mut statements = Vec::new();
    for s in v.get("statements")?.as_array()? {
        statements.push(PgClientStatement {
            phase: s.get("phase")?.as_str()?.to_string(),
            index: usize::try_from(s.get("index")?.as_u64()?).ok()?,
            query: s.get("query")?.as_str()?.to_string(),
            params: s
                .get("params")?
                .as_array()?
                .iter()
                .map(|p| p.as_str().map(str::to_string))
                .collect::<Option<Vec<String>>>()?,
            outcome: match s.get("status")?.as_str()? {
                "ok" => StatementOutcome::Ok,
                "error" => StatementOutcome::Error,
                _ => return None,
            },
            sqlstate: match s.get("sqlstate")? {
                Value::Null => None,
                other => Some(other.as_str()?.to_string()),
            },
            rows: s.get("rows")?.as_u64()?,
            timing: timing(s)?,
        });
    }
    let pipeline = match v.get("pipeline") {
        Some(p) => Some(timing(p)?),
        None => None,
    };
    let backend_pid = match v.get("backend_pid") {
        Some(p) => Some(u32::try_from(p.as_u64()?).ok()?),
        None => None,
    };
    Some(PgClientRun {
        pid: u32::try_from(v.get("pid")?.as_u64()?).ok()?,
        application: application.to_string(),
        backend_pid,
        statements,
        pipeline,
        timing: timing(v)?,
        process,
        json: raw.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_summaries() {
        let node = r#"{"pid":25214,"backend_pid":25231,"pg":"8.23.1","node":"v20.20.2","start_ns":"1795399773073129000","end_ns":"1795399773118940000","statements":[{"phase":"simple","index":0,"query":"SELECT 0 AS simple","params":[],"start_ns":"1795399773100135000","end_ns":"1795399773102374000","dur_ns":"2210503","status":"ok","sqlstate":null,"rows":1},{"phase":"error","index":0,"query":"SELECT * FROM nope WHERE id = $1","params":["1"],"start_ns":"1795399773110371000","end_ns":"1795399773111397000","dur_ns":"1017077","status":"error","sqlstate":"42P01","rows":0}]}"#;
        let process = Timing {
            start_unix_nanos: 1,
            end_unix_nanos: 2,
            duration_nanos: 1,
        };
        let run = parse_summary(
            &serde_json::from_str(node).expect("json"),
            node,
            NODE_PG_APP,
            process,
        )
        .expect("summary");
        assert_eq!((run.pid, run.backend_pid), (25214, Some(25231)));
        assert_eq!(run.timing.start_unix_nanos, 1_795_399_773_073_129_000);
        assert_eq!(run.statements.len(), 2);
        assert_eq!(run.statements[0].timing.duration_nanos, 2_210_503);
        assert_eq!(run.statements[1].params, vec!["1".to_string()]);
        assert_eq!(run.errors(), vec![(1, "42P01")]);
        assert!(run.pipeline.is_none());

        let tokio = r#"{"pid":29568,"runtime":"multi","start_ns":1795399957096480804,"end_ns":1795399957112820314,"pipeline":{"start_ns":1795399957107025152,"end_ns":1795399957108578112,"dur_ns":1551778},"statements":[{"phase":"pipeline","index":0,"query":"SELECT 1000 / $1::int AS q FROM generate_series(1, $2::int) AS n","params":["1","1"],"status":"ok","sqlstate":null,"rows":1,"start_ns":1795399957107025152,"end_ns":1795399957108578112,"dur_ns":1551778}]}"#;
        let run = parse_summary(
            &serde_json::from_str(tokio).expect("json"),
            tokio,
            TOKIO_PG_APP,
            process,
        )
        .expect("summary");
        assert_eq!(run.backend_pid, None);
        assert_eq!(run.pipeline.map(|p| p.duration_nanos), Some(1_551_778));
        assert_eq!(run.phase("pipeline")[0].rows, 1);
        assert_eq!(run.statements[0].outcome, StatementOutcome::Ok);
    }
}
