"""The device plugin's life: its socket, its registration, and kubelet's restarts.

It runs as one task on the driver's event loop, beside the CSI server and the brokers.
Every POLL_INTERVAL it looks at three paths, each with one lstat or stat that cannot
wait on anything (no FUSE mount is ever below the device plugin directory or /dev):

- /dev/fuse: a change of health wakes every ListAndWatch stream, which sends the list
  again;
- its own socket: a starting kubelet deletes every socket in the directory, so a missing
  (or replaced) socket means a new kubelet; the plugin listens again on a new one;
- kubelet.sock: a new one (another inode or ctime) is a kubelet the plugin has not
  registered with, so it registers, retrying with a backoff while kubelet refuses.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import time
from pathlib import Path

import anyio
import anyio.abc
from grpclib import GRPCError
from grpclib.exceptions import StreamTerminatedError
from grpclib.server import Server

from csi_async import logs
from csi_async.deviceplugin.devices import FuseDevices
from csi_async.deviceplugin.health import DEV_FUSE, DeviceHealth, dev_fuse_healthy
from csi_async.deviceplugin.registration import KUBELET_SOCKET, register
from csi_async.deviceplugin.service import DevicePluginService

log = logging.getLogger("csi_async.deviceplugin")

POLL_INTERVAL = 1.0
# After a refused or failed Register: wait 1 s, then twice as long each time, up to this.
MAX_BACKOFF = 30.0
# How long stopping waits for kubelet's streams to be cancelled and closed.
STOP_TIMEOUT = 5.0

FileId = tuple[int, int, int]


def socket_name(resource_name: str) -> str:
    """The plugin's socket file name: the resource name, with '/' as '_' (one file name)."""
    return resource_name.replace("/", "_") + ".sock"


def _socket_id(path: Path) -> FileId | None:
    """(device, inode, ctime) of the socket at `path`, or None if there is none."""
    try:
        st = path.lstat()
    except OSError:
        return None
    if not stat.S_ISSOCK(st.st_mode):
        return None
    return (st.st_dev, st.st_ino, st.st_ctime_ns)


class DevicePlugin:
    """Serves one resource of /dev/fuse devices to the kubelet that owns `plugin_dir`."""

    def __init__(
        self,
        plugin_dir: Path,
        resource_name: str,
        devices: FuseDevices,
        *,
        device_path: str = DEV_FUSE,
        poll_interval: float = POLL_INTERVAL,
    ) -> None:
        self.plugin_dir = plugin_dir
        self.resource_name = resource_name
        self.socket_path = plugin_dir / socket_name(resource_name)
        self.kubelet_socket = plugin_dir / KUBELET_SOCKET
        self._device_path = device_path
        self._poll = poll_interval
        self.health = DeviceHealth(dev_fuse_healthy(device_path))
        self._service = DevicePluginService(devices, self.health, resource_name)
        self._server: Server | None = None
        self._bound: FileId | None = None
        self._registered_with: FileId | None = None
        # The kubelet socket the last Register failed on, and when to try it again.
        self._failed_with: FileId | None = None
        self._backoff = 1.0
        self._next_attempt = 0.0
        # The last failure to listen, logged once until it changes or listening works.
        self._listen_error: str | None = None

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve and stay registered until cancelled; then stop listening and remove the socket.

        Reports started at once: the CSI service and the brokers do not depend on the
        device plugin, and the driver's start (its readiness, its SIGTERM handler) must
        not wait for kubelet to answer a Register. A directory it cannot listen in is
        logged and tried again at the next look.
        """
        task_status.started()
        try:
            await self.check_logged()
            while True:
                await anyio.sleep(self._poll)
                await self.check_logged()
        finally:
            with anyio.CancelScope(shield=True):
                await self._stop_listening()

    async def check_logged(self) -> None:
        """check(), with a failure to listen logged (once per distinct reason) instead of raised."""
        try:
            await self.check()
        except OSError as err:
            reason = f"{type(err).__name__}: {err}"
            # Once per distinct failure, not once per poll: a directory that stays
            # unusable would otherwise write an error line every second.
            level = logging.DEBUG if reason == self._listen_error else logging.ERROR
            self._listen_error = reason
            logs.log(
                log,
                level,
                "device plugin cannot listen; trying again",
                socket=str(self.socket_path),
                **{logs.ERROR: reason},
            )
        else:
            self._listen_error = None

    async def check(self) -> None:
        """One look at /dev/fuse, the plugin's socket and kubelet's socket."""
        healthy = dev_fuse_healthy(self._device_path)
        if self.health.update(healthy):
            logs.log(
                log,
                logging.INFO if healthy else logging.WARNING,
                f"{self._device_path} is {'usable' if healthy else 'not usable'}: "
                "sending the device list again",
                resource=self.resource_name,
                healthy=healthy,
            )
        if self._server is None:
            await self._listen()
        elif _socket_id(self.socket_path) != self._bound:
            logs.log(
                log,
                logging.INFO,
                "device plugin socket removed (kubelet restarted?): listening again",
                socket=str(self.socket_path),
            )
            await self._stop_listening()
            await self._listen()
            self._registered_with = None
        kubelet = _socket_id(self.kubelet_socket)
        if kubelet is None or kubelet == self._registered_with:
            return
        if kubelet == self._failed_with and time.monotonic() < self._next_attempt:
            return
        await self._register(kubelet)

    async def _register(self, kubelet: FileId) -> None:
        try:
            await register(self.kubelet_socket, self.socket_path.name, self.resource_name)
        except (GRPCError, StreamTerminatedError, OSError) as err:  # TimeoutError too
            if kubelet != self._failed_with:
                self._backoff = 1.0
            self._registered_with, self._failed_with = None, kubelet
            self._next_attempt = time.monotonic() + self._backoff
            logs.log(
                log,
                logging.WARNING,
                "device plugin registration failed; retrying",
                resource=self.resource_name,
                kubelet_socket=str(self.kubelet_socket),
                retry_in_s=self._backoff,
                **{logs.ERROR: f"{type(err).__name__}: {getattr(err, 'message', None) or err}"},
            )
            self._backoff = min(self._backoff * 2, MAX_BACKOFF)
            return
        self._registered_with, self._failed_with = kubelet, None
        self._backoff = 1.0
        logs.log(
            log,
            logging.INFO,
            "registered with kubelet",
            resource=self.resource_name,
            endpoint=self.socket_path.name,
            kubelet_socket=str(self.kubelet_socket),
        )

    async def _listen(self) -> None:
        self.plugin_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
        if _socket_id(self.socket_path) is not None:
            # A previous run's, or a socket kubelet left; kubelet may remove it first.
            self.socket_path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        # Through the directory's fd: a deep directory would not fit in sun_path.
        dirfd = os.open(self.plugin_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            path = f"/proc/self/fd/{dirfd}/{self.socket_path.name}"
            sock.bind(path)
            # Only root (kubelet) may talk to the plugin. chmod, not umask: the umask
            # is the process's, and worker threads make volume directories meanwhile.
            # Nobody can connect before the server listens, so there is no window.
            os.chmod(path, 0o600)
        except OSError:
            sock.close()
            raise
        finally:
            os.close(dirfd)
        self._bound = _socket_id(self.socket_path)
        server = Server([self._service])
        try:
            await server.start(sock=sock)
        except BaseException:
            sock.close()
            raise
        self._server = server

    async def _stop_listening(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            # Cancels the ListAndWatch streams: kubelet sees the plugin go.
            server.close()
            with anyio.move_on_after(STOP_TIMEOUT):
                await server.wait_closed()
        if self._bound is not None and _socket_id(self.socket_path) == self._bound:
            self.socket_path.unlink(missing_ok=True)  # kubelet may remove it first
        self._bound = None
