#!/usr/bin/env python3
"""Checks a built caption-cascade container image and captions the sample scenes inside it.

    tests/image/test_image.py [--image caption-cascade:0.1.0] [--variant cpu]

`make test-image` builds the image first and runs this. `podman run` does not work in the
sandboxes CI runs in (crun cannot set rlimits there), so the image's filesystem is reached with
`podman create` + `podman mount`, and its binary is run with `chroot --userspec` as the image's
user, with the image's environment, working directory and entrypoint, all read from
`podman image inspect`. Checked:

  * the config: user 10001:10001, entrypoint caption-cascade, command serve, port 50051, /app;
  * the contents: both models under /app/models; for the cpu variant no libtorch_cuda, no other
    CUDA library beyond the libcudart and libcupti libtorch_cpu itself needs, a binary that does
    not link libtorch_cuda;
  * `caption --device cpu --json` on every sample scene gives the caption in expected.json;
  * `serve` on loopback ports it picks itself (port 0, named in its --ready-file): the gRPC health
    check (main and health port, when grpcio is importable) and the same captions through
    `caption --endpoint`, the Helm chart's `helm test` Pod's command as the chart renders it (its
    ConfigMap's scene laid out where the Pod mounts it, the Service's address replaced by the
    server's), then a clean exit on SIGTERM.

Where runc is installed (`make image` installs it), the image is also run as a real container:
`podman run --runtime runc`, with rlimits below the sandbox's hard limits (podman's defaults are
above them, and crun also refuses the sandbox's hybrid cgroups): the captions in-process, then the
default command (serve) on the host's loopback, health, captions through it, the `helm test` Pod's
command in a container of its own, and `podman stop`.

The cuda variant gets the same runs, on the CPU: without a GPU (or the NVIDIA container toolkit
that mounts the driver) that proves its libraries load, not that CUDA works.
"""

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCENES = ROOT / "examples" / "images"
sys.path.insert(0, str(ROOT / "tests" / "helm"))
UID = 10001
# CUDA libraries the cpu image must not carry. libcudart and libcupti are allowed: the PyPI wheel's
# libtorch_cpu.so itself has DT_NEEDED entries for them.
CUDA_ONLY = re.compile(
    r"torch_cuda|c10_cuda|caffe2_nvrtc|cudnn|cublas|cufft|curand|cusolver|cusparse|nccl|nvrtc|nvshmem|nvJitLink|nvToolsExt|libcuda\.so"
)

failures = []


def check(ok, what):
    print(("ok    " if ok else "FAIL  ") + what, flush=True)
    if not ok:
        failures.append(what)


def sh(*args, **kw):
    return subprocess.run(args, check=True, text=True, capture_output=True, **kw).stdout.strip()


def needed(path):
    out = sh("readelf", "-dW", str(path))
    return re.findall(r"\(NEEDED\).*\[(.*)\]", out)


# serve binds port 0 on every listener and names the ports it got in --ready-file: a port picked
# here and handed over could be taken by anything else starting at the same time.
SERVE_LISTEN = {"CAPTION_LISTEN": "127.0.0.1:0", "CAPTION_HEALTH_LISTEN": "127.0.0.1:0"}


def wait_for_ready(path, running, timeout):
    """The addresses serve's --ready-file names once it is written (serve renames it into place
    whole, so it parses once it exists); None if the server stops first or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return json.loads(Path(path).read_text())
        except FileNotFoundError:
            pass
        if not running():
            return None
        time.sleep(0.2)
    return None


def port_of(addr):
    return int(addr.rsplit(":", 1)[1])


def ready_dir(path):
    """`path`, made a folder the image's user can write its ready file to."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, UID, UID)
    return path


def health(port, service):
    """grpc.health.v1.Health/Check without generated stubs: the request and response are one field."""
    import grpc

    request = b"\x0a" + bytes([len(service)]) + service.encode() if service else b""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        check_call = channel.unary_unary(
            "/grpc.health.v1.Health/Check", request_serializer=lambda b: b, response_deserializer=lambda b: b
        )
        response = check_call(request, timeout=10)
    return {b"\x08\x01": "SERVING", b"\x08\x02": "NOT_SERVING"}.get(response, response.hex())


def compare(stdout, expected, how):
    got = {}
    for line in stdout.splitlines():
        record = json.loads(line)
        name = Path(record["image"]).name
        got[name] = record["captions"][0]["text"] if record.get("captions") else record.get("error")
    for name, caption in sorted(expected.items()):
        check(got.get(name) == caption, f"{how}: {name} -> {got.get(name)!r}")


def hook_argv(folder, inside, port):
    """The chart's test Pod command line (default values: plaintext, no token) against 127.0.0.1:port,
    its volumes laid out in `folder`, which the command sees at `inside`."""
    import run_hook  # the Helm SDK: make test-image installs tests/helm/requirements.txt

    folder = Path(folder)
    folder.mkdir(mode=0o755, parents=True, exist_ok=True)
    folder.chmod(0o755)
    return run_hook.hook_command(None, {}, folder, inside, f"127.0.0.1:{port}"), run_hook.SCENE_CAPTION


def check_hook_output(result, caption, how):
    ok = result.returncode == 0
    check(ok, f"{how}: the helm test Pod's command{': ' + result.stderr[-2000:] if not ok else ''}")
    if ok:
        got = [c["text"] for line in result.stdout.splitlines() if line.strip() for c in json.loads(line).get("captions") or []]
        check(got == [caption], f"{how}: the helm test Pod's command captions the sample scene {got}")


# podman's default rlimits (nofile 1048576, nproc 4194304) are above the sandbox's hard limits.
PODMAN_RUN = ["podman", "run", "--runtime", "runc", "--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096"]


def container_run(image, expected):
    """The image as a container: its own entrypoint, user, working directory and environment."""
    mount = ["-v", f"{SCENES}:/scenes:ro"]
    images = [f"/scenes/{n}" for n in sorted(expected)]
    t = time.monotonic()
    result = subprocess.run(
        PODMAN_RUN + ["--rm", "--network", "none", *mount, image, "caption", "--device", "cpu", "--json", *images],
        text=True, capture_output=True, timeout=600,
    )
    check(result.returncode == 0, f"podman run: caption ({time.monotonic() - t:.1f} s){': ' + result.stderr[-2000:] if result.returncode else ''}")
    if result.returncode == 0:
        compare(result.stdout, expected, "podman run")

    ready = ready_dir(tempfile.mkdtemp(prefix="caption-image-test-"))
    listen = [a for k, v in SERVE_LISTEN.items() for a in ("-e", f"{k}={v}")]
    listen += ["-v", f"{ready}:/ready", "-e", "CAPTION_READY_FILE=/ready/serve.json"]
    name = f"caption-image-test-{os.getpid()}"
    # No command: the image's CMD (serve).
    started = subprocess.run(PODMAN_RUN + ["-d", "--name", name, "--network", "host", *listen, image], text=True, capture_output=True)
    check(started.returncode == 0, f"podman run -d (serve){': ' + started.stderr[-2000:] if started.returncode else ''}")
    if started.returncode != 0:
        shutil.rmtree(ready)
        return
    try:
        t = time.monotonic()

        def running():
            return sh("podman", "inspect", "--format", "{{.State.Running}}", name) == "true"

        bound = wait_for_ready(ready / "serve.json", running, 300)
        check(bound is not None, f"podman run: serve is ready: {bound} ({time.monotonic() - t:.1f} s)")
        if bound is None:
            print(subprocess.run(["podman", "logs", name], text=True, capture_output=True).stderr[-3000:])
            return
        port, health_port = port_of(bound["grpc"]), port_of(bound["health"])
        try:
            import grpc  # noqa: F401
        except ImportError:
            pass
        else:
            check(health(health_port, "caption.v1.Cascade") == "SERVING", "podman run: health check: SERVING")
        result = subprocess.run(
            PODMAN_RUN + ["--rm", "--network", "host", *mount, image, "caption", "--endpoint", f"http://127.0.0.1:{port}", "--json", *images],
            text=True, capture_output=True, timeout=600,
        )
        check(result.returncode == 0, f"podman run: caption --endpoint{': ' + result.stderr[-2000:] if result.returncode else ''}")
        if result.returncode == 0:
            compare(result.stdout, expected, "podman run, through serve")
        hook = Path(tempfile.mkdtemp(prefix="caption-hook-"))
        try:
            argv, caption = hook_argv(hook / "volumes", "/hook", port)
            entry = [] if argv[0] == "caption-cascade" else ["--entrypoint", json.dumps(argv[:1])]
            result = subprocess.run(
                PODMAN_RUN + ["--rm", "--network", "host", "-v", f"{hook / 'volumes'}:/hook", *entry, image, *argv[1:]],
                text=True, capture_output=True, timeout=600,
            )
            check_hook_output(result, caption, "podman run")
        finally:
            shutil.rmtree(hook)
        t = time.monotonic()
        subprocess.run(["podman", "stop", "--time", "30", name], capture_output=True)
        code = sh("podman", "inspect", "--format", "{{.State.ExitCode}}", name)
        check(code == "0", f"podman stop: serve drains and exits 0 (exit {code}, {time.monotonic() - t:.1f} s)")
    finally:
        subprocess.run(["podman", "rm", "--force", name], capture_output=True)
        shutil.rmtree(ready)


def main():
    run()
    if failures:
        sys.exit(1)


def run():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default="caption-cascade:0.1.0")
    parser.add_argument("--variant", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--startup-timeout", type=float, default=300)
    args = parser.parse_args()
    started = time.monotonic()

    info = json.loads(sh("podman", "image", "inspect", args.image))[0]
    config = info["Config"]
    env = dict(e.split("=", 1) for e in config.get("Env") or [])
    size = info["Size"]
    print(f"image {args.image}: {size / 1e6:.0f} MB ({size / 2**20:.0f} MiB), variant {args.variant}")
    check(config.get("User") == f"{UID}:{UID}", f"user is {UID}:{UID} ({config.get('User')!r})")
    check(config.get("Entrypoint") == ["caption-cascade"], f"entrypoint ({config.get('Entrypoint')})")
    check(config.get("Cmd") == ["serve"], f"command ({config.get('Cmd')})")
    check("50051/tcp" in (config.get("ExposedPorts") or {}), f"exposes 50051 ({config.get('ExposedPorts')})")
    check(config.get("WorkingDir") == "/app", f"working directory ({config.get('WorkingDir')!r})")
    check(env.get("LD_LIBRARY_PATH") == "/app/lib", f"LD_LIBRARY_PATH ({env.get('LD_LIBRARY_PATH')!r})")
    check((config.get("Labels") or {}).get("caption-cascade.variant") == args.variant, "variant label")

    container = sh("podman", "create", args.image)
    mnt = None
    server = None
    try:
        mnt = Path(sh("podman", "mount", container))
        app = mnt / "app"
        binary = app / "bin" / "caption-cascade"
        check(binary.is_file() and os.access(binary, os.X_OK), "/app/bin/caption-cascade")
        for model in ("shapes-blip", "shapes-clip"):
            check((app / "models" / model / "model.safetensors").is_file(), f"/app/models/{model}")
        check(
            any(line.split(":")[2] == str(UID) for line in (mnt / "etc/passwd").read_text().splitlines()),
            f"user {UID} in /etc/passwd",
        )
        libs = sorted(p.name for p in (app / "lib").iterdir())
        lib_mb = sum((app / "lib" / n).stat().st_size for n in libs) / 1e6
        print(f"      /app/lib: {', '.join(libs)} ({lib_mb:.0f} MB); binary {binary.stat().st_size / 1e6:.0f} MB")
        # Every DT_NEEDED of the binary and the bundled libraries resolves inside the image (the
        # cuda variant's only proof, since it cannot run here); the CUDA driver comes from the host.
        system_dirs = [mnt / "lib/x86_64-linux-gnu", mnt / "usr/lib/x86_64-linux-gnu", mnt / "lib64"]
        unresolved = set()
        for obj in [binary] + [app / "lib" / n for n in libs]:
            for n in needed(obj):
                if n == "libcuda.so.1" and args.variant == "cuda":
                    continue
                if not any((d / n).exists() for d in [app / "lib"] + system_dirs):
                    unresolved.add(f"{n} (of {obj.name})")
        check(not unresolved, f"every needed library is in the image {sorted(unresolved)}")
        if args.variant == "cpu":
            check(not any(re.search(r"torch_cuda|c10_cuda", n) for n in needed(binary)), "binary does not link libtorch_cuda")
            stray = []
            for dirpath, dirnames, filenames in os.walk(mnt):
                for n in dirnames + filenames:
                    if n == "nvidia" or CUDA_ONLY.search(n):
                        stray.append(os.path.join(dirpath, n)[len(str(mnt)):])
            check(not stray, f"no libtorch_cuda or other CUDA-only files ({stray[:5]})")
        else:
            check("libtorch_cuda.so" in needed(binary) and "libtorch_cuda.so" in libs, "binary links libtorch_cuda")
            print("      cuda variant: run on the CPU below (no GPU here), which loads every DT_NEEDED library;")
            print("      the GPU path and the libraries it dlopens (cuDNN's parts, NVRTC) are not exercised")

        expected = json.loads((SCENES / "expected.json").read_text())
        scenes = app / "scenes"
        scenes.mkdir(mode=0o755, exist_ok=True)
        for name in expected:
            shutil.copyfile(SCENES / name, scenes / name)
            (scenes / name).chmod(0o644)
        images = [f"/app/scenes/{n}" for n in sorted(expected)]

        # As `podman run --user` would: the image's environment only (HOME from its passwd entry),
        # its working directory, its entrypoint found through its PATH.
        run_env = {**env, "HOME": "/app"}
        prefix = ["chroot", f"--userspec={UID}:{UID}", str(mnt), "/usr/bin/env", f"--chdir={config['WorkingDir']}"]
        entry = config["Entrypoint"]

        t = time.monotonic()
        result = subprocess.run(
            prefix + entry + ["caption", "--device", "cpu", "--json", *images],
            env=run_env, text=True, capture_output=True, timeout=600,
        )
        check(result.returncode == 0, f"caption in the image as {UID} ({time.monotonic() - t:.1f} s){': ' + result.stderr[-2000:] if result.returncode else ''}")
        if result.returncode == 0:
            compare(result.stdout, expected, "in-process")

        # The ready file is written inside the chroot and read here through the mount.
        ready_in_image = f"/tmp/caption-ready-{os.getpid()}"
        ready = ready_dir(mnt / ready_in_image.lstrip("/"))
        serve_env = {**run_env, **SERVE_LISTEN, "CAPTION_READY_FILE": f"{ready_in_image}/serve.json"}
        log = tempfile.TemporaryFile(mode="w+")
        t = time.monotonic()
        server = subprocess.Popen(prefix + entry + config["Cmd"], env=serve_env, stdout=log, stderr=subprocess.STDOUT)
        bound = wait_for_ready(ready / "serve.json", lambda: server.poll() is None, args.startup_timeout)
        check(bound is not None, f"serve is ready: {bound} ({time.monotonic() - t:.1f} s)")
        if bound is None:
            log.seek(0)
            print(log.read()[-3000:])
            return
        port, health_port = port_of(bound["grpc"]), port_of(bound["health"])
        try:
            import grpc  # noqa: F401
        except ImportError:
            print("      skip  gRPC health check: grpcio is not importable (make test installs it into .venv)")
        else:
            check(health(port, "caption.v1.Cascade") == "SERVING", "health check on the gRPC port: SERVING")
            check(health(health_port, "caption.v1.Cascade") == "SERVING", "health check on the health port: SERVING")
        t = time.monotonic()
        result = subprocess.run(
            prefix + entry + ["caption", "--endpoint", f"http://127.0.0.1:{port}", "--json", *images],
            env=run_env, text=True, capture_output=True, timeout=600,
        )
        check(result.returncode == 0, f"caption --endpoint in the image ({time.monotonic() - t:.1f} s){': ' + result.stderr[-2000:] if result.returncode else ''}")
        if result.returncode == 0:
            compare(result.stdout, expected, "through serve")
        inside = f"/tmp/caption-hook-{os.getpid()}"
        argv, caption = hook_argv(mnt / inside.lstrip("/"), inside, port)
        result = subprocess.run(prefix + argv, env=run_env, text=True, capture_output=True, timeout=600)
        shutil.rmtree(mnt / inside.lstrip("/"))
        check_hook_output(result, caption, "in the image")
        server.send_signal(signal.SIGTERM)
        try:
            code = server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            code = None
        check(code == 0, f"serve exits cleanly on SIGTERM (exit {code})")
        if code != 0:
            log.seek(0)
            print(log.read()[-3000:])
        server = None

        if shutil.which("runc"):
            container_run(args.image, expected)
        else:
            print("      skip  podman run: runc is not installed (crun cannot run containers in this sandbox)")
    finally:
        if server is not None and server.poll() is None:
            server.kill()
            server.wait()
        if mnt is not None:
            subprocess.run(["podman", "umount", container], capture_output=True)
        subprocess.run(["podman", "rm", "--force", container], capture_output=True)
        print(f"image test: {len(failures)} failure(s), {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
