//! The kernel's ids for a request: chosen before the request left or while it was read.

use agent_common::{
    CONTEXT_FLAG_LOCAL_PARENT, CONTEXT_FLAG_PARENT, CONTEXT_FLAG_REWRITTEN,
    CONTEXT_FLAG_SPLIT_START, CONTEXT_SERVER, ContextEvent,
};

use crate::spans::model::{SpanId, SpanRecord, TraceId};

/// Ids the kernel chose for one request before it left or while it was read: they may be in
/// a header another service has already seen, so the span must carry exactly these.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelContext {
    pub server: bool,
    /// Timestamp of the data event holding the request's first byte.
    pub ts_ns: u64,
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub parent: Option<SpanId>,
    /// The parent is the span this process was serving (linked in the kernel).
    pub local_parent: bool,
    /// The request had a `traceparent` whose parent id the kernel replaced.
    pub rewritten: bool,
    /// Server: opened by a runtime probe after the request's bytes were read (its first byte
    /// came alone); `ts_ns` is the probe's time, inside the exchange, not its start.
    pub late: bool,
}

impl KernelContext {
    /// The kernel's ids for the request of the data event at `ts_ns`, or `None` when its trace
    /// or span id is zero: such a context is unusable and the request keeps ids of its own. A
    /// zero parent id is no parent. (The kernel should never report zero ids; userspace does
    /// not rely on it. [`KernelContext::has_zero_id`] tells the caller to count it.)
    pub fn new(ev: &ContextEvent, ts_ns: u64) -> Option<Self> {
        let (trace_id, span_id) = (TraceId(ev.trace_id), SpanId(ev.span_id));
        if !trace_id.is_valid() || !span_id.is_valid() {
            return None;
        }
        let parent = Some(SpanId(ev.parent_id))
            .filter(|p| ev.flags & CONTEXT_FLAG_PARENT != 0 && p.is_valid());
        Some(Self {
            server: ev.role == CONTEXT_SERVER,
            ts_ns,
            trace_id,
            span_id,
            parent,
            local_parent: parent.is_some() && ev.flags & CONTEXT_FLAG_LOCAL_PARENT != 0,
            rewritten: ev.flags & CONTEXT_FLAG_REWRITTEN != 0,
            late: ev.flags & CONTEXT_FLAG_SPLIT_START != 0,
        })
    }

    /// The kernel reported a zero trace or span id, or a zero parent id flagged as a parent.
    pub fn has_zero_id(ev: &ContextEvent) -> bool {
        !TraceId(ev.trace_id).is_valid()
            || !SpanId(ev.span_id).is_valid()
            || (ev.flags & CONTEXT_FLAG_PARENT != 0 && !SpanId(ev.parent_id).is_valid())
    }

    /// Gives `span` the kernel's ids. Returns false when the span had parsed a different
    /// incoming trace than the kernel saw (a head split over reads): the kernel's ids win,
    /// as they are what downstream calls carry.
    pub fn apply(&self, span: &mut SpanRecord) -> bool {
        let agrees = span.parent_span_id.is_none()
            || (span.trace_id == self.trace_id && span.parent_span_id == self.parent);
        span.trace_id = self.trace_id;
        span.span_id = self.span_id;
        span.parent_span_id = self.parent;
        span.parent_is_remote = self.parent.is_some() && !self.local_parent;
        if self.parent.is_none() {
            span.trace_state = None;
        }
        agrees
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context_event(trace: [u8; 16], span: [u8; 8], parent: [u8; 8], flags: u32) -> ContextEvent {
        ContextEvent {
            kind: 0,
            role: CONTEXT_SERVER,
            pid: 1,
            tid: 1,
            ts_ns: 5,
            sock_cookie: 1,
            local_port: 0,
            remote_port: 0,
            flags,
            trace_id: trace,
            span_id: span,
            parent_id: parent,
        }
    }

    #[test]
    fn kernel_contexts_with_zero_ids_are_unusable_or_parentless() {
        let all = CONTEXT_FLAG_PARENT | CONTEXT_FLAG_LOCAL_PARENT;
        for (trace, span) in [([0; 16], [2; 8]), ([1; 16], [0; 8])] {
            let ev = context_event(trace, span, [3; 8], all);
            assert!(KernelContext::has_zero_id(&ev));
            assert_eq!(KernelContext::new(&ev, 5), None);
        }
        let ev = context_event([1; 16], [2; 8], [0; 8], all);
        assert!(KernelContext::has_zero_id(&ev));
        let ctx = KernelContext::new(&ev, 5).expect("trace and span ids are usable");
        assert_eq!((ctx.parent, ctx.local_parent), (None, false));
        // A zero parent id without the parent flag is just "no parent".
        let ev = context_event([1; 16], [2; 8], [0; 8], 0);
        assert!(!KernelContext::has_zero_id(&ev));
        let ev = context_event([1; 16], [2; 8], [3; 8], all);
        let ctx = KernelContext::new(&ev, 5).expect("valid");
        assert_eq!((ctx.parent, ctx.local_parent), (Some(SpanId([3; 8])), true));
    }
}
