"""Runs every shell, Python and JavaScript block of the documentation, or checks why it cannot run.

Driven by tests/docs_snippets.rs; docs/development.md ("The docs test") is what it promises:

* every fenced block of the documented files carries a language; `sh`/`bash`/`shell`/`console`,
  `python` and `js`/`javascript` blocks are tested, each either run or marked on the line before
  its fence with `<!-- docs-test: REASON -->`, a reason from MARKERS whose tell-tale the block shows;
* a file's blocks run in order in one scratch directory holding the checkout's files, inside a private
  network namespace, so the documented ports (50051, 8000) are used as written;
* a `text` block right after a run block is its expected output;
* every relative link of these files names an existing file, and an existing heading for `#anchors`.

Usage: python snippets.py --binary PATH [--only SUFFIX ...] [--docs FILE ...]
(`--docs` tests those files instead of the project's documentation: the harness's own test uses it.)
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC_FILES = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    ROOT / "helm/caption-cascade/README.md",
    ROOT / "clients/python/README.md",
]
SHELL, PYTHON, JS = "shell", "python", "js"
TESTED = {"sh": SHELL, "bash": SHELL, "shell": SHELL, "console": SHELL, "python": PYTHON, "js": JS, "javascript": JS}
UNTESTED = {"text", "json", "yaml", "proto", "toml", "rust"}
MARKER = re.compile(r"^<!-- docs-test: (?P<reason>[a-z ]+?) -->$")
# Each reason, and what a block must show to carry it (so that no marker hides a block that could run).
MARKERS = {
    "needs cluster": re.compile(r"\b(kubectl|helm)\b"),
    "needs gpu": re.compile(r"cuda|--gpus|run_cuda"),
    "needs hub": re.compile(r"models pull|HF_TOKEN|--(?:blip|clip)-model\s+(?!models/|/|\.)[\w.-]+/[\w.@-]+"),
    "needs grpcurl": re.compile(r"\bgrpcurl\b"),
    "needs ghz": re.compile(r"\bghz\b"),
    "needs image": re.compile(r"\b(docker|podman)\b|\bmake (test-)?image\b"),
    "needs time": re.compile(r"\bmake (install|demo|test|bench|soak|fuzz|models|cuda-bins)\b|\bcargo install\b"),
    "needs registry": re.compile(r"\bnpm install\b|\bpip install\s+(?:'[^']*\[|\S*\[|(?![.'/-]))"),
    "fragment": None,  # a Python or JavaScript list of forms: compiled, not run
}
HELM_RENDERED = re.compile(r"\bhelm (install|template)\b")
BLOCK_TIMEOUT_S = 180
READY_TIMEOUT_S = 90


@dataclass
class Block:
    path: Path
    line: int  # the fence's line
    lang: str
    text: str
    marker: str | None
    expected: str | None = None  # a `text` block right after it

    @property
    def where(self) -> str:
        return f"{shown(self.path)}:{self.line}"

    @property
    def kind(self) -> str | None:
        return TESTED.get(self.lang)


@dataclass
class Report:
    ran: int = 0
    marked: Counter = field(default_factory=Counter)
    chart_docs: int = 0
    failures: list[str] = field(default_factory=list)

    def fail(self, where: str, why: str) -> None:
        self.failures.append(f"{where}: {why}")
        print(f"FAIL {where}: {why}", flush=True)


# --- reading the documents ---------------------------------------------------------------------


def shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def blocks_of(path: Path, report: Report) -> list[Block]:
    lines = path.read_text().splitlines()
    blocks: list[Block] = []
    i, last_end = 0, -2
    while i < len(lines):
        fence = re.match(r"^(\s*)```(.*)$", lines[i])
        if not fence:
            i += 1
            continue
        indent, info = fence.group(1), fence.group(2).strip()
        start = i
        i += 1
        body = []
        while i < len(lines) and not re.match(rf"^{indent}```\s*$", lines[i]):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
            i += 1
        lang = info.split()[0] if info else ""
        where = f"{shown(path)}:{start + 1}"
        if not lang:
            report.fail(where, "a fence without a language (`sh`, `python`, `js`, `text`, …)")
        elif lang not in TESTED and lang not in UNTESTED:
            report.fail(where, f"unknown language {lang!r}")
        before = lines[start - 1].strip() if start > 0 else ""
        marker = MARKER.match(before)
        if before.startswith("<!-- docs-test") and not marker:
            report.fail(where, f"malformed marker {before!r}")
        block = Block(path, start + 1, lang, "\n".join(body) + "\n", marker.group("reason") if marker else None)
        between = lines[last_end + 1:start] if blocks else []
        if lang == "text" and blocks and blocks[-1].kind and all(not l.strip() for l in between):
            blocks[-1].expected = block.text
        blocks.append(block)
        last_end = i
        i += 1
    return blocks


def slug(heading: str) -> str:
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found, seen, infence = set(), Counter(), False
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            infence = not infence
        elif not infence and (m := re.match(r"^#{1,6} (.*)$", line)):
            s = slug(m.group(1))
            found.add(s if not seen[s] else f"{s}-{seen[s]}")
            seen[s] += 1
    return found


def check_links(path: Path, report: Report) -> int:
    checked, infence = 0, False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            infence = not infence
            continue
        if infence:
            continue
        for target in re.findall(r"\]\(([^)\s]+)\)", re.sub(r"`[^`]*`", "", line)):
            if re.match(r"^[a-z]+:", target):
                continue
            checked += 1
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            where = f"{shown(path)}:{number}"
            if not dest.exists():
                report.fail(where, f"link {target!r}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                report.fail(where, f"link {target!r}: no heading #{anchor} in {shown(dest)}")
    return checked


# --- the environment the blocks run in ---------------------------------------------------------

REFLECTION_PROTO = """
syntax = "proto3";
package grpc.reflection.v1;
service ServerReflection {
  rpc ServerReflectionInfo(stream ServerReflectionRequest) returns (stream ServerReflectionResponse);
}
message ServerReflectionRequest {
  string host = 1;
  oneof message_request {
    string file_by_filename = 3;
    string file_containing_symbol = 4;
    string list_services = 7;
  }
}
message ServerReflectionResponse {
  string valid_host = 1;
  ServerReflectionRequest original_request = 2;
  oneof message_response {
    FileDescriptorResponse file_descriptor_response = 4;
    ListServiceResponse list_services_response = 6;
    ErrorResponse error_response = 7;
  }
}
message FileDescriptorResponse { repeated bytes file_descriptor_proto = 1; }
message ListServiceResponse { repeated ServiceResponse service = 1; }
message ServiceResponse { string name = 1; }
message ErrorResponse { int32 error_code = 1; string error_message = 2; }
"""


def site_packages(prefix: Path) -> Path:
    return next((prefix / "lib").glob("python3*")) / "site-packages"


class Environment:
    """A temporary PATH, HOME and Python client for the blocks; the checkout is never written to."""

    def __init__(self, binary: Path, tmp: Path):
        self.tmp = tmp
        python = ROOT / ".venv/bin/python"
        if not python.exists():
            sys.exit(f"{python}: missing (make test sets up .venv)")
        # The layout `make install` gives: PREFIX/bin and PREFIX/share/caption-cascade/models.
        prefix = tmp / "prefix"
        (prefix / "bin").mkdir(parents=True)
        shutil.copy2(binary, prefix / "bin/caption-cascade")
        models = prefix / "share/caption-cascade/models"
        models.mkdir(parents=True)
        for name in ("shapes-blip", "shapes-clip"):
            (models / name).symlink_to(ROOT / "models" / name)
        # A fresh venv that sees .venv's packages (grpcio, protobuf, grpcio-tools), as
        # tests/python_client.rs makes one, with the client installed offline.
        self.venv = tmp / "venv"
        run([str(python), "-m", "venv", "--without-pip", str(self.venv)])
        (site_packages(self.venv) / "project-venv.pth").write_text(f"{site_packages(ROOT / '.venv')}\n")
        shims = tmp / "shims"
        shims.mkdir()
        write_exe(shims / "pip", f'#!/bin/sh\nexec "{self.venv}/bin/python" -m pip "$@"\n')
        self.pip_env = {"PIP_NO_INDEX": "1", "PIP_NO_BUILD_ISOLATION": "0", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        # From a copy: pip builds in the package's folder, and other tests (and the other run of
        # this harness) build the same package at the same time.
        pkg = tmp / "pkg"
        copy_clients(pkg / "clients")
        (pkg / "proto").symlink_to(ROOT / "proto")
        run([str(self.venv / "bin/python"), "-m", "pip", "install", "--quiet", str(pkg / "clients/python")],
            env={**os.environ, **self.pip_env}, cwd=tmp)
        # grpcurl's stand-in: the request goes through the server's reflection, then grpcio.
        gen = tmp / "gen"
        gen.mkdir()
        (gen / "reflection.proto").write_text(REFLECTION_PROTO)
        run([str(python), "-m", "grpc_tools.protoc", f"-I{gen}", f"--python_out={gen}", f"--grpc_python_out={gen}",
             "reflection.proto"])
        write_exe(shims / "grpcurl",
                  f'#!/bin/sh\nPYTHONPATH="{gen}" exec "{self.venv}/bin/python" "{ROOT}/tests/docs/grpcurl.py" "$@"\n')
        self.beam = ROOT / ".venv-beam"
        self.node_modules = ROOT / "tests/clients/node/node_modules"
        path = [prefix / "bin", shims, self.venv / "bin"]
        if (self.beam / "bin/caption-cascade-beam").exists():
            path.append(self.beam / "bin")
        self.home = tmp / "home"
        self.home.mkdir()
        keep = {k: v for k, v in os.environ.items() if k in ("LANG", "LC_ALL", "TERM", "LD_LIBRARY_PATH", "TMPDIR")}
        self.env = {
            **keep,
            **self.pip_env,
            "PATH": os.pathsep.join([*map(str, path), os.environ.get("PATH", "/usr/bin:/bin")]),
            "HOME": str(self.home),
            "NODE_PATH": str(self.node_modules),
            "NO_COLOR": "1",
            "PYTHONUNBUFFERED": "1",
        }

    def scratch(self, doc: Path) -> Path:
        """A directory that holds the checkout's files (links) and takes what blocks write."""
        where = self.tmp / "run" / shown(doc).strip("/").replace("/", "_")
        where.mkdir(parents=True)
        for entry in ROOT.iterdir():
            if entry.name == "clients":
                # A copy, so that `pip install ./clients/python` builds here, not in the checkout.
                copy_clients(where / entry.name)
            elif entry.name not in (".git", "target"):
                (where / entry.name).symlink_to(entry)
        return where


def copy_clients(to: Path) -> None:
    """The checkout's clients/ without its build output."""
    shutil.copytree(ROOT / "clients", to, symlinks=True,
                    ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", "node_modules"))


def write_exe(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


def run(cmd: list[str], **kw) -> None:
    out = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)}: exit {out.returncode}\n{out.stdout}{out.stderr}")


# --- running blocks ----------------------------------------------------------------------------

BEAM = re.compile(r"caption-cascade-beam|origin_pipeline|apache_beam")
BACKGROUND = re.compile(r"&\s*(?:#.*)?$")


def matches(expected: str, actual: str) -> bool:
    """Each expected line in order; `...` is any lines, a line ending in `...` any line it starts."""
    norm = lambda s: " ".join(s.split())
    want = [norm(line) for line in expected.splitlines()]
    have = [norm(line) for line in actual.splitlines()]

    def go(i: int, j: int) -> bool:
        if i == len(want):
            return j == len(have)
        if want[i] == "...":
            return any(go(i + 1, k) for k in range(j, len(have) + 1))
        if j == len(have):
            return False
        line = want[i]
        ok = have[j].startswith(line[:-3]) if line.endswith("...") else have[j] == line
        return ok and go(i + 1, j + 1)

    return go(0, 0)


def wait_for_port(port: int, deadline: float) -> bool:
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.1)
    return False


class FileRun:
    """One document's blocks, in order, in one scratch directory; background processes stopped after."""

    def __init__(self, env: Environment, doc: Path):
        self.env, self.doc = env, doc
        self.cwd = env.scratch(doc)
        self.groups: list[int] = []

    def run(self, block: Block, index: int, report: Report) -> None:
        name = f".docs-block-{index}"
        ready = self.cwd / f"{name}.ready"
        env = {**self.env.env, "CAPTION_READY_FILE": str(ready)}
        if BEAM.search(block.text):
            # Where `pip install './clients/python[beam]'` went: .venv-beam (make beam-env).
            env["PATH"] = f"{self.env.beam / 'bin'}{os.pathsep}{env['PATH']}"
        if block.kind == SHELL:
            text = "\n".join(l[2:] if l.startswith("$ ") else l for l in block.text.splitlines()
                             if block.lang != "console" or l.startswith("$ "))
            script = self.cwd / f"{name}.sh"
            script.write_text(text + "\n")
            cmd = ["bash", "-euo", "pipefail", str(script)]
        elif block.kind == PYTHON:
            script = self.cwd / f"{name}.py"
            script.write_text(block.text)
            beam = "apache_beam" in block.text
            python = (self.env.beam if beam else self.env.venv) / "bin/python"
            if not python.exists():
                return report.fail(block.where, f"{python} missing (make beam-env makes .venv-beam)")
            cmd = [str(python), str(script)]
        else:
            if not (self.env.node_modules / "@grpc/grpc-js").exists():
                return report.fail(block.where, f"{self.env.node_modules}: missing (make test installs it)")
            script = self.cwd / f"{name}.js"
            script.write_text(block.text)
            cmd = ["node", str(script)]
        out_path, err_path = self.cwd / f"{name}.out", self.cwd / f"{name}.err"
        started = time.monotonic()
        with open(out_path, "w") as out, open(err_path, "w") as err:
            proc = subprocess.Popen(cmd, cwd=self.cwd, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
            self.groups.append(proc.pid)
            try:
                code = proc.wait(timeout=BLOCK_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                code = None
        stdout, stderr = out_path.read_text(), err_path.read_text()
        took = time.monotonic() - started
        if code != 0:
            why = "timed out" if code is None else f"exit status {code}"
            return report.fail(block.where, f"{why}\n--- block\n{block.text}--- stdout\n{stdout[-3000:]}--- stderr\n{stderr[-3000:]}")
        # A block that leaves a process in the background: wait until it serves.
        deadline = time.monotonic() + READY_TIMEOUT_S
        for line in block.text.splitlines():
            if block.kind != SHELL or not BACKGROUND.search(line):
                continue
            if re.search(r"\bcaption-cascade\b.*\bserve\b", line):
                while not ready.exists() and time.monotonic() < deadline:
                    time.sleep(0.1)
                if not ready.exists():
                    return report.fail(block.where, f"the server did not become ready\n{err_path.read_text()[-3000:]}")
            elif ports := re.findall(r"(?<![\w.:/-])(\d{2,5})(?![\w.:/-])", line.split("#")[0]):
                if not wait_for_port(int(ports[0]), deadline):
                    return report.fail(block.where, f"nothing listens on port {ports[0]}\n{err_path.read_text()[-3000:]}")
        if block.expected is not None and not matches(block.expected, stdout):
            return report.fail(block.where, f"output differs from the block after it\n--- expected\n{block.expected}--- stdout\n{stdout}")
        report.ran += 1
        print(f"ran  {block.where} ({took:.1f} s)", flush=True)

    def close(self) -> None:
        for pgid in self.groups:
            try:
                os.killpg(pgid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        for pgid in self.groups:
            while time.monotonic() < deadline:
                try:
                    os.killpg(pgid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.05)
            else:
                try:
                    os.killpg(pgid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def check_marked(block: Block, report: Report, file_run: FileRun, index: int) -> None:
    reason = block.marker
    if reason not in MARKERS:
        return report.fail(block.where, f"marker {reason!r} is none of {sorted(MARKERS)}")
    tell = MARKERS[reason]
    if reason == "fragment":
        if block.kind == SHELL:
            return report.fail(block.where, "a shell block is never a fragment: run it or mark what it needs")
        check = [str(file_run.env.venv / "bin/python"), "-c", "import ast,sys; ast.parse(sys.stdin.read())"] \
            if block.kind == PYTHON else ["node", "--check", "-"]
        out = subprocess.run(check, input=block.text, capture_output=True, text=True)
        if out.returncode != 0:
            return report.fail(block.where, f"the fragment does not compile\n{out.stderr}")
    elif not tell.search(block.text):
        return report.fail(block.where, f"marked {reason!r}, but the block shows no need of it: run it instead")
    report.marked[reason] += 1
    if reason == "needs cluster" and HELM_RENDERED.search(block.text):
        report.chart_docs += 1
    if reason == "needs grpcurl":
        # Run with the stand-in: the requests are checked through the server's reflection and sent.
        before = report.ran
        file_run.run(block, index, report)
        if report.ran > before:
            report.ran -= 1
            print(f"     (grpcurl's requests checked through reflection and answered)", flush=True)
    else:
        print(f"mark {block.where} ({reason})", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--binary", required=True, type=Path)
    parser.add_argument("--only", nargs="*", default=[])
    parser.add_argument("--docs", nargs="*", type=Path, default=[])
    args = parser.parse_args()
    if os.environ.get("DOCS_TEST_NETNS") != "1":
        # A private network namespace: the blocks use the documented ports and collide with nothing.
        if not shutil.which("unshare"):
            sys.exit("the docs test needs unshare (util-linux) for a private network namespace")
        inner = f'ip link set lo up && exec "{sys.executable}" "{__file__}" "$@"'
        return subprocess.call(["unshare", "-rn", "bash", "-c", inner, "snippets", *sys.argv[1:]],
                                env={**os.environ, "DOCS_TEST_NETNS": "1"})
    started = time.monotonic()
    report = Report()
    docs = [d.resolve() for d in args.docs] or [d for d in DOC_FILES if not args.only or any(str(d).endswith(o) for o in args.only)]
    links = sum(check_links(d, report) for d in docs)
    with tempfile.TemporaryDirectory(prefix="docs-test-") as tmp:
        env = Environment(args.binary.resolve(), Path(tmp))
        for doc in docs:
            blocks = [b for b in blocks_of(doc, report) if b.kind]
            if not blocks:
                continue
            file_run = FileRun(env, doc)
            try:
                for index, block in enumerate(blocks):
                    if block.marker:
                        check_marked(block, report, file_run, index)
                    else:
                        file_run.run(block, index, report)
            finally:
                file_run.close()
    marked = ", ".join(f"{n} {reason}" for reason, n in sorted(report.marked.items()))
    print(f"docs: {report.ran} blocks ran, {sum(report.marked.values())} marked ({marked}), "
          f"{report.chart_docs} checked by chart_docs; {links} links checked; {time.monotonic() - started:.0f} s")
    for failure in report.failures:
        print(f"docs test failed: {failure.splitlines()[0]}", file=sys.stderr)
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
