//! Attaching the `traceparent` injector (cgroup sock_ops + sk_msg), proving it safe with a
//! start-up canary (a loopback exchange of the agent's own whose bytes must arrive exactly as
//! sent plus one header per request, and whose answers must read exactly as on a socket
//! outside any map), and userspace's part while it runs: parked sockets rejoin the map. Any
//! canary failure turns injection off; tracing goes on.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
    time::{Duration, Instant},
};

use agent_common::{SEND_BOUNDARY, SEND_LOST, SendState, TrackedSocket};
use aya::{
    Ebpf,
    maps::{HashMap as AyaHashMap, MapData, ProgramArray, SockHash},
    programs::{CgroupAttachMode, SkMsg, SockOps},
};

use super::Attached;
use crate::{idmap::IdMap, proc, spans::context::parse_traceparent};

/// Where the agent mounts the unified cgroup hierarchy when the host has not (cgroup v1-only
/// hosts): the sock_ops program attaches to its root, so every socket on the host passes it;
/// only selected processes' sockets are enrolled.
const OWN_CGROUP2_MOUNT: &str = "/run/ebpf-agent/cgroup2";

/// How the injector runs on this kernel, as its start-up canary found out.
pub struct Started {
    pub attached: Vec<Attached>,
    /// Sockets leave the injector's map while their answer is read (why), or stay in it.
    pub parking: Option<String>,
}

/// Attaches the injector and proves it with the canary: first with sockets that stay in the
/// map; if their answers then read differently, with parking (see `inject.rs` in the kernel
/// programs). Errors are sentences for the start-up report.
pub fn start(ebpf: &mut Ebpf) -> Result<Started, String> {
    let mut attached = vec![attach_sk_msg(ebpf)?];
    let parking = match canary(ebpf, Enrollment::Userspace) {
        Ok(()) => None,
        Err(CanaryError::Reads(why)) => {
            set_parking(ebpf)?;
            Some(why)
        }
        Err(CanaryError::Other(why)) => return Err(why),
    };
    // Attached once the mode is set: every socket it enrolls is enrolled in that mode.
    attached.push(attach_sock_ops(ebpf)?);
    if let Some(why) = &parking {
        canary(ebpf, Enrollment::Kernel)
            .map_err(|e| format!("{} (parking was tried because {why})", e.into_message()))?;
    }
    Ok(Started { attached, parking })
}

fn set_parking(ebpf: &mut Ebpf) -> Result<(), String> {
    let map = ebpf
        .map_mut("INJECT_PARKING")
        .ok_or("map INJECT_PARKING is missing (rebuild the agent)")?;
    let mut array: aya::maps::Array<_, u32> =
        aya::maps::Array::try_from(map).map_err(|e| format!("INJECT_PARKING: {e}"))?;
    array
        .set(0, &1, 0)
        .map_err(|e| format!("INJECT_PARKING: {}", chain(&e)))
}

fn attach_sock_ops(ebpf: &mut Ebpf) -> Result<Attached, String> {
    let root = cgroup2_root()?;
    let cgroup = std::fs::File::open(&root)
        .map_err(|e| format!("cannot open the cgroup v2 root {root}: {e}"))?;
    let sock_ops: &mut SockOps = ebpf
        .program_mut("agent_sock_ops")
        .ok_or("program agent_sock_ops is missing (rebuild the agent)")?
        .try_into()
        .map_err(|e| format!("agent_sock_ops: {e}"))?;
    sock_ops
        .load()
        .map_err(|e| format!("the kernel refused the sock_ops program: {}", chain(&e)))?;
    sock_ops
        // A cgroup link (flags must be 0: links never exclude other programs).
        .attach(&cgroup, CgroupAttachMode::Single)
        .map_err(|e| {
            format!(
                "cannot attach sock_ops to the cgroup v2 root {root}: {}",
                chain(&e)
            )
        })?;
    Ok(Attached {
        program: "agent_sock_ops",
        hook: format!("cgroup sock_ops ({root})"),
    })
}

fn attach_sk_msg(ebpf: &mut Ebpf) -> Result<Attached, String> {
    let map = ebpf
        .map("SOCKETS_TO_INJECT")
        .ok_or("map SOCKETS_TO_INJECT is missing (rebuild the agent)")?;
    let hash: SockHash<_, u64> =
        SockHash::try_from(map).map_err(|e| format!("SOCKETS_TO_INJECT: {e}"))?;
    let map_fd = hash
        .fd()
        .try_clone()
        .map_err(|e| format!("SOCKETS_TO_INJECT: {e}"))?;
    let sk_msg: &mut SkMsg = ebpf
        .program_mut("agent_sk_msg")
        .ok_or("program agent_sk_msg is missing (rebuild the agent)")?
        .try_into()
        .map_err(|e| format!("agent_sk_msg: {e}"))?;
    sk_msg
        .load()
        .map_err(|e| format!("the kernel refused the sk_msg program: {}", chain(&e)))?;
    // The injector tail-calls itself for each further request of a message.
    let prog_fd = sk_msg
        .fd()
        .and_then(|fd| fd.try_clone().map_err(Into::into))
        .map_err(|e| format!("agent_sk_msg: {}", chain(&e)))?;
    {
        let map = ebpf
            .map_mut("INJECT_PROGRAMS")
            .ok_or("map INJECT_PROGRAMS is missing (rebuild the agent)")?;
        let mut programs =
            ProgramArray::try_from(map).map_err(|e| format!("INJECT_PROGRAMS: {e}"))?;
        programs
            .set(0, &prog_fd, 0)
            .map_err(|e| format!("INJECT_PROGRAMS: {}", chain(&e)))?;
    }
    let sk_msg: &mut SkMsg = ebpf
        .program_mut("agent_sk_msg")
        .ok_or("program agent_sk_msg is missing (rebuild the agent)")?
        .try_into()
        .map_err(|e| format!("agent_sk_msg: {e}"))?;
    sk_msg
        .attach(&map_fd)
        .map_err(|e| format!("cannot attach sk_msg to the socket map: {}", chain(&e)))?;
    Ok(Attached {
        program: "agent_sk_msg",
        hook: "sk_msg (SOCKETS_TO_INJECT)".into(),
    })
}

/// An error with its causes, as one sentence.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// The mount point of the unified (v2) cgroup hierarchy: `/sys/fs/cgroup` on most hosts,
/// `/sys/fs/cgroup/unified` on hybrid ones; mounted by us when the host has none.
fn cgroup2_root() -> Result<String, String> {
    let mountinfo =
        proc::own_mountinfo().map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
    if let Some(found) = find_cgroup2(&mountinfo) {
        return Ok(found);
    }
    std::fs::create_dir_all(OWN_CGROUP2_MOUNT)
        .map_err(|e| format!("no cgroup v2 mount, and cannot create {OWN_CGROUP2_MOUNT}: {e}"))?;
    let status = std::process::Command::new("mount")
        .args(["-t", "cgroup2", "none", OWN_CGROUP2_MOUNT])
        .status()
        .map_err(|e| format!("no cgroup v2 mount, and cannot run mount: {e}"))?;
    if !status.success() {
        return Err(format!(
            "no cgroup v2 mount, and `mount -t cgroup2 none {OWN_CGROUP2_MOUNT}` failed: mount one"
        ));
    }
    Ok(OWN_CGROUP2_MOUNT.to_string())
}

/// The first cgroup2 mount point in a mountinfo text.
fn find_cgroup2(mountinfo: &str) -> Option<String> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        let mount_point = left.split_whitespace().nth(4)?;
        // Octal escapes (\040 for a space) are rare in cgroup mount points; keep them out.
        (fstype == "cgroup2" && !mount_point.contains('\\')).then(|| mount_point.to_string())
    })
}

/// Two writes on one keep-alive connection: a plain GET, then a POST with a body and a
/// pipelined GET carrying its own `traceparent` in one write.
const CANARY_WRITES: [&[u8]; 2] = [
    b"GET /agent-canary/1 HTTP/1.1\r\nHost: canary\r\nAccept: */*\r\n\r\n",
    b"POST /agent-canary/2 HTTP/1.1\r\nHost: canary\r\nContent-Length: 12\r\n\r\nhello\r\n\r\nGET\
      GET /agent-canary/3 HTTP/1.1\r\nHost: canary\r\ntraceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n\r\n",
];

/// The canary server's answer to each write (its size only matters: the client must see it
/// exactly as a socket outside any map would).
const CANARY_ANSWER: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 300\r\n\r\n\
    ..........................................................................................\
    ..........................................................................................\
    ..........................................................................................\
    ..............................";

/// How the canary's socket gets into the injector's map.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Enrollment {
    /// Put there by userspace after connecting, and left there (no sock_ops program yet).
    Userspace,
    /// Enrolled by the sock_ops program as for a traced client, parked when answered, put back
    /// by userspace before its next write.
    Kernel,
}

/// Why the canary failed.
enum CanaryError {
    /// An answer read differently than on a socket outside any map (the reason).
    Reads(String),
    Other(String),
}

impl CanaryError {
    fn into_message(self) -> String {
        match self {
            Self::Reads(m) | Self::Other(m) => m,
        }
    }
}

impl From<String> for CanaryError {
    fn from(m: String) -> Self {
        Self::Other(m)
    }
}

impl From<&str> for CanaryError {
    fn from(m: &str) -> Self {
        Self::Other(m.to_string())
    }
}

/// Runs the injector end to end on a loopback connection of the agent's own, exactly as for a
/// traced client. What the server receives must be the canary's bytes plus the headers; what
/// the client reads must look exactly as on a socket outside any map: readiness (epoll and
/// select), `FIONREAD` and `MSG_PEEK` report the waiting answer.
fn canary(ebpf: &mut Ebpf, enrollment: Enrollment) -> Result<(), CanaryError> {
    let listener =
        TcpListener::bind("127.0.0.1:0").map_err(|e| format!("canary: cannot listen: {e}"))?;
    let addr = listener.local_addr().map_err(|e| format!("canary: {e}"))?;
    let socket = new_tcp_socket()?;
    let cookie = socket_cookie(socket.as_fd())?;
    if enrollment == Enrollment::Userspace {
        connect(&socket, addr)?;
        inject_sockets(ebpf)?
            .insert(&cookie, socket.as_raw_fd(), 0)
            .map_err(|e| format!("canary: cannot enroll the canary socket: {e}"))?;
        return run_canary(ebpf, socket, cookie, &listener, enrollment);
    }
    // Marked as a traced process's socket before it connects, so sock_ops enrolls it.
    let own = TrackedSocket {
        pid: std::process::id(),
        addresses_sent: 0,
        write_stamp_floor_ns: 0,
    };
    tracked_sockets(ebpf)?
        .insert(&cookie, &own, 0)
        .map_err(|e| format!("canary: cannot mark the canary socket: {e}"))?;
    let result = connect(&socket, addr)
        .map_err(CanaryError::from)
        .and_then(|()| run_canary(ebpf, socket, cookie, &listener, enrollment));
    let _ = tracked_sockets(ebpf)?.remove(&cookie);
    result
}

fn tracked_sockets(
    ebpf: &mut Ebpf,
) -> Result<AyaHashMap<&mut MapData, u64, TrackedSocket>, String> {
    let map = ebpf
        .map_mut("TRACKED_SOCKETS")
        .ok_or("map TRACKED_SOCKETS is missing")?;
    AyaHashMap::try_from(map).map_err(|e| format!("canary: TRACKED_SOCKETS: {e}"))
}

fn run_canary(
    ebpf: &mut Ebpf,
    socket: OwnedFd,
    cookie: u64,
    listener: &TcpListener,
    enrollment: Enrollment,
) -> Result<(), CanaryError> {
    let mut client = TcpStream::from(socket);
    let (mut server, _) = listener
        .accept()
        .map_err(|e| format!("canary: accept: {e}"))?;
    server
        .set_read_timeout(Some(Duration::from_millis(200)))
        .map_err(|e| format!("canary: {e}"))?;
    let mut got = Vec::new();
    let mut expected_len = 0;
    for (i, w) in CANARY_WRITES.iter().enumerate() {
        if i > 0 && enrollment == Enrollment::Kernel {
            // The answer parked the socket; userspace puts it back as for any traced client.
            let mut sockets = inject_sockets(ebpf)?;
            let candidate = RejoinCandidate {
                pid: std::process::id(),
                fd: client.as_raw_fd() as u32,
                sock_cookie: cookie,
                sk: 0,
                writes: 0,
            };
            match rejoin(&mut sockets, None, &mut Pidfds::default(), &candidate) {
                Rejoin::Rejoined => {}
                other => {
                    return Err(format!("canary: the socket could not rejoin: {other:?}").into());
                }
            }
        }
        client
            .write_all(w)
            .map_err(|e| format!("canary: write: {e}"))?;
        expected_len += w.len() + agent_common::TRACEPARENT_LINE_LEN as usize;
        if i == 1 {
            // Request 3's own header is rewritten in place, not added.
            expected_len -= agent_common::TRACEPARENT_LINE_LEN as usize;
        }
        read_until(&mut server, &mut got, expected_len)?;
        server
            .write_all(CANARY_ANSWER)
            .map_err(|e| format!("canary: answer: {e}"))?;
        reads_untouched(&mut client, CANARY_ANSWER.len()).map_err(|why| {
            CanaryError::Reads(format!(
                "an answer on a socket in the injector's map: {why}"
            ))
        })?;
    }
    check_canary(&got).map_err(CanaryError::Other)
}

/// Reads from `server` until `got` holds `want` bytes (or two seconds passed).
fn read_until(server: &mut TcpStream, got: &mut Vec<u8>, want: usize) -> Result<(), String> {
    let start = Instant::now();
    let mut buf = [0u8; 1024];
    while got.len() < want && start.elapsed() < Duration::from_secs(2) {
        match server.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(format!("canary: read: {e}")),
        }
    }
    Ok(())
}

/// `n` bytes were sent to `client`: epoll and select must report it readable, `FIONREAD` and
/// `MSG_PEEK` must see all `n` bytes, then the bytes are read.
fn reads_untouched(client: &mut TcpStream, n: usize) -> Result<(), String> {
    let fd = client.as_raw_fd();
    if !epoll_readable(fd, 2000)? {
        return Err("epoll did not report it readable within 2 s".into());
    }
    if !select_readable(fd)? {
        return Err("select did not report it readable".into());
    }
    // Loopback delivers the answer's one write at once, but give a split delivery a moment.
    let start = Instant::now();
    let mut waiting = fionread(fd)?;
    while waiting < n && start.elapsed() < Duration::from_millis(500) {
        std::thread::sleep(Duration::from_millis(5));
        waiting = fionread(fd)?;
    }
    let mut buf = vec![0u8; n + 64];
    // SAFETY: recv writes at most buf.len() bytes into buf.
    let peeked = unsafe {
        libc::recv(
            fd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if waiting != n {
        return Err(format!(
            "FIONREAD reported {waiting} bytes while {n} were waiting (MSG_PEEK saw {peeked})"
        ));
    }
    if peeked != n as isize {
        return Err(format!(
            "MSG_PEEK returned {peeked} of the {n} waiting bytes"
        ));
    }
    client
        .read_exact(&mut buf[..n])
        .map_err(|e| format!("read: {e}"))?;
    Ok(())
}

fn epoll_readable(fd: RawFd, timeout_ms: i32) -> Result<bool, String> {
    // SAFETY: plain syscalls on fds we own; the event buffer outlives the calls.
    unsafe {
        let ep = libc::epoll_create1(libc::EPOLL_CLOEXEC);
        if ep < 0 {
            return Err(format!(
                "epoll_create1: {}",
                std::io::Error::last_os_error()
            ));
        }
        let ep = OwnedFd::from_raw_fd(ep);
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: 0,
        };
        if libc::epoll_ctl(ep.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) != 0 {
            return Err(format!("epoll_ctl: {}", std::io::Error::last_os_error()));
        }
        let mut out = [libc::epoll_event { events: 0, u64: 0 }];
        let n = libc::epoll_wait(ep.as_raw_fd(), out.as_mut_ptr(), 1, timeout_ms);
        Ok(n == 1 && out[0].events & libc::EPOLLIN as u32 != 0)
    }
}

fn select_readable(fd: RawFd) -> Result<bool, String> {
    if fd >= libc::FD_SETSIZE as RawFd {
        // select cannot name it; epoll already answered.
        return Ok(true);
    }
    // SAFETY: an fd_set on the stack, initialised by FD_ZERO, with an fd below FD_SETSIZE.
    unsafe {
        let mut set: libc::fd_set = std::mem::zeroed();
        libc::FD_ZERO(&mut set);
        libc::FD_SET(fd, &mut set);
        let mut timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: 0,
        };
        let n = libc::select(
            fd + 1,
            &mut set,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            &mut timeout,
        );
        if n < 0 {
            return Err(format!("select: {}", std::io::Error::last_os_error()));
        }
        Ok(n == 1 && libc::FD_ISSET(fd, &set))
    }
}

fn fionread(fd: RawFd) -> Result<usize, String> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    if unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) } != 0 {
        return Err(format!("FIONREAD: {}", std::io::Error::last_os_error()));
    }
    Ok(n.max(0) as usize)
}

fn new_tcp_socket() -> Result<OwnedFd, String> {
    // SAFETY: socket() returns a new fd or -1.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(format!(
            "canary: socket: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: a fresh fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn connect(socket: &OwnedFd, addr: std::net::SocketAddr) -> Result<(), String> {
    let std::net::SocketAddr::V4(v4) = addr else {
        return Err("canary: the listener is not IPv4".into());
    };
    let sa = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: v4.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*v4.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: a valid sockaddr_in and its size.
    let rc = unsafe {
        libc::connect(
            socket.as_raw_fd(),
            (&sa as *const libc::sockaddr_in).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(format!(
            "canary: connect: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

fn socket_cookie(fd: BorrowedFd<'_>) -> Result<u64, String> {
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(format!(
            "cannot read the socket cookie: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(cookie)
}

/// Bytes queued for reading on a socket (`SO_MEMINFO`'s receive allocation: 0 when nothing is
/// unread). Unlike `FIONREAD` it means the same in and out of a socket map.
fn unread_memory(fd: BorrowedFd<'_>) -> Result<u32, String> {
    let mut info = [0u32; 9];
    let mut len = size_of_val(&info) as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `info`.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MEMINFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(format!("SO_MEMINFO: {}", std::io::Error::last_os_error()));
    }
    Ok(info[0])
}

/// `SOCKETS_TO_INJECT` of a loaded object.
fn inject_sockets(ebpf: &mut Ebpf) -> Result<SockHash<&mut MapData, u64>, String> {
    let map = ebpf
        .map_mut("SOCKETS_TO_INJECT")
        .ok_or("map SOCKETS_TO_INJECT is missing")?;
    SockHash::try_from(map).map_err(|e| format!("SOCKETS_TO_INJECT: {e}"))
}

/// Userspace's part of the injector: sockets found not to speak HTTP leave its map, parked
/// sockets rejoin it.
pub struct Injector {
    sockets: SockHash<MapData, u64>,
    states: AyaHashMap<MapData, u64, SendState>,
    pidfds: Pidfds,
}

impl Injector {
    pub fn new(
        sockets: SockHash<MapData, u64>,
        states: AyaHashMap<MapData, u64, SendState>,
    ) -> Self {
        Self {
            sockets,
            states,
            pidfds: Pidfds::default(),
        }
    }

    /// Takes a socket out of the injector's map; false when it was not in it.
    pub fn remove(&mut self, cookie: u64) -> bool {
        self.sockets.remove(&cookie).is_ok()
    }

    pub fn rejoin(&mut self, c: &RejoinCandidate) -> Rejoin {
        rejoin(&mut self.sockets, Some(&self.states), &mut self.pidfds, c)
    }

    /// A process ended: its pidfd goes.
    pub fn forget_process(&mut self, pid: u32) {
        self.pidfds.0.remove(&pid);
    }
}

/// A parked socket that may rejoin the injector's map now (checked again against the kernel
/// by the caller, which owns the maps).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RejoinCandidate {
    pub pid: u32,
    pub fd: u32,
    pub sock_cookie: u64,
    pub sk: u64,
    pub writes: u64,
}

/// pidfds of the processes whose sockets rejoin (opened once per process).
#[derive(Default)]
pub struct Pidfds(IdMap<u32, OwnedFd>);

impl Pidfds {
    /// A duplicate of process `pid`'s file descriptor `fd`.
    fn get_fd(&mut self, pid: u32, fd: u32) -> std::io::Result<OwnedFd> {
        let pidfd = match self.0.entry(pid) {
            std::collections::hash_map::Entry::Occupied(e) => e.get().as_raw_fd(),
            std::collections::hash_map::Entry::Vacant(e) => {
                // SAFETY: pidfd_open returns a new fd or -1.
                let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
                if raw < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // SAFETY: a fresh fd we own.
                e.insert(unsafe { OwnedFd::from_raw_fd(raw as RawFd) })
                    .as_raw_fd()
            }
        };
        // SAFETY: pidfd_getfd returns a new fd (a duplicate in our table) or -1.
        let raw = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd, fd as RawFd, 0) };
        if raw < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ESRCH) {
                self.0.remove(&pid);
            }
            return Err(err);
        }
        // SAFETY: a fresh fd we own.
        Ok(unsafe { OwnedFd::from_raw_fd(raw as RawFd) })
    }
}

/// What became of a rejoin.
#[derive(Debug, PartialEq, Eq)]
pub enum Rejoin {
    Rejoined,
    /// Put back, then taken out again at once: unread data or a write arrived meanwhile.
    Undone,
    /// Not now: a write userspace has not seen yet, or unread data (which, for the log).
    NotYet(&'static str),
    /// Never: the socket is closed, or its fd now names another socket.
    Gone,
    /// Never: its framing was lost, or the process or socket cannot be reached (the reason,
    /// for the log).
    Never(String),
}

/// Puts a parked socket back into the injector's map if nothing is on its way: every write
/// was seen by userspace (which found the connection between exchanges) and nothing is
/// unread. Checked again once it is back; a race takes it out again at once. The socket is
/// reached through a duplicate of its owner's fd, held only for these few calls.
fn rejoin<T: std::borrow::BorrowMut<MapData>>(
    sockets: &mut SockHash<T, u64>,
    states: Option<&AyaHashMap<MapData, u64, SendState>>,
    pidfds: &mut Pidfds,
    c: &RejoinCandidate,
) -> Rejoin {
    let state = |states: &AyaHashMap<MapData, u64, SendState>| states.get(&c.sk, 0).ok();
    if let Some(states) = states {
        match state(states) {
            None => return Rejoin::Gone,
            Some(s) if s.mode == SEND_LOST => return Rejoin::Never("framing lost".into()),
            Some(s) if s.mode != SEND_BOUNDARY => return Rejoin::NotYet("inside a request"),
            Some(s) if s.writes != c.writes => return Rejoin::NotYet("a write not seen yet"),
            Some(_) => {}
        }
    }
    let fd = match pidfds.get_fd(c.pid, c.fd) {
        Ok(fd) => fd,
        // Closed, or the process ended.
        Err(e) if matches!(e.raw_os_error(), Some(libc::EBADF | libc::ESRCH)) => {
            return Rejoin::Gone;
        }
        Err(e) => {
            return Rejoin::Never(format!(
                "cannot reach fd {} of process {}: {e}",
                c.fd, c.pid
            ));
        }
    };
    match socket_cookie(fd.as_fd()) {
        Ok(cookie) if cookie == c.sock_cookie => {}
        // The fd now names another socket (closed and reused).
        _ => return Rejoin::Gone,
    }
    if unread_memory(fd.as_fd()).map_or(true, |n| n > 0) {
        return Rejoin::NotYet("unread data");
    }
    if let Err(e) = sockets.insert(&c.sock_cookie, fd.as_raw_fd(), 0) {
        // Not established any more (the peer closed), or the map is full.
        return Rejoin::Never(format!("the kernel refused it: {e}"));
    }
    let raced = unread_memory(fd.as_fd()).map_or(true, |n| n > 0)
        || states.is_some_and(|s| state(s).is_none_or(|s| s.writes != c.writes));
    if raced {
        let _ = sockets.remove(&c.sock_cookie);
        return Rejoin::Undone;
    }
    Rejoin::Rejoined
}

/// What arrived must be the canary's bytes with one `traceparent` line after each request
/// line of requests 1 and 2, and request 3's header with only its parent id changed.
pub fn check_canary(got: &[u8]) -> Result<(), String> {
    let text = std::str::from_utf8(got).map_err(|_| "canary: received bytes are not UTF-8")?;
    let sent: String = CANARY_WRITES
        .iter()
        .map(|w| String::from_utf8_lossy(w).into_owned())
        .collect();
    let mut rest = text;
    let mut rebuilt = String::new();
    let mut inserted = 0;
    while let Some(i) = rest.find("traceparent: 00-") {
        let (before, after) = rest.split_at(i);
        rebuilt.push_str(before);
        let line_end = after
            .find("\r\n")
            .ok_or("canary: traceparent line not terminated")?;
        let value = &after["traceparent: ".len()..line_end];
        // Exactly what the injector writes: version 00, valid W3C ids.
        if !value.starts_with("00-") || parse_traceparent(value).is_none() {
            return Err(format!("canary: malformed header value {value:?}"));
        }
        let original = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        if before.ends_with("\r\nHost: canary\r\n") {
            // Request 3's own header: trace id kept, parent id replaced.
            if value[..36] != original[..36] || value[52..] != original[52..] {
                return Err(format!(
                    "canary: rewritten header changed more than the parent id: {value}"
                ));
            }
            if value == original {
                return Err(
                    "canary: the existing traceparent's parent id was not rewritten".into(),
                );
            }
            rebuilt.push_str("traceparent: ");
            rebuilt.push_str(original);
        } else {
            inserted += 1;
            rest = &after[line_end + 2..];
            continue;
        }
        rest = &after[line_end..];
    }
    rebuilt.push_str(rest);
    if inserted != 2 {
        return Err(format!(
            "canary: expected 2 inserted headers, found {inserted} in {text:?}"
        ));
    }
    if rebuilt != sent {
        return Err(format!(
            "canary: bytes changed beyond the header: sent {sent:?}, received {text:?}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn injected(tp1: &str, tp2: &str, parent3: &str) -> Vec<u8> {
        format!(
            "GET /agent-canary/1 HTTP/1.1\r\ntraceparent: {tp1}\r\nHost: canary\r\nAccept: */*\r\n\r\n\
             POST /agent-canary/2 HTTP/1.1\r\ntraceparent: {tp2}\r\nHost: canary\r\nContent-Length: 12\r\n\r\nhello\r\n\r\nGET\
             GET /agent-canary/3 HTTP/1.1\r\nHost: canary\r\ntraceparent: 00-0af7651916cd43dd8448eb211c80319c-{parent3}-01\r\n\r\n"
        )
        .into_bytes()
    }

    const TP_A: &str = "00-11111111111111111111111111111111-2222222222222222-01";
    const TP_B: &str = "00-33333333333333333333333333333333-4444444444444444-01";

    #[test]
    fn finds_the_cgroup2_mount_on_unified_and_hybrid_hosts() {
        let unified = "35 24 0:30 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(find_cgroup2(unified).as_deref(), Some("/sys/fs/cgroup"));
        let hybrid = "30 24 0:26 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755\n\
                      31 30 0:27 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n\
                      40 30 0:35 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            find_cgroup2(hybrid).as_deref(),
            Some("/sys/fs/cgroup/unified")
        );
        let v1_only = "31 30 0:27 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(find_cgroup2(v1_only), None);
    }

    #[test]
    fn accepts_exact_injection() {
        check_canary(&injected(TP_A, TP_B, "5555555555555555")).expect("valid");
    }

    #[test]
    fn rejects_what_a_broken_injector_would_do() {
        // Nothing injected at all.
        let plain: Vec<u8> = CANARY_WRITES.concat();
        assert!(check_canary(&plain).is_err());
        // Existing header not rewritten.
        assert!(check_canary(&injected(TP_A, TP_B, "b7ad6b7169203331")).is_err());
        // A body byte changed.
        let mut bad = injected(TP_A, TP_B, "5555555555555555");
        let at = bad.windows(5).position(|w| w == b"hello").expect("body");
        bad[at] = b'j';
        assert!(check_canary(&bad).is_err());
        // Malformed value.
        assert!(check_canary(&injected("00-zz", TP_B, "5555555555555555")).is_err());
        // Truncated.
        let full = injected(TP_A, TP_B, "5555555555555555");
        assert!(check_canary(&full[..full.len() - 10]).is_err());
    }
}
