"""`uffdd image from-raw | inspect | verify` through click's test runner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from uffdd.cli import image, parse_region
from uffdd.config import parse_size
from uffdd.core.addresses import ImageAddr
from uffdd.image.format import DATA_NAME, ExtentKind
from uffdd.image.reader import ImageReader

pytestmark = pytest.mark.timeout(30)

P = 4096


def memfile(tmp_path: Path) -> Path:
    """16 pages: page i holds byte i + 1, except pages 3 and 10 which are zero."""
    pages = [bytes([i + 1]) * P if i not in (3, 10) else bytes(P) for i in range(16)]
    path = tmp_path / "guest.mem"
    path.write_bytes(b"".join(pages))
    return path


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(image, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def test_parse_sizes_and_regions() -> None:
    assert parse_size("4096") == 4096
    assert parse_size("0x1000") == 4096
    assert parse_size("2M") == 2 << 20
    assert parse_size("1GiB") == 1 << 30
    assert parse_region("0:4k") == (0, 4096, 0)
    assert parse_region("0x1000:0x2000:0x7f0000") == (0x1000, 0x2000, 0x7F0000)
    with pytest.raises(ValueError, match="OFFSET:LENGTH"):
        parse_region("12")


def test_from_raw_whole_file_addresses_are_file_offsets(tmp_path: Path) -> None:
    mem = memfile(tmp_path)
    code, out, _ = run("from-raw", str(mem), "-o", str(tmp_path / "images"), "--image-id", "vm")
    assert code == 0
    assert out.strip() == str(tmp_path / "images" / "vm")
    with ImageReader.open(tmp_path / "images" / "vm") as reader:
        assert [(r.start, r.length) for r in reader.regions] == [(0, 16 * P)]
        assert reader.data_bytes == 14 * P
        assert reader.source.kind == "raw-file"
        assert reader.source.path == str(mem.resolve())
        raw = mem.read_bytes()
        for extent in reader.extents(ImageAddr(0), 16 * P):
            if extent.kind is ExtentKind.DATA:
                assert reader.data(extent) == raw[extent.start : extent.end]
            else:
                assert raw[extent.start : extent.end] == bytes(extent.length)


def test_from_raw_regions_with_and_without_addresses(tmp_path: Path) -> None:
    mem = memfile(tmp_path)
    code, _, _ = run(
        "from-raw",
        str(mem),
        "-o",
        str(tmp_path),
        "--image-id",
        "vm",
        "--region",
        "0x8000:0x4000",  # pages 8..11, at image address 0x8000
        "--region",
        "0:8k:0x100000",  # pages 0..1, at 0x100000
    )
    assert code == 0
    with ImageReader.open(tmp_path / "vm") as reader:
        assert [(r.start, r.length) for r in reader.regions] == [(0x8000, 4 * P), (0x100000, 2 * P)]
        (extent,) = reader.extents(ImageAddr(0x100000 + P), P)
        assert reader.data(extent) == b"\x02" * P
        zero = reader.extents(ImageAddr(0x8000 + 2 * P), P)[0]  # file page 10
        assert zero.kind is ExtentKind.ZERO


def test_from_raw_refuses_regions_beyond_the_file(tmp_path: Path) -> None:
    mem = memfile(tmp_path)
    code, _, err = run("from-raw", str(mem), "-o", str(tmp_path / "i"), "--region", "0:1M")
    assert code == 2
    assert "beyond the" in err
    code, _, err = run("from-raw", str(mem), "-o", str(tmp_path / "i"), "--region", "0:100")
    assert code == 2
    assert "aligned" in err
    assert not (tmp_path / "i").exists() or list((tmp_path / "i").iterdir()) == []


def test_inspect_human_and_json(tmp_path: Path) -> None:
    run("from-raw", str(memfile(tmp_path)), "-o", str(tmp_path), "--image-id", "vm")
    code, out, _ = run("inspect", str(tmp_path / "vm"), "--extents")
    assert code == 0
    assert "image      vm  (format v1)" in out
    assert "xxh3-64 per 65536 B chunk" in out
    assert f"{16 * P} total, {14 * P} data, {2 * P} zero" in out
    assert "guest.mem@0x0" in out
    assert "ZERO" in out
    code, out, _ = run("inspect", "--json", str(tmp_path / "vm"))
    assert code == 0
    info = json.loads(out)
    assert info["image_id"] == "vm"
    assert info["checksum_algorithm"] == "xxh3-64"
    assert [e["kind"] for e in info["regions"][0]["extents"]] == [
        "DATA",
        "ZERO",
        "DATA",
        "ZERO",
        "DATA",
    ]


def test_verify_good_and_corrupt(tmp_path: Path) -> None:
    run("from-raw", str(memfile(tmp_path)), "-o", str(tmp_path), "--image-id", "vm")
    code, out, _ = run("verify", str(tmp_path / "vm"))
    assert (code, out.strip()) == (0, f"{tmp_path / 'vm'}: OK")
    data = tmp_path / "vm" / DATA_NAME
    raw = bytearray(data.read_bytes())
    raw[100] ^= 1
    data.write_bytes(bytes(raw))
    code, _, err = run("verify", str(tmp_path / "vm"))
    assert code == 1
    assert "checksum mismatch at chunk 0" in err
    assert "1 problem(s)" in err


def test_inspect_and_verify_report_a_broken_image(tmp_path: Path) -> None:
    (tmp_path / "broken").mkdir()
    for command in ("inspect", "verify"):
        code, _, err = run(command, str(tmp_path / "broken"))
        assert code == 1
        assert "manifest.pb is missing" in err
