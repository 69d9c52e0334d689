#!/usr/bin/env python3
"""Checks the Helm chart without a helm binary or a cluster.

Lints it, renders it with the default values and with overrides, validates every rendered
manifest against the Kubernetes schemas, and asserts what a deployer relies on: the container
runs `serve`, the gRPC probes and the Service reach the port the server listens on, the server
settings come from the values, the Service selects the pods.

Usage: check_chart.py [CHART_DIR]   (default: helm/caption-cascade)
Exits 0 with a one-line summary, or 1 with what failed (the first failure of each value set).
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

try:
    import helm_python as helm
    import yaml
    from kubernetes_validate import utils as schemas
except ImportError as e:
    sys.exit(f"{e}: install tests/helm/requirements.txt (make test does)")

ROOT = Path(__file__).resolve().parents[2]
# A recent Kubernetes whose schemas kubernetes-validate ships; the chart's kubeVersion floor is
# validated as well, so the chart must hold on every version it claims.
KUBE_RECENT = "1.37.0"
# Readiness must follow the Cascade service's health, the one callers use.
READINESS_SERVICE = "caption.v1.Cascade"
# The server's --device choices.
DEVICES = {"auto", "cpu", "cuda"}

# (name, release, values): each renders, lints clean and passes every check below.
SCENARIOS = [
    ("defaults", "demo", None),
    (
        "overrides",
        # Helm's longest release name (53), so the object names have to be truncated.
        "a-release-name-as-long-as-helm-allows-it-to-be-abcdef",
        {
            "port": 9000,
            "gpus": 1,
            "device": "cuda",
            "models": {"blip": "/models/blip-large", "clip": "/models/clip-large"},
            "env": {
                "CAPTION_GENERATE_MAX_BATCH": 16,
                "CAPTION_METRICS_LISTEN": "0.0.0.0:9100",
                "RUST_LOG": "debug",
            },
            "service": {"port": 80},
        },
    ),
    # null drops a default in Helm; the GPU limit must still be set.
    ("no default resources", "demo", {"resources": None, "gpus": 2}),
]
# (name, values, text the render error must contain): values the chart has to refuse.
REFUSED = [
    ("env duplicates CAPTION_DEVICE", {"env": {"CAPTION_DEVICE": "cpu"}}, "use the value device"),
    ("env duplicates CAPTION_LISTEN", {"env": {"CAPTION_LISTEN": "0.0.0.0:1"}}, "use the value port"),
]

LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")  # Service names must be RFC 1035 labels


class Failed(Exception):
    pass


def expect(ok: object, message: str) -> None:
    if not ok:
        raise Failed(message)


def kube_floor(chart: helm.Chart) -> str:
    """The oldest Kubernetes the chart claims (its kubeVersion '>=X.Y...'), as 'X.Y.0'."""
    constraint = chart.metadata.get("kubeVersion", "")
    match = re.match(r"\s*>=\s*v?(\d+\.\d+)", constraint)
    expect(match, f"Chart.yaml kubeVersion {constraint!r} does not start with a '>=X.Y' floor")
    floor = f"{match.group(1)}.0"
    expect(floor in schemas.all_versions(), f"kubernetes-validate ships no schemas for the floor {floor}")
    return floor


def lint(chart_dir: Path, values: dict | None) -> list[str]:
    """Helm's lint in strict mode: no warning or error. Returns the info-level notes."""
    report = helm.lint(str(chart_dir), values, strict=True, kube_version=f"v{KUBE_RECENT}")
    bad = [f"{m['path']}: {m['error']}" for m in report["messages"] if m["severity"] >= 2]
    bad += report["errors"]
    expect(not bad, "helm lint: " + "; ".join(bad))
    return [f"{m['path']}: {m['error']}" for m in report["messages"]]


def render(chart: helm.Chart, release: str, values: dict | None) -> list[dict]:
    manifests = chart.render(values, name=release, namespace="captioning")
    return [doc for text in manifests.values() for doc in yaml.safe_load_all(text) if doc]


def validate(docs: list[dict], versions: list[str]) -> None:
    for doc in docs:
        what = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        for version in versions:
            try:
                schemas.validate(doc, version, strict=True)
            except schemas.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                raise Failed(f"{what} is invalid on Kubernetes {version}: {path}: {e.message}") from None
            except schemas.SchemaNotFoundError as e:
                raise Failed(e.message) from None


def check_names_and_labels(docs: list[dict]) -> None:
    """The API server refuses bad label values and names; the schemas don't check them."""
    for doc in docs:
        meta = doc["metadata"]
        maps = [meta.get("labels") or {}]
        if doc["kind"] == "Deployment":
            maps.append(doc["spec"]["template"]["metadata"].get("labels") or {})
            maps.append(doc["spec"]["selector"]["matchLabels"])
        if doc["kind"] == "Service":
            maps.append(doc["spec"].get("selector") or {})
        for labels in maps:
            for key, value in labels.items():
                value = str(value)
                valid = len(value) <= 63 and LABEL_VALUE.match(value)
                expect(valid, f"label {key}={value!r} is not a valid label value")
        name = meta["name"]
        expect(len(name) <= 63 and DNS_LABEL.match(name), f"name {name!r} is not a DNS label")


def check_deployer_contract(docs: list[dict], values: dict) -> None:
    """What the deployed server needs, against the values Helm actually used (`values`)."""
    by_kind: dict[str, list[dict]] = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    expect(len(by_kind.get("Deployment", [])) == 1, "expected exactly one Deployment")
    expect(len(by_kind.get("Service", [])) == 1, "expected exactly one Service")
    deployment, service = by_kind["Deployment"][0], by_kind["Service"][0]
    port = int(values["port"])

    pod = deployment["spec"]["template"]
    pod_labels = pod["metadata"].get("labels") or {}
    match_labels = deployment["spec"]["selector"]["matchLabels"]
    expect(match_labels.items() <= pod_labels.items(), "the Deployment's selector misses its own pods")

    containers = pod["spec"]["containers"]
    expect(len(containers) == 1, f"expected one container, got {len(containers)}")
    container = containers[0]
    args = container.get("args") or [None]
    expect(args[0] == "serve", f"the container does not run `serve`: args {args}")

    names = [e["name"] for e in container.get("env", [])]
    expect(len(names) == len(set(names)), f"duplicate env names: {names}")
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    listen = env.get("CAPTION_LISTEN") or ""
    host, _, listen_port = listen.rpartition(":")
    # All interfaces: the kubelet probes and the Service reach the pod on its own IP.
    expect(host in ("0.0.0.0", "[::]") and listen_port == str(port), f"CAPTION_LISTEN={listen!r}, want *:{port}")
    for name, key, want in (
        ("CAPTION_BLIP_MODEL", "models.blip", values["models"]["blip"]),
        ("CAPTION_CLIP_MODEL", "models.clip", values["models"]["clip"]),
        ("CAPTION_DEVICE", "device", values["device"]),
    ):
        expect(env.get(name) == want, f"{name}={env.get(name)!r}, want {key} {want!r}")
    expect(values["device"] in DEVICES, f"device {values['device']!r} is not one of {sorted(DEVICES)}")
    for name, value in (values.get("env") or {}).items():
        expect(env.get(name) == str(value), f"env.{name}: the container has {env.get(name)!r}, want {str(value)!r}")

    grpc_ports = [p for p in container.get("ports", []) if p.get("name") == "grpc"]
    expect(len(grpc_ports) == 1 and grpc_ports[0]["containerPort"] == port, f"ports {grpc_ports}, want grpc: {port}")
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        grpc = (container.get(kind) or {}).get("grpc")
        expect(grpc, f"{kind} is not a gRPC health probe")
        expect(grpc["port"] == port, f"{kind} probes port {grpc['port']}, the server listens on {port}")
    readiness = container["readinessProbe"]["grpc"].get("service")
    expect(readiness == READINESS_SERVICE, f"readinessProbe checks {readiness!r}, want {READINESS_SERVICE}")

    limits = (container.get("resources") or {}).get("limits") or {}
    gpus = int(values.get("gpus") or 0)
    if gpus > 0:
        expect(str(limits.get("nvidia.com/gpu")) == str(gpus), f"gpus: {gpus} but limits are {limits}")
    else:
        expect("nvidia.com/gpu" not in limits, f"gpus: 0 but limits ask for a GPU: {limits}")

    selector = service["spec"].get("selector") or {}
    expect(selector and selector.items() <= pod_labels.items(), f"Service selector {selector} misses pods {pod_labels}")
    service_ports = [p for p in service["spec"]["ports"] if p.get("name") == "grpc"]
    expect(len(service_ports) == 1, "the Service has no port named grpc")
    target = service_ports[0].get("targetPort", service_ports[0]["port"])
    if isinstance(target, str):  # a named port resolves to the container's port of that name
        target = next((p["containerPort"] for p in container.get("ports", []) if p.get("name") == target), None)
    expect(target == port, f"the Service targets port {target}, the server listens on {port}")
    exposed, want = service_ports[0]["port"], values["service"]["port"]
    expect(exposed == want, f"the Service port is {exposed}, want service.port {want}")


def main() -> int:
    chart_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "helm" / "caption-cascade"
    started = time.monotonic()
    failures: list[str] = []
    notes: set[str] = set()
    manifests = 0
    try:
        chart = helm.Chart.load(str(chart_dir))
    except helm.HelmError as e:
        print(f"helm chart check FAILED: cannot load {chart_dir}: {e}", file=sys.stderr)
        return 1
    with chart:
        try:
            versions = [kube_floor(chart), KUBE_RECENT]
        except Failed as e:
            failures.append(f"Chart.yaml: {e}")
            versions = [KUBE_RECENT]
        for name, release, overrides in SCENARIOS:
            try:
                notes.update(lint(chart_dir, overrides))
                docs = render(chart, release, overrides)
                validate(docs, versions)
                check_names_and_labels(docs)
                # The values Helm coalesces for an install: the expectations.
                check_deployer_contract(docs, chart.merge_values(overrides))
                manifests += len(docs)
            except (Failed, helm.HelmError) as e:
                failures.append(f"{name}: {e}")
        for name, overrides, reason in REFUSED:
            try:
                chart.render(overrides, name="demo")
                failures.append(f"{name}: rendered, but the chart should refuse it")
            except helm.HelmError as e:
                if reason not in str(e):
                    failures.append(f"{name}: refused, but without saying {reason!r}: {e}")

    if failures:
        print(f"helm chart check FAILED ({chart_dir}):", file=sys.stderr)
        for failure in failures:
            print(f"  - {failure}", file=sys.stderr)
        return 1
    info = f" (info: {'; '.join(sorted(notes))})" if notes else ""
    print(
        f"helm chart OK: lint clean{info}, "
        f"{len(SCENARIOS)} value sets -> {manifests} manifests valid on Kubernetes "
        f"{' and '.join(versions)} (strict schemas), {len(REFUSED)} bad value sets refused, "
        f"{time.monotonic() - started:.2f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
