"""Host-side inspection of a repository to ship into a VM as a workspace (reference §3.1, §8.5).

Pure functions over `git` (through `banger.system.run`), used by the CLI before any VM exists (the
preflight and `--dry-run`) and again by the daemon when it ships the files. What is shipped:

- git-tracked files only by default (`git ls-files`), with their current working-tree content, so
  uncommitted edits carry over; tracked files deleted in the working tree are deleted in the guest;
- `include_untracked` adds untracked files that are not ignored (`--others --exclude-standard`);
- gitignored files never.

Bare repositories and repositories with submodules are refused with a message that says why.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from banger.errors import BadRequest, BangerError

DEFAULT_GUEST_PATH = "/root/repo"
# Guest paths a workspace may never replace: the filesystem root and the usual system directories.
_FORBIDDEN_GUEST_PATHS = frozenset({"/", "/root", "/tmp", "/etc", "/usr", "/var", "/bin", "/sbin", "/lib",
                                    "/boot", "/dev", "/proc", "/sys", "/run", "/home", "/opt", "/srv"})
_GIT_TIMEOUT = 120.0


@dataclass(frozen=True)
class Repo:
    root: Path  # the top of the working tree
    head: str  # the HEAD commit, "" in a repository without commits
    branch: str  # the checked-out branch, "" when HEAD is detached

    @property
    def name(self) -> str:
        return self.root.name


@dataclass(frozen=True)
class FileSet:
    tracked: tuple[str, ...]  # tracked and present in the working tree (shipped)
    deleted: tuple[str, ...]  # tracked but deleted in the working tree (deleted in the guest)
    untracked: tuple[str, ...]  # untracked, not ignored (shipped only with include_untracked)
    include_untracked: bool = False
    ignored_note: str = field(default="gitignored files are never shipped")

    @property
    def shipped(self) -> tuple[str, ...]:
        files = self.tracked + self.untracked if self.include_untracked else self.tracked
        return tuple(sorted(files))

    @property
    def mode(self) -> str:
        return "tracked + untracked files" if self.include_untracked else "tracked files only"

    def skipped_notice(self) -> str | None:
        """One line for the user when untracked files exist but are not shipped."""
        if self.include_untracked or not self.untracked:
            return None
        count = len(self.untracked)
        noun = "file" if count == 1 else "files"
        return f"workspace: {count} untracked {noun} not copied (add --include-untracked to ship them)"


def _git(args: list[str], cwd: Path, *, check: bool = True) -> tuple[int, bytes, str]:
    from banger.system.run import run

    proc = run(["git", *args], cwd=cwd, check=False, timeout=_GIT_TIMEOUT)
    err = proc.stderr.decode(errors="replace").strip()
    if check and proc.returncode != 0:
        last = err.splitlines()[-1] if err else f"exit status {proc.returncode}"
        raise BangerError(f"`git {' '.join(args)}` failed in {cwd}: {last}")
    return proc.returncode, proc.stdout, err


def _split_z(data: bytes) -> list[str]:
    return [os.fsdecode(p) for p in data.split(b"\0") if p]


def find_repo(path: str | Path) -> Repo:
    """The non-bare repository containing `path`; refuses missing paths, non-repos and bare repos."""
    target = Path(path).expanduser()
    if not target.exists():
        raise BadRequest(f"workspace path {str(path)!r} does not exist")
    start = target if target.is_dir() else target.parent
    rc, out, err = _git(["rev-parse", "--is-bare-repository", "--is-inside-git-dir"], start, check=False)
    if rc != 0:
        if "dubious ownership" in err:
            raise BadRequest(f"git refuses to read {str(path)!r}: it belongs to another user than the one "
                             "running banger",
                             hint="run banger as the repository's owner (a system install does), or mark it "
                                  f"safe: git config --global --add safe.directory {start}")
        if "not a git repository" in err:
            raise BadRequest(f"workspace path {str(path)!r} is not inside a git repository",
                             hint="a workspace ships a git repository; run `git init` there first, "
                                  "or drop the path for a bare sandbox")
        raise BangerError(f"git cannot read {str(path)!r}: {err.splitlines()[-1] if err else rc}")
    bare, inside_git_dir = [*out.decode().split(), "false", "false"][:2]
    if bare == "true":
        raise BadRequest(f"workspace path {str(path)!r} is a bare git repository (no working tree to ship)",
                         hint=f"clone it first: git clone {path} ./work, then use ./work")
    if inside_git_dir == "true":
        raise BadRequest(f"workspace path {str(path)!r} is inside a .git directory",
                         hint="give the repository's working tree instead")
    _, top, _ = _git(["rev-parse", "--show-toplevel"], start)
    root = Path(top.decode().strip())
    rc, head, _ = _git(["rev-parse", "--verify", "--quiet", "HEAD^{commit}"], root, check=False)
    rc_branch, branch, _ = _git(["symbolic-ref", "--quiet", "--short", "HEAD"], root, check=False)
    return Repo(root=root, head=head.decode().strip() if rc == 0 else "",
                branch=branch.decode().strip() if rc_branch == 0 else "")


def check_no_submodules(repo: Repo) -> None:
    """Submodules are refused: their content lives in other repositories the guest cannot see."""
    _, staged, _ = _git(["ls-files", "-z", "--stage"], repo.root)
    gitlinks = []
    for entry in _split_z(staged):
        meta, _, name = entry.partition("\t")
        if meta.startswith("160000 "):
            gitlinks.append(name)
    if gitlinks or (repo.root / ".gitmodules").exists():
        names = ", ".join(gitlinks[:5]) + (" …" if len(gitlinks) > 5 else "") if gitlinks else ".gitmodules"
        raise BadRequest(f"repository {str(repo.root)!r} uses git submodules ({names}); "
                         "workspaces do not support submodules",
                         hint="use `banger vm cp` for such a tree, or ship a repository without submodules")


def list_files(repo: Repo, *, include_untracked: bool = False) -> FileSet:
    _, cached, _ = _git(["ls-files", "-z", "--cached"], repo.root)
    _, deleted_out, _ = _git(["ls-files", "-z", "--deleted"], repo.root)
    _, others, _ = _git(["ls-files", "-z", "--others", "--exclude-standard"], repo.root)
    deleted = set(_split_z(deleted_out))
    tracked = sorted({p for p in _split_z(cached) if p not in deleted})
    return FileSet(tracked=tuple(tracked), deleted=tuple(sorted(deleted)),
                   untracked=tuple(sorted(set(_split_z(others)))), include_untracked=include_untracked)


def inspect(path: str | Path, *, include_untracked: bool = False) -> tuple[Repo, FileSet]:
    """The whole preflight: repository, no submodules, and the files a prepare would ship."""
    repo = find_repo(path)
    check_no_submodules(repo)
    return repo, list_files(repo, include_untracked=include_untracked)


def host_head(path: str | Path) -> str:
    """The HEAD commit of the repository at `path` ("" when it cannot be read)."""
    try:
        return find_repo(path).head
    except BangerError:
        return ""


def validate_guest_path(path: str) -> str:
    """An absolute, normalised guest directory that a workspace may own."""
    if not path.startswith("/"):
        raise BadRequest(f"guest path {path!r} must be absolute (e.g. {DEFAULT_GUEST_PATH})")
    normal = str(PurePosixPath(os.path.normpath(path)))
    if normal in _FORBIDDEN_GUEST_PATHS or "\0" in normal or "\n" in normal:
        raise BadRequest(f"guest path {path!r} cannot hold a workspace (it would replace a system directory)",
                         hint=f"use a directory of its own, e.g. {DEFAULT_GUEST_PATH}")
    return normal


def validate_relative(path: str) -> str:
    """A path relative to the repository root, without `..`; refuses anything that could escape it."""
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("..", ".", "") for p in parts) or "\0" in path:
        raise BadRequest(f"file {path!r} is not a plain path inside the repository")
    return path


def validate_branch(name: str) -> str:
    from banger.system.run import run

    if not name or name.startswith("-") or run(["git", "check-ref-format", "--branch", name],
                                               check=False, timeout=10).returncode != 0:
        raise BadRequest(f"--branch {name!r} is not a valid git branch name")
    return name


def validate_revision(rev: str, flag: str) -> str:
    """A revision passed to git as an argument: no option look-alikes, no whitespace."""
    if not rev or rev.startswith("-") or len(rev) > 256 or any(c.isspace() or c == "\0" for c in rev):
        raise BadRequest(f"{flag} {rev!r} is not a git revision (a commit, branch or tag name)")
    return rev


def dry_run_lines(repo: Repo, files: FileSet, guest_path: str, target: str) -> list[str]:
    """What `--dry-run` prints: the mode, where things go, and the exact file list."""
    head = repo.head[:12] if repo.head else "(no commits)"
    lines = [
        f"repo: {repo.root} (branch {repo.branch or '(detached)'}, HEAD {head})",
        f"mode: {files.mode}; {files.ignored_note}",
        f"guest path: {target}:{guest_path}",
    ]
    if files.deleted:
        lines.append(f"deleted in the working tree (removed in the guest): {len(files.deleted)}")
    if not files.include_untracked and files.untracked:
        lines.append(f"untracked files not copied: {len(files.untracked)} (add --include-untracked)")
    shipped = files.shipped
    lines.append(f"files ({len(shipped)}):")
    lines.extend(shipped)
    return lines
