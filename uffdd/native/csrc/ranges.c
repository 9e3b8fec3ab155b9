/* Sorted, disjoint tables of run-time ranges (where a fault's answer is image data,
   or zeros), as the fast serve and the demand thread look faults up in them. The
   tables are the core's (native/fast_serve.py's range_array lays them out); C only
   looks up, it never derives a range itself. */
#include "uffdd.h"

const struct uffdd_fast_range *range_find(const struct uffdd_fast_range *ranges, size_t n,
                                          uint64_t addr)
{
    size_t lo = 0, hi = n; /* the first range with run_start > addr */
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (ranges[mid].run_start <= addr)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo == 0 || addr >= ranges[lo - 1].run_end)
        return NULL;
    return &ranges[lo - 1];
}

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

void range_window(const struct uffdd_fast_range *r, uint64_t page, uint64_t around,
                  uint64_t *start, uint64_t *end)
{
    uint64_t lo = page & ~(around - 1), hi = lo + around;
    *start = lo < r->run_start ? r->run_start : lo;
    *end = hi > r->run_end ? r->run_end : hi;
}
