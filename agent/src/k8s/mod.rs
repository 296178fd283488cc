//! Kubernetes metadata for the resources of traced processes, and selection by pod.
//!
//! A process's cgroup path names its container and pod (`cgroup`); a thread lists and watches
//! the pods of this node through the Kubernetes API (`api`, `watch`) into an index (`store`);
//! resources and selection look processes up there (`resource`, `filter`). Nothing here runs
//! per span: a process is looked up when its resource is built, and again only when the pod
//! list changed while its pod or container was still unknown.

pub mod api;
pub mod cgroup;
pub mod filter;
pub mod pods;
pub mod resource;
pub mod store;
#[cfg(test)]
mod test_server;
mod watch;

use std::{
    path::Path,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

pub use cgroup::ContainerRef;
pub use filter::PodFilter;
pub use resource::K8sResource;
pub use store::Resolution;

use crate::stats::Metric;
use api::{ApiClient, SERVICE_ACCOUNT_DIR};
use pods::{Pod, PodMeta};
use store::PodStore;

/// `--kubernetes`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// On when running in a pod (`KUBERNETES_SERVICE_HOST` set).
    Auto,
    On,
    Off,
}

#[derive(Clone, Debug)]
pub struct Config {
    pub mode: Mode,
    /// `--k8s-node-name`, else `NODE_NAME`; else learnt from the agent's own pod.
    pub node_name: Option<String>,
    pub filter: PodFilter,
}

#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    #[error(
        "--k8s-namespace, --k8s-pod-label and --k8s-pod-annotation select processes by their \
         pod, which needs Kubernetes metadata: drop --kubernetes off"
    )]
    FilterWithoutKubernetes,
    #[error(
        "--k8s-namespace, --k8s-pod-label and --k8s-pod-annotation select processes by their \
         pod, but the agent is not running in a Kubernetes pod (KUBERNETES_SERVICE_HOST is \
         unset): deploy it as a DaemonSet (deploy/helm), or select with --pid/--comm/--exe/--port"
    )]
    FilterOutsideKubernetes,
    #[error(transparent)]
    Config(#[from] api::ConfigError),
    #[error("cannot start the Kubernetes metadata thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// What the watcher did, for the agent's counters.
#[derive(Default)]
pub struct Counters {
    /// Pod lists read from the API server.
    pub lists: AtomicU64,
    /// Events received on the pod watch.
    pub watch_events: AtomicU64,
    /// Lists made because a watch could not resume (410 Gone).
    pub relists: AtomicU64,
    /// Requests to the API server that failed.
    pub api_errors: AtomicU64,
    /// Periods during which the API could not be used (each logged once).
    pub outages: AtomicU64,
}

/// Kubernetes metadata of this node, shared by the watcher thread, resources and selection.
pub struct Kubernetes {
    pub store: PodStore,
    node_name: OnceLock<String>,
    filter: PodFilter,
    pub counters: Counters,
    stop: AtomicBool,
}

impl Kubernetes {
    pub fn new(node_name: Option<String>, filter: PodFilter) -> Self {
        let name = OnceLock::new();
        if let Some(n) = node_name.filter(|n| !n.trim().is_empty()) {
            let _ = name.set(n.trim().to_owned());
        }
        Self {
            store: PodStore::default(),
            node_name: name,
            filter,
            counters: Counters::default(),
            stop: AtomicBool::new(false),
        }
    }

    pub fn node_name(&self) -> Option<&str> {
        self.node_name.get().map(String::as_str)
    }

    fn set_node_name(&self, name: String) {
        let _ = self.node_name.set(name);
    }

    /// Asks the watcher thread to end (at its next step; it may be blocked in a request). The
    /// agent itself just exits.
    #[cfg(test)]
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// What we keep of a pod from the API.
    fn keep(&self, pod: Pod) -> Option<PodMeta> {
        PodMeta::from_wire(pod, &|key| self.filter.uses_annotation(key))
    }

    pub fn resolve(&self, place: &ContainerRef) -> Resolution {
        self.store.resolve(place)
    }

    /// The pod count and the counters (help: their doc comments).
    pub fn counters(&self) -> Vec<Metric> {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        vec![
            Metric::gauge(
                "k8s_pods_known",
                "Pods of this node known now.",
                self.store.live_pods() as u64,
            ),
            Metric::counter(
                "k8s_pod_lists",
                "Pod lists read from the API server.",
                get(&c.lists),
            ),
            Metric::counter(
                "k8s_watch_events",
                "Events received on the pod watch.",
                get(&c.watch_events),
            ),
            Metric::counter(
                "k8s_relists",
                "Lists made because a watch could not resume (410 Gone).",
                get(&c.relists),
            ),
            Metric::counter(
                "k8s_api_errors",
                "Requests to the API server that failed.",
                get(&c.api_errors),
            ),
            Metric::counter(
                "k8s_api_outages",
                "Periods during which the API could not be used (each logged once).",
                get(&c.outages),
            ),
        ]
    }
}

/// Whether `mode` means on, given `KUBERNETES_SERVICE_HOST`.
fn enabled(mode: Mode, service_host: Option<&str>) -> bool {
    match mode {
        Mode::On => true,
        Mode::Off => false,
        Mode::Auto => service_host.is_some_and(|h| !h.trim().is_empty()),
    }
}

/// Starts the pod watcher when Kubernetes metadata is on; `None` when it is off.
pub fn start(cfg: &Config) -> Result<Option<Arc<Kubernetes>>, K8sError> {
    let service_host = std::env::var("KUBERNETES_SERVICE_HOST").ok();
    if !enabled(cfg.mode, service_host.as_deref()) {
        return match (cfg.filter.is_empty(), cfg.mode) {
            (true, _) => Ok(None),
            (false, Mode::Off) => Err(K8sError::FilterWithoutKubernetes),
            (false, _) => Err(K8sError::FilterOutsideKubernetes),
        };
    }
    let client = match ApiClient::in_cluster(Path::new(SERVICE_ACCOUNT_DIR)) {
        Ok(client) => client,
        // In a pod without credentials, and nothing asked for Kubernetes: trace without it.
        Err(e) if cfg.mode == Mode::Auto && cfg.filter.is_empty() => {
            log::warn!("kubernetes: {e}; going on without Kubernetes metadata");
            return Ok(None);
        }
        Err(e) => return Err(e.into()),
    };
    let k8s = Arc::new(Kubernetes::new(cfg.node_name.clone(), cfg.filter.clone()));
    let own_pod = own_pod();
    {
        let k8s = k8s.clone();
        std::thread::Builder::new()
            .name("k8s-pods".into())
            .spawn(move || watch::run(k8s, client, own_pod))
            .map_err(K8sError::Thread)?;
    }
    Ok(Some(k8s))
}

/// The agent's own pod: its namespace (from the service account) and name (the hostname a
/// pod gets, unless it uses the host's network).
fn own_pod() -> Option<watch::OwnPod> {
    let namespace = std::fs::read_to_string(Path::new(SERVICE_ACCOUNT_DIR).join("namespace"))
        .ok()
        .or_else(|| std::env::var("POD_NAMESPACE").ok())?
        .trim()
        .to_owned();
    let name = std::env::var("POD_NAME")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(crate::proc::hostname)?
        .trim()
        .to_owned();
    (!namespace.is_empty() && !name.is_empty()).then_some(watch::OwnPod { namespace, name })
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::spans::model::AttrValue;

    fn list(json: &str, filter: &PodFilter) -> Vec<PodMeta> {
        let k8s = Kubernetes::new(None, filter.clone());
        let list: pods::PodList = serde_json::from_str(json).expect("recorded PodList parses");
        list.items.into_iter().filter_map(|p| k8s.keep(p)).collect()
    }

    fn find<'a>(pods: &'a [PodMeta], name: &str) -> &'a PodMeta {
        pods.iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    #[test]
    fn recorded_containerd_node() {
        let pods = list(
            include_str!("testdata/podlist-node-1.json"),
            &PodFilter::default(),
        );
        assert_eq!(pods.len(), 3);
        let web = find(&pods, "web-7c5ddbdf54-x2x9q");
        assert_eq!(web.namespace, "shop");
        assert_eq!(web.uid, "970f668a-75d1-41e6-8311-1ddfe9bceafd");
        assert_eq!(web.workload.replicaset.as_deref(), Some("web-7c5ddbdf54"));
        assert_eq!(web.workload.deployment.as_deref(), Some("web"));
        assert!(web.controlled);
        // Both containers and the finished init container, by id without the scheme.
        assert_eq!(web.containers.len(), 3);
        assert_eq!(
            web.container_name("38deffad91c1c495c22e666f0383b4c0da135cb08381b3f276a5e46be1c553b9"),
            Some("web")
        );
        assert_eq!(
            web.container_name("93b30e1d6d571114ec4da2b0b69e26df391275b18072e1434c4f6877278d61dc"),
            Some("wait-for-db")
        );
        // Only resource.opentelemetry.io/* annotations are kept by default.
        assert_eq!(
            web.annotations.keys().collect::<Vec<_>>(),
            vec!["resource.opentelemetry.io/deployment.environment.name"]
        );
        let pg = find(&pods, "postgres-0");
        assert_eq!(pg.workload.statefulset.as_deref(), Some("postgres"));
        assert_eq!(pg.workload.deployment, None);
        let agent = find(&pods, "ebpf-agent-7xq2p");
        assert_eq!(agent.workload.daemonset.as_deref(), Some("ebpf-agent"));

        // Annotations selected on are kept too.
        let filter = PodFilter {
            annotations: vec![("team".into(), "storefront".into())],
            ..Default::default()
        };
        let pods = list(include_str!("testdata/podlist-node-1.json"), &filter);
        assert!(filter.matches(find(&pods, "web-7c5ddbdf54-x2x9q")));
        assert!(!filter.matches(find(&pods, "postgres-0")));
    }

    #[test]
    fn recorded_crio_node_jobs_and_bare_pods() {
        let pods = list(
            include_str!("testdata/podlist-node-2-crio.json"),
            &PodFilter::default(),
        );
        let cron = find(&pods, "nightly-invoices-29431140-8kq4w");
        assert_eq!(
            cron.workload.job.as_deref(),
            Some("nightly-invoices-29431140")
        );
        assert_eq!(cron.workload.cronjob.as_deref(), Some("nightly-invoices"));
        assert_eq!(
            cron.container_name("577fc019b95dd91eb5dca42ba2fb01fdf5d5ae9b60e23908e018f1c75341ed16"),
            Some("invoices")
        );
        // A Job someone named after a date is not a CronJob's.
        let hand = find(&pods, "backfill-20240101-2xv7p");
        assert_eq!(hand.workload.job.as_deref(), Some("backfill-20240101"));
        assert_eq!(hand.workload.cronjob, None);
        let bare = find(&pods, "debug-shell");
        assert!(!bare.controlled);
        assert_eq!(bare.workload, pods::Workload::default());
    }

    fn str_attr<'a>(r: &'a K8sResource, key: &str) -> Option<&'a str> {
        r.attributes
            .iter()
            .find(|a| a.key == key)
            .and_then(|a| match &a.value {
                AttrValue::Str(s) => Some(s.as_ref()),
                _ => None,
            })
    }

    #[test]
    fn a_process_from_its_cgroup_to_its_attributes() {
        let k8s = Kubernetes::new(Some("node-1".into()), PodFilter::default());
        let pods = list(
            include_str!("testdata/podlist-node-1.json"),
            &PodFilter::default(),
        );
        k8s.store.replace_all(pods, Instant::now());
        // nginx in the web container, as containerd with the systemd driver shows it.
        let place = cgroup::parse(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod970f668a_75d1_41e6_8311_1ddfe9bceafd.slice/cri-containerd-38deffad91c1c495c22e666f0383b4c0da135cb08381b3f276a5e46be1c553b9.scope\n",
        );
        let r = resource::describe(k8s.node_name(), &place, &k8s.resolve(&place));
        assert_eq!(r.service_name.as_deref(), Some("web"));
        assert_eq!(str_attr(&r, "k8s.pod.name"), Some("web-7c5ddbdf54-x2x9q"));
        assert_eq!(str_attr(&r, "k8s.container.name"), Some("web"));
        assert_eq!(str_attr(&r, "k8s.deployment.name"), Some("web"));
        assert_eq!(str_attr(&r, "k8s.node.name"), Some("node-1"));
        assert_eq!(
            str_attr(&r, "deployment.environment.name"),
            Some("production")
        );
        assert_eq!(
            str_attr(&r, "container.id"),
            Some("38deffad91c1c495c22e666f0383b4c0da135cb08381b3f276a5e46be1c553b9")
        );
        // postgres with the cgroupfs driver on cgroup v1: its annotation names the service.
        let place = cgroup::parse(
            "12:memory:/kubepods/burstable/pod31d7cee4-8739-43d2-bc5f-08516b98c7a9/234a7b0abb18adbf098508f5e55d9653bb2fe2bf2c4e48cb3157079e99f1eb29\n0::/\n",
        );
        let r = resource::describe(k8s.node_name(), &place, &k8s.resolve(&place));
        assert_eq!(r.service_name.as_deref(), Some("orders-db"));
        assert_eq!(str_attr(&r, "k8s.statefulset.name"), Some("postgres"));
    }

    #[test]
    fn modes_and_filters() {
        assert!(enabled(Mode::Auto, Some("10.96.0.1")));
        assert!(!enabled(Mode::Auto, None));
        assert!(!enabled(Mode::Auto, Some("")));
        assert!(enabled(Mode::On, None));
        assert!(!enabled(Mode::Off, Some("10.96.0.1")));
        let filtered = |mode| Config {
            mode,
            node_name: None,
            filter: PodFilter {
                namespaces: vec!["shop".into()],
                ..Default::default()
            },
        };
        assert!(matches!(
            start(&filtered(Mode::Off)),
            Err(K8sError::FilterWithoutKubernetes)
        ));
        let off = Config {
            mode: Mode::Off,
            node_name: None,
            filter: PodFilter::default(),
        };
        assert!(matches!(start(&off), Ok(None)));
    }
}
