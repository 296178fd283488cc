//! One agent per host. A second agent would load its own probes beside the first one's, and
//! both would trace the same processes and export every span twice. Each agent holds an
//! `flock` on a file under /run: the kernel releases it when its holder exits, however it
//! exits (kill -9 included), so the lock never goes stale. The file holds the holder's pid,
//! for the message.

use std::{
    fs::{File, OpenOptions},
    io::{self, Read as _, Seek as _, Write as _},
    os::{fd::AsRawFd as _, unix::fs::OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use thiserror::Error;

/// Where the lock lives: /run is per boot, and shared by every agent of the host's mount
/// namespace (a container sees it when the host's directory is mounted there).
pub const LOCK_DIR: &str = "/run/ebpf-agent";
const LOCK_FILE: &str = "agent.lock";

#[derive(Debug, Error)]
pub enum InstanceError {
    #[error(
        "another agent is already running on this host ({holder}, holding {}): both would trace \
         the same processes and export every span twice. Stop it first, or start this one with \
         --allow-multiple-agents (EBPF_AGENT_ALLOW_MULTIPLE_AGENTS=true, config key \
         allow_multiple_agents) to run both",
        path.display()
    )]
    AlreadyRunning { holder: Holder, path: PathBuf },
    #[error("cannot check for another agent on this host: {}: {source}", path.display())]
    Unavailable { path: PathBuf, source: io::Error },
}

/// The agent holding the lock, as far as its file tells.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Holder(Option<u32>);

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(pid) => write!(f, "pid {pid}"),
            // It has not written its pid yet, or could not (no write access).
            None => f.write_str("pid unknown"),
        }
    }
}

/// This agent's claim on the host: the lock (held until dropped) or why there is none.
#[derive(Debug)]
pub struct Claim {
    _lock: Option<File>,
    /// What to tell the user when the agent runs without the lock.
    pub note: Option<String>,
}

/// Takes the host's agent lock in `dir`. Another agent holding it is an error unless
/// `allow_multiple`; a lock that cannot be taken at all (read-only /run) is a note, as the
/// agent can work without it.
pub fn claim(dir: &Path, allow_multiple: bool) -> Result<Claim, InstanceError> {
    match acquire(dir) {
        Ok(file) => Ok(Claim {
            _lock: Some(file),
            note: None,
        }),
        Err(InstanceError::AlreadyRunning { holder, .. }) if allow_multiple => Ok(Claim {
            _lock: None,
            note: Some(format!(
                "warning: another agent is running on this host ({holder}); running beside it \
                 (--allow-multiple-agents): spans of processes both trace are exported twice"
            )),
        }),
        Err(e @ InstanceError::AlreadyRunning { .. }) => Err(e),
        Err(e @ InstanceError::Unavailable { .. }) => Ok(Claim {
            _lock: None,
            note: Some(format!(
                "warning: {e}; a second agent on this host would not be detected (give the \
                 agent a writable {LOCK_DIR}, the host's own in a container)"
            )),
        }),
    }
}

/// The locked file, with this process's pid written in it.
fn acquire(dir: &Path) -> Result<File, InstanceError> {
    let path = dir.join(LOCK_FILE);
    let unavailable = |source| InstanceError::Unavailable {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(unavailable)?;
    // Without write access (a file left by root, an agent with capabilities but another uid)
    // the lock still works read-only; only the pid is not written.
    let (mut file, writable) = match open(&path, true) {
        Ok(file) => (file, true),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            (open(&path, false).map_err(unavailable)?, false)
        }
        Err(e) => return Err(unavailable(e)),
    };
    // SAFETY: a valid open descriptor; LOCK_NB makes the call return at once.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::WouldBlock {
            return Err(unavailable(err));
        }
        let mut text = String::new();
        let holder = file
            .read_to_string(&mut text)
            .ok()
            .and_then(|_| text.trim().parse().ok());
        return Err(InstanceError::AlreadyRunning {
            holder: Holder(holder),
            path,
        });
    }
    if writable {
        // A pid left by an agent that was killed goes: the lock was free, so it is stale.
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| writeln!(file, "{}", std::process::id()))
            .map_err(unavailable)?;
    }
    Ok(file)
}

fn open(path: &Path, write: bool) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(write)
        .create(write)
        .truncate(false)
        .mode(0o644)
        // A symlink planted in the directory must not redirect the agent's writes.
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

#[cfg(test)]
mod tests {
    use std::process::{Command, Stdio};

    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("agent-lock-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn the_first_agent_holds_the_lock_and_a_second_is_refused_with_its_pid() {
        let dir = temp_dir("second");
        let first = claim(&dir, false).expect("the first agent runs");
        assert!(first.note.is_none());
        let pid = std::fs::read_to_string(dir.join(LOCK_FILE)).expect("lock file");
        assert_eq!(pid.trim(), std::process::id().to_string());

        // flock locks belong to an open file: a second open, even in this process, conflicts.
        let err = claim(&dir, false).expect_err("a second agent is refused");
        let msg = err.to_string();
        assert!(
            msg.starts_with(&format!(
                "another agent is already running on this host (pid {}, holding {}",
                std::process::id(),
                dir.join(LOCK_FILE).display()
            )),
            "{msg}"
        );
        assert!(msg.contains("--allow-multiple-agents"), "{msg}");
        assert!(msg.contains("EBPF_AGENT_ALLOW_MULTIPLE_AGENTS"), "{msg}");

        let beside = claim(&dir, true).expect("allowed on purpose");
        let note = beside.note.expect("says so");
        assert!(
            note.contains(&format!("pid {}", std::process::id())),
            "{note}"
        );
        assert!(note.contains("exported twice"), "{note}");

        // The first one stops: the lock is free again.
        drop(first);
        let third = claim(&dir, false).expect("free after the holder ended");
        assert!(third.note.is_none());
        drop(third);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_killed_holder_leaves_no_stale_lock() {
        let dir = temp_dir("killed");
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join(LOCK_FILE);
        // Another process takes the lock (with flock(1) on a descriptor it keeps) and is then
        // killed -9 while holding it.
        let mut holder = Command::new("sh")
            .args([
                "-c",
                "exec 9>>\"$0\"; flock --exclusive 9; echo $$ >\"$0\"; exec sleep 60",
            ])
            .arg(&path)
            .stdout(Stdio::null())
            .spawn()
            .expect("sh and flock(1)");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match claim(&dir, false) {
                // Once it has written its pid.
                Err(InstanceError::AlreadyRunning { holder: h, .. })
                    if h == Holder(Some(holder.id())) =>
                {
                    break;
                }
                Err(InstanceError::AlreadyRunning { .. }) => {}
                Ok(claimed) => drop(claimed),
                Err(e) => panic!("{e}"),
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the shell never took the lock"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        holder.kill().expect("kill -9");
        holder.wait().expect("reaped");
        let claimed = claim(&dir, false).expect("the dead holder's lock is gone");
        assert!(claimed.note.is_none());
        drop(claimed);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn no_writable_directory_is_a_warning_not_a_refusal() {
        // A regular file where the directory should be: it cannot be created.
        let blocker = temp_dir("blocked");
        std::fs::write(&blocker, "").expect("file");
        let claimed = claim(&blocker.join("sub"), false).expect("runs without the lock");
        let note = claimed.note.expect("says why");
        assert!(
            note.starts_with("warning: cannot check for another agent on this host"),
            "{note}"
        );
        assert!(note.contains("writable /run/ebpf-agent"), "{note}");
        let _ = std::fs::remove_file(&blocker);
    }
}
