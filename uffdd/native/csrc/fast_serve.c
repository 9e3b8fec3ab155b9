/* The local fast serve: faults on pages whose data is local and verified, answered in C.

   Why: when a restore's image is on this host (an mmap), a fault needs no decision of
   the core, only a lookup and a UFFDIO_COPY. uffdd_fast_serve reads a uffd on the
   loop's thread, with the GIL released, answers every fault whose page lies in the
   core's table and whose checksum chunk is verified (the window the core's plan gives
   it, plan.c, when all of that is verified too), and hands every other message, raw
   and in order, back to the Python core: policy never moves into C. A read that holds
   a layout event goes back whole, its faults unanswered (uffd_msgs_hold_layout; why:
   docs/architecture.md, section 5.3). */
#include "uffdd.h"

#include <errno.h>
#include <string.h>
#include <unistd.h>

struct fast_ctx {
    int fd;
    const struct uffdd_fast_range *ranges;
    size_t nranges;
    const char *data;
    const uint8_t *verified;
    size_t nverified;
    unsigned chunk_shift;
    const struct uffdd_plan *plan;
    struct uffdd_fast_done *done;
    struct uffdd_fast_out *out;
};

/* Every checksum chunk holding the data of [start, end) has been verified. */
static int fast_verified(const struct fast_ctx *c, const struct uffdd_fast_range *r,
                         uint64_t start, uint64_t end)
{
    uint64_t first = (r->data_offset + (start - r->run_start)) >> c->chunk_shift;
    uint64_t last = (r->data_offset + (end - 1 - r->run_start)) >> c->chunk_shift;
    for (uint64_t chunk = first; chunk <= last; chunk++)
        if (chunk >= c->nverified || !c->verified[chunk])
            return 0;
    return 1;
}

/* UFFDIO_COPY [start, end): 0, or the errno; *copied: the bytes installed (woken). */
static int fast_copy(const struct fast_ctx *c, const struct uffdd_fast_range *r, uint64_t start,
                     uint64_t end, uint64_t index, uint64_t *copied)
{
    struct uffdio_copy arg;
    arg.dst = start;
    arg.src = (uint64_t)(uintptr_t)(c->data + r->data_offset + (start - r->run_start));
    arg.len = end - start;
    arg.mode = 0;
    arg.copy = 0;
    int err = ioctl(c->fd, UFFDIO_COPY, &arg) == 0 ? 0 : errno;
    *copied = err == 0 ? end - start : (arg.copy > 0 ? (uint64_t)arg.copy : 0);
    if (*copied) {
        struct uffdd_fast_done *d = &c->done[c->out->ndone++];
        d->run = start;
        d->len = *copied;
        d->msg_index = index;
    }
    return err;
}

/* Serve one message; 0 when answered here, 1 when it is the slow path's. */
static int fast_one(const struct fast_ctx *c, const struct uffd_msg *msg, uint64_t index)
{
    if (msg->event != UFFD_EVENT_PAGEFAULT)
        return 1;
    if (msg->arg.pagefault.flags & (UFFD_PAGEFAULT_FLAG_WP | UFFD_PAGEFAULT_FLAG_MINOR))
        return 1;
    uint64_t page = msg->arg.pagefault.address & ~(UFFDD_PAGE - 1);
    struct uffdd_span own;
    if (!uffdd_plan_fault(c->plan, c->ranges, c->nranges, NULL, 0, page, &own, 1))
        return 1;
    const struct uffdd_fast_range *r = &c->ranges[own.row];
    if (!fast_verified(c, r, page, page + UFFDD_PAGE))
        return 1;
    uint64_t start = own.start, end = own.end, copied = 0;
    if (end - start > UFFDD_PAGE && fast_verified(c, r, start, end)) {
        int err = fast_copy(c, r, start, end, index, &copied);
        if (err == 0 || page < start + copied)
            goto served;
        if (err != EEXIST && err != EAGAIN)
            return 1;
        /* EEXIST, or EAGAIN part way (a present page in the window, or an event
           pending): the faulting page alone says which. */
    }
    int err = fast_copy(c, r, page, page + UFFDD_PAGE, index, &copied);
    if (err == EEXIST) {
        struct uffdio_range range = {page, UFFDD_PAGE};
        if (ioctl(c->fd, UFFDIO_WAKE, &range) != 0)
            return 1;
    } else if (err != 0) {
        return 1;
    }
served:
    c->out->nfaults++;
    return 0;
}

/* Read and serve faults until the fd is empty (0), a message needs the slow path (1:
   it and the rest of its read are in rest; more may be queued), or done has no room
   for another read (2: call again). -errno when read() fails. */
int uffdd_fast_serve(int fd, const struct uffdd_fast_range *ranges, size_t nranges,
                     const char *data, const uint8_t *verified, size_t nverified,
                     unsigned chunk_shift, const struct uffdd_plan *plan, char *rest,
                     size_t rest_cap, struct uffdd_fast_done *done, size_t done_cap,
                     struct uffdd_fast_out *out, uint8_t *mark, uint8_t *slot)
{
    struct fast_ctx c = {fd,          ranges, nranges, data, verified, nverified,
                         chunk_shift, plan,   done,    out};
    struct uffd_msg msgs[UFFDD_FAST_BATCH];
    out->nread = out->nrest = out->ndone = out->nfaults = 0;
    /* a plan with whole blocks is for answers that cost a round trip (core/policy.py:
       Policy.fault_plan); this one answers from memory, a window per fault */
    if (rest_cap < UFFDD_FAST_BATCH || !plan_valid(plan) || plan->whole_block)
        return -EINVAL;
    for (;;) {
        if (done_cap - out->ndone < 2 * UFFDD_FAST_BATCH)
            return 2;
        ssize_t n = uffd_read_journaled(fd, msgs, UFFDD_FAST_BATCH, mark, slot);
        if (n < 0) {
            int err = errno;
            uffd_read_settled(mark, slot, 0, 0);
            if (err == EINTR)
                continue;
            return err == EAGAIN ? 0 : -err;
        }
        size_t count = (size_t)n / sizeof(struct uffd_msg);
        int layout = uffd_msgs_hold_layout(msgs, count);
        uffd_read_settled(mark, slot, count, layout);
        if (count == 0)
            return 0;
        if (layout) { /* all of it is the core's (uffdd.h) */
            memcpy(rest, msgs, count * sizeof(struct uffd_msg));
            out->nrest = count;
            out->nread += count;
            return 1;
        }
        for (size_t i = 0; i < count; i++) {
            if (fast_one(&c, &msgs[i], out->nread + i)) {
                memcpy(rest, &msgs[i], (count - i) * sizeof(struct uffd_msg));
                out->nrest = count - i;
                out->nread += count;
                return 1;
            }
        }
        out->nread += count;
    }
}
