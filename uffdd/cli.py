"""The `uffdd` command line: one click group, commands loaded on first use.

Why lazy: the daemon, page server and dump pull in grpc, protobuf and cffi; `uffdd
check` or `--help` should not pay for all of them, and one command's missing optional
piece must not break the others. Each command lives beside the room it drives; this
file only names them.
"""

from __future__ import annotations

import importlib

import click

from uffdd import __version__

# command name -> "module:attribute" of a click.Command
COMMANDS: dict[str, str] = {
    "check": "uffdd.check:check_command",
    "daemon": "uffdd.daemon.command:daemon",
    "demo": "uffdd.demo.command:demo",
    "dump": "uffdd.image.command:dump",
    "firecracker": "uffdd.daemon.doors.firecracker.command:firecracker",
    "image": "uffdd.image.command:image",
    "lazy-pages": "uffdd.daemon.doors.criu_command:lazy_pages",
    "page-server": "uffdd.pageserver.command:page_server",
    "restore": "uffdd.restore_command:restore",
}


class LazyGroup(click.Group):
    """A click group that imports a command's module only when that command runs."""

    def __init__(self, *args: object, lazy: dict[str, str], **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self._lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = self._lazy.get(cmd_name)
        if target is None:
            return super().get_command(ctx, cmd_name)
        module_name, attribute = target.split(":")
        command = getattr(importlib.import_module(module_name), attribute)
        if not isinstance(command, click.Command):
            raise TypeError(f"{target} is not a click command")
        return command


@click.group(cls=LazyGroup, lazy=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="uffdd")
def main() -> None:
    """uffdd: lazy restore of process memory over userfaultfd."""


if __name__ == "__main__":
    main()
