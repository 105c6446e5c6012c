"""csi-async: a CSI node plugin that mounts FUSE for unprivileged pods."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("csi-async")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
