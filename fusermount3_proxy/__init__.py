"""A fusermount3 drop-in that relays mounts to the csi-async broker.

Stdlib only: it is shipped as a zipapp into FUSE images and exec'd by libfuse
and the Go/Rust FUSE libraries on every mount, so it must start fast. On the
way to a mount it imports builtin modules only (posix, not os: os.py and
what it loads cost about as much as the rest of the helper), which is why
the one environment lookup every mode needs lives here.
"""

import posix
import sys

__version__ = "0.1.0"


def getenv(name: str) -> str | None:
    """os.environ.get(name), without importing os when nothing else has.

    posix.environ is the environment the process started with. Once os is
    loaded (never on the zipapp's way to a mount, but in a test or another
    program using this package), os.environ is the one that can change, so
    it is the one asked.
    """
    os = sys.modules.get("os")
    if os is not None:
        value: str | None = os.environ.get(name)
        return value
    raw = posix.environ.get(name.encode())
    # Decoded as os.environ decodes it (os.fsdecode).
    return None if raw is None else raw.decode(sys.getfilesystemencoding(), "surrogateescape")
