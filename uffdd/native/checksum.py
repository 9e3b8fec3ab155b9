"""uffdd's checksum (xxh3-64) as a C function pointer, for the cffi module's threads.

Why: the threads that check chunks on the daemon (``uffdd_demander_*``) and verify
image data on the page server (``uffdd_answerer_*``) run without the GIL, so they
cannot call ``xxhash.xxh3_64_intdigest``; they call ``XXH3_64bits`` from the xxhash
package's own extension, the same code, so C and Python can never disagree on a sum.
"""

from __future__ import annotations

import ctypes
import importlib.util
from typing import Any

from uffdd.native._ffi import ffi


def _xxh3_function() -> Any:
    spec = importlib.util.find_spec("xxhash._xxhash")
    origin = spec.origin if spec is not None else None
    assert origin is not None, "the xxhash package has no extension"
    library = ctypes.CDLL(origin)
    address = ctypes.cast(library.XXH3_64bits, ctypes.c_void_p).value
    assert address is not None
    return ffi.cast("uffdd_hash_fn", address)


XXH3_64BITS = _xxh3_function()
"""``uint64_t XXH3_64bits(const void *, size_t)``, as ``uffdd_hash_fn``: what
``image.format.checksum`` computes."""
