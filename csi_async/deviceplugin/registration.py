"""The Register call a device plugin makes to kubelet's Registration service."""

from __future__ import annotations

import os
from pathlib import Path

from grpclib.client import Channel

from csi_async._proto import v1beta1 as dp
from csi_async.deviceplugin.service import OPTIONS

API_VERSION = "v1beta1"
# kubelet's own socket in its device plugin directory (pluginapi.KubeletSocket).
KUBELET_SOCKET = "kubelet.sock"
# kubelet dials the plugin back and asks for its options before it answers; it gives
# that dial 10 s itself, so this leaves it room and still never waits forever.
REGISTER_TIMEOUT = 15.0


async def register(
    kubelet_socket: Path, endpoint: str, resource_name: str, timeout: float = REGISTER_TIMEOUT
) -> None:
    """Tell kubelet that `resource_name` is served on `endpoint` (a file name in its directory).

    Raises what the call raised: grpclib.GRPCError when kubelet refuses, OSError when
    nothing listens, TimeoutError (asyncio's) when it does not answer in time.
    """
    # Through the directory's fd, held for the call: a deep path would not fit in sun_path.
    dirfd = os.open(kubelet_socket.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    channel = Channel(path=f"/proc/self/fd/{dirfd}/{kubelet_socket.name}")
    try:
        await dp.RegistrationStub(channel).register(
            dp.RegisterRequest(
                version=API_VERSION,
                endpoint=endpoint,
                resource_name=resource_name,
                options=OPTIONS,
            ),
            timeout=timeout,
        )
    finally:
        channel.close()
        os.close(dirfd)
