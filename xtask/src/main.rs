//! Project tasks: `cargo xtask setup | build | run | test | bench | kernel-matrix`.
//!
//! Everything a fresh machine needs is installed here, idempotently, so the README's two
//! commands work on a new clone and on a machine that already has parts installed.

mod bench;
mod kernel_matrix;
mod kernel_table;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

/// Project tasks of the eBPF agent.
#[derive(Parser, Debug)]
#[command(name = "cargo xtask", bin_name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand, Debug)]
enum Task {
    /// Install the eBPF toolchain (and, with --test-deps, what the tests and benchmarks need)
    Setup {
        /// Also the servers, clients, collector and load generators of the tests and benchmarks
        #[arg(long)]
        test_deps: bool,
    },
    /// Set up, build the agent (release): target/release/agent, or for another CPU
    /// target/<triple>/release/agent (cross-compiled)
    Build {
        /// The CPU to build for
        #[arg(long, value_enum, default_value_t = Arch::host())]
        arch: Arch,
    },
    /// Set up, build the agent (release) and run it (with sudo unless root)
    Run {
        /// The agent's own options, after `--`, e.g. `cargo xtask run -- --comm nginx`
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "AGENT ARGS"
        )]
        agent_args: Vec<String>,
    },
    /// Set up, run every test: format and lint checks, unit tests, then the privileged
    /// end-to-end tests (root)
    Test,
    /// nginx + wrk and PostgreSQL + pgbench, with and without the agent; results into
    /// BENCHMARKS.md
    Bench(bench::Options),
    /// The privileged end-to-end subset (HTTP, PostgreSQL, propagation across network
    /// namespaces) inside QEMU guests booted from Debian's 6.1 and 6.12 kernels (root)
    KernelMatrix(kernel_matrix::Options),
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup { test_deps } => setup::run(test_deps),
        Task::Build { arch } => {
            setup::run(false)?;
            let agent = build_agent_for(arch, Profile::Release)?;
            println!("{}", agent.display());
            Ok(())
        }
        Task::Run { agent_args } => run_agent(&agent_args),
        Task::Test => test(),
        Task::Bench(options) => bench::run(options),
        Task::KernelMatrix(options) => kernel_matrix::run(options),
    }
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Runs a command, failing with its command line when it does not succeed.
pub fn sh(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

/// cargo of the project's userspace toolchain (see `setup::RUST_TOOLCHAIN`), whatever toolchain
/// built xtask itself.
pub fn cargo() -> Command {
    let mut c = Command::new("rustup");
    c.args(["run", setup::RUST_TOOLCHAIN, "cargo"]);
    c.current_dir(workspace_root());
    c
}

pub fn build_agent() -> Result<PathBuf> {
    build_agent_for(Arch::host(), Profile::Release)
}

/// The CPUs the agent (and its kernel programs, see agent-ebpf/src/arch.rs) builds for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Arch {
    #[value(name = "x86_64")]
    X86_64,
    #[value(name = "aarch64")]
    Aarch64,
}

impl Arch {
    pub fn host() -> Self {
        if cfg!(target_arch = "aarch64") {
            Self::Aarch64
        } else {
            Self::X86_64
        }
    }

    pub fn triple(self) -> &'static str {
        match self {
            Self::X86_64 => "x86_64-unknown-linux-gnu",
            Self::Aarch64 => "aarch64-unknown-linux-gnu",
        }
    }

    /// Debian's cross compiler and C library for building on another CPU.
    pub fn cross_packages(self) -> &'static [&'static str] {
        match self {
            Self::X86_64 => &["gcc-x86-64-linux-gnu", "libc6-dev-amd64-cross"],
            Self::Aarch64 => &["gcc-aarch64-linux-gnu", "libc6-dev-arm64-cross"],
        }
    }

    fn cross_gcc(self) -> &'static str {
        match self {
            Self::X86_64 => "x86_64-linux-gnu-gcc",
            Self::Aarch64 => "aarch64-linux-gnu-gcc",
        }
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::X86_64 => "x86_64",
            Self::Aarch64 => "aarch64",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    Debug,
    Release,
}

/// Builds the agent for `arch` (cross-compiled when it is not the host's; aya-build builds
/// the kernel programs for the same CPU) and returns the binary's path.
pub fn build_agent_for(arch: Arch, profile: Profile) -> Result<PathBuf> {
    let mut cmd = cargo();
    cmd.args(["build", "-p", "agent"]);
    let dir = match profile {
        Profile::Debug => "debug",
        Profile::Release => {
            cmd.arg("--release");
            "release"
        }
    };
    if arch == Arch::host() {
        sh(&mut cmd)?;
        return Ok(workspace_root().join("target").join(dir).join("agent"));
    }
    setup::cross_toolchain(arch)?;
    cross_compile(&mut cmd, arch);
    sh(&mut cmd)?;
    Ok(workspace_root()
        .join("target")
        .join(arch.triple())
        .join(dir)
        .join("agent"))
}

/// Makes a cargo command build for `arch` with Debian's cross compiler as linker and C compiler
/// (after [`setup::cross_toolchain`]).
pub fn cross_compile(cmd: &mut Command, arch: Arch) {
    let triple = arch.triple();
    let env_triple = triple.replace('-', "_");
    cmd.args(["--target", triple])
        .env(
            format!("CARGO_TARGET_{}_LINKER", env_triple.to_uppercase()),
            arch.cross_gcc(),
        )
        .env(format!("CC_{env_triple}"), arch.cross_gcc());
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn run_agent(args: &[String]) -> Result<()> {
    setup::run(false)?;
    let agent = build_agent()?;
    let mut cmd = if is_root() {
        Command::new(&agent)
    } else {
        eprintln!("xtask: the agent needs root; running it with sudo");
        let mut c = Command::new("sudo");
        c.arg(&agent);
        c
    };
    sh(cmd.args(args))
}

fn test() -> Result<()> {
    setup::run(true)?;
    // The code as it must land: formatted, and clippy-clean (agent-ebpf is checked by its own
    // build for the BPF target; clippy on the host cannot build a no_std panic handler).
    sh(cargo().args(["fmt", "--all", "--", "--check"]))
        .context("the tree is not formatted: run `cargo +1.99.1 fmt --all`")?;
    sh(cargo().args([
        "clippy",
        "--workspace",
        "--exclude",
        "agent-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // Pure tests: parsers, reassembly, span building, exporters (no privileges needed).
    // agent-ebpf is built for the BPF target by agent/build.rs, never for the host.
    // `--include-ignored`: tests that need the rotel collector run too (setup installed it).
    sh(cargo().args([
        "test",
        "--workspace",
        "--exclude",
        "tests",
        "--exclude",
        "agent-ebpf",
        "--",
        "--include-ignored",
    ]))?;
    if !is_root() {
        bail!(
            "the end-to-end tests load eBPF programs and must run as root: run `sudo -E cargo xtask test`"
        );
    }
    // The debug build the unit tests already compiled: no second full build of the tree.
    sh(cargo().args(["build", "-p", "agent"]))?;
    let agent = workspace_root().join("target/debug/agent");
    // Privileged end-to-end tests: real servers and clients, the real agent, a real collector.
    sh(cargo()
        .args(["test", "-p", "tests", "--", "--test-threads=1"])
        .env("AGENT_BIN", &agent))?;
    // The host is a kernel of the README's table too.
    kernel_table::check_host(&agent)?;
    // The same agent on the kernels users run, in emulated guests (a subset of the above),
    // then the arm64 kernels (the HTTP smoke test, cross-compiled).
    let mut matrix = kernel_matrix::Options::defaults();
    matrix.agent = Some(agent);
    kernel_matrix::run(matrix)?;
    let mut arm64 = kernel_matrix::Options::defaults();
    arm64.arch = Arch::Aarch64;
    kernel_matrix::run(arm64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("xtask").chain(line.split_whitespace()))
    }

    #[test]
    fn parses_the_command_lines() {
        assert!(matches!(
            parse("setup --test-deps").expect("setup").task,
            Task::Setup { test_deps: true }
        ));
        assert!(matches!(
            parse("setup").expect("setup").task,
            Task::Setup { test_deps: false }
        ));
        assert!(matches!(
            parse("build").expect("build").task,
            Task::Build { arch } if arch == Arch::host()
        ));
        assert!(matches!(
            parse("build --arch aarch64").expect("build").task,
            Task::Build {
                arch: Arch::Aarch64
            }
        ));
        assert!(parse("build --arch sparc").is_err());
        assert!(matches!(parse("test").expect("test").task, Task::Test));
        let Task::KernelMatrix(_) = parse("kernel-matrix --kernel 6.1 --kernel 6.12 --keep")
            .expect("kernel-matrix")
            .task
        else {
            panic!("not kernel-matrix");
        };
        for line in [
            "run -- --comm nginx --verbose",
            "run --comm nginx --verbose",
        ] {
            let Task::Run { agent_args } = parse(line).expect("run").task else {
                panic!("{line}: not run");
            };
            assert_eq!(agent_args, ["--comm", "nginx", "--verbose"], "{line}");
        }
        let Task::Run { agent_args } = parse("run").expect("run").task else {
            panic!("not run");
        };
        assert!(agent_args.is_empty());
        assert!(parse("deploy").is_err());
        assert!(parse("").is_err());
        assert!(parse("setup --test-dep").is_err());
    }
}
