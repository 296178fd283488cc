//! The pods of this node, indexed by uid and by container id. Written by the watcher thread,
//! read when a process's resource is built or a process is checked for selection.

use std::{
    collections::HashMap,
    sync::{
        Arc, Condvar, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use super::{cgroup::ContainerRef, pods::PodMeta};

/// A deleted pod is kept this long: its processes may still be flushing spans, or exiting.
const TOMBSTONE_TTL: Duration = Duration::from_secs(120);

/// What is known of the pod and container a process runs in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// Pod and container both known.
    Container {
        pod: Arc<PodMeta>,
        name: String,
    },
    /// The pod is known (from the uid in the cgroup path) but not yet its container: the
    /// kubelet reports a container's id shortly after starting it.
    Pod(Arc<PodMeta>),
    Unknown,
}

impl Resolution {
    pub fn pod(&self) -> Option<&PodMeta> {
        match self {
            Resolution::Container { pod, .. } | Resolution::Pod(pod) => Some(pod),
            Resolution::Unknown => None,
        }
    }

    /// 0 unknown, 1 pod, 2 pod and container: a later look-up that ranks higher is news.
    pub fn rank(&self) -> u8 {
        match self {
            Resolution::Unknown => 0,
            Resolution::Pod(_) => 1,
            Resolution::Container { .. } => 2,
        }
    }
}

#[derive(Default)]
struct Index {
    pods: HashMap<String, Slot>,
    /// container id → pod uid.
    containers: HashMap<String, String>,
}

struct Slot {
    pod: Arc<PodMeta>,
    deleted: Option<Instant>,
}

impl Index {
    fn insert(&mut self, pod: PodMeta) -> bool {
        if let Some(old) = self.pods.get(&pod.uid)
            && old.deleted.is_none()
            && *old.pod == pod
        {
            return false;
        }
        self.unindex(&pod.uid);
        for (id, _) in &pod.containers {
            self.containers.insert(id.clone(), pod.uid.clone());
        }
        self.pods.insert(
            pod.uid.clone(),
            Slot {
                pod: Arc::new(pod),
                deleted: None,
            },
        );
        true
    }

    fn unindex(&mut self, uid: &str) {
        if let Some(old) = self.pods.get(uid) {
            for (id, _) in &old.pod.containers {
                if self.containers.get(id).is_some_and(|u| u == uid) {
                    self.containers.remove(id);
                }
            }
        }
    }

    fn tombstone(&mut self, uid: &str, now: Instant) -> bool {
        match self.pods.get_mut(uid) {
            Some(slot) if slot.deleted.is_none() => {
                slot.deleted = Some(now);
                true
            }
            _ => false,
        }
    }

    fn prune(&mut self, now: Instant) {
        let expired: Vec<String> = self
            .pods
            .iter()
            .filter(|(_, s)| {
                s.deleted
                    .is_some_and(|d| now.duration_since(d) >= TOMBSTONE_TTL)
            })
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in expired {
            self.unindex(&uid);
            self.pods.remove(&uid);
        }
    }
}

#[derive(Default)]
pub struct PodStore {
    index: RwLock<Index>,
    /// Bumped whenever what a look-up can return changed: readers re-check what they could not
    /// resolve before, and only then.
    generation: AtomicU64,
    synced: Mutex<bool>,
    synced_cv: Condvar,
}

impl PodStore {
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Index> {
        // A panic while holding the lock leaves a consistent index (every mutation is whole).
        self.index.write().unwrap_or_else(|p| p.into_inner())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Index> {
        self.index.read().unwrap_or_else(|p| p.into_inner())
    }

    fn changed(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// A full list: these are the pods now; the others were deleted meanwhile.
    pub fn replace_all(&self, pods: Vec<PodMeta>, now: Instant) {
        let mut index = self.write();
        let mut changed = false;
        let listed: std::collections::HashSet<String> =
            pods.iter().map(|p| p.uid.clone()).collect();
        let gone: Vec<String> = index
            .pods
            .keys()
            .filter(|uid| !listed.contains(*uid))
            .cloned()
            .collect();
        for uid in gone {
            changed |= index.tombstone(&uid, now);
        }
        for pod in pods {
            changed |= index.insert(pod);
        }
        index.prune(now);
        drop(index);
        if changed {
            self.changed();
        }
        let mut synced = self.synced.lock().unwrap_or_else(|p| p.into_inner());
        *synced = true;
        self.synced_cv.notify_all();
    }

    /// A pod was added or modified.
    pub fn upsert(&self, pod: PodMeta, now: Instant) {
        let mut index = self.write();
        let changed = index.insert(pod);
        index.prune(now);
        drop(index);
        if changed {
            self.changed();
        }
    }

    pub fn delete(&self, uid: &str, now: Instant) {
        let mut index = self.write();
        let changed = index.tombstone(uid, now);
        index.prune(now);
        drop(index);
        if changed {
            self.changed();
        }
    }

    /// Waits until the first full list arrived, at most `timeout`. Returns whether it did.
    pub fn wait_synced(&self, timeout: Duration) -> bool {
        let synced = self.synced.lock().unwrap_or_else(|p| p.into_inner());
        let (synced, _) = self
            .synced_cv
            .wait_timeout_while(synced, timeout, |s| !*s)
            .unwrap_or_else(|p| p.into_inner());
        *synced
    }

    /// Pods known and not deleted.
    pub fn live_pods(&self) -> usize {
        self.read()
            .pods
            .values()
            .filter(|s| s.deleted.is_none())
            .count()
    }

    /// The pod and container of a process, from its cgroup's container id and pod uid.
    pub fn resolve(&self, place: &ContainerRef) -> Resolution {
        let index = self.read();
        if let Some(id) = &place.container_id
            && let Some(slot) = index.containers.get(id).and_then(|uid| index.pods.get(uid))
            && let Some(name) = slot.pod.container_name(id)
        {
            return Resolution::Container {
                pod: Arc::clone(&slot.pod),
                name: name.to_owned(),
            };
        }
        match place.pod_uid.as_ref().and_then(|uid| index.pods.get(uid)) {
            Some(slot) => Resolution::Pod(Arc::clone(&slot.pod)),
            None => Resolution::Unknown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(uid: &str, containers: &[(&str, &str)]) -> PodMeta {
        PodMeta {
            uid: uid.into(),
            name: format!("pod-{uid}"),
            namespace: "ns".into(),
            containers: containers
                .iter()
                .map(|(id, n)| (id.to_string(), n.to_string()))
                .collect(),
            ..Default::default()
        }
    }

    fn place(id: Option<&str>, uid: Option<&str>) -> ContainerRef {
        ContainerRef {
            container_id: id.map(Into::into),
            pod_uid: uid.map(Into::into),
        }
    }

    #[test]
    fn resolves_by_container_then_by_pod_uid() {
        let store = PodStore::default();
        let now = Instant::now();
        assert!(!store.wait_synced(Duration::ZERO));
        store.replace_all(vec![pod("u1", &[("c1", "web")]), pod("u2", &[])], now);
        assert!(store.wait_synced(Duration::ZERO));
        assert_eq!(store.live_pods(), 2);

        let full = store.resolve(&place(Some("c1"), Some("u1")));
        assert!(matches!(&full, Resolution::Container { name, .. } if name == "web"));
        assert_eq!(full.rank(), 2);
        // The container id alone suffices (no pod uid in the cgroup path).
        assert_eq!(store.resolve(&place(Some("c1"), None)).rank(), 2);
        // A container not reported yet: its pod is known by uid.
        let pod_only = store.resolve(&place(Some("c9"), Some("u2")));
        assert_eq!(pod_only.pod().map(|p| p.uid.as_str()), Some("u2"));
        assert_eq!(pod_only.rank(), 1);
        assert_eq!(
            store.resolve(&place(Some("c9"), Some("u9"))),
            Resolution::Unknown
        );
        assert_eq!(store.resolve(&ContainerRef::default()), Resolution::Unknown);
    }

    #[test]
    fn generation_moves_only_on_real_changes() {
        let store = PodStore::default();
        let now = Instant::now();
        store.replace_all(vec![pod("u1", &[])], now);
        let g = store.generation();
        // Same content again (a MODIFIED event for a field we do not keep).
        store.upsert(pod("u1", &[]), now);
        assert_eq!(store.generation(), g);
        // The kubelet reports the container: news.
        store.upsert(pod("u1", &[("c1", "web")]), now);
        assert!(store.generation() > g);
        let g = store.generation();
        store.delete("u1", now);
        assert!(store.generation() > g);
        let g = store.generation();
        store.delete("u1", now);
        assert_eq!(store.generation(), g);
    }

    #[test]
    fn deleted_pods_linger_then_go() {
        let store = PodStore::default();
        let t0 = Instant::now();
        store.replace_all(
            vec![pod("u1", &[("c1", "web")]), pod("u2", &[("c2", "db")])],
            t0,
        );
        // u2 is gone from the next list: a tombstone, still resolvable for a while.
        store.replace_all(vec![pod("u1", &[("c1", "web")])], t0);
        assert_eq!(store.live_pods(), 1);
        assert_eq!(store.resolve(&place(Some("c2"), None)).rank(), 2);
        store.upsert(pod("u1", &[("c1", "web")]), t0 + TOMBSTONE_TTL);
        assert_eq!(store.resolve(&place(Some("c2"), None)), Resolution::Unknown);
        assert_eq!(store.resolve(&place(None, Some("u2"))), Resolution::Unknown);
        // A restarted container: the old id no longer resolves, the new one does.
        store.upsert(pod("u1", &[("c3", "web")]), t0);
        assert_eq!(store.resolve(&place(Some("c1"), None)), Resolution::Unknown);
        assert_eq!(store.resolve(&place(Some("c3"), None)).rank(), 2);
    }
}
