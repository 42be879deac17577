"""The tooling plan: repo-declared tools, the go/node/python/rust detectors, skips with reasons, the NAT
refusal rule, and the guest script's shape."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from banger.guest import tooling
from banger.guest.tooling import InstallStep, SkipNote


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_empty_repository_has_an_empty_plan(tmp_path: Path) -> None:
    plan = tooling.build_plan(tmp_path)
    assert plan.empty and not plan.declares_tools
    assert plan.steps == () and plan.skips == ()
    assert tooling.refusal(plan, nat=False, no_bootstrap=False) is None


def test_detectors_pin_versions_sorted_by_tool(tmp_path: Path) -> None:
    write(tmp_path, {
        "go.mod": "module example.com/x\n\ngo 1.22\n",
        "package.json": '{"name": "x", "engines": {"node": ">=18.17"}}',
        "pyproject.toml": '[project]\nname = "x"\nrequires-python = ">=3.11"\n',
        "rust-toolchain.toml": '[toolchain]\nchannel = "1.77.2"\n',
    })  # fmt: skip
    plan = tooling.build_plan(tmp_path)
    assert plan.steps == (
        InstallStep("go", "1.22", "go.mod", "go directive"),
        InstallStep("node", "18.17", "package.json", "engines.node '>=18.17'"),
        InstallStep("python", "3.11", "pyproject.toml", "requires-python '>=3.11'"),
        InstallStep("rust", "1.77.2", "rust-toolchain.toml", "toolchain channel"),
    )
    assert plan.steps[0].command == "mise use -g --pin go@1.22"
    assert not plan.declares_tools and not plan.empty
    # Detected tools alone never refuse: without --nat the bootstrap is skipped with a notice.
    assert tooling.refusal(plan, nat=False, no_bootstrap=False) is None


@pytest.mark.parametrize(("files", "expected"), [
    ({"go.mod": "module x\ngo 1.21.5\ntoolchain go1.22.3\n"}, InstallStep("go", "1.22.3", "go.mod",
                                                                          "toolchain directive")),
    ({".nvmrc": "v20.11.1\n"}, InstallStep("node", "20.11.1", ".nvmrc", "pinned version file")),
    ({".node-version": "22\n"}, InstallStep("node", "22", ".node-version", "pinned version file")),
    ({".nvmrc": "lts/iron\n"}, SkipNote("node", ".nvmrc says 'lts/iron', which is not a version banger can pin")),
    ({"package.json": '{"engines": {"node": "^20.1.0"}}'},
     InstallStep("node", "20.1.0", "package.json", "engines.node '^20.1.0'")),
    ({"package.json": '{"engines": {"node": "*"}}'},
     SkipNote("node", "package.json engines.node '*' is not a version banger can pin")),
    ({"package.json": "{nope"}, SkipNote("node", "package.json is not valid JSON")),
    ({".python-version": "3.12.1\n"}, InstallStep("python", "3.12.1", ".python-version", "pinned version file")),
    ({"pyproject.toml": '[project]\nrequires-python = "~=3.10"\n'},
     InstallStep("python", "3.10", "pyproject.toml", "requires-python '~=3.10'")),
    ({"pyproject.toml": '[project]\nrequires-python = ">=3.9,<4"\n'},
     InstallStep("python", "3.9", "pyproject.toml", "requires-python '>=3.9,<4'")),
    ({"pyproject.toml": '[project]\nrequires-python = ">3.8"\n'},
     SkipNote("python", "pyproject.toml requires-python '>3.8' is not a version banger can pin")),
    ({"rust-toolchain": "nightly-2024-01-01\n"},
     InstallStep("rust", "nightly-2024-01-01", "rust-toolchain", "toolchain channel")),
    ({"rust-toolchain.toml": '[toolchain]\ncomponents = ["clippy"]\n'},
     SkipNote("rust", "rust-toolchain.toml names no toolchain channel banger can pin (None)")),
    ({"go.mod": "module x\n"}, SkipNote("go", "go.mod has no go directive")),
])  # fmt: skip
def test_detector_cases(tmp_path: Path, files: dict[str, str], expected: InstallStep | SkipNote) -> None:
    plan = tooling.build_plan(write(tmp_path, files))
    found: tuple[InstallStep | SkipNote, ...] = (*plan.steps, *plan.skips)
    assert found == (expected,)


def test_repo_managed_tools_win_over_detectors(tmp_path: Path) -> None:
    write(tmp_path, {
        ".tool-versions": "# pinned\nnodejs 20.11.1\ngolang 1.22.0  # comment\n\n",
        ".nvmrc": "18\n",
        "go.mod": "module x\ngo 1.21\n",
        ".python-version": "3.12\n",
    })  # fmt: skip
    plan = tooling.build_plan(tmp_path)
    assert plan.declares_tools
    assert plan.repo_configs == (".tool-versions",)
    assert plan.repo_managed_tools == ("go", "node")
    assert plan.steps == (InstallStep("python", "3.12", ".python-version", "pinned version file"),)
    assert plan.skips == (SkipNote("go", "managed by the repository (.tool-versions)"),
                          SkipNote("node", "managed by the repository (.tool-versions)"))


def test_mise_toml_tools_table(tmp_path: Path) -> None:
    write(tmp_path, {".mise.toml": '[tools]\n"core:python" = "3.12"\nrust = "stable"\n[env]\nX = "1"\n',
                     "rust-toolchain": "1.70\n"})
    plan = tooling.build_plan(tmp_path)
    assert plan.repo_configs == (".mise.toml",)
    assert plan.repo_managed_tools == ("python", "rust")
    assert plan.steps == ()
    assert plan.skips == (SkipNote("rust", "managed by the repository (.mise.toml)"),)


def test_broken_mise_toml_is_a_skip_not_a_crash(tmp_path: Path) -> None:
    write(tmp_path, {".mise.toml": "[tools\n"})
    plan = tooling.build_plan(tmp_path)
    assert plan.declares_tools and plan.repo_managed_tools == ()
    assert plan.skips[0].target == ".mise.toml" and "not valid TOML" in plan.skips[0].reason


def test_refusal_rule(tmp_path: Path) -> None:
    plan = tooling.build_plan(write(tmp_path, {".mise.toml": '[tools]\nnode = "20"\n'}))
    assert tooling.refusal(plan, nat=False, no_bootstrap=False) == (
        "the repository declares tools in .mise.toml, and installing them needs outbound network: "
        "add --nat to give the VM network access, or --no-bootstrap to skip the tooling bootstrap")
    assert tooling.refusal(plan, nat=True, no_bootstrap=False) is None
    assert tooling.refusal(plan, nat=False, no_bootstrap=True) is None


def test_script_is_valid_bash_and_logs_every_step(tmp_path: Path) -> None:
    write(tmp_path, {".tool-versions": "nodejs 20\ngolang 1.22\n", "go.mod": "go 1.22\n", ".nvmrc": "x\n",
                     ".python-version": "3.12\n"})
    plan = tooling.build_plan(tmp_path)
    script = tooling.render_script(plan, "/root/my repo", "dev")
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    assert tooling.log_path("dev") == "/root/.cache/banger/vm-run-tooling-dev.log"
    assert "exec >>/root/.cache/banger/vm-run-tooling-dev.log 2>&1" in script
    assert "cd '/root/my repo' || exit 0" in script
    assert "mise install || echo 'warning: mise install failed'" in script
    assert "mise use -g --pin python@3.12 || echo 'warning: mise use -g --pin python@3.12 failed'" in script
    assert "skipped: mise is not installed in this image" in script
    assert "skip: go: managed by the repository (.tool-versions)" in script
    assert plan.summary() == ["repo managed (.tool-versions): go, node via `mise install`",
                              "python@3.12 from .python-version (pinned version file)",
                              "skipped go: managed by the repository (.tool-versions)",
                              "skipped node: managed by the repository (.tool-versions)"]


def test_script_without_mise_logs_the_skipped_steps(tmp_path: Path) -> None:
    """Run the script's own no-mise branch for real, with its log redirected into the test's tmp dir."""
    write(tmp_path, {"go.mod": "go 1.22\n"})
    plan = tooling.build_plan(tmp_path)
    log = tmp_path / "tooling.log"
    script = tooling.render_script(plan, str(tmp_path), "dev").replace(tooling.log_path("dev"), str(log)) \
        .replace(f"mkdir -p {tooling.LOG_DIR}", "true")
    subprocess.run(["bash", "-c", script], env={"PATH": "/usr/bin:/bin"}, check=True)
    text = log.read_text()
    assert "skipped: mise is not installed in this image; these steps did not run:" in text
    assert "  mise use -g --pin go@1.22   # go.mod: go directive" in text
