//! Command line. Every option can also come from the environment (`EBPF_AGENT_<OPTION>`, and
//! the standard OTEL_* variables for export) or from the `--config` YAML file: see config.rs,
//! which derives both from the definitions below. Flags > environment > file > defaults.

use clap::{Parser, ValueEnum};

use std::path::PathBuf;

use crate::{
    export::{
        Compression, EndpointForm, ExportConfig, ExportError, ExportTarget, HeaderArg, Headers,
        OtlpOptions, OtlpProtocol, TlsFiles,
    },
    k8s,
    selection::Selection,
};

/// A feature switch on the command line: `on` or `off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Switch {
    On,
    Off,
}

impl Switch {
    pub fn is_on(self) -> bool {
        self == Switch::On
    }
}

/// `--kubernetes`: `auto` is on when the agent runs in a pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum KubernetesArg {
    Auto,
    On,
    Off,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CompressionArg {
    None,
    Gzip,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ProtocolArg {
    #[value(name = "grpc")]
    Grpc,
    #[value(name = "http/protobuf")]
    HttpProtobuf,
}

/// Traces HTTP/1.x requests of unmodified processes with eBPF and exports OpenTelemetry spans.
///
/// With no selection option every process is traced. With no OTLP endpoint, traces are printed
/// on the terminal.
#[derive(Debug, Parser)]
#[command(name = "agent", version)]
pub struct Cli {
    /// YAML file with settings, one key per option (`capture_size: 8192`, `comm: [nginx]`);
    /// flags and environment variables override it.
    #[arg(long, value_name = "PATH")]
    pub config: Option<std::path::PathBuf>,
    /// Trace this process id (repeatable).
    #[arg(long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,
    /// Trace processes whose command name matches (glob with * and ?; repeatable).
    #[arg(long = "comm", value_name = "NAME")]
    pub comms: Vec<String>,
    /// Trace processes whose executable path or file name matches (glob; repeatable).
    #[arg(long = "exe", value_name = "PATH")]
    pub exes: Vec<String>,
    /// Trace processes listening on or connected to this TCP port (repeatable).
    #[arg(long = "port", value_name = "PORT")]
    pub ports: Vec<u16>,
    /// OTLP endpoint of an OpenTelemetry collector, e.g. http://localhost:4317 (gRPC) or
    /// http://localhost:4318 (HTTP). Unset: print traces on the terminal.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// `otlp_endpoint` came from `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`: the full traces URL
    /// (set by the configuration loader, which knows where each value came from).
    #[arg(skip)]
    pub otlp_endpoint_is_traces_url: bool,
    /// OTLP transport.
    #[arg(
        long,
        env = "OTEL_EXPORTER_OTLP_PROTOCOL",
        value_enum,
        default_value = "grpc"
    )]
    pub otlp_protocol: ProtocolArg,
    /// PEM file of the CA certificate(s) that may sign the collector's certificate (https://).
    /// Unset: the public root CAs (Mozilla's list, built into the agent).
    #[arg(long, env = "OTEL_EXPORTER_OTLP_CERTIFICATE", value_name = "PATH")]
    pub otlp_certificate: Option<PathBuf>,
    /// PEM file of the client certificate (chain) shown to a collector that requires one (mTLS).
    #[arg(
        long,
        env = "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
        value_name = "PATH"
    )]
    pub otlp_client_certificate: Option<PathBuf>,
    /// PEM file of the client certificate's private key (mTLS).
    #[arg(long, env = "OTEL_EXPORTER_OTLP_CLIENT_KEY", value_name = "PATH")]
    pub otlp_client_key: Option<PathBuf>,
    /// Header sent with every export request, e.g. an API key (repeatable; the value is
    /// percent-decoded; values are never logged).
    #[arg(
        long = "otlp-header",
        env = "OTEL_EXPORTER_OTLP_HEADERS",
        value_name = "KEY=VALUE",
        value_parser = HeaderArg::parse
    )]
    pub otlp_headers: Vec<HeaderArg>,
    /// Compression of export requests.
    #[arg(
        long,
        env = "OTEL_EXPORTER_OTLP_COMPRESSION",
        value_enum,
        default_value = "none"
    )]
    pub otlp_compression: CompressionArg,
    /// Longest wait for one export request (retries included), in milliseconds; also bounds
    /// the flush at exit.
    #[arg(
        long,
        env = "OTEL_EXPORTER_OTLP_TIMEOUT",
        default_value_t = 10_000,
        value_parser = clap::value_parser!(u64).range(1..),
        value_name = "MILLISECONDS"
    )]
    pub otlp_timeout: u64,
    /// gRPC to an endpoint given without a scheme (`collector:4317`) uses plain HTTP/2
    /// instead of TLS. A URL's http:// or https:// always decides.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_INSECURE")]
    pub otlp_insecure: bool,
    /// Bytes of each socket read/write copied from the kernel (64..=8192). HTTP headers larger
    /// than this are not parsed; bodies are followed by length whatever their size.
    #[arg(long, default_value_t = agent_common::DEFAULT_CAPTURE, value_name = "BYTES")]
    pub capture_size: u32,
    /// Record SQL statements as sent. By default literals are replaced by `?`: statement text
    /// often carries personal data.
    #[arg(long)]
    pub db_raw_query: bool,
    /// Print the counters every N seconds (0: only at exit).
    #[arg(long, default_value_t = 0, value_name = "SECONDS")]
    pub stats_interval: u64,
    /// Insert a W3C `traceparent` header into outgoing HTTP/1.x requests of traced processes
    /// (in the kernel, with sk_msg) so the called service continues the trace.
    #[arg(long, value_enum, default_value = "on", value_name = "on|off")]
    pub context_propagation: Switch,
    /// Make a client call the child of the request its process is serving on the same thread
    /// (or the only request in flight on an event loop).
    #[arg(long, value_enum, default_value = "on", value_name = "on|off")]
    pub in_process_linking: Switch,
    /// When both ends of a connection are traced on this host, make the callee's server span
    /// the child of the caller's client span even without a header (PostgreSQL, TLS later).
    #[arg(long, value_enum, default_value = "on", value_name = "on|off")]
    pub same_host_pairing: Switch,
    /// A trace adopted from a long-lived connection stops growing after this many spans from
    /// this agent; later requests start new traces.
    #[arg(long, default_value_t = 1000, value_name = "SPANS")]
    pub max_spans_per_trace: u32,
    /// A trace older than this (from its first span seen here) is not continued; later
    /// requests start new traces.
    #[arg(long, default_value_t = 300, value_name = "SECONDS")]
    pub max_trace_age: u64,
    /// Kubernetes metadata on every resource (k8s.pod.name, k8s.deployment.name, container.id,
    /// service.name from the workload) and selection by pod. auto: on when the agent runs in a
    /// pod (KUBERNETES_SERVICE_HOST is set).
    #[arg(long, value_enum, default_value = "auto", value_name = "auto|on|off")]
    pub kubernetes: KubernetesArg,
    /// The Kubernetes node this agent runs on: its pods are the ones described. Default: the
    /// NODE_NAME variable (set it from the downward API), else the node of the agent's own pod.
    #[arg(long, env = "NODE_NAME", value_name = "NAME")]
    pub k8s_node_name: Option<String>,
    /// Trace only processes of pods in this namespace (repeatable: any of them). Combined with
    /// --pid/--comm/--exe/--port, only their processes in matching pods are traced.
    #[arg(long = "k8s-namespace", value_name = "NS")]
    pub k8s_namespaces: Vec<String>,
    /// Trace only processes of pods with this label (repeatable: all must match).
    #[arg(long = "k8s-pod-label", value_name = "KEY=VALUE", value_parser = k8s::filter::parse_key_value)]
    pub k8s_pod_labels: Vec<(String, String)>,
    /// Trace only processes of pods with this annotation (repeatable: all must match).
    #[arg(long = "k8s-pod-annotation", value_name = "KEY=VALUE", value_parser = k8s::filter::parse_key_value)]
    pub k8s_pod_annotations: Vec<(String, String)>,
}

impl Cli {
    pub fn selection(&self) -> Selection {
        Selection {
            pids: self.pids.clone(),
            comms: self.comms.clone(),
            exes: self.exes.clone(),
            ports: self.ports.clone(),
            pods: self.pod_filter(),
        }
    }

    fn pod_filter(&self) -> k8s::PodFilter {
        k8s::PodFilter {
            namespaces: self.k8s_namespaces.clone(),
            labels: self.k8s_pod_labels.clone(),
            annotations: self.k8s_pod_annotations.clone(),
        }
    }

    pub fn kubernetes_config(&self) -> k8s::Config {
        k8s::Config {
            mode: match self.kubernetes {
                KubernetesArg::Auto => k8s::Mode::Auto,
                KubernetesArg::On => k8s::Mode::On,
                KubernetesArg::Off => k8s::Mode::Off,
            },
            node_name: self.k8s_node_name.clone(),
            filter: self.pod_filter(),
        }
    }

    /// Where and how spans are exported. Fails on a malformed `--otlp-header` (naming the
    /// header, never its value).
    pub fn export_config(&self) -> Result<ExportConfig, ExportError> {
        let target = match self.otlp_endpoint.as_deref().map(str::trim) {
            None | Some("") => ExportTarget::Console,
            Some(endpoint) => ExportTarget::Otlp {
                endpoint: endpoint.to_string(),
                protocol: match self.otlp_protocol {
                    ProtocolArg::Grpc => OtlpProtocol::Grpc,
                    ProtocolArg::HttpProtobuf => OtlpProtocol::HttpProtobuf,
                },
                form: if self.otlp_endpoint_is_traces_url {
                    EndpointForm::TracesUrl
                } else {
                    EndpointForm::Base
                },
                options: OtlpOptions {
                    headers: Headers::parse(&self.otlp_headers)?,
                    compression: match self.otlp_compression {
                        CompressionArg::None => Compression::None,
                        CompressionArg::Gzip => Compression::Gzip,
                    },
                    tls: TlsFiles {
                        certificate: self.otlp_certificate.clone(),
                        client_certificate: self.otlp_client_certificate.clone(),
                        client_key: self.otlp_client_key.clone(),
                    },
                    insecure: self.otlp_insecure,
                },
            },
        };
        Ok(ExportConfig {
            timeout: std::time::Duration::from_millis(self.otlp_timeout),
            ..ExportConfig::new(target)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_selection_and_export() {
        let cli = Cli::try_parse_from([
            "agent",
            "--pid",
            "1",
            "--comm",
            "py*",
            "--port",
            "80",
            "--otlp-endpoint",
            "http://c:4318",
            "--otlp-protocol",
            "http/protobuf",
        ])
        .expect("parse");
        assert_eq!(cli.selection().pids, vec![1]);
        assert!(!cli.selection().traces_all());
        assert_eq!(
            cli.export_config().expect("valid").target,
            ExportTarget::Otlp {
                endpoint: "http://c:4318".into(),
                protocol: OtlpProtocol::HttpProtobuf,
                form: EndpointForm::Base,
                options: OtlpOptions::default(),
            }
        );
    }

    #[test]
    fn defaults_trace_all_to_console() {
        let cli = Cli::try_parse_from(["agent"]).expect("parse");
        if std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_none() {
            assert_eq!(
                cli.export_config().expect("valid").target,
                ExportTarget::Console
            );
        }
        assert!(cli.selection().traces_all());
        assert!(Cli::try_parse_from(["agent", "--otlp-protocol", "json"]).is_err());
    }

    #[test]
    fn kubernetes_flags() {
        let cli = Cli::try_parse_from([
            "agent",
            "--kubernetes",
            "on",
            "--k8s-node-name",
            "node-1",
            "--k8s-namespace",
            "shop",
            "--k8s-namespace",
            "pay",
            "--k8s-pod-label",
            "app.kubernetes.io/name=web",
            "--k8s-pod-annotation",
            "trace=a=b",
        ])
        .expect("parse");
        let k = cli.kubernetes_config();
        assert_eq!(k.mode, k8s::Mode::On);
        assert_eq!(k.node_name.as_deref(), Some("node-1"));
        assert_eq!(k.filter.namespaces, ["shop", "pay"]);
        assert_eq!(
            k.filter.labels,
            [("app.kubernetes.io/name".to_string(), "web".to_string())]
        );
        assert_eq!(
            k.filter.annotations,
            [("trace".to_string(), "a=b".to_string())]
        );
        assert!(!cli.selection().traces_all());
        assert_eq!(cli.selection().pods, k.filter);

        let default = Cli::try_parse_from(["agent"]).expect("parse");
        assert_eq!(default.kubernetes, KubernetesArg::Auto);
        assert!(default.kubernetes_config().filter.is_empty());
        let err = Cli::try_parse_from(["agent", "--k8s-pod-label", "app"])
            .expect_err("not KEY=VALUE")
            .to_string();
        assert!(err.contains("KEY=VALUE"), "{err}");
        assert!(Cli::try_parse_from(["agent", "--kubernetes", "maybe"]).is_err());
    }
}
