"""csi-async: a CSI node plugin that mounts FUSE for unprivileged pods."""

# Written out, not read with importlib.metadata: that module brings email, zipfile,
# csv and more (about 4 MiB) into the driver, which lives as long as the node, for one
# string. tests/test_csi_service.py holds it equal to the installed distribution's.
__version__ = "0.1.0"
