"""Command line: `csi-async serve`, whose options are made from csi_async.config.Settings.

Each Settings field becomes one option: its name is the flag (`--state-dir`), its
description the help, its default the default, its type and bounds the click type, and
config.env_vars its environment variables. click resolves flag > environment > default;
the model then validates the whole, and a value it refuses is reported like any bad
option: click's usage error, exit status 2.

Once the settings are read, `serve` execs the process that serves (serve_forever), which
never imports this module: nothing of the serving stack is imported here.
"""

from __future__ import annotations

import os
import subprocess
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import annotated_types
import click
from pydantic import ValidationError
from pydantic.fields import FieldInfo

from csi_async import __version__
from csi_async.config import Settings, env_vars

F = TypeVar("F", bound=Callable[..., Any])


def flag(name: str) -> str:
    """The command-line flag of Settings field `name`."""
    return "--" + name.replace("_", "-")


def _click_type(name: str, field: FieldInfo) -> click.ParamType[Any] | None:
    """The click type that checks what the field's annotation and bounds allow.

    None for a bool, which becomes an on/off flag pair instead. Raises TypeError for an
    annotation this mapping does not know, at import, so a new field cannot silently
    become a plain string option.
    """
    annotation = field.annotation
    if get_origin(annotation) in (Union, types.UnionType):
        # Optional[X]: an absent flag already means None.
        (annotation,) = (arg for arg in get_args(annotation) if arg is not type(None))
    if annotation is bool:
        return None
    if annotation is str:
        return click.STRING
    if annotation is Path:
        return click.Path(path_type=Path)
    if get_origin(annotation) is Literal:
        return click.Choice([str(choice) for choice in get_args(annotation)])
    if annotation is int:
        return click.IntRange(*_int_bounds(field))
    raise TypeError(f"Settings.{name}: no command-line type for {field.annotation!r}")


def _int_bounds(field: FieldInfo) -> tuple[int | None, int | None]:
    """(ge, le) of an int field, as Field(ge=..., le=...) declares them."""
    low = high = None
    for bound in field.metadata:
        if isinstance(bound, annotated_types.Ge) and isinstance(bound.ge, int):
            low = bound.ge
        elif isinstance(bound, annotated_types.Le) and isinstance(bound.le, int):
            high = bound.le
    return low, high


def _option(name: str, field: FieldInfo) -> Callable[[F], F]:
    """The click.option decorator of Settings field `name`."""
    click_type = _click_type(name, field)
    declaration = flag(name)
    if click_type is None:
        declaration += f"/--no-{declaration.removeprefix('--')}"
    return click.option(
        declaration,
        name,
        type=click_type,
        # A required field has no default: the model reports it missing (_settings).
        default=None if field.is_required() else field.default,
        show_default=True,
        envvar=list(env_vars(name)),
        show_envvar=True,
        help=field.description,
    )


def settings_options(command: F) -> F:
    """Add one option per Settings field to a click command, in the model's order."""
    # Decorators stack bottom-up, so the last field's option goes on first.
    for name, field in reversed(Settings.model_fields.items()):
        command = _option(name, field)(command)
    return command


def _settings(ctx: click.Context, values: dict[str, Any]) -> Settings:
    """Settings from the parsed options, or click's usage error naming the option."""
    given = {name: value for name, value in values.items() if value is not None}
    try:
        return Settings(**given)
    except ValidationError as err:
        problem = err.errors()[0]
        name = str(problem["loc"][0]) if problem["loc"] else ""
        param = next((p for p in ctx.command.params if p.name == name), None)
        if problem["type"] == "missing":
            raise click.MissingParameter(
                f"A {name.replace('_', ' ')} is required.", ctx=ctx, param=param
            ) from None
        message = str(problem["msg"]).removeprefix("Value error, ")
        raise click.BadParameter(message, ctx=ctx, param=param) from None


# What `serve` execs once the settings are read (see serve_forever).
SERVING_MODULE = "csi_async.serving"


def serve_forever(settings: Settings) -> None:
    """Become the serving process, `python -m csi_async.serving <settings as JSON>`.

    exec keeps the pid, the open fds (stderr, where logs go) and the environment, and
    leaves this module behind: click and the options made from Settings are needed
    only until the settings are read, and the driver lives as long as the node (see
    csi_async/serving.py). The interpreter's own flags (-X, -I, ...) go along.
    """
    flags: list[str] = subprocess._args_from_interpreter_flags()  # type: ignore[attr-defined]
    argv = [sys.executable, *flags, "-m", SERVING_MODULE, settings.model_dump_json()]
    sys.stdout.flush()
    sys.stderr.flush()
    # Our own interpreter and module, with the settings as one argument: no shell.
    os.execv(sys.executable, argv)  # noqa: S606


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="csi-async")
def main() -> None:
    """csi-async: run any FUSE filesystem in unprivileged Kubernetes pods.

    A CSI node plugin with an fd broker: pods mount FUSE through a
    fusermount3 drop-in, without CAP_SYS_ADMIN; its device plugin gives
    them a /dev/fuse to open, so FUSE programs run unchanged.
    """


@main.command()
@settings_options
@click.pass_context
def serve(ctx: click.Context, /, **values: Any) -> None:
    """Serve the CSI Identity and Node services and the fd broker.

    Every flag can also come from the environment variable shown; a flag
    wins over the environment. Logs are JSON lines on stderr.
    """
    serve_forever(_settings(ctx, values))
