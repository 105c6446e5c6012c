"""A CSI client on grpcio (a different gRPC stack from the driver's grpclib).

No grpcio-generated stubs are needed: requests are the betterproto2 messages
serialised with bytes(), responses parsed with Message.parse. kubelet opens
a new connection per RPC; so does this client by default.
"""

from __future__ import annotations

from typing import TypeVar

import betterproto2
import grpc

from csi_async._proto.csi import v1 as csi

R = TypeVar("R", bound=betterproto2.Message)

# Response type of every method this client knows, by gRPC path.
RESPONSES: dict[str, type[betterproto2.Message]] = {
    "/csi.v1.Identity/GetPluginInfo": csi.GetPluginInfoResponse,
    "/csi.v1.Identity/GetPluginCapabilities": csi.GetPluginCapabilitiesResponse,
    "/csi.v1.Identity/Probe": csi.ProbeResponse,
    "/csi.v1.Node/NodeGetInfo": csi.NodeGetInfoResponse,
    "/csi.v1.Node/NodeGetCapabilities": csi.NodeGetCapabilitiesResponse,
    "/csi.v1.Node/NodePublishVolume": csi.NodePublishVolumeResponse,
    "/csi.v1.Node/NodeUnpublishVolume": csi.NodeUnpublishVolumeResponse,
    "/csi.v1.Node/NodeStageVolume": csi.NodeStageVolumeResponse,
    "/csi.v1.Node/NodeUnstageVolume": csi.NodeUnstageVolumeResponse,
    "/csi.v1.Node/NodeGetVolumeStats": csi.NodeGetVolumeStatsResponse,
    "/csi.v1.Node/NodeExpandVolume": csi.NodeExpandVolumeResponse,
}


class CsiClient:
    def __init__(self, endpoint: str, timeout: float = 30.0) -> None:
        # kubelet dials with authority "localhost"; do the same.
        self.endpoint = endpoint
        self.timeout = timeout

    def call(
        self,
        path: str,
        request: betterproto2.Message,
        response_type: type[R] | None = None,
        timeout: float | None = None,
    ) -> R:
        """One unary call on a fresh channel; raises grpc.RpcError on failure."""
        parse = (response_type or RESPONSES.get(path, csi.ProbeResponse)).parse
        options = [("grpc.default_authority", "localhost"), ("grpc.enable_http_proxy", 0)]
        with grpc.insecure_channel(self.endpoint, options=options) as channel:
            method = channel.unary_unary(
                path, request_serializer=bytes, response_deserializer=parse
            )
            return method(  # type: ignore[no-any-return]
                request, timeout=self.timeout if timeout is None else timeout
            )

    def node_publish(self, request: csi.NodePublishVolumeRequest) -> csi.NodePublishVolumeResponse:
        return self.call("/csi.v1.Node/NodePublishVolume", request, csi.NodePublishVolumeResponse)

    def node_unpublish(self, volume_id: str, target_path: str) -> csi.NodeUnpublishVolumeResponse:
        return self.call(
            "/csi.v1.Node/NodeUnpublishVolume",
            csi.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=target_path),
            csi.NodeUnpublishVolumeResponse,
        )
