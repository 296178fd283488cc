//! The only reader of `/proc`: what the agent learns about processes (`process.rs`), the
//! host and itself (`system.rs`). Every other module asks here.

mod process;
mod system;

use std::path::PathBuf;

pub use process::{ProcessError, ProcessFacts, strip_deleted};
pub use system::hostname;

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
}
