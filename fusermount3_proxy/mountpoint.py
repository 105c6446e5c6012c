"""The mountpoint argument made absolute, as fusermount3 does it (fuse_mnt_resolve_path)."""

# posix, not os (see __init__.py): realpath below is posixpath.realpath's
# strict mode over posix's calls, since posixpath imports os.
import posix

_S_IFMT = 0o170000
_S_IFLNK = 0o120000


class MountpointError(Exception):
    """The mountpoint cannot be resolved; str() is fusermount3's message."""


def resolve_mountpoint(orig: str) -> str:
    """fuse_mnt_resolve_path: make the path absolute without following its last component.

    Only the parent goes through realpath, so a symlink as the last component
    is kept as given, exactly as fusermount3 reports and unmounts it.
    """
    if not orig:
        raise MountpointError(f"invalid mountpoint '{orig}'")
    end = len(orig)
    while end > 1 and orig[end - 1] == "/":
        end -= 1
    copy = orig[:end]
    to_resolve = copy
    last: str | None = None
    if not copy.endswith("/"):
        slash = copy.rfind("/")
        if slash < 0:
            last = copy
            to_resolve = "."
        else:
            last = copy[slash + 1 :]
            to_resolve = copy[:slash] or "/"
        if last in (".", ".."):
            last = None
            to_resolve = copy
    try:
        resolved = realpath(to_resolve)
    except OSError as err:
        raise MountpointError(f"bad mount point {orig}: {err.strerror or err}") from None
    if last is None:
        return resolved
    return resolved + last if resolved.endswith("/") else f"{resolved}/{last}"


def realpath(filename: str) -> str:
    """os.path.realpath(filename, strict=True), from posix calls alone.

    The algorithm of Python 3.13's posixpath.realpath, whose strict mode
    gives the results of 3.10's and 3.11's: every component must exist
    (OSError otherwise, ELOOP for a symlink loop), symlinks are followed,
    and ".." is taken lexically on the resolved path.
    """
    # The parts still to resolve, last first. None marks a symlink whose
    # target has been resolved once it is popped; its path is popped next.
    rest: list[str | None] = list(reversed(filename.split("/")))
    # Absolute throughout; getcwd() is normalised and symlink-free.
    path = "/" if filename.startswith("/") else posix.getcwd()
    # Symlink path -> its resolved target, or None while it is being resolved.
    seen: dict[str, str | None] = {}
    while rest:
        name = rest.pop()
        if name is None:
            link = rest.pop()
            if link is not None:
                seen[link] = path
            continue
        if not name or name == ".":
            continue
        if name == "..":
            path = path[: path.rindex("/")] or "/"
            continue
        newpath = path + name if path == "/" else f"{path}/{name}"
        if posix.lstat(newpath).st_mode & _S_IFMT != _S_IFLNK:
            path = newpath
            continue
        if newpath in seen:
            cached = seen[newpath]
            if cached is None:
                # Being resolved already: a symlink loop. stat() raises ELOOP.
                posix.stat(newpath)
                path = newpath
            else:
                path = cached
            continue
        target = posix.readlink(newpath)
        seen[newpath] = None
        if target.startswith("/"):
            path = "/"
        rest.append(newpath)
        rest.append(None)
        rest.extend(reversed(target.split("/")))
    return path
