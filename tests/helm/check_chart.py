#!/usr/bin/env python3
"""Checks the Helm chart without a helm binary or a cluster.

Lints it, renders it with the default values and with overrides, in both topologies (combined:
one Deployment serves every service; split: generator, ranker and cascade Deployments), validates
every rendered manifest against the Kubernetes schemas (the ServiceMonitor, a CRD the schemas do
not have, is checked field by field), and asserts what a deployer relies on: each container runs
`serve` with the services and models of its part, the gRPC probes reach the plaintext health port
and each Service the port the server listens on and only its own pods, the cascade's endpoints
name the generator's and ranker's headless Services and their pods' port, the server settings come
from the values (TLS, mutual TLS and the tokens as files of their mounted Secrets, whole volumes
that the kubelet updates, never subPath or environment variables, the preStop sleep and the
drain inside the grace period, the metrics port, the result cache on the pods that answer Caption), every pod runs non-root on a read-only root
filesystem, each HPA and PodDisruptionBudget targets its own Deployment's pods. Bad values
(schema violations and combinations only the templates catch) must be refused.

Usage: check_chart.py [CHART_DIR]   (default: helm/caption-cascade)
Exits 0 with a one-line summary, or 1 with what failed (the first failure of each value set).
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

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
# The server's --device choices.
DEVICES = {"auto", "cpu", "cuda"}
# The image's user (Dockerfile: USER 10001).
IMAGE_UID = 10001
COMPONENT_LABEL = "app.kubernetes.io/component"
# What each part serves and loads. "combined" is topology: combined's one Deployment.
SPLIT = ("generator", "ranker", "cascade")
MODELS = {"combined": ("blip", "clip"), "generator": ("blip",), "ranker": ("clip",), "cascade": ()}
MODEL_ENV = {"blip": "CAPTION_BLIP_MODEL", "clip": "CAPTION_CLIP_MODEL"}
# Readiness follows the health of the service callers of that pod use.
READINESS_SERVICE = {
    "combined": "caption.v1.Cascade",
    "generator": "caption.v1.Generator",
    "ranker": "caption.v1.Ranker",
    "cascade": "caption.v1.Cascade",
}
# The server's caption_queue_depth gauge labels its queues model="generate" / "rank".
QUEUE_MODEL = {"generator": "generate", "ranker": "rank"}
# Kinds the Kubernetes schemas do not know (CRDs): checked by hand instead.
CRD_KINDS = {"ServiceMonitor"}

LONGEST_RELEASE = "a-release-name-as-long-as-helm-allows-it-to-be-abcdef"  # Helm's limit, 53

# (name, release, values): each renders, lints clean and passes every check below.
SCENARIOS = [
    ("defaults", "demo", None),
    (
        "overrides",
        # Helm's longest release name (53), so the object names have to be truncated.
        LONGEST_RELEASE,
        {
            "port": 9000,
            "gpus": 1,
            "device": "cuda",
            "models": {"blip": "/models/blip-large", "clip": "/models/clip-large"},
            "env": {"CAPTION_GENERATE_MAX_BATCH": 16, "RUST_LOG": "debug"},
            "metrics": {"port": 9100},
            "service": {"port": 80},
            # 4 GiB: larger than 32 bits, rendered as an integer.
            "resultCache": {"bytes": 4 * 1024**3, "ttlSeconds": 600},
        },
    ),
    (
        "secured",
        "demo",
        {
            "tls": {"secretName": "caption-tls", "clientCASecretName": "caption-client-ca"},
            "auth": {"tokenSecretName": "caption-token", "tokenSecretKey": "bearer"},
            "reflection": False,
            "healthPort": 8081,
            "terminationGracePeriodSeconds": 60,
        },
    ),
    # null drops a default in Helm; the GPU limit must still be set.
    ("no default resources", "demo", {"resources": None, "gpus": 2}),
    (
        "combined, monitored, models pulled into a PVC",
        "demo",
        {
            "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}, "scrapeTimeout": "10s"},
            # Pulled into a PVC, which keeps the hub's cache across restarts.
            "models": {
                "source": "pull",
                "pvc": {"claimName": "caption-models"},
                "pull": {"tokenSecretName": "hf", "endpoint": "https://hf-mirror.internal"},
            },
            "preStopSleepSeconds": 10,
            "terminationGracePeriodSeconds": 45,
        },
    ),
    (
        "combined, models from a PVC, no preStop",
        "demo",
        {
            "models": {
                "source": "pvc",
                "pvc": {"claimName": "caption-models"},
                "mountPath": "/models",
                "blip": "/models/blip-image-captioning-large",
                "clip": "/models/clip-vit-large-patch14",
            },
            "preStopSleepSeconds": 0,
            "terminationGracePeriodSeconds": 6,
        },
    ),
    ("split", "demo", {"topology": "split"}),
    (
        "split, GPUs, queue depth, monitored, models pulled",
        LONGEST_RELEASE,
        {
            "topology": "split",
            "device": "cuda",
            "port": 9000,
            "metrics": {"port": 9100},
            "serviceMonitor": {"enabled": True},
            "env": {"RUST_LOG": "info"},
            "resultCache": {"bytes": 64 * 1024**2},
            "models": {
                "source": "pull",
                "pull": {
                    "blip": {"repo": "Salesforce/blip-image-captioning-large", "revision": "v1.0"},
                    "tokenSecretName": "hf-token",
                    "tokenSecretKey": "HF_TOKEN",
                },
            },
            "generator": {
                "gpus": 1,
                "nodeSelector": {"nvidia.com/gpu.present": "true"},
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                "env": {"CAPTION_GENERATE_MAX_BATCH": 32, "RUST_LOG": "debug"},
                "autoscaling": {"maxReplicas": 8, "queueDepth": {"enabled": True, "averageValue": "4"}},
            },
            "ranker": {"autoscaling": {"queueDepth": {"enabled": True}}},
            "cascade": {"autoscaling": {"minReplicas": 3, "maxReplicas": 20, "targetCPUUtilizationPercentage": 60}},
        },
    ),
    (
        "split secured",
        "demo",
        {
            "topology": "split",
            "tls": {"secretName": "caption-tls", "clientCASecretName": "caption-client-ca"},
            "upstream": {"tls": {"caSecretName": "caption-tls"}},
            "auth": {"tokenSecretName": "caption-token", "tokenSecretKey": "bearer"},
            "reflection": False,
            "healthPort": 8081,
            "terminationGracePeriodSeconds": 60,
            "preStopSleepSeconds": 15,
        },
    ),
    (
        "split, own upstream TLS and token",
        "demo",
        {
            "topology": "split",
            "upstream": {
                "tls": {"secretName": "caption-internal-tls", "caSecretName": "caption-internal-ca"},
                "token": {"secretName": "caption-internal-token", "secretKey": "t"},
            },
        },
    ),
    (
        "split, fixed replicas, models from a PVC",
        "demo",
        {
            "topology": "split",
            "models": {
                "source": "pvc",
                "pvc": {"claimName": "caption-models"},
                "blip": "/models/shapes-blip",
                "clip": "/models/shapes-clip",
            },
            "generator": {"replicas": 3, "autoscaling": {"enabled": False}, "resources": None},
            "ranker": {"replicas": 2, "autoscaling": {"enabled": False}, "podDisruptionBudget": {"enabled": False}},
            "cascade": {
                "replicas": 4,
                "autoscaling": {"enabled": False},
                "podDisruptionBudget": {"minAvailable": 2, "maxUnavailable": None},
                "topologySpread": [],
            },
        },
    ),
]
SPLIT_ON = {"topology": "split"}
# (name, values, text the render error must contain): values the chart has to refuse, by its
# schema (an install fails before anything is applied) or by its templates.
REFUSED = [
    ("env duplicates CAPTION_DEVICE", {"env": {"CAPTION_DEVICE": "cpu"}}, "use the value device"),
    ("env duplicates CAPTION_LISTEN", {"env": {"CAPTION_LISTEN": "0.0.0.0:1"}}, "use the value port"),
    ("env duplicates CAPTION_TLS_CERT", {"env": {"CAPTION_TLS_CERT": "/x"}}, "use the value tls.secretName"),
    ("env duplicates CAPTION_METRICS_LISTEN", {"env": {"CAPTION_METRICS_LISTEN": ":9"}}, "use the value metrics.port"),
    (
        "a component's env duplicates CAPTION_SERVICES",
        {**SPLIT_ON, "generator": {"env": {"CAPTION_SERVICES": "generator,ranker"}}},
        "use the value topology",
    ),
    (
        "a component's env duplicates CAPTION_GENERATOR_ENDPOINT",
        {**SPLIT_ON, "cascade": {"env": {"CAPTION_GENERATOR_ENDPOINT": "http://x:1"}}},
        "use the value topology",
    ),
    (
        "env duplicates CAPTION_RESULT_CACHE_BYTES",
        {"env": {"CAPTION_RESULT_CACHE_BYTES": "1"}},
        "use the value resultCache.bytes",
    ),
    ("negative result cache bytes", {"resultCache": {"bytes": -1}}, "minimum"),
    ("a result cache TTL of zero", {"resultCache": {"ttlSeconds": 0}}, "minimum"),
    ("client CA without TLS", {"tls": {"clientCASecretName": "ca"}}, "needs tls.secretName"),
    ("client CA without TLS, split", {**SPLIT_ON, "tls": {"clientCASecretName": "ca"}}, "needs tls.secretName"),
    ("grace below the schema's minimum", {"terminationGracePeriodSeconds": 3}, "want 6"),
    ("grace too short for preStop and drain", {"terminationGracePeriodSeconds": 10}, "at least 11"),
    ("unknown topology", {"topology": "both"}, "value must be one of 'combined', 'split'"),
    ("unknown device", {"device": "gpu"}, "value must be one of 'auto', 'cpu', 'cuda'"),
    ("port 0", {"port": 0}, "minimum"),
    ("negative replicas", {**SPLIT_ON, "generator": {"replicas": -1}}, "minimum"),
    ("GPUs as a string", {"generator": {"gpus": "1"}}, "want integer"),
    ("a misspelt value", {"replicas": 3}, "additional properties 'replicas' not allowed"),
    ("a misspelt component value", {"ranker": {"replica": 3}}, "additional properties 'replica' not allowed"),
    ("bad metrics port", {"metrics": {"port": 70000}}, "maximum"),
    ("bad scrape interval", {"serviceMonitor": {"interval": "often"}}, "does not match pattern"),
    ("bad models source", {"models": {"source": "s3"}}, "value must be one of 'image', 'pvc', 'pull'"),
    ("bad Hub id", {"models": {"source": "pull", "pull": {"clip": {"repo": "clip"}}}}, "does not match pattern"),
    ("PVC models without a claim", {"models": {"source": "pvc"}}, "needs models.pvc.claimName"),
    (
        "PVC models outside the mount",
        {"models": {"source": "pvc", "pvc": {"claimName": "m"}}},
        "is not under models.mountPath",
    ),
    ("split TLS without the upstream CA", {**SPLIT_ON, "tls": {"secretName": "t"}}, "set upstream.tls.caSecretName"),
    (
        "split upstream TLS without its CA",
        {**SPLIT_ON, "upstream": {"tls": {"secretName": "t"}}},
        "set upstream.tls.caSecretName",
    ),
    (
        "HPA max below min",
        {**SPLIT_ON, "ranker": {"autoscaling": {"minReplicas": 3, "maxReplicas": 2}}},
        "is below minReplicas",
    ),
    (
        "CPU HPA without a CPU request",
        {**SPLIT_ON, "cascade": {"resources": {"requests": {"cpu": None}}}},
        "set cascade.resources.requests.cpu",
    ),
    ("HPA with zero replicas", {**SPLIT_ON, "cascade": {"autoscaling": {"minReplicas": 0}}}, "minimum"),
]

# The selectors of every Deployment, Service, PodDisruptionBudget and ServiceMonitor as the chart
# rendered them before its labels were reworked (selectors.golden.json, by value set): a
# Deployment's selector cannot change on upgrade, and a changed Service or budget selector would
# drop or orphan the running pods. New objects may come; these may not change.
GOLDEN_SELECTORS = Path(__file__).with_name("selectors.golden.json")
SELECTOR_CASES = [
    ("combined", "demo", None),
    ("combined, release named after the chart", "caption-cascade-prod", None),
    ("combined, longest release", LONGEST_RELEASE, None),
    ("combined, monitored", "demo", {"serviceMonitor": {"enabled": True}}),
    ("split", "demo", {"topology": "split"}),
    ("split, longest release", LONGEST_RELEASE, {"topology": "split"}),
    ("split, monitored", "demo", {"topology": "split", "serviceMonitor": {"enabled": True}}),
]
SELECTING_KINDS = ("Deployment", "Service", "PodDisruptionBudget", "ServiceMonitor")

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
        if doc.get("kind") in CRD_KINDS:
            continue  # no schema in kubernetes-validate: check_service_monitor checks it
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
    names: set[tuple[str, str]] = set()
    for doc in docs:
        meta = doc["metadata"]
        maps = [meta.get("labels") or {}]
        if doc["kind"] == "Deployment":
            maps.append(doc["spec"]["template"]["metadata"].get("labels") or {})
            maps.append(doc["spec"]["selector"]["matchLabels"])
        if doc["kind"] == "Service":
            maps.append(doc["spec"].get("selector") or {})
        if doc["kind"] in ("PodDisruptionBudget", "ServiceMonitor"):
            maps.append(doc["spec"]["selector"].get("matchLabels") or {})
        for labels in maps:
            for key, value in labels.items():
                value = str(value)
                valid = len(value) <= 63 and LABEL_VALUE.match(value)
                expect(valid, f"label {key}={value!r} is not a valid label value")
        name = meta["name"]
        expect(len(name) <= 63 and DNS_LABEL.match(name), f"name {name!r} is not a DNS label")
        expect((doc["kind"], name) not in names, f"two {doc['kind']}s are named {name!r}")
        names.add((doc["kind"], name))


def selectors(docs: list[dict]) -> dict[str, dict]:
    """Each selecting object's selector, by kind/name."""
    found = {}
    for doc in docs:
        if doc["kind"] not in SELECTING_KINDS:
            continue
        spec = doc["spec"]
        selector = spec.get("selector") or {}
        if doc["kind"] != "Service":
            selector = selector.get("matchLabels") or {}
        found[f"{doc['kind']}/{doc['metadata']['name']}"] = selector
    return found


def check_golden_selectors(chart: helm.Chart) -> list[str]:
    """Every object of selectors.golden.json renders with the same selector as it had."""
    golden = json.loads(GOLDEN_SELECTORS.read_text())
    failures = []
    expect_cases = {name for name, _, _ in SELECTOR_CASES}
    if set(golden) != expect_cases:
        failures.append(f"{GOLDEN_SELECTORS.name} holds {sorted(golden)}, want {sorted(expect_cases)}")
    for name, release, overrides in SELECTOR_CASES:
        now = selectors(render(chart, release, overrides))
        for what, selector in (golden.get(name) or {}).items():
            if what not in now:
                failures.append(f"selectors ({name}): {what} is gone")
            elif now[what] != selector:
                failures.append(f"selectors ({name}): {what} selects {now[what]}, upgrades need {selector}")
    return failures


def selects(selector: dict | None, labels: dict) -> bool:
    """A non-empty equality selector matches these labels."""
    return bool(selector) and selector.items() <= labels.items()


def pod_labels(deployment: dict) -> dict:
    return deployment["spec"]["template"]["metadata"].get("labels") or {}


def component_of(deployment: dict) -> str:
    return pod_labels(deployment).get(COMPONENT_LABEL, "combined")


def main_container(deployment: dict) -> dict:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    expect(len(containers) == 1, f"{deployment['metadata']['name']}: expected one container, got {len(containers)}")
    return containers[0]


def container_port(container: dict, port: int | str) -> int | None:
    """A Service's targetPort as a number: a name resolves to the container's port of that name."""
    if isinstance(port, str):
        return next((p["containerPort"] for p in container.get("ports", []) if p.get("name") == port), None)
    return port


def model_path(values: dict, model: str) -> str:
    """Where the server must find a model: pull writes <mountPath>/<repo name>."""
    models = values["models"]
    if models["source"] == "pull":
        return f"{models['mountPath'].rstrip('/')}/{models['pull'][model]['repo'].split('/')[1]}"
    return models[model]


def settings(values: dict, component: str) -> dict:
    """The part's own settings, as the chart reads them."""
    if component == "combined":
        return {
            "replicas": values["replicaCount"],
            "resources": values.get("resources"),
            "gpus": values.get("gpus"),
            "env": {},
        }
    return values[component]


def serving_tls(values: dict, component: str) -> str:
    tls = values.get("tls") or {}
    if component in ("generator", "ranker"):
        return values["upstream"]["tls"].get("secretName") or tls.get("secretName") or ""
    return tls.get("secretName") or ""


def required_token(values: dict, component: str) -> dict | None:
    """The Secret key whose token the part requires of its callers."""
    upstream = values["upstream"]["token"]
    if component in ("generator", "ranker") and upstream.get("secretName"):
        return {"name": upstream["secretName"], "key": upstream["secretKey"]}
    auth = values.get("auth") or {}
    if auth.get("tokenSecretName"):
        return {"name": auth["tokenSecretName"], "key": auth["tokenSecretKey"]}
    return None


def check_security(pod: dict, what: str) -> None:
    """Non-root as the image's user, read-only root filesystem, no privileges, /tmp writable."""
    spec = pod["spec"]
    pod_sc = spec.get("securityContext") or {}
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for c in spec.get("initContainers", []) + spec["containers"]:
        sc = c.get("securityContext") or {}
        name = f"{what} container {c['name']}"
        expect(sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, f"{name}: runAsNonRoot is not set")
        uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
        expect(uid == IMAGE_UID, f"{name}: runAsUser {uid}, the image's user is {IMAGE_UID}")
        expect(sc.get("readOnlyRootFilesystem") is True, f"{name}: the root filesystem is writable")
        expect(sc.get("allowPrivilegeEscalation") is False, f"{name}: allowPrivilegeEscalation is not false")
        drop = (sc.get("capabilities") or {}).get("drop") or []
        expect("ALL" in drop, f"{name}: capabilities drop {drop}, want ALL")
        expect(not (sc.get("capabilities") or {}).get("add"), f"{name}: adds capabilities")
        expect(not sc.get("privileged"), f"{name}: privileged")
        tmp = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
        expect(tmp, f"{name}: nothing is mounted on /tmp and the root filesystem is read-only")
        volume = volumes.get(tmp[0]["name"]) or {}
        expect("emptyDir" in volume, f"{name}: /tmp is not an emptyDir")


def check_pod(component: str, deployment: dict, values: dict, services: dict[str, dict]) -> None:
    """One part's pod, against the values Helm actually used. `services`: the headless Services of
    the generator and ranker by component (split)."""
    what = deployment["metadata"]["name"]
    pod = deployment["spec"]["template"]
    own = settings(values, component)
    port = int(values["port"])
    expect(selects(deployment["spec"]["selector"]["matchLabels"], pod_labels(deployment)), f"{what}: the selector misses its own pods")

    container = main_container(deployment)
    args = container.get("args") or [None]
    expect(args[0] == "serve", f"{what}: the container does not run `serve`: args {args}")

    names = [e["name"] for e in container.get("env", [])]
    expect(len(names) == len(set(names)), f"{what}: duplicate env names: {names}")
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    listen = env.get("CAPTION_LISTEN") or ""
    host, _, listen_port = listen.rpartition(":")
    # All interfaces: the kubelet probes and the Service reach the pod on its own IP.
    expect(host in ("0.0.0.0", "[::]") and listen_port == str(port), f"{what}: CAPTION_LISTEN={listen!r}, want *:{port}")

    # The services this process serves (all three when unset) and the models they load.
    if component == "combined":
        expect("CAPTION_SERVICES" not in env, f"{what}: CAPTION_SERVICES={env.get('CAPTION_SERVICES')!r} in combined")
    else:
        expect(env.get("CAPTION_SERVICES") == component, f"{what}: CAPTION_SERVICES={env.get('CAPTION_SERVICES')!r}")
    for model, name in MODEL_ENV.items():
        if model in MODELS[component]:
            want = model_path(values, model)
            expect(env.get(name) == want, f"{what}: {name}={env.get(name)!r}, want {want!r}")
        else:
            expect(name not in env, f"{what}: {name} is set but {component} does not load {model}")
    device = "cpu" if component == "cascade" else values["device"]
    expect(env.get("CAPTION_DEVICE") == device, f"{what}: CAPTION_DEVICE={env.get('CAPTION_DEVICE')!r}, want {device!r}")
    expect(values["device"] in DEVICES, f"device {values['device']!r} is not one of {sorted(DEVICES)}")
    extra = {**(values.get("env") or {}), **(own.get("env") or {})}  # the part's own env wins
    for name, value in extra.items():
        expect(env.get(name) == str(value), f"{what}: env.{name}: the container has {env.get(name)!r}, want {str(value)!r}")

    ports = {p.get("name"): p for p in container.get("ports", [])}
    expect("grpc" in ports and ports["grpc"]["containerPort"] == port, f"{what}: ports {ports}, want grpc: {port}")
    # The probes speak neither TLS nor tokens: they use the plaintext health-only listener.
    health_port = int(values["healthPort"])
    health = env.get("CAPTION_HEALTH_LISTEN") or ""
    expect(health.rpartition(":")[2] == str(health_port), f"{what}: CAPTION_HEALTH_LISTEN={health!r}, want *:{health_port}")
    # The split cascade's gRPC health follows its upstreams: readiness only may depend on it, or
    # an outage of the generators would restart every cascade pod. Its start and liveness check
    # that the health port is open.
    own_health = component == "cascade"
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container.get(kind) or {}
        tcp = own_health and kind != "readinessProbe"
        handler = probe.get("tcpSocket" if tcp else "grpc")
        expect(handler, f"{what}: {kind} is not a {'TCP' if tcp else 'gRPC health'} probe: {probe}")
        expect(handler["port"] == health_port, f"{what}: {kind} probes port {handler['port']}, health is on {health_port}")
    readiness = container["readinessProbe"]["grpc"].get("service")
    want = READINESS_SERVICE[component]
    expect(readiness == want, f"{what}: readinessProbe checks {readiness!r}, want {want}")
    if not own_health:
        startup = container["startupProbe"]["grpc"].get("service")
        expect(startup == want, f"{what}: startupProbe checks {startup!r}, want {want!r}")
        expect(not container["livenessProbe"]["grpc"].get("service"), f"{what}: liveness must not follow a service's health")

    # Metrics on every pod.
    metrics_port = int(values["metrics"]["port"])
    metrics = env.get("CAPTION_METRICS_LISTEN") or ""
    expect(metrics.rpartition(":")[2] == str(metrics_port), f"{what}: CAPTION_METRICS_LISTEN={metrics!r}, want *:{metrics_port}")
    expect(ports.get("metrics", {}).get("containerPort") == metrics_port, f"{what}: no container port metrics: {metrics_port}")
    expect(len({p["containerPort"] for p in ports.values()}) == len(ports), f"{what}: two ports share a number: {ports}")

    # Termination: preStop sleep, then the drain, inside the grace period.
    grace = int(values["terminationGracePeriodSeconds"])
    expect(pod["spec"].get("terminationGracePeriodSeconds") == grace, f"{what}: terminationGracePeriodSeconds not set")
    pre_stop = int(values["preStopSleepSeconds"])
    hook = ((container.get("lifecycle") or {}).get("preStop") or {}).get("exec", {}).get("command")
    if pre_stop:
        expect(hook == ["sleep", str(pre_stop)], f"{what}: preStop {hook}, want a {pre_stop} s sleep")
    else:
        expect(hook is None, f"{what}: preStop {hook} with preStopSleepSeconds 0")
    drain = int(env.get("CAPTION_DRAIN_TIMEOUT_S") or 0)
    expect(0 < drain and pre_stop + drain < grace, f"{what}: preStop {pre_stop} s + CAPTION_DRAIN_TIMEOUT_S {drain} s must end inside the {grace} s grace period")
    expect(pre_stop + drain + 5 == grace, f"{what}: the server gets {grace - pre_stop - drain} s to exit after its drain, want 5")

    check_security(pod, what)

    # Secret-backed settings: each path the server reads lies in a mount of the named Secret.
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}

    def secret_of(path: str | None) -> tuple[str | None, str | None]:
        """The Secret and key a file path comes from."""
        for mount, volume in mounts.items():
            if path and path.startswith(mount.rstrip("/") + "/"):
                secret = volumes.get(volume, {}).get("secret") or {}
                file = path[len(mount.rstrip("/")) + 1 :]
                key = next((i["key"] for i in secret.get("items") or [] if i["path"] == file), file)
                return secret.get("secretName"), key
        return None, None

    tls = values.get("tls") or {}
    client_ca = tls.get("clientCASecretName") if component in ("combined", "cascade") else None
    for name, secret, key in (
        ("CAPTION_TLS_CERT", serving_tls(values, component), "tls.crt"),
        ("CAPTION_TLS_KEY", serving_tls(values, component), "tls.key"),
        ("CAPTION_TLS_CLIENT_CA", client_ca, "ca.crt"),
    ):
        if secret:
            expect(secret_of(env.get(name)) == (secret, key), f"{what}: {name}={env.get(name)!r} is not {key} of Secret {secret!r}")
        else:
            expect(name not in env, f"{what}: {name} is set without its Secret")
    # The token is a file of a mounted Secret, which the kubelet updates and the server reads again;
    # an environment variable would keep a revoked token until the pod restarts.
    want = required_token(values, component)
    if want:
        got = secret_of(env.get("CAPTION_AUTH_TOKEN_FILE"))
        want_ref = (want["name"], want["key"])
        expect(got == want_ref, f"{what}: CAPTION_AUTH_TOKEN_FILE={env.get('CAPTION_AUTH_TOKEN_FILE')!r} comes from {got}, want {want_ref}")
    else:
        expect("CAPTION_AUTH_TOKEN_FILE" not in env, f"{what}: CAPTION_AUTH_TOKEN_FILE is set without a token Secret")
    expect("CAPTION_AUTH_TOKEN" not in names, f"{what}: CAPTION_AUTH_TOKEN is set: a rotated token would not reach the pod")
    # The kubelet updates a Secret's files in place only in whole-volume mounts, never through subPath.
    for mount in container.get("volumeMounts", []):
        if "secret" in volumes.get(mount["name"], {}):
            expect(not mount.get("subPath") and not mount.get("subPathExpr"), f"{what}: Secret volume {mount['name']} is mounted by subPath, which the kubelet never updates")
            expect(mount.get("readOnly") is True, f"{what}: Secret volume {mount['name']} is mounted writable")
    expect((env.get("CAPTION_NO_REFLECTION") == "true") == (not values["reflection"]), f"{what}: reflection not wired")

    # The cascade's hop: endpoints on the headless Services and the pods' own port, TLS and token.
    upstream_tls = serving_tls(values, "generator")
    upstream_token = required_token(values, "generator")
    if component == "cascade":
        scheme = "https" if upstream_tls else "http"
        for name, target in (("CAPTION_GENERATOR_ENDPOINT", "generator"), ("CAPTION_RANKER_ENDPOINT", "ranker")):
            url = urlsplit(env.get(name) or "")
            service = services[target]
            expect(url.scheme == scheme, f"{what}: {name}={env.get(name)!r}, want {scheme}://")
            expect(url.hostname == service["metadata"]["name"], f"{what}: {name} names {url.hostname!r}, the {target}'s headless Service is {service['metadata']['name']!r}")
            # A headless name resolves to pod IPs: the port must be the pods' own gRPC port.
            expect(url.port == port, f"{what}: {name} dials port {url.port}, the {target} pods listen on {port}")
            expect(not url.path.strip("/"), f"{what}: {name} has a path: {url.path!r}")
        ca = values["upstream"]["tls"].get("caSecretName")
        if upstream_tls:
            expect(secret_of(env.get("CAPTION_UPSTREAM_CA")) == (ca, "ca.crt"), f"{what}: CAPTION_UPSTREAM_CA={env.get('CAPTION_UPSTREAM_CA')!r} is not ca.crt of Secret {ca!r}")
        else:
            expect("CAPTION_UPSTREAM_CA" not in env, f"{what}: CAPTION_UPSTREAM_CA without upstream TLS")
        if upstream_token:
            got = secret_of(env.get("CAPTION_UPSTREAM_TOKEN_FILE"))
            want_ref = (upstream_token["name"], upstream_token["key"])
            expect(got == want_ref, f"{what}: CAPTION_UPSTREAM_TOKEN_FILE comes from {got}, the generator and ranker require {want_ref}")
        else:
            expect("CAPTION_UPSTREAM_TOKEN_FILE" not in env, f"{what}: CAPTION_UPSTREAM_TOKEN_FILE without a token")
    else:
        for name in ("CAPTION_GENERATOR_ENDPOINT", "CAPTION_RANKER_ENDPOINT", "CAPTION_UPSTREAM_CA", "CAPTION_UPSTREAM_TOKEN_FILE"):
            expect(name not in env, f"{what}: {name} is set on the {component}")

    # The result cache, on the pods that answer Caption only, when resultCache.bytes turns it on.
    cache = values["resultCache"]
    if int(cache["bytes"]) > 0 and component in ("combined", "cascade"):
        for name, value in (("CAPTION_RESULT_CACHE_BYTES", cache["bytes"]), ("CAPTION_RESULT_CACHE_TTL_S", cache["ttlSeconds"])):
            expect(env.get(name) == str(int(value)), f"{what}: {name}={env.get(name)!r}, want {int(value)}")
    else:
        for name in ("CAPTION_RESULT_CACHE_BYTES", "CAPTION_RESULT_CACHE_TTL_S"):
            expect(name not in env, f"{what}: {name} is set, but the result cache is off or {component} answers no Caption")

    # Where the model folders come from.
    models = values["models"]
    inits = pod["spec"].get("initContainers") or []
    wanted = MODELS[component]
    model_mounts = [m for m in container.get("volumeMounts", []) if m["name"] == "models"]
    if not wanted or models["source"] == "image":
        expect(not inits, f"{what}: init containers without models to pull: {[c['name'] for c in inits]}")
        expect(not model_mounts, f"{what}: a models volume with models.source {models['source']}")
    else:
        expect(len(model_mounts) == 1 and model_mounts[0]["mountPath"] == models["mountPath"], f"{what}: models volume mounts {model_mounts}")
        expect(model_mounts[0].get("readOnly") is True, f"{what}: the server's models mount is writable")
        for model in wanted:
            path = model_path(values, model)
            expect(path.startswith(models["mountPath"].rstrip("/") + "/"), f"{what}: {model} at {path} is outside the models volume")
        volume = volumes.get("models") or {}
        claim = (models.get("pvc") or {}).get("claimName")
        if claim:
            expect((volume.get("persistentVolumeClaim") or {}).get("claimName") == claim, f"{what}: models volume {volume}, want PVC {claim}")
        else:
            expect(models["source"] == "pull" and "emptyDir" in volume, f"{what}: models volume {volume}")
        if models["source"] == "pvc":
            expect(not inits, f"{what}: init containers with models.source pvc")
            expect(volume["persistentVolumeClaim"].get("readOnly") is True, f"{what}: the models PVC is mounted writable")
        else:  # pull
            pull = models["pull"]
            expect([c["name"] for c in inits] == [f"pull-{m}" for m in wanted], f"{what}: init containers {[c['name'] for c in inits]}, want one pull per model of {wanted}")
            for model, init in zip(wanted, inits):
                a = init.get("args") or []
                expect(a[:3] == ["models", "pull", pull[model]["repo"]], f"{what}: {init['name']} runs {a}")
                expect(a[a.index("--models-dir") + 1] == models["mountPath"] if "--models-dir" in a else False, f"{what}: {init['name']} pulls to {a}")
                revision = pull[model].get("revision") or "main"
                expect(a[a.index("--revision") + 1] == revision if "--revision" in a else False, f"{what}: {init['name']} pulls revision {a}")
                expect(init["image"] == container["image"], f"{what}: {init['name']} runs another image")
                init_mounts = {m["name"]: m for m in init.get("volumeMounts", [])}
                expect(init_mounts.get("models", {}).get("mountPath") == models["mountPath"] and not init_mounts["models"].get("readOnly"), f"{what}: {init['name']} cannot write the models volume")
                init_env = {e["name"]: e for e in init.get("env", [])}
                ref = ((init_env.get("HF_TOKEN") or {}).get("valueFrom") or {}).get("secretKeyRef")
                if pull.get("tokenSecretName"):
                    expect(ref == {"name": pull["tokenSecretName"], "key": pull["tokenSecretKey"]}, f"{what}: HF_TOKEN comes from {ref}")
                else:
                    expect("HF_TOKEN" not in init_env, f"{what}: HF_TOKEN without models.pull.tokenSecretName")
                cache = (init_env.get("HF_HUB_CACHE") or {}).get("value") or ""
                expect(cache.startswith(models["mountPath"].rstrip("/") + "/"), f"{what}: the hub cache {cache!r} is not on a writable volume")

    limits = (container.get("resources") or {}).get("limits") or {}
    gpus = int(own.get("gpus") or 0)
    if gpus > 0:
        expect(str(limits.get("nvidia.com/gpu")) == str(gpus), f"{what}: gpus: {gpus} but limits are {limits}")
    else:
        expect("nvidia.com/gpu" not in limits, f"{what}: gpus: 0 but limits ask for a GPU: {limits}")
    spec = pod["spec"]
    if component != "combined":
        for key in ("nodeSelector", "tolerations", "affinity"):
            expect((spec.get(key) or None) == (own.get(key) or None), f"{what}: {key} {spec.get(key)}, want {component}.{key} {own.get(key)}")
        spread = spec.get("topologySpreadConstraints") or []
        want = own.get("topologySpread") or []
        expect([c["topologyKey"] for c in spread] == [w["topologyKey"] for w in want], f"{what}: spread over {spread}, want {want}")
        for c in spread:
            expect(selects(c["labelSelector"]["matchLabels"], pod_labels(deployment)), f"{what}: a spread constraint misses its own pods")


def check_deployer_contract(docs: list[dict], values: dict) -> None:
    """What the deployed servers need, against the values Helm actually used (`values`)."""
    by_kind: dict[str, list[dict]] = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    topology = values["topology"]
    deployments = {component_of(d): d for d in by_kind.get("Deployment", [])}
    want = {"combined"} if topology == "combined" else set(SPLIT)
    expect(len(by_kind.get("Deployment", [])) == len(want) and set(deployments) == want, f"Deployments {sorted(deployments)}, want {sorted(want)}")
    all_services = by_kind.get("Service", [])
    grpc_services = [s for s in all_services if any(p.get("name") == "grpc" for p in s["spec"]["ports"])]

    # Each gRPC Service selects the pods of exactly one part, and reaches their gRPC port.
    served: dict[str, dict] = {}
    for service in grpc_services:
        name = service["metadata"]["name"]
        selector = service["spec"].get("selector")
        matched = [c for c, d in deployments.items() if selects(selector, pod_labels(d))]
        expect(len(matched) == 1, f"Service {name} selects the pods of {matched or 'nothing'}, want exactly one part")
        component = matched[0]
        expect(component not in served, f"two Services select the {component} pods")
        served[component] = service
        container = main_container(deployments[component])
        grpc = [p for p in service["spec"]["ports"] if p.get("name") == "grpc"]
        target = container_port(container, grpc[0].get("targetPort", grpc[0]["port"]))
        expect(target == int(values["port"]), f"Service {name} targets port {target}, the server listens on {values['port']}")

    callers = "combined" if topology == "combined" else "cascade"
    expect(set(served) == ({"combined"} if topology == "combined" else set(SPLIT)), f"gRPC Services for {sorted(served)}")
    front = served[callers]
    expect(front["metadata"]["name"] == fullname(values["_release"]), f"the callers' Service is {front['metadata']['name']}, want the release's fullname")
    expect(front["spec"].get("clusterIP") != "None" and front["spec"]["type"] == values["service"]["type"], "the callers' Service is not of service.type")
    exposed = [p for p in front["spec"]["ports"] if p["name"] == "grpc"][0]["port"]
    expect(exposed == values["service"]["port"], f"the Service port is {exposed}, want service.port {values['service']['port']}")
    headless = {}
    if topology == "split":
        for component in ("generator", "ranker"):
            service = served[component]
            expect(service["spec"].get("clusterIP") == "None", f"Service {service['metadata']['name']} is not headless: the cascade balances over the pods itself")
            grpc = [p for p in service["spec"]["ports"] if p["name"] == "grpc"][0]
            expect(grpc["port"] == int(values["port"]), f"headless {service['metadata']['name']} port {grpc['port']} is not the pods' {values['port']}")
            headless[component] = service

    for component, deployment in deployments.items():
        check_pod(component, deployment, values, headless)

    check_autoscaling(by_kind, deployments, values)
    check_service_monitor(by_kind, deployments, values)


def fullname(release: str) -> str:
    name = release if "caption-cascade" in release else f"{release}-caption-cascade"
    return name[:63].rstrip("-")


def check_autoscaling(by_kind: dict[str, list[dict]], deployments: dict[str, dict], values: dict) -> None:
    """Split: each part's HPA scales its own Deployment; each PDB covers its own pods only."""
    hpas = by_kind.get("HorizontalPodAutoscaler", [])
    pdbs = by_kind.get("PodDisruptionBudget", [])
    if values["topology"] == "combined":
        expect(not hpas and not pdbs, "HPAs or PDBs in topology: combined")
        replicas = deployments["combined"]["spec"].get("replicas")
        expect(replicas == values["replicaCount"], f"replicas {replicas}, want replicaCount {values['replicaCount']}")
        return
    for component in SPLIT:
        own = values[component]
        deployment = deployments[component]
        name = deployment["metadata"]["name"]
        mine = [h for h in hpas if h["spec"]["scaleTargetRef"]["name"] == name]
        auto = own["autoscaling"]
        if auto["enabled"]:
            expect(len(mine) == 1, f"{component}: {len(mine)} HPAs target Deployment {name}")
            hpa = mine[0]["spec"]
            ref = hpa["scaleTargetRef"]
            expect((ref["apiVersion"], ref["kind"]) == ("apps/v1", "Deployment"), f"{component}: the HPA targets {ref}")
            expect(mine[0]["apiVersion"] == "autoscaling/v2", f"{component}: HPA {mine[0]['apiVersion']}")
            expect((hpa["minReplicas"], hpa["maxReplicas"]) == (auto["minReplicas"], auto["maxReplicas"]), f"{component}: HPA {hpa['minReplicas']}..{hpa['maxReplicas']}")
            expect(hpa["minReplicas"] <= hpa["maxReplicas"], f"{component}: HPA min above max")
            # The HPA owns the count: a Deployment replicas would reset it on every upgrade.
            expect("replicas" not in deployment["spec"], f"{component}: replicas set beside an HPA")
            cpu = [m for m in hpa["metrics"] if m["type"] == "Resource" and m["resource"]["name"] == "cpu"]
            want = auto["targetCPUUtilizationPercentage"]
            expect(len(cpu) == 1 and cpu[0]["resource"]["target"] == {"type": "Utilization", "averageUtilization": want}, f"{component}: CPU target {cpu}, want {want}%")
            requests = (main_container(deployment).get("resources") or {}).get("requests") or {}
            expect("cpu" in requests, f"{component}: CPU utilization needs a CPU request, the container has {requests}")
            queue = [m for m in hpa["metrics"] if m["type"] == "Pods"]
            if (auto.get("queueDepth") or {}).get("enabled"):
                expect(len(queue) == 1, f"{component}: no queue-depth metric")
                metric = queue[0]["pods"]
                expect(metric["metric"]["name"] == "caption_queue_depth", f"{component}: metric {metric['metric']}")
                label = metric["metric"]["selector"]["matchLabels"].get("model")
                expect(label == QUEUE_MODEL[component], f"{component}: queue depth of model {label!r}, want {QUEUE_MODEL[component]!r}")
                expect(str(metric["target"]["averageValue"]) == str(auto["queueDepth"]["averageValue"]), f"{component}: queue target {metric['target']}")
            else:
                expect(not queue, f"{component}: custom metrics without queueDepth.enabled")
        else:
            expect(not mine, f"{component}: an HPA with autoscaling disabled")
            expect(deployment["spec"].get("replicas") == own["replicas"], f"{component}: replicas {deployment['spec'].get('replicas')}, want {own['replicas']}")

        budget = own["podDisruptionBudget"]
        covering = [p for p in pdbs if selects(p["spec"]["selector"].get("matchLabels"), pod_labels(deployment))]
        if budget["enabled"]:
            expect(len(covering) == 1, f"{component}: {len(covering)} PDBs cover its pods")
            pdb = covering[0]
            others = [c for c, d in deployments.items() if selects(pdb["spec"]["selector"]["matchLabels"], pod_labels(d))]
            expect(others == [component], f"PDB {pdb['metadata']['name']} covers the pods of {others}")
            if budget.get("minAvailable") is not None:
                expect(pdb["spec"].get("minAvailable") == budget["minAvailable"] and "maxUnavailable" not in pdb["spec"], f"{component}: PDB {pdb['spec']}")
            else:
                expect(pdb["spec"].get("maxUnavailable") == budget["maxUnavailable"] and "minAvailable" not in pdb["spec"], f"{component}: PDB {pdb['spec']}")
        else:
            expect(not covering, f"{component}: a PDB with podDisruptionBudget disabled")
    expect(len(hpas) == sum(values[c]["autoscaling"]["enabled"] for c in SPLIT), "HPAs that target no part")
    expect(len(pdbs) == sum(values[c]["podDisruptionBudget"]["enabled"] for c in SPLIT), "PDBs that cover no part")


def check_service_monitor(by_kind: dict[str, list[dict]], deployments: dict[str, dict], values: dict) -> None:
    """The ServiceMonitor (no schema here: its fields by hand) scrapes every pod's metrics port
    through a Service of its own; the callers' Service carries no metrics port."""
    monitors = by_kind.get("ServiceMonitor", [])
    services = by_kind.get("Service", [])
    metrics_services = [s for s in services if any(p.get("name") == "metrics" for p in s["spec"]["ports"])]
    config = values["serviceMonitor"]
    if not config["enabled"]:
        expect(not monitors and not metrics_services, "a ServiceMonitor or metrics Service with serviceMonitor.enabled false")
        return
    expect(len(monitors) == 1, f"{len(monitors)} ServiceMonitors")
    monitor = monitors[0]
    expect(monitor["apiVersion"] == "monitoring.coreos.com/v1", f"ServiceMonitor apiVersion {monitor['apiVersion']}")
    expect(set(monitor) <= {"apiVersion", "kind", "metadata", "spec"}, f"ServiceMonitor keys {sorted(monitor)}")
    spec = monitor["spec"]
    expect(set(spec) <= {"selector", "endpoints", "namespaceSelector", "jobLabel", "podTargetLabels", "targetLabels", "sampleLimit"}, f"ServiceMonitor spec keys {sorted(spec)}")
    labels = monitor["metadata"].get("labels") or {}
    expect(config["labels"].items() <= labels.items(), f"ServiceMonitor labels {labels} miss serviceMonitor.labels {config['labels']}")
    selected = [s for s in services if selects(spec["selector"].get("matchLabels"), s["metadata"].get("labels") or {})]
    expect(len(selected) == 1 and selected[0] in metrics_services, f"the ServiceMonitor selects Services {[s['metadata']['name'] for s in selected]}")
    expect(metrics_services == selected, "the metrics port is on a Service callers use")
    service = selected[0]
    endpoints = spec["endpoints"]
    expect(isinstance(endpoints, list) and len(endpoints) == 1, f"ServiceMonitor endpoints {endpoints}")
    endpoint = endpoints[0]
    allowed = {"port", "path", "scheme", "interval", "scrapeTimeout", "relabelings", "metricRelabelings", "honorLabels"}
    expect(set(endpoint) <= allowed, f"ServiceMonitor endpoint keys {sorted(endpoint)}")
    expect(endpoint.get("path") == "/metrics" and endpoint.get("scheme", "http") == "http", f"ServiceMonitor scrapes {endpoint}")
    expect(endpoint.get("interval") == config["interval"], f"interval {endpoint.get('interval')}, want {config['interval']}")
    if config.get("scrapeTimeout"):
        expect(endpoint.get("scrapeTimeout") == config["scrapeTimeout"], f"scrapeTimeout {endpoint.get('scrapeTimeout')}")
    for relabel in endpoint.get("relabelings") or []:
        expect(isinstance(relabel.get("sourceLabels"), list) and relabel.get("targetLabel"), f"relabeling {relabel}")
    ports = [p for p in service["spec"]["ports"] if p.get("name") == endpoint["port"]]
    expect(len(ports) == 1, f"the metrics Service has no port {endpoint['port']!r}")
    for component, deployment in deployments.items():
        expect(selects(service["spec"].get("selector"), pod_labels(deployment)), f"the metrics Service misses the {component} pods")
        target = container_port(main_container(deployment), ports[0].get("targetPort", ports[0]["port"]))
        expect(target == int(values["metrics"]["port"]), f"the metrics Service reaches {component} on port {target}")


def refused(chart: helm.Chart, overrides: dict) -> str | None:
    """Why the chart refuses these values at install (schema, then templates); None if it doesn't."""
    try:
        chart.validate_schema(overrides)
        chart.render(overrides, name="demo")
    except helm.HelmError as e:
        return str(e)
    return None


def main() -> int:
    chart_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "helm" / "caption-cascade"
    started = time.monotonic()
    failures: list[str] = []
    notes: set[str] = set()
    manifests = 0
    topologies: set[str] = set()
    try:
        chart = helm.Chart.load(str(chart_dir))
    except helm.HelmError as e:
        print(f"helm chart check FAILED: cannot load {chart_dir}: {e}", file=sys.stderr)
        return 1
    with chart:
        expect_schema = chart.schema
        if not expect_schema:
            failures.append("the chart ships no values.schema.json")
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
                values = chart.merge_values(overrides)
                values["_release"] = release
                check_deployer_contract(docs, values)
                topologies.add(values["topology"])
                manifests += len(docs)
            except (Failed, helm.HelmError) as e:
                failures.append(f"{name}: {e}")
        expect_topologies = {"combined", "split"}
        if topologies != expect_topologies and not failures:
            failures.append(f"the scenarios render topologies {sorted(topologies)}, want both")
        try:
            failures += check_golden_selectors(chart)
        except (OSError, ValueError, helm.HelmError) as e:
            failures.append(f"{GOLDEN_SELECTORS.name}: {e}")
        for name, overrides, reason in REFUSED:
            why = refused(chart, overrides)
            if why is None:
                failures.append(f"{name}: rendered, but the chart should refuse it")
            elif reason not in why:
                failures.append(f"{name}: refused, but without saying {reason!r}: {why}")

    if failures:
        print(f"helm chart check FAILED ({chart_dir}):", file=sys.stderr)
        for failure in failures:
            print(f"  - {failure}", file=sys.stderr)
        return 1
    info = f" (info: {'; '.join(sorted(notes))})" if notes else ""
    print(
        f"helm chart OK: lint clean{info}, "
        f"{len(SCENARIOS)} value sets (combined and split) -> {manifests} manifests valid on Kubernetes "
        f"{' and '.join(versions)} (strict schemas; ServiceMonitor checked by field), "
        f"{len(REFUSED)} bad value sets refused, {time.monotonic() - started:.2f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
