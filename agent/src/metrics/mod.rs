//! What the agent tells its operator: the counters of the exit summary and of
//! `--stats-interval` lines, and, with `--metrics-address`, the same counters plus a few gauges
//! as Prometheus metrics (`/metrics`) and health probes (`/healthz`, `/readyz`).
//!
//! - `exposition`: the Prometheus text format (names, HELP/TYPE, escaping).
//! - `health`: the event thread's heartbeat, probes and exporter state, and what makes the
//!   agent live and ready.
//! - `server`: a small HTTP/1.1 responder for those three paths, on the tokio runtime (never
//!   on the event thread, which only stores atomics the responder reads).

pub mod exposition;
pub mod health;
pub mod server;

pub use health::AgentState;

use std::{net::SocketAddr, sync::Arc};

pub use crate::stats::{Kind, Metric};
use crate::{export::ExportHandle, k8s::Kubernetes, kernel::KernelCounters, stats::Stats};

/// `--metrics-address`: binds now (a taken port stops the agent before it attaches
/// anything) and serves `/metrics`, `/healthz` and `/readyz` from the tokio runtime.
pub async fn serve(
    addr: SocketAddr,
    state: &Arc<AgentState>,
    stats: &Arc<Stats>,
) -> Result<(), server::BindError> {
    let listener = server::bind(addr).await?;
    let bound = listener.local_addr().unwrap_or(addr);
    eprintln!("agent: serving metrics on http://{bound}/metrics, health on /healthz and /readyz");
    server::spawn(
        listener,
        Arc::clone(state) as Arc<dyn server::Routes>,
        Arc::clone(stats),
        server::Limits::default(),
    );
    Ok(())
}

/// Hands `/metrics` and `/readyz` the counters and the exporter, once they exist.
pub fn publish(
    state: &AgentState,
    kernel: &Arc<KernelCounters>,
    stats: &Arc<Stats>,
    k8s: Option<&Arc<Kubernetes>>,
    exporter: &ExportHandle,
) {
    let kernel = Arc::clone(kernel);
    state.add_source(Box::new(move || kernel.snapshot()));
    let stats = Arc::clone(stats);
    state.add_source(Box::new(move || stats.metrics()));
    if let Some(k8s) = k8s {
        let k8s = Arc::clone(k8s);
        state.add_source(Box::new(move || k8s.counters()));
    }
    state.set_export(exporter.status());
}

/// The exit summary's counter lines: every counter with `verbose`, else the non-zero ones and
/// a line saying how many were left out.
pub fn summary_lines(metrics: &[Metric], verbose: bool) -> Vec<String> {
    let mut lines: Vec<String> = metrics
        .iter()
        .filter(|m| verbose || m.value != 0)
        .map(|m| format!("  {:<32} {}", m.name, m.value))
        .collect();
    let hidden = metrics.len() - lines.len();
    if hidden > 0 {
        lines.push(format!(
            "  ({hidden} counter{} at zero not shown; --verbose shows every counter)",
            if hidden == 1 { "" } else { "s" }
        ));
    }
    lines
}

/// A `--stats-interval` log line: `name=value` for the non-zero counters (every one with
/// `verbose`).
pub fn log_line(metrics: &[Metric], verbose: bool) -> String {
    metrics
        .iter()
        .filter(|m| verbose || m.value != 0)
        .map(|m| format!("{}={}", m.name, m.value))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Metric> {
        vec![
            Metric::counter("events_read", "Ring buffer records read.", 12),
            Metric::counter("events_malformed", "Records that could not be decoded.", 0),
            Metric::gauge("k8s_pods_known", "Pods known.", 0),
            Metric::counter("spans_built", "Spans built.", 3),
        ]
    }

    #[test]
    fn the_summary_hides_zero_counters_and_says_how_many() {
        let lines = summary_lines(&sample(), false);
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert!(lines[0].starts_with("  events_read ") && lines[0].ends_with(" 12"));
        assert!(lines[1].starts_with("  spans_built ") && lines[1].ends_with(" 3"));
        assert_eq!(
            lines[2],
            "  (2 counters at zero not shown; --verbose shows every counter)"
        );
        // The note is not a `name value` line that the summary's readers would take for one.
        assert!(lines[2].split_whitespace().count() > 2);
    }

    #[test]
    fn the_verbose_summary_shows_every_counter() {
        let lines = summary_lines(&sample(), true);
        assert_eq!(lines.len(), 4, "{lines:?}");
        assert!(lines[1].starts_with("  events_malformed ") && lines[1].ends_with(" 0"));
        let one_zero = [Metric::counter("a", "A.", 0), Metric::counter("b", "B.", 1)];
        assert_eq!(
            summary_lines(&one_zero, false).last().map(String::as_str),
            Some("  (1 counter at zero not shown; --verbose shows every counter)")
        );
        assert!(
            summary_lines(&[Metric::counter("b", "B.", 1)], false)
                .iter()
                .all(|l| !l.contains("not shown"))
        );
    }

    #[test]
    fn the_log_line_shows_non_zero_counters_unless_verbose() {
        assert_eq!(log_line(&sample(), false), "events_read=12 spans_built=3");
        assert_eq!(
            log_line(&sample(), true),
            "events_read=12 events_malformed=0 k8s_pods_known=0 spans_built=3"
        );
    }
}
