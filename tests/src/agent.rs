//! The agent under test, run as a child process: exporting to a test collector, or (for the
//! benchmarks) printing its spans to the console, into /dev/null.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::thread;
use std::time::{Duration, Instant};

use crate::collector::Collector;
use crate::process::{ChildGuard, POLL, TestDir, read_text, tail};
use crate::spans::{SpanFilter, Spans};
use crate::workspace_dir;

/// How long the agent may take to attach its probes and print `agent ready` (times
/// [`crate::time_scale`], like every wait here).
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the agent may take to flush and exit after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(20);
const READY_MARKER: &str = "agent ready";

/// The agent binary: `AGENT_BIN`, else `<workspace>/target/release/agent`.
pub fn agent_bin() -> PathBuf {
    let path = std::env::var_os("AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_dir().join("target/release/agent"));
    assert!(
        path.exists(),
        "agent binary {} does not exist: build it (`cargo build --release -p agent`) or set AGENT_BIN",
        path.display()
    );
    path
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    Grpc,
    HttpProtobuf,
}

impl OtlpProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            OtlpProtocol::Grpc => "grpc",
            OtlpProtocol::HttpProtobuf => "http/protobuf",
        }
    }
}

/// Command line of the agent: selection flags plus how it reaches the collector.
#[derive(Debug, Clone)]
pub struct AgentBuilder {
    /// Else [`agent_bin`].
    binary: Option<PathBuf>,
    args: Vec<String>,
    env: Vec<(String, String)>,
    protocol: OtlpProtocol,
    endpoint_via_env: bool,
    /// A program (and its arguments) that runs the agent, e.g. `setpriv` to change privileges.
    wrapper: Vec<String>,
}

impl AgentBuilder {
    /// `--pid N`
    pub fn pid(mut self, pid: u32) -> Self {
        self.args.extend(["--pid".to_string(), pid.to_string()]);
        self
    }

    /// `--comm NAME_OR_GLOB`
    pub fn comm(mut self, comm: &str) -> Self {
        self.args.extend(["--comm".to_string(), comm.to_string()]);
        self
    }

    /// `--exe PATH_OR_GLOB`
    pub fn exe(mut self, exe: &str) -> Self {
        self.args.extend(["--exe".to_string(), exe.to_string()]);
        self
    }

    /// `--port P`
    pub fn port(mut self, port: u16) -> Self {
        self.args.extend(["--port".to_string(), port.to_string()]);
        self
    }

    /// `--capture-size BYTES`
    pub fn capture_size(mut self, bytes: usize) -> Self {
        self.args
            .extend(["--capture-size".to_string(), bytes.to_string()]);
        self
    }

    /// Any extra argument.
    pub fn arg(mut self, arg: &str) -> Self {
        self.args.push(arg.to_string());
        self
    }

    /// Extra arguments.
    pub fn args(mut self, args: &[String]) -> Self {
        self.args.extend_from_slice(args);
        self
    }

    /// Runs this agent binary instead of [`agent_bin`] (e.g. the benchmark's release build).
    pub fn binary(mut self, path: &Path) -> Self {
        self.binary = Some(path.to_path_buf());
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Export with OTLP/HTTP protobuf instead of gRPC.
    pub fn protocol(mut self, protocol: OtlpProtocol) -> Self {
        self.protocol = protocol;
        self
    }

    /// Pass endpoint and protocol in `OTEL_EXPORTER_OTLP_ENDPOINT`/`_PROTOCOL` instead of flags.
    pub fn endpoint_via_env(mut self) -> Self {
        self.endpoint_via_env = true;
        self
    }

    /// Runs the agent through `program args…` (which must exec the rest of its command line).
    pub fn wrapped_in(mut self, program: &str, args: &[&str]) -> Self {
        self.wrapper = std::iter::once(program)
            .chain(args.iter().copied())
            .map(str::to_string)
            .collect();
        self
    }

    fn collector_endpoint(&self, collector: &Collector) -> String {
        match self.protocol {
            OtlpProtocol::Grpc => collector.grpc_endpoint(),
            OtlpProtocol::HttpProtobuf => collector.http_endpoint(),
        }
    }

    /// The agent's command, exporting to `endpoint` (none: the console exporter), and its
    /// command line for messages.
    fn command(&self, endpoint: Option<&str>) -> (Command, String) {
        let bin = self.binary.clone().unwrap_or_else(agent_bin);
        let mut cmd = match self.wrapper.split_first() {
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(&bin);
                cmd
            }
            None => Command::new(&bin),
        };
        cmd.args(&self.args);
        // Only the test's own export settings: none inherited from the shell.
        for (var, _) in std::env::vars_os() {
            if var.to_string_lossy().starts_with("OTEL_EXPORTER_OTLP_") {
                cmd.env_remove(&var);
            }
        }
        cmd.env_remove("OTEL_SERVICE_NAME");
        match endpoint {
            Some(endpoint) if self.endpoint_via_env => {
                cmd.env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
                    .env("OTEL_EXPORTER_OTLP_PROTOCOL", self.protocol.as_str());
            }
            Some(endpoint) => {
                cmd.args(["--otlp-endpoint", endpoint])
                    .args(["--otlp-protocol", self.protocol.as_str()]);
            }
            None => {}
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let command_line = format!(
            "{}{} {}",
            self.wrapper
                .iter()
                .map(|w| format!("{w} "))
                .collect::<String>(),
            bin.display(),
            self.args.join(" ")
        );
        (cmd, command_line)
    }

    /// Runs an agent that is expected to stop by itself at start-up (refused): waits up to
    /// [`READY_TIMEOUT`] and returns its exit status and stderr. Panics if it becomes ready.
    pub fn run_expecting_exit(self, collector: &Collector) -> (ExitStatus, String) {
        let (cmd, command_line) = self.command(Some(&self.collector_endpoint(collector)));
        let dir = TestDir::new("agent");
        let stderr = dir.join("agent.err");
        let mut child = ChildGuard::spawn("agent", cmd, &dir.join("agent.out"), &stderr);
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait() {
                return (status, read_text(&stderr));
            }
            let err = read_text(&stderr);
            if err.contains(READY_MARKER) || started.elapsed() >= crate::scaled(READY_TIMEOUT) {
                child.kill();
                panic!(
                    "the agent was expected to stop at start-up but did not\ncommand: \
                     {command_line}\nstderr:\n{}",
                    tail(&err, 80)
                );
            }
            thread::sleep(POLL);
        }
    }

    /// Starts the agent exporting to `collector` and waits (60 s) for `agent ready` on stderr.
    /// Panics with the agent's stderr if it exits or never becomes ready.
    pub fn start(self, collector: &Collector) -> Agent {
        let endpoint = self.collector_endpoint(collector);
        self.start_exporting_to(&endpoint)
    }

    /// [`AgentBuilder::start`] with any OTLP endpoint (e.g. a [`crate::TlsReceiver`]'s).
    pub fn start_exporting_to(self, endpoint: &str) -> Agent {
        let dir = TestDir::new("agent");
        let stdout = dir.join("agent.out");
        self.start_logging(Some(endpoint), dir, stdout)
    }

    /// Starts the agent with its console exporter, which prints every span: into /dev/null
    /// (what the benchmarks measure: every span built, formatted and written).
    pub fn start_console(self) -> Agent {
        self.start_logging(None, TestDir::new("agent"), PathBuf::from("/dev/null"))
    }

    fn start_logging(self, endpoint: Option<&str>, dir: TestDir, stdout: PathBuf) -> Agent {
        let (cmd, command_line) = self.command(endpoint);
        let stderr = dir.join("agent.err");
        let mut child = ChildGuard::spawn("agent", cmd, &stdout, &stderr);
        let started = Instant::now();
        loop {
            let err = read_text(&stderr);
            if err.contains(READY_MARKER) {
                break;
            }
            if let Some(status) = child.try_wait() {
                panic!(
                    "the agent exited with {status} before printing {READY_MARKER:?}\ncommand: {command_line}\nstderr:\n{}\nstdout:\n{}",
                    tail(&err, 80),
                    tail(&read_text(&stdout), 20)
                );
            }
            if started.elapsed() >= crate::scaled(READY_TIMEOUT) {
                child.kill();
                panic!(
                    "the agent did not print {READY_MARKER:?} within {:?}\ncommand: {command_line}\nstderr:\n{}",
                    crate::scaled(READY_TIMEOUT),
                    tail(&read_text(&stderr), 80)
                );
            }
            thread::sleep(POLL);
        }
        eprintln!(
            "[e2e] agent ready after {:?}: {command_line}",
            started.elapsed()
        );
        Agent {
            child,
            stdout,
            stderr,
            command_line,
            _dir: dir,
        }
    }
}

/// A running agent. Dropping it sends SIGTERM (so it can detach cleanly), SIGKILL after 5 s;
/// [`Agent::stop`] is the checked graceful path.
pub struct Agent {
    child: ChildGuard,
    stdout: PathBuf,
    stderr: PathBuf,
    command_line: String,
    _dir: TestDir,
}

impl Agent {
    pub fn builder() -> AgentBuilder {
        AgentBuilder {
            binary: None,
            args: Vec::new(),
            env: Vec::new(),
            protocol: OtlpProtocol::Grpc,
            endpoint_via_env: false,
            wrapper: Vec::new(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    pub fn stderr(&self) -> String {
        read_text(&self.stderr)
    }

    pub fn stdout(&self) -> String {
        read_text(&self.stdout)
    }

    /// The counters of the exit summary (after [`Agent::stop`]): every `  <name> <value>` line
    /// after `agent: summary`. Empty before the agent stopped.
    pub fn summary_counters(&self) -> BTreeMap<String, u64> {
        self.exit_summary().counters
    }

    /// The exit summary (after [`Agent::stop`]): its counters and its export line.
    pub fn exit_summary(&self) -> ExitSummary {
        ExitSummary::parse(&self.stderr())
    }

    /// Where the agent serves /metrics (started with `--metrics-address`, port 0 allowed):
    /// the address it printed at start-up.
    pub fn metrics_address(&self) -> std::net::SocketAddr {
        let stderr = self.stderr();
        stderr
            .lines()
            .find_map(|l| {
                l.strip_prefix("agent: serving metrics on http://")?
                    .split('/')
                    .next()?
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| {
                panic!(
                    "the agent did not say where it serves metrics (started without                      --metrics-address?)
stderr:
{}",
                    tail(&stderr, 40)
                )
            })
    }

    /// The note after the summary's counters about counters left out: how many were at zero.
    pub fn summary_hidden_zero_counters(&self) -> Option<u64> {
        let stderr = self.stderr();
        let summary = &stderr[stderr.rfind("agent: summary")?..];
        summary.lines().find_map(|l| {
            let rest = l.trim().strip_prefix('(')?;
            let (n, text) = rest.split_once(' ')?;
            if text.starts_with("counter") && text.contains("at zero not shown") {
                n.parse().ok()
            } else {
                None
            }
        })
    }

    /// What the agent said at start-up about context propagation: the text after
    /// `agent: context propagation: `, e.g. `on (canary passed)` or `off (<why>)`.
    pub fn context_propagation_status(&self) -> Option<String> {
        self.stderr().lines().find_map(|l| {
            l.strip_prefix("agent: context propagation: ")
                .map(|s| s.trim().to_string())
        })
    }

    /// The processes the start-up report lists (`agent: selected N process(es): a[1], b[2]`),
    /// and how many more were selected later (`selected comm[pid] (…)` log lines).
    pub fn selection_report(&self) -> (Vec<u32>, u64) {
        let stderr = self.stderr();
        let at_start = stderr
            .lines()
            .find_map(|l| l.strip_prefix("agent: selected "))
            .map(|list| {
                list.split(": ")
                    .nth(1)
                    .unwrap_or_default()
                    .split(", ")
                    .filter_map(|p| p.rsplit_once('[')?.1.strip_suffix(']')?.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        let later = stderr.lines().filter(|l| l.contains("] selected ")).count() as u64;
        (at_start, later)
    }

    /// The end of a traced scenario: waits until `collector` received the spans `wanted` (each
    /// filter matched at least its count, as [`Collector::wait_for_all`]; no wait when empty),
    /// stops the agent ([`Agent::stop`]: SIGTERM, it flushes what it still holds) and returns
    /// every span received once the collector's output settled ([`Collector::settle`]): what
    /// the test asserts on, exact counts and absences included.
    pub fn stop_and_collect(
        &mut self,
        collector: &Collector,
        wanted: &[(&SpanFilter, usize)],
    ) -> Spans {
        if !wanted.is_empty() {
            collector.wait_for_all(wanted);
        }
        self.stop();
        collector.settle()
    }

    /// SIGKILL, as an administrator's `kill -9` would: nothing is flushed or detached by the
    /// agent itself.
    pub fn kill(&mut self) {
        self.child.kill();
    }

    /// The agent has not exited.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().is_none()
    }

    /// SIGTERM, then wait for the flush and exit. Panics (with stderr) unless it exits 0 in time.
    pub fn stop(&mut self) -> ExitStatus {
        if let Some(status) = self.child.try_wait() {
            panic!(
                "the agent already exited with {status} before the test stopped it\nstderr:\n{}",
                tail(&self.stderr(), 80)
            );
        }
        self.child.signal(libc::SIGTERM);
        match self.child.wait_timeout(STOP_TIMEOUT) {
            Some(status) if status.success() => status,
            Some(status) => panic!(
                "the agent exited with {status} after SIGTERM (expected 0)\nstderr:\n{}",
                tail(&self.stderr(), 80)
            ),
            None => {
                self.child.kill();
                panic!(
                    "the agent did not exit within {STOP_TIMEOUT:?} after SIGTERM\nstderr:\n{}",
                    tail(&self.stderr(), 80)
                )
            }
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.child.try_wait().is_none() {
            self.child.signal(libc::SIGTERM);
            let _ = self.child.wait_timeout(Duration::from_secs(5));
        }
        self.child.kill();
        if thread::panicking() {
            eprintln!(
                "[e2e] agent ({}) stderr:\n{}",
                self.command_line,
                tail(&self.stderr(), 120)
            );
        }
    }
}

/// What the agent prints when it stops, after its last `agent: summary` line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExitSummary {
    /// The `  <name> <value>` lines (names without spaces, integer values).
    pub counters: BTreeMap<String, u64>,
    /// `  export: N exported, N failed, N dropped (queue full)`, when printed.
    pub export: Option<ExportTotals>,
}

/// The summary's export line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExportTotals {
    pub exported: u64,
    pub failed: u64,
    pub dropped: u64,
}

impl ExitSummary {
    /// Parses the agent's stderr (empty when there is no `agent: summary` line). The summary
    /// ends at the first line that is not indented; other indented lines are skipped.
    pub fn parse(stderr: &str) -> ExitSummary {
        let mut out = ExitSummary::default();
        let Some(start) = stderr.rfind("agent: summary") else {
            return out;
        };
        for line in stderr[start..].lines().skip(1) {
            if !line.starts_with(' ') {
                break;
            }
            if let Some(export) = line.trim().strip_prefix("export:") {
                out.export = parse_export_line(export);
                continue;
            }
            let mut words = line.split_whitespace();
            if let (Some(name), Some(value), None) = (words.next(), words.next(), words.next())
                && let Ok(value) = value.parse::<u64>()
            {
                out.counters.insert(name.to_string(), value);
            }
        }
        out
    }

    /// A counter's value, 0 when the summary does not list it (counters at zero are hidden
    /// without --verbose).
    pub fn counter(&self, name: &str) -> u64 {
        self.counters.get(name).copied().unwrap_or(0)
    }
}

/// `N exported, N failed, N dropped (queue full)`.
fn parse_export_line(text: &str) -> Option<ExportTotals> {
    let mut totals = ExportTotals::default();
    for part in text.split(',') {
        let mut words = part.split_whitespace();
        let n: u64 = words.next()?.parse().ok()?;
        match words.next()? {
            "exported" => totals.exported = n,
            "failed" => totals.failed = n,
            "dropped" => totals.dropped = n,
            _ => return None,
        }
    }
    Some(totals)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_exit_summary() {
        let stderr = "agent ready: press Ctrl-C to stop\n\
                      agent: stopping: detaching probes and flushing spans\n\
                      agent: summary\n\
                      \x20 data_events                  120\n\
                      \x20 traceparent_injected         7\n\
                      \x20 (31 counters at zero not shown; --verbose shows every counter)\n\
                      \x20 export: 3 exported, 0 failed, 0 dropped (queue full)\n\
                      agent: bye\n\
                      \x20 not_a_counter 9\n";
        let summary = ExitSummary::parse(stderr);
        let counters = &summary.counters;
        assert_eq!(counters.get("data_events"), Some(&120));
        assert_eq!(counters.get("traceparent_injected"), Some(&7));
        assert_eq!(counters.len(), 2, "{counters:?}");
        assert_eq!(summary.counter("data_events"), 120);
        assert_eq!(summary.counter("spans_built"), 0);
        assert_eq!(
            summary.export,
            Some(ExportTotals {
                exported: 3,
                failed: 0,
                dropped: 0
            })
        );
        assert_eq!(ExitSummary::parse("agent ready"), ExitSummary::default());
        // The benchmark's: aligned values, a span dropped.
        let dropping = ExitSummary::parse(
            "agent: summary\n\
             \x20 kernel_data_events           1033772\n\
             \x20 kernel_lost_ringbuf_full     2\n\
             \x20 spans_built                  516890\n\
             \x20 export: 516889 exported, 0 failed, 1 dropped (queue full)",
        );
        assert_eq!(dropping.counter("kernel_data_events"), 1_033_772);
        assert_eq!(dropping.counter("kernel_lost_ringbuf_full"), 2);
        assert_eq!(dropping.counter("spans_built"), 516_890);
        assert_eq!(
            dropping.export.map(|e| (e.exported, e.failed, e.dropped)),
            Some((516_889, 0, 1))
        );
        assert_eq!(
            ExitSummary::parse("agent: summary\n  export: garbled\n").export,
            None
        );
    }
}
