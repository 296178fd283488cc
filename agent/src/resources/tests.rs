//! Resources built from real and fake `/proc` trees, and the cache's Kubernetes refresh.

use std::path::Path;

use super::*;
use crate::{
    k8s::K8sResource,
    proc::{ProcFs, ProcessError},
    spans::model::{AttrValue, Resource},
};

fn resource_from_proc(
    proc: &ProcFs,
    pid: u32,
    host_name: &str,
    k8s: Option<&K8sResource>,
) -> Result<Resource, ProcessError> {
    Ok(build::resource(pid, proc.facts(pid)?, host_name, k8s))
}

fn resource_for_pid(pid: u32, host_name: &str) -> Result<Resource, ProcessError> {
    resource_from_proc(&ProcFs::host(), pid, host_name, None)
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
        Some(&AttrValue::Str(format!("testhost:{pid}").into()))
    );
    assert_eq!(
        attr(&r, "process.executable.name"),
        exe_name.clone().map(|n| AttrValue::Str(n.into())).as_ref()
    );
    assert_eq!(
        attr(&r, "process.executable.path"),
        Some(&AttrValue::Str(exe.to_string_lossy().into_owned().into()))
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
        Some(&AttrValue::Str(r.service_name.clone().into()))
    );
}

#[test]
fn vanished_process_is_a_typed_error() {
    // pid_max is at most 2^22: this pid cannot exist.
    let pid = 4_194_304 + 17;
    assert!(matches!(resource_for_pid(pid, "h"), Err(ProcessError::Gone { pid: p }) if p == pid));

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
        std::fs::write(dir.join("status"), "Name:\tpython3\nUid:\t0\t0\t0\t0\n").expect("write");
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

#[test]
fn a_forked_child_gone_before_it_was_read_is_its_parents_service_with_its_own_pid() {
    let root = std::env::temp_dir().join(format!("agent-proc-fork-{}", std::process::id()));
    let dir = root.join("500");
    std::fs::create_dir_all(&dir).expect("create fake /proc");
    std::fs::write(dir.join("status"), "Name:\tpostgres\nUid:\t0\t0\t0\t0\n").expect("write");
    std::fs::write(dir.join("comm"), "postgres\n").expect("write");
    std::fs::write(dir.join("cmdline"), b"postgres\0-D\0/data\0").expect("write");
    std::fs::write(dir.join("environ"), b"").expect("write");
    let mut cache = Resources::new("h");
    cache.proc = ProcFs::at(&root);

    // 501 is not in the tree (it served its session and exited); 777's parent is gone too,
    // and so is 779's, whose minimal resource was cached before.
    cache.load_forked(501, 500);
    cache.load_forked(777, 778);
    cache.get_or_load(780);
    cache.load_forked(779, 780);
    let _ = std::fs::remove_dir_all(&root);

    let child = cache.get_or_load(501);
    let parent = cache.get_or_load(500);
    assert_eq!(parent.service_name, "postgresql");
    assert_eq!(child.service_name, parent.service_name);
    assert_eq!(child.pid, 501);
    assert_eq!(attr(&child, "process.pid"), Some(&AttrValue::Int(501)));
    assert_eq!(
        attr(&child, "service.instance.id"),
        Some(&AttrValue::Str("h:501".into()))
    );
    assert_eq!(
        attr(&child, "process.command_line"),
        attr(&parent, "process.command_line")
    );
    assert_eq!(cache.get_or_load(777).service_name, "unknown:777");
    assert_eq!(cache.get_or_load(779).service_name, "unknown:779");
}
