//! The socket tables of the agent's network namespace: `/proc/net/tcp`, `/proc/net/tcp6`.

use super::ProcFs;

/// A TCP socket with an owner (a socket inode).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpSocket {
    pub inode: u64,
    pub local_port: u16,
    pub remote_port: u16,
}

impl ProcFs {
    /// The TCP sockets (IPv4, then IPv6) that belong to a process: those without an inode
    /// (`TIME_WAIT`) are left out.
    pub fn tcp_sockets(&self) -> Vec<TcpSocket> {
        let mut sockets = Vec::new();
        for file in ["net/tcp", "net/tcp6"] {
            let Ok(text) = std::fs::read_to_string(self.root.join(file)) else {
                continue;
            };
            for line in text.lines().skip(1) {
                let cols: Vec<&str> = line.split_whitespace().collect();
                let (Some(local), Some(remote), Some(inode)) =
                    (cols.get(1), cols.get(2), cols.get(9))
                else {
                    continue;
                };
                let Ok(inode) = inode.parse::<u64>() else {
                    continue;
                };
                let port = |addr: &str| {
                    addr.rsplit(':')
                        .next()
                        .and_then(|p| u16::from_str_radix(p, 16).ok())
                };
                let (Some(local_port), Some(remote_port)) = (port(local), port(remote)) else {
                    continue;
                };
                if inode != 0 {
                    sockets.push(TcpSocket {
                        inode,
                        local_port,
                        remote_port,
                    });
                }
            }
        }
        sockets
    }
}
