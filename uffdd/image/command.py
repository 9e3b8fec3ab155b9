"""The image commands: ``uffdd dump`` and ``uffdd image from-raw|inspect|verify``.

Why beside the image code: the commands are thin (parse options, call dump/writer/
reader, print); keeping them here lets ``uffdd.cli`` load them lazily by name
(``uffdd.image.command:dump`` and ``:image``). Images go to ``<ROOT>/<IMAGE_ID>``:
``-o`` names the images root a page server serves, and the new image's directory is
printed on stdout.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from uffdd.core.addresses import ImageAddr
from uffdd.core.errors import ImageError
from uffdd.image.dump import Progress, default_image_id, dump_process
from uffdd.image.format import ExtentKind, ImageSource
from uffdd.image.reader import ImageReader
from uffdd.image.writer import ImageWriter

_SUFFIXES = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """An integer in decimal or 0x-hex, optionally with a K/M/G/T (binary) suffix."""
    text = text.strip().lower().removesuffix("ib").removesuffix("b")
    scale = 1
    if text and text[-1] in _SUFFIXES and not text.startswith("0x"):
        scale = _SUFFIXES[text[-1]]
        text = text[:-1]
    return int(text, 0) * scale


def parse_region(text: str) -> tuple[int, int, int]:
    """``OFFSET:LENGTH[:ADDR]`` -> (offset, length, image address; default the offset)."""
    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise ValueError(f"region {text!r} is not OFFSET:LENGTH[:ADDR]")
    offset, length = parse_size(parts[0]), parse_size(parts[1])
    address = parse_size(parts[2]) if len(parts) == 3 else offset
    return offset, length, address


@contextlib.contextmanager
def _progress_bar(show: bool, label: str) -> Iterator[Callable[[int], Progress]]:
    bars: list[Any] = []

    def start(total: int) -> Progress:
        if not show:
            return lambda _: None
        bar = click.progressbar(length=total, label=label, file=sys.stderr, show_pos=False)
        bars.append(bar)
        bar.__enter__()
        return bar.update

    try:
        yield start
    finally:
        for bar in bars:
            bar.__exit__(None, None, None)


@click.command("dump")
@click.argument("pid", type=int)
@click.option(
    "-o",
    "--output",
    "root",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Images root: the image is written to ROOT/IMAGE_ID.",
)
@click.option("--image-id", help="Image id (default: pid<PID>-<UTC time>).")
@click.option(
    "--include",
    multiple=True,
    metavar="GLOB",
    help="Also capture readable mappings whose name matches ([anon] = unnamed).",
)
@click.option("--exclude", multiple=True, metavar="GLOB", help="Skip mappings matching.")
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Progress bar on stderr (default: when stderr is a terminal).",
)
def dump(
    *,
    pid: int,
    root: Path,
    image_id: str | None,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    progress: bool | None,
) -> None:
    """Snapshot the private memory of live process PID into an image.

    Captures readable private mappings that are writable or anonymous (heap, stacks,
    anonymous mmaps, data of binaries and libraries); skips shared and read-only file
    mappings and [vvar]/[vdso]/[vsyscall]. Anonymous pages never populated are
    recorded as zero without being read; all-zero pages are not stored. The process
    is stopped (SIGSTOP) while its memory is read and resumed afterwards, also on
    error. The image goes to ROOT/IMAGE_ID; its path is printed on stdout.
    """
    show = sys.stderr.isatty() if progress is None else progress
    try:
        with _progress_bar(show, f"dumping {pid}") as start:
            result = dump_process(
                pid,
                root,
                image_id or default_image_id(pid),
                include=include,
                exclude=exclude,
                start_progress=start,
            )
    except (ImageError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(
        f"dumped {result.regions} regions: read {result.read_bytes} of "
        f"{result.total_bytes} bytes"
        + (f", {result.unreadable_bytes} unreadable (ZERO)" if result.unreadable_bytes else ""),
        err=True,
    )
    click.echo(str(result.path))


@click.group("image")
def image() -> None:
    """Make, inspect and verify snapshot images."""


@image.command("from-raw")
@click.argument(
    "memfile", type=click.Path(exists=True, dir_okay=False, readable=True, path_type=Path)
)
@click.option(
    "-o",
    "--output",
    "root",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Images root: the image is written to ROOT/IMAGE_ID.",
)
@click.option("--image-id", help="Image id (default: <file name>-<UTC time>).")
@click.option(
    "--region",
    "regions",
    multiple=True,
    metavar="OFFSET:LENGTH[:ADDR]",
    help="A region at a file offset; its image address defaults to the offset "
    "(Firecracker names guest pages by memory-file offset). Default: the whole file.",
)
@click.option("--page-size", default="4096", help="Page size of the regions (e.g. 2M).")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr.")
def from_raw(
    *,
    memfile: Path,
    root: Path,
    image_id: str | None,
    regions: tuple[str, ...],
    page_size: str,
    progress: bool | None,
) -> None:
    """Make an image from a raw memory file (e.g. a VM snapshot's memory file)."""
    try:
        size = parse_size(page_size)
        layout = [parse_region(text) for text in regions]
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    file_size = memfile.stat().st_size
    if not layout:
        layout = [(0, file_size, 0)]
    for offset, length, _ in layout:
        if offset + length > file_size:
            raise click.BadParameter(
                f"region {offset:#x}:{length:#x} ends beyond the {file_size}-byte file"
            )
    image_id = image_id or f"{memfile.stem}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    source = ImageSource(kind="raw-file", host=socket.gethostname(), path=str(memfile.resolve()))
    show = sys.stderr.isatty() if progress is None else progress
    try:
        with (
            _progress_bar(show, f"reading {memfile.name}") as start,
            ImageWriter(root, image_id, source=source) as writer,
        ):
            for offset, length, address in layout:
                writer.add_region(ImageAddr(address), length, f"{memfile.name}@{offset:#x}", size)
            advance = start(sum(length for _, length, _ in layout))
            _copy_raw(memfile, layout, writer, advance)
            path = writer.commit()
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    except (ImageError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(str(path))


def _copy_raw(
    memfile: Path, layout: list[tuple[int, int, int]], writer: ImageWriter, advance: Progress
) -> None:
    step = 4 * 1024 * 1024
    with open(memfile, "rb") as raw:
        if os.fstat(raw.fileno()).st_size == 0:
            return
        with mmap.mmap(raw.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            view = memoryview(mapped)
            try:
                for offset, length, address in sorted(layout, key=lambda r: r[2]):
                    for done in range(0, length, step):
                        take = min(step, length - done)
                        writer.write(
                            ImageAddr(address + done),
                            view[offset + done : offset + done + take],
                        )
                        advance(take)
            finally:
                view.release()


def describe(reader: ImageReader) -> dict[str, Any]:
    """An image's metadata as plain data (``uffdd image inspect --json``)."""
    return {
        "image_id": reader.image_id,
        "directory": str(reader.directory),
        "format_version": reader.format_version,
        "created_unix_ns": reader.created_unix_ns,
        "source": {
            "kind": reader.source.kind,
            "pid": reader.source.pid,
            "cmdline": list(reader.source.cmdline),
            "host": reader.source.host,
            "path": reader.source.path,
        },
        "page_size": reader.page_size,
        "checksum_algorithm": reader.checksum_algorithm,
        "chunk_size": reader.chunk_size,
        "chunks": reader.chunk_count,
        "total_bytes": reader.total_bytes,
        "data_bytes": reader.data_bytes,
        "zero_bytes": reader.zero_bytes,
        "regions": [
            {
                "start": region.start,
                "length": region.length,
                "page_size": region.page_size,
                "name": region.name,
                "extents": [
                    {
                        "start": e.start,
                        "length": e.length,
                        "kind": e.kind.name,
                        "data_offset": e.data_offset,
                    }
                    for e in reader.extents(region.start, region.length)
                ],
            }
            for region in reader.regions
        ],
    }


def _open(directory: Path) -> ImageReader:
    try:
        return ImageReader.open(directory)
    except ImageError as exc:
        raise click.ClickException(str(exc)) from exc


@image.command("inspect")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--extents", is_flag=True, help="List every extent (human output).")
def inspect(directory: Path, as_json: bool, extents: bool) -> None:
    """Show an image's metadata and layout (no checksums are checked)."""
    with _open(directory) as reader:
        info = describe(reader)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    created = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(info["created_unix_ns"] / 1e9))
    source = info["source"]
    click.echo(f"image      {info['image_id']}  (format v{info['format_version']})")
    click.echo(f"created    {created} on {source['host'] or '?'}")
    what = source["kind"] or "?"
    if source["pid"]:
        what += f" pid {source['pid']}: {' '.join(source['cmdline'])}"
    if source["path"]:
        what += f" {source['path']}"
    click.echo(f"source     {what}")
    click.echo(
        f"pages      {info['page_size']} B; {info['checksum_algorithm']} per "
        f"{info['chunk_size']} B chunk, {info['chunks']} chunks"
    )
    click.echo(
        f"bytes      {info['total_bytes']} total, {info['data_bytes']} data, "
        f"{info['zero_bytes']} zero"
    )
    click.echo(f"regions    {len(info['regions'])}")
    for region in info["regions"]:
        data = sum(e["length"] for e in region["extents"] if e["kind"] == ExtentKind.DATA.name)
        click.echo(
            f"  {region['start']:#014x}-{region['start'] + region['length']:#014x} "
            f"{region['page_size']:>7} {data:>12} data  {region['name'] or '[anon]'}"
        )
        if extents:
            for e in region["extents"]:
                click.echo(
                    f"    {e['start']:#014x} +{e['length']:#x} {e['kind']}"
                    + (f" @{e['data_offset']:#x}" if e["kind"] == "DATA" else "")
                )


@image.command("verify")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
def verify(directory: Path) -> None:
    """Check an image completely: layout, sizes and every chunk checksum."""
    with _open(directory) as reader:
        problems = reader.verify()
    if problems:
        for problem in problems:
            click.echo(f"{directory}: {problem}", err=True)
        raise click.ClickException(f"image {directory}: {len(problems)} problem(s)")
    click.echo(f"{directory}: OK")
