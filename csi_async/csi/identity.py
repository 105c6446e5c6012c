"""The CSI Identity service."""

from __future__ import annotations

from collections.abc import Callable

from csi_async import __version__
from csi_async._proto.csi import v1 as csi
from csi_async.csi.rpc import rpc


class IdentityService(csi.IdentityBase):
    def __init__(self, driver_name: str, is_ready: Callable[[], bool]) -> None:
        self._driver_name = driver_name
        self._is_ready = is_ready

    @rpc("GetPluginInfo")
    async def get_plugin_info(self, message: csi.GetPluginInfoRequest) -> csi.GetPluginInfoResponse:
        return csi.GetPluginInfoResponse(name=self._driver_name, vendor_version=__version__)

    @rpc("GetPluginCapabilities")
    async def get_plugin_capabilities(
        self, message: csi.GetPluginCapabilitiesRequest
    ) -> csi.GetPluginCapabilitiesResponse:
        # Node-only plugin: no CONTROLLER_SERVICE (there is no controller), no
        # topology constraints (any node with the driver can serve a volume).
        return csi.GetPluginCapabilitiesResponse(capabilities=[])

    @rpc("Probe")
    async def probe(self, message: csi.ProbeRequest) -> csi.ProbeResponse:
        # ready=false only while starting: the livenessprobe sidecar turns it
        # into a failed health check, so it must not linger.
        return csi.ProbeResponse(ready=self._is_ready())
