"""A typed, complete binding of one userfaultfd: handshake, registration, ioctls, reads.

Why a class of its own: every other layer (daemon, restorer, ``uffdd check``) needs the
same few dozen lines of ioctl plumbing, and the kernel's answers need one consistent
reading. Here the errnos a lazy-restore handler *expects* (the page is already there,
drain events first, the layout changed, the process is gone) come back as an
:class:`OpResult` value together with the bytes the kernel did finish, and everything
else raises :class:`~uffdd.core.errors.UffdOpError`. Calls go through the cffi API-mode
module (request numbers and struct layouts from the C headers, the GIL released during
the ioctl) and page data is passed with ``ffi.from_buffer``: no second copy in Python.
:meth:`Uffd.fast_serve` runs a whole read-and-answer loop in C over a ``FastTable``
(local, verified image data; ``native/fast_serve.py``), for the faults whose answer
needs no decision.

Kernel behaviour worth knowing (seen on 6.18; see also shared/PROTOCOLS.md):

- ``UFFDIO_API`` answers with *every* feature the kernel supports, not the ones it
  enabled; the enabled set is what was asked for (``/proc/self/fdinfo`` shows it).
  Asking for one unsupported bit fails the whole handshake with EINVAL and a zeroed
  answer, and the fd stays un-negotiated, so it can be retried with fewer features.
- A resolving ioctl that stops early returns EAGAIN with the bytes done so far in its
  count field (``copy``, ``zeropage``, ``mapped``, ``updated``, ``move``), and only
  those bytes were woken. One cause is a page already present in the middle of the
  range (EEXIST is reported only when the *first* page is present), another is a
  non-cooperative event (fork, mremap, madvise, munmap) raised while it ran. The answer
  does not say which, so both are :attr:`Outcome.RETRY` with ``done > 0``: account the
  first ``done`` bytes, drain events, and retry from ``start + done``; a present page
  then answers :attr:`Outcome.EXISTS` and can be skipped.
- EAGAIN because of an event lasts until the process that raised the event has *run
  again* after the event was read (it lowers the flag itself), so a retry straight after
  draining can still see EAGAIN: keep deferring, never spin. (Measured: about a third
  of immediate retries after reading a REMOVE still got EAGAIN.)
- With EVENT_UNMAP, an mremap that moves a range reports REMAP(old, new, len) and then
  UNMAP(old range): the source addresses are unmapped after the move.
- The uffd's ranges live in its creator's address space, and any holder may register,
  copy, zeropage, wake... on them. MOVE is the exception: only the process that owns
  the memory can issue it (from another process the kernel answers EINVAL even when
  both addresses name the creator's memory), so a daemon cannot use it.
"""

from __future__ import annotations

import enum
import errno
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from uffdd.core.errors import KernelSupportError, PeerProtocolError, UffdOpError
from uffdd.core.events import UffdEvent
from uffdd.core.outcomes import OpResult, Outcome, op_result
from uffdd.core.wire import MSG_SIZE, decode_messages
from uffdd.native._ffi import ffi, lib
from uffdd.native.fast_serve import FastResult, FastTable, fast_serve

if TYPE_CHECKING:
    from typing import Self

    from typing_extensions import Buffer

__all__ = [
    "NO_FEATURES",
    "ApiInfo",
    "FaultCounts",
    "Feature",
    "Ioctl",
    "OpResult",
    "Outcome",
    "RegisterMode",
    "Uffd",
    "op_result",
]


class Feature(enum.IntFlag):
    """``UFFD_FEATURE_*`` bits negotiated with ``UFFDIO_API``."""

    PAGEFAULT_FLAG_WP = lib.UFFD_FEATURE_PAGEFAULT_FLAG_WP
    EVENT_FORK = lib.UFFD_FEATURE_EVENT_FORK
    EVENT_REMAP = lib.UFFD_FEATURE_EVENT_REMAP
    EVENT_REMOVE = lib.UFFD_FEATURE_EVENT_REMOVE
    MISSING_HUGETLBFS = lib.UFFD_FEATURE_MISSING_HUGETLBFS
    MISSING_SHMEM = lib.UFFD_FEATURE_MISSING_SHMEM
    EVENT_UNMAP = lib.UFFD_FEATURE_EVENT_UNMAP
    SIGBUS = lib.UFFD_FEATURE_SIGBUS
    THREAD_ID = lib.UFFD_FEATURE_THREAD_ID
    MINOR_HUGETLBFS = lib.UFFD_FEATURE_MINOR_HUGETLBFS
    MINOR_SHMEM = lib.UFFD_FEATURE_MINOR_SHMEM
    EXACT_ADDRESS = lib.UFFD_FEATURE_EXACT_ADDRESS
    WP_HUGETLBFS_SHMEM = lib.UFFD_FEATURE_WP_HUGETLBFS_SHMEM
    WP_UNPOPULATED = lib.UFFD_FEATURE_WP_UNPOPULATED
    POISON = lib.UFFD_FEATURE_POISON
    WP_ASYNC = lib.UFFD_FEATURE_WP_ASYNC
    MOVE = lib.UFFD_FEATURE_MOVE


NO_FEATURES = Feature(0)
"""The empty feature set (the oldest API: MISSING faults only, no events)."""


class RegisterMode(enum.IntFlag):
    """``UFFDIO_REGISTER_MODE_*``: which faults on a range are reported."""

    MISSING = lib.UFFDIO_REGISTER_MODE_MISSING
    WP = lib.UFFDIO_REGISTER_MODE_WP
    MINOR = lib.UFFDIO_REGISTER_MODE_MINOR


class Ioctl(enum.IntFlag):
    """The ioctls the kernel offers (on an fd or a registered range): bit ``1 << _UFFDIO_x``."""

    REGISTER = 1 << lib._UFFDIO_REGISTER
    UNREGISTER = 1 << lib._UFFDIO_UNREGISTER
    WAKE = 1 << lib._UFFDIO_WAKE
    COPY = 1 << lib._UFFDIO_COPY
    ZEROPAGE = 1 << lib._UFFDIO_ZEROPAGE
    MOVE = 1 << lib._UFFDIO_MOVE
    WRITEPROTECT = 1 << lib._UFFDIO_WRITEPROTECT
    CONTINUE = 1 << lib._UFFDIO_CONTINUE
    POISON = 1 << lib._UFFDIO_POISON
    API = 1 << lib._UFFDIO_API


@dataclass(frozen=True, slots=True)
class ApiInfo:
    """The result of the API handshake (or of reading it back from fdinfo)."""

    api: int
    features: Feature
    """The features enabled on this fd."""
    ioctls: Ioctl
    available: Feature | None = None
    """Every feature the kernel offers (known only from a handshake, not from fdinfo)."""


@dataclass(frozen=True, slots=True)
class FaultCounts:
    """Faults the kernel holds for an fd (from fdinfo): a cheap, race-free probe."""

    unread: int
    """Faults queued that no read() has returned yet."""
    waiting: int
    """Threads blocked in a fault, read or not (they leave once woken)."""


_CREATE_METHODS = ("syscall", "device")
_INTERNAL_FEATURE_BITS = 1 << 31  # UFFD_FEATURE_INITIALIZED, kernel-internal
_DEVICE = "/dev/userfaultfd"


def _feature_names(features: int) -> tuple[str, ...]:
    known = {int(member): str(member.name) for member in Feature}
    return tuple(known.get(1 << bit, f"bit{bit}") for bit in range(64) if features & (1 << bit))


class Uffd:
    """One userfaultfd, owned: closed by :meth:`close` (or the ``with`` block).

    Mind who holds the last reference: when it is closed the kernel unregisters every
    range and later faults on anonymous memory read zeros, silently.
    """

    __slots__ = ("_fd", "_guard")

    def __init__(self, fd: int) -> None:
        """Wrap ``fd`` without checks; prefer :meth:`create` or :meth:`adopt`."""
        self._fd = fd
        self._guard: Any = None

    def guard(self, installer: Any) -> None:
        """From now on (``installer`` a C installer) or no longer (None), run copies
        and zeropages under that installer's uffd lock, refused with EAGAIN while the
        uffd is fenced: another thread reads this uffd (``uffdd_installer_guarded_ioctl``)."""
        self._guard = installer

    def _resolve(self, request: int, arg: Any) -> int:
        if self._guard is None:
            return int(lib.uffd_ioctl(self.fd, request, arg))
        return int(lib.uffdd_installer_guarded_ioctl(self._guard, self.fd, request, arg))

    # -- life cycle -------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        *,
        nonblocking: bool = True,
        user_mode_only: bool = False,
        method: Literal["auto", "syscall", "device"] = "auto",
    ) -> Self:
        """A new userfaultfd for the calling process (always close-on-exec).

        ``auto`` tries userfaultfd(2), then ``/dev/userfaultfd`` + ``USERFAULTFD_IOC_NEW``
        (the device is governed by file permissions, not by vm.unprivileged_userfaultfd).
        Never set ``user_mode_only`` for a restored process: its kernel-mode accesses
        (a read() into lazy memory) then fail with EFAULT instead of faulting.
        """
        if method not in ("auto", *_CREATE_METHODS):
            raise ValueError(f"unknown method {method!r}")
        flags = os.O_CLOEXEC | (os.O_NONBLOCK if nonblocking else 0)
        if user_mode_only:
            flags |= lib.UFFD_USER_MODE_ONLY
        reasons: list[str] = []
        if method in ("auto", "syscall"):
            fd = lib.uffd_create(flags)
            if fd >= 0:
                return cls(fd)
            reasons.append(f"userfaultfd(2): {_syscall_reason(-fd)}")
        if method in ("auto", "device"):
            fd, reason = _create_from_device(flags)
            if fd >= 0:
                return cls(fd)
            reasons.append(f"{_DEVICE}: {reason}")
        raise KernelSupportError("cannot create a userfaultfd: " + "; ".join(reasons))

    @classmethod
    def adopt(cls, fd: int, *, nonblocking: bool | None = None) -> Self:
        """Take ownership of a received userfaultfd (SCM_RIGHTS, or a Fork's ``child_fd``).

        Marks it close-on-exec (fds received over SCM_RIGHTS are inheritable unless
        the receiver asked for MSG_CMSG_CLOEXEC) and, when ``nonblocking`` is not None,
        sets O_NONBLOCK accordingly; that flag lives in the file description, so it is
        shared with every other holder. Raises :class:`PeerProtocolError` (leaving the
        fd open and the caller's) when ``fd`` is not a userfaultfd.
        """
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError as exc:
            raise PeerProtocolError(f"fd {fd} is not open: {exc.strerror}") from exc
        if target != "anon_inode:[userfaultfd]":
            raise PeerProtocolError(f"fd {fd} is {target}, not a userfaultfd")
        os.set_inheritable(fd, False)
        if nonblocking is not None:
            os.set_blocking(fd, not nonblocking)
        return cls(fd)

    @property
    def fd(self) -> int:
        """The file descriptor (still owned by this object)."""
        if self._fd < 0:
            raise ValueError("I/O operation on a closed Uffd")
        return self._fd

    def fileno(self) -> int:
        return self.fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        """Close the fd (idempotent)."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def detach(self) -> int:
        """Give up ownership: return the fd, which this object will no longer close."""
        fd = self.fd
        self._fd = -1
        return fd

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return "<Uffd closed>" if self.closed else f"<Uffd fd={self._fd}>"

    # -- handshake and introspection --------------------------------------------------

    def api(self, features: Feature = NO_FEATURES, *, required: Feature | None = None) -> ApiInfo:
        """UFFDIO_API: enable ``features`` on this fd (once per fd, by its creator).

        ``required=None`` means every requested feature is required. Otherwise features
        outside ``required`` are wishes: the ones the kernel (or our privileges, for
        EVENT_FORK) refuses are dropped and the handshake is retried. Raises
        :class:`KernelSupportError` with ``missing`` naming the refused required
        features. The answer's ``features`` are those enabled here; ``available``
        is what the kernel offers.
        """
        wanted = Feature(features | (required or 0))
        must = wanted if required is None else Feature(required)
        err, answer = self._api_call(wanted)
        if err == errno.EPERM and wanted & Feature.EVENT_FORK:
            # EVENT_FORK needs CAP_SYS_PTRACE in the creating process.
            if must & Feature.EVENT_FORK:
                raise KernelSupportError(
                    "UFFD_FEATURE_EVENT_FORK needs CAP_SYS_PTRACE (or root)",
                    missing=("EVENT_FORK",),
                )
            wanted = Feature(int(wanted) & ~int(Feature.EVENT_FORK))
            err, answer = self._api_call(wanted)
        if err == errno.EINVAL and wanted:
            # The kernel refuses the whole request for one unknown bit and answers with
            # zeros; learn what it offers from a throwaway fd (this one stays
            # un-negotiated after a refusal, so it can be retried).
            offered = _kernel_features()
            refused = Feature(int(wanted) & ~int(offered))  # ints: ~ on a flag drops unknown bits
            if refused & must:
                names = _feature_names(refused & must)
                raise KernelSupportError(
                    "the kernel does not offer userfaultfd feature(s) " + ", ".join(names),
                    missing=names,
                )
            if refused:
                wanted = Feature(wanted & offered)
                err, answer = self._api_call(wanted)
        if err:
            raise UffdOpError("api", err)
        api, offered_bits, ioctls = answer
        enabled = Feature(wanted)
        if enabled & Feature.WP_ASYNC:
            enabled |= Feature.WP_UNPOPULATED  # the kernel turns it on with WP_ASYNC
        return ApiInfo(api, enabled, Ioctl(ioctls), available=Feature(offered_bits))

    def _api_call(self, features: Feature) -> tuple[int, tuple[int, int, int]]:
        arg: Any = ffi.new("struct uffdio_api *")
        arg.api = lib.UFFD_API
        arg.features = int(features)
        err = lib.uffd_ioctl(self.fd, lib.UFFDIO_API, arg)
        return err, (int(arg.api), int(arg.features), int(arg.ioctls))

    def info(self) -> ApiInfo:
        """The negotiated API of this fd, read back from ``/proc/self/fdinfo``.

        For a received fd: only its creator can negotiate, and this is how the receiver
        checks what it got (e.g. that EVENT_FORK is on before relying on fork events).
        """
        line = self._fdinfo().get("API")
        if line is None:
            raise PeerProtocolError(f"fd {self._fd} has no userfaultfd API line in fdinfo")
        api, features, ioctls = (int(part, 16) for part in line.split(":"))
        # The kernel prints its context's flags word, which also carries an internal
        # "API done" bit (1 << 31 on 6.x); the ioctls shown are the fd-level ones
        # whether or not the handshake happened.
        return ApiInfo(api, Feature(features & ~_INTERNAL_FEATURE_BITS), Ioctl(ioctls))

    def fault_counts(self) -> FaultCounts:
        """How many faults are unread and how many threads wait (fdinfo)."""
        fields = self._fdinfo()
        return FaultCounts(unread=int(fields["pending"]), waiting=int(fields["total"]))

    def _fdinfo(self) -> dict[str, str]:
        with open(f"/proc/self/fdinfo/{self.fd}", encoding="ascii") as f:
            pairs = (line.partition(":") for line in f.read().splitlines())
            return {key: value.strip() for key, _, value in pairs}

    # -- registration -----------------------------------------------------------------

    def register(self, start: int, length: int, mode: RegisterMode) -> Ioctl:
        """Register ``[start, start+length)`` (in the creator's address space).

        Returns the ioctls usable on the range (e.g. no ZEROPAGE on hugetlbfs, CONTINUE
        only with MINOR). Works from any process holding the fd: the range is in the
        address space of the process that created the uffd, not the caller's.
        """
        arg: Any = ffi.new("struct uffdio_register *")
        arg.range.start = start
        arg.range.len = length
        arg.mode = int(mode)
        self._check("register", lib.UFFDIO_REGISTER, arg, start, length)
        return Ioctl(int(arg.ioctls))

    def unregister(self, start: int, length: int) -> None:
        """Unregister a range: later faults there are the kernel's ordinary ones."""
        self._check("unregister", lib.UFFDIO_UNREGISTER, _range(start, length), start, length)

    def wake(self, start: int, length: int) -> None:
        """Wake threads blocked on faults in the range (after DONTWAKE operations)."""
        self._check("wake", lib.UFFDIO_WAKE, _range(start, length), start, length)

    # -- resolving ioctls -------------------------------------------------------------

    def copy(
        self,
        dst: int,
        src: int | Buffer,
        length: int | None = None,
        *,
        dontwake: bool = False,
        wp: bool = False,
    ) -> OpResult:
        """UFFDIO_COPY: install pages at ``dst`` from ``src`` and wake their waiters.

        ``src`` is a buffer (bytes, bytearray, memoryview, mmap; passed to the kernel
        in place) or an address in *this* process's memory. ``length`` defaults to the
        buffer's size. ``wp`` installs the pages write-protected.
        """
        arg: Any = ffi.new("struct uffdio_copy *")
        keep = None
        if isinstance(src, int):
            if length is None:
                raise ValueError("copy from an address needs a length")
            arg.src = src
        else:
            keep = ffi.from_buffer(src)
            if length is None:
                length = len(keep)
            elif length > len(keep):
                raise ValueError(f"copy of {length} bytes from a {len(keep)}-byte buffer")
            arg.src = int(ffi.cast("uintptr_t", keep))
        arg.dst = dst
        arg.len = length
        arg.mode = (lib.UFFDIO_COPY_MODE_DONTWAKE if dontwake else 0) | (
            lib.UFFDIO_COPY_MODE_WP if wp else 0
        )
        err = self._resolve(lib.UFFDIO_COPY, arg)
        del keep  # the buffer export must outlive the ioctl, no longer
        return op_result("copy", err, int(arg.copy), dst, length)

    def zeropage(self, start: int, length: int, *, dontwake: bool = False) -> OpResult:
        """UFFDIO_ZEROPAGE: map zero pages (not on hugetlbfs: it has no ZEROPAGE)."""
        arg: Any = ffi.new("struct uffdio_zeropage *")
        arg.range.start = start
        arg.range.len = length
        arg.mode = lib.UFFDIO_ZEROPAGE_MODE_DONTWAKE if dontwake else 0
        err = self._resolve(lib.UFFDIO_ZEROPAGE, arg)
        return op_result("zeropage", err, int(arg.zeropage), start, length)

    def writeprotect(
        self, start: int, length: int, *, protect: bool, dontwake: bool = False
    ) -> OpResult:
        """UFFDIO_WRITEPROTECT: set or clear write protection (clearing wakes waiters).

        The kernel reports no progress count: ``done`` is the length or 0.
        """
        arg: Any = ffi.new("struct uffdio_writeprotect *")
        arg.range.start = start
        arg.range.len = length
        arg.mode = (lib.UFFDIO_WRITEPROTECT_MODE_WP if protect else 0) | (
            lib.UFFDIO_WRITEPROTECT_MODE_DONTWAKE if dontwake else 0
        )
        err = lib.uffd_ioctl(self.fd, lib.UFFDIO_WRITEPROTECT, arg)
        return op_result("writeprotect", err, 0 if err else length, start, length)

    def continue_(
        self, start: int, length: int, *, dontwake: bool = False, wp: bool = False
    ) -> OpResult:
        """UFFDIO_CONTINUE: map pages already in the page cache (resolves MINOR faults)."""
        arg: Any = ffi.new("struct uffdio_continue *")
        arg.range.start = start
        arg.range.len = length
        arg.mode = (lib.UFFDIO_CONTINUE_MODE_DONTWAKE if dontwake else 0) | (
            lib.UFFDIO_CONTINUE_MODE_WP if wp else 0
        )
        err = lib.uffd_ioctl(self.fd, lib.UFFDIO_CONTINUE, arg)
        return op_result("continue", err, int(arg.mapped), start, length)

    def poison(self, start: int, length: int, *, dontwake: bool = False) -> OpResult:
        """UFFDIO_POISON: mark pages poisoned; touching them then raises SIGBUS."""
        arg: Any = ffi.new("struct uffdio_poison *")
        arg.range.start = start
        arg.range.len = length
        arg.mode = lib.UFFDIO_POISON_MODE_DONTWAKE if dontwake else 0
        err = lib.uffd_ioctl(self.fd, lib.UFFDIO_POISON, arg)
        return op_result("poison", err, int(arg.updated), start, length)

    def move(
        self,
        dst: int,
        src: int,
        length: int,
        *,
        dontwake: bool = False,
        allow_src_holes: bool = False,
    ) -> OpResult:
        """UFFDIO_MOVE: move anonymous pages from ``src`` to ``dst``, both in the creator's mm.

        Only the process that created the uffd (and owns the memory) can issue it: from
        any other process the kernel answers EINVAL. Both ranges must be private anonymous,
        writable and alike, and the source pages must not be shared (a page shared
        after fork gives EBUSY). A hole in the source is ENOENT unless
        ``allow_src_holes``.
        """
        arg: Any = ffi.new("struct uffdio_move *")
        arg.dst = dst
        arg.src = src
        arg.len = length
        arg.mode = (lib.UFFDIO_MOVE_MODE_DONTWAKE if dontwake else 0) | (
            lib.UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES if allow_src_holes else 0
        )
        err = lib.uffd_ioctl(self.fd, lib.UFFDIO_MOVE, arg)
        return op_result("move", err, int(arg.move), dst, length)

    # -- reading ----------------------------------------------------------------------

    def read_raw(self, max_messages: int = 64) -> bytes:
        """Up to ``max_messages`` raw uffd_msg records; b"" when none is pending.

        On a blocking fd this waits for the first message. Before the API handshake
        the kernel refuses reads (EINVAL, raised as UffdOpError). Reading a FORK message
        installs the child's new uffd in *this* process's fd table.
        """
        try:
            return os.read(self.fd, MSG_SIZE * max_messages)
        except BlockingIOError:
            return b""
        except OSError as exc:  # EINVAL: the API handshake has not happened yet
            raise UffdOpError("read", exc.errno or 0) from exc

    def fast_serve(self, table: FastTable, journal: tuple[Any, Any] | None = None) -> FastResult:
        """Answer queued faults on ``table``'s pages in C (the GIL released meanwhile):
        ``native.fast_serve.fast_serve`` on this fd, which says what comes back;
        ``journal``: where each read is journaled (mark and slot pointers)."""
        return fast_serve(self.fd, table, journal)

    def read_events(self, max_messages: int = 64) -> list[UffdEvent]:
        """Read and decode pending messages; a Fork's ``child_fd`` belongs to the caller."""
        return decode_messages(self.read_raw(max_messages))

    # -- helpers ----------------------------------------------------------------------

    def _check(self, op: str, request: int, arg: Any, start: int, length: int) -> None:
        err = lib.uffd_ioctl(self.fd, request, arg)
        if err:
            raise UffdOpError(op, err, start, length)


def _range(start: int, length: int) -> Any:
    arg: Any = ffi.new("struct uffdio_range *")
    arg.start = start
    arg.len = length
    return arg


def _syscall_reason(err: int) -> str:
    if err == errno.EPERM:
        return (
            "EPERM (vm.unprivileged_userfaultfd=0 and no CAP_SYS_PTRACE, or blocked by a "
            "seccomp/LSM policy)"
        )
    if err == errno.ENOSYS:
        return "ENOSYS (kernel built without CONFIG_USERFAULTFD, or blocked by seccomp)"
    return errno.errorcode.get(err, str(err))


def _create_from_device(flags: int) -> tuple[int, str]:
    try:
        dev = os.open(_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return -1, "no such device (kernel older than 6.1 or no devtmpfs node)"
    except PermissionError:
        return -1, "permission denied (needs read-write access to the device)"
    except OSError as exc:
        return -1, exc.strerror or str(exc)
    try:
        fd = lib.uffd_create_from_device(dev, flags)
    finally:
        os.close(dev)
    if fd >= 0:
        return fd, ""
    return -1, "USERFAULTFD_IOC_NEW: " + errno.errorcode.get(-fd, str(-fd))


def _kernel_features() -> Feature:
    """Every feature the running kernel offers (handshake on a throwaway fd)."""
    with Uffd.create() as probe:
        err, (_, offered, _) = probe._api_call(Feature(0))
        if err:
            raise UffdOpError("api", err)
        return Feature(offered)


def kernel_features() -> Feature:
    """Every userfaultfd feature the running kernel offers (KernelSupportError if none)."""
    return _kernel_features()
