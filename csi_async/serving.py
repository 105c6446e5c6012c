"""The serving process: `python -m csi_async.serving <settings as JSON>`.

`csi-async serve` (csi_async/cli.py) reads and checks its settings with click and the
Settings model, then execs this module: the same pid, fds and environment, in a fresh
interpreter. It is the driver for the whole life of the node, and it imports only what
serving needs: not click and the option machinery built on it (about 1 MiB resident),
and not OpenSSL (import_serving_stack).
"""

from __future__ import annotations

import json
import sys
import types


class _NoSSLContext:
    """ssl.SSLContext of the placeholder ssl module: this process serves without TLS."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError("csi-async serves Unix sockets only: this process has no ssl")


def import_serving_stack(*, ssl: bool) -> None:
    """Import csi_async.server and all it serves with, without OpenSSL (and ssl unless `ssl`).

    The driver speaks only Unix sockets and hashes with sha256 alone, yet its imports
    would load OpenSSL twice over, about 2 MiB of Pss for the whole life of the node:
    - ssl (libssl), through asyncio and anyio. asyncio imports it optionally
      (`try: import ssl`), so a None in sys.modules makes it run as on a Python built
      without ssl (it uses ssl only for ssl= arguments, which nothing passes). anyio's
      socket functions (its wait_readable, which the broker uses) and its TLS streams
      import it unconditionally, only to name ssl.SSLContext: a placeholder module
      stands in while those load. The driver never asks anyio for TLS; if something
      did, it would fail loudly on the placeholder rather than quietly go without.
      grpclib names ssl only for type checking.
    - _hashlib (libcrypto), through pydantic (secrets, hmac). hashlib and hmac import
      it optionally and fall back to Python's own sha256 and HMAC.
    Afterwards sys.modules holds neither name, so a later import (nothing in serving
    does one; prometheus_client does, with metrics on) gets the real module.
    """
    blocked = [name for name in ("_hashlib", "ssl") if name not in sys.modules]
    if ssl and "ssl" in blocked:
        blocked.remove("ssl")
    placeholder = types.ModuleType("ssl", "A stand-in: csi-async serves without ssl.")
    placeholder.SSLContext = _NoSSLContext  # type: ignore[attr-defined]
    for name in blocked:
        sys.modules[name] = None  # type: ignore[assignment]
    try:
        import asyncio  # noqa: F401, PLC0415

        if "ssl" in blocked:
            sys.modules["ssl"] = placeholder
        import anyio._backends._asyncio  # noqa: PLC0415
        import anyio._core._sockets  # noqa: PLC0415
        import anyio.streams.tls  # noqa: F401, PLC0415

        if "ssl" in blocked:
            sys.modules["ssl"] = None  # type: ignore[assignment]
        import csi_async.server  # noqa: F401, PLC0415
    finally:
        for name in blocked:
            del sys.modules[name]


def serve(settings_json: str) -> None:
    """Serve with these settings (Settings as JSON) until SIGTERM or SIGINT."""
    # Whether metrics are on decides the imports, so it is read before pydantic is.
    import_serving_stack(ssl=bool(json.loads(settings_json).get("metrics_address")))
    import anyio  # noqa: PLC0415

    from csi_async import logs  # noqa: PLC0415
    from csi_async.config import Settings  # noqa: PLC0415
    from csi_async.server import serve as serve_until_stopped  # noqa: PLC0415

    settings = Settings.model_validate_json(settings_json)
    logs.setup(settings.log_level, settings.audit_log)
    anyio.run(serve_until_stopped, settings)


if __name__ == "__main__":
    serve(sys.argv[1])
