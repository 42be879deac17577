"""One shared connection to each running VM's guest agent.

QEMU's virtio-serial chardev takes one client at a time, so the daemon holds the connection and
everything that talks to the agent goes through it (the protocol multiplexes channels). A vsock
channel would take more, but one held stream keeps both transports alike and saves the handshake per
request. A lost connection (guest reboot, restore, agent restart) is replaced on next use.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from banger.daemon.vmplan import AgentEndpoint
    from banger.guest.agent_client import AgentClient

log = logging.getLogger("banger.agents")


class AgentRegistry:
    def __init__(self) -> None:
        self._clients: dict[str, AgentClient] = {}
        self._lock = threading.Lock()

    def connect(self, vm_id: str, endpoint: AgentEndpoint, deadline: float) -> AgentClient:
        """Wait (blocking) until the agent answers health; keep the connection."""
        from banger.guest.agent_client import AgentClient, wait_ready

        def attempt() -> AgentClient:
            if endpoint.transport == "vsock":
                return AgentClient.connect_vsock_uds(endpoint.path, timeout=2.0)
            return AgentClient.connect_serial(endpoint.path, timeout=2.0)

        client = wait_ready(attempt, deadline)
        with self._lock:
            old = self._clients.pop(vm_id, None)
            self._clients[vm_id] = client
        if old is not None:
            old.close()
        return client

    def get(self, vm_id: str, endpoint: AgentEndpoint, timeout: float = 10.0) -> AgentClient:
        with self._lock:
            client = self._clients.get(vm_id)
        if client is not None and not client.closed:
            return client
        return self.connect(vm_id, endpoint, time.monotonic() + timeout)

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
