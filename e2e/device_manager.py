"""kubelet's device manager as a device plugin sees it, over grpcio (not the driver's grpclib).

It models pkg/kubelet/cm/devicemanager (plugin/v1beta1/server.go, client.go, manager.go):

* start: MkdirAll(<dir>, 0750), delete every socket file in the directory (a new kubelet
  removes what the old one's plugins left; the checkpoint file is not a socket), then
  serve the Registration service on <dir>/kubelet.sock;
* Register: the version must be a supported one ("v1beta1"), the resource name an
  extended resource name (domain/name, not in kubernetes.io), else an error status; then,
  before answering, dial the plugin back on <dir>/<endpoint> (10 s, blocking, like
  grpc.WithBlock) and call GetDevicePluginOptions; after answering, read its
  ListAndWatch stream in a goroutine (here a thread) for as long as it lasts;
* Allocate, when a container that asks for the resource is admitted: healthy device ids
  not yet given to another container, one ContainerAllocateRequest per call;
* restart: stop, then start again, which deletes the plugin's socket and makes a new
  kubelet.sock: a plugin must notice and register again.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from csi_async._proto import v1beta1 as dp

KUBELET_SOCKET = "kubelet.sock"
SUPPORTED_VERSIONS = ("v1beta1",)
DIAL_TIMEOUT = 10.0
RPC_TIMEOUT = 10.0
_OPTIONS = [("grpc.default_authority", "localhost"), ("grpc.enable_http_proxy", 0)]


class DeviceManagerError(Exception):
    """A call to the plugin failed: code and details of its gRPC status."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


@dataclass
class PluginEndpoint:
    """One registration: the plugin's channel, options and the devices its stream sent."""

    resource_name: str
    endpoint: str
    options: dp.DevicePluginOptions
    channel: grpc.Channel
    # Each ListAndWatch message, in order; the latest is the device list.
    updates: list[dp.ListAndWatchResponse] = field(default_factory=list)
    stream_ended: bool = False
    allocated: set[str] = field(default_factory=set)

    def devices(self) -> dict[str, str]:
        """id -> health, from the latest ListAndWatch message."""
        return {d.id: d.health for d in self.updates[-1].devices} if self.updates else {}


def _is_extended_resource_name(name: str) -> bool:
    prefix, sep, rest = name.partition("/")
    return bool(sep and prefix and rest) and not (
        prefix == "kubernetes.io" or prefix.endswith(".kubernetes.io")
    )


class DeviceManager:
    """Serves kubelet.sock in `plugin_dir` and talks to the plugins that register there."""

    def __init__(
        self, plugin_dir: Path, supported_versions: tuple[str, ...] = SUPPORTED_VERSIONS
    ) -> None:
        self.plugin_dir = plugin_dir
        # What Register accepts; a test may change it to make kubelet refuse.
        self.supported_versions = supported_versions
        self.kubelet_socket = plugin_dir / KUBELET_SOCKET
        # Every registration, accepted or not: (resource name, endpoint, error or "").
        self.registrations: list[tuple[str, str, str]] = []
        self.endpoints: dict[str, PluginEndpoint] = {}
        self._changed = threading.Condition()
        self._server: grpc.Server | None = None

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> DeviceManager:
        self.plugin_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
        for entry in os.scandir(self.plugin_dir):
            if stat.S_ISSOCK(entry.stat(follow_symlinks=False).st_mode):
                os.unlink(entry.path)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=_OPTIONS)
        handler = grpc.method_handlers_generic_handler(
            "v1beta1.Registration",
            {
                "Register": grpc.unary_unary_rpc_method_handler(
                    self._register,
                    request_deserializer=dp.RegisterRequest.parse,
                    response_serializer=bytes,
                )
            },
        )
        server.add_generic_rpc_handlers((handler,))
        server.add_insecure_port(f"unix:{self.kubelet_socket}")
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None).wait(5)
            self._server = None
        for endpoint in self.endpoints.values():
            endpoint.channel.close()
        self.endpoints.clear()
        try:
            self.kubelet_socket.unlink()
        except FileNotFoundError:
            pass

    def close(self) -> None:
        """stop(), for contextlib.closing."""
        self.stop()

    def restart(self) -> None:
        """A kubelet restart: the plugins' connections go, their sockets are deleted."""
        self.stop()
        self.start()

    def __enter__(self) -> DeviceManager:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---------------------------------------------------------------- Registration

    def _register(self, request: dp.RegisterRequest, context: grpc.ServicerContext) -> dp.Empty:
        error = ""
        if request.version not in self.supported_versions:
            error = (
                f"requested device plugin version {request.version!r} is not supported: "
                f"{list(self.supported_versions)}"
            )
        elif not _is_extended_resource_name(request.resource_name):
            error = f"invalid name of device plugin socket: {request.resource_name!r}"
        else:
            try:
                self._connect(request)
            except (grpc.RpcError, grpc.FutureTimeoutError) as err:
                error = f"failed to dial device plugin: {err!r}"
        with self._changed:
            self.registrations.append((request.resource_name, request.endpoint, error))
            self._changed.notify_all()
        if error:
            context.abort(grpc.StatusCode.UNKNOWN, error)
        return dp.Empty()

    def _connect(self, request: dp.RegisterRequest) -> None:
        channel = grpc.insecure_channel(
            f"unix:{self.plugin_dir / request.endpoint}", options=_OPTIONS
        )
        try:
            grpc.channel_ready_future(channel).result(timeout=DIAL_TIMEOUT)
            options = self._unary(
                channel, "GetDevicePluginOptions", dp.Empty(), dp.DevicePluginOptions
            )
        except BaseException:
            channel.close()
            raise
        endpoint = PluginEndpoint(request.resource_name, request.endpoint, options, channel)
        old = self.endpoints.get(request.resource_name)
        self.endpoints[request.resource_name] = endpoint
        if old is not None:
            old.channel.close()
        threading.Thread(
            target=self._list_and_watch, args=(endpoint,), name="list-and-watch", daemon=True
        ).start()

    def _list_and_watch(self, endpoint: PluginEndpoint) -> None:
        method = endpoint.channel.unary_stream(
            "/v1beta1.DevicePlugin/ListAndWatch",
            request_serializer=bytes,
            response_deserializer=dp.ListAndWatchResponse.parse,
        )
        stream: Iterator[dp.ListAndWatchResponse] = method(dp.Empty())
        try:
            for update in stream:
                with self._changed:
                    endpoint.updates.append(update)
                    self._changed.notify_all()
        except grpc.RpcError:
            pass  # the plugin went away, or this manager closed the channel
        with self._changed:
            endpoint.stream_ended = True
            self._changed.notify_all()

    # ---------------------------------------------------------------- calls

    @staticmethod
    def _unary(channel: grpc.Channel, name: str, request: Any, response_type: Any) -> Any:
        method = channel.unary_unary(
            f"/v1beta1.DevicePlugin/{name}",
            request_serializer=bytes,
            response_deserializer=response_type.parse,
        )
        return method(request, timeout=RPC_TIMEOUT)

    def call(self, resource_name: str, name: str, request: Any, response_type: Any) -> Any:
        """One call to the plugin serving `resource_name`; DeviceManagerError on a status."""
        endpoint = self.endpoints[resource_name]
        try:
            return self._unary(endpoint.channel, name, request, response_type)
        except grpc.RpcError as err:
            raise DeviceManagerError(err.code(), err.details() or "") from None

    def allocate_raw(self, resource_name: str, request: dp.AllocateRequest) -> dp.AllocateResponse:
        response: dp.AllocateResponse = self.call(
            resource_name, "Allocate", request, dp.AllocateResponse
        )
        return response

    def allocate(self, resource_name: str, count: int = 1) -> dp.ContainerAllocateResponse:
        """Admit one container asking for `count` of the resource, as the device manager does."""
        endpoint = self.endpoints[resource_name]
        free = [
            device_id
            for device_id, health in endpoint.devices().items()
            if health == "Healthy" and device_id not in endpoint.allocated
        ]
        if len(free) < count:
            raise RuntimeError(f"only {len(free)} healthy devices of {resource_name} are free")
        ids = free[:count]
        response = self.allocate_raw(
            resource_name,
            dp.AllocateRequest(container_requests=[dp.ContainerAllocateRequest(devices_ids=ids)]),
        )
        if len(response.container_responses) != 1:
            raise RuntimeError(f"{len(response.container_responses)} responses for 1 container")
        endpoint.allocated.update(ids)
        return response.container_responses[0]

    # ---------------------------------------------------------------- waiting

    def wait_for(self, what: str, predicate: Callable[[], bool], timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"device manager: {what} within {timeout} s")
                self._changed.wait(remaining)

    def wait_registered(self, resource_name: str, count: int = 1, timeout: float = 15.0) -> None:
        """Until `count` successful registrations of the resource, with devices listed."""

        def done() -> bool:
            ok = [r for r in self.registrations if r[0] == resource_name and not r[2]]
            endpoint = self.endpoints.get(resource_name)
            return len(ok) >= count and endpoint is not None and bool(endpoint.updates)

        self.wait_for(f"{count} registrations of {resource_name}", done, timeout)
