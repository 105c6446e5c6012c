"""The names the zipapp is installed under, and whose command line each one speaks.

FUSE libraries find the setuid helper by name (docs/options.md#helper-names
lists who execs what, with the source of each):

    fusermount3           libfuse 3, go-fuse, jacobsa/fuse, fuser, the fuse3 crate
    fusermount            libfuse 2 (fusepy, mfusepy), bazil; the fallback of
                          go-fuse, jacobsa/fuse and fuser
    mergerfs-fusermount   mergerfs's bundled libfuse 2.9.7, before fusermount

Python sees the path the kernel ran (a script's argv[0] is replaced by its
path), so the installed file name is what picks the command line. Debian
installs fusermount as a link to fusermount3, so both speak fusermount3's
command line; mergerfs-fusermount is mergerfs's fork of libfuse 2.9.7's
fusermount and speaks that one: no --auto-unmount, no --comm-fd, its own
version line. Any other name (a test's copy, "python3 fusermount3.pyz")
speaks fusermount3's.
"""

# A leaf module: builtins only (see __init__.py), no annotations import.

FUSERMOUNT3 = "fusermount3"
MERGERFS_FUSERMOUNT = "mergerfs-fusermount"

# installed name -> the helper whose command line it speaks
HELPER_NAMES = {
    "fusermount3": FUSERMOUNT3,
    "fusermount": FUSERMOUNT3,
    "mergerfs-fusermount": MERGERFS_FUSERMOUNT,
}


def helper_for(argv0: str) -> str:
    """The helper whose command line the name in argv[0] (a path or a bare name) speaks."""
    return HELPER_NAMES.get(argv0.rpartition("/")[2], FUSERMOUNT3)
