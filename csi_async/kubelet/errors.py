"""The one error for input kubelet sent that the driver cannot serve."""

from __future__ import annotations


class InvalidRequest(Exception):
    """The request is malformed or asks for something unsupported (INVALID_ARGUMENT)."""
