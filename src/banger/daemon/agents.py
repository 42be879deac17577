"""One shared connection to each running VM's guest agent.

QEMU's virtio-serial chardev takes one client at a time, so the daemon holds the connection and
everything that talks to the agent goes through it (the protocol multiplexes channels). A lost
connection (guest reboot, restore, agent restart) is replaced on next use.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from banger.guest.agent_client import AgentClient

log = logging.getLogger("banger.agents")


class AgentRegistry:
    def __init__(self) -> None:
        self._clients: dict[str, AgentClient] = {}
        self._lock = threading.Lock()

    def connect(self, vm_id: str, socket_path: Path, deadline: float) -> AgentClient:
        """Wait (blocking) until the agent answers health; keep the connection."""
        from banger.guest.agent_client import AgentClient, wait_ready

        client = wait_ready(lambda: AgentClient.connect_serial(socket_path, timeout=2.0), deadline)
        with self._lock:
            old = self._clients.pop(vm_id, None)
            self._clients[vm_id] = client
        if old is not None:
            old.close()
        return client

    def get(self, vm_id: str, socket_path: Path, timeout: float = 10.0) -> AgentClient:
        with self._lock:
            client = self._clients.get(vm_id)
        if client is not None and not client.closed:
            return client
        return self.connect(vm_id, socket_path, time.monotonic() + timeout)

    def drop(self, vm_id: str) -> None:
        with self._lock:
            client = self._clients.pop(vm_id, None)
        if client is not None:
            client.close()

    def close_all(self) -> None:
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.close()
