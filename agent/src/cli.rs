//! Command line. Every option can also come from the environment (`EBPF_AGENT_<OPTION>`, and
//! the standard OTEL_* variables for export) or from the `--config` YAML file: see config.rs,
//! which derives both from the definitions below. Flags > environment > file > defaults.

use std::net::SocketAddr;

use clap::{Parser, ValueEnum};

use std::path::PathBuf;

use crate::{
    export::{
        self, Compression, EndpointForm, ExportConfig, ExportError, ExportTarget, HeaderArg,
        Headers, OtlpOptions, OtlpProtocol, TlsFiles,
    },
    k8s, kernel,
    selection::{self, Selection},
};

/// Largest process id Linux hands out (`PID_MAX_LIMIT` on 64-bit kernels).
const PID_MAX: u32 = 4_194_304;
/// Bounds of the interval and trace-size options: a day, a million spans.
const MAX_SECONDS: u64 = 86_400;
const MAX_SPANS: u32 = 1_000_000;

/// A parser for a number option that accepts `min..=max`. Its message names the range and not
/// the value: the value may come from a file (clap names the option and, on the command line,
/// the value itself).
fn number_in<T>(min: T, max: T) -> impl Fn(&str) -> Result<T, String> + Clone + Send + Sync
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy + Send + Sync + 'static,
{
    move |text| match text.parse::<T>() {
        Ok(n) if min <= n && n <= max => Ok(n),
        _ => Err(format!("expected a whole number from {min} to {max}")),
    }
}

/// `--sample-ratio`: a share from 0 to 1.
fn sample_ratio(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!(
            "expected a share of requests from 0 to 1, e.g. 0.1 for 10 %, found {text:?}"
        )),
    }
}

fn endpoint(text: &str) -> Result<String, String> {
    export::check_endpoint(text)
        .map(|()| text.to_owned())
        .map_err(|why| format!("{why} (expected a URL such as http://localhost:4317)"))
}

/// `--comm` and `--exe` values name something: an empty one would select nothing, silently.
fn not_empty(text: &str) -> Result<String, String> {
    if text.trim().is_empty() {
        Err("expected a name or a glob, not an empty value".to_owned())
    } else {
        Ok(text.to_owned())
    }
}

/// `--capture-size` takes any number; values outside what one event can carry are clamped
/// (and the agent says so).
fn capture_bytes(text: &str) -> Result<u32, String> {
    text.parse().map_err(|_| {
        format!(
            "expected a number of bytes ({} to {}; other values are clamped)",
            kernel::MIN_CAPTURE,
            agent_common::MAX_CAPTURE
        )
    })
}

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
    #[arg(long = "pid", value_name = "PID", value_parser = number_in(1, PID_MAX))]
    pub pids: Vec<u32>,
    /// Trace processes whose command name matches (glob with * and ?; repeatable). The kernel
    /// keeps 15 bytes of a command name: longer names are cut to those.
    #[arg(long = "comm", value_name = "NAME", value_parser = not_empty)]
    pub comms: Vec<String>,
    /// Trace processes whose executable is this program: a path or a name looked up in PATH
    /// (symlinks resolved), or a glob on the executable's path or file name (repeatable).
    #[arg(long = "exe", value_name = "PATH", value_parser = not_empty)]
    pub exes: Vec<String>,
    /// Trace processes listening on or connected to this TCP port (repeatable).
    #[arg(long = "port", value_name = "PORT", value_parser = number_in(1u16, u16::MAX))]
    pub ports: Vec<u16>,
    /// OTLP endpoint of an OpenTelemetry collector, e.g. http://localhost:4317 (gRPC) or
    /// http://localhost:4318 (HTTP). Unset: print traces on the terminal.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", value_name = "URL", value_parser = endpoint)]
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
    /// Bytes of each socket read/write copied from the kernel (64..=8192; other values are
    /// clamped). HTTP headers larger than this are not parsed; bodies are followed by length
    /// whatever their size.
    #[arg(long, default_value_t = agent_common::DEFAULT_CAPTURE, value_name = "BYTES", value_parser = capture_bytes)]
    pub capture_size: u32,
    /// Record SQL statements (and the error messages of failed ones) as sent. By default
    /// literals are replaced by `?`: statement text often carries personal data. Command
    /// lines, paths and queries are redacted either way.
    #[arg(long)]
    pub db_raw_query: bool,
    /// Print the counters every N seconds (0: only at exit; at most a day).
    #[arg(long, default_value_t = 0, value_name = "SECONDS", value_parser = number_in(0, MAX_SECONDS))]
    pub stats_interval: u64,
    /// Serve Prometheus metrics (GET /metrics) and health probes (/healthz: live, /readyz:
    /// ready) over HTTP on this address, e.g. 0.0.0.0:9464. Unset: nothing is served.
    #[arg(long, value_name = "IP:PORT", value_parser = parse_metrics_address)]
    pub metrics_address: Option<SocketAddr>,
    /// Show every counter in the exit summary and in --stats-interval lines, zeros included.
    #[arg(long)]
    pub verbose: bool,
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
    /// Runtime mechanisms: probes inside selected programs that tell which served request a
    /// client request is written for (list; `none` turns them all off). `go` is not on by
    /// default: its nine probe hits per request cost a saturated Go service most of its
    /// throughput here (BENCHMARKS.md).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_values = ["nginx"],
        value_name = "nginx|go|none"
    )]
    pub runtime_linking: Vec<crate::runtimes::Mechanism>,
    /// Read TLS connections as plaintext through their TLS library (OpenSSL: `libssl.so`, or a
    /// program that exports `SSL_read`/`SSL_write` itself), found in each selected process's
    /// mapped files (rescanned every 2 s for libraries loaded later).
    #[arg(long, value_enum, default_value = "on", value_name = "on|off")]
    pub tls: Switch,
    /// Kernel hooks that capture socket data. auto: the best this kernel offers (the
    /// sock_*_length tracepoints of Linux 6.3+, else fexit, else kprobes; the start-up report
    /// says which). Naming one forces it, to measure or test a fallback; the agent stops if
    /// the kernel lacks it.
    #[arg(
        long,
        value_enum,
        default_value = "auto",
        value_name = "auto|tracepoints|fexit|kprobes"
    )]
    pub socket_hooks: crate::kernel::SocketHooks,
    /// Head sampling: trace this share of requests (0 to 1), decided in the kernel at each
    /// request's first bytes. Parent-based: a request with a valid `traceparent` follows its
    /// sampled flag, and the calls a request makes follow it (their injected `traceparent`
    /// says so). A request left out costs no agent work. Unset: every request is traced,
    /// whatever its `traceparent` says. Needs context propagation (off without it).
    #[arg(long, value_name = "RATIO", value_parser = sample_ratio)]
    pub sample_ratio: Option<f64>,
    /// A trace adopted from a long-lived connection stops growing after this many spans from
    /// this agent; later requests start new traces.
    #[arg(long, default_value_t = 1000, value_name = "SPANS", value_parser = number_in(1, MAX_SPANS))]
    pub max_spans_per_trace: u32,
    /// A trace older than this (from its first span seen here) is not continued; later
    /// requests start new traces.
    #[arg(long, default_value_t = 300, value_name = "SECONDS", value_parser = number_in(1, MAX_SECONDS))]
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
    /// Run even if another agent is running on this host. Both then trace the same processes
    /// and export every span twice; by default the second one refuses to start.
    #[arg(long)]
    pub allow_multiple_agents: bool,
}

/// `--metrics-address`: an IP address and a port.
fn parse_metrics_address(text: &str) -> Result<SocketAddr, String> {
    text.trim().parse().map_err(|_| {
        format!(
            "expected IP:PORT, e.g. 0.0.0.0:9464 (every interface), 127.0.0.1:9464 or \
             [::]:9464, found {text:?}"
        )
    })
}

impl Cli {
    /// Brings values the agent cannot use as given into range, and says what it changed (a
    /// capture size beyond what an event carries, a command name longer than the kernel's).
    pub fn adjust(&mut self) -> Vec<String> {
        let mut notes = Vec::new();
        let capture = kernel::clamp_capture(self.capture_size);
        if capture != self.capture_size {
            notes.push(format!(
                "--capture-size {} is outside {}..={}: capturing {capture} bytes",
                self.capture_size,
                kernel::MIN_CAPTURE,
                agent_common::MAX_CAPTURE
            ));
            self.capture_size = capture;
        }
        for comm in &mut self.comms {
            if let Some(cut) = selection::kernel_comm(comm) {
                notes.push(format!(
                    "--comm {comm} is longer than the {} bytes the kernel keeps of a command \
                     name: matching {cut}",
                    selection::COMM_MAX
                ));
                *comm = cut;
            }
        }
        notes
    }

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
    fn sample_ratio_is_a_share_from_0_to_1() {
        for (text, want) in [("0", 0.0), ("1", 1.0), ("0.1", 0.1), (" 0.25 ", 0.25)] {
            assert_eq!(sample_ratio(text), Ok(want), "{text:?}");
        }
        for text in ["-0.1", "1.5", "10%", "", "NaN", "inf"] {
            let err = sample_ratio(text).expect_err(text);
            assert!(err.contains("from 0 to 1"), "{text:?}: {err}");
        }
        let cli = Cli::try_parse_from(["agent"]).expect("no options");
        assert_eq!(
            cli.sample_ratio, None,
            "unset by default: every request traced"
        );
    }

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

    /// clap's message for a command line, or "" when it is accepted.
    fn refusal(args: &[&str]) -> String {
        let argv = std::iter::once("agent").chain(args.iter().copied());
        match Cli::try_parse_from(argv) {
            Ok(_) => String::new(),
            Err(err) => err.to_string(),
        }
    }

    #[test]
    fn values_out_of_range_are_refused_naming_the_option_and_range() {
        for (args, option, accepted) in [
            (&["--port", "0"][..], "--port <PORT>", "from 1 to 65535"),
            (&["--port", "65536"], "--port <PORT>", "from 1 to 65535"),
            (&["--pid", "0"], "--pid <PID>", "from 1 to 4194304"),
            (&["--pid=-3"], "--pid <PID>", "from 1 to 4194304"),
            (
                &["--stats-interval", "86401"],
                "--stats-interval <SECONDS>",
                "from 0 to 86400",
            ),
            (
                &["--max-trace-age", "0"],
                "--max-trace-age <SECONDS>",
                "from 1 to 86400",
            ),
            (
                &["--max-spans-per-trace", "0"],
                "--max-spans-per-trace <SPANS>",
                "from 1 to 1000000",
            ),
            (
                &["--capture-size", "lots"],
                "--capture-size <BYTES>",
                "expected a number of bytes (64 to 8192; other values are clamped)",
            ),
            (&["--comm", ""], "--comm <NAME>", "not an empty value"),
            (&["--exe", " "], "--exe <PATH>", "not an empty value"),
            (
                &["--otlp-endpoint", "http://collector:0"],
                "--otlp-endpoint <URL>",
                "the port must be a number from 1 to 65535",
            ),
            (
                &["--otlp-endpoint", "http://collector:99999/v1/traces"],
                "--otlp-endpoint <URL>",
                "the port must be a number from 1 to 65535",
            ),
            (
                &["--otlp-endpoint", "ftp://collector:21"],
                "--otlp-endpoint <URL>",
                "the scheme must be http:// or https://",
            ),
            (
                &["--otlp-endpoint", "http://:4317"],
                "--otlp-endpoint <URL>",
                "no host",
            ),
            (
                &["--otlp-endpoint", "http://[::1:4317"],
                "--otlp-endpoint <URL>",
                "lacks its `]`",
            ),
        ] {
            let msg = refusal(args);
            assert!(
                msg.contains(&format!("for '{option}'")) && msg.contains(accepted),
                "{args:?}: {msg}"
            );
        }
        for accepted in [
            &["--port", "1", "--port", "65535", "--pid", "4194304"][..],
            &["--stats-interval", "0", "--max-trace-age", "86400"],
            &["--otlp-endpoint", ""],
            &["--otlp-endpoint", "collector:4317"],
            &["--otlp-endpoint", "https://collector.example.com"],
            &["--otlp-endpoint", "http://[::1]:4318/otlp"],
            &["--otlp-endpoint", "HTTP://10.0.0.1:4317"],
            &["--capture-size", "0"],
            &["--capture-size", "100000"],
        ] {
            assert_eq!(refusal(accepted), "", "{accepted:?}");
        }
    }

    #[test]
    fn values_the_agent_cannot_use_as_given_are_adjusted_and_said() {
        let adjusted = |args: &[&str]| {
            let mut cli = Cli::try_parse_from(std::iter::once("agent").chain(args.iter().copied()))
                .expect("parse");
            let notes = cli.adjust();
            (cli, notes)
        };
        let (cli, notes) = adjusted(&["--capture-size", "100000"]);
        assert_eq!(cli.capture_size, 8192);
        assert_eq!(
            notes,
            ["--capture-size 100000 is outside 64..=8192: capturing 8192 bytes"]
        );
        let (cli, notes) = adjusted(&["--capture-size", "0"]);
        assert_eq!(cli.capture_size, 64);
        assert_eq!(
            notes,
            ["--capture-size 0 is outside 64..=8192: capturing 64 bytes"]
        );

        let (cli, notes) = adjusted(&["--comm", "my-very-long-service", "--comm", "nginx"]);
        assert_eq!(cli.comms, ["my-very-long-se", "nginx"]);
        assert_eq!(
            notes,
            [
                "--comm my-very-long-service is longer than the 15 bytes the kernel keeps of a \
              command name: matching my-very-long-se"
            ]
        );

        let (cli, notes) = adjusted(&["--capture-size", "4096", "--comm", "python*"]);
        assert_eq!((cli.capture_size, notes.len()), (4096, 0));
    }

    #[test]
    fn metrics_address_and_verbose() {
        let cli = Cli::try_parse_from(["agent"]).expect("parse");
        assert_eq!(cli.metrics_address, None, "off unless asked");
        assert!(!cli.verbose);
        let cli = Cli::try_parse_from(["agent", "--metrics-address", "0.0.0.0:9464", "--verbose"])
            .expect("parse");
        assert_eq!(cli.metrics_address, Some(([0, 0, 0, 0], 9464).into()));
        assert!(cli.verbose);
        let cli = Cli::try_parse_from(["agent", "--metrics-address", "[::1]:0"]).expect("parse");
        assert_eq!(cli.metrics_address, Some("[::1]:0".parse().expect("addr")));
        for bad in ["9464", ":9464", "localhost:9464", "0.0.0.0:99999", ""] {
            let err = Cli::try_parse_from(["agent", "--metrics-address", bad])
                .expect_err(bad)
                .to_string();
            assert!(err.contains("expected IP:PORT"), "{bad}: {err}");
        }
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
