//! `cargo xtask kernel-matrix`: the privileged end-to-end subset inside QEMU guests booted from
//! the kernels users run (Debian's 6.1 and 6.12 cloud kernels, x86_64; `--arch aarch64`: arm64,
//! the HTTP smoke test), one result row per kernel, and the hooks the agent chose on each
//! checked against the kernel's table.
//!
//! KVM is not usable on the CI machines (the host module is kvm_pvm, no vmx/svm), so guests run
//! under TCG, 17–57× slower than the host: the tests' waits are multiplied by
//! `E2E_TIME_SCALE` in the guest, and none of them asserts on durations.
//!
//! The guest's root filesystem is its initramfs (the cloud kernels have no 9p and virtio_blk
//! only as a module): Debian bookworm minbase plus what the tests run, packed as cpio and cached
//! under the cache directory keyed by its package list. Each run appends a second cpio (the
//! overlay: test binaries, agent, collector, fixtures, network modules, `/init`); the kernel
//! unpacks concatenated archives in order. The overlay never holds top-level `lib/`, `bin/` or
//! `sbin/`: they are symlinks in the root filesystem, and replacing them panics the guest.
//!
//! The guest prints `=== MATRIX-...` lines on its serial console; the host reads them as they
//! arrive (timestamps are the host's clock).

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use clap::Parser;

use crate::{cargo, kernel_table, setup, sh, workspace_root};

/// What the issue asks the guests to show: HTTP server and client spans, PostgreSQL, and
/// propagation across network namespaces. (test binary, test name, why it is in the subset)
const SUBSET: &[(&str, &str, &str)] = &[
    (
        "http_e2e",
        "python_server_and_curl_get_hello",
        "server span, the smoke test",
    ),
    (
        "http_e2e",
        "python_client_keep_alive_five_requests_on_one_connection",
        "client spans on one connection (needs tcp_sendmsg_locked write stamps)",
    ),
    (
        "http_e2e",
        "nginx_200_404_500_statuses",
        "nginx (sendfile, epoll), statuses",
    ),
    (
        "postgres_e2e",
        "psql_statements_give_client_and_server_spans",
        "PostgreSQL client and backend spans",
    ),
    (
        "traces_e2e",
        "chain_nginx_python_node_postgres_sequential_one_trace_per_request",
        "traceparent injection across network namespaces, nginx → python → node → postgres",
    ),
    (
        "tls_e2e",
        "nginx_and_curl_over_tls_1_3_keep_alive",
        "TLS plaintext through OpenSSL's uprobes and the socket hooks' nesting, nginx and curl",
    ),
];

/// Debian packages of the guest beyond minbase: the servers and clients of [`SUBSET`], kmod
/// for the network modules, libpython3.11 for the rotel collector (a python-embedding binary).
const GUEST_PACKAGES: &[&str] = &[
    "python3",
    "libpython3.11",
    "curl",
    "iproute2",
    "procps",
    "kmod",
    "nginx-light",
    "postgresql",
    "nodejs",
];
/// Bump when the way the root filesystem is made changes (the package list is in the key).
const ROOTFS_FORMAT: &str = "v2";
const SUITE: &str = "bookworm";
const MIRROR: &str = "http://deb.debian.org/debian";
/// The modules the namespace tests need (veth pairs on a bridge) and where their dependencies
/// are, relative to `lib/modules/<release>/`.
const MODULE_PATHS: &[&str] = &[
    "kernel/drivers/net/veth.ko",
    "kernel/net/bridge",
    "kernel/net/802",
    "kernel/net/llc",
    "modules.order",
    "modules.builtin",
    "modules.builtin.modinfo",
];
const GUEST_INIT: &str = include_str!("../guest/init");
/// The selection of the agent run that prints the start-up report: no process, so nothing is
/// traced while it loads and attaches.
const PROBE_COMM: &str = "matrix-none";

/// One architecture of the matrix: how to boot it, its Debian names, which kernel packages it
/// runs and which tests.
struct GuestArch {
    name: &'static str,
    cpu: crate::Arch,
    /// Debian's name of the architecture (debootstrap --arch, package:arch).
    deb_arch: &'static str,
    /// The multiarch library directory, `usr/lib/<multiarch>`.
    multiarch: &'static str,
    qemu: &'static str,
    /// The Debian package with [`GuestArch::qemu`] (from bookworm-backports: bookworm's 7.2
    /// conflicts with the newer qemu-utils some machines have).
    qemu_package: &'static str,
    /// The CPU column of the README's kernel table.
    readme_cpu: &'static str,
    qemu_args: &'static [&'static str],
    console: &'static str,
    kernels: &'static [Kernel],
    /// The tests and what they need in the root filesystem.
    subset: &'static [(&'static str, &'static str, &'static str)],
    packages: &'static [&'static str],
    /// `strip` for this architecture's binaries.
    strip: &'static str,
}

/// A kernel line: the newest Debian package whose name matches `package` (old builds vanish
/// from the archive when superseded).
struct Kernel {
    version: &'static str,
    package: &'static str,
}

const X86_64: GuestArch = GuestArch {
    name: "x86_64",
    cpu: crate::Arch::X86_64,
    deb_arch: "amd64",
    multiarch: "x86_64-linux-gnu",
    qemu: "qemu-system-x86_64",
    qemu_package: "qemu-system-x86",
    readme_cpu: "x86_64",
    qemu_args: &["-accel", "tcg,thread=multi", "-cpu", "max"],
    console: "ttyS0",
    kernels: &[
        Kernel {
            version: "6.1",
            package: r"linux-image-6\.1\.0-[0-9]+-cloud-amd64",
        },
        Kernel {
            version: "6.12",
            package: r"linux-image-6\.12\.[0-9]+\+deb12-cloud-amd64",
        },
    ],
    subset: SUBSET,
    packages: GUEST_PACKAGES,
    strip: "strip",
};

/// arm64 (Graviton, Ampere): the HTTP smoke test. Its root filesystem is made by debootstrap
/// through qemu-user (binfmt_misc); everything it runs is cross-compiled.
const AARCH64: GuestArch = GuestArch {
    name: "aarch64",
    cpu: crate::Arch::Aarch64,
    deb_arch: "arm64",
    multiarch: "aarch64-linux-gnu",
    qemu: "qemu-system-aarch64",
    qemu_package: "qemu-system-arm",
    readme_cpu: "arm64",
    qemu_args: &[
        "-machine",
        "virt",
        "-accel",
        "tcg,thread=multi",
        "-cpu",
        "max",
    ],
    console: "ttyAMA0",
    kernels: &[
        Kernel {
            version: "6.1",
            package: r"linux-image-6\.1\.0-[0-9]+-cloud-arm64",
        },
        Kernel {
            version: "6.12",
            package: r"linux-image-6\.12\.[0-9]+\+deb12-cloud-arm64",
        },
    ],
    subset: &[SUBSET[0]],
    packages: &[
        "python3",
        "libpython3.11",
        "curl",
        "iproute2",
        "procps",
        "kmod",
    ],
    strip: "aarch64-linux-gnu-strip",
};

/// Options of `cargo xtask kernel-matrix`.
#[derive(clap::Args, Debug)]
pub struct Options {
    /// The guests' CPU: x86_64 (the whole subset) or aarch64 (the HTTP smoke test)
    #[arg(long, value_enum, default_value_t = crate::Arch::X86_64)]
    pub arch: crate::Arch,
    /// A kernel to boot (repeatable): 6.1, 6.12. Default: every one
    #[arg(long = "kernel", value_name = "VERSION")]
    kernels: Vec<String>,
    /// Only the subset's tests whose name contains this
    #[arg(long, value_name = "SUBSTRING")]
    filter: Option<String>,
    /// Also keep each guest's overlay directory and initramfs (the logs are always kept)
    #[arg(long)]
    keep: bool,
    /// Kernels, root filesystems and logs
    #[arg(long, default_value = "/var/cache/agent-kernel-matrix")]
    cache_dir: PathBuf,
    /// Factor of every wait of the tests inside the guest (E2E_TIME_SCALE)
    #[arg(long, default_value_t = 10)]
    time_scale: u32,
    /// Give up on a guest after this many seconds
    #[arg(long, default_value_t = 900)]
    timeout: u64,
    /// Guest memory in MiB
    #[arg(long, default_value_t = 3072)]
    memory: u32,
    /// Guest CPUs
    #[arg(long, default_value_t = 2)]
    cpus: u32,
    /// The agent binary to test. Default: `AGENT_BIN`, else the debug build (made if needed)
    #[arg(long, value_name = "PATH")]
    pub agent: Option<PathBuf>,
}

impl Options {
    /// The defaults, as `cargo xtask kernel-matrix` without options (for `cargo xtask test`).
    pub fn defaults() -> Options {
        #[derive(Parser)]
        struct Defaults {
            #[command(flatten)]
            options: Options,
        }
        Defaults::parse_from(["kernel-matrix"]).options
    }
}

pub fn run(options: Options) -> Result<()> {
    let arch = match options.arch {
        crate::Arch::X86_64 => &X86_64,
        crate::Arch::Aarch64 => &AARCH64,
    };
    let kernels = select_kernels(arch, &options.kernels)?;
    let tests: Vec<&(&str, &str, &str)> = arch
        .subset
        .iter()
        .filter(|(_, name, _)| options.filter.as_deref().is_none_or(|f| name.contains(f)))
        .collect();
    if tests.is_empty() {
        bail!(
            "no test of the {} kernel-matrix subset contains {:?}; the subset: {}",
            arch.name,
            options.filter.as_deref().unwrap_or_default(),
            arch.subset
                .iter()
                .map(|t| t.1)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if !crate::is_root() {
        bail!(
            "the kernel matrix installs QEMU and debootstrap and builds a root filesystem as root: \
             run `sudo -E cargo xtask kernel-matrix`"
        );
    }
    let started = Instant::now();
    host_tools(arch)?;
    fs::create_dir_all(&options.cache_dir)
        .with_context(|| format!("cannot create {}", options.cache_dir.display()))?;
    let _lock = lock(&options.cache_dir)?;

    let rootfs = rootfs(arch, &options.cache_dir)?;
    let payload = Payload::build(arch, &tests, options.agent.as_deref(), &options.cache_dir)?;
    let build_secs = started.elapsed().as_secs_f64();
    eprintln!("kernel-matrix: host part ready after {build_secs:.0} s");

    let mut results = Vec::new();
    for kernel in kernels {
        let package = newest_package(kernel.package)?;
        let image = kernel_image(arch, &options.cache_dir, &package)?;
        eprintln!("kernel-matrix: booting {} ({package})", kernel.version);
        let result = boot(
            arch, kernel, &package, &image, &rootfs, &payload, &tests, &options,
        )?;
        results.push(result);
    }
    print!("{}", report(arch, &options, &results, build_secs));
    let failed: Vec<&str> = results
        .iter()
        .filter(|r| !r.passed())
        .map(|r| r.version)
        .collect();
    if !failed.is_empty() {
        bail!(
            "the end-to-end subset failed on kernel(s) {} (guest logs under {})",
            failed.join(", "),
            options.cache_dir.join("logs").display()
        );
    }
    Ok(())
}

/// One run at a time per cache directory: a second one would rebuild or delete the same files.
/// The lock goes with the returned file.
fn lock(cache: &Path) -> Result<fs::File> {
    use std::os::fd::AsRawFd as _;
    let path = cache.join(".lock");
    let file =
        fs::File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        eprintln!(
            "kernel-matrix: another run uses {}: waiting for it",
            cache.display()
        );
        // SAFETY: as above.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            bail!(
                "cannot lock {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(file)
}

fn select_kernels<'a>(arch: &'a GuestArch, wanted: &[String]) -> Result<Vec<&'a Kernel>> {
    if wanted.is_empty() {
        return Ok(arch.kernels.iter().collect());
    }
    wanted
        .iter()
        .map(|w| {
            arch.kernels
                .iter()
                .find(|k| k.version == w)
                .with_context(|| {
                    format!(
                        "no kernel {w} in the {} matrix; choose from: {}",
                        arch.name,
                        arch.kernels
                            .iter()
                            .map(|k| k.version)
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                })
        })
        .collect()
}

/// QEMU (from bookworm-backports), debootstrap, cpio; the project's toolchains and the rotel
/// collector the tests assert on.
fn host_tools(arch: &GuestArch) -> Result<()> {
    setup::run(false)?;
    setup::rotel()?;
    if !setup::have(arch.qemu) {
        setup::ensure_backports()?;
        setup::apt_install_from(Some("bookworm-backports"), &[arch.qemu_package])?;
    }
    setup::apt_install_from(None, &["debootstrap", "cpio", "binutils"])?;
    if arch.cpu != crate::Arch::host() {
        setup::cross_toolchain(arch.cpu)?;
        foreign_binaries(arch)?;
        foreign_packages(arch)?;
    }
    Ok(())
}

/// The guest's kernel packages are of its architecture: apt lists them (and `apt-get download
/// pkg:arm64` fetches them) only once dpkg knows the architecture as a foreign one.
fn foreign_packages(arch: &GuestArch) -> Result<()> {
    let known = Command::new("dpkg")
        .arg("--print-foreign-architectures")
        .output()
        .context("cannot run dpkg")?;
    if String::from_utf8_lossy(&known.stdout)
        .split_whitespace()
        .any(|a| a == arch.deb_arch)
    {
        return Ok(());
    }
    eprintln!(
        "kernel-matrix: adding {} as a foreign architecture (for its kernel packages)",
        arch.deb_arch
    );
    sh(Command::new("dpkg").args(["--add-architecture", arch.deb_arch]))?;
    sh(Command::new("apt-get").args(["update", "-qq"]))
}

/// binfmt_misc mounted at its usual place: systemd mounts it at boot, a fresh machine or
/// container without systemd may not have it (found on a fresh VM: the kernel supports it,
/// nothing had mounted it).
fn mount_binfmt_misc() -> Result<()> {
    let dir = Path::new("/proc/sys/fs/binfmt_misc");
    if dir.join("register").exists() {
        return Ok(());
    }
    let status = Command::new("mount")
        .args(["-t", "binfmt_misc", "binfmt_misc"])
        .arg(dir)
        .status()
        .context("cannot run mount (to mount binfmt_misc)")?;
    if !status.success() || !dir.join("register").exists() {
        bail!(
            "binfmt_misc is not mounted at {} and `mount -t binfmt_misc binfmt_misc {}` failed              ({status}): the kernel needs CONFIG_BINFMT_MISC, and a container needs to be              privileged",
            dir.display(),
            dir.display()
        );
    }
    Ok(())
}

/// debootstrap and apt run the guest architecture's programs in a chroot: through qemu-user,
/// registered with binfmt_misc (the `F` flag keeps the interpreter usable inside the chroot).
fn foreign_binaries(arch: &GuestArch) -> Result<()> {
    let entry = Path::new("/proc/sys/fs/binfmt_misc").join(format!("qemu-{}", arch.name));
    if entry.exists() {
        return Ok(());
    }
    setup::ensure_backports()?;
    setup::apt_install_from(Some("bookworm-backports"), &["qemu-user-static"])?;
    // The package registers its formats through systemd-binfmt at boot; here, at once (also
    // where no systemd runs).
    let conf = Path::new("/usr/lib/binfmt.d").join(format!("qemu-{}.conf", arch.name));
    let text = fs::read_to_string(&conf)
        .with_context(|| format!("qemu-user-static installed no {}", conf.display()))?;
    let rule = text
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with(':'))
        .with_context(|| format!("no binfmt rule in {}", conf.display()))?;
    mount_binfmt_misc()?;
    fs::write("/proc/sys/fs/binfmt_misc/register", rule).with_context(|| {
        format!(
            "cannot register {}'s programs with binfmt_misc (is it mounted at \
             /proc/sys/fs/binfmt_misc?)",
            arch.name
        )
    })?;
    if !entry.exists() {
        bail!(
            "{} is missing after registering it: programs for {} cannot run here",
            entry.display(),
            arch.name
        );
    }
    Ok(())
}

/// FNV-1a, 64 bits: a cache key that stays the same across Rust releases.
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The cached root filesystem (cpio), made when missing: debootstrap minbase, then the
/// packages installed with apt inside it, with services kept from starting (policy-rc.d).
fn rootfs(arch: &GuestArch, cache: &Path) -> Result<PathBuf> {
    let key = fnv1a(&format!(
        "{ROOTFS_FORMAT} {SUITE} {} {}",
        arch.deb_arch,
        arch.packages.join(",")
    ));
    let name = format!("rootfs-{SUITE}-{}-{key:016x}", arch.deb_arch);
    let cpio = cache.join(format!("{name}.cpio"));
    if cpio.exists() {
        return Ok(cpio);
    }
    let started = Instant::now();
    let dir = cache.join(format!("{name}.build"));
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    }
    eprintln!(
        "kernel-matrix: building the {} guest root filesystem ({SUITE} minbase + {}), a few minutes",
        arch.name,
        arch.packages.join(" ")
    );
    sh(Command::new("debootstrap")
        .args(["--variant=minbase", "--arch", arch.deb_arch, SUITE])
        .arg(&dir)
        .arg(MIRROR)
        .stdout(Stdio::null()))
    .context("debootstrap failed")?;
    // A package's postinst must not start its service inside the chroot (nginx would bind
    // the host's port 80).
    let policy = dir.join("usr/sbin/policy-rc.d");
    fs::write(&policy, "#!/bin/sh\nexit 101\n")?;
    set_mode(&policy, 0o755)?;
    let chroot_apt = |args: &[&str]| {
        let mut c = Command::new("chroot");
        c.arg(&dir)
            .arg("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .env("LC_ALL", "C")
            .stdout(Stdio::null());
        sh(&mut c)
    };
    chroot_apt(&["update", "-qq"])?;
    let mut install = vec!["install", "-y", "-qq", "--no-install-recommends"];
    install.extend(arch.packages);
    chroot_apt(&install)?;
    chroot_apt(&["clean"])?;
    fs::remove_file(&policy)?;
    // Every byte is unpacked by the emulated guest at each boot. PostgreSQL's JIT (LLVM and
    // z3, 130 MB of 514) only compiles costly queries, none here; without its provider
    // PostgreSQL runs without JIT.
    let libs = format!("usr/lib/{}", arch.multiarch);
    let unneeded = [
        "usr/share/doc".to_string(),
        "usr/share/man".to_string(),
        "usr/share/info".to_string(),
        "usr/share/locale".to_string(),
        "usr/share/i18n".to_string(),
        "var/lib/apt/lists".to_string(),
        format!("{libs}/libLLVM-14.so.1"),
        format!("{libs}/libz3.so.4"),
        "usr/lib/postgresql/15/lib/llvmjit.so".to_string(),
        "usr/lib/postgresql/15/lib/llvmjit_types.bc".to_string(),
        "usr/lib/postgresql/15/lib/bitcode".to_string(),
    ];
    for rel in &unneeded {
        let path = dir.join(rel);
        let removed = if path.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        match removed {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot remove {}", path.display())),
        }
    }
    let partial = cpio.with_extension("cpio.partial");
    pack_cpio(&dir, &partial)?;
    fs::rename(&partial, &cpio)?;
    fs::remove_dir_all(&dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    // Root filesystems of earlier package lists: half a gigabyte each.
    let stale_prefix = format!("rootfs-{SUITE}-{}-", arch.deb_arch);
    for entry in fs::read_dir(cache)?.flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        if file.starts_with(&stale_prefix) && file.ends_with(".cpio") && entry.path() != cpio {
            eprintln!("kernel-matrix: removing the outdated {file}");
            fs::remove_file(entry.path())?;
        }
    }
    eprintln!(
        "kernel-matrix: root filesystem {} made in {:.0} s",
        cpio.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(cpio)
}

/// `dir` packed as an uncompressed newc cpio (what the kernel unpacks as initramfs), owned by
/// root.
fn pack_cpio(dir: &Path, out: &Path) -> Result<()> {
    let file = fs::File::create(out).with_context(|| format!("cannot create {}", out.display()))?;
    sh(Command::new("sh")
        .args([
            "-c",
            "find . -print0 | cpio --null -o -H newc -R 0:0 --quiet",
        ])
        .current_dir(dir)
        .stdout(file))
    .with_context(|| format!("cannot pack {} as cpio", dir.display()))
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot chmod {}", path.display()))
}

/// Compares Debian package names the way `sort -V` does: runs of digits as numbers.
fn version_order(a: &str, b: &str) -> std::cmp::Ordering {
    fn chunks(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut start = 0;
        let bytes = s.as_bytes();
        for i in 1..=bytes.len() {
            if i == bytes.len() || bytes[i].is_ascii_digit() != bytes[start].is_ascii_digit() {
                out.push((bytes[start].is_ascii_digit(), &s[start..i]));
                start = i;
            }
        }
        out
    }
    let (ca, cb) = (chunks(a), chunks(b));
    for (x, y) in ca.iter().zip(&cb) {
        let ord = match (x, y) {
            ((true, x), (true, y)) => {
                let (x, y) = (x.trim_start_matches('0'), y.trim_start_matches('0'));
                x.len().cmp(&y.len()).then_with(|| x.cmp(y))
            }
            ((_, x), (_, y)) => x.cmp(y),
        };
        if ord.is_ne() {
            return ord;
        }
    }
    ca.len().cmp(&cb.len())
}

/// The newest package whose whole name matches `pattern` in apt's lists (updated once when
/// nothing matches: the lists may predate the package).
fn newest_package(pattern: &str) -> Result<String> {
    let search = || -> Result<Option<String>> {
        let out = Command::new("apt-cache")
            .args(["search", "--names-only", &format!("^{pattern}$")])
            .output()
            .context("cannot run apt-cache")?;
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(text
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .max_by(|a, b| version_order(a, b))
            .map(str::to_string))
    };
    if let Some(found) = search()? {
        return Ok(found);
    }
    sh(Command::new("apt-get").args(["update", "-qq"]))?;
    search()?.with_context(|| {
        format!(
            "no Debian package matches ^{pattern}$: the kernel lines come from bookworm and \
             bookworm-security; check that apt lists both (/etc/apt/sources.list.d/)"
        )
    })
}

/// A kernel package extracted under the cache: (kernel image, release, module directory).
struct KernelImage {
    vmlinuz: PathBuf,
    release: String,
    modules: PathBuf,
}

fn kernel_image(arch: &GuestArch, cache: &Path, package: &str) -> Result<KernelImage> {
    let dir = cache.join("kernels").join(package);
    if !dir.join("boot").exists() {
        let download = cache.join("kernels/download");
        if download.exists() {
            fs::remove_dir_all(&download)?;
        }
        fs::create_dir_all(&download)?;
        eprintln!("kernel-matrix: downloading {package}");
        sh(Command::new("apt-get")
            // As root into a root-owned directory: apt's sandbox user could not write there.
            .args(["download", "-qq", "-o", "APT::Sandbox::User=root"])
            .arg(format!("{package}:{}", arch.deb_arch))
            .current_dir(&download))?;
        let deb = fs::read_dir(&download)?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .with_context(|| format!("apt-get download {package} left no .deb"))?;
        let partial = dir.with_extension("partial");
        if partial.exists() {
            fs::remove_dir_all(&partial)?;
        }
        sh(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&partial))?;
        fs::rename(&partial, &dir)?;
        fs::remove_dir_all(&download)?;
    }
    let vmlinuz = fs::read_dir(dir.join("boot"))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .with_context(|| format!("{package} has no boot/vmlinuz-*"))?;
    let release = vmlinuz
        .file_name()
        .map(|n| {
            n.to_string_lossy()
                .trim_start_matches("vmlinuz-")
                .to_string()
        })
        .unwrap_or_default();
    let modules = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|m| dir.join(m).join(&release))
        .find(|p| p.exists())
        .with_context(|| format!("{package} has no lib/modules/{release}"))?;
    Ok(KernelImage {
        vmlinuz,
        release,
        modules,
    })
}

/// What every guest gets from the host: the test binaries, the agent, the collector.
struct Payload {
    /// (test binary name, executable)
    tests: BTreeMap<String, PathBuf>,
    agent: PathBuf,
    rotel: PathBuf,
    /// `strip` for these binaries' architecture.
    strip: &'static str,
}

impl Payload {
    fn build(
        arch: &GuestArch,
        tests: &[&(&str, &str, &str)],
        agent: Option<&Path>,
        cache: &Path,
    ) -> Result<Payload> {
        let native = arch.cpu == crate::Arch::host();
        // `AGENT_BIN` as for the host's end-to-end tests, else the debug build `cargo xtask test`
        // builds anyway.
        let agent = match agent.map(Path::to_path_buf).or_else(|| {
            native
                .then(|| std::env::var_os("AGENT_BIN").map(PathBuf::from))
                .flatten()
        }) {
            Some(path) => path,
            None => crate::build_agent_for(arch.cpu, crate::Profile::Debug)?,
        };
        let mut wanted: Vec<&str> = tests.iter().map(|t| t.0).collect();
        wanted.dedup();
        let mut cmd = cargo();
        cmd.args([
            "test",
            "-p",
            "tests",
            "--no-run",
            "--message-format=json-render-diagnostics",
        ]);
        for bin in &wanted {
            cmd.args(["--test", bin]);
        }
        if !native {
            crate::cross_compile(&mut cmd, arch.cpu);
        }
        let out = cmd
            .stderr(Stdio::inherit())
            .output()
            .context("cannot run cargo")?;
        if !out.status.success() {
            bail!("building the end-to-end tests failed ({})", out.status);
        }
        let tests = test_executables(&String::from_utf8_lossy(&out.stdout), &wanted)?;
        // The node service of the chain test needs node-postgres next to the fixtures.
        if wanted.contains(&"traces_e2e") {
            if !setup::have("npm") {
                setup::apt_install_from(None, &["npm"])?;
            }
            testkit::pg_clients::node_pg_dir();
        }
        let rotel = if native {
            testkit::collector::rotel_bin()
        } else {
            foreign_rotel(arch, cache)?
        };
        Ok(Payload {
            tests,
            agent,
            rotel,
            strip: arch.strip,
        })
    }
}

/// The rotel collector for another CPU: the binary inside rotel's wheel for that platform
/// (for the guest's python 3.11; it embeds libpython), kept under the cache.
fn foreign_rotel(arch: &GuestArch, cache: &Path) -> Result<PathBuf> {
    let version = setup::ROTEL_VERSION;
    let dir = cache.join(format!("rotel-{version}-{}", arch.name));
    let binary = dir.join("rotel-agent");
    if binary.exists() {
        return Ok(binary);
    }
    let download = dir.join("wheel");
    fs::create_dir_all(&download)?;
    sh(Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args([
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            "3.11",
        ])
        .args(["--implementation", "cp", "--abi", "cp311"])
        .arg("--platform")
        .arg(format!("manylinux_2_34_{}", arch.name))
        .arg("-d")
        .arg(&download)
        .arg(format!("rotel=={version}")))
    .with_context(|| format!("cannot download rotel {version} for {}", arch.name))?;
    let wheel = fs::read_dir(&download)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .with_context(|| format!("pip left no rotel wheel in {}", download.display()))?;
    // A wheel is a zip file.
    sh(Command::new("python3")
        .args([
            "-c",
            "import sys, zipfile; open(sys.argv[2], 'wb').write(zipfile.ZipFile(sys.argv[1]).read('rotel/rotel-agent'))",
        ])
        .arg(&wheel)
        .arg(&binary))?;
    set_mode(&binary, 0o755)?;
    fs::remove_dir_all(&download)?;
    Ok(binary)
}

/// The executables of the test targets `wanted` in cargo's JSON messages.
fn test_executables(messages: &str, wanted: &[&str]) -> Result<BTreeMap<String, PathBuf>> {
    let mut found = BTreeMap::new();
    for line in messages.lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" {
            continue;
        }
        let name = msg["target"]["name"].as_str().unwrap_or_default();
        let is_test = msg["target"]["kind"]
            .as_array()
            .is_some_and(|k| k.iter().any(|k| k == "test"));
        if let (true, true, Some(exe)) =
            (is_test, wanted.contains(&name), msg["executable"].as_str())
        {
            found.insert(name.to_string(), PathBuf::from(exe));
        }
    }
    if let Some(missing) = wanted.iter().find(|w| !found.contains_key(**w)) {
        bail!("cargo built no test executable named {missing}");
    }
    Ok(found)
}

/// The per-guest overlay: `/init`, `/matrix` (run.sh, binaries), the fixtures at the path the
/// test binaries were compiled with, the network modules.
fn overlay(
    dir: &Path,
    payload: &Payload,
    kernel: &KernelImage,
    tests: &[&(&str, &str, &str)],
    options: &Options,
) -> Result<()> {
    let write = |rel: &str, text: &str, mode: u32| -> Result<()> {
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
        set_mode(&path, mode)
    };
    write("init", GUEST_INIT, 0o755)?;
    write(
        "matrix/run.sh",
        &run_script(tests, options.time_scale),
        0o755,
    )?;
    fs::create_dir_all(dir.join("matrix/bin"))?;
    // Without their debug info: a quarter of the size, and every byte is unpacked by the
    // emulated guest at boot.
    let strip = |from: &Path, to: PathBuf| {
        sh(Command::new(payload.strip)
            .arg("--strip-debug")
            .arg("-o")
            .arg(&to)
            .arg(from))
    };
    strip(&payload.agent, dir.join("matrix/agent"))?;
    fs::copy(&payload.rotel, dir.join("matrix/rotel-agent"))
        .with_context(|| format!("cannot copy {}", payload.rotel.display()))?;
    for (name, exe) in &payload.tests {
        strip(exe, dir.join("matrix/bin").join(name))?;
    }
    // The fixtures, where `tests::fixture` looks (a path compiled into the test binaries).
    let fixtures = workspace_root().join("tests/fixtures");
    let inside = guest_path(dir, &fixtures)?;
    fs::create_dir_all(&inside)?;
    sh(Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", fixtures.display()))
        .arg(&inside))?;
    // The modules of veth pairs on a bridge; depmod runs in the guest.
    let modules = dir.join("usr/lib/modules").join(&kernel.release);
    fs::create_dir_all(&modules)?;
    for rel in MODULE_PATHS {
        let (parent, name) = match rel.rsplit_once('/') {
            Some((p, n)) => (p, n),
            None => ("", *rel),
        };
        let from_dir = kernel.modules.join(parent);
        // Compressed or not, depending on the kernel build (.ko, .ko.xz).
        let Some(from) = fs::read_dir(&from_dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name().is_some_and(|n| {
                    let n = n.to_string_lossy();
                    n == name || n.starts_with(&format!("{name}."))
                })
            })
        else {
            bail!(
                "the kernel package has no {} under {}",
                rel,
                kernel.modules.display()
            );
        };
        let to = modules.join(parent);
        fs::create_dir_all(&to)?;
        sh(Command::new("cp").arg("-a").arg(&from).arg(&to))?;
    }
    Ok(())
}

/// Where `host_path` goes inside the overlay `dir`, refusing the top-level directories that are
/// symlinks in the root filesystem.
fn guest_path(dir: &Path, host_path: &Path) -> Result<PathBuf> {
    let mut parts = host_path
        .components()
        .filter(|c| matches!(c, Component::Normal(_)));
    let first = parts
        .next()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .unwrap_or_default();
    if ["lib", "lib32", "lib64", "bin", "sbin"].contains(&first.as_str()) {
        bail!(
            "{} cannot be recreated in the guest: /{first} is a symlink in its root filesystem; \
             check the workspace out elsewhere",
            host_path.display()
        );
    }
    Ok(dir.join(host_path.strip_prefix("/").unwrap_or(host_path)))
}

/// The guest's test script: the agent alone first (its start-up report: the hooks this kernel
/// gets, or why it stops), then each test of the subset on its own.
fn run_script(tests: &[&(&str, &str, &str)], time_scale: u32) -> String {
    let mut s = String::from(
        "#!/bin/sh\n\
         # Written by cargo xtask kernel-matrix.\n\
         export AGENT_BIN=/matrix/agent ROTEL_BIN=/matrix/rotel-agent RUST_BACKTRACE=0\n",
    );
    s.push_str(&format!("export E2E_TIME_SCALE={time_scale}\n"));
    s.push_str(&format!(
        "echo '=== MATRIX-AGENT-BEGIN'\n\
         /matrix/agent --comm {PROBE_COMM} >/tmp/matrix-agent.out 2>/tmp/matrix-agent.err &\n\
         pid=$!\n\
         n=0\n\
         while [ $n -lt 1200 ] && kill -0 $pid 2>/dev/null && ! grep -q '^agent ready' /tmp/matrix-agent.err; do\n\
         \x20 sleep 0.5; n=$((n + 1))\n\
         done\n\
         ready=no; grep -q '^agent ready' /tmp/matrix-agent.err && ready=yes\n\
         kill -TERM $pid 2>/dev/null; wait $pid; rc=$?\n\
         sed 's/^/agent-stderr| /' /tmp/matrix-agent.err\n\
         echo \"=== MATRIX-AGENT-END ready=$ready rc=$rc\"\n\
         failed=0\n"
    ));
    for (bin, name, _) in tests {
        s.push_str(&format!(
            "echo '=== MATRIX-TEST-BEGIN {bin} {name}'\n\
             /matrix/bin/{bin} --exact {name} --test-threads=1 --color never; rc=$?\n\
             [ $rc = 0 ] || failed=1\n\
             echo \"=== MATRIX-TEST-END {bin} {name} rc=$rc\"\n"
        ));
    }
    s.push_str("exit $failed\n");
    s
}

#[derive(Debug)]
struct TestOutcome {
    bin: String,
    name: String,
    passed: bool,
    secs: f64,
}

/// What one guest showed.
#[derive(Debug)]
struct KernelResult {
    version: &'static str,
    package: String,
    release: Option<String>,
    boot_secs: Option<f64>,
    /// Seconds from the agent's start to `agent ready`; None if it never got ready.
    agent_ready_secs: Option<f64>,
    agent_exit: Option<String>,
    agent_report: Vec<String>,
    tests: Vec<TestOutcome>,
    expected_tests: usize,
    /// How the reported hooks differ from [`Kernel::hooks`] (empty: as expected).
    hook_differences: Vec<String>,
    guest_exited: bool,
    wall_secs: f64,
    log: PathBuf,
}

impl KernelResult {
    fn passed(&self) -> bool {
        self.guest_exited
            && self.hook_differences.is_empty()
            && self.tests.len() == self.expected_tests
            && self.tests.iter().all(|t| t.passed)
    }
}

#[allow(clippy::too_many_arguments)]
fn boot(
    arch: &GuestArch,
    kernel: &'static Kernel,
    package: &str,
    image: &KernelImage,
    rootfs: &Path,
    payload: &Payload,
    tests: &[&(&str, &str, &str)],
    options: &Options,
) -> Result<KernelResult> {
    let run_dir = options
        .cache_dir
        .join("runs")
        .join(format!("{}-{}", arch.name, kernel.version));
    if run_dir.exists() {
        fs::remove_dir_all(&run_dir)?;
    }
    let overlay_dir = run_dir.join("overlay");
    fs::create_dir_all(&overlay_dir)?;
    overlay(&overlay_dir, payload, image, tests, options)?;
    let overlay_cpio = run_dir.join("overlay.cpio");
    pack_cpio(&overlay_dir, &overlay_cpio)?;
    // The kernel unpacks concatenated cpio archives in order: the overlay over the rootfs.
    let initrd = run_dir.join("initrd.cpio");
    {
        let mut out = fs::File::create(&initrd)?;
        for part in [rootfs, overlay_cpio.as_path()] {
            let mut input =
                fs::File::open(part).with_context(|| format!("cannot open {}", part.display()))?;
            std::io::copy(&mut input, &mut out)?;
        }
    }
    let logs = options.cache_dir.join("logs");
    fs::create_dir_all(&logs)?;
    let log_path = logs.join(format!("{}-{}.log", arch.name, kernel.version));
    let mut log = fs::File::create(&log_path)?;

    let mut child = Command::new(arch.qemu)
        .args(arch.qemu_args)
        .args(["-m", &options.memory.to_string()])
        .args(["-smp", &options.cpus.to_string()])
        .args([
            "-nographic",
            "-no-reboot",
            "-nodefaults",
            "-serial",
            "stdio",
        ])
        .arg("-kernel")
        .arg(&image.vmlinuz)
        .arg("-initrd")
        .arg(&initrd)
        .arg("-append")
        .arg(format!(
            "console={} panic=-1 quiet rdinit=/init",
            arch.console
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {}", arch.qemu))?;
    let started = Instant::now();
    let (tx, rx) = mpsc::channel::<String>();
    for stream in [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).split(b'\n').map_while(Result::ok) {
                let line = String::from_utf8_lossy(&line)
                    .trim_end_matches('\r')
                    .to_string();
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
    }
    drop(tx);

    let mut result = KernelResult {
        version: kernel.version,
        package: package.to_string(),
        release: None,
        boot_secs: None,
        agent_ready_secs: None,
        agent_exit: None,
        agent_report: Vec::new(),
        tests: Vec::new(),
        expected_tests: tests.len(),
        hook_differences: Vec::new(),
        guest_exited: false,
        wall_secs: 0.0,
        log: log_path.clone(),
    };
    let deadline = started + Duration::from_secs(options.timeout);
    let mut agent_started = None;
    let mut test_started = started;
    let mut timed_out = false;
    loop {
        let now = Instant::now();
        if now >= deadline {
            timed_out = true;
            break;
        }
        let line = match rx.recv_timeout(deadline - now) {
            Ok(line) => line,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                timed_out = true;
                break;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        let secs = started.elapsed().as_secs_f64();
        writeln!(log, "[{secs:8.2}] {line}")?;
        // The console's first line after boot starts with the firmware's escape sequences.
        let Some(event) = line
            .find("=== MATRIX-")
            .map(|at| &line[at + "=== MATRIX-".len()..])
        else {
            if let Some(report) = line.strip_prefix("agent-stderr| ") {
                result.agent_report.push(report.to_string());
            }
            continue;
        };
        eprintln!("kernel-matrix: {} [{secs:6.1} s] {event}", kernel.version);
        if let Some(rest) = event.strip_prefix("UP ") {
            result.boot_secs = Some(secs);
            result.release = field(rest, "kernel").map(str::to_string);
        } else if event == "AGENT-BEGIN" {
            agent_started = Some(Instant::now());
        } else if let Some(rest) = event.strip_prefix("AGENT-END ") {
            if field(rest, "ready") == Some("yes") {
                // Within the guest's 0.5 s polling step of the moment it got ready.
                result.agent_ready_secs = agent_started.map(|t| t.elapsed().as_secs_f64());
            }
            result.agent_exit = field(rest, "rc").map(str::to_string);
        } else if event.starts_with("TEST-BEGIN ") {
            test_started = Instant::now();
        } else if let Some(rest) = event.strip_prefix("TEST-END ") {
            let mut words = rest.split_whitespace();
            if let (Some(bin), Some(name)) = (words.next(), words.next()) {
                result.tests.push(TestOutcome {
                    bin: bin.to_string(),
                    name: name.to_string(),
                    passed: field(rest, "rc") == Some("0"),
                    secs: test_started.elapsed().as_secs_f64(),
                });
            }
        } else if event.starts_with("EXIT ") {
            result.guest_exited = true;
        }
    }
    if timed_out {
        let _ = child.kill();
        eprintln!(
            "kernel-matrix: {}: the guest did not finish within {} s: stopped it",
            kernel.version, options.timeout
        );
        writeln!(log, "kernel-matrix: timed out after {} s", options.timeout)?;
    }
    let _ = child.wait();
    result.wall_secs = started.elapsed().as_secs_f64();
    // What this kernel must give the agent is its row of the README's table: a kernel that
    // silently gets other hooks (less, or more) fails until the table says so.
    let readme = fs::read_to_string(crate::workspace_root().join("README.md"))?;
    let rows = kernel_table::rows(&readme)?;
    let row = kernel_table::row(&rows, kernel.version, arch.readme_cpu)?;
    result.hook_differences = kernel_table::differences(row, &result.agent_report.join("\n"));
    if !options.keep {
        fs::remove_dir_all(&run_dir)?;
    }
    Ok(result)
}

/// The value of `key=value` among whitespace-separated words.
fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

/// The start-up report's `agent: hook: <function> ← <hook> (why)` lines: function → hook.
fn reported_hooks(report: &[String]) -> BTreeMap<&str, &str> {
    report
        .iter()
        .filter_map(|l| {
            let (function, hook) = l.strip_prefix("agent: hook: ")?.split_once(" ← ")?;
            let hook = hook.split(" (").next().unwrap_or(hook);
            Some((function.trim(), hook.trim()))
        })
        .collect()
}

/// The lines of the agent's start-up report that say what this kernel gives it: which hook
/// serves each function (or, from agents without that report, what attached), errors,
/// warnings.
fn is_hook_line(line: &str, has_hook_lines: bool) -> bool {
    if line.starts_with("agent: attached ") {
        return !has_hook_lines;
    }
    [
        "agent: hook: ",
        "agent: error",
        "agent: warning",
        "agent: note",
        "agent: context propagation",
        "agent: runtime linking: off",
    ]
    .iter()
    .any(|p| line.starts_with(p))
}

fn report(
    arch: &GuestArch,
    options: &Options,
    results: &[KernelResult],
    build_secs: f64,
) -> String {
    let mut out = format!(
        "\nkernel matrix: {} under QEMU TCG, {} vCPUs, {} MiB; host part {build_secs:.0} s\n",
        arch.name, options.cpus, options.memory
    );
    out.push_str(&format!(
        "{:<6} {:<28} {:>7} {:>13} {:>7} {:>9} {:>8}  {}\n",
        "kernel", "release", "boot", "agent ready", "hooks", "tests", "wall", "result"
    ));
    for r in results {
        let passed = r.tests.iter().filter(|t| t.passed).count();
        let agent = match (r.agent_ready_secs, &r.agent_exit) {
            (Some(s), _) => format!("{s:.1} s"),
            (None, Some(rc)) => format!("exit {rc}"),
            (None, None) => "-".to_string(),
        };
        out.push_str(&format!(
            "{:<6} {:<28} {:>7} {:>13} {:>7} {:>9} {:>6.0} s  {}\n",
            r.version,
            r.release.as_deref().unwrap_or(&r.package),
            r.boot_secs.map_or("-".to_string(), |s| format!("{s:.1} s")),
            agent,
            if r.hook_differences.is_empty() {
                "as set"
            } else {
                "DIFFER"
            },
            format!("{passed}/{} ok", r.expected_tests),
            r.wall_secs,
            if r.passed() { "PASS" } else { "FAIL" }
        ));
    }
    for r in results {
        out.push_str(&format!(
            "\n{} ({}), log {}:\n",
            r.version,
            r.package,
            r.log.display()
        ));
        if !r.guest_exited {
            out.push_str("  the guest did not finish (see its log)\n");
        }
        // (Not the warning about the probe's own --comm, which matches nothing on purpose.)
        let has_hook_lines = !reported_hooks(&r.agent_report).is_empty();
        let hooks: Vec<&String> = r
            .agent_report
            .iter()
            .filter(|l| is_hook_line(l, has_hook_lines) && !l.contains(PROBE_COMM))
            .collect();
        if hooks.is_empty() {
            out.push_str("  the agent printed no start-up report (see the log)\n");
        }
        for line in hooks {
            out.push_str(&format!("  {line}\n"));
        }
        for difference in &r.hook_differences {
            out.push_str(&format!("  HOOK DIFFERS: {difference}\n"));
        }
        for t in &r.tests {
            out.push_str(&format!(
                "  {} {}::{} ({:.0} s)\n",
                if t.passed { "ok    " } else { "FAILED" },
                t.bin,
                t.name,
                t.secs
            ));
        }
        for (bin, name, _) in arch.subset {
            if !r.tests.iter().any(|t| t.bin == *bin && t.name == *name)
                && options.filter.as_deref().is_none_or(|f| name.contains(f))
            {
                out.push_str(&format!("  NOT RUN {bin}::{name}\n"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_kernel_package_by_version_not_by_text() {
        let names = [
            "linux-image-6.1.0-9-cloud-amd64",
            "linux-image-6.1.0-57-cloud-amd64",
            "linux-image-6.1.0-10-cloud-amd64",
        ];
        let newest = names.iter().max_by(|a, b| version_order(a, b));
        assert_eq!(newest, Some(&"linux-image-6.1.0-57-cloud-amd64"));
        let newest = [
            "linux-image-6.12.9+deb12-cloud-amd64",
            "linux-image-6.12.118+deb12-cloud-amd64",
        ]
        .iter()
        .max_by(|a, b| version_order(a, b));
        assert_eq!(newest, Some(&"linux-image-6.12.118+deb12-cloud-amd64"));
        assert!(version_order("a-01", "a-1").is_eq());
    }

    #[test]
    fn finds_the_test_executables_in_cargos_messages() {
        let messages = r#"{"reason":"compiler-artifact","target":{"name":"tests","kind":["lib"]},"executable":null}
{"reason":"compiler-artifact","target":{"name":"http_e2e","kind":["test"]},"executable":"/w/target/debug/deps/http_e2e-1234"}
not json
{"reason":"build-finished","success":true}"#;
        let found = test_executables(messages, &["http_e2e"]).expect("found");
        assert_eq!(
            found.get("http_e2e"),
            Some(&PathBuf::from("/w/target/debug/deps/http_e2e-1234"))
        );
        assert!(test_executables(messages, &["http_e2e", "traces_e2e"]).is_err());
    }

    #[test]
    fn overlay_paths_never_replace_the_rootfs_symlinks() {
        let dir = Path::new("/o");
        assert_eq!(
            guest_path(dir, Path::new("/tmp/tmp.x/main/tests/fixtures")).expect("tmp"),
            Path::new("/o/tmp/tmp.x/main/tests/fixtures")
        );
        assert!(guest_path(dir, Path::new("/lib/x")).is_err());
        assert!(guest_path(dir, Path::new("/bin/x")).is_err());
    }

    #[test]
    fn reads_marker_fields() {
        assert_eq!(field("ready=yes rc=0", "rc"), Some("0"));
        assert_eq!(field("ready=yes rc=0", "ready"), Some("yes"));
        assert_eq!(
            field("kernel=6.1.0-57-cloud-amd64 uptime=3.2", "kernel"),
            Some("6.1.0-57-cloud-amd64")
        );
        assert_eq!(field("rcx=1", "rc"), None);
    }

    #[test]
    fn the_subset_covers_http_postgres_and_namespaces() {
        let bins: Vec<&str> = SUBSET.iter().map(|t| t.0).collect();
        for bin in ["http_e2e", "postgres_e2e", "traces_e2e"] {
            assert!(bins.contains(&bin), "{bin}");
        }
        let script = run_script(&SUBSET.iter().collect::<Vec<_>>(), 10);
        assert!(script.contains("E2E_TIME_SCALE=10"));
        assert_eq!(script.matches("=== MATRIX-TEST-END").count(), SUBSET.len());
    }
}
