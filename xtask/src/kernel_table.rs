//! The README's table of supported kernels: the one statement of which hooks each kernel gets,
//! checked against what the agent chose in each guest (and on the host) by the kernel matrix.

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, bail};

const START: &str = "<!-- kernel-matrix: the rows between these markers";
const END: &str = "<!-- kernel-matrix: end -->";

/// One row: `| kernel | CPU | socket data | write stamps | tested here |`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// The kernel's version as the matrix names it: the last word before any parenthesis
    /// (`Debian 12 6.1` → `6.1`, `6.18 (CI host)` → `6.18`).
    pub version: String,
    /// `x86_64` or `arm64`.
    pub cpu: String,
    /// The hook family: `tp_btf`, `fexit` or `kprobes`.
    pub socket_data: String,
    /// `tcp_sendmsg_locked` or `at return`.
    pub write_stamps: String,
}

/// The rows between the markers of `readme`.
pub fn rows(readme: &str) -> Result<Vec<Row>> {
    let start = readme
        .find(START)
        .context("README.md has no kernel-matrix table (its start marker is missing)")?;
    let end = readme[start..]
        .find(END)
        .context("README.md's kernel-matrix table has no end marker")?;
    let mut rows = Vec::new();
    for line in readme[start..start + end].lines().skip(1) {
        let cells: Vec<&str> = line
            .trim()
            .trim_matches('|')
            .split('|')
            .map(str::trim)
            .collect();
        if cells.len() < 4 || cells[0] == "kernel" || cells[0].starts_with("---") {
            continue;
        }
        let name = cells[0].split('(').next().unwrap_or_default();
        let version = name.split_whitespace().last().unwrap_or_default();
        rows.push(Row {
            version: version.to_owned(),
            cpu: cells[1].to_owned(),
            socket_data: cells[2].to_owned(),
            write_stamps: cells[3].to_owned(),
        });
    }
    if rows.is_empty() {
        bail!("README.md's kernel-matrix table has no rows");
    }
    Ok(rows)
}

/// The row of kernel `version` on `cpu`.
pub fn row<'r>(rows: &'r [Row], version: &str, cpu: &str) -> Result<&'r Row> {
    rows.iter()
        .find(|r| r.version == version && r.cpu == cpu)
        .with_context(|| format!("README.md's kernel table has no row for {version} on {cpu}"))
}

/// How what the agent reported at start-up (its `agent: hook:` lines, in `stderr`) differs
/// from `row`; empty when it matches.
pub fn differences(row: &Row, stderr: &str) -> Vec<String> {
    let hook = |function: &str| {
        let prefix = format!("agent: hook: {function} ← ");
        stderr
            .lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()).map(str::to_owned))
    };
    let mut out = Vec::new();
    for function in ["socket reads", "socket writes"] {
        match hook(function).as_deref().map(family) {
            Some(got) if got == row.socket_data => {}
            Some(got) => out.push(format!(
                "{function}: the README says {}, the agent chose {got}",
                row.socket_data
            )),
            None => out.push(format!("{function}: the agent reported no hook")),
        }
    }
    let stamps = hook("write stamps").map(|h| {
        if h.starts_with("tp_btf/tcp_sendmsg_locked") {
            "tcp_sendmsg_locked".to_owned()
        } else if h.starts_with("at the write's return") {
            "at return".to_owned()
        } else {
            h
        }
    });
    match stamps {
        Some(got) if got == row.write_stamps => {}
        Some(got) => out.push(format!(
            "write stamps: the README says {}, the agent chose {got}",
            row.write_stamps
        )),
        None => out.push("write stamps: the agent reported no hook".into()),
    }
    out
}

/// Starts `agent` on this host (selecting nothing), reads its start-up report and checks it
/// against the host kernel's row: the host is a matrix kernel like the guests.
pub fn check_host(agent: &Path) -> Result<()> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .context("cannot read /proc/sys/kernel/osrelease")?;
    let version: String = release
        .trim()
        .split('.')
        .take(2)
        .collect::<Vec<_>>()
        .join(".");
    let cpu = match std::env::consts::ARCH {
        "aarch64" => "arm64",
        other => other,
    };
    let readme = std::fs::read_to_string(crate::workspace_root().join("README.md"))?;
    let rows = rows(&readme)?;
    let row = row(&rows, &version, cpu)?;
    let mut child = Command::new(agent)
        .args(["--comm", "xtask-host-check"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {}", agent.display()))?;
    let mut report = String::new();
    if let Some(stderr) = child.stderr.take() {
        for line in BufReader::new(stderr).lines() {
            let line = line?;
            let ready = line.starts_with("agent ready");
            report.push_str(&line);
            report.push('\n');
            if ready {
                break;
            }
        }
    }
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let _ = child.wait();
    let differences = differences(row, &report);
    if !differences.is_empty() {
        bail!(
            "this host's kernel ({}) gave the agent other hooks than its README row:\n  {}\n\
             the agent's start-up report:\n{report}",
            release.trim(),
            differences.join("\n  ")
        );
    }
    println!(
        "kernel-matrix: host {} on {cpu}: hooks as in the README ({}, write stamps {})",
        release.trim(),
        row.socket_data,
        row.write_stamps
    );
    Ok(())
}

/// The family of a reported hook: `tp_btf/…`, `fexit/… + …`, `kprobes on …`.
fn family(hook: &str) -> &str {
    if hook.starts_with("kprobes ") {
        return "kprobes";
    }
    hook.split('/').next().unwrap_or(hook)
}

#[cfg(test)]
mod tests {
    use super::*;

    const README: &str = "intro\n\
        <!-- kernel-matrix: the rows between these markers are compared -->\n\
        | kernel | CPU | socket data | write stamps | tested here |\n\
        |---|---|---|---|---|\n\
        | 6.18 (CI host) | x86_64 | tp_btf | tcp_sendmsg_locked | every test |\n\
        | Debian 12 6.1 | x86_64 | fexit | at return | subset |\n\
        | Debian 12 6.1 | arm64 | kprobes | at return | smoke |\n\
        <!-- kernel-matrix: end -->\n\
        | not | a | row | here | x |\n";

    #[test]
    fn reads_the_rows_between_the_markers() {
        let rows = rows(README).expect("rows");
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0].version, "6.18");
        assert_eq!(rows[1].version, "6.1");
        assert_eq!(
            row(&rows, "6.1", "arm64").expect("row").socket_data,
            "kprobes"
        );
        assert!(row(&rows, "6.12", "x86_64").is_err());
        assert!(super::rows("no table").is_err());
    }

    #[test]
    fn the_projects_readme_has_a_row_per_matrix_kernel() {
        let readme =
            std::fs::read_to_string(crate::workspace_root().join("README.md")).expect("README.md");
        let rows = rows(&readme).expect("rows");
        for (version, cpu) in [
            ("6.18", "x86_64"),
            ("6.1", "x86_64"),
            ("6.12", "x86_64"),
            ("6.1", "arm64"),
            ("6.12", "arm64"),
        ] {
            row(&rows, version, cpu).expect("row");
        }
    }

    #[test]
    fn compares_the_reported_hooks_with_the_row() {
        let rows = rows(README).expect("rows");
        let fexit = "agent: hook: socket reads ← fexit/inet_recvmsg + fexit/inet6_recvmsg (no sock_recv_length tracepoint on this kernel)\n\
            agent: hook: socket writes ← fexit/inet_sendmsg + fexit/inet6_sendmsg + fexit/inet_sendpage (x)\n\
            agent: hook: write stamps ← at the write's return (degraded: no tcp_sendmsg_locked tracepoint)\n";
        let x86_61 = row(&rows, "6.1", "x86_64").expect("row");
        assert!(
            differences(x86_61, fexit).is_empty(),
            "{:?}",
            differences(x86_61, fexit)
        );
        // The same kernel falling back further is a failure, not a pass.
        let kprobes = fexit.replace(
            "socket reads ← fexit/inet_recvmsg + fexit/inet6_recvmsg",
            "socket reads ← kprobes on inet_recvmsg, inet6_recvmsg",
        );
        let d = differences(x86_61, &kprobes);
        assert_eq!(d.len(), 1, "{d:?}");
        assert!(d[0].contains("the agent chose kprobes"), "{d:?}");
        let host = row(&rows, "6.18", "x86_64").expect("row");
        let d = differences(host, fexit);
        assert_eq!(d.len(), 3, "{d:?}");
        assert_eq!(differences(host, "agent: error: x").len(), 3);
    }
}
