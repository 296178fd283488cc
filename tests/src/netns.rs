//! Separate "hosts" on one machine: network namespaces joined by a bridge, each with its own
//! IPv4 address, so that a service calls another over a real network path (veth, bridge) and
//! not over loopback.
//!
//! ```text
//!   root namespace (agent, collector, curl)      10.77.S.1  bridge ae<pid><seq>br
//!     ├─ veth ── host "a" (namespace ae2e-<pid>-<seq>-a)   10.77.S.10
//!     ├─ veth ── host "b"                                  10.77.S.11
//!     └─ ...
//! ```
//!
//! The agent and the collector stay in the root namespace: the kernel programs see the sockets
//! of every namespace. (The agent's `--port` selection looks at its own namespace only: select
//! processes in hosts by `--pid`, `--comm` or `--exe`.) Commands run inside a host with
//! `ip netns exec` ([`Host::command`], [`Host::wrap`]); `ip` execs the program, so the child's
//! pid is the program's pid.
//!
//! [`Network`] is a guard: dropping it (also while a test panics) kills what still runs in its
//! namespaces, deletes them and the bridge. Names carry the test process's pid and a sequence
//! number, so a run never collides with the leftovers of a crashed earlier one; the first
//! [`Network::new`] of a process deletes such leftovers (names with this prefix whose pid is no
//! longer alive).

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::sync::Once;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::process::{poll_until, tail};

/// Every namespace made here is named `ae2e-<pid>-<seq>-<label>`.
const NS_PREFIX: &str = "ae2e-";
/// Every link made here (bridge, root ends of the veths) is named `ae<pid:06x><seq:x>...`.
const LINK_PREFIX: &str = "ae";

/// The `ip` binary (iproute2). Override with `E2E_IP`.
pub fn ip_bin() -> String {
    std::env::var("E2E_IP").unwrap_or_else(|_| {
        crate::which("ip")
            .or_else(|| Some(Path::new("/usr/sbin/ip").to_path_buf()).filter(|p| p.exists()))
            .unwrap_or_else(|| panic!("`ip` (iproute2) not found: apt-get install -y iproute2"))
            .display()
            .to_string()
    })
}

/// Runs `ip <args>`; panics with its output unless it succeeds.
fn ip(args: &[&str]) -> String {
    let (ok, out) = try_ip(args);
    assert!(ok, "`ip {}` failed: {out}", args.join(" "));
    out
}

/// Runs `ip <args>`: (success, stdout + stderr). (Plain `output()`: `ip` does not block, and
/// this also runs from `Drop` while a test panics, where a scratch directory per call would be
/// kept for inspection.)
fn try_ip(args: &[&str]) -> (bool, String) {
    match Command::new(ip_bin()).args(args).output() {
        Ok(out) => (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        ),
        Err(e) => (false, format!("cannot run {}: {e}", ip_bin())),
    }
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// The creator pid in a namespace name `ae2e-<pid>-...`.
fn ns_owner(name: &str) -> Option<u32> {
    name.strip_prefix(NS_PREFIX)?
        .split('-')
        .next()?
        .parse()
        .ok()
}

/// The creator pid in a link name `ae<pid:06x><seq:x>br` (bridge) or `ae<pid:06x><seq:x>v<i:x>`
/// (root end of a veth).
fn link_owner(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(LINK_PREFIX)?;
    let (hex, rest) = (rest.get(..6)?, rest.get(6..)?);
    let mut chars = rest.chars();
    if !chars.next()?.is_ascii_hexdigit() {
        return None;
    }
    let suffix = chars.as_str();
    let ours = suffix == "br"
        || suffix
            .strip_prefix('v')
            .is_some_and(|i| !i.is_empty() && i.chars().all(|c| c.is_ascii_hexdigit()));
    if !ours || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(hex, 16).ok()
}

/// A leftover is ours (prefix) and its creator is gone, or is this very process (a pid reused
/// by the kernel) before it made anything.
fn is_leftover(owner: Option<u32>) -> bool {
    owner.is_some_and(|pid| pid == std::process::id() || !pid_alive(pid))
}

/// Names of the namespaces in `ip netns list` (`name (id: 3)` or `name`).
fn netns_names() -> Vec<String> {
    try_ip(&["netns", "list"])
        .1
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

/// Names of the links of the root namespace (`3: name@peer: <...>`).
fn link_names() -> Vec<String> {
    try_ip(&["-o", "link", "show"])
        .1
        .lines()
        .filter_map(|l| {
            let name = l.split(": ").nth(1)?;
            Some(name.split('@').next()?.to_string())
        })
        .collect()
}

/// Deletes namespaces and links left by earlier runs that died before their guard ran.
fn remove_leftovers() {
    for ns in netns_names() {
        if ns.starts_with(NS_PREFIX) && is_leftover(ns_owner(&ns)) {
            kill_all_in(&ns);
            let (ok, out) = try_ip(&["netns", "del", &ns]);
            eprintln!(
                "[e2e] removed leftover network namespace {ns}{}",
                if ok {
                    String::new()
                } else {
                    format!(" (failed: {out})")
                }
            );
        }
    }
    for link in link_names() {
        if link_owner(&link).is_some() && is_leftover(link_owner(&link)) {
            let (ok, out) = try_ip(&["link", "del", &link]);
            eprintln!(
                "[e2e] removed leftover link {link}{}",
                if ok {
                    String::new()
                } else {
                    format!(" (failed: {out})")
                }
            );
        }
    }
}

/// SIGKILLs every process in namespace `ns` (only namespaces made by this module: whatever
/// runs there was started by a test).
fn kill_all_in(ns: &str) {
    let (_, out) = try_ip(&["netns", "pids", ns]);
    for pid in out.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
        // SAFETY: plain syscall.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
}

/// One "host": a network namespace with one interface (`eth0`) on the bridge, and `lo` up.
#[derive(Debug, Clone)]
pub struct Host {
    label: String,
    ns: String,
    ip: Ipv4Addr,
}

impl Host {
    /// The label given to [`Network::new`], e.g. `"proxy"`.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The namespace's name (for `ip netns exec`).
    pub fn ns(&self) -> &str {
        &self.ns
    }

    /// The host's address on the bridge.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// `ip netns exec <ns> <program>`: add arguments and environment as usual.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(ip_bin());
        cmd.args(["netns", "exec", &self.ns]).arg(program);
        cmd
    }

    /// The same command run inside this host: program, arguments, environment changes and
    /// working directory are carried over. (Not `uid`/`gid`: `ip netns exec` must run as root;
    /// drop privileges inside, e.g. with `setpriv`.)
    pub fn wrap(&self, cmd: &Command) -> Command {
        let mut out = self.command(cmd.get_program());
        out.args(cmd.get_args());
        for (key, value) in cmd.get_envs() {
            match value {
                Some(v) => out.env(key, v),
                None => out.env_remove(key),
            };
        }
        if let Some(dir) = cmd.get_current_dir() {
            out.current_dir(dir);
        }
        out
    }

    /// `http://<ip>:<port><path>`.
    pub fn url(&self, port: u16, path: &str) -> String {
        format!("http://{}:{port}{path}", self.ip)
    }
}

/// A bridge in the root namespace and one namespace per host on it. See the module docs.
pub struct Network {
    bridge: String,
    gateway: Ipv4Addr,
    hosts: Vec<Host>,
}

impl Network {
    /// Creates one host per label (`10.77.S.10`, `.11`, … in label order) on a fresh bridge
    /// (`10.77.S.1`, reachable from the root namespace). `S` is a /24 not used by any address
    /// on this machine.
    pub fn new(labels: &[&str]) -> Network {
        static CLEANUP: Once = Once::new();
        CLEANUP.call_once(remove_leftovers);
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        assert!(labels.len() < 200, "too many hosts");
        let pid = std::process::id();
        let tag = format!("{LINK_PREFIX}{pid:06x}{:x}", seq % 16);
        let bridge = format!("{tag}br");
        let subnet = free_subnet(pid, seq);
        let gateway = Ipv4Addr::new(10, 77, subnet, 1);

        // From here on, a panic drops the partly built network, which removes what exists.
        let mut network = Network {
            bridge: bridge.clone(),
            gateway,
            hosts: Vec::new(),
        };
        ip(&["link", "add", &bridge, "type", "bridge"]);
        ip(&["addr", "add", &format!("{gateway}/24"), "dev", &bridge]);
        ip(&["link", "set", &bridge, "up"]);
        for (i, label) in labels.iter().enumerate() {
            assert!(
                !label.is_empty() && label.chars().all(|c| c.is_ascii_alphanumeric()),
                "host label {label:?}: use letters and digits"
            );
            let ns = format!("{NS_PREFIX}{pid}-{seq}-{label}");
            let host_ip = Ipv4Addr::new(10, 77, subnet, 10 + i as u8);
            let veth = format!("{tag}v{i:x}");
            ip(&["netns", "add", &ns]);
            network.hosts.push(Host {
                label: label.to_string(),
                ns: ns.clone(),
                ip: host_ip,
            });
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            ip(&[
                "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ]);
            ip(&["link", "set", &veth, "master", &bridge]);
            ip(&["link", "set", &veth, "up"]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{host_ip}/24"),
                "dev",
                "eth0",
            ]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        }
        let names: Vec<String> = network
            .hosts
            .iter()
            .map(|h| format!("{}={}({})", h.label, h.ip, h.ns))
            .collect();
        eprintln!(
            "[e2e] network {bridge} 10.77.{subnet}.0/24 gateway {gateway}: {}",
            names.join(" ")
        );
        network
    }

    /// The host with this label; panics if there is none.
    pub fn host(&self, label: &str) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.label == label)
            .unwrap_or_else(|| panic!("no host {label:?} in this network"))
    }

    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// The bridge's address: how hosts reach the root namespace (e.g. the collector, when it
    /// listens on every address).
    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }

    pub fn bridge(&self) -> &str {
        &self.bridge
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for host in &self.hosts {
            kill_all_in(&host.ns);
        }
        // The veths disappear with their namespaces (once no process holds them).
        for host in &self.hosts {
            let ns = host.ns.clone();
            // A namespace may be busy for a moment while killed processes exit.
            let deleted = poll_until(Duration::from_secs(5), || {
                let (ok, out) = try_ip(&["netns", "del", &ns]);
                (ok || !netns_names().contains(&ns))
                    .then_some(())
                    .or_else(|| {
                        if out.contains("No such file") {
                            Some(())
                        } else {
                            None
                        }
                    })
            });
            if deleted.is_none() {
                eprintln!("[e2e] could not delete network namespace {ns}");
            }
        }
        let (ok, out) = try_ip(&["link", "del", &self.bridge]);
        if !ok && link_names().contains(&self.bridge) {
            eprintln!("[e2e] could not delete bridge {}: {out}", self.bridge);
        }
    }
}

/// A third octet for 10.77.X.0/24 that no address of the root namespace uses.
fn free_subnet(pid: u32, seq: u32) -> u8 {
    let (_, out) = try_ip(&["-4", "-o", "addr", "show"]);
    let used: BTreeSet<u8> = out
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("10.77."))
        .filter_map(|rest| rest.split('.').next()?.parse().ok())
        .collect();
    let start = (pid.wrapping_add(seq) % 200) as u8;
    (0..200u8)
        .map(|i| 20 + (start + i) % 200)
        .find(|s| !used.contains(s))
        .unwrap_or_else(|| {
            panic!(
                "no free 10.77.X.0/24 subnet; in use: {used:?}\n{}",
                tail(&out, 20)
            )
        })
}

/// Waits until something accepts TCP connections on `ip:port` (probing from the root
/// namespace, through the bridge). Panics with `what` after `timeout`.
pub fn wait_tcp(what: &str, ip: Ipv4Addr, port: u16, timeout: Duration) {
    let addr = std::net::SocketAddr::from((ip, port));
    let ok = poll_until(timeout, || {
        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200))
            .ok()
            .map(|_| ())
    });
    assert!(
        ok.is_some(),
        "{what}: nothing accepts connections on {addr} after {timeout:?}"
    );
}

/// Whether `name` names a namespace made by this module (for tests of the module itself).
pub fn is_test_namespace(name: &str) -> bool {
    name.starts_with(NS_PREFIX) && ns_owner(name).is_some()
}

/// Namespaces made by this module that exist now.
pub fn test_namespaces() -> Vec<String> {
    netns_names()
        .into_iter()
        .filter(|n| is_test_namespace(n))
        .collect()
}

/// Whether a link with this name exists in the root namespace.
pub fn link_exists(name: &str) -> bool {
    link_names().iter().any(|l| l == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_are_parsed_from_names() {
        assert_eq!(ns_owner("ae2e-1234-0-proxy"), Some(1234));
        assert_eq!(ns_owner("other"), None);
        assert_eq!(link_owner("ae0004d20br"), Some(1234));
        assert_eq!(link_owner("ae0004d20v1f"), Some(1234));
        assert_eq!(link_owner("ae0004d2"), None);
        assert_eq!(link_owner("ae0004d20xx"), None);
        assert_eq!(link_owner("aexyz"), None);
        assert_eq!(link_owner("eth0"), None);
        // A live pid that is not ours is not a leftover.
        assert!(!is_leftover(Some(1)));
        assert!(is_leftover(Some(std::process::id())));
    }
}
