"""The broker wire protocol, defined once for both ends.

The zipapp (this package, stdlib only) speaks it as a client; the broker in
csi_async validates the same TypedDicts with pydantic (csi_async/broker/wire.py).

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

MAGIC = b"CSAF"
VERSION = 1
HEADER = struct.Struct("!4sBBHI")
HEADER_SIZE = HEADER.size

KIND_REQUEST = 1
KIND_RESPONSE = 2

# Hard caps. A frame over MAX_BODY is refused before any of it is buffered.
MAX_BODY = 8192
MAX_OPTIONS = 64
MAX_OPTION_LENGTH = 1024
MAX_PATH_LENGTH = 4096
MAX_MESSAGE_LENGTH = 2048

# How long either side waits for the other's frame, in seconds.
READ_TIMEOUT = 5.0

# Where the socket is when nothing says otherwise: the native mode mounts a
# broker-owned directory here. go-fuse execs the helper with an empty
# environment, so this default must work without any variable.
DEFAULT_SOCKET_PATH = "/run/csi-async/fuse.sock"
# meta-fuse-csi-plugin's variable, honoured for compatibility.
SOCKET_PATH_ENV = "FUSERMOUNT3PROXY_FDPASSING_SOCKPATH"


class ProtocolError(Exception):
    """A frame that does not follow this protocol."""


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


def decode_header(header: bytes, expected_kind: int) -> int:
    """Check a frame header and return the body length."""
    if len(header) != HEADER_SIZE:
        raise ProtocolError("truncated frame header")
    magic, version, kind, reserved, length = HEADER.unpack(header)
    if magic != MAGIC:
        raise ProtocolError("bad magic: not a csi-async frame")
    if version != VERSION:
        raise ProtocolError(f"unsupported protocol version {version} (this side speaks {VERSION})")
    if kind != expected_kind:
        raise ProtocolError(f"unexpected frame kind {kind}")
    if reserved != 0:
        raise ProtocolError("reserved header bits are set")
    if length > MAX_BODY:
        raise ProtocolError(f"frame body of {length} bytes exceeds {MAX_BODY}")
    return int(length)


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


def split_options(opts: str) -> list[str]:
    """Split a -o string the way fusermount3 does.

    Tokens are separated by commas. A backslash escapes the next character
    only inside tokens that start with fsname= or subtype= (so "fsname=a\\,b"
    is one token "fsname=a,b"); everywhere else a backslash is literal, which
    keeps "foo=\\,allow_other" from smuggling an option past a filter.
    Empty tokens are dropped.
    """
    tokens: list[str] = []
    i = 0
    n = len(opts)
    while i <= n:
        if opts.startswith(("fsname=", "subtype="), i):
            out: list[str] = []
            while i < n and opts[i] != ",":
                if opts[i] == "\\" and i + 1 < n:
                    i += 1
                out.append(opts[i])
                i += 1
            token = "".join(out)
        else:
            end = opts.find(",", i)
            if end < 0:
                end = n
            token = opts[i:end]
            i = end
        if token:
            tokens.append(token)
        i += 1  # skip the comma (or step past the end)
    return tokens
