//! PostgreSQL statement → span, with OpenTelemetry database semantic conventions.

use std::sync::Arc;

use super::{
    context::{Clock, IdGenerator},
    http::ConnInfo,
    model::{Attribute, Resource, SpanKind, SpanRecord, SpanStatus},
};
use crate::protocols::{
    http1::Role,
    postgres::{PgOutcome, PgStatement, query_summary, sanitize_query},
};

/// `raw_query`: record statement text as sent (`--db-raw-query`); otherwise literals are
/// replaced by placeholders.
pub fn build_db_span(
    st: &PgStatement,
    raw_query: bool,
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
    let (summary_op, collection) = st.query.as_deref().map(query_summary).unzip();
    let collection = collection.flatten();
    let operation = st
        .operation
        .clone()
        .or_else(|| summary_op.filter(|op| !op.is_empty()));
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
    match &st.query {
        // Literals are replaced by placeholders unless asked: statement text carries personal data.
        Some(q) if raw_query => attrs.push(Attribute::str("db.query.text", q.clone())),
        Some(q) => attrs.push(Attribute::str("db.query.text", sanitize_query(q))),
        // Prepared before the agent started watching this connection: say so.
        None => attrs.push(Attribute::bool("agent.db.query.text_unknown", true)),
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
        attrs.push(Attribute::str("server.address", server.ip().to_string()));
        attrs.push(Attribute::int("server.port", server.port().into()));
    }
    if let Some(peer) = remote {
        attrs.push(Attribute::str(
            "network.peer.address",
            peer.ip().to_string(),
        ));
        attrs.push(Attribute::int("network.peer.port", peer.port().into()));
    }

    let mut status = SpanStatus::Unset;
    if let Some(err) = &st.error {
        let code = err.code.clone().unwrap_or_else(|| "_OTHER".into());
        attrs.push(Attribute::str("db.response.status_code", code.clone()));
        attrs.push(Attribute::str("error.type", code));
        status = SpanStatus::Error {
            description: err.message.clone().unwrap_or_default(),
        };
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
        };
        let resource = Arc::new(Resource {
            pid: 1,
            service_name: "app".into(),
            attributes: vec![],
        });
        build_db_span(
            st,
            false,
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
}
