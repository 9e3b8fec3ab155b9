"""structlog set-up: JSON lines for services, a readable console for people.

Why one place: every command (daemon, page server, dump) logs the same way, so a
journal or a log shipper sees one schema (``event``, ``level``, ``timestamp`` and the
bound key/values), and a person at a terminal sees the same events in colour-free
console form. Logs go to stderr; stdout stays free for a command's own output.
"""

from __future__ import annotations

import logging
import sys
from typing import cast

import structlog
from structlog.typing import FilteringBoundLogger, Processor

from uffdd.config import LOG_LEVELS

LEVELS = LOG_LEVELS


def configure_logging(json: bool, level: str = "info") -> None:
    """Route structlog (and stdlib logging, e.g. grpc's) to stderr at ``level``."""
    level_number = logging.getLevelName(level.upper())
    if not isinstance(level_number, int):
        raise ValueError(f"unknown log level {level!r}; expected one of {', '.join(LEVELS)}")
    processors: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    if json:
        # the console renderer formats exceptions itself (and warns if this ran first)
        processors += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=False))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level_number),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=level_number, stream=sys.stderr, format="%(name)s %(message)s")


def get_logger(name: str, **bound: object) -> FilteringBoundLogger:
    """A structlog logger carrying ``component=name`` and any other bound values.

    Lazy: safe at module level, it follows whatever ``configure_logging`` set last.
    """
    return cast(FilteringBoundLogger, structlog.get_logger(component=name, **bound))
