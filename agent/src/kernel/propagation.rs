//! Attaching the `traceparent` injector (cgroup sock_ops + sk_msg) and proving it safe with a
//! start-up canary: a loopback exchange of the agent's own whose bytes must arrive exactly as
//! sent plus one header per request. Any failure turns injection off; tracing goes on.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use aya::{
    Ebpf,
    maps::{ProgramArray, SockHash},
    programs::{CgroupAttachMode, SkMsg, SockOps},
};

use super::Attached;
use crate::spans::context::parse_traceparent;

/// Where the agent mounts the unified cgroup hierarchy when the host has not (cgroup v1-only
/// hosts): the sock_ops program attaches to its root, so every socket on the host passes it;
/// only selected processes' sockets are enrolled.
const OWN_CGROUP2_MOUNT: &str = "/run/ebpf-agent/cgroup2";

/// Attaches both programs. Errors are sentences for the start-up report.
pub fn attach(ebpf: &mut Ebpf) -> Result<Vec<Attached>, String> {
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
    Ok(vec![
        Attached {
            program: "agent_sock_ops",
            hook: format!("cgroup sock_ops ({root})"),
        },
        Attached {
            program: "agent_sk_msg",
            hook: "sk_msg (SOCKETS_TO_INJECT)".into(),
        },
    ])
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
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
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

/// Sends the canary through the injector and checks what the peer received.
pub fn canary(ebpf: &mut Ebpf) -> Result<(), String> {
    let listener =
        TcpListener::bind("127.0.0.1:0").map_err(|e| format!("canary: cannot listen: {e}"))?;
    let addr = listener.local_addr().map_err(|e| format!("canary: {e}"))?;
    let mut client = TcpStream::connect(addr).map_err(|e| format!("canary: connect: {e}"))?;
    let (mut server, _) = listener
        .accept()
        .map_err(|e| format!("canary: accept: {e}"))?;
    let deadline = Duration::from_secs(2);
    server
        .set_read_timeout(Some(Duration::from_millis(200)))
        .map_err(|e| format!("canary: {e}"))?;

    let cookie = socket_cookie(&client)?;
    {
        let map = ebpf
            .map_mut("SOCKETS_TO_INJECT")
            .ok_or("map SOCKETS_TO_INJECT is missing")?;
        let mut hash: SockHash<_, u64> =
            SockHash::try_from(map).map_err(|e| format!("canary: {e}"))?;
        hash.insert(&cookie, client.as_raw_fd(), 0)
            .map_err(|e| format!("canary: cannot enroll the canary socket: {e}"))?;
    }
    let mut expected_len = 0;
    for w in CANARY_WRITES {
        client
            .write_all(w)
            .map_err(|e| format!("canary: write: {e}"))?;
        expected_len += w.len();
    }
    // Two inserted lines (requests 1 and 2); request 3's own header is rewritten in place.
    let want = expected_len + 2 * agent_common::TRACEPARENT_LINE_LEN as usize;
    let mut got = Vec::new();
    let start = Instant::now();
    let mut buf = [0u8; 1024];
    while got.len() < want && start.elapsed() < deadline {
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
    check_canary(&got)
}

fn socket_cookie(s: &TcpStream) -> Result<u64, String> {
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err("canary: cannot read the socket cookie".into());
    }
    Ok(cookie)
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
