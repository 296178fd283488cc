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
