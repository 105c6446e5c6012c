"""The devices the plugin advertises, and what Allocate gives a container for them.

Every device is the same /dev/fuse: a FUSE connection is per open, not per node, so any
number of containers can share the one device node. The count only tells the scheduler how
many containers of a node may ask for one at once; the ids exist because kubelet's device
manager hands out ids, and are checked only so that a confused caller gets an error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

from csi_async._proto import v1beta1 as dp
from csi_async.deviceplugin.health import DEV_FUSE

HEALTHY = "Healthy"
UNHEALTHY = "Unhealthy"
# cgroup device permissions: read and write, not mknod ("m").
PERMISSIONS = "rw"
ID_PREFIX = "fuse-"
_ID = re.compile(rf"^{ID_PREFIX}(0|[1-9][0-9]*)$")


class AllocationError(ValueError):
    """An Allocate or PreStartContainer request this plugin cannot honour (INVALID_ARGUMENT)."""


@dataclass(frozen=True)
class FuseDevices:
    """`count` interchangeable devices, fuse-0 to fuse-<count-1>, all of them /dev/fuse."""

    count: int
    device_path: str = DEV_FUSE

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError("at least one device")

    @cached_property
    def _healthy(self) -> dp.ListAndWatchResponse:
        return self._listing(HEALTHY)

    @cached_property
    def _unhealthy(self) -> dp.ListAndWatchResponse:
        return self._listing(UNHEALTHY)

    def _listing(self, health: str) -> dp.ListAndWatchResponse:
        return dp.ListAndWatchResponse(
            devices=[dp.Device(id=f"{ID_PREFIX}{n}", health=health) for n in range(self.count)]
        )

    def listing(self, healthy: bool) -> dp.ListAndWatchResponse:
        """Every device with the node's health (built once per state: 1000 devices by default)."""
        return self._healthy if healthy else self._unhealthy

    def check_ids(self, ids: list[str]) -> None:
        """Refuse an empty, oversized, repeated or unknown list of device ids."""
        if not ids:
            raise AllocationError("no device ids: a container asks for at least one device")
        if len(ids) > self.count:
            raise AllocationError(
                f"{len(ids)} device ids, but this plugin advertises only {self.count}"
            )
        if len(set(ids)) != len(ids):
            raise AllocationError("a device id is listed twice")
        for device_id in ids:
            match = _ID.match(device_id)
            if match is None or int(match[1]) >= self.count:
                shown = device_id[:70] + ("..." if len(device_id) > 70 else "")
                raise AllocationError(
                    f"unknown device id {shown!r}: this plugin's are "
                    f"{ID_PREFIX}0 to {ID_PREFIX}{self.count - 1}"
                )

    def allocate(self, request: dp.AllocateRequest) -> dp.AllocateResponse:
        """One answer per container: /dev/fuse at /dev/fuse, read-write, and nothing else.

        However many of the devices a container was given, it gets one device node: they
        are all the same node. No mounts, no environment, no annotations: the pod gets
        nothing it did not ask for.
        """
        containers = request.container_requests
        if not containers:
            raise AllocationError("no container requests")
        if len(containers) > self.count:
            raise AllocationError(
                f"{len(containers)} container requests, but this plugin advertises only "
                f"{self.count} devices"
            )
        for container in containers:
            self.check_ids(container.devices_ids)
        return dp.AllocateResponse(
            container_responses=[
                dp.ContainerAllocateResponse(
                    devices=[
                        dp.DeviceSpec(
                            container_path=DEV_FUSE,
                            host_path=self.device_path,
                            permissions=PERMISSIONS,
                        )
                    ]
                )
                for _ in containers
            ]
        )
