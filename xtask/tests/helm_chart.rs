//! The Helm chart (deploy/helm/ebpf-agent) and the plain manifests (deploy/kubernetes):
//! rendered by Helm's own Go SDK, validated against the Kubernetes JSON schemas of pinned
//! Kubernetes versions, and checked for what the agent needs from the node.
//!
//! Tools (PyPI, pinned, installed by `cargo xtask setup --test-deps`): helm-python-sdk
//! (Helm's Go SDK behind a C ABI; renders offline) and kubernetes-validate (the Kubernetes
//! OpenAPI schemas as strict JSON schemas, bundled). A missing tool fails the tests.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicUsize, Ordering},
};

use serde_json::{Value, json};

const HELM_PYTHON_SDK: &str = "0.2.2";
/// The Helm release whose Go SDK helm-python-sdk 0.2.2 bundles.
const HELM_SDK: &str = "v4.2.3";
const KUBERNETES_VALIDATE: &str = "1.37.0";
/// The chart's kubeVersion floor and the newest schemas the validator bundles.
const KUBE_VERSIONS: [&str; 2] = ["1.30.0", "1.37.0"];
const INSTALL: &str = "install the chart test tools with `cargo xtask setup --test-deps` \
     (python3 -m pip install helm-python-sdk==0.2.2 kubernetes-validate==1.37.0)";
const NAMESPACE: &str = "observability";

/// The capabilities the agent gets by default, and why (the README has the same table).
const DEFAULT_CAPABILITIES: [&str; 5] = [
    "BPF",             // bpf(): load programs, create maps
    "PERFMON",         // tracepoint attachment (perf events), tracing programs
    "NET_ADMIN",       // sock_ops / sk_msg programs, cgroup attach, sockmap
    "SYS_PTRACE",      // /proc/PID/environ and /proc/PID/exe of other processes
    "DAC_READ_SEARCH", // /proc and cgroup files of other users
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is inside the workspace")
        .to_path_buf()
}

/// Runs a Python tool; a missing interpreter or module fails loudly with the install command.
fn python(args: &[&str]) -> Result<Vec<u8>, String> {
    let out = Command::new("python3")
        .args(args)
        .current_dir(root())
        .output()
        .unwrap_or_else(|e| panic!("cannot run python3 ({e}): {INSTALL}"));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if stderr.contains("No module named") {
        panic!("{stderr}\n{INSTALL}");
    }
    if out.status.success() {
        Ok(out.stdout)
    } else {
        // kubernetes-validate reports on stdout, Python errors go to stderr.
        Err(format!("{}{stderr}", String::from_utf8_lossy(&out.stdout)))
    }
}

fn render_py(args: &[&str]) -> Result<Value, String> {
    let script = root().join("xtask/tests/helm/render.py");
    let mut all = vec![script.to_str().expect("utf-8 path")];
    all.extend_from_slice(args);
    python(&all).map(|out| serde_json::from_slice(&out).expect("render.py prints JSON"))
}

struct Rendered {
    objects: Vec<Value>,
    /// Helm's text of every object, as `helm template` prints it.
    manifest: String,
    notes: String,
    /// The agent's config file from the ConfigMap, parsed.
    config: Value,
}

impl Rendered {
    fn all(&self, kind: &str) -> Vec<&Value> {
        self.objects.iter().filter(|o| o["kind"] == kind).collect()
    }

    fn one(&self, kind: &str) -> &Value {
        match self.all(kind).as_slice() {
            [o] => o,
            other => panic!("expected one {kind}, found {}", other.len()),
        }
    }

    fn kinds(&self) -> BTreeSet<&str> {
        self.objects
            .iter()
            .filter_map(|o| o["kind"].as_str())
            .collect()
    }

    fn pod(&self) -> &Value {
        &self.one("DaemonSet")["spec"]["template"]["spec"]
    }

    fn container(&self) -> &Value {
        let containers = self.pod()["containers"].as_array().expect("containers");
        assert_eq!(containers.len(), 1, "one container: the agent");
        &containers[0]
    }

    fn security(&self) -> &Value {
        &self.container()["securityContext"]
    }

    fn added_capabilities(&self) -> BTreeSet<&str> {
        strings(&self.security()["capabilities"]["add"])
    }
}

fn strings(v: &Value) -> BTreeSet<&str> {
    v.as_array()
        .map(|a| a.iter().map(|s| s.as_str().expect("a string")).collect())
        .unwrap_or_default()
}

fn render_as(values: &Value, name: &str, namespace: &str) -> Rendered {
    let out = render_py(&["render", &values.to_string(), name, namespace])
        .unwrap_or_else(|e| panic!("the chart does not render with {values}: {e}"));
    Rendered {
        objects: out["objects"].as_array().expect("objects").clone(),
        manifest: out["manifest"].as_str().expect("manifest").to_string(),
        notes: out["notes"].as_str().unwrap_or_default().to_string(),
        config: out["agent_config"].clone(),
    }
}

fn render(values: Value) -> Rendered {
    render_as(&values, "ebpf-agent", NAMESPACE)
}

/// Values the chart must refuse; returns Helm's message.
fn render_error(values: Value) -> String {
    match render_py(&["render", &values.to_string(), "ebpf-agent", NAMESPACE]) {
        Ok(_) => panic!("the chart accepted bad values {values}"),
        Err(e) => e,
    }
}

/// Validates a multi-document manifest against the strict schemas of one Kubernetes version.
fn validate(manifest: &str, kube: &str) -> Result<(), String> {
    static N: AtomicUsize = AtomicUsize::new(0);
    let path = std::env::temp_dir().join(format!(
        "ebpf-agent-chart-{}-{}.yaml",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&path, manifest).expect("write the manifest");
    let result = python(&[
        "-m",
        "kubernetes_validate",
        "--strict",
        "--quiet",
        "-k",
        kube,
        path.to_str().expect("utf-8 path"),
    ]);
    let _ = std::fs::remove_file(&path);
    result.map(drop)
}

fn validate_all_versions(r: &Rendered, what: &str) {
    assert!(!r.objects.is_empty(), "{what}: nothing rendered");
    for kube in KUBE_VERSIONS {
        if let Err(e) = validate(&r.manifest, kube) {
            panic!(
                "{what}: invalid for Kubernetes {kube}:\n{e}\n{}",
                r.manifest
            );
        }
    }
}

/// Value sets users are expected to install with; each must render to valid objects.
fn value_sets() -> Vec<(&'static str, Value)> {
    vec![
        ("defaults", json!({})),
        (
            "selection and export",
            json!({
                "otlp": {"endpoint": "http://tempo.observability:4318", "protocol": "http/protobuf"},
                "selection": {
                    "namespaces": ["shop", "payments"],
                    "podLabels": {"app": "checkout", "tier": "web"},
                    "podAnnotations": {"ebpf-agent/trace": "true"},
                    "ports": [8080, 5432],
                    "executables": ["/usr/sbin/nginx", "java"],
                    "comms": ["python*", "node"]
                },
                "captureSize": 8192,
                "dbRawQuery": true,
            }),
        ),
        (
            "export over TLS with mTLS and secret headers",
            json!({
                "otlp": {
                    "endpoint": "https://otlp.vendor.example:4317",
                    "tls": {"secretName": "otlp-tls", "certKey": "tls.crt", "keyKey": "tls.key"},
                    "headersSecret": {"name": "otlp-headers"},
                    "compression": "gzip",
                    "timeoutMillis": 5000,
                },
            }),
        ),
        (
            "switches off",
            json!({"contextPropagation": false, "inProcessLinking": false,
                   "sameHostPairing": false, "kubernetesMetadata": false}),
        ),
        ("privileged", json!({"privileged": true})),
        (
            "SYS_ADMIN added",
            json!({"securityContext": {"extraCapabilities": ["SYS_ADMIN"]}}),
        ),
        (
            "scheduling and pod",
            json!({
                "priorityClassName": "system-node-critical",
                "nodeSelector": {"kubernetes.io/os": "linux", "tracing": "on"},
                "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
                "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [{"matchExpressions": [
                        {"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]}]}]}}},
                "resources": {"requests": {"cpu": "50m", "memory": "64Mi"},
                              "limits": {"cpu": "2", "memory": "1Gi"}},
                "podAnnotations": {"example.com/team": "observability"},
                "podLabels": {"team": "observability"},
                "imagePullSecrets": [{"name": "registry"}],
                "image": {"repository": "registry.example.com/ebpf-agent", "tag": "1.2.3",
                          "pullPolicy": "Always"},
            }),
        ),
        (
            "extra args, env and config",
            json!({
                "extraArgs": ["--max-trace-age", "120"],
                "extraEnv": [
                    {"name": "RUST_LOG", "value": "debug"},
                    {"name": "OTEL_EXPORTER_OTLP_ENDPOINT",
                     "valueFrom": {"configMapKeyRef": {"name": "otel", "key": "endpoint"}}}
                ],
                "extraConfig": {"max_spans_per_trace": 500, "stats_interval": 10},
            }),
        ),
        ("metrics off", json!({"metrics": {"enabled": false}})),
        (
            "metrics on another port, probes tuned",
            json!({
                "metrics": {"port": 9100, "scrapeAnnotations": false},
                "livenessProbe": {"initialDelaySeconds": 20, "failureThreshold": 5},
                "readinessProbe": {"enabled": false},
            }),
        ),
        (
            "existing service account, no RBAC, unconfined profiles off",
            json!({
                "serviceAccount": {"create": false, "name": "node-agents"},
                "rbac": {"create": false},
                "fullnameOverride": "tracer",
                "securityContext": {"seccompProfile": {"type": "RuntimeDefault"},
                                    "appArmorProfile": null},
            }),
        ),
    ]
}

#[test]
fn tools_are_the_pinned_versions() {
    let v = render_py(&["versions"]).expect("render.py versions");
    let msg = format!("{v}: {INSTALL}");
    assert_eq!(v["helm_python_sdk"], HELM_PYTHON_SDK, "{msg}");
    assert_eq!(v["helm_sdk"], HELM_SDK, "{msg}");
    assert_eq!(v["kubernetes_validate"], KUBERNETES_VALIDATE, "{msg}");
    // setup.rs installs exactly these versions.
    let setup = std::fs::read_to_string(root().join("xtask/src/setup.rs")).expect("setup.rs");
    for pin in [HELM_PYTHON_SDK, KUBERNETES_VALIDATE] {
        assert!(
            setup.contains(&format!("\"{pin}\"")),
            "setup.rs must pin {pin}"
        );
    }
}

#[test]
fn every_value_set_renders_valid_objects() {
    for (what, values) in value_sets() {
        let r = render(values);
        validate_all_versions(&r, what);
        assert!(
            r.kinds().contains("DaemonSet") && r.kinds().contains("ConfigMap"),
            "{what}"
        );
    }
}

#[test]
fn default_rendering_is_the_expected_objects() {
    let r = render(json!({}));
    let kinds: Vec<&str> = r.kinds().into_iter().collect();
    assert_eq!(
        kinds,
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "DaemonSet",
            "ServiceAccount"
        ]
    );
    assert_eq!(r.objects.len(), 5, "one object of each kind");
    for o in &r.objects {
        if !o["kind"]
            .as_str()
            .unwrap_or_default()
            .starts_with("Cluster")
        {
            assert_eq!(o["metadata"]["namespace"], NAMESPACE, "{}", o["kind"]);
        }
    }
    // The DaemonSet's selector must select its own pods.
    let ds = r.one("DaemonSet");
    let pod_labels = ds["spec"]["template"]["metadata"]["labels"]
        .as_object()
        .unwrap();
    for (k, v) in ds["spec"]["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(pod_labels.get(k), Some(v), "selector label {k}");
    }
}

#[test]
fn validator_rejects_what_the_api_server_would() {
    // Checks that validation is real: a valid rendering passes, damaged ones do not.
    let r = render(json!({}));
    validate(&r.manifest, KUBE_VERSIONS[1]).expect("the default rendering is valid");
    for (from, to) in [
        ("hostPID: true", "hostPID: \"yes\""),
        (
            "readOnlyRootFilesystem: true",
            "readOnlyRootFilesystm: true",
        ),
        ("mountPath: /sys/fs/cgroup", "mountPaths: /sys/fs/cgroup"),
    ] {
        assert!(r.manifest.contains(from), "{from} is in the rendering");
        let damaged = r.manifest.replace(from, to);
        assert!(
            validate(&damaged, KUBE_VERSIONS[1]).is_err(),
            "the validator accepted {to}"
        );
    }
    // appArmorProfile is a field since 1.30: the chart's kubeVersion floor.
    let err = validate(&r.manifest, "1.29.0").expect_err("1.29 has no appArmorProfile field");
    assert!(err.contains("appArmorProfile"), "{err}");
    let chart = std::fs::read_to_string(root().join("deploy/helm/ebpf-agent/Chart.yaml")).unwrap();
    assert!(chart.contains("kubeVersion: \">=1.30.0-0\""), "{chart}");
}

#[test]
fn helm_lint_is_clean() {
    for kube in KUBE_VERSIONS {
        let report = render_py(&["lint", "{}", &format!("v{kube}")]).expect("helm lint runs");
        assert_eq!(report["errors"], json!([]), "{report}");
        // Severity 2 is a warning, 3 an error; 1 (info, e.g. "icon is recommended") is fine.
        let bad: Vec<&Value> = report["messages"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["severity"].as_i64().unwrap_or(3) >= 2)
            .collect();
        assert!(bad.is_empty(), "helm lint --strict: {bad:?}");
    }
}

#[test]
fn bad_values_are_refused_naming_the_key() {
    for (values, key) in [
        (json!({"otlp": {"protocol": "json"}}), "/otlp/protocol"),
        (json!({"captureSize": 10}), "/captureSize"),
        (json!({"captureSize": 100000}), "/captureSize"),
        (json!({"selection": {"namespace": ["shop"]}}), "namespace"),
        (json!({"selection": {"ports": [0]}}), "/selection/ports"),
        (json!({"contextPropogation": false}), "contextPropogation"),
        (json!({"privileged": "yes"}), "/privileged"),
        (json!({"metrics": {"port": 0}}), "/metrics/port"),
        (json!({"metrics": {"enable": true}}), "enable"),
        (
            json!({"livenessProbe": {"periodSeconds": 0}}),
            "/livenessProbe/periodSeconds",
        ),
    ] {
        let err = render_error(values.clone());
        assert!(err.contains(key), "{values}: {err}");
    }
}

#[test]
fn default_privileges_are_the_documented_capabilities() {
    let r = render(json!({}));
    let pod = r.pod();
    assert_eq!(pod["hostPID"], true, "the host's /proc");
    assert!(pod["hostNetwork"].is_null(), "no host network");
    let sc = r.security();
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(
        strings(&sc["capabilities"]["drop"]),
        BTreeSet::from(["ALL"])
    );
    assert_eq!(
        r.added_capabilities(),
        BTreeSet::from(DEFAULT_CAPABILITIES),
        "exactly the documented capabilities"
    );
    assert_eq!(
        sc["seccompProfile"]["type"], "Unconfined",
        "bpf() and perf_event_open()"
    );
    assert_eq!(
        sc["appArmorProfile"]["type"], "Unconfined",
        "ptrace read of host /proc"
    );
    assert_eq!(sc["runAsUser"], 0, "the agent checks for uid 0");
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    // Every capability is explained in the README and in values.yaml.
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let values =
        std::fs::read_to_string(root().join("deploy/helm/ebpf-agent/values.yaml")).unwrap();
    for cap in DEFAULT_CAPABILITIES.iter().chain(&["SYS_ADMIN"]) {
        assert!(
            readme.contains(&format!("`CAP_{cap}`")),
            "README explains CAP_{cap}"
        );
        assert!(
            values.contains(&format!("{cap} ")) || values.contains(&format!("[{cap}]")),
            "values.yaml: {cap}"
        );
    }
    assert!(!r.notes.contains("WARNING"), "{}", r.notes);
}

#[test]
fn privileged_is_an_explicit_opt_in() {
    let r = render(json!({"privileged": true}));
    let sc = r.security();
    assert_eq!(sc["privileged"], true);
    // The API server refuses privileged together with allowPrivilegeEscalation=false.
    assert!(sc["allowPrivilegeEscalation"].is_null(), "{sc}");
    assert!(
        sc["capabilities"].is_null(),
        "privileged has every capability: {sc}"
    );
    assert!(r.notes.contains("WARNING: privileged=true"), "{}", r.notes);
    // Anything else than `true` keeps the capability list.
    assert_eq!(
        render(json!({"privileged": false})).security()["privileged"],
        false
    );
}

#[test]
fn sys_admin_is_added_only_on_request() {
    let r = render(json!({}));
    assert!(!r.added_capabilities().contains("SYS_ADMIN"));
    let r = render(json!({"securityContext": {"extraCapabilities": ["SYS_ADMIN", "BPF"]}}));
    let caps = r.added_capabilities();
    assert!(caps.contains("SYS_ADMIN") && caps.is_superset(&BTreeSet::from(DEFAULT_CAPABILITIES)));
    let listed = r.security()["capabilities"]["add"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(listed, caps.len(), "no capability listed twice");
    // The API server refuses SYS_ADMIN together with allowPrivilegeEscalation=false.
    assert!(r.security()["allowPrivilegeEscalation"].is_null());
    assert_eq!(r.security()["privileged"], false);
}

#[test]
fn host_paths_are_mounted_where_the_agent_looks() {
    let r = render(json!({}));
    let pod = r.pod();
    let host_path = |volume: &str| {
        pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == volume)
            .map(|v| v["hostPath"]["path"].as_str().unwrap_or_default())
    };
    let mounts = r.container()["volumeMounts"].as_array().unwrap();
    // The agent opens these paths inside its container: same path as on the host.
    for path in ["/sys/kernel/tracing", "/sys/fs/cgroup", "/sys/kernel/btf"] {
        let m = mounts
            .iter()
            .find(|m| m["mountPath"] == path)
            .unwrap_or_else(|| panic!("{path} is not mounted"));
        let volume = m["name"].as_str().unwrap();
        assert_eq!(host_path(volume), Some(path), "{path} comes from the host");
        assert_eq!(m["readOnly"], true, "{path} read-only");
    }
    // The host may mount tracefs after the pod starts.
    let tracefs = mounts
        .iter()
        .find(|m| m["mountPath"] == "/sys/kernel/tracing")
        .unwrap();
    assert_eq!(tracefs["mountPropagation"], "HostToContainer");
    // The one-agent-per-host lock: the host's directory, writable (the agent takes an flock
    // there), created if missing.
    let lock = mounts
        .iter()
        .find(|m| m["mountPath"] == "/run/ebpf-agent")
        .expect("/run/ebpf-agent is mounted");
    let lock_volume = lock["name"].as_str().unwrap();
    assert_eq!(host_path(lock_volume), Some("/run/ebpf-agent"));
    assert_ne!(lock["readOnly"], true, "the lock directory is writable");
    let lock_type = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == lock_volume)
        .map(|v| v["hostPath"]["type"].clone());
    assert_eq!(lock_type, Some(json!("DirectoryOrCreate")));
    // Nothing else of the host: no /proc (hostPID gives the host's), no root filesystem.
    let host_volumes = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| !v["hostPath"].is_null())
        .count();
    assert_eq!(host_volumes, 4);

    // The config file: the ConfigMap's key, mounted where --config points.
    let cm = r.one("ConfigMap");
    let config_volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["configMap"]["name"] == cm["metadata"]["name"])
        .expect("the ConfigMap is a volume");
    let mount = mounts
        .iter()
        .find(|m| m["name"] == config_volume["name"])
        .expect("the config volume is mounted");
    let args = r.container()["args"].as_array().unwrap();
    let at = args.iter().position(|a| a == "--config").expect("--config");
    let path = args[at + 1].as_str().unwrap();
    let key = cm["data"].as_object().unwrap().keys().next().unwrap();
    assert_eq!(
        path,
        format!("{}/{key}", mount["mountPath"].as_str().unwrap())
    );
    assert_eq!(r.container()["command"], json!(["/usr/local/bin/agent"]));
}

#[test]
fn node_name_comes_from_the_downward_api() {
    let r = render(json!({"extraEnv": [{"name": "RUST_LOG", "value": "debug"}]}));
    let env = r.container()["env"].as_array().unwrap();
    let node = env
        .iter()
        .find(|e| e["name"] == "EBPF_AGENT_K8S_NODE_NAME")
        .expect("EBPF_AGENT_K8S_NODE_NAME");
    assert_eq!(node["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName");
    assert!(
        env.iter()
            .any(|e| e["name"] == "RUST_LOG" && e["value"] == "debug")
    );
}

#[test]
fn rbac_is_read_only_access_to_pods() {
    let r = render(json!({}));
    let role = r.one("ClusterRole");
    assert_eq!(
        role["rules"],
        json!([{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]),
        "pods get/list/watch and nothing else"
    );
    let binding = r.one("ClusterRoleBinding");
    assert_eq!(binding["roleRef"]["kind"], "ClusterRole");
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    let sa = r.one("ServiceAccount");
    assert_eq!(
        binding["subjects"],
        json!([{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": NAMESPACE}])
    );
    assert_eq!(r.pod()["serviceAccountName"], sa["metadata"]["name"]);

    let r = render(
        json!({"rbac": {"create": false}, "serviceAccount": {"create": false, "name": "node-agents"}}),
    );
    assert!(r.all("ClusterRole").is_empty() && r.all("ClusterRoleBinding").is_empty());
    assert!(r.all("ServiceAccount").is_empty());
    assert_eq!(r.pod()["serviceAccountName"], "node-agents");
}

#[test]
fn default_config_traces_everything_to_the_log() {
    let r = render(json!({}));
    let c = &r.config;
    assert!(
        c["otlp_endpoint"].is_null(),
        "no endpoint: spans in the pod log"
    );
    assert_eq!(c["otlp_protocol"], "grpc");
    for key in [
        "k8s_namespace",
        "k8s_pod_label",
        "k8s_pod_annotation",
        "port",
        "exe",
        "comm",
    ] {
        assert!(
            c[key].is_null(),
            "no selection by default: {key} = {}",
            c[key]
        );
    }
    // Quoted: an unquoted on/off is a boolean in YAML 1.1.
    for key in [
        "context_propagation",
        "in_process_linking",
        "same_host_pairing",
        "kubernetes",
    ] {
        assert_eq!(c[key], "on", "{key}");
    }
    assert!(
        c["capture_size"].is_null(),
        "the agent's default capture size"
    );
    assert_eq!(c["db_raw_query"], false, "SQL literals redacted by default");
    assert!(r.notes.contains("No OTLP endpoint"), "{}", r.notes);
}

#[test]
fn values_reach_the_agent_config() {
    let (_, values) = value_sets().remove(1);
    let r = render(values);
    let c = &r.config;
    assert_eq!(c["otlp_endpoint"], "http://tempo.observability:4318");
    assert_eq!(c["otlp_protocol"], "http/protobuf");
    assert_eq!(c["k8s_namespace"], json!(["shop", "payments"]));
    assert_eq!(c["k8s_pod_label"], json!(["app=checkout", "tier=web"]));
    assert_eq!(c["k8s_pod_annotation"], json!(["ebpf-agent/trace=true"]));
    assert_eq!(c["port"], json!([8080, 5432]));
    assert_eq!(c["exe"], json!(["/usr/sbin/nginx", "java"]));
    assert_eq!(c["comm"], json!(["python*", "node"]));
    assert_eq!(c["capture_size"], 8192);
    assert_eq!(c["db_raw_query"], true);
    assert!(
        r.notes.contains("http://tempo.observability:4318"),
        "{}",
        r.notes
    );

    let r = render(
        json!({"contextPropagation": false, "inProcessLinking": false,
                          "sameHostPairing": false, "kubernetesMetadata": false}),
    );
    for key in [
        "context_propagation",
        "in_process_linking",
        "same_host_pairing",
        "kubernetes",
    ] {
        assert_eq!(r.config[key], "off", "{key}");
    }

    let r = render(
        json!({"extraConfig": {"max_trace_age": 120, "stats_interval": 5},
                          "extraArgs": ["--comm", "nginx"]}),
    );
    assert_eq!(r.config["max_trace_age"], 120);
    assert_eq!(r.config["stats_interval"], 5, "extraConfig wins");
    let args = &r.container()["args"];
    assert_eq!(
        args,
        &json!(["--config", "/etc/ebpf-agent/config.yaml", "--comm", "nginx"])
    );
}

#[test]
fn tls_and_headers_reach_the_agent_without_secrets_in_the_config_map() {
    let (_, values) = value_sets().remove(2);
    let r = render(values);
    let c = &r.config;
    assert_eq!(c["otlp_endpoint"], "https://otlp.vendor.example:4317");
    assert_eq!(c["otlp_certificate"], "/etc/ebpf-agent-tls/ca.crt");
    assert_eq!(c["otlp_client_certificate"], "/etc/ebpf-agent-tls/tls.crt");
    assert_eq!(c["otlp_client_key"], "/etc/ebpf-agent-tls/tls.key");
    assert_eq!(c["otlp_compression"], "gzip");
    assert_eq!(c["otlp_timeout"], 5000);
    assert!(c["otlp_header"].is_null(), "headers come from the Secret");
    // The Secret is mounted read-only where the config points, beside the ConfigMap.
    let mounts = r.container()["volumeMounts"].as_array().expect("mounts");
    let tls = mounts
        .iter()
        .find(|m| m["name"] == "otlp-tls")
        .expect("the TLS Secret is mounted");
    assert_eq!(tls["mountPath"], "/etc/ebpf-agent-tls");
    assert_eq!(tls["readOnly"], true);
    let volumes = r.pod()["volumes"].as_array().expect("volumes");
    assert!(
        volumes
            .iter()
            .any(|v| v["name"] == "otlp-tls" && v["secret"]["secretName"] == "otlp-tls"),
        "{volumes:?}"
    );
    let env = r.container()["env"].as_array().expect("env");
    let headers = env
        .iter()
        .find(|e| e["name"] == "OTEL_EXPORTER_OTLP_HEADERS")
        .expect("headers from the Secret");
    assert_eq!(
        headers["valueFrom"]["secretKeyRef"],
        json!({"name": "otlp-headers", "key": "headers"})
    );
    assert!(
        r.notes.contains("TLS files from Secret otlp-tls"),
        "{}",
        r.notes
    );

    // Plain headers go to the config file, CA only without a client certificate.
    let r = render(json!({"otlp": {"endpoint": "https://c:4318",
                                    "headers": {"x-scope-orgid": "tenant-1"},
                                    "tls": {"secretName": "ca-only"}}}));
    assert_eq!(
        r.config["otlp_header"],
        json!({"x-scope-orgid": "tenant-1"})
    );
    assert_eq!(r.config["otlp_certificate"], "/etc/ebpf-agent-tls/ca.crt");
    assert!(r.config["otlp_client_certificate"].is_null());
    assert!(
        !r.container()["env"]
            .to_string()
            .contains("OTEL_EXPORTER_OTLP_HEADERS")
    );

    // Without a Secret, no mount and no certificate setting: the public roots.
    let r = render(json!({"otlp": {"endpoint": "https://c:4317"}}));
    assert!(r.config["otlp_certificate"].is_null());
    assert!(!r.manifest.contains("otlp-tls"));
}

#[test]
fn contradictory_tls_and_header_values_are_refused() {
    let err = render_error(json!({"otlp": {"headers": {"a": "1"},
                                          "headersSecret": {"name": "s"}}}));
    assert!(err.contains("exclusive"), "{err}");
    let err = render_error(json!({"otlp": {"tls": {"secretName": "s", "certKey": "tls.crt"}}}));
    assert!(err.contains("go together"), "{err}");
    for (values, key) in [
        (
            json!({"otlp": {"compression": "zstd"}}),
            "/otlp/compression",
        ),
        (json!({"otlp": {"timeoutMillis": 0}}), "/otlp/timeoutMillis"),
        (json!({"otlp": {"tls": {"secret": "s"}}}), "secret"),
    ] {
        let err = render_error(values.clone());
        assert!(err.contains(key), "{values}: {err}");
    }
}

#[test]
fn config_changes_roll_the_pods() {
    let checksum = |v: Value| {
        render(v).one("DaemonSet")["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
            .as_str()
            .expect("checksum/config")
            .to_string()
    };
    let base = checksum(json!({}));
    assert_eq!(
        base,
        checksum(json!({"priorityClassName": "x"})),
        "same config"
    );
    assert_ne!(
        base,
        checksum(json!({"otlp": {"endpoint": "http://c:4317"}}))
    );
}

#[test]
fn scheduling_defaults_reach_every_node() {
    let r = render(json!({}));
    let pod = r.pod();
    assert_eq!(
        pod["tolerations"],
        json!([{"operator": "Exists"}]),
        "every taint tolerated"
    );
    assert_eq!(pod["nodeSelector"], json!({"kubernetes.io/os": "linux"}));
    assert!(pod["priorityClassName"].is_null());
    let res = &r.container()["resources"];
    assert!(res["requests"]["cpu"].is_string() && res["requests"]["memory"].is_string());
    assert!(res["limits"]["memory"].is_string(), "memory is bounded");
    assert!(
        res["limits"]["cpu"].is_null(),
        "no CPU throttling by default"
    );
    let r = render(json!({"priorityClassName": "system-node-critical"}));
    assert_eq!(r.pod()["priorityClassName"], "system-node-critical");
}

/// The paths the agent's metrics responder answers (agent/src/metrics/health.rs routes).
fn agent_routes() -> BTreeSet<String> {
    let source = std::fs::read_to_string(root().join("agent/src/metrics/health.rs"))
        .expect("agent/src/metrics/health.rs");
    source
        .lines()
        .filter_map(|l| l.trim().strip_prefix('"')?.split_once("\" =>"))
        .map(|(path, _)| path.to_string())
        .collect()
}

#[test]
fn probes_and_scrape_port_reach_the_agent_metrics_address() {
    let routes = agent_routes();
    assert_eq!(
        routes,
        BTreeSet::from(["/metrics", "/healthz", "/readyz"].map(String::from)),
        "the agent's routes"
    );
    // Defaults: metrics on, both probes on the named port, where the agent listens.
    let r = render(json!({}));
    assert_eq!(r.config["metrics_address"], "0.0.0.0:9464");
    let c = r.container();
    assert_eq!(
        c["ports"],
        json!([{"name": "metrics", "containerPort": 9464, "protocol": "TCP"}])
    );
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &c[probe]["httpGet"];
        assert_eq!(get["port"], "metrics", "{probe}");
        assert_eq!(get["path"], path, "{probe}");
        assert!(routes.contains(path), "{probe}: the agent serves {path}");
        // Liveness fails after 30 s without progress: the kubelet's patience must exceed it.
        let period = c[probe]["periodSeconds"].as_i64().expect("periodSeconds");
        let failures = c[probe]["failureThreshold"]
            .as_i64()
            .expect("failureThreshold");
        assert!(period * failures >= 30, "{probe}: {period} s x {failures}");
    }
    let annotations = &r.one("DaemonSet")["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], "9464");
    assert_eq!(annotations["prometheus.io/path"], "/metrics");
    assert!(r.notes.contains("/metrics"), "{}", r.notes);

    // Another port: the agent, the container port and the annotations move together.
    let (_, tuned) = value_sets()
        .into_iter()
        .find(|(what, _)| what.starts_with("metrics on another port"))
        .expect("value set");
    let r = render(tuned);
    assert_eq!(r.config["metrics_address"], "0.0.0.0:9100");
    let c = r.container();
    assert_eq!(c["ports"][0]["containerPort"], 9100);
    assert_eq!(c["livenessProbe"]["initialDelaySeconds"], 20);
    assert_eq!(c["livenessProbe"]["failureThreshold"], 5);
    assert!(c["readinessProbe"].is_null(), "readiness probe off");
    let annotations = &r.one("DaemonSet")["spec"]["template"]["metadata"]["annotations"];
    assert!(
        annotations["prometheus.io/scrape"].is_null(),
        "{annotations}"
    );

    // Off: nothing served, so no port and no probe that would fail.
    let r = render(json!({"metrics": {"enabled": false}}));
    assert!(r.config["metrics_address"].is_null());
    let c = r.container();
    for key in ["ports", "livenessProbe", "readinessProbe"] {
        assert!(c[key].is_null(), "{key} without metrics: {}", c[key]);
    }
    assert!(!r.manifest.contains("prometheus.io"));
}

/// Long flags the agent accepts, from agent/src/cli.rs (`--name` as `name`).
fn agent_flags() -> BTreeSet<String> {
    let cli = std::fs::read_to_string(root().join("agent/src/cli.rs")).expect("agent/src/cli.rs");
    let mut flags = BTreeSet::new();
    let mut pending: Option<Option<String>> = None; // saw `#[arg(long..`: explicit name?
    let mut attr = String::new();
    for line in cli.lines().map(str::trim) {
        if line.starts_with("#[arg(") || !attr.is_empty() {
            attr.push_str(line);
            if !attr.ends_with(")]") {
                continue;
            }
            let body = std::mem::take(&mut attr);
            let has_long = body
                .split(|c: char| !c.is_alphanumeric() && c != '_')
                .any(|w| w == "long");
            if has_long {
                let explicit = body
                    .split_once("long = \"")
                    .and_then(|(_, rest)| rest.split_once('"'))
                    .map(|(name, _)| name.to_string());
                pending = Some(explicit);
            }
        } else if let Some(explicit) = pending.take() {
            let field = line
                .strip_prefix("pub ")
                .and_then(|l| l.split_once(':'))
                .map(|(f, _)| f.trim().replace('_', "-"));
            match (explicit, field) {
                (Some(name), _) | (None, Some(name)) => {
                    flags.insert(name);
                }
                (None, None) => pending = Some(None),
            }
        }
    }
    flags
}

#[test]
fn config_keys_are_agent_flags() {
    let flags = agent_flags();
    assert!(
        flags.contains("otlp-endpoint") && flags.contains("comm"),
        "{flags:?}"
    );
    let (_, full) = value_sets().remove(1);
    let (_, tls) = value_sets().remove(2);
    let headers = json!({"otlp": {"headers": {"x-tenant": "t"}}});
    for r in [
        render(json!({})),
        render(full),
        render(tls),
        render(headers),
    ] {
        for key in r.config.as_object().expect("a YAML mapping").keys() {
            let flag = key.replace('_', "-");
            assert!(
                flags.contains(&flag),
                "config key {key}: the agent has no --{flag} ({flags:?})"
            );
        }
    }
}

#[test]
fn plain_manifests_are_the_chart_default_rendering() {
    let dir = root().join("deploy/kubernetes");
    let regenerate = "regenerate with `python3 xtask/tests/helm/render.py plain deploy/kubernetes`";
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("deploy/kubernetes")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let paths: Vec<&str> = files.iter().map(|p| p.to_str().unwrap()).collect();
    let mut load = vec!["load"];
    load.extend(&paths);
    let checked_in = render_py(&load).expect("the plain manifests parse");
    let checked_in = checked_in.as_array().unwrap();

    // What they must be: the chart's default rendering, without Helm's own labels, plus the
    // namespace.
    let mut expected = render_as(&json!({}), "ebpf-agent", "ebpf-agent").objects;
    for o in &mut expected {
        strip_helm_labels(o);
    }
    assert_eq!(
        checked_in[0]["kind"], "Namespace",
        "the namespace first: {regenerate}"
    );
    assert_eq!(checked_in[0]["metadata"]["name"], "ebpf-agent");
    assert_eq!(
        checked_in[0]["metadata"]["labels"]["pod-security.kubernetes.io/enforce"], "privileged",
        "the agent's pod needs host access"
    );
    assert_eq!(checked_in.len(), expected.len() + 1, "{regenerate}");
    for (have, want) in checked_in[1..].iter().zip(&expected) {
        assert_eq!(
            have, want,
            "deploy/kubernetes: {}: {regenerate}",
            want["kind"]
        );
    }
    for o in checked_in {
        let labels = o["metadata"]["labels"].to_string();
        assert!(
            !labels.contains("managed-by") && !labels.contains("helm.sh/chart"),
            "{labels}"
        );
    }
    // Valid objects, and the very text the generator writes (comments included).
    let text: String = paths
        .iter()
        .map(|p| format!("---\n{}", std::fs::read_to_string(p).unwrap()))
        .collect();
    for kube in KUBE_VERSIONS {
        validate(&text, kube).unwrap_or_else(|e| panic!("deploy/kubernetes for {kube}: {e}"));
    }
    let fresh = std::env::temp_dir().join(format!("ebpf-agent-plain-{}", std::process::id()));
    render_py(&["plain", fresh.to_str().unwrap()]).expect("generate");
    for p in &files {
        let name = p.file_name().unwrap();
        let want = std::fs::read_to_string(fresh.join(name)).unwrap_or_default();
        assert_eq!(
            std::fs::read_to_string(p).unwrap(),
            want,
            "{name:?}: {regenerate}"
        );
    }
    let generated = std::fs::read_dir(&fresh).unwrap().count();
    let _ = std::fs::remove_dir_all(&fresh);
    assert_eq!(generated, files.len(), "{regenerate}");
}

fn strip_helm_labels(v: &mut Value) {
    match v {
        Value::Object(map) => {
            if let Some(Value::Object(labels)) = map.get_mut("labels") {
                labels.remove("helm.sh/chart");
                labels.remove("app.kubernetes.io/managed-by");
            }
            map.values_mut().for_each(strip_helm_labels);
        }
        Value::Array(items) => items.iter_mut().for_each(strip_helm_labels),
        _ => {}
    }
}
