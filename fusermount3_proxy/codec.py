"""The wire protocol as the zipapp speaks it: constants, frame headers, and a JSON codec.

This module imports nothing. It is on the path of every mount, where each
stdlib module costs start-up time the helper cannot spare: json pulls in re
and enum, struct is an extension module in many images. So the zipapp
encodes its requests and decodes the broker's replies here, by hand, while
the broker keeps using json (protocol.py, which re-exports what is defined
here so that there is one definition of the protocol).

The codec gives exactly json's results on the wire format of docs/protocol.md:
encode_frame writes the bytes protocol.encode_frame writes (json.dumps with
separators=(",", ":") and ensure_ascii=False), and decode_json_object accepts
what json.loads accepts and returns the same objects, refusing the rest.
tests/test_proxy_codec.py holds them to that over generated inputs.
"""

MAGIC = b"CSAF"
VERSION = 1
HEADER_SIZE = 12  # magic "CSAF" | version u8 | kind u8 | reserved u16 | length u32, big-endian

KIND_REQUEST = 1
KIND_RESPONSE = 2

# Hard caps. A frame over MAX_BODY is refused before any of it is buffered.
MAX_BODY = 8192
MAX_OPTIONS = 64
MAX_OPTION_LENGTH = 1024
MAX_PATH_LENGTH = 4096
MAX_MESSAGE_LENGTH = 2048

# How long the broker waits for a request frame (and for room to send its
# answer), in seconds: a pod's helper sends its whole request at once.
READ_TIMEOUT = 5.0
# How long the helper waits for the broker's answer once its request is sent.
# Longer than everything the broker may wait for on a request's behalf, each of
# which it bounds: the volume's lock (LOCK_WAIT) and a node-wide mount slot
# (SLOT_WAIT), 5 s each, then the mount syscalls in a worker thread and the
# send of the answer. Waiting only READ_TIMEOUT here would let a busy node
# make the helper hang up on a mount the broker is about to hand over.
ANSWER_TIMEOUT = 30.0

# Where the socket is when nothing says otherwise: the native mode mounts a
# broker-owned directory here. go-fuse execs the helper with an empty
# environment, so this default must work without any variable.
DEFAULT_SOCKET_PATH = "/run/csi-async/fuse.sock"
# meta-fuse-csi-plugin's variable, honoured for compatibility.
SOCKET_PATH_ENV = "FUSERMOUNT3PROXY_FDPASSING_SOCKPATH"


class ProtocolError(Exception):
    """A frame that does not follow this protocol."""


# --- frames -------------------------------------------------------------------


def encode_header(kind: int, length: int) -> bytes:
    return MAGIC + bytes((VERSION, kind, 0, 0)) + length.to_bytes(4, "big")


def decode_header(header: bytes, expected_kind: int) -> int:
    """Check a frame header and return the body length."""
    if len(header) != HEADER_SIZE:
        raise ProtocolError("truncated frame header")
    version, kind = header[4], header[5]
    if header[:4] != MAGIC:
        raise ProtocolError("bad magic: not a csi-async frame")
    if version != VERSION:
        raise ProtocolError(f"unsupported protocol version {version} (this side speaks {VERSION})")
    if kind != expected_kind:
        raise ProtocolError(f"unexpected frame kind {kind}")
    if header[6] or header[7]:
        raise ProtocolError("reserved header bits are set")
    length = int.from_bytes(header[8:12], "big")
    if length > MAX_BODY:
        raise ProtocolError(f"frame body of {length} bytes exceeds {MAX_BODY}")
    return length


def encode_frame(kind: int, body: object) -> bytes:
    """Serialise one frame. Raises ProtocolError if the body is too large.

    A string that is no valid Unicode (a lone surrogate, as argv holds for
    bytes that are not UTF-8) raises UnicodeEncodeError, as json's does.
    """
    data = encode_json(body).encode("utf-8")
    if len(data) > MAX_BODY:
        raise ProtocolError(f"frame body of {len(data)} bytes exceeds {MAX_BODY}")
    return encode_header(kind, len(data)) + data


# --- JSON out -------------------------------------------------------------------

# json.dumps(ensure_ascii=False) escapes the two JSON metacharacters and the
# control characters below U+0020, five of them by their short names; every
# other character is written as it is.
_ESCAPES = {code: f"\\u{code:04x}" for code in range(0x20)}
_ESCAPES.update({0x22: '\\"', 0x5C: "\\\\", 0x08: "\\b", 0x0C: "\\f", 0x0A: "\\n"})
_ESCAPES.update({0x0D: "\\r", 0x09: "\\t"})


def encode_json(value: object) -> str:
    """json.dumps(value, separators=(",", ":"), ensure_ascii=False), for JSON's types.

    Dicts with string keys, lists and tuples, strings, ints, bools and None:
    what a request holds. Anything else raises TypeError.
    """
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return '"' + value.translate(_ESCAPES) + '"'
    if isinstance(value, int):
        return int.__repr__(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join([encode_json(item) for item in value]) + "]"
    if isinstance(value, dict):
        items = []
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"keys must be str, not {type(key).__name__}")
            items.append(encode_json(key) + ":" + encode_json(item))
        return "{" + ",".join(items) + "}"
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


# --- JSON in --------------------------------------------------------------------


class _Malformed(Exception):
    def __init__(self, what: str, at: int) -> None:
        super().__init__(f"{what}: char {at}")


_WHITESPACE = " \t\n\r"
_DIGITS = "0123456789"
_HEX_DIGITS = "0123456789abcdefABCDEF"
_SHORT_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r"}
_SHORT_ESCAPES["t"] = "\t"
# json.loads takes these three words for floats, so they are taken here too.
_CONSTANTS = (
    ("null", None),
    ("true", True),
    ("false", False),
    ("NaN", float("nan")),
    ("Infinity", float("inf")),
    ("-Infinity", float("-inf")),
)


def decode_json_object(body: bytes) -> dict[str, object]:
    """Parse a frame body into a JSON object, as json.loads(body.decode()) would.

    Schema checks are the caller's; whatever is not UTF-8 JSON, or not an
    object, raises ProtocolError.
    """
    try:
        text = body.decode("utf-8")
        end = _skip(text, 0)
        value, end = _value(text, end)
        end = _skip(text, end)
        if end != len(text):
            raise _Malformed("Extra data", end)
    except (UnicodeDecodeError, _Malformed, ValueError) as err:
        # ValueError: an int longer than int() takes (4300 digits by default).
        raise ProtocolError(f"frame body is not UTF-8 JSON: {err}") from None
    except RecursionError:
        # 8 KiB of "[" nests deeper than the parser's stack allows.
        raise ProtocolError("frame body is nested too deeply") from None
    if not isinstance(value, dict):
        raise ProtocolError("frame body is not a JSON object")
    return value


def _skip(text: str, at: int) -> int:
    while at < len(text) and text[at] in _WHITESPACE:
        at += 1
    return at


def _value(text: str, at: int) -> tuple[object, int]:
    first = text[at : at + 1]
    if first == '"':
        return _string(text, at + 1)
    if first == "{":
        return _object(text, at + 1)
    if first == "[":
        return _array(text, at + 1)
    for word, constant in _CONSTANTS:
        if text.startswith(word, at):
            return constant, at + len(word)
    return _number(text, at)


def _object(text: str, at: int) -> tuple[dict[str, object], int]:
    result: dict[str, object] = {}
    at = _skip(text, at)
    if text[at : at + 1] == "}":
        return result, at + 1
    while True:
        if text[at : at + 1] != '"':
            raise _Malformed("Expecting property name enclosed in double quotes", at)
        key, at = _string(text, at + 1)
        at = _skip(text, at)
        if text[at : at + 1] != ":":
            raise _Malformed("Expecting ':' delimiter", at)
        # Like json.loads, a repeated key keeps its last value.
        result[key], at = _value(text, _skip(text, at + 1))
        at = _skip(text, at)
        if text[at : at + 1] == "}":
            return result, at + 1
        if text[at : at + 1] != ",":
            raise _Malformed("Expecting ',' delimiter", at)
        at = _skip(text, at + 1)


def _array(text: str, at: int) -> tuple[list[object], int]:
    result: list[object] = []
    at = _skip(text, at)
    if text[at : at + 1] == "]":
        return result, at + 1
    while True:
        item, at = _value(text, at)
        result.append(item)
        at = _skip(text, at)
        if text[at : at + 1] == "]":
            return result, at + 1
        if text[at : at + 1] != ",":
            raise _Malformed("Expecting ',' delimiter", at)
        at = _skip(text, at + 1)


def _string(text: str, at: int) -> tuple[str, int]:
    """The string whose opening quote is just before at; and the index after its end."""
    parts: list[str] = []
    while True:
        quote = text.find('"', at)
        if quote < 0:
            raise _Malformed("Unterminated string", at)
        backslash = text.find("\\", at, quote)
        end = quote if backslash < 0 else backslash
        chunk = text[at:end]
        # isprintable() is False for every control character (and for some
        # other characters, which the loop then lets through).
        if not chunk.isprintable():
            for offset, char in enumerate(chunk):
                if char < " ":
                    raise _Malformed("Invalid control character", at + offset)
        parts.append(chunk)
        if backslash < 0:
            return "".join(parts), quote + 1
        kind = text[backslash + 1 : backslash + 2]
        if kind != "u":
            short = _SHORT_ESCAPES.get(kind)
            if short is None:
                raise _Malformed("Invalid \\escape", backslash)
            parts.append(short)
            at = backslash + 2
            continue
        code = _hex4(text, backslash + 2)
        at = backslash + 6
        # A high surrogate followed by a low one is one character, as in
        # json.loads; either one alone stays a lone surrogate.
        if 0xD800 <= code <= 0xDBFF and text.startswith("\\u", at):
            low = _hex4(text, at + 2)
            if 0xDC00 <= low <= 0xDFFF:
                code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)
                at += 6
        parts.append(chr(code))


def _hex4(text: str, at: int) -> int:
    digits = text[at : at + 4]
    if len(digits) != 4 or not all(digit in _HEX_DIGITS for digit in digits):
        raise _Malformed("Invalid \\uXXXX escape", at)
    return int(digits, 16)


def _number(text: str, at: int) -> tuple[int | float, int]:
    """JSON's -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][-+]?[0-9]+)?, ASCII digits only."""
    start = at
    if text[at : at + 1] == "-":
        at += 1
    first = text[at : at + 1]
    if first == "0":
        at += 1
    elif first and first in "123456789":
        at = _digits(text, at + 1)
    else:
        raise _Malformed("Expecting value", start)
    is_float = False
    if text[at : at + 1] == "." and _is_digit(text, at + 1):
        at = _digits(text, at + 2)
        is_float = True
    if text[at : at + 1] in ("e", "E"):
        exponent = at + 1
        if text[exponent : exponent + 1] in ("+", "-"):
            exponent += 1
        if _is_digit(text, exponent):
            at = _digits(text, exponent + 1)
            is_float = True
    literal = text[start:at]
    return (float(literal) if is_float else int(literal)), at


def _is_digit(text: str, at: int) -> bool:
    char = text[at : at + 1]
    return bool(char) and char in _DIGITS


def _digits(text: str, at: int) -> int:
    while _is_digit(text, at):
        at += 1
    return at


# --- mount options ----------------------------------------------------------------


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
