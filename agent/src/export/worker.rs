//! The exporter's worker: the bounded queue the event thread sends spans into, the task that
//! hands them to a `Sink` (the console printer or the OTLP sink) in chunks and ticks it, and
//! the counts of what became of every span (the summary, `Stats`, the status `/readyz` reads).

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;

use super::console::ConsoleSink;
use super::otlp::OtlpSink;
use super::{ExportConfig, ExportError, ExportTarget};
use crate::spans::context::Clock;
use crate::spans::model::SpanRecord;
use crate::stats::Stats;

/// What happened to the spans handed to `ExportHandle::send`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExportSummary {
    /// Delivered to the collector (or printed, for the console).
    pub exported: u64,
    /// Lost: the export failed, or had not finished when shutdown's timeout expired.
    pub failed: u64,
    /// Never queued because the queue was full.
    pub dropped: u64,
}

/// Counts of one exporter (for its summary), kept next to the process-wide `Stats`.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    accepted: AtomicU64,
    exported: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
    /// Monotonic ns of the last export that delivered spans (0: none yet).
    last_success_ns: AtomicU64,
    /// Monotonic ns of the first loss since the last success (0: not failing).
    failing_since_ns: AtomicU64,
}

impl Tally {
    pub(super) fn exported(&self, stats: &Stats, spans: u64) {
        if spans > 0 {
            self.exported.fetch_add(spans, Ordering::Relaxed);
            Stats::add(&stats.spans_exported, spans);
            self.last_success_ns
                .store(Clock::monotonic_ns(), Ordering::Relaxed);
            self.failing_since_ns.store(0, Ordering::Relaxed);
        }
    }

    /// `spans` lost in `batches` failed export requests.
    pub(super) fn failed(&self, stats: &Stats, spans: u64, batches: u64) {
        self.failed.fetch_add(spans, Ordering::Relaxed);
        Stats::add(&stats.spans_export_failed, spans);
        Stats::add(&stats.export_errors, batches);
        if spans > 0 || batches > 0 {
            let _ = self.failing_since_ns.compare_exchange(
                0,
                Clock::monotonic_ns(),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }

    fn summary(&self) -> ExportSummary {
        ExportSummary {
            exported: self.exported.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
        }
    }
}

/// How span export is going, for `/readyz` and `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExportState {
    /// Monotonic ns of the last export that delivered spans.
    pub last_success_ns: Option<u64>,
    /// Monotonic ns of the first loss (failed request, rejected spans) since the last success.
    pub failing_since_ns: Option<u64>,
    /// Spans accepted and not yet exported or failed (queued, batched or in flight).
    pub waiting: u64,
}

/// A running exporter's state, readable from any thread (the handle itself belongs to the
/// event thread).
#[derive(Debug, Clone)]
pub struct ExportStatus(pub(super) Arc<Tally>);

impl ExportStatus {
    pub fn state(&self) -> ExportState {
        let t = &self.0;
        let at = |a: &AtomicU64| Some(a.load(Ordering::Relaxed)).filter(|&ns| ns != 0);
        let settled = t.exported.load(Ordering::Relaxed) + t.failed.load(Ordering::Relaxed);
        ExportState {
            last_success_ns: at(&t.last_success_ns),
            failing_since_ns: at(&t.failing_since_ns),
            waiting: t.accepted.load(Ordering::Relaxed).saturating_sub(settled),
        }
    }
}

/// The sending side of a running exporter.
pub struct ExportHandle {
    tx: mpsc::Sender<SpanRecord>,
    task: JoinHandle<()>,
    tally: Arc<Tally>,
    stats: Arc<Stats>,
    timeout: Duration,
    /// The worker is gone (it only stops on shutdown, or if it panicked): warned once.
    closed_warned: AtomicBool,
}

impl ExportHandle {
    /// Non-blocking; called from the (non-async) event-processing thread. When the queue is
    /// full the span is dropped and counted (stats.spans_dropped_queue_full).
    pub fn send(&self, span: SpanRecord) {
        match self.tx.try_send(span) {
            Ok(()) => {
                self.tally.accepted.fetch_add(1, Ordering::Relaxed);
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.tally.dropped.fetch_add(1, Ordering::Relaxed);
                Stats::add(&self.stats.spans_dropped_queue_full, 1);
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                // Accepted and lost at once, so shutdown's accounting stays exact.
                self.tally.accepted.fetch_add(1, Ordering::Relaxed);
                self.tally.failed(&self.stats, 1, 0);
                if !self.closed_warned.swap(true, Ordering::Relaxed) {
                    log::error!(
                        "the span exporter stopped unexpectedly; spans are being dropped (see earlier errors)"
                    );
                }
            }
        }
    }

    pub fn status(&self) -> ExportStatus {
        ExportStatus(Arc::clone(&self.tally))
    }

    /// Flush everything queued and stop; waits at most `timeout`. Returns how many spans were
    /// exported vs failed (spans still unexported when the timeout expires count as failed).
    pub async fn shutdown(self) -> ExportSummary {
        let ExportHandle {
            tx,
            mut task,
            tally,
            stats,
            timeout,
            ..
        } = self;
        drop(tx); // the worker drains the queue, flushes, and ends
        let finished = match tokio::time::timeout(timeout, &mut task).await {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                log::error!("the span exporter task failed: {e}");
                false
            }
            Err(_) => {
                task.abort();
                let _ = task.await;
                false
            }
        };
        if !finished {
            let s = tally.summary();
            let settled = s.exported + s.failed;
            let lost = tally
                .accepted
                .load(Ordering::Relaxed)
                .saturating_sub(settled);
            if lost > 0 {
                tally.failed(&stats, lost, 0);
                log::warn!(
                    "span export did not finish within {timeout:?} at shutdown: {lost} spans were not exported \
                     (is the collector reachable? a longer export timeout gives it more time)"
                );
            }
        }
        tally.summary()
    }
}

/// Starts the exporter task. Must be called inside a tokio runtime.
pub fn spawn_exporter(cfg: ExportConfig, stats: Arc<Stats>) -> Result<ExportHandle, ExportError> {
    spawn_with_console_output(cfg, stats, Box::new(std::io::stdout()))
}

/// `spawn_exporter`, with the console exporter writing to `out` instead of stdout.
pub(crate) fn spawn_with_console_output(
    cfg: ExportConfig,
    stats: Arc<Stats>,
    out: Box<dyn Write + Send>,
) -> Result<ExportHandle, ExportError> {
    let runtime = tokio::runtime::Handle::try_current().map_err(|_| ExportError::NoRuntime)?;
    if cfg.max_batch == 0 {
        return Err(ExportError::InvalidConfig("max_batch must be at least 1"));
    }
    if cfg.queue_capacity == 0 {
        return Err(ExportError::InvalidConfig(
            "queue_capacity must be at least 1",
        ));
    }
    if cfg.flush_interval.is_zero() {
        return Err(ExportError::InvalidConfig(
            "flush_interval must be longer than zero",
        ));
    }
    if cfg.timeout.is_zero() {
        return Err(ExportError::InvalidConfig(
            "timeout must be longer than zero",
        ));
    }
    let tally = Arc::new(Tally::default());
    let (tx, rx) = mpsc::channel(cfg.queue_capacity);
    let tick = cfg.flush_interval.min(TICK);
    let task = match &cfg.target {
        ExportTarget::Console => {
            let console = ConsoleSink::new(out, Arc::clone(&stats), Arc::clone(&tally));
            runtime.spawn(run(rx, tick, console))
        }
        ExportTarget::Otlp { .. } => {
            let otlp = OtlpSink::new(&cfg, Arc::clone(&stats), Arc::clone(&tally))?;
            runtime.spawn(run(rx, tick, otlp))
        }
    };
    Ok(ExportHandle {
        tx,
        task,
        tally,
        stats,
        timeout: cfg.timeout,
        closed_warned: AtomicBool::new(false),
    })
}

/// Where the worker delivers spans: the console printer or an OTLP collector. A sink counts
/// each span it delivered or lost in the exporter's `Tally`.
pub(super) trait Sink {
    /// Takes the spans just received (all of `spans`), at `now`; may deliver some at once (a
    /// full batch, or a fragment printed early to bound memory).
    async fn take(&mut self, spans: &mut Vec<SpanRecord>, now: Instant);

    /// Called every tick: delivers what is due at `now`.
    async fn tick(&mut self, now: Instant);

    /// Deliveries are under way in the background (`settle_next` has something to wait for).
    fn busy(&self) -> bool {
        false
    }

    /// Waits for a delivery under way to end, and counts it. Cancel-safe: the worker drops it
    /// when a tick or spans come first.
    async fn settle_next(&mut self) {
        std::future::pending().await
    }

    /// The queue is closed and drained: delivers everything left and waits for every delivery.
    async fn finish(&mut self);
}

/// How often the sink is ticked (the console checks for finished traces, the OTLP exporter for
/// spans that waited `flush_interval`), at most.
const TICK: Duration = Duration::from_millis(100);
/// Spans taken from the queue at once.
const RECV_CHUNK: usize = 1024;
/// After emptying the queue, the worker lets spans gather this long rather than being woken
/// for each one: a wake-up (a futex call on each side) costs more than handling a span.
const GATHER: Duration = Duration::from_millis(10);

/// The exporter task: hands the queue's spans to `sink` in chunks and ticks it every `tick`
/// until the queue is closed (`ExportHandle::shutdown`), then has it deliver the rest.
async fn run(mut rx: mpsc::Receiver<SpanRecord>, tick: Duration, mut sink: impl Sink) {
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut spans: Vec<SpanRecord> = Vec::with_capacity(RECV_CHUNK);
    loop {
        tokio::select! {
            // The tick first: under a flood of spans, timers must still fire.
            biased;
            _ = ticker.tick() => sink.tick(Instant::now()).await,
            () = sink.settle_next(), if sink.busy() => {}
            received = rx.recv_many(&mut spans, RECV_CHUNK) => {
                if received == 0 {
                    break;
                }
                sink.take(&mut spans, Instant::now()).await;
                if received < RECV_CHUNK {
                    tokio::time::sleep(GATHER).await;
                }
            }
        }
    }
    // The queue is closed and drained.
    sink.finish().await;
}
