"""The driver process: one event loop serving gRPC and every volume's broker."""

from __future__ import annotations

import logging
import os
import resource
import signal
import socket
import stat
from pathlib import Path

import anyio
import anyio.abc
import anyio.to_thread
import h2.connection
from grpclib.server import Server

from csi_async import __version__, logs, metrics
from csi_async.broker.limits import BrokerLimits
from csi_async.config import Settings
from csi_async.csi import unimplemented
from csi_async.csi.identity import IdentityService
from csi_async.csi.node import NodeService
from csi_async.csi.requests import RecordValidator
from csi_async.csi.rpc import in_flight
from csi_async.deviceplugin.devices import FuseDevices
from csi_async.deviceplugin.plugin import DevicePlugin
from csi_async.mount import syscalls as sc
from csi_async.policy.node import NodePolicy
from csi_async.volumes.registry import VolumeManager

log = logging.getLogger("csi_async.server")

# How long SIGTERM waits for running RPCs before cancelling them.
DRAIN_TIMEOUT = 30.0


def _bind_endpoint(path: str) -> socket.socket:
    """Listen on the CSI socket, replacing a stale one from a previous run."""
    endpoint = Path(path)
    endpoint.parent.mkdir(parents=True, exist_ok=True)
    try:
        if stat.S_ISSOCK(endpoint.lstat().st_mode):
            endpoint.unlink()
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        # Only root (kubelet, the registrar) may talk to the CSI socket. chmod, not
        # umask: the umask is the process's, and worker threads may be making files.
        # Nobody can connect before the server listens, so there is no window.
        os.chmod(path, 0o600)
    except OSError:
        sock.close()
        raise
    return sock


def _raise_fd_limit() -> int:
    """Use the hard RLIMIT_NOFILE: each volume holds a socket and each live
    mount a pinned mount fd, and container runtimes often set a soft 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# h2 remembers up to 65536 closed streams per HTTP/2 connection (about 100 bytes
# each), so that it can answer a frame that arrives late for one. The CSI
# connections that live long (the registrar's, the liveness probe's, a kubelet
# that keeps its channel) would each grow by ~7 MiB that way. Late frames are
# for the last few streams, not for the thousandth last.
H2_CLOSED_STREAMS = 1000

# glibc gives each thread that allocates its own malloc arena, up to 8 per CPU,
# and an arena keeps what it once held: the worker threads that run mount
# syscalls for 1000 volumes left ~20 MiB resident that way. The threads hardly
# contend for malloc (they run Python, under the GIL), so they share one.
MALLOC_ARENAS = 1


async def _run_cancellable(
    plugin: DevicePlugin,
    scope: anyio.CancelScope,
    *,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    with scope:
        await plugin.run(task_status=task_status)


async def serve(settings: Settings) -> None:
    # Before any thread of ours (workers, the metrics server) has allocated.
    sc.limit_malloc_arenas(MALLOC_ARENAS)
    # Read by each new connection (a class attribute h2 has for tuning this).
    h2.connection.H2Connection.MAX_CLOSED_STREAMS = H2_CLOSED_STREAMS
    fd_limit = _raise_fd_limit()
    settings.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    settings.state_dir.chmod(0o700)
    policy = NodePolicy(
        allow_other=settings.allow_other, require_pod_cgroup=settings.peer_check == "cgroup"
    )
    # The mount syscalls run in anyio's worker threads: let every node-wide
    # slot have one, beside the threads kubelet's RPCs use.
    anyio.to_thread.current_default_thread_limiter().total_tokens = max(
        40, settings.max_connections + 16
    )
    limits = BrokerLimits(
        node_wide=anyio.CapacityLimiter(settings.max_connections),
        per_pod=settings.max_connections_per_pod,
    )
    if settings.metrics_address:
        metrics.serve(settings.metrics_address)
    ready = False

    async with anyio.create_task_group() as tg:
        volumes = VolumeManager(
            kubelet_root=settings.kubelet_root,
            state_dir=settings.state_dir,
            policy=policy,
            limits=limits,
            task_group=tg,
        )
        server = Server(
            [
                IdentityService(settings.driver_name, lambda: ready),
                NodeService(node_id=settings.node_id, volumes=volumes, policy=policy),
            ]
        )
        unimplemented.install(server)
        # Volumes published before a restart listen again before Probe says ready.
        restored = await volumes.restore(RecordValidator(str(settings.kubelet_root), policy))
        sock = _bind_endpoint(settings.socket_path)
        await server.start(sock=sock)
        # On this loop too, in its own cancel scope so that it stops before the brokers.
        device_plugin = anyio.CancelScope()
        if settings.device_plugin:
            plugin = DevicePlugin(
                settings.device_plugin_directory,
                settings.device_plugin_resource,
                FuseDevices(settings.device_plugin_devices),
            )
            await tg.start(_run_cancellable, plugin, device_plugin)
        # Importing and restoring freed much (each module's bytecode was read
        # into a buffer first): what malloc kept of it would stay resident.
        sc.release_free_memory()
        ready = True
        logs.log(
            log,
            logging.INFO,
            "serving",
            endpoint=settings.endpoint,
            driver_name=settings.driver_name,
            node_id=settings.node_id,
            kubelet_root=str(settings.kubelet_root),
            version=__version__,
            restored_volumes=restored,
            fd_limit=fd_limit,
            device_plugin=settings.device_plugin_resource if settings.device_plugin else "off",
        )

        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                logs.log(log, logging.INFO, "shutting down", signal=signal.Signals(signum).name)
                break

        ready = False
        # kubelet stops offering /dev/fuse to new pods while the driver is away.
        device_plugin.cancel()
        # Stop accepting connections, let running RPCs finish, then close.
        server._server.close()  # type: ignore[union-attr]
        with anyio.move_on_after(DRAIN_TIMEOUT):
            await in_flight.drained()
        server.close()
        await server.wait_closed()
        try:
            os.unlink(settings.socket_path)
        except FileNotFoundError:
            pass
        await volumes.close()
        tg.cancel_scope.cancel()
    logs.log(log, logging.INFO, "stopped")
