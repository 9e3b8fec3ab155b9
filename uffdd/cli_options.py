"""Command-line options that several commands share, declared once.

Why: the daemon and the dialect commands take the same page-server TLS flags and the
same peer-uid allow list; one declaration keeps their names, types and help identical.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import click

F = TypeVar("F", bound=Callable[..., object])


def page_server_tls(command: F) -> F:
    """``--tls-ca``, ``--tls-cert``, ``--tls-key``: how to reach the page server."""
    command = click.option("--tls-key", help="Key of the client certificate.")(command)
    command = click.option("--tls-cert", help="Client certificate for mutual TLS.")(command)
    return click.option("--tls-ca", help="CA bundle to verify the page server (enables TLS).")(
        command
    )


def allow_uids(command: F) -> F:
    """``--allow-uid`` (repeatable), passed as ``allow_uids``."""
    return click.option(
        "--allow-uid",
        "allow_uids",
        type=int,
        multiple=True,
        help="Peer uid allowed to hand over (repeat; default root and our uid).",
    )(command)
