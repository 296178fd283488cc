//! Pods as the Kubernetes API sends them (only the fields we use), and what we keep of each.
//!
//! The owning workload is derived from the pod alone, so reading pods is the only permission
//! needed: a ReplicaSet made by a Deployment is named `<deployment>-<pod-template-hash>` and
//! the pod carries that hash as a label; a Job made by a CronJob is named
//! `<cronjob>-<scheduled time in minutes since the epoch>`, which the pod's creation time
//! confirms.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer};

/// Treats `null` like an absent field (the API omits empty fields, but proxies and older
/// servers have been seen writing `null`).
fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// `GET /api/v1/pods` (a `PodList`).
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct PodList {
    #[serde(deserialize_with = "null_as_default")]
    pub metadata: ListMeta,
    #[serde(deserialize_with = "null_as_default")]
    pub items: Vec<Pod>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ListMeta {
    #[serde(deserialize_with = "null_as_default")]
    pub resource_version: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Pod {
    #[serde(deserialize_with = "null_as_default")]
    pub metadata: ObjectMeta,
    #[serde(deserialize_with = "null_as_default")]
    pub spec: PodSpec,
    #[serde(deserialize_with = "null_as_default")]
    pub status: PodStatus,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ObjectMeta {
    #[serde(deserialize_with = "null_as_default")]
    pub name: String,
    #[serde(deserialize_with = "null_as_default")]
    pub namespace: String,
    #[serde(deserialize_with = "null_as_default")]
    pub uid: String,
    #[serde(deserialize_with = "null_as_default")]
    pub resource_version: String,
    pub creation_timestamp: Option<String>,
    #[serde(deserialize_with = "null_as_default")]
    pub labels: BTreeMap<String, String>,
    #[serde(deserialize_with = "null_as_default")]
    pub annotations: BTreeMap<String, String>,
    #[serde(deserialize_with = "null_as_default")]
    pub owner_references: Vec<OwnerReference>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct OwnerReference {
    #[serde(deserialize_with = "null_as_default")]
    pub kind: String,
    #[serde(deserialize_with = "null_as_default")]
    pub name: String,
    pub controller: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct PodSpec {
    pub node_name: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct PodStatus {
    #[serde(deserialize_with = "null_as_default")]
    pub container_statuses: Vec<ContainerStatus>,
    #[serde(deserialize_with = "null_as_default")]
    pub init_container_statuses: Vec<ContainerStatus>,
    #[serde(deserialize_with = "null_as_default")]
    pub ephemeral_container_statuses: Vec<ContainerStatus>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ContainerStatus {
    #[serde(deserialize_with = "null_as_default")]
    pub name: String,
    /// `<runtime>://<id>`, e.g. `containerd://<64 hex>`; absent until the container started.
    #[serde(rename = "containerID")]
    pub container_id: Option<String>,
}

/// A `Status` object: the body of API errors and of watch `ERROR` events.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Status {
    pub code: u16,
    #[serde(deserialize_with = "null_as_default")]
    pub reason: String,
    #[serde(deserialize_with = "null_as_default")]
    pub message: String,
}

/// The workload that owns a pod, named as the semantic conventions' `k8s.*.name` attributes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Workload {
    pub replicaset: Option<String>,
    pub deployment: Option<String>,
    pub statefulset: Option<String>,
    pub daemonset: Option<String>,
    pub job: Option<String>,
    pub cronjob: Option<String>,
}

/// What we keep of a pod: small, and enough for resources and selection.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodMeta {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    /// Only the annotations we use (`resource.opentelemetry.io/*` and those selected on):
    /// others can be large (`kubectl.kubernetes.io/last-applied-configuration`).
    pub annotations: BTreeMap<String, String>,
    pub workload: Workload,
    /// Some controller owns the pod: its name is generated, not a service name.
    pub controlled: bool,
    /// (container id without scheme, container name) of every started container.
    pub containers: Vec<(String, String)>,
}

/// The prefix of annotations that become resource attributes (semantic conventions,
/// "Specify resource attributes using Kubernetes annotations").
pub const RESOURCE_ANNOTATION_PREFIX: &str = "resource.opentelemetry.io/";

impl PodMeta {
    /// `None` for an object without a uid (not a real pod). `keep_annotation` says which
    /// annotations besides `resource.opentelemetry.io/*` to keep.
    pub fn from_wire(pod: Pod, keep_annotation: &dyn Fn(&str) -> bool) -> Option<Self> {
        let Pod {
            metadata: meta,
            status,
            ..
        } = pod;
        if meta.uid.is_empty() {
            return None;
        }
        let workload = workload(&meta);
        let controlled = meta
            .owner_references
            .iter()
            .any(|o| o.controller == Some(true));
        let containers = status
            .container_statuses
            .into_iter()
            .chain(status.init_container_statuses)
            .chain(status.ephemeral_container_statuses)
            .filter_map(|c| Some((strip_scheme(c.container_id.as_deref()?)?, c.name)))
            .collect();
        let annotations = meta
            .annotations
            .into_iter()
            .filter(|(k, _)| k.starts_with(RESOURCE_ANNOTATION_PREFIX) || keep_annotation(k))
            .collect();
        Some(Self {
            uid: meta.uid,
            name: meta.name,
            namespace: meta.namespace,
            labels: meta.labels,
            annotations,
            workload,
            controlled,
            containers,
        })
    }

    /// The name of this pod's container with runtime id `id`.
    pub fn container_name(&self, id: &str) -> Option<&str> {
        self.containers
            .iter()
            .find(|(c, _)| c == id)
            .map(|(_, name)| name.as_str())
    }
}

/// `containerd://<id>`, `cri-o://<id>`, `docker://<id>` → `<id>`.
fn strip_scheme(container_id: &str) -> Option<String> {
    let id = container_id
        .split_once("://")
        .map_or(container_id, |(_, id)| id);
    (!id.is_empty()).then(|| id.to_owned())
}

fn workload(meta: &ObjectMeta) -> Workload {
    let mut w = Workload::default();
    // The controller is the owner that manages the pod; a pod has at most one.
    let Some(owner) = meta
        .owner_references
        .iter()
        .find(|o| o.controller == Some(true))
        .or(meta.owner_references.first())
    else {
        return w;
    };
    let name = Some(owner.name.clone()).filter(|n| !n.is_empty());
    match owner.kind.as_str() {
        "ReplicaSet" => {
            w.deployment = name
                .as_deref()
                .and_then(|rs| deployment_of(rs, meta.labels.get("pod-template-hash")?));
            w.replicaset = name;
        }
        "StatefulSet" => w.statefulset = name,
        "DaemonSet" => w.daemonset = name,
        "Job" => {
            w.cronjob = name.as_deref().and_then(|job| {
                cronjob_of(
                    job,
                    meta.creation_timestamp.as_deref().and_then(unix_seconds)?,
                )
            });
            w.job = name;
        }
        _ => {}
    }
    w
}

/// A Deployment names its ReplicaSets `<deployment>-<pod-template-hash>`.
fn deployment_of(replicaset: &str, template_hash: &str) -> Option<String> {
    let deployment = replicaset.strip_suffix(template_hash)?.strip_suffix('-')?;
    (!deployment.is_empty() && !template_hash.is_empty()).then(|| deployment.to_owned())
}

/// A CronJob names its Jobs `<cronjob>-<scheduled time in minutes since the epoch>`. A Job
/// named like that by hand (`backup-20240101`) is told apart by the pod's creation time, which
/// follows the scheduled time (retried pods may come much later, never before).
fn cronjob_of(job: &str, pod_created_unix: i64) -> Option<String> {
    const EARLIEST: i64 = -120;
    const LATEST: i64 = 7 * 24 * 3600;
    let (cronjob, minutes) = job.rsplit_once('-')?;
    if cronjob.is_empty() || minutes.len() < 8 || !minutes.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let scheduled = minutes.parse::<i64>().ok()?.checked_mul(60)?;
    let delay = pod_created_unix - scheduled;
    (EARLIEST..=LATEST)
        .contains(&delay)
        .then(|| cronjob.to_owned())
}

/// `2026-02-14T16:31:59Z` (the API's RFC 3339 timestamps, always UTC) → seconds since the
/// epoch.
fn unix_seconds(ts: &str) -> Option<i64> {
    let b = ts.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' {
        return None;
    }
    if b[16] != b':' || !matches!(b[19], b'Z' | b'.') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| ts.get(r)?.parse::<i64>().ok();
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, s) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 60 {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + mi * 60 + s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(unix_seconds("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(unix_seconds("2024-06-25T14:48:12Z"), Some(1_719_326_892));
        assert_eq!(unix_seconds("2000-03-01T00:00:00Z"), Some(951_868_800));
        assert_eq!(
            unix_seconds("2026-02-14T16:31:59.123456Z"),
            Some(1_771_086_719)
        );
        assert_eq!(unix_seconds("2026-13-14T16:31:59Z"), None);
        assert_eq!(unix_seconds("yesterday"), None);
        assert_eq!(unix_seconds(""), None);
    }

    #[test]
    fn deployments_from_replicaset_names() {
        assert_eq!(
            deployment_of("checkout-7c5ddbdf54", "7c5ddbdf54").as_deref(),
            Some("checkout")
        );
        assert_eq!(
            deployment_of("my-web-app-6b9f8d7c4", "6b9f8d7c4").as_deref(),
            Some("my-web-app")
        );
        assert_eq!(deployment_of("checkout-7c5ddbdf54", "abc"), None);
        assert_eq!(deployment_of("7c5ddbdf54", "7c5ddbdf54"), None);
        assert_eq!(deployment_of("-7c5ddbdf54", "7c5ddbdf54"), None);
        assert_eq!(deployment_of("x-", ""), None);
    }

    #[test]
    fn cronjobs_from_job_names() {
        // 29_000_000 minutes = 2025-02-19T21:20:00Z.
        let scheduled = 29_000_000 * 60;
        assert_eq!(
            cronjob_of("nightly-report-29000000", scheduled + 3).as_deref(),
            Some("nightly-report")
        );
        assert_eq!(
            cronjob_of("nightly-report-29000000", scheduled + 3600).as_deref(),
            Some("nightly-report")
        );
        // A Job named after a date, created long after "minute 20240101" (2008).
        assert_eq!(cronjob_of("backup-20240101", scheduled), None);
        // Not the timestamp pattern.
        assert_eq!(cronjob_of("migrate-1", scheduled), None);
        assert_eq!(cronjob_of("migrate-v2", scheduled), None);
        assert_eq!(cronjob_of("29000000", scheduled), None);
        // A pod cannot be created long before its Job was scheduled.
        assert_eq!(cronjob_of("report-29000000", scheduled - 3600), None);
    }

    #[test]
    fn container_ids_lose_their_scheme() {
        assert_eq!(strip_scheme("containerd://abc").as_deref(), Some("abc"));
        assert_eq!(strip_scheme("cri-o://abc").as_deref(), Some("abc"));
        assert_eq!(strip_scheme("docker://abc").as_deref(), Some("abc"));
        assert_eq!(strip_scheme("abc").as_deref(), Some("abc"));
        assert_eq!(strip_scheme("containerd://"), None);
    }

    #[test]
    fn nulls_and_missing_fields_are_empty() {
        let pod: Pod = serde_json::from_str(
            r#"{"metadata":{"name":"p","namespace":"n","uid":"u","labels":null,
                "annotations":null,"ownerReferences":null},"spec":null,"status":{}}"#,
        )
        .expect("parse");
        let meta = PodMeta::from_wire(pod, &|_| false).expect("has a uid");
        assert!(meta.labels.is_empty() && meta.containers.is_empty());
        assert_eq!(meta.workload, Workload::default());
        assert!(!meta.controlled);
        let no_uid: Pod = serde_json::from_str(r#"{"metadata":{"name":"p"}}"#).expect("parse");
        assert!(PodMeta::from_wire(no_uid, &|_| true).is_none());
    }
}
