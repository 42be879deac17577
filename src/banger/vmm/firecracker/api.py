"""A thin, typed client for one Firecracker process's HTTP API on its Unix socket.

Each REST path of the Firecracker API spec (swagger 2.0, `firecracker-api-v1.16.1.yaml`) that banger uses
is one `Resource` built from the spec's path template; the typed methods of `FirecrackerApi` are the
call sites banger reads (`api.put_drive("rootfs", path_on_host=…, …)`). Keyword arguments become the
JSON body with `None` dropped, so an optional field banger does not set is left to Firecracker's default
instead of being sent as `null` (which Firecracker rejects).

The client is blocking on purpose: the daemon runs it in a worker thread, and a VM's configuration is a
short, strictly ordered sequence of calls. httpx is imported where the client is built, so importing this
module costs nothing at CLI start-up.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import quote

from banger.errors import BangerError

if TYPE_CHECKING:
    import httpx

log = logging.getLogger("banger.vmm.firecracker")

DEFAULT_TIMEOUT: Final = 10.0
# Snapshot create/load copy the guest memory file; a few GiB on a slow disk takes well over 10 s.
SNAPSHOT_TIMEOUT: Final = 300.0
_FAULT_MAX: Final = 500


class FirecrackerApiError(BangerError):
    """Firecracker answered a request with a non-2xx status; `fault_message` is its own explanation."""

    def __init__(self, method: str, path: str, status: int, fault_message: str) -> None:
        # Firecracker's fault messages can span lines (nested error chains); keep the error one line.
        fault = " ".join(fault_message.split())[:_FAULT_MAX] or "(no fault_message)"
        super().__init__(f"Firecracker API {method} {path} failed with HTTP {status}: {fault}")
        self.method = method
        self.path = path
        self.status = status
        self.fault_message = fault_message


class FirecrackerUnreachable(BangerError):
    """The API socket did not answer at all (missing, refused, closed, or timed out)."""

    def __init__(self, socket_path: str, method: str, path: str, reason: str) -> None:
        super().__init__(f"Firecracker API socket {socket_path} did not answer {method} {path}: {reason}")
        self.socket_path = socket_path
        self.method = method
        self.path = path


def json_body(**fields: Any) -> dict[str, Any]:
    """The JSON body for keyword arguments: `None` means "not set" and is dropped."""
    return {key: value for key, value in fields.items() if value is not None}


class Resource:
    """One path of the spec. `template` is the spec's path (e.g. `/drives/{drive_id}`); `methods` are the
    HTTP methods banger uses on it. A templated path takes its one parameter from `url(ident)`."""

    def __init__(self, api: FirecrackerApi, template: str, methods: frozenset[str]) -> None:
        self.api = api
        self.template = template
        self.methods = methods

    def url(self, ident: str | None = None) -> str:
        if "{" not in self.template:
            if ident is not None:
                raise ValueError(f"{self.template} takes no id")
            return self.template
        if not ident:
            raise BangerError(f"{self.template} needs a non-empty id; got {ident!r}")
        prefix = self.template[: self.template.index("{")]
        # The id is one path segment: quote everything, including '/'.
        return prefix + quote(ident, safe="")

    def get(self, ident: str | None = None) -> Any:
        return self._call("GET", ident, None)

    def put(self, ident: str | None = None, /, **fields: Any) -> Any:
        return self._call("PUT", ident, json_body(**fields))

    def patch(self, ident: str | None = None, /, **fields: Any) -> Any:
        return self._call("PATCH", ident, json_body(**fields))

    def _call(self, method: str, ident: str | None, body: dict[str, Any] | None) -> Any:
        if method not in self.methods:
            raise ValueError(f"{method} {self.template} is not a call banger makes")
        timeout = SNAPSHOT_TIMEOUT if self.template.startswith("/snapshot/") else None
        return self.api.request(method, self.url(ident), body, timeout=timeout)


class FirecrackerApi:
    """The API of one Firecracker process, reached on `socket_path`. Use as a context manager, or `close()`."""

    def __init__(self, socket_path: str | os.PathLike[str], *, timeout: float = DEFAULT_TIMEOUT) -> None:
        import httpx

        self.socket_path = os.fspath(socket_path)
        self.timeout = timeout
        # One connection is enough: Firecracker handles API requests one at a time anyway.
        self._client: httpx.Client = httpx.Client(
            transport=httpx.HTTPTransport(uds=self.socket_path),
            base_url="http://localhost",
            timeout=timeout,
            headers={"Accept": "application/json"},
        )

        def res(template: str, *methods: str) -> Resource:
            return Resource(self, template, frozenset(methods))

        # One attribute per spec path, named like the spec's path.
        self.root = res("/", "GET")
        self.actions = res("/actions", "PUT")
        self.boot_source = res("/boot-source", "PUT")
        self.drives = res("/drives/{drive_id}", "PUT", "PATCH")
        self.entropy = res("/entropy", "PUT")
        self.logger = res("/logger", "PUT")
        self.machine_config = res("/machine-config", "GET", "PUT")
        self.metrics = res("/metrics", "PUT")
        self.network_interfaces = res("/network-interfaces/{iface_id}", "PUT")
        self.snapshot_create = res("/snapshot/create", "PUT")
        self.snapshot_load = res("/snapshot/load", "PUT")
        self.version = res("/version", "GET")
        self.vm = res("/vm", "PATCH")
        self.vm_config = res("/vm/config", "GET")
        self.vsock = res("/vsock", "PUT")

    def resources(self) -> list[Resource]:
        return [value for value in vars(self).values() if isinstance(value, Resource)]

    # -- plumbing --------------------------------------------------------------------------------------

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> FirecrackerApi:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(
        self, method: str, path: str, body: Mapping[str, Any] | None = None, *, timeout: float | None = None
    ) -> Any:
        """One API call. Returns the decoded JSON of a 200, `None` for 204 (or an empty body).

        Raises `FirecrackerApiError` for a non-2xx answer and `FirecrackerUnreachable` when nothing answers.
        """
        import httpx

        log.debug("firecracker api %s %s", method, path, extra={"body": body})
        try:
            response = self._client.request(
                method,
                path,
                json=dict(body) if body is not None else None,
                timeout=timeout if timeout is not None else self.timeout,
            )
        except httpx.TransportError as exc:
            raise FirecrackerUnreachable(self.socket_path, method, path, _reason(exc)) from exc
        if not response.is_success:
            raise FirecrackerApiError(method, path, response.status_code, _fault_message(response))
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError as exc:
            raise BangerError(
                f"Firecracker API {method} {path} answered HTTP {response.status_code} with a body that is "
                f"not JSON: {response.text[:200]!r}"
            ) from exc

    # -- typed calls, one per thing banger does ---------------------------------------------------------

    def get_instance_info(self) -> dict[str, Any]:
        """GET / : `{"app_name", "id", "state": "Not started"|"Running"|"Paused", "vmm_version"}`."""
        return _as_dict(self.root.get(), "GET /")

    def get_version(self) -> str:
        return str(_as_dict(self.version.get(), "GET /version").get("firecracker_version", ""))

    def get_machine_config(self) -> dict[str, Any]:
        return _as_dict(self.machine_config.get(), "GET /machine-config")

    def get_vm_config(self) -> dict[str, Any]:
        return _as_dict(self.vm_config.get(), "GET /vm/config")

    def put_logger(
        self,
        *,
        log_path: str | None = None,
        level: str | None = None,
        show_level: bool | None = None,
        show_log_origin: bool | None = None,
        module: str | None = None,
    ) -> None:
        self.logger.put(
            log_path=log_path,
            level=level,
            show_level=show_level,
            show_log_origin=show_log_origin,
            module=module,
        )

    def put_metrics(self, *, metrics_path: str) -> None:
        self.metrics.put(metrics_path=metrics_path)

    def put_machine_config(
        self,
        *,
        vcpu_count: int,
        mem_size_mib: int,
        smt: bool | None = None,
        track_dirty_pages: bool | None = None,
        huge_pages: str | None = None,
    ) -> None:
        self.machine_config.put(
            vcpu_count=vcpu_count,
            mem_size_mib=mem_size_mib,
            smt=smt,
            track_dirty_pages=track_dirty_pages,
            huge_pages=huge_pages,
        )

    def put_boot_source(
        self, *, kernel_image_path: str, boot_args: str | None = None, initrd_path: str | None = None
    ) -> None:
        self.boot_source.put(
            kernel_image_path=kernel_image_path, boot_args=boot_args, initrd_path=initrd_path
        )

    def put_drive(
        self,
        drive_id: str,
        *,
        path_on_host: str,
        is_root_device: bool,
        is_read_only: bool,
        cache_type: str | None = None,
        io_engine: str | None = None,
        partuuid: str | None = None,
    ) -> None:
        self.drives.put(
            drive_id,
            drive_id=drive_id,
            path_on_host=path_on_host,
            is_root_device=is_root_device,
            is_read_only=is_read_only,
            cache_type=cache_type,
            io_engine=io_engine,
            partuuid=partuuid,
        )

    def patch_drive(self, drive_id: str, *, path_on_host: str) -> None:
        """Post-boot: point a drive at a new backing file (e.g. after resizing it on the host)."""
        self.drives.patch(drive_id, drive_id=drive_id, path_on_host=path_on_host)

    def put_network_interface(
        self, iface_id: str, *, host_dev_name: str, guest_mac: str | None = None, mtu: int | None = None
    ) -> None:
        self.network_interfaces.put(
            iface_id, iface_id=iface_id, host_dev_name=host_dev_name, guest_mac=guest_mac, mtu=mtu
        )

    def put_vsock(self, *, guest_cid: int, uds_path: str) -> None:
        self.vsock.put(guest_cid=guest_cid, uds_path=uds_path)

    def put_entropy(self) -> None:
        """A virtio-rng device, so the guest's CRNG is ready early (sshd waits on it)."""
        self.entropy.put()

    def instance_start(self) -> None:
        self.actions.put(action_type="InstanceStart")

    def send_ctrl_alt_del(self) -> None:
        """Ask the guest to shut down (x86 only): the guest sees Ctrl+Alt+Del on its i8042 keyboard."""
        self.actions.put(action_type="SendCtrlAltDel")

    def flush_metrics(self) -> None:
        self.actions.put(action_type="FlushMetrics")

    def pause(self) -> None:
        self.vm.patch(state="Paused")

    def resume(self) -> None:
        self.vm.patch(state="Resumed")

    def create_snapshot(
        self, *, snapshot_path: str, mem_file_path: str, snapshot_type: str | None = None
    ) -> None:
        """The VM must be paused first. `snapshot_type` is "Full" (default) or "Diff"."""
        self.snapshot_create.put(
            snapshot_path=snapshot_path, mem_file_path=mem_file_path, snapshot_type=snapshot_type
        )

    def load_snapshot(
        self,
        *,
        snapshot_path: str,
        mem_file_path: str,
        resume_vm: bool | None = None,
        track_dirty_pages: bool | None = None,
    ) -> None:
        """Only on a fresh Firecracker process (nothing configured but logger and metrics)."""
        self.snapshot_load.put(
            snapshot_path=snapshot_path,
            mem_backend={"backend_type": "File", "backend_path": mem_file_path},
            resume_vm=resume_vm,
            track_dirty_pages=track_dirty_pages,
        )


def wait_for_socket(
    socket_path: str | os.PathLike[str],
    timeout: float,
    *,
    alive: Callable[[], bool] | None = None,
    interval: float = 0.02,
) -> dict[str, Any]:
    """Poll until Firecracker's API answers GET / and return that instance info.

    `alive`, when given, is asked between attempts; once it says False (the process exited) waiting stops
    at once instead of running out the clock.
    """
    path = os.fspath(socket_path)
    deadline = time.monotonic() + timeout
    last = "the socket does not exist yet"
    with FirecrackerApi(path, timeout=max(0.1, min(1.0, timeout))) as api:
        while True:
            if alive is not None and not alive():
                raise BangerError(
                    f"Firecracker exited before its API socket {path} answered ({last})",
                    hint="see the VM's firecracker log",
                )
            if os.path.exists(path):
                try:
                    return api.get_instance_info()
                except FirecrackerUnreachable as exc:
                    last = str(exc)
            if time.monotonic() >= deadline:
                raise BangerError(
                    f"Firecracker API socket {path} did not answer within {timeout:g}s ({last})"
                )
            time.sleep(interval)


def _fault_message(response: httpx.Response) -> str:
    try:
        data = response.json()
    except ValueError:
        return response.text.strip()
    if isinstance(data, dict) and isinstance(data.get("fault_message"), str):
        return str(data["fault_message"])
    return response.text.strip()


def _reason(exc: Exception) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _as_dict(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BangerError(f"Firecracker API {what} returned {type(value).__name__}, expected a JSON object")
    return value
