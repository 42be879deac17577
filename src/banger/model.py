"""Records banger keeps (VMs, images, kernels) and the rules for their names and ids."""

from __future__ import annotations

import enum
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from banger.errors import BadRequest, NotFound

T = TypeVar("T")

VM_NAME_MAX = 63
SHORT_ID_LEN = 8


class VmState(enum.StrEnum):
    CREATED = "created"
    RUNNING = "running"
    STOPPED = "stopped"
    ERROR = "error"


@dataclass(frozen=True)
class VmSpec:
    vcpu: int
    memory_mib: int
    disk_size_bytes: int
    system_overlay_size_bytes: int
    nat: bool = False


@dataclass(frozen=True)
class VmRecord:
    id: str
    name: str
    image_id: str
    image_name: str
    state: VmState
    spec: VmSpec
    guest_ip: str
    created_at: str
    updated_at: str
    runtime: dict[str, Any] = field(default_factory=dict)
    workspace: dict[str, Any] | None = None
    last_error: str = ""

    @property
    def short_id(self) -> str:
        return self.id[:SHORT_ID_LEN]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["state"] = str(self.state)
        data["short_id"] = self.short_id
        return data


@dataclass(frozen=True)
class ImageRecord:
    id: str
    name: str
    managed: bool
    rootfs_path: str
    kernel_path: str
    initrd_path: str
    modules_path: str
    work_seed_path: str
    kernel_ref: str
    source: str
    created_at: str
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class KernelRecord:
    name: str
    distro: str
    arch: str
    kernel_version: str
    source: str
    sha256: str
    imported_at: str
    vmlinux_path: str
    kernel_path: str = ""
    initrd_path: str = ""
    modules_path: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def new_id() -> str:
    """A 32-hex-digit id; its first 8 digits are the short id shown in tables."""
    return secrets.token_hex(16)


def validate_vm_name(name: str) -> str:
    """The exact rules and messages of the original (reference §10.4): a DNS label, no normalisation."""
    if not name:
        raise BadRequest("vm name is required")
    if len(name) > VM_NAME_MAX:
        raise BadRequest(f"vm name {name!r} is {len(name)} characters; max is {VM_NAME_MAX} (DNS label limit)")
    if name.startswith("-") or name.endswith("-"):
        raise BadRequest(f"vm name {name!r} cannot start or end with '-'")
    for position, char in enumerate(name):
        if not ("a" <= char <= "z" or "0" <= char <= "9" or char == "-"):
            raise BadRequest(
                f"vm name {name!r} has invalid character {char!r} at position {position} "
                "(allowed: lowercase a-z, 0-9, '-')"
            )
    return name


_ARTIFACT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def validate_artifact_name(kind: str, name: str) -> str:
    """Image and kernel names: alphanumerics plus '.', '-', '_'; no traversal."""
    if not name:
        raise BadRequest(f"{kind} name is required")
    if not _ARTIFACT_NAME.fullmatch(name) or ".." in name:
        raise BadRequest(
            f"{kind} name {name!r} is invalid (allowed: letters, digits, '.', '-', '_'; "
            "must start with a letter or digit; at most 128 characters)"
        )
    return name


def resolve_ref(ref: str, items: Sequence[T], *, key_id: str = "id", key_name: str = "name",
                   kind: str = "vm") -> T:
    """Find a record by exact name, full id, or a unique id prefix."""
    if not ref:
        raise BadRequest(f"{kind} reference is required")
    for item in items:
        if getattr(item, key_name) == ref or getattr(item, key_id) == ref:
            return item
    matches = [item for item in items if str(getattr(item, key_id)).startswith(ref)]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        names = ", ".join(sorted(str(getattr(m, key_name)) for m in matches))
        raise BadRequest(f"{kind} reference {ref!r} is ambiguous: matches {names}", hint="use more of the id")
    raise NotFound(f"no {kind} named or with id {ref!r}", hint=f"see `banger {kind} list`")


def dedupe(refs: Iterable[str]) -> list[str]:
    seen: dict[str, None] = {}
    for ref in refs:
        seen.setdefault(ref, None)
    return list(seen)
