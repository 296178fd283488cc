//! Host-wide files of `/proc`.

use super::ROOT;

/// The kernel's host name (`/proc/sys/kernel/hostname`), trimmed; `None` when unreadable or
/// empty.
pub fn hostname() -> Option<String> {
    std::fs::read_to_string(format!("{ROOT}/sys/kernel/hostname"))
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

/// The kernel's release (`/proc/sys/kernel/osrelease`), trimmed.
pub fn kernel_release() -> Option<String> {
    std::fs::read_to_string(format!("{ROOT}/sys/kernel/osrelease"))
        .ok()
        .map(|s| s.trim().to_string())
}

/// The agent's own `/proc/self/status` (its capabilities).
pub fn own_status() -> std::io::Result<String> {
    std::fs::read_to_string(format!("{ROOT}/self/status"))
}

/// The agent's own `/proc/self/mountinfo` (where the cgroup v2 hierarchy is mounted).
pub fn own_mountinfo() -> std::io::Result<String> {
    std::fs::read_to_string(format!("{ROOT}/self/mountinfo"))
}
