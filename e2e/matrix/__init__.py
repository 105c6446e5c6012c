"""The compatibility matrix: real FUSE programs of each FUSE library, through csi-async.

    python -m e2e matrix --zipapp build/fusermount3 [--examples build/fuse-examples]
        [--json out.json] [--markdown docs/compatibility.md] [--only NAME]...

Every FUSE program is one row, declared as data, and runs on one simulated
node (the real driver, a kubelet emulator, sandboxed unprivileged "pods", see
e2e/node.py) in each mode it supports:

* proxy: the program runs as it always does; the zipapp installed as
  /usr/bin/fusermount3 (and fusermount) relays its mount to the broker;
* starter: `fusermount3 --start -- PROGRAM ... /dev/fd/N`, for programs whose
  FUSE library accepts an already-mounted /dev/fd/N as the mountpoint.

The modules, in the order a newcomer reads them:

* catalogue.py: the rows (add a program there), their libraries and setups,
  and the programs that cannot work, with the reason;
* row.py: what a row declares, and the container paths the rows share;
* setups.py: what a row's program serves (directories, archives, a bucket);
* versions.py: how a row learns its program's and library's versions;
* services.py: the local servers programs talk to (the S3 server);
* runner.py: runs rows, check by check (mount, read, write, unmount, kill);
* result.py: what a row yields, and which results fail the matrix;
* report.py: the summary, the JSON and docs/compatibility.md, and its check;
* cli.py: the `python -m e2e matrix` command.

docs/compatibility.md is generated from a run of the whole matrix
(--markdown); tests/test_matrix.py runs it and checks that the document
still matches.
"""

# What e2e/__main__.py uses to build and run the `matrix` command.
from e2e.matrix.catalogue import row_names, select
from e2e.matrix.cli import REPO, main

__all__ = ["REPO", "main", "row_names", "select"]
