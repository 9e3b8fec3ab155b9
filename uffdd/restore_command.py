"""``uffdd restore``: restore an image's memory into this very process and check it.

Why: scripts and end-to-end tests need a real restored process that proves the whole
path (handover, demand faults, background transfer) byte for byte, without writing a
workload. The command maps every region of a local image directory into itself,
hands the memory over to the daemon, then reads every page (each read of a missing
page is a fault the daemon serves) and compares it with the image, optionally waits for
the daemon's Resident report, and prints one JSON object.

Exit status: 0 all bytes match (and resident, if waited for); 1 some pages differ;
3 the handover was refused or the restore failed (the reason is on stderr).
"""

from __future__ import annotations

import ctypes
import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from uffdd.core.addresses import ImageAddr
from uffdd.core.errors import UffddError
from uffdd.core.handover import DEFAULT_SOCKET_PATH, HandoverRegion, ResidentSummary
from uffdd.image.format import ExtentKind
from uffdd.image.reader import ImageReader
from uffdd.restorer import RegionSpec, Restorer

EXIT_MISMATCH = 1
EXIT_FAILED = 3
_STEP = 1 << 20
_ZEROS = bytes(_STEP)
_MAX_REPORTED = 16


def _labels(pairs: tuple[str, ...]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--label")
        labels[key] = value
    return labels


@click.command("restore")
@click.argument(
    "image_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), metavar="IMAGE"
)
@click.option(
    "--handover",
    "socket_path",
    type=click.Path(path_type=Path),
    default=DEFAULT_SOCKET_PATH,
    show_default=True,
    help="The daemon's handover socket.",
)
@click.option("--image-id", help="Image id the daemon fetches (default: the image's own id).")
@click.option("--page-server", default="", help="Page server gRPC target (default: the daemon's).")
@click.option(
    "--placement",
    type=click.Choice(["anywhere", "image"]),
    default="anywhere",
    show_default=True,
    help="Map regions where the kernel likes, or at their image addresses (fails if taken).",
)
@click.option(
    "--verify/--touch",
    default=True,
    show_default=True,
    help="Compare every byte with the image, or only read one byte per page.",
)
@click.option(
    "--wait-resident/--no-wait-resident",
    default=True,
    show_default=True,
    help="Wait for the daemon to report every page resident.",
)
@click.option(
    "--timeout", type=float, default=60.0, show_default=True, help="Seconds for each wait."
)
@click.option("--label", "label_pairs", multiple=True, metavar="KEY=VALUE", help="Repeatable.")
def restore(
    *,
    image_dir: Path,
    socket_path: Path,
    image_id: str | None,
    page_server: str,
    placement: str,
    verify: bool,
    wait_resident: bool,
    timeout: float,
    label_pairs: tuple[str, ...],
) -> None:
    """Restore IMAGE (a local image directory) into this process through the daemon."""
    labels = _labels(label_pairs)
    try:
        reader = ImageReader.open(image_dir)
    except UffddError as exc:
        raise click.ClickException(str(exc)) from exc
    with reader:
        specs = [
            RegionSpec(
                image_address=r.start,
                length=r.length,
                page_size=r.page_size,
                run_address=r.start if placement == "image" else None,
            )
            for r in reader.regions
        ]
        restorer = Restorer(socket_path, timeout=timeout, name="uffdd restore", labels=labels)
        started = time.monotonic()
        try:
            restore = restorer.restore(image_id or reader.image_id, specs, page_server=page_server)
        except (UffddError, OSError) as exc:
            click.echo(f"uffdd restore: {exc}", err=True)
            sys.exit(EXIT_FAILED)
        with restore:
            handed_over = time.monotonic()
            mismatches: list[int] = []
            for region in restore.regions:
                if verify:
                    mismatches += _verify_region(reader, region)
                else:
                    _touch_region(region)
            checked = time.monotonic()
            summary: ResidentSummary | None = None
            if wait_resident:
                try:
                    summary = restore.wait_resident(timeout)
                except (UffddError, TimeoutError) as exc:
                    click.echo(f"uffdd restore: {exc}", err=True)
                    sys.exit(EXIT_FAILED)
        report: dict[str, Any] = {
            "handover_id": restore.handover_id,
            "image_id": image_id or reader.image_id,
            "regions": [
                {"run_address": r.run_address, "image_address": r.image_address, "length": r.length}
                for r in restore.regions
            ],
            "bytes": restore.total_bytes,
            "checked": "verify" if verify else "touch",
            "mismatched_pages": len(mismatches),
            "first_mismatches": [hex(a) for a in mismatches[:_MAX_REPORTED]],
            "seconds_to_ack": round(handed_over - started, 6),
            "seconds_to_check": round(checked - handed_over, 6),
            "resident": None if summary is None else _summary_dict(summary),
        }
    click.echo(json.dumps(report))
    if mismatches:
        sys.exit(EXIT_MISMATCH)


def _summary_dict(summary: ResidentSummary) -> dict[str, float]:
    return {
        "pages": summary.pages,
        "bytes": summary.bytes,
        "faults": summary.faults,
        "fault_p50_us": summary.fault_p50_us,
        "fault_p99_us": summary.fault_p99_us,
        "seconds_to_resident": summary.seconds_to_resident,
    }


def _verify_region(reader: ImageReader, region: HandoverRegion) -> list[int]:
    """Image addresses of the pages whose bytes differ from the image."""
    bad: list[int] = []
    shift = region.run_address - region.image_address
    for extent in reader.extents(ImageAddr(region.image_address), region.length):
        for offset in range(0, extent.length, _STEP):
            size = min(_STEP, extent.length - offset)
            image_address = extent.start + offset
            actual = ctypes.string_at(image_address + shift, size)
            if extent.kind is ExtentKind.DATA:
                expected: bytes | memoryview = reader.data(extent)[offset : offset + size]
            else:
                expected = _ZEROS[:size]
            if actual != expected:
                bad += _differing_pages(actual, expected, image_address, region.page_size)
    return bad


def _differing_pages(
    actual: bytes, expected: bytes | memoryview, image_address: int, page_size: int
) -> list[int]:
    return [
        image_address + at
        for at in range(0, len(actual), page_size)
        if actual[at : at + page_size] != expected[at : at + page_size]
    ]


def _touch_region(region: HandoverRegion) -> None:
    for address in range(region.run_address, region.run_end, region.page_size):
        ctypes.string_at(address, 1)
