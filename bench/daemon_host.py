"""The daemon under test, in its own process: uffdd's ``Daemon`` with a bench front door.

Run by the scenarios, never by hand::

    daemon_host.py --handover SOCK --ready-file F (--image-dir DIR | --page-server ADDR)
                   [--no-sweep]

Why not ``uffdd daemon`` itself: the CLI always fetches from a page server and always
runs the background sweep. The benchmark also needs (a) page data from a local image
(``uffdd.sources.LocalImageSource``: the daemon serving pages it already holds) and
(b) demand faults with no sweep. Both are reached through public API of the same
``Daemon`` class the CLI runs (``Daemon.run(native=False, listeners=...)``,
``Daemon.start(Restore(..., handed_over=False))``): the executor, tracker, policy,
page client and handover checks are the production ones; only the door differs.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from suite import stages

from uffdd.config import DaemonConfig
from uffdd.core.process import LazyRegion
from uffdd.daemon import Daemon, Restore, regions_in_image
from uffdd.errors import PageServerError
from uffdd.image.format import Extent, stored_ranges
from uffdd.image.reader import ImageReader
from uffdd.kernel.handover import Handover, HandoverPolicy, Listener, accept_handovers
from uffdd.log import configure_logging
from uffdd.remote.convert import RemoteExtent
from uffdd.sources import LocalImageSource, PageSource


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--handover", type=Path, required=True)
    parser.add_argument("--ready-file", type=Path, required=True)
    parser.add_argument("--image-dir", type=Path, help="serve this local image in place")
    parser.add_argument("--page-server", default="", help="fetch from this page server")
    parser.add_argument("--no-sweep", action="store_true", help="demand faults only")
    parser.add_argument("--max-inflight", type=int, help="DaemonConfig.max_inflight_bytes")
    parser.add_argument("--stages", type=Path, help="time each stage; JSON here at exit")
    args = parser.parse_args()
    if bool(args.image_dir) == bool(args.page_server):
        parser.error("exactly one of --image-dir and --page-server")
    configure_logging(json=True, level="warning")
    if args.stages is not None:
        stages.install()
    asyncio.run(_serve(args))


async def _serve(args: argparse.Namespace) -> None:
    # A short grace: the scenarios stop the daemon between runs, never mid-restore.
    config = DaemonConfig(
        handover=str(args.handover), page_server=args.page_server, log_format="json", grace=2.0
    )
    if args.max_inflight:
        config = replace(config, max_inflight_bytes=args.max_inflight)
    daemon = Daemon(config)
    reader = ImageReader.open(args.image_dir) if args.image_dir else None
    local = LocalImageSource(reader) if reader is not None else None
    sweep = not args.no_sweep

    async def on_handover(handover: Handover) -> None:
        source: PageSource
        if reader is not None and local is not None:
            regions = [
                LazyRegion(r.run_address, r.image_address, r.length, r.page_size)
                for r in handover.regions
            ]
            data = _data(reader.all_extents())
            source = local
        else:
            client = daemon.clients.get(args.page_server)
            try:
                info = await client.image_info(handover.image_id, timeout=10.0)
            except PageServerError as exc:
                raise RuntimeError(f"page server: {exc}") from exc
            regions = regions_in_image(handover, info.image_id, info.regions)
            data = _data(info.extents)
            source = client
        if args.stages is not None:
            source = stages.TimedSource(source)
        daemon.start(
            Restore(
                name=f"p{handover.pid}-{handover.session_id[:6]}",
                pid=handover.pid,
                pidfd=handover.pidfd,
                uffd=handover.uffd,
                image_id=handover.image_id,
                regions=regions,
                data=data,
                source=source,
                reporter=handover.reply,
                close=handover.close,
                handed_over=sweep,
            )
        )
        await handover.reply.send_ack()

    async def door(_: Daemon) -> None:
        listener = Listener.bind(args.handover)
        lag = asyncio.get_running_loop().create_task(stages.loop_lag()) if args.stages else None
        try:
            policy = HandoverPolicy(max_pending=256)
            args.ready_file.write_text("ready\n")
            await accept_handovers(listener.sock, on_handover, policy=policy)
        finally:
            if lag is not None:
                lag.cancel()
            listener.close()

    try:
        await daemon.run(native=False, listeners=[door])
    finally:
        if reader is not None:
            reader.close()
        if args.stages is not None:
            stages.dump(args.stages)


def _data(extents: Sequence[Extent | RemoteExtent]) -> list[tuple[int, int]]:
    return stored_ranges(extents)


if __name__ == "__main__":
    main()
