"""keep_freed_memory: glibc takes the settings (this machine's C library is glibc)."""

from __future__ import annotations

import pytest

from uffdd.kernel import memory


def test_glibc_accepts_the_settings() -> None:
    assert memory.keep_freed_memory() is True


def test_without_mallopt_it_says_no(monkeypatch: pytest.MonkeyPatch) -> None:
    class NotGlibc:
        pass

    monkeypatch.setattr(memory, "_libc", NotGlibc())
    assert memory.keep_freed_memory() is False
