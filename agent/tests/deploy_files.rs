//! The deployment files under deploy/ (compose stacks, collector and Tempo configs, Grafana
//! provisioning, Dockerfile, systemd unit) are valid and pinned. None of them can be run on a
//! development machine (no Docker engine, no systemd as PID 1), so this is what keeps them honest.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use saphyr::{LoadableYamlNode as _, ScalarOwned, YamlOwned as Yaml};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the agent crate is inside the workspace")
        .to_owned()
}

fn read(relative: &str) -> String {
    let path = repo().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(path);
        }
    }
}

/// The single YAML document of `path`, which must be a mapping.
fn load(path: &Path) -> Yaml {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut docs = Yaml::load_from_str(&text)
        .unwrap_or_else(|e| panic!("{}: not valid YAML: {e}", path.display()));
    assert_eq!(docs.len(), 1, "{}: one YAML document", path.display());
    let doc = docs.remove(0);
    assert!(doc.is_mapping(), "{}: a mapping at the top", path.display());
    doc
}

fn get<'a>(node: &'a Yaml, key: &str) -> Option<&'a Yaml> {
    node.as_mapping()?
        .iter()
        .find(|(k, _)| k.as_str() == Some(key))
        .map(|(_, v)| v)
}

fn text(node: &Yaml) -> Option<String> {
    match node {
        Yaml::Value(ScalarOwned::String(s)) => Some(s.clone()),
        Yaml::Value(ScalarOwned::Integer(i)) => Some(i.to_string()),
        _ => None,
    }
}

fn strings(node: Option<&Yaml>) -> Vec<String> {
    node.and_then(Yaml::as_vec)
        .map(|v| v.iter().filter_map(text).collect())
        .unwrap_or_default()
}

/// An image reference names a fixed version: a tag with a version number in it (not `latest`,
/// not a moving name like `bookworm-slim`, not a variable), or a sha256 digest.
fn check_pinned(image: &str) -> Result<(), String> {
    let (name, digest) = match image.split_once('@') {
        Some((name, digest)) => (name, Some(digest)),
        None => (image, None),
    };
    if let Some(digest) = digest {
        let hex = digest.strip_prefix("sha256:").unwrap_or_default();
        return if hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit()) {
            Ok(())
        } else {
            Err(format!("{image}: the digest is not sha256:<64 hex digits>"))
        };
    }
    let last = name.rsplit('/').next().unwrap_or(name);
    match last.split_once(':') {
        None => Err(format!("{image}: no tag, so it means latest")),
        Some((_, "latest")) => Err(format!("{image}: the latest tag moves")),
        Some((_, tag)) if tag.contains('$') => Err(format!("{image}: the tag is a variable")),
        Some((_, tag)) if !tag.chars().any(|c| c.is_ascii_digit()) => Err(format!(
            "{image}: the tag {tag:?} is a moving name, not a version"
        )),
        Some(_) => Ok(()),
    }
}

#[test]
fn the_pin_check_rejects_floating_images() {
    for good in [
        "grafana/tempo:2.6.1",
        "docker.io/library/debian:12.11-slim",
        "localhost:5000/agent:1.0",
        "otel/opentelemetry-collector@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
    ] {
        assert_eq!(check_pinned(good), Ok(()), "{good}");
    }
    for bad in [
        "grafana/tempo",
        "grafana/tempo:latest",
        "localhost:5000/agent",
        "debian:bookworm-slim",
        "jaegertracing/all-in-one:${JAEGER_VERSION:-1.62.0}",
        "grafana/grafana@sha256:abc",
    ] {
        assert!(check_pinned(bad).is_err(), "{bad} passed");
    }
}

#[test]
fn compose_stacks_parse_name_pinned_images_and_mount_files_that_exist() {
    let mut files = Vec::new();
    yaml_files(&repo().join("deploy/compose"), &mut files);
    let mut stacks = 0;
    for path in &files {
        let doc = load(path);
        let is_compose = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n == "compose.yaml" || n == "docker-compose.yml");
        if !is_compose {
            continue;
        }
        stacks += 1;
        let services = get(&doc, "services")
            .and_then(Yaml::as_mapping)
            .unwrap_or_else(|| panic!("{}: no services", path.display()));
        assert!(!services.is_empty(), "{}: no services", path.display());
        let dir = path.parent().expect("compose file has a directory");
        for (name, service) in services {
            let name = text(name).unwrap_or_default();
            let image = get(service, "image")
                .and_then(text)
                .unwrap_or_else(|| panic!("{}: service {name} has no image", path.display()));
            if let Err(why) = check_pinned(&image) {
                panic!("{}: service {name}: {why}", path.display());
            }
            for volume in strings(get(service, "volumes")) {
                if let Some(source) = volume.split(':').next().filter(|s| s.starts_with("./")) {
                    assert!(
                        dir.join(source).exists(),
                        "{}: service {name} mounts {source}, which does not exist",
                        path.display()
                    );
                }
            }
        }
    }
    assert!(stacks >= 2, "the Jaeger and Tempo stacks are there");
}

fn published(compose: &Yaml) -> BTreeSet<String> {
    get(compose, "services")
        .and_then(Yaml::as_mapping)
        .into_iter()
        .flatten()
        .flat_map(|(_, s)| strings(get(s, "ports")))
        .filter_map(|p| p.split(':').next().map(str::to_owned))
        .collect()
}

#[test]
fn the_stacks_publish_the_ports_the_readme_uses() {
    let jaeger = load(&repo().join("deploy/compose/jaeger/compose.yaml"));
    let tempo = load(&repo().join("deploy/compose/tempo/compose.yaml"));
    for port in ["16686", "4317", "4318"] {
        assert!(published(&jaeger).contains(port), "jaeger publishes {port}");
    }
    for port in ["3000", "4317", "4318"] {
        assert!(
            published(&tempo).contains(port),
            "tempo stack publishes {port}"
        );
    }
}

#[test]
fn the_collector_pipeline_uses_defined_components_and_reaches_tempo() {
    let dir = repo().join("deploy/compose/tempo");
    let collector = load(&dir.join("otel-collector.yaml"));
    let compose = load(&dir.join("compose.yaml"));
    let services: Vec<String> = get(&compose, "services")
        .and_then(Yaml::as_mapping)
        .into_iter()
        .flatten()
        .filter_map(|(k, _)| text(k))
        .collect();
    let pipelines = get(&collector, "service")
        .and_then(|s| get(s, "pipelines"))
        .and_then(Yaml::as_mapping)
        .expect("service.pipelines");
    let traces = pipelines
        .iter()
        .find(|(k, _)| k.as_str() == Some("traces"))
        .map(|(_, v)| v)
        .expect("a traces pipeline");
    for section in ["receivers", "processors", "exporters"] {
        let used = strings(get(traces, section));
        assert!(
            !used.is_empty() || section == "processors",
            "{section} used"
        );
        for component in used {
            assert!(
                get(&collector, section)
                    .and_then(|s| get(s, &component))
                    .is_some(),
                "the traces pipeline uses {section} {component}, which is not defined"
            );
        }
    }
    // Every exporter endpoint is a service of the same stack.
    for (_, exporter) in get(&collector, "exporters")
        .and_then(Yaml::as_mapping)
        .into_iter()
        .flatten()
    {
        if let Some(endpoint) = get(exporter, "endpoint").and_then(text) {
            let host = endpoint.split(':').next().unwrap_or_default();
            assert!(
                services.iter().any(|s| s == host),
                "exporter endpoint {endpoint}"
            );
        }
    }
    let tempo = load(&dir.join("tempo.yaml"));
    assert!(
        get(&tempo, "distributor")
            .and_then(|d| get(d, "receivers"))
            .and_then(|r| get(r, "otlp"))
            .is_some(),
        "Tempo receives OTLP"
    );
    let datasources = load(&dir.join("grafana/provisioning/datasources/tempo.yaml"));
    let list = get(&datasources, "datasources")
        .and_then(Yaml::as_vec)
        .expect("datasources");
    let tempo_source = list
        .iter()
        .find(|d| get(d, "type").and_then(text).as_deref() == Some("tempo"))
        .expect("a Tempo data source");
    let url = get(tempo_source, "url").and_then(text).expect("url");
    let http_port = get(&tempo, "server")
        .and_then(|s| get(s, "http_listen_port"))
        .and_then(text)
        .expect("server.http_listen_port");
    assert_eq!(url, format!("http://tempo:{http_port}"));
    assert!(services.iter().any(|s| s == "tempo"));
}

/// `const NAME: &str = "value";` in a Rust source file.
fn rust_const(source: &str, name: &str) -> String {
    let marker = format!("const {name}: &str = \"");
    let start = source
        .find(&marker)
        .unwrap_or_else(|| panic!("no {name} constant"))
        + marker.len();
    source[start..]
        .split('"')
        .next()
        .expect("closing quote")
        .to_owned()
}

#[test]
fn the_dockerfile_uses_the_repository_toolchains_and_pinned_images() {
    let dockerfile = read("deploy/docker/Dockerfile");
    let setup = read("xtask/src/setup.rs");
    let build = read("agent/build.rs");

    // Defaults of the ARGs declared before the first FROM (usable in FROM lines).
    let mut args = Vec::new();
    for line in dockerfile.lines().take_while(|l| !l.starts_with("FROM ")) {
        if let Some((name, value)) = line.strip_prefix("ARG ").and_then(|a| a.split_once('=')) {
            args.push((name.to_owned(), value.to_owned()));
        }
    }
    let arg = |name: &str| {
        args.iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("the Dockerfile has no ARG {name}=..."))
    };
    assert_eq!(
        arg("RUST_VERSION"),
        rust_const(&setup, "RUST_TOOLCHAIN"),
        "RUST_VERSION vs xtask's RUST_TOOLCHAIN"
    );
    assert_eq!(arg("EBPF_TOOLCHAIN"), rust_const(&setup, "EBPF_TOOLCHAIN"));
    assert_eq!(arg("EBPF_TOOLCHAIN"), rust_const(&build, "EBPF_TOOLCHAIN"));
    assert_eq!(
        arg("BPF_LINKER_VERSION"),
        rust_const(&setup, "BPF_LINKER_VERSION")
    );
    let llvm_prefix = rust_const(&setup, "LLVM_PREFIX");
    assert!(
        dockerfile.contains(&format!("LLVM_PREFIX={llvm_prefix} ")),
        "bpf-linker is built against {llvm_prefix}"
    );
    assert!(dockerfile.contains("cargo build --release --locked -p agent"));

    let mut stages = Vec::new();
    let mut images = Vec::new();
    for line in dockerfile.lines() {
        let Some(from) = line.strip_prefix("FROM ") else {
            continue;
        };
        // `--platform=...` chooses which CPU's variant of the image, not the image.
        let mut words = from
            .split_whitespace()
            .filter(|w| !w.starts_with("--platform="));
        let mut image = words.next().expect("FROM names an image").to_owned();
        for (name, value) in &args {
            image = image.replace(&format!("${{{name}}}"), value);
        }
        if let (Some("AS"), Some(stage)) = (words.next(), words.next()) {
            stages.push(stage.to_owned());
        }
        if !stages.contains(&image) {
            images.push(image);
        }
    }
    assert!(images.len() >= 2, "a builder and a runtime stage");
    for image in &images {
        if let Err(why) = check_pinned(image) {
            panic!("Dockerfile: {why}");
        }
    }
    let runtime = images.last().expect("runtime image");
    assert!(
        runtime.contains("debian:12.") || runtime.contains("bookworm"),
        "the runtime is Debian 12 like the builder: {runtime}"
    );
    assert!(
        images[0].contains("bookworm"),
        "the builder is Debian 12 like the runtime (same glibc): {}",
        images[0]
    );
}

#[test]
fn the_dockerignore_keeps_every_workspace_member() {
    let ignore = read(".dockerignore");
    let manifest = read("Cargo.toml");
    let members = manifest
        .lines()
        .find_map(|l| l.strip_prefix("members = ["))
        .expect("workspace members");
    let ignored: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_end_matches('/'))
        .collect();
    assert!(ignored.contains(&"target"), "the build output stays out");
    for member in members
        .split(',')
        .map(|m| m.trim().trim_matches(|c| c == '"' || c == ']'))
    {
        if member.is_empty() {
            continue;
        }
        assert!(
            !ignored.iter().any(|i| *i == member || *i == "*"),
            ".dockerignore drops the workspace member {member}"
        );
    }
    for file in ["Cargo.toml", "Cargo.lock"] {
        assert!(!ignored.contains(&file), ".dockerignore drops {file}");
    }
}

/// `Key=` values of the unit, in order.
fn unit_values<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .collect()
}

#[test]
fn the_systemd_unit_runs_the_agent_with_documented_minimal_capabilities() {
    let unit = read("deploy/systemd/ebpf-agent.service");
    assert_eq!(
        unit_values(&unit, "ExecStart"),
        ["/usr/local/bin/agent --config /etc/ebpf-agent/config.yaml"]
    );
    assert_eq!(unit_values(&unit, "Restart"), ["on-failure"]);
    let caps = |key: &str| -> BTreeSet<&str> {
        unit_values(&unit, key)
            .iter()
            .flat_map(|v| v.split_whitespace())
            .collect()
    };
    let bounding = caps("CapabilityBoundingSet");
    assert_eq!(bounding, caps("AmbientCapabilities"));
    for needed in [
        "CAP_BPF",
        "CAP_PERFMON",
        "CAP_NET_ADMIN",
        "CAP_SYS_PTRACE",
        "CAP_DAC_READ_SEARCH",
    ] {
        assert!(bounding.contains(needed), "{needed} is granted");
    }
    // tracefs is mounted by ExecStartPre with full privileges, so the agent runs without it.
    assert!(!bounding.contains("CAP_SYS_ADMIN"));
    assert!(
        unit_values(&unit, "ExecStartPre")
            .iter()
            .any(|v| v.starts_with('+') && v.contains("tracefs"))
    );
    for cap in &bounding {
        assert!(
            unit.lines().any(|l| l.starts_with(&format!("#  {cap} "))),
            "{cap} has no comment saying why it is granted"
        );
    }

    // systemd's own check, where systemd is installed: the unit with a stand-in binary (the
    // agent is not installed here) must load without a single warning.
    let Ok(out) = Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("systemd-analyze not installed: skipping `systemd-analyze verify`");
        return;
    };
    assert!(out.status.success());
    let dir = std::env::temp_dir().join(format!("ebpf-agent-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let copy = dir.join("ebpf-agent.service");
    std::fs::write(&copy, unit.replace("/usr/local/bin/agent", "/bin/true")).expect("write unit");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .expect("systemd-analyze verify");
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {stderr}"
    );
}
