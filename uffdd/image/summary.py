"""What ``uffdd image inspect`` shows: an image's metadata and layout, as data and as text.

Why apart from the reader: the reader serves pages and checks them; this turns what it
knows into plain data (``--json``, stable keys for scripts) and into the lines a person
reads, without checking any checksum.
"""

from __future__ import annotations

import time
from typing import Any

from uffdd.image.format import ExtentKind
from uffdd.image.reader import ImageReader


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


def render_text(info: dict[str, Any], extents: bool = False) -> str:
    """:func:`describe`'s data for a person; ``extents`` lists every extent too."""
    created = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(info["created_unix_ns"] / 1e9))
    source = info["source"]
    lines = [
        f"image      {info['image_id']}  (format v{info['format_version']})",
        f"created    {created} on {source['host'] or '?'}",
    ]
    what = source["kind"] or "?"
    if source["pid"]:
        what += f" pid {source['pid']}: {' '.join(source['cmdline'])}"
    if source["path"]:
        what += f" {source['path']}"
    lines += [
        f"source     {what}",
        f"pages      {info['page_size']} B; {info['checksum_algorithm']} per "
        f"{info['chunk_size']} B chunk, {info['chunks']} chunks",
        f"bytes      {info['total_bytes']} total, {info['data_bytes']} data, "
        f"{info['zero_bytes']} zero",
        f"regions    {len(info['regions'])}",
    ]
    for region in info["regions"]:
        data = sum(e["length"] for e in region["extents"] if e["kind"] == ExtentKind.DATA.name)
        lines.append(
            f"  {region['start']:#014x}-{region['start'] + region['length']:#014x} "
            f"{region['page_size']:>7} {data:>12} data  {region['name'] or '[anon]'}"
        )
        if extents:
            lines += [
                f"    {e['start']:#014x} +{e['length']:#x} {e['kind']}"
                + (f" @{e['data_offset']:#x}" if e["kind"] == "DATA" else "")
                for e in region["extents"]
            ]
    return "\n".join(lines)
