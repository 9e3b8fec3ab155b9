"""The daemon under test, in its own process: uffdd's ``Daemon`` with a bench front door.

Run by the scenarios, never by hand::

    daemon_host.py --handover SOCK --ready-file F (--image-dir DIR | --page-server ADDR)
                   [--engine NAME=VALUE ...]

Why not ``uffdd daemon`` itself: the benchmark times every stage inside the daemon
(``--stages``: each page source wrapped by ``suite.stages.TimedSource``), writes a
ready file and lets 64 handshakes queue at once. Everything else is the production
``Daemon`` (``serve_handover``, ``find_image``, local images via
``DaemonConfig.images``, the engine table of ``uffdd.config``: ``--engine`` and
``$UFFDD_ENGINE``, as ``uffdd daemon`` takes them): only the door and the timing differ.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from suite import stages

from uffdd.config import DaemonConfig, build_engine, engine_pairs
from uffdd.daemon.doors.native.door import native_door
from uffdd.daemon.doors.native.listener import HandoverPolicy, Listener
from uffdd.daemon.lifecycle import Daemon
from uffdd.log import configure_logging


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--handover", type=Path, required=True)
    parser.add_argument("--ready-file", type=Path, required=True)
    parser.add_argument("--image-dir", type=Path, help="serve this local image in place")
    parser.add_argument("--page-server", default="", help="fetch from this page server")
    parser.add_argument(
        "--engine",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an engine knob (uffdd.config.Engine), after $UFFDD_ENGINE; repeatable",
    )
    parser.add_argument("--max-inflight", type=int, help="DaemonConfig.max_inflight_bytes")
    parser.add_argument("--fault-around", type=int, help="DaemonConfig.fault_around")
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
    # The image directory is <root>/<image id>, the id the faulter hands over.
    config = DaemonConfig(
        handover=str(args.handover),
        page_server=args.page_server,
        images=str(args.image_dir.parent) if args.image_dir else "",
        engine=build_engine(None, engine_pairs(os.environ, args.engine)),
        log_format="json",
        grace=2.0,
    )
    if args.max_inflight:
        config = replace(config, max_inflight_bytes=args.max_inflight)
    if args.fault_around:
        config = replace(config, fault_around=args.fault_around)
    daemon = Daemon(config)

    # Our own door: the ready file, and room for 64 handshakes arriving at once.
    listener = Listener.bind(args.handover)
    door = native_door(
        listener,
        HandoverPolicy(max_pending=256),
        wrap_source=stages.TimedSource if args.stages is not None else None,
    )
    args.ready_file.write_text("ready\n")
    lag = asyncio.get_running_loop().create_task(stages.loop_lag()) if args.stages else None
    try:
        await daemon.run([door])
    finally:
        if lag is not None:
            lag.cancel()
        if args.stages is not None:
            stages.dump(args.stages)


if __name__ == "__main__":
    main()
