"""The CSI Node service: request validation and error mapping.

The work itself happens in csi_async.volumes (what to set up) and
csi_async.broker (serving the mount to the pod).
"""

from __future__ import annotations

from grpclib import GRPCError
from grpclib.const import Status

from csi_async._proto.csi import v1 as csi
from csi_async.csi.requests import validate_publish, validate_unpublish
from csi_async.csi.rpc import rpc
from csi_async.kubelet.errors import InvalidRequest
from csi_async.policy.node import NodePolicy
from csi_async.volumes.errors import PublishFailed, VolumeBusy, VolumeConflict, WrongVolume
from csi_async.volumes.registry import VolumeManager
from csi_async.volumes.state import VolumeRecord


class NodeService(csi.NodeBase):
    def __init__(self, *, node_id: str, volumes: VolumeManager, policy: NodePolicy) -> None:
        self._node_id = node_id
        self._volumes = volumes
        self._policy = policy

    @rpc("NodeGetInfo")
    async def node_get_info(self, message: csi.NodeGetInfoRequest) -> csi.NodeGetInfoResponse:
        # max_volumes_per_node 0 = no limit reported; mounts are cheap here.
        return csi.NodeGetInfoResponse(node_id=self._node_id)

    @rpc("NodeGetCapabilities")
    async def node_get_capabilities(
        self, message: csi.NodeGetCapabilitiesRequest
    ) -> csi.NodeGetCapabilitiesResponse:
        # Nothing optional is implemented yet, so nothing is advertised:
        # no staging (inline volumes are never staged), no volume stats.
        return csi.NodeGetCapabilitiesResponse(capabilities=[])

    @rpc("NodePublishVolume")
    async def node_publish_volume(
        self, message: csi.NodePublishVolumeRequest
    ) -> csi.NodePublishVolumeResponse:
        try:
            spec = validate_publish(message, self._volumes.kubelet_root, self._policy)
            await self._volumes.publish(spec, VolumeRecord.of(message))
        except InvalidRequest as err:
            raise GRPCError(Status.INVALID_ARGUMENT, str(err)) from None
        except VolumeConflict as err:
            raise GRPCError(Status.ALREADY_EXISTS, str(err)) from None
        except VolumeBusy as err:
            raise GRPCError(Status.ABORTED, str(err)) from None
        except PublishFailed as err:
            raise GRPCError(Status.FAILED_PRECONDITION, str(err)) from None
        return csi.NodePublishVolumeResponse()

    @rpc("NodeUnpublishVolume")
    async def node_unpublish_volume(
        self, message: csi.NodeUnpublishVolumeRequest
    ) -> csi.NodeUnpublishVolumeResponse:
        try:
            target = validate_unpublish(message, self._volumes.kubelet_root)
            # Unknown or already-removed targets are fine: kubelet retries any
            # error here forever and the pod would hang in Terminating.
            await self._volumes.unpublish(target, message.volume_id)
        except (InvalidRequest, WrongVolume) as err:
            raise GRPCError(Status.INVALID_ARGUMENT, str(err)) from None
        except VolumeBusy as err:
            raise GRPCError(Status.ABORTED, str(err)) from None
        return csi.NodeUnpublishVolumeResponse()

    # The rest of the Node service is not offered; these log the call and
    # answer UNIMPLEMENTED, which kubelet never retries.

    @rpc("NodeStageVolume")
    async def node_stage_volume(
        self, message: csi.NodeStageVolumeRequest
    ) -> csi.NodeStageVolumeResponse:
        raise GRPCError(Status.UNIMPLEMENTED, "NodeStageVolume is not supported")

    @rpc("NodeUnstageVolume")
    async def node_unstage_volume(
        self, message: csi.NodeUnstageVolumeRequest
    ) -> csi.NodeUnstageVolumeResponse:
        raise GRPCError(Status.UNIMPLEMENTED, "NodeUnstageVolume is not supported")

    @rpc("NodeGetVolumeStats")
    async def node_get_volume_stats(
        self, message: csi.NodeGetVolumeStatsRequest
    ) -> csi.NodeGetVolumeStatsResponse:
        raise GRPCError(Status.UNIMPLEMENTED, "NodeGetVolumeStats is not supported")

    @rpc("NodeExpandVolume")
    async def node_expand_volume(
        self, message: csi.NodeExpandVolumeRequest
    ) -> csi.NodeExpandVolumeResponse:
        raise GRPCError(Status.UNIMPLEMENTED, "NodeExpandVolume is not supported")
