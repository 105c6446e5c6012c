"""Why a publish or unpublish did not happen; the CSI service maps each to a gRPC code."""

from __future__ import annotations


class VolumeBusy(Exception):
    """Another operation on the same target is in progress (ABORTED)."""


class VolumeConflict(Exception):
    """Already published at this target with other arguments (ALREADY_EXISTS)."""


class PublishFailed(Exception):
    """The node cannot set the volume up right now (FAILED_PRECONDITION)."""


class WrongVolume(Exception):
    """Another volume_id is published at this target (INVALID_ARGUMENT)."""
