/* The checksum of every chunk: xxHash's XXH3-64, from the system's xxhash.h.

   Why this one: XXH3 runs at memory speed (tens of GB/s), so checking every chunk
   costs a few percent of serving it, where zlib's crc32 would be the bottleneck; the
   image format and the fast lane carry it, and Python computes the same sums with the
   xxhash package (tests/native/test_checksum.py checks they agree). XXH_INLINE_ALL
   compiles the header's implementation into this file: no library is needed at run
   time. Debian's libxxhash-dev (0.8.1) provides the header. */
#include "uffdd.h"

#if defined(__has_include) && !__has_include(<xxhash.h>)
#error "uffdd needs xxHash's header xxhash.h (0.8 or later): install libxxhash-dev"
#else

#define XXH_INLINE_ALL
#include <xxhash.h>

#if XXH_VERSION_NUMBER < 800
#error "uffdd needs XXH3, from xxhash.h 0.8 or later: install a newer libxxhash-dev"
#endif

uint64_t uffdd_checksum(const void *data, size_t len)
{
    return XXH3_64bits(data, len);
}

#endif
