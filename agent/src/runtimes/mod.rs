//! Runtime mechanisms: probes inside a traced program that tell the kernel which served request
//! a client request is written for, where the thread cannot tell (an event loop serving many).
//!
//! Each selected process's executable is inspected once per file (device, inode); when a
//! mechanism applies, its uprobes are attached and the process is marked in `RUNTIME_PIDS` (its
//! forked children inherit the mark in the kernel). With a selection, the probes are attached
//! to each selected process alone: other processes running the same program (another nginx on
//! the host) never hit a breakpoint, which costs a trap per call even when the program
//! returns at once. Tracing every process, they are attached to the file once, for all, and
//! detached after the last selected process running it exits.

mod go;
mod nginx;

use std::{
    collections::{HashMap, HashSet},
    fmt,
};

use clap::ValueEnum;

use crate::{
    kernel::{Probes, RuntimePids, UprobeAt, UprobeAttachment},
    proc::{Executable, ProcFs},
    stats::Stats,
};

/// A runtime mechanism (`--runtime-linking`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, ValueEnum)]
pub enum Mechanism {
    /// nginx: an upstream request belongs to the request whose client connection it is
    /// written for (uprobes on `ngx_chain_writer`).
    Nginx,
    /// Go `net/http`: a client request belongs to the request the goroutine that started it
    /// serves; the transport's write goroutine hands its write off (uprobes on `net/http` and
    /// `internal/poll`, found in `.symtab` or `.gopclntab`).
    Go,
    /// No runtime mechanism.
    None,
}

impl fmt::Display for Mechanism {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mechanism::Nginx => "nginx upstream hand-off",
            Mechanism::Go => "Go net/http goroutine hand-off",
            Mechanism::None => "none",
        })
    }
}

/// The kernel programs and where a mechanism attaches them in a program file.
struct Plan {
    mechanism: Mechanism,
    flags: u32,
    /// (program, symbol) pairs: at the function's entry.
    probes: &'static [(&'static str, &'static str)],
    /// (program, symbol) pairs: at each RET of the function (found by decoding its code).
    returns: &'static [(&'static str, &'static str)],
}

/// A program file a mechanism applies to: where its probes go in it.
#[derive(Clone)]
struct Inspected {
    plan: &'static Plan,
    /// Where its probes go, (program, function, file offset); `None`: `plan.probes` at their
    /// symbols.
    offsets: Option<Vec<(&'static str, &'static str, u64)>>,
    /// What the report says of the file beyond its name (`Go go1.23.5, .gopclntab`).
    about: String,
}

/// What became of a selected process, for the start-up report and the log.
pub enum Outcome {
    /// The mechanism's probes are on the process's program file.
    Attached {
        mechanism: Mechanism,
        file: String,
        about: String,
    },
    /// A mechanism applies but could not attach: why.
    Failed { mechanism: Mechanism, why: String },
    /// Switched off by `--runtime-linking`.
    Disabled { mechanism: Mechanism },
    /// No mechanism for this program (not nginx), or its file could not be read: why.
    NotApplicable(String),
}

impl Outcome {
    /// A mechanism applies to the process (attached or not).
    pub fn applies(&self) -> bool {
        !matches!(self, Outcome::NotApplicable(_))
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Attached {
                mechanism,
                file,
                about,
            } if about.is_empty() => write!(f, "{mechanism}: attached ({file})"),
            Outcome::Attached {
                mechanism,
                file,
                about,
            } => write!(f, "{mechanism}: attached ({file}: {about})"),
            Outcome::Failed { mechanism, why } => write!(f, "{mechanism}: not attached: {why}"),
            Outcome::Disabled {
                mechanism: Mechanism::Go,
            } => write!(
                f,
                "{}: applies, switched off by --runtime-linking (its calls are linked only by \
                 exact evidence: goroutines move between threads)",
                Mechanism::Go
            ),
            Outcome::Disabled { mechanism } => {
                write!(f, "{mechanism}: applies, switched off by --runtime-linking")
            }
            Outcome::NotApplicable(why) => write!(f, "no runtime mechanism ({why})"),
        }
    }
}

/// Probes attached for a program file (all processes) or for one process.
struct Attached {
    /// Held for the probes' lifetime: dropping a link detaches it.
    _probes: Vec<UprobeAttachment>,
    /// The selected processes they serve.
    users: HashSet<u32>,
}

/// (device, inode) of a program file.
type FileId = (u64, u64);

/// What a set of probes is attached for.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Scope {
    /// Every process running the file (tracing every process).
    File(FileId),
    /// One selected process.
    Process(u32),
    /// No probes: the process is only marked (a Go program with the Go mechanism off: its
    /// threads still never stand for a request).
    MarkOnly(u32),
}

pub struct Runtimes {
    enabled: HashSet<Mechanism>,
    proc: ProcFs,
    /// `RUNTIME_PIDS` (absent when the kernel programs could not be loaded).
    pids: Option<RuntimePids>,
    /// Files inspected: the plan that applies, if any, or why none does.
    inspected: HashMap<FileId, Result<Inspected, String>>,
    /// Probes per file when tracing every process, else per process.
    per_file: bool,
    attached: HashMap<Scope, Attached>,
    by_pid: HashMap<u32, Scope>,
    /// Processes whose threads started or stopped standing for no request (Go: goroutines
    /// move between threads), for userspace's thread-based linking (see `take_thread_changes`).
    thread_changes: Vec<(u32, bool)>,
    threadless: HashSet<u32>,
}

impl Runtimes {
    /// `trace_all`: every process is traced (probes per program file, not per process).
    pub fn new(enabled: &[Mechanism], pids: Option<RuntimePids>, trace_all: bool) -> Self {
        Self {
            enabled: enabled
                .iter()
                .copied()
                .filter(|m| *m != Mechanism::None)
                .collect(),
            proc: ProcFs::host(),
            pids,
            inspected: HashMap::new(),
            per_file: trace_all,
            attached: HashMap::new(),
            by_pid: HashMap::new(),
            thread_changes: Vec::new(),
            threadless: HashSet::new(),
        }
    }

    /// Whether selected programs are inspected: the kernel programs loaded (even with every
    /// mechanism off, a Go program is marked so that its threads are never taken for a request).
    pub fn is_on(&self) -> bool {
        self.pids.is_some()
    }

    /// Every process on the host with its command name (tracing all processes).
    pub fn candidates(&self) -> Vec<(u32, String)> {
        let own = std::process::id();
        let mut pids = self.proc.pids();
        pids.sort_unstable();
        pids.into_iter()
            .filter(|&p| p != own)
            .filter_map(|p| Some((p, self.proc.comm(p)?)))
            .collect()
    }

    /// A process is selected (or forked by a selected one): attach what its program needs.
    pub fn on_selected(&mut self, probes: &mut Probes, pid: u32, stats: &Stats) -> Outcome {
        if self.pids.is_none() {
            return Outcome::NotApplicable("the runtime probes did not load".into());
        }
        if self.by_pid.contains_key(&pid) {
            return Outcome::NotApplicable("already handled".into());
        }
        let Some(exe) = self.proc.executable(pid) else {
            return Outcome::NotApplicable("its program file cannot be read".into());
        };
        let id = (exe.dev, exe.ino);
        let found = match self
            .inspected
            .entry(id)
            .or_insert_with(|| inspect(&exe))
            .clone()
        {
            Ok(found) => found,
            Err(why) => return Outcome::NotApplicable(why),
        };
        let plan = found.plan;
        if !self.enabled.contains(&plan.mechanism) {
            if plan.mechanism == Mechanism::Go {
                self.mark_threadless(pid);
            }
            return Outcome::Disabled {
                mechanism: plan.mechanism,
            };
        }
        let (scope, only) = if self.per_file {
            (Scope::File(id), None)
        } else {
            (Scope::Process(pid), std::num::NonZeroU32::new(pid))
        };
        if let std::collections::hash_map::Entry::Vacant(slot) = self.attached.entry(scope) {
            match attach(probes, &found, &exe, only) {
                Ok(probes) => {
                    slot.insert(Attached {
                        _probes: probes,
                        users: HashSet::new(),
                    });
                }
                Err(why) => {
                    Stats::add(&stats.runtime_attach_failed, 1);
                    return Outcome::Failed {
                        mechanism: plan.mechanism,
                        why,
                    };
                }
            }
        }
        if let Some(map) = self.pids.as_mut()
            && let Err(e) = map.mark(pid, plan.flags)
        {
            Stats::add(&stats.runtime_attach_failed, 1);
            return Outcome::Failed {
                mechanism: plan.mechanism,
                why: format!("cannot mark the process for its probes: {e}"),
            };
        }
        if let Some(a) = self.attached.get_mut(&scope) {
            a.users.insert(pid);
        }
        self.by_pid.insert(pid, scope);
        if plan.mechanism == Mechanism::Go && self.threadless.insert(pid) {
            self.thread_changes.push((pid, true));
        }
        Stats::add(&stats.runtime_processes, 1);
        Outcome::Attached {
            mechanism: plan.mechanism,
            file: exe.name,
            about: found.about,
        }
    }

    /// A Go program without its mechanism: goroutines move between threads, so neither the
    /// kernel nor userspace may take its threads for the request they read.
    fn mark_threadless(&mut self, pid: u32) {
        if let Some(map) = self.pids.as_mut()
            && map.mark(pid, agent_common::RUNTIME_GO).is_ok()
        {
            self.by_pid.insert(pid, Scope::MarkOnly(pid));
        }
        if self.threadless.insert(pid) {
            self.thread_changes.push((pid, true));
        }
    }

    /// Processes whose threads stopped (`true`) or again (`false`) stand for the request they
    /// read, since the last call: userspace must not link their client spans by thread.
    pub fn take_thread_changes(&mut self) -> Vec<(u32, bool)> {
        std::mem::take(&mut self.thread_changes)
    }

    /// A process exited (or runs another program now): its probes go with it, a file's with
    /// the last process running it.
    pub fn on_exit(&mut self, pid: u32) {
        if self.threadless.remove(&pid) {
            self.thread_changes.push((pid, false));
        }
        let Some(scope) = self.by_pid.remove(&pid) else {
            return;
        };
        if let Some(map) = self.pids.as_mut() {
            map.unmark(pid);
        }
        let Some(a) = self.attached.get_mut(&scope) else {
            return;
        };
        a.users.remove(&pid);
        if a.users.is_empty() {
            // Dropping the links detaches the probes.
            self.attached.remove(&scope);
        }
    }
}

/// Which mechanism a program file needs, from its symbols.
fn inspect(exe: &Executable) -> Result<Inspected, String> {
    let data =
        std::fs::File::open(&exe.path).map_err(|e| format!("cannot read {}: {e}", exe.name))?;
    // Read on demand: only the headers and symbol tables of a possibly large program.
    let data = object::read::ReadCache::new(data);
    let file = object::File::parse(&data)
        .map_err(|e| format!("{} is not an ELF file we can read: {e}", exe.name))?;
    if nginx::applies(&file) {
        return Ok(Inspected {
            plan: &nginx::PLAN,
            offsets: None,
            about: String::new(),
        });
    }
    match go::inspect(&file, &data) {
        Some(Ok(binary)) => Ok(Inspected {
            plan: &go::PLAN,
            offsets: Some(binary.probes),
            about: format!("Go {}, functions from {}", binary.version, binary.source),
        }),
        // A Go program this mechanism cannot serve: say why (not "no mechanism").
        Some(Err(why)) => Err(format!("a Go program the Go mechanism cannot serve: {why}")),
        None => Err("not nginx, not Go".into()),
    }
}

/// Attaches a plan's probes to `exe`, for process `pid` only or (`None`) for all.
fn attach(
    probes: &mut Probes,
    found: &Inspected,
    exe: &Executable,
    pid: Option<std::num::NonZeroU32>,
) -> Result<Vec<UprobeAttachment>, String> {
    let placements: Vec<(&str, &str, UprobeAt<'_>)> = match &found.offsets {
        Some(offsets) => offsets
            .iter()
            .map(|&(program, function, offset)| {
                (program, function, UprobeAt::FileOffset { offset, function })
            })
            .collect(),
        None => found
            .plan
            .probes
            .iter()
            .map(|&(program, symbol)| (program, symbol, UprobeAt::Symbol(symbol)))
            .collect(),
    };
    let mut links = Vec::new();
    for (program, symbol, at) in placements {
        match probes.attach_uprobe(program, &exe.path, at, pid) {
            Ok(link) => links.push(link),
            // The links attached so far are dropped (detached) with `links`.
            Err(e) => return Err(format!("{program} on {symbol}: {e}")),
        }
    }
    Ok(links)
}
