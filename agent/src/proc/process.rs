//! Per-process files: `/proc/PID/{status,comm,exe,cmdline,environ,cgroup,fd}`, and the
//! process's own `/etc/passwd` through `/proc/PID/root`.

use std::{
    io,
    path::{Path, PathBuf},
};

use super::{ProcFs, ProcessError};

/// What `/proc/PID` tells of a process when its resource is built.
#[derive(Debug, Default)]
pub struct ProcessFacts {
    /// The kernel's command name (`comm`); empty when unreadable.
    pub comm: String,
    /// The real executable (`exe`); `None` without ptrace-read access.
    pub exe: Option<PathBuf>,
    /// The command line (`cmdline`), each argument read as UTF-8 (lossily).
    pub args: Vec<String>,
    /// The environment (`environ`): `NAME=value` entries separated by NULs; empty without
    /// ptrace-read access.
    pub environ: Vec<u8>,
    /// The effective user (`status`), named as `ps` shows it: its name, else its uid.
    pub owner: Option<String>,
}

/// A process's program file: `path` (`/proc/PID/exe`) opens it from here whatever mount
/// namespace the process runs in, and uprobes attached through it land on its inode; `dev` and
/// `ino` identify the file; `name` is the path the process sees (for messages).
#[derive(Debug, Clone)]
pub struct Executable {
    pub dev: u64,
    pub ino: u64,
    pub path: PathBuf,
    pub name: String,
}

impl ProcFs {
    /// Reads what a resource needs of process `pid`. Only a process that is gone, or whose
    /// `status` cannot be read, is an error: without access to the other files, less is known.
    pub fn facts(&self, pid: u32) -> Result<ProcessFacts, ProcessError> {
        let dir = self.dir(pid);
        let read = |file: &'static str| -> Result<Vec<u8>, ProcessError> {
            std::fs::read(dir.join(file)).map_err(|source| classify(pid, file, source, &dir))
        };

        // `status` is readable for every process: it tells whether the process still exists.
        let status = read("status")?;
        let status = String::from_utf8_lossy(&status);
        let euid = status_uid(&status);
        let comm = read("comm")
            .map(|c| {
                String::from_utf8_lossy(&c)
                    .trim_end_matches('\n')
                    .to_owned()
            })
            .unwrap_or_default();
        // exe and environ need ptrace-read access; without it we still produce a resource.
        let exe = match std::fs::read_link(dir.join("exe")) {
            Ok(path) => Some(strip_deleted(path)),
            Err(e) if e.kind() == io::ErrorKind::NotFound && !dir.exists() => {
                return Err(ProcessError::Gone { pid });
            }
            Err(_) => None,
        };
        let cmdline = read("cmdline").unwrap_or_default();
        let environ = read("environ").unwrap_or_default();

        let args = cmdline
            .split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let owner = euid.map(|uid| self.user_name(pid, uid).unwrap_or_else(|| uid.to_string()));
        Ok(ProcessFacts {
            comm,
            exe,
            args,
            environ,
            owner,
        })
    }

    /// The command name (`comm`) as selection matches it; `None` when the process is gone or
    /// the name is not UTF-8.
    pub fn comm(&self, pid: u32) -> Option<String> {
        std::fs::read_to_string(self.dir(pid).join("comm"))
            .ok()
            .map(|s| s.trim_end().to_string())
    }

    /// The real executable (`exe`), as selection matches it; `None` without ptrace-read access.
    pub fn exe(&self, pid: u32) -> Option<PathBuf> {
        std::fs::read_link(self.dir(pid).join("exe"))
            .ok()
            .map(strip_deleted)
    }

    /// The program file process `pid` runs, as the kernel holds it (see [`Executable`]);
    /// `None` when the process is gone or its `exe` link cannot be followed.
    pub fn executable(&self, pid: u32) -> Option<Executable> {
        use std::os::unix::fs::MetadataExt;
        let path = self.dir(pid).join("exe");
        let meta = std::fs::metadata(&path).ok()?;
        let name = std::fs::read_link(&path)
            .map(|p| strip_deleted(p).display().to_string())
            .unwrap_or_else(|_| path.display().to_string());
        Some(Executable {
            dev: meta.dev(),
            ino: meta.ino(),
            path,
            name,
        })
    }

    /// The files process `pid` maps executable (its program, shared libraries), once each, in
    /// the order of `maps`; `path` is the `map_files` link, which opens the file from any mount
    /// namespace. None when the process is gone or its maps cannot be read.
    pub fn executable_mappings(&self, pid: u32) -> Vec<Executable> {
        use std::os::unix::fs::MetadataExt;
        let dir = self.dir(pid);
        let Ok(maps) = std::fs::read_to_string(dir.join("maps")) else {
            return Vec::new();
        };
        let mut seen = std::collections::HashSet::new();
        let mut files = Vec::new();
        for (range, name) in maps.lines().filter_map(executable_file_mapping) {
            let Some(range) = map_files_name(range) else {
                continue;
            };
            let path = dir.join("map_files").join(range);
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            if seen.insert((meta.dev(), meta.ino())) {
                files.push(Executable {
                    dev: meta.dev(),
                    ino: meta.ino(),
                    path,
                    name: name.to_string(),
                });
            }
        }
        files
    }

    /// The inodes of the sockets process `pid` holds open (`fd/N` → `socket:[INODE]`); none
    /// without access to its file descriptors.
    pub fn socket_inodes(&self, pid: u32) -> impl Iterator<Item = u64> {
        std::fs::read_dir(self.dir(pid).join("fd"))
            .into_iter()
            .flatten()
            .filter_map(|entry| {
                let link = std::fs::read_link(entry.ok()?.path()).ok()?;
                link.to_str()?
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .parse()
                    .ok()
            })
    }

    /// `/proc/PID/cgroup`: where the process runs (see `k8s::cgroup`). `None` when the process
    /// is gone or the file unreadable.
    pub fn cgroup(&self, pid: u32) -> Option<String> {
        std::fs::read_to_string(self.dir(pid).join("cgroup")).ok()
    }

    /// The user name of `uid`, from the process's own `/etc/passwd` (it may live in a
    /// container), then the host's.
    fn user_name(&self, pid: u32, uid: u32) -> Option<String> {
        let own = self.dir(pid).join("root/etc/passwd");
        [own.as_path(), Path::new("/etc/passwd")]
            .into_iter()
            .find_map(|path| {
                let text = read_regular_file(path, MAX_PASSWD_LEN)?;
                passwd_lookup(&String::from_utf8_lossy(&text), uid)
            })
    }
}

fn classify(pid: u32, file: &'static str, source: io::Error, dir: &Path) -> ProcessError {
    // ESRCH: the process died between open and read.
    let gone = source.kind() == io::ErrorKind::NotFound
        || source.raw_os_error() == Some(libc::ESRCH)
        || !dir.exists();
    if gone {
        ProcessError::Gone { pid }
    } else {
        ProcessError::Read { pid, file, source }
    }
}

/// A `maps` line of an executable file mapping: its address range and the file's path.
/// (`start-end perms offset dev inode path`; anonymous and special mappings have no path
/// starting with `/`.)
fn executable_file_mapping(line: &str) -> Option<(&str, &str)> {
    let mut fields = line.splitn(6, ' ');
    let range = fields.next()?;
    let perms = fields.next()?;
    let path = fields.nth(3)?.trim_start();
    (perms.as_bytes().get(2) == Some(&b'x') && path.starts_with('/'))
        .then(|| (range, path.strip_suffix(" (deleted)").unwrap_or(path)))
}

/// The name of a mapping in `map_files/`: its range without the leading zeros `maps` pads
/// addresses with (a non-PIE program, as Go builds, is mapped at `00400000`).
fn map_files_name(range: &str) -> Option<String> {
    let (start, end) = range.split_once('-')?;
    let start = u64::from_str_radix(start, 16).ok()?;
    let end = u64::from_str_radix(end, 16).ok()?;
    Some(format!("{start:x}-{end:x}"))
}

fn strip_deleted(path: PathBuf) -> PathBuf {
    match path.to_str().and_then(|s| s.strip_suffix(" (deleted)")) {
        Some(s) => PathBuf::from(s),
        None => path,
    }
}

/// Effective uid from `/proc/PID/status` (`Uid: real effective saved fs`), as `ps` shows it.
fn status_uid(status: &str) -> Option<u32> {
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    let mut ids = line["Uid:".len()..].split_whitespace();
    let real = ids.next()?;
    ids.next().unwrap_or(real).parse().ok()
}

/// Longest `/etc/passwd` read.
const MAX_PASSWD_LEN: u64 = 4 << 20;

/// Reads at most `limit` bytes of a regular file. The file may belong to a traced container:
/// a FIFO or device planted there must not block or flood the agent.
fn read_regular_file(path: &Path, limit: u64) -> Option<Vec<u8>> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .ok()?;
    if !file.metadata().ok()?.is_file() {
        return None;
    }
    let mut buf = Vec::new();
    file.take(limit).read_to_end(&mut buf).ok()?;
    Some(buf)
}

fn passwd_lookup(passwd: &str, uid: u32) -> Option<String> {
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let _password = fields.next()?;
        let id: u32 = fields.next()?.parse().ok()?;
        (id == uid && !name.is_empty()).then(|| name.to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwd_that_is_a_fifo_is_not_read() {
        let path = std::env::temp_dir().join(format!("agent-fifo-test-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let status = std::process::Command::new("mkfifo").arg(&path).status();
        if !status.is_ok_and(|s| s.success()) {
            eprintln!("SKIPPED passwd_that_is_a_fifo_is_not_read: mkfifo is not available");
            return;
        }
        // Would block forever with a plain open + read.
        assert_eq!(read_regular_file(&path, 1024), None);
        let _ = std::fs::remove_file(&path);
        assert!(
            read_regular_file(Path::new("/proc/self/status"), 1024).is_none_or(|b| b.len() <= 1024)
        );
    }

    #[test]
    fn maps_lines_give_executable_file_mappings_only() {
        let lines = [
            "7f1c2a000000-7f1c2a0a4000 r-xp 00022000 08:01 1835 /usr/lib/x86_64-linux-gnu/libssl.so.3",
            "7f1c2a0a4000-7f1c2a0c0000 r--p 000c6000 08:01 1835 /usr/lib/x86_64-linux-gnu/libssl.so.3",
            "55d0c0a00000-55d0c0b00000 r-xp 00000000 00:2a 77   /opt/app/bin/server (deleted)",
            "7ffd1c5f0000-7ffd1c5f2000 r-xp 00000000 00:00 0                          [vdso]",
            "7f1c2b000000-7f1c2b100000 rwxp 00000000 00:00 0 ",
            "garbage",
        ];
        let found: Vec<_> = lines
            .iter()
            .filter_map(|l| executable_file_mapping(l))
            .collect();
        assert_eq!(
            found,
            [
                (
                    "7f1c2a000000-7f1c2a0a4000",
                    "/usr/lib/x86_64-linux-gnu/libssl.so.3"
                ),
                ("55d0c0a00000-55d0c0b00000", "/opt/app/bin/server"),
            ]
        );
    }

    #[test]
    fn map_files_names_have_no_padding() {
        // A non-PIE Go program: `maps` pads to 8 digits, `map_files/` does not.
        assert_eq!(
            map_files_name("00400000-006a0000").as_deref(),
            Some("400000-6a0000")
        );
        assert_eq!(
            map_files_name("7f1c2a000000-7f1c2a0a4000").as_deref(),
            Some("7f1c2a000000-7f1c2a0a4000")
        );
        assert_eq!(map_files_name("nope"), None);
    }

    #[test]
    fn this_process_maps_its_own_program() {
        let proc = ProcFs::host();
        let mine = proc.executable_mappings(std::process::id());
        let exe = proc.executable(std::process::id()).expect("own exe");
        assert!(
            mine.iter().any(|f| (f.dev, f.ino) == (exe.dev, exe.ino)),
            "{mine:?}"
        );
    }

    #[test]
    fn reads_this_process() {
        let proc = ProcFs::host();
        let me = std::process::id();
        assert!(proc.exists(me));
        assert!(proc.pids().contains(&me));
        // Whatever this machine is, our own cgroup file parses (and says host on the CI VM).
        assert!(proc.cgroup(me).is_some());
        let exe = std::env::current_exe().expect("current_exe");
        assert_eq!(proc.exe(me), Some(exe));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let inodes: Vec<u64> = proc.socket_inodes(me).collect();
        assert!(
            proc.tcp_sockets()
                .iter()
                .any(|s| s.local_port == port && inodes.contains(&s.inode)),
            "listener on {port} not among our sockets {inodes:?}"
        );
    }

    #[test]
    fn looks_up_users_and_uids() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\n# comment\nwww-data:x:33:33::/var/www:/usr/sbin/nologin\n";
        assert_eq!(passwd_lookup(passwd, 0).as_deref(), Some("root"));
        assert_eq!(passwd_lookup(passwd, 33).as_deref(), Some("www-data"));
        assert_eq!(passwd_lookup(passwd, 1000), None);
        assert_eq!(
            status_uid("Name:\tx\nUid:\t1000\t1001\t1000\t1000\nGid:\t0\n"),
            Some(1001)
        );
    }
}
