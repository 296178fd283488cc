//! The only reader of `/proc`: what the agent learns about processes (`process.rs`), their
//! sockets (`net.rs`), the host and itself (`system.rs`). Every other module asks here.
//!
//! The `procfs` crate reads the TCP socket tables: one 8 KiB read per table where
//! `read_to_string` doubles its way up (nine reads for 3 KiB), for the same CPU (measured on the dev VM, both
//! tables: 6.6-6.9 ms with procfs, 6.8-8.4 ms without, mostly kernel time). The rest is read
//! by hand, measured against procfs 0.18 over the 97 processes of the same VM:
//! - the selection scan (every 2 s, every process): procfs opens `/proc/PID` before reading any
//!   file of it and stats each descriptor it lists: `comm` of all processes 903 µs of CPU
//!   instead of 640, socket inodes for `--port` 4.2 ms instead of 2.9;
//! - resources (once per process): `Process::cmdline` fails on an argument that is not UTF-8
//!   (we keep it, lossily), `Status` needs about twenty fields where we read `Uid:`, and all of it
//!   took 5.8 ms instead of 5.0;
//! - the host name and the kernel release: procfs has no reader for either string;
//! - the agent's own `CapEff:` line and cgroup2 mount point, read once at start-up: procfs's
//!   `Status` and `MountInfos` would parse every field of those files for the same answer.

mod net;
mod process;
mod system;

use std::{io, path::PathBuf};

pub use process::{Executable, ProcessFacts};
pub use system::{hostname, kernel_release, own_file_offset, own_mountinfo, own_status};

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The process exited (or never existed) before it could be inspected.
    #[error(
        "process {pid} is gone: /proc/{pid} does not exist (it exited before it could be inspected)"
    )]
    Gone { pid: u32 },
    /// `/proc/PID/...` exists but could not be read.
    #[error(
        "cannot read /proc/{pid}/{file}: {source}; run the agent as root (or with CAP_SYS_PTRACE and \
         CAP_DAC_READ_SEARCH) to inspect processes of other users"
    )]
    Read {
        pid: u32,
        file: &'static str,
        #[source]
        source: io::Error,
    },
}

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
