#!/usr/bin/env python3
"""Build the fusermount3 zipapp from the fusermount3_proxy package.

    python3 scripts/build_zipapp.py [OUTPUT] [--interpreter "/usr/bin/python3 -IS"]

The archive holds the package's .py files and a __main__.py that calls
fusermount3_proxy.__main__:main, and next to each .py its bytecode as an
unchecked-hash .pyc for the Python that builds it: zipimport never writes
bytecode, so without it every run compiles every module again (about 8 ms
of the helper's start-up). A Python of another version ignores the .pyc
(its magic number differs) and compiles the .py. It is built reproducibly: sorted entries,
fixed timestamps (SOURCE_DATE_EPOCH if set) and permissions, no compression
(so that running it does not need zlib). The stdlib zipapp module then adds
the shebang line, which starts the entry point without runpy (see
shebang_line).
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import marshal
import os
import sys
import time
import zipapp
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "fusermount3_proxy"
ENTRY_POINT = (f"{PACKAGE}.__main__", "main")
DEFAULT_OUTPUT = REPO / "build" / "fusermount3"
# One shebang argument: Linux passes everything after the interpreter path as
# a single argument, and python accepts the combined "-IS". -I ignores PYTHON*
# variables and the user's site; -S skips site.py, which also saves startup time.
DEFAULT_INTERPRETER = "/usr/bin/python3 -IS"
# The earliest time a zip header can store.
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
ZIP_EPOCH_SECONDS = 315532800

MAIN_PY = f"""\
# -*- coding: utf-8 -*-
import {ENTRY_POINT[0]}
{ENTRY_POINT[0]}.{ENTRY_POINT[1]}()
"""

# What the shebang line runs through -c, instead of letting Python find the
# archive's __main__.py: for a zip file on its command line Python runs
# __main__ through runpy, whose imports (importlib.util, contextlib,
# collections, functools, ...) cost several times the helper's whole own
# work (4-5 ms on a 2-vCPU VM, against a goal of 1.5 ms over a bare
# interpreter). The command does what Python does for the archive: argv
# loses the "-c" and starts with the archive's path as the kernel passed it,
# and that path, made absolute as Python makes a script's path (the
# auto-unmount watcher changes directory later), goes first on sys.path.
# posix and sys are builtin and already loaded.
BOOTSTRAP = (
    "import sys,posix;a=sys.argv;del a[0];p=a[0];"
    "sys.path.insert(0,p if p[:1]=='/' else posix.getcwd()+'/'+p);"
    f"from {ENTRY_POINT[0]} import {ENTRY_POINT[1]};{ENTRY_POINT[1]}()"
)
# Linux reads this many bytes of a script for its "#!" line (BINPRM_BUF_SIZE).
SHEBANG_LIMIT = 256
# Python options that take an argument: an interpreter given with one of
# these cannot take -c after its flags.
_OPTIONS_WITH_ARGUMENTS = frozenset("cmWXQ")


def _date_time() -> tuple[int, int, int, int, int, int]:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if not epoch:
        return ZIP_EPOCH
    stamp = time.gmtime(max(int(epoch), ZIP_EPOCH_SECONDS))
    return (stamp.tm_year, stamp.tm_mon, stamp.tm_mday, stamp.tm_hour, stamp.tm_min, stamp.tm_sec)


def _sources(package_dir: Path) -> list[Path]:
    files = [
        path
        for path in package_dir.rglob("*.py")
        if not {"__pycache__", "tests"} & set(path.parts) and not path.name.startswith("test_")
    ]
    return sorted(files, key=lambda path: path.relative_to(package_dir).as_posix())


def _bytecode(source: bytes, arcname: str) -> bytes:
    """An unchecked-hash .pyc (PEP 552): loaded without comparing to the source."""
    code = compile(source, arcname, "exec", dont_inherit=True, optimize=0)
    flags = 0b01  # hash-based, check_source unset
    return (
        importlib.util.MAGIC_NUMBER
        + flags.to_bytes(4, "little")
        + importlib.util.source_hash(source)
        + marshal.dumps(code)
    )


def build_zip(package_dir: Path) -> bytes:
    """The archive without its shebang line, byte-for-byte reproducible."""
    date_time = _date_time()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as archive:
        entries = [("__main__.py", MAIN_PY.encode("utf-8"))]
        for path in _sources(package_dir):
            arcname = f"{PACKAGE}/{path.relative_to(package_dir).as_posix()}"
            source = path.read_bytes()
            entries.append((arcname, source))
            entries.append((arcname + "c", _bytecode(source, arcname)))
        for arcname, data in entries:
            info = zipfile.ZipInfo(arcname, date_time=date_time)
            info.external_attr = 0o100644 << 16
            info.create_system = 3  # Unix, so that the mode above is honoured
            archive.writestr(info, data)
    return buf.getvalue()


def shebang_line(interpreter: str) -> str:
    """What follows "#!": the interpreter, its flags and, where it fits, -c BOOTSTRAP.

    Linux passes everything after the interpreter's path as one argument,
    and Python takes the rest of an argument after "c" as the command, so
    "/usr/bin/python3 -IS" becomes "/usr/bin/python3 -ISc<BOOTSTRAP>". An
    interpreter that is not a path with at most one cluster of flags (say
    "/usr/bin/env python3"), or a line too long for the kernel, keeps the
    plain shebang: the archive then runs through its __main__.py.
    """
    path, _, flags = interpreter.partition(" ")
    flags = flags or "-"
    letters = flags[1:]
    if not (
        flags.startswith("-")
        and (letters == "" or letters.isalpha())
        and letters.isascii()
        and not _OPTIONS_WITH_ARGUMENTS & set(letters)
    ):
        return interpreter
    line = f"{path} {flags}c{BOOTSTRAP}"
    if len(f"#!{line}\n".encode()) > SHEBANG_LIMIT:
        return interpreter
    return line


def build(output: Path, interpreter: str, package_dir: Path = REPO / PACKAGE) -> Path:
    output.parent.mkdir(parents=True, exist_ok=True)
    archive = io.BytesIO(build_zip(package_dir))
    tmp = output.with_name(f".{output.name}.tmp")
    zipapp.create_archive(archive, tmp, interpreter=shebang_line(interpreter))
    tmp.chmod(0o755)
    # Atomic, so an image build or a test never execs a half-written file.
    tmp.replace(output)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = DEFAULT_OUTPUT.relative_to(REPO)
    parser.add_argument(
        "output", nargs="?", type=Path, help=f"where to write the zipapp (default: {default})"
    )
    parser.add_argument(
        "-o", "--output", dest="output_option", metavar="OUTPUT", type=Path, help="same as OUTPUT"
    )
    parser.add_argument(
        "--interpreter",
        default=DEFAULT_INTERPRETER,
        help=(
            f"the interpreter and its flags for the shebang line (default: "
            f"{DEFAULT_INTERPRETER!r}); the entry point is added to them as -c"
        ),
    )
    args = parser.parse_args(argv)
    if args.output and args.output_option:
        parser.error("give the output path once")
    output = build(args.output or args.output_option or DEFAULT_OUTPUT, args.interpreter)
    sys.stdout.write(f"{output}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
