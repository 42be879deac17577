"""OCI pulls against a real registry (Debian's docker-registry on 127.0.0.1) fed by skopeo.

Every image is built by hand in an OCI layout (`oci_fixtures`), pushed with `skopeo copy`, and pulled
with `pull_image` into a real ext4 checked with debugfs. Hostile images and tampered registry
storage must fail with one clear line and leave nothing outside the staging directory: the test's
tmp dir is snapshotted around each failing pull, the output dir must stay empty and the blob cache
may only hold complete blobs stored under their own digest.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from banger.errors import BadRequest, BangerError, NotFound, Unauthorized
from banger.images import ext4
from banger.images.guestfiles import guest_files
from banger.images.oci import firstboot
from banger.images.oci.pull import PulledImage, pull_image
from banger.images.oci.tree import BUSYBOX_PATH, SHIM_TOOLS
from banger.images.oci.verify import DigestMismatch
from tests.integration.oci_fixtures import (
    DEBIAN_MINBASE,
    LAYER_TAR,
    Layer,
    LayoutBuilder,
    LocalRegistry,
    TokenServer,
    app_layer,
    basic_auth_entry,
    busybox_base,
    cache_problems,
    docker_config,
    gzip_bomb,
    htpasswd_yaml,
    layer,
    marker_layer,
    raw_layer,
    running,
    snapshot,
    tools_missing,
    whiteout_layer,
)
from tests.unit.test_flatten import E

pytestmark = pytest.mark.skipif(bool(tools_missing()), reason=f"missing tools: {', '.join(tools_missing())}")

MB = 1 << 20
KERNEL = "test-kernel"


@dataclass
class Env:
    tmp: Path
    registry: LocalRegistry
    sentinel: Path

    @property
    def cache(self) -> Path:
        return self.tmp / "cache" / "oci"

    @property
    def services(self) -> Path:
        """Where tests run their own registries and token servers (their files change on their own)."""
        return self.tmp / "services"

    @property
    def work(self) -> Path:
        return self.tmp / "work"

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    def layout(self, name: str) -> LayoutBuilder:
        return LayoutBuilder(self.tmp / "layouts" / name)

    def push(self, repo: str, layers: list[Layer], tag: str = "v1", **image: Any) -> str:
        builder = self.layout(repo.replace("/", "_") + tag)
        builder.tag(tag, builder.image(layers, **image))
        return self.registry.push(builder.root, tag, repo)

    def fresh_dirs(self) -> None:
        for d in (self.work, self.out):  # what the caller (the image service) does around each pull
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)

    def pull(self, ref: str, *, fresh: bool = True, **kw: Any) -> PulledImage:
        if fresh:
            self.fresh_dirs()
        kw.setdefault("docker_config", self.tmp / "no-docker-config.json")
        return pull_image(ref, self.work, self.out, cache_dir=self.cache, kernel_ref=KERNEL, **kw)

    def pull_fails(self, ref: str, error: type[BangerError], **kw: Any) -> str:
        """Pull, expect `error`, check nothing escaped the staging dir, and return the one-line message."""
        skip = [self.work / "rootfs", self.tmp / "cache", self.tmp / "layouts", self.services]
        self.fresh_dirs()
        before = snapshot(self.tmp, skip)
        with pytest.raises(error) as info:
            self.pull(ref, fresh=False, **kw)
        message = str(info.value)
        assert "\n" not in message
        assert snapshot(self.tmp, skip) == before
        assert list(self.out.iterdir()) == []
        assert cache_problems(self.cache) == []
        return message


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRegistry]:
    reg = LocalRegistry(tmp_path_factory.mktemp("registry")).start()
    with running(reg):
        yield reg


@pytest.fixture
def env(tmp_path: Path, registry: LocalRegistry) -> Env:
    sentinel = tmp_path / "sentinel"
    sentinel.mkdir()
    (sentinel / "keep").write_text("keep me\n")
    return Env(tmp_path, registry, sentinel)


def mode_of(image: Path, path: str) -> tuple[int, int, int]:
    s = ext4.stat(image, path)
    return s.uid, s.gid, s.mode


def blob_hex(desc_digest: str) -> str:
    return desc_digest.split(":", 1)[1]


# ------------------------------------------------------------------------------------------- pulls


def test_pull_multi_layer_image(env: Env) -> None:
    layers = [busybox_base(), app_layer(), whiteout_layer()]
    ref = env.push("test/busybox", layers)
    result = env.pull(ref)
    rootfs = result.rootfs
    assert result.name == "busybox-v1"

    # Ownership and special bits, replayed from the tar headers with debugfs (nothing mounted).
    assert mode_of(rootfs, "/usr/bin/passwd-like") == (0, 0, 0o104755)
    assert mode_of(rootfs, "/usr/bin/crontab-like") == (0, 42, 0o102755)
    assert mode_of(rootfs, "/etc/shadow") == (0, 42, 0o100640)
    assert mode_of(rootfs, "/home/u") == (1000, 1000, 0o40750)
    assert mode_of(rootfs, "/home/u/.plan") == (1000, 1000, 0o100600)
    assert mode_of(rootfs, "/tmp") == (0, 0, 0o41777)
    assert mode_of(rootfs, "/bin/sticky") == (0, 0, 0o41777)
    assert mode_of(rootfs, "/bin/busybox") == (0, 0, 0o100755)
    assert ext4.inode_info(rootfs, "/bin/sh").target == "busybox"
    link = ext4.inode_info(rootfs, "/usr/bin/passwd-link")
    assert link.links == 2 and link.mode == 0o104755  # a hardlink shares the setuid inode
    # Whiteouts: a deleted file, an opaque directory keeping only the new layer's entry, a deleted dir.
    for gone in ("/etc/app.conf", "/usr/share/doc/busybox", "/usr/share/doc/old", "/var/cache/app"):
        with pytest.raises(NotFound):
            ext4.stat(rootfs, gone)
    assert ext4.read_file(rootfs, "/usr/share/doc/kept-by-this-layer") == b"new docs\n"
    assert ext4.read_file(rootfs, "/etc/motd") == b"welcome\n"

    # banger's guest files, the first-boot script and its unit, mount points the image lacked.
    for f in guest_files():
        info = ext4.inode_info(rootfs, f.path)
        assert (info.uid, info.gid) == (0, 0)
        if f.kind == "file":
            assert ext4.read_file(rootfs, f.path) == f.data
    assert ext4.read_file(rootfs, firstboot.PATH) == firstboot.script()
    assert mode_of(rootfs, firstboot.PATH) == (0, 0, 0o100755)
    assert ext4.inode_info(rootfs, firstboot.WANTS_PATH).target == firstboot.UNIT_PATH
    assert mode_of(rootfs, "/proc") == (0, 0, 0o40555)
    assert mode_of(rootfs, "/run") == (0, 0, 0o40755)
    with pytest.raises(NotFound):  # busybox provides every tool: no shims
        ext4.stat(rootfs, BUSYBOX_PATH)
    fsck = subprocess.run(["e2fsck", "-fn", str(rootfs)], capture_output=True, text=True, check=False)
    assert fsck.returncode == 0, fsck.stdout

    # The work seed carries /root; the manifest says what was pulled and what first boot will do.
    assert result.work_seed is not None
    assert ext4.read_file(result.work_seed, "/.profile") == b"export PS1='vm# '\n"
    m = json.loads(result.manifest_path.read_text())
    assert m["source"] == "oci" and m["reference"] == ref and m["kernel_ref"] == KERNEL
    assert m["layers"] == [x.digest for x in layers]
    assert m["first_boot"] == {"installs": ["sshd", "python3"], "package_manager": ""}
    assert m["config"]["cmd"] == ["/bin/sh"]
    assert "banger knows no package manager" in m["warnings"][0]

    # The cache is an OCI layout: every blob under its digest, the reference recorded.
    assert cache_problems(env.cache) == []
    stored = {p.name for p in (env.cache / "blobs/sha256").iterdir()}
    assert {blob_hex(x.digest) for x in layers} | {blob_hex(result.digest)} <= stored
    index = json.loads((env.cache / "index.json").read_text())
    assert [(e["digest"], e["annotations"]["org.opencontainers.image.ref.name"]) for e in index["manifests"]] == [
        (result.digest, ref)]
    assert not (env.work / "rootfs").exists()  # the unpacked tree is freed once the image is built


def test_minimal_image_gets_mount_points_and_shims(env: Env) -> None:
    ref = env.push("test/scratch", [layer(E("app/hello", data=b"hi\n", mode=0o755),
                                          E("etc/os-release", data=b"ID=debian\n"))])
    rootfs = env.pull(ref).rootfs
    for path in ("/proc", "/sys", "/dev", "/run", "/mnt", "/root", "/tmp"):
        assert ext4.inode_info(rootfs, path).mode & 0o170000 == 0o040000
    assert mode_of(rootfs, BUSYBOX_PATH) == (0, 0, 0o100755)
    for tool in SHIM_TOOLS:
        assert ext4.inode_info(rootfs, f"/usr/local/sbin/{tool}").target == BUSYBOX_PATH
    assert ext4.inode_info(rootfs, "/bin/sh").target == BUSYBOX_PATH
    m = json.loads((env.out / "manifest.json").read_text())
    assert m["first_boot"] == {"installs": ["sshd", "python3"], "package_manager": "apt"}
    assert m["warnings"] == []


@pytest.mark.skipif(not DEBIAN_MINBASE.exists(), reason=f"{DEBIAN_MINBASE} not built (bench/oci_pull.py builds it)")
def test_debian_image_keeps_owners_and_setuid_bits(env: Env) -> None:
    # The real thing: a Debian minbase root file system as one plain tar layer, as `docker export` makes.
    tar = DEBIAN_MINBASE.read_bytes()
    ref = env.push("debian/minbase", [Layer(tar, tar, LAYER_TAR)])
    result = env.pull(ref)
    rootfs = result.rootfs
    assert mode_of(rootfs, "/usr/bin/su") == (0, 0, 0o104755)
    assert mode_of(rootfs, "/usr/bin/passwd") == (0, 0, 0o104755)
    assert mode_of(rootfs, "/usr/bin/chage") == (0, 42, 0o102755)  # setgid shadow
    assert mode_of(rootfs, "/etc/shadow") == (0, 42, 0o100640)
    assert mode_of(rootfs, "/tmp") == (0, 0, 0o41777)
    assert ext4.inode_info(rootfs, "/usr/bin/perl5.36.0").links == 2
    assert ext4.inode_info(rootfs, "/bin").target == "usr/bin"
    assert result.manifest["first_boot"] == {"installs": ["sshd", "python3"], "package_manager": "apt"}
    # minbase has no iproute2 and no init system: `ip` and `reboot` come from busybox, nothing else does.
    assert ext4.inode_info(rootfs, "/usr/local/sbin/ip").target == BUSYBOX_PATH
    assert ext4.inode_info(rootfs, "/usr/local/sbin/reboot").target == BUSYBOX_PATH
    with pytest.raises(NotFound):
        ext4.stat(rootfs, "/usr/local/sbin/mount")
    fsck = subprocess.run(["e2fsck", "-fn", str(rootfs)], capture_output=True, text=True, check=False)
    assert fsck.returncode == 0, fsck.stdout


def test_index_resolves_to_linux_amd64(env: Env) -> None:
    b = env.layout("multi")
    base = busybox_base()
    amd = b.image([base, marker_layer("amd64")])
    arm = b.image([base, marker_layer("arm64")], arch="arm64")
    index = b.index([arm, amd])
    b.tag("v1", index)
    ref = env.registry.push(b.root, "v1", "test/multi", all_platforms=True)
    result = env.pull(ref)
    assert ext4.read_file(result.rootfs, "/etc/arch") == b"amd64\n"
    assert result.digest == amd["digest"]
    assert result.manifest["index_digest"] == index["digest"]

    only_arm = env.layout("arm-only")
    only_arm.tag("v1", only_arm.index([only_arm.image([marker_layer("arm64")], arch="arm64")]))
    ref = env.registry.push(only_arm.root, "v1", "test/arm-only", all_platforms=True)
    message = env.pull_fails(ref, NotFound)
    assert message == ("image has no linux/amd64 variant (it has: linux/arm64) "
                       "(banger runs x86_64 Linux guests only)")


def test_single_manifest_for_another_arch_is_refused(env: Env) -> None:
    ref = env.push("test/arm-single", [marker_layer("arm64")], arch="arm64")
    assert env.pull_fails(ref, BadRequest) == ("image is for linux/arm64, not linux/amd64 "
                                               "(banger runs x86_64 Linux guests only)")


def test_by_digest_comes_from_the_cache(env: Env, tmp_path: Path) -> None:
    reg = LocalRegistry(env.services / "own-registry").start()
    with running(reg):
        env.registry = reg
        ref = env.push("test/cached", [busybox_base(), app_layer()])
        first = env.pull(ref)
        assert env.pull_fails(f"{reg.host}/test/absent:v1", NotFound).startswith(
            f"manifest {reg.host}/test/absent:v1 not found in {reg.host} (MANIFEST_UNKNOWN: manifest unknown)")
    # The registry is gone: a digest reference is served from the cache alone, blobs re-verified.
    again = env.pull(f"{reg.host}/test/cached@{first.digest}")
    assert again.digest == first.digest
    assert ext4.stat(again.rootfs, "/usr/bin/passwd-like").mode == 0o104755
    # A tag always asks the registry (tags move), so that fails now.
    assert "cannot fetch manifest" in env.pull_fails(ref, BangerError)


# ------------------------------------------------------------------------------------------- auth


def test_basic_auth(env: Env, tmp_path: Path) -> None:
    workdir = env.services / "basic-registry"
    workdir.mkdir(parents=True)
    reg = LocalRegistry(workdir, auth_yaml=htpasswd_yaml(workdir, {"bob": "hunter2"}), push_creds="bob:hunter2")
    with running(reg.start()):
        env.registry = reg
        ref = env.push("private/busybox", [busybox_base()])
        assert env.pull_fails(ref, Unauthorized) == (
            f"{reg.host} requires a login to pull private/busybox "
            f"(`docker login {reg.host}` (banger reads ~/.docker/config.json))")
        wrong = docker_config(tmp_path / "wrong.json", {reg.host: basic_auth_entry("bob", "nope")})
        message = env.pull_fails(ref, Unauthorized, docker_config=wrong)
        assert message.startswith(f"{reg.host} refused access to private/busybox (401 UNAUTHORIZED")
        assert "check the credentials of 'bob'" in message
        good = docker_config(tmp_path / "good.json", {f"http://{reg.host}": basic_auth_entry("bob", "hunter2")})
        assert ext4.stat(env.pull(ref, docker_config=good).rootfs, "/etc/shadow").gid == 42


def test_token_auth(env: Env, tmp_path: Path) -> None:
    tokens = TokenServer(env.services / "tokens", users={"alice": "s3cret"}).start()
    reg = LocalRegistry(env.services / "token-registry", auth_yaml=tokens.registry_yaml(), push_creds="alice:s3cret")
    with running(tokens, reg.start()):
        env.registry = reg
        public = env.push("public/busybox", [busybox_base()])
        private = env.push("private/busybox", [busybox_base(), app_layer()])
        tokens.requests.clear()

        env.pull(public)  # anonymous token, pull scope
        assert [(r["user"], r["query"]["scope"], r["query"]["service"]) for r in tokens.requests] == [
            ("", ["repository:public/busybox:pull"], [tokens.service])]

        message = env.pull_fails(private, Unauthorized)
        assert message.startswith(f"{reg.host} refused access to private/busybox (401 UNAUTHORIZED")

        wrong = docker_config(tmp_path / "wrong.json", {reg.host: {"username": "alice", "password": "guess"}})
        assert env.pull_fails(private, Unauthorized, docker_config=wrong).startswith(
            f"the token server of {reg.host} refused the credentials for private/busybox (401 UNAUTHORIZED: "
            "bad credentials)")

        tokens.requests.clear()
        good = docker_config(tmp_path / "good.json", {reg.host: {"username": "alice", "password": "s3cret"}})
        result = env.pull(private, docker_config=good)
        assert ext4.stat(result.rootfs, "/usr/bin/passwd-like").mode == 0o104755
        assert {r["user"] for r in tokens.requests} == {"alice"}
        assert len(tokens.requests) == 1  # one token for the whole pull: cached per repository


class _FakeRegistry:
    """Fault injection for auth shapes the real registry does not produce: a Bearer challenge, a token
    server, and a blob redirect to another origin that must not receive the Authorization header."""

    def __init__(self, token_body: dict[str, Any], realm: str | None = None) -> None:
        self.token_body = token_body
        self.seen: list[tuple[str, str | None]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, fmt: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                fake.handle(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.other = ThreadingHTTPServer(("127.0.0.1", 0), Handler)  # the "CDN" for blobs
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        self.cdn = f"127.0.0.1:{self.other.server_address[1]}"
        self.realm = realm or f"http://{self.host}/token"
        self.blobs: dict[str, bytes] = {}
        self.manifest = b""

    def __enter__(self) -> _FakeRegistry:
        import threading

        for s in (self.server, self.other):
            threading.Thread(target=s.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        for s in (self.server, self.other):
            s.shutdown()
            s.server_close()

    def add_image(self, layers: list[Layer]) -> None:
        b_config = json.dumps({"architecture": "amd64", "os": "linux",
                               "rootfs": {"type": "layers", "diff_ids": [x.diff_id for x in layers]}}).encode()
        self.blobs = {"sha256:" + hashlib.sha256(b).hexdigest(): b for b in [b_config, *(x.blob for x in layers)]}
        self.manifest = json.dumps({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": "sha256:" + hashlib.sha256(b_config).hexdigest(), "size": len(b_config)},
            "layers": [{"mediaType": x.media_type, "digest": x.digest, "size": len(x.blob)} for x in layers],
        }).encode()

    def handle(self, req: BaseHTTPRequestHandler) -> None:
        auth = req.headers.get("Authorization")
        self.seen.append((req.path, auth))
        if req.path.startswith("/token"):
            return self._send(req, 200, json.dumps(self.token_body).encode())
        if req.path.startswith("/cdn/"):
            return self._send(req, 200, self.blobs[req.path[len("/cdn/") :]])
        if auth != "Bearer good-token":
            req.send_response(401)
            req.send_header("WWW-Authenticate", f'Bearer realm="{self.realm}",service="fake"')
            req.send_header("Content-Length", "0")
            req.end_headers()
            return None
        if "/manifests/" in req.path:
            return self._send(req, 200, self.manifest, "application/vnd.oci.image.manifest.v1+json")
        digest = req.path.rsplit("/", 1)[1]
        req.send_response(307)
        req.send_header("Location", f"http://{self.cdn}/cdn/{digest}")
        req.send_header("Content-Length", "0")
        req.end_headers()
        return None

    @staticmethod
    def _send(req: BaseHTTPRequestHandler, status: int, body: bytes, ctype: str = "application/json") -> None:
        req.send_response(status)
        req.send_header("Content-Type", ctype)
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        req.wfile.write(body)


def test_bearer_flow_and_redirects_do_not_leak_the_token(env: Env) -> None:
    with _FakeRegistry({"access_token": "good-token"}) as fake:
        fake.add_image([busybox_base()])
        result = env.pull(f"{fake.host}/fake/image:v1")
        assert ext4.stat(result.rootfs, "/etc/shadow").gid == 42
        cdn_requests = [auth for path, auth in fake.seen if path.startswith("/cdn/")]
        assert len(cdn_requests) == 2 and cdn_requests == [None, None]  # config + layer, no Authorization
        assert [p for p, _ in fake.seen].count("/token?service=fake&scope=repository%3Afake%2Fimage%3Apull") == 1


@pytest.mark.parametrize(
    ("token_body", "realm", "creds", "expected"),
    [
        ({"nothing": "here"}, None, False, "the token server of {host} returned no token"),
        ({"token": "good-token"}, "ftp://example/token", False,
         "{host} sent a token realm 'ftp://example/token' that is not an http(s) URL"),
        ({"token": "good-token"}, "http://example.invalid/token", True,
         "refusing to send credentials for {host} over plain HTTP to example.invalid"),
    ],
)
def test_bad_auth_shapes(env: Env, tmp_path: Path, token_body: dict[str, Any], realm: str | None, creds: bool,
                         expected: str) -> None:
    with _FakeRegistry(token_body, realm) as fake:
        fake.add_image([busybox_base()])
        config = docker_config(tmp_path / "c.json", {fake.host: basic_auth_entry("u", "p")} if creds else {})
        message = env.pull_fails(f"{fake.host}/fake/image:v1", Unauthorized, docker_config=config)
        assert message == expected.format(host=fake.host)


# ------------------------------------------------------------------------------------------ hostile


def small_base() -> Layer:
    return layer(E("etc", "dir", mode=0o755), E("etc/hostname", data=b"base\n"), E("data/file", data=b"f\n"))


def escape_link(env: Env) -> Layer:
    return layer(E("etc2", "symlink", target=str(env.sentinel)))


HOSTILE: list[tuple[str, Callable[[Env], list[Layer]], str]] = [
    ("traversal", lambda e: [layer(E("../../sentinel/keep", data=b"pwned"))],
     'layer 2 ({d2}): entry "../../sentinel/keep" escapes the root'),
    ("absolute-path", lambda e: [layer(E("/etc/passwd", data=b"pwned"))],
     'layer 2 ({d2}): entry "/etc/passwd" is an absolute path'),
    ("symlink-ancestor-then-write", lambda e: [escape_link(e), layer(E("etc2/keep", data=b"pwned"))],
     'layer 3 ({d3}): entry "etc2/keep" goes through the symlink "etc2"'),
    ("whiteout-through-symlink", lambda e: [escape_link(e), layer(E("etc2/.wh.keep"))],
     'layer 3 ({d3}): entry "etc2/.wh.keep" goes through the symlink "etc2"'),
    ("opaque-through-symlink", lambda e: [escape_link(e), layer(E("etc2/.wh..wh..opq"))],
     'layer 3 ({d3}): entry "etc2/.wh..wh..opq" goes through the symlink "etc2"'),
    ("hardlink-escape", lambda e: [layer(E("x", "hardlink", target="../sentinel/keep"))],
     'layer 2 ({d2}): entry "x" is a hardlink to "../sentinel/keep", which escapes the root'),
    ("hardlink-through-symlink", lambda e: [escape_link(e), layer(E("x", "hardlink", target="etc2/keep"))],
     'layer 3 ({d3}): entry "x" is a hardlink to "etc2/keep", which goes through the symlink "etc2"'),
    ("escaping-relative-symlink", lambda e: [layer(E("data/up", "symlink", target="../../sentinel"))],
     'layer 2 ({d2}): entry "data/up" is an unsafe symlink: target "../../sentinel" escapes the root'),
    ("unencodable-name", lambda e: [layer(E('etc/bad"name', data=b"x"))],
     'layer 2 ({d2}): entry "etc/bad\\"name" has a name the image tooling cannot encode '
     '(control characters, " and non-UTF-8 bytes are not allowed)'),
    ("not-a-tar", lambda e: [raw_layer(b"\x1f\x8b" + b"garbage" * 50)],
     "layer 2 ({d2}): not a valid gzip tar stream"),
]


@pytest.mark.parametrize(("case", "make", "expected"), HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_layers(env: Env, case: str, make: Callable[[Env], list[Layer]], expected: str) -> None:
    layers = [small_base(), *make(env)]
    ref = env.push(f"hostile/{case}", layers)
    message = env.pull_fails(ref, BadRequest)
    short = {f"d{i}": x.digest[:19] + "…" for i, x in enumerate(layers, 1)}
    assert message.startswith(expected.format(**short))
    assert (env.sentinel / "keep").read_text() == "keep me\n"
    assert [p.name for p in env.sentinel.iterdir()] == ["keep"]


def test_device_nodes_are_skipped(env: Env) -> None:
    ref = env.push("hostile/devices", [small_base(), layer(E("dev/sda", "blk", mode=0o660), E("dev/null", "chr"),
                                                           E("run/pipe", "fifo"), E("data/after", data=b"ok\n"))])
    rootfs = env.pull(ref).rootfs
    assert ext4.read_file(rootfs, "/data/after") == b"ok\n"
    for node in ("/dev/sda", "/dev/null", "/run/pipe"):
        with pytest.raises(NotFound):
            ext4.stat(rootfs, node)


def test_layer_over_the_cap_is_never_fetched(env: Env) -> None:
    big = raw_layer(os.urandom(3 * MB))
    ref = env.push("hostile/big", [small_base(), big])
    message = env.pull_fails(ref, BadRequest, max_bytes=2 * MB)
    assert message == f"layer 2 {big.digest[:19]}… is {3 * MB} bytes, over the cap of {2 * MB} bytes"
    assert not (env.cache / "blobs/sha256" / blob_hex(big.digest)).exists()


def test_unpacked_size_over_the_cap(env: Env) -> None:
    bomb = gzip_bomb(8 * MB)
    ref = env.push("hostile/bomb", [small_base(), bomb])
    message = env.pull_fails(ref, BadRequest, max_bytes=4 * MB)
    assert message == (f'layer 2 ({bomb.digest[:19]}…): entry "zeros" would take the extracted size over '
                       f"the limit of {4 * MB} bytes")


@pytest.mark.parametrize(("where", "offset"), [("gzip-header", 2), ("middle", None), ("gzip-trailer", -1)])
def test_blob_whose_digest_lies(env: Env, where: str, offset: int | None) -> None:
    # Corrupt the blob in the registry's own storage: it verified the digest at push time and now serves
    # other bytes under it. A bad gzip header breaks the stream before any entry (flatten fails first and
    # the digest is still what gets reported); a flipped byte in the middle changes the content; the
    # trailer is never read by tar at all. Only the digest check catches the last two.
    reg = LocalRegistry(env.services / f"registry-{where}").start()
    with running(reg):
        env.registry = reg
        layers = [busybox_base(), app_layer()]
        ref = env.push("tampered/layer", layers)
        target = layers[1]
        reg.tamper(target.digest, offset=offset)
        message = env.pull_fails(ref, DigestMismatch)
    assert message.startswith(f"layer 2 ({target.digest[:19]}…) of {ref} does not match its digest: "
                              f"expected {target.digest}, got sha256:")
    assert not (env.cache / "blobs/sha256" / blob_hex(target.digest)).exists()
    assert (env.cache / "blobs/sha256" / blob_hex(layers[0].digest)).exists()  # the good layer is kept


@pytest.mark.parametrize("offset", [2, -1], ids=["gzip-header", "gzip-trailer"])
def test_corrupt_cached_layer_is_dropped_and_fetched_again(env: Env, offset: int) -> None:
    layers = [busybox_base(), app_layer()]
    ref = env.push("cache/corrupt", layers)
    env.pull(ref)
    blob = env.cache / "blobs/sha256" / blob_hex(layers[1].digest)
    data = bytearray(blob.read_bytes())
    data[offset] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(DigestMismatch, match=r"layer 2 \(sha256:.{12}…\) of .* does not match its digest"):
        env.pull(ref)
    assert not blob.exists()
    assert ext4.stat(env.pull(ref).rootfs, "/usr/bin/passwd-like").mode == 0o104755
    assert cache_problems(env.cache) == []


def test_manifest_whose_digest_lies(env: Env, tmp_path: Path) -> None:
    reg = LocalRegistry(env.services / "registry-manifest").start()
    with running(reg):
        env.registry = reg
        # By tag: the registry's Docker-Content-Digest names the pushed manifest, the body is another.
        b = env.layout("lying")
        image = b.image([busybox_base()])
        b.tag("v1", image)
        ref = reg.push(b.root, "v1", "tampered/manifest")
        stored = reg.blob_file(image["digest"]).read_bytes()
        reg.tamper(image["digest"], replace=stored.replace(b'"schemaVersion": 2', b'"schemaVersion":\t2', 1))
        message = env.pull_fails(ref, BangerError)
        assert message.startswith(f"manifest {reg.host}/tampered/manifest:v1 does not match its digest: "
                                  f"the registry says {image['digest']}, the body hashes to sha256:")
        # Through an index: the entry's digest names the manifest, the registry serves other bytes.
        b = env.layout("lying-index")
        amd = b.image([busybox_base()])
        b.tag("v1", b.index([amd]))
        ref = reg.push(b.root, "v1", "tampered/index", all_platforms=True)
        stored = reg.blob_file(amd["digest"]).read_bytes()
        reg.tamper(amd["digest"], replace=stored.replace(b'"schemaVersion": 2', b'"schemaVersion":\t2', 1))
        message = env.pull_fails(ref, DigestMismatch)
        assert message.startswith(f"manifest {reg.host}/tampered/index@{amd['digest']} does not match its "
                                  f"digest: expected {amd['digest']}, got sha256:")


def test_docker_config_auth_b64_is_used(env: Env, tmp_path: Path) -> None:
    """The `auth` form of config.json (what `docker login` writes) against the real Basic-auth registry."""
    workdir = env.services / "b64-registry"
    workdir.mkdir(parents=True)
    reg = LocalRegistry(workdir, auth_yaml=htpasswd_yaml(workdir, {"carol": "pa:ss"}), push_creds="carol:pa:ss")
    with running(reg.start()):
        env.registry = reg
        ref = env.push("private/b64", [busybox_base()])
        encoded = base64.b64encode(b"carol:pa:ss").decode()
        config = docker_config(tmp_path / "config.json", {reg.host: {"auth": encoded}})
        assert env.pull(ref, docker_config=config).work_seed is not None


# ------------------------------------------------------------------------------------ image service


class _Ops:
    """Stands in for the operation registry's Reporter: records stages."""

    def __init__(self) -> None:
        self.stages: list[str] = []

    def stage(self, name: str) -> None:
        self.stages.append(name)

    def detail(self, text: str) -> None:
        pass


def test_image_service_pull_oci(env: Env, tmp_path: Path) -> None:
    import asyncio
    from types import SimpleNamespace

    from banger import model
    from banger.daemon.images import ImageService
    from banger.errors import AlreadyExists
    from banger.paths import Layout
    from banger.store import db
    from banger.store import images as image_rows
    from banger.store import kernels as kernel_rows

    root = tmp_path / "banger"
    layout = Layout(mode="user", config_dir=root / "config", state_dir=root / "state", cache_dir=root / "cache",
                    runtime_dir=root / "run", helper_runtime_dir=root / "run", owner_home=root / "home")
    layout.state_dir.mkdir(parents=True)
    store = db.open_db(layout.db_path)
    kernel_rows.upsert_kernel(store, model.KernelRecord(
        name=KERNEL, distro="debian", arch="amd64", kernel_version="6.1", source="test", sha256="0" * 64,
        imported_at=db.utc_now(), vmlinux_path="/nonexistent"))
    daemon = SimpleNamespace(layout=layout, store=store, config=SimpleNamespace(max_download_bytes=64 * MB))
    service = ImageService(daemon)  # type: ignore[arg-type]
    ref = env.push("service/busybox", [busybox_base(), app_layer()])
    ops = _Ops()

    record = asyncio.run(service.pull_oci(ref, ops, kernel_ref=KERNEL))  # type: ignore[arg-type]
    assert record["name"] == "busybox-v1" and record["source"] == f"oci:{ref}"
    assert record["extra"]["init"] == "fast" and record["extra"]["reference"] == ref
    stored = image_rows.get_image_by_name(store, "busybox-v1")
    assert Path(stored.rootfs_path).parent == layout.image_dir(stored.id)
    assert ext4.stat(Path(stored.rootfs_path), "/usr/bin/passwd-like").mode == 0o104755
    assert Path(stored.work_seed_path).exists()
    assert (layout.oci_cache_dir / "index.json").exists()
    assert ops.stages[-1] == "registering"

    with pytest.raises(AlreadyExists):
        asyncio.run(service.pull_oci(ref, ops, kernel_ref=KERNEL))  # type: ignore[arg-type]
    hostile = env.push("service/hostile", [small_base(), escape_link(env), layer(E("etc2/keep", data=b"x"))])
    with pytest.raises(BadRequest, match='goes through the symlink "etc2"'):
        asyncio.run(service.pull_oci(hostile, ops, name="hostile", kernel_ref=KERNEL))  # type: ignore[arg-type]
    assert sorted(p.name for p in layout.images_dir.iterdir()) == [stored.id]  # no staging or work left over
    assert [i.name for i in image_rows.list_images(store)] == ["busybox-v1"]


@pytest.mark.network
@pytest.mark.skipif(os.getuid() != 0, reason="embedded mode needs root")
def test_cli_image_pull_from_registry_and_cache_prune(env: Env) -> None:
    """The whole path a user takes: `banger image pull <ref>` through the real daemon, then the cache."""
    import json

    from tests.embedded import Embedded

    ref = env.push("cli/busybox", [busybox_base(), app_layer()])
    emb = Embedded()
    emb.env["XDG_CACHE_HOME"] = "/var/tmp/banger-test-cache/xdg-cache-oci"
    try:
        bad = emb.run("image", "pull", "debian-bookworm", "--name", "x")
        assert bad.returncode == 1 and bad.stderr.startswith(
            "banger: --name and --kernel-ref go with registry references, not catalog names")
        out = emb.run("image", "pull", ref, "--name", "bb", "--kernel-ref", "debian-12-cloud", "--json", check=True)
        image = json.loads(out.stdout)
        assert image["name"] == "bb" and image["source"] == f"oci:{ref}" and image["kernel_ref"] == "debian-12-cloud"
        assert ext4.stat(Path(image["rootfs_path"]), "/usr/bin/passwd-like").mode == 0o104755
        would = emb.run("image", "cache", "prune", "--dry-run", check=True).stdout
        assert would.startswith("would free ") and " blob(s) in " in would and "0 blob(s)" not in would
        freed = emb.run("image", "cache", "prune", check=True).stdout
        assert freed.startswith("freed ")
        assert emb.run("image", "cache", "prune", "--dry-run", check=True).stdout.startswith("would free 0 B across 0")
    finally:
        emb.close()
