//! The watcher thread: lists the pods of this node, then follows changes with a watch,
//! listing again when the watch expires or breaks. It never blocks tracing: readers only see
//! the store, which is updated whole.

use std::{
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use super::{
    Kubernetes,
    api::{ApiClient, ApiError, WatchEvent},
    pods::Pod,
};

/// The server ends each watch after this long (then we resume from where it stopped).
const WATCH_TIMEOUT: Duration = Duration::from_secs(290);
/// When watching is not allowed, list this often instead.
const POLL_PERIOD: Duration = Duration::from_secs(15);
/// A watch that ended sooner than this is followed by a pause before the next.
const MIN_WATCH: Duration = Duration::from_secs(1);
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Counts failures and logs once per outage: the first failure with its actionable message,
/// the recovery with how many attempts failed in between.
#[derive(Default)]
struct Health {
    failing_since: Option<Instant>,
    failures: u64,
}

impl Health {
    /// Returns whether this failure was logged (the first of an outage).
    fn failed(&mut self, k8s: &Kubernetes, doing: &str, err: &ApiError) -> bool {
        k8s.counters.api_errors.fetch_add(1, Ordering::Relaxed);
        self.failures += 1;
        if self.failing_since.is_some() {
            log::debug!("kubernetes: {doing}: {err}");
            return false;
        }
        self.failing_since = Some(Instant::now());
        k8s.counters.outages.fetch_add(1, Ordering::Relaxed);
        log::warn!(
            "kubernetes: {doing}: {err}. Tracing goes on; spans of processes in pods not known \
             yet lack Kubernetes attributes until this recovers (retrying)"
        );
        true
    }

    fn ok(&mut self) {
        if let Some(since) = self.failing_since.take() {
            log::info!(
                "kubernetes: API reachable again after {:.0?} and {} failed attempt(s); pod \
                 metadata is current",
                since.elapsed(),
                self.failures
            );
        }
        self.failures = 0;
    }
}

struct Backoff(Duration);

impl Backoff {
    fn new() -> Self {
        Self(FIRST_BACKOFF)
    }

    /// Sleeps (waking early when the agent stops), then doubles the next wait.
    fn wait(&mut self, k8s: &Kubernetes) {
        sleep(k8s, self.0);
        self.0 = (self.0 * 2).min(MAX_BACKOFF);
    }

    fn reset(&mut self) {
        self.0 = FIRST_BACKOFF;
    }
}

fn sleep(k8s: &Kubernetes, total: Duration) {
    let end = Instant::now() + total;
    while !k8s.stopped() {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        std::thread::sleep(left.min(Duration::from_millis(100)));
    }
}

/// What to look up the node name with, when it was not given.
pub struct OwnPod {
    pub namespace: String,
    pub name: String,
}

/// Runs until `k8s` is stopped.
pub fn run(k8s: Arc<Kubernetes>, client: ApiClient, own_pod: Option<OwnPod>) {
    let mut health = Health::default();
    let mut backoff = Backoff::new();
    let node = match k8s.node_name() {
        Some(node) => node.to_owned(),
        None => match discover_node(&k8s, &client, own_pod, &mut health, &mut backoff) {
            Some(node) => node,
            None => return,
        },
    };
    let mut poll_only = false;
    while !k8s.stopped() {
        let list = match client.list_pods(&node) {
            Ok(list) => list,
            Err(err) => {
                health.failed(&k8s, &format!("listing the pods of node {node}"), &err);
                backoff.wait(&k8s);
                continue;
            }
        };
        health.ok();
        backoff.reset();
        k8s.counters.lists.fetch_add(1, Ordering::Relaxed);
        let mut version = list.metadata.resource_version;
        let pods = list.items.into_iter().filter_map(|p| k8s.keep(p)).collect();
        k8s.store.replace_all(pods, Instant::now());
        if poll_only {
            sleep(&k8s, POLL_PERIOD);
            continue;
        }
        // Follow changes until the watch cannot resume; then list again.
        while !k8s.stopped() {
            let started = Instant::now();
            match follow(&k8s, &client, &node, &mut version) {
                Ok(()) => {
                    health.ok();
                    backoff.reset();
                    // A server (or proxy) that ends watches at once must not be hammered.
                    if started.elapsed() < MIN_WATCH {
                        sleep(&k8s, MIN_WATCH);
                    }
                }
                Err(ApiError::Expired { .. }) => {
                    k8s.counters.relists.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Err(ApiError::Forbidden {
                    verb: "watch",
                    message,
                }) => {
                    log::warn!(
                        "kubernetes: the API denied `watch` on pods ({message}); listing them \
                         every {}s instead. Grant the agent's service account `watch` on pods \
                         so new pods are known at once",
                        POLL_PERIOD.as_secs()
                    );
                    poll_only = true;
                    break;
                }
                Err(err) => {
                    health.failed(&k8s, &format!("watching the pods of node {node}"), &err);
                    backoff.wait(&k8s);
                    break;
                }
            }
        }
    }
}

/// One watch request: applies its events until the server ends it (`Ok`) or it fails.
fn follow(
    k8s: &Kubernetes,
    client: &ApiClient,
    node: &str,
    version: &mut String,
) -> Result<(), ApiError> {
    let mut stream = client.watch_pods(node, version, WATCH_TIMEOUT)?;
    while let Some(event) = stream.next_event() {
        let now = Instant::now();
        k8s.counters.watch_events.fetch_add(1, Ordering::Relaxed);
        match event? {
            WatchEvent::Added(pod) | WatchEvent::Modified(pod) => {
                remember_version(version, &pod);
                if let Some(meta) = k8s.keep(pod) {
                    k8s.store.upsert(meta, now);
                }
            }
            WatchEvent::Deleted(pod) => {
                remember_version(version, &pod);
                k8s.store.delete(&pod.metadata.uid, now);
            }
            WatchEvent::Bookmark(v) if !v.is_empty() => *version = v,
            WatchEvent::Bookmark(_) => {}
        }
        if k8s.stopped() {
            break;
        }
    }
    Ok(())
}

fn remember_version(version: &mut String, pod: &Pod) {
    if !pod.metadata.resource_version.is_empty() {
        version.clone_from(&pod.metadata.resource_version);
    }
}

/// The node we run on, from our own pod's `spec.nodeName`.
fn discover_node(
    k8s: &Kubernetes,
    client: &ApiClient,
    own_pod: Option<OwnPod>,
    health: &mut Health,
    backoff: &mut Backoff,
) -> Option<String> {
    let Some(own) = own_pod else {
        log::error!(
            "kubernetes: the node name is unknown: pass --k8s-node-name, or set NODE_NAME from \
             the downward API (env valueFrom.fieldRef.fieldPath: spec.nodeName); no Kubernetes \
             metadata until then"
        );
        return None;
    };
    while !k8s.stopped() {
        match client.get_pod(&own.namespace, &own.name) {
            Ok(pod) => match pod.spec.node_name.filter(|n| !n.is_empty()) {
                Some(node) => {
                    health.ok();
                    log::info!(
                        "kubernetes: running on node {node} (from pod {}/{})",
                        own.namespace,
                        own.name
                    );
                    k8s.set_node_name(node.clone());
                    return Some(node);
                }
                None => {
                    log::error!(
                        "kubernetes: pod {}/{} has no spec.nodeName; pass --k8s-node-name or \
                         set NODE_NAME from the downward API",
                        own.namespace,
                        own.name
                    );
                    return None;
                }
            },
            Err(err) => {
                health.failed(
                    k8s,
                    &format!(
                        "reading this agent's pod {}/{} to learn the node name (or pass \
                         --k8s-node-name / NODE_NAME)",
                        own.namespace, own.name
                    ),
                    &err,
                );
                backoff.wait(k8s);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::{
        PodFilter,
        cgroup::ContainerRef,
        store::Resolution,
        test_server::{Reply, Server},
    };

    fn place(id: &str) -> ContainerRef {
        ContainerRef {
            container_id: Some(id.into()),
            pod_uid: None,
        }
    }

    fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    const WEB_ID: &str = "38deffad91c1c495c22e666f0383b4c0da135cb08381b3f276a5e46be1c553b9";
    const NEW_ID: &str = "a95ed011ab681301ca26be5db60c4b05a0fc559e2720d94325f0e6616ccab819";

    #[test]
    fn lists_watches_and_relists_after_expiry() {
        let server = Server::start(vec![
            Reply::json(200, include_str!("testdata/podlist-node-1.json")),
            Reply::stream(200, include_str!("testdata/watch-node-1.jsonl")),
            // After the 410 in the stream: the list again, then a quiet watch.
            Reply::json(200, include_str!("testdata/podlist-node-1-later.json")),
            Reply::stream(200, ""),
        ]);
        let k8s = Arc::new(Kubernetes::new(Some("node-1".into()), PodFilter::default()));
        let client = ApiClient::plain(&server.base());
        let thread = {
            let k8s = k8s.clone();
            std::thread::spawn(move || run(k8s, client, None))
        };
        assert!(k8s.store.wait_synced(Duration::from_secs(10)));
        wait_for("the relist", || {
            k8s.counters.lists.load(Ordering::Relaxed) >= 2
        });
        k8s.stop();
        thread.join().expect("watcher thread");
        server.finish();

        let requests = server.requests();
        assert!(requests[0].starts_with("/api/v1/pods?fieldSelector=spec.nodeName%3Dnode-1"));
        assert!(!requests[0].contains("watch"));
        assert!(requests[1].contains("watch=1"), "{}", requests[1]);
        assert!(
            requests[1].contains("resourceVersion=48211"),
            "{}",
            requests[1]
        );
        assert!(
            !requests[2].contains("watch"),
            "relist after 410: {}",
            requests[2]
        );
        assert_eq!(k8s.counters.relists.load(Ordering::Relaxed), 1);
        assert_eq!(k8s.counters.api_errors.load(Ordering::Relaxed), 0);

        // The later list has the pod the watch added, whose container started meanwhile.
        match k8s.store.resolve(&place(NEW_ID)) {
            Resolution::Container { pod, name } => {
                assert_eq!(pod.name, "orders-6d4cf56db6-tq8zv");
                assert_eq!(name, "orders");
            }
            other => panic!("new pod not resolved: {other:?}"),
        }
        // The web pod was never deleted.
        assert!(k8s.store.resolve(&place(WEB_ID)).pod().is_some());
    }

    #[test]
    fn forbidden_is_counted_and_explained_then_recovers() {
        let server = Server::start(vec![
            Reply::json(403, include_str!("testdata/status-403-list.json")),
            Reply::json(403, include_str!("testdata/status-403-list.json")),
            Reply::json(200, include_str!("testdata/podlist-node-1.json")),
            Reply::stream(200, ""),
        ]);
        let k8s = Arc::new(Kubernetes::new(Some("node-1".into()), PodFilter::default()));
        let client = ApiClient::plain(&server.base());
        let thread = {
            let k8s = k8s.clone();
            std::thread::spawn(move || run(k8s, client, None))
        };
        assert!(k8s.store.wait_synced(Duration::from_secs(10)));
        k8s.stop();
        thread.join().expect("watcher thread");
        server.finish();
        assert_eq!(k8s.counters.api_errors.load(Ordering::Relaxed), 2);
        assert_eq!(
            k8s.counters.outages.load(Ordering::Relaxed),
            1,
            "one outage, logged once"
        );
        assert_eq!(k8s.store.live_pods(), 3);
    }

    #[test]
    fn health_logs_once_per_outage() {
        let k8s = Kubernetes::new(None, PodFilter::default());
        let mut h = Health::default();
        let err = ApiError::Forbidden {
            verb: "list",
            message: String::new(),
        };
        assert!(h.failed(&k8s, "listing", &err));
        assert!(!h.failed(&k8s, "listing", &err));
        h.ok();
        assert!(h.failed(&k8s, "listing", &err));
        assert_eq!(k8s.counters.outages.load(Ordering::Relaxed), 2);
        assert_eq!(k8s.counters.api_errors.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn learns_the_node_from_its_own_pod() {
        let server = Server::start(vec![
            Reply::json(200, include_str!("testdata/pod-agent.json")),
            Reply::json(200, include_str!("testdata/podlist-node-1.json")),
            Reply::stream(200, ""),
        ]);
        let k8s = Arc::new(Kubernetes::new(None, PodFilter::default()));
        let client = ApiClient::plain(&server.base());
        let own = OwnPod {
            namespace: "observability".into(),
            name: "ebpf-agent-7xq2p".into(),
        };
        let thread = {
            let k8s = k8s.clone();
            std::thread::spawn(move || run(k8s, client, Some(own)))
        };
        assert!(k8s.store.wait_synced(Duration::from_secs(10)));
        k8s.stop();
        thread.join().expect("watcher thread");
        server.finish();
        assert_eq!(k8s.node_name(), Some("node-1"));
        let requests = server.requests();
        assert_eq!(
            requests[0],
            "/api/v1/namespaces/observability/pods/ebpf-agent-7xq2p"
        );
        assert!(requests[1].contains("spec.nodeName%3Dnode-1"));
    }

    #[test]
    fn watches_that_end_at_once_are_not_hammered() {
        // Every watch ends after ~50 ms (the fake server's unscripted answer).
        let server = Server::start(vec![Reply::json(
            200,
            include_str!("testdata/podlist-node-1.json"),
        )]);
        let k8s = Arc::new(Kubernetes::new(Some("node-1".into()), PodFilter::default()));
        let client = ApiClient::plain(&server.base());
        let thread = {
            let k8s = k8s.clone();
            std::thread::spawn(move || run(k8s, client, None))
        };
        assert!(k8s.store.wait_synced(Duration::from_secs(10)));
        std::thread::sleep(Duration::from_millis(2500));
        k8s.stop();
        thread.join().expect("watcher thread");
        server.finish();
        let watches = server
            .requests()
            .iter()
            .filter(|r| r.contains("watch=1"))
            .count();
        assert!((1..=4).contains(&watches), "{watches} watches in 2.5 s");
    }
}
