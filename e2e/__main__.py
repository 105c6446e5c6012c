"""Smoke tools for the e2e infrastructure.

    python -m e2e sandbox-check [--zipapp PATH]    show a container from the inside
    python -m e2e sandbox-run [--zipapp PATH] [--bind CPATH=HOSTPATH]... -- ARGV...
    python -m e2e csi-info --endpoint unix:///path/csi.sock [--driver NAME]
    python -m e2e matrix --zipapp PATH [--examples DIR] [--json OUT] [--markdown OUT]
                         [--only NAME]...
    python -m e2e soak [--duration S] [--parallel N] [--zipapp PATH] [--examples DIR]

Without --zipapp a stand-in shell script is bound over fusermount3; it
reports how it was called and fails, as fusermount3 would without a broker.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from e2e import matrix
from e2e.demo import run_demo
from e2e.kubelet import KubeletEmulator
from e2e.sandbox import PodSandbox
from e2e.soak import DEFAULT_EXAMPLES, DEFAULT_ZIPAPP, run_soak

_STAND_IN = """#!/bin/sh
echo "stand-in fusermount3 called as uid $(id -u): $0 $*" >&2
echo "  _FUSE_COMMFD=${_FUSE_COMMFD:-unset}" >&2
exit 1
"""

_FUSE_PROBE = """
import ctypes, errno, os
try:
    fd = os.open("/dev/fuse", os.O_RDWR)
except OSError as e:
    print("open(/dev/fuse, O_RDWR):", e)
else:
    libc = ctypes.CDLL(None, use_errno=True)
    opts = f"fd={fd},rootmode=40000,user_id={os.getuid()},group_id={os.getgid()}"
    r = libc.mount(b"fuse", b"/tmp", b"fuse", 0, opts.encode())
    err = ctypes.get_errno()
    print("open(/dev/fuse, O_RDWR): ok; mount(2) of fuse:",
          "succeeded (!)" if r == 0 else errno.errorcode.get(err, err))
"""

_CHECK = f"""
echo "== id (PID $$ in the container)"; id
echo "== /proc/self/status"; grep -E '^(Cap|NoNewPrivs|Seccomp)' /proc/self/status
echo "== /dev"; ls -la /dev
echo "== fusermount3"; ls -l /usr/bin/fusermount3 /usr/bin/fusermount
echo "== processes"; ps -eo pid,user,args 2>/dev/null || ls /proc | grep -E '^[0-9]+$'
echo "== mounts made for the container (after unshare's /proc)"
awk '$5 == "/proc" && $9 == "proc" {{seen = NR}} {{line[NR] = $5 " " $9 " " $6}}
     END {{for (i = seen; i <= NR; i++) print line[i]}}' /proc/self/mountinfo
echo "== FUSE"
if [ -x /usr/bin/python3 ]; then /usr/bin/python3 -c '{_FUSE_PROBE}'; fi
"""


@contextmanager
def _zipapp(path: str | None) -> Iterator[Path]:
    if path is not None:
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix="e2e-stand-in-") as tmp:
        script = Path(tmp) / "fusermount3"
        script.write_text(_STAND_IN)
        script.chmod(0o755)
        yield script


def _binds(specs: Sequence[str]) -> dict[str, Path]:
    binds = {}
    for spec in specs:
        container, sep, host = spec.partition("=")
        if not sep:
            raise SystemExit(f"--bind wants CONTAINER_PATH=HOST_PATH, got {spec!r}")
        binds[container] = Path(host)
    return binds


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("sandbox-check", "sandbox-run"):
        p = sub.add_parser(name)
        p.add_argument("--zipapp", help="file to bind over fusermount3 (default: a stand-in)")
        p.add_argument("--uid", type=int, default=65534)
        p.add_argument("--gid", type=int, default=65534)
        p.add_argument("--bind", action="append", default=[], metavar="CPATH=HOSTPATH")
        if name == "sandbox-run":
            p.add_argument("argv", nargs="+")
    p = sub.add_parser("demo", help="the narrated sshfs demo (see e2e/demo.py)")
    p.add_argument("--zipapp", required=True, help="the built fusermount3 zipapp")
    p = sub.add_parser("matrix", help="the FUSE compatibility matrix (see e2e/matrix/catalogue.py)")
    p.add_argument("--zipapp", required=True, help="the built fusermount3 zipapp")
    p.add_argument("--examples", default=str(matrix.REPO / "build" / "fuse-examples"),
                   help="libfuse's example binaries (built there if missing)")  # fmt: skip
    p.add_argument("--json", type=Path, help="write every result, with timings, here")
    p.add_argument("--markdown", type=Path, help="write the generated document here")
    rows = matrix.row_names()
    p.add_argument("--only", action="append", metavar="NAME", choices=rows,
                   help=f"run only this row (repeatable): {', '.join(rows)}")  # fmt: skip
    p = sub.add_parser("soak", help="pods mount, read and unmount in a loop (see e2e/soak.py)")
    p.add_argument("--duration", type=float, default=600.0, help="seconds (default 600)")
    p.add_argument("--parallel", type=int, default=50, help="pods at once (default 50)")
    p.add_argument("--zipapp", default=str(DEFAULT_ZIPAPP), help="the built fusermount3 zipapp")
    p.add_argument("--examples", default=str(DEFAULT_EXAMPLES), help="libfuse's example binaries")
    p = sub.add_parser("csi-info", help="GetPluginInfo, Probe, NodeGetInfo, NodeGetCapabilities")
    p.add_argument("--endpoint", required=True, help="unix:///path/to/csi.sock")
    p.add_argument("--driver", default="", help="expected driver name")
    args = parser.parse_args(argv)

    if args.command == "csi-info":
        kubelet = KubeletEmulator("/", args.endpoint, args.driver, rpc_timeout=10)
        print("GetPluginInfo:", kubelet.get_plugin_info().to_dict())
        print("Probe:", kubelet.probe().to_dict())
        print("NodeGetInfo:", kubelet.node_get_info().to_dict())
        print("NodeGetCapabilities:", kubelet.node_get_capabilities().to_dict())
        return 0

    if os.geteuid() != 0:
        print("sandboxes need root (mount and PID namespaces, bind mounts)", file=sys.stderr)
        return 1
    if args.command == "demo":
        try:
            return run_demo(Path(args.zipapp))
        except Exception as err:
            print(f"\ndemo failed: {err}", file=sys.stderr)
            return 1
    if args.command == "soak":
        try:
            run_soak(Path(args.zipapp), Path(args.examples), args.duration, args.parallel)
        except AssertionError as err:  # the summary is printed already
            print(f"soak failed: {str(err).splitlines()[-1].strip(' ()')}", file=sys.stderr)
            return 1
        return 0
    if args.command == "matrix":
        return matrix.main(
            Path(args.zipapp), Path(args.examples), only=args.only, json_path=args.json,
            markdown_path=args.markdown, argv=(argv if argv is not None else sys.argv[1:])[1:],
        )  # fmt: skip
    with (
        _zipapp(args.zipapp) as zipapp,
        PodSandbox(_binds(args.bind), zipapp, uid=args.uid, gid=args.gid) as sandbox,
    ):
        program = ["/bin/sh", "-c", _CHECK] if args.command == "sandbox-check" else args.argv
        return sandbox.run(program, timeout=None).returncode


if __name__ == "__main__":
    sys.exit(main())
