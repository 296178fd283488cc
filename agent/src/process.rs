//! Per-process OpenTelemetry resources, read from `/proc/PID`.
//!
//! Each traced process is its own resource: `service.name` comes from the process's own
//! `OTEL_SERVICE_NAME` (or `OTEL_RESOURCE_ATTRIBUTES`), else from its pod's workload when in
//! Kubernetes (see `k8s::resource`), else from its executable's name. The
//! command line is redacted before it leaves the machine (see `redact::command_line`).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use crate::{
    intern::intern_key,
    k8s::{self, K8sResource, Kubernetes},
    proc::{self, ProcFs, ProcessError, ProcessFacts},
    redact,
    spans::model::{AttrValue, Attribute, Resource},
};

/// `telemetry.distro.name` of the spans this agent produces.
pub const DISTRO_NAME: &str = "ebpf-agent";

/// Longest key or value accepted from `OTEL_RESOURCE_ATTRIBUTES`.
const MAX_ENV_ATTR_LEN: usize = 4096;

/// The host's name, as `host.name` reports it (`/proc/sys/kernel/hostname`, then `$HOSTNAME`).
pub fn host_name() -> String {
    proc::hostname()
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "unknown".to_owned())
}

/// The version of the OpenTelemetry SDK we export with (`telemetry.sdk.version`).
fn sdk_version() -> &'static str {
    static VERSION: OnceLock<String> = OnceLock::new();
    VERSION.get_or_init(|| {
        use opentelemetry_sdk::resource::TelemetryResourceDetector;
        let detected = opentelemetry_sdk::Resource::builder_empty()
            .with_detector(Box::new(TelemetryResourceDetector))
            .build();
        detected
            .get(&opentelemetry::Key::from_static_str(
                "telemetry.sdk.version",
            ))
            .map(|v| v.as_str().into_owned())
            .unwrap_or_else(|| "unknown".to_owned())
    })
}

/// Reads `/proc/PID` and builds the OpenTelemetry resource of that process.
/// Services whose executable name is not the name users know them by.
fn well_known_service(exe_name: &str) -> Option<&'static str> {
    match exe_name {
        // Every PostgreSQL server process (postmaster and backends) runs the `postgres` binary.
        "postgres" => Some("postgresql"),
        _ => None,
    }
}

#[cfg(test)]
pub fn resource_for_pid(pid: u32, host_name: &str) -> Result<Resource, ProcessError> {
    resource_from_proc(&ProcFs::host(), pid, host_name, None)
}

/// `k8s`: what the process's container and pod add (attributes, a service name below the
/// process's own).
fn resource_from_proc(
    proc: &ProcFs,
    pid: u32,
    host_name: &str,
    k8s: Option<&K8sResource>,
) -> Result<Resource, ProcessError> {
    let ProcessFacts {
        comm,
        exe: exe_path,
        args,
        environ,
        owner,
    } = proc.facts(pid)?;
    let exe_name = exe_path
        .as_deref()
        .and_then(Path::file_name)
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| comm.clone());

    let env = ProcessEnv::parse(&environ);
    let env_attrs = match env
        .resource_attributes
        .as_deref()
        .map(parse_resource_attributes)
    {
        Some(Ok(attrs)) => attrs,
        Some(Err(e)) => {
            log::warn!("pid {pid}: ignoring its OTEL_RESOURCE_ATTRIBUTES: {e}");
            Vec::new()
        }
        None => Vec::new(),
    };
    let service_name = env
        .service_name
        .clone()
        .or_else(|| {
            env_attrs
                .iter()
                .find(|(k, _)| k == "service.name")
                .map(|(_, v)| v.clone())
        })
        .filter(|s| !s.is_empty())
        .or_else(|| k8s.and_then(|k| k.service_name.clone()))
        .unwrap_or_else(|| {
            if exe_name.is_empty() {
                format!("unknown:{pid}")
            } else if let Some(name) = well_known_service(&exe_name) {
                name.to_string()
            } else {
                exe_name.clone()
            }
        });

    let mut attributes = vec![
        Attribute::str("service.name", service_name.clone()),
        Attribute::str("service.instance.id", format!("{host_name}:{pid}")),
        Attribute::int("process.pid", i64::from(pid)),
        Attribute::str("process.executable.name", exe_name),
    ];
    if let Some(path) = &exe_path {
        attributes.push(Attribute::str(
            "process.executable.path",
            path.to_string_lossy().into_owned(),
        ));
    }
    if !args.is_empty() {
        attributes.push(Attribute::str(
            "process.command_line",
            redact::command_line(&args),
        ));
    }
    if let Some(owner) = owner {
        attributes.push(Attribute::str("process.owner", owner));
    }
    attributes.extend([
        Attribute::str("host.name", host_name.to_owned()),
        Attribute::str("telemetry.sdk.name", "opentelemetry"),
        Attribute::str("telemetry.sdk.language", "rust"),
        Attribute::str("telemetry.sdk.version", sdk_version()),
        Attribute::str("telemetry.distro.name", DISTRO_NAME),
        Attribute::str("telemetry.distro.version", env!("CARGO_PKG_VERSION")),
    ]);
    // Container and pod (their annotations may refine what we detected, e.g. host.name).
    for attr in k8s.map(|k| k.attributes.as_slice()).unwrap_or_default() {
        if matches!(attr.key, "process.pid" | "service.name") {
            continue;
        }
        match attributes.iter_mut().find(|a| a.key == attr.key) {
            Some(existing) => existing.value = attr.value.clone(),
            None => attributes.push(attr.clone()),
        }
    }
    // The process's own OTEL_RESOURCE_ATTRIBUTES: they add to (and may refine) what we detected,
    // but cannot change which process this is nor the service name chosen above.
    for (key, value) in env_attrs {
        if matches!(key.as_str(), "process.pid" | "service.name") {
            continue;
        }
        let Some(key) = intern_key(&key) else {
            continue;
        };
        match attributes.iter_mut().find(|a| a.key == key) {
            Some(existing) => existing.value = AttrValue::Str(value),
            None => attributes.push(Attribute::str(key, value)),
        }
    }

    Ok(Resource {
        pid,
        service_name,
        attributes,
    })
}

/// The resource used when `/proc/PID` could not be read (the process is gone, or access denied).
pub fn minimal_resource(pid: u32, host_name: &str) -> Resource {
    let service_name = format!("unknown:{pid}");
    Resource {
        pid,
        service_name: service_name.clone(),
        attributes: vec![
            Attribute::str("service.name", service_name),
            Attribute::int("process.pid", i64::from(pid)),
            Attribute::str("host.name", host_name.to_owned()),
            Attribute::str("telemetry.sdk.name", "opentelemetry"),
            Attribute::str("telemetry.sdk.language", "rust"),
            Attribute::str("telemetry.sdk.version", sdk_version()),
            Attribute::str("telemetry.distro.name", DISTRO_NAME),
            Attribute::str("telemetry.distro.version", env!("CARGO_PKG_VERSION")),
        ],
    }
}

/// Resources of the traced processes, loaded once per process (and again after `exec`, and
/// once more when the pod list tells what was still unknown of its pod).
pub struct Resources {
    host_name: String,
    by_pid: HashMap<u32, Arc<Resource>>,
    k8s: Option<Arc<Kubernetes>>,
    /// The pod list's generation when `waiting` was last checked.
    k8s_generation: u64,
    /// Processes in a container whose pod (or container) was not in the pod list when their
    /// resource was built: where they run, and how much was known (`Resolution::rank`).
    waiting: HashMap<u32, (k8s::ContainerRef, u8)>,
    proc: ProcFs,
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
        if let Some(r) = self.by_pid.get(&pid) {
            return Arc::clone(r);
        }
        let r = Arc::new(
            self.load(pid)
                .unwrap_or_else(|| minimal_resource(pid, self.host())),
        );
        self.by_pid.insert(pid, Arc::clone(&r));
        r
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
        match resource_from_proc(&self.proc, pid, &host, Some(&described)) {
            Ok(r) => Some(r),
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
                self.by_pid.insert(pid, Arc::new(r));
            }
        }
    }
}

/// The OpenTelemetry variables of a process's environment.
#[derive(Debug, Default, PartialEq)]
struct ProcessEnv {
    service_name: Option<String>,
    resource_attributes: Option<String>,
}

impl ProcessEnv {
    fn parse(environ: &[u8]) -> Self {
        let mut env = Self::default();
        for entry in environ.split(|&b| b == 0) {
            let Some(eq) = entry.iter().position(|&b| b == b'=') else {
                continue;
            };
            let (name, value) = (&entry[..eq], &entry[eq + 1..]);
            let value = || String::from_utf8_lossy(value).trim().to_owned();
            match name {
                b"OTEL_SERVICE_NAME" => env.service_name = Some(value()).filter(|v| !v.is_empty()),
                b"OTEL_RESOURCE_ATTRIBUTES" => env.resource_attributes = Some(value()),
                _ => {}
            }
        }
        env
    }
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ResourceAttributesError {
    #[error("list member {0:?} is not key=value (expected OTEL_RESOURCE_ATTRIBUTES=k1=v1,k2=v2)")]
    NotKeyValue(String),
    #[error("a key or value is longer than {} bytes", MAX_ENV_ATTR_LEN)]
    TooLong,
    #[error("invalid percent-encoding in {0:?} (a literal % must be written %25)")]
    BadPercentEncoding(String),
}

/// Parses `OTEL_RESOURCE_ATTRIBUTES` (`k1=v1,k2=v2`, values percent-encoded). As the
/// specification asks, a malformed value is rejected as a whole.
fn parse_resource_attributes(
    value: &str,
) -> Result<Vec<(String, String)>, ResourceAttributesError> {
    let mut out = Vec::new();
    for member in value.split(',') {
        let member = member.trim();
        if member.is_empty() {
            continue;
        }
        let (key, val) = member
            .split_once('=')
            .map(|(k, v)| (k.trim(), v.trim()))
            .filter(|(k, _)| !k.is_empty())
            .ok_or_else(|| ResourceAttributesError::NotKeyValue(member.to_owned()))?;
        if key.len() > MAX_ENV_ATTR_LEN || val.len() > MAX_ENV_ATTR_LEN {
            return Err(ResourceAttributesError::TooLong);
        }
        let decode = |s: &str| {
            percent_decode(s)
                .ok_or_else(|| ResourceAttributesError::BadPercentEncoding(s.to_owned()))
        };
        out.push((decode(key)?, decode(val)?));
    }
    Ok(out)
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod well_known_tests {
    use super::well_known_service;

    #[test]
    fn postgres_backends_are_the_postgresql_service() {
        assert_eq!(well_known_service("postgres"), Some("postgresql"));
        assert_eq!(well_known_service("python3.11"), None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_otel_resource_attributes() {
        assert_eq!(
            parse_resource_attributes(
                "service.name=checkout, deployment.environment=prod ,team=a%2Cb%3Dc%20d"
            ),
            Ok(vec![
                ("service.name".into(), "checkout".into()),
                ("deployment.environment".into(), "prod".into()),
                ("team".into(), "a,b=c d".into()),
            ])
        );
        assert_eq!(parse_resource_attributes(""), Ok(vec![]));
        assert_eq!(
            parse_resource_attributes("a=1,,b=2,").map(|v| v.len()),
            Ok(2)
        );
        assert_eq!(
            parse_resource_attributes("k=%C3%A9"),
            Ok(vec![("k".into(), "é".into())])
        );
        assert!(matches!(
            parse_resource_attributes("a=1,novalue"),
            Err(ResourceAttributesError::NotKeyValue(_))
        ));
        assert!(matches!(
            parse_resource_attributes("=x"),
            Err(ResourceAttributesError::NotKeyValue(_))
        ));
        assert!(matches!(
            parse_resource_attributes("a=%zz"),
            Err(ResourceAttributesError::BadPercentEncoding(_))
        ));
        assert!(matches!(
            parse_resource_attributes("a=50%"),
            Err(ResourceAttributesError::BadPercentEncoding(_))
        ));
    }

    #[test]
    fn parses_process_environ() {
        let environ =
            b"PATH=/bin\0OTEL_SERVICE_NAME=checkout\0OTEL_RESOURCE_ATTRIBUTES=a=b\0EMPTY=\0\0";
        assert_eq!(
            ProcessEnv::parse(environ),
            ProcessEnv {
                service_name: Some("checkout".into()),
                resource_attributes: Some("a=b".into())
            }
        );
        assert_eq!(
            ProcessEnv::parse(b"OTEL_SERVICE_NAME=\0"),
            ProcessEnv::default()
        );
    }

    fn attr<'a>(r: &'a Resource, key: &str) -> Option<&'a AttrValue> {
        r.attributes.iter().find(|a| a.key == key).map(|a| &a.value)
    }

    #[test]
    fn loads_own_process() {
        let pid = std::process::id();
        let r = match resource_for_pid(pid, "testhost") {
            Ok(r) => r,
            Err(e) => panic!("reading our own /proc/{pid} failed: {e}"),
        };
        let exe = std::env::current_exe().expect("current_exe");
        let exe_name = exe.file_name().map(|n| n.to_string_lossy().into_owned());
        assert_eq!(r.pid, pid);
        assert_eq!(
            attr(&r, "process.pid"),
            Some(&AttrValue::Int(i64::from(pid)))
        );
        assert_eq!(
            attr(&r, "host.name"),
            Some(&AttrValue::Str("testhost".into()))
        );
        assert_eq!(
            attr(&r, "service.instance.id"),
            Some(&AttrValue::Str(format!("testhost:{pid}")))
        );
        assert_eq!(
            attr(&r, "process.executable.name"),
            exe_name.clone().map(AttrValue::Str).as_ref()
        );
        assert_eq!(
            attr(&r, "process.executable.path"),
            Some(&AttrValue::Str(exe.to_string_lossy().into_owned()))
        );
        assert_eq!(
            attr(&r, "telemetry.sdk.language"),
            Some(&AttrValue::Str("rust".into()))
        );
        assert_eq!(
            attr(&r, "telemetry.distro.name"),
            Some(&AttrValue::Str(DISTRO_NAME.into()))
        );
        match attr(&r, "telemetry.sdk.version") {
            Some(AttrValue::Str(v)) => assert!(v.starts_with("0."), "sdk version {v}"),
            other => panic!("telemetry.sdk.version: {other:?}"),
        }
        let Some(AttrValue::Str(cmd)) = attr(&r, "process.command_line") else {
            panic!("no command line")
        };
        assert!(
            cmd.contains(exe_name.as_deref().unwrap_or_default()),
            "{cmd}"
        );
        assert!(attr(&r, "process.owner").is_some());
        // service.name: OTEL_SERVICE_NAME from our environment if the test runner has one.
        match std::env::var("OTEL_SERVICE_NAME")
            .ok()
            .filter(|s| !s.is_empty())
        {
            Some(name) => assert_eq!(r.service_name, name),
            None if std::env::var_os("OTEL_RESOURCE_ATTRIBUTES").is_none() => {
                assert_eq!(Some(r.service_name.clone()), exe_name)
            }
            None => {}
        }
        assert_eq!(
            attr(&r, "service.name"),
            Some(&AttrValue::Str(r.service_name.clone()))
        );
    }

    #[test]
    fn vanished_process_is_a_typed_error() {
        // pid_max is at most 2^22: this pid cannot exist.
        let pid = 4_194_304 + 17;
        assert!(
            matches!(resource_for_pid(pid, "h"), Err(ProcessError::Gone { pid: p }) if p == pid)
        );

        let mut cache = Resources::new("h");
        let r = cache.get_or_load(pid);
        assert_eq!(r.service_name, format!("unknown:{pid}"));
        assert_eq!(
            attr(&r, "process.pid"),
            Some(&AttrValue::Int(i64::from(pid)))
        );
        assert_eq!(attr(&r, "host.name"), Some(&AttrValue::Str("h".into())));
        assert!(Arc::ptr_eq(&r, &cache.get_or_load(pid)));
        cache.forget(pid);
        assert!(cache.by_pid.is_empty());
    }

    #[test]
    fn fake_proc_tree_with_env_and_resource_attributes() {
        let root = std::env::temp_dir().join(format!("agent-proc-test-{}", std::process::id()));
        let dir = root.join("4242");
        std::fs::create_dir_all(&dir).expect("create fake /proc");
        std::fs::write(dir.join("status"), "Name:\tpython3\nUid:\t0\t0\t0\t0\n").expect("write");
        std::fs::write(dir.join("comm"), "python3\n").expect("write");
        std::fs::write(dir.join("cmdline"), b"python3\0app.py\0--password\0pw\0").expect("write");
        std::fs::write(
            dir.join("environ"),
            b"OTEL_RESOURCE_ATTRIBUTES=service.name=from-attrs,process.pid=1,deployment.environment=prod%2Fa,host.name=other\0",
        )
        .expect("write");
        let r = resource_from_proc(&ProcFs::at(&root), 4242, "h", None).expect("fake process");
        let _ = std::fs::remove_dir_all(&root);

        assert_eq!(r.service_name, "from-attrs");
        assert_eq!(attr(&r, "process.pid"), Some(&AttrValue::Int(4242)));
        assert_eq!(
            attr(&r, "process.executable.name"),
            Some(&AttrValue::Str("python3".into()))
        );
        assert_eq!(attr(&r, "process.executable.path"), None);
        assert_eq!(
            attr(&r, "deployment.environment"),
            Some(&AttrValue::Str("prod/a".into()))
        );
        assert_eq!(attr(&r, "host.name"), Some(&AttrValue::Str("other".into())));
        assert_eq!(
            attr(&r, "process.command_line"),
            Some(&AttrValue::Str("python3 app.py --password REDACTED".into()))
        );
        assert_eq!(
            r.attributes
                .iter()
                .filter(|a| a.key == "process.pid")
                .count(),
            1
        );
        assert_eq!(
            r.attributes
                .iter()
                .filter(|a| a.key == "service.name")
                .count(),
            1
        );
    }

    mod kubernetes {
        use std::time::Instant;

        use super::*;
        use crate::k8s::{
            PodFilter,
            pods::{PodMeta, Workload},
        };

        const UID: &str = "7d1c5ab3-6b0f-4f2e-9b3e-2c4b8a0f6e71";
        const ID: &str = "8f3b6c2d1e0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c";

        /// A fake /proc with pid 4343, a python3 in a containerd container of pod `UID`.
        fn fake_proc(tag: &str, environ: &[u8]) -> std::path::PathBuf {
            let root = std::env::temp_dir().join(format!("agent-k8s-{tag}-{}", std::process::id()));
            let dir = root.join("4343");
            std::fs::create_dir_all(&dir).expect("create fake /proc");
            std::fs::write(dir.join("status"), "Name:\tpython3\nUid:\t0\t0\t0\t0\n")
                .expect("write");
            std::fs::write(dir.join("comm"), "python3\n").expect("write");
            std::fs::write(dir.join("cmdline"), b"python3\0app.py\0").expect("write");
            std::fs::write(dir.join("environ"), environ).expect("write");
            std::fs::write(
                dir.join("cgroup"),
                format!(
                    "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{ID}.scope\n",
                    UID.replace('-', "_")
                ),
            )
            .expect("write");
            root
        }

        fn pod(containers: Vec<(String, String)>) -> PodMeta {
            PodMeta {
                uid: UID.into(),
                name: "checkout-7c5ddbdf54-x2x9q".into(),
                namespace: "shop".into(),
                controlled: true,
                workload: Workload {
                    replicaset: Some("checkout-7c5ddbdf54".into()),
                    deployment: Some("checkout".into()),
                    ..Default::default()
                },
                annotations: [(
                    "resource.opentelemetry.io/host.name".to_string(),
                    "node-1.example".to_string(),
                )]
                .into(),
                containers,
                ..Default::default()
            }
        }

        fn resources(root: &Path) -> (Resources, Arc<Kubernetes>) {
            let k8s = Arc::new(Kubernetes::new(Some("node-1".into()), PodFilter::default()));
            let mut r = Resources::new("agent-pod").with_kubernetes(Some(k8s.clone()));
            r.proc = ProcFs::at(root);
            (r, k8s)
        }

        fn count(r: &Resource, key: &str) -> usize {
            r.attributes.iter().filter(|a| a.key == key).count()
        }

        #[test]
        fn a_resource_is_rebuilt_once_its_pod_is_known() {
            let root = fake_proc("refresh", b"PATH=/bin\0");
            let (mut cache, k8s) = resources(&root);
            let before = cache.get_or_load(4343);
            // Pod unknown: the container id and the node, the executable's name.
            assert_eq!(before.service_name, "python3");
            assert_eq!(
                attr(&before, "container.id"),
                Some(&AttrValue::Str(ID.into()))
            );
            assert_eq!(
                attr(&before, "k8s.node.name"),
                Some(&AttrValue::Str("node-1".into()))
            );
            assert_eq!(
                attr(&before, "host.name"),
                Some(&AttrValue::Str("node-1".into()))
            );
            assert_eq!(count(&before, "host.name"), 1);
            assert_eq!(
                attr(&before, "service.instance.id"),
                Some(&AttrValue::Str("node-1:4343".into()))
            );
            assert_eq!(attr(&before, "k8s.pod.name"), None);
            assert!(Arc::ptr_eq(&before, &cache.get_or_load(4343)), "cached");

            // The pod arrives, its container not reported yet.
            k8s.store.replace_all(vec![pod(vec![])], Instant::now());
            let with_pod = cache.get_or_load(4343);
            assert!(!Arc::ptr_eq(&before, &with_pod), "refreshed");
            assert_eq!(with_pod.service_name, "checkout");
            assert_eq!(
                attr(&with_pod, "k8s.deployment.name"),
                Some(&AttrValue::Str("checkout".into()))
            );
            assert_eq!(attr(&with_pod, "k8s.container.name"), None);
            // The pod's annotation replaced the detected host.name, once.
            assert_eq!(
                attr(&with_pod, "host.name"),
                Some(&AttrValue::Str("node-1.example".into()))
            );
            assert_eq!(count(&with_pod, "host.name"), 1);
            assert_eq!(count(&with_pod, "service.name"), 1);

            // Then the container: refreshed once more, then stable.
            k8s.store
                .upsert(pod(vec![(ID.into(), "app".into())]), Instant::now());
            let full = cache.get_or_load(4343);
            assert!(!Arc::ptr_eq(&with_pod, &full));
            assert_eq!(
                attr(&full, "k8s.container.name"),
                Some(&AttrValue::Str("app".into()))
            );
            assert!(cache.waiting.is_empty());
            k8s.store.upsert(
                pod(vec![(ID.into(), "app".into()), ("x".into(), "y".into())]),
                Instant::now(),
            );
            assert!(
                Arc::ptr_eq(&full, &cache.get_or_load(4343)),
                "nothing new for this process"
            );
            let _ = std::fs::remove_dir_all(&root);
        }

        #[test]
        fn the_process_own_service_name_wins() {
            let root = fake_proc("own", b"OTEL_SERVICE_NAME=payments\0");
            let (mut cache, k8s) = resources(&root);
            k8s.store
                .replace_all(vec![pod(vec![(ID.into(), "app".into())])], Instant::now());
            let r = cache.get_or_load(4343);
            assert_eq!(r.service_name, "payments");
            assert_eq!(
                attr(&r, "service.name"),
                Some(&AttrValue::Str("payments".into()))
            );
            assert_eq!(attr(&r, "k8s.pod.uid"), Some(&AttrValue::Str(UID.into())));
            assert!(cache.waiting.is_empty());
            cache.forget(4343);
            assert!(cache.by_pid.is_empty());
            let _ = std::fs::remove_dir_all(&root);
        }
    }
}
