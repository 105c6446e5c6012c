"""JSON logs: one object per line, stable keys, secrets never written.

Log keys used across the driver are named here once, so that a search for
`pod_uid` finds every line about a pod.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# Stable field names (see docs/operations.md).
METHOD = "method"
VOLUME_ID = "volume_id"
TARGET = "target_path"
POD_UID = "pod_uid"
POD_NAMESPACE = "pod_namespace"
POD_NAME = "pod_name"
DURATION_MS = "duration_ms"
GRPC_CODE = "grpc_code"
PEER_PID = "peer_pid"
PEER_UID = "peer_uid"
PEER_GID = "peer_gid"
ERROR = "error"


class JsonFormatter(logging.Formatter):
    """Formats records as JSON; extra fields come from `extra={"fields": {...}}`."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            entry.update(fields)
        if record.exc_info and record.levelno >= logging.ERROR:
            # Exception type and text only: tracebacks stay out of the logs,
            # and the message never carries request contents.
            exc = record.exc_info[1]
            entry[ERROR] = f"{type(exc).__name__}: {exc}"
        return json.dumps(entry, default=str, ensure_ascii=False)


def setup(level: str, audit_file: Path | None = None) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # The audit stream: every privileged request, whatever the log level.
    audit = logging.getLogger("csi_async.audit")
    audit.setLevel(logging.INFO)
    if audit_file is not None:
        audit_handler = logging.FileHandler(audit_file, encoding="utf-8")
        audit_handler.setFormatter(JsonFormatter())
        audit.handlers[:] = [audit_handler]
        audit.propagate = False
    # grpclib logs "Application error" with a traceback for exceptions that
    # our RPC wrapper already turned into INTERNAL; keep its noise out.
    logging.getLogger("grpclib").setLevel(logging.CRITICAL)
    # The HTTP/2 stack's debug output is per-frame noise, not ours to show.
    for noisy in ("hpack", "h2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def log(logger: logging.Logger, level: int, msg: str, **fields: Any) -> None:
    logger.log(level, msg, extra={"fields": fields})
