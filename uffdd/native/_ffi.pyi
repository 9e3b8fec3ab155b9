"""Type stub for the cffi extension ``uffdd.native._ffi`` (built by ``build.py``).

cffi generates the module at build time and ships no types; this stub declares exactly
what ``csrc/ffi_api.cdef`` exposes so ``mypy --strict`` checks every use of it.
"""

import _cffi_backend

ffi: _cffi_backend.FFI

class _Lib:
    UFFD_API: int
    UFFD_USER_MODE_ONLY: int
    USERFAULTFD_IOC_NEW: int

    UFFDIO_API: int
    UFFDIO_REGISTER: int
    UFFDIO_UNREGISTER: int
    UFFDIO_WAKE: int
    UFFDIO_COPY: int
    UFFDIO_ZEROPAGE: int
    UFFDIO_MOVE: int
    UFFDIO_WRITEPROTECT: int
    UFFDIO_CONTINUE: int
    UFFDIO_POISON: int

    _UFFDIO_REGISTER: int
    _UFFDIO_UNREGISTER: int
    _UFFDIO_WAKE: int
    _UFFDIO_COPY: int
    _UFFDIO_ZEROPAGE: int
    _UFFDIO_MOVE: int
    _UFFDIO_WRITEPROTECT: int
    _UFFDIO_CONTINUE: int
    _UFFDIO_POISON: int
    _UFFDIO_API: int

    UFFD_FEATURE_PAGEFAULT_FLAG_WP: int
    UFFD_FEATURE_EVENT_FORK: int
    UFFD_FEATURE_EVENT_REMAP: int
    UFFD_FEATURE_EVENT_REMOVE: int
    UFFD_FEATURE_MISSING_HUGETLBFS: int
    UFFD_FEATURE_MISSING_SHMEM: int
    UFFD_FEATURE_EVENT_UNMAP: int
    UFFD_FEATURE_SIGBUS: int
    UFFD_FEATURE_THREAD_ID: int
    UFFD_FEATURE_MINOR_HUGETLBFS: int
    UFFD_FEATURE_MINOR_SHMEM: int
    UFFD_FEATURE_EXACT_ADDRESS: int
    UFFD_FEATURE_WP_HUGETLBFS_SHMEM: int
    UFFD_FEATURE_WP_UNPOPULATED: int
    UFFD_FEATURE_POISON: int
    UFFD_FEATURE_WP_ASYNC: int
    UFFD_FEATURE_MOVE: int

    UFFDIO_REGISTER_MODE_MISSING: int
    UFFDIO_REGISTER_MODE_WP: int
    UFFDIO_REGISTER_MODE_MINOR: int
    UFFDIO_COPY_MODE_DONTWAKE: int
    UFFDIO_COPY_MODE_WP: int
    UFFDIO_ZEROPAGE_MODE_DONTWAKE: int
    UFFDIO_WRITEPROTECT_MODE_WP: int
    UFFDIO_WRITEPROTECT_MODE_DONTWAKE: int
    UFFDIO_CONTINUE_MODE_DONTWAKE: int
    UFFDIO_CONTINUE_MODE_WP: int
    UFFDIO_POISON_MODE_DONTWAKE: int
    UFFDIO_MOVE_MODE_DONTWAKE: int
    UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES: int

    def uffd_ioctl(self, fd: int, request: int, arg: _cffi_backend.FFI.CData, /) -> int: ...
    def uffd_create(self, flags: int, /) -> int: ...
    def uffd_create_from_device(self, dev_fd: int, flags: int, /) -> int: ...
    def uffdd_checksum(self, data: _cffi_backend.FFI.CData | bytes, length: int, /) -> int: ...
    def uffdd_free(self, pointer: _cffi_backend.FFI.CData, /) -> None: ...

    UFFDD_FAST_BATCH: int
    def uffdd_plan_fault(
        self,
        plan: _cffi_backend.FFI.CData,
        data: _cffi_backend.FFI.CData,
        ndata: int,
        zeros: _cffi_backend.FFI.CData,
        nzeros: int,
        page: int,
        out: _cffi_backend.FFI.CData,
        cap: int,
        /,
    ) -> int: ...
    def uffdd_fast_serve(
        self,
        fd: int,
        ranges: _cffi_backend.FFI.CData,
        nranges: int,
        data: _cffi_backend.FFI.CData,
        verified: _cffi_backend.FFI.CData,
        nverified: int,
        chunk_shift: int,
        plan: _cffi_backend.FFI.CData,
        rest: _cffi_backend.FFI.CData,
        rest_cap: int,
        done: _cffi_backend.FFI.CData,
        done_cap: int,
        out: _cffi_backend.FFI.CData,
        mark: _cffi_backend.FFI.CData,
        slot: _cffi_backend.FFI.CData,
        /,
    ) -> int: ...
    def uffdd_installer_new(
        self, cap: int, piece: int, nice: int, /
    ) -> _cffi_backend.FFI.CData: ...
    def uffdd_installer_free(self, installer: _cffi_backend.FFI.CData, /) -> None: ...
    def uffdd_installer_efd(self, installer: _cffi_backend.FFI.CData, /) -> int: ...
    def uffdd_installer_watch(self, installer: _cffi_backend.FFI.CData, fd: int, /) -> int: ...
    def uffdd_installer_unwatch(self, installer: _cffi_backend.FFI.CData, fd: int, /) -> None: ...
    def uffdd_installer_submit(
        self,
        installer: _cffi_backend.FFI.CData,
        fd: int,
        dst: int,
        src: int,
        length: int,
        mode: int,
        job_id: int,
        /,
    ) -> int: ...
    def uffdd_installer_take(
        self, installer: _cffi_backend.FFI.CData, out: _cffi_backend.FFI.CData, cap: int, /
    ) -> int: ...
    def uffdd_installer_hold(self, installer: _cffi_backend.FFI.CData, /) -> None: ...
    def uffdd_installer_unhold(self, installer: _cffi_backend.FFI.CData, /) -> None: ...
    def uffdd_installer_fence_held(
        self, installer: _cffi_backend.FFI.CData, fd: int, /
    ) -> None: ...
    def uffdd_installer_unfence(self, installer: _cffi_backend.FFI.CData, fd: int, /) -> None: ...
    def uffdd_installer_quiesce(self, installer: _cffi_backend.FFI.CData, fd: int, /) -> None: ...
    def uffdd_installer_expedite(
        self, installer: _cffi_backend.FFI.CData, fd: int, addr: int, /
    ) -> int: ...
    def uffdd_installer_guarded_ioctl(
        self,
        installer: _cffi_backend.FFI.CData,
        fd: int,
        request: int,
        arg: _cffi_backend.FFI.CData,
        /,
    ) -> int: ...
    def uffdd_installer_stats(
        self, installer: _cffi_backend.FFI.CData, out: _cffi_backend.FFI.CData, /
    ) -> None: ...

    UFFDD_FRAME_HEADER: int
    UFFDD_RECV_RUNNING: int
    UFFDD_RECV_EOF: int
    UFFDD_RECV_MIDFRAME: int
    UFFDD_RECV_GARBAGE: int
    UFFDD_RECV_STOPPED: int
    UFFDD_RECV_NOMEM: int
    def uffdd_receiver_new(
        self, fd: int, cap: int, max_queued: int, max_body: int, /
    ) -> _cffi_backend.FFI.CData: ...
    def uffdd_receiver_efd(self, receiver: _cffi_backend.FFI.CData, /) -> int: ...
    def uffdd_receiver_take(
        self,
        receiver: _cffi_backend.FFI.CData,
        out: _cffi_backend.FFI.CData,
        n: int,
        max_bytes: int,
        /,
    ) -> int: ...
    def uffdd_receiver_status(self, receiver: _cffi_backend.FFI.CData, /) -> int: ...
    def uffdd_receiver_send(
        self, receiver: _cffi_backend.FFI.CData, data: bytes, length: int, /
    ) -> int: ...
    def uffdd_receiver_stats(
        self, receiver: _cffi_backend.FFI.CData, out: _cffi_backend.FFI.CData, /
    ) -> None: ...
    def uffdd_receiver_free(self, receiver: _cffi_backend.FFI.CData, /) -> None: ...

    UFFDD_DR_LAYOUT: int
    UFFDD_DR_DRAINED: int
    UFFDD_DR_ERROR: int
    UFFDD_DR_LANE: int
    def uffdd_demander_new(
        self,
        sock: int,
        plan: _cffi_backend.FFI.CData,
        max_procs: int,
        installer: _cffi_backend.FFI.CData,
        /,
    ) -> _cffi_backend.FFI.CData: ...
    def uffdd_demander_efd(self, demander: _cffi_backend.FFI.CData, /) -> int: ...
    def uffdd_demander_add(
        self,
        demander: _cffi_backend.FFI.CData,
        fd: int,
        token: int,
        image_id: bytes,
        id_len: int,
        ranges: _cffi_backend.FFI.CData,
        nranges: int,
        zeros: _cffi_backend.FFI.CData,
        nzeros: int,
        /,
    ) -> int: ...
    def uffdd_demander_resume(
        self,
        demander: _cffi_backend.FFI.CData,
        slot: int,
        ranges: _cffi_backend.FFI.CData,
        nranges: int,
        zeros: _cffi_backend.FFI.CData,
        nzeros: int,
        /,
    ) -> int: ...
    def uffdd_demander_remove(self, demander: _cffi_backend.FFI.CData, slot: int, /) -> None: ...
    def uffdd_demander_marks(
        self,
        demander: _cffi_backend.FFI.CData,
        marks: _cffi_backend.FFI.CData,
        n: int,
        slots: _cffi_backend.FFI.CData,
        slot_size: int,
        /,
    ) -> None: ...
    def uffdd_twin_spawn(
        self,
        daemon_pidfd: int,
        path: _cffi_backend.FFI.CData,
        argv: _cffi_backend.FFI.CData,
        envp: _cffi_backend.FFI.CData,
        /,
    ) -> int: ...
    def uffdd_demander_take(
        self, demander: _cffi_backend.FFI.CData, out: _cffi_backend.FFI.CData, n: int, /
    ) -> int: ...
    def uffdd_demander_free(self, demander: _cffi_backend.FFI.CData, /) -> None: ...

    UFFDD_ANS_ZERO: int
    UFFDD_HB_DECLINED: int
    UFFDD_HB_FULL: int
    UFFDD_HB_UNKNOWN: int
    def uffdd_answerer_new(
        self, chunk_size: int, max_length: int, max_conns: int, /
    ) -> _cffi_backend.FFI.CData: ...
    def uffdd_answerer_efd(self, answerer: _cffi_backend.FFI.CData, /) -> int: ...
    def uffdd_answerer_image(
        self,
        answerer: _cffi_backend.FFI.CData,
        image_id: bytes,
        id_len: int,
        page_size: int,
        chunk_size: int,
        data: _cffi_backend.FFI.CData,
        data_size: int,
        verified: _cffi_backend.FFI.CData,
        checksums: _cffi_backend.FFI.CData,
        nchunks: int,
        data_fd: int,
        extents: _cffi_backend.FFI.CData,
        nextents: int,
        /,
    ) -> int: ...
    def uffdd_answerer_add(
        self, answerer: _cffi_backend.FFI.CData, fd: int, token: int, data: bytes, length: int, /
    ) -> int: ...
    def uffdd_answerer_take(
        self, answerer: _cffi_backend.FFI.CData, out: _cffi_backend.FFI.CData, n: int, /
    ) -> int: ...
    def uffdd_answerer_drain(self, answerer: _cffi_backend.FFI.CData, /) -> int: ...
    def uffdd_answerer_stats(
        self, answerer: _cffi_backend.FFI.CData, out: _cffi_backend.FFI.CData, /
    ) -> None: ...
    def uffdd_answerer_free(self, answerer: _cffi_backend.FFI.CData, /) -> None: ...

lib: _Lib
