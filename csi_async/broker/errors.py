"""A broker's refusal: the errno and message the FUSE program gets, and why."""

from __future__ import annotations


class BrokerError(Exception):
    def __init__(self, err: int, message: str, reason: str = "policy") -> None:
        super().__init__(message)
        self.errno = err
        self.message = message
        # A short label for metrics: policy, peer, busy, limit, kernel.
        self.reason = reason
