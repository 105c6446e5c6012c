"""Setup shared by tests and the matrix for particular FUSE programs."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from e2e.sandbox import NOBODY


def init_gocryptfs(cipher: Path, passfile: Path) -> None:
    """A fresh gocryptfs cipher directory that uid 65534 can mount and others write to."""
    cipher.mkdir()
    subprocess.run(
        ["gocryptfs", "-init", "-q", "-passfile", str(passfile), "-scryptn", "10",
         str(cipher)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    for path in [cipher, *cipher.iterdir()]:
        os.chown(path, NOBODY, NOBODY)
    cipher.chmod(0o777)  # the plaintext root shows this mode, so other uids may write
