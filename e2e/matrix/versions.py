"""How a row learns the version of its program and of its FUSE library, from host commands."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Probe:
    """A host command whose output names a version: the first group of `pattern`.

    "{examples}" in argv is the host directory of libfuse's example binaries.
    """

    argv: tuple[str, ...]
    pattern: str
    label: str = "{}"

    def __call__(self, examples: Path) -> str:
        argv = [arg.replace("{examples}", str(examples)) for arg in self.argv]
        try:
            done = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return "unknown"
        match = re.search(self.pattern, done.stdout + done.stderr, re.MULTILINE)
        return self.label.format(match.group(1)) if match else "unknown"


def dpkg_version(package: str) -> Probe:
    """The upstream part of a Debian package's version."""
    return Probe(("dpkg-query", "-W", "-f=${Version}", package), r"^(?:\d+:)?([^-~+]+)")


def debian_upstream_version(package: str) -> Probe:
    """A Debian package's whole upstream version, snapshot suffix (~git...) included."""
    return Probe(("dpkg-query", "-W", "-f=${Version}", package), r"^(?:\d+:)?(.+?)(?:-[^-]+)?$")


def built_using(package: str, source: str) -> Probe:
    """The version of a Go library a Debian package was built with (Built-Using)."""
    return Probe(
        ("dpkg-query", "-W", "-f=${Built-Using}", package),
        re.escape(source) + r" \(= ([^)]+?)(?:-\d+)?\)",
    )
