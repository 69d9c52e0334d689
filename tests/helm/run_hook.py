#!/usr/bin/env python3
"""Runs the chart's `helm test` Pod's command, as rendered, against a running server.

    run_hook.py --binary PATH --endpoint HOST:PORT [--values JSON] [--secret NAME/KEY=FILE ...]

Renders the chart with the values, takes the test Pod's container command and args, and lays out
what its volumes would hold in a folder of its own: the ConfigMap's files as rendered, the Secrets'
keys from the files --secret names, an empty folder for each emptyDir. Every mount path in the
command line is moved into that folder, and the endpoint (the callers' Service) becomes HOST:PORT,
keeping its scheme: the certificate of a TLS server must then name HOST. `caption-cascade` is
--binary. Exits 0 when the command succeeds and prints the caption the embedded models give the
sample scene (examples/images/expected.json); 1 otherwise, with what went wrong.

tests/helm_chart.rs runs it against servers of the binary under test (plaintext; TLS with a token);
tests/image/test_image.py uses `hook_command` to run it inside the image.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import helm_python as helm
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "caption-cascade"
SCENE_CAPTION = json.loads((ROOT / "examples" / "images" / "expected.json").read_text())["scene_1.png"]


def rendered_hook(values: dict | None) -> tuple[dict, list[dict]]:
    """The test Pod and the other test hooks (its ConfigMap) of an install with `values`."""
    with helm.Chart.load(str(CHART)) as chart:
        manifests = chart.render(values, name="demo", namespace="captioning")
    docs = [d for path, text in manifests.items() if path.endswith(".yaml") for d in yaml.safe_load_all(text) if d]
    hooks = [d for d in docs if (d["metadata"].get("annotations") or {}).get("helm.sh/hook") == "test"]
    pods = [d for d in hooks if d["kind"] == "Pod"]
    if len(pods) != 1:
        raise SystemExit(f"the chart renders {len(pods)} test pods with {values}")
    return pods[0], [d for d in hooks if d["kind"] != "Pod"]


def hook_command(values: dict | None, secrets: dict[str, bytes], folder: Path, inside: str, endpoint: str) -> list[str]:
    """The test container's command line, with its volumes' files written under `folder` and the
    paths in it moved to `inside` (where `folder` is seen by the process that runs it: the same
    path, or its place in a container) and the endpoint's host and port replaced by `endpoint`.
    `secrets`: the bytes of each Secret key the Pod mounts, by "name/key". argv[0] stays
    `caption-cascade`, the image's entrypoint, unless the command runs it through `sh`."""
    pod, others = rendered_hook(values)
    (container,) = pod["spec"]["containers"]
    volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
    config_maps = {d["metadata"]["name"]: d for d in others if d["kind"] == "ConfigMap"}
    moves = {}
    for index, mount in enumerate(container.get("volumeMounts", [])):
        here = folder / f"volume-{index}"
        here.mkdir(parents=True)
        volume = volumes[mount["name"]]
        if "configMap" in volume:
            source = config_maps[volume["configMap"]["name"]]
            files = {k: v.encode() for k, v in (source.get("data") or {}).items()}
            files |= {k: base64.b64decode(v) for k, v in (source.get("binaryData") or {}).items()}
            items = volume["configMap"].get("items") or [{"key": k, "path": k} for k in files]
            for item in items:
                (here / item["path"]).write_bytes(files[item["key"]])
        elif "secret" in volume:
            name = volume["secret"]["secretName"]
            for item in volume["secret"]["items"]:
                ref = f"{name}/{item['key']}"
                if ref not in secrets:
                    raise SystemExit(f"the test pod mounts Secret key {ref}: pass --secret {ref}=FILE")
                (here / item["path"]).write_bytes(secrets[ref])
        elif "emptyDir" not in volume:
            raise SystemExit(f"the test pod mounts a {sorted(volume)} volume this runner cannot lay out")
        os.chmod(here, 0o777 if "emptyDir" in volume else 0o755)
        moves[mount["mountPath"].rstrip("/")] = f"{inside.rstrip('/')}/volume-{index}"

    # One pass: a moved path may itself lie under a mount path (/tmp).
    mounted = re.compile(r"(?<![^\s])(" + "|".join(re.escape(p) for p in sorted(moves, key=len, reverse=True)) + r")(?=/)")

    def moved(arg: str) -> str:
        return mounted.sub(lambda m: moves[m.group(1)], arg) if moves else arg

    argv = [moved(str(a)) for a in (container.get("command") or ["caption-cascade"]) + (container.get("args") or [])]
    at = argv.index("--endpoint") + 1
    url = urlsplit(argv[at])
    argv[at] = f"{url.scheme}://{endpoint}"
    return argv


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--binary", required=True, type=Path)
    parser.add_argument("--endpoint", required=True, help="HOST:PORT of the server")
    parser.add_argument("--values", default="null", help="the chart's values, JSON")
    parser.add_argument("--secret", action="append", default=[], help="NAME/KEY=FILE: a Secret key the pod mounts")
    args = parser.parse_args()
    secrets = {}
    for spec in args.secret:
        ref, _, path = spec.partition("=")
        secrets[ref] = Path(path).read_bytes()
    folder = Path(tempfile.mkdtemp(prefix="caption-hook-"))
    try:
        argv = hook_command(json.loads(args.values), secrets, folder, str(folder), args.endpoint)
        binary = args.binary.resolve()
        if argv[0] == "caption-cascade":
            argv[0] = str(binary)
        # Only what the container would have: no CAPTION_* variables of this process.
        env = {"PATH": f"{binary.parent}:/usr/bin:/bin", "LD_LIBRARY_PATH": os.environ.get("LD_LIBRARY_PATH", "")}
        result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    finally:
        shutil.rmtree(folder)
    shown = " ".join(argv)
    if result.returncode != 0:
        print(f"the test hook's command failed ({result.returncode}): {shown}\n{result.stderr[-3000:]}", file=sys.stderr)
        return 1
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    captions = [c["text"] for line in lines for c in line.get("captions") or []]
    if captions != [SCENE_CAPTION]:
        print(f"the test hook's command printed {result.stdout!r}, want the one caption {SCENE_CAPTION!r}: {shown}", file=sys.stderr)
        return 1
    print(f"test hook OK: {captions[0]!r} ({shown})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
