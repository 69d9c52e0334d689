#!/usr/bin/env python3
"""Checks the Helm chart without a helm binary or a cluster.

Lints it, renders it with the default values and with overrides, in both topologies (combined:
one Deployment serves every service; split: generator, ranker and cascade Deployments), and with
every `helm install` command the documentation shows (chart_docs.py), validates every rendered
manifest, the test hook's included, against the Kubernetes schemas (the ServiceMonitor, a CRD the
schemas do not have, is checked field by field), and asserts what a deployer relies on: each
container runs `serve` with the services and models of its part, on the device, GPUs and image its
tier resolves to (settings() is the rule, written apart from the templates), the gRPC probes reach
the plaintext health port and each Service the port the server listens on and only its own pods, the
cascade's endpoints name the generator's and ranker's headless Services and their pods' port, the
server settings come from the values (TLS, mutual TLS and the tokens as files of their mounted
Secrets, whole volumes that the kubelet updates, never subPath or environment variables, the preStop
sleep and the drain inside the grace period, the metrics port, the result cache on the pods that
answer Caption), every pod runs non-root on a read-only root filesystem, each HPA and
PodDisruptionBudget targets its own Deployment's pods, every object carries the recommended labels
while the selectors stay those of selectors.golden.json, every container has requests, a memory
limit and a pinned tag and every server container its probes, the `helm test` Pod captions the
shipped scene through the callers' Service with their CA and token, NOTES.txt says how to reach the
release, and the chart's README documents every value. Bad values (schema violations and
combinations only the templates catch) must be refused.

Usage: check_chart.py [CHART_DIR]   (default: helm/caption-cascade)
Exits 0 with a one-line summary, or 1 with what failed (the first failure of each value set).
"""

from __future__ import annotations

import base64
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

try:
    import helm_python as helm
    import yaml
    from kubernetes_validate import utils as schemas
except ImportError as e:
    sys.exit(f"{e}: install tests/helm/requirements.txt (make test does)")

import chart_docs

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
QUEUE_MODEL = {"combined": "generate", "generator": "generate", "ranker": "rank"}
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
        # What an operator adds: a private registry, a service account of their own, a GPU runtime
        # and MIG slices, scheduling priority, metadata, env from a ConfigMap, a volume; scaled
        # like split.
        "combined, an operator's values",
        "demo",
        {
            "fullnameOverride": "captions",
            "image": {"repository": "registry.example.com/ml/caption-cascade", "tag": "0.1.0", "pullPolicy": "Always"},
            "imagePullSecrets": [{"name": "regcred"}],
            "serviceAccount": {"create": False, "name": "captioner", "automount": True},
            "podAnnotations": {"cluster-autoscaler.kubernetes.io/safe-to-evict": "true"},
            "podLabels": {"team": "vision"},
            "service": {"type": "LoadBalancer", "annotations": {"networking.gke.io/load-balancer-type": "Internal"}},
            "extraEnv": [
                {"name": "CAPTION_MAX_INFLIGHT", "valueFrom": {"configMapKeyRef": {"name": "caption-tuning", "key": "max-inflight"}}},
                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            ],
            "extraVolumes": [{"name": "scratch", "emptyDir": {"sizeLimit": "2Gi"}}],
            "extraVolumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
            "priorityClassName": "inference-high",
            "runtimeClassName": "nvidia",
            "device": "cuda",
            "gpus": 1,
            "gpuResource": "nvidia.com/mig-3g.40gb",
            "autoscaling": {"enabled": True, "maxReplicas": 6, "queueDepth": {"enabled": True, "averageValue": "4"}},
            "podDisruptionBudget": {"enabled": True, "minAvailable": 1, "maxUnavailable": None},
            "topologySpread": [{"topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "DoNotSchedule"}],
        },
    ),
    # replicaCount, the count's former name, still wins (and NOTES.txt says it is deprecated).
    ("combined, the deprecated replicaCount", "caption-cascade-prod", {"replicaCount": 3, "replicas": 2, "nameOverride": "captioner"}),
    (
        # The callers' TLS and token without mutual TLS: the test hook verifies the Service with a
        # CA of its own and sends the first line of the token.
        "combined, TLS and a token, the test hook secured",
        "demo",
        {
            "tls": {"secretName": "caption-tls"},
            "auth": {"tokenSecretName": "caption-token", "tokenSecretKey": "bearer"},
            "helmTest": {"caSecretName": "caption-ca"},
            "podDisruptionBudget": {"enabled": True},
        },
    ),
    ("combined, no test hook, no chart resources", "demo", {"helmTest": {"enabled": False, "resources": None}, "resources": None, "models": {"source": "pull", "pull": {"resources": None}}}),
    (
        # Every tier placed on its own: the generator on full GPUs it names cuda itself, the ranker
        # on a MIG slice with the global device (auto), the cascade from another repository.
        "split, each tier placed on its own",
        "demo",
        {
            "topology": "split",
            "image": {"repository": "registry.example.com/caption-cascade", "tag": "0.1.0"},
            "runtimeClassName": "",
            "podAnnotations": {"a": "1"},
            "extraEnv": [{"name": "RUST_BACKTRACE", "value": "1"}],
            "extraVolumes": [{"name": "shared", "emptyDir": {}}],
            "extraVolumeMounts": [{"name": "shared", "mountPath": "/shared"}],
            "generator": {
                "device": "cuda",
                "gpus": 2,
                "runtimeClassName": "nvidia",
                "priorityClassName": "gpu-high",
                "podAnnotations": {"a": "2", "b": "3"},
                "podLabels": {"pool": "gpu"},
                "extraEnv": [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}],
                "extraVolumes": [{"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}}],
                "extraVolumeMounts": [{"name": "shm", "mountPath": "/dev/shm"}],
                "serviceAnnotations": {"service.kubernetes.io/topology-mode": "Auto"},
                "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["a100"]}]}]}}},
            },
            "ranker": {"gpus": 1, "gpuResource": "nvidia.com/mig-1g.10gb", "runtimeClassName": "nvidia", "image": {"tag": "0.1.1"}},
            "cascade": {"image": {"repository": "registry.example.com/caption-cascade-edge"}, "priorityClassName": "edge"},
        },
    ),
    (
        # A registry whose tags name the variant themselves: no suffix, the GPU tier's tag given.
        "split, the registry's own CUDA tags",
        "demo",
        {
            "topology": "split",
            "device": "cuda",
            "image": {"cudaTagSuffix": "", "tag": "0.1.0-cpu"},
            "generator": {"gpus": 1, "image": {"tag": "0.1.0-gpu"}},
            "ranker": {"gpus": 1, "device": "cpu"},
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
    ("a misspelt value", {"replica": 3}, "additional properties 'replica' not allowed"),
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
    # A device the pods cannot have fails the render, not the pod's start.
    ("cuda without a GPU", {"device": "cuda"}, "device is cuda but gpus is 0"),
    ("a tier's cuda without a GPU", {**SPLIT_ON, "ranker": {"device": "cuda"}}, "ranker.device is cuda but ranker.gpus is 0"),
    ("global cuda, no tier with a GPU", {**SPLIT_ON, "device": "cuda"}, "and none does: set generator.gpus"),
    ("cuda on the cpu image", {"gpus": 1, "device": "cuda", "image": {"variant": "cpu"}}, "holds no CUDA libraries: set image.variant"),
    (
        "a tier's cuda on the cpu image",
        {**SPLIT_ON, "generator": {"gpus": 1, "device": "cuda", "image": {"variant": "cpu"}}},
        "set generator.image.variant",
    ),
    ("the cascade has no GPUs", {**SPLIT_ON, "cascade": {"gpus": 1}}, "additional properties 'gpus' not allowed"),
    ("a misspelt tier image key", {**SPLIT_ON, "generator": {"image": {"tags": "0.1.0"}}}, "additional properties 'tags' not allowed"),
    ("a GPU resource without a domain", {"gpuResource": "gpu"}, "does not match pattern"),
    ("an image tag with a slash", {"image": {"tag": "v1/cuda"}}, "does not match pattern"),
    ("imagePullSecrets as names", {"imagePullSecrets": ["regcred"]}, "want object"),
    ("podLabels replace a chart label", {"podLabels": {"app.kubernetes.io/name": "x"}}, "is the chart's own label"),
    ("a tier's podLabels replace a chart label", {**SPLIT_ON, "ranker": {"podLabels": {"helm.sh/chart": "x"}}}, "is the chart's own label"),
    ("extraEnv duplicates CAPTION_DEVICE", {"extraEnv": [{"name": "CAPTION_DEVICE", "value": "cpu"}]}, "use the value device"),
    ("extraEnv repeats an env name", {"env": {"RUST_LOG": "info"}, "extraEnv": [{"name": "RUST_LOG", "value": "debug"}]}, "is set twice"),
    (
        "a tier's extraEnv repeats the global one",
        {**SPLIT_ON, "extraEnv": [{"name": "A", "value": "1"}], "cascade": {"extraEnv": [{"name": "A", "value": "2"}]}},
        "is set twice",
    ),
    ("extraEnv with a misspelt key", {"extraEnv": [{"name": "A", "valuefrom": {}}]}, "additional properties 'valuefrom' not allowed"),
    ("an extra volume named like the chart's", {"extraVolumes": [{"name": "tmp", "emptyDir": {}}]}, "names a volume tmp itself"),
    ("a mount outside the tree", {"extraVolumeMounts": [{"name": "x", "mountPath": "cache"}]}, "does not match pattern"),
    (
        "combined HPA max below min",
        {"autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 2}},
        "autoscaling.maxReplicas (2) is below minReplicas (3)",
    ),
    (
        "combined CPU HPA without a CPU request",
        {"autoscaling": {"enabled": True}, "resources": {"requests": {"cpu": None}}},
        "set resources.requests.cpu",
    ),
    ("a negative replicaCount", {"replicaCount": -1}, "minimum"),
    ("a service account name that is no name", {"serviceAccount": {"name": "Caption_SA"}}, "does not match pattern"),
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


NAMESPACE = "captioning"


def render_all(chart: helm.Chart, release: str, values: dict | None) -> tuple[list[dict], str]:
    """The manifests (hooks included) and NOTES.txt an install with `values` renders."""
    manifests = chart.render(values, name=release, namespace=NAMESPACE)
    notes = "".join(text for path, text in manifests.items() if path.endswith("/NOTES.txt"))
    docs = [doc for path, text in manifests.items() if not path.endswith("/NOTES.txt") for doc in yaml.safe_load_all(text) if doc]
    return docs, notes


def render(chart: helm.Chart, release: str, values: dict | None) -> list[dict]:
    return render_all(chart, release, values)[0]


def is_hook(doc: dict) -> bool:
    return "helm.sh/hook" in (doc["metadata"].get("annotations") or {})


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


RECOMMENDED_LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/component",
    "app.kubernetes.io/part-of",
    "app.kubernetes.io/managed-by",
    "helm.sh/chart",
)


def check_labels(docs: list[dict], values: dict) -> None:
    """Kubernetes' recommended labels and helm.sh/chart on every object and pod template, with this
    release's values; and no selector of the release takes a test hook's pod for one of its own."""
    want = {
        "app.kubernetes.io/instance": values["_release"],
        "app.kubernetes.io/version": values["_app_version"],
        "app.kubernetes.io/part-of": chart_name(values),
        "app.kubernetes.io/managed-by": "Helm",
        "helm.sh/chart": f"caption-cascade-{values['_chart_version']}",
    }
    for doc in docs:
        what = f"{doc['kind']}/{doc['metadata']['name']}"
        maps = [(what, doc["metadata"].get("labels") or {})]
        if doc["kind"] == "Deployment":
            maps.append((f"{what}'s pods", pod_labels(doc)))
        for where, labels in maps:
            missing = [key for key in RECOMMENDED_LABELS if not labels.get(key)]
            expect(not missing, f"{where}: no {', '.join(missing)} label")
            wrong = {k: labels[k] for k, v in want.items() if labels[k] != v}
            expect(not wrong, f"{where}: labels {wrong}, want {[want[k] for k in wrong]}")
            if not is_hook(doc):
                expect(labels["app.kubernetes.io/name"] == chart_name(values), f"{where}: app.kubernetes.io/name {labels['app.kubernetes.io/name']}")
    selectors_of = [(f"{d['kind']}/{d['metadata']['name']}", sel) for d in docs for sel in [selector_of(d)] if sel]
    for pod in (d for d in docs if d["kind"] == "Pod"):
        taken = [name for name, sel in selectors_of if selects(sel, pod["metadata"].get("labels") or {})]
        expect(not taken, f"{', '.join(taken)} select the test pod {pod['metadata']['name']}")


def selector_of(doc: dict) -> dict | None:
    """The pod selector of an object that selects pods."""
    if doc["kind"] == "Service":
        return doc["spec"].get("selector")
    if doc["kind"] in ("Deployment", "PodDisruptionBudget"):
        return doc["spec"]["selector"].get("matchLabels")
    return None


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
    """The part's settings, resolved as the chart must: a split tier's own values over the ones every
    pod gets; combined, the top-level values. Device: a tier's own, else the global one when the tier
    has GPUs, else cpu (combined: the top-level device is its own). Image: the tier's repository and
    tag, else the global ones (tag: appVersion), with the cuda suffix when the variant is cuda (auto:
    a tier with GPUs whose device is not cpu)."""
    split = component != "combined"
    if split:
        own = values[component]
    else:
        replicas = values["replicaCount"] if values.get("replicaCount") is not None else values["replicas"]
        own = {key: values.get(key) for key in ("device", "gpus", "resources", "nodeSelector", "tolerations", "affinity", "autoscaling", "podDisruptionBudget", "topologySpread")}
        own["replicas"] = replicas
    gpus = int(own.get("gpus") or 0)
    device = own.get("device") or (values["device"] if gpus > 0 else "cpu")
    image = own.get("image") or {}
    variant = image.get("variant") or values["image"]["variant"]
    if variant == "auto":
        variant = "cuda" if gpus > 0 and device != "cpu" else "cpu"
    tag = str(image.get("tag") or values["image"]["tag"] or values["_app_version"])
    tag += values["image"]["cudaTagSuffix"] if variant == "cuda" else ""

    def inherited(key: str) -> object:
        return (own.get(key) if split else None) or values.get(key) or None

    def added(key: str, empty: type) -> object:
        mine = (own.get(key) if split else None) or empty()
        common = values.get(key) or empty()
        return {**common, **mine} if empty is dict else [*common, *mine]

    return {
        "replicas": own.get("replicas"),
        "device": device,
        "gpus": gpus,
        "gpuResource": (own.get("gpuResource") if split else None) or values["gpuResource"],
        "variant": variant,
        "image": f"{image.get('repository') or values['image']['repository']}:{tag}",
        "resources": own.get("resources"),
        "nodeSelector": own.get("nodeSelector") or None,
        "tolerations": own.get("tolerations") or None,
        "affinity": own.get("affinity") or None,
        "runtimeClassName": inherited("runtimeClassName"),
        "priorityClassName": inherited("priorityClassName"),
        "podAnnotations": added("podAnnotations", dict),
        "podLabels": added("podLabels", dict),
        "env": added("env", dict),
        "extraEnv": added("extraEnv", list),
        "extraVolumes": added("extraVolumes", list),
        "extraVolumeMounts": added("extraVolumeMounts", list),
        "autoscaling": own.get("autoscaling") or {"enabled": False},
        "podDisruptionBudget": own.get("podDisruptionBudget") or {"enabled": False},
        "topologySpread": own.get("topologySpread") or [],
    }


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
    device = own["device"]
    expect(env.get("CAPTION_DEVICE") == device, f"{what}: CAPTION_DEVICE={env.get('CAPTION_DEVICE')!r}, want {device!r}")
    expect(device in DEVICES, f"device {device!r} is not one of {sorted(DEVICES)}")
    expect(component != "cascade" or device == "cpu", f"{what}: the cascade loads no models, yet runs on {device!r}")
    for name, value in own["env"].items():  # the part's own env wins
        expect(env.get(name) == str(value), f"{what}: env.{name}: the container has {env.get(name)!r}, want {str(value)!r}")
    entries = {e["name"]: e for e in container.get("env", [])}
    for extra in own["extraEnv"]:
        expect(entries.get(extra["name"]) == extra, f"{what}: extraEnv {extra['name']}: the container has {entries.get(extra['name'])}, want {extra}")

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

    check_placement(component, deployment, own, values)


def gpu_limits(container: dict) -> dict:
    """The extended resources of a container's limits that name a GPU (or a slice of one)."""
    limits = (container.get("resources") or {}).get("limits") or {}
    return {k: v for k, v in limits.items() if "/" in k}


def check_placement(component: str, deployment: dict, own: dict, values: dict) -> None:
    """Where a part's pods run and with what: GPUs, image, scheduling, the pod's metadata, the service
    account, pull secrets and extra volumes."""
    what = deployment["metadata"]["name"]
    container = main_container(deployment)
    spec = deployment["spec"]["template"]["spec"]
    gpus = own["gpus"]
    want_gpus = {own["gpuResource"]: gpus} if gpus > 0 else {}
    got = {k: int(v) for k, v in gpu_limits(container).items()}
    expect(got == want_gpus, f"{what}: GPU limits {got}, want {want_gpus}")
    expect(container["image"] == own["image"], f"{what}: image {container['image']!r}, want {own['image']!r}")
    if own["device"] == "cuda":
        expect(gpus > 0 and own["variant"] == "cuda", f"{what}: device cuda with {gpus} GPUs on the {own['variant']} image")
    for key in ("nodeSelector", "tolerations", "affinity", "runtimeClassName", "priorityClassName"):
        expect((spec.get(key) or None) == own[key], f"{what}: {key} {spec.get(key)}, want {own[key]}")
    spread = spec.get("topologySpreadConstraints") or []
    want = own["topologySpread"]
    expect([c["topologyKey"] for c in spread] == [w["topologyKey"] for w in want], f"{what}: spread over {spread}, want {want}")
    for c in spread:
        expect(selects(c["labelSelector"]["matchLabels"], pod_labels(deployment)), f"{what}: a spread constraint misses its own pods")
    meta = deployment["spec"]["template"]["metadata"]
    expect((meta.get("annotations") or {}) == own["podAnnotations"], f"{what}: pod annotations {meta.get('annotations')}, want {own['podAnnotations']}")
    expect(own["podLabels"].items() <= pod_labels(deployment).items(), f"{what}: pod labels {pod_labels(deployment)} miss {own['podLabels']}")
    account = values["serviceAccount"]
    want_account = (account["name"] or fullname(values)) if account["create"] else (account["name"] or "default")
    expect(spec.get("serviceAccountName") == want_account, f"{what}: service account {spec.get('serviceAccountName')!r}, want {want_account!r}")
    expect(spec.get("automountServiceAccountToken") is bool(account["automount"]), f"{what}: automountServiceAccountToken {spec.get('automountServiceAccountToken')}")
    expect((spec.get("imagePullSecrets") or []) == values["imagePullSecrets"], f"{what}: imagePullSecrets {spec.get('imagePullSecrets')}")
    volumes = spec.get("volumes") or []
    for extra in own["extraVolumes"]:
        expect(extra in volumes, f"{what}: extra volume {extra['name']} is missing")
    mounts = container.get("volumeMounts") or []
    for extra in own["extraVolumeMounts"]:
        expect(extra in mounts, f"{what}: extra volume mount {extra['mountPath']} is missing")
    expect(len({v["name"] for v in volumes}) == len(volumes), f"{what}: two volumes share a name")


def image_tag(image: str) -> str:
    """The tag of an image reference ("" when it has none)."""
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else ""


def check_policy(docs: list[dict], values: dict) -> None:
    """What admission policies (Kyverno's and Gatekeeper's best-practice sets, kube-linter) refuse:
    a container without CPU and memory requests or a memory limit (unless the values drop the
    resources on purpose, null), a server container without probes, an image without a tag or
    tagged latest."""
    deliberate = {"models.pull.resources": values["models"]["pull"].get("resources") is None, "helmTest.resources": values["helmTest"].get("resources") is None}
    for doc in docs:
        if doc["kind"] == "Deployment":
            spec = doc["spec"]["template"]["spec"]
            component = component_of(doc)
            owner = f"{component}.resources" if component in SPLIT else "resources"
            deliberate[owner] = settings(values, component)["resources"] is None
            groups = [(owner, [c]) for c in spec["containers"]] + [("models.pull.resources", [c]) for c in spec.get("initContainers", [])]
            for c in spec["containers"]:
                missing = [p for p in ("startupProbe", "readinessProbe", "livenessProbe") if not c.get(p)]
                expect(not missing, f"{doc['metadata']['name']} container {c['name']}: no {', '.join(missing)}")
        elif doc["kind"] == "Pod":
            spec = doc["spec"]
            groups = [("helmTest.resources", [c]) for c in spec["containers"]]
        else:
            continue
        for owner, containers in groups:
            for c in containers:
                what = f"{doc['kind']}/{doc['metadata']['name']} container {c['name']}"
                tag = image_tag(c["image"])
                expect(tag and tag != "latest", f"{what}: image {c['image']!r} has no pinned tag")
                if deliberate[owner]:
                    continue
                resources = c.get("resources") or {}
                requests, limits = resources.get("requests") or {}, resources.get("limits") or {}
                expect(requests.get("cpu") and requests.get("memory"), f"{what}: requests {requests}: set a CPU and a memory request ({owner})")
                expect(limits.get("memory"), f"{what}: limits {limits}: set a memory limit ({owner})")


# The sample scene the test hook captions, and what the embedded models say of it.
TEST_SCENE = ROOT / "examples" / "images" / "scene_1.png"


def check_test_hook(docs: list[dict], values: dict) -> None:
    """`helm test`: a Pod running the callers' tier's image that captions the shipped scene through
    the callers' Service, with the CA and token callers need; none with mutual TLS or when off."""
    hooks = [d for d in docs if is_hook(d)]
    tls = values["tls"]
    if not values["helmTest"]["enabled"] or tls.get("clientCASecretName"):
        expect(not hooks, f"test hooks {[h['metadata']['name'] for h in hooks]} with helmTest off or mutual TLS")
        return
    for hook in hooks:
        annotations = hook["metadata"]["annotations"]
        expect(annotations["helm.sh/hook"] == "test", f"{hook['metadata']['name']}: hook {annotations['helm.sh/hook']}")
    pods = [h for h in hooks if h["kind"] == "Pod"]
    maps = [h for h in hooks if h["kind"] == "ConfigMap"]
    expect(len(pods) == 1 and len(maps) == 1 and len(hooks) == 2, f"test hooks {[(h['kind'], h['metadata']['name']) for h in hooks]}, want a Pod and its ConfigMap")
    pod, scene = pods[0], maps[0]
    weight = lambda h: int(h["metadata"]["annotations"].get("helm.sh/hook-weight", "0"))  # noqa: E731
    expect(weight(scene) < weight(pod), "the scene's ConfigMap is not created before the test Pod")
    spec = pod["spec"]
    expect(spec.get("restartPolicy") == "Never", f"test pod restartPolicy {spec.get('restartPolicy')}")
    check_security(pod, "the test pod")
    (container,) = spec["containers"]
    callers = settings(values, "combined" if values["topology"] == "combined" else "cascade")
    expect(container["image"] == callers["image"], f"the test pod runs {container['image']}, want the callers' tier's {callers['image']}")
    expect((spec.get("imagePullSecrets") or []) == values["imagePullSecrets"], f"test pod imagePullSecrets {spec.get('imagePullSecrets')}")
    argv = hook_argv(container)
    expect(argv[:2] == ["caption-cascade", "caption"], f"the test pod runs {argv[:2]}, want caption-cascade caption")
    flags = dict(zip(argv, argv[1:]))
    scheme = "https" if tls.get("secretName") else "http"
    want = f"{scheme}://{fullname(values)}:{values['service']['port']}"
    expect(flags.get("--endpoint") == want, f"the test pod dials {flags.get('--endpoint')}, want the callers' Service {want}")
    files = mounted_files(pod, container, docs)
    image = argv[-1]
    expect(files.get(image) == ("configMap", scene["metadata"]["name"], "scene.png"), f"the test pod captions {image}, which is {files.get(image)}")
    data = base64.b64decode(scene.get("binaryData", {}).get("scene.png", ""))
    expect(data == TEST_SCENE.read_bytes(), f"the ConfigMap's scene.png is not {TEST_SCENE.relative_to(ROOT)}")
    if scheme == "https":
        ca = values["helmTest"].get("caSecretName") or tls["secretName"]
        expect(files.get(flags.get("--endpoint-ca")) == ("secret", ca, "ca.crt"), f"--endpoint-ca {flags.get('--endpoint-ca')} is {files.get(flags.get('--endpoint-ca'))}, want ca.crt of {ca}")
    else:
        expect("--endpoint-ca" not in flags, "--endpoint-ca without TLS")
    token = required_token(values, "cascade")
    if token:
        expect("--endpoint-token-file" in flags, "the test pod sends no token, the Service requires one")
        expect(token_source(container, files) == ("secret", token["name"], token["key"]), f"the test pod's token comes from {token_source(container, files)}, want {token}")
    else:
        expect("--endpoint-token-file" not in flags and not container.get("command"), "the test pod sends a token the Service does not ask for")


def hook_argv(container: dict) -> list[str]:
    """The command line the test container runs: its command's `exec caption-cascade "$@"`
    wrapper stands for caption-cascade itself (the image's entrypoint)."""
    command = container.get("command") or ["caption-cascade"]
    if command[:2] == ["sh", "-c"]:
        expect(command[2].endswith('exec caption-cascade "$@"') and len(command) == 4, f"test pod command {command}")
        command = ["caption-cascade"]
    return command + [str(a) for a in container.get("args") or []]


def token_source(container: dict, files: dict) -> tuple | None:
    """Where the token file the test pod sends comes from: the first line of a mounted key, copied
    to /tmp by its command."""
    argv = hook_argv(container)
    path = argv[argv.index("--endpoint-token-file") + 1]
    command = container.get("command") or []
    if command[:2] == ["sh", "-c"]:
        copied = re.fullmatch(r"head -n 1 (\S+) > (\S+) && exec caption-cascade \"\$@\"", command[2])
        expect(copied and copied.group(2) == path, f"the token file {path} is not the first line of a mounted key: {command}")
        return files.get(copied.group(1))
    return files.get(path)


def mounted_files(pod: dict, container: dict, docs: list[dict]) -> dict[str, tuple[str, str, str]]:
    """Each file a container sees through a ConfigMap or Secret volume: path -> (kind, name, key)."""
    volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
    files = {}
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        for kind, name_key in (("configMap", "name"), ("secret", "secretName")):
            source = volume.get(kind)
            if not source:
                continue
            name = source[name_key]
            items = source.get("items")
            if items is None:
                owned = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == name]
                keys = list((owned[0].get("data") or {}) | (owned[0].get("binaryData") or {})) if owned else []
                items = [{"key": k, "path": k} for k in keys]
            for item in items:
                files[f"{mount['mountPath'].rstrip('/')}/{item['path']}"] = (kind, name, item["key"])
    return files


def check_notes(notes: str, values: dict) -> None:
    """NOTES.txt says where the callers' Service is, how to reach it from a workstation (a
    port-forward and one call), whether `helm test` is there, and that replicaCount is deprecated."""
    name, namespace = fullname(values), NAMESPACE
    scheme = "https" if values["tls"].get("secretName") else "http"
    for text in (
        f"{scheme}://{name}.{namespace}.svc:{values['service']['port']}",
        f"kubectl -n {namespace} port-forward svc/{name} 50051:{values['service']['port']}",
        "caption-cascade caption --endpoint ",
    ):
        expect(text in notes, f"NOTES.txt does not say {text!r}:\n{notes}")
    for component in (["combined"] if values["topology"] == "combined" else SPLIT):
        own = settings(values, component)
        expect(f"device {own['device']}," in notes and f"image {own['image']}," in notes, f"NOTES.txt does not give the {component}'s device {own['device']} and image {own['image']}")
    hook = values["helmTest"]["enabled"] and not values["tls"].get("clientCASecretName")
    expect((f"helm test {values['_release']} -n {namespace}" in notes) == hook, f"NOTES.txt and the test hook disagree (hook: {hook})")
    if values["helmTest"]["enabled"] and not hook:
        expect("`helm test` is not installed: with mutual TLS" in notes, "NOTES.txt does not say why there is no test hook")
    expect(("replicaCount" in notes) == (values.get("replicaCount") is not None), "NOTES.txt and replicaCount's deprecation disagree")
    if values["auth"].get("tokenSecretName"):
        expect("--endpoint-token-file" in notes, "NOTES.txt's call sends no token")


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
    expect(front["metadata"]["name"] == fullname(values), f"the callers' Service is {front['metadata']['name']}, want the release's fullname")
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


def chart_name(values: dict) -> str:
    return (values.get("nameOverride") or "caption-cascade")[:63].rstrip("-")


def fullname(values: dict) -> str:
    """The object names' prefix: fullnameOverride, else <release>-<name> (<release> when it holds the name)."""
    if values.get("fullnameOverride"):
        return values["fullnameOverride"][:63].rstrip("-")
    release, name = values["_release"], chart_name(values)
    full = release if name in release else f"{release}-{name}"
    return full[:63].rstrip("-")


def check_autoscaling(by_kind: dict[str, list[dict]], deployments: dict[str, dict], values: dict) -> None:
    """Each part's HPA scales its own Deployment; each PDB covers its own pods only (both topologies,
    behind the same values)."""
    hpas = by_kind.get("HorizontalPodAutoscaler", [])
    pdbs = by_kind.get("PodDisruptionBudget", [])
    tiers = {component: settings(values, component) for component in deployments}
    for component, own in tiers.items():
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
                expect(label == QUEUE_MODEL.get(component), f"{component}: queue depth of model {label!r}, want {QUEUE_MODEL[component]!r}")
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
    expect(len(hpas) == sum(t["autoscaling"]["enabled"] for t in tiers.values()), "HPAs that target no part")
    expect(len(pdbs) == sum(t["podDisruptionBudget"]["enabled"] for t in tiers.values()), "PDBs that cover no part")


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


def check_value_set(chart: helm.Chart, release: str, overrides: dict | None, versions: list[str]) -> list[dict]:
    """Renders an install with `overrides`, validates every manifest and checks all of it against
    the values Helm coalesces (the expectations). Returns the manifests."""
    chart.validate_schema(overrides)
    docs, notes = render_all(chart, release, overrides)
    validate(docs, versions)
    check_names_and_labels(docs)
    values = chart.merge_values(overrides)
    values["_release"] = release
    values["_app_version"] = str(chart.metadata["appVersion"])
    values["_chart_version"] = str(chart.metadata["version"])
    check_labels(docs, values)
    check_deployer_contract([d for d in docs if not is_hook(d)], values)
    check_policy(docs, values)
    check_test_hook(docs, values)
    check_notes(notes, values)
    return docs


def check_documented(chart: helm.Chart, command: chart_docs.Command, versions: list[str]) -> int:
    """A documented command renders, validates and passes every check, and each tier gets the
    device, GPUs and image the documentation says it does."""
    docs = check_value_set(chart, command.release, command.values, versions)
    deployments = {component_of(d): d for d in docs if d["kind"] == "Deployment"}
    expect(set(command.expected) == set(deployments), f"it says what {sorted(command.expected) or 'no tier'} get(s), it renders {sorted(deployments)}: add a `# → TIER: device D, N RESOURCE|no GPU, image I` line for each")
    for tier, (device, gpus, image) in command.expected.items():
        container = main_container(deployments[tier])
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        got = (env.get("CAPTION_DEVICE"), {k: int(v) for k, v in gpu_limits(container).items()}, container["image"])
        expect(got == (device, gpus, image), f"{tier}: renders device {got[0]}, GPUs {got[1]}, image {got[2]}; the documentation says {device}, {gpus}, {image}")
    return len(docs)


def check_package(chart_dir: Path) -> list[str]:
    """`helm package` keeps what the templates read (the test hook's scene) and the README, and
    .helmignore exists to keep editor and VCS files out."""
    if not (chart_dir / ".helmignore").is_file():
        return [f"{chart_dir.name} has no .helmignore"]
    with tempfile.TemporaryDirectory() as out:
        archive = helm.package(str(chart_dir), destination=out)
        with helm.Chart.load(archive) as packaged:
            files = {f["name"] for f in packaged.files}
    missing = {"files/scene.png", "README.md"} - files
    return [f"the packaged chart lacks {sorted(missing)}"] if missing else []


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
                manifests += len(check_value_set(chart, release, overrides, versions))
                topologies.add(chart.merge_values(overrides)["topology"])
            except (Failed, helm.HelmError) as e:
                failures.append(f"{name}: {e}")
        expect_topologies = {"combined", "split"}
        if topologies != expect_topologies and not failures:
            failures.append(f"the scenarios render topologies {sorted(topologies)}, want both")
        try:
            commands = chart_docs.documented_commands()
        except (chart_docs.DocError, helm.HelmError, ValueError) as e:
            failures.append(f"documented commands: {e}")
            commands = []
        for command in commands:
            try:
                manifests += check_documented(chart, command, versions)
            except (Failed, helm.HelmError) as e:
                failures.append(f"{command.where} `{command.text}`: {e}")
        try:
            failures += chart_docs.check_values_documented(chart_dir, chart.schema)
        except (chart_docs.DocError, OSError) as e:
            failures.append(f"values documentation: {e}")
        try:
            failures += check_package(chart_dir)
        except (OSError, helm.HelmError) as e:
            failures.append(f"helm package: {e}")
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
        f"{len(SCENARIOS)} value sets (combined and split) and {len(commands)} documented commands -> {manifests} manifests valid on Kubernetes "
        f"{' and '.join(versions)} (strict schemas; ServiceMonitor checked by field), "
        f"{len(REFUSED)} bad value sets refused, {time.monotonic() - started:.2f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
