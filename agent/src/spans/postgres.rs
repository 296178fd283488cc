//! PostgreSQL statement → span, with OpenTelemetry database semantic conventions.

use std::{collections::HashMap, sync::Arc};

use super::{
    context::{Clock, IdGenerator},
    http::ConnInfo,
    ip_text,
    model::{Attribute, Resource, SpanKind, SpanRecord, SpanStatus},
};
use crate::{
    protocols::{
        postgres::{PgOutcome, PgStatement, query_summary, sanitize_query},
        segment::Role,
    },
    redact,
};

/// What the span takes from a statement's text: computed once per distinct parameterized
/// statement (see `QueryCache`).
#[derive(Debug)]
struct QueryAnalysis {
    operation: String,
    collection: Option<String>,
    /// Literals replaced by placeholders.
    sanitized: String,
}

impl QueryAnalysis {
    fn of(sql: &str) -> Self {
        let (operation, collection) = query_summary(sql);
        Self {
            operation,
            collection,
            sanitized: sanitize_query(sql),
        }
    }
}

/// Analyses of statements without literals (`SELECT … WHERE id = $1`): applications repeat
/// them, and lexing each execution again was a tenth of the event thread's time under load.
/// Statements with literals differ per execution and are not kept. Bounded: emptied when full.
#[derive(Debug, Default)]
pub struct QueryCache {
    analyses: HashMap<Box<str>, Arc<QueryAnalysis>>,
}

impl QueryCache {
    const MAX_ENTRIES: usize = 1024;
    /// Longer texts are analysed each time (their key would cost more memory than it saves).
    const MAX_KEY_LEN: usize = 2048;

    fn analyse(&mut self, sql: &str) -> Arc<QueryAnalysis> {
        if let Some(found) = self.analyses.get(sql) {
            return found.clone();
        }
        let analysis = Arc::new(QueryAnalysis::of(sql));
        // A `?` in the sanitized text is a replaced literal (parameters stay `$n`).
        if sql.len() <= Self::MAX_KEY_LEN && !analysis.sanitized.contains('?') {
            if self.analyses.len() >= Self::MAX_ENTRIES {
                self.analyses.clear();
            }
            self.analyses.insert(sql.into(), analysis.clone());
        }
        analysis
    }
}

/// `raw_query`: record statement text as sent (`--db-raw-query`); otherwise literals are
/// replaced by placeholders.
pub fn build_db_span(
    st: &PgStatement,
    raw_query: bool,
    queries: &mut QueryCache,
    conn: ConnInfo,
    resource: Arc<Resource>,
    clock: Clock,
    ids: &mut IdGenerator,
) -> SpanRecord {
    let kind = match st.role {
        Role::Client => SpanKind::Client,
        Role::Server => SpanKind::Server,
    };
    let mut attrs = Vec::with_capacity(16);
    attrs.push(Attribute::str("db.system.name", "postgresql"));
    if let Some(db) = &st.database {
        attrs.push(Attribute::str("db.namespace", db.clone()));
    }
    let analysis = st.query.as_deref().map(|q| queries.analyse(q));
    let collection = analysis.as_ref().and_then(|a| a.collection.clone());
    let operation = st.operation.clone().or_else(|| {
        analysis
            .as_ref()
            .filter(|a| !a.operation.is_empty())
            .map(|a| a.operation.clone())
    });
    if let Some(op) = &operation {
        attrs.push(Attribute::str("db.operation.name", op.clone()));
    }
    if let Some(table) = &collection {
        attrs.push(Attribute::str("db.collection.name", table.clone()));
    }
    let summary = match (&operation, &collection) {
        (Some(op), Some(table)) => Some(format!("{op} {table}")),
        (Some(op), None) => Some(op.clone()),
        _ => None,
    };
    if let Some(summary) = &summary {
        attrs.push(Attribute::str("db.query.summary", summary.clone()));
    }
    match (&st.query, &analysis) {
        // Literals are replaced by placeholders unless asked: statement text carries personal data.
        (Some(q), _) if raw_query => attrs.push(Attribute::str("db.query.text", q.clone())),
        (Some(_), Some(a)) => attrs.push(Attribute::str("db.query.text", a.sanitized.clone())),
        // Prepared before the agent started watching this connection: say so.
        _ => attrs.push(Attribute::bool("agent.db.query.text_unknown", true)),
    }
    if st.query_truncated {
        attrs.push(Attribute::bool("agent.db.query.text_truncated", true));
    }
    if let Some(rows) = st.rows.filter(|_| st.error.is_none()) {
        attrs.push(Attribute::int(
            "db.response.returned_rows",
            i64::try_from(rows).unwrap_or(i64::MAX),
        ));
    }
    let (local, remote) = (ConnInfo::known(conn.local), ConnInfo::known(conn.remote));
    let server_side = match kind {
        SpanKind::Client => remote,
        SpanKind::Server => local,
    };
    if let Some(server) = server_side {
        attrs.push(Attribute::str("server.address", ip_text(server.ip())));
        attrs.push(Attribute::int("server.port", server.port().into()));
    }
    if let Some(peer) = remote {
        attrs.push(Attribute::str("network.peer.address", ip_text(peer.ip())));
        attrs.push(Attribute::int("network.peer.port", peer.port().into()));
    }

    let mut status = SpanStatus::Unset;
    if let Some(err) = &st.error {
        let code = err.code.clone().unwrap_or_else(|| "_OTHER".into());
        attrs.push(Attribute::str("db.response.status_code", code.clone()));
        attrs.push(Attribute::str("error.type", code));
        // Messages quote the statement's literals (`invalid input syntax …: "alice@…"`).
        let message = err.message.as_deref().unwrap_or_default();
        let description = if raw_query {
            message.to_owned()
        } else {
            redact::free_text(message).into_owned()
        };
        status = SpanStatus::Error { description };
    }
    match st.outcome {
        PgOutcome::Complete => {}
        PgOutcome::Skipped => {
            attrs.push(Attribute::bool("agent.db.skipped", true));
            status = SpanStatus::Error {
                description: "not executed: an earlier statement of the pipeline failed".into(),
            };
        }
        PgOutcome::ConnectionClosed => {
            if st.error.is_none() {
                attrs.push(Attribute::str("error.type", "connection_closed"));
                status = SpanStatus::Error {
                    description: "connection closed before the statement completed".into(),
                };
            }
        }
        PgOutcome::Resynced => attrs.push(Attribute::bool("agent.db.end_inferred", true)),
    }

    let name = summary.unwrap_or_else(|| "postgresql".into());
    SpanRecord {
        trace_id: ids.trace_id(),
        span_id: ids.span_id(),
        parent_span_id: None,
        parent_is_remote: false,
        trace_state: None,
        name,
        kind,
        start_unix_nanos: clock.to_unix_nanos(st.start_ns),
        end_unix_nanos: clock.to_unix_nanos(st.end_ns.max(st.start_ns)),
        attributes: attrs,
        status,
        resource,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocols::postgres::PgError;
    use crate::spans::model::AttrValue;

    fn statement(query: Option<&str>) -> PgStatement {
        PgStatement {
            role: Role::Client,
            query: query.map(String::from),
            query_truncated: false,
            prepared_name: None,
            operation: None,
            command_tag: Some("SELECT 2".into()),
            rows: Some(2),
            data_rows: 2,
            portal_suspended: false,
            error: None,
            start_ns: 100,
            end_ns: 350,
            database: Some("shop".into()),
            user: Some("app".into()),
            application_name: None,
            tid: 1,
            outcome: PgOutcome::Complete,
        }
    }

    fn build(st: &PgStatement) -> SpanRecord {
        let conn = ConnInfo {
            local: "127.0.0.1:40000".parse().expect("addr"),
            remote: "127.0.0.1:5432".parse().expect("addr"),
            tls: false,
        };
        let resource = Arc::new(Resource {
            pid: 1,
            service_name: "app".into(),
            attributes: vec![],
        });
        build_db_span(
            st,
            false,
            &mut QueryCache::default(),
            conn,
            resource,
            Clock::with_offset(0),
            &mut IdGenerator::new(),
        )
    }

    fn attr<'a>(span: &'a SpanRecord, key: &str) -> Option<&'a AttrValue> {
        span.attr(key)
    }

    #[test]
    fn client_span_has_db_semconv() {
        let span = build(&statement(Some(
            "SELECT name FROM users WHERE id = 42 AND email = 'a@b'",
        )));
        assert_eq!(span.kind, SpanKind::Client);
        assert_eq!(span.name, "SELECT users");
        assert_eq!(
            attr(&span, "db.system.name"),
            Some(&AttrValue::Str("postgresql".into()))
        );
        assert_eq!(
            attr(&span, "db.namespace"),
            Some(&AttrValue::Str("shop".into()))
        );
        assert_eq!(
            attr(&span, "db.operation.name"),
            Some(&AttrValue::Str("SELECT".into()))
        );
        assert_eq!(
            attr(&span, "db.collection.name"),
            Some(&AttrValue::Str("users".into()))
        );
        let Some(AttrValue::Str(text)) = attr(&span, "db.query.text") else {
            panic!("no query text");
        };
        assert!(
            !text.contains("42") && !text.contains("a@b"),
            "literals must be replaced: {text}"
        );
        assert_eq!(
            attr(&span, "db.response.returned_rows"),
            Some(&AttrValue::Int(2))
        );
        assert_eq!(attr(&span, "server.port"), Some(&AttrValue::Int(5432)));
        assert_eq!(span.end_unix_nanos - span.start_unix_nanos, 250);
        assert_eq!(span.status, SpanStatus::Unset);
    }

    #[test]
    fn raw_text_only_when_asked() {
        let st = statement(Some("SELECT 1 FROM users WHERE email = 'a@b'"));
        let conn = ConnInfo::UNKNOWN;
        let resource = Arc::new(Resource {
            pid: 1,
            service_name: "app".into(),
            attributes: vec![],
        });
        let span = build_db_span(
            &st,
            true,
            &mut QueryCache::default(),
            conn,
            resource,
            Clock::with_offset(0),
            &mut IdGenerator::new(),
        );
        assert_eq!(
            attr(&span, "db.query.text"),
            Some(&AttrValue::Str(
                "SELECT 1 FROM users WHERE email = 'a@b'".into()
            ))
        );
    }

    #[test]
    fn error_sets_sqlstate_and_status() {
        let mut st = statement(Some("SELECT * FROM nope"));
        st.error = Some(PgError {
            severity: Some("ERROR".into()),
            code: Some("42P01".into()),
            message: Some("relation \"nope\" does not exist".into()),
        });
        let span = build(&st);
        assert_eq!(
            attr(&span, "db.response.status_code"),
            Some(&AttrValue::Str("42P01".into()))
        );
        assert_eq!(
            attr(&span, "error.type"),
            Some(&AttrValue::Str("42P01".into()))
        );
        assert!(attr(&span, "db.response.returned_rows").is_none());
        assert!(matches!(span.status, SpanStatus::Error { .. }));
    }

    #[test]
    fn error_messages_lose_e_mail_addresses_unless_raw_queries_are_asked_for() {
        let mut st = statement(Some("SELECT * FROM users WHERE id = 'alice@example.com'"));
        let message = r#"invalid input syntax for type uuid: "alice@example.com""#;
        st.error = Some(PgError {
            severity: Some("ERROR".into()),
            code: Some("22P02".into()),
            message: Some(message.into()),
        });
        let description = |raw| match build_db_span(
            &st,
            raw,
            &mut QueryCache::default(),
            ConnInfo::UNKNOWN,
            Arc::new(Resource {
                pid: 1,
                service_name: "app".into(),
                attributes: vec![],
            }),
            Clock::with_offset(0),
            &mut IdGenerator::new(),
        )
        .status
        {
            SpanStatus::Error { description } => description,
            other => panic!("expected an error status, got {other:?}"),
        };
        assert_eq!(
            description(false),
            r#"invalid input syntax for type uuid: "REDACTED@example.com""#
        );
        assert_eq!(description(true), message);
    }

    #[test]
    fn unknown_text_is_stated_and_server_side_uses_local_address() {
        let mut st = statement(None);
        st.role = Role::Server;
        st.operation = Some("SELECT".into());
        let span = build(&st);
        assert_eq!(span.kind, SpanKind::Server);
        assert_eq!(span.name, "SELECT");
        assert_eq!(
            attr(&span, "agent.db.query.text_unknown"),
            Some(&AttrValue::Bool(true))
        );
        assert_eq!(attr(&span, "server.port"), Some(&AttrValue::Int(40000)));
    }

    #[test]
    fn skipped_statements_are_marked() {
        let mut st = statement(Some("INSERT INTO t VALUES (1)"));
        st.outcome = PgOutcome::Skipped;
        st.rows = None;
        let span = build(&st);
        assert_eq!(
            attr(&span, "agent.db.skipped"),
            Some(&AttrValue::Bool(true))
        );
        assert!(matches!(span.status, SpanStatus::Error { .. }));
    }

    #[test]
    fn repeated_parameterized_statement_is_analysed_once() {
        let mut cache = QueryCache::default();
        let sql = "SELECT abalance FROM pgbench_accounts WHERE aid = $1";
        let first = cache.analyse(sql);
        let again = cache.analyse(sql);
        assert!(
            Arc::ptr_eq(&first, &again),
            "the second execution reuses the analysis"
        );
        assert_eq!(first.operation, "SELECT");
        assert_eq!(first.collection.as_deref(), Some("pgbench_accounts"));
        assert_eq!(first.sanitized, sql);
        assert_eq!(cache.analyses.len(), 1);
    }

    #[test]
    fn statements_with_literals_are_not_kept() {
        let mut cache = QueryCache::default();
        for id in 0..10 {
            let a = cache.analyse(&format!("SELECT * FROM users WHERE id = {id}"));
            assert_eq!(a.sanitized, "SELECT * FROM users WHERE id = ?");
        }
        assert!(cache.analyses.is_empty(), "{:?}", cache.analyses.keys());
    }

    #[test]
    fn cache_stays_bounded_and_answers_like_a_fresh_analysis() {
        let mut cache = QueryCache::default();
        for i in 0..(QueryCache::MAX_ENTRIES * 2 + 7) {
            let sql = format!("UPDATE t{i} SET v = $1 WHERE k = $2");
            let cached = cache.analyse(&sql);
            let fresh = QueryAnalysis::of(&sql);
            assert_eq!(
                (&cached.operation, &cached.collection, &cached.sanitized),
                (&fresh.operation, &fresh.collection, &fresh.sanitized)
            );
            assert!(cache.analyses.len() <= QueryCache::MAX_ENTRIES);
        }
        let long = format!("SELECT $1 FROM t WHERE {}", "x = $1 AND ".repeat(300));
        cache.analyse(&long);
        assert!(
            !cache.analyses.contains_key(long.as_str()),
            "too long to keep"
        );
    }
}
