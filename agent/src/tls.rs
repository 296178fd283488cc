//! TLS libraries: where a selected process's TLS plaintext can be read.
//!
//! Each selected process's executable mappings (its program and shared libraries, from
//! `/proc/PID/maps`) are inspected once per file (device, inode): a file that defines OpenSSL's
//! `SSL_read` and `SSL_write` in its dynamic symbol table (`libssl.so.3`, `libssl.so.1.1`, or a
//! program linking OpenSSL statically and exporting it, as Node.js does) gets the TLS probes
//! (`agent-ebpf/src/tls.rs`) for each selected process that maps it: a process that is not
//! traced never hits their breakpoints (each costs a trap, even where the program returns at
//! once). A per-process uprobe does not follow a fork, though, and PostgreSQL forks a backend
//! per connection, which handshakes and reads its first messages before the agent could
//! attach to it: once a selected process that maps the file forks another while the agent
//! runs, the file's probes go on every process mapping it (also when tracing every process;
//! not for children found already running, as nginx's workers forked at its start). They are
//! detached once no selected process maps the file. The loader's probe announces libraries
//! loaded later (Python imports `ssl` when first used: `dlopen`); a rescan timer backs it.
//! Libraries known to be TLS but not served are named in the report (their connections are
//! counted `connections_encrypted`).
//!
//! Go programs (x86_64) carry their own TLS, `crypto/tls`: a mapped file that is a Go program
//! linking it gets the Go TLS probes (`agent-ebpf/src/go_tls.rs`) the same way, at the entries
//! of `(*Conn).Read`/`Write` and at each RET instruction of `Read` (`elf::go`: Go moves
//! goroutine stacks, which breaks uretprobes); each call names its connection's fd itself.
//! Nothing on the program's socket I/O: a Go program without TLS traffic hits no probe.

use std::{
    collections::{HashMap, HashSet},
    fmt,
};

use agent_common::{TLS_ATTACHED_NODE, TLS_ATTACHED_OPENSSL};

use crate::{
    elf::go::{GoAt, GoBinaryError, probe_offsets},
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
    ("agent_ssl_new_ret", "SSL_new"),
    ("agent_ssl_learn", "SSL_do_handshake"),
    ("agent_ssl_learn_ret", "SSL_do_handshake"),
    ("agent_ssl_learn", "SSL_peek"),
    ("agent_ssl_learn_ret", "SSL_peek"),
    ("agent_ssl_read_ex", "SSL_read_ex"),
    ("agent_ssl_write_ex", "SSL_write_ex"),
    ("agent_ssl_read_ret", "SSL_read_ex"),
    ("agent_ssl_write_ret", "SSL_write_ex"),
    ("agent_ssl_learn", "SSL_peek_ex"),
    ("agent_ssl_learn_ret", "SSL_peek_ex"),
];
/// The `_ex` forms exist since OpenSSL 1.1.1; without them the first nine probes serve.
const OPENSSL_REQUIRED: usize = 9;

/// Node.js's `TLSWrap` methods (mangled name prefixes: the parameters' mangling may change
/// between versions, the names do not): (probe program, name prefix), and the return probe for
/// each. Node reads and writes its sockets itself, outside the library's calls (memory BIOs);
/// these say which socket each `SSL *` is for (`agent-ebpf/src/tls.rs`).
const NODE_PROBES: &[(&str, &str)] = &[
    ("agent_node_wrap_enter", "_ZN4node6crypto7TLSWrap8ClearOutE"),
    ("agent_node_wrap_enter", "_ZN4node6crypto7TLSWrap7ClearInE"),
    ("agent_node_wrap_enter", "_ZN4node6crypto7TLSWrap7DoWriteE"),
    (
        "agent_node_enc_out_enter",
        "_ZN4node6crypto7TLSWrap6EncOutE",
    ),
];
const NODE_RETURN: &str = "agent_node_wrap_leave";

/// (probe program, function, where): `Read`'s RETs before its entry, so that no call is
/// recorded without a probe to end it.
const GO_TLS_PROBES: &[(&str, &str, GoAt)] = &[
    (
        "agent_go_tls_read_ret",
        "crypto/tls.(*Conn).Read",
        GoAt::Returns,
    ),
    ("agent_go_tls_read", "crypto/tls.(*Conn).Read", GoAt::Entry),
    (
        "agent_go_tls_write",
        "crypto/tls.(*Conn).Write",
        GoAt::Entry,
    ),
];

const GO_TLS: &str = "Go crypto/tls";

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
    /// OpenSSL: the file offsets of `OPENSSL_PROBES`' symbols (the `_ex` ones may be absent),
    /// and of `NODE_PROBES`' when the file is Node.js.
    OpenSsl {
        offsets: Vec<Option<u64>>,
        node: Option<Vec<u64>>,
    },
    /// A Go program with `crypto/tls`: where its probes go.
    GoTls(GoTlsFile),
    /// A Go program whose TLS is not read: why (it has none, or it is not x86_64).
    GoNotApplicable(String),
    /// A Go program whose `crypto/tls` could not be located: why.
    GoFailed(String),
    /// A TLS library we do not read.
    NotServed(&'static str),
    /// The dynamic loader: the file offset of `_dl_debug_state`, which it calls whenever a
    /// process's libraries change.
    Loader(u64),
    /// Nothing TLS.
    None,
}

/// A Go program's `crypto/tls` probes.
#[derive(Clone, Debug)]
struct GoTlsFile {
    /// `Go go1.23.5, functions from .gopclntab`.
    about: String,
    /// (program, function, file offset) in `GO_TLS_PROBES`' order, a RET probe once per RET.
    probes: Vec<(&'static str, &'static str, u64)>,
}

/// What a scan found in one process, for the report and the log.
pub enum Finding {
    Attached {
        file: String,
        node: bool,
    },
    Failed {
        file: String,
        why: String,
    },
    NotServed {
        library: &'static str,
        file: String,
    },
    /// Go `crypto/tls` probes on the program (`about`: its Go version and function table).
    GoAttached {
        file: String,
        about: String,
    },
    GoFailed {
        file: String,
        why: String,
    },
    GoNotApplicable {
        file: String,
        why: String,
    },
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Finding::Attached { file, node: false } => write!(f, "OpenSSL: attached ({file})"),
            Finding::Attached { file, node: true } => write!(
                f,
                "OpenSSL: attached ({file}, with Node.js TLSWrap probes for its sockets)"
            ),
            Finding::Failed { file, why } => write!(f, "OpenSSL: not attached ({file}): {why}"),
            Finding::GoAttached { file, about } => {
                write!(f, "{GO_TLS}: attached ({file}: {about})")
            }
            Finding::GoFailed { file, why } => write!(f, "{GO_TLS}: not attached ({file}): {why}"),
            Finding::GoNotApplicable { file, why } => {
                write!(f, "{GO_TLS}: not applicable ({file}): {why}")
            }
            Finding::NotServed { library, file } => write!(
                f,
                "{library} ({file}): not read by the agent; its encrypted connections are \
                 counted as connections_encrypted"
            ),
        }
    }
}

/// A library file's probes (held for their lifetime: dropping a link detaches it).
#[derive(Default)]
struct Attached {
    /// For every process mapping the file (then `per_process` is empty).
    all: Option<Vec<UprobeAttachment>>,
    /// For one selected process each.
    per_process: HashMap<u32, Vec<UprobeAttachment>>,
    /// The selected processes that map it.
    users: HashSet<u32>,
}

pub struct TlsLibraries {
    proc: ProcFs,
    /// Every process is traced: probes per file from the start.
    trace_all: bool,
    inspected: HashMap<FileId, Library>,
    attached: HashMap<FileId, Attached>,
    /// Files already looked at in each process.
    seen: HashMap<u32, HashSet<FileId>>,
    /// Processes with OpenSSL attached.
    openssl: HashSet<u32>,
    /// The `TLS_ATTACHED_*` bits set in the kernel so far.
    lookups_on: u32,
}

impl TlsLibraries {
    pub fn new(trace_all: bool) -> Self {
        Self {
            proc: ProcFs::host(),
            trace_all,
            inspected: HashMap::new(),
            attached: HashMap::new(),
            seen: HashMap::new(),
            openssl: HashSet::new(),
            lookups_on: 0,
        }
    }

    /// Looks at the files process `pid` maps that were not looked at yet: attaches the probes
    /// to each OpenSSL among them. Returns what it found (nothing for files seen before). A
    /// library we do not read is named only in a process without OpenSSL (curl maps GnuTLS
    /// through its LDAP and RTMP libraries, and encrypts with OpenSSL).
    /// `forked`: the process was just forked by this selected one (a fork event). Its files
    /// are then read through its parent, as a fork without exec maps what its parent did: a
    /// child may be gone before its files are attached to (a PostgreSQL backend that served
    /// a short session), and its `map_files` paths with it.
    pub fn scan(
        &mut self,
        probes: &mut Probes,
        pid: u32,
        stats: &Stats,
        forked: Option<u32>,
    ) -> Vec<Finding> {
        let mut findings = Vec::new();
        let mut not_served = Vec::new();
        let mut files = forked
            .map(|parent| self.proc.executable_mappings(parent))
            .unwrap_or_default();
        if files.is_empty() {
            files = self.proc.executable_mappings(pid);
        }
        log::debug!("tls: process {pid} maps {} executable files", files.len());
        for file in files {
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
                Library::Loader(offset) => self.watch_loader(probes, &file, offset, pid),
                Library::NotServed(library) => not_served.push(Finding::NotServed {
                    library,
                    file: file.name,
                }),
                Library::GoNotApplicable(why) => findings.push(Finding::GoNotApplicable {
                    file: file.name,
                    why,
                }),
                Library::GoFailed(why) => {
                    Stats::add(&stats.tls_attach_failed, 1);
                    findings.push(Finding::GoFailed {
                        file: file.name,
                        why,
                    });
                }
                Library::GoTls(go) => {
                    let attached = self.attached.entry(id).or_default();
                    attached.users.insert(pid);
                    // Per selected process (a Go program does not fork without exec), or for
                    // every process running the file when tracing them all.
                    let scope = if attached.all.is_some() {
                        None
                    } else if self.trace_all {
                        Some(None)
                    } else {
                        Some(std::num::NonZeroU32::new(pid))
                    };
                    let outcome = match scope {
                        None => Ok(()),
                        Some(only) => attach_go(probes, &file, &go, only).map(|links| {
                            Stats::add(&stats.tls_libraries_attached, 1);
                            let attached = self.attached.entry(id).or_default();
                            match only {
                                Some(_) => {
                                    attached.per_process.insert(pid, links);
                                }
                                None => attached.all = Some(links),
                            }
                        }),
                    };
                    match outcome {
                        Ok(()) => findings.push(Finding::GoAttached {
                            file: file.name,
                            about: go.about,
                        }),
                        // It exited while we attached: nothing failed.
                        Err(_) if !self.proc.exists(pid) => {}
                        Err(why) => {
                            Stats::add(&stats.tls_attach_failed, 1);
                            findings.push(Finding::GoFailed {
                                file: file.name,
                                why,
                            });
                        }
                    }
                }
                Library::OpenSsl { offsets, node } => {
                    self.openssl.insert(pid);
                    let attached = self.attached.entry(id).or_default();
                    let forked = forked.is_some_and(|parent| attached.users.contains(&parent));
                    attached.users.insert(pid);
                    let scope = if attached.all.is_some() {
                        None
                    } else if self.trace_all || forked {
                        Some(None)
                    } else {
                        Some(std::num::NonZeroU32::new(pid))
                    };
                    let outcome = match scope {
                        None => Ok(()),
                        Some(only) => self
                            .attach(probes, &file, &offsets, node.as_deref(), only)
                            .map(|links| {
                                Stats::add(&stats.tls_libraries_attached, 1);
                                let attached = self.attached.entry(id).or_default();
                                match only {
                                    Some(_) => {
                                        attached.per_process.insert(pid, links);
                                    }
                                    None => {
                                        attached.all = Some(links);
                                        attached.per_process.clear();
                                        // Once they are in place: a process forked from now
                                        // on is followed from its first call.
                                        if forked {
                                            log::info!(
                                                "tls: {}: probes now on every process mapping \
                                                 it: a selected process forked {pid}, which \
                                                 maps it too (a per-process probe does not \
                                                 follow a fork)",
                                                file.name
                                            );
                                        }
                                    }
                                }
                            }),
                    };
                    match outcome {
                        Ok(()) => findings.push(Finding::Attached {
                            file: file.name,
                            node: node.is_some(),
                        }),
                        // It exited while we attached: nothing failed.
                        Err(_) if !self.proc.exists(pid) => {}
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

    /// Attaches the loader's probe (once per loader file): a selected process's new libraries are
    /// then looked at when they are loaded. Without it (the loader has no `_dl_debug_state`, or
    /// the probe failed: in the log), the rescan timer finds them later.
    fn watch_loader(&mut self, probes: &mut Probes, file: &Executable, offset: u64, pid: u32) {
        let id = (file.dev, file.ino);
        if let Some(a) = self.attached.get_mut(&id)
            && a.all.is_some()
        {
            a.users.insert(pid);
            return;
        }
        let at = UprobeAt::FileOffset {
            offset,
            function: "_dl_debug_state",
        };
        match probes.attach_uprobe("agent_loader_state", &file.path, at, None) {
            Ok(link) => {
                log::debug!("tls: watching the loader {} for new libraries", file.name);
                self.attached.insert(
                    id,
                    Attached {
                        all: Some(vec![link]),
                        per_process: HashMap::new(),
                        users: HashSet::from([pid]),
                    },
                );
            }
            Err(e) => log::info!(
                "tls: libraries loaded later are found by the rescan only: the loader's probe \
                 ({}) did not attach: {e}",
                file.name
            ),
        }
    }

    fn attach(
        &mut self,
        probes: &mut Probes,
        file: &Executable,
        offsets: &[Option<u64>],
        node: Option<&[u64]>,
        pid: Option<std::num::NonZeroU32>,
    ) -> Result<Vec<UprobeAttachment>, String> {
        let bits = TLS_ATTACHED_OPENSSL | node.map_or(0, |_| TLS_ATTACHED_NODE);
        if self.lookups_on & bits != bits {
            probes
                .enable_tls_lookups(bits)
                .map_err(|e| format!("cannot switch the socket programs' TLS lookups on: {e}"))?;
            self.lookups_on |= bits;
        }
        let mut wanted: Vec<(&'static str, &'static str, u64)> = OPENSSL_PROBES
            .iter()
            .zip(offsets)
            .filter_map(|(&(program, symbol), offset)| Some((program, symbol, (*offset)?)))
            .collect();
        for (&(program, symbol), &offset) in NODE_PROBES.iter().zip(node.unwrap_or_default()) {
            wanted.push((program, symbol, offset));
            wanted.push((NODE_RETURN, symbol, offset));
        }
        let mut links = Vec::new();
        for (program, symbol, offset) in wanted {
            let at = UprobeAt::FileOffset {
                offset,
                function: symbol,
            };
            // The links attached so far are dropped (detached) with `links` on failure.
            let link = probes
                .attach_uprobe(program, &file.path, at, pid)
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
            a.per_process.remove(&pid);
            !a.users.is_empty()
        });
    }
}

/// The function the start-up measurement probes (its own, so no process is disturbed).
#[inline(never)]
extern "C" fn uprobe_canary(x: u64) -> u64 {
    std::hint::black_box(x).wrapping_add(1)
}

/// What one uprobe hit costs this process, in ns: the canary called with and without a probe
/// on it (the probe's program returns at once: the agent is never selected). Each TLS read or
/// write of a traced process pays about one hit (entry and return share one breakpoint); the
/// report says so, because the cost depends on the machine far more than on the agent
/// (measured: 23 µs per hit on this project's VM kind, where a trap is slow).
pub fn uprobe_hit_ns(probes: &mut Probes) -> Result<u64, String> {
    const CALLS: u32 = 200;
    let time = || {
        let start = std::time::Instant::now();
        let mut x = 0;
        for _ in 0..CALLS {
            x = uprobe_canary(std::hint::black_box(x));
        }
        std::hint::black_box(x);
        start.elapsed()
    };
    let function = uprobe_canary as *const () as u64;
    let (path, offset) = crate::proc::own_file_offset(function)
        .ok_or("the canary function is in no file mapping of the agent")?;
    let bare = time();
    let link = probes
        .attach_uprobe(
            "agent_loader_state",
            &path,
            UprobeAt::FileOffset {
                offset,
                function: "uprobe_canary",
            },
            std::num::NonZeroU32::new(std::process::id()),
        )
        .map_err(|e| e.to_string())?;
    let probed = time();
    drop(link);
    Ok((probed.saturating_sub(bare).as_nanos() / u128::from(CALLS)) as u64)
}

/// What `file` is for TLS, from its name and its dynamic symbols.
fn inspect(file: &Executable) -> Library {
    let base = file.name.rsplit('/').next().unwrap_or(&file.name);
    if let Some(&(_, library)) = NOT_SERVED.iter().find(|(name, _)| base.starts_with(name)) {
        return Library::NotServed(library);
    }
    from_symbols(file)
        .or_else(|| go_program(file))
        .unwrap_or(Library::None)
}

/// Attaches a Go program's TLS probes, for process `pid` only or (`None`) for every process
/// running it.
fn attach_go(
    probes: &mut Probes,
    file: &Executable,
    go: &GoTlsFile,
    pid: Option<std::num::NonZeroU32>,
) -> Result<Vec<UprobeAttachment>, String> {
    let mut links = Vec::with_capacity(go.probes.len());
    for &(program, function, offset) in &go.probes {
        let at = UprobeAt::FileOffset { offset, function };
        // The links attached so far are dropped (detached) with `links` on failure.
        let link = probes
            .attach_uprobe(program, &file.path, at, pid)
            .map_err(|e| format!("{program} on {function}: {e}"))?;
        links.push(link);
    }
    Ok(links)
}

/// A Go program's `crypto/tls`: where its probes go, or why it has none (`None`: not a Go
/// program).
fn go_program(file: &Executable) -> Option<Library> {
    use object::Object;
    let data = std::fs::File::open(&file.path).ok()?;
    // Read on demand: only the headers and the tables needed of a possibly large program.
    let data = object::read::ReadCache::new(data);
    let elf = object::File::parse(&data).ok()?;
    // A Go program: its own TLS.
    let names: Vec<&str> = GO_TLS_PROBES.iter().map(|&(_, f, _)| f).collect();
    Some(match crate::elf::go::functions(&elf, &names)? {
        Err(GoBinaryError::NotAmd64) => Library::GoNotApplicable(format!(
            "{}: the Go TLS probes read Go's x86_64 register ABI and stack layout only",
            match elf.architecture() {
                object::Architecture::Aarch64 => "an arm64 Go program",
                _ => "not an x86_64 Go program",
            }
        )),
        Ok(found)
            if !["crypto/tls.(*Conn).Read", "crypto/tls.(*Conn).Write"]
                .iter()
                .all(|f| found.entries.contains_key(*f)) =>
        {
            Library::GoNotApplicable("the program does not use crypto/tls".into())
        }
        Err(e) => Library::GoFailed(e.to_string()),
        Ok(found) => match probe_offsets(&elf, &data, &found, GO_TLS_PROBES, |_| false) {
            Ok(probes) => Library::GoTls(GoTlsFile {
                about: format!("Go {}, functions from {}", found.version, found.source),
                probes,
            }),
            Err(e) => Library::GoFailed(e.to_string()),
        },
    })
}

/// From `file`'s dynamic symbol table: OpenSSL when it defines at least `SSL_read`,
/// `SSL_write` and `SSL_new` (the file offsets of its functions, and of Node.js's `TLSWrap`
/// methods when it has them all, each exactly once); the loader when it defines
/// `_dl_debug_state`.
fn from_symbols(file: &Executable) -> Option<Library> {
    use object::{Object, ObjectSymbol};
    let data = std::fs::File::open(&file.path).ok()?;
    // Read on demand: only the headers and the dynamic symbols of a possibly large program.
    let data = object::read::ReadCache::new(data);
    let elf = object::File::parse(&data).ok()?;
    let mut addresses: HashMap<&str, u64> = HashMap::new();
    let mut node: Vec<Vec<u64>> = vec![Vec::new(); NODE_PROBES.len()];
    let mut loader = None;
    for sym in elf.dynamic_symbols() {
        if !sym.is_definition() {
            continue;
        }
        let Ok(name) = sym.name() else {
            continue;
        };
        if name == "_dl_debug_state" {
            loader = Some(sym.address());
        } else if OPENSSL_PROBES.iter().any(|&(_, s)| s == name) {
            addresses.insert(name, sym.address());
        } else if let Some(i) = NODE_PROBES.iter().position(|&(_, p)| name.starts_with(p)) {
            node[i].push(sym.address());
        }
    }
    let offset = |address: u64| crate::elf::file_offset(&elf, address);
    if let Some(address) = loader {
        return offset(address).map(Library::Loader);
    }
    let offsets: Vec<Option<u64>> = OPENSSL_PROBES
        .iter()
        .map(|&(_, symbol)| offset(*addresses.get(symbol)?))
        .collect();
    if !offsets[..OPENSSL_REQUIRED].iter().all(Option::is_some) {
        return None;
    }
    let node = node
        .iter()
        .map(|found| match found.as_slice() {
            [address] => offset(*address),
            _ => None,
        })
        .collect::<Option<Vec<u64>>>();
    Some(Library::OpenSsl { offsets, node })
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
        let Library::OpenSsl { offsets, node } = inspect(&executable(path)) else {
            panic!("{path} not recognised as OpenSSL");
        };
        assert!(offsets.iter().all(Option::is_some), "{offsets:?}");
        assert!(node.is_none());
        // Entry and return probes of one function share its offset; functions differ.
        assert_eq!(offsets[0], offsets[2]);
        assert_ne!(offsets[0], offsets[1]);
    }

    #[test]
    fn a_program_exporting_openssl_is_found_by_its_symbols_not_its_name() {
        // Node.js links OpenSSL statically and exports it for native addons.
        let node = "/usr/bin/node";
        let Library::OpenSsl {
            offsets,
            node: wrap,
        } = inspect(&executable(node))
        else {
            panic!("{node} exports SSL_read/SSL_write but was not recognised");
        };
        assert!(offsets.iter().all(Option::is_some));
        // And its TLSWrap methods, each found once (not their `_ZThn` thunks).
        let wrap = wrap.expect("node's TLSWrap methods");
        assert_eq!(wrap.len(), NODE_PROBES.len());
        let distinct: HashSet<_> = wrap.iter().collect();
        assert_eq!(distinct.len(), wrap.len());
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
    fn the_loader_is_found_by_its_debugger_hook() {
        let loader = ["/lib64/ld-linux-x86-64.so.2", "/lib/ld-linux-aarch64.so.1"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("the dynamic loader");
        let path = std::fs::canonicalize(loader).expect("loader path");
        let path = path.to_str().expect("utf-8 path");
        assert!(
            matches!(inspect(&executable(path)), Library::Loader(offset) if offset > 0),
            "{path}"
        );
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

    fn go_tls_of(path: &std::path::Path) -> GoTlsFile {
        match inspect(&executable(path.to_str().expect("utf-8 path"))) {
            Library::GoTls(go) => go,
            Library::GoFailed(why) | Library::GoNotApplicable(why) => {
                panic!("{}: {why}", path.display())
            }
            _ => panic!("{} not recognised as a Go program", path.display()),
        }
    }

    #[test]
    fn go_programs_get_crypto_tls_probes_stripped_or_not() {
        use crate::elf::go::testing::{VERSIONS, build};
        for version in VERSIONS {
            let full = go_tls_of(&build(version, false));
            let stripped = go_tls_of(&build(version, true));
            assert!(
                full.about.starts_with(&format!("Go go{version}"))
                    && full.about.ends_with("functions from .symtab"),
                "{}",
                full.about
            );
            assert!(
                stripped.about.ends_with("functions from .gopclntab"),
                "{}",
                stripped.about
            );
            // The same code at the same place: the same probes.
            assert_eq!(full.probes, stripped.probes, "Go {version}");
            // Every probe is placed; a RET probe at least once per function.
            for &(program, function, at) in GO_TLS_PROBES {
                let n = full
                    .probes
                    .iter()
                    .filter(|p| p.0 == program && p.1 == function)
                    .count();
                match at {
                    GoAt::Entry => assert_eq!(n, 1, "Go {version}: {program} on {function}"),
                    GoAt::Returns => assert!(n >= 1, "Go {version}: {program} on {function}"),
                }
            }
            // `Read`'s RETs are attached before its entry (a call is never left unended).
            let entry = full
                .probes
                .iter()
                .position(|p| p.0 == "agent_go_tls_read")
                .expect("read probe");
            assert!(
                full.probes[..entry]
                    .iter()
                    .any(|p| p.0 == "agent_go_tls_read_ret")
            );
        }
    }

    #[test]
    fn a_go_program_without_crypto_tls_is_named_not_applicable() {
        use crate::elf::go::testing::build_program;
        let path = build_program(
            "no_tls",
            "1.23",
            false,
            "package main\n\nimport \"os\"\n\nfunc main() { os.Stdout.Write([]byte(\"ok\\n\")) }\n",
        );
        match inspect(&executable(path.to_str().expect("utf-8"))) {
            Library::GoNotApplicable(why) => {
                assert_eq!(why, "the program does not use crypto/tls")
            }
            _ => panic!("a Go program without crypto/tls must be named not applicable"),
        }
    }

    #[test]
    fn an_arm64_go_program_is_named_not_applicable() {
        use crate::elf::go::testing::build_program_for;
        let path = build_program_for(
            "arm64",
            "tls_client",
            "1.23",
            false,
            "package main\n\nimport \"net/http\"\n\nfunc main() { http.Get(\"https://127.0.0.1/\") }\n",
        );
        match inspect(&executable(path.to_str().expect("utf-8"))) {
            Library::GoNotApplicable(why) => {
                assert!(why.starts_with("an arm64 Go program"), "{why}")
            }
            _ => panic!("an arm64 Go program must be named not applicable, with the reason"),
        }
    }

    #[test]
    fn go_findings_read_as_the_report_says() {
        let attached = Finding::GoAttached {
            file: "/srv/app".into(),
            about: "Go go1.23.5, functions from .gopclntab".into(),
        };
        assert_eq!(
            attached.to_string(),
            "Go crypto/tls: attached (/srv/app: Go go1.23.5, functions from .gopclntab)"
        );
        let arm = Finding::GoNotApplicable {
            file: "/srv/app".into(),
            why: "an arm64 Go program".into(),
        };
        assert_eq!(
            arm.to_string(),
            "Go crypto/tls: not applicable (/srv/app): an arm64 Go program"
        );
    }
}
