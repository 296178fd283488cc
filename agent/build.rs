//! Builds the kernel programs (agent-ebpf) for the BPF target and embeds them in the agent.
use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

/// Nightly whose LLVM (22) matches bpf-linker 0.13 with the llvm-22 feature; see
/// ../shared/ENVIRONMENT.md and `cargo xtask setup`.
const EBPF_TOOLCHAIN: &str = "nightly-2026-06-20";

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?;
    let ebpf_dir = std::path::Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow!("agent crate has no parent directory"))?
        .join("agent-ebpf");
    let root_dir = ebpf_dir.to_str().context("agent-ebpf path is not UTF-8")?;
    aya_build::build_ebpf(
        [Package {
            name: "agent-ebpf",
            root_dir,
            ..Default::default()
        }],
        Toolchain::Custom(EBPF_TOOLCHAIN),
    )
    .context("building the eBPF programs failed: run `cargo xtask setup` to install bpf-linker and the eBPF toolchain")
}
