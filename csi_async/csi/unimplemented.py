"""Answer every unknown gRPC method with a proper UNIMPLEMENTED.

grpclib answers a path it has no handler for with a trailers-only response
that lacks `content-type: application/grpc`; grpc-go reads that as a
malformed response (UNKNOWN), so csi-sanity and kubelet would never see
UNIMPLEMENTED for Controller RPCs or methods newer than our proto. Routing
unknown paths to a real handler makes grpclib send a well-formed status.
"""

from __future__ import annotations

import logging
from typing import Any

import grpclib.const
import grpclib.server
from grpclib import GRPCError
from grpclib.const import Status

from csi_async import logs
from csi_async._proto.csi import v1 as csi

log = logging.getLogger("csi_async.rpc")


def _unimplemented_handler(path: str) -> grpclib.const.Handler:
    async def unimplemented(stream: grpclib.server.Stream[Any, Any]) -> None:
        logs.log(
            log,
            logging.WARNING,
            f"{path} UNIMPLEMENTED",
            **{logs.METHOD: path, logs.GRPC_CODE: "UNIMPLEMENTED"},
        )
        raise GRPCError(Status.UNIMPLEMENTED, f"{path} is not implemented by this plugin")

    # The request types are never used: the handler fails before reading.
    return grpclib.const.Handler(
        unimplemented,
        grpclib.const.Cardinality.UNARY_UNARY,
        csi.ProbeRequest,
        csi.ProbeResponse,
    )


class _MappingWithFallback(dict[str, grpclib.const.Handler]):
    def get(self, key: str, default: Any = None) -> grpclib.const.Handler:
        handler = super().get(key)
        return handler if handler is not None else _unimplemented_handler(key)


def install(server: grpclib.server.Server) -> None:
    """Make `server` answer unknown methods with UNIMPLEMENTED.

    Touches grpclib's private `_mapping` (grpclib is pinned <0.5, and a test
    checks this with a grpcio client on every run).
    """
    server._mapping = _MappingWithFallback(server._mapping)
