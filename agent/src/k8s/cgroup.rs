//! Which container and which Kubernetes pod a process runs in, from its `/proc/PID/cgroup`
//! (read by `proc`).
//!
//! Container runtimes name a container's cgroup after its id, and the kubelet names a pod's
//! cgroup after the pod's uid, so the path alone tells both without asking anyone:
//!
//! | runtime, cgroup driver | path (last components) |
//! |---|---|
//! | containerd, systemd | `kubepods-burstable-pod<uid_with_underscores>.slice/cri-containerd-<id>.scope` |
//! | CRI-O, systemd | `kubepods-besteffort-pod<uid_>.slice/crio-<id>.scope` (`crio-conmon-<id>` is its monitor) |
//! | Docker / cri-dockerd, systemd | `…pod<uid_>.slice/docker-<id>.scope`, or `system.slice/docker-<id>.scope` |
//! | any runtime, cgroupfs | `/kubepods/burstable/pod<uid-with-dashes>/<id>` (`crio-<id>` for CRI-O) |
//! | Docker, cgroupfs | `/docker/<id>` |
//! | Podman | `libpod-<id>.scope` (with a `container` child cgroup on cgroup v2) |
//!
//! cgroup v1 lists one line per hierarchy (`12:memory:/…`), v2 one line (`0::/…`); hybrid hosts
//! have both. Under a cgroup namespace (the agent in a container of its own) paths of other
//! containers are relative to ours and start with `/..`: only the components matter.

/// A container id as runtimes write it: 64 lowercase hexadecimal digits.
const ID_LEN: usize = 64;

/// Where a process runs, as far as its cgroup path tells.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct ContainerRef {
    /// The runtime's container id (64 hex digits, no `containerd://` scheme).
    pub container_id: Option<String>,
    /// The uid of the Kubernetes pod (with dashes, as the API writes it).
    pub pod_uid: Option<String>,
}

impl ContainerRef {
    /// Neither a container nor a pod: a process of the host.
    pub fn is_host(&self) -> bool {
        self.container_id.is_none() && self.pod_uid.is_none()
    }
}

/// Parses the content of `/proc/PID/cgroup`. The v2 line (`0::`) wins over v1 lines when it
/// names a container; otherwise the first v1 line that does.
pub fn parse(text: &str) -> ContainerRef {
    let mut best = ContainerRef::default();
    for line in text.lines() {
        // hierarchy-ID:controller-list:cgroup-path; the path may itself contain ':'.
        let mut fields = line.splitn(3, ':');
        let (Some(hierarchy), Some(_controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let found = parse_path(path);
        let better = match (&best.container_id, &found.container_id) {
            (None, Some(_)) => true,
            (Some(_), Some(_)) => hierarchy == "0",
            (_, None) => best.is_host() && found.pod_uid.is_some(),
        };
        if better {
            best = found;
        }
    }
    best
}

/// The container id and pod uid named by one cgroup path. When containers nest (a kind node is
/// a container too) the innermost, i.e. last, wins.
pub fn parse_path(path: &str) -> ContainerRef {
    let mut out = ContainerRef::default();
    for component in path.split('/') {
        if let Some(id) = container_id(component) {
            out.container_id = Some(id.to_owned());
        }
        if let Some(uid) = pod_uid(component) {
            out.pod_uid = Some(uid);
        }
    }
    out
}

/// `cri-containerd-<id>.scope`, `crio-<id>.scope`, `docker-<id>.scope`, `libpod-<id>.scope`,
/// `crio-<id>`, or a bare `<id>`. Not `crio-conmon-<id>.scope`: that is CRI-O's monitor
/// process, not the container.
fn container_id(component: &str) -> Option<&str> {
    let name = component.strip_suffix(".scope").unwrap_or(component);
    if name.len() < ID_LEN {
        return None;
    }
    let (prefix, id) = name.split_at(name.len() - ID_LEN);
    if !id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let runtime = match prefix.strip_suffix('-') {
        Some(runtime) => runtime,
        None if prefix.is_empty() => return Some(id),
        None => return None,
    };
    match runtime {
        "cri-containerd" | "crio" | "docker" | "libpod" | "cri-dockerd" | "containerd" => Some(id),
        _ => None,
    }
}

/// The pod uid of a kubelet pod cgroup: `pod<uid>` (cgroupfs) or
/// `[kubelet-]kubepods[-<qos>]-pod<uid_with_underscores>.slice` (systemd, which reserves `-`).
fn pod_uid(component: &str) -> Option<String> {
    let raw = if let Some(slice) = component.strip_suffix(".slice") {
        if !slice.starts_with("kubepods") && !slice.starts_with("kubelet-kubepods") {
            return None;
        }
        &slice[slice.rfind("-pod")? + "-pod".len()..]
    } else {
        component.strip_prefix("pod")?
    };
    let uid = raw.replace('_', "-");
    is_uid(&uid).then_some(uid)
}

/// A Kubernetes uid: a UUID, `8-4-4-4-12` hexadecimal digits.
fn is_uid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "8f3b6c2d1e0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c";
    const UID: &str = "7d1c5ab3-6b0f-4f2e-9b3e-2c4b8a0f6e71";
    const UID_: &str = "7d1c5ab3_6b0f_4f2e_9b3e_2c4b8a0f6e71";

    fn both(id: &str, uid: &str) -> ContainerRef {
        ContainerRef {
            container_id: Some(id.into()),
            pod_uid: Some(uid.into()),
        }
    }

    #[test]
    fn containerd_systemd_cgroup_v2() {
        let text = format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{ID}.scope\n"
        );
        assert_eq!(parse(&text), both(ID, UID));
    }

    #[test]
    fn guaranteed_pods_have_no_qos_level() {
        let systemd =
            format!("0::/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{ID}.scope\n");
        assert_eq!(parse(&systemd), both(ID, UID));
        let cgroupfs = format!("0::/kubepods/pod{UID}/{ID}\n");
        assert_eq!(parse(&cgroupfs), both(ID, UID));
    }

    #[test]
    fn containerd_cgroupfs_cgroup_v1_many_lines() {
        // k3s / older kubeadm: cgroupfs driver, one line per v1 hierarchy, v2 root unused.
        let p = format!("/kubepods/besteffort/pod{UID}/{ID}");
        let text = format!(
            "12:hugetlb:{p}\n11:cpuset:{p}\n10:memory:{p}\n9:devices:{p}\n8:pids:{p}\n\
             7:cpu,cpuacct:{p}\n6:net_cls,net_prio:{p}\n5:blkio:{p}\n4:freezer:{p}\n\
             3:perf_event:{p}\n2:rdma:/\n1:name=systemd:{p}\n0::/\n"
        );
        assert_eq!(parse(&text), both(ID, UID));
    }

    #[test]
    fn crio_systemd_and_its_monitor() {
        let text = format!(
            "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-{ID}.scope\n"
        );
        assert_eq!(parse(&text), both(ID, UID));
        // conmon runs in the pod's cgroup but is not the container.
        let conmon = format!(
            "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-conmon-{ID}.scope\n"
        );
        assert_eq!(
            parse(&conmon),
            ContainerRef {
                container_id: None,
                pod_uid: Some(UID.into())
            }
        );
        // OpenShift 4 on cgroup v1.
        let v1 = format!(
            "11:memory:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-{ID}.scope\n\
             1:name=systemd:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-{ID}.scope\n"
        );
        assert_eq!(parse(&v1), both(ID, UID));
        let cgroupfs = format!("0::/kubepods/burstable/pod{UID}/crio-{ID}\n");
        assert_eq!(parse(&cgroupfs), both(ID, UID));
    }

    #[test]
    fn docker_standalone_and_under_kubernetes() {
        let v1 = format!(
            "13:pids:/docker/{ID}\n12:memory:/docker/{ID}\n1:name=systemd:/docker/{ID}\n0::/\n"
        );
        assert_eq!(
            parse(&v1),
            ContainerRef {
                container_id: Some(ID.into()),
                pod_uid: None
            }
        );
        let v2 = format!("0::/system.slice/docker-{ID}.scope\n");
        assert_eq!(parse(&v2).container_id.as_deref(), Some(ID));
        let cri_dockerd = format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/docker-{ID}.scope\n"
        );
        assert_eq!(parse(&cri_dockerd), both(ID, UID));
    }

    #[test]
    fn kind_nested_podman_and_cgroup_namespaces() {
        // kind: the node is a Docker container, the kubelet's cgroup root is /kubelet.
        let node = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        let kind = format!(
            "0::/docker/{node}/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{ID}.scope\n"
        );
        assert_eq!(parse(&kind), both(ID, UID));
        let podman = format!(
            "0::/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope/container\n"
        );
        assert_eq!(parse(&podman).container_id.as_deref(), Some(ID));
        // Seen from inside the agent's own cgroup namespace.
        let relative = format!(
            "0::/../../kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{ID}.scope\n"
        );
        assert_eq!(parse(&relative), both(ID, UID));
    }

    #[test]
    fn host_processes_have_no_container() {
        for text in [
            "0::/system.slice/sshd.service\n",
            "0::/user.slice/user-1000.slice/session-2.scope\n",
            "0::/init.scope\n",
            "0::/\n",
            "12:memory:/user.slice\n1:name=systemd:/user.slice/user-0.slice/session-c1.scope\n0::/\n",
            "",
            "garbage without colons\n",
        ] {
            assert!(parse(text).is_host(), "{text:?}");
        }
        // The kubelet and containerd themselves run in system.slice: not a pod.
        assert!(parse("0::/system.slice/containerd.service\n").is_host());
    }

    #[test]
    fn near_misses_are_not_ids() {
        let upper = ID.to_uppercase();
        let short = &ID[..63];
        for component in [
            format!("cri-containerd-{upper}.scope"),
            format!("cri-containerd-{short}.scope"),
            format!("session-{ID}.scope"),
            format!("x{ID}"),
            format!("{ID}g"),
        ] {
            assert_eq!(container_id(&component), None, "{component}");
        }
        assert_eq!(pod_uid("pod1234"), None);
        assert_eq!(pod_uid(&format!("system-pod{UID_}.slice")), None);
        assert_eq!(pod_uid(&format!("pod{UID_}")).as_deref(), Some(UID));
        assert_eq!(
            pod_uid(&format!("kubepods-besteffort-pod{UID_}.slice")).as_deref(),
            Some(UID)
        );
    }

    #[test]
    fn the_v2_line_wins_on_hybrid_hosts() {
        let other = "1111111111111111111111111111111111111111111111111111111111111111";
        let text = format!(
            "1:name=systemd:/docker/{other}\n0::/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{ID}.scope\n"
        );
        assert_eq!(parse(&text), both(ID, UID));
    }
}
