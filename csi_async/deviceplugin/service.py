"""The DevicePlugin gRPC service kubelet calls on the plugin's socket."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from grpclib import GRPCError
from grpclib.const import Status

from csi_async import logs
from csi_async._proto import v1beta1 as dp
from csi_async.deviceplugin.devices import AllocationError, FuseDevices
from csi_async.deviceplugin.health import DeviceHealth

log = logging.getLogger("csi_async.deviceplugin")

# Neither optional call is needed: devices are interchangeable (no preference to give)
# and need no preparation before a container starts.
OPTIONS = dp.DevicePluginOptions(pre_start_required=False, get_preferred_allocation_available=False)


class DevicePluginService(dp.DevicePluginBase):
    def __init__(self, devices: FuseDevices, health: DeviceHealth, resource_name: str) -> None:
        self._devices = devices
        self._health = health
        self._resource = resource_name

    async def get_device_plugin_options(self, message: dp.Empty) -> dp.DevicePluginOptions:
        return OPTIONS

    async def list_and_watch(self, message: dp.Empty) -> AsyncIterator[dp.ListAndWatchResponse]:
        """The device list now, and again each time /dev/fuse's health changes.

        The stream lasts as long as kubelet's connection: kubelet treats its end as the
        plugin going away. It ends when the plugin stops (the server cancels it).
        """
        while True:
            changed = self._health.next_change()
            healthy = self._health.healthy
            logs.log(
                log,
                logging.INFO,
                "ListAndWatch: sending devices",
                resource=self._resource,
                devices=self._devices.count,
                healthy=healthy,
            )
            yield self._devices.listing(healthy)
            await changed.wait()

    async def allocate(self, message: dp.AllocateRequest) -> dp.AllocateResponse:
        try:
            response = self._devices.allocate(message)
        except AllocationError as err:
            logs.log(
                log,
                logging.WARNING,
                "Allocate refused",
                **{
                    logs.METHOD: "Allocate",
                    logs.GRPC_CODE: "INVALID_ARGUMENT",
                    logs.ERROR: str(err),
                },
            )
            raise GRPCError(Status.INVALID_ARGUMENT, str(err)) from None
        logs.log(
            log,
            logging.INFO,
            "Allocate OK",
            **{logs.METHOD: "Allocate", logs.GRPC_CODE: "OK"},
            containers=len(message.container_requests),
        )
        return response

    async def pre_start_container(
        self, message: dp.PreStartContainerRequest
    ) -> dp.PreStartContainerResponse:
        # Not asked for (pre_start_required is false); nothing to prepare if kubelet calls.
        try:
            self._devices.check_ids(message.devices_ids)
        except AllocationError as err:
            raise GRPCError(Status.INVALID_ARGUMENT, str(err)) from None
        return dp.PreStartContainerResponse()

    async def get_preferred_allocation(
        self, message: dp.PreferredAllocationRequest
    ) -> dp.PreferredAllocationResponse:
        # get_preferred_allocation_available is false: kubelet never calls this.
        raise GRPCError(
            Status.UNIMPLEMENTED, "GetPreferredAllocation: the devices are interchangeable"
        )
