//! What the host offers, checked before loading: privileges, kernel version, tracefs, BTF.

use std::path::Path;

use thiserror::Error;

pub const TRACEFS: &str = "/sys/kernel/tracing";

#[derive(Debug, Error)]
pub enum EnvironmentError {
    #[error(
        "the agent must run as root (or with CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN for tracefs): it loads eBPF programs; try `sudo agent`"
    )]
    NotRoot,
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
}

pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// Checks what the probes need, mounting tracefs when it is missing.
pub fn prepare() -> Result<Environment, EnvironmentError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(EnvironmentError::NotRoot);
    }
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
    })
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
