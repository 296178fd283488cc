//! Privileged end-to-end tests of PostgreSQL tracing: a real PostgreSQL server and real
//! unmodified clients; the real agent; a real OTLP collector. Both sides are traced: the client
//! process (frontend) gives CLIENT spans, the postgres backend process gives SERVER spans.

use tests::postgres::{PSQL_DEMO, PSQL_DEMO_ERRORS};
use tests::{
    Agent, Collector, PgServer, ReceivedSpan, SpanKind, SpanStatus, Spans, psql_run, require_root,
};

/// Spans of `kind` whose resource is process `pid`, in end order.
fn of_process(spans: &Spans, kind: SpanKind, pid: u32) -> Vec<&ReceivedSpan> {
    let mut v: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| s.kind == kind && s.pid() == Some(pid))
        .collect();
    v.sort_by_key(|s| (s.end_unix_nanos, s.start_unix_nanos));
    v
}

fn expected_operation(sql: &str) -> &str {
    sql.split_whitespace().next().unwrap_or_default()
}

/// One span per statement, in order, with operation, outcome and SQLSTATE right.
fn check_statements(
    side: &str,
    got: &[&ReceivedSpan],
    statements: &[&str],
    errors: &[(usize, &str)],
) {
    let names: Vec<&str> = got.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        got.len(),
        statements.len(),
        "{side}: expected one span per statement ({statements:?}), got {names:?}"
    );
    for (i, (span, sql)) in got.iter().zip(statements).enumerate() {
        let what = format!("{side} span #{i} for {sql:?} (got name {:?})", span.name);
        assert_eq!(
            span.attr_str("db.system.name"),
            Some("postgresql"),
            "{what}"
        );
        assert_eq!(
            span.attr_str("db.operation.name"),
            Some(expected_operation(sql)),
            "{what}"
        );
        let text = span
            .attr_str("db.query.text")
            .unwrap_or_else(|| panic!("{what}: no db.query.text"));
        assert!(
            !text.contains("'one'") && !text.contains("'TWO'"),
            "{what}: literals must be redacted: {text}"
        );
        match errors.iter().find(|(at, _)| *at == i) {
            Some((_, sqlstate)) => {
                assert_eq!(
                    span.attr_str("db.response.status_code"),
                    Some(*sqlstate),
                    "{what}"
                );
                assert_eq!(span.status, SpanStatus::Error, "{what}: status");
            }
            None => {
                assert_eq!(span.attr_str("db.response.status_code"), None, "{what}");
                assert_ne!(span.status, SpanStatus::Error, "{what}: status");
            }
        }
        assert!(
            span.end_unix_nanos >= span.start_unix_nanos,
            "{what}: negative duration"
        );
    }
}

#[test]
fn psql_statements_give_client_and_server_spans() {
    let _serial = require_root();
    let collector = Collector::start();
    let server = PgServer::start();
    // The postmaster is selected; the backends it forks are selected by the kernel at fork.
    // psql is selected by name at exec, in the kernel, before its first byte.
    let mut agent = Agent::builder()
        .pid(server.pid())
        .comm("psql")
        .start(&collector);

    let run = psql_run(&server, "postgres", &PSQL_DEMO);
    let backend = server
        .statements()
        .iter()
        .find(|s| s.application == "psql")
        .map(|s| s.backend_pid)
        .expect("the server logged psql's statements");
    let n = PSQL_DEMO.len();
    collector.wait_for_spans(
        "psql client and backend spans",
        std::time::Duration::from_secs(15),
        |spans| {
            of_process(spans, SpanKind::Client, run.pid).len() >= n
                && of_process(spans, SpanKind::Server, backend).len() >= n
        },
    );
    let spans = agent.stop_and_collect(&collector, &[]);

    let client = of_process(&spans, SpanKind::Client, run.pid);
    check_statements("psql CLIENT", &client, &PSQL_DEMO, &PSQL_DEMO_ERRORS);
    let served = of_process(&spans, SpanKind::Server, backend);
    check_statements(
        "postgres backend SERVER",
        &served,
        &PSQL_DEMO,
        &PSQL_DEMO_ERRORS,
    );

    assert_eq!(
        served[0].service_name(),
        Some("postgresql"),
        "backend resource"
    );
    assert_eq!(client[0].service_name(), Some("psql"), "client resource");
    // The SELECT returned two rows; both sides say so.
    for span in [client[2], served[2]] {
        assert_eq!(
            span.attr_i64("db.response.returned_rows"),
            Some(2),
            "{}",
            span.name
        );
        assert_eq!(span.name, "SELECT e2e_items");
    }
    // Timing: every client span lies inside psql's run, and psql measured each statement.
    for (span, st) in client.iter().zip(&run.statements) {
        let duration = span.end_unix_nanos - span.start_unix_nanos;
        assert!(
            span.start_unix_nanos >= run.timing.start_unix_nanos
                && span.end_unix_nanos <= run.timing.end_unix_nanos,
            "client span {:?} outside psql's run window",
            span.name
        );
        assert!(
            duration <= st.client_duration_nanos + 2_000_000,
            "client span {:?} lasted {duration} ns, psql measured {} ns",
            span.name,
            st.client_duration_nanos
        );
    }
}

#[test]
fn pgbench_in_every_protocol_mode_gives_one_span_per_statement() {
    use tests::postgres::PGBENCH_SETUP_STATEMENTS;
    use tests::{PgbenchMode, PgbenchOptions, PgbenchScript, pgbench, pgbench_init};

    let _serial = require_root();
    let collector = Collector::start();
    let server = PgServer::start();
    pgbench_init(&server, "postgres", 1);
    let mut agent = Agent::builder()
        .pid(server.pid())
        .comm("pgbench")
        .start(&collector);

    let mut runs = Vec::new();
    for mode in [
        PgbenchMode::Simple,
        PgbenchMode::Extended,
        PgbenchMode::Prepared,
    ] {
        let options = PgbenchOptions {
            mode,
            script: PgbenchScript::SelectOnly,
            transactions: 25,
            clients: 1,
        };
        runs.push(pgbench(&server, "postgres", options));
    }
    let expected = |run: &tests::PgbenchRun| PGBENCH_SETUP_STATEMENTS + run.statements();
    collector.wait_for_spans(
        "pgbench client spans",
        std::time::Duration::from_secs(15),
        |spans| {
            runs.iter()
                .all(|run| of_process(spans, SpanKind::Client, run.pid).len() >= expected(run))
        },
    );
    let spans = agent.stop_and_collect(&collector, &[]);

    for run in &runs {
        let mode = run.options.mode;
        let client = of_process(&spans, SpanKind::Client, run.pid);
        assert_eq!(
            client.len(),
            expected(run),
            "{mode:?}: N statements sent → N client spans"
        );
        // The benchmark statements (after the setup connection's) are all the select-only
        // script's SELECT, each with its text, even the prepared ones executed by name.
        let bench: Vec<_> = client
            .iter()
            .filter(|s| s.attr_str("db.collection.name") == Some("pgbench_accounts"))
            .collect();
        assert_eq!(
            bench.len(),
            run.statements(),
            "{mode:?}: spans on pgbench_accounts"
        );
        for s in &bench {
            assert_eq!(s.attr_str("db.operation.name"), Some("SELECT"), "{mode:?}");
            assert_eq!(s.attr_i64("db.response.returned_rows"), Some(1), "{mode:?}");
            assert!(
                s.attr_str("db.query.text")
                    .is_some_and(|t| t.contains("pgbench_accounts")),
                "{mode:?}"
            );
        }
    }
    // Server side: every backend that served pgbench produced one span per statement too.
    let backends: std::collections::BTreeSet<u32> = server
        .statements()
        .iter()
        .filter(|s| s.application == "pgbench")
        .map(|s| s.backend_pid)
        .collect();
    let served: usize = backends
        .iter()
        .map(|pid| of_process(&spans, SpanKind::Server, *pid).len())
        .sum();
    let sent: usize = runs.iter().map(expected).sum();
    assert_eq!(
        served, sent,
        "N statements sent → N server spans (backends {backends:?})"
    );
}

#[test]
fn psycopg_pipeline_mode_matches_responses_in_order_and_marks_skipped_statements() {
    use tests::postgres::StatementOutcome;
    use tests::{PsycopgPlan, psycopg_client};

    let _serial = require_root();
    let collector = Collector::start();
    let server = PgServer::start();
    let mut agent = Agent::builder()
        .pid(server.pid())
        .comm("python3*")
        .start(&collector);
    let plan = PsycopgPlan {
        simple: 2,
        prepared: 3,
        pipeline: 5,
        pipeline_fail_at: 2,
    };
    let run = psycopg_client(&server, "postgres", plan);
    let n = run.statements.len();
    collector.wait_for_spans(
        "psycopg spans",
        std::time::Duration::from_secs(15),
        |spans| {
            of_process(spans, SpanKind::Client, run.pid).len() >= n
                && of_process(spans, SpanKind::Server, run.backend_pid).len() >= n
        },
    );
    let spans = agent.stop_and_collect(&collector, &[]);

    for (side, got) in [
        (
            "psycopg CLIENT",
            of_process(&spans, SpanKind::Client, run.pid),
        ),
        (
            "backend SERVER",
            of_process(&spans, SpanKind::Server, run.backend_pid),
        ),
    ] {
        assert_eq!(
            got.len(),
            n,
            "{side}: one span per statement: {:?}",
            got.iter().map(|s| &s.name).collect::<Vec<_>>()
        );
        // Pipelined statements can end in the same segment: compare as a multiset per outcome.
        for outcome in [
            StatementOutcome::Ok,
            StatementOutcome::Error,
            StatementOutcome::Skipped,
        ] {
            let want = run
                .statements
                .iter()
                .filter(|s| s.outcome == outcome)
                .count();
            let have = got
                .iter()
                .filter(|s| match outcome {
                    StatementOutcome::Ok => s.status != SpanStatus::Error,
                    StatementOutcome::Error => {
                        s.attr_str("db.response.status_code") == Some("42P01")
                    }
                    StatementOutcome::Skipped => s.attr("agent.db.skipped").is_some(),
                })
                .count();
            assert_eq!(have, want, "{side}: statements with outcome {outcome:?}");
        }
    }
}

#[test]
fn query_made_while_serving_an_http_request_is_a_child_of_its_server_span() {
    use tests::{Curl, HttpServer, PyServer, SpanFilter};

    let _serial = require_root();
    let collector = Collector::start();
    let db = PgServer::start();
    let conninfo = db.conninfo("postgres");
    // ThreadingHTTPServer: one thread per connection serves the request and makes the query.
    let web = PyServer::start_with_env(&[("E2E_PG_CONNINFO", conninfo.as_str())]);
    let mut agent = Agent::builder()
        .pid(web.pid())
        .pid(db.pid())
        .start(&collector);

    Curl::get(web.url("/db")).run();
    let http_server = SpanFilter::server().pid(web.pid()).path("/db");
    collector.wait_for_spans(
        "HTTP server span and its query",
        std::time::Duration::from_secs(15),
        |spans| {
            !spans.matching(&http_server).is_empty()
                && of_process(spans, SpanKind::Client, web.pid())
                    .iter()
                    .any(|s| s.attr_str("db.collection.name") == Some("pg_class"))
        },
    );
    let spans = agent.stop_and_collect(&collector, &[]);

    let parent = spans.expect_one(&http_server);
    let query = of_process(&spans, SpanKind::Client, web.pid())
        .into_iter()
        .find(|s| s.attr_str("db.collection.name") == Some("pg_class"))
        .expect("the query's CLIENT span");
    assert_eq!(query.attr_str("db.system.name"), Some("postgresql"));
    assert_eq!(
        query.trace_id, parent.trace_id,
        "the query joins the request's trace"
    );
    assert_eq!(
        query.parent_span_id.as_deref(),
        Some(parent.span_id.as_str()),
        "parent: the HTTP server span"
    );
    assert!(
        query.start_unix_nanos >= parent.start_unix_nanos
            && query.end_unix_nanos <= parent.end_unix_nanos,
        "the query lies inside the request"
    );
}

/// A statement's window with the slack of the psql test (the agent's clock conversion, the
/// clients' own clock readings).
fn within(span: &ReceivedSpan, window: &tests::Timing, what: &str) {
    const SLACK: u64 = 2_000_000;
    assert!(
        span.start_unix_nanos + SLACK >= window.start_unix_nanos
            && span.end_unix_nanos <= window.end_unix_nanos + SLACK,
        "{what}: span [{}, {}] outside the client's window [{}, {}]",
        span.start_unix_nanos,
        span.end_unix_nanos,
        window.start_unix_nanos,
        window.end_unix_nanos
    );
    let duration = span.end_unix_nanos.saturating_sub(span.start_unix_nanos);
    assert!(
        duration <= window.duration_nanos + SLACK,
        "{what}: span lasted {duration} ns, the client measured {} ns",
        window.duration_nanos
    );
}

/// The one backend that served `application`, and how many statements it logged.
fn backend_of(server: &PgServer, application: &str) -> (u32, usize) {
    let logged: Vec<_> = server
        .statements()
        .into_iter()
        .filter(|s| s.application == application)
        .collect();
    let backends: std::collections::BTreeSet<u32> = logged.iter().map(|s| s.backend_pid).collect();
    assert_eq!(
        backends.len(),
        1,
        "one backend logged {application}'s statements: {backends:?}"
    );
    (*backends.first().expect("one backend"), logged.len())
}

#[test]
fn node_postgres_simple_extended_and_named_statements_give_one_span_each() {
    use tests::pg_clients::{NODE_PG_APP, NodePgPlan, node_pg_client, node_pg_dir};

    let _serial = require_root();
    node_pg_dir(); // `npm ci` when node_modules is missing, before anything is timed.
    let collector = Collector::start();
    let server = PgServer::start();
    let mut agent = Agent::builder()
        .pid(server.pid())
        .comm(&tests::node_exe_name())
        .start(&collector);

    let run = node_pg_client(&server, "postgres", NodePgPlan::default());
    let n = run.statements.len();
    let (backend, logged) = backend_of(&server, NODE_PG_APP);
    assert_eq!(
        Some(backend),
        run.backend_pid,
        "the backend node-postgres was told (BackendKeyData) logged its statements"
    );
    assert_eq!(logged, n, "the server logged every statement: {}", run.json);
    collector.wait_for_spans(
        "node-postgres client and backend spans",
        std::time::Duration::from_secs(15),
        |spans| {
            of_process(spans, SpanKind::Client, run.pid).len() >= n
                && of_process(spans, SpanKind::Server, backend).len() >= n
        },
    );
    let spans = agent.stop_and_collect(&collector, &[]);

    let queries: Vec<&str> = run.statements.iter().map(|s| s.query.as_str()).collect();
    let errors = run.errors();
    for (side, got) in [
        ("node CLIENT", of_process(&spans, SpanKind::Client, run.pid)),
        (
            "backend SERVER",
            of_process(&spans, SpanKind::Server, backend),
        ),
    ] {
        // node-postgres waits for each answer: one span per statement, in order.
        check_statements(side, &got, &queries, &errors);
        for (i, (span, st)) in got.iter().zip(&run.statements).enumerate() {
            let what = format!(
                "{side} span #{i} ({} #{}: {:?})",
                st.phase, st.index, st.query
            );
            // Every execution carries its own text, also the named statement's after its Parse.
            let marker = match st.phase.as_str() {
                "simple" => "AS simple",
                "params" => "generate_series",
                "error" => "nope",
                "named" => "doubled",
                other => panic!("unexpected phase {other}"),
            };
            let text = span.attr_str("db.query.text").unwrap_or_default();
            assert!(text.contains(marker), "{what}: db.query.text {text:?}");
            assert!(span.attr("agent.db.skipped").is_none(), "{what}: skipped");
            match st.sqlstate {
                None => assert_eq!(
                    span.attr_i64("db.response.returned_rows"),
                    Some(st.rows as i64),
                    "{what}: rows"
                ),
                Some(_) => {
                    assert_eq!(span.attr_i64("db.response.returned_rows"), None, "{what}");
                    assert_eq!(span.name, "SELECT nope", "{what}");
                }
            }
            within(span, &st.timing, &what);
        }
    }
}

#[test]
fn tokio_postgres_pipelined_executions_give_one_span_each() {
    use tests::pg_clients::{
        PgClientRun, TOKIO_PG_EXE, TokioPgPlan, TokioRuntime, pg_tokio_bin, tokio_pg_client,
    };
    use tests::postgres::StatementOutcome;

    let _serial = require_root();
    pg_tokio_bin(); // Built once (about 2 minutes from scratch), before anything is timed.
    let collector = Collector::start();
    let server = PgServer::start();
    let mut agent = Agent::builder()
        .pid(server.pid())
        .comm(TOKIO_PG_EXE)
        .start(&collector);

    // The same client on both runtimes: on the multi-thread one the connection task writes and
    // reads on a worker thread; on the current-thread one every request is queued first.
    let runs: Vec<(PgClientRun, u32)> = [TokioRuntime::MultiThread, TokioRuntime::CurrentThread]
        .into_iter()
        .map(|runtime| {
            let plan = TokioPgPlan {
                runtime,
                ..TokioPgPlan::default()
            };
            let run = tokio_pg_client(&server, "postgres", plan);
            let (backend, logged) = backend_of(&server, plan.application());
            assert_eq!(
                logged,
                run.statements.len(),
                "{runtime:?}: the server logged every execution: {}",
                run.json
            );
            (run, backend)
        })
        .collect();
    collector.wait_for_spans(
        "tokio-postgres client and backend spans",
        std::time::Duration::from_secs(15),
        |spans| {
            runs.iter().all(|(run, backend)| {
                of_process(spans, SpanKind::Client, run.pid).len() >= run.statements.len()
                    && of_process(spans, SpanKind::Server, *backend).len() >= run.statements.len()
            })
        },
    );
    let spans = agent.stop_and_collect(&collector, &[]);

    for (run, backend) in &runs {
        let n = run.statements.len();
        let pipeline = run.pipeline.expect("pipeline window");
        for (side, got) in [
            (
                format!("{} CLIENT", run.application),
                of_process(&spans, SpanKind::Client, run.pid),
            ),
            (
                format!("{} backend SERVER", run.application),
                of_process(&spans, SpanKind::Server, *backend),
            ),
        ] {
            let names: Vec<&str> = got.iter().map(|s| s.name.as_str()).collect();
            // The prepare (Parse/Describe/Sync) and the final Close execute nothing: no span.
            assert_eq!(got.len(), n, "{side}: one span per execution: {names:?}");
            for span in &got {
                assert_eq!(span.attr_str("db.operation.name"), Some("SELECT"), "{side}");
                assert!(
                    span.attr("agent.db.skipped").is_none(),
                    "{side}: every execution has its own Sync, none is skipped: {}",
                    span.summary()
                );
            }
            // The pipelined answers may share a segment: compare outcomes and rows as multisets.
            let (piped, after): (Vec<&ReceivedSpan>, Vec<&ReceivedSpan>) = got
                .iter()
                .partition(|s| s.attr_str("db.response.status_code") != Some("42P01"));
            assert_eq!(
                after.len(),
                1,
                "{side}: one span for the failing Parse: {names:?}"
            );
            let failed = after[0];
            assert_eq!(failed.name, "SELECT nope", "{side}");
            assert_eq!(failed.status, SpanStatus::Error, "{side}");
            assert!(
                piped
                    .iter()
                    .all(|s| s.end_unix_nanos <= failed.end_unix_nanos),
                "{side}: the failing statement came after the pipeline"
            );
            within(
                failed,
                &run.phase("error")[0].timing,
                &format!("{side} 42P01"),
            );
            let outcome_of = |s: &ReceivedSpan| match s.attr_str("db.response.status_code") {
                None if s.status != SpanStatus::Error => {
                    Ok(s.attr_i64("db.response.returned_rows"))
                }
                code => Err(code.map(str::to_string)),
            };
            let mut have: Vec<_> = piped.iter().map(|s| outcome_of(s)).collect();
            let mut want: Vec<_> = run
                .phase("pipeline")
                .iter()
                .map(|st| match st.outcome {
                    StatementOutcome::Ok => Ok(Some(st.rows as i64)),
                    _ => Err(st.sqlstate.clone()),
                })
                .collect();
            have.sort();
            want.sort();
            assert_eq!(
                have, want,
                "{side}: outcomes (rows or SQLSTATE) of the pipeline"
            );
            for span in &piped {
                let text = span.attr_str("db.query.text").unwrap_or_default();
                assert!(
                    text.contains("generate_series"),
                    "{side}: the prepared statement's text on every execution: {text:?}"
                );
                within(
                    span,
                    &pipeline,
                    &format!("{side} pipelined {:?}", span.name),
                );
            }
        }
    }
}
