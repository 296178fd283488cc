//! Go (`net/http`): the kernel programs `agent_go_*` (agent-ebpf/src/go.rs) on three functions
//! of the standard library, found in the binary's own function table.
//!
//! A Go program is recognised by its `.go.buildinfo` section; its functions are found in
//! `.symtab` or, stripped, `.gopclntab` (`elf::go`), so stripped binaries are served too.

use agent_common::{RUNTIME_GO, RUNTIME_REQUESTS_BY_FD};

use crate::elf::go::{GoAt, GoBinaryError, probe_offsets};

use super::{Mechanism, Plan};

pub(super) static PLAN: Plan = Plan {
    mechanism: Mechanism::Go,
    flags: RUNTIME_GO | RUNTIME_REQUESTS_BY_FD,
    probes: &[
        // Every read of the program: the socket each goroutine read last.
        ("agent_go_fd_read", "internal/poll.(*FD).Read"),
        // On the connection's goroutine, once its request is read: what it serves.
        ("agent_go_serve", "net/http.serverHandler.ServeHTTP"),
        // On the handler's goroutine: the request it starts belongs to what it serves.
        ("agent_go_round_trip", "net/http.(*persistConn).roundTrip"),
        // On the connection's write goroutine: which request it writes next.
        ("agent_go_request_write", "net/http.(*Request).write"),
        // Every socket write of the program: hands the thread off for that write.
        ("agent_go_fd_write", "internal/poll.(*FD).Write"),
        // Every goroutine's end: its g is reused, its state must not be.
        ("agent_go_exit", "runtime.goexit0"),
        // Every goroutine's creation: the goroutine that creates it, and the request it serves.
        ("agent_go_spawn", "runtime.newproc1"),
    ],
    returns: &[
        // Each return of the creation, on the scheduler's stack (which never moves): the new
        // goroutine works for that request too.
        ("agent_go_spawned", "runtime.newproc1"),
    ],
};

/// What the agent needs of a Go program file.
#[derive(Debug)]
pub struct GoBinary {
    /// `go1.23.5`.
    pub version: String,
    /// Where the function entries came from (`.symtab` or `.gopclntab`).
    pub source: &'static str,
    /// Where the plan's probes go: (program, function, file offset), entries in the plan's
    /// order, then each RET of the `returns` functions.
    pub probes: Vec<(&'static str, &'static str, u64)>,
}

/// `None` when the file is not a Go program. `data`: the bytes `file` was parsed from.
pub(super) fn inspect<'d, R: object::ReadRef<'d>>(
    file: &object::File<'d, R>,
    data: R,
) -> Option<Result<GoBinary, GoBinaryError>> {
    let placements: Vec<(&'static str, &'static str, GoAt)> = PLAN
        .probes
        .iter()
        .map(|&(program, function)| (program, function, GoAt::Entry))
        .chain(
            PLAN.returns
                .iter()
                .map(|&(program, function)| (program, function, GoAt::Returns)),
        )
        .collect();
    let names: Vec<&str> = placements.iter().map(|&(_, f, _)| f).collect();
    let found = match crate::elf::go::functions(file, &names)? {
        Ok(found) => found,
        Err(e) => return Some(Err(e)),
    };
    Some(
        probe_offsets(file, data, &found, &placements, |_| false).map(|probes| GoBinary {
            version: found.version,
            source: found.source,
            probes,
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::elf::go::testing::{VERSIONS, build};
    use std::path::Path;
    use std::process::Command;

    fn inspect_path(path: &Path) -> Result<GoBinary, GoBinaryError> {
        let data = std::fs::read(path).expect("read binary");
        let file = object::File::parse(data.as_slice()).expect("ELF");
        inspect(&file, data.as_slice()).expect("a Go binary")
    }

    #[test]
    fn stripped_and_unstripped_binaries_give_the_same_offsets() {
        for version in VERSIONS {
            let full = inspect_path(&build(version, false)).expect("unstripped");
            let stripped = inspect_path(&build(version, true)).expect("stripped");
            assert_eq!(full.source, ".symtab");
            assert_eq!(stripped.source, ".gopclntab");
            assert!(full.probes.len() > PLAN.probes.len(), "{:?}", full.probes);
            assert!(
                full.version.starts_with(&format!("go{version}")),
                "{}",
                full.version
            );
            assert_eq!(stripped.version, full.version);
            // The same code at the same place (only symbols and DWARF were dropped).
            assert_eq!(full.probes, stripped.probes, "Go {version}");
        }
    }

    /// The struct offsets the kernel programs (these and the Go TLS ones) read, against the
    /// binaries' own DWARF (gdb prints each member's offset and size).
    #[test]
    fn the_struct_offsets_the_probes_read_match_the_dwarf() {
        use agent_common::{
            GO_FD_IS_FILE_OFFSET, GO_FD_SYSFD_OFFSET, GO_G_STACK_OFFSET,
            GO_TLS_CONN_NET_CONN_OFFSET, GO_TRANSPORT_REQUEST_OFFSET,
        };
        for version in VERSIONS {
            let path = build(version, false);
            let out = Command::new("gdb")
                .args(["-batch", "-nx", "-ex", "set language c"])
                .args(["-ex", "ptype/o struct 'internal/poll.FD'"])
                .args(["-ex", "ptype/o struct 'net/http.transportRequest'"])
                .args(["-ex", "ptype/o struct 'runtime.g'"])
                .args(["-ex", "ptype/o struct 'runtime.stack'"])
                .args(["-ex", "ptype/o struct 'crypto/tls.Conn'"])
                .args(["-ex", "ptype/o struct 'net.TCPConn'"])
                .args(["-ex", "ptype/o struct 'net.conn'"])
                .args(["-ex", "ptype/o struct 'net.netFD'"])
                .arg(&path)
                .output()
                .expect("gdb (cargo xtask setup installs it)");
            let text = String::from_utf8_lossy(&out.stdout);
            let offset_of = |member: &str| -> Option<u64> {
                let line = text.lines().find(|l| l.trim_end().ends_with(member))?;
                line.trim_start()
                    .strip_prefix("/*")?
                    .split('|')
                    .next()?
                    .trim()
                    .parse()
                    .ok()
            };
            assert_eq!(
                offset_of("int Sysfd;"),
                Some(GO_FD_SYSFD_OFFSET),
                "Go {version}:\n{text}"
            );
            assert_eq!(
                offset_of("net/http.Request *Request;"),
                Some(GO_TRANSPORT_REQUEST_OFFSET),
                "Go {version}:\n{text}"
            );
            assert_eq!(
                offset_of("bool isFile;"),
                Some(GO_FD_IS_FILE_OFFSET),
                "Go {version}:\n{text}"
            );
            assert_eq!(
                offset_of("runtime.stack stack;"),
                Some(GO_G_STACK_OFFSET),
                "Go {version}:\n{text}"
            );
            // `stack { lo, hi }`: the probes read both.
            assert_eq!(offset_of("uintptr hi;"), Some(8), "Go {version}:\n{text}");
            // The Go TLS probes' walk from a `*tls.Conn` to its socket's `poll.FD`.
            assert_eq!(
                offset_of("net.Conn conn;"),
                Some(GO_TLS_CONN_NET_CONN_OFFSET),
                "Go {version}:\n{text}"
            );
            assert_eq!(
                offset_of("net.conn conn;"),
                Some(0),
                "Go {version}:\n{text}"
            );
            assert_eq!(
                offset_of("net.netFD *fd;"),
                Some(0),
                "Go {version}:\n{text}"
            );
            assert_eq!(
                offset_of("internal/poll.FD pfd;"),
                Some(0),
                "Go {version}:\n{text}"
            );
        }
    }

    /// The itab the Go linker made for `*net.TCPConn` as a `net.Conn` carries the type hash
    /// the Go TLS probes look for, at the offset they read it (`itab { inter, _type, hash }`).
    #[test]
    fn the_tcp_conn_itab_carries_the_type_hash_the_tls_probes_check() {
        use object::{Object, ObjectSection, ObjectSymbol};
        for version in VERSIONS {
            let path = build(version, false);
            let data = std::fs::read(&path).expect("read binary");
            let file = object::File::parse(data.as_slice()).expect("ELF");
            let itab = file
                .symbols()
                .find(|s| {
                    s.name().is_ok_and(|n| {
                        n == "go:itab.*net.TCPConn,net.Conn" || n == "go.itab.*net.TCPConn,net.Conn"
                    })
                })
                .unwrap_or_else(|| panic!("Go {version}: no itab of *net.TCPConn as net.Conn"));
            let section = file
                .section_by_index(itab.section_index().expect("a defined symbol"))
                .expect("its section");
            let bytes = section.data().expect("section data");
            let at = usize::try_from(itab.address() - section.address()).expect("offset") + 16;
            let hash = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
            assert_eq!(hash, agent_common::GO_TCPCONN_TYPE_HASH, "Go {version}");
        }
    }

    #[test]
    fn other_programs_are_not_go() {
        let data = std::fs::read("/bin/ls").expect("ls");
        let file = object::File::parse(data.as_slice()).expect("ELF");
        assert!(inspect(&file, data.as_slice()).is_none());
    }
}
