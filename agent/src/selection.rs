//! Which processes are traced: by pid, command name, executable path or TCP port, or all.
//! Kubernetes pod filters narrow any of these (or, alone, select every process of the matching
//! pods). The kernel filters on the `SELECTED` map this module keeps up to date.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
};

use aya::maps::{HashMap as BpfHashMap, MapData};

use crate::k8s::{self, Kubernetes, PodFilter};

#[derive(Clone, Debug, Default)]
pub struct Selection {
    pub pids: Vec<u32>,
    /// Globs (`*`, `?`) matched against the 15-character kernel command name.
    pub comms: Vec<String>,
    /// Globs matched against the executable's full path and its file name.
    pub exes: Vec<String>,
    /// Processes listening on, or connected to, one of these TCP ports.
    pub ports: Vec<u16>,
    /// Only processes of the pods these match (namespace, labels, annotations).
    pub pods: PodFilter,
}

impl Selection {
    pub fn traces_all(&self) -> bool {
        !self.by_process() && self.pods.is_empty()
    }

    /// Whether processes are chosen by pid, name or port (else, by pod only).
    fn by_process(&self) -> bool {
        !(self.pids.is_empty()
            && self.comms.is_empty()
            && self.exes.is_empty()
            && self.ports.is_empty())
    }

    fn matches_names(&self, comm: &str, exe: Option<&str>) -> bool {
        self.comms.iter().any(|p| glob_match(p, comm))
            || exe.is_some_and(|exe| {
                let name = Path::new(exe)
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or(exe);
                self.exes
                    .iter()
                    .any(|p| glob_match(p, exe) || glob_match(p, name))
            })
    }
}

/// `*` matches any run of characters, `?` exactly one; everything else literally.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// A command name as the kernel stores it: at most 15 bytes, NUL-padded to 16.
fn comm_key(name: &str) -> [u8; 16] {
    let mut key = [0u8; 16];
    let bytes = name.as_bytes();
    let n = bytes.len().min(15);
    key[..n].copy_from_slice(&bytes[..n]);
    key
}

fn read_comm(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim_end().to_string())
}

fn read_exe(pid: u32) -> Option<String> {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

fn all_pids() -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// Socket inodes whose local or remote TCP port is one of `ports` (/proc/net/tcp{,6}).
fn socket_inodes_on_ports(ports: &[u16]) -> Vec<u64> {
    let mut inodes = Vec::new();
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(remote), Some(inode)) = (cols.get(1), cols.get(2), cols.get(9))
            else {
                continue;
            };
            let port = |addr: &str| {
                addr.rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
            };
            let hit = [port(local), port(remote)]
                .iter()
                .flatten()
                .any(|p| ports.contains(p));
            if hit
                && let Ok(inode) = inode.parse::<u64>()
                && inode != 0
            {
                inodes.push(inode);
            }
        }
    }
    inodes
}

fn process_has_socket(pid: u32, inodes: &[u64]) -> bool {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    dir.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .any(|link| {
            link.to_str()
                .and_then(|s| {
                    s.strip_prefix("socket:[")?
                        .strip_suffix(']')?
                        .parse::<u64>()
                        .ok()
                })
                .is_some_and(|inode| inodes.contains(&inode))
        })
}

/// Whether a process's pod passes the pod filters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PodVerdict {
    Yes,
    No,
    /// In a container whose pod is not in the pod list yet: ask again when it changes.
    NotYet,
}

pub struct Selector {
    selection: Selection,
    map: Option<BpfHashMap<MapData, u32, u32>>,
    selected: HashMap<u32, String>,
    own_pid: u32,
    pub map_errors: u64,
    k8s: Option<Arc<Kubernetes>>,
    /// Processes that match but whose pod is not known yet (pid → command name).
    pending: HashMap<u32, String>,
    /// The pod list's generation when `pending` was last checked.
    k8s_generation: u64,
    /// Where `PID/cgroup` files are read (tests use a fake tree).
    proc_root: PathBuf,
}

impl Selector {
    /// `map` is None when tracing everything (the kernel then ignores the map).
    pub fn new(selection: Selection, map: Option<BpfHashMap<MapData, u32, u32>>) -> Self {
        Self {
            selection,
            map,
            selected: HashMap::new(),
            own_pid: std::process::id(),
            map_errors: 0,
            k8s: None,
            pending: HashMap::new(),
            k8s_generation: 0,
            proc_root: PathBuf::from("/proc"),
        }
    }

    /// Pod filters are checked against this node's pods.
    pub fn with_kubernetes(mut self, k8s: Option<Arc<Kubernetes>>) -> Self {
        self.k8s = k8s;
        self
    }

    fn pod_verdict(&self, pid: u32) -> PodVerdict {
        if self.selection.pods.is_empty() {
            return PodVerdict::Yes;
        }
        let Some(k8s) = &self.k8s else {
            return PodVerdict::No;
        };
        let Some(place) = k8s::cgroup::read(&self.proc_root, pid).filter(|p| !p.is_host()) else {
            return PodVerdict::No;
        };
        match k8s.resolve(&place).pod() {
            Some(pod) if self.selection.pods.matches(pod) => PodVerdict::Yes,
            Some(_) => PodVerdict::No,
            None => PodVerdict::NotYet,
        }
    }

    /// Selects the waiting processes whose pod became known and matches; call it often: it
    /// does nothing until the pod list changed.
    pub fn poll_kubernetes(&mut self) -> Vec<(u32, String)> {
        let Some(generation) = self.k8s.as_ref().map(|k| k.store.generation()) else {
            return Vec::new();
        };
        if generation == self.k8s_generation || self.pending.is_empty() {
            self.k8s_generation = generation;
            return Vec::new();
        }
        self.k8s_generation = generation;
        let mut new = Vec::new();
        for (pid, comm) in std::mem::take(&mut self.pending) {
            match self.pod_verdict(pid) {
                PodVerdict::Yes => {
                    if self.select(pid, comm.clone()) {
                        new.push((pid, comm));
                    }
                }
                PodVerdict::NotYet => {
                    self.pending.insert(pid, comm);
                }
                PodVerdict::No => {}
            }
        }
        new
    }

    pub fn traces_all(&self) -> bool {
        self.selection.traces_all()
    }

    /// Hands the kernel the `--comm` names without glob characters, so it selects matching
    /// programs at exec itself (no window before userspace reacts). Returns how many. Not with
    /// pod filters: the kernel cannot tell a process's pod.
    pub fn install_exact_comms(
        &self,
        comms: &mut BpfHashMap<MapData, [u8; 16], u32>,
    ) -> Result<usize, aya::maps::MapError> {
        let mut n = 0;
        if !self.selection.pods.is_empty() {
            return Ok(n);
        }
        for name in self
            .selection
            .comms
            .iter()
            .filter(|c| !c.contains(['*', '?']))
        {
            comms.insert(&comm_key(name), &1, 0)?;
            n += 1;
        }
        Ok(n)
    }

    pub fn selected(&self) -> &HashMap<u32, String> {
        &self.selected
    }

    fn select(&mut self, pid: u32, name: String) -> bool {
        if pid == self.own_pid || self.selected.contains_key(&pid) {
            return false;
        }
        if let Some(map) = self.map.as_mut()
            && map.insert(&pid, &1, 0).is_err()
        {
            self.map_errors += 1;
            return false;
        }
        // A process that exited between being found and being selected sent no exit event
        // (it was not selected yet): take it back, or a later process reusing the pid would
        // be traced.
        if !Path::new(&format!("/proc/{pid}")).exists() {
            if let Some(map) = self.map.as_mut() {
                let _ = map.remove(&pid);
            }
            return false;
        }
        self.selected.insert(pid, name);
        true
    }

    /// Walks /proc and selects every matching process not selected yet; returns the new ones.
    pub fn scan(&mut self) -> Vec<(u32, String)> {
        if self.traces_all() {
            return Vec::new();
        }
        let inodes = if self.selection.ports.is_empty() {
            Vec::new()
        } else {
            socket_inodes_on_ports(&self.selection.ports)
        };
        let by_process = self.selection.by_process();
        let mut new = Vec::new();
        // Rebuilt from this walk: processes that exited or stopped matching drop out.
        self.pending.clear();
        for pid in all_pids() {
            if self.selected.contains_key(&pid) || pid == self.own_pid {
                continue;
            }
            let Some(comm) = read_comm(pid) else {
                continue;
            };
            let by_pid = self.selection.pids.contains(&pid);
            let by_name = !by_pid
                && self
                    .selection
                    .matches_names(&comm, read_exe(pid).as_deref());
            let by_port =
                !by_pid && !by_name && !inodes.is_empty() && process_has_socket(pid, &inodes);
            if by_process && !(by_pid || by_name || by_port) {
                continue;
            }
            match self.pod_verdict(pid) {
                PodVerdict::Yes => {
                    if self.select(pid, comm.clone()) {
                        new.push((pid, comm));
                    }
                }
                PodVerdict::NotYet => {
                    self.pending.insert(pid, comm);
                }
                PodVerdict::No => {}
            }
        }
        new
    }

    /// A process exec'd: select it if it now matches by name. Returns whether it is traced.
    pub fn on_exec(&mut self, pid: u32, comm: &str) -> bool {
        if self.traces_all() {
            return pid != self.own_pid;
        }
        if self.selected.contains_key(&pid) {
            return true;
        }
        // By pod alone, every new program in a matching pod is traced.
        let by_name = !self.selection.by_process()
            || self.selection.matches_names(comm, read_exe(pid).as_deref());
        if !by_name {
            return false;
        }
        match self.pod_verdict(pid) {
            PodVerdict::Yes => self.select(pid, comm.to_string()),
            PodVerdict::NotYet => {
                self.pending.insert(pid, comm.to_string());
                false
            }
            PodVerdict::No => false,
        }
    }

    /// The kernel already selected this process (a fork of a selected one): keep track of it
    /// so its map entry is removed when it exits. Returns whether it was new to us.
    pub fn adopt(&mut self, pid: u32, name: String) -> bool {
        if self.traces_all() || self.selected.contains_key(&pid) {
            return false;
        }
        self.selected.insert(pid, name);
        true
    }

    pub fn on_exit(&mut self, pid: u32) {
        self.pending.remove(&pid);
        if self.selected.remove(&pid).is_some()
            && let Some(map) = self.map.as_mut()
        {
            let _ = map.remove(&pid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("nginx", "nginx"));
        assert!(glob_match("py*", "python3.11"));
        assert!(glob_match("*thon*", "python3"));
        assert!(glob_match("n?de", "node"));
        assert!(!glob_match("node", "nodejs"));
        assert!(glob_match("*", ""));
        assert!(!glob_match("a*b", "acd"));
        assert!(glob_match("/usr/sbin/*", "/usr/sbin/nginx"));
    }

    #[test]
    fn comm_keys_are_kernel_shaped() {
        assert_eq!(&comm_key("psql")[..5], b"psql\0");
        let long = comm_key("a-very-long-program-name");
        assert_eq!(&long[..15], b"a-very-long-pro");
        assert_eq!(long[15], 0);
    }

    #[test]
    fn selection_by_names() {
        let s = Selection {
            exes: vec!["nginx".into()],
            comms: vec!["py*".into()],
            ..Default::default()
        };
        assert!(s.matches_names("python3", None));
        assert!(s.matches_names("whatever", Some("/usr/sbin/nginx")));
        assert!(!s.matches_names("node", Some("/usr/bin/node")));
        assert!(!s.traces_all());
        assert!(Selection::default().traces_all());
    }

    #[test]
    fn scan_finds_this_test_process_by_pid() {
        let me = std::process::id();
        let mut sel = Selector::new(
            Selection {
                pids: vec![me],
                ..Default::default()
            },
            None,
        );
        // The selector never selects the agent itself; pretend we are someone else.
        sel.own_pid = 0;
        let found = sel.scan();
        assert_eq!(found.iter().map(|(p, _)| *p).collect::<Vec<_>>(), vec![me]);
        assert!(
            sel.scan().is_empty(),
            "already selected processes are not reported twice"
        );
    }

    #[test]
    fn scan_finds_a_listener_by_port() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let mut sel = Selector::new(
            Selection {
                ports: vec![port],
                ..Default::default()
            },
            None,
        );
        sel.own_pid = 0;
        let found = sel.scan();
        assert!(
            found.iter().any(|(p, _)| *p == std::process::id()),
            "listener on {port} not found: {found:?}"
        );
    }

    mod pods {
        use std::time::Instant;

        use super::*;
        use crate::k8s::pods::PodMeta;

        const UID: &str = "7d1c5ab3-6b0f-4f2e-9b3e-2c4b8a0f6e71";
        const ID: &str = "8f3b6c2d1e0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c";

        /// A selector that sees this test process in a containerd container of pod `UID`.
        fn selector(selection: Selection, tag: &str) -> (Selector, Arc<Kubernetes>, PathBuf) {
            let me = std::process::id();
            let root = std::env::temp_dir().join(format!("agent-sel-{tag}-{me}"));
            let dir = root.join(me.to_string());
            std::fs::create_dir_all(&dir).expect("fake /proc");
            std::fs::write(
                dir.join("cgroup"),
                format!(
                    "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-{ID}.scope\n",
                    UID.replace('-', "_")
                ),
            )
            .expect("write cgroup");
            let k8s = Arc::new(Kubernetes::new(
                Some("node-1".into()),
                selection.pods.clone(),
            ));
            let mut sel = Selector::new(selection, None).with_kubernetes(Some(k8s.clone()));
            sel.own_pid = 0;
            sel.proc_root = root.clone();
            (sel, k8s, root)
        }

        fn pod(namespace: &str) -> PodMeta {
            PodMeta {
                uid: UID.into(),
                name: "web-1".into(),
                namespace: namespace.into(),
                containers: vec![(ID.into(), "web".into())],
                ..Default::default()
            }
        }

        fn shop() -> PodFilter {
            PodFilter {
                namespaces: vec!["shop".into()],
                ..Default::default()
            }
        }

        #[test]
        fn waits_for_the_pod_then_selects() {
            let me = std::process::id();
            let (mut sel, k8s, root) = selector(
                Selection {
                    pids: vec![me],
                    pods: shop(),
                    ..Default::default()
                },
                "wait",
            );
            assert!(!sel.traces_all());
            assert!(sel.scan().is_empty(), "pod unknown: not selected yet");
            assert!(sel.pending.contains_key(&me));
            assert!(sel.poll_kubernetes().is_empty(), "nothing changed");
            k8s.store.replace_all(vec![pod("shop")], Instant::now());
            let found = sel.poll_kubernetes();
            let _ = std::fs::remove_dir_all(&root);
            assert_eq!(found.iter().map(|(p, _)| *p).collect::<Vec<_>>(), vec![me]);
            assert!(sel.selected().contains_key(&me));
            assert!(sel.pending.is_empty());
        }

        #[test]
        fn a_pod_elsewhere_is_not_selected() {
            let me = std::process::id();
            let (mut sel, k8s, root) = selector(
                Selection {
                    pids: vec![me],
                    pods: shop(),
                    ..Default::default()
                },
                "other",
            );
            k8s.store
                .replace_all(vec![pod("kube-system")], Instant::now());
            assert!(sel.scan().is_empty());
            assert!(
                sel.pending.is_empty(),
                "known and not matching: not waiting"
            );
            let _ = std::fs::remove_dir_all(&root);
        }

        #[test]
        fn by_pod_alone_every_process_of_the_pod() {
            let me = std::process::id();
            let (mut sel, k8s, root) = selector(
                Selection {
                    pods: shop(),
                    ..Default::default()
                },
                "alone",
            );
            k8s.store.replace_all(vec![pod("shop")], Instant::now());
            // Only this process has a cgroup in the fake /proc: the others are the host's.
            let found = sel.scan();
            assert_eq!(found.iter().map(|(p, _)| *p).collect::<Vec<_>>(), vec![me]);
            sel.on_exit(me);
            // A new program in the pod: selected at exec, whatever its name.
            assert!(sel.on_exec(me, "anything"));
            let _ = std::fs::remove_dir_all(&root);
        }

        #[test]
        fn names_and_pods_must_both_match() {
            let me = std::process::id();
            let (mut sel, k8s, root) = selector(
                Selection {
                    comms: vec!["no-such-program".into()],
                    pods: shop(),
                    ..Default::default()
                },
                "names",
            );
            k8s.store.replace_all(vec![pod("shop")], Instant::now());
            assert!(sel.scan().is_empty());
            assert!(!sel.on_exec(me, "something-else"));
            assert!(sel.on_exec(me, "no-such-program"));
            let _ = std::fs::remove_dir_all(&root);
        }
    }
}
