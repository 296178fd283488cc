//! The only reader of `/proc`: what the agent learns about processes (`process.rs`), their
//! sockets (`net.rs`), the host and itself (`system.rs`). Every other module asks here.

mod net;
mod process;
mod system;

use std::path::PathBuf;

pub use process::{ProcessError, ProcessFacts};
pub use system::{hostname, kernel_release, own_mountinfo, own_status};

/// Where the kernel shows its processes.
const ROOT: &str = "/proc";

/// The process directories of `/proc` (a fake tree in tests).
#[derive(Clone, Debug)]
pub struct ProcFs {
    root: PathBuf,
}

impl ProcFs {
    /// The host's `/proc`.
    pub fn host() -> Self {
        Self {
            root: PathBuf::from(ROOT),
        }
    }

    /// A fake `/proc` tree: `root/PID/{status,comm,…}`.
    #[cfg(test)]
    pub fn at(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// `/proc/PID`.
    fn dir(&self, pid: u32) -> PathBuf {
        self.root.join(pid.to_string())
    }

    /// Whether process `pid` exists (or is a zombie not yet reaped).
    pub fn exists(&self, pid: u32) -> bool {
        self.dir(pid).exists()
    }

    /// Every process's pid; none when `/proc` cannot be listed.
    pub fn pids(&self) -> Vec<u32> {
        let Ok(dir) = std::fs::read_dir(&self.root) else {
            return Vec::new();
        };
        dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect()
    }
}
