"""A fusermount3 drop-in that relays mounts to the csi-async broker.

Stdlib only: it is shipped as a zipapp into FUSE images and exec'd by libfuse
and the Go/Rust FUSE libraries on every mount, so it must start fast.
"""

__version__ = "0.1.0"
