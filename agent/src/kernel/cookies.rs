//! Socket cookies for the kprobe fallback of the socket data programs: kprobe programs cannot
//! make a socket's cookie (the helper is for other program types), only read the one the
//! kernel keeps in the socket. So once that fallback is chosen, the state-change program makes
//! a cookie for every TCP socket that changes state (`MAKE_COOKIES`), and the sockets already
//! open get theirs from one sock_diag dump: the kernel makes a cookie for each socket it lists.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use aya::{Ebpf, maps::Array};

use super::{HookChoice, KernelError};

/// Turns cookie making on, then gives every open TCP socket a cookie.
pub fn make_cookies(ebpf: &mut Ebpf) -> Result<HookChoice, KernelError> {
    let name = "MAKE_COOKIES";
    let map = ebpf.map_mut(name).ok_or(KernelError::MissingMap(name))?;
    let mut flag: Array<_, u32> =
        Array::try_from(map).map_err(|source| KernelError::Map { name, source })?;
    flag.set(0, &1, 0)
        .map_err(|source| KernelError::Map { name, source })?;
    Ok(match list_tcp_sockets() {
        Ok(n) => HookChoice {
            function: "socket cookies",
            hook: format!("made at each TCP state change; {n} open sockets got one from sock_diag"),
            degraded: None,
        },
        Err(e) => HookChoice {
            function: "socket cookies",
            hook: "made at each TCP state change".into(),
            degraded: Some(format!(
                "sock_diag could not list the open TCP sockets ({e}; the inet_diag and \
                 tcp_diag modules must be loadable): connections opened before the agent are \
                 not traced (counted: kernel_sockets_without_cookie)"
            )),
        },
    })
}

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_HDRLEN: usize = 16;
/// `struct inet_diag_req_v2`: family, protocol, ext, pad, states, then a 48-byte socket id.
const REQ_LEN: usize = 56;

/// Lists every TCP socket (IPv4 and IPv6, any state) and returns how many there were.
fn list_tcp_sockets() -> io::Result<usize> {
    // SAFETY: socket(2) with constant arguments; the result is checked before use.
    let raw = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut total = 0;
    for (seq, family) in [(1u32, libc::AF_INET), (2, libc::AF_INET6)] {
        send_request(&fd, seq, family as u8)?;
        total += read_dump(&fd)?;
    }
    Ok(total)
}

fn send_request(fd: &OwnedFd, seq: u32, family: u8) -> io::Result<()> {
    let mut msg = [0u8; NLMSG_HDRLEN + REQ_LEN];
    msg[0..4].copy_from_slice(&((NLMSG_HDRLEN + REQ_LEN) as u32).to_ne_bytes());
    msg[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    msg[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    msg[8..12].copy_from_slice(&seq.to_ne_bytes());
    let req = &mut msg[NLMSG_HDRLEN..];
    req[0] = family;
    req[1] = libc::IPPROTO_TCP as u8;
    req[4..8].copy_from_slice(&u32::MAX.to_ne_bytes());
    // SAFETY: a valid buffer of the given length; the kernel is the destination (zeroed
    // address from the default of send on an unbound netlink socket).
    let sent = unsafe { libc::send(fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reads one dump's replies to its end; returns the sockets listed.
fn read_dump(fd: &OwnedFd) -> io::Result<usize> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut listed = 0;
    loop {
        // SAFETY: `buf` is a valid, writable buffer of its length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        match count_messages(&buf[..n as usize])? {
            Batch::More(k) => listed += k,
            Batch::Done(k) => return Ok(listed + k),
        }
    }
}

#[derive(Debug, PartialEq)]
enum Batch {
    More(usize),
    Done(usize),
}

/// Counts the socket messages of one netlink datagram, up to the dump's end.
fn count_messages(mut data: &[u8]) -> io::Result<Batch> {
    let mut listed = 0;
    while data.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as usize;
        let kind = u16::from_ne_bytes([data[4], data[5]]);
        if len < NLMSG_HDRLEN || len > data.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "malformed sock_diag reply",
            ));
        }
        match kind {
            NLMSG_DONE => return Ok(Batch::Done(listed)),
            NLMSG_ERROR => {
                let code = data
                    .get(NLMSG_HDRLEN..NLMSG_HDRLEN + 4)
                    .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                    .unwrap_or(0);
                if code != 0 {
                    return Err(io::Error::from_raw_os_error(-code));
                }
            }
            SOCK_DIAG_BY_FAMILY => listed += 1,
            _ => {}
        }
        // Messages are 4-byte aligned.
        let step = (len + 3) & !3;
        data = data.get(step..).unwrap_or(&[]);
    }
    Ok(Batch::More(listed))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&((NLMSG_HDRLEN + payload.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(payload);
        while m.len() % 4 != 0 {
            m.push(0);
        }
        m
    }

    #[test]
    fn counts_sockets_until_the_dump_ends() {
        let mut d = message(SOCK_DIAG_BY_FAMILY, &[0; 71]);
        d.extend(message(SOCK_DIAG_BY_FAMILY, &[0; 72]));
        assert_eq!(count_messages(&d).expect("batch"), Batch::More(2));
        d.extend(message(NLMSG_DONE, &[0; 4]));
        d.extend(message(SOCK_DIAG_BY_FAMILY, &[0; 72]));
        assert_eq!(count_messages(&d).expect("batch"), Batch::Done(2));
    }

    #[test]
    fn errors_and_garbage_are_errors_not_panics() {
        let err = message(NLMSG_ERROR, &(-95i32).to_ne_bytes());
        assert_eq!(
            count_messages(&err).expect_err("EOPNOTSUPP").raw_os_error(),
            Some(95)
        );
        let ack = message(NLMSG_ERROR, &0i32.to_ne_bytes());
        assert_eq!(count_messages(&ack).expect("ack"), Batch::More(0));
        let mut bad = message(SOCK_DIAG_BY_FAMILY, &[0; 8]);
        bad[0] = 200;
        assert!(count_messages(&bad).is_err());
        for n in 0..bad.len() {
            let _ = count_messages(&bad[..n]);
        }
    }

    #[test]
    fn lists_this_hosts_tcp_sockets() {
        // Our own listener is at least one (sock_diag needs no privileges to list).
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        match list_tcp_sockets() {
            Ok(n) => assert!(n >= 1, "{n}"),
            Err(e) => eprintln!("SKIP: sock_diag unavailable here: {e}"),
        }
        drop(listener);
    }
}
