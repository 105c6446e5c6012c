"""The zipapp's import-free codec agrees with the broker's json: the same bytes, the same objects.

fusermount3_proxy/codec.py encodes requests and decodes replies by hand so
that the helper never imports json; the broker keeps json
(fusermount3_proxy/protocol.py). Old zipapps in images talk to new drivers
and the other way round, so the two must not differ on anything either side
can send: Hypothesis generates requests and replies (non-ASCII, control
characters, escapes, lone surrogates, other keys a later driver may add),
JSON of every shape, and broken JSON, and each is put through both.
"""

from __future__ import annotations

import errno
import json
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from csi_async.broker import wire
from fusermount3_proxy import client, codec, protocol

# Every code point, lone surrogates included: argv holds one for each byte
# that is not UTF-8, and a JSON \uXXXX escape can spell one.
ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=40)
# Text with many of the characters JSON escapes.
ESCAPY_TEXT = st.text(
    st.sampled_from(['"', "\\", "/", "\b", "\f", "\n", "\r", "\t", "\x00", "\x1f", "\x7f",
                     "\u2028", "é", "€", "😀", "\ud800", "\udc00", "a", " "]),
    max_size=20,
)  # fmt: skip
TEXT = ANY_TEXT | ESCAPY_TEXT
INT = st.integers() | st.integers(min_value=-(2**70), max_value=2**70)

MOUNT_REQUESTS = st.fixed_dictionaries(
    {
        "op": st.just("mount"),
        "options": st.lists(TEXT, max_size=8),
        "mountpoint": TEXT,
        "auto_unmount": st.booleans(),
    }
)
UNMOUNT_REQUESTS = st.fixed_dictionaries(
    {
        "op": st.just("unmount"),
        "mountpoint": TEXT,
        "lazy": st.booleans(),
        "mount_id": st.none() | INT,
    }
)
REQUESTS = MOUNT_REQUESTS | UNMOUNT_REQUESTS

JSON_SCALARS = st.none() | st.booleans() | INT | st.floats() | TEXT
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)
RESPONSES = st.builds(
    lambda ok, code, message, mount_id, extra: {
        "ok": ok, "errno": code, "message": message, "mount_id": mount_id, **extra,
    },
    st.booleans(), INT, TEXT, st.none() | INT,
    # Keys a later driver may add: an old zipapp must still read the answer.
    st.dictionaries(TEXT, JSON_VALUES, max_size=2),
)  # fmt: skip

# How a JSON document may be laid out: compact as the broker writes it,
# escaped to ASCII, with json's default separators, indented.
LAYOUTS = st.sampled_from(
    [
        {"separators": (",", ":"), "ensure_ascii": False},
        {"separators": (",", ":"), "ensure_ascii": True},
        {},
        {"indent": 2, "ensure_ascii": False},
        {"indent": "\t\r\n "},
    ]
)


def json_loads_result(body: bytes) -> str:
    """What the broker's decoder makes of a body, as a comparable string (repr or the error)."""
    try:
        return repr(protocol.decode_json_object(body))
    except protocol.ProtocolError:
        return "ProtocolError"


def codec_result(body: bytes) -> str:
    try:
        return repr(codec.decode_json_object(body))
    except codec.ProtocolError:
        return "ProtocolError"


def encoded(body: object, **layout: object) -> bytes | None:
    """json.dumps(body) as UTF-8, or None where that cannot be encoded (lone surrogates)."""
    try:
        return json.dumps(body, **layout).encode("utf-8")  # type: ignore[arg-type]
    except UnicodeEncodeError:
        return None


# --- requests: the zipapp encodes, the broker decodes -------------------------


@given(REQUESTS)
def test_a_request_frame_is_the_bytes_the_json_encoder_writes(request: dict[str, object]) -> None:
    for kind in (codec.KIND_REQUEST, codec.KIND_RESPONSE):
        try:
            expected: bytes | str = protocol.encode_frame(kind, request)
        except UnicodeEncodeError as err:
            expected = f"UnicodeEncodeError: {err}"
        try:
            ours: bytes | str = codec.encode_frame(kind, request)
        except UnicodeEncodeError as err:
            ours = f"UnicodeEncodeError: {err}"
        assert ours == expected


@given(REQUESTS)
def test_the_broker_reads_every_encodable_request_as_it_was_sent(
    request: dict[str, object],
) -> None:
    try:
        frame = codec.encode_frame(codec.KIND_REQUEST, request)
    except UnicodeEncodeError:
        return  # the zipapp reports it ("cannot encode the request"), nothing is sent
    assert protocol.decode_header(frame[:12], protocol.KIND_REQUEST) == len(frame) - 12
    assert protocol.decode_json_object(frame[12:]) == request


@pytest.mark.parametrize(
    "request_",
    [
        {"op": "mount", "options": ["rw", "nosuid", "nodev", "subtype=hello"],
         "mountpoint": "/data", "auto_unmount": False},
        {"op": "mount", "options": ["fsname=a,b\\c", 'subtype="q"', "é😀"],
         "mountpoint": "/dätä/\n\t\x01", "auto_unmount": True},
        {"op": "unmount", "mountpoint": "/data", "lazy": True, "mount_id": 1795323543225755},
        {"op": "unmount", "mountpoint": "/data", "lazy": False, "mount_id": None},
    ],
)  # fmt: skip
def test_the_broker_validates_the_zipapps_requests(request_: dict[str, object]) -> None:
    # Through pydantic as well, which is what the broker really does with them.
    frame = codec.encode_frame(codec.KIND_REQUEST, request_)
    assert frame == protocol.encode_frame(protocol.KIND_REQUEST, request_)
    assert dict(wire.parse_request(frame[12:])) == request_


def test_a_request_too_large_for_a_frame_is_refused_like_the_json_encoder_refuses_it() -> None:
    request = {"op": "mount", "options": ["x" * 1000] * 9, "mountpoint": "/", "auto_unmount": False}
    with pytest.raises(protocol.ProtocolError) as expected:
        protocol.encode_frame(protocol.KIND_REQUEST, request)
    with pytest.raises(codec.ProtocolError) as ours:
        codec.encode_frame(codec.KIND_REQUEST, request)
    assert str(ours.value) == str(expected.value)


def test_the_encoder_refuses_what_is_no_json_it_writes() -> None:
    for value in (1.5, b"x", {1: "x"}, {"x": object()}):
        with pytest.raises(TypeError):
            codec.encode_json(value)


# --- replies: the broker encodes, the zipapp decodes --------------------------


@given(RESPONSES, LAYOUTS)
def test_a_reply_decodes_to_what_json_decodes_it_to(
    response: dict[str, object], layout: dict[str, object]
) -> None:
    body = encoded(response, **layout)
    if body is not None:
        assert codec_result(body) == json_loads_result(body) != "ProtocolError"


@given(
    ok=st.booleans(),
    code=st.integers(min_value=0, max_value=4095),
    message=TEXT,
    mount_id=st.none() | st.integers(min_value=1, max_value=2**63 - 1),
)
def test_the_zipapp_reads_every_reply_the_broker_builds(
    ok: bool, code: int, message: str, mount_id: int | None
) -> None:
    # wire.response_frame is what the broker sends; whatever the message
    # holds (it may quote a request), the zipapp reads the same reply back.
    frame = wire.response_frame(ok=ok, errno=code, message=message, mount_id=mount_id)
    length = codec.decode_header(frame[:12], codec.KIND_RESPONSE)
    assert length == len(frame) - 12
    reply = client._parse_response(codec.decode_json_object(frame[12:]))
    assert reply == protocol.decode_json_object(frame[12:])
    assert reply["message"] == wire.printable_message(message)


@given(JSON_VALUES, LAYOUTS)
def test_any_json_decodes_as_json_decodes_it(value: object, layout: dict[str, object]) -> None:
    # Objects come back equal (repr: -0.0, nan and 1 against 1.0 told apart);
    # anything else is refused by both, as not an object.
    body = encoded(value, **layout)
    if body is not None:
        assert codec_result(body) == json_loads_result(body)


# Characters that matter to JSON's grammar, to break documents with.
GRAMMAR = st.sampled_from(list('{}[]:,"\\/ \t\n\r\x0b\x0c\x00\x1fu0123456789abcdefABCDEF.eE+-'))
GRAMMAR |= st.sampled_from(list("ntfINa"))


@given(JSON_VALUES | RESPONSES, st.lists(st.tuples(st.integers(0, 200), GRAMMAR), max_size=3))
def test_broken_json_is_refused_by_both_or_read_alike(
    value: object, edits: list[tuple[int, str]]
) -> None:
    text = json.dumps(value, ensure_ascii=bool(edits and edits[0][0] % 2))
    for position, char in edits:
        at = position % (len(text) + 1)
        # Insert, replace or delete one character.
        text = [text[:at] + char + text[at:], text[:at] + char + text[at + 1 :],
                text[:at] + text[at + 1 :]][position % 3]  # fmt: skip
    body = text.encode("utf-8", "surrogatepass")
    assert codec_result(body) == json_loads_result(body)


@given(st.binary(max_size=64))
def test_random_bytes_are_refused_by_both_or_read_alike(body: bytes) -> None:
    assert codec_result(body) == json_loads_result(body)


@pytest.mark.parametrize(
    "text",
    [
        "{}", ' \t\r\n{"a":1} \n', '{"a":1,"a":2}', '{"a":[]}', '{"a":{}}', '{"a":-0}',
        '{"a":-0.0}', '{"a":1E400}', '{"a":-1e-400}', '{"a":NaN}', '{"a":-Infinity}',
        '{"a":"\\ud83d\\ude00"}', '{"a":"\\ud83d"}', '{"a":"\\ude00\\ud83d"}',
        '{"a":"\\ud83d\\u0041"}', '{"a":"\\uD83D\\uDE00"}', '{"a":"\\/\\b\\f\\n\\r\\t"}',
        '{"a":"\x7f\u2028"}', '{"a":"٣"}',
        # Refused by both:
        "", "[]", "1", '"a"', "{", '{"a"}', '{"a":}', '{"a":1,}', '{,}', '{"a":01}',
        '{"a":1.}', '{"a":.5}', '{"a":1e}', '{"a":+1}', '{"a":-}', '{"a":0x1}',
        '{"a":"\\x"}', '{"a":"\\u12"}', '{"a":"\\u12g4"}', '{"a":"\\ud83d\\u12"}',
        '{"a":"\x00"}', '{"a":"\n"}', '{"a":"unterminated}', '{"a":1}x', '{"a":1}{}',
        '\ufeff{"a":1}', '{"a":tru}', '{"a":nul}', '{"a":infinity}',
        '{"a":٣}', "{'a':1}", '{"a":1 2}', '{"a" 1}', "{\u00a0}", '\x0b{"a":1}',
        '{"a":\x0c1}', '{"a":1\u2028}',
    ],
)  # fmt: skip
def test_json_edge_cases_are_read_or_refused_alike(text: str) -> None:
    body = text.encode("utf-8", "surrogatepass")
    assert codec_result(body) == json_loads_result(body)


def test_json_limits_are_refused_alike() -> None:
    for body in (
        b"[" * codec.MAX_BODY,  # deeper than the parser's stack
        b'{"a":' + b"9" * 5000 + b"}",  # longer than int() takes
        b'{"a":' * 2000 + b"1" + b"}" * 2000,
        b'{"a":"\xff"}',  # not UTF-8
    ):
        assert codec_result(body) == json_loads_result(body) == "ProtocolError"


# --- frame headers ----------------------------------------------------------------


def reference_decode_header(header: bytes, expected_kind: int) -> int:
    """The header check as protocol.py wrote it with struct before codec.py."""
    if len(header) != protocol.HEADER_SIZE:
        raise protocol.ProtocolError("truncated frame header")
    magic, version, kind, reserved, length = struct.unpack("!4sBBHI", header)
    if magic != protocol.MAGIC:
        raise protocol.ProtocolError("bad magic: not a csi-async frame")
    if version != protocol.VERSION:
        raise protocol.ProtocolError(
            f"unsupported protocol version {version} (this side speaks {protocol.VERSION})"
        )
    if kind != expected_kind:
        raise protocol.ProtocolError(f"unexpected frame kind {kind}")
    if reserved != 0:
        raise protocol.ProtocolError("reserved header bits are set")
    if length > protocol.MAX_BODY:
        raise protocol.ProtocolError(f"frame body of {length} bytes exceeds {protocol.MAX_BODY}")
    return int(length)


HEADERS = st.binary(max_size=14) | st.builds(
    lambda magic, version, kind, reserved, length: struct.pack(
        "!4sBBHI", magic, version, kind, reserved, length
    ),
    st.sampled_from([b"CSAF", b"CSAG", b"\0\0\0\0"]),
    st.sampled_from([0, 1, 2, 255]),
    st.sampled_from([0, 1, 2, 3]),
    st.sampled_from([0, 1, 256, 65535]),
    st.sampled_from([0, 1, 8192, 8193, 2**32 - 1]) | st.integers(0, 2**32 - 1),
)


def header_result(decode: object, header: bytes | bytearray, kind: int) -> str:
    try:
        return repr(decode(header, kind))  # type: ignore[operator]
    except protocol.ProtocolError as err:
        return f"ProtocolError: {err}"


@pytest.mark.parametrize(
    "header",
    [
        struct.pack("!4sBBHI", b"CSAF", 1, 1, 0, 8192),
        struct.pack("!4sBBHI", b"CSAF", 1, 1, 0, 8193),
        struct.pack("!4sBBHI", b"CSAX", 1, 1, 0, 0),
        struct.pack("!4sBBHI", b"CSAF", 2, 1, 0, 0),
        struct.pack("!4sBBHI", b"CSAF", 1, 2, 0, 0),
        struct.pack("!4sBBHI", b"CSAF", 1, 1, 1, 0),
        struct.pack("!4sBBHI", b"CSAF", 1, 1, 256, 0),
        struct.pack("!4sBBHI", b"CSAX", 2, 2, 1, 2**32 - 1),  # the first check wins
        b"CSAF\x01\x01\x00\x00\x00\x00\x00",
    ],
)
def test_each_header_field_is_judged_as_the_struct_based_check_judged_it(header: bytes) -> None:
    expected = header_result(reference_decode_header, header, protocol.KIND_REQUEST)
    assert header_result(codec.decode_header, header, protocol.KIND_REQUEST) == expected


@given(HEADERS, st.sampled_from([protocol.KIND_REQUEST, protocol.KIND_RESPONSE]))
def test_headers_are_judged_as_the_struct_based_check_judged_them(header: bytes, kind: int) -> None:
    expected = header_result(reference_decode_header, header, kind)
    assert header_result(codec.decode_header, header, kind) == expected
    assert header_result(codec.decode_header, bytearray(header), kind) == expected


@given(st.sampled_from([1, 2]), st.integers(0, 2**32 - 1))
def test_a_header_is_the_bytes_struct_packs(kind: int, length: int) -> None:
    assert codec.encode_header(kind, length) == protocol.HEADER.pack(
        protocol.MAGIC, protocol.VERSION, kind, 0, length
    )


def test_the_protocol_names_the_driver_imports_are_the_codecs() -> None:
    # One definition: protocol.py re-exports codec.py's.
    for name in ("ProtocolError", "decode_header", "split_options", "MAX_BODY", "READ_TIMEOUT"):
        assert getattr(protocol, name) is getattr(codec, name)
    assert protocol.HEADER.size == codec.HEADER_SIZE
    assert errno.EPROTO  # the broker's answer to a ProtocolError (session.py)
