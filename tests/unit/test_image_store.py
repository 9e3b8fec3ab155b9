"""The image store: listing, cached opening, and refusing ids that escape the root."""

from __future__ import annotations

from pathlib import Path

import pytest

from uffdd.core.addresses import ImageAddr
from uffdd.core.errors import ImageError
from uffdd.image.format import MANIFEST_NAME, InvalidImageId, validate_image_id
from uffdd.image.store import ImageNotFound, ImageStore
from uffdd.image.writer import ImageWriter

pytestmark = pytest.mark.timeout(30)

P = 4096

BAD_IDS = [
    "",
    ".",
    "..",
    "../img",
    "a/b",
    "/etc",
    "img/..",
    ".hidden",
    ".tmp-img-123",
    "-rf",
    "a\0b",
    "a\\b",
    "a b",
    "x" * 201,
    "ünïcode",
]


def make(root: Path, image_id: str) -> Path:
    with ImageWriter(root, image_id) as writer:
        writer.add_region(ImageAddr(0), P)
        writer.write(ImageAddr(0), b"\x05" * P)
        return writer.commit()


def test_list_shows_only_complete_images(tmp_path: Path) -> None:
    make(tmp_path, "b-2")
    make(tmp_path, "a_1.x")
    (tmp_path / ".tmp-c-xyz").mkdir()  # a writer's temp dir, complete manifest or not
    make(tmp_path / ".tmp-c-xyz", "inner")
    (tmp_path / "empty").mkdir()  # no manifest: not an image
    (tmp_path / "file").write_bytes(b"")
    unfinished = ImageWriter(tmp_path, "unfinished")  # in progress right now
    try:
        assert ImageStore(tmp_path).list() == ["a_1.x", "b-2"]
    finally:
        unfinished.abort()
    assert ImageStore(tmp_path / "missing").list() == []


def test_open_is_cached_and_closes(tmp_path: Path) -> None:
    make(tmp_path, "img")
    with ImageStore(tmp_path) as store:
        reader = store.open("img")
        assert store.open("img") is reader
        assert "img" in store
        assert "nope" not in store
        assert "../img" not in store
        assert reader.image_id == "img"


def test_unknown_image(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    with pytest.raises(ImageNotFound, match="no image 'ghost'"):
        store.open("ghost")
    (tmp_path / "dir").mkdir()
    with pytest.raises(ImageNotFound):
        store.open("dir")


def test_a_broken_image_is_an_image_error_not_not_found(tmp_path: Path) -> None:
    image = make(tmp_path, "img")
    (image / MANIFEST_NAME).write_bytes(b"garbage" * 10)
    with pytest.raises(ImageError, match="bad magic") as caught:
        ImageStore(tmp_path).open("img")
    assert not isinstance(caught.value, ImageNotFound)


@pytest.mark.parametrize("image_id", BAD_IDS)
def test_ids_that_could_escape_the_root_are_refused(tmp_path: Path, image_id: str) -> None:
    root = tmp_path / "root"
    make(tmp_path, "img")  # a real image one level up: '../img' must not reach it
    with pytest.raises(InvalidImageId, match="invalid image id"):
        ImageStore(root).open(image_id)
    with pytest.raises(InvalidImageId):
        ImageWriter(root, image_id)
    assert not root.exists() or list(root.iterdir()) == []


def test_invalid_ids_are_not_found_to_a_server() -> None:
    assert issubclass(InvalidImageId, ImageNotFound)
    assert issubclass(ImageNotFound, ImageError)


@pytest.mark.parametrize("image_id", ["a", "pid123-20260101T000000Z", "vm_1.2+x:y@z", "_x"])
def test_good_ids(image_id: str) -> None:
    assert validate_image_id(image_id) == image_id
