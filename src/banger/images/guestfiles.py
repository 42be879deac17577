"""The files every banger image carries, whatever it was built from.

The three scripts (banger-init as PID 1, banger-fast-init, banger-network) ship as package data in
`banger/guest/files/` and are copied byte for byte. The rest is small configuration that makes the
image behave as a banger VM when booted with `banger.init=systemd` too: the network and host-key
units, sshd settings, the work disk in fstab, and ctrl-alt-del meaning power off.
"""

from __future__ import annotations

from importlib import resources

from banger.images.inject import GuestFile

LIBEXEC = "/usr/local/libexec"
SCRIPTS = ("banger-init", "banger-fast-init", "banger-network")
UNIT_DIR = "/etc/systemd/system"
WANTS_DIR = f"{UNIT_DIR}/multi-user.target.wants"

NETWORK_UNIT = """\
[Unit]
Description=banger guest network (static, from /etc/banger/network.env)
Documentation=file:/usr/local/libexec/banger-network
After=systemd-udev-trigger.service
Wants=network.target
Before=network.target ssh.service
ConditionPathExists=/etc/banger/network.env

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/libexec/banger-network

[Install]
WantedBy=multi-user.target
"""

HOSTKEYS_UNIT = """\
[Unit]
Description=banger: generate this VM's SSH host key
# Images carry no host keys: every VM makes its own on first boot.
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key
Before=ssh.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/bin/ssh-keygen -q -t ed25519 -N "" -f /etc/ssh/ssh_host_ed25519_key

[Install]
WantedBy=multi-user.target
"""

SSHD_CONFIG = """\
# banger: one host key (made per VM at first boot), root by key only, no DNS lookups on login.
HostKey /etc/ssh/ssh_host_ed25519_key
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UseDNS no
"""

FSTAB = """\
# banger: / is an overlay assembled by banger-init (read-only image + this VM's writable layer).
# /dev/vdc is this VM's work disk; it survives stop/start and holds /root.
/dev/vdc /root ext4 defaults,noatime,nofail 0 0
"""

AGENT_UNIT = """\
[Unit]
Description=banger guest agent (exec, files, ports, health for the host)
Documentation=file:/usr/local/bin/banger-agent

[Service]
ExecStart=/usr/local/bin/banger-agent
Restart=always
RestartSec=1
# Processes started through `banger vm exec` survive an agent restart.
KillMode=process

[Install]
WantedBy=multi-user.target
"""

AGENT_PATH = "/usr/local/bin/banger-agent"
AGENT_LIB = "/usr/local/lib/banger"
AGENT_MODULE = "banger_agent"

# A script run directly is compiled on every start (about half a second under software emulation), a
# module imported from a directory with its bytecode is not: so the command is this stub.
AGENT_LAUNCHER = f"""\
#!/usr/bin/python3 -S
# banger-agent: banger's guest agent lives in {AGENT_LIB}/{AGENT_MODULE}.py, next to its bytecode.
# -S: the agent is standard library only, and site's start-up is a sixth of a second under emulation.
import sys

sys.path.insert(0, "{AGENT_LIB}")
from {AGENT_MODULE} import run

run()
"""

# Units not worth their time under software emulation, masked like `systemctl mask` does.
MASKED = ("e2scrub_reap.service", "e2scrub_all.timer")


def script(name: str) -> bytes:
    """The bytes of one of the packaged guest scripts."""
    return resources.files("banger.guest").joinpath("files", name).read_bytes()


def agent_bytes() -> bytes:
    """The guest agent: one stdlib-only Python file, installed as a module that the launcher imports."""
    return resources.files("banger.guest").joinpath("agent.py").read_bytes()


def agent_bytecode(source: bytes) -> tuple[str, bytes]:
    """The agent's bytecode for this host's Python: (file name under __pycache__, pyc bytes).

    Only a guest Python with the same cache tag looks at it (Debian bookworm's 3.11, like the host
    here); any other finds no file of its name and compiles the source itself. Hash-checked, so a pyc
    that does not match the source next to it is ignored rather than trusted.
    """
    import importlib.util
    import marshal
    import sys

    code = compile(source, f"{AGENT_LIB}/{AGENT_MODULE}.py", "exec", dont_inherit=True)
    flags = 0b11  # PEP 552: hash-based, checked
    header = importlib.util.MAGIC_NUMBER + flags.to_bytes(4, "little") + importlib.util.source_hash(source)
    return f"{AGENT_MODULE}.{sys.implementation.cache_tag}.pyc", header + marshal.dumps(code)


def guest_files() -> list[GuestFile]:
    """What banger injects into every image, in the order it is written (all root-owned)."""
    files = [GuestFile(f"{LIBEXEC}/{name}", script(name), 0o755) for name in SCRIPTS]
    agent = agent_bytes()
    pyc_name, pyc = agent_bytecode(agent)
    files += [
        GuestFile(AGENT_PATH, AGENT_LAUNCHER.encode(), 0o755),
        GuestFile(AGENT_LIB, None, 0o755, kind="dir"),
        GuestFile(f"{AGENT_LIB}/{AGENT_MODULE}.py", agent, 0o644),
        GuestFile(f"{AGENT_LIB}/__pycache__", None, 0o755, kind="dir"),
        GuestFile(f"{AGENT_LIB}/__pycache__/{pyc_name}", pyc, 0o644),
        GuestFile(f"{UNIT_DIR}/banger-agent.service", AGENT_UNIT.encode(), 0o644),
        GuestFile(f"{WANTS_DIR}/banger-agent.service", None, 0o777, kind="symlink",
                  target=f"{UNIT_DIR}/banger-agent.service"),
        GuestFile("/etc/banger", None, 0o755, kind="dir"),
        GuestFile(f"{UNIT_DIR}/banger-network.service", NETWORK_UNIT.encode(), 0o644),
        GuestFile(f"{WANTS_DIR}/banger-network.service", None, 0o777, kind="symlink",
                  target=f"{UNIT_DIR}/banger-network.service"),
        GuestFile(f"{UNIT_DIR}/banger-ssh-hostkeys.service", HOSTKEYS_UNIT.encode(), 0o644),
        GuestFile(f"{WANTS_DIR}/banger-ssh-hostkeys.service", None, 0o777, kind="symlink",
                  target=f"{UNIT_DIR}/banger-ssh-hostkeys.service"),
        # The VMM's ctrl-alt-del is how banger asks a guest to stop: power off, not reboot.
        GuestFile(f"{UNIT_DIR}/ctrl-alt-del.target", None, 0o777, kind="symlink",
                  target="/lib/systemd/system/poweroff.target"),
        *(GuestFile(f"{UNIT_DIR}/{unit}", None, 0o777, kind="symlink", target="/dev/null")
          for unit in MASKED),
        GuestFile("/etc/ssh/sshd_config.d/banger.conf", SSHD_CONFIG.encode(), 0o644),
        GuestFile("/etc/fstab", FSTAB.encode(), 0o644),
    ]
    return files
