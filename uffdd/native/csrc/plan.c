/* The core's fault plan, executed: what a fault gets when C answers it on its own.

   Why here and only here: the policy is the core's (core/policy.py: FaultPlan,
   plan_fault); the fast serve and the demand thread both answer faults without asking
   it, so both call this one function with the plan and the sorted, disjoint tables the
   core gave them (where image data, and where zeros, are the right answer). It looks
   up and clips; it decides nothing the plan does not say. tests/native/test_plan.py
   holds it to plan_fault's answers. */
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

int plan_valid(const struct uffdd_plan *plan)
{
    return plan->block >= UFFDD_PAGE && !(plan->block & (plan->block - 1));
}

uint64_t plan_block(const struct uffdd_plan *plan, uint64_t page)
{
    return page & ~(plan->block - 1);
}

/* Append [max(lo, row start), min(hi, row end)) of ``rows[i]`` to ``out`` if there is
   room; the count. */
static size_t span_add(struct uffdd_span *out, size_t n, size_t cap,
                       const struct uffdd_fast_range *rows, size_t i, int zero, uint64_t lo,
                       uint64_t hi)
{
    if (n == cap)
        return n;
    uint64_t start = rows[i].run_start < lo ? lo : rows[i].run_start;
    uint64_t end = rows[i].run_end > hi ? hi : rows[i].run_end;
    out[n] = (struct uffdd_span){start, end, (uint32_t)zero, (uint32_t)i};
    return n + 1;
}

size_t uffdd_plan_fault(const struct uffdd_plan *plan, const struct uffdd_fast_range *data,
                        size_t ndata, const struct uffdd_fast_range *zeros, size_t nzeros,
                        uint64_t page, struct uffdd_span *out, size_t cap)
{
    uint64_t lo = plan_block(plan, page), hi = lo + plan->block;
    const struct uffdd_fast_range *own = range_find(data, ndata, page);
    int zero = own == NULL;
    if (zero)
        own = range_find(zeros, nzeros, page);
    if (own == NULL || cap == 0)
        return 0;
    const struct uffdd_fast_range *rows = zero ? zeros : data;
    size_t own_index = (size_t)(own - rows);
    size_t n = span_add(out, 0, cap, rows, own_index, zero, lo, hi);
    if (zero || !plan->whole_block)
        return n;
    for (size_t i = range_after(data, ndata, lo); i < ndata && data[i].run_start < hi; i++)
        if (i != own_index)
            n = span_add(out, n, cap, data, i, 0, lo, hi);
    for (size_t i = range_after(zeros, nzeros, lo); i < nzeros && zeros[i].run_start < hi; i++)
        n = span_add(out, n, cap, zeros, i, 1, lo, hi);
    return n;
}
