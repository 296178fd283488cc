//! Child processes that never outlive the test: own process group, `PR_SET_PDEATHSIG`, and a
//! `Drop` that kills the whole group even while a test is unwinding from a panic.

use std::fs;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// Polling period of every wait in the harness.
pub const POLL: Duration = Duration::from_millis(50);

/// A private scratch directory, removed on drop unless the test is panicking or `E2E_KEEP` is
/// set (then it is kept and its path printed, so logs and configs can be inspected).
#[derive(Debug)]
pub struct TestDir {
    path: PathBuf,
}

impl TestDir {
    pub fn new(label: &str) -> TestDir {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir()
            .join("agent-e2e")
            .join(format!("{label}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create temp dir {}: {e}", path.display()));
        TestDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if thread::panicking() || std::env::var_os("E2E_KEEP").is_some() {
            eprintln!("[e2e] kept {} for inspection", self.path.display());
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// A spawned child in its own process group. Dropping it SIGKILLs the group and reaps the child.
#[derive(Debug)]
pub struct ChildGuard {
    name: String,
    child: Child,
    exited: Option<ExitStatus>,
}

impl ChildGuard {
    /// Spawns `cmd` in a new process group, with stdout/stderr appended to the given files.
    /// The child gets `PR_SET_PDEATHSIG(SIGKILL)` so even a SIGKILLed test binary leaves nothing behind.
    pub fn spawn(name: &str, mut cmd: Command, stdout: &Path, stderr: &Path) -> ChildGuard {
        let out = open_log(stdout);
        let err = open_log(stderr);
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        Self::spawn_configured(name, cmd)
    }

    /// Spawns a command whose stdio the caller already configured.
    pub fn spawn_configured(name: &str, mut cmd: Command) -> ChildGuard {
        cmd.process_group(0);
        kill_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {name} ({cmd:?}): {e}"));
        ChildGuard {
            name: name.to_string(),
            child,
            exited: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// `Some(status)` once the child has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self
                .child
                .try_wait()
                .unwrap_or_else(|e| panic!("waiting for {}: {e}", self.name));
        }
        self.exited
    }

    /// Waits up to `timeout` ([`crate::scaled`]) for the child to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + crate::scaled(timeout);
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends `signal` to the child only (not its group).
    pub fn signal(&self, signal: i32) {
        if self.exited.is_none() {
            // SAFETY: plain syscall on a pid we own and have not reaped.
            unsafe {
                libc::kill(self.child.id() as libc::pid_t, signal);
            }
        }
    }

    /// SIGKILLs the whole process group and reaps the child.
    pub fn kill(&mut self) {
        let pgid = self.child.id() as libc::pid_t;
        // SAFETY: the group was created for this child (process_group(0)); even after the
        // leader exited, members of its group are ours.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
        if self.exited.is_none() {
            let _ = self.child.kill();
            self.exited = self.child.wait().ok();
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The child gets SIGKILL when the process that spawned it dies, even without cleaning up
/// (SIGKILL, abort). Set after any uid change of `cmd`, so it survives that.
pub fn kill_with_parent(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

fn open_log(path: &Path) -> fs::File {
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("cannot open log file {}: {e}", path.display()))
}

/// Every process in /proc now, by pid (unsorted; empty if /proc cannot be read).
pub fn pids() -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
        .collect()
}

/// Reads a log file as text (lossy), empty if it does not exist yet.
pub fn read_text(path: &Path) -> String {
    match fs::read(path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(_) => String::new(),
    }
}

/// The last `n` lines of `text`, for panic messages.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(n);
    let mut out = String::new();
    if start > 0 {
        out.push_str(&format!("[... {start} earlier lines ...]\n"));
    }
    for line in &lines[start..] {
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Polls `probe` until it returns `Some`, or `None` after `timeout` ([`crate::scaled`]).
pub fn poll_until<T>(timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + crate::scaled(timeout);
    loop {
        if let Some(value) = probe() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(POLL);
    }
}

/// Runs a short-lived command to completion with a timeout ([`crate::scaled`]); returns
/// (status, stdout, stderr). Panics with the command's output when it times out.
pub fn run_to_completion(
    name: &str,
    cmd: Command,
    timeout: Duration,
) -> (ExitStatus, String, String, u32) {
    let dir = TestDir::new(name);
    let out = dir.join("stdout");
    let err = dir.join("stderr");
    let mut child = ChildGuard::spawn(name, cmd, &out, &err);
    let pid = child.pid();
    let status = child.wait_timeout(timeout);
    let stdout = read_text(&out);
    let stderr = read_text(&err);
    match status {
        Some(status) => (status, stdout, stderr, pid),
        None => {
            child.kill();
            panic!(
                "{name} (pid {pid}) did not finish within {:?}\nstdout:\n{}\nstderr:\n{}",
                crate::scaled(timeout),
                tail(&stdout, 40),
                tail(&stderr, 40)
            )
        }
    }
}

/// How long [`run_gated`] waits for its gate to open.
pub const GATE_TIMEOUT: Duration = Duration::from_secs(15);

/// Runs a command that blocks reading its stdin before it does the work under test (a
/// script waiting for a line, `curl -K -`, `psql -f -`): polls `open(pid)` until it says the
/// process may go on (e.g. the agent attached to a library the process loaded), then writes
/// `stdin` and closes it, and waits for the exit as [`run_to_completion`]. Panics with the
/// command's output when the child exits before the gate opens or the gate stays shut.
pub fn run_gated(
    name: &str,
    mut cmd: Command,
    mut open: impl FnMut(u32) -> bool,
    stdin: &[u8],
    timeout: Duration,
) -> (ExitStatus, String, String, u32) {
    use std::io::Write as _;

    let dir = TestDir::new(name);
    let out = dir.join("stdout");
    let err = dir.join("stderr");
    cmd.stdin(Stdio::piped())
        .stdout(open_log(&out))
        .stderr(open_log(&err));
    let mut child = ChildGuard::spawn_configured(name, cmd);
    let pid = child.pid();
    let deadline = Instant::now() + crate::scaled(GATE_TIMEOUT);
    loop {
        if open(pid) {
            break;
        }
        if let Some(status) = child.try_wait() {
            panic!(
                "{name} (pid {pid}) exited with {status} while waiting at its gate\nstdout:\n{}\nstderr:\n{}",
                tail(&read_text(&out), 40),
                tail(&read_text(&err), 40)
            );
        }
        if Instant::now() >= deadline {
            child.kill();
            panic!(
                "{name} (pid {pid}): its gate did not open within {:?}\nstdout:\n{}\nstderr:\n{}",
                crate::scaled(GATE_TIMEOUT),
                tail(&read_text(&out), 40),
                tail(&read_text(&err), 40)
            );
        }
        thread::sleep(POLL);
    }
    if let Some(mut pipe) = child.child_mut().stdin.take() {
        // A child that exits without reading (a failure) shows in its status and output.
        let _ = pipe.write_all(stdin);
    }
    let status = child.wait_timeout(timeout);
    let stdout = read_text(&out);
    let stderr = read_text(&err);
    match status {
        Some(status) => (status, stdout, stderr, pid),
        None => {
            child.kill();
            panic!(
                "{name} (pid {pid}) did not finish within {:?} after its gate opened\nstdout:\n{}\nstderr:\n{}",
                crate::scaled(timeout),
                tail(&stdout, 40),
                tail(&stderr, 40)
            )
        }
    }
}
