/* Sorted, disjoint tables of run-time ranges (where a fault's answer is image data,
   or zeros), as the fast serve and the demand thread look faults up in them. The
   tables are the core's (native/fast_serve.py's range_array lays them out); C only
   looks up, it never derives a range itself. */
#include "uffdd.h"

size_t range_after(const struct uffdd_fast_range *ranges, size_t n, uint64_t addr)
{
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (ranges[mid].run_end <= addr)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

const struct uffdd_fast_range *range_find(const struct uffdd_fast_range *ranges, size_t n,
                                          uint64_t addr)
{
    size_t i = range_after(ranges, n, addr); /* disjoint: the only one that can hold it */
    return i < n && ranges[i].run_start <= addr ? &ranges[i] : NULL;
}

void range_window(const struct uffdd_fast_range *r, uint64_t page, uint64_t around,
                  uint64_t *start, uint64_t *end)
{
    uint64_t lo = page & ~(around - 1), hi = lo + around;
    *start = lo < r->run_start ? r->run_start : lo;
    *end = hi > r->run_end ? r->run_end : hi;
}
