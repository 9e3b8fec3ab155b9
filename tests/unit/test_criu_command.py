"""``uffdd lazy-pages`` options: CRIU's names, and the page server target they make."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from uffdd.cli import lazy_pages, page_server_target

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize(
    ("address", "port", "target"),
    [
        ("10.0.0.5", 7070, "10.0.0.5:7070"),
        ("10.0.0.5:7070", None, "10.0.0.5:7070"),
        ("::1", 7070, "[::1]:7070"),
        ("unix:/run/pages.sock", None, "unix:/run/pages.sock"),
        ("unix:/run/pages.sock", 7070, "unix:/run/pages.sock"),
    ],
)
def test_page_server_target(address: str, port: int | None, target: str) -> None:
    assert page_server_target(address, port) == target


@pytest.mark.parametrize(("address", "port"), [(None, 7070), ("10.0.0.5", None)])
def test_page_server_target_incomplete(address: str | None, port: int | None) -> None:
    with pytest.raises(click.UsageError):
        page_server_target(address, port)


def test_usage_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(lazy_pages, ["-D", str(tmp_path), "--address", "h", "--port", "1"])
    assert result.exit_code == 2
    assert "--address/--port need --page-server" in result.output
    result = runner.invoke(lazy_pages, ["-D", str(tmp_path), "--page-server"])
    assert result.exit_code == 2
    assert "--page-server needs --address" in result.output


def test_missing_pstree_is_refused(tmp_path: Path) -> None:
    result = CliRunner().invoke(lazy_pages, ["-D", str(tmp_path), "-W", str(tmp_path / "w")])
    assert result.exit_code == 1
    assert "pstree.img is missing" in result.output
    assert not (tmp_path / "w" / "lazy-pages.socket").exists()
