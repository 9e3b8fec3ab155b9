"""The judgement of `uffdd check` on probe reports of hosts we do not have."""

from __future__ import annotations

from uffdd.check import assess
from uffdd.kernel.probe import MEMORY_KINDS, MODES, ProbeReport, RegistrationProbe
from uffdd.kernel.uffd import ApiInfo, Feature, Ioctl, RegisterMode

EVERYTHING = Feature(sum(Feature))
ANON_MISSING = Ioctl.WAKE | Ioctl.COPY | Ioctl.ZEROPAGE


def _report(features: Feature, anon_missing: Ioctl | None = ANON_MISSING) -> ProbeReport:
    registrations = tuple(
        RegistrationProbe(memory, mode, anon_missing if mode is RegisterMode.MISSING else None)
        for memory in MEMORY_KINDS
        for mode in MODES
    )
    api = ApiInfo(0xAA, features, Ioctl.REGISTER | Ioctl.UNREGISTER | Ioctl.API, EVERYTHING)
    return ProbeReport(None, None, api, registrations)


def test_a_full_host_is_usable_without_limitations() -> None:
    verdict = assess(_report(EVERYTHING))
    assert verdict.usable
    assert verdict.problems == ()


def test_missing_tree_events_are_fatal_and_named() -> None:
    verdict = assess(_report(EVERYTHING & ~Feature.EVENT_REMAP & ~Feature.EVENT_UNMAP))
    assert not verdict.usable
    assert verdict.problems == (
        "cannot follow a restored process tree: missing EVENT_REMAP, EVENT_UNMAP",
    )


def test_missing_optional_features_are_limitations_only() -> None:
    verdict = assess(_report(EVERYTHING & ~Feature.THREAD_ID & ~Feature.MISSING_SHMEM))
    assert verdict.usable
    assert any("thread id" in text for text in verdict.limitations)
    assert any("shared memory" in text for text in verdict.limitations)


def test_anonymous_memory_without_zeropage_is_fatal() -> None:
    verdict = assess(_report(EVERYTHING, anon_missing=Ioctl.WAKE | Ioctl.COPY))
    assert verdict.problems == ("anonymous memory lacks ZEROPAGE",)


def test_unregistrable_anonymous_memory_is_fatal() -> None:
    verdict = assess(_report(EVERYTHING, anon_missing=None))
    assert "cannot register anonymous memory" in verdict.problems[0]
