//! Self-tests of the PostgreSQL harness: a real server and real clients (psql, pgbench,
//! psycopg 3), without the agent. Under root the server runs as the `postgres` OS user.
//!
//! `CARGO_TARGET_DIR=/tmp/target-pgh cargo test -p tests --test postgres_harness -- --test-threads=1`

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tests::postgres::{
    PGBENCH_SETUP_STATEMENTS, PSQL_DEMO, PSQL_DEMO_ERRORS, PsycopgPhase, SQLSTATE_UNDEFINED_TABLE,
    ServerProtocol, StatementOutcome, pg_bin, pgbench_script_statements,
};
use tests::process::{ChildGuard, poll_until};
use tests::{
    PgServer, PgbenchMode, PgbenchOptions, PgbenchScript, PsycopgPlan, ServerStatement, pgbench,
    pgbench_init, port_open, psql_run, psycopg_client,
};

fn process_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Statements the server logged for `application`, after the first `skip`.
fn statements_of(server: &PgServer, application: &str, skip: usize) -> Vec<ServerStatement> {
    server
        .statements()
        .into_iter()
        .skip(skip)
        .filter(|s| s.application == application)
        .collect()
}

fn extended(name: &str) -> ServerProtocol {
    ServerProtocol::Extended {
        name: name.to_string(),
    }
}

/// A psql session that stays connected (in `pg_sleep`) until the guard is dropped.
fn idle_connection(server: &PgServer, seconds: u32) -> ChildGuard {
    let dir = tests::process::TestDir::new("pg-sleeper");
    let mut cmd = Command::new(pg_bin("psql"));
    cmd.args(["-X", "-q", "-d"])
        .arg(format!(
            "{} application_name=e2e-sleeper",
            server.conninfo("postgres")
        ))
        .arg("-c")
        .arg(format!("SELECT pg_sleep({seconds})"));
    ChildGuard::spawn("psql-sleeper", cmd, &dir.join("out"), &dir.join("err"))
}

#[test]
fn server_starts_fast_and_answers() {
    let started = Instant::now();
    let server = PgServer::start();
    let startup = started.elapsed();
    eprintln!(
        "PostgreSQL started in {startup:?} on port {} (postmaster {})",
        server.port(),
        server.pid()
    );
    assert!(
        startup < Duration::from_secs(5),
        "start-up took {startup:?}"
    );
    assert!(port_open(server.port()));
    assert_eq!(server.psql("SELECT 1"), "1");
    let version: u32 = server
        .psql("SHOW server_version_num")
        .parse()
        .expect("a number");
    assert!(version >= 150000, "server_version_num {version}");
    assert_eq!(server.psql("SHOW ssl"), "off");
    assert_eq!(server.psql("SHOW listen_addresses"), "127.0.0.1");
    assert_eq!(server.psql("SHOW fsync"), "off");
    assert_eq!(server.psql("SELECT current_user"), "postgres");
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let owner = std::fs::read_to_string(format!("/proc/{}/status", server.pid()))
            .expect("postmaster status");
        let uid_line = owner
            .lines()
            .find(|l| l.starts_with("Uid:"))
            .expect("Uid line");
        assert!(
            !uid_line.split_whitespace().skip(1).any(|u| u == "0"),
            "the postmaster runs as root: {uid_line}"
        );
    }
    // The postmaster is the pid in postmaster.pid; it has its background processes.
    let pid_file =
        std::fs::read_to_string(server.data_dir().join("postmaster.pid")).expect("postmaster.pid");
    assert_eq!(
        pid_file.lines().next(),
        Some(server.pid().to_string().as_str())
    );
    assert!(
        server.children().len() >= 3,
        "children: {:?}",
        server.children()
    );

    server.createdb("bench");
    assert_eq!(
        server.psql_in("bench", "SELECT current_database()"),
        "bench"
    );

    // A connected client has a backend, child of the postmaster, that knows the client's port.
    let mut sleeper = idle_connection(&server, 2);
    let backend = poll_until(Duration::from_secs(10), || {
        server
            .backends()
            .into_iter()
            .find(|b| b.title.contains("SELECT") || b.title.contains("idle"))
    })
    .unwrap_or_else(|| panic!("no client backend; children {:?}", server.children()));
    assert_eq!(backend.user, "postgres");
    assert_eq!(backend.database, "postgres");
    let client_port = backend.client_port.expect("a TCP client");
    assert_eq!(
        server.backend_for_client_port(client_port),
        Some(backend.pid)
    );
    assert_eq!(server.backend_pids(), vec![backend.pid]);
    // (A killed client would not end a backend busy in pg_sleep: it only notices when it
    // next reads or writes.)
    let status = sleeper.wait_timeout(Duration::from_secs(10));
    assert!(status.is_some_and(|s| s.success()), "psql: {status:?}");
    assert!(
        poll_until(Duration::from_secs(10), || server
            .backend_pids()
            .is_empty()
            .then_some(()))
        .is_some(),
        "backend still there after its client disconnected: {:?}",
        server.backends()
    );
}

#[test]
fn psql_runs_a_script_and_gets_the_expected_errors() {
    let server = PgServer::start();
    server.createdb("app");
    let run = psql_run(&server, "app", &PSQL_DEMO);
    assert_eq!(run.errors(), PSQL_DEMO_ERRORS.to_vec(), "{run:#?}");
    assert_eq!(run.statements.len(), PSQL_DEMO.len());
    assert!(
        run.statements[3].error.as_ref().expect("error").message
            == "relation \"nope\" does not exist"
    );
    assert!(run.stdout.contains("(2 rows)"), "stdout:\n{}", run.stdout);
    let client_total: u64 = run.statements.iter().map(|s| s.client_duration_nanos).sum();
    assert!(client_total > 0 && client_total < run.timing.duration_nanos);

    // The server saw exactly these statements, one backend, simple protocol, same errors.
    let seen = statements_of(&server, "psql", 0);
    let sql: Vec<&str> = seen.iter().map(|s| s.sql.as_str()).collect();
    let sent: Vec<&str> = run.statements.iter().map(|s| s.sql.as_str()).collect();
    assert_eq!(sql, sent);
    assert!(seen.iter().all(|s| s.protocol == ServerProtocol::Simple));
    assert!(seen.iter().all(|s| s.backend_pid == seen[0].backend_pid));
    assert_ne!(seen[0].backend_pid, server.pid());
    let errors: Vec<(usize, &str)> = seen
        .iter()
        .enumerate()
        .filter_map(|(i, s)| Some((i, s.sqlstate.as_deref()?)))
        .collect();
    assert_eq!(errors, PSQL_DEMO_ERRORS.to_vec());
}

#[test]
fn pgbench_modes_complete() {
    assert_eq!(
        pgbench_script_statements(PgbenchScript::TpcbLike).len(),
        PgbenchScript::TpcbLike.statements_per_transaction()
    );
    assert_eq!(
        pgbench_script_statements(PgbenchScript::SelectOnly).len(),
        PgbenchScript::SelectOnly.statements_per_transaction()
    );
    let server = PgServer::start();
    server.createdb("bench");
    let init = pgbench_init(&server, "bench", 1);
    eprintln!(
        "pgbench -i -s 1: {} ms",
        init.timing.duration_nanos / 1_000_000
    );
    assert_eq!(
        server.psql_in("bench", "SELECT count(*) FROM pgbench_accounts"),
        "100000"
    );
    for script in [PgbenchScript::SelectOnly, PgbenchScript::TpcbLike] {
        for mode in [
            PgbenchMode::Simple,
            PgbenchMode::Extended,
            PgbenchMode::Prepared,
        ] {
            let clients = if mode == PgbenchMode::Extended { 2 } else { 1 };
            let before = server.statements().len();
            let options = PgbenchOptions {
                mode,
                script,
                transactions: 5,
                clients,
            };
            let run = pgbench(&server, "bench", options);
            assert_eq!(run.processed, 5 * u64::from(clients));
            assert_eq!(run.transactions.len(), 5 * clients as usize);
            let per_txn = script.statements_per_transaction();
            assert_eq!(run.statements(), 5 * clients as usize * per_txn);
            for t in &run.transactions {
                assert!(
                    t.end_unix_nanos >= run.timing.start_unix_nanos
                        && t.end_unix_nanos <= run.timing.end_unix_nanos + 1_000
                        && t.latency_nanos < run.timing.duration_nanos,
                    "{t:?} outside {:?}",
                    run.timing
                );
            }
            // Ground truth: the setup connection's statements, then the clients' ones.
            let seen = statements_of(&server, "pgbench", before);
            assert_eq!(
                seen.len(),
                run.statements() + PGBENCH_SETUP_STATEMENTS,
                "{options:?}: {seen:#?}"
            );
            assert!(seen.iter().all(|s| s.sqlstate.is_none()));
            let setup_backend = seen[0].backend_pid;
            let client_side: Vec<&ServerStatement> = seen
                .iter()
                .filter(|s| s.backend_pid != setup_backend)
                .collect();
            assert_eq!(client_side.len(), run.statements(), "{options:?}");
            let backends: std::collections::BTreeSet<u32> =
                client_side.iter().map(|s| s.backend_pid).collect();
            assert_eq!(backends.len(), clients as usize);
            for s in &client_side {
                let ok = match mode {
                    PgbenchMode::Simple => s.protocol == ServerProtocol::Simple,
                    PgbenchMode::Extended => s.protocol == extended("<unnamed>"),
                    PgbenchMode::Prepared => {
                        matches!(&s.protocol, ServerProtocol::Extended { name } if name.starts_with("P_"))
                    }
                };
                assert!(ok, "{options:?}: {s:?}");
            }
        }
    }
}

#[test]
fn psycopg_script_reports_simple_prepared_and_pipelined_statements() {
    let server = PgServer::start();
    server.createdb("app");
    let plan = PsycopgPlan {
        simple: 3,
        prepared: 4,
        pipeline: 5,
        pipeline_fail_at: 2,
    };
    let run = psycopg_client(&server, "app", plan);
    eprintln!(
        "psycopg {} ({}, libpq {})",
        run.psycopg_version, run.implementation, run.libpq_version
    );
    assert_eq!(run.phase(PsycopgPhase::Simple).len(), 3);
    assert_eq!(run.phase(PsycopgPhase::Prepared).len(), 4);
    let pipeline = run.phase(PsycopgPhase::Pipeline);
    let outcomes: Vec<StatementOutcome> = pipeline.iter().map(|s| s.outcome).collect();
    assert_eq!(
        outcomes,
        vec![
            StatementOutcome::Ok,
            StatementOutcome::Ok,
            StatementOutcome::Error,
            StatementOutcome::Skipped,
            StatementOutcome::Skipped,
        ],
        "{}",
        run.json
    );
    assert_eq!(
        pipeline[2].sqlstate.as_deref(),
        Some(SQLSTATE_UNDEFINED_TABLE)
    );
    assert_eq!(
        run.pipeline_error.as_deref(),
        Some(SQLSTATE_UNDEFINED_TABLE)
    );
    for s in &run.statements {
        assert!(
            s.timing.start_unix_nanos >= run.timing.start_unix_nanos
                && s.timing.end_unix_nanos <= run.timing.end_unix_nanos
                && s.timing.duration_nanos
                    <= s.timing.end_unix_nanos - s.timing.start_unix_nanos + 1_000_000,
            "{s:?} outside {:?}",
            run.timing
        );
    }
    assert_eq!(
        server.backend_for_client_port(run.local_port),
        Some(run.backend_pid)
    );

    // Ground truth: what the server executed on that backend.
    let seen: Vec<ServerStatement> = statements_of(&server, "e2e-psycopg", 0);
    assert!(seen.iter().all(|s| s.backend_pid == run.backend_pid));
    let summary: Vec<(ServerProtocol, &str, Option<&str>)> = seen
        .iter()
        .map(|s| (s.protocol.clone(), s.sql.as_str(), s.sqlstate.as_deref()))
        .collect();
    let mut expected: Vec<(ServerProtocol, &str, Option<&str>)> = Vec::new();
    for s in run.phase(PsycopgPhase::Simple) {
        expected.push((ServerProtocol::Simple, s.query.as_str(), None));
    }
    for s in run.phase(PsycopgPhase::Prepared) {
        expected.push((extended("_pg3_0"), s.query.as_str(), None));
    }
    for s in &pipeline[..2] {
        expected.push((extended("<unnamed>"), s.query.as_str(), None));
    }
    expected.push((
        ServerProtocol::NotLogged,
        "SELECT * FROM nope",
        Some(SQLSTATE_UNDEFINED_TABLE),
    ));
    assert_eq!(summary, expected, "server log:\n{}", server.log());
    let params: Vec<Option<&str>> = seen[3..7].iter().map(|s| s.parameters.as_deref()).collect();
    assert_eq!(
        params,
        vec![
            Some("$1 = '0'"),
            Some("$1 = '1'"),
            Some("$1 = '2'"),
            Some("$1 = '3'")
        ]
    );
}

#[test]
fn server_is_gone_after_drop() {
    let server = PgServer::start();
    let port = server.port();
    let data_dir = server.data_dir().to_path_buf();
    let sleeper = idle_connection(&server, 60);
    assert!(
        poll_until(Duration::from_secs(10), || (!server
            .backend_pids()
            .is_empty())
        .then_some(()))
        .is_some()
    );
    let mut pids = server.children();
    pids.push(server.pid());
    let started = Instant::now();
    drop(server);
    eprintln!(
        "fast shutdown with a client connected: {:?}",
        started.elapsed()
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    let alive: Vec<u32> = pids.iter().copied().filter(|p| process_alive(*p)).collect();
    assert!(alive.is_empty(), "still alive after drop: {alive:?}");
    assert!(!port_open(port), "port {port} still open");
    assert!(!data_dir.exists(), "{} not removed", data_dir.display());
    drop(sleeper);

    // stop(): a clean fast shutdown.
    let server = PgServer::start();
    let pid = server.pid();
    let log = server.stop();
    assert!(log.contains("database system is shut down"), "log:\n{log}");
    assert!(!process_alive(pid));
}

#[test]
fn server_is_killed_when_the_test_panics() {
    let mut seen: Option<(Vec<u32>, u16, PathBuf, PathBuf)> = None;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let server = PgServer::start();
        let mut pids = server.children();
        pids.push(server.pid());
        seen = Some((
            pids,
            server.port(),
            server.data_dir().to_path_buf(),
            server.dir().to_path_buf(),
        ));
        panic!("deliberate panic with a running server");
    }));
    assert!(result.is_err());
    let (pids, port, data_dir, dir) = seen.expect("server started");
    let alive: Vec<u32> = pids.iter().copied().filter(|p| process_alive(*p)).collect();
    assert!(alive.is_empty(), "still alive after the panic: {alive:?}");
    assert!(!port_open(port));
    // The directories of a panicking test are kept for inspection; this panic was deliberate.
    assert!(data_dir.exists() && dir.exists());
    let _ = std::fs::remove_dir_all(data_dir);
    let _ = std::fs::remove_dir_all(dir);
}
