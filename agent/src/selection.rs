//! Which processes are traced: by pid, command name, executable or TCP port, or all.
//! Kubernetes pod filters narrow any of these (or, alone, select every process of the matching
//! pods). The kernel filters on the `SELECTED` map this module keeps up to date.
//!
//! Each `--pid`, `--comm`, `--exe` and `--port` value is watched: one that selects nothing at
//! start-up is named in a warning, and a line says when it first selects a process later.

use std::{
    collections::HashMap,
    ffi::{OsStr, OsString},
    fmt,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::Arc,
};

use aya::maps::{HashMap as BpfHashMap, MapData};

use crate::{
    k8s::{self, Kubernetes, PodFilter},
    proc::ProcFs,
};

/// Bytes of a command name the kernel keeps (`TASK_COMM_LEN` less its NUL).
pub const COMM_MAX: usize = 15;

/// Where a bare `--exe` name is looked up when the agent has no PATH (a shell's default).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Clone, Debug, Default)]
pub struct Selection {
    pub pids: Vec<u32>,
    /// Globs (`*`, `?`) matched against the 15-character kernel command name.
    pub comms: Vec<String>,
    /// Programs (see [`ExeRule`]).
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
}

fn is_glob(pattern: &str) -> bool {
    pattern.contains(['*', '?'])
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

/// A `--comm` name as the kernel would store it, when that differs: names (not globs) longer
/// than [`COMM_MAX`] bytes, cut at a character boundary.
pub fn kernel_comm(name: &str) -> Option<String> {
    if is_glob(name) || name.len() <= COMM_MAX {
        return None;
    }
    let mut end = COMM_MAX;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    Some(name[..end].to_owned())
}

/// A command name as the kernel stores it: at most 15 bytes, NUL-padded to 16.
fn comm_key(name: &str) -> [u8; 16] {
    let mut key = [0u8; 16];
    let bytes = name.as_bytes();
    let n = bytes.len().min(COMM_MAX);
    key[..n].copy_from_slice(&bytes[..n]);
    key
}

/// The programs a shell would run for `program`, symlinks resolved: a path (with a `/`) names
/// one file; a bare name is looked up in every directory of `path_var`, not only the first, as
/// a process may have been started with another PATH, and the first hit may be a wrapper
/// script (pyenv's shims) rather than the program the processes run.
pub fn resolve_program(program: &str, path_var: Option<&OsStr>) -> Vec<PathBuf> {
    let candidates: Vec<PathBuf> = if program.contains('/') {
        vec![PathBuf::from(program)]
    } else {
        std::env::split_paths(path_var.unwrap_or(OsStr::new(DEFAULT_PATH)))
            // An empty entry means the working directory: not a place programs are chosen from.
            .filter(|dir| !dir.as_os_str().is_empty())
            .map(|dir| dir.join(program))
            .collect()
    };
    let mut found: Vec<PathBuf> = Vec::new();
    for candidate in candidates {
        let Ok(real) = std::fs::canonicalize(&candidate) else {
            continue;
        };
        let executable = std::fs::metadata(&real)
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
        if executable && !found.contains(&real) {
            found.push(real);
        }
    }
    found
}

/// One `--exe` value. A glob matches the executable's path or file name. Anything else
/// matches a process whose real executable (`/proc/PID/exe`) is the program the value names
/// (see [`resolve_program`]), or whose executable's path or file name is the value itself.
#[derive(Clone, Debug)]
pub struct ExeRule {
    pattern: String,
    targets: Vec<PathBuf>,
}

impl ExeRule {
    pub fn new(pattern: &str, path_var: Option<&OsStr>) -> Self {
        let mut rule = Self {
            pattern: pattern.to_owned(),
            targets: Vec::new(),
        };
        rule.resolve(path_var);
        rule
    }

    /// Looks the program up again: a symlink may point elsewhere by now (a new release), or
    /// the program may have been installed since.
    fn resolve(&mut self, path_var: Option<&OsStr>) {
        if !is_glob(&self.pattern) {
            self.targets = resolve_program(&self.pattern, path_var);
        }
    }

    pub fn matches(&self, exe: &Path) -> bool {
        let path = exe.to_string_lossy();
        let name = exe
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_else(|| path.clone());
        if is_glob(&self.pattern) {
            glob_match(&self.pattern, &path) || glob_match(&self.pattern, &name)
        } else {
            self.targets.iter().any(|t| t == exe) || self.pattern == path || self.pattern == name
        }
    }
}

/// One selection value as the user gave it.
#[derive(Clone, Debug)]
enum Criterion {
    Pid(u32),
    Comm(String),
    Exe(ExeRule),
    Port(u16),
}

impl fmt::Display for Criterion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Criterion::Pid(pid) => write!(f, "--pid {pid}"),
            Criterion::Comm(name) => write!(f, "--comm {name}"),
            Criterion::Exe(rule) => write!(f, "--exe {}", rule.pattern),
            Criterion::Port(port) => write!(f, "--port {port}"),
        }
    }
}

/// A criterion and what it has done so far.
#[derive(Debug)]
struct Watched {
    criterion: Criterion,
    /// It selected a process at least once.
    matched: bool,
    /// It was reported as selecting nothing: say when it first does.
    warned: bool,
}

/// What is known of a process when deciding whether it is selected.
struct Candidate<'a> {
    pid: u32,
    comm: &'a str,
    exe: Option<&'a Path>,
    /// Its sockets' ports that are `--port` values.
    ports: &'a [u16],
}

/// Whether a process's pod passes the pod filters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PodVerdict {
    Yes,
    No,
    /// In a container whose pod is not in the pod list yet: ask again when it changes.
    NotYet,
}

/// A process that matches but waits for its pod: its name and the criteria it matched.
type Waiting = (String, Vec<usize>);

pub struct Selector {
    selection: Selection,
    watched: Vec<Watched>,
    /// The agent's PATH, where bare `--exe` names are looked up.
    path_var: Option<OsString>,
    map: Option<BpfHashMap<MapData, u32, u32>>,
    selected: HashMap<u32, String>,
    own_pid: u32,
    pub map_errors: u64,
    k8s: Option<Arc<Kubernetes>>,
    /// Processes that match but whose pod is not known yet.
    pending: HashMap<u32, Waiting>,
    /// The pod list's generation when `pending` was last checked.
    k8s_generation: u64,
    /// Where processes are read (tests use a fake tree).
    proc: ProcFs,
}

impl Selector {
    /// `map` is None when tracing everything (the kernel then ignores the map).
    pub fn new(selection: Selection, map: Option<BpfHashMap<MapData, u32, u32>>) -> Self {
        let path_var = std::env::var_os("PATH");
        let criteria = (selection.pids.iter().map(|&p| Criterion::Pid(p)))
            .chain(selection.comms.iter().map(|c| Criterion::Comm(c.clone())))
            .chain(
                selection
                    .exes
                    .iter()
                    .map(|e| Criterion::Exe(ExeRule::new(e, path_var.as_deref()))),
            )
            .chain(selection.ports.iter().map(|&p| Criterion::Port(p)));
        let watched = criteria
            .map(|criterion| Watched {
                criterion,
                matched: false,
                warned: false,
            })
            .collect();
        Self {
            selection,
            watched,
            path_var,
            map,
            selected: HashMap::new(),
            own_pid: std::process::id(),
            map_errors: 0,
            k8s: None,
            pending: HashMap::new(),
            k8s_generation: 0,
            proc: ProcFs::host(),
        }
    }

    /// Pod filters are checked against this node's pods.
    pub fn with_kubernetes(mut self, k8s: Option<Arc<Kubernetes>>) -> Self {
        self.k8s = k8s;
        self
    }

    fn has_exe_rules(&self) -> bool {
        !self.selection.exes.is_empty()
    }

    /// The indexes of the criteria `process` matches.
    fn hits(&self, process: &Candidate<'_>) -> Vec<usize> {
        let mut hits = Vec::new();
        for (i, w) in self.watched.iter().enumerate() {
            let hit = match &w.criterion {
                Criterion::Pid(pid) => *pid == process.pid,
                Criterion::Comm(pattern) => glob_match(pattern, process.comm),
                Criterion::Exe(rule) => process.exe.is_some_and(|exe| rule.matches(exe)),
                Criterion::Port(port) => process.ports.contains(port),
            };
            if hit {
                hits.push(i);
            }
        }
        hits
    }

    /// Warnings for the criteria that have selected nothing so far (call it after the first
    /// [`Selector::scan`]); each is then reported again when it first selects a process.
    pub fn unmatched_warnings(&mut self) -> Vec<String> {
        let mut warnings = Vec::new();
        for w in self.watched.iter_mut().filter(|w| !w.matched) {
            w.warned = true;
            let detail = match &w.criterion {
                Criterion::Pid(pid) if !self.proc.exists(*pid) => {
                    " (no process has this id)".to_owned()
                }
                Criterion::Exe(rule) if !is_glob(&rule.pattern) && rule.targets.is_empty() => {
                    if rule.pattern.contains('/') {
                        " (no such executable file)".to_owned()
                    } else {
                        " (no such program in PATH, and no running executable has this name)"
                            .to_owned()
                    }
                }
                Criterion::Exe(rule) if !rule.targets.is_empty() => format!(
                    " (it names {})",
                    rule.targets
                        .iter()
                        .map(|t| t.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                _ => String::new(),
            };
            warnings.push(format!(
                "{} selects no running process{detail}; a process that starts later and \
                 matches it is traced (a line will say so)",
                w.criterion
            ));
        }
        warnings
    }

    fn pod_verdict(&self, pid: u32) -> PodVerdict {
        if self.selection.pods.is_empty() {
            return PodVerdict::Yes;
        }
        let Some(k8s) = &self.k8s else {
            return PodVerdict::No;
        };
        let Some(place) = self
            .proc
            .cgroup(pid)
            .map(|text| k8s::cgroup::parse(&text))
            .filter(|p| !p.is_host())
        else {
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
        for (pid, (comm, hits)) in std::mem::take(&mut self.pending) {
            if let Some(comm) = self.admit(pid, comm, hits) {
                new.push((pid, comm));
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
        for name in self.selection.comms.iter().filter(|c| !is_glob(c)) {
            comms.insert(&comm_key(name), &1, 0)?;
            n += 1;
        }
        Ok(n)
    }

    pub fn selected(&self) -> &HashMap<u32, String> {
        &self.selected
    }

    /// A process that matched the criteria `hits` (or, by pod alone, none): selected when its
    /// pod passes, kept waiting when its pod is not known yet. Returns its name when it was
    /// newly selected.
    fn admit(&mut self, pid: u32, name: String, hits: Vec<usize>) -> Option<String> {
        match self.pod_verdict(pid) {
            PodVerdict::Yes => self.select(pid, name.clone(), &hits).then_some(name),
            PodVerdict::NotYet => {
                self.pending.insert(pid, (name, hits));
                None
            }
            PodVerdict::No => None,
        }
    }

    /// Selects a process that matched the criteria `hits`; returns whether it was new.
    fn select(&mut self, pid: u32, name: String, hits: &[usize]) -> bool {
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
        if !self.proc.exists(pid) {
            if let Some(map) = self.map.as_mut() {
                let _ = map.remove(&pid);
            }
            return false;
        }
        for &i in hits {
            let Some(w) = self.watched.get_mut(i) else {
                continue;
            };
            if !w.matched && w.warned {
                log::info!("{} now matches {name}[{pid}]", w.criterion);
            }
            w.matched = true;
        }
        self.selected.insert(pid, name);
        true
    }

    /// (socket inode, port) of TCP sockets whose local or remote port is one of `ports`.
    fn sockets_on_ports(&self, ports: &[u16]) -> Vec<(u64, u16)> {
        let mut sockets = Vec::new();
        for socket in self.proc.tcp_sockets() {
            for port in [socket.local_port, socket.remote_port] {
                if ports.contains(&port) && !sockets.contains(&(socket.inode, port)) {
                    sockets.push((socket.inode, port));
                }
            }
        }
        sockets
    }

    /// The ports of `sockets` that process `pid` holds a socket on.
    fn process_ports(&self, pid: u32, sockets: &[(u64, u16)]) -> Vec<u16> {
        let mut ports = Vec::new();
        for inode in self.proc.socket_inodes(pid) {
            for &(_, port) in sockets.iter().filter(|(i, _)| *i == inode) {
                if !ports.contains(&port) {
                    ports.push(port);
                }
            }
        }
        ports
    }

    /// Walks /proc and selects every matching process not selected yet; returns the new ones.
    pub fn scan(&mut self) -> Vec<(u32, String)> {
        if self.traces_all() {
            return Vec::new();
        }
        for w in &mut self.watched {
            if let Criterion::Exe(rule) = &mut w.criterion {
                rule.resolve(self.path_var.as_deref());
            }
        }
        let sockets = if self.selection.ports.is_empty() {
            Vec::new()
        } else {
            self.sockets_on_ports(&self.selection.ports)
        };
        let by_process = self.selection.by_process();
        let mut new = Vec::new();
        // Rebuilt from this walk: processes that exited or stopped matching drop out.
        self.pending.clear();
        for pid in self.proc.pids() {
            if self.selected.contains_key(&pid) || pid == self.own_pid {
                continue;
            }
            let Some(comm) = self.proc.comm(pid) else {
                continue;
            };
            let exe = if self.has_exe_rules() {
                self.proc.exe(pid)
            } else {
                None
            };
            let ports = if sockets.is_empty() {
                Vec::new()
            } else {
                self.process_ports(pid, &sockets)
            };
            let hits = self.hits(&Candidate {
                pid,
                comm: &comm,
                exe: exe.as_deref(),
                ports: &ports,
            });
            if by_process && hits.is_empty() {
                continue;
            }
            if let Some(comm) = self.admit(pid, comm, hits) {
                new.push((pid, comm));
            }
        }
        new
    }

    /// A process exec'd: select it if it now matches by pid or name. Returns whether it is
    /// traced.
    pub fn on_exec(&mut self, pid: u32, comm: &str) -> bool {
        if self.traces_all() {
            return pid != self.own_pid;
        }
        if self.selected.contains_key(&pid) {
            return true;
        }
        let exe = if self.has_exe_rules() {
            self.proc.exe(pid)
        } else {
            None
        };
        let hits = self.hits(&Candidate {
            pid,
            comm,
            exe: exe.as_deref(),
            ports: &[],
        });
        // By pod alone, every new program in a matching pod is traced.
        if self.selection.by_process() && hits.is_empty() {
            return false;
        }
        self.admit(pid, comm.to_string(), hits).is_some()
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
    fn long_command_names_are_cut_like_the_kernel_does() {
        assert_eq!(
            kernel_comm("a-very-long-program-name").as_deref(),
            Some("a-very-long-pro")
        );
        assert_eq!(kernel_comm("nginx"), None);
        assert_eq!(kernel_comm("exactly-15-byte"), None);
        // Globs are left alone; a multi-byte character is not split.
        assert_eq!(kernel_comm("a-very-long-program-*"), None);
        assert_eq!(
            kernel_comm("abcdefghijklmnö-x").as_deref(),
            Some("abcdefghijklmn")
        );
    }

    /// A fake file system: `real/python3.11` and `real/python3.12` (executables), `bin/python3`
    /// → `../real/python3.11`, `shims/python3` (a wrapper script), `noexec/python3` (not
    /// executable). Removed on drop.
    struct Programs(PathBuf);

    impl Programs {
        fn new(tag: &str) -> Self {
            use std::os::unix::fs::symlink;
            let root = std::env::temp_dir().join(format!("agent-exe-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&root);
            for dir in ["real", "bin", "shims", "noexec"] {
                std::fs::create_dir_all(root.join(dir)).expect("dir");
            }
            let write = |path: &str, mode: u32| {
                let path = root.join(path);
                std::fs::write(&path, "#!/bin/sh\n").expect("write");
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
                    .expect("chmod");
            };
            write("real/python3.11", 0o755);
            write("real/python3.12", 0o755);
            write("shims/python3", 0o755);
            write("noexec/python3", 0o644);
            symlink("../real/python3.11", root.join("bin/python3")).expect("symlink");
            Self(root)
        }

        fn path(&self, relative: &str) -> PathBuf {
            self.0.join(relative)
        }

        fn path_var(&self, dirs: &[&str]) -> OsString {
            std::env::join_paths(dirs.iter().map(|d| self.path(d))).expect("PATH")
        }
    }

    impl Drop for Programs {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn exe_names_are_looked_up_in_path_and_symlinks_resolved() {
        let fs = Programs::new("names");
        let real = |name: &str| std::fs::canonicalize(fs.path(name)).expect("canonical");
        // The first hit is a wrapper script; the program behind the later symlink counts too.
        let path_var = fs.path_var(&["noexec", "shims", "bin"]);
        let rule = ExeRule::new("python3", Some(&path_var));
        assert_eq!(
            rule.targets,
            vec![real("shims/python3"), real("real/python3.11")],
            "not executable: skipped; a symlink: its target"
        );
        assert!(rule.matches(&real("real/python3.11")), "started as python3");
        assert!(!rule.matches(&real("real/python3.12")));
        assert!(!rule.matches(Path::new("/opt/other/python3.11")));
        assert!(
            rule.matches(Path::new("/opt/other/python3")),
            "an executable with the name itself"
        );

        // A path through a symlink names the file it points to.
        let via_link = fs.path("bin/python3").display().to_string();
        let mut rule = ExeRule::new(&via_link, None);
        assert!(rule.matches(&real("real/python3.11")));
        // A new release behind the same link is followed at the next look-up.
        std::fs::remove_file(fs.path("bin/python3")).expect("rm");
        std::os::unix::fs::symlink("../real/python3.12", fs.path("bin/python3")).expect("ln");
        rule.resolve(None);
        assert!(rule.matches(&real("real/python3.12")));
        assert!(!rule.matches(&real("real/python3.11")));

        // Not in PATH: only an executable with that very name.
        let rule = ExeRule::new("python3.11", Some(&fs.path_var(&["shims"])));
        assert!(rule.targets.is_empty());
        assert!(rule.matches(&real("real/python3.11")));
        // Globs match the path or the file name, as before.
        let rule = ExeRule::new("python3.1*", Some(&path_var));
        assert!(rule.targets.is_empty(), "globs are not looked up");
        assert!(rule.matches(&real("real/python3.12")));
        assert!(ExeRule::new("/usr/sbin/*", None).matches(Path::new("/usr/sbin/nginx")));
        assert!(ExeRule::new("nginx", None).matches(Path::new("/usr/sbin/nginx")));
        assert!(!ExeRule::new("node", None).matches(Path::new("/usr/bin/nodejs")));
    }

    #[test]
    fn without_path_a_shell_default_is_searched() {
        let sh = resolve_program("sh", None);
        assert!(
            sh.iter()
                .all(|p| p.is_absolute() && p.file_name().is_some()),
            "{sh:?}"
        );
        assert!(
            !sh.is_empty(),
            "/bin/sh exists on every machine that runs the agent"
        );
        // An empty PATH entry (the working directory) is not searched.
        assert!(resolve_program("Cargo.toml", Some(OsStr::new(":"))).is_empty());
    }

    fn criteria_hit(sel: &Selector, pid: u32, comm: &str, exe: &str, ports: &[u16]) -> Vec<String> {
        sel.hits(&Candidate {
            pid,
            comm,
            exe: Some(Path::new(exe)),
            ports,
        })
        .into_iter()
        .map(|i| sel.watched[i].criterion.to_string())
        .collect()
    }

    #[test]
    fn each_criterion_is_matched_on_its_own() {
        let sel = Selector::new(
            Selection {
                pids: vec![42],
                comms: vec!["py*".into()],
                exes: vec!["nginx".into()],
                ports: vec![8080],
                ..Default::default()
            },
            None,
        );
        assert_eq!(criteria_hit(&sel, 42, "x", "/x", &[]), ["--pid 42"]);
        assert_eq!(criteria_hit(&sel, 1, "python3", "/x", &[]), ["--comm py*"]);
        assert_eq!(
            criteria_hit(&sel, 1, "w", "/usr/sbin/nginx", &[8080]),
            ["--exe nginx", "--port 8080"]
        );
        assert!(criteria_hit(&sel, 1, "node", "/usr/bin/node", &[80]).is_empty());
        assert!(!sel.traces_all());
        assert!(Selection::default().traces_all());
    }

    #[test]
    fn criteria_that_select_nothing_are_named_then_reported_when_they_match() {
        let me = std::process::id();
        let mut sel = Selector::new(
            Selection {
                pids: vec![me, PID_NOBODY],
                comms: vec!["no-such-comm".into()],
                exes: vec!["no-such-program-here".into()],
                ..Default::default()
            },
            None,
        );
        sel.own_pid = 0;
        assert_eq!(sel.scan().len(), 1, "this process, by pid");
        let warnings = sel.unmatched_warnings();
        assert_eq!(warnings.len(), 3, "{warnings:#?}");
        assert!(
            warnings[0].starts_with(&format!(
                "--pid {PID_NOBODY} selects no running process (no process has this id); a \
                 process that starts later"
            )),
            "{warnings:#?}"
        );
        assert!(
            warnings[1].starts_with("--comm no-such-comm selects no"),
            "{warnings:#?}"
        );
        assert!(
            warnings[2].starts_with(
                "--exe no-such-program-here selects no running process (no such program in PATH"
            ),
            "{warnings:#?}"
        );
        assert!(warnings.iter().all(|w| w.contains("starts later")));

        // A process with that command name starts: selected, and the criterion is matched.
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        let selected = sel.on_exec(child.id(), "no-such-comm");
        let _ = child.kill();
        let _ = child.wait();
        assert!(selected);
        let comm = &sel.watched[2];
        assert!(comm.matched && comm.warned, "{comm:?}");
        assert_eq!(
            sel.unmatched_warnings().len(),
            2,
            "the matched criterion is no longer listed"
        );
    }

    /// A pid no process has: above the largest the kernel hands out here.
    const PID_NOBODY: u32 = 4_194_303;

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
        let unused = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let unused_port = unused.local_addr().expect("addr").port();
        drop(unused);
        let mut sel = Selector::new(
            Selection {
                ports: vec![port, unused_port],
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
        let warnings = sel.unmatched_warnings();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].starts_with(&format!("--port {unused_port} selects no")),
            "{warnings:?}"
        );
    }

    mod pods {
        use std::time::Instant;

        use super::*;
        use crate::k8s::pods::PodMeta;

        const UID: &str = "7d1c5ab3-6b0f-4f2e-9b3e-2c4b8a0f6e71";
        const ID: &str = "8f3b6c2d1e0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c";

        /// A selector that sees a fake /proc: this test process in a containerd container of
        /// pod `UID`, and pid 1 on the host.
        fn selector(selection: Selection, tag: &str) -> (Selector, Arc<Kubernetes>, PathBuf) {
            let me = std::process::id();
            let root = std::env::temp_dir().join(format!("agent-sel-{tag}-{me}"));
            let pod_cgroup = format!(
                "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-{ID}.scope\n",
                UID.replace('-', "_")
            );
            for (pid, comm, cgroup) in [
                (me, "app", pod_cgroup.as_str()),
                (1, "systemd", "0::/init.scope\n"),
            ] {
                let dir = root.join(pid.to_string());
                std::fs::create_dir_all(&dir).expect("fake /proc");
                std::fs::write(dir.join("comm"), format!("{comm}\n")).expect("write comm");
                std::fs::write(dir.join("cgroup"), cgroup).expect("write cgroup");
            }
            let k8s = Arc::new(Kubernetes::new(
                Some("node-1".into()),
                selection.pods.clone(),
            ));
            let mut sel = Selector::new(selection, None).with_kubernetes(Some(k8s.clone()));
            sel.own_pid = 0;
            sel.proc = ProcFs::at(&root);
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
            // Only this process is in a pod: pid 1 is the host's.
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
