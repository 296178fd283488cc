//! Rebuild when bpf-linker changes (a new LLVM means new code generation).
fn main() {
    // `bpf_target_arch` is set by aya-build from the agent's target (see src/arch.rs).
    println!("cargo::rustc-check-cfg=cfg(bpf_target_arch, values(\"x86_64\", \"aarch64\"))");
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
