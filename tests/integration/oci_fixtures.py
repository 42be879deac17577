"""Builders for OCI image layouts, a real registry (Debian's docker-registry) and a token server.

Layouts are written by hand (gzip tar layers, config, manifest, index, index.json) so tests control
every byte, including hostile ones; `LocalRegistry.push` copies them into a registry the test started
itself on 127.0.0.1 with `skopeo copy`. The registry runs anonymous, with htpasswd (Basic) auth, or
with token auth against `TokenServer`, which signs ES256 JWTs with a throw-away certificate the
registry trusts (`rootcertbundle`), exactly as a production token service would.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import datetime as dt
import gzip
import hashlib
import io
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx

from tests.unit.test_flatten import E, tar_bytes

OCI_LAYOUT = {"imageLayoutVersion": "1.0.0"}
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
REGISTRY_BIN = "/usr/bin/docker-registry"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
# A Debian bookworm minbase root file system built by bench/oci_pull.py with mmdebstrap (CI may keep it).
DEBIAN_MINBASE = Path("/var/tmp/banger-test-cache/oci-bench/debian-bookworm-minbase.tar")
BUSYBOX = "/bin/busybox"
APPLETS = ("sh", "ls", "cat", "mount", "umount", "ip", "reboot", "hostname", "sleep", "mkdir", "tail", "grep", "rm",
           "chroot", "pivot_root", "echo", "touch", "id")


def tools_missing() -> list[str]:
    return [t for t in ("docker-registry", "skopeo", "mkfs.ext4", "debugfs")
            if shutil.which(t, path="/usr/sbin:/sbin:/usr/bin:/bin") is None]


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------------- layouts


@dataclass(frozen=True)
class Layer:
    tar: bytes  # uncompressed
    blob: bytes  # what goes into the registry
    media_type: str = LAYER_GZIP

    @property
    def digest(self) -> str:
        return sha256(self.blob)

    @property
    def diff_id(self) -> str:
        return sha256(self.tar)


def layer(*entries: E, fmt: int = tarfile.GNU_FORMAT) -> Layer:
    raw = tar_bytes(*entries, fmt=fmt)
    return Layer(raw, gzip.compress(raw, compresslevel=6, mtime=0))


def raw_layer(blob: bytes, tar: bytes = b"") -> Layer:
    return Layer(tar, blob)


class LayoutBuilder:
    """An OCI image layout on disk: add blobs, images and indexes, then `tag` what skopeo should copy."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (root / "oci-layout").write_text(json.dumps(OCI_LAYOUT))
        self.refs: list[dict[str, Any]] = []
        self._write_index()

    def blob(self, data: bytes, media_type: str) -> dict[str, Any]:
        digest = sha256(data)
        (self.root / "blobs" / "sha256" / digest[7:]).write_bytes(data)
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    def image(self, layers: Sequence[Layer], *, arch: str = "amd64", os_name: str = "linux",
              config: dict[str, Any] | None = None) -> dict[str, Any]:
        cfg = {
            "architecture": arch, "os": os_name,
            "config": config if config is not None else {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:"
                                                                  "/usr/bin:/sbin:/bin"], "Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": [x.diff_id for x in layers]},
            "history": [{"created_by": "banger test fixture"} for _ in layers],
        }
        config_desc = self.blob(json.dumps(cfg).encode(), OCI_CONFIG)
        manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config_desc,
                    "layers": [self.blob(x.blob, x.media_type) for x in layers]}
        desc = self.blob(json.dumps(manifest).encode(), OCI_MANIFEST)
        desc["platform"] = {"architecture": arch, "os": os_name}
        return desc

    def index(self, manifests: Sequence[dict[str, Any]]) -> dict[str, Any]:
        doc = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": list(manifests)}
        return self.blob(json.dumps(doc).encode(), OCI_INDEX)

    def tag(self, name: str, desc: dict[str, Any]) -> None:
        entry = {k: v for k, v in desc.items() if k != "platform"}
        entry["annotations"] = {"org.opencontainers.image.ref.name": name}
        self.refs = [r for r in self.refs if r["annotations"]["org.opencontainers.image.ref.name"] != name]
        self.refs.append(entry)
        self._write_index()

    def _write_index(self) -> None:
        doc = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": self.refs}
        (self.root / "index.json").write_text(json.dumps(doc))


# ------------------------------------------------------------------------------------------ rootfs


def busybox_base() -> Layer:
    """A small but real root file system: static busybox with applet links, users, a shadow file."""
    busybox = Path(BUSYBOX).read_bytes()
    entries = [
        E("./", "dir", mode=0o755),
        E("bin", "dir", mode=0o755),
        E("bin/busybox", data=busybox, mode=0o755),
        *(E(f"bin/{a}", "symlink", target="busybox") for a in APPLETS),
        E("etc", "dir", mode=0o755),
        E("etc/os-release", data=b'ID=busybox\nNAME="BusyBox test image"\nVERSION_ID=1\n'),
        E("etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\nu:x:1000:1000::/home/u:/bin/sh\n"),
        E("etc/group", data=b"root:x:0:\nshadow:x:42:\nu:x:1000:\n"),
        E("etc/shadow", data=b"root:*:19000:0:99999:7:::\n", mode=0o640, uid=0, gid=42),
        E("root", "dir", mode=0o700),
        E("root/.profile", data=b"export PS1='vm# '\n", mode=0o644),
        E("tmp", "dir", mode=0o1777),
        E("usr/share/doc/busybox/README", data=b"docs\n"),
        E("usr/share/doc/old/notes", data=b"old notes\n"),
        E("var/cache/app/stale", data=b"stale\n"),
    ]
    return layer(*entries)


def app_layer() -> Layer:
    """Second layer: setuid/setgid files, a user's home, a hardlink, and a file a later layer deletes."""
    return layer(
        E("usr/bin/passwd-like", data=b"#!/bin/sh\necho setuid\n", mode=0o4755),
        E("usr/bin/crontab-like", data=b"#!/bin/sh\necho setgid\n", mode=0o2755, gid=42),
        E("usr/bin/passwd-link", "hardlink", target="usr/bin/passwd-like"),
        E("home/u", "dir", mode=0o750, uid=1000, gid=1000),
        E("home/u/.plan", data=b"ship it\n", mode=0o600, uid=1000, gid=1000),
        E("etc/app.conf", data=b"remove me\n"),
        E("bin/sticky", "dir", mode=0o1777),
    )


def whiteout_layer() -> Layer:
    """Third layer: deletes a file, empties a directory (opaque), adds a file."""
    return layer(
        E("etc/.wh.app.conf"),
        E("usr/share/doc/.wh..wh..opq"),
        E("usr/share/doc/kept-by-this-layer", data=b"new docs\n"),
        E("var/cache/.wh.app"),
        E("etc/motd", data=b"welcome\n"),
    )


def marker_layer(arch: str) -> Layer:
    return layer(E("etc/arch", data=f"{arch}\n".encode()))


# ------------------------------------------------------------------------------------------ registry


def _die_with_parent() -> None:
    # A test run killed without teardown must not leave registries behind (PR_SET_PDEATHSIG).
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class LocalRegistry:
    """docker-registry on 127.0.0.1:<random port>, storage and config in `workdir`; stopped by `stop`."""

    workdir: Path
    auth_yaml: str = ""
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    push_creds: str | None = None  # user:password for skopeo

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def storage(self) -> Path:
        return self.workdir / "storage"

    def start(self) -> LocalRegistry:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.storage.mkdir(exist_ok=True)
        for _attempt in range(5):
            self.port = free_port()
            config = self.workdir / "config.yml"
            config.write_text(
                "version: 0.1\n"
                "log:\n  level: info\n  accesslog:\n    disabled: true\n"
                f"storage:\n  filesystem:\n    rootdirectory: {self.storage}\n"
                "  maintenance:\n    uploadpurging:\n      enabled: false\n"
                f"http:\n  addr: 127.0.0.1:{self.port}\n  secret: {secrets.token_hex(16)}\n"
                + self.auth_yaml
            )
            log = (self.workdir / "registry.log").open("ab")
            self.proc = subprocess.Popen([REGISTRY_BIN, "serve", str(config)], stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
            log.close()
            if self._wait_ready():
                return self
            self.stop()
        raise RuntimeError(f"docker-registry did not start: {self.log_tail()}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://{self.host}/v2/", timeout=1).status_code in (200, 401):
                    return True
            time.sleep(0.05)
        return False

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return (self.workdir / "registry.log").read_text(errors="replace")[-2000:]
        return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def push(self, layout: Path, tag: str, repo: str, *, all_platforms: bool = False) -> str:
        """skopeo copy oci:<layout>:<tag> into <repo>:<tag>; returns the reference string."""
        ref = f"{self.host}/{repo}:{tag}"
        argv = ["skopeo", "copy", "--quiet", "--dest-tls-verify=false", "--preserve-digests"]
        if all_platforms:
            argv.append("--all")
        if self.push_creds:
            argv += ["--dest-creds", self.push_creds]
        argv += [f"oci:{layout}:{tag}", f"docker://{ref}"]
        proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120,
                              env={**os.environ, "HOME": str(self.workdir)})
        if proc.returncode != 0:
            raise RuntimeError(f"skopeo push failed: {proc.stderr.strip()}\nregistry log: {self.log_tail()}")
        return ref

    def blob_file(self, digest: str) -> Path:
        hex_ = digest.split(":", 1)[1]
        return self.storage / "docker/registry/v2/blobs/sha256" / hex_[:2] / hex_ / "data"

    def tamper(self, digest: str, *, offset: int | None = None, replace: bytes | None = None) -> None:
        """Corrupt a stored blob in place (same length, so the registry serves it as usual)."""
        path = self.blob_file(digest)
        data = bytearray(path.read_bytes())
        if replace is not None:
            data = bytearray(replace)
        else:
            at = len(data) // 2 if offset is None else offset % len(data)
            data[at] ^= 0xFF
        path.write_bytes(bytes(data))


def htpasswd_yaml(workdir: Path, users: dict[str, str]) -> str:
    path = workdir / "htpasswd"
    lines = []
    for user, password in users.items():
        proc = subprocess.run(["htpasswd", "-Bbn", user, password], capture_output=True, text=True, check=True)
        lines.append(proc.stdout.strip())
    path.write_text("\n".join(lines) + "\n")
    return f"auth:\n  htpasswd:\n    realm: banger-test\n    path: {path}\n"


# ------------------------------------------------------------------------------------------ tokens


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class TokenServer:
    """A token service for the registry's `auth: token`: anonymous pull of `public/*`, everything for users."""

    workdir: Path
    users: dict[str, str]
    service: str = "banger-test-registry"
    issuer: str = "banger-test-issuer"
    requests: list[dict[str, Any]] = field(default_factory=list)
    port: int = 0
    _server: ThreadingHTTPServer | None = None

    def start(self) -> TokenServer:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.workdir.mkdir(parents=True, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "banger test token signer")])
        now = dt.datetime.now(dt.UTC)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(self._key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
                .not_valid_after(now + dt.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(self._key, hashes.SHA256()))
        self.cert_path = self.workdir / "token-signer.pem"
        self.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self._x5c = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, fmt: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                server.handle(self)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def registry_yaml(self) -> str:
        return (f"auth:\n  token:\n    realm: {self.realm}\n    service: {self.service}\n"
                f"    issuer: {self.issuer}\n    rootcertbundle: {self.cert_path}\n")

    def handle(self, req: BaseHTTPRequestHandler) -> None:
        url = urlsplit(req.path)
        query = parse_qs(url.query)
        header = req.headers.get("Authorization", "")
        user = ""
        if header.startswith("Basic "):
            name, _, password = base64.b64decode(header[6:]).decode().partition(":")
            if self.users.get(name) != password:
                self.requests.append({"query": query, "user": name, "denied": True})
                self._reply(req, 401, {"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]})
                return
            user = name
        self.requests.append({"query": query, "user": user, "denied": False})
        access = []
        for scope in query.get("scope", []):
            kind, _, rest = scope.partition(":")
            repo, _, actions = rest.rpartition(":")
            wanted = set(actions.split(","))
            allowed = {"pull", "push"} if user else ({"pull"} if repo.startswith("public/") else set())
            access.append({"type": kind, "name": repo, "actions": sorted(wanted & allowed)})
        now = int(time.time())
        claims = {"iss": self.issuer, "sub": user, "aud": self.service, "exp": now + 300, "nbf": now - 10,
                  "iat": now, "jti": secrets.token_hex(8), "access": access}
        self._reply(req, 200, {"token": self._sign(claims), "expires_in": 300})

    def _sign(self, claims: dict[str, Any]) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

        header = {"typ": "JWT", "alg": "ES256", "x5c": [self._x5c]}
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        r, s = decode_dss_signature(self._key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
        return f"{signing_input}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    @staticmethod
    def _reply(req: BaseHTTPRequestHandler, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        req.send_response(status)
        req.send_header("Content-Type", "application/json")
        req.send_header("Content-Length", str(len(data)))
        req.end_headers()
        req.wfile.write(data)


# ------------------------------------------------------------------------------------------ helpers


def docker_config(path: Path, entries: dict[str, dict[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"auths": entries}))
    return path


def basic_auth_entry(user: str, password: str) -> dict[str, str]:
    return {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}


def snapshot(root: Path, skip: Sequence[Path] = ()) -> dict[str, tuple[int, str | None]]:
    """path -> (mode, sha256 of the content or the link target) for everything under `root` except `skip`."""
    skipped = {p.resolve() for p in skip}
    seen: dict[str, tuple[int, str | None]] = {}
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if (Path(dirpath) / d).resolve() not in skipped]
        for name in (*dirs, *files):
            path = Path(dirpath) / name
            info = path.lstat()
            content: str | None = None
            if path.is_symlink():
                content = os.readlink(path)
            elif path.is_file():
                content = hashlib.sha256(path.read_bytes()).hexdigest()
            seen[str(path.relative_to(root))] = (info.st_mode, content)
    return seen


def cache_problems(cache: Path) -> list[str]:
    """Anything in an OCI cache that is not a complete blob stored under its own digest."""
    problems = []
    blobs = cache / "blobs" / "sha256"
    for entry in sorted(blobs.iterdir()) if blobs.exists() else []:
        if entry.name.startswith("."):
            problems.append(f"leftover temporary file {entry.name}")
        elif hashlib.sha256(entry.read_bytes()).hexdigest() != entry.name:
            problems.append(f"blob {entry.name} does not match its name")
    return problems


@contextlib.contextmanager
def running(*services: LocalRegistry | TokenServer) -> Iterator[None]:
    try:
        yield
    finally:
        for service in reversed(services):
            service.stop()


def gzip_bomb(size: int) -> Layer:
    """A layer of one file of `size` zero bytes: tiny compressed, big unpacked."""
    info = tarfile.TarInfo("zeros")
    info.size = size
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(bytes(size)))
    raw = buf.getvalue()
    return Layer(raw, gzip.compress(raw, compresslevel=9, mtime=0))
