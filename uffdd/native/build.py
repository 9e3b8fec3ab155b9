"""The cffi builder of ``uffdd.native._ffi``, from the C in ``csrc/`` (run by hatch_build.py).

Why cffi's API mode: ioctl request numbers and struct layouts come from the C compiler
reading the kernel's headers (``csrc/uapi.h`` fills in what older headers lack), not
from numbers retyped in Python, and calls release the GIL. The C itself lives in
``csrc/*.c`` and ``csrc/uffdd.h``; what Python may call is ``csrc/ffi_api.cdef``, and the
generated wrapper's preamble is ``csrc/ffi_module.h``. No Python file holds C
(tests/test_architecture.py checks it).

Warnings are errors (``CFLAGS``) for every file of ``csrc/`` and for cffi's generated
wrapper (``_ffi.c``, which includes ``uffdd.h`` and calls each function of the cdef):
both are compiled as one extension with the same flags, and the wrapper needs no
exception. ``-fvisibility=hidden`` keeps the C's names inside the extension (only its
init function is exported).

The checksum comes from xxHash's header (``checksum.c``, ``XXH_INLINE_ALL``): a build
without ``xxhash.h`` stops here, saying what to install.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sysconfig
from pathlib import Path

from cffi import FFI

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = sorted(CSRC.glob("*.c"))
CDEF = CSRC / "ffi_api.cdef"
PREAMBLE = CSRC / "ffi_module.h"
CFLAGS = ("-Wall", "-Wextra", "-Werror", "-fvisibility=hidden")
MODULE = "uffdd.native._ffi"


def compiler() -> list[str]:
    """The C compiler Python's extensions are built with (``$CC`` first)."""
    return shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")


def require_xxhash() -> None:
    """Stop with a clear message when xxHash's header (0.8 or later) is not installed."""
    probe = subprocess.run(  # checksum.c's own checks say what is missing
        [*compiler(), "-E", f"-I{CSRC}", str(CSRC / "checksum.c"), "-o", os.devnull],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        raise RuntimeError(
            "uffdd's C checksums with XXH3 from xxHash's header, xxhash.h (0.8 or later), "
            "which this machine lacks: install libxxhash-dev (Debian, Ubuntu) or "
            f"xxhash-devel (Fedora).\n{probe.stderr.strip()}"
        )


def make_builder() -> FFI:
    """The cffi builder for ``uffdd.native._ffi``, after checking what it needs."""
    require_xxhash()
    builder = FFI()
    builder.cdef(CDEF.read_text())
    builder.set_source(
        MODULE,
        PREAMBLE.read_text(),
        sources=[str(path) for path in SOURCES],
        include_dirs=[str(CSRC)],
        extra_compile_args=list(CFLAGS),
    )
    return builder


if __name__ == "__main__":
    make_builder().compile(verbose=True)
