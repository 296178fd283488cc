//! Counters for every noteworthy outcome, and the [`Metric`] record every counter of the agent
//! (these, the kernel's, Kubernetes') is reported as (leaf module: `metrics/` reads it, the
//! counters' owners fill it). Anything that drops or rejects data counts it here;
//! the summary at shutdown, `--stats-interval` and `/metrics` report them (`metrics`).

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($( $(#[doc = $doc:literal])* $name:ident ),* $(,)?) => {
        #[derive(Default, Debug)]
        pub struct Stats {
            $( $(#[doc = $doc])* pub $name: AtomicU64, )*
        }

        impl Stats {
            /// Every counter, in declaration order, its doc comment as its help.
            pub fn metrics(&self) -> Vec<Metric> {
                vec![ $( Metric::counter(
                    stringify!($name),
                    concat!($($doc),*),
                    self.$name.load(Ordering::Relaxed),
                ), )* ]
            }
        }
    };
}

counters! {
    /// Ring buffer records read.
    events_read,
    /// Records that could not be decoded (unknown kind, short record).
    events_malformed,
    /// Data events, and their payload bytes, fed to connections.
    data_events,
    /// Connections seen (first data on a socket).
    connections_opened,
    /// Connections ended (close, process exit, idle timeout).
    connections_closed,
    /// Connections evicted because too many were open or idle.
    connections_evicted,
    /// Connections whose bytes are not HTTP/1.x (PostgreSQL is tried next).
    connections_not_http,
    /// Connections recognised as PostgreSQL.
    connections_postgres,
    /// Encrypted connections (TLS, PostgreSQL after `SSLRequest`/`GSSENCRequest`) whose
    /// plaintext no TLS library probe delivered: not traced.
    connections_encrypted,
    /// Connections read as plaintext through their TLS library's probes (`https`, PostgreSQL
    /// with `sslmode=require`).
    connections_tls,
    /// TLS plaintext named by its fd only (Go's `crypto/tls`) whose fd had moved no bytes yet:
    /// not traced.
    tls_plaintext_unassociated,
    /// Connections in no protocol we parse (ignored from then on, or closed before any of
    /// their messages was recognised).
    connections_unrecognized,
    /// Parser lost message boundaries and resynchronised on a later message start.
    http_resyncs,
    /// Messages whose header block did not fit in the captured prefix.
    http_headers_truncated,
    /// Message heads on HTTP connections that could not be read even leniently (no
    /// `METHOD target HTTP/1.x` or `HTTP/1.x NNN` start line): that exchange is not traced.
    http_heads_invalid,
    /// Requests whose connection closed before a response ended.
    http_incomplete,
    /// HTTP exchanges completed.
    http_exchanges,
    /// PostgreSQL statement executions seen.
    db_statements,
    /// PostgreSQL parser lost message boundaries (capture cut, hostile length) or resynced.
    pg_lost_sync,
    /// PostgreSQL responses that matched no request (bytes we could not follow).
    pg_unmatched_responses,
    /// Incoming `traceparent` headers that were present but invalid (ignored).
    traceparent_invalid,
    /// Incoming `traceparent` headers honoured.
    traceparent_honoured,
    /// Client spans linked to the server span active on the same thread.
    client_spans_linked,
    /// Client spans left unlinked because several requests were being served on their thread.
    link_ambiguous,
    /// Client spans left unlinked because their request was too old or had adopted the
    /// maximum of client spans (--max-trace-age, --max-spans-per-trace).
    link_bounded,
    /// Server spans made children of a client span traced on this host (same connection).
    server_spans_paired,
    /// Server spans whose local caller's client span never matched them in time.
    server_spans_unpaired,
    /// Server spans left out of same-host pairing because calls they made already carried
    /// their trace id onward (renaming it would orphan those calls' spans).
    server_spans_kept_trace,
    /// Client sockets taken out of the header injector because they do not speak HTTP.
    sockets_unenrolled,
    /// Parked client sockets put back into the header injector's map once their answer was
    /// read (see README: how injection stays safe).
    sockets_rejoined,
    /// Parked client sockets that could not rejoin (framing lost, the process or the kernel
    /// would not let us): their later requests are not injected. Closed sockets are not
    /// counted.
    sockets_not_rejoined,
    /// Rejoins taken back at once: unread data or a write arrived while the socket rejoined.
    rejoins_undone,
    /// Spans given the ids the kernel chose (server contexts, injected client requests).
    kernel_contexts_adopted,
    /// Kernel contexts that matched no request (lost events, requests the parser could not
    /// read): those requests got ids of their own.
    kernel_contexts_unmatched,
    /// Server requests whose `traceparent` the kernel did not see (head split over reads)
    /// though the parser did: the kernel's ids were kept.
    kernel_context_mismatch,
    /// Kernel contexts with a zero trace or span id (unusable: the request got ids of its
    /// own) or a zero parent id (taken as no parent).
    kernel_context_ids_invalid,
    /// Spans built.
    spans_built,
    /// Spans that reached the exporter with a zero trace, span or parent id and were given
    /// valid ones instead (never exported invalid; any count here is a bug to report).
    spans_invalid_ids_fixed,
    /// Spans dropped because the export queue was full.
    spans_dropped_queue_full,
    /// Spans handed to an exporter successfully.
    spans_exported,
    /// Spans lost because the exporter failed (collector down, rejected).
    spans_export_failed,
    /// Export batches that failed.
    export_errors,
    /// Processes selected for tracing.
    processes_selected,
    /// Selected processes whose runtime mechanism's probes are attached (see
    /// `--runtime-linking`).
    runtime_processes,
    /// Selected processes a runtime mechanism applies to whose probes could not be attached
    /// (the start-up report or the log says why).
    runtime_attach_failed,
    /// Times the TLS probes were attached to a library (OpenSSL): for one selected process, or
    /// for every process mapping the file (see `--tls`).
    tls_libraries_attached,
    /// TLS libraries whose probes could not be attached (the report or the log says why).
    tls_attach_failed,
    /// Requests answered on --metrics-address (any path and method).
    metrics_requests,
    /// Requests on --metrics-address refused: malformed (400), head too large (431), too slow
    /// (408), or beyond the limit of connections at once (503).
    metrics_requests_rejected,
}

impl Stats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_counter_has_its_doc_comment_as_help() {
        let all = Stats::default().metrics();
        assert!(all.len() > 30);
        let events = all
            .iter()
            .find(|m| m.name == "events_read")
            .expect("events_read");
        assert_eq!(events.help.trim(), "Ring buffer records read.");
        // Several doc lines join into one text.
        let bounded = all
            .iter()
            .find(|m| m.name == "link_bounded")
            .expect("link_bounded");
        assert!(
            bounded
                .help
                .contains("had adopted the maximum of client spans"),
            "{}",
            bounded.help
        );
        for m in &all {
            assert!(!m.help.trim().is_empty(), "{} has no doc comment", m.name);
        }
    }
}

/// Counters only go up; gauges are a current value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

/// One value the agent reports, under the name the summary prints (`http_exchanges`); the
/// Prometheus name is derived from it (`ebpf_agent_http_exchanges_total`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Metric {
    pub name: &'static str,
    /// What is counted: the counter's doc comment (possibly over several source lines).
    pub help: &'static str,
    pub kind: Kind,
    pub value: u64,
}

impl Metric {
    pub const fn counter(name: &'static str, help: &'static str, value: u64) -> Self {
        Self {
            name,
            help,
            kind: Kind::Counter,
            value,
        }
    }

    pub const fn gauge(name: &'static str, help: &'static str, value: u64) -> Self {
        Self {
            name,
            help,
            kind: Kind::Gauge,
            value,
        }
    }
}
