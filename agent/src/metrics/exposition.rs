//! The Prometheus text exposition format, version 0.0.4: one `# HELP` and one `# TYPE` line per
//! family, then its samples. Names carry the agent's prefix, counters end in `_total`.

use std::fmt::Write as _;

use super::{Kind, Metric};

/// Every metric name starts with this.
pub const PREFIX: &str = "ebpf_agent_";

/// The `Content-Type` of the text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The Prometheus name of a summary counter or gauge: prefixed, counters ending in `_total`.
pub fn prometheus_name(name: &str, kind: Kind) -> String {
    match kind {
        Kind::Counter => format!("{PREFIX}{name}_total"),
        Kind::Gauge => format!("{PREFIX}{name}"),
    }
}

/// A sample value: counts stay exact integers, durations and timestamps are floats.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Number {
    Int(u64),
    Float(f64),
}

/// A text exposition being written.
#[derive(Default)]
pub struct Exposition {
    text: String,
}

impl Exposition {
    /// A summary counter or gauge, under its Prometheus name.
    pub fn metric(&mut self, m: &Metric) {
        let name = prometheus_name(m.name, m.kind);
        self.family(&name, m.kind, m.help, &[], Number::Int(m.value));
    }

    /// A gauge that is not a summary counter; `name` without the prefix.
    pub fn gauge(&mut self, name: &str, help: &str, value: Number) {
        self.family(&format!("{PREFIX}{name}"), Kind::Gauge, help, &[], value);
    }

    /// A gauge with one sample carrying `labels`; `name` without the prefix.
    pub fn labelled_gauge(&mut self, name: &str, help: &str, labels: &[(&str, &str)], value: u64) {
        self.family(
            &format!("{PREFIX}{name}"),
            Kind::Gauge,
            help,
            labels,
            Number::Int(value),
        );
    }

    fn family(
        &mut self,
        name: &str,
        kind: Kind,
        help: &str,
        labels: &[(&str, &str)],
        value: Number,
    ) {
        let t = &mut self.text;
        t.push_str("# HELP ");
        t.push_str(name);
        t.push(' ');
        escape_help(t, help);
        t.push('\n');
        let _ = writeln!(
            t,
            "# TYPE {name} {}",
            match kind {
                Kind::Counter => "counter",
                Kind::Gauge => "gauge",
            }
        );
        t.push_str(name);
        if !labels.is_empty() {
            t.push('{');
            for (i, (label, value)) in labels.iter().enumerate() {
                if i > 0 {
                    t.push(',');
                }
                t.push_str(label);
                t.push_str("=\"");
                escape_label_value(t, value);
                t.push('"');
            }
            t.push('}');
        }
        t.push(' ');
        match value {
            Number::Int(n) => {
                let _ = write!(t, "{n}");
            }
            Number::Float(f) if f.is_nan() => t.push_str("NaN"),
            Number::Float(f) if f.is_infinite() => {
                t.push_str(if f > 0.0 { "+Inf" } else { "-Inf" })
            }
            Number::Float(f) => {
                let _ = write!(t, "{f}");
            }
        }
        t.push('\n');
    }

    pub fn finish(self) -> String {
        self.text
    }
}

/// HELP text: one line, with `\` and line breaks escaped. Doc comments spread over several
/// source lines arrive with their leading spaces; runs of white space become one space.
fn escape_help(out: &mut String, help: &str) {
    let mut words = help.split_whitespace().peekable();
    while let Some(word) = words.next() {
        for c in word.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                c => out.push(c),
            }
        }
        if words.peek().is_some() {
            out.push(' ');
        }
    }
}

/// A label value: `\`, `"` and line feeds escaped.
fn escape_label_value(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A metric name as Prometheus accepts it (`[a-zA-Z_:][a-zA-Z0-9_:]*`) and as its naming
    /// conventions ask: lower snake case, no colons (those are for recording rules), the
    /// agent's prefix, `_total` on counters and only on them. Returns what is wrong.
    pub(crate) fn name_problem(name: &str, kind: &str) -> Option<String> {
        let mut chars = name.chars();
        let first_ok = chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':');
        if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            return Some(format!("{name}: not a valid Prometheus metric name"));
        }
        if name.contains(':') || name.chars().any(|c| c.is_ascii_uppercase()) {
            return Some(format!("{name}: not lower snake case"));
        }
        if name.contains("__") || name.ends_with('_') {
            return Some(format!("{name}: empty word"));
        }
        if !name.starts_with(PREFIX) {
            return Some(format!("{name}: no {PREFIX} prefix"));
        }
        match (kind, name.ends_with("_total")) {
            ("counter", false) => Some(format!("{name}: a counter must end in _total")),
            ("gauge", true) => Some(format!("{name}: only counters end in _total")),
            ("counter" | "gauge", _) => None,
            (other, _) => Some(format!("{name}: unknown type {other}")),
        }
    }

    /// One family of an exposition, as a scraper reads it.
    #[derive(Debug)]
    pub(crate) struct Family {
        pub name: String,
        pub help: String,
        pub kind: String,
        /// (labels as written between the braces, value)
        pub samples: Vec<(String, String)>,
    }

    /// Parses an exposition strictly (HELP, then TYPE, then samples of that family; nothing
    /// else), panicking with the offending line: a reader independent of the writer above.
    pub(crate) fn parse(text: &str) -> Vec<Family> {
        assert!(text.ends_with('\n'), "the exposition ends with a line feed");
        let mut families: Vec<Family> = Vec::new();
        let mut lines = text.lines().peekable();
        while let Some(line) = lines.next() {
            let rest = line
                .strip_prefix("# HELP ")
                .unwrap_or_else(|| panic!("expected a # HELP line, found {line:?}"));
            let (name, help) = rest.split_once(' ').expect("HELP has a name and a text");
            let type_line = lines.next().expect("TYPE after HELP");
            let kind = type_line
                .strip_prefix(&format!("# TYPE {name} "))
                .unwrap_or_else(|| panic!("expected # TYPE {name}, found {type_line:?}"));
            let mut samples = Vec::new();
            while let Some(sample) = lines.next_if(|l| !l.starts_with('#')) {
                let (series, value) = sample.rsplit_once(' ').expect("a sample has a value");
                let labels = match series.strip_prefix(name) {
                    Some("") => String::new(),
                    Some(l) if l.starts_with('{') && l.ends_with('}') => {
                        l[1..l.len() - 1].to_owned()
                    }
                    _ => panic!("sample {sample:?} is not of family {name}"),
                };
                assert!(
                    value.parse::<f64>().is_ok() || ["+Inf", "-Inf", "NaN"].contains(&value),
                    "bad value in {sample:?}"
                );
                samples.push((labels, value.to_owned()));
            }
            assert!(!samples.is_empty(), "family {name} has no sample");
            assert!(
                families.iter().all(|f| f.name != name),
                "family {name} appears twice"
            );
            families.push(Family {
                name: name.to_owned(),
                help: help.to_owned(),
                kind: kind.to_owned(),
                samples,
            });
        }
        families
    }

    #[test]
    fn counters_and_gauges_are_written_with_help_and_type() {
        let mut e = Exposition::default();
        e.metric(&Metric::counter(
            "http_exchanges",
            " HTTP exchanges\n completed.",
            7,
        ));
        e.metric(&Metric::gauge("k8s_pods_known", " Pods known.", 3));
        e.gauge("heartbeat_age_seconds", "Age.", Number::Float(0.25));
        let text = e.finish();
        assert_eq!(
            text,
            "# HELP ebpf_agent_http_exchanges_total HTTP exchanges completed.\n\
             # TYPE ebpf_agent_http_exchanges_total counter\n\
             ebpf_agent_http_exchanges_total 7\n\
             # HELP ebpf_agent_k8s_pods_known Pods known.\n\
             # TYPE ebpf_agent_k8s_pods_known gauge\n\
             ebpf_agent_k8s_pods_known 3\n\
             # HELP ebpf_agent_heartbeat_age_seconds Age.\n\
             # TYPE ebpf_agent_heartbeat_age_seconds gauge\n\
             ebpf_agent_heartbeat_age_seconds 0.25\n"
        );
        let families = parse(&text);
        assert_eq!(families.len(), 3);
        for f in &families {
            assert_eq!(name_problem(&f.name, &f.kind), None);
        }
    }

    #[test]
    fn help_and_label_values_are_escaped() {
        let mut e = Exposition::default();
        e.gauge("x", "a \\ backslash\nand a new line", Number::Int(1));
        e.labelled_gauge(
            "build_info",
            "Build.",
            &[("version", "1.0 \"q\" \\ \n"), ("os", "linux")],
            1,
        );
        let text = e.finish();
        assert!(
            text.contains("# HELP ebpf_agent_x a \\\\ backslash and a new line\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "ebpf_agent_build_info{version=\"1.0 \\\"q\\\" \\\\ \\n\",os=\"linux\"} 1\n"
            ),
            "{text}"
        );
        // Still one line per HELP and per sample.
        assert_eq!(text.lines().count(), 6, "{text}");
        parse(&text);
    }

    #[test]
    fn float_values_use_the_formats_prometheus_reads() {
        let mut e = Exposition::default();
        e.gauge("a", "A.", Number::Float(f64::INFINITY));
        e.gauge("b", "B.", Number::Float(f64::NEG_INFINITY));
        e.gauge("c", "C.", Number::Float(f64::NAN));
        e.gauge("d", "D.", Number::Float(1.5e-3));
        e.gauge("e", "E.", Number::Int(u64::MAX));
        let values: Vec<String> = parse(&e.finish())
            .into_iter()
            .map(|f| f.samples[0].1.clone())
            .collect();
        assert_eq!(
            values,
            ["+Inf", "-Inf", "NaN", "0.0015", "18446744073709551615"]
        );
    }

    #[test]
    fn the_name_check_rejects_what_prometheus_would() {
        for (name, kind) in [
            ("ebpf_agent_spans_built_total", "counter"),
            ("ebpf_agent_open_connections", "gauge"),
            ("ebpf_agent_kernel_bytes_total", "counter"),
        ] {
            assert_eq!(name_problem(name, kind), None, "{name}");
        }
        for (name, kind) in [
            ("ebpf_agent_spans_built", "counter"),
            ("ebpf_agent_open_total", "gauge"),
            ("spans_built_total", "counter"),
            ("ebpf_agent_Spans_total", "counter"),
            ("ebpf_agent_a-b_total", "counter"),
            ("9ebpf_agent_x", "gauge"),
            ("ebpf_agent_x:y", "gauge"),
            ("ebpf_agent__x", "gauge"),
            ("ebpf_agent_x", "summary"),
        ] {
            assert!(name_problem(name, kind).is_some(), "{name} passed");
        }
    }
}
