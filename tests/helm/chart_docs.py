"""What the chart's documentation promises, read back for check_chart.py.

* Every `helm install` / `helm template` command in README.md, docs/*.md and the chart's README is
  turned into the values it sets (-f files, --set, --set-string, --set-json, in Helm's order), so
  that it can be rendered; each is followed in its code block by the lines that say what it renders,
  one per tier: `# → generator: device cuda, 1 nvidia.com/gpu, image caption-cascade:0.1.0-cuda`
  (tiers may share a line: `# → ranker, cascade: device cpu, no GPU, image …`).
* The chart's README has a row `| \\`key\\` | \\`default\\` | meaning |` for every key of values.yaml,
  whose default (JSON) is values.yaml's, and no row for a key the schema does not know.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import helm_python as helm
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = "helm/caption-cascade"
CHART_README = ROOT / CHART / "README.md"
# Where commands are documented.
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), CHART_README]

FENCE = re.compile(r"^```")
EXPECTATION = re.compile(
    r"^# → (?P<tiers>[a-z]+(?:, [a-z]+)*): device (?P<device>auto|cpu|cuda), "
    r"(?:no GPU|(?P<gpus>\d+) (?P<resource>\S+)), image (?P<image>\S+)$"
)
# Flags that say nothing about the values (or only where the release goes).
NEUTRAL_FLAGS = {"--install", "--wait", "--atomic", "--create-namespace", "--debug", "--dry-run"}
NEUTRAL_WITH_ARG = {"-n", "--namespace", "--timeout", "--version"}


class DocError(Exception):
    pass


@dataclass
class Command:
    where: str  # file:line
    text: str
    release: str
    values: dict
    # tier -> (device, {resource: count}, image)
    expected: dict[str, tuple[str, dict[str, int], str]]


def code_blocks(path: Path) -> list[tuple[int, list[str]]]:
    """Each fenced block: the line number of its first line, and its lines."""
    blocks, current, start = [], None, 0
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if FENCE.match(line.strip()):
            if current is None:
                current, start = [], number + 1
            else:
                blocks.append((start, current))
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def logical_lines(lines: list[str], first: int) -> list[tuple[int, str]]:
    """Shell lines with their backslash continuations joined."""
    joined, buffer, start = [], "", None
    for offset, line in enumerate(lines):
        if start is None:
            start = first + offset
        if line.rstrip().endswith("\\"):
            buffer += line.rstrip()[:-1] + " "
            continue
        joined.append((start, buffer + line))
        buffer, start = "", None
    return joined


def deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def parse_command(words: list[str], where: str) -> tuple[str, dict]:
    """Release name and values of `helm install|template [flags] NAME CHART [flags]`."""
    files: list[str] = []
    sets: dict[str, list[str]] = {"--set-json": [], "--set": [], "--set-string": [], "--set-file": [], "--set-literal": []}
    positional: list[str] = []
    i = 2
    while i < len(words):
        word = words[i]
        flag, eq, inline = word.partition("=")
        takes = flag in sets or flag in ("-f", "--values") or flag in NEUTRAL_WITH_ARG
        value = inline if eq and flag.startswith("--") else (words[i + 1] if takes and i + 1 < len(words) else None)
        if takes and value is None:
            raise DocError(f"{where}: {flag} without a value")
        if flag in sets:
            sets[flag].append(value)
        elif flag in ("-f", "--values"):
            files.append(value)
        elif flag in NEUTRAL_WITH_ARG or flag in NEUTRAL_FLAGS:
            pass
        elif word.startswith("-"):
            raise DocError(f"{where}: the check does not know what {word} does to the values")
        else:
            positional.append(word)
        i += 1 if (not takes or eq) else 2
    if len(positional) != 2:
        raise DocError(f"{where}: want a release name and the chart, got {positional}")
    release, chart = positional
    if chart.rstrip("/") not in (CHART, f"./{CHART}"):
        raise DocError(f"{where}: installs {chart}, not {CHART}")
    values: dict = {}
    for name in files:  # Helm's order: files, then --set-json, --set, --set-string, --set-file, --set-literal
        path = ROOT / name
        if not path.is_file():
            raise DocError(f"{where}: -f {name}: no such file in the repository")
        values = deep_merge(values, helm.values_from_yaml(path.read_text()))
    parsers = {
        "--set-json": helm.parse_set_json,
        "--set": helm.parse_set_string,
        "--set-string": helm.parse_set_string_values,
        "--set-file": helm.parse_set_file,
        "--set-literal": helm.parse_set_literal,
    }
    for flag, expressions in sets.items():
        for expression in expressions:
            values = deep_merge(values, parsers[flag](expression))
    return release, values


def documented_commands() -> list[Command]:
    commands = []
    for path in DOC_FILES:
        if not path.is_file():
            continue
        for first, block in code_blocks(path):
            lines = logical_lines(block, first)
            for index, (number, line) in enumerate(lines):
                text = line.strip()
                if not re.match(r"helm (install|template|upgrade\s.*--install)\b", text):
                    continue
                where = f"{path.relative_to(ROOT)}:{number}"
                release, values = parse_command(shlex.split(text, comments=True), where)
                expected: dict[str, tuple[str, dict[str, int], str]] = {}
                for _, follower in lines[index + 1 :]:
                    match = EXPECTATION.match(follower.strip())
                    if not match:
                        break
                    gpus = {match["resource"]: int(match["gpus"])} if match["gpus"] else {}
                    for tier in match["tiers"].split(", "):
                        expected[tier] = (match["device"], gpus, match["image"])
                commands.append(Command(where, " ".join(text.split()), release, values, expected))
    return commands


def leaves(values: object, prefix: str = "") -> dict[str, object]:
    """values.yaml's keys, dotted, down to scalars, lists and empty maps."""
    if isinstance(values, dict) and values:
        out = {}
        for key, value in values.items():
            out.update(leaves(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): values}


ROW = re.compile(r"^\|\s*`(?P<key>[^`]+)`\s*\|\s*`(?P<default>[^`]*)`\s*\|(?P<meaning>.*)\|\s*$")


def readme_rows() -> dict[str, tuple[str, str]]:
    rows = {}
    for line in CHART_README.read_text().splitlines():
        match = ROW.match(line)
        if match:
            if match["key"] in rows:
                raise DocError(f"{CHART_README.relative_to(ROOT)}: two rows for {match['key']}")
            rows[match["key"]] = (match["default"], match["meaning"].strip())
    return rows


def schema_knows(schema: dict, key: str) -> bool:
    """The schema has this dotted key, or a free-form object (resources, securityContext) above it."""
    node = schema
    for part in key.split("."):
        while "$ref" in node:
            node = schema["definitions"][node["$ref"].rsplit("/", 1)[1]]
        props = node.get("properties") or {}
        if part in props:
            node = props[part]
        else:
            return node.get("additionalProperties") is not False and not props
    return True


def check_values_documented(chart_dir: Path, schema: dict) -> list[str]:
    """Every key of values.yaml has a README row with its default and a meaning; every row a key."""
    if not CHART_README.is_file():
        return [f"{CHART_README.relative_to(ROOT)} is missing"]
    defaults = leaves(yaml.safe_load((chart_dir / "values.yaml").read_text()))
    rows = readme_rows()
    failures = []
    for key, value in defaults.items():
        if key not in rows:
            failures.append(f"{CHART_README.relative_to(ROOT)}: no row for {key} (default {json.dumps(value)})")
            continue
        default, meaning = rows[key]
        try:
            documented = json.loads(default)
        except ValueError:
            failures.append(f"{CHART_README.relative_to(ROOT)}: {key}'s default `{default}` is not JSON")
            continue
        if documented != value:
            failures.append(f"{CHART_README.relative_to(ROOT)}: {key}'s default is `{default}`, values.yaml has {json.dumps(value)}")
        if len(meaning) < 3:
            failures.append(f"{CHART_README.relative_to(ROOT)}: {key} has no meaning")
    for key in rows:
        if not schema_knows(schema, key):
            failures.append(f"{CHART_README.relative_to(ROOT)}: a row for {key}, which the chart does not have")
    return failures
