/* The demand thread (``uffdd-demand``): a remote process's faults read, fetched and
   installed in C.

   Why: with the background sweep running, a demand fault answered through the Python
   loop waited for that loop twice, to be read and to be answered, while it handled bulk
   chunks. So this pthread owns the uffds of remote processes once their page client's
   demand lane is up: it reads the ready ones, sends one urgent fast-lane request per
   data span the core's plan gives a fault (plan.c; all of them at once: one round trip
   for up to DEMAND_ROUND processes) on a blocking socket of its own, checks each
   chunk's checksum, and installs it with a waking UFFDIO_COPY. A span where the core
   named zeros (an image ZERO extent, or a range madvise removed) is zero-filled
   (UFFDIO_ZEROPAGE) with no round trip. Everything else (a layout event, a fault
   outside the ranges the core named, a refused window, a wrong checksum) goes to the
   loop as raw messages, in order, after a report of what C installed (the core's
   FastServed).

   Safety: each read holds the installer's uffd_lock; a read that returns a layout event
   fences that uffd, pauses it until the loop resumes it with the core's new tables,
   and has none of its faults answered (uffd_msgs_hold_layout). The fence protocol and
   why it holds: docs/architecture.md, section 5.3; this thread's locks, bounds and
   routes: sections 4, 5.1 and 6.2 B. */
#include "uffdd.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define DEMAND_MAX UFFDD_FAST_BATCH              /* messages per read */
#define DEMAND_REPORTS 256                       /* room for reports at first (it grows) */
#define DEMAND_ROUND 16                          /* processes read, and answered, per round trip */
#define DEMAND_DONE (16 * DEMAND_MAX)            /* installs one read may record */
#define DEMAND_WINDOWS (DEMAND_ROUND * DEMAND_MAX) /* per round trip */

struct demand_proc {
    int fd; /* -1: a free slot */
    int paused;
    int busy; /* in the thread's round now */
    uint64_t token;
    struct uffdd_fast_range *ranges; /* where a fault's answer is image data */
    size_t nranges;
    struct uffdd_fast_range *zeros; /* where it is zeros (data_offset unused) */
    size_t nzeros;
    char image_id[UFFDD_ID_MAX];
    size_t id_len;
};

struct demand_window {
    uint64_t run, image, len;
    int finished, failed;
    size_t batch; /* whose fault */
};

/* One process's read in a round. */
struct demand_batch {
    struct demand_proc *p;
    struct uffd_msg msgs[DEMAND_MAX];
    uint8_t served[DEMAND_MAX];
    size_t fault_window[DEMAND_MAX];
    size_t count, ndone;
    int layout;
    struct uffdd_demand_report r;
};

struct uffdd_demander {
    struct epoll_thread t; /* its lock: procs, busy, the reports */
    pthread_cond_t idle;   /* to the loop: busy changed */
    struct demand_proc *procs;
    size_t nprocs;
    int broken;  /* the connection failed: serve nothing (the thread's own) */
    int starved; /* a round found no memory: the loop was told (LANE, ENOMEM) */
    int sock;
    struct uffdd_plan plan; /* the core's (core/policy.py: Policy.fault_plan) */
    struct uffdd_span *spans; /* room for one fault's answer */
    size_t nspans;
    uint64_t next_id;
    struct uffdd_installer *installer; /* may be NULL */
    char *buf;                         /* one window */
    struct demand_batch *batches;      /* DEMAND_ROUND */
    struct demand_window *windows;     /* DEMAND_WINDOWS */
    char *frames;                      /* their request frames */
    uint8_t *marks;                    /* read marks by fd, shared with the journal */
    size_t nmarks;
    uint8_t *slots;                    /* held batches by fd (keeper/journal.py) */
    size_t slot_size;
};

/* The journal's mark and slot of ``fd`` (keeper/journal.py), or NULLs. */
static uint8_t *demand_slot(struct uffdd_demander *d, int fd, uint8_t **mark)
{
    if (!d->marks || fd < 0 || (size_t)fd >= d->nmarks) {
        *mark = NULL;
        return NULL;
    }
    *mark = &d->marks[fd];
    return d->slots + (size_t)fd * d->slot_size;
}

/* Install [run, run+len) with waking ioctls: copied from src, or zero-filled when src
   is NULL; a present page is woken and skipped. 0 when every page is in, else the
   errno (EAGAIN: an event is pending). */
static int demand_install(int fd, uint64_t run, const char *src, uint64_t len,
                          struct uffdd_fast_done *done, size_t done_cap, size_t *ndone)
{
    uint64_t at = 0;
    while (at < len) {
        if (*ndone == done_cap)
            return ENOSPC; /* before the ioctl: every install is recorded */
        int err;
        int64_t progress; /* the kernel's count of bytes done, or a negative errno */
        if (src) {
            struct uffdio_copy c = {run + at, (uint64_t)(uintptr_t)(src + at), len - at, 0, 0};
            err = ioctl(fd, UFFDIO_COPY, &c) == 0 ? 0 : errno;
            progress = c.copy;
        } else {
            struct uffdio_zeropage z = {{run + at, len - at}, 0, 0};
            err = ioctl(fd, UFFDIO_ZEROPAGE, &z) == 0 ? 0 : errno;
            progress = z.zeropage;
        }
        uint64_t filled = err == 0 ? len - at : (progress > 0 ? (uint64_t)progress : 0);
        if (filled) {
            done[(*ndone)++] = (struct uffdd_fast_done){run + at, filled, 0};
            at += filled;
            continue;
        }
        if (err != EEXIST)
            return err;
        struct uffdio_range page = {run + at, UFFDD_PAGE};
        if (ioctl(fd, UFFDIO_WAKE, &page) != 0)
            return errno;
        at += UFFDD_PAGE;
    }
    return 0;
}

static int demand_send(int sock, const char *p, size_t len)
{
    while (len > 0) {
        ssize_t n = send(sock, p, len, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return n < 0 ? errno : EPIPE;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

/* The window of data span ``s`` (of row ``r``), one per run start among the batch's
   windows (from ``first``): its index, or SIZE_MAX when there is no room. */
static size_t demand_window(struct demand_window *win, size_t *nwin, size_t first,
                            const struct uffdd_fast_range *r, const struct uffdd_span *s,
                            size_t batch)
{
    uint64_t start = s->start, stop = s->end;
    size_t w = first;
    while (w < *nwin && win[w].run != start)
        w++;
    if (w < *nwin)
        return w;
    if (*nwin == DEMAND_WINDOWS)
        return SIZE_MAX;
    win[(*nwin)++] = (struct demand_window){
        start, r->data_offset + (start - r->run_start), stop - start, 0, 0, batch};
    return w;
}

/* The windows of a batch's faults as the core's plan says (plan.c): a zero fault's span
   filled at once (known zeros: an image ZERO extent, or madvise'd; no round trip), a
   data fault's own span fetched, and with a whole-block plan the rest of its block in
   the same round trip (its data spans fetched, its zero spans filled here). The rest of
   a block is best effort: nobody faulted there yet, and what fails stays missing for
   the core. */
static void demand_plan(struct uffdd_demander *d, struct demand_batch *b, size_t k,
                        struct demand_window *win, size_t *nwin)
{
    const struct demand_proc *p = b->p;
    struct uffdd_span *spans = d->spans;
    size_t first_win = *nwin;
    uint64_t whole = UINT64_MAX; /* the last block made whole in this batch */
    for (size_t i = 0; i < b->count; i++) {
        const struct uffd_msg *m = &b->msgs[i];
        b->served[i] = 0;
        b->fault_window[i] = SIZE_MAX;
        if (b->layout || !b->r.installs ||
            (m->arg.pagefault.flags & (UFFD_PAGEFAULT_FLAG_WP | UFFD_PAGEFAULT_FLAG_MINOR)))
            continue;
        uint64_t page = m->arg.pagefault.address & ~(UFFDD_PAGE - 1);
        size_t n = uffdd_plan_fault(&d->plan, p->ranges, p->nranges, p->zeros, p->nzeros, page,
                                    spans, d->nspans);
        if (n == 0)
            continue; /* the core's */
        if (spans[0].zero) {
            b->served[i] = demand_install(p->fd, spans[0].start, NULL,
                                          spans[0].end - spans[0].start, b->r.installs,
                                          DEMAND_DONE, &b->ndone) == 0;
            continue;
        }
        b->fault_window[i] =
            demand_window(win, nwin, first_win, &p->ranges[spans[0].row], &spans[0], k);
        uint64_t block = plan_block(&d->plan, page);
        if (b->fault_window[i] == SIZE_MAX || block == whole)
            continue;
        whole = block;
        for (size_t j = 1; j < n; j++) {
            if (spans[j].zero)
                demand_install(p->fd, spans[j].start, NULL, spans[j].end - spans[j].start,
                               b->r.installs, DEMAND_DONE, &b->ndone);
            else
                demand_window(win, nwin, first_win, &p->ranges[spans[j].row], &spans[j], k);
        }
    }
}

/* Fetch and install the window of every fault of the round's batches that lies in its
   process's ranges: all requests sent at once, the answers installed as they come.
   b->served[i]: that fault's window is in. Returns 0, or the errno that makes the
   connection unusable (what was installed before it is in the batches' reports). */
static int demand_serve(struct uffdd_demander *d, struct demand_batch *batches, size_t nb)
{
    struct demand_window *win = d->windows;
    size_t nwin = 0;
    for (size_t k = 0; k < nb; k++)
        demand_plan(d, &batches[k], k, win, &nwin);
    if (nwin == 0)
        return 0;

    size_t flen = 0;
    uint64_t first_id = d->next_id;
    d->next_id += nwin;
    for (size_t w = 0; w < nwin; w++) {
        const struct demand_proc *p = batches[win[w].batch].p;
        flen += frame_encode_request(d->frames + flen, first_id + w, win[w].image,
                                     (uint32_t)win[w].len, p->image_id, p->id_len);
    }
    int error = demand_send(d->sock, d->frames, flen);
    size_t open_windows = error ? 0 : nwin;
    while (open_windows > 0) {
        unsigned char h[UFFDD_FRAME_HEADER];
        struct uffdd_frame f;
        int rc = socket_read(d->sock, (char *)h, sizeof h);
        if (rc <= 0) {
            error = rc < 0 ? -rc : ECONNRESET;
            break;
        }
        uint64_t w = 0;
        if (frame_parse_response(h, &f) < 0 || f.request_id < first_id ||
            (w = f.request_id - first_id) >= nwin || win[w].finished || f.body_len > d->plan.block) {
            error = EPROTO;
            break;
        }
        struct demand_window *x = &win[w];
        struct demand_batch *b = &batches[x->batch];
        if (f.body_len && (rc = socket_read(d->sock, d->buf, f.body_len)) <= 0) {
            error = rc < 0 ? -rc : ECONNRESET;
            break;
        }
        if (f.flags & UFFDD_FLAG_ERROR) {
            x->failed = 1;
        } else if (f.address < x->image || f.length > x->len ||
                   f.address - x->image > x->len - f.length) {
            error = EPROTO; /* a chunk outside what was asked */
            break;
        } else if (!x->failed) {
            if (f.flags & UFFDD_FLAG_ZERO)
                memset(d->buf, 0, f.length);
            else if (uffdd_checksum(d->buf, f.length) != f.checksum)
                x->failed = 1;
            if (!x->failed &&
                demand_install(b->p->fd, x->run + (f.address - x->image), d->buf, f.length,
                               b->r.installs, DEMAND_DONE, &b->ndone) != 0)
                x->failed = 1;
        }
        if (f.flags & UFFDD_FLAG_LAST) {
            x->finished = 1;
            open_windows--;
        }
    }
    for (size_t k = 0; k < nb; k++) {
        struct demand_batch *b = &batches[k];
        for (size_t i = 0; i < b->count; i++) {
            size_t w = b->fault_window[i];
            if (w != SIZE_MAX && win[w].finished && !win[w].failed)
                b->served[i] = 1;
        }
    }
    return error;
}

/* Queue a report for the loop; takes its buffers. It never waits for the loop (the
   loop may be waiting for this thread in resume or remove) and never fails: every
   round reserves a report for each uffd it reads before it reads one, and the queue
   always keeps room for one more (demander_main), so nothing read from a uffd is lost
   for want of memory. The queue is bounded by what the processes can have outstanding
   (a thread faults once until it is woken; answered faults come back as more faults
   only as fast as C answers). */
static void demand_pause(struct uffdd_demander *d, struct demand_proc *p);

static void demand_report(struct uffdd_demander *d, struct uffdd_demand_report *r)
{
    pthread_mutex_lock(&d->t.lock);
    int err = epoll_thread_push_locked(&d->t, r);
    pthread_mutex_unlock(&d->t.lock);
    (void)err; /* cannot fail: the room was reserved (demander_main) */
}

/* No memory for a round: read none of its uffds (their messages stay in the kernel,
   for the loop), take them out of the epoll set, and tell the loop once that this
   thread's service ended (LANE, ENOMEM), in the report room always kept free. */
static void demand_starve(struct uffdd_demander *d, struct demand_batch *batches, size_t n)
{
    for (size_t k = 0; k < n; k++)
        demand_pause(d, batches[k].p);
    pthread_mutex_lock(&d->t.lock);
    if (!d->starved) {
        struct uffdd_demand_report r = {.flags = UFFDD_DR_LANE, .err = ENOMEM,
                                        .read_at = monotonic_now()};
        r.done_at = r.read_at;
        d->starved = 1;
        d->broken = 1;
        int err = epoll_thread_push_locked(&d->t, &r);
        (void)err; /* the room kept free (demander_main) */
    }
    pthread_mutex_unlock(&d->t.lock);
}

/* Read nothing more of the slot's uffd until resumed. Out of the epoll set, not just
   disarmed: EPOLLHUP and EPOLLERR are reported even for a disarmed fd. */
static void demand_pause(struct uffdd_demander *d, struct demand_proc *p)
{
    pthread_mutex_lock(&d->t.lock);
    p->paused = 1;
    pthread_mutex_unlock(&d->t.lock);
    epoll_ctl(d->t.epfd, EPOLL_CTL_DEL, p->fd, NULL);
}

/* Read one ready uffd into its batch, under uffd_lock. 0 when there is something for
   the round (faults, or a layout event: fenced, paused, reported with the round), 1
   when there is nothing (EAGAIN), -1 when the read failed (reported, paused), -2 when
   there is no memory for what a read may bring (nothing read). */
static int demand_read(struct uffdd_demander *d, struct demand_batch *b)
{
    struct demand_proc *p = b->p;
    /* the report's buffers before the read: a read's messages are the kernel's only
       copy of those events */
    struct uffdd_fast_done *installs = malloc(DEMAND_DONE * sizeof *installs);
    char *msgs = malloc(sizeof b->msgs);
    if (!installs || !msgs) {
        free(installs);
        free(msgs);
        return -2;
    }
    if (d->installer)
        uffdd_installer_hold(d->installer);
    uint8_t *mark;
    uint8_t *slot = demand_slot(d, p->fd, &mark);
    ssize_t n = uffd_read_journaled(p->fd, b->msgs, DEMAND_MAX, mark, slot);
    int err = n < 0 ? errno : 0;
    b->r = (struct uffdd_demand_report){.token = p->token, .read_at = monotonic_now()};
    b->count = n > 0 ? (size_t)n / sizeof b->msgs[0] : 0;
    b->ndone = 0;
    b->layout = uffd_msgs_hold_layout(b->msgs, b->count);
    uffd_read_settled(mark, slot, b->count, b->layout);
    if (b->layout && d->installer)
        uffdd_installer_fence_held(d->installer, p->fd);
    if (d->installer)
        uffdd_installer_unhold(d->installer);
    if (n <= 0) {
        free(installs);
        free(msgs);
        if (n < 0 && (err == EAGAIN || err == EINTR))
            return 1;
        /* nothing more is read from this fd: the loop ends its process */
        b->r.flags |= UFFDD_DR_ERROR;
        b->r.err = n < 0 ? err : EIO;
        b->r.done_at = b->r.read_at;
        demand_pause(d, p);
        demand_report(d, &b->r);
        return -1;
    }
    b->r.installs = installs;
    b->r.msgs = msgs;
    if (b->layout)
        demand_pause(d, p);
    return 0;
}

/* The report of a batch after the round: what was answered, then the rest. */
static void demand_finish(struct uffdd_demander *d, struct demand_batch *b, int lane)
{
    struct uffdd_demand_report *r = &b->r;
    for (size_t i = 0; i < b->count; i++) {
        if (b->served[i])
            r->nfaults++;
        else
            memcpy(r->msgs + (r->nmsgs++) * sizeof b->msgs[0], &b->msgs[i], sizeof b->msgs[0]);
    }
    r->ninstalls = (uint32_t)b->ndone;
    if (b->ndone == 0) {
        free(r->installs);
        r->installs = NULL;
    }
    if (lane) {
        r->flags |= UFFDD_DR_LANE;
        r->err = lane;
    }
    if (b->layout)
        r->flags |= UFFDD_DR_LAYOUT;
    else if (b->count < DEMAND_MAX)
        r->flags |= UFFDD_DR_DRAINED; /* a short read emptied the queue */
    r->done_at = monotonic_now();
    demand_report(d, r);
}

static void demand_unbusy(struct uffdd_demander *d, struct demand_batch *batches, size_t n)
{
    pthread_mutex_lock(&d->t.lock);
    for (size_t k = 0; k < n; k++)
        batches[k].p->busy = 0;
    pthread_cond_broadcast(&d->idle);
    pthread_mutex_unlock(&d->t.lock);
}

static void *demander_main(void *arg)
{
    struct uffdd_demander *d = arg;
    pthread_setname_np(pthread_self(), "uffdd-demand");
    struct epoll_event evs[DEMAND_ROUND];
    for (;;) {
        int control;
        int n = epoll_thread_wait(&d->t, evs, DEMAND_ROUND, -1, &control);
        if (n < 0)
            break;
        size_t nb = 0;
        pthread_mutex_lock(&d->t.lock);
        if (d->t.stop) {
            pthread_mutex_unlock(&d->t.lock);
            break;
        }
        for (int i = 0; i < n; i++) {
            struct demand_proc *p = &d->procs[evs[i].data.u64];
            if (p->fd < 0 || p->paused || p->busy)
                continue;
            p->busy = 1;
            d->batches[nb++].p = p;
        }
        /* a report for each uffd read, and one more kept free (demand_starve) */
        int room = epoll_thread_reserve_locked(&d->t, nb + 1) == 0;
        if (room)
            d->starved = 0;
        pthread_mutex_unlock(&d->t.lock);
        if (!room) {
            demand_starve(d, d->batches, nb);
            demand_unbusy(d, d->batches, nb);
            continue;
        }
        /* read them all, then one round trip for all their faults */
        size_t kept = 0;
        for (size_t k = 0; k < nb; k++) {
            struct demand_batch *b = &d->batches[k];
            int rc = demand_read(d, b);
            if (rc == -2) {
                demand_starve(d, b, nb - k);
                demand_unbusy(d, b, nb - k);
                break;
            }
            if (rc == 0) {
                if (kept != k)
                    d->batches[kept] = *b;
                kept++;
            } else {
                demand_unbusy(d, b, 1);
            }
        }
        int lane = 0;
        if (kept && !d->broken) {
            lane = demand_serve(d, d->batches, kept);
            if (lane)
                d->broken = 1;
        } else {
            for (size_t k = 0; k < kept; k++)
                memset(d->batches[k].served, 0, sizeof d->batches[k].served);
        }
        for (size_t k = 0; k < kept; k++)
            demand_finish(d, &d->batches[k], lane);
        demand_unbusy(d, d->batches, kept);
    }
    return NULL;
}

/* The slot is free again, its ranges gone. */
static void demand_clear(struct demand_proc *p)
{
    p->fd = -1;
    p->paused = 0;
    free(p->ranges);
    free(p->zeros);
    p->ranges = NULL;
    p->zeros = NULL;
}

static void demander_release(struct uffdd_demander *d)
{
    for (size_t i = 0; d->procs && i < d->nprocs; i++)
        demand_clear(&d->procs[i]);
    free(d->procs);
    free(d->buf);
    free(d->spans);
    free(d->batches);
    free(d->windows);
    free(d->frames);
    free(d);
}

/* A started demand thread on the connected, blocking socket ``sock`` (it does not own
   it), or NULL (errno set). ``installer`` may be NULL; with one, every uffd added must
   be watched by it. */
struct uffdd_demander *uffdd_demander_new(int sock, const struct uffdd_plan *plan,
                                          size_t max_procs, struct uffdd_installer *installer)
{
    if (!plan_valid(plan) || max_procs < 1) {
        errno = EINVAL;
        return NULL;
    }
    struct uffdd_demander *d = calloc(1, sizeof *d);
    if (!d)
        return NULL;
    d->procs = calloc(max_procs, sizeof *d->procs);
    d->buf = malloc(plan->block);
    d->nspans = plan->block / UFFDD_PAGE + 1; /* disjoint page-aligned rows in a block */
    d->spans = calloc(d->nspans, sizeof *d->spans);
    d->batches = calloc(DEMAND_ROUND, sizeof *d->batches);
    d->windows = calloc(DEMAND_WINDOWS, sizeof *d->windows);
    d->frames = malloc(DEMAND_WINDOWS * (UFFDD_REQUEST_HEADER + UFFDD_ID_MAX));
    if (!d->procs || !d->buf || !d->spans || !d->batches || !d->windows || !d->frames) {
        demander_release(d);
        errno = ENOMEM;
        return NULL;
    }
    int err = epoll_thread_open(&d->t, sizeof(struct uffdd_demand_report), DEMAND_REPORTS);
    if (err) {
        demander_release(d);
        errno = err;
        return NULL;
    }
    for (size_t i = 0; i < max_procs; i++)
        d->procs[i].fd = -1;
    d->nprocs = max_procs;
    d->sock = sock;
    d->plan = *plan;
    d->next_id = 1;
    d->installer = installer;
    pthread_cond_init(&d->idle, NULL);
    err = epoll_thread_start(&d->t, demander_main, d);
    if (err) {
        pthread_cond_destroy(&d->idle);
        epoll_thread_release(&d->t);
        demander_release(d);
        errno = err;
        return NULL;
    }
    return d;
}

int uffdd_demander_efd(const struct uffdd_demander *d)
{
    return d->t.out_efd;
}

static int demand_set_ranges(struct demand_proc *p, const struct uffdd_fast_range *ranges,
                             size_t nranges, const struct uffdd_fast_range *zeros, size_t nzeros)
{
    struct uffdd_fast_range *copy = malloc((nranges ? nranges : 1) * sizeof *copy);
    struct uffdd_fast_range *zcopy = malloc((nzeros ? nzeros : 1) * sizeof *zcopy);
    if (!copy || !zcopy) {
        free(copy);
        free(zcopy);
        return -ENOMEM;
    }
    if (nranges)
        memcpy(copy, ranges, nranges * sizeof *copy);
    if (nzeros)
        memcpy(zcopy, zeros, nzeros * sizeof *zcopy);
    free(p->ranges);
    free(p->zeros);
    p->ranges = copy;
    p->nranges = nranges;
    p->zeros = zcopy;
    p->nzeros = nzeros;
    return 0;
}

/* Serve the uffd ``fd`` (non-blocking) from now on: the slot, or -errno. */
int uffdd_demander_add(struct uffdd_demander *d, int fd, uint64_t token, const char *image_id,
                       size_t id_len, const struct uffdd_fast_range *ranges, size_t nranges,
                       const struct uffdd_fast_range *zeros, size_t nzeros)
{
    if (id_len > UFFDD_ID_MAX)
        return -EINVAL;
    pthread_mutex_lock(&d->t.lock);
    size_t slot = 0;
    while (slot < d->nprocs && d->procs[slot].fd >= 0)
        slot++;
    int rc = slot == d->nprocs ? -ENOSPC : 0;
    struct demand_proc *p = rc == 0 ? &d->procs[slot] : NULL;
    if (rc == 0) {
        p->ranges = NULL;
        p->zeros = NULL;
        rc = demand_set_ranges(p, ranges, nranges, zeros, nzeros);
    }
    if (rc == 0) {
        p->token = token;
        p->paused = 0;
        p->busy = 0;
        memcpy(p->image_id, image_id, id_len);
        p->id_len = id_len;
        p->fd = fd;
        struct epoll_event ev = {.events = EPOLLIN, .data.u64 = slot};
        if (epoll_ctl(d->t.epfd, EPOLL_CTL_ADD, fd, &ev) != 0) {
            rc = -errno;
            demand_clear(p);
        }
    }
    pthread_mutex_unlock(&d->t.lock);
    return rc < 0 ? rc : (int)slot;
}

/* Journal each read from now on (``uffd_read_journaled``): marks in ``marks[fd]`` (``n``
   entries; NULL: none), messages in ``slots + fd * slot_size`` (16 header bytes, then
   room for DEMAND_MAX messages). */
void uffdd_demander_marks(struct uffdd_demander *d, uint8_t *marks, size_t n, uint8_t *slots,
                          size_t slot_size)
{
    pthread_mutex_lock(&d->t.lock);
    d->marks = marks;
    d->nmarks = n;
    d->slots = slots;
    d->slot_size = slot_size;
    pthread_mutex_unlock(&d->t.lock);
}

/* The loop has handled the slot's layout event: read it again, with these ranges. */
int uffdd_demander_resume(struct uffdd_demander *d, int slot,
                          const struct uffdd_fast_range *ranges, size_t nranges,
                          const struct uffdd_fast_range *zeros, size_t nzeros)
{
    pthread_mutex_lock(&d->t.lock);
    struct demand_proc *p = &d->procs[slot];
    while (p->busy)
        pthread_cond_wait(&d->idle, &d->t.lock);
    /* a removed slot is nobody's to resume (its uffd is the loop's again) */
    int rc = p->fd < 0 ? -EBADF : demand_set_ranges(p, ranges, nranges, zeros, nzeros);
    if (rc == 0 && p->paused) {
        p->paused = 0;
        struct epoll_event ev = {.events = EPOLLIN, .data.u64 = (uint64_t)slot};
        if (epoll_ctl(d->t.epfd, EPOLL_CTL_ADD, p->fd, &ev) != 0)
            rc = -errno;
    }
    pthread_mutex_unlock(&d->t.lock);
    return rc;
}

/* Stop serving the slot's uffd; when this returns the thread no longer touches it
   (its reports may still wait for the loop). */
void uffdd_demander_remove(struct uffdd_demander *d, int slot)
{
    pthread_mutex_lock(&d->t.lock);
    struct demand_proc *p = &d->procs[slot];
    while (p->busy)
        pthread_cond_wait(&d->idle, &d->t.lock);
    if (p->fd >= 0 && !p->paused)
        epoll_ctl(d->t.epfd, EPOLL_CTL_DEL, p->fd, NULL);
    demand_clear(p);
    pthread_mutex_unlock(&d->t.lock);
}

/* Move up to n reports to out (their buffers are the caller's now); the number. */
size_t uffdd_demander_take(struct uffdd_demander *d, struct uffdd_demand_report *out, size_t n)
{
    return epoll_thread_take(&d->t, out, n);
}

static void drop_report(void *item)
{
    struct uffdd_demand_report *r = item;
    free(r->installs);
    free(r->msgs);
}

/* Stop the thread (after the read or fetch in progress) and free everything; reports
   not taken are freed. The socket and the uffds stay open (they are the caller's). */
void uffdd_demander_free(struct uffdd_demander *d)
{
    epoll_thread_stop(&d->t);
    shutdown(d->sock, SHUT_RDWR); /* a fetch in progress ends at once */
    epoll_thread_end(&d->t, drop_report);
    pthread_cond_destroy(&d->idle);
    demander_release(d);
}
