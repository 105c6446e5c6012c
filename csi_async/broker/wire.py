"""Broker-side validation of the wire protocol in fusermount3_proxy.protocol.

The schema is the TypedDicts defined there; pydantic enforces them strictly
(no coercion, no unknown keys) and the caps below bound every string.
"""

from __future__ import annotations

from typing import Annotated, Any, cast, get_type_hints

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from pydantic import create_model as _create_model

from fusermount3_proxy import protocol
from fusermount3_proxy.protocol import MountRequest, Request, Response, UnmountRequest


def _model_of(schema: type) -> type[BaseModel]:
    """A strict pydantic model with exactly the fields of a protocol TypedDict.

    pydantic needs typing_extensions.TypedDict on Python 3.11, which the
    stdlib-only zipapp cannot import, so the model is derived field by field
    from the one definition instead of being written a second time.
    """
    fields: dict[str, Any] = {name: (hint, ...) for name, hint in get_type_hints(schema).items()}
    config = ConfigDict(extra="forbid", strict=True)
    return cast(type[BaseModel], _create_model(schema.__name__, __config__=config, **fields))


_MountModel = _model_of(MountRequest)
_UnmountModel = _model_of(UnmountRequest)


def _require_utf8(value: str, what: str) -> None:
    # JSON's \uXXXX escapes can spell a lone UTF-16 surrogate, which is a
    # Python str but no UTF-8: it could never be logged, echoed in an error
    # message or handed to the kernel, so it is refused here, up front.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} is not valid Unicode (a lone surrogate)") from None


def _check_request_limits(model: BaseModel) -> Request:
    request = cast(Request, model.model_dump())
    _require_utf8(request["mountpoint"], "mountpoint")
    if request["op"] == "mount":
        for option in request["options"]:
            _require_utf8(option, "a mount option")
    if len(request["mountpoint"]) > protocol.MAX_PATH_LENGTH:
        raise ValueError(f"mountpoint longer than {protocol.MAX_PATH_LENGTH} characters")
    if "\0" in request["mountpoint"]:
        raise ValueError("mountpoint contains NUL")
    if request["op"] == "mount":
        options = request["options"]
        if len(options) > protocol.MAX_OPTIONS:
            raise ValueError(f"more than {protocol.MAX_OPTIONS} mount options")
        if any(len(option) > protocol.MAX_OPTION_LENGTH for option in options):
            raise ValueError(f"a mount option is longer than {protocol.MAX_OPTION_LENGTH}")
    else:
        mount_id = request["mount_id"]
        if mount_id is not None and not 0 < mount_id < 2**63:
            raise ValueError("mount_id out of range")
    return request


_REQUEST: TypeAdapter[BaseModel] = TypeAdapter(
    Annotated[  # type: ignore[arg-type]
        Annotated[_MountModel | _UnmountModel, Field(discriminator="op")],
        AfterValidator(_check_request_limits),
    ]
)


class BadRequest(Exception):
    """A request frame that parses as JSON but violates the schema."""


def parse_request(body: bytes) -> Request:
    """Validate one request frame's body. Raises ProtocolError or BadRequest."""
    raw = protocol.decode_json_object(body)
    try:
        return cast(Request, _REQUEST.validate_python(raw))
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "request"
        raise BadRequest(f"invalid request: {where}: {first['msg']}") from None


# Sent when a response cannot be built at all; never expected, always encodable.
_FALLBACK = protocol.encode_frame(
    protocol.KIND_RESPONSE,
    {"ok": False, "errno": 5, "message": "internal error in the csi-async broker",
     "mount_id": None},
)  # fmt: skip


def printable_message(message: str) -> str:
    """A message that encodes as UTF-8 and fits MAX_MESSAGE_LENGTH bytes.

    Messages may quote what a pod sent; whatever it holds, the answer must
    still encode (a failing encode in an error path once killed the driver).
    """
    data = message.encode("utf-8", "backslashreplace")[: protocol.MAX_MESSAGE_LENGTH]
    return data.decode("utf-8", "ignore")  # a cut in the middle of a character


def response_frame(
    *, ok: bool, errno: int = 0, message: str = "", mount_id: int | None = None
) -> bytes:
    """Encode a response. Total: never raises, whatever the message holds."""
    try:
        response: Response = {
            "ok": ok,
            "errno": int(errno),
            "message": printable_message(message),
            "mount_id": mount_id,
        }
        return protocol.encode_frame(protocol.KIND_RESPONSE, response)
    except Exception:
        return _FALLBACK
