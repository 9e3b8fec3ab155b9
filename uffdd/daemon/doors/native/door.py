"""The native door: restores handed over on uffdd's own socket (``handover.proto``).

Why apart from the listener: ``listener.py`` is the socket protocol against untrusted
peers (credentials, SCM_RIGHTS, the pid rule) and knows nothing of images; this module
turns one accepted :class:`Handover` into a :class:`Restore` for the daemon: it finds
the image (the page server the handover names, the local image root, or the default
page server), checks the handed-over regions against it, starts serving and acks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from uffdd.core.errors import ImageError, PageServerError, PageServerNotFound
from uffdd.core.handover import ErrorCode, HandoverRejected
from uffdd.core.process import LazyRegion
from uffdd.daemon.crash import crash_point
from uffdd.daemon.doors.native.listener import (
    Handover,
    HandoverPolicy,
    Listener,
    accept_handovers,
)
from uffdd.daemon.lifecycle import Daemon, Door, Restore
from uffdd.daemon.sources import LocalImageSource, PageSource
from uffdd.image.format import ExtentLike, Region, stored_ranges
from uffdd.image.store import ImageNotFound
from uffdd.log import get_logger

_log = get_logger("uffdd.daemon.doors.native")

SourceWrapper = Callable[[PageSource], PageSource]
"""Wraps each restore's page source (the benchmarks time every fetch with one)."""


def native_door(
    listener: Listener | None = None,
    policy: HandoverPolicy | None = None,
    wrap_source: SourceWrapper | None = None,
) -> Door:
    """The door for ``Daemon.run``: native handovers on ``listener`` (default: the
    socket systemd passed as ``handover``, else the configured path), checked by
    ``policy`` (default: the configured peer uids)."""

    async def serve(daemon: Daemon) -> None:
        bound = listener or _listen(daemon)
        checks = policy
        if checks is None:
            uids = daemon.config.allowed_uids
            checks = HandoverPolicy() if uids is None else HandoverPolicy(allowed_uids=uids)

        async def on_handover(handover: Handover) -> None:
            await serve_handover(daemon, handover, wrap_source)

        _log.info("listening", handover=str(bound.path), page_server=daemon.config.page_server)
        try:
            await accept_handovers(bound.sock, on_handover, policy=checks)
        finally:
            bound.close()

    return serve


def _listen(daemon: Daemon) -> Listener:
    for passed in daemon.passed:
        if passed.name in ("handover", "unknown"):
            return Listener.adopt(passed.fd)
    return Listener.bind(Path(daemon.config.handover), mode=daemon.config.handover_mode)


async def serve_handover(
    daemon: Daemon, handover: Handover, wrap_source: SourceWrapper | None = None
) -> None:
    """Serve one native handover: start its restore, then ack."""
    if daemon.stopping:
        raise HandoverRejected(ErrorCode.REFUSED, "uffdd is shutting down")
    source, image_regions, extents, where = await find_image(daemon, handover)
    regions = regions_in_image(handover, handover.image_id, image_regions)
    root = daemon.start(
        Restore(
            name=f"p{handover.pid}-{handover.handover_id[:6]}",
            pid=handover.pid,
            pidfd=handover.pidfd,
            uffd=handover.uffd,
            image_id=handover.image_id,
            regions=regions,
            data=stored_ranges(extents),
            source=source if wrap_source is None else wrap_source(source),
            reporter=handover.reply,
            close=handover.close,
            dialect="native",
            origin={"page_server": where}
            if where != "local"
            else {"images": str(daemon.image_store().root)},
            conn=handover.reply.fileno(),
            handover_id=handover.handover_id,
            acked=False,
        ),
        source=where,
        handover=handover.handover_id,
    )
    crash_point("before-ack")
    if await handover.reply.send_ack():
        daemon.acknowledged(root)


async def find_image(
    daemon: Daemon, handover: Handover
) -> tuple[PageSource, Sequence[Region], Sequence[ExtentLike], str]:
    """Where the handover's image lives: the page server it names, else the local
    image root (``--images``), else the default page server. Returns the source,
    the image's regions and extents, and a label for the log."""
    config = daemon.config
    image_id = handover.image_id
    target = handover.page_server or ("" if config.images else config.page_server)
    if target:
        client = daemon.clients.get(target)
        try:
            info = await client.image_info(image_id, timeout=config.fetch_deadline)
        except PageServerNotFound as exc:
            raise HandoverRejected(ErrorCode.BAD_REQUEST, str(exc)) from exc
        except PageServerError as exc:
            raise HandoverRejected(ErrorCode.REFUSED, f"page server unavailable: {exc}") from exc
        return client, info.regions, info.extents, target
    if config.images:
        try:
            reader = daemon.image_store().open(image_id)
        except ImageNotFound as exc:
            raise HandoverRejected(ErrorCode.BAD_REQUEST, str(exc)) from exc
        except ImageError as exc:
            raise HandoverRejected(ErrorCode.REFUSED, f"image {image_id}: {exc}") from exc
        return LocalImageSource(reader), reader.regions, reader.all_extents(), "local"
    raise HandoverRejected(
        ErrorCode.BAD_REQUEST,
        "the handover names no page server and the daemon has neither a default "
        "(--page-server) nor local images (--images)",
    )


def regions_in_image(
    handover: Handover, image_id: str, image_regions: Sequence[Region]
) -> list[LazyRegion]:
    """The handover's regions as core values, each checked to lie inside one image
    region with the same page size (anything else would be served as zeros)."""
    lazy = []
    for region in handover.regions:
        start, end = region.image_address, region.image_address + region.length
        home = next(
            (r for r in image_regions if r.start <= start and end <= r.start + r.length), None
        )
        if home is None:
            raise HandoverRejected(
                ErrorCode.BAD_REGIONS,
                f"image range [{start:#x}, {end:#x}) is not inside one region of image {image_id}",
            )
        if home.page_size != region.page_size:
            raise HandoverRejected(
                ErrorCode.BAD_REGIONS,
                f"region at image {start:#x} has page size {region.page_size}, "
                f"the image has {home.page_size}",
            )
        lazy.append(
            LazyRegion(region.run_address, region.image_address, region.length, region.page_size)
        )
    return lazy
