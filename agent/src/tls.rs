//! TLS libraries: where a selected process's TLS plaintext can be read.
//!
//! Each selected process's executable mappings (its program and shared libraries, from
//! `/proc/PID/maps`) are inspected once per file (device, inode): a file that defines OpenSSL's
//! `SSL_read` and `SSL_write` in its dynamic symbol table (`libssl.so.3`, `libssl.so.1.1`, or a
//! program linking OpenSSL statically and exporting it, as Node.js does) gets the TLS probes
//! (`agent-ebpf/src/tls.rs`) for every process mapping the file; the probes return at once in
//! a process that is not traced. Not per process: PostgreSQL forks a backend per connection,
//! which does its TLS handshake and reads its first messages before the agent could attach
//! to the new process (a per-process uprobe does not follow a fork). The cost for other
//! processes mapping the same file is a breakpoint per call (BENCHMARKS.md); in containers
//! each image has a file of its own. The probes are detached once no traced process maps the
//! file. Traced processes are rescanned on a timer, so a library loaded later (Python imports
//! `ssl` when first used: `dlopen`) is found then.
//! Libraries known to be TLS but not served are named in the report (their connections are
//! counted `connections_encrypted`).

use std::{
    collections::{HashMap, HashSet},
    fmt,
};

use crate::{
    kernel::{Probes, UprobeAt, UprobeAttachment},
    proc::{Executable, ProcFs},
    stats::Stats,
};

/// (probe program, symbol): entries, then the return probes (one program per direction).
const OPENSSL_PROBES: &[(&str, &str)] = &[
    ("agent_ssl_read", "SSL_read"),
    ("agent_ssl_write", "SSL_write"),
    ("agent_ssl_read_ret", "SSL_read"),
    ("agent_ssl_write_ret", "SSL_write"),
    ("agent_ssl_read_ex", "SSL_read_ex"),
    ("agent_ssl_write_ex", "SSL_write_ex"),
    ("agent_ssl_read_ret", "SSL_read_ex"),
    ("agent_ssl_write_ret", "SSL_write_ex"),
];
/// The `_ex` forms exist since OpenSSL 1.1.1; without them the first four probes serve.
const OPENSSL_REQUIRED: usize = 4;

/// TLS libraries we do not read, by file name: named in the report, so that a user knows why
/// the process's encrypted connections stay unread.
const NOT_SERVED: &[(&str, &str)] = &[
    ("libgnutls.so", "GnuTLS"),
    ("libnss3.so", "NSS"),
    ("libwolfssl.so", "wolfSSL"),
    ("libmbedtls.so", "Mbed TLS"),
    ("libjvm.so", "Java (JSSE, TLS in Java code)"),
];

/// (device, inode) of a file.
type FileId = (u64, u64);

/// What a mapped file is for TLS.
#[derive(Clone)]
enum Library {
    /// OpenSSL: the file offsets of `OPENSSL_PROBES`' symbols (the `_ex` ones may be absent).
    OpenSsl(Vec<Option<u64>>),
    /// A TLS library we do not read.
    NotServed(&'static str),
    /// Nothing TLS.
    None,
}

/// What a scan found in one process, for the report and the log.
pub enum Finding {
    Attached { file: String },
    Failed { file: String, why: String },
    NotServed { library: &'static str, file: String },
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Finding::Attached { file } => write!(f, "OpenSSL: attached ({file})"),
            Finding::Failed { file, why } => write!(f, "OpenSSL: not attached ({file}): {why}"),
            Finding::NotServed { library, file } => write!(
                f,
                "{library} ({file}): not read by the agent; its encrypted connections are \
                 counted as connections_encrypted"
            ),
        }
    }
}

/// A library file's probes.
struct Attached {
    /// Held for the probes' lifetime: dropping a link detaches it.
    _links: Vec<UprobeAttachment>,
    /// The traced processes that map it.
    users: HashSet<u32>,
}

pub struct TlsLibraries {
    proc: ProcFs,
    inspected: HashMap<FileId, Library>,
    attached: HashMap<FileId, Attached>,
    /// Files already looked at in each process.
    seen: HashMap<u32, HashSet<FileId>>,
    /// Processes with OpenSSL attached.
    openssl: HashSet<u32>,
    /// The socket programs look for library calls (set at the first attachment).
    lookups_on: bool,
}

impl TlsLibraries {
    pub fn new() -> Self {
        Self {
            proc: ProcFs::host(),
            inspected: HashMap::new(),
            attached: HashMap::new(),
            seen: HashMap::new(),
            openssl: HashSet::new(),
            lookups_on: false,
        }
    }

    /// Looks at the files process `pid` maps that were not looked at yet: attaches the probes
    /// to each OpenSSL among them. Returns what it found (nothing for files seen before). A
    /// library we do not read is named only in a process without OpenSSL (curl maps GnuTLS
    /// through its LDAP and RTMP libraries, and encrypts with OpenSSL).
    pub fn scan(&mut self, probes: &mut Probes, pid: u32, stats: &Stats) -> Vec<Finding> {
        let mut findings = Vec::new();
        let mut not_served = Vec::new();
        for file in self.proc.executable_mappings(pid) {
            let id = (file.dev, file.ino);
            if !self.seen.entry(pid).or_default().insert(id) {
                continue;
            }
            let library = self
                .inspected
                .entry(id)
                .or_insert_with(|| inspect(&file))
                .clone();
            match library {
                Library::None => {}
                Library::NotServed(library) => not_served.push(Finding::NotServed {
                    library,
                    file: file.name,
                }),
                Library::OpenSsl(offsets) => {
                    self.openssl.insert(pid);
                    // Attached already for another process: this one is covered too.
                    if let Some(a) = self.attached.get_mut(&id) {
                        a.users.insert(pid);
                        findings.push(Finding::Attached { file: file.name });
                        continue;
                    }
                    match self.attach(probes, &file, &offsets) {
                        Ok(links) => {
                            self.attached.insert(
                                id,
                                Attached {
                                    _links: links,
                                    users: HashSet::from([pid]),
                                },
                            );
                            Stats::add(&stats.tls_libraries_attached, 1);
                            findings.push(Finding::Attached { file: file.name });
                        }
                        Err(why) => {
                            Stats::add(&stats.tls_attach_failed, 1);
                            findings.push(Finding::Failed {
                                file: file.name,
                                why,
                            });
                        }
                    }
                }
            }
        }
        if !self.openssl.contains(&pid) {
            findings.extend(not_served);
        }
        findings
    }

    fn attach(
        &mut self,
        probes: &mut Probes,
        file: &Executable,
        offsets: &[Option<u64>],
    ) -> Result<Vec<UprobeAttachment>, String> {
        if !self.lookups_on {
            probes
                .enable_tls_lookups()
                .map_err(|e| format!("cannot switch the socket programs' TLS lookups on: {e}"))?;
            self.lookups_on = true;
        }
        let mut links = Vec::new();
        for (&(program, symbol), offset) in OPENSSL_PROBES.iter().zip(offsets) {
            let Some(offset) = *offset else {
                continue;
            };
            let at = UprobeAt::FileOffset {
                offset,
                function: symbol,
            };
            // The links attached so far are dropped (detached) with `links` on failure.
            let link = probes
                .attach_uprobe(program, &file.path, at, None)
                .map_err(|e| format!("{program} on {symbol}: {e}"))?;
            links.push(link);
        }
        Ok(links)
    }

    /// A process exited (or runs another program): a library's probes go with the last traced
    /// process that mapped it.
    pub fn on_exit(&mut self, pid: u32) {
        self.seen.remove(&pid);
        self.openssl.remove(&pid);
        self.attached.retain(|_, a| {
            a.users.remove(&pid);
            !a.users.is_empty()
        });
    }
}

/// What `file` is for TLS, from its name and its dynamic symbols.
fn inspect(file: &Executable) -> Library {
    let base = file.name.rsplit('/').next().unwrap_or(&file.name);
    if let Some(&(_, library)) = NOT_SERVED.iter().find(|(name, _)| base.starts_with(name)) {
        return Library::NotServed(library);
    }
    match openssl_offsets(file) {
        Some(offsets) => Library::OpenSsl(offsets),
        None => Library::None,
    }
}

/// The file offsets of OpenSSL's functions when `file` defines at least `SSL_read` and
/// `SSL_write` in its dynamic symbol table.
fn openssl_offsets(file: &Executable) -> Option<Vec<Option<u64>>> {
    use object::{Object, ObjectSymbol};
    let data = std::fs::File::open(&file.path).ok()?;
    // Read on demand: only the headers and the dynamic symbols of a possibly large program.
    let data = object::read::ReadCache::new(data);
    let elf = object::File::parse(&data).ok()?;
    let mut addresses: HashMap<&str, u64> = HashMap::new();
    for sym in elf.dynamic_symbols() {
        if sym.is_definition()
            && let Ok(name) = sym.name()
            && OPENSSL_PROBES.iter().any(|&(_, s)| s == name)
        {
            addresses.insert(name, sym.address());
        }
    }
    let offsets: Vec<Option<u64>> = OPENSSL_PROBES
        .iter()
        .map(|&(_, symbol)| {
            let address = addresses.get(symbol)?;
            crate::elf::file_offset(&elf, *address)
        })
        .collect();
    offsets[..OPENSSL_REQUIRED]
        .iter()
        .all(Option::is_some)
        .then_some(offsets)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn executable(path: &str) -> Executable {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path).expect("file");
        Executable {
            dev: meta.dev(),
            ino: meta.ino(),
            path: path.into(),
            name: path.into(),
        }
    }

    fn system_libssl() -> Option<&'static str> {
        [
            "/usr/lib/x86_64-linux-gnu/libssl.so.3",
            "/usr/lib/aarch64-linux-gnu/libssl.so.3",
        ]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
    }

    #[test]
    fn the_systems_libssl_is_openssl_with_every_probe_placed() {
        let Some(path) = system_libssl() else {
            panic!("libssl.so.3 is a dependency of curl and python here; it must exist");
        };
        let Library::OpenSsl(offsets) = inspect(&executable(path)) else {
            panic!("{path} not recognised as OpenSSL");
        };
        assert!(offsets.iter().all(Option::is_some), "{offsets:?}");
        // Entry and return probes of one function share its offset; functions differ.
        assert_eq!(offsets[0], offsets[2]);
        assert_ne!(offsets[0], offsets[1]);
    }

    #[test]
    fn a_program_exporting_openssl_is_found_by_its_symbols_not_its_name() {
        // Node.js links OpenSSL statically and exports it for native addons.
        let node = "/usr/bin/node";
        let Library::OpenSsl(offsets) = inspect(&executable(node)) else {
            panic!("{node} exports SSL_read/SSL_write but was not recognised");
        };
        assert!(offsets.iter().all(Option::is_some));
    }

    #[test]
    fn libraries_without_openssl_are_nothing() {
        let libc = [
            "/usr/lib/x86_64-linux-gnu/libc.so.6",
            "/usr/lib/aarch64-linux-gnu/libc.so.6",
        ]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("libc");
        assert!(matches!(inspect(&executable(libc)), Library::None));
        // libcrypto has no SSL_* functions: only libssl serves.
        let crypto = "/usr/lib/x86_64-linux-gnu/libcrypto.so.3";
        if std::path::Path::new(crypto).exists() {
            assert!(matches!(inspect(&executable(crypto)), Library::None));
        }
    }

    #[test]
    fn known_libraries_we_do_not_read_are_named() {
        let file = Executable {
            dev: 0,
            ino: 0,
            path: "/nonexistent".into(),
            name: "/usr/lib/x86_64-linux-gnu/libgnutls.so.30".into(),
        };
        assert!(matches!(inspect(&file), Library::NotServed("GnuTLS")));
    }
}
