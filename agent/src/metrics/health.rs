//! Whether the agent is live (its event thread makes progress) and ready (probes attached,
//! event thread running, spans reaching the collector), and the state /metrics reports.
//!
//! Everything the event thread publishes is an atomic it stores: a scrape or a probe never
//! makes it wait.

use std::sync::{
    OnceLock, PoisonError, RwLock,
    atomic::{AtomicBool, AtomicU64, Ordering},
};
use std::time::Duration;

use super::Metric;
use super::exposition::{CONTENT_TYPE, Exposition, Number};
use super::server::{Reply, Routes};
use crate::export::{ExportState, ExportStatus};
use crate::spans::context::Clock;

/// Liveness fails when the event thread made no progress for this long: it is wedged, and a
/// restart is the cure.
pub const LIVENESS_STALL: Duration = Duration::from_secs(30);
/// Readiness fails sooner: a thread that stalls for seconds is losing events.
pub const READINESS_STALL: Duration = Duration::from_secs(5);
/// Readiness fails when span export has failed, without a success since, for this long (a
/// collector restarting is not worth reporting; a wrong endpoint or a collector that stays
/// down is).
pub const EXPORT_FAILING_GRACE: Duration = Duration::from_secs(30);

/// A source of counters: the kernel's, the pipeline's, the Kubernetes watcher's.
pub type Source = Box<dyn Fn() -> Vec<Metric> + Send + Sync>;

/// What the running agent publishes for `/metrics`, `/healthz` and `/readyz`. Filled in as
/// start-up proceeds (the responder answers from the start: "starting").
pub struct AgentState {
    /// Monotonic ns of the event thread's last sign of progress; 0 before it started.
    heartbeat_ns: AtomicU64,
    probes_attached: AtomicU64,
    stopping: AtomicBool,
    open_connections: AtomicU64,
    /// `u64::MAX` while every process is traced (there is no selection to count).
    selected_processes: AtomicU64,
    export: OnceLock<ExportStatus>,
    sources: RwLock<Vec<Source>>,
}

impl Default for AgentState {
    fn default() -> Self {
        Self {
            heartbeat_ns: AtomicU64::new(0),
            probes_attached: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
            open_connections: AtomicU64::new(0),
            selected_processes: AtomicU64::new(u64::MAX),
            export: OnceLock::new(),
            sources: RwLock::new(Vec::new()),
        }
    }
}

impl AgentState {
    /// The event thread made progress (called each loop and every few hundred events).
    pub fn beat(&self) {
        self.beat_at(Clock::monotonic_ns());
    }

    pub fn beat_at(&self, monotonic_ns: u64) {
        self.heartbeat_ns
            .store(monotonic_ns.max(1), Ordering::Relaxed);
    }

    pub fn set_probes_attached(&self, n: usize) {
        self.probes_attached.store(n as u64, Ordering::Relaxed);
    }

    /// Shutdown began: not ready any more (and not judged on liveness).
    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    pub fn set_open_connections(&self, n: usize) {
        self.open_connections.store(n as u64, Ordering::Relaxed);
    }

    /// `None`: every process is traced.
    pub fn set_selected_processes(&self, n: Option<usize>) {
        let v = n.map_or(u64::MAX, |n| n as u64);
        self.selected_processes.store(v, Ordering::Relaxed);
    }

    pub fn set_export(&self, status: ExportStatus) {
        // Set once at start-up; a second exporter is not a thing.
        let _ = self.export.set(status);
    }

    /// Counters to report, in summary order (call at start-up, as each part starts).
    pub fn add_source(&self, source: Source) {
        self.sources
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .push(source);
    }

    /// Every counter of every source.
    pub fn counters(&self) -> Vec<Metric> {
        let sources = self.sources.read().unwrap_or_else(PoisonError::into_inner);
        sources.iter().flat_map(|s| s()).collect()
    }

    pub fn snapshot(&self) -> Snapshot {
        let heartbeat = self.heartbeat_ns.load(Ordering::Relaxed);
        Snapshot {
            heartbeat_ns: (heartbeat != 0).then_some(heartbeat),
            probes_attached: self.probes_attached.load(Ordering::Relaxed),
            stopping: self.stopping.load(Ordering::Relaxed),
            export: self.export.get().map(ExportStatus::state),
        }
    }

    /// The `/metrics` page at `now_ns` (monotonic): every counter, then the gauges.
    pub fn exposition(&self, now_ns: u64, clock: Clock) -> String {
        let mut e = Exposition::default();
        for m in self.counters() {
            e.metric(&m);
        }
        let s = self.snapshot();
        let flag = |ok: bool| Number::Int(ok.into());
        e.gauge(
            "up",
            "1 while the agent's event thread makes progress (what /healthz checks).",
            flag(s.liveness(now_ns).ok),
        );
        e.gauge(
            "ready",
            "1 while probes are attached, the event thread runs and span export is not failing \
             (what /readyz checks).",
            flag(s.readiness(now_ns).ok),
        );
        e.gauge(
            "probes_attached",
            "Kernel programs attached.",
            Number::Int(s.probes_attached),
        );
        if let Some(age) = s.heartbeat_age(now_ns) {
            e.gauge(
                "event_thread_heartbeat_age_seconds",
                "Seconds since the event thread last made progress.",
                Number::Float(age.as_secs_f64()),
            );
        }
        e.metric(&Metric::gauge(
            "open_connections",
            "Connections being followed now.",
            self.open_connections.load(Ordering::Relaxed),
        ));
        let selected = self.selected_processes.load(Ordering::Relaxed);
        if selected != u64::MAX {
            e.metric(&Metric::gauge(
                "selected_processes",
                "Processes selected for tracing now (absent when every process is traced).",
                selected,
            ));
        }
        if let Some(export) = s.export {
            e.gauge(
                "export_queue_spans",
                "Spans handed to the exporter and not yet exported or failed (queued or in \
                 a request in flight).",
                Number::Int(export.waiting),
            );
            e.gauge(
                "export_failing_seconds",
                "Seconds since span export started failing without a success since (0: not \
                 failing).",
                Number::Float(
                    export
                        .failing_since_ns
                        .map_or(0.0, |t| seconds_between(t, now_ns)),
                ),
            );
            if let Some(t) = export.last_success_ns {
                e.gauge(
                    "export_last_success_timestamp_seconds",
                    "Unix time of the last export that delivered spans.",
                    Number::Float(clock.to_unix_nanos(t) as f64 / 1e9),
                );
            }
        }
        e.labelled_gauge(
            "build_info",
            "The agent's version (always 1).",
            &[("version", env!("CARGO_PKG_VERSION"))],
            1,
        );
        e.finish()
    }
}

impl Routes for AgentState {
    fn get(&self, path: &str) -> Option<Reply> {
        let now = Clock::monotonic_ns();
        match path {
            "/metrics" => Some(Reply {
                status: 200,
                content_type: CONTENT_TYPE,
                body: self.exposition(now, Clock::now()),
            }),
            "/healthz" => Some(self.snapshot().liveness(now).reply()),
            "/readyz" => Some(self.snapshot().readiness(now).reply()),
            _ => None,
        }
    }
}

/// The agent at one instant, as the probes judge it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Snapshot {
    /// `None` before the event thread started.
    pub heartbeat_ns: Option<u64>,
    pub probes_attached: u64,
    pub stopping: bool,
    /// `None` before the exporter started.
    pub export: Option<ExportState>,
}

/// A probe's answer: a status and one line saying why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub ok: bool,
    pub reason: String,
}

impl Verdict {
    fn ok(reason: String) -> Self {
        Self { ok: true, reason }
    }

    fn fail(reason: String) -> Self {
        Self { ok: false, reason }
    }

    fn reply(self) -> Reply {
        Reply {
            status: if self.ok { 200 } else { 503 },
            content_type: "text/plain; charset=utf-8",
            body: format!("{}\n", self.reason),
        }
    }
}

fn seconds_between(earlier_ns: u64, later_ns: u64) -> f64 {
    Duration::from_nanos(later_ns.saturating_sub(earlier_ns)).as_secs_f64()
}

impl Snapshot {
    fn heartbeat_age(&self, now_ns: u64) -> Option<Duration> {
        self.heartbeat_ns
            .map(|t| Duration::from_nanos(now_ns.saturating_sub(t)))
    }

    /// Live unless the event thread stopped making progress: only then does a restart help.
    pub fn liveness(&self, now_ns: u64) -> Verdict {
        if self.stopping {
            return Verdict::ok("live: stopping".into());
        }
        match self.heartbeat_age(now_ns) {
            None => Verdict::ok("live: starting (the event thread has not started yet)".into()),
            Some(age) if age > LIVENESS_STALL => Verdict::fail(format!(
                "not live: the event thread made no progress for {:.0} s (wedged)",
                age.as_secs_f64()
            )),
            Some(age) => Verdict::ok(format!(
                "live: the event thread made progress {:.1} s ago",
                age.as_secs_f64()
            )),
        }
    }

    /// Ready when the probes are attached, the event thread runs and spans are not failing
    /// to reach the collector.
    pub fn readiness(&self, now_ns: u64) -> Verdict {
        if self.stopping {
            return Verdict::fail("not ready: stopping".into());
        }
        if self.probes_attached == 0 {
            return Verdict::fail("not ready: starting (probes not attached yet)".into());
        }
        let Some(age) = self.heartbeat_age(now_ns) else {
            return Verdict::fail("not ready: starting (the event thread has not started)".into());
        };
        if age > READINESS_STALL {
            return Verdict::fail(format!(
                "not ready: the event thread made no progress for {:.0} s",
                age.as_secs_f64()
            ));
        }
        let export = match self.export {
            None => "span export not started".to_owned(),
            Some(ExportState {
                failing_since_ns: Some(since),
                last_success_ns,
                ..
            }) => {
                let failing = seconds_between(since, now_ns);
                let last = match last_success_ns {
                    Some(t) => format!("last success {:.0} s ago", seconds_between(t, now_ns)),
                    None => "no span exported yet".to_owned(),
                };
                let what = format!(
                    "span export failing for {failing:.0} s ({last}; the agent's log has the errors)"
                );
                if failing >= EXPORT_FAILING_GRACE.as_secs_f64() {
                    return Verdict::fail(format!("not ready: {what}"));
                }
                what
            }
            Some(ExportState {
                last_success_ns: Some(t),
                ..
            }) => format!(
                "span export ok (last success {:.0} s ago)",
                seconds_between(t, now_ns)
            ),
            Some(_) => "span export ok (nothing exported yet)".to_owned(),
        };
        Verdict::ok(format!(
            "ready: {} probes attached, the event thread made progress {:.1} s ago, {export}",
            self.probes_attached,
            age.as_secs_f64()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::exposition::tests::{name_problem, parse};

    const S: u64 = 1_000_000_000;
    /// An arbitrary monotonic "now", far from zero.
    const NOW: u64 = 10_000 * S;

    fn running() -> Snapshot {
        Snapshot {
            heartbeat_ns: Some(NOW - S / 10),
            probes_attached: 12,
            stopping: false,
            export: Some(ExportState {
                last_success_ns: Some(NOW - 2 * S),
                failing_since_ns: None,
                waiting: 0,
            }),
        }
    }

    #[test]
    fn a_running_agent_is_live_and_ready() {
        let s = running();
        let live = s.liveness(NOW);
        assert!(live.ok, "{live:?}");
        let ready = s.readiness(NOW);
        assert!(ready.ok, "{ready:?}");
        assert_eq!(
            ready.reason,
            "ready: 12 probes attached, the event thread made progress 0.1 s ago, span export \
             ok (last success 2 s ago)"
        );
    }

    #[test]
    fn a_stuck_heartbeat_fails_readiness_first_then_liveness() {
        let mut s = running();
        s.heartbeat_ns = Some(NOW - 10 * S);
        assert!(s.liveness(NOW).ok, "10 s is not wedged yet");
        let ready = s.readiness(NOW);
        assert!(!ready.ok);
        assert_eq!(
            ready.reason,
            "not ready: the event thread made no progress for 10 s"
        );
        s.heartbeat_ns = Some(NOW - 31 * S);
        let live = s.liveness(NOW);
        assert!(!live.ok);
        assert_eq!(
            live.reason,
            "not live: the event thread made no progress for 31 s (wedged)"
        );
        // The reason is one line: a probe's output shows it whole.
        assert!(!live.reply().body.trim_end().contains('\n'));
    }

    #[test]
    fn a_failing_exporter_makes_the_agent_not_ready_after_a_grace_but_still_live() {
        let mut s = running();
        s.export = Some(ExportState {
            last_success_ns: Some(NOW - 50 * S),
            failing_since_ns: Some(NOW - 10 * S),
            waiting: 3,
        });
        let ready = s.readiness(NOW);
        assert!(ready.ok, "a short failure is tolerated: {ready:?}");
        assert!(
            ready.reason.contains("span export failing for 10 s"),
            "{ready:?}"
        );
        s.export = Some(ExportState {
            last_success_ns: None,
            failing_since_ns: Some(NOW - 45 * S),
            waiting: 3,
        });
        let ready = s.readiness(NOW);
        assert!(!ready.ok);
        assert_eq!(
            ready.reason,
            "not ready: span export failing for 45 s (no span exported yet; the agent's log \
             has the errors)"
        );
        assert!(
            s.liveness(NOW).ok,
            "a collector outage is no reason to restart"
        );
    }

    #[test]
    fn starting_and_stopping() {
        let starting = Snapshot::default();
        assert!(starting.liveness(NOW).ok);
        let r = starting.readiness(NOW);
        assert!(!r.ok && r.reason.contains("probes not attached"), "{r:?}");
        let attached = Snapshot {
            probes_attached: 3,
            ..Snapshot::default()
        };
        let r = attached.readiness(NOW);
        assert!(
            !r.ok && r.reason.contains("event thread has not started"),
            "{r:?}"
        );
        let mut stopping = running();
        stopping.stopping = true;
        stopping.heartbeat_ns = Some(NOW - 60 * S);
        assert!(stopping.liveness(NOW).ok);
        assert_eq!(stopping.readiness(NOW).reason, "not ready: stopping");
    }

    #[test]
    fn the_state_follows_the_heartbeat() {
        let state = AgentState::default();
        state.set_probes_attached(4);
        state.beat_at(NOW - 40 * S);
        assert!(!state.snapshot().liveness(NOW).ok);
        state.beat_at(NOW);
        assert!(state.snapshot().liveness(NOW).ok);
        assert!(state.snapshot().readiness(NOW).ok);
        // The routes judge at the real clock's now.
        state.beat();
        let ready = state.get("/readyz").expect("route");
        assert_eq!(ready.status, 200, "{ready:?}");
        assert!(
            ready.body.starts_with("ready: 4 probes attached"),
            "{ready:?}"
        );
        state.set_stopping();
        let ready = state.get("/readyz").expect("route");
        assert_eq!(
            (ready.status, ready.body.as_str()),
            (503, "not ready: stopping\n")
        );
        assert_eq!(state.get("/healthz").expect("route").status, 200);
        assert_eq!(state.get("/nope"), None);
    }

    #[test]
    fn the_exposition_has_every_source_and_the_gauges() {
        let state = AgentState::default();
        state.add_source(Box::new(|| {
            vec![
                Metric::counter("events_read", " Ring buffer records read.", 5),
                Metric::gauge("k8s_pods_known", " Pods known.", 2),
            ]
        }));
        state.add_source(Box::new(|| {
            vec![Metric::counter("kernel_bytes", " Bytes.", 1)]
        }));
        state.set_probes_attached(9);
        state.set_open_connections(3);
        state.set_selected_processes(Some(2));
        state.beat_at(NOW - S / 2);
        let text = state.exposition(NOW, Clock::with_offset(0));
        let families = parse(&text);
        let value = |name: &str| {
            families
                .iter()
                .find(|f| f.name == name)
                .map(|f| f.samples[0].1.clone())
                .unwrap_or_else(|| panic!("no {name} in\n{text}"))
        };
        assert_eq!(value("ebpf_agent_events_read_total"), "5");
        assert_eq!(value("ebpf_agent_k8s_pods_known"), "2");
        assert_eq!(value("ebpf_agent_kernel_bytes_total"), "1");
        assert_eq!(value("ebpf_agent_up"), "1");
        assert_eq!(value("ebpf_agent_ready"), "1");
        assert_eq!(value("ebpf_agent_probes_attached"), "9");
        assert_eq!(value("ebpf_agent_open_connections"), "3");
        assert_eq!(value("ebpf_agent_selected_processes"), "2");
        assert_eq!(
            value("ebpf_agent_event_thread_heartbeat_age_seconds"),
            "0.5"
        );
        for f in &families {
            assert_eq!(name_problem(&f.name, &f.kind), None);
            assert!(!f.help.is_empty(), "{} has no help", f.name);
        }
        state.set_selected_processes(None);
        assert!(
            !state
                .exposition(NOW, Clock::with_offset(0))
                .contains("selected_processes"),
            "no selection, no gauge"
        );
    }
}
