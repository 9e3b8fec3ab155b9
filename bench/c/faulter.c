/* The faulting side's timing loop, loaded into the restored process with ctypes.
 *
 * Why C: the memory under test must be in the process that faults, and that process
 * also speaks uffdd's handover (Python, uffdd.restorer). Timing each access from C
 * keeps interpreter overhead out of every sample; ctypes releases the GIL for the
 * call. Each access is one volatile byte read bracketed by CLOCK_MONOTONIC reads.
 */
#include <stddef.h>
#include <stdint.h>
#include <time.h>

static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* Read one byte at each address in order; lat_ns[i] gets each access's latency and
 * start_ns[i] its CLOCK_MONOTONIC start (absolute, the clock Python's time.monotonic()
 * reads, so accesses can be placed against events in other processes: a daemon's
 * death, its successor's start), each if not NULL. Returns the total elapsed ns. */
uint64_t touch(const uint64_t *addrs, size_t n, uint64_t *start_ns, uint64_t *lat_ns)
{
    volatile uint64_t sink = 0;
    uint64_t begin = now_ns();
    for (size_t i = 0; i < n; i++) {
        uint64_t t0 = now_ns();
        sink += *(volatile const uint8_t *)(uintptr_t)addrs[i];
        uint64_t t1 = now_ns();
        if (start_ns)
            start_ns[i] = t0;
        if (lat_ns)
            lat_ns[i] = t1 - t0;
    }
    (void)sink;
    return now_ns() - begin;
}
