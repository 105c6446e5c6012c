"""The broker wire protocol, defined once for both ends.

The zipapp (this package, stdlib only) speaks it as a client, through
codec.py's import-free encoder and decoder; the broker in csi_async encodes
and decodes with json (encode_frame, decode_json_object below) and validates
the TypedDicts below with pydantic (csi_async/broker/wire.py). Both ends give
the same bytes and the same objects (tests/test_proxy_codec.py).

A connection carries exactly one request frame and one response frame:

    header  = magic "CSAF" | version u8 | kind u8 | reserved u16 (0) | body length u32
              (network byte order, 12 bytes)
    body    = UTF-8 JSON object, at most MAX_BODY bytes

Requests never carry file descriptors. A successful MOUNT response carries
exactly one: the /dev/fuse fd, attached with SCM_RIGHTS to the response frame.
See docs/protocol.md.
"""

from __future__ import annotations

import json
import struct
from typing import Literal, TypedDict

# The constants, the header check and the -o splitter are defined once, in
# codec.py: the zipapp imports that module alone on its way to a mount, since
# this one brings json and typing along. Re-exported here for the driver.
from fusermount3_proxy.codec import (
    ANSWER_TIMEOUT,
    DEFAULT_SOCKET_PATH,
    HEADER_SIZE,
    KIND_REQUEST,
    KIND_RESPONSE,
    MAGIC,
    MAX_BODY,
    MAX_MESSAGE_LENGTH,
    MAX_OPTION_LENGTH,
    MAX_OPTIONS,
    MAX_PATH_LENGTH,
    READ_TIMEOUT,
    SOCKET_PATH_ENV,
    VERSION,
    ProtocolError,
    decode_header,
    split_options,
)

__all__ = [
    "ANSWER_TIMEOUT",
    "DEFAULT_SOCKET_PATH",
    "HEADER",
    "HEADER_SIZE",
    "KIND_REQUEST",
    "KIND_RESPONSE",
    "MAGIC",
    "MAX_BODY",
    "MAX_MESSAGE_LENGTH",
    "MAX_OPTIONS",
    "MAX_OPTION_LENGTH",
    "MAX_PATH_LENGTH",
    "READ_TIMEOUT",
    "SOCKET_PATH_ENV",
    "VERSION",
    "MountRequest",
    "ProtocolError",
    "Request",
    "Response",
    "UnmountRequest",
    "decode_header",
    "decode_json_object",
    "encode_frame",
    "split_options",
]

# The header as a struct (HEADER_SIZE bytes), for the broker and for code
# that packs headers of its own (tests, e2e).
HEADER = struct.Struct("!4sBBHI")


# The TypedDicts below are the schema. The broker derives strict pydantic
# models from them (unknown keys and type coercion are refused there).


class MountRequest(TypedDict):
    """Mount FUSE on this connection's volume and send back the /dev/fuse fd."""

    op: Literal["mount"]
    # -o tokens as the FUSE program gave them, already split on commas with
    # fusermount's escaping rules (split_options). The broker applies policy.
    options: list[str]
    # The mountpoint the program asked for, as an absolute path in its own
    # mount namespace. Advisory: the broker mounts only on its recorded target.
    mountpoint: str
    # The helper stays alive and asks for an unmount when the program exits.
    auto_unmount: bool


class UnmountRequest(TypedDict):
    """Detach this connection's volume mount."""

    op: Literal["unmount"]
    mountpoint: str
    lazy: bool
    # When set, unmount only if this is still the current mount. The
    # auto-unmount watcher passes the id it got, so a stale watcher never
    # detaches a fresh mount made after the program was restarted.
    mount_id: int | None


class Response(TypedDict):
    ok: bool
    # 0 on success; otherwise an errno value the helper reports.
    errno: int
    # Human-readable, shown on the FUSE program's stderr after "argv[0]: ".
    message: str
    # The broker's id for the mount made (never reused, unlike the kernel's
    # mount ids); an UnmountRequest may name it.
    mount_id: int | None


Request = MountRequest | UnmountRequest


def encode_frame(kind: int, body: object) -> bytes:
    """Serialise one frame. Raises ProtocolError if the body is too large."""
    data = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(data) > MAX_BODY:
        raise ProtocolError(f"frame body of {len(data)} bytes exceeds {MAX_BODY}")
    return HEADER.pack(MAGIC, VERSION, kind, 0, len(data)) + data


def decode_json_object(body: bytes) -> dict[str, object]:
    """Parse a frame body into a JSON object (schema checks are the caller's)."""
    try:
        value = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise ProtocolError(f"frame body is not UTF-8 JSON: {err}") from None
    except RecursionError:
        # 8 KiB of "[" nests deeper than the parser's stack allows.
        raise ProtocolError("frame body is nested too deeply") from None
    if not isinstance(value, dict):
        raise ProtocolError("frame body is not a JSON object")
    return value
