"""Host-side workspace inspection on real git repositories made by the test: what is shipped, what is
refused, what `--dry-run` prints, and that the dry run and the refusals happen before any RPC."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from banger.cli import parser
from banger.errors import BadRequest
from banger.guest import workspace as ws


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "app"
    root.mkdir()
    git(root, "init", "-q", "-b", "main")
    git(root, "config", "user.email", "test@example.com")
    git(root, "config", "user.name", "Test")
    (root / "README.md").write_text("hello\n")
    (root / "src").mkdir()
    (root / "src" / "main.py").write_text("print('hi')\n")
    (root / ".gitignore").write_text("*.log\nbuild/\n")
    (root / "doomed.txt").write_text("bye\n")
    git(root, "add", ".")
    git(root, "commit", "-q", "-m", "initial")
    # The working tree now differs from HEAD in every way a prepare has to handle.
    (root / "README.md").write_text("hello, edited\n")
    (root / "notes.txt").write_text("untracked\n")
    (root / "src" / "new_module.py").write_text("x = 1\n")
    (root / "debug.log").write_text("ignored\n")
    (root / "build").mkdir()
    (root / "build" / "out.bin").write_bytes(b"\0ignored")
    (root / "doomed.txt").unlink()
    return root


def test_tracked_only_by_default(repo: Path) -> None:
    found, files = ws.inspect(repo)
    assert found.root == repo.resolve()
    assert found.branch == "main"
    assert found.head == git(repo, "rev-parse", "HEAD").strip()
    assert files.shipped == (".gitignore", "README.md", "src/main.py")
    assert files.deleted == ("doomed.txt",)
    assert files.untracked == ("notes.txt", "src/new_module.py")
    assert files.mode == "tracked files only"
    assert files.skipped_notice() == (
        "workspace: 2 untracked files not copied (add --include-untracked to ship them)")


def test_include_untracked_never_ignored(repo: Path) -> None:
    _, files = ws.inspect(repo, include_untracked=True)
    assert files.shipped == (".gitignore", "README.md", "notes.txt", "src/main.py", "src/new_module.py")
    assert not any(f.endswith(".log") or f.startswith("build/") for f in files.shipped)
    assert files.mode == "tracked + untracked files"
    assert files.skipped_notice() is None


def test_subdirectory_means_the_whole_repository(repo: Path) -> None:
    found, files = ws.inspect(repo / "src")
    assert found.root == repo.resolve()
    assert "README.md" in files.shipped


def test_no_notice_without_untracked_files(tmp_path: Path) -> None:
    root = tmp_path / "clean"
    root.mkdir()
    git(root, "init", "-q")
    (root / "a").write_text("a")
    git(root, "add", "a")
    _, files = ws.inspect(root)
    assert files.shipped == ("a",)
    assert files.skipped_notice() is None


def test_repository_without_commits(tmp_path: Path) -> None:
    root = tmp_path / "fresh"
    root.mkdir()
    git(root, "init", "-q", "-b", "trunk")
    (root / "a.txt").write_text("a")
    found, files = ws.inspect(root, include_untracked=True)
    assert found.head == "" and found.branch == "trunk"
    assert files.shipped == ("a.txt",)


def test_detached_head(repo: Path) -> None:
    git(repo, "checkout", "-q", "--detach")
    found = ws.find_repo(repo)
    assert found.branch == "" and len(found.head) == 40


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(BadRequest) as exc:
        ws.inspect(tmp_path / "nope")
    assert exc.value.message == f"workspace path {str(tmp_path / 'nope')!r} does not exist"


def test_not_a_repository(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(BadRequest) as exc:
        ws.inspect(plain)
    assert exc.value.message == f"workspace path {str(plain)!r} is not inside a git repository"


def test_bare_repository_refused(tmp_path: Path, repo: Path) -> None:
    bare = tmp_path / "app.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(repo), str(bare)], check=True)
    with pytest.raises(BadRequest) as exc:
        ws.inspect(bare)
    assert exc.value.message == (f"workspace path {str(bare)!r} is a bare git repository "
                                 "(no working tree to ship)")
    assert exc.value.hint is not None and "git clone" in exc.value.hint


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to hand the repository to another user")
def test_repository_of_another_user_is_explained(repo: Path) -> None:
    for path in [repo, *repo.rglob("*")]:
        os.lchown(path, 65534, 65534)
    with pytest.raises(BadRequest) as exc:
        ws.inspect(repo)
    assert "belongs to another user than the one running banger" in exc.value.message
    assert exc.value.hint is not None and f"safe.directory {repo}" in exc.value.hint


def test_inside_dot_git_refused(repo: Path) -> None:
    with pytest.raises(BadRequest, match=r"is inside a \.git directory"):
        ws.inspect(repo / ".git")


def test_submodule_refused(repo: Path) -> None:
    head = git(repo, "rev-parse", "HEAD").strip()
    # A gitlink entry is what `git submodule add` leaves in the index.
    git(repo, "update-index", "--add", "--cacheinfo", f"160000,{head},vendor/lib")
    with pytest.raises(BadRequest) as exc:
        ws.inspect(repo)
    assert exc.value.message == (f"repository {str(repo.resolve())!r} uses git submodules (vendor/lib); "
                                 "workspaces do not support submodules")


def test_gitmodules_file_alone_refused(repo: Path) -> None:
    (repo / ".gitmodules").write_text('[submodule "x"]\n\tpath = x\n\turl = ../x\n')
    with pytest.raises(BadRequest, match=r"uses git submodules \(\.gitmodules\)"):
        ws.inspect(repo)


def test_dry_run_lines(repo: Path) -> None:
    found, files = ws.inspect(repo)
    lines = ws.dry_run_lines(found, files, "/root/repo", "dev")
    assert lines == [
        f"repo: {repo.resolve()} (branch main, HEAD {found.head[:12]})",
        "mode: tracked files only; gitignored files are never shipped",
        "guest path: dev:/root/repo",
        "deleted in the working tree (removed in the guest): 1",
        "untracked files not copied: 2 (add --include-untracked)",
        "files (3):",
        ".gitignore",
        "README.md",
        "src/main.py",
    ]


@pytest.mark.parametrize(("path", "ok"), [
    ("/root/repo", "/root/repo"), ("/root/a/../b/", "/root/b"), ("/srv/app", "/srv/app"),
    ("/", None), ("/root", None), ("/root/repo/..", None), ("repo", None), ("/etc", None),
])  # fmt: skip
def test_guest_path_rules(path: str, ok: str | None) -> None:
    if ok is None:
        with pytest.raises(BadRequest):
            ws.validate_guest_path(path)
    else:
        assert ws.validate_guest_path(path) == ok


def test_relative_and_revision_rules() -> None:
    assert ws.validate_relative("src/a.py") == "src/a.py"
    for bad in ("", "/etc/passwd", "../x", "a/../../x", "./a"):
        with pytest.raises(BadRequest):
            ws.validate_relative(bad)
    assert ws.validate_revision("HEAD~2", "--from") == "HEAD~2"
    for bad in ("-x", "--upload-pack=x", "a b", ""):
        with pytest.raises(BadRequest):
            ws.validate_revision(bad, "--from")
    assert ws.validate_branch("feature/x") == "feature/x"
    for bad in ("-b", "a..b", "with space", ""):
        with pytest.raises(BadRequest):
            ws.validate_branch(bad)


# --- the CLI: dry runs and refusals make no RPC at all ---------------------------------------------


@pytest.fixture
def no_rpc(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Fault injection: any daemon call fails the test (and is recorded)."""
    calls: list[str] = []

    def refuse(method: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(method)
        raise AssertionError(f"unexpected RPC {method}")

    import banger.cli.guest
    import banger.cli.lifecycle
    import banger.cli.vm
    import banger.cli.workspace

    for module in (banger.cli.lifecycle, banger.cli.guest, banger.cli.vm, banger.cli.workspace):
        monkeypatch.setattr(module, "call", refuse)
    return calls


def test_prepare_dry_run_prints_the_list_without_rpc(repo: Path, no_rpc: list[str],
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    rc = parser.dispatch(["vm", "workspace", "prepare", "dev", str(repo), "--dry-run", "--include-untracked"])
    out = capsys.readouterr().out.splitlines()
    assert rc == 0 and no_rpc == []
    assert out[1] == "mode: tracked + untracked files; gitignored files are never shipped"
    assert out[out.index("files (5):") + 1:] == [".gitignore", "README.md", "notes.txt", "src/main.py",
                                                 "src/new_module.py"]


def test_run_dry_run_creates_no_vm(repo: Path, no_rpc: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    rc = parser.dispatch(["vm", "run", str(repo), "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0 and no_rpc == []
    assert "guest path: <new vm>:/root/repo" in out and "\nsrc/main.py\n" in out


def test_run_refusals_come_before_any_vm(tmp_path: Path, repo: Path, no_rpc: list[str]) -> None:
    bare = tmp_path / "bare.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(repo), str(bare)], check=True)
    with pytest.raises(BadRequest, match="is a bare git repository"):
        parser.dispatch(["vm", "run", str(bare), "--", "true"])
    (repo / ".tool-versions").write_text("nodejs 20.11.1\n")
    with pytest.raises(BadRequest, match="--nat") as exc:
        parser.dispatch(["vm", "run", str(repo), "--", "true"])
    assert "--no-bootstrap" in exc.value.message
    with pytest.raises(BadRequest, match="--from needs --branch"):
        parser.dispatch(["vm", "run", str(repo), "--from", "HEAD", "--no-bootstrap"])
    with pytest.raises(BadRequest, match="only go with a workspace path"):
        parser.dispatch(["vm", "run", "--include-untracked"])
    assert no_rpc == []
