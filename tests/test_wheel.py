"""The wheel ships the product only: csi_async and fusermount3_proxy, typed.

Built the way the Containerfile builds it (`pip wheel --no-deps .`), from a copy of
the source tree that still has e2e/, bench/, tests/ and scripts/ in it, so leaving
them out is the package configuration's doing. The copy also keeps setuptools'
build/ directory of the working tree out: a stale build/lib would put modules that
were moved or deleted back into the wheel.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PRODUCT = {"csi_async", "fusermount3_proxy"}
LEFT_OUT = shutil.ignore_patterns(
    ".git", ".venv", ".nox", "build", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis"
)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the source tree, as a checkout has it."""
    copy = tmp_path_factory.mktemp("wheel") / "source"
    shutil.copytree(REPO, copy, ignore=LEFT_OUT)
    return copy


@pytest.fixture(scope="module")
def wheel(source: Path) -> zipfile.ZipFile:
    work = source.parent
    assert (source / "e2e").is_dir() and (source / "tests").is_dir()
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet",
         "--wheel-dir", str(work / "dist"), str(source)],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (built,) = (work / "dist").glob("csi_async-*.whl")
    return zipfile.ZipFile(built)


def test_the_wheel_holds_csi_async_and_fusermount3_proxy_only(wheel: zipfile.ZipFile) -> None:
    top = {name.split("/", 1)[0] for name in wheel.namelist()}
    dist_info = {name for name in top if name.endswith(".dist-info")}
    assert len(dist_info) == 1, top
    assert top - dist_info == PRODUCT


def test_both_packages_are_typed(wheel: zipfile.ZipFile) -> None:
    for package in PRODUCT:
        assert f"{package}/py.typed" in wheel.namelist(), package


@pytest.mark.parametrize("package", sorted(PRODUCT))
def test_every_module_of_the_source_tree_is_in_the_wheel(
    source: Path, wheel: zipfile.ZipFile, package: str
) -> None:
    """A subpackage the package discovery missed would fail only where the wheel runs."""
    modules = {path.relative_to(source).as_posix() for path in (source / package).rglob("*.py")}
    shipped = {name for name in wheel.namelist() if name.startswith(f"{package}/")}
    assert {name for name in shipped if name.endswith(".py")} == modules


def test_the_wheel_installs_the_csi_async_command(wheel: zipfile.ZipFile) -> None:
    (entry_points,) = (n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt"))
    text = wheel.read(entry_points).decode()
    assert "csi-async = csi_async.cli:main" in text
