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

/// The file and file offset of one of the agent's own code addresses (`/proc/self/maps`): where
/// a uprobe on it goes.
pub fn own_file_offset(address: u64) -> Option<(std::path::PathBuf, u64)> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (start, end) = fields.next()?.split_once('-')?;
        let (start, end) = (
            u64::from_str_radix(start, 16).ok()?,
            u64::from_str_radix(end, 16).ok()?,
        );
        let _perms = fields.next()?;
        let offset = u64::from_str_radix(fields.next()?, 16).ok()?;
        let path = fields.nth(2)?;
        (start <= address && address < end && path.starts_with('/'))
            .then(|| (path.into(), address - start + offset))
    })
}

#[cfg(test)]
mod own_file_offset_tests {
    #[inline(never)]
    fn somewhere() -> u64 {
        std::hint::black_box(7)
    }

    #[test]
    fn a_function_of_ours_is_found_in_our_own_program_file() {
        let (path, offset) =
            super::own_file_offset(somewhere as *const () as u64).expect("mapped from a file");
        let exe = super::super::ProcFs::host()
            .exe(std::process::id())
            .expect("own exe");
        assert_eq!(
            std::fs::canonicalize(path).expect("path"),
            std::fs::canonicalize(exe).expect("exe")
        );
        assert!(offset > 0);
        assert_eq!(super::own_file_offset(0), None);
    }
}
