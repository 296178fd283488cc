//! HTTP exchange → span, with OpenTelemetry semantic-convention attributes.

use std::{borrow::Cow, net::SocketAddr, sync::Arc};

use super::{
    context::{Clock, IdGenerator, parse_traceparent},
    ip_text,
    model::{Attribute, Resource, SpanKind, SpanRecord, SpanStatus},
};
use crate::{
    protocols::{
        http1::{ExchangeEnd, HttpExchange},
        segment::Role,
    },
    redact,
};

/// Where the exchange happened, seen from the traced process.
#[derive(Clone, Copy, Debug)]
pub struct ConnInfo {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// Its bytes are TLS records, read as plaintext through the TLS library (`https`).
    pub tls: bool,
}

impl ConnInfo {
    /// The kernel's event carrying the addresses was lost (counted as a ring buffer loss).
    pub const UNKNOWN: Self = Self {
        local: SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0),
        remote: SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0),
        tls: false,
    };

    pub fn known(addr: SocketAddr) -> Option<SocketAddr> {
        (addr.port() != 0).then_some(addr)
    }
}

/// How an incoming `traceparent` was handled, for counting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParentOutcome {
    None,
    Honoured,
    Invalid,
}

const KNOWN_METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

/// Splits a request-target into path and query (absolute-form targets lose scheme and authority).
fn split_target(target: &str) -> (&str, Option<&str>) {
    let without_fragment = target.split('#').next().unwrap_or(target);
    let path_and_query = match without_fragment.find("://") {
        Some(i) => {
            let rest = &without_fragment[i + 3..];
            rest.find('/').map_or("/", |j| &rest[j..])
        }
        None => without_fragment,
    };
    match path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_and_query, None),
    }
}

/// Host header → (address, port).
fn split_host(host: &str) -> (String, Option<u16>) {
    let host = host.trim();
    if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        if let Some((addr, tail)) = rest.split_once(']') {
            let port = tail.strip_prefix(':').and_then(|p| p.parse().ok());
            return (addr.to_string(), port);
        }
    }
    match host.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => (h.to_string(), p.parse().ok()),
        _ => (host.to_string(), None),
    }
}

pub struct SpanInputs<'a> {
    pub exchange: &'a HttpExchange,
    pub conn: ConnInfo,
    pub resource: Arc<Resource>,
    pub clock: Clock,
}

pub fn build_span(inputs: SpanInputs<'_>, ids: &mut IdGenerator) -> (SpanRecord, ParentOutcome) {
    let SpanInputs {
        exchange: ex,
        conn,
        resource,
        clock,
    } = inputs;
    let req = &ex.request;
    let kind = match ex.role {
        Role::Server => SpanKind::Server,
        Role::Client => SpanKind::Client,
    };
    let (path, query) = split_target(&req.target);
    let known = KNOWN_METHODS.iter().copied().find(|m| *m == req.method);
    let method_known = known.is_some();
    let method = known.unwrap_or("_OTHER");
    // Ids, tokens and e-mail addresses in the path: `{id}` in the name, tokens and addresses
    // `REDACTED` in url.path/url.full (see `redact`).
    let path = redact::url_path(path);
    let name = format!("{method} {}", path.template);

    let mut attrs = Vec::with_capacity(20);
    attrs.push(Attribute::str("http.request.method", method));
    if !method_known {
        attrs.push(Attribute::str(
            "http.request.method_original",
            req.method.clone(),
        ));
    }
    attrs.push(Attribute::str("url.path", path.redacted.to_string()));
    // Pushed once url.full (client spans) has been written from it.
    let query = query.map(redact::url_query);
    let scheme = if conn.tls { "https" } else { "http" };
    attrs.push(Attribute::str("url.scheme", scheme));
    let version: Cow<'static, str> = match req.version_minor {
        0 => "1.0".into(),
        1 => "1.1".into(),
        minor => format!("1.{minor}").into(),
    };
    attrs.push(Attribute::str("network.protocol.version", version));
    attrs.push(Attribute::str("network.transport", "tcp"));
    let (local, remote) = (ConnInfo::known(conn.local), ConnInfo::known(conn.remote));
    // Formatted once: a server span carries it twice (peer and client address).
    let remote_text = remote.map(|r| ip_text(r.ip()));
    if let (Some(remote), Some(text)) = (remote, &remote_text) {
        let network_type = if remote.is_ipv4() { "ipv4" } else { "ipv6" };
        attrs.push(Attribute::str("network.type", network_type));
        attrs.push(Attribute::str("network.peer.address", text.clone()));
        attrs.push(Attribute::int("network.peer.port", remote.port().into()));
    }
    let (host_addr, host_port) = req.host.as_deref().map(split_host).unzip();
    let host_port = host_port.flatten();
    match kind {
        SpanKind::Server => {
            let address = host_addr.or_else(|| local.map(|l| ip_text(l.ip())));
            if let Some(address) = address {
                attrs.push(Attribute::str("server.address", address));
            }
            if let Some(port) = host_port.or(local.map(|l| l.port())) {
                attrs.push(Attribute::int("server.port", port.into()));
            }
            if let (Some(remote), Some(text)) = (remote, remote_text) {
                attrs.push(Attribute::str("client.address", text));
                attrs.push(Attribute::int("client.port", remote.port().into()));
            }
        }
        SpanKind::Client => {
            let server = host_addr.or(remote_text);
            let port = host_port.or(remote.map(|r| r.port()));
            if let (Some(server), Some(port)) = (&server, port) {
                let mut full = format!("{scheme}://{server}:{port}{}", path.redacted);
                if let Some(q) = &query {
                    full.push('?');
                    full.push_str(q);
                }
                attrs.push(Attribute::str("url.full", full));
            }
            if let Some(server) = server {
                attrs.push(Attribute::str("server.address", server));
            }
            if let Some(port) = port {
                attrs.push(Attribute::int("server.port", port.into()));
            }
        }
    }
    if let Some(q) = query {
        attrs.push(Attribute::str("url.query", q));
    }
    if let Some(ua) = &req.user_agent {
        attrs.push(Attribute::str(
            "user_agent.original",
            redact::free_text(ua).into_owned(),
        ));
    }
    attrs.push(Attribute::int(
        "http.request.body.size",
        clamp_i64(ex.request_body_size),
    ));
    if ex.status.is_some() {
        attrs.push(Attribute::int(
            "http.response.body.size",
            clamp_i64(ex.response_body_size),
        ));
    }

    let mut status = SpanStatus::Unset;
    match ex.status {
        Some(code) => {
            attrs.push(Attribute::int("http.response.status_code", code.into()));
            let error = match kind {
                SpanKind::Server => code >= 500,
                SpanKind::Client => code >= 400,
            };
            if error {
                attrs.push(Attribute::str("error.type", code.to_string()));
                status = SpanStatus::Error {
                    description: String::new(),
                };
            }
        }
        None => {
            attrs.push(Attribute::str("error.type", "connection_closed"));
            status = SpanStatus::Error {
                description: "connection closed before a response was received".into(),
            };
        }
    }
    if ex.end == ExchangeEnd::Resynced {
        attrs.push(Attribute::bool("agent.http.end_inferred", true));
    }

    // Server spans continue an incoming, valid trace context; client spans start a trace of
    // their own here (in-process linking may re-parent them later).
    let mut outcome = ParentOutcome::None;
    let mut parent = None;
    if kind == SpanKind::Server
        && let Some(value) = &req.traceparent
    {
        match parse_traceparent(value) {
            Some(tp) => {
                outcome = ParentOutcome::Honoured;
                parent = Some(tp);
            }
            None => outcome = ParentOutcome::Invalid,
        }
    }
    let (trace_id, parent_span_id, trace_state) = match parent {
        Some(tp) => (tp.trace_id, Some(tp.parent_id), req.tracestate.clone()),
        None => (ids.trace_id(), None, None),
    };

    let start = ex.request_start_ns;
    let end = ex.response_end_ns.unwrap_or(ex.request_end_ns).max(start);
    let span = SpanRecord {
        trace_id,
        span_id: ids.span_id(),
        parent_span_id,
        parent_is_remote: parent_span_id.is_some(),
        trace_state,
        name,
        kind,
        start_unix_nanos: clock.to_unix_nanos(start),
        end_unix_nanos: clock.to_unix_nanos(end),
        attributes: attrs,
        status,
        resource,
    };
    (span, outcome)
}

fn clamp_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocols::http1::HttpRequestInfo;
    use crate::spans::model::AttrValue;

    fn exchange(role: Role, target: &str, status: Option<u16>) -> HttpExchange {
        HttpExchange {
            role,
            request: HttpRequestInfo {
                method: "GET".into(),
                target: target.into(),
                version_minor: 1,
                host: Some("api.example:8080".into()),
                user_agent: Some("curl/7.88.1".into()),
                traceparent: None,
                tracestate: None,
                content_length: None,
                chunked: false,
            },
            status,
            request_start_ns: 1_000,
            request_end_ns: 1_500,
            response_start_ns: Some(4_000),
            response_end_ns: Some(5_000),
            request_body_size: 0,
            response_body_size: 42,
            tid: 7,
            end: ExchangeEnd::Complete,
        }
    }

    fn resource() -> Arc<Resource> {
        Arc::new(Resource {
            pid: 1,
            service_name: "svc".into(),
            attributes: vec![],
        })
    }

    fn conn() -> ConnInfo {
        ConnInfo {
            local: "127.0.0.1:8080".parse().expect("addr"),
            remote: "127.0.0.1:50000".parse().expect("addr"),
            tls: false,
        }
    }

    fn build(ex: &HttpExchange) -> (SpanRecord, ParentOutcome) {
        let mut ids = IdGenerator::new();
        build_span(
            SpanInputs {
                exchange: ex,
                conn: conn(),
                resource: resource(),
                clock: Clock::with_offset(10),
            },
            &mut ids,
        )
    }

    #[test]
    fn server_span_has_semconv_attributes() {
        let (span, outcome) = build(&exchange(Role::Server, "/users/123?token=abc&x", Some(200)));
        assert_eq!(outcome, ParentOutcome::None);
        assert_eq!(span.kind, SpanKind::Server);
        assert_eq!(span.name, "GET /users/{id}");
        assert_eq!(span.start_unix_nanos, 1_010);
        assert_eq!(span.end_unix_nanos, 5_010);
        let s = |k| span.attr(k).cloned();
        assert_eq!(s("url.path"), Some(AttrValue::Str("/users/123".into())));
        assert_eq!(
            s("url.query"),
            Some(AttrValue::Str("token=REDACTED&x".into()))
        );
        assert_eq!(
            s("server.address"),
            Some(AttrValue::Str("api.example".into()))
        );
        assert_eq!(s("server.port"), Some(AttrValue::Int(8080)));
        assert_eq!(s("client.port"), Some(AttrValue::Int(50000)));
        assert_eq!(s("http.response.status_code"), Some(AttrValue::Int(200)));
        assert_eq!(
            s("network.protocol.version"),
            Some(AttrValue::Str("1.1".into()))
        );
        assert_eq!(
            s("user_agent.original"),
            Some(AttrValue::Str("curl/7.88.1".into()))
        );
        assert_eq!(s("http.response.body.size"), Some(AttrValue::Int(42)));
        assert_eq!(span.status, SpanStatus::Unset);
    }

    #[test]
    fn error_status_rules_differ_by_kind() {
        assert_eq!(
            build(&exchange(Role::Server, "/", Some(404))).0.status,
            SpanStatus::Unset
        );
        assert!(matches!(
            build(&exchange(Role::Server, "/", Some(500))).0.status,
            SpanStatus::Error { .. }
        ));
        assert!(matches!(
            build(&exchange(Role::Client, "/", Some(404))).0.status,
            SpanStatus::Error { .. }
        ));
        let (span, _) = build(&exchange(Role::Client, "/", None));
        assert!(matches!(span.status, SpanStatus::Error { .. }));
        assert_eq!(
            span.attr("error.type"),
            Some(&AttrValue::Str("connection_closed".into()))
        );
    }

    #[test]
    fn honours_valid_traceparent_and_ignores_invalid() {
        let mut ex = exchange(Role::Server, "/", Some(200));
        ex.request.traceparent =
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into());
        ex.request.tracestate = Some("vendor=x".into());
        let (span, outcome) = build(&ex);
        assert_eq!(outcome, ParentOutcome::Honoured);
        assert_eq!(span.trace_id.to_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(
            span.parent_span_id.map(|p| p.to_hex()).as_deref(),
            Some("00f067aa0ba902b7")
        );
        assert!(span.parent_is_remote);
        assert_eq!(span.trace_state.as_deref(), Some("vendor=x"));

        for invalid in [
            "00-zz",
            // Two traceparent fields, joined as HTTP joins repeated fields.
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01,\
00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            ex.request.traceparent = Some(invalid.into());
            let (span, outcome) = build(&ex);
            assert_eq!(outcome, ParentOutcome::Invalid);
            assert_eq!(span.parent_span_id, None);
            assert_eq!(
                span.trace_state, None,
                "tracestate goes with its traceparent"
            );
            assert_ne!(span.trace_id.to_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        }
    }

    #[test]
    fn client_span_has_url_full_and_peer() {
        let (span, _) = build(&exchange(Role::Client, "/a?b=c", Some(200)));
        assert_eq!(
            span.attr("url.full"),
            Some(&AttrValue::Str(
                "http://api.example:8080/a?b=REDACTED".into()
            ))
        );
        assert_eq!(span.attr("network.peer.port"), Some(&AttrValue::Int(50000)));
    }

    #[test]
    fn unknown_addresses_are_left_out_not_invented() {
        let ex = exchange(Role::Server, "/", Some(200));
        let mut ids = IdGenerator::new();
        let inputs = SpanInputs {
            exchange: &ex,
            conn: ConnInfo::UNKNOWN,
            resource: resource(),
            clock: Clock::with_offset(0),
        };
        let (span, _) = build_span(inputs, &mut ids);
        assert!(span.attr("client.address").is_none());
        assert!(span.attr("network.peer.port").is_none());
        // The Host header still names the server.
        assert_eq!(span.attr("server.port"), Some(&AttrValue::Int(8080)));
    }

    #[test]
    fn targets_and_hosts() {
        assert_eq!(split_target("http://h:1/p?q=1"), ("/p", Some("q=1")));
        assert_eq!(split_target("http://h:1"), ("/", None));
        assert_eq!(split_host("[::1]:8080"), ("::1".to_string(), Some(8080)));
        assert_eq!(split_host("h"), ("h".to_string(), None));
    }

    const JWT: &str = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLXNpZw";

    proptest::proptest! {
        /// Whatever `traceparent` a request carries, the span built for it has valid ids; a
        /// parent is taken only from a header that parses.
        #[test]
        fn spans_from_any_traceparent_have_valid_ids(
            value in proptest::prop_oneof![
                ".{0,64}",
                "[0-9a-f]{2}-[0f]{32}-[0f]{16}-[0-9a-f]{2}(-.{0,4})?",
                "00-0{32}-[0-9a-f]{16}-01",
                "00-[0-9a-f]{32}-0{16}-01",
            ],
        ) {
            let mut ex = exchange(Role::Server, "/", Some(200));
            ex.request.traceparent = Some(value.clone());
            let (span, outcome) = build(&ex);
            proptest::prop_assert!(span.has_valid_ids(), "{:?} from {:?}", span, value);
            proptest::prop_assert_eq!(
                span.parent_span_id.is_some(),
                outcome == ParentOutcome::Honoured
            );
        }
    }

    #[test]
    fn e_mail_addresses_and_tokens_stay_out_of_names_and_attributes() {
        let target =
            format!("/u/alice@example.com/token/{JWT}/orders/42?k=secret&alice%40example.com");
        for role in [Role::Server, Role::Client] {
            let mut ex = exchange(role, &target, Some(200));
            ex.request.user_agent = Some("probe/1.0 (mailto:alice@example.com)".into());
            let (span, _) = build(&ex);
            assert_eq!(span.name, "GET /u/{id}/token/{id}/orders/{id}");
            let s = |k| span.attr(k).cloned();
            assert_eq!(
                s("url.path"),
                Some(AttrValue::Str(
                    "/u/REDACTED/token/REDACTED/orders/42".into()
                ))
            );
            assert_eq!(
                s("url.query"),
                Some(AttrValue::Str("k=REDACTED&REDACTED".into()))
            );
            assert_eq!(
                s("user_agent.original"),
                Some(AttrValue::Str(
                    "probe/1.0 (mailto:REDACTED@example.com)".into()
                ))
            );
            if role == Role::Client {
                assert_eq!(
                    s("url.full"),
                    Some(AttrValue::Str(
                        "http://api.example:8080/u/REDACTED/token/REDACTED/orders/42?k=REDACTED&REDACTED"
                            .into()
                    ))
                );
            }
            for attr in &span.attributes {
                let text = format!("{:?}", attr.value);
                for leak in ["alice", "secret", "eyJ"] {
                    assert!(!text.contains(leak), "{} leaks {leak}: {text}", attr.key);
                }
            }
        }
    }
}
