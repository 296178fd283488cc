//! Go (`net/http`): the kernel programs `agent_go_*` (agent-ebpf/src/go.rs) on three functions
//! of the standard library, found in the binary's own function table.
//!
//! A Go program is recognised by its `.go.buildinfo` section, which also names the Go version
//! it was built with. Function entries come from `.symtab` when the binary has one, else from
//! `.gopclntab`, which `-ldflags="-s -w"` keeps (the runtime needs it for stack traces): its
//! function table maps every function's name to its entry, so stripped binaries are served too.

use std::collections::HashMap;

use agent_common::{RUNTIME_GO, RUNTIME_REQUESTS_BY_FD};
use object::{Object, ObjectSection, ObjectSymbol};
use thiserror::Error;

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
    ],
};

/// The oldest Go whose binaries this reader knows: `.go.buildinfo` with the version inline and
/// the 1.18 `pclntab` layout (both Go 1.18+), the register ABI the probes read (1.17+).
const MIN_MINOR: u32 = 18;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum GoBinaryError {
    #[error(
        "its .go.buildinfo section is not the Go 1.18+ format (built with Go older than 1.18?)"
    )]
    OldBuildInfo,
    #[error("its .go.buildinfo section cannot be read")]
    BadBuildInfo,
    #[error("built with {0}: Go 1.{MIN_MINOR} or newer is needed (rebuild it with a newer Go)")]
    TooOld(String),
    #[error(
        "it is not an x86_64 program (the Go probes are checked against Go's x86_64 register ABI and struct layouts only; arm64 is not yet)"
    )]
    NotAmd64,
    #[error("it has neither .symtab nor .gopclntab (a Go binary always keeps .gopclntab)")]
    NoFunctionTable,
    #[error(".gopclntab is not in a format this agent reads ({0})")]
    BadPclntab(&'static str),
    #[error("function {0} is not in it (net/http not linked in, or inlined)")]
    MissingFunction(String),
    #[error("function {0} is in .gopclntab more than once (an ABI wrapper?): not guessing")]
    AmbiguousFunction(String),
    #[error("function {name} at {address:#x} is outside the file's loaded segments")]
    NotInFile { name: String, address: u64 },
}

/// What the agent needs of a Go program file.
#[derive(Debug)]
pub struct GoBinary {
    /// `go1.23.5`.
    pub version: String,
    /// Where the function entries came from (`.symtab` or `.gopclntab`).
    pub source: &'static str,
    /// The file offsets of the plan's functions, in its order.
    pub offsets: Vec<u64>,
}

/// `None` when the file is not a Go program.
pub(super) fn inspect<'d, R: object::ReadRef<'d>>(
    file: &object::File<'d, R>,
) -> Option<Result<GoBinary, GoBinaryError>> {
    let buildinfo = file.section_by_name(".go.buildinfo")?;
    Some(read_binary(file, &buildinfo))
}

fn read_binary<'d, R: object::ReadRef<'d>>(
    file: &object::File<'d, R>,
    buildinfo: &object::Section<'d, '_, R>,
) -> Result<GoBinary, GoBinaryError> {
    let version = buildinfo
        .data()
        .map_err(|_| GoBinaryError::BadBuildInfo)
        .and_then(build_version)?;
    if minor_version(&version).is_none_or(|m| m < MIN_MINOR) {
        return Err(GoBinaryError::TooOld(version));
    }
    if file.architecture() != object::Architecture::X86_64 {
        return Err(GoBinaryError::NotAmd64);
    }
    let names: Vec<&str> = PLAN.probes.iter().map(|&(_, f)| f).collect();
    let (source, addresses) = match from_symtab(file, &names) {
        Some(found) => (".symtab", found),
        None => {
            let section = file
                .section_by_name(".gopclntab")
                .ok_or(GoBinaryError::NoFunctionTable)?;
            let data = section
                .data()
                .map_err(|_| GoBinaryError::BadPclntab("unreadable"))?;
            let text = file.section_by_name(".text").map(|s| s.address());
            (".gopclntab", Pclntab::parse(data, text)?.find(&names)?)
        }
    };
    let mut offsets = Vec::with_capacity(names.len());
    for name in names {
        let address = *addresses
            .get(name)
            .ok_or_else(|| GoBinaryError::MissingFunction(name.to_string()))?;
        offsets.push(crate::elf::file_offset(file, address).ok_or_else(|| {
            GoBinaryError::NotInFile {
                name: name.to_string(),
                address,
            }
        })?);
    }
    Ok(GoBinary {
        version,
        source,
        offsets,
    })
}

/// The Go version in a `.go.buildinfo` section (Go 1.18+: inline after the 32-byte header).
pub fn build_version(data: &[u8]) -> Result<String, GoBinaryError> {
    const MAGIC: &[u8] = b"\xff Go buildinf:";
    const FLAG_INLINE: u8 = 2;
    if data.len() < 32 || !data.starts_with(MAGIC) {
        return Err(GoBinaryError::BadBuildInfo);
    }
    if data[15] & FLAG_INLINE == 0 {
        return Err(GoBinaryError::OldBuildInfo);
    }
    let (len, used) = uvarint(&data[32..]).ok_or(GoBinaryError::BadBuildInfo)?;
    let start = 32 + used;
    let end = usize::try_from(len)
        .ok()
        .and_then(|l| start.checked_add(l))
        .filter(|&e| e <= data.len())
        .ok_or(GoBinaryError::BadBuildInfo)?;
    let version =
        std::str::from_utf8(&data[start..end]).map_err(|_| GoBinaryError::BadBuildInfo)?;
    if !version.starts_with("go") {
        return Err(GoBinaryError::BadBuildInfo);
    }
    Ok(version.to_string())
}

fn uvarint(data: &[u8]) -> Option<(u64, usize)> {
    let mut value = 0u64;
    for (i, &b) in data.iter().enumerate().take(10) {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

/// `go1.23.5` → 23 (also `go1.21rc2`, `go1.22.1 X:nocoverageredesign`).
fn minor_version(version: &str) -> Option<u32> {
    let rest = version.strip_prefix("go1.")?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// The entries of `names` in the symbol table, if the file has one with all of them.
fn from_symtab<'d, R: object::ReadRef<'d>>(
    file: &object::File<'d, R>,
    names: &[&str],
) -> Option<HashMap<String, u64>> {
    let mut found = HashMap::new();
    for sym in file.symbols() {
        if let Ok(name) = sym.name()
            && names.contains(&name)
            && sym.address() != 0
        {
            found.insert(name.to_string(), sym.address());
        }
    }
    (found.len() == names.len()).then_some(found)
}

/// Go 1.18+ `pclntab`: a header (`runtime.pcHeader`), the function name table and the
/// function table (`functab`: per function its entry, relative to the text start, and the
/// offset of its `_func` record, whose second word is the offset of its name).
pub struct Pclntab<'a> {
    data: &'a [u8],
    nfunc: usize,
    text_start: u64,
    funcnames: usize,
    pcln: usize,
}

/// 1.18 and 1.19 (`0xfffffff0`), 1.20 and later (`0xfffffff1`): the same layout.
const PCLNTAB_MAGICS: [u32; 2] = [0xffff_fff0, 0xffff_fff1];

impl<'a> Pclntab<'a> {
    /// `text`: the `.text` section's address, used when the header's text start is 0 (a
    /// position-independent binary leaves it to a relocation).
    pub fn parse(data: &'a [u8], text: Option<u64>) -> Result<Self, GoBinaryError> {
        let u32_at = |at: usize| -> Option<u32> {
            Some(u32::from_le_bytes(data.get(at..at + 4)?.try_into().ok()?))
        };
        let u64_at = |at: usize| -> Option<u64> {
            Some(u64::from_le_bytes(data.get(at..at + 8)?.try_into().ok()?))
        };
        let magic = u32_at(0).ok_or(GoBinaryError::BadPclntab("too short"))?;
        if !PCLNTAB_MAGICS.contains(&magic) {
            return Err(GoBinaryError::BadPclntab(
                "unknown magic: built with Go older than 1.18?",
            ));
        }
        // pad1, pad2, minLC (x86: 1), ptrSize (8).
        if data.get(4..8) != Some(&[0, 0, 1, 8]) {
            return Err(GoBinaryError::BadPclntab("not a 64-bit x86 table"));
        }
        let word = |i: usize| u64_at(8 + 8 * i).ok_or(GoBinaryError::BadPclntab("too short"));
        let to_usize = |v: u64| usize::try_from(v).map_err(|_| GoBinaryError::BadPclntab("size"));
        let nfunc = to_usize(word(0)?)?;
        let mut text_start = word(2)?;
        let funcnames = to_usize(word(3)?)?;
        let pcln = to_usize(word(7)?)?;
        if text_start == 0 {
            text_start = text.ok_or(GoBinaryError::BadPclntab("no text start"))?;
        }
        let table_end = nfunc
            .checked_mul(8)
            .and_then(|n| n.checked_add(pcln))
            .ok_or(GoBinaryError::BadPclntab("function count"))?;
        if funcnames >= data.len() || table_end > data.len() {
            return Err(GoBinaryError::BadPclntab("tables outside the section"));
        }
        Ok(Self {
            data,
            nfunc,
            text_start,
            funcnames,
            pcln,
        })
    }

    /// Every function's (name, entry address); records that do not parse are skipped.
    pub fn functions(&self) -> impl Iterator<Item = (&'a str, u64)> + '_ {
        (0..self.nfunc).filter_map(move |i| self.function(i))
    }

    fn function(&self, i: usize) -> Option<(&'a str, u64)> {
        let data = self.data;
        let u32_at = |at: usize| -> Option<u32> {
            Some(u32::from_le_bytes(data.get(at..at + 4)?.try_into().ok()?))
        };
        let entry = self.pcln + 8 * i;
        let entry_off = u32_at(entry)?;
        let func = self.pcln.checked_add(u32_at(entry + 4)? as usize)?;
        // `_func { entryOff uint32; nameOff int32; ... }`.
        let name_off = usize::try_from(i32::from_le_bytes(u32_at(func + 4)?.to_le_bytes())).ok()?;
        let start = self.funcnames.checked_add(name_off)?;
        let rest = data.get(start..)?;
        let name = std::str::from_utf8(&rest[..rest.iter().position(|&b| b == 0)?]).ok()?;
        Some((name, self.text_start + u64::from(entry_off)))
    }

    /// The entries of those of `names` that are in the table. A name listed twice (an
    /// assembly function's ABI wrapper carries its name too) is an error.
    pub fn find(&self, names: &[&str]) -> Result<HashMap<String, u64>, GoBinaryError> {
        let mut found = HashMap::new();
        for (name, entry) in self.functions().filter(|(name, _)| names.contains(name)) {
            if found.insert(name.to_string(), entry).is_some() {
                return Err(GoBinaryError::AmbiguousFunction(name.to_string()));
            }
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};
    use std::process::Command;

    const VERSIONS: [&str; 2] = ["1.19", "1.23"];

    fn go_root(version: &str) -> PathBuf {
        let root = PathBuf::from(format!("/usr/lib/go-{version}"));
        assert!(
            root.join("bin/go").exists(),
            "{} is missing: cargo xtask setup installs golang-{version}-go",
            root.display()
        );
        root
    }

    /// A small Go program built with `version`, stripped or not (cached in the target dir).
    fn build(version: &str, stripped: bool) -> PathBuf {
        // Tests run in parallel: one build at a time in the shared directory.
        static BUILDING: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one = BUILDING.lock().unwrap_or_else(|e| e.into_inner());
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../target/go-tests")
            .join(format!("go-{version}"));
        std::fs::create_dir_all(&dir).expect("test dir");
        let src = dir.join("main.go");
        std::fs::write(
            &src,
            "package main\n\nimport (\n\t\"net/http\"\n\t\"os\"\n)\n\n\
             func main() {\n\tif len(os.Args) > 5 {\n\t\thttp.Get(os.Args[1])\n\
             \t\thttp.ListenAndServe(os.Args[2], nil)\n\t}\n\
             \tos.Stdout.Write([]byte(\"ok\\n\"))\n}\n",
        )
        .expect("write main.go");
        let out = dir.join(if stripped { "prog-stripped" } else { "prog" });
        let mut cmd = Command::new(go_root(version).join("bin/go"));
        cmd.current_dir(&dir)
            .env("GOCACHE", dir.join("cache"))
            .env("GO111MODULE", "off")
            .env("GOFLAGS", "")
            .args(["build", "-o"])
            .arg(&out);
        if stripped {
            cmd.arg("-ldflags=-s -w");
        }
        let status = cmd.arg("main.go").status().expect("run go build");
        assert!(status.success(), "go build with Go {version} failed");
        out
    }

    fn inspect_path(path: &Path) -> Result<GoBinary, GoBinaryError> {
        let data = std::fs::read(path).expect("read binary");
        let file = object::File::parse(data.as_slice()).expect("ELF");
        inspect(&file).expect("a Go binary")
    }

    #[test]
    fn pclntab_entries_are_the_symbol_tables_for_every_function() {
        for version in VERSIONS {
            let path = build(version, false);
            let data = std::fs::read(&path).expect("read");
            let file = object::File::parse(data.as_slice()).expect("ELF");
            let symbols: HashMap<String, u64> = file
                .symbols()
                .filter(|s| s.kind() == object::SymbolKind::Text)
                .filter_map(|s| Some((s.name().ok()?.to_string(), s.address())))
                .collect();
            let section = file.section_by_name(".gopclntab").expect(".gopclntab");
            let text = file.section_by_name(".text").map(|s| s.address());
            let table = Pclntab::parse(section.data().expect("data"), text).expect("pclntab");
            let mut times: HashMap<&str, usize> = HashMap::new();
            for (name, _) in table.functions() {
                *times.entry(name).or_default() += 1;
            }
            let mut compared = 0;
            let total = table.functions().count();
            for (name, entry) in table.functions() {
                // An assembly function and its ABI wrapper share a name here (`.abi0` in
                // .symtab): `find` refuses those.
                if times[name] > 1 {
                    continue;
                }
                if let Some(&address) = symbols.get(name) {
                    assert_eq!(entry, address, "Go {version}: {name}");
                    compared += 1;
                }
            }
            assert!(
                compared > 1000 && compared * 10 >= total * 9,
                "Go {version}: only {compared} of {total} functions found in .symtab"
            );
        }
    }

    #[test]
    fn stripped_and_unstripped_binaries_give_the_same_offsets() {
        for version in VERSIONS {
            let full = inspect_path(&build(version, false)).expect("unstripped");
            let stripped = inspect_path(&build(version, true)).expect("stripped");
            assert_eq!(full.source, ".symtab");
            assert_eq!(stripped.source, ".gopclntab");
            assert_eq!(full.offsets.len(), PLAN.probes.len());
            assert!(
                full.version.starts_with(&format!("go{version}")),
                "{}",
                full.version
            );
            assert_eq!(stripped.version, full.version);
            // The same code at the same place (only symbols and DWARF were dropped).
            assert_eq!(full.offsets, stripped.offsets, "Go {version}");
        }
    }

    /// The two struct offsets the kernel programs read, against the binaries' own DWARF
    /// (gdb prints each member's offset and size).
    #[test]
    fn the_struct_offsets_the_probes_read_match_the_dwarf() {
        use agent_common::{GO_FD_SYSFD_OFFSET, GO_TRANSPORT_REQUEST_OFFSET};
        for version in VERSIONS {
            let path = build(version, false);
            let out = Command::new("gdb")
                .args(["-batch", "-nx", "-ex", "set language c"])
                .args(["-ex", "ptype/o struct 'internal/poll.FD'"])
                .args(["-ex", "ptype/o struct 'net/http.transportRequest'"])
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
        }
    }

    #[test]
    fn the_go_toolchains_own_stripped_binaries_are_read() {
        for version in VERSIONS {
            let root = go_root(version);
            let expected = std::fs::read_to_string(root.join("VERSION")).expect("VERSION");
            let expected = expected.lines().next().expect("a version line");
            // Debian strips `go` itself: no .symtab, its .gopclntab stays.
            let data = std::fs::read(root.join("bin/go")).expect("read go");
            let file = object::File::parse(data.as_slice()).expect("ELF");
            let buildinfo = file.section_by_name(".go.buildinfo").expect("buildinfo");
            assert_eq!(
                build_version(buildinfo.data().expect("data")),
                Ok(expected.into())
            );
            let section = file.section_by_name(".gopclntab").expect(".gopclntab");
            let text = file.section_by_name(".text").map(|s| s.address());
            let table = Pclntab::parse(section.data().expect("data"), text).expect("pclntab");
            let found = table
                .find(&["runtime.main", "internal/poll.(*FD).Write"])
                .expect("unique names");
            assert_eq!(found.len(), 2, "Go {version}: {found:?}");
            let main = found["runtime.main"];
            let text = file.section_by_name(".text").expect(".text");
            assert!(
                main >= text.address() && main < text.address() + text.size(),
                "runtime.main at {main:#x} is outside .text"
            );
        }
    }

    #[test]
    fn other_programs_are_not_go_and_bad_tables_are_refused() {
        let data = std::fs::read("/bin/ls").expect("ls");
        let file = object::File::parse(data.as_slice()).expect("ELF");
        assert!(inspect(&file).is_none());
        assert_eq!(build_version(b"nope"), Err(GoBinaryError::BadBuildInfo));
        assert!(Pclntab::parse(&[0xfb, 0xff, 0xff, 0xff, 0, 0, 1, 8], None).is_err());
        let mut header = vec![0xf1, 0xff, 0xff, 0xff, 0, 0, 1, 8];
        header.extend_from_slice(&u64::MAX.to_le_bytes());
        header.resize(72, 0);
        assert!(Pclntab::parse(&header, Some(0x401000)).is_err());
        assert_eq!(minor_version("go1.23.5"), Some(23));
        assert_eq!(minor_version("go1.21rc2"), Some(21));
        assert_eq!(minor_version("devel"), None);
    }
}
