//! The socket tables of the agent's network namespace: `/proc/net/tcp`, `/proc/net/tcp6`.

use procfs::{FromReadSI as _, net::TcpNetEntries};

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
    /// (`TIME_WAIT`) are left out. A table that cannot be read or parsed adds none.
    pub fn tcp_sockets(&self) -> Vec<TcpSocket> {
        let mut sockets = Vec::new();
        for file in ["net/tcp", "net/tcp6"] {
            let path = self.root.join(file);
            let entries = match TcpNetEntries::from_file(&path, procfs::current_system_info()) {
                Ok(entries) => entries.0,
                Err(e) => {
                    log::debug!("no TCP sockets from {}: {e}", path.display());
                    continue;
                }
            };
            sockets.extend(
                entries
                    .into_iter()
                    .filter(|e| e.inode != 0)
                    .map(|e| TcpSocket {
                        inode: e.inode,
                        local_port: e.local_address.port(),
                        remote_port: e.remote_address.port(),
                    }),
            );
        }
        sockets
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_both_tables_and_leaves_out_sockets_without_inode() {
        let root = std::env::temp_dir().join(format!("agent-net-test-{}", std::process::id()));
        std::fs::create_dir_all(root.join("net")).expect("fake /proc/net");
        let header = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n";
        std::fs::write(
            root.join("net/tcp"),
            format!(
                "{header}\
                 \x20  0: 00000000:07E8 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1360 1 00000000bdd348cd 100 0 0 10 0\n\
                 \x20  1: 0100007F:9B0A 0100007F:AA1F 01 00000000:00000000 00:00000000 00000000  1000        0 777 1 0000000000000000 20 4 30 10 -1\n\
                 \x20  2: 0100007F:9B12 0100007F:AA1F 06 00000000:00000000 03:00001642 00000000     0        0 0 3 000000006929ba12\n"
            ),
        )
        .expect("write tcp");
        std::fs::write(
            root.join("net/tcp6"),
            format!(
                "{header}\
                 \x20  0: 00000000000000000000000000000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 55555 1 0000000000000000 100 0 0 10 0\n"
            ),
        )
        .expect("write tcp6");
        let sockets = ProcFs::at(&root).tcp_sockets();
        let _ = std::fs::remove_dir_all(&root);
        let socket = |inode, local_port, remote_port| TcpSocket {
            inode,
            local_port,
            remote_port,
        };
        assert_eq!(
            sockets,
            [
                socket(1360, 2024, 0),
                socket(777, 0x9B0A, 0xAA1F),
                socket(55555, 8080, 0)
            ]
        );
        assert!(ProcFs::at("/nonexistent-proc").tcp_sockets().is_empty());
    }
}
