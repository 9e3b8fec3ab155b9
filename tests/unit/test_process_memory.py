"""keep_freed_memory (glibc takes the settings: this machine's C library is glibc) and
uninitialized_buffer (a writable byte buffer that lives as long as its views)."""

from __future__ import annotations

import gc

import pytest

from uffdd.kernel import memory


def test_glibc_accepts_the_settings() -> None:
    assert memory.keep_freed_memory() is True


def test_without_mallopt_it_says_no(monkeypatch: pytest.MonkeyPatch) -> None:
    class NotGlibc:
        pass

    monkeypatch.setattr(memory, "_libc", NotGlibc())
    assert memory.keep_freed_memory() is False


def test_an_uninitialized_buffer_is_a_writable_byte_buffer_that_outlives_the_call() -> None:
    view = memoryview(memory.uninitialized_buffer(3 * 4096)).toreadonly()
    writable = memory.uninitialized_buffer(8)
    assert (writable.format, writable.itemsize, writable.readonly) == ("B", 1, False)
    writable[:] = b"abcdefgh"
    assert bytes(writable) == b"abcdefgh"
    assert len(view) == 3 * 4096
    gc.collect()  # only the views hold the memory now
    assert bytes(writable[2:5]) == b"cde"
    assert len(bytes(view)) == 3 * 4096
