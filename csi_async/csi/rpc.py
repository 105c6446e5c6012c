"""One wrapper around every RPC: a log line each, and errors that mean something.

Each call logs method, volume, target, pod, duration and gRPC code. Known
failures map to the CSI error codes; anything unexpected becomes INTERNAL with
a short message (grpclib would send UNKNOWN, which kubelet treats differently,
and would log a traceback with the request in it).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from grpclib import GRPCError
from grpclib.const import Status

from csi_async import logs, metrics
from csi_async.kubelet.volume_context import pod_fields

log = logging.getLogger("csi_async.rpc")

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Self = TypeVar("Self")


def request_fields(message: object) -> dict[str, Any]:
    """The log fields of a request: identifiers only, never secrets."""
    fields: dict[str, Any] = {}
    volume_id = getattr(message, "volume_id", "")
    if volume_id:
        fields[logs.VOLUME_ID] = volume_id
    target = getattr(message, "target_path", "") or getattr(message, "volume_path", "")
    if target:
        fields[logs.TARGET] = target
    context = getattr(message, "volume_context", None)
    if context:
        fields.update(pod_fields(context))
    return fields


class InFlight:
    """Counts running RPCs so that shutdown can wait for them."""

    def __init__(self) -> None:
        self.count = 0
        self._idle: asyncio.Event | None = None

    def enter(self) -> None:
        self.count += 1

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0 and self._idle is not None:
            self._idle.set()

    async def drained(self) -> None:
        while self.count:
            self._idle = asyncio.Event()
            await self._idle.wait()


in_flight = InFlight()


def rpc(
    name: str,
) -> Callable[
    [Callable[[Self, Req], Coroutine[Any, Any, Resp]]],
    Callable[[Self, Req], Coroutine[Any, Any, Resp]],
]:
    def decorate(
        handler: Callable[[Self, Req], Coroutine[Any, Any, Resp]],
    ) -> Callable[[Self, Req], Coroutine[Any, Any, Resp]]:
        @functools.wraps(handler)
        async def wrapper(self: Self, message: Req) -> Resp:
            started = time.monotonic()
            code = Status.OK
            detail = ""
            in_flight.enter()
            try:
                return await handler(self, message)
            except GRPCError as err:
                code, detail = err.status, err.message or ""
                raise
            except asyncio.CancelledError:
                code, detail = Status.CANCELLED, "cancelled by the client or its deadline"
                raise
            except Exception as err:
                code, detail = Status.INTERNAL, f"{type(err).__name__}: {err}"
                log.error(
                    "unexpected error in %s",
                    name,
                    exc_info=True,
                    extra={"fields": {logs.METHOD: name}},
                )
                raise GRPCError(
                    Status.INTERNAL, f"internal error in {name}: {type(err).__name__}"
                ) from None
            finally:
                in_flight.leave()
                fields = request_fields(message)
                fields[logs.METHOD] = name
                fields[logs.GRPC_CODE] = code.name
                fields[logs.DURATION_MS] = round((time.monotonic() - started) * 1000, 3)
                if detail:
                    fields["detail"] = detail
                metrics.RPC_REQUESTS.labels(name, code.name).inc()
                metrics.RPC_DURATION.labels(name).observe(time.monotonic() - started)
                level = logging.INFO if code == Status.OK else logging.WARNING
                logs.log(log, level, f"{name} {code.name}", **fields)

        return wrapper

    return decorate
