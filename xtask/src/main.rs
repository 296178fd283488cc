//! Project tasks: `cargo xtask setup | run | test | bench`.
//!
//! Everything a fresh machine needs is installed here, idempotently, so the README's two
//! commands work on a new clone and on a machine that already has parts installed.

mod bench;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

const USAGE: &str = "usage: cargo xtask <command>
  setup [--test-deps]   install the eBPF toolchain (and what the tests need)
  build                 set up, build the agent (release): target/release/agent
  run [-- AGENT ARGS]   set up, build the agent (release) and run it
  test                  set up, run every test: unit tests, then privileged end-to-end tests (root)
  bench [pg|--only nginx|pg] [--pairs N]  nginx + wrk, pgbench -S: with and without the agent; BENCHMARKS.md";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (cmd, rest) = args
        .split_first()
        .map(|(c, r)| (c.as_str(), r))
        .unwrap_or(("", &[]));
    match cmd {
        "setup" => setup::run(rest.iter().any(|a| a == "--test-deps")),
        "build" => {
            setup::run(false)?;
            let agent = build_agent()?;
            println!("{}", agent.display());
            Ok(())
        }
        "run" => run_agent(rest),
        "test" => test(),
        "bench" => bench::run(rest),
        _ => {
            eprintln!("{USAGE}");
            bail!("unknown command {cmd:?}")
        }
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
    sh(cargo().args(["build", "--release", "-p", "agent"]))?;
    Ok(workspace_root().join("target/release/agent"))
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc_geteuid() == 0 }
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

fn run_agent(rest: &[String]) -> Result<()> {
    setup::run(false)?;
    let agent = build_agent()?;
    let args: Vec<&String> = rest.iter().skip_while(|a| *a == "--").collect();
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
        .env("AGENT_BIN", &agent))
}
