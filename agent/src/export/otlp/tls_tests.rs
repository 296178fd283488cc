//! The OTLP exporter over TLS against a real receiver (`tests::TlsReceiver`: grpcio and Python's
//! ssl, with a CA the test makes with the openssl CLI): both protocols, gzip, headers, mTLS, and
//! a CA that did not sign the receiver's certificate. No kernel involved, so no root.
//!
//! `#[ignore]`: they need python3 with grpcio and opentelemetry-proto and the openssl command
//! (`cargo xtask setup --test-deps`); `cargo xtask test` runs them (`--include-ignored`).
//! Without those tools they fail, naming what to install.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ::tests::{Pki, TlsExport, TlsReceiver, TlsReceiverOptions};
use bytes::Bytes;

use super::encode::tests::{encode, resource, server_span};
use super::outage_warning;
use super::tls;
use super::transport::{SendError, Transport, TransportOptions};
use crate::export::worker::ExportSummary;
use crate::export::*;
use crate::spans::model::{SpanId, SpanRecord};
use crate::stats::Stats;

fn options(
    ca: Option<std::path::PathBuf>,
    client: Option<(&Pki, bool)>,
    headers: &[&str],
    compression: Compression,
) -> OtlpOptions {
    let (client_certificate, client_key) = match client {
        Some((pki, true)) => (Some(pki.client_cert()), Some(pki.client_key())),
        _ => (None, None),
    };
    let headers: Vec<HeaderArg> = headers
        .iter()
        .map(|h| HeaderArg::parse(h).unwrap_or_else(|never| match never {}))
        .collect();
    OtlpOptions {
        headers: Headers::parse(&headers).expect("valid headers"),
        compression,
        tls: TlsFiles {
            certificate: ca,
            client_certificate,
            client_key,
        },
        insecure: false,
    }
}

fn config(endpoint: String, protocol: OtlpProtocol, options: OtlpOptions) -> ExportConfig {
    ExportConfig {
        timeout: Duration::from_secs(3),
        flush_interval: Duration::from_millis(50),
        ..ExportConfig::new(ExportTarget::Otlp {
            endpoint,
            protocol,
            form: EndpointForm::Base,
            options,
        })
    }
}

/// `n` spans of one process, with span ids `7d <tag> 00 .. <i>`.
fn spans(service: &str, tag: u8, n: u8) -> Vec<SpanRecord> {
    let r = resource(4000 + u32::from(tag), service);
    (0..n)
        .map(|i| {
            let mut s = server_span(&r);
            s.span_id = SpanId([0x7d, tag, 0, 0, 0, 0, 0, i + 1]);
            s
        })
        .collect()
}

/// Exports `batch` through a fresh exporter and returns its summary and counters.
async fn export(cfg: ExportConfig, batch: Vec<SpanRecord>) -> (ExportSummary, Arc<Stats>) {
    let stats = Arc::new(Stats::default());
    let handle = spawn_exporter(cfg, Arc::clone(&stats)).expect("exporter");
    for span in batch {
        handle.send(span);
    }
    (handle.shutdown().await, stats)
}

/// The exports of `receiver` carrying spans of `service`.
fn exports_of(receiver: &TlsReceiver, service: &str) -> Vec<TlsExport> {
    receiver
        .exports()
        .into_iter()
        .filter(|e| e.spans.iter().any(|s| s.service == service))
        .collect()
}

fn span_ids(exports: &[TlsExport]) -> Vec<String> {
    let mut ids: Vec<String> = exports
        .iter()
        .flat_map(|e| e.spans.iter().map(|s| s.span_id.clone()))
        .collect();
    ids.sort();
    ids
}

fn sent_ids(batch: &[SpanRecord]) -> Vec<String> {
    let mut ids: Vec<String> = batch.iter().map(|s| s.span_id.to_hex()).collect();
    ids.sort();
    ids
}

/// One attempt straight through a transport, for the exact error.
async fn send_once(
    url: &str,
    protocol: OtlpProtocol,
    options: &OtlpOptions,
) -> Result<(), SendError> {
    let tls = tls::client_config(&options.tls).expect("TLS files");
    let transport = Transport::new(
        url,
        TransportOptions {
            protocol,
            timeout: Duration::from_secs(3),
            headers: &options.headers,
            compression: options.compression,
            tls,
        },
    )
    .expect("transport");
    let body = encode(&spans("send-once", 0xee, 1));
    transport.send(Bytes::from(body)).await.map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs python3 (grpcio, opentelemetry-proto) and openssl: run with --ignored"]
async fn both_protocols_export_over_tls_with_headers() {
    let pki = Pki::new();
    let receiver = TlsReceiver::start(&pki, TlsReceiverOptions::default());
    for (protocol, url, tag, path) in [
        (
            OtlpProtocol::Grpc,
            receiver.grpc_url("127.0.0.1"),
            1,
            "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
        ),
        // By name: the certificate's DNS entry.
        (
            OtlpProtocol::HttpProtobuf,
            receiver.http_url("localhost"),
            2,
            "/v1/traces",
        ),
    ] {
        let service = format!("tls-{protocol}");
        let batch = spans(&service, tag, 3);
        let opts = options(
            Some(pki.ca()),
            None,
            &["x-api-key=s3cr%2Ct", "x-tenant = t1"],
            Compression::None,
        );
        let (summary, stats) = export(config(url, protocol, opts), batch.clone()).await;
        assert_eq!(
            summary,
            ExportSummary {
                exported: 3,
                failed: 0,
                dropped: 0
            },
            "{protocol}"
        );
        assert_eq!(stats.export_errors.load(Ordering::Relaxed), 0);
        let got = exports_of(&receiver, &service);
        assert_eq!(span_ids(&got), sent_ids(&batch), "{protocol}: {got:#?}");
        for e in &got {
            assert_eq!(e.path, path, "{protocol}");
            assert_eq!(
                e.headers.get("x-api-key").map(String::as_str),
                Some("s3cr,t")
            );
            assert_eq!(e.headers.get("x-tenant").map(String::as_str), Some("t1"));
            assert_eq!(e.client_cn, None, "no client certificate was given");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs python3 (grpcio, opentelemetry-proto) and openssl: run with --ignored"]
async fn gzip_is_sent_and_decodable_over_both_protocols() {
    let pki = Pki::new();
    let receiver = TlsReceiver::start(&pki, TlsReceiverOptions::default());
    let gzip = options(Some(pki.ca()), None, &[], Compression::Gzip);
    for (protocol, url, tag) in [
        (OtlpProtocol::Grpc, receiver.grpc_url("localhost"), 3),
        (
            OtlpProtocol::HttpProtobuf,
            receiver.http_url("127.0.0.1"),
            4,
        ),
    ] {
        let service = format!("gzip-{protocol}");
        let batch = spans(&service, tag, 2);
        let (summary, _) = export(config(url, protocol, gzip.clone()), batch.clone()).await;
        assert_eq!(summary.exported, 2, "{protocol}");
        let got = exports_of(&receiver, &service);
        assert_eq!(span_ids(&got), sent_ids(&batch), "{protocol}: decoded");
        if protocol == OtlpProtocol::HttpProtobuf {
            assert!(
                got.iter()
                    .all(|e| e.content_encoding.as_deref() == Some("gzip")),
                "{got:#?}"
            );
        }
    }
    // gRPC shows its compression only to a server that refuses gzip: compressed messages fail
    // there, uncompressed ones pass.
    let refusing = TlsReceiver::start(
        &pki,
        TlsReceiverOptions {
            refuse_gzip: true,
            ..TlsReceiverOptions::default()
        },
    );
    let url = refusing.grpc_url("127.0.0.1");
    let err = send_once(&url, OtlpProtocol::Grpc, &gzip)
        .await
        .expect_err("a gzip message to a server that refuses gzip");
    assert!(err.message.contains("gzip"), "{err:?}");
    let plain = options(Some(pki.ca()), None, &[], Compression::None);
    assert_eq!(send_once(&url, OtlpProtocol::Grpc, &plain).await, Ok(()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs python3 (grpcio, opentelemetry-proto) and openssl: run with --ignored"]
async fn mtls_is_refused_without_the_client_certificate_and_works_with_it() {
    let pki = Pki::new();
    let receiver = TlsReceiver::start(
        &pki,
        TlsReceiverOptions {
            require_client_cert: true,
            ..TlsReceiverOptions::default()
        },
    );
    for (protocol, url, tag) in [
        (OtlpProtocol::Grpc, receiver.grpc_url("127.0.0.1"), 5),
        (
            OtlpProtocol::HttpProtobuf,
            receiver.http_url("127.0.0.1"),
            6,
        ),
    ] {
        let without = options(Some(pki.ca()), None, &[], Compression::None);
        let err = send_once(&url, protocol, &without)
            .await
            .expect_err("mTLS without a client certificate");
        assert!(err.retryable, "{protocol}: {err:?}");
        assert!(
            err.hint
                .is_some_and(|h| h.contains("--otlp-client-certificate")),
            "{protocol}: {err:?}"
        );

        let service = format!("mtls-{protocol}");
        let batch = spans(&service, tag, 2);
        let with = options(Some(pki.ca()), Some((&pki, true)), &[], Compression::None);
        let (summary, _) = export(config(url, protocol, with), batch.clone()).await;
        assert_eq!(summary.exported, 2, "{protocol}");
        let got = exports_of(&receiver, &service);
        assert_eq!(span_ids(&got), sent_ids(&batch), "{protocol}");
        assert!(
            got.iter()
                .all(|e| e.client_cn.as_deref() == Some("agent-client")),
            "{protocol}: the receiver saw the client certificate: {got:#?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs python3 (grpcio, opentelemetry-proto) and openssl: run with --ignored"]
async fn an_untrusted_certificate_fails_clearly_is_counted_and_later_batches_are_tried() {
    let pki = Pki::new();
    let receiver = TlsReceiver::start(&pki, TlsReceiverOptions::default());
    for (protocol, base) in [
        (OtlpProtocol::Grpc, receiver.grpc_url("127.0.0.1")),
        (OtlpProtocol::HttpProtobuf, receiver.http_url("127.0.0.1")),
    ] {
        let url = match protocol {
            OtlpProtocol::Grpc => base.clone(),
            OtlpProtocol::HttpProtobuf => format!("{base}/v1/traces"),
        };
        // A CA that did not sign the receiver's certificate, and no CA at all (the public
        // roots do not know the test CA either).
        for ca in [Some(pki.other_ca()), None] {
            let opts = options(ca.clone(), None, &["x-api-key=hunter2"], Compression::None);
            let err = send_once(&url, protocol, &opts)
                .await
                .expect_err("the receiver's certificate is not trusted");
            assert!(
                err.message
                    .contains("invalid peer certificate: UnknownIssuer"),
                "{protocol} {ca:?}: {err:?}"
            );
            let warning = outage_warning(&url, protocol, &err);
            assert!(warning.contains(&url), "{warning}");
            assert!(warning.contains("spans_export_failed"), "{warning}");
            assert!(
                warning.contains("--otlp-certificate (OTEL_EXPORTER_OTLP_CERTIFICATE)"),
                "{warning}"
            );
            assert!(!warning.contains("hunter2"), "{warning}");
        }

        // Through the exporter: each batch fails and is counted, and the exporter goes on
        // trying the next ones (each with its retries) until it is stopped.
        let stats = Arc::new(Stats::default());
        let opts = options(Some(pki.other_ca()), None, &[], Compression::None);
        let handle = spawn_exporter(config(base, protocol, opts), Arc::clone(&stats))
            .expect("the exporter starts: the CA file itself is fine");
        let service = format!("untrusted-{protocol}");
        let first = spans(&service, 7, 2);
        for span in first {
            handle.send(span);
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while stats.spans_export_failed.load(Ordering::Relaxed) < 2
            && std::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(stats.spans_export_failed.load(Ordering::Relaxed), 2);
        for span in spans(&service, 8, 1) {
            handle.send(span);
        }
        let summary = handle.shutdown().await;
        assert_eq!(
            summary,
            ExportSummary {
                exported: 0,
                failed: 3,
                dropped: 0
            },
            "{protocol}"
        );
        assert_eq!(
            stats.export_errors.load(Ordering::Relaxed),
            2,
            "{protocol}: the later batch was tried too"
        );
        assert!(exports_of(&receiver, &service).is_empty());
    }
}
