//! What the host offers, checked before loading: privileges, kernel version, tracefs, BTF.

use std::path::Path;

use thiserror::Error;

use crate::proc;

pub const TRACEFS: &str = "/sys/kernel/tracing";

#[derive(Debug, Error)]
pub enum EnvironmentError {
    #[error(
        "this process lacks {}, without which it cannot load eBPF programs (uid {uid}). Run the \
         agent as root (`sudo agent`), or give it {}: see \"Running as a systemd service\" in \
         the README",
        names(.missing),
        names(&Capability::ALL.map(|c| c.0))
    )]
    MissingCapabilities {
        missing: Vec<&'static str>,
        uid: u32,
    },
    #[error("cannot read this process's capabilities from /proc/self/status: {0}")]
    Capabilities(String),
    #[error(
        "kernel BTF is missing ({0}): the agent needs a kernel built with CONFIG_DEBUG_INFO_BTF=y"
    )]
    NoBtf(&'static str),
    #[error(
        "tracefs is not mounted at {TRACEFS} and mounting it failed ({0}); mount it with `mount -t tracefs nodev {TRACEFS}`"
    )]
    TracefsMount(std::io::Error),
}

#[derive(Debug)]
pub struct Environment {
    pub kernel_release: String,
    /// We mounted tracefs (and unmount it on exit).
    pub tracefs_mounted_by_us: bool,
    pub lockdown: Option<String>,
    /// Capabilities missing for some features (what they leave out).
    pub warnings: Vec<String>,
}

pub fn kernel_release() -> String {
    proc::kernel_release().unwrap_or_else(|| "unknown".into())
}

/// Checks what the probes need, mounting tracefs when it is missing.
pub fn prepare(context_propagation: bool) -> Result<Environment, EnvironmentError> {
    let status = proc::own_status().map_err(|e| EnvironmentError::Capabilities(e.to_string()))?;
    let caps = Capabilities::from_status(&status)
        .ok_or_else(|| EnvironmentError::Capabilities("no CapEff line".to_owned()))?;
    // SAFETY: geteuid has no preconditions.
    let warnings = caps.check(unsafe { libc::geteuid() }, context_propagation)?;
    if !Path::new(super::btf::VMLINUX_BTF).exists() {
        return Err(EnvironmentError::NoBtf(super::btf::VMLINUX_BTF));
    }
    let tracefs_mounted_by_us = if tracefs_mounted() {
        false
    } else {
        mount("tracefs", TRACEFS).map_err(EnvironmentError::TracefsMount)?;
        true
    };
    Ok(Environment {
        kernel_release: kernel_release(),
        tracefs_mounted_by_us,
        lockdown: read_lockdown(),
        warnings,
    })
}

/// `A`, `A and B`, `A, B and C`.
fn names(list: &[&str]) -> String {
    match list {
        [] => String::new(),
        [one] => (*one).to_owned(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

/// A capability: its name and its bit in the kernel's capability sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capability(&'static str, u32);

impl Capability {
    const DAC_READ_SEARCH: Self = Self("CAP_DAC_READ_SEARCH", 2);
    const DAC_OVERRIDE: Self = Self("CAP_DAC_OVERRIDE", 1);
    const NET_ADMIN: Self = Self("CAP_NET_ADMIN", 12);
    const SYS_PTRACE: Self = Self("CAP_SYS_PTRACE", 19);
    const SYS_ADMIN: Self = Self("CAP_SYS_ADMIN", 21);
    const PERFMON: Self = Self("CAP_PERFMON", 38);
    const BPF: Self = Self("CAP_BPF", 39);
    /// Everything the agent uses (the systemd unit and the Helm chart grant exactly these).
    const ALL: [Self; 5] = [
        Self::BPF,
        Self::PERFMON,
        Self::NET_ADMIN,
        Self::SYS_PTRACE,
        Self::DAC_READ_SEARCH,
    ];
}

/// A process's effective capability set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities(u64);

impl Capabilities {
    /// From the `CapEff:` line of `/proc/PID/status`: the capabilities the kernel checks.
    pub fn from_status(status: &str) -> Option<Self> {
        let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
        u64::from_str_radix(hex.trim(), 16).ok().map(Self)
    }

    fn has(self, cap: Capability) -> bool {
        cap.1 < 64 && self.0 & (1 << cap.1) != 0
    }

    /// Refuses when eBPF programs cannot be loaded (the kernel takes CAP_SYS_ADMIN in place of
    /// CAP_BPF and CAP_PERFMON); otherwise returns what the missing others leave out.
    fn check(self, uid: u32, context_propagation: bool) -> Result<Vec<String>, EnvironmentError> {
        let admin = self.has(Capability::SYS_ADMIN);
        let missing: Vec<&'static str> = [Capability::BPF, Capability::PERFMON]
            .into_iter()
            .filter(|&c| !self.has(c) && !admin)
            .map(|c| c.0)
            .collect();
        if !missing.is_empty() {
            return Err(EnvironmentError::MissingCapabilities { missing, uid });
        }
        let mut warnings = Vec::new();
        if context_propagation && !self.has(Capability::NET_ADMIN) {
            warnings.push(
                "without CAP_NET_ADMIN the sock_ops/sk_msg programs cannot attach: context \
                 propagation will be off"
                    .to_owned(),
            );
        }
        if !self.has(Capability::SYS_PTRACE) {
            warnings.push(
                "without CAP_SYS_PTRACE the executable and environment of other users' \
                 processes cannot be read: --exe cannot select them, and their spans lack \
                 process.executable.* and OTEL_SERVICE_NAME"
                    .to_owned(),
            );
        }
        if !self.has(Capability::DAC_READ_SEARCH) && !self.has(Capability::DAC_OVERRIDE) {
            warnings.push(
                "without CAP_DAC_READ_SEARCH the open sockets and environment of other users' \
                 processes cannot be read: --port cannot select them"
                    .to_owned(),
            );
        }
        Ok(warnings)
    }
}

fn tracefs_mounted() -> bool {
    Path::new(TRACEFS).join("events").is_dir()
}

fn mount(fstype: &str, target: &str) -> std::io::Result<()> {
    let c = |s: &str| std::ffi::CString::new(s).map_err(std::io::Error::other);
    let (src, tgt, fs) = (c("nodev")?, c(target)?, c(fstype)?);
    // SAFETY: all pointers are valid NUL-terminated strings for the duration of the call.
    let rc = unsafe { libc::mount(src.as_ptr(), tgt.as_ptr(), fs.as_ptr(), 0, std::ptr::null()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Unmount tracefs if we mounted it (best effort: a busy mount stays).
pub fn restore(env: &Environment) {
    if env.tracefs_mounted_by_us
        && let Ok(tgt) = std::ffi::CString::new(TRACEFS)
    {
        // SAFETY: valid NUL-terminated path.
        unsafe { libc::umount2(tgt.as_ptr(), libc::MNT_DETACH) };
    }
}

/// The kernel lockdown mode, when securityfs shows it (informational: it forbids
/// bpf_probe_write_user, which we do not use).
fn read_lockdown() -> Option<String> {
    let text = std::fs::read_to_string("/sys/kernel/security/lockdown").ok()?;
    let active = text.split_whitespace().find(|w| w.starts_with('['))?;
    Some(active.trim_matches(|c| c == '[' || c == ']').to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Root on this machine kind: everything but CAP_SYS_RESOURCE.
    const ROOT: &str =
        "CapInh:\t0000000000000000\nCapPrm:\t000001fffeffffff\nCapEff:\t000001fffeffffff\n";

    fn mask(caps: &[Capability]) -> Capabilities {
        Capabilities(caps.iter().fold(0, |m, c| m | 1 << c.1))
    }

    #[test]
    fn reads_the_effective_set() {
        let caps = Capabilities::from_status(ROOT).expect("CapEff");
        assert!(Capability::ALL.iter().all(|&c| caps.has(c)));
        assert!(!caps.has(Capability("CAP_SYS_RESOURCE", 24)));
        assert_eq!(Capabilities::from_status("Name:\tagent\n"), None);
        assert_eq!(
            Capabilities::from_status("CapEff:\t0000000000000000\n"),
            Some(Capabilities(0))
        );
    }

    #[test]
    fn root_and_the_granted_set_run_without_warnings() {
        let root = Capabilities::from_status(ROOT).expect("CapEff");
        assert_eq!(
            root.check(0, true).expect("root runs"),
            Vec::<String>::new()
        );
        let granted = mask(&Capability::ALL);
        assert_eq!(
            granted
                .check(1000, true)
                .expect("the unit's set runs, whatever the uid"),
            Vec::<String>::new()
        );
    }

    #[test]
    fn without_bpf_or_perfmon_the_error_names_what_is_needed() {
        for (caps, uid, missing) in [
            (Capabilities(0), 1000, "CAP_BPF and CAP_PERFMON"),
            (mask(&[Capability::BPF]), 0, "CAP_PERFMON,"),
            (
                mask(&[Capability::PERFMON, Capability::NET_ADMIN]),
                0,
                "CAP_BPF,",
            ),
        ] {
            let msg = caps.check(uid, true).expect_err("refused").to_string();
            assert!(
                msg.starts_with(&format!("this process lacks {missing}")),
                "{msg}"
            );
            assert!(msg.contains(&format!("(uid {uid})")), "{msg}");
            assert!(
                msg.contains(
                    "CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN, CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH"
                ),
                "names the whole set: {msg}"
            );
            assert!(msg.contains("as root"), "{msg}");
            assert!(!msg.contains("CAP_SYS_RESOURCE"), "not needed: {msg}");
        }
    }

    #[test]
    fn missing_optional_capabilities_say_what_they_leave_out() {
        // CAP_SYS_ADMIN stands in for CAP_BPF and CAP_PERFMON, as in the kernel.
        let admin = mask(&[Capability::SYS_ADMIN]);
        let warnings = admin.check(0, true).expect("loads");
        assert_eq!(warnings.len(), 3, "{warnings:#?}");
        assert!(warnings[0].contains("context propagation will be off"));
        assert!(warnings[1].contains("--exe cannot select them"));
        assert!(warnings[2].contains("--port cannot select them"));
        // No injector asked for: CAP_NET_ADMIN is not missed; DAC_OVERRIDE reads as well.
        let warnings = mask(&[
            Capability::BPF,
            Capability::PERFMON,
            Capability::SYS_PTRACE,
            Capability::DAC_OVERRIDE,
        ])
        .check(0, false)
        .expect("loads");
        assert!(warnings.is_empty(), "{warnings:#?}");
    }
}
