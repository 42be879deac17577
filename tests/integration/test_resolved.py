"""`.vm` wiring against a real systemd-resolved, in private namespaces (reference §7.5).

This host runs no systemd and has no systemd-resolved, so the test brings its own: bookworm's
`systemd-resolved` .deb, verified the way kernels are (InRelease with gpgv, the Packages index by the
signed Release's sha256, the .deb by the index's sha256) and unpacked with `dpkg -x`. The binary needs
`libsystemd-shared` of exactly its own version: the installed one when `dpkg-query` says the versions
match, otherwise the matching `libsystemd-shared` .deb from the same verified index, bind-mounted over
the installed library inside the private mount namespace only.

    unshare --mount --net --pid (private /run on tmpfs, private /etc/passwd|group|resolv.conf binds)
      dbus-daemon     Debian's own system.conf + the package's resolve1 policy, on /run/dbus
      systemd-resolved as systemd-resolve with the unit's ambient capabilities (like `User=`)
      banger's VmDnsServer on 127.0.0.1:42069 with foo.vm -> 172.31.0.7
      br-fc-rt 172.31.0.1/24, given carrier by a veth port (resolved ignores links without carrier;
      in production a VM's tap gives the bridge carrier)

The wiring runs through the exact `priv.resolver_*` handlers the root helper registers, with the
unpacked `resolvectl` first on PATH. Answers are checked with `resolvectl` and with real queries through
resolved's stub on 127.0.0.53 (raw DNS and glibc's resolver via `getent`). Killing the namespace's first
process ends everything in it; nothing of the host's networking or resolver configuration is touched.

Markers: `root` (namespaces) and `network` (the Debian archive). BANGER_TEST_CACHE (default
/var/tmp/banger-test-cache) keeps the .debs under debs/<sha256>.deb; they are re-hashed on use.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import lzma
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from banger.kernels import debian, debian_index
from banger.system.download import fetch_to

pytestmark = [
    pytest.mark.root,
    pytest.mark.network,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: mount, network and pid namespaces"),
]

MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"
LIBDIR = "usr/lib/x86_64-linux-gnu/systemd"
BRIDGE = "br-fc-rt"
VM_IP = "172.31.0.7"
DNS_ADDR = "127.0.0.1:42069"
TOOLS = ("unshare", "nsenter", "setpriv", "dbus-daemon", "ip", "gpgv", "dpkg-deb", "dpkg-query", "getent")
CAPS = "+setpcap,+net_raw,+net_bind_service"  # systemd-resolved.service's AmbientCapabilities=

# --- the package, verified --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResolvedTree:
    root: Path  # the unpacked systemd-resolved (and, if needed, libsystemd-shared)
    version: str
    library: Path | None  # the libsystemd-shared to bind over the installed one; None: installed matches


def _cache() -> Path:
    return Path(os.environ.get("BANGER_TEST_CACHE") or "/var/tmp/banger-test-cache")


def _verified_packages_text(work: Path) -> str:
    inrelease = fetch_to(f"{MIRROR}/dists/{SUITE}/InRelease", work, max_bytes=debian.INRELEASE_MAX_BYTES)
    release = debian_index.parse_release(debian.verify_inrelease(inrelease, debian.DEFAULT_KEYRING, work))
    debian_index.check_release(release, SUITE, datetime.now(UTC))
    index = debian_index.packages_index(release, "main", "amd64")
    assert index.path.endswith(".xz"), index.path
    packed = fetch_to(f"{MIRROR}/dists/{SUITE}/{index.path}", work, max_bytes=index.size,
                      sha256=index.sha256, size=index.size)
    return lzma.decompress(packed.read_bytes()).decode("utf-8", "replace")


def _by_version(a: dict[str, str], b: dict[str, str]) -> int:
    return debian_index.compare_versions(a["Version"], b["Version"])


def _stanza(text: str, name: str, version: str | None = None) -> dict[str, str]:
    """The index stanza of `name` (at `version`, else the highest) for amd64."""
    stanzas = [s for s in debian_index.find_stanzas(text, lambda n: n == name)
               if s.get("Architecture") == "amd64" and version in (None, s.get("Version"))]
    assert stanzas, f"{name} {version or ''} is not in the verified {SUITE} index"
    return max(stanzas, key=functools.cmp_to_key(_by_version))


def _deb(stanza: dict[str, str]) -> debian_index.DebPackage:
    filename = stanza["Filename"]
    assert not filename.startswith("/") and ".." not in filename.split("/"), filename
    return debian_index.DebPackage(stanza["Package"], stanza["Version"], filename, stanza["SHA256"].lower(),
                             int(stanza["Size"]))


def _cached_deb(pkg: debian_index.DebPackage, work: Path) -> Path:
    """The .deb from the cache when its sha256 still matches the verified index, else downloaded."""
    cached = _cache() / "debs" / f"{pkg.sha256}.deb"
    if cached.is_file() and hashlib.sha256(cached.read_bytes()).hexdigest() == pkg.sha256:
        return cached
    fetched = debian.fetch_deb(MIRROR, pkg, work, 64 << 20)
    cached.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(fetched, cached)
    return cached


def _installed_version(package: str) -> str | None:
    proc = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", package],
                          capture_output=True, text=True, check=False)
    return proc.stdout.strip() if proc.returncode == 0 and proc.stdout.strip() else None


@pytest.fixture(scope="session")
def resolved_tree(tmp_path_factory: pytest.TempPathFactory) -> ResolvedTree:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.skip(f"SKIPPED LOUDLY: cannot run a private systemd-resolved without {', '.join(missing)}")
    work = tmp_path_factory.mktemp("resolved-work")
    text = _verified_packages_text(work)
    stanza = _stanza(text, "systemd-resolved")
    needs = [rel for group in debian_index.parse_relations(stanza.get("Depends", ""))
             for rel in group if rel.name == "libsystemd-shared"]
    assert needs and needs[0].op == "=", f"systemd-resolved's Depends names no exact libsystemd-shared: {needs}"
    lib_version = needs[0].version
    root = tmp_path_factory.mktemp("resolved-root")
    debian.extract_deb(_cached_deb(_deb(stanza), work), root)
    library = None
    if _installed_version("libsystemd-shared") != lib_version:
        debian.extract_deb(_cached_deb(_deb(_stanza(text, "libsystemd-shared", lib_version)), work), root)
        found = sorted((root / LIBDIR).glob("libsystemd-shared-*.so"))
        assert len(found) == 1, found
        library = found[0]
        if not (Path("/") / LIBDIR / library.name).is_file():
            pytest.skip(f"SKIPPED LOUDLY: /{LIBDIR}/{library.name} is missing (install systemd), so the "
                        f"matching libsystemd-shared {lib_version} has nothing to be bind-mounted over")
    return ResolvedTree(root, stanza["Version"], library)


# --- the namespaces -------------------------------------------------------------------------------------------

BUS_CONF = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <include>/usr/share/dbus-1/system.conf</include>
  <includedir>/run/t/system.d</includedir>
</busconfig>
"""

# DNS= and FallbackDNS= empty: only the per-link server banger sets may answer anything.
RESOLVED_CONF = "[Resolve]\nDNS=\nFallbackDNS=\nDNSSEC=no\nLLMNR=no\nMulticastDNS=no\nCache=no\n"

DNS_SERVER = """
import asyncio, sys
from banger.network.dns import VmDnsServer
async def main():
    server = VmDnsServer()
    await server.start("127.0.0.1", 42069)
    server.set_record(sys.argv[1], sys.argv[2])
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""

# Runs banger's code inside the namespaces: the handlers the root helper registers, and the read-back.
BANGER = """
import asyncio, json, sys
from banger.errors import BangerError
from banger.network import resolver
op, arg = sys.argv[1], sys.argv[2]
try:
    if op == "wire":
        out = asyncio.run(resolver.handle_resolver_wire(None, None, json.loads(arg)))
    elif op == "unwire":
        out = asyncio.run(resolver.handle_resolver_unwire(None, None, json.loads(arg)))
    else:
        r = resolver.link_routing(arg)
        out = {"servers": list(r.servers), "domains": list(r.domains), "routes_vm": r.routes_vm()}
except BangerError as exc:
    out = {"error": type(exc).__name__, "message": str(exc)}
print(json.dumps(out))
"""

STUB_QUERY = """
import socket, sys
from dnslib import QTYPE, RCODE, DNSRecord
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.settimeout(5)
sock.sendto(DNSRecord.question(sys.argv[1], "A").pack(), ("127.0.0.53", 53))
reply = DNSRecord.parse(sock.recv(4096))
print(RCODE.get(reply.header.rcode), *[str(rr.rdata) for rr in reply.rr if rr.rtype == QTYPE.A])
"""


def _free_id() -> int:
    taken = {int(line.split(":")[2]) for path in ("/etc/passwd", "/etc/group")
             for line in Path(path).read_text().splitlines() if line.count(":") >= 2}
    return next(i for i in range(999, 900, -1) if i not in taken)


def _setup_script(tree: ResolvedTree, sid: int) -> str:
    q = shlex.quote
    lib = f"/{LIBDIR}/{tree.library.name}" if tree.library else ""
    lines = [
        "set -eu",
        "mount -t tmpfs -o mode=0755 tmpfs /run",
        "mkdir -p /run/dbus /run/systemd/resolve /run/systemd/resolved.conf.d /run/t/system.d",
        # the user the unit runs resolved as, known only inside this mount namespace
        f"cp /etc/passwd /run/t/passwd && echo 'systemd-resolve:x:{sid}:{sid}::/:/usr/sbin/nologin' >> /run/t/passwd",
        f"cp /etc/group /run/t/group && echo 'systemd-resolve:x:{sid}:' >> /run/t/group",
        "mount --bind /run/t/passwd /etc/passwd && mount --bind /run/t/group /etc/group",
        # glibc's resolver goes to resolved's stub, as on a resolved host
        "printf 'nameserver 127.0.0.53\\noptions edns0\\n' > /run/t/resolv.conf",
        "mount --bind /run/t/resolv.conf /etc/resolv.conf",
        f"cp {q(str(tree.root))}/usr/share/dbus-1/system.d/*.conf /run/t/system.d/",
        f"printf %s {q(BUS_CONF)} > /run/t/bus.conf",
        f"printf %s {q(RESOLVED_CONF)} > /run/systemd/resolved.conf.d/banger-test.conf",
        # resolved runs as systemd-resolve, who cannot read root's 0700 temporary directories
        f"install -m 0755 {q(str(tree.root))}/lib/systemd/systemd-resolved /run/t/systemd-resolved",
        f"chown {sid}:{sid} /run/systemd/resolve",
        *([f"mount --bind {q(str(tree.library))} {q(lib)}"] if tree.library else []),
        "ip link set lo up",
        f"ip link add {BRIDGE} type bridge && ip addr add 172.31.0.1/24 dev {BRIDGE}",
        f"ip link set {BRIDGE} up",
        "echo ready",
        "exec sleep infinity",
    ]
    return "\n".join(lines)


def _die_with_parent() -> None:
    # If pytest dies, the namespace's first process (and with it everything in it) dies too.
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@dataclass
class Sandbox:
    unshare: subprocess.Popen[str]
    pid: int  # host pid of the namespaces' first process
    tree: ResolvedTree
    logs: Path
    children: dict[str, subprocess.Popen[bytes]]

    def argv(self, *argv: str) -> list[str]:
        return ["nsenter", "-t", str(self.pid), "-m", "-n", "-p", "--", *argv]

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "PATH": f"{self.tree.root}/usr/bin:{os.environ.get('PATH', '/usr/bin:/bin')}"}

    def run(self, *argv: str, check: bool = True, path: str = "") -> subprocess.CompletedProcess[str]:
        env = {**self.env, "PATH": f"{path}:{self.env['PATH']}"} if path else self.env
        proc = subprocess.run(self.argv(*argv), capture_output=True, text=True, env=env, timeout=60,
                              check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"{shlex.join(argv)}: rc {proc.returncode}: {proc.stderr}{self.log_tail()}")
        return proc

    def spawn(self, name: str, *argv: str) -> None:
        with (self.logs / f"{name}.log").open("wb") as out:
            self.children[name] = subprocess.Popen(self.argv(*argv), stdout=out, stderr=subprocess.STDOUT,
                                                   env=self.env)

    def kill(self, name: str) -> None:
        """SIGKILL what `spawn(name)` started: nsenter's child, the process in the namespaces."""
        nsenter = self.children[name].pid
        (pid,) = Path(f"/proc/{nsenter}/task/{nsenter}/children").read_text().split()
        os.kill(int(pid), signal.SIGKILL)
        self.children[name].wait(timeout=30)

    def banger(self, op: str, arg: dict[str, Any] | str, *, path: str = "") -> Any:
        text = arg if isinstance(arg, str) else json.dumps(arg)
        return json.loads(self.run(sys.executable, "-c", BANGER, op, text, path=path).stdout)

    def stub(self, name: str) -> str:
        return self.run(sys.executable, "-c", STUB_QUERY, name).stdout.strip()

    def wait_for(self, what: str, *argv: str, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while self.run(*argv, check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} did not come up within {timeout:g}s{self.log_tail()}")
            time.sleep(0.1)

    def log_tail(self) -> str:
        parts = [f"\n--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-25:])
                 for p in sorted(self.logs.glob("*.log"))]
        return "".join(parts)


@pytest.fixture
def sandbox(resolved_tree: ResolvedTree, tmp_path: Path) -> Iterator[Sandbox]:
    sid = _free_id()
    unshare = subprocess.Popen(
        ["unshare", "--mount", "--net", "--pid", "--fork", "--mount-proc", "--propagation", "private",
         "--kill-child", "sh", "-c", _setup_script(resolved_tree, sid)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_die_with_parent,
    )
    box: Sandbox | None = None
    try:
        assert unshare.stdout is not None and unshare.stderr is not None
        line = unshare.stdout.readline().strip()
        assert line == "ready", f"namespace setup failed: {line} {unshare.stderr.read() if not line else ''}"
        children = Path(f"/proc/{unshare.pid}/task/{unshare.pid}/children").read_text().split()
        box = Sandbox(unshare, int(children[0]), resolved_tree, tmp_path, {})
        box.spawn("dbus", "dbus-daemon", "--config-file=/run/t/bus.conf", "--nofork", "--nopidfile", "--nosyslog")
        box.wait_for("dbus-daemon", "test", "-S", "/run/dbus/system_bus_socket")
        box.spawn("resolved", "env", "SYSTEMD_LOG_LEVEL=debug", "SYSTEMD_LOG_TARGET=console",
                  "setpriv", f"--reuid={sid}", f"--regid={sid}", "--clear-groups", f"--inh-caps={CAPS}",
                  f"--ambient-caps={CAPS}", f"--bounding-set=-all,{CAPS}", "/run/t/systemd-resolved")
        box.wait_for("systemd-resolved", "resolvectl", "status")
        box.spawn("dns", sys.executable, "-c", DNS_SERVER, "foo", VM_IP)
        box.wait_for("banger's DNS server", "sh", "-c", "grep -q ready " + shlex.quote(str(tmp_path / "dns.log")))
        yield box
    finally:
        unshare.kill()  # the namespace's first process gets SIGKILL with it (--kill-child)
        unshare.wait(timeout=30)
        for child in box.children.values() if box else []:
            child.wait(timeout=30)


def _give_carrier(box: Sandbox) -> None:
    """A bridge port that is up, as a VM's tap is: only then does resolved use the link."""
    box.run("ip", "link", "add", "vb0", "type", "veth", "peer", "name", "vb1")
    box.run("ip", "link", "set", "vb0", "master", BRIDGE, "up")
    box.run("ip", "link", "set", "vb1", "up")
    box.wait_for("bridge carrier", "sh", "-c", f"ip -o link show {BRIDGE} | grep -q LOWER_UP")


# --- the tests ---------------------------------------------------------------------------------------------------


def test_wire_routes_vm_through_real_resolved_and_unwire_removes_it(sandbox: Sandbox) -> None:
    box = sandbox
    assert box.stub("foo.vm") == "REFUSED", "foo.vm resolved before any wiring" + box.log_tail()

    # Wired as the daemon does it at start: the bridge exists, no VM gives it carrier yet.
    params = {"bridge": BRIDGE, "dns_addr": DNS_ADDR}
    expected = {"bridge": BRIDGE, "dns_addr": DNS_ADDR, "domain": "~vm", "wired": True, "status": "wired"}
    assert box.banger("wire", params) == expected
    _give_carrier(box)

    routing = {"servers": [DNS_ADDR], "domains": ["~vm"], "routes_vm": True}
    assert box.banger("routing", BRIDGE) == routing
    status = box.run("resolvectl", "status", BRIDGE).stdout
    assert "-DefaultRoute" in status, status  # only `.vm` goes to banger's server
    assert box.stub("foo.vm") == f"NOERROR {VM_IP}", box.log_tail()
    assert box.run("getent", "ahostsv4", "foo.vm").stdout.split()[0] == VM_IP  # glibc -> stub -> banger
    assert VM_IP in box.run("resolvectl", "query", "foo.vm").stdout
    other = box.run("resolvectl", "query", "example.com", check=False)
    assert other.returncode != 0 and "No appropriate name servers" in other.stderr, other.stderr

    # Idempotent: wiring again changes nothing and says the same.
    assert box.banger("wire", params) == expected
    assert box.banger("routing", BRIDGE) == routing

    assert box.banger("unwire", {"bridge": BRIDGE}) == {"bridge": BRIDGE, "wired": False, "status": "unwired"}
    assert box.banger("routing", BRIDGE) == {"servers": [], "domains": [], "routes_vm": False}
    assert box.stub("foo.vm") == "REFUSED"
    assert box.run("getent", "ahostsv4", "foo.vm", check=False).returncode == 2  # not found
    assert box.banger("unwire", {"bridge": BRIDGE}) == {"bridge": BRIDGE, "wired": False, "status": "unwired"}


def test_wire_needs_the_bridge_and_unwire_does_not(sandbox: Sandbox) -> None:
    missing = sandbox.banger("wire", {"bridge": "br-fc-none"})
    assert missing == {"error": "NotFound",
                       "message": 'bridge "br-fc-none" does not exist (call priv.ensure_bridge first)'}
    assert sandbox.banger("unwire", {"bridge": "br-fc-none"}) == {
        "bridge": "br-fc-none", "wired": False, "status": "not wired: the bridge does not exist"}
    refused = sandbox.banger("wire", {"bridge": BRIDGE, "dns_addr": "10.0.0.1:53"})
    assert refused["error"] == "BadRequest" and "must be on loopback" in refused["message"]
    assert sandbox.banger("routing", BRIDGE)["domains"] == []


def test_stopped_resolved_is_not_running_despite_its_socket_file(sandbox: Sandbox) -> None:
    sandbox.kill("resolved")
    sandbox.run("test", "-S", "/run/systemd/resolve/io.systemd.Resolve")  # left behind, as on a real host
    not_running = {"wired": False, "status": "not wired: systemd-resolved is not running"}
    assert sandbox.banger("wire", {"bridge": BRIDGE}) == {
        "bridge": BRIDGE, "dns_addr": DNS_ADDR, "domain": "~vm", **not_running}
    assert sandbox.banger("unwire", {"bridge": BRIDGE}) == {"bridge": BRIDGE, **not_running}


def test_a_failed_wire_leaves_no_half_made_routing(sandbox: Sandbox, tmp_path: Path) -> None:
    # Fault injection: a resolvectl whose `dns` step fails after `default-route` and `domain` succeeded.
    real = sandbox.tree.root / "usr/bin/resolvectl"
    faulty = tmp_path / "faulty"
    faulty.mkdir()
    (faulty / "resolvectl").write_text(
        f'#!/bin/sh\n[ "$1" = dns ] && {{ echo "Failed to set DNS configuration: injected" >&2; exit 1; }}\n'
        f'exec {shlex.quote(str(real))} "$@"\n')
    (faulty / "resolvectl").chmod(0o755)
    failed = sandbox.banger("wire", {"bridge": BRIDGE}, path=str(faulty))
    assert failed["error"] == "BangerError"
    assert failed["message"].startswith(f"cannot route `.vm` on {BRIDGE} through systemd-resolved: ")
    assert "injected" in failed["message"] and "\n" not in failed["message"]
    # The domain set before the failure was reverted with everything else.
    assert sandbox.banger("routing", BRIDGE) == {"servers": [], "domains": [], "routes_vm": False}
