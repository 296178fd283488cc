//! Per-process OpenTelemetry resources: built once per process (`build.rs`) from what `/proc`
//! tells of it, and kept here until the process exits.
//!
//! Each traced process is its own resource: `service.name` comes from the process's own
//! `OTEL_SERVICE_NAME` (or `OTEL_RESOURCE_ATTRIBUTES`, see `otel_env.rs`), else from its pod's
//! workload when in Kubernetes (see `k8s::resource`), else from its executable's name.

mod build;
mod otel_env;
#[cfg(test)]
mod tests;

use std::{collections::HashMap, sync::Arc};

use crate::{
    k8s::{self, Kubernetes},
    proc::{self, ProcFs},
    spans::model::Resource,
};
pub use build::DISTRO_NAME;

/// The host's name, as `host.name` reports it (`/proc/sys/kernel/hostname`, then `$HOSTNAME`).
pub fn host_name() -> String {
    proc::hostname()
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "unknown".to_owned())
}

/// Resources of the traced processes, loaded once per process (and again after `exec`, and
/// once more when the pod list tells what was still unknown of its pod).
pub struct Resources {
    host_name: String,
    by_pid: HashMap<u32, Cached>,
    k8s: Option<Arc<Kubernetes>>,
    /// The pod list's generation when `waiting` was last checked.
    k8s_generation: u64,
    /// Processes in a container whose pod (or container) was not in the pod list when their
    /// resource was built: where they run, and how much was known (`Resolution::rank`).
    waiting: HashMap<u32, (k8s::ContainerRef, u8)>,
    proc: ProcFs,
}

/// A process's resource, and whether `/proc` told it (`false`: the minimal one of a process
/// that could not be read).
struct Cached {
    resource: Arc<Resource>,
    read: bool,
}

impl Cached {
    fn read(resource: Resource) -> Self {
        Self {
            resource: Arc::new(resource),
            read: true,
        }
    }

    fn minimal(pid: u32, host_name: &str) -> Self {
        Self {
            resource: Arc::new(build::minimal_resource(pid, host_name)),
            read: false,
        }
    }
}

impl std::fmt::Debug for Resources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resources")
            .field("host_name", &self.host_name)
            .field("processes", &self.by_pid.len())
            .field("kubernetes", &self.k8s.is_some())
            .finish()
    }
}

impl Resources {
    pub fn new(host_name: impl Into<String>) -> Self {
        Self {
            host_name: host_name.into(),
            by_pid: HashMap::new(),
            k8s: None,
            k8s_generation: 0,
            waiting: HashMap::new(),
            proc: ProcFs::host(),
        }
    }

    /// Resources get the Kubernetes attributes of their process's pod.
    pub fn with_kubernetes(mut self, k8s: Option<Arc<Kubernetes>>) -> Self {
        self.k8s = k8s;
        self
    }

    /// The resource of `pid`, read from `/proc` the first time. A process that is already gone
    /// (or unreadable) gets a minimal resource (`service.name` = `unknown:PID`).
    pub fn get_or_load(&mut self, pid: u32) -> Arc<Resource> {
        self.refresh_kubernetes();
        if let Some(c) = self.by_pid.get(&pid) {
            return Arc::clone(&c.resource);
        }
        let cached = match self.load(pid) {
            Some(r) => Cached::read(r),
            None => Cached::minimal(pid, self.host()),
        };
        let r = Arc::clone(&cached.resource);
        self.by_pid.insert(pid, cached);
        r
    }

    /// The resource of `child`, just forked by `parent`: read from `/proc` like any other, or,
    /// when the child is already gone, its parent's with the child's pid (a fork without exec
    /// runs the same program with the same environment, so it is the same service).
    pub fn load_forked(&mut self, child: u32, parent: u32) {
        self.refresh_kubernetes();
        if self.by_pid.contains_key(&child) {
            return;
        }
        let cached = match self.load(child) {
            Some(r) => Cached::read(r),
            None => match self.load_parent(parent) {
                // Told by /proc too, of the parent.
                Some(parent) => Cached::read(build::forked(&parent, child, self.host())),
                None => Cached::minimal(child, self.host()),
            },
        };
        self.by_pid.insert(child, cached);
    }

    /// The parent's resource as `/proc` told it (not a minimal one).
    fn load_parent(&mut self, parent: u32) -> Option<Arc<Resource>> {
        if let Some(c) = self.by_pid.get(&parent) {
            return c.read.then(|| Arc::clone(&c.resource));
        }
        let cached = Cached::read(self.load(parent)?);
        let r = Arc::clone(&cached.resource);
        self.by_pid.insert(parent, cached);
        Some(r)
    }

    /// Drops the cached resource of a process that exited (its pid may be reused).
    pub fn forget(&mut self, pid: u32) {
        self.by_pid.remove(&pid);
        self.waiting.remove(&pid);
    }

    /// `host.name`: in Kubernetes the node's name, since the agent's own hostname is its pod's
    /// (pods have their own UTS namespace).
    fn host(&self) -> &str {
        self.k8s
            .as_ref()
            .and_then(|k| k.node_name())
            .unwrap_or(&self.host_name)
    }

    /// `None` when `/proc/PID` cannot be read.
    fn load(&mut self, pid: u32) -> Option<Resource> {
        let place = self
            .proc
            .cgroup(pid)
            .map(|text| k8s::cgroup::parse(&text))
            .unwrap_or_default();
        let resolution = match &self.k8s {
            Some(k8s) if !place.is_host() => k8s.resolve(&place),
            _ => k8s::Resolution::Unknown,
        };
        let node = self.k8s.as_ref().and_then(|k| k.node_name());
        let described = k8s::resource::describe(node, &place, &resolution);
        if self.k8s.is_some() && !place.is_host() && resolution.rank() < 2 {
            self.waiting.insert(pid, (place, resolution.rank()));
        } else {
            self.waiting.remove(&pid);
        }
        let host = self.host().to_owned();
        match self.proc.facts(pid) {
            Ok(facts) => Some(build::resource(pid, facts, &host, Some(&described))),
            Err(e) => {
                log::debug!("using a minimal resource for pid {pid}: {e}");
                self.waiting.remove(&pid);
                None
            }
        }
    }

    /// When the pod list changed, rebuilds the resources of processes whose pod or container
    /// it now tells. One atomic load otherwise.
    fn refresh_kubernetes(&mut self) {
        let Some(k8s) = &self.k8s else {
            return;
        };
        let generation = k8s.store.generation();
        if generation == self.k8s_generation {
            return;
        }
        self.k8s_generation = generation;
        let news: Vec<u32> = self
            .waiting
            .iter()
            .filter(|(_, (place, rank))| k8s.resolve(place).rank() > *rank)
            .map(|(pid, _)| *pid)
            .collect();
        for pid in news {
            // Not cached (forgotten meanwhile): nothing to refresh.
            if !self.by_pid.contains_key(&pid) {
                self.waiting.remove(&pid);
                continue;
            }
            // A process gone meanwhile keeps the resource it had.
            if let Some(r) = self.load(pid) {
                self.by_pid.insert(pid, Cached::read(r));
            }
        }
    }
}
