//! The resource attributes of a process in a container / a pod, and its Kubernetes service name.

use super::{
    cgroup::ContainerRef,
    pods::{PodMeta, RESOURCE_ANNOTATION_PREFIX},
    store::Resolution,
};
use crate::spans::model::Attribute;

/// What Kubernetes adds to a process's resource.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct K8sResource {
    /// `container.id`, `k8s.*`, `service.namespace` and the pod's
    /// `resource.opentelemetry.io/*` annotations (`service.name` excluded).
    pub attributes: Vec<Attribute>,
    /// The service name Kubernetes suggests; the process's own `OTEL_SERVICE_NAME` or
    /// `OTEL_RESOURCE_ATTRIBUTES` still win over it.
    pub service_name: Option<String>,
}

/// Attributes of a process placed at `place`, resolved to `resolution`, on node `node_name`.
pub fn describe(
    node_name: Option<&str>,
    place: &ContainerRef,
    resolution: &Resolution,
) -> K8sResource {
    let mut out = K8sResource::default();
    let attrs = &mut out.attributes;
    if let Some(id) = &place.container_id {
        attrs.push(Attribute::str("container.id", id.clone()));
    }
    if let Some(node) = node_name {
        attrs.push(Attribute::str("k8s.node.name", node.to_owned()));
    }
    let Some(pod) = resolution.pod() else {
        return out;
    };
    let container = match resolution {
        Resolution::Container { name, .. } => Some(name.as_str()),
        _ => None,
    };
    attrs.push(Attribute::str("k8s.namespace.name", pod.namespace.clone()));
    attrs.push(Attribute::str("k8s.pod.name", pod.name.clone()));
    attrs.push(Attribute::str("k8s.pod.uid", pod.uid.clone()));
    if let Some(name) = container {
        attrs.push(Attribute::str("k8s.container.name", name.to_owned()));
    }
    let w = &pod.workload;
    for (key, value) in [
        ("k8s.replicaset.name", &w.replicaset),
        ("k8s.deployment.name", &w.deployment),
        ("k8s.statefulset.name", &w.statefulset),
        ("k8s.daemonset.name", &w.daemonset),
        ("k8s.job.name", &w.job),
        ("k8s.cronjob.name", &w.cronjob),
    ] {
        if let Some(v) = value {
            attrs.push(Attribute::str(key, v.clone()));
        }
    }
    // Semantic conventions: service.namespace is the annotation, else the namespace.
    let namespace = annotation(pod, "service.namespace").unwrap_or(&pod.namespace);
    attrs.push(Attribute::str("service.namespace", namespace.to_owned()));
    for (key, value) in &pod.annotations {
        let Some(attr) = key.strip_prefix(RESOURCE_ANNOTATION_PREFIX) else {
            continue;
        };
        if attr.is_empty() || matches!(attr, "service.name" | "service.namespace") {
            continue;
        }
        let Some(attr) = crate::intern::intern_key(attr) else {
            continue;
        };
        match attrs.iter_mut().find(|a| a.key == attr) {
            Some(existing) => *existing = Attribute::str(attr, value.clone()),
            None => attrs.push(Attribute::str(attr, value.clone())),
        }
    }
    out.service_name = service_name(pod, container);
    out
}

fn annotation<'a>(pod: &'a PodMeta, attr: &str) -> Option<&'a String> {
    pod.annotations
        .iter()
        .find(|(k, _)| k.strip_prefix(RESOURCE_ANNOTATION_PREFIX) == Some(attr))
        .map(|(_, v)| v)
        .filter(|v| !v.is_empty())
}

/// The pod's `resource.opentelemetry.io/service.name` annotation, its `app.kubernetes.io/name`
/// label, the owning workload (Deployment, ReplicaSet, StatefulSet, DaemonSet, CronJob, Job),
/// the pod's name when no controller generated it, then the container's name.
fn service_name(pod: &PodMeta, container: Option<&str>) -> Option<String> {
    let w = &pod.workload;
    annotation(pod, "service.name")
        .or(pod.labels.get("app.kubernetes.io/name"))
        .or(w.deployment.as_ref())
        .or(w.replicaset.as_ref())
        .or(w.statefulset.as_ref())
        .or(w.daemonset.as_ref())
        .or(w.cronjob.as_ref())
        .or(w.job.as_ref())
        .map(String::as_str)
        .or((!pod.controlled).then_some(pod.name.as_str()))
        .or(container)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{k8s::pods::Workload, spans::model::AttrValue};

    fn get<'a>(r: &'a K8sResource, key: &str) -> Option<&'a str> {
        r.attributes
            .iter()
            .find(|a| a.key == key)
            .and_then(|a| match &a.value {
                AttrValue::Str(s) => Some(s.as_ref()),
                _ => None,
            })
    }

    fn pod() -> PodMeta {
        PodMeta {
            uid: "u-1".into(),
            name: "checkout-7c5ddbdf54-x2x9q".into(),
            namespace: "shop".into(),
            controlled: true,
            workload: Workload {
                replicaset: Some("checkout-7c5ddbdf54".into()),
                deployment: Some("checkout".into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn place() -> ContainerRef {
        ContainerRef {
            container_id: Some("abc".into()),
            pod_uid: Some("u-1".into()),
        }
    }

    #[test]
    fn a_container_of_a_deployment() {
        let res = Resolution::Container {
            pod: Arc::new(pod()),
            name: "app".into(),
        };
        let r = describe(Some("node-1"), &place(), &res);
        assert_eq!(get(&r, "container.id"), Some("abc"));
        assert_eq!(get(&r, "k8s.node.name"), Some("node-1"));
        assert_eq!(get(&r, "k8s.namespace.name"), Some("shop"));
        assert_eq!(get(&r, "k8s.pod.name"), Some("checkout-7c5ddbdf54-x2x9q"));
        assert_eq!(get(&r, "k8s.pod.uid"), Some("u-1"));
        assert_eq!(get(&r, "k8s.container.name"), Some("app"));
        assert_eq!(get(&r, "k8s.replicaset.name"), Some("checkout-7c5ddbdf54"));
        assert_eq!(get(&r, "k8s.deployment.name"), Some("checkout"));
        assert_eq!(get(&r, "k8s.statefulset.name"), None);
        assert_eq!(get(&r, "service.namespace"), Some("shop"));
        assert_eq!(r.service_name.as_deref(), Some("checkout"));
    }

    #[test]
    fn service_name_order() {
        let mut p = pod();
        p.labels
            .insert("app.kubernetes.io/name".into(), "shop-checkout".into());
        p.annotations.insert(
            "resource.opentelemetry.io/service.name".into(),
            "checkout-svc".into(),
        );
        assert_eq!(
            service_name(&p, Some("app")).as_deref(),
            Some("checkout-svc")
        );
        p.annotations.clear();
        assert_eq!(
            service_name(&p, Some("app")).as_deref(),
            Some("shop-checkout")
        );
        p.labels.clear();
        assert_eq!(service_name(&p, Some("app")).as_deref(), Some("checkout"));
        p.workload.deployment = None;
        assert_eq!(
            service_name(&p, Some("app")).as_deref(),
            Some("checkout-7c5ddbdf54")
        );
        p.workload = Workload {
            job: Some("report-29000000".into()),
            cronjob: Some("report".into()),
            ..Default::default()
        };
        assert_eq!(service_name(&p, Some("app")).as_deref(), Some("report"));
        // Owned by something we do not know (an operator's custom resource): the pod's name is
        // generated, the container's is stable.
        p.workload = Workload::default();
        assert_eq!(service_name(&p, Some("app")).as_deref(), Some("app"));
        // A bare pod: its name was chosen by a person.
        p.controlled = false;
        p.name = "debug-shell".into();
        assert_eq!(
            service_name(&p, Some("app")).as_deref(),
            Some("debug-shell")
        );
        // An empty annotation does not count.
        p.annotations.insert(
            "resource.opentelemetry.io/service.name".into(),
            String::new(),
        );
        assert_eq!(service_name(&p, None).as_deref(), Some("debug-shell"));
    }

    #[test]
    fn annotations_become_attributes() {
        let mut p = pod();
        for (k, v) in [
            ("resource.opentelemetry.io/service.namespace", "payments"),
            (
                "resource.opentelemetry.io/deployment.environment.name",
                "prod",
            ),
            ("resource.opentelemetry.io/service.name", "x"),
            ("resource.opentelemetry.io/k8s.deployment.name", "renamed"),
            ("resource.opentelemetry.io/", "ignored"),
        ] {
            p.annotations.insert(k.into(), v.into());
        }
        let r = describe(None, &place(), &Resolution::Pod(Arc::new(p)));
        assert_eq!(get(&r, "service.namespace"), Some("payments"));
        assert_eq!(get(&r, "deployment.environment.name"), Some("prod"));
        assert_eq!(get(&r, "k8s.deployment.name"), Some("renamed"));
        assert_eq!(
            get(&r, "service.name"),
            None,
            "service.name is the caller's to set"
        );
        assert_eq!(
            get(&r, "k8s.container.name"),
            None,
            "container not known yet"
        );
        assert_eq!(get(&r, "k8s.node.name"), None);
        let keys: Vec<_> = r.attributes.iter().map(|a| a.key).collect();
        let mut unique = keys.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(keys.len(), unique.len(), "{keys:?}");
    }

    #[test]
    fn outside_any_pod() {
        let docker = ContainerRef {
            container_id: Some("abc".into()),
            pod_uid: None,
        };
        let r = describe(Some("n"), &docker, &Resolution::Unknown);
        assert_eq!(get(&r, "container.id"), Some("abc"));
        assert_eq!(get(&r, "k8s.node.name"), Some("n"));
        assert_eq!(r.attributes.len(), 2);
        assert_eq!(r.service_name, None);
        assert_eq!(
            describe(None, &ContainerRef::default(), &Resolution::Unknown),
            K8sResource::default()
        );
    }
}
