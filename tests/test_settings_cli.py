"""`csi-async serve`'s flags, environment variables and docs cannot disagree with Settings.

The options are made from csi_async.config.Settings (csi_async/cli.py). These tests read
`--help` from the installed entry point, parse each setting through its flag and through
its environment variables, and hold docs/operations.md's table to the same model.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import csi_async
from csi_async import cli
from csi_async.config import Settings, env_vars
from e2e.driver import DriverProcess

REPO = Path(__file__).resolve().parent.parent
ENTRY_POINT = Path(sys.executable).parent / "csi-async"
OPERATIONS = REPO / "docs" / "operations.md"

# A valid value other than the default for every field: (flag arguments, the same value
# as an environment variable, the parsed value). A new field needs a row here.
SAMPLES: dict[str, tuple[list[str], str, Any]] = {
    "endpoint": (["--endpoint", "unix:///run/x.sock"], "unix:///run/x.sock", "unix:///run/x.sock"),
    "node_id": (["--node-id", "node-7"], "node-7", "node-7"),
    "driver_name": (["--driver-name", "example.fuse.dev"], "example.fuse.dev", "example.fuse.dev"),
    "kubelet_root": (["--kubelet-root", "/srv/kubelet/"], "/srv/kubelet/", Path("/srv/kubelet")),
    "state_dir": (["--state-dir", "/srv/state"], "/srv/state", Path("/srv/state")),
    "log_level": (["--log-level", "debug"], "debug", "debug"),
    "allow_other": (["--no-allow-other"], "off", False),
    "peer_check": (["--peer-check", "off"], "off", "off"),
    "audit_log": (["--audit-log", "/srv/audit.log"], "/srv/audit.log", Path("/srv/audit.log")),
    "metrics_address": (["--metrics-address", ":9809"], ":9809", ":9809"),
    "max_connections": (["--max-connections", "7"], "7", 7),
    "max_connections_per_pod": (["--max-connections-per-pod", "3"], "3", 3),
    "device_plugin": (["--no-device-plugin"], "off", False),
    "device_plugin_dir": (["--device-plugin-dir", "/srv/dp/"], "/srv/dp/", Path("/srv/dp")),
    "device_plugin_resource": (["--device-plugin-resource", "example.com/fuse"],
                               "example.com/fuse", "example.com/fuse"),
    "device_plugin_devices": (["--device-plugin-devices", "12"], "12", 12),
}  # fmt: skip


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any settings variable, plus extra."""
    ours = {variable for name in Settings.model_fields for variable in env_vars(name)}
    return {k: v for k, v in os.environ.items() if k not in ours} | extra


def squash(text: str) -> str:
    """Text without whitespace: click wraps help lines anywhere, even after a hyphen."""
    return re.sub(r"\s+", "", text)


def shown_default(name: str) -> str | None:
    """What `--help` must show as the field's default, the way click renders it."""
    field = Settings.model_fields[name]
    if field.is_required() or field.default is None:
        return None
    if isinstance(field.default, bool):
        positive = cli.flag(name).removeprefix("--")
        return positive if field.default else f"no-{positive}"
    if field.default == "":
        return '""'
    return str(field.default)


def help_entries(text: str) -> dict[str, str]:
    """The option entries of click's help: first flag -> the entry's whole text."""
    entries: dict[str, str] = {}
    current = ""
    for line in text.split("Options:", 1)[1].splitlines():
        if re.match(r"^  -", line):
            current = line.split()[0].rstrip(",")
            entries[current] = ""
        if current:
            entries[current] += line + "\n"
    return entries


@pytest.fixture(scope="module")
def serve_help() -> dict[str, str]:
    assert ENTRY_POINT.is_file(), f"{ENTRY_POINT} missing: pip install -e ."
    result = subprocess.run(
        [str(ENTRY_POINT), "serve", "--help"], capture_output=True, text=True, timeout=30,
        env=clean_env(), check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return help_entries(result.stdout)


@pytest.fixture
def parse(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Run `csi-async serve ARGS` in-process with ENV alone; the Settings it would serve."""
    for name in Settings.model_fields:
        for variable in env_vars(name):
            monkeypatch.delenv(variable, raising=False)
    served: list[Settings] = []

    def serve_forever(settings: Settings) -> None:
        served.append(settings)

    monkeypatch.setattr(cli, "serve_forever", serve_forever)

    def run(args: list[str], env: dict[str, str] | None = None) -> Settings:
        served.clear()
        result = CliRunner().invoke(cli.main, ["serve", *args], env=env)
        assert result.exit_code == 0, result.output
        (settings,) = served
        return settings

    return run


def test_the_entry_point_lists_serve() -> None:
    result = subprocess.run(
        [str(ENTRY_POINT), "--help"], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "serve" in result.stdout


@pytest.mark.parametrize("name", list(Settings.model_fields))
def test_help_shows_each_settings_field_as_the_model_declares_it(
    serve_help: dict[str, str], name: str
) -> None:
    field = Settings.model_fields[name]
    entry = serve_help.get(cli.flag(name))
    assert entry is not None, f"no {cli.flag(name)} in --help: {sorted(serve_help)}"
    assert field.description, f"Settings.{name} needs a description: it is the flag's help"
    assert squash(field.description) in squash(entry)
    assert squash(f"env var: {', '.join(env_vars(name))}") in squash(entry)
    # click's own part of the help: "[env var: ...; default: ...; 1<=x<=64]".
    extras = squash(entry).rsplit("[", 1)[1].replace("]", ";")
    default = shown_default(name)
    if default is None:
        assert "default:" not in extras
    else:
        assert squash(f"default: {default};") in extras
    if field.annotation is bool:
        assert f"--no-{name.replace('_', '-')}" in entry


def test_help_has_no_option_the_model_lacks(serve_help: dict[str, str]) -> None:
    flags = {cli.flag(name) for name in Settings.model_fields}
    assert set(serve_help) - {"-h"} == flags


def test_the_variables_are_named_from_the_prefix() -> None:
    for name in Settings.model_fields:
        assert env_vars(name)[0] == "CSI_ASYNC_" + name.upper()
    # The node plugin's pod gets its node name from the Downward API (manifests/).
    assert env_vars("node_id") == ("CSI_ASYNC_NODE_ID", "NODE_NAME")


def test_every_field_has_a_sample() -> None:
    assert set(SAMPLES) == set(Settings.model_fields)


@pytest.mark.parametrize("name", list(Settings.model_fields))
def test_each_variable_sets_its_field_like_its_flag(parse: Any, name: str) -> None:
    args, value, expected = SAMPLES[name]
    node = [] if name == "node_id" else ["--node-id", "n"]
    default = parse(["--node-id", "n"])
    by_flag = parse([*node, *args])
    assert getattr(by_flag, name) == expected
    if name != "node_id":
        assert getattr(default, name) != expected, "the sample must not be the default"
    for variable in env_vars(name):
        by_env = parse(node, env={variable: value})
        assert by_env == by_flag, variable


@pytest.mark.parametrize("name", list(Settings.model_fields))
def test_a_flag_wins_over_the_environment(parse: Any, name: str) -> None:
    args, _, expected = SAMPLES[name]
    # A valid value other than the flag's, so that reading it would show.
    other = {
        "node_id": "from-env", "allow_other": "on", "audit_log": "/srv/other.log",
        "metrics_address": ":1", "device_plugin_dir": "/srv/other-dp",
    }.get(name, str(Settings.model_fields[name].default))  # fmt: skip
    env = {variable: other for variable in env_vars(name)}
    node = [] if name == "node_id" else ["--node-id", "n"]
    assert getattr(parse([*node, *args], env=env), name) == expected


def test_the_prefixed_node_id_wins_over_node_name(parse: Any) -> None:
    settings = parse([], env={"CSI_ASYNC_NODE_ID": "a", "NODE_NAME": "b"})
    assert settings.node_id == "a"
    # An empty variable counts as unset.
    assert parse([], env={"CSI_ASYNC_NODE_ID": "", "NODE_NAME": "b"}).node_id == "b"


def test_the_defaults_are_the_models(parse: Any) -> None:
    assert parse(["--node-id", "n"]) == Settings(node_id="n")


@pytest.mark.parametrize(
    ("env", "shown"),
    [
        ({"CSI_ASYNC_LOG_LEVEL": "loud"}, "CSI_ASYNC_LOG_LEVEL"),
        ({"CSI_ASYNC_ENDPOINT": "tcp://0.0.0.0:1"}, "CSI_ASYNC_ENDPOINT"),
        ({"CSI_ASYNC_MAX_CONNECTIONS": "0"}, "CSI_ASYNC_MAX_CONNECTIONS"),
        ({"CSI_ASYNC_ALLOW_OTHER": "maybe"}, "CSI_ASYNC_ALLOW_OTHER"),
        ({"CSI_ASYNC_METRICS_ADDRESS": "nowhere"}, "CSI_ASYNC_METRICS_ADDRESS"),
        ({"CSI_ASYNC_DEVICE_PLUGIN_DEVICES": "0"}, "CSI_ASYNC_DEVICE_PLUGIN_DEVICES"),
        ({"CSI_ASYNC_DEVICE_PLUGIN_DEVICES": "10001"}, "CSI_ASYNC_DEVICE_PLUGIN_DEVICES"),
        ({"CSI_ASYNC_DEVICE_PLUGIN_RESOURCE": "fuse"}, "CSI_ASYNC_DEVICE_PLUGIN_RESOURCE"),
        (
            {"CSI_ASYNC_DEVICE_PLUGIN_RESOURCE": "kubernetes.io/fuse"},
            "CSI_ASYNC_DEVICE_PLUGIN_RESOURCE",
        ),
        ({"CSI_ASYNC_DEVICE_PLUGIN_DIR": "relative/dir"}, "CSI_ASYNC_DEVICE_PLUGIN_DIR"),
    ],
)
def test_a_bad_variable_is_a_usage_error_naming_it(
    tmp_path: Path, env: dict[str, str], shown: str
) -> None:
    result = subprocess.run(
        [str(ENTRY_POINT), "serve", "--node-id", "n"],
        capture_output=True, text=True, timeout=30, cwd=tmp_path, env=clean_env(**env),
    )  # fmt: skip
    assert result.returncode == 2
    assert "Usage: csi-async serve" in result.stderr
    assert f"'{shown}'" in result.stderr


def test_a_missing_node_id_names_its_flag_and_variables(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(ENTRY_POINT), "serve"],
        capture_output=True, text=True, timeout=30, cwd=tmp_path, env=clean_env(),
    )  # fmt: skip
    assert result.returncode == 2
    assert "Missing option '--node-id'" in result.stderr
    assert "'CSI_ASYNC_NODE_ID', 'NODE_NAME'" in result.stderr


# --------------------------------------------------------------------------- docs


def settings_table() -> dict[str, list[str]]:
    """docs/operations.md's settings table: each flag cell -> the row's cells."""
    text = OPERATIONS.read_text(encoding="utf-8")
    section = text.split("## Settings", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, list[str]] = {}
    for line in section.splitlines():
        if line.startswith("| `--"):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            rows[cells[0].strip("`")] = cells
    return rows


def test_the_docs_table_lists_every_flag_with_its_variables_and_default(
    serve_help: dict[str, str],
) -> None:
    rows = settings_table()
    for name, field in Settings.model_fields.items():
        declared = cli.flag(name)
        if field.annotation is bool:
            declared += f"/--no-{declared.removeprefix('--')}"
        assert declared in rows, f"docs/operations.md has no row for {declared}"
        _, variables, default, _meaning = rows[declared]
        for variable in env_vars(name):
            assert f"`{variable}`" in variables, f"{declared}: {variable} not in the docs"
        if isinstance(field.default, bool):
            assert default == ("on" if field.default else "off"), declared
        elif field.default not in (None, "") and not field.is_required():
            assert default.strip("`") == str(field.default), declared
    assert {row.split("/")[0] for row in rows} == set(serve_help) - {"-h"}


# ------------------------------------------------------------- the serving process


def test_the_package_version_is_the_installed_distributions() -> None:
    # Written out in csi_async/__init__.py (importlib.metadata is not kept resident).
    assert csi_async.__version__ == version("csi-async")


@pytest.mark.parametrize("name", list(SAMPLES))
def test_each_setting_reaches_the_serving_process_unchanged(parse: Any, name: str) -> None:
    """`serve` execs the serving process with the settings as JSON: nothing may change."""
    args, _, _ = SAMPLES[name]
    settings = parse(["--node-id", "n", *args] if name != "node_id" else args)
    assert Settings.model_validate_json(settings.model_dump_json()) == settings


IMPORTED = """
import sys
from csi_async.serving import import_serving_stack
import_serving_stack(ssl=sys.argv[1] == "ssl")
names = ["ssl", "_ssl", "_hashlib", "click", "csi_async.cli", "prometheus_client"]
print(*[name for name in names if name in sys.modules])
import ssl, _hashlib  # still importable: only kept out while serving imported
print(ssl.OPENSSL_VERSION.split()[0], _hashlib.__name__)
"""


@pytest.mark.parametrize("ssl", ["no-ssl", "ssl"])
def test_the_serving_process_imports_only_what_serving_needs(ssl: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", IMPORTED, ssl], capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    imported, after = result.stdout.splitlines()
    # With metrics on (prometheus_client needs ssl), ssl is imported as usual.
    assert imported.split() == (["ssl", "_ssl"] if ssl == "ssl" else [])
    assert after == "OpenSSL _hashlib"


def test_serve_execs_into_a_serving_process_without_click_or_openssl(tmp_path: Path) -> None:
    kubelet_root = tmp_path / "kubelet"
    kubelet_root.mkdir()
    with DriverProcess(tmp_path, kubelet_root, extra_args=["--peer-check", "off"]) as driver:
        assert driver.process is not None
        pid = driver.process.pid
        # The same pid, now `python -m csi_async.serving <settings>` (the command
        # line ends in a NUL, hence the empty last item).
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert cmdline[-4:-2] == [b"-m", cli.SERVING_MODULE.encode()], cmdline
        served = Settings.model_validate_json(cmdline[-2])
        assert served.kubelet_root == kubelet_root
        assert served.node_id == driver.node_id
        mapped = Path(f"/proc/{pid}/maps").read_text()
        for library in ("libssl", "libcrypto", "_ssl.", "_hashlib."):
            assert library not in mapped, f"the driver loaded {library}"
    assert driver.process.returncode == 0


def test_the_device_plugin_dir_follows_the_kubelet_root_unless_given(parse: Any) -> None:
    moved = parse(["--node-id", "n", "--kubelet-root", "/var/lib/k0s/kubelet"])
    assert moved.device_plugin_directory == Path("/var/lib/k0s/kubelet/device-plugins")
    given = parse(["--node-id", "n", "--device-plugin-dir", "/srv/dp"])
    assert given.device_plugin_directory == Path("/srv/dp")
