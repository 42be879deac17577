"""The tooling plan of a workspace (reference §8.7): which language tools a repository wants in the guest.

Tools the repository declares itself (`.mise.toml`, `mise.toml`, `.tool-versions`) are "repo managed":
`mise install` in the repository installs them. For the other tools, detectors for go, node, python and
rust read pinned versions from the usual files and produce `mise use -g --pin <tool>@<version>` steps,
sorted by tool. Evidence that names no usable version becomes a skip note with the reason.

Installing needs outbound network, so `vm run ./repo` refuses before creating a VM when the repository
declares tools and neither `--nat` nor `--no-bootstrap` is given (`refusal`). The plan runs best effort
in the guest (`render_script`); every outcome, including "mise is not installed", goes to a log.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path

REPO_CONFIGS = (".mise.toml", "mise.toml", ".tool-versions")
LOG_DIR = "/root/.cache/banger"
# Names in .tool-versions (asdf) and mise.toml that mean the same tool as a detector.
_ALIASES = {"golang": "go", "nodejs": "node", "rustc": "rust"}
_VERSION = re.compile(r"^\d+(\.\d+){0,2}$")
_RANGE = re.compile(r"^\s*(?:v|==|=|\^|~=|~|>=)?\s*(\d+(?:\.\d+){0,2})(?:\.\*)?\s*(?:,.*|\s*<.*)?$")
_RUST_CHANNEL = re.compile(r"^(stable|beta|nightly(-\d{4}-\d{2}-\d{2})?|\d+\.\d+(\.\d+)?)$")


@dataclass(frozen=True)
class InstallStep:
    tool: str
    version: str
    source: str  # the file the version came from
    reason: str

    @property
    def command(self) -> str:
        return f"mise use -g --pin {self.tool}@{self.version}"


@dataclass(frozen=True)
class SkipNote:
    target: str
    reason: str


@dataclass(frozen=True)
class Plan:
    repo_configs: tuple[str, ...]  # the repository's own tool declarations (file names)
    repo_managed_tools: tuple[str, ...]
    steps: tuple[InstallStep, ...]
    skips: tuple[SkipNote, ...]

    @property
    def declares_tools(self) -> bool:
        return bool(self.repo_configs)

    @property
    def empty(self) -> bool:
        return not self.repo_configs and not self.steps

    def summary(self) -> list[str]:
        lines = []
        if self.repo_configs:
            tools = ", ".join(self.repo_managed_tools) or "none listed"
            lines.append(f"repo managed ({', '.join(self.repo_configs)}): {tools} via `mise install`")
        lines += [f"{s.tool}@{s.version} from {s.source} ({s.reason})" for s in self.steps]
        lines += [f"skipped {s.target}: {s.reason}" for s in self.skips]
        return lines


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except (OSError, UnicodeError):
        return None


def _canonical(tool: str) -> str:
    name = tool.strip().lower()
    name = name.split(":", 1)[-1]  # mise backends: "core:node", "asdf:golang"
    return _ALIASES.get(name, name)


def _repo_managed(root: Path) -> tuple[tuple[str, ...], set[str], list[SkipNote]]:
    configs: list[str] = []
    tools: set[str] = set()
    skips: list[SkipNote] = []
    for name in REPO_CONFIGS:
        text = _read(root / name)
        if text is None:
            continue
        configs.append(name)
        if name.endswith(".toml"):
            try:
                data = tomllib.loads(text)
            except tomllib.TOMLDecodeError as exc:
                skips.append(SkipNote(name, f"not valid TOML ({exc}); `mise install` will report it"))
                continue
            table = data.get("tools")
            if isinstance(table, dict):
                tools.update(_canonical(k) for k in table)
        else:
            for line in text.splitlines():
                words = line.split("#", 1)[0].split()
                if len(words) >= 2:
                    tools.add(_canonical(words[0]))
    return tuple(configs), tools, skips


def _go(root: Path) -> InstallStep | SkipNote | None:
    text = _read(root / "go.mod")
    if text is None:
        return None
    toolchain = re.search(r"^toolchain\s+go(\d+\.\d+(?:\.\d+)?)\s*$", text, re.M)
    if toolchain:
        return InstallStep("go", toolchain.group(1), "go.mod", "toolchain directive")
    directive = re.search(r"^go\s+(\S+)\s*$", text, re.M)
    if directive and _VERSION.match(directive.group(1)):
        return InstallStep("go", directive.group(1), "go.mod", "go directive")
    if directive:
        return SkipNote("go", f"go.mod's go directive {directive.group(1)!r} is not a version")
    return SkipNote("go", "go.mod has no go directive")


def _node(root: Path) -> InstallStep | SkipNote | None:
    for name in (".nvmrc", ".node-version"):
        text = _read(root / name)
        if text is None:
            continue
        value = text.strip().splitlines()[0].strip() if text.strip() else ""
        version = value.removeprefix("v")
        if _VERSION.match(version):
            return InstallStep("node", version, name, "pinned version file")
        return SkipNote("node", f"{name} says {value!r}, which is not a version banger can pin")
    text = _read(root / "package.json")
    if text is None:
        return None
    try:
        engines = json.loads(text).get("engines") or {}
    except (ValueError, AttributeError):
        return SkipNote("node", "package.json is not valid JSON")
    spec = engines.get("node") if isinstance(engines, dict) else None
    if not isinstance(spec, str):
        return None
    match = _RANGE.match(spec)
    if match:
        return InstallStep("node", match.group(1), "package.json", f"engines.node {spec!r}")
    return SkipNote("node", f"package.json engines.node {spec!r} is not a version banger can pin")


def _python(root: Path) -> InstallStep | SkipNote | None:
    text = _read(root / ".python-version")
    if text is not None:
        value = text.strip().splitlines()[0].strip() if text.strip() else ""
        if _VERSION.match(value):
            return InstallStep("python", value, ".python-version", "pinned version file")
        return SkipNote("python", f".python-version says {value!r}, which is not a version banger can pin")
    text = _read(root / "pyproject.toml")
    if text is None:
        return None
    try:
        project = tomllib.loads(text).get("project") or {}
    except tomllib.TOMLDecodeError:
        return SkipNote("python", "pyproject.toml is not valid TOML")
    spec = project.get("requires-python") if isinstance(project, dict) else None
    if not isinstance(spec, str):
        return None
    match = _RANGE.match(spec)
    if match:
        return InstallStep("python", match.group(1), "pyproject.toml", f"requires-python {spec!r}")
    return SkipNote("python", f"pyproject.toml requires-python {spec!r} is not a version banger can pin")


def _rust(root: Path) -> InstallStep | SkipNote | None:
    for name in ("rust-toolchain.toml", "rust-toolchain"):
        text = _read(root / name)
        if text is None:
            continue
        channel: object = text.strip()
        if "[toolchain]" in text or name.endswith(".toml"):
            try:
                channel = (tomllib.loads(text).get("toolchain") or {}).get("channel")
            except (tomllib.TOMLDecodeError, AttributeError):
                return SkipNote("rust", f"{name} is not valid TOML")
        if isinstance(channel, str) and _RUST_CHANNEL.match(channel):
            return InstallStep("rust", channel, name, "toolchain channel")
        return SkipNote("rust", f"{name} names no toolchain channel banger can pin ({channel!r})")
    return None


DETECTORS = {"go": _go, "node": _node, "python": _python, "rust": _rust}


def build_plan(repo_root: str | Path) -> Plan:
    root = Path(repo_root)
    configs, managed, skips = _repo_managed(root)
    steps: list[InstallStep] = []
    for tool, detect in sorted(DETECTORS.items()):
        found = detect(root)
        if found is None:
            continue
        if tool in managed:
            skips.append(SkipNote(tool, f"managed by the repository ({', '.join(configs)})"))
        elif isinstance(found, InstallStep):
            steps.append(found)
        else:
            skips.append(found)
    return Plan(repo_configs=configs, repo_managed_tools=tuple(sorted(managed)),
                steps=tuple(sorted(steps, key=lambda s: s.tool)), skips=tuple(skips))


def refusal(plan: Plan, *, nat: bool, no_bootstrap: bool) -> str | None:
    """Why `vm run ./repo` must refuse before creating a VM, or None."""
    if not plan.declares_tools or nat or no_bootstrap:
        return None
    return (f"the repository declares tools in {', '.join(plan.repo_configs)}, and installing them needs "
            "outbound network: add --nat to give the VM network access, or --no-bootstrap to skip the "
            "tooling bootstrap")


def log_path(vm_name: str) -> str:
    return f"{LOG_DIR}/vm-run-tooling-{vm_name}.log"


def render_script(plan: Plan, guest_path: str, vm_name: str) -> str:
    """A bash script that runs the plan in the guest, best effort, logging everything to `log_path`."""
    log = log_path(vm_name)
    planned = [f"repo managed: mise install ({', '.join(plan.repo_configs)})"] if plan.repo_configs else []
    planned += [f"{s.command}   # {s.source}: {s.reason}" for s in plan.steps]
    lines = [
        "#!/bin/bash",
        "# banger: tooling bootstrap (best effort; failures are warnings)",
        f"mkdir -p {shlex.quote(LOG_DIR)}",
        f"exec >>{shlex.quote(log)} 2>&1",
        f"echo \"banger tooling plan for {guest_path} ($(date -u +%Y-%m-%dT%H:%M:%SZ))\"",
    ]
    lines += [f"echo {shlex.quote('skip: ' + s.target + ': ' + s.reason)}" for s in plan.skips]
    lines += [
        "if ! command -v mise >/dev/null 2>&1; then",
        "  echo 'skipped: mise is not installed in this image; these steps did not run:'",
        *[f"  echo {shlex.quote('  ' + p)}" for p in planned],
        "  exit 0",
        "fi",
        f"cd {shlex.quote(guest_path)} || exit 0",
    ]
    if plan.repo_configs:
        lines += ["mise trust --quiet --all . || true",
                  "mise install || echo 'warning: mise install failed'"]
    for step in plan.steps:
        lines.append(f"{step.command} || echo {shlex.quote('warning: ' + step.command + ' failed')}")
    lines.append("echo 'banger tooling bootstrap finished'")
    return "\n".join(lines) + "\n"
