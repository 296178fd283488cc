#!/usr/bin/env python3
"""Renders the ebpf-agent chart with Helm's own Go SDK (helm-python-sdk, offline) for the
chart tests in xtask/tests/helm_chart.rs, and generates deploy/kubernetes/ from it.

  render.py versions                         tool versions, as JSON
  render.py render VALUES_JSON NAME NAMESPACE   rendered chart, as JSON (see render())
  render.py lint VALUES_JSON KUBE_VERSION    `helm lint --strict`, as JSON
  render.py load FILE...                     YAML documents of files, as a JSON list
  render.py plain DIR                        write the plain manifests into DIR
"""

import json
import os
import re
import sys

INSTALL = (
    "install the chart test tools with `cargo xtask setup --test-deps` "
    "(pip install helm-python-sdk==0.2.2 kubernetes-validate==1.37.0)"
)

try:
    import helm_python
    import kubernetes_validate
    import yaml
except ImportError as err:
    sys.exit(f"render.py: {err}: {INSTALL}")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
CHART = os.path.join(ROOT, "deploy", "helm", "ebpf-agent")

# The release the plain manifests are rendered as.
PLAIN_NAME = "ebpf-agent"
PLAIN_NAMESPACE = "ebpf-agent"
# Helm-only labels left out of the plain manifests (nothing manages them there).
HELM_LABEL = re.compile(r"^\s*(helm\.sh/chart: .*|app\.kubernetes\.io/managed-by: Helm)\n", re.M)
# Files of the plain manifests, in apply order (`kubectl apply -f DIR` goes by name).
PLAIN_FILES = [
    ("00-namespace.yaml", None),
    ("01-serviceaccount.yaml", "serviceaccount.yaml"),
    ("02-clusterrole.yaml", "clusterrole.yaml"),
    ("03-clusterrolebinding.yaml", "clusterrolebinding.yaml"),
    ("04-configmap.yaml", "configmap.yaml"),
    ("05-daemonset.yaml", "daemonset.yaml"),
]
# Helm's install order for the kinds this chart has.
KIND_ORDER = ["Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet"]


def manifests(values, name, namespace):
    """Template file name -> rendered text, as `helm template` renders them."""
    with helm_python.Chart.load(CHART) as chart:
        chart.validate_schema(values)
        out = chart.render(values, name=name, namespace=namespace, is_install=True)
    return {path.split("/templates/", 1)[-1]: text for path, text in out.items()}


def render(values, name, namespace):
    files = manifests(values, name, namespace)
    notes = files.pop("NOTES.txt", "")
    rank = lambda o: KIND_ORDER.index(o["kind"]) if o["kind"] in KIND_ORDER else len(KIND_ORDER)
    docs = []  # (object, Helm's text of its template)
    for path in sorted(files):
        for doc in yaml.safe_load_all(files[path]):
            if doc is not None:
                docs.append((doc, files[path]))
    docs.sort(key=lambda d: rank(d[0]))
    objects = [o for o, _ in docs]
    # Helm's own text, in install order, as `helm template` prints it.
    manifest = "".join(f"---\n{text.strip()}\n" for text in dict.fromkeys(t for _, t in docs))
    config = None
    for o in objects:
        if o["kind"] == "ConfigMap":
            # Parsed as YAML 1.1 (PyYAML): an unquoted on/off would come out as a boolean.
            config = yaml.safe_load(o["data"]["config.yaml"])
    return {"objects": objects, "manifest": manifest, "notes": notes, "agent_config": config}


def namespace_manifest():
    return (
        "apiVersion: v1\n"
        "kind: Namespace\n"
        "metadata:\n"
        f"  name: {PLAIN_NAMESPACE}\n"
        "  labels:\n"
        f"    app.kubernetes.io/name: {PLAIN_NAME}\n"
        # The agent needs host access: the namespace must allow privileged pods.
        "    pod-security.kubernetes.io/enforce: privileged\n"
    )


def plain(out_dir):
    files = manifests({}, PLAIN_NAME, PLAIN_NAMESPACE)
    header = (
        "# Generated from deploy/helm/ebpf-agent (default values, release and namespace "
        f"{PLAIN_NAME}) by\n# `python3 xtask/tests/helm/render.py plain deploy/kubernetes`; "
        "do not edit: change the chart and regenerate.\n"
    )
    os.makedirs(out_dir, exist_ok=True)
    for target, template in PLAIN_FILES:
        text = namespace_manifest() if template is None else HELM_LABEL.sub("", files[template])
        with open(os.path.join(out_dir, target), "w") as f:
            f.write(header + text.lstrip("-\n"))


def main(argv):
    cmd, args = argv[0], argv[1:]
    if cmd == "versions":
        result = {
            "helm_python_sdk": helm_python.__version__,
            "helm_sdk": helm_python.helm_sdk_version(),
            "kubernetes_validate": kubernetes_validate.version.__version__,
        }
    elif cmd == "render":
        result = render(json.loads(args[0]), args[1], args[2])
    elif cmd == "lint":
        result = helm_python.lint(CHART, json.loads(args[0]), strict=True, kube_version=args[1])
    elif cmd == "load":
        result = []
        for path in args:
            with open(path) as f:
                result.extend(d for d in yaml.safe_load_all(f) if d is not None)
    elif cmd == "plain":
        plain(args[0])
        result = {"written": [t for t, _ in PLAIN_FILES]}
    else:
        sys.exit(__doc__)
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    try:
        main(sys.argv[1:] or ["help"])
    except helm_python.HelmError as err:
        sys.exit(f"render.py: helm: {err}")
