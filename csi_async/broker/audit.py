"""The audit stream: one JSON line per privileged decision the driver takes for a pod.

Its own logger (csi_async.audit), so operators can send it to its own file
(--audit-log). Writing a line must never fail the work it describes.
"""

from __future__ import annotations

import logging
from typing import Any

from csi_async import logs

audit_log = logging.getLogger("csi_async.audit")
_log = logging.getLogger("csi_async.broker")


def record(message: str, *, allowed: bool, **fields: Any) -> None:
    """Write one audit line; a failure to do so is logged, never raised."""
    try:
        logs.log(audit_log, logging.INFO if allowed else logging.WARNING, message, **fields)
    except Exception:
        _log.error("writing an audit record failed", exc_info=True)
