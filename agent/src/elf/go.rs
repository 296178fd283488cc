//! Go program files: the Go version a program was built with (`.go.buildinfo`), where its
//! functions start (`.symtab` when the binary has one, else `.gopclntab`, which
//! `-ldflags="-s -w"` keeps: the runtime needs it for stack traces) and where they return
//! (their RET instructions, decoded from the code up to the next function's entry: Go moves
//! goroutine stacks, which breaks uretprobes, so a result is read at each RET).

use std::collections::HashMap;

use object::{Object, ObjectSection, ObjectSymbol};
use thiserror::Error;

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
    #[error(
        "function {0} is not in it (its package is not linked in, or the function was inlined)"
    )]
    MissingFunction(String),
    #[error("function {0} is in .gopclntab more than once (an ABI wrapper?): not guessing")]
    AmbiguousFunction(String),
    #[error("function {name} at {address:#x} is outside the file's loaded segments")]
    NotInFile { name: String, address: u64 },
    #[error("the code of function {0} cannot be read from the file")]
    UnreadableCode(String),
    #[error(
        "the code of function {name} does not decode as x86_64 at {address:#x}: not guessing where it returns"
    )]
    Undecodable { name: String, address: u64 },
    #[error("function {0} has no RET instruction")]
    NoReturn(String),
}

/// The entries of a Go program's functions.
#[derive(Debug)]
pub struct GoFunctions {
    /// `go1.23.5`.
    pub version: String,
    /// Where the function entries came from (`.symtab` or `.gopclntab`).
    pub source: &'static str,
    /// Each function asked for: its entry address.
    pub entries: HashMap<String, u64>,
}

/// The entries of those of `names` that an x86_64 Go program has (the linker drops the
/// functions a program cannot reach); `None` when the file is not a Go program.
pub fn functions<'d, R: object::ReadRef<'d>>(
    file: &object::File<'d, R>,
    names: &[&str],
) -> Option<Result<GoFunctions, GoBinaryError>> {
    let buildinfo = file.section_by_name(".go.buildinfo")?;
    Some(read_functions(file, &buildinfo, names))
}

fn read_functions<'d, R: object::ReadRef<'d>>(
    file: &object::File<'d, R>,
    buildinfo: &object::Section<'d, '_, R>,
    names: &[&str],
) -> Result<GoFunctions, GoBinaryError> {
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
    let mut unique = names.to_vec();
    unique.sort_unstable();
    unique.dedup();
    let (source, entries) = match from_symtab(file, &unique) {
        Some(found) => (".symtab", found),
        None => (".gopclntab", pclntab(file)?.find(&unique)?),
    };
    Ok(GoFunctions {
        version,
        source,
        entries,
    })
}

/// Where a probe goes in a Go function.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum GoAt {
    Entry,
    /// Each RET instruction (see [`returns`]).
    Returns,
}

/// Where each of `probes` (program, function, where) goes in the file: the file offset of its
/// function's entry, or of each of its RETs, in `probes`' order. A function missing from
/// `found` is an error unless `optional` says the program may lack it (then it is left out).
pub fn probe_offsets<'d, R: object::ReadRef<'d>>(
    file: &object::File<'d, R>,
    data: R,
    found: &GoFunctions,
    probes: &[(&'static str, &'static str, GoAt)],
    optional: impl Fn(&str) -> bool,
) -> Result<Vec<(&'static str, &'static str, u64)>, GoBinaryError> {
    let mut offsets = Vec::new();
    for &(program, function, at) in probes {
        let Some(&entry) = found.entries.get(function) else {
            if optional(function) {
                continue;
            }
            return Err(GoBinaryError::MissingFunction(function.into()));
        };
        let addresses = match at {
            GoAt::Entry => vec![entry],
            GoAt::Returns => returns(file, data, function, entry)?,
        };
        for address in addresses {
            let offset =
                super::file_offset(file, address).ok_or_else(|| GoBinaryError::NotInFile {
                    name: function.into(),
                    address,
                })?;
            offsets.push((program, function, offset));
        }
    }
    Ok(offsets)
}

/// The file's `.gopclntab`.
fn pclntab<'d, 'f, R: object::ReadRef<'d>>(
    file: &'f object::File<'d, R>,
) -> Result<Pclntab<'d>, GoBinaryError> {
    let section = file
        .section_by_name(".gopclntab")
        .ok_or(GoBinaryError::NoFunctionTable)?;
    let data = section
        .data()
        .map_err(|_| GoBinaryError::BadPclntab("unreadable"))?;
    let text = file.section_by_name(".text").map(|s| s.address());
    Pclntab::parse(data, text)
}

/// The address of each RET instruction of function `name`, whose entry is `entry`: its code
/// runs to the next function's entry (`.gopclntab`'s function table is sorted by entry; Go
/// puts no data between instructions and pads functions with INT3). `data` is the file's
/// bytes `file` was parsed from.
pub fn returns<'d, R: object::ReadRef<'d>>(
    file: &object::File<'d, R>,
    data: R,
    name: &str,
    entry: u64,
) -> Result<Vec<u64>, GoBinaryError> {
    let end = pclntab(file)?
        .end_of(entry)
        .ok_or_else(|| GoBinaryError::MissingFunction(name.to_string()))?;
    let unreadable = || GoBinaryError::UnreadableCode(name.to_string());
    let offset = super::file_offset(file, entry).ok_or_else(unreadable)?;
    // A Go function is far smaller; a bigger extent is a table we misread.
    let size = end.checked_sub(entry).filter(|&s| s > 0 && s <= 1 << 20);
    let code = data
        .read_bytes_at(offset, size.ok_or_else(unreadable)?)
        .map_err(|()| unreadable())?;
    let rets = find_rets(code, entry).map_err(|address| GoBinaryError::Undecodable {
        name: name.to_string(),
        address,
    })?;
    if rets.is_empty() {
        return Err(GoBinaryError::NoReturn(name.to_string()));
    }
    Ok(rets)
}

/// The addresses of the RET instructions in x86_64 `code` loaded at `address`, decoded from its
/// first byte; `Err(at)`: no valid instruction at `at`.
pub fn find_rets(code: &[u8], address: u64) -> Result<Vec<u64>, u64> {
    use iced_x86::{Decoder, DecoderOptions, Mnemonic};
    let mut decoder = Decoder::with_ip(64, code, address, DecoderOptions::NONE);
    let mut rets = Vec::new();
    while decoder.can_decode() {
        let ins = decoder.decode();
        if ins.is_invalid() {
            return Err(ins.ip());
        }
        if ins.mnemonic() == Mnemonic::Ret {
            rets.push(ins.ip());
        }
    }
    Ok(rets)
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

/// The entries of those of `names` in the symbol table, if the file has one with any of them.
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
    (!found.is_empty()).then_some(found)
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

    /// The end of the function that starts at `entry` (the next one's entry, or the table's
    /// end for the last one).
    pub fn end_of(&self, entry: u64) -> Option<u64> {
        let data = self.data;
        let entry_at = |i: usize| -> Option<u64> {
            let at = self.pcln.checked_add(i.checked_mul(8)?)?;
            let off = u32::from_le_bytes(data.get(at..at + 4)?.try_into().ok()?);
            Some(self.text_start + u64::from(off))
        };
        // `functab` has `nfunc + 1` entries: the last is the end of the text.
        let i = (0..self.nfunc).find(|&i| entry_at(i) == Some(entry))?;
        entry_at(i + 1).filter(|&end| end > entry)
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

/// Go programs built by the tests.
#[cfg(test)]
pub(crate) mod testing {
    use std::path::PathBuf;
    use std::process::Command;

    pub const VERSIONS: [&str; 2] = ["1.19", "1.23"];

    pub fn go_root(version: &str) -> PathBuf {
        let root = PathBuf::from(format!("/usr/lib/go-{version}"));
        assert!(
            root.join("bin/go").exists(),
            "{} is missing: cargo xtask setup installs golang-{version}-go",
            root.display()
        );
        root
    }

    /// A small Go program with `net/http` (hence `crypto/tls`) built with `version`, stripped
    /// or not (cached in the target dir).
    pub fn build(version: &str, stripped: bool) -> PathBuf {
        build_program(
            "prog",
            version,
            stripped,
            "package main\n\nimport (\n\t\"net/http\"\n\t\"os\"\n)\n\n\
             func main() {\n\tif len(os.Args) > 5 {\n\t\thttp.Get(os.Args[1])\n\
             \t\thttp.ListenAndServe(os.Args[2], nil)\n\t}\n\
             \tos.Stdout.Write([]byte(\"ok\\n\"))\n}\n",
        )
    }

    /// Go program `name` from `source` built with `version`, stripped or not (cached in the
    /// target dir).
    pub fn build_program(name: &str, version: &str, stripped: bool, source: &str) -> PathBuf {
        build_program_for("amd64", name, version, stripped, source)
    }

    /// [`build_program`] for another architecture (`GOARCH`: Go cross-compiles).
    pub fn build_program_for(
        goarch: &str,
        name: &str,
        version: &str,
        stripped: bool,
        source: &str,
    ) -> PathBuf {
        // Tests run in parallel: one build at a time in the shared directory.
        static BUILDING: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one = BUILDING.lock().unwrap_or_else(|e| e.into_inner());
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../target/go-tests")
            .join(format!("go-{version}"));
        std::fs::create_dir_all(&dir).expect("test dir");
        let src = dir.join(format!("{name}.go"));
        std::fs::write(&src, source).expect("write the program");
        let name = if goarch == "amd64" {
            name.to_string()
        } else {
            format!("{name}-{goarch}")
        };
        let out = dir.join(if stripped {
            format!("{name}-stripped")
        } else {
            name.clone()
        });
        let mut cmd = Command::new(go_root(version).join("bin/go"));
        cmd.current_dir(&dir)
            .env("GOCACHE", dir.join("cache"))
            .env("GO111MODULE", "off")
            .env("GOFLAGS", "")
            .env("GOARCH", goarch)
            .args(["build", "-o"])
            .arg(&out);
        if stripped {
            cmd.arg("-ldflags=-s -w");
        }
        let status = cmd.arg(&src).status().expect("run go build");
        assert!(status.success(), "go build with Go {version} failed");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{VERSIONS, build, go_root};
    use super::*;

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
        assert!(functions(&file, &["main.main"]).is_none());
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

    #[test]
    fn rets_are_found_by_decoding_not_by_byte_value() {
        // mov eax, 0xc3c3c3c3; ret; int3; ret 8; nop
        let code = [
            0xb8, 0xc3, 0xc3, 0xc3, 0xc3, 0xc3, 0xcc, 0xc2, 0x08, 0x00, 0x90,
        ];
        assert_eq!(find_rets(&code, 0x1000), Ok(vec![0x1005, 0x1007]));
        // No RET at all; then bytes that are no instruction (0x06 is invalid in 64-bit mode).
        assert_eq!(find_rets(&[0x90, 0xcc], 0x1000), Ok(vec![]));
        assert_eq!(find_rets(&[0x90, 0x06], 0x1000), Err(0x1001));
    }

    /// The RETs found in real Go binaries are the ones objdump (a separate x86 decoder)
    /// lists between the function's entry and the next function's.
    #[test]
    fn rets_of_crypto_tls_match_objdump() {
        let names = ["crypto/tls.(*Conn).Read", "crypto/tls.(*Conn).Write"];
        for version in VERSIONS {
            let path = build(version, false);
            let data = std::fs::read(&path).expect("read");
            let file = object::File::parse(data.as_slice()).expect("ELF");
            let found = functions(&file, &names)
                .expect("a Go program")
                .expect("its functions");
            for name in names {
                let entry = found.entries[name];
                let rets = returns(&file, data.as_slice(), name, entry).expect("rets");
                let end = pclntab(&file).expect("pclntab").end_of(entry).expect("end");
                let out = std::process::Command::new("objdump")
                    .args(["-d", "--no-show-raw-insn"])
                    .arg(format!("--start-address={entry:#x}"))
                    .arg(format!("--stop-address={end:#x}"))
                    .arg(&path)
                    .output()
                    .expect("objdump (binutils)");
                let text = String::from_utf8_lossy(&out.stdout);
                let expected: Vec<u64> = text
                    .lines()
                    .filter(|l| {
                        let mnemonic = l.split('\t').nth(1).unwrap_or("");
                        mnemonic.starts_with("ret")
                    })
                    .filter_map(|l| u64::from_str_radix(l.split(':').next()?.trim(), 16).ok())
                    .collect();
                assert!(
                    !expected.is_empty(),
                    "Go {version} {name}: objdump:\n{text}"
                );
                assert_eq!(rets, expected, "Go {version} {name}");
            }
        }
    }

    #[test]
    fn function_ends_are_the_next_functions_entry() {
        let path = build("1.23", false);
        let data = std::fs::read(&path).expect("read");
        let file = object::File::parse(data.as_slice()).expect("ELF");
        let table = pclntab(&file).expect("pclntab");
        let mut entries: Vec<u64> = table.functions().map(|(_, e)| e).collect();
        entries.sort_unstable();
        entries.dedup();
        for pair in entries.windows(2).take(500) {
            assert_eq!(table.end_of(pair[0]), Some(pair[1]));
        }
        assert_eq!(table.end_of(1), None);
    }
}
