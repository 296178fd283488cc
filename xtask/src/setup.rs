//! Idempotent installation of the eBPF toolchain and of the test dependencies.

use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::sh;

/// The toolchain that builds the userspace crates: aya 0.16 needs rustc >= 1.98, newer than the
/// stable toolchain a fresh machine has. There is no rust-toolchain.toml on purpose: with
/// `RUSTUP_AUTO_INSTALL=0` (common, and set on our machines) a pinned toolchain that is not
/// installed stops every `cargo` command before xtask could install it. So xtask itself builds
/// with whatever toolchain is the default, installs this one, and runs cargo through it.
pub const RUST_TOOLCHAIN: &str = "1.99.1";
/// The nightly that builds the eBPF object: rustc >= 1.98 (aya-ebpf 0.3) with LLVM 22,
/// which bpf-linker 0.13 is built against. Keep in sync with agent/build.rs.
const EBPF_TOOLCHAIN: &str = "nightly-2026-06-20";
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
pub(crate) const ROTEL_VERSION: &str = "0.0.1a15";
const OTEL_PYTHON_VERSION: &str = "1.45.2";
const PSYCOPG_VERSION: &str = "3.3.9";
const AIOHTTP_VERSION: &str = "3.14.5";
/// python `requests`: a real HTTPS client (urllib3 over python's ssl) for the TLS tests.
const REQUESTS_VERSION: &str = "2.34.2";
/// The chart tests: Helm's Go SDK (Helm v4.2.3, renders offline) and the Kubernetes JSON
/// schemas (1.25..1.37, bundled) with their validator.
const HELM_PYTHON_SDK_VERSION: &str = "0.2.2";
const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";

pub(crate) fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd} >/dev/null 2>&1")])
        .status()
        .is_ok_and(|s| s.success())
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn apt_install(packages: &[&str]) -> Result<()> {
    apt_install_from(None, packages)
}

/// Installs the Debian packages that are missing, from `release` (e.g. bookworm-backports)
/// when given.
pub(crate) fn apt_install_from(release: Option<&str>, packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .is_none_or(|s| !s.contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !crate::is_root() {
        bail!(
            "missing Debian packages {missing:?}: install them with `sudo apt-get install -y {}`",
            missing.join(" ")
        );
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    sh(Command::new("apt-get").args(["update", "-qq"]))?;
    let mut install = Command::new("apt-get");
    install.args(["install", "-y", "-qq", "--no-install-recommends"]);
    if let Some(release) = release {
        install.args(["-t", release]);
    }
    sh(install
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// Debian's backports suite (Go 1.23 and a QEMU that fits qemu-utils 10 are there, not in
/// bookworm itself), added when missing.
const BACKPORTS_SOURCES: &str = "/etc/apt/sources.list.d/debian-backports.sources";

pub(crate) fn ensure_backports() -> Result<()> {
    let listed = output(Command::new("sh").args([
        "-c",
        "grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/ && echo yes",
    ]))
    .is_some_and(|o| o.contains("yes"));
    if listed {
        return Ok(());
    }
    if !crate::is_root() {
        bail!(
            "Go 1.23 and QEMU come from Debian's bookworm-backports, which apt does not list: add it \
             (as root: `cargo xtask setup` writes {BACKPORTS_SOURCES})"
        );
    }
    eprintln!("xtask: adding Debian bookworm-backports to apt's sources ({BACKPORTS_SOURCES})");
    std::fs::write(
        BACKPORTS_SOURCES,
        "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\n\
         Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n",
    )
    .with_context(|| format!("cannot write {BACKPORTS_SOURCES}"))
}

/// Installs the Python packages whose pinned version is not there yet.
fn pip_install(packages: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<String> = packages
        .iter()
        .filter(|(name, version)| {
            output(Command::new("python3").args(["-m", "pip", "show", name]))
                .is_none_or(|s| !s.lines().any(|l| l == format!("Version: {version}")))
        })
        .map(|(name, version)| format!("{name}=={version}"))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing {} (PyPI)", missing.join(" "));
    sh(Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(&missing))
}

/// The rotel collector the end-to-end tests assert on (pinned, from PyPI).
pub(crate) fn rotel() -> Result<()> {
    pip_install(&[("rotel", ROTEL_VERSION)])
}

/// Installs `toolchain` with rustup (profile minimal) unless it and `components` are there.
fn rustup_toolchain(toolchain: &str, components: &[&str]) -> Result<()> {
    let installed = output(Command::new("rustup").args(["toolchain", "list"])).unwrap_or_default();
    let have_components = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        toolchain,
    ]))
    .unwrap_or_default();
    let complete = installed.lines().any(|l| l.starts_with(toolchain))
        && components
            .iter()
            .all(|c| have_components.lines().any(|l| l.starts_with(c)));
    if complete {
        return Ok(());
    }
    eprintln!("xtask: installing toolchain {toolchain} with {components:?}");
    let mut cmd = Command::new("rustup");
    cmd.args(["toolchain", "install", toolchain, "--profile", "minimal"]);
    for c in components {
        cmd.args(["--component", c]);
    }
    sh(&mut cmd).with_context(|| format!("rustup could not install the toolchain {toolchain}"))
}

/// The userspace toolchain (with the lints CI runs), installed when missing.
/// What building the agent for `arch` on this host needs besides the host build: the Rust
/// standard library for its target and, for another CPU, Debian's cross C compiler and C
/// library (ring's C code and the final link).
pub fn cross_toolchain(arch: crate::Arch) -> Result<()> {
    if arch == crate::Arch::host() {
        return Ok(());
    }
    let target = arch.triple();
    let installed = output(Command::new("rustup").args([
        "target",
        "list",
        "--installed",
        "--toolchain",
        RUST_TOOLCHAIN,
    ]))
    .unwrap_or_default();
    if !installed.lines().any(|l| l.trim() == target) {
        sh(Command::new("rustup").args(["target", "add", target, "--toolchain", RUST_TOOLCHAIN]))
            .with_context(|| format!("rustup could not add the target {target}"))?;
    }
    apt_install(arch.cross_packages())
}

pub fn rust_toolchain() -> Result<()> {
    rustup_toolchain(RUST_TOOLCHAIN, &["clippy", "rustfmt"])
}

pub fn run(test_deps: bool) -> Result<()> {
    rust_toolchain()?;
    // The eBPF toolchain: a pinned nightly with rust-src (for -Z build-std=core).
    rustup_toolchain(EBPF_TOOLCHAIN, &["rust-src"])?;

    // bpf-linker built against LLVM 22 (the current release wants a newer LLVM than Debian has).
    let linker_ok = output(Command::new("bpf-linker").arg("--version"))
        .is_some_and(|v| v.contains(BPF_LINKER_VERSION));
    if !linker_ok {
        apt_install(&["llvm-22-dev", "libpolly-22-dev", "libzstd-dev"])?;
        eprintln!("xtask: building bpf-linker {BPF_LINKER_VERSION} (LLVM 22), about 2 minutes");
        sh(crate::cargo()
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", LLVM_PREFIX))
        .context("building bpf-linker failed")?;
    }

    if test_deps {
        // Real servers, clients and load generators the tests and benchmarks drive.
        apt_install(&[
            "nginx-light",
            "curl",
            "wrk",
            "nodejs",
            "iproute2",
            "bpftool",
            "procps",
            "postgresql",
            // Java clients of the read-behaviour tests (java source-file mode, JDK 17).
            "openjdk-17-jdk-headless",
            // The test PKI of the https export tests.
            "openssl",
        ])?;
        // Two Go versions for the Go runtime-linking tests (1.23 from bookworm-backports).
        ensure_backports()?;
        // gdb: the Go tests check struct offsets against the binaries' DWARF.
        apt_install(&["golang-1.19-go", "golang-1.23-go", "gdb"])?;
        // Python packages, pinned: the rotel collector (the OTLP receiver the end-to-end tests
        // assert on), the OpenTelemetry SDK (a real OTLP sender for the harness self-test; its
        // grpcio and opentelemetry-proto also make the TLS receiver of the https export tests)
        // psycopg 3 (a real PostgreSQL driver) and aiohttp (an asyncio service).
        pip_install(&[
            ("rotel", ROTEL_VERSION),
            ("opentelemetry-sdk", OTEL_PYTHON_VERSION),
            (
                "opentelemetry-exporter-otlp-proto-grpc",
                OTEL_PYTHON_VERSION,
            ),
            ("psycopg", PSYCOPG_VERSION),
            ("psycopg-binary", PSYCOPG_VERSION),
            // An asyncio service (server and client on one event loop) for the linking tests.
            ("aiohttp", AIOHTTP_VERSION),
            // An HTTPS client as services use it, for the TLS tracing tests.
            ("requests", REQUESTS_VERSION),
            ("helm-python-sdk", HELM_PYTHON_SDK_VERSION),
            ("kubernetes-validate", KUBERNETES_VALIDATE_VERSION),
        ])?;
        if !have("node") {
            bail!("node is missing after installing nodejs");
        }
    }
    Ok(())
}
