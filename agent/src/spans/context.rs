//! Trace ids, W3C `traceparent`, and the kernel-clock → wall-clock conversion.

use agent_common::{
    CONTEXT_FLAG_LOCAL_PARENT, CONTEXT_FLAG_PARENT, CONTEXT_FLAG_REWRITTEN,
    CONTEXT_FLAG_SPLIT_START, CONTEXT_SERVER, ContextEvent,
};

use super::model::{SpanId, SpanRecord, TraceId};

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

/// A parsed, valid W3C trace context.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: TraceId,
    pub parent_id: SpanId,
    pub flags: u8,
}

fn hex_nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

fn hex_bytes<const N: usize>(s: &[u8]) -> Option<[u8; N]> {
    if s.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, pair) in s.as_chunks::<2>().0.iter().enumerate() {
        out[i] = hex_nibble(pair[0])? << 4 | hex_nibble(pair[1])?;
    }
    Some(out)
}

/// Parses a `traceparent` value per W3C Trace Context level 1. Anything invalid is `None`:
/// a header is honoured whole or not at all. Only HTTP's optional whitespace (space, tab)
/// around the value is ignored.
pub fn parse_traceparent(value: &str) -> Option<TraceParent> {
    let v = value.as_bytes();
    let start = v.iter().position(|b| !matches!(b, b' ' | b'\t'));
    let end = v.iter().rposition(|b| !matches!(b, b' ' | b'\t'));
    let v = match (start, end) {
        (Some(start), Some(end)) => &v[start..=end],
        _ => return None,
    };
    if v.len() < 55 {
        return None;
    }
    let version = hex_bytes::<1>(&v[0..2])?[0];
    if version == 0xff || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    // Version 00 is exactly 55 characters; later versions may append "-…" fields.
    if (version == 0 && v.len() != 55) || (version != 0 && v.len() > 55 && v[55] != b'-') {
        return None;
    }
    let trace_id = hex_bytes::<16>(&v[3..35])?;
    let parent_id = hex_bytes::<8>(&v[36..52])?;
    let flags = hex_bytes::<1>(&v[53..55])?[0];
    if trace_id == [0; 16] || parent_id == [0; 8] {
        return None;
    }
    Some(TraceParent {
        trace_id: TraceId(trace_id),
        parent_id: SpanId(parent_id),
        flags,
    })
}

/// Fast non-cryptographic id generator (xoshiro256++), seeded from the OS.
pub struct IdGenerator {
    s: [u64; 4],
}

impl IdGenerator {
    pub fn new() -> Self {
        let mut seed = [0u8; 32];
        let got = std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut seed))
            .is_ok();
        if !got {
            // Fall back on time and pid: ids only need to be unique, not secret.
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1);
            seed[..8].copy_from_slice(&t.to_le_bytes());
            seed[8..12].copy_from_slice(&std::process::id().to_le_bytes());
        }
        let mut s = [0u64; 4];
        for (i, word) in s.iter_mut().enumerate() {
            let mut b = [0u8; 8];
            b.copy_from_slice(&seed[i * 8..i * 8 + 8]);
            *word = u64::from_le_bytes(b) | 1;
        }
        Self { s }
    }

    fn next(&mut self) -> u64 {
        let s = &mut self.s;
        let result = (s[0].wrapping_add(s[3])).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    pub fn span_id(&mut self) -> SpanId {
        loop {
            let v = self.next();
            if v != 0 {
                return SpanId(v.to_be_bytes());
            }
        }
    }

    pub fn trace_id(&mut self) -> TraceId {
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&self.next().to_be_bytes());
        id[8..].copy_from_slice(&(self.next() | 1).to_be_bytes());
        TraceId(id)
    }
}

/// Converts kernel monotonic timestamps (`bpf_ktime_get_ns`) to Unix time. The offset is
/// re-read periodically so NTP adjustments of the wall clock are followed.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    offset_ns: i128,
}

fn clock_ns(id: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-pointer.
    unsafe { libc::clock_gettime(id, &mut ts) };
    ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
}

impl Clock {
    pub fn now() -> Self {
        let mono = clock_ns(libc::CLOCK_MONOTONIC);
        let real = clock_ns(libc::CLOCK_REALTIME);
        Self {
            offset_ns: real - mono,
        }
    }

    #[cfg(test)]
    pub fn with_offset(offset_ns: i128) -> Self {
        Self { offset_ns }
    }

    pub fn to_unix_nanos(self, ktime_ns: u64) -> u64 {
        (ktime_ns as i128 + self.offset_ns).clamp(0, u64::MAX as i128) as u64
    }

    /// Current kernel monotonic time.
    pub fn monotonic_ns() -> u64 {
        clock_ns(libc::CLOCK_MONOTONIC) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_valid_traceparent() {
        let tp = parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
            .expect("valid");
        assert_eq!(tp.trace_id.to_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(tp.parent_id.to_hex(), "00f067aa0ba902b7");
        assert_eq!(tp.flags, 1);
        // A future version with extra fields is accepted.
        assert!(
            parse_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-xyz")
                .is_some()
        );
    }

    #[test]
    fn rejects_invalid_traceparent() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01é",
        ] {
            assert_eq!(parse_traceparent(bad), None, "{bad:?} must be rejected");
        }
    }

    #[test]
    fn traceparent_whitespace_is_only_http_whitespace() {
        let valid = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert!(parse_traceparent(&format!(" \t{valid}\t ")).is_some());
        for around in ["\u{b}", "\u{c}", "\u{a0}", "\r", "\n"] {
            let value = format!("{valid}{around}");
            assert_eq!(parse_traceparent(&value), None, "{value:?}");
        }
    }

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

    #[test]
    fn ids_are_nonzero_and_distinct() {
        let mut g = IdGenerator::new();
        let a = g.trace_id();
        let b = g.trace_id();
        assert_ne!(a, b);
        assert_ne!(a.0, [0; 16]);
        assert_ne!(g.span_id().0, [0; 8]);
    }

    #[test]
    fn clock_converts_with_offset() {
        let c = Clock::with_offset(1_000);
        assert_eq!(c.to_unix_nanos(5), 1_005);
        let real = Clock::now().to_unix_nanos(Clock::monotonic_ns());
        let sys = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        assert!(
            real.abs_diff(sys) < 1_000_000_000,
            "monotonic→wall conversion is off"
        );
    }
}
