"""The page server's bulk worker: a second process that answers bulk connections.

Real PageServers on 127.0.0.1 with a real worker process. What a client gets must not
depend on which process answers: the same bytes, the same errors; a worker that dies
takes only its connections with it (their requests fail as on any broken lane, nothing
hangs), and bulk is served by the main process from then on; stopping the server ends
the worker.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest
from page_server_support import (
    PAGE,
    Images,
    assert_rides,
    make_certs,
    make_images,
    page_client,
    run,
    serving,
)
from support.waiting import until

from uffdd.core.actions import Priority
from uffdd.core.addresses import ImageAddr
from uffdd.core.errors import PageServerNotFound, PageServerUnavailable
from uffdd.pageserver.bulk_worker import BulkWorker
from uffdd.pageserver.server import PageServer
from uffdd.wire import fast_lane as wire
from uffdd.wire.tls import ServerTls

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def images(tmp_path: Path) -> Images:
    return make_images(tmp_path / "images")


def worker_of(server: PageServer) -> BulkWorker:
    assert server.bulk_worker is not None
    return server.bulk_worker


def test_bulk_goes_to_the_worker_and_reads_back_exactly(images: Images) -> None:
    async def scenario() -> None:
        async with (
            serving(images.root, chunk_size=64 * 1024, bulk_worker=True) as server,
            page_client(server, "fast", "mixed") as client,
        ):
            for image_id, regions in images.regions.items():
                for region in regions:
                    for priority in Priority:
                        stream = client.fetch(
                            image_id, ImageAddr(region.start), len(region.content), priority
                        )
                        assert_rides(stream.request, "fast")
                        assert bytes(await stream.read_all()) == region.content
            # an error from the worker maps as any other
            with pytest.raises(PageServerNotFound, match="OUT_OF_RANGE"):
                await client.fetch("small", ImageAddr(0x9000), PAGE, Priority.BULK).read_all()
            assert worker_of(server).handed_over == 1
            assert server.fast_lane is not None
            answerer = server.fast_lane.urgent_answerer
            assert answerer is not None
            # the urgent one stayed in this process (on the loop or its urgent thread)
            assert len(server.fast_lane.connections) + answerer.connections == 1

    run(scenario)


def test_a_dead_worker_fails_its_requests_then_bulk_is_served_here(images: Images) -> None:
    region = images.regions["mixed"][1]

    async def scenario() -> None:
        async with serving(images.root, chunk_size=4096, bulk_worker=True) as server:
            worker = worker_of(server)
            async with page_client(server, "fast", "mixed") as client:
                stream = client.fetch(
                    "mixed", ImageAddr(region.start), len(region.content), Priority.BULK
                )
                assert_rides(stream.request, "fast")
                assert (await anext(stream)).address == region.start
                assert worker.process is not None
                os.kill(worker.process.pid, signal.SIGKILL)
                with pytest.raises(PageServerUnavailable, match="bulk fast lane lost"):
                    async for _ in stream:
                        pass
            # the main process notices (the worker's end of their socket pair closed) and
            # keeps bulk connections from now on
            await until(lambda: not worker._ready, "the main process saw the worker gone")
            async with page_client(server, "fast", "mixed") as client:
                data = await client.fetch(
                    "mixed", ImageAddr(region.start), len(region.content), Priority.BULK
                ).read_all()
                assert bytes(data) == region.content
            assert worker.handed_over == 1

    run(scenario)


def test_garbage_on_a_handed_over_connection_closes_only_it(images: Images) -> None:
    async def scenario() -> None:
        async with serving(images.root, bulk_worker=True) as server:
            host, port = server.fast_lane_addresses[0].rsplit(":", 1)
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(wire.encode_request(1, b"small", 0x1000, PAGE, bulk=True) + b"XXXX" * 8)
            assert await asyncio.wait_for(reader.read(), 10) == b""  # the worker hung up
            writer.close()
            worker = worker_of(server)
            assert worker.handed_over == 1
            # the worker still serves the next bulk connection
            async with page_client(server, "fast", "small") as client:
                stream = client.fetch("small", ImageAddr(0x1000), 4 * PAGE, Priority.BULK)
                assert bytes(await stream.read_all()) == images.expected("small", 0x1000, 4 * PAGE)
            assert worker.handed_over == 2

    run(scenario)


def test_stopping_the_server_ends_the_worker(images: Images) -> None:
    async def scenario() -> BulkWorker:
        async with serving(images.root, bulk_worker=True) as server:
            return worker_of(server)

    worker = run(scenario)
    assert worker.process is not None
    assert worker.process.poll() == 0


def test_no_worker_with_tls_or_a_bulk_rate_limit(images: Images, tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "certs")
    tls = ServerTls(certs.server_cert, certs.server_key)
    for server in (
        PageServer(images.root, ["127.0.0.1:0"], bulk_worker=True, tls=tls),
        PageServer(images.root, ["127.0.0.1:0"], bulk_worker=True, bulk_rate=1 << 20),
        PageServer(images.root, ["127.0.0.1:0"], bulk_worker=True, fast_lane=False),
    ):
        assert server.bulk_worker is None
        server.catalog.close()


def test_a_worker_that_cannot_start_leaves_bulk_in_the_main_process(images: Images) -> None:
    async def scenario() -> None:
        server = PageServer(images.root, ["127.0.0.1:0"], bulk_worker=True)
        worker = worker_of(server)
        worker._command[worker._command.index("--chunk-size") + 1] = "lots"  # it exits at once
        await server.start()
        try:
            assert worker.process is not None
            assert worker.process.poll() == 2  # argparse's exit
            async with page_client(server, "fast", "small") as client:
                stream = client.fetch("small", ImageAddr(0x1000), 4 * PAGE, Priority.BULK)
                assert bytes(await stream.read_all()) == images.expected("small", 0x1000, 4 * PAGE)
            assert worker.handed_over == 0
        finally:
            await server.stop(0)

    run(scenario)
