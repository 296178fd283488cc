//! Selection of processes by their pod: namespace, labels, annotations.

use super::pods::PodMeta;

/// `--k8s-namespace`, `--k8s-pod-label`, `--k8s-pod-annotation`. A pod matches when its
/// namespace is one of the namespaces (if any are given) and it has every label and every
/// annotation given, with the given value.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodFilter {
    pub namespaces: Vec<String>,
    pub labels: Vec<(String, String)>,
    pub annotations: Vec<(String, String)>,
}

impl PodFilter {
    pub fn is_empty(&self) -> bool {
        self.namespaces.is_empty() && self.labels.is_empty() && self.annotations.is_empty()
    }

    pub fn matches(&self, pod: &PodMeta) -> bool {
        (self.namespaces.is_empty() || self.namespaces.contains(&pod.namespace))
            && self
                .labels
                .iter()
                .all(|(k, v)| pod.labels.get(k) == Some(v))
            && self
                .annotations
                .iter()
                .all(|(k, v)| pod.annotations.get(k) == Some(v))
    }

    /// Whether the pod store must keep annotation `key` (most annotations are dropped).
    pub fn uses_annotation(&self, key: &str) -> bool {
        self.annotations.iter().any(|(k, _)| k == key)
    }
}

/// Parses `KEY=VALUE` (the value may be empty and may contain `=`).
pub fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.to_owned())),
        // The value is not repeated: it may come from a file (clap shows a flag's own value).
        _ => Err("expected KEY=VALUE (e.g. app.kubernetes.io/name=checkout)".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ns: &str, labels: &[(&str, &str)], annotations: &[(&str, &str)]) -> PodMeta {
        let map = |kv: &[(&str, &str)]| {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        PodMeta {
            namespace: ns.into(),
            labels: map(labels),
            annotations: map(annotations),
            ..Default::default()
        }
    }

    fn kv(k: &str, v: &str) -> (String, String) {
        (k.into(), v.into())
    }

    #[test]
    fn every_given_condition_must_hold() {
        let f = PodFilter {
            namespaces: vec!["shop".into(), "pay".into()],
            labels: vec![kv("app", "web"), kv("tier", "front")],
            annotations: vec![kv("trace", "yes")],
        };
        let web = pod(
            "shop",
            &[("app", "web"), ("tier", "front"), ("x", "y")],
            &[("trace", "yes")],
        );
        assert!(f.matches(&web));
        assert!(!f.matches(&pod(
            "kube-system",
            &[("app", "web"), ("tier", "front")],
            &[("trace", "yes")]
        )));
        assert!(!f.matches(&pod("shop", &[("app", "web")], &[("trace", "yes")])));
        assert!(!f.matches(&pod(
            "pay",
            &[("app", "web"), ("tier", "back")],
            &[("trace", "yes")]
        )));
        assert!(!f.matches(&pod("pay", &[("app", "web"), ("tier", "front")], &[])));
        assert!(!f.matches(&pod(
            "pay",
            &[("app", "web"), ("tier", "front")],
            &[("trace", "no")]
        )));
        // Labels are not annotations.
        assert!(!f.matches(&pod(
            "pay",
            &[("app", "web"), ("tier", "front"), ("trace", "yes")],
            &[]
        )));
    }

    #[test]
    fn namespaces_alone_and_empty_values() {
        let f = PodFilter {
            namespaces: vec!["shop".into()],
            ..Default::default()
        };
        assert!(f.matches(&pod("shop", &[], &[])));
        assert!(!f.matches(&pod("shopping", &[], &[])));
        let empty_value = PodFilter {
            labels: vec![kv("canary", "")],
            ..Default::default()
        };
        assert!(empty_value.matches(&pod("a", &[("canary", "")], &[])));
        assert!(!empty_value.matches(&pod("a", &[], &[])));
        assert!(PodFilter::default().is_empty());
        assert!(PodFilter::default().matches(&pod("any", &[], &[])));
    }

    #[test]
    fn key_values() {
        assert_eq!(parse_key_value("app=web"), Ok(kv("app", "web")));
        assert_eq!(parse_key_value("a/b=c=d"), Ok(kv("a/b", "c=d")));
        assert_eq!(parse_key_value("canary="), Ok(kv("canary", "")));
        assert!(parse_key_value("app").is_err());
        assert!(parse_key_value("=web").is_err());
    }
}
