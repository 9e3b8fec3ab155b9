"""cffi API-mode builder for the userfaultfd binding (run by hatch_build.py).

Why API mode: the ioctl request numbers and struct layouts come from the C compiler
reading <linux/userfaultfd.h>, not from numbers we retype in Python, and calls release
the GIL. ``uffdd_fast_serve`` is the hot path in C: it reads a uffd and answers faults on
pages whose data is local (an mmap'ed image) and verified, and hands every other message,
raw, back to the Python core (policy never moves into C). ``uffdd_installer_*`` runs
bulk UFFDIO_COPYs on a pthread of its own, fenced against the loop's reads of each uffd
so no copy lands after a layout event the core has not seen. ``uffdd_receiver_*``
reads the bulk fast lane's frames off its socket on another pthread, so the loop only
takes whole chunks (remote/bulk_receiver.py). The machine's libc
headers describe Linux 6.1 while the kernel is 6.18, so the UAPI added since (MOVE,
POISON, WP_ASYNC, WP_UNPOPULATED, CONTINUE_MODE_WP) is defined here when the headers
lack it; the values are the kernel's ABI and cannot change.
"""

from __future__ import annotations

from cffi import FFI

# Everything the 6.1 headers may lack, guarded so newer headers win.
_UAPI_BACKFILL = r"""
#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1<<13)
#endif
#ifndef UFFD_FEATURE_POISON
#define UFFD_FEATURE_POISON (1<<14)
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1<<15)
#endif
#ifndef UFFD_FEATURE_MOVE
#define UFFD_FEATURE_MOVE (1<<16)
#endif
#ifndef UFFDIO_CONTINUE_MODE_WP
#define UFFDIO_CONTINUE_MODE_WP ((__u64)1<<1)
#endif
#ifndef _UFFDIO_MOVE
#define _UFFDIO_MOVE (0x05)
struct uffdio_move {
    __u64 dst;
    __u64 src;
    __u64 len;
    __u64 mode;
    __s64 move;
};
#define UFFDIO_MOVE _IOWR(UFFDIO, _UFFDIO_MOVE, struct uffdio_move)
#define UFFDIO_MOVE_MODE_DONTWAKE ((__u64)1<<0)
#define UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES ((__u64)1<<1)
#endif
#ifndef _UFFDIO_POISON
#define _UFFDIO_POISON (0x08)
struct uffdio_poison {
    struct uffdio_range range;
    __u64 mode;
    __s64 updated;
};
#define UFFDIO_POISON _IOWR(UFFDIO, _UFFDIO_POISON, struct uffdio_poison)
#define UFFDIO_POISON_MODE_DONTWAKE ((__u64)1<<0)
#endif
"""

_SOURCE = (
    r"""
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <linux/types.h>
#include <linux/userfaultfd.h>
"""
    + _UAPI_BACKFILL
    + r"""
/* One ioctl, errno returned as a value: 0 on success, else the errno. Keeping errno
   handling in C avoids a second call into cffi to read it. */
static int uffd_ioctl(int fd, unsigned long request, void *arg)
{
    return ioctl(fd, request, arg) == 0 ? 0 : errno;
}

/* userfaultfd(2): the fd, or -errno. */
static int uffd_create(int flags)
{
    long fd = syscall(__NR_userfaultfd, flags);
    return fd >= 0 ? (int)fd : -errno;
}

/* USERFAULTFD_IOC_NEW on an open /dev/userfaultfd: the fd, or -errno. */
static int uffd_create_from_device(int dev_fd, int flags)
{
    int fd = ioctl(dev_fd, USERFAULTFD_IOC_NEW, flags);
    return fd >= 0 ? fd : -errno;
}

/* -- the fast path: serve faults on pages whose data is local, in C ---------------- */

struct uffdd_fast_range {
    uint64_t run_start;
    uint64_t run_end;
    uint64_t data_offset;  /* where run_start's bytes are in the data buffer */
};

struct uffdd_fast_done {
    uint64_t run;
    uint64_t len;
    uint64_t msg_index;
};

struct uffdd_fast_out {
    size_t nread;    /* messages read */
    size_t nrest;    /* messages copied to rest (the slow path's) */
    size_t ndone;    /* installs recorded in done */
    size_t nfaults;  /* faults answered here (installed or woken) */
};

#define UFFDD_FAST_BATCH 64
#define UFFDD_PAGE 4096ULL

struct uffdd_fast_ctx {
    int fd;
    const struct uffdd_fast_range *ranges;
    size_t nranges;
    const char *data;
    const uint8_t *verified;
    size_t nverified;
    unsigned chunk_shift;
    uint64_t around;
    struct uffdd_fast_done *done;
    struct uffdd_fast_out *out;
};

static const struct uffdd_fast_range *
fast_find(const struct uffdd_fast_ctx *c, uint64_t addr)
{
    size_t lo = 0, hi = c->nranges;  /* first range with run_start > addr */
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (c->ranges[mid].run_start <= addr)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo == 0 || addr >= c->ranges[lo - 1].run_end)
        return NULL;
    return &c->ranges[lo - 1];
}

/* Every checksum chunk holding the data of [start, end) has been verified. */
static int fast_verified(const struct uffdd_fast_ctx *c, const struct uffdd_fast_range *r,
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
static int fast_copy(const struct uffdd_fast_ctx *c, const struct uffdd_fast_range *r,
                     uint64_t start, uint64_t end, uint64_t index, uint64_t *copied)
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
static int fast_one(const struct uffdd_fast_ctx *c, const struct uffd_msg *msg, uint64_t index)
{
    if (msg->event != UFFD_EVENT_PAGEFAULT)
        return 1;
    if (msg->arg.pagefault.flags & (UFFD_PAGEFAULT_FLAG_WP | UFFD_PAGEFAULT_FLAG_MINOR))
        return 1;
    uint64_t page = msg->arg.pagefault.address & ~(UFFDD_PAGE - 1);
    const struct uffdd_fast_range *r = fast_find(c, page);
    if (r == NULL || !fast_verified(c, r, page, page + UFFDD_PAGE))
        return 1;
    uint64_t start = page & ~(c->around - 1), end = start + c->around, copied = 0;
    if (start < r->run_start)
        start = r->run_start;
    if (end > r->run_end)
        end = r->run_end;
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
static int uffdd_fast_serve(int fd, const struct uffdd_fast_range *ranges, size_t nranges,
                            const char *data, const uint8_t *verified, size_t nverified,
                            unsigned chunk_shift, uint64_t around,
                            char *rest, size_t rest_cap,
                            struct uffdd_fast_done *done, size_t done_cap,
                            struct uffdd_fast_out *out)
{
    struct uffdd_fast_ctx c = {fd, ranges, nranges, data, verified, nverified,
                               chunk_shift, around, done, out};
    struct uffd_msg msgs[UFFDD_FAST_BATCH];
    out->nread = out->nrest = out->ndone = out->nfaults = 0;
    if (rest_cap < UFFDD_FAST_BATCH || around < UFFDD_PAGE || (around & (around - 1)))
        return -EINVAL;
    for (;;) {
        if (done_cap - out->ndone < 2 * UFFDD_FAST_BATCH)
            return 2;
        ssize_t n = read(fd, msgs, sizeof(msgs));
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return errno == EAGAIN ? 0 : -errno;
        }
        size_t count = (size_t)n / sizeof(struct uffd_msg);
        if (count == 0)
            return 0;
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

/* -- the background installer: bulk UFFDIO_COPY on a thread of its own ------------- */

/* Why: a 1 MiB UFFDIO_COPY holds the daemon's one loop for 0.3-6 ms on this VM (the
   kernel's copy into fresh pages), and a demand fault read meanwhile waits for all of
   it. Here a pthread runs bulk copies in pieces while the loop goes on reading faults
   and sockets; it never takes the GIL.

   Safety: a piece must never land after the loop has read a REMOVE, UNMAP, REMAP or
   FORK that the core has not handled yet (after a REMOVE is read the kernel zaps the
   range, and a later copy would put snapshot data where zeros are right). So every
   piece runs under uffd_lock, which the loop also holds around its reads of a uffd;
   when a read returns such an event the loop fences that uffd before letting go, and
   a piece checks the fence first. A piece either ran before the read (then the kernel
   ordered it before the event) or does not run (the job ends with EAGAIN and the bytes
   done, as a copy interrupted by the kernel's mmap_changing would). */

#include <pthread.h>  /* pthread_setname_np: Python.h defines _GNU_SOURCE */
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <sys/resource.h>

#define UFFDD_FENCES 16

struct uffdd_install_done {
    uint64_t id;
    uint64_t copied;
    int err;  /* 0, or the errno that ended the job (EAGAIN when fenced) */
};

struct uffdd_install_job {
    int fd;
    uint64_t dst, src, len, mode, id;
};

struct uffdd_installer {
    pthread_t thread;
    pthread_mutex_t uffd_lock;  /* one piece at a time, never during the loop's reads */
    pthread_mutex_t lock;       /* the queue, the completions, busy_fd, stop */
    pthread_cond_t work;        /* to the thread: a job or stop */
    pthread_cond_t idle;        /* to the loop: the job in progress ended */
    pthread_cond_t read_done;   /* to the thread: no reader waits for uffd_lock */
    int readers;                /* loop calls waiting for uffd_lock (a mutex does not
                                   queue: the thread would take it back piece after
                                   piece while a read waits for the whole job) */
    struct uffdd_install_job *jobs;
    struct uffdd_install_done *done;
    size_t cap, head, count, ndone;
    int busy_fd;                /* the fd of the job in progress, or -1 */
    uint64_t busy_dst, busy_len;
    int busy_wake;              /* a thread waits in the job in progress: pieces wake */
    int fenced[UFFDD_FENCES];   /* under uffd_lock; -1 is a free slot */
    int stop;
    int efd;                    /* readable while completions wait */
    uint64_t piece;
    int nice;
};

static void installer_run(struct uffdd_installer *in, const struct uffdd_install_job *job,
                          uint64_t *copied, int *err)
{
    while (*copied < job->len) {
        uint64_t n = job->len - *copied;
        if (n > in->piece)
            n = in->piece;
        pthread_mutex_lock(&in->lock);
        while (in->readers)
            pthread_cond_wait(&in->read_done, &in->lock);
        uint64_t mode = in->busy_wake ? job->mode & ~(uint64_t)UFFDIO_COPY_MODE_DONTWAKE
                                      : job->mode;
        int stopping = in->stop;
        pthread_mutex_unlock(&in->lock);
        if (stopping) {  /* the installer is being freed: no more pieces */
            *err = EAGAIN;
            return;
        }
        pthread_mutex_lock(&in->uffd_lock);
        for (int i = 0; i < UFFDD_FENCES; i++) {
            if (in->fenced[i] == job->fd) {
                pthread_mutex_unlock(&in->uffd_lock);
                *err = EAGAIN;
                return;
            }
        }
        struct uffdio_copy c = {job->dst + *copied, job->src + *copied, n, mode, 0};
        int failed = ioctl(job->fd, UFFDIO_COPY, &c) != 0;
        int e = errno;
        pthread_mutex_unlock(&in->uffd_lock);
        if (!failed) {
            *copied += n;
            continue;
        }
        if (c.copy > 0)
            *copied += (uint64_t)c.copy;
        *err = e;
        return;
    }
}

/* Make an eventfd readable (the loop's wake-up from a C thread). */
static void efd_post(int efd)
{
    uint64_t one = 1;
    ssize_t r = write(efd, &one, sizeof one);  /* EAGAIN: the counter is set */
    (void)r;
}

/* The loop's side of a C thread's output queue: an array of ``*count`` items of
   ``size`` bytes at ``*items`` (read under ``lock``: the thread may move it), which
   an eventfd signals while it is not empty. Moves up to ``n`` from its front to
   ``out``; the number moved. */
static size_t efd_queue_take(int efd, pthread_mutex_t *lock, void **items, size_t *count,
                             void *out, size_t n, size_t size)
{
    uint64_t counter;
    ssize_t r = read(efd, &counter, sizeof counter);
    (void)r;
    pthread_mutex_lock(lock);
    size_t k = *count < n ? *count : n;
    memcpy(out, *items, k * size);
    memmove(*items, (char *)*items + k * size, (*count - k) * size);
    *count -= k;
    if (*count)
        efd_post(efd);
    pthread_mutex_unlock(lock);
    return k;
}

static void installer_post(struct uffdd_installer *in)
{
    efd_post(in->efd);
}

/* A constructor's fail path: close each of the ``n`` descriptors that was opened
   (the others are -1). */
static void close_opened(const int *fds, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (fds[i] >= 0)
            close(fds[i]);
}

/* pthread_create with every signal blocked in the new thread: signals stay with the
   threads that run Python. 0 or the error number. */
static int start_thread(pthread_t *thread, void *(*start)(void *), void *arg)
{
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int rc = pthread_create(thread, NULL, start, arg);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return rc;
}

/* The kernel's default scheduler slice for this thread: a thread inherits its
   creator's, and the daemon's loop may run with a short one (kernel/sched.py) that
   bulk copies and bulk receives must not have. Policy and nice stay as they are. */
struct uffdd_sched_attr {  /* the kernel's struct sched_attr, version 0 (48 bytes);
                             <linux/sched/types.h> clashes with glibc's <sched.h> */
    uint32_t size, sched_policy;
    uint64_t sched_flags;
    int32_t sched_nice;
    uint32_t sched_priority;
    uint64_t sched_runtime, sched_deadline, sched_period;
};

/* This thread's slice: ``runtime`` ns (0: the kernel's default), for a fair policy. */
static void thread_slice(uint64_t runtime)
{
    struct uffdd_sched_attr attr;
    if (syscall(SYS_sched_getattr, 0, &attr, sizeof attr, 0) != 0)
        return;
    if (attr.sched_policy != SCHED_OTHER && attr.sched_policy != SCHED_BATCH &&
        attr.sched_policy != SCHED_IDLE)
        return;
    attr.sched_runtime = runtime;
    attr.sched_flags = 0;
    syscall(SYS_sched_setattr, 0, &attr, 0);
}

static void bulk_thread_default_slice(void)
{
    thread_slice(0);
}

static void *installer_main(void *arg)
{
    struct uffdd_installer *in = arg;
    pthread_setname_np(pthread_self(), "uffdd-install");  /* for top -H, perf, py-spy */
    bulk_thread_default_slice();
    if (in->nice)  /* per thread on Linux: bulk yields the CPU to the loop */
        setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), in->nice);
    pthread_mutex_lock(&in->lock);
    for (;;) {
        while (!in->count && !in->stop)
            pthread_cond_wait(&in->work, &in->lock);
        if (in->stop)
            break;
        struct uffdd_install_job job = in->jobs[in->head];
        in->head = (in->head + 1) % in->cap;
        in->count--;
        in->busy_fd = job.fd;
        in->busy_dst = job.dst;
        in->busy_len = job.len;
        in->busy_wake = 0;
        pthread_mutex_unlock(&in->lock);
        uint64_t copied = 0;
        int err = 0;
        installer_run(in, &job, &copied, &err);
        pthread_mutex_lock(&in->lock);
        in->done[in->ndone++] = (struct uffdd_install_done){job.id, copied, err};
        in->busy_fd = -1;
        pthread_cond_broadcast(&in->idle);
        installer_post(in);
    }
    pthread_mutex_unlock(&in->lock);
    return NULL;
}

/* A started installer with room for ``cap`` jobs, or NULL (errno set). */
static struct uffdd_installer *uffdd_installer_new(size_t cap, uint64_t piece, int nice)
{
    if (cap < 1 || !piece) {
        errno = EINVAL;
        return NULL;
    }
    struct uffdd_installer *in = calloc(1, sizeof *in);
    if (!in)
        return NULL;
    in->jobs = calloc(cap, sizeof *in->jobs);
    in->done = calloc(cap, sizeof *in->done);
    in->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (!in->jobs || !in->done || in->efd < 0)
        goto fail;
    in->cap = cap;
    in->piece = piece;
    in->nice = nice;
    in->busy_fd = -1;
    for (int i = 0; i < UFFDD_FENCES; i++)
        in->fenced[i] = -1;
    pthread_mutex_init(&in->uffd_lock, NULL);
    pthread_mutex_init(&in->lock, NULL);
    pthread_cond_init(&in->work, NULL);
    pthread_cond_init(&in->idle, NULL);
    pthread_cond_init(&in->read_done, NULL);
    int rc = start_thread(&in->thread, installer_main, in);
    if (rc == 0)
        return in;
    errno = rc;
fail:
    {
        int e = errno;
        if (in->efd >= 0)
            close(in->efd);
        free(in->jobs);
        free(in->done);
        free(in);
        errno = e;
    }
    return NULL;
}

/* Stop the thread (a job in progress finishes its piece) and free everything. */
static void uffdd_installer_free(struct uffdd_installer *in)
{
    pthread_mutex_lock(&in->lock);
    in->stop = 1;
    pthread_cond_signal(&in->work);
    pthread_mutex_unlock(&in->lock);
    pthread_join(in->thread, NULL);
    close(in->efd);
    free(in->jobs);
    free(in->done);
    free(in);
}

static int uffdd_installer_efd(const struct uffdd_installer *in)
{
    return in->efd;
}

/* Queue a copy: 0, or -EAGAIN when ``cap`` jobs are queued, running or untaken (each
   ends in a completion slot, and there are ``cap`` of those). */
static int uffdd_installer_submit(struct uffdd_installer *in, int fd, uint64_t dst,
                                  uint64_t src, uint64_t len, uint64_t mode, uint64_t id)
{
    pthread_mutex_lock(&in->lock);
    if (in->count + in->ndone + (in->busy_fd >= 0) >= in->cap) {
        pthread_mutex_unlock(&in->lock);
        return -EAGAIN;
    }
    struct uffdd_install_job *job = &in->jobs[(in->head + in->count) % in->cap];
    *job = (struct uffdd_install_job){fd, dst, src, len, mode, id};
    in->count++;
    pthread_cond_signal(&in->work);
    pthread_mutex_unlock(&in->lock);
    return 0;
}

/* Move up to ``cap`` completions to ``out``; the number moved. */
static size_t uffdd_installer_take(struct uffdd_installer *in, struct uffdd_install_done *out,
                                   size_t cap)
{
    void *items = in->done;
    return efd_queue_take(in->efd, &in->lock, &items, &in->ndone, out, cap, sizeof *out);
}

/* The loop's side of uffd_lock: hold it around every read of a uffd. It waits for at
   most the piece in progress: the thread starts no piece while a reader waits. */
static void uffdd_installer_hold(struct uffdd_installer *in)
{
    pthread_mutex_lock(&in->lock);
    in->readers++;
    pthread_mutex_unlock(&in->lock);
    pthread_mutex_lock(&in->uffd_lock);
    pthread_mutex_lock(&in->lock);
    if (--in->readers == 0)
        pthread_cond_broadcast(&in->read_done);
    pthread_mutex_unlock(&in->lock);
}

static void uffdd_installer_unhold(struct uffdd_installer *in)
{
    pthread_mutex_unlock(&in->uffd_lock);
}

/* With uffd_lock held: no piece for ``fd`` starts until unfenced. 0, or -ENOSPC. */
static int uffdd_installer_fence_held(struct uffdd_installer *in, int fd)
{
    for (int i = 0; i < UFFDD_FENCES; i++)
        if (in->fenced[i] == fd)
            return 0;
    for (int i = 0; i < UFFDD_FENCES; i++) {
        if (in->fenced[i] < 0) {
            in->fenced[i] = fd;
            return 0;
        }
    }
    return -ENOSPC;
}

static void uffdd_installer_unfence(struct uffdd_installer *in, int fd)
{
    pthread_mutex_lock(&in->uffd_lock);
    for (int i = 0; i < UFFDD_FENCES; i++)
        if (in->fenced[i] == fd)
            in->fenced[i] = -1;
    pthread_mutex_unlock(&in->uffd_lock);
}

/* A thread of ``fd`` faulted at ``addr``: the queued job that installs it goes first,
   waking as it goes (the job in progress wakes from its next piece on). 1 when a
   queued job moved, 2 for the job in progress, 0 when no job covers ``addr``. */
static int uffdd_installer_expedite(struct uffdd_installer *in, int fd, uint64_t addr)
{
    int found = 0;
    pthread_mutex_lock(&in->lock);
    if (in->busy_fd == fd && in->busy_dst <= addr && addr - in->busy_dst < in->busy_len) {
        in->busy_wake = 1;
        found = 2;
    }
    for (size_t i = 0; !found && i < in->count; i++) {
        struct uffdd_install_job job = in->jobs[(in->head + i) % in->cap];
        if (job.fd != fd || addr < job.dst || addr - job.dst >= job.len)
            continue;
        for (size_t k = i; k > 0; k--)
            in->jobs[(in->head + k) % in->cap] = in->jobs[(in->head + k - 1) % in->cap];
        job.mode &= ~(uint64_t)UFFDIO_COPY_MODE_DONTWAKE;
        in->jobs[in->head] = job;
        found = 1;
    }
    pthread_mutex_unlock(&in->lock);
    return found;
}

/* For a fenced ``fd``: end its queued jobs (EAGAIN, nothing copied) and wait for the
   one in progress (it stops at its next piece). Afterwards no job of ``fd`` is left
   but completions the loop has not taken. */
static void uffdd_installer_quiesce(struct uffdd_installer *in, int fd)
{
    pthread_mutex_lock(&in->lock);
    size_t kept = 0, ended = 0;
    for (size_t i = 0; i < in->count; i++) {
        struct uffdd_install_job job = in->jobs[(in->head + i) % in->cap];
        if (job.fd == fd) {
            in->done[in->ndone++] = (struct uffdd_install_done){job.id, 0, EAGAIN};
            ended++;
        } else {
            in->jobs[(in->head + kept++) % in->cap] = job;
        }
    }
    in->count = kept;
    while (in->busy_fd == fd)
        pthread_cond_wait(&in->idle, &in->lock);
    if (ended)
        installer_post(in);
    pthread_mutex_unlock(&in->lock);
}

/* ---- the bulk fast lane's receiver: the socket on two pthreads ---------------------

   Reads response frames (fastlane_wire.RESPONSE: 32 bytes, little-endian, then the
   body) from a connected stream socket into malloc'ed bodies, without the GIL, and
   queues them for the loop (eventfd readable while frames wait). A second thread
   writes the request frames the loop hands over (uffdd_receiver_send): a TCP
   socket's lock is held by a recv for as long as it copies, and a send from another
   thread sleeps on that lock, woken ~70 us later on this VM to find the receiver
   holding it again. On the loop that was a sleep of up to several ms per request
   (bench/README.md, session 6); on the writer it costs nobody a fault.
   Bounded: at most ``cap`` frames and, past one frame, ``max_queued`` body bytes wait;
   then the thread stops reading. It ends at EOF, on an error (the writer's too), on a
   header that breaks the frame rules, or when stopped; ``status`` says which once the
   queue is empty. */
#include <endian.h>
#include <sys/socket.h>
#include <sys/uio.h>

#define UFFDD_FRAME_HEADER 32
#define UFFDD_RECV_RUNNING 0
#define UFFDD_RECV_EOF (-1)        /* closed by the peer between frames */
#define UFFDD_RECV_MIDFRAME (-2)   /* closed by the peer inside a frame */
#define UFFDD_RECV_GARBAGE (-3)    /* unknown flags, or a body over max_body */
#define UFFDD_RECV_STOPPED (-4)
#define UFFDD_RECV_NOMEM (-5)
#define UFFDD_FLAG_ZERO 1
#define UFFDD_FLAG_LAST 2
#define UFFDD_FLAG_ERROR 4
#define UFFDD_SEND_IOV 64          /* request frames per sendmsg, at most */

struct uffdd_frame {
    uint64_t request_id, address, checksum;
    uint32_t length;
    uint8_t flags, code;
    uint16_t message_length;
    char *body;
    uint64_t body_len;
};

struct uffdd_outgoing {           /* one request frame the loop handed over */
    struct uffdd_outgoing *next;
    size_t len, sent;
    char data[];
};

struct uffdd_receiver {
    int fd, efd;
    pthread_t thread, writer;
    pthread_mutex_t lock;
    pthread_cond_t room, outgoing;
    struct uffdd_frame *ring;
    size_t cap, head, count;
    uint64_t queued, max_queued, max_body;
    struct uffdd_outgoing *out_head, *out_tail;  /* the writer alone moves ``sent`` */
    uint64_t unsent;
    int stop, status;  /* status: UFFDD_RECV_RUNNING, a negative reason, or an errno */
    int send_error;    /* the writer's errno, 0 while it writes */
};

/* 1 when ``len`` bytes arrived; 0 at EOF or when stopped; -errno on an error. */
/* Read exactly len bytes: 1, 0 at EOF, -errno. */
static int socket_read(int fd, char *p, size_t len)
{
    size_t got = 0;
    while (got < len) {
        ssize_t n = recv(fd, p + got, len - got, MSG_WAITALL);
        if (n > 0) {
            got += (size_t)n;
            continue;
        }
        if (n == 0)
            return 0;
        if (errno == EINTR)
            continue;
        return -errno;
    }
    return 1;
}

/* A response frame's header (fastlane_wire.RESPONSE); -1 for unknown flags. */
static int frame_parse(const unsigned char *h, struct uffdd_frame *f)
{
    uint16_t m16; uint32_t l32; uint64_t v;
    memcpy(&v, h, 8); f->request_id = le64toh(v);
    memcpy(&v, h + 8, 8); f->address = le64toh(v);
    memcpy(&l32, h + 16, 4); f->length = le32toh(l32);
    f->flags = h[20];
    f->code = h[21];
    memcpy(&m16, h + 22, 2); f->message_length = le16toh(m16);
    memcpy(&v, h + 24, 8); f->checksum = le64toh(v);
    if (f->flags & ~(UFFDD_FLAG_ZERO | UFFDD_FLAG_LAST | UFFDD_FLAG_ERROR))
        return -1;
    f->body_len = (f->flags & UFFDD_FLAG_ERROR) ? f->message_length
                  : (f->flags & UFFDD_FLAG_ZERO) ? 0 : f->length;
    f->body = NULL;
    return 0;
}

static int receiver_loop(struct uffdd_receiver *r)
{
    unsigned char h[UFFDD_FRAME_HEADER];
    for (;;) {
        int rc = socket_read(r->fd, (char *)h, sizeof h);
        if (rc <= 0)
            return rc < 0 ? -rc : UFFDD_RECV_EOF;
        struct uffdd_frame f;
        if (frame_parse(h, &f) < 0 || f.body_len > r->max_body)
            return UFFDD_RECV_GARBAGE;
        if (f.body_len) {
            f.body = malloc(f.body_len);  /* not zeroed: the socket fills every byte */
            if (!f.body)
                return UFFDD_RECV_NOMEM;
            rc = socket_read(r->fd, f.body, f.body_len);
            if (rc <= 0) {
                free(f.body);
                return rc < 0 ? -rc : UFFDD_RECV_MIDFRAME;
            }
        }
        pthread_mutex_lock(&r->lock);
        while (!r->stop && (r->count == r->cap || (r->count && r->queued >= r->max_queued)))
            pthread_cond_wait(&r->room, &r->lock);
        if (r->stop) {
            pthread_mutex_unlock(&r->lock);
            free(f.body);
            return UFFDD_RECV_STOPPED;
        }
        r->ring[(r->head + r->count) % r->cap] = f;
        r->count++;
        r->queued += f.body_len;
        if (r->count == 1)
            efd_post(r->efd);
        pthread_mutex_unlock(&r->lock);
    }
}

static void *receiver_main(void *arg)
{
    struct uffdd_receiver *r = arg;
    pthread_setname_np(pthread_self(), "uffdd-bulk-recv");
    bulk_thread_default_slice();  /* bulk data: the short slice is the loop's */
    int status = receiver_loop(r);
    pthread_mutex_lock(&r->lock);
    r->status = r->stop ? UFFDD_RECV_STOPPED : r->send_error ? r->send_error : status;
    efd_post(r->efd);
    pthread_mutex_unlock(&r->lock);
    return NULL;
}

/* Writes queued request frames, several per sendmsg, blocking as long as the socket
   makes it; on an error it shuts the socket down, which ends the receiver too. */
static void *writer_main(void *arg)
{
    struct uffdd_receiver *r = arg;
    pthread_setname_np(pthread_self(), "uffdd-bulk-send");
    bulk_thread_default_slice();
    pthread_mutex_lock(&r->lock);
    for (;;) {
        while (!r->stop && !r->out_head)
            pthread_cond_wait(&r->outgoing, &r->lock);
        if (r->stop)
            break;
        struct iovec iov[UFFDD_SEND_IOV];
        size_t n = 0;
        for (struct uffdd_outgoing *o = r->out_head; o && n < UFFDD_SEND_IOV; o = o->next)
            iov[n++] = (struct iovec){o->data + o->sent, o->len - o->sent};
        pthread_mutex_unlock(&r->lock);
        struct msghdr msg = {.msg_iov = iov, .msg_iovlen = n};
        ssize_t sent = sendmsg(r->fd, &msg, MSG_NOSIGNAL);
        int error = sent < 0 && errno != EINTR ? errno : 0;
        pthread_mutex_lock(&r->lock);
        if (error) {
            if (!r->stop)
                r->send_error = error;
            break;
        }
        for (size_t left = sent > 0 ? (size_t)sent : 0; left;) {
            struct uffdd_outgoing *o = r->out_head;
            size_t take = o->len - o->sent < left ? o->len - o->sent : left;
            o->sent += take;
            left -= take;
            if (o->sent < o->len)
                break;
            r->out_head = o->next;
            if (!r->out_head)
                r->out_tail = NULL;
            r->unsent -= o->len;
            free(o);
        }
    }
    pthread_mutex_unlock(&r->lock);
    if (r->send_error)
        shutdown(r->fd, SHUT_RDWR);  /* the receiver's recv ends, with send_error */
    return NULL;
}

/* A started receiver of the connected socket ``fd`` (still the caller's to close,
   after uffdd_receiver_free), or NULL (errno set). */
static struct uffdd_receiver *uffdd_receiver_new(int fd, size_t cap, uint64_t max_queued,
                                                 uint64_t max_body)
{
    if (cap < 1) {
        errno = EINVAL;
        return NULL;
    }
    struct uffdd_receiver *r = calloc(1, sizeof *r);
    if (!r)
        return NULL;
    r->ring = calloc(cap, sizeof *r->ring);
    r->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (!r->ring || r->efd < 0)
        goto fail;
    r->fd = fd;
    r->cap = cap;
    r->max_queued = max_queued;
    r->max_body = max_body;
    pthread_mutex_init(&r->lock, NULL);
    pthread_cond_init(&r->room, NULL);
    pthread_cond_init(&r->outgoing, NULL);
    int rc = start_thread(&r->writer, writer_main, r);
    if (rc == 0) {
        rc = start_thread(&r->thread, receiver_main, r);
        if (rc == 0)
            return r;
        pthread_mutex_lock(&r->lock);
        r->stop = 1;
        pthread_cond_signal(&r->outgoing);
        pthread_mutex_unlock(&r->lock);
        pthread_join(r->writer, NULL);
    }
    errno = rc;
fail:
    {
        int e = errno;
        if (r->efd >= 0)
            close(r->efd);
        free(r->ring);
        free(r);
        errno = e;
    }
    return NULL;
}

static int uffdd_receiver_efd(const struct uffdd_receiver *r)
{
    return r->efd;
}

/* Hand the writer a request frame (copied): 0, or -1 out of memory. Frames go out in
   order; after the end they are dropped (the loop learns of the end from ``status``). */
static int uffdd_receiver_send(struct uffdd_receiver *r, const char *data, size_t len)
{
    struct uffdd_outgoing *o = malloc(sizeof *o + len);
    if (!o)
        return -1;
    o->next = NULL;
    o->len = len;
    o->sent = 0;
    memcpy(o->data, data, len);
    pthread_mutex_lock(&r->lock);
    int first = r->out_head == NULL;
    if (r->out_tail)
        r->out_tail->next = o;
    else
        r->out_head = o;
    r->out_tail = o;
    r->unsent += len;
    if (first)
        pthread_cond_signal(&r->outgoing);  /* behind others: the writer is at work */
    pthread_mutex_unlock(&r->lock);
    return 0;
}

/* Bytes of request frames handed over and not written yet. */
static uint64_t uffdd_receiver_unsent(struct uffdd_receiver *r)
{
    pthread_mutex_lock(&r->lock);
    uint64_t unsent = r->unsent;
    pthread_mutex_unlock(&r->lock);
    return unsent;
}

/* Move queued frames to ``out`` (their bodies are the caller's to free): up to ``n``,
   and no more once their headers and bodies reach ``max_bytes`` (the first always
   comes), so many small frames (zero chunks) come in one call but data does not pile
   up in one loop turn. */
static size_t uffdd_receiver_take(struct uffdd_receiver *r, struct uffdd_frame *out, size_t n,
                                  uint64_t max_bytes)
{
    uint64_t drained;
    ssize_t d = read(r->efd, &drained, sizeof drained);
    (void)d;
    pthread_mutex_lock(&r->lock);
    size_t k = 0;
    uint64_t bytes = 0;
    for (; k < n && r->count && bytes < max_bytes; k++) {
        out[k] = r->ring[r->head];
        r->head = (r->head + 1) % r->cap;
        r->count--;
        r->queued -= out[k].body_len;
        bytes += UFFDD_FRAME_HEADER + out[k].body_len;
    }
    if (r->count || r->status != UFFDD_RECV_RUNNING)
        efd_post(r->efd);  /* more wait, or the end is still to be seen: stay readable */
    if (k)
        pthread_cond_signal(&r->room);
    pthread_mutex_unlock(&r->lock);
    return k;
}

/* Why the thread ended (UFFDD_RECV_RUNNING while it runs or frames still wait). */
static int uffdd_receiver_status(struct uffdd_receiver *r)
{
    pthread_mutex_lock(&r->lock);
    int status = r->count ? UFFDD_RECV_RUNNING : r->status;
    pthread_mutex_unlock(&r->lock);
    return status;
}

static uint64_t uffdd_receiver_queued(struct uffdd_receiver *r)
{
    pthread_mutex_lock(&r->lock);
    uint64_t queued = r->queued;
    pthread_mutex_unlock(&r->lock);
    return queued;
}

/* Stop both threads (shutting the socket down wakes a blocked recv or send), join
   them, and free everything, frames not taken and frames not sent included. The
   socket stays open for its owner. */
static void uffdd_receiver_free(struct uffdd_receiver *r)
{
    pthread_mutex_lock(&r->lock);
    r->stop = 1;
    pthread_cond_signal(&r->room);
    pthread_cond_signal(&r->outgoing);
    pthread_mutex_unlock(&r->lock);
    shutdown(r->fd, SHUT_RDWR);
    pthread_join(r->thread, NULL);
    pthread_join(r->writer, NULL);
    for (size_t k = 0; k < r->count; k++)
        free(r->ring[(r->head + k) % r->cap].body);
    while (r->out_head) {
        struct uffdd_outgoing *o = r->out_head;
        r->out_head = o->next;
        free(o);
    }
    close(r->efd);
    free(r->ring);
    free(r);
}

/* -- the demand thread: a remote process's faults read, fetched and installed in C -- */

/* Why: with the background sweep running, a demand fault answered through the Python
   loop waited for that loop twice, to be read and to be answered, while it handled
   bulk chunks: p50 1.1 ms where a C handler fetching the same windows from the same
   page server took 0.17 ms (bench/README.md, session 7). Doing the fetch on the loop,
   right after its read, halved the no-sweep fault but blocked the loop for every
   round trip and slowed the sweep. So a pthread, ``uffdd-demand``, owns the uffds of
   remote processes once their page client's fast lane is up: it reads the ready ones,
   sends one urgent fast-lane request per fault-around window (all of them at once,
   one round trip for up to UFFDD_DEMAND_ROUND processes) on a blocking socket of its
   own, checks each chunk's xxh3, and installs it with a waking
   UFFDIO_COPY. A fault where the core named zeros (an image ZERO extent, or a range
   madvise removed) gets its window zero-filled (UFFDIO_ZEROPAGE) with no round trip:
   the loop, busy with the sweep, took ~10 ms a fault for those in the demo. Everything
   else (a layout event, a fault outside the ranges the core named, a refused window,
   a wrong checksum) goes to the loop as raw messages, in order, after a report of what
   C installed (the core's FastServed).

   Safety, as for the loop's own reads (the installer's comment above): each read is
   made holding uffd_lock; a read that returns a layout event fences that uffd before
   letting go, disarms it (no read of it until the loop resumes it, with the ranges
   the core computed after the event) and serves none of its faults (a fault read
   with a REMOVE could otherwise be answered after the kernel zapped the range). The
   loop's own installs into such a uffd take uffd_lock and check the fence
   (uffdd_installer_guarded_ioctl). A copy racing a layout event raised meanwhile
   meets the kernel's EAGAIN; that window's faults go to the loop. */

#include <sys/epoll.h>
#include <time.h>

#define UFFDD_DEMAND_MAX UFFDD_FAST_BATCH
#define UFFDD_REQUEST_HEADER 26      /* fastlane_wire.REQUEST */
#define UFFDD_DEMAND_REPORTS 256     /* room for reports at first (it grows) */
#define UFFDD_DEMAND_ROUND 16        /* processes read, and answered, per round trip */
#define UFFDD_DEMAND_DONE (16 * UFFDD_DEMAND_MAX)  /* installs one read may record */
#define UFFDD_DEMAND_WINDOWS (UFFDD_DEMAND_ROUND * UFFDD_DEMAND_MAX)  /* per round trip */
#define UFFDD_DR_LAYOUT 1            /* msgs hold a layout event: fd fenced, paused */
#define UFFDD_DR_DRAINED 2           /* the fd was empty after this */
#define UFFDD_DR_ERROR 4             /* read() failed: err; the fd is paused */
#define UFFDD_DR_LANE 8              /* the connection failed (err): nothing is served
                                        any more; every message goes to the loop */
#define UFFDD_DR_FENCE 16            /* a layout event could not be fenced (too many) */

typedef uint64_t (*uffdd_hash_fn)(const void *, size_t);

struct uffdd_demand_report {
    uint64_t token;
    double read_at, done_at;         /* CLOCK_MONOTONIC seconds */
    uint32_t nfaults;                /* faults answered here */
    uint32_t ninstalls;
    uint32_t nmsgs;                  /* raw uffd_msg records for the loop, in order */
    uint32_t flags;
    int err;
    struct uffdd_fast_done *installs; /* malloc'ed (uffdd_free), or NULL */
    char *msgs;                       /* malloc'ed (uffdd_free), or NULL */
};

struct demand_proc {
    int fd;                           /* -1: a free slot */
    int paused;
    int busy;                         /* in the thread's round now */
    uint64_t token;
    struct uffdd_fast_range *ranges;  /* where a fault's answer is image data */
    size_t nranges;
    struct uffdd_fast_range *zeros;   /* where it is zeros (data_offset unused) */
    size_t nzeros;
    char image_id[1024];
    size_t id_len;
};

struct uffdd_demander {
    pthread_t thread;
    pthread_mutex_t lock;             /* procs, reports, busy, stop */
    pthread_cond_t idle;              /* to the loop: busy changed */
    struct demand_proc *procs;
    size_t nprocs;
    struct uffdd_demand_report *reports;
    size_t nreports, cap_reports;
    int stop;
    int broken;                       /* the connection failed: serve nothing */
    int epfd, ctl_efd, out_efd;
    int sock;
    uffdd_hash_fn hash;
    uint64_t around, next_id;
    struct uffdd_installer *installer;  /* may be NULL */
    char *buf;                        /* one window */
    struct demand_batch *batches;     /* UFFDD_DEMAND_ROUND */
    struct demand_window *windows;    /* UFFDD_DEMAND_WINDOWS */
    char *frames;                     /* their request frames */
};

struct demand_window {
    uint64_t run, image, len;
    int finished, failed;
    size_t batch;  /* whose fault */
};

/* An epoll-driven C thread's descriptors: its epoll set, holding ``ctl`` (the loop's
   eventfd to the thread, data.u64 UINT64_MAX), and ``out`` (the thread's eventfd to
   the loop). 0, or -1 with each one opened or -1 (for close_opened). */
static int thread_fds_open(int *epfd, int *ctl, int *out)
{
    *epfd = epoll_create1(EPOLL_CLOEXEC);
    *ctl = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    *out = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = UINT64_MAX};
    if (*epfd < 0 || *ctl < 0 || *out < 0 || epoll_ctl(*epfd, EPOLL_CTL_ADD, *ctl, &ev) != 0)
        return -1;
    return 0;
}

static double demand_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
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
            return ENOSPC;  /* before the ioctl: every install is recorded */
        int err;
        int64_t progress;  /* the kernel's count of bytes done, or a negative errno */
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

/* One process's read in a round. */
struct demand_batch {
    struct demand_proc *p;
    struct uffd_msg msgs[UFFDD_DEMAND_MAX];
    uint8_t served[UFFDD_DEMAND_MAX];
    size_t fault_window[UFFDD_DEMAND_MAX];
    size_t count, ndone;
    int layout;
    struct uffdd_demand_report r;
};

/* Fetch and install the window of every fault of the round's batches that lies in its
   process's ranges: all requests sent at once, the answers installed as they come.
   b->served[i]: that fault's window is in. Returns 0, or the errno that makes the
   connection unusable (what was installed before it is in the batches' reports). */
/* The index of the first range of ``c`` that ends after ``addr``. */
static size_t fast_after(const struct uffdd_fast_ctx *c, uint64_t addr)
{
    size_t lo = 0, hi = c->nranges;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (c->ranges[mid].run_end <= addr)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* The window of range ``r`` inside [block, block_end), one per run start among the
   batch's windows (from ``first``): its index, or SIZE_MAX when there is no room. */
static size_t demand_window(struct demand_window *win, size_t *nwin, size_t first,
                            const struct uffdd_fast_range *r, uint64_t block,
                            uint64_t block_end, size_t batch)
{
    uint64_t start = block < r->run_start ? r->run_start : block;
    uint64_t stop = block_end > r->run_end ? r->run_end : block_end;
    size_t w = first;
    while (w < *nwin && win[w].run != start)
        w++;
    if (w < *nwin)
        return w;
    if (*nwin == UFFDD_DEMAND_WINDOWS)
        return SIZE_MAX;
    win[(*nwin)++] = (struct demand_window){
        start, r->data_offset + (start - r->run_start), stop - start, 0, 0, batch};
    return w;
}

static int demand_serve(struct uffdd_demander *d, struct demand_batch *batches, size_t nb)
{
    struct demand_window *win = d->windows;
    size_t nwin = 0;
    for (size_t k = 0; k < nb; k++) {
        struct demand_batch *b = &batches[k];
        struct uffdd_fast_ctx c = {.ranges = b->p->ranges, .nranges = b->p->nranges};
        struct uffdd_fast_ctx zc = {.ranges = b->p->zeros, .nranges = b->p->nzeros};
        size_t first_win = nwin;
        uint64_t whole = UINT64_MAX;  /* the last block made whole in this batch */
        for (size_t i = 0; i < b->count; i++) {
            const struct uffd_msg *m = &b->msgs[i];
            b->served[i] = 0;
            b->fault_window[i] = SIZE_MAX;
            if (b->layout || !b->r.installs ||
                (m->arg.pagefault.flags & (UFFD_PAGEFAULT_FLAG_WP | UFFD_PAGEFAULT_FLAG_MINOR)))
                continue;
            uint64_t page = m->arg.pagefault.address & ~(UFFDD_PAGE - 1);
            const struct uffdd_fast_range *r = fast_find(&c, page);
            if (r == NULL && (r = fast_find(&zc, page)) != NULL) {
                /* known zeros (an image ZERO extent, or madvise'd): filled here, no
                   round trip, the fault's window clipped to the zero range */
                uint64_t start = page & ~(d->around - 1), stop = start + d->around;
                start = start < r->run_start ? r->run_start : start;
                stop = stop > r->run_end ? r->run_end : stop;
                b->served[i] = demand_install(b->p->fd, start, NULL, stop - start,
                                              b->r.installs, UFFDD_DEMAND_DONE,
                                              &b->ndone) == 0;
                continue;
            }
            if (r == NULL)
                continue;
            uint64_t block = page & ~(d->around - 1), block_end = block + d->around;
            b->fault_window[i] = demand_window(win, &nwin, first_win, r, block, block_end, k);
            if (b->fault_window[i] == SIZE_MAX || block == whole)
                continue;
            /* The rest of the fault's block too, in the same round trip: its other data
               runs fetched, its zero runs filled here. Sparse memory (data pages between
               zero ones) is then one fault a block, not one a page. Best effort: these
               are nobody's fault yet, and what fails stays missing for the core. */
            whole = block;
            for (size_t j = fast_after(&c, block);
                 j < c.nranges && c.ranges[j].run_start < block_end; j++)
                demand_window(win, &nwin, first_win, &c.ranges[j], block, block_end, k);
            for (size_t j = fast_after(&zc, block);
                 j < zc.nranges && zc.ranges[j].run_start < block_end; j++) {
                uint64_t lo = zc.ranges[j].run_start < block ? block : zc.ranges[j].run_start;
                uint64_t hi = zc.ranges[j].run_end > block_end ? block_end : zc.ranges[j].run_end;
                demand_install(b->p->fd, lo, NULL, hi - lo, b->r.installs, UFFDD_DEMAND_DONE,
                               &b->ndone);
            }
        }
    }
    if (nwin == 0)
        return 0;

    size_t flen = 0;
    uint64_t first_id = d->next_id;
    d->next_id += nwin;
    for (size_t w = 0; w < nwin; w++) {
        const struct demand_proc *p = batches[win[w].batch].p;
        uint64_t id = htole64(first_id + w), addr = htole64(win[w].image);
        uint32_t len32 = htole32((uint32_t)win[w].len);
        uint16_t id16 = htole16((uint16_t)p->id_len);
        char *f = d->frames + flen;
        memcpy(f, "UFL1", 4);
        memcpy(f + 4, &id, 8);
        memcpy(f + 12, &addr, 8);
        memcpy(f + 20, &len32, 4);
        memcpy(f + 24, &id16, 2);
        memcpy(f + UFFDD_REQUEST_HEADER, p->image_id, p->id_len);
        flen += UFFDD_REQUEST_HEADER + p->id_len;
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
        if (frame_parse(h, &f) < 0 || f.request_id < first_id ||
            (w = f.request_id - first_id) >= nwin || win[w].finished ||
            f.body_len > d->around) {
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
            error = EPROTO;  /* a chunk outside what was asked */
            break;
        } else if (!x->failed) {
            if (f.flags & UFFDD_FLAG_ZERO)
                memset(d->buf, 0, f.length);
            else if (d->hash(d->buf, f.length) != f.checksum)
                x->failed = 1;
            if (!x->failed &&
                demand_install(b->p->fd, x->run + (f.address - x->image), d->buf, f.length,
                               b->r.installs, UFFDD_DEMAND_DONE, &b->ndone) != 0)
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
   loop may be waiting for this thread in resume or remove): the queue grows instead,
   bounded by what the processes can have outstanding (a thread faults once until it
   is woken; answered faults come back as more faults only as fast as C answers). A
   report that finds no memory ends the thread's service: the loop is told (LANE). */
static void demand_report(struct uffdd_demander *d, struct uffdd_demand_report *r)
{
    pthread_mutex_lock(&d->lock);
    if (d->nreports == d->cap_reports) {
        size_t cap = 2 * d->cap_reports;
        struct uffdd_demand_report *more = realloc(d->reports, cap * sizeof *more);
        if (more) {
            d->reports = more;
            d->cap_reports = cap;
        } else {  /* keep the one in hand: drop its installs' list, keep its messages */
            d->broken = 1;
            struct uffdd_demand_report *tail = &d->reports[d->nreports - 1];
            tail->flags |= UFFDD_DR_LANE;
            tail->err = ENOMEM;
            pthread_mutex_unlock(&d->lock);
            free(r->installs);
            free(r->msgs);
            return;
        }
    }
    d->reports[d->nreports++] = *r;
    if (d->nreports == 1)
        efd_post(d->out_efd);
    pthread_mutex_unlock(&d->lock);
}

/* Read nothing more of the slot's uffd until resumed. Out of the epoll set, not just
   disarmed: EPOLLHUP and EPOLLERR are reported even for a disarmed fd. */
static void demand_pause(struct uffdd_demander *d, struct demand_proc *p)
{
    pthread_mutex_lock(&d->lock);
    p->paused = 1;
    pthread_mutex_unlock(&d->lock);
    epoll_ctl(d->epfd, EPOLL_CTL_DEL, p->fd, NULL);
}

/* Read one ready uffd into its batch, under uffd_lock. 0 when there is something
   for the round (faults, or a layout event: fenced, paused, reported with the
   round), 1 when there is nothing (EAGAIN), -1 when the read failed (reported,
   paused). */
static int demand_read(struct uffdd_demander *d, struct demand_batch *b)
{
    struct demand_proc *p = b->p;
    if (d->installer)
        uffdd_installer_hold(d->installer);
    ssize_t n = read(p->fd, b->msgs, sizeof b->msgs);
    int err = n < 0 ? errno : 0;
    b->r = (struct uffdd_demand_report){.token = p->token, .read_at = demand_now()};
    b->count = n > 0 ? (size_t)n / sizeof b->msgs[0] : 0;
    b->ndone = 0;
    b->layout = 0;
    for (size_t i = 0; i < b->count; i++)
        b->layout |= b->msgs[i].event != UFFD_EVENT_PAGEFAULT;
    if (b->layout && d->installer && uffdd_installer_fence_held(d->installer, p->fd) != 0)
        b->r.flags |= UFFDD_DR_FENCE;
    if (d->installer)
        uffdd_installer_unhold(d->installer);
    if (n < 0 && (err == EAGAIN || err == EINTR))
        return 1;
    b->r.installs = n > 0 ? malloc(UFFDD_DEMAND_DONE * sizeof *b->r.installs) : NULL;
    b->r.msgs = n > 0 ? malloc(b->count * sizeof b->msgs[0]) : NULL;
    if (n <= 0 || !b->r.installs || !b->r.msgs) {
        /* nothing more is read from this fd: the loop ends its process */
        b->r.flags |= UFFDD_DR_ERROR;
        b->r.err = n < 0 ? err : (n == 0 ? EIO : ENOMEM);
        free(b->r.installs);
        free(b->r.msgs);
        b->r.installs = NULL;
        b->r.msgs = NULL;
        b->r.done_at = b->r.read_at;
        demand_pause(d, p);
        demand_report(d, &b->r);
        return -1;
    }
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
    else if (b->count < UFFDD_DEMAND_MAX)
        r->flags |= UFFDD_DR_DRAINED;  /* a short read emptied the queue */
    r->done_at = demand_now();
    demand_report(d, r);
}

static void *demander_main(void *arg)
{
    struct uffdd_demander *d = arg;
    pthread_setname_np(pthread_self(), "uffdd-demand");
    struct epoll_event evs[UFFDD_DEMAND_ROUND];
    for (;;) {
        int n = epoll_wait(d->epfd, evs, UFFDD_DEMAND_ROUND, -1);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            break;
        size_t nb = 0;
        for (int i = 0; i < n; i++)
            if (evs[i].data.u64 == UINT64_MAX) {
                /* consumed before stop is read: a post after this read stays pending
                   for the next epoll_wait, one before it set stop first */
                uint64_t counter;
                ssize_t r = read(d->ctl_efd, &counter, sizeof counter);
                (void)r;
            }
        pthread_mutex_lock(&d->lock);
        if (d->stop) {
            pthread_mutex_unlock(&d->lock);
            break;
        }
        for (int i = 0; i < n; i++) {
            if (evs[i].data.u64 == UINT64_MAX)
                continue;
            struct demand_proc *p = &d->procs[evs[i].data.u64];
            if (p->fd < 0 || p->paused || p->busy)
                continue;
            p->busy = 1;
            d->batches[nb++].p = p;
        }
        pthread_mutex_unlock(&d->lock);
        /* read them all, then one round trip for all their faults */
        size_t kept = 0;
        for (size_t k = 0; k < nb; k++) {
            struct demand_batch *b = &d->batches[k];
            if (demand_read(d, b) == 0) {
                if (kept != k)
                    d->batches[kept] = *b;
                kept++;
            } else {
                pthread_mutex_lock(&d->lock);
                b->p->busy = 0;
                pthread_cond_broadcast(&d->idle);
                pthread_mutex_unlock(&d->lock);
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
        pthread_mutex_lock(&d->lock);
        for (size_t k = 0; k < kept; k++)
            d->batches[k].p->busy = 0;
        pthread_cond_broadcast(&d->idle);
        pthread_mutex_unlock(&d->lock);
    }
    return NULL;
}

/* A started demand thread on the connected, blocking socket ``sock`` (it does not
   own it), or NULL (errno set). ``installer`` may be NULL. */
static struct uffdd_demander *uffdd_demander_new(int sock, uffdd_hash_fn hash, uint64_t around,
                                                 size_t max_procs,
                                                 struct uffdd_installer *installer)
{
    if (around < UFFDD_PAGE || (around & (around - 1)) || max_procs < 1) {
        errno = EINVAL;
        return NULL;
    }
    struct uffdd_demander *d = calloc(1, sizeof *d);
    if (!d)
        return NULL;
    d->procs = calloc(max_procs, sizeof *d->procs);
    d->reports = calloc(UFFDD_DEMAND_REPORTS, sizeof *d->reports);
    d->buf = malloc(around);
    d->batches = calloc(UFFDD_DEMAND_ROUND, sizeof *d->batches);
    d->windows = calloc(UFFDD_DEMAND_WINDOWS, sizeof *d->windows);
    d->frames = malloc(UFFDD_DEMAND_WINDOWS * (UFFDD_REQUEST_HEADER + 1024));
    int fds = thread_fds_open(&d->epfd, &d->ctl_efd, &d->out_efd);
    if (!d->procs || !d->reports || !d->buf || !d->batches || !d->windows || !d->frames ||
        fds != 0)
        goto fail;
    for (size_t i = 0; i < max_procs; i++)
        d->procs[i].fd = -1;
    d->nprocs = max_procs;
    d->sock = sock;
    d->hash = hash;
    d->around = around;
    d->next_id = 1;
    d->installer = installer;
    d->cap_reports = UFFDD_DEMAND_REPORTS;
    pthread_mutex_init(&d->lock, NULL);
    pthread_cond_init(&d->idle, NULL);
    int rc = start_thread(&d->thread, demander_main, d);
    if (rc == 0)
        return d;
    errno = rc;
fail:
    {
        int e = errno;
        close_opened((int[]){d->epfd, d->ctl_efd, d->out_efd}, 3);
        free(d->procs);
        free(d->reports);
        free(d->buf);
        free(d->batches);
        free(d->windows);
        free(d->frames);
        free(d);
        errno = e;
    }
    return NULL;
}

static int uffdd_demander_efd(const struct uffdd_demander *d)
{
    return d->out_efd;
}

static int demand_set_ranges(struct demand_proc *p, const struct uffdd_fast_range *ranges,
                             size_t nranges, const struct uffdd_fast_range *zeros,
                             size_t nzeros)
{
    struct uffdd_fast_range *copy = malloc((nranges ? nranges : 1) * sizeof *copy);
    struct uffdd_fast_range *zcopy = malloc((nzeros ? nzeros : 1) * sizeof *zcopy);
    if (!copy || !zcopy) {
        free(copy);
        free(zcopy);
        return -ENOMEM;
    }
    memcpy(copy, ranges, nranges * sizeof *copy);
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
static int uffdd_demander_add(struct uffdd_demander *d, int fd, uint64_t token,
                              const char *image_id, size_t id_len,
                              const struct uffdd_fast_range *ranges, size_t nranges,
                              const struct uffdd_fast_range *zeros, size_t nzeros)
{
    if (id_len > sizeof d->procs[0].image_id)
        return -EINVAL;
    pthread_mutex_lock(&d->lock);
    size_t slot = 0;
    while (slot < d->nprocs && d->procs[slot].fd >= 0)
        slot++;
    int rc = slot == d->nprocs ? -ENOSPC : 0;
    struct demand_proc *p = &d->procs[slot];
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
        if (epoll_ctl(d->epfd, EPOLL_CTL_ADD, fd, &ev) != 0) {
            rc = -errno;
            p->fd = -1;
            free(p->ranges);
            free(p->zeros);
            p->ranges = NULL;
            p->zeros = NULL;
        }
    }
    pthread_mutex_unlock(&d->lock);
    return rc < 0 ? rc : (int)slot;
}

/* The loop has handled the slot's layout event: read it again, with these ranges. */
static int uffdd_demander_resume(struct uffdd_demander *d, int slot,
                                 const struct uffdd_fast_range *ranges, size_t nranges,
                                 const struct uffdd_fast_range *zeros, size_t nzeros)
{
    pthread_mutex_lock(&d->lock);
    struct demand_proc *p = &d->procs[slot];
    while (p->busy)
        pthread_cond_wait(&d->idle, &d->lock);
    int rc = demand_set_ranges(p, ranges, nranges, zeros, nzeros);
    if (rc == 0 && p->paused) {
        p->paused = 0;
        struct epoll_event ev = {.events = EPOLLIN, .data.u64 = (uint64_t)slot};
        if (epoll_ctl(d->epfd, EPOLL_CTL_ADD, p->fd, &ev) != 0)
            rc = -errno;
    }
    pthread_mutex_unlock(&d->lock);
    return rc;
}

/* Stop serving the slot's uffd; when this returns the thread no longer touches it
   (its reports may still wait for the loop). */
static void uffdd_demander_remove(struct uffdd_demander *d, int slot)
{
    pthread_mutex_lock(&d->lock);
    struct demand_proc *p = &d->procs[slot];
    while (p->busy)
        pthread_cond_wait(&d->idle, &d->lock);
    if (p->fd >= 0 && !p->paused)
        epoll_ctl(d->epfd, EPOLL_CTL_DEL, p->fd, NULL);
    p->fd = -1;
    free(p->ranges);
    free(p->zeros);
    p->ranges = NULL;
    p->zeros = NULL;
    pthread_mutex_unlock(&d->lock);
}

/* Move up to n reports to out (their buffers are the caller's now); the number. */
static size_t uffdd_demander_take(struct uffdd_demander *d, struct uffdd_demand_report *out,
                                  size_t n)
{
    return efd_queue_take(d->out_efd, &d->lock, (void **)&d->reports, &d->nreports, out, n,
                          sizeof *out);
}

/* Stop the thread (after the read or fetch in progress) and free everything; reports
   not taken are freed. The socket and the uffds stay open (they are the caller's). */
static void uffdd_demander_free(struct uffdd_demander *d)
{
    pthread_mutex_lock(&d->lock);
    d->stop = 1;
    pthread_mutex_unlock(&d->lock);
    efd_post(d->ctl_efd);
    shutdown(d->sock, SHUT_RDWR);  /* a fetch in progress ends at once */
    pthread_join(d->thread, NULL);
    for (size_t i = 0; i < d->nreports; i++) {
        free(d->reports[i].installs);
        free(d->reports[i].msgs);
    }
    for (size_t i = 0; i < d->nprocs; i++) {
        free(d->procs[i].ranges);
        free(d->procs[i].zeros);
    }
    close(d->epfd);
    close(d->ctl_efd);
    close(d->out_efd);
    free(d->procs);
    free(d->reports);
    free(d->buf);
    free(d->batches);
    free(d->windows);
    free(d->frames);
    free(d);
}

/* The loop's install into a uffd another thread reads: under uffd_lock, refused
   (-EAGAIN, as the kernel refuses while an event is unread) when the uffd is fenced.
   Otherwise the ioctl's 0 or errno. */
static int uffdd_installer_guarded_ioctl(struct uffdd_installer *in, int fd,
                                         unsigned long request, void *arg)
{
    uffdd_installer_hold(in);
    int fenced = 0;
    for (int i = 0; i < UFFDD_FENCES; i++)
        fenced |= in->fenced[i] == fd;
    int err = fenced ? EAGAIN : (ioctl(fd, request, arg) == 0 ? 0 : errno);
    uffdd_installer_unhold(in);
    return err;
}

/* -- the page server's urgent answers, on a pthread (pageserver/urgent.py) -------

   Why: an urgent fast-lane request answered by the page server's event loop cost
   ~70 us of Python and the loop's wake-up on top of the kernel's share; a demand
   fault waits for it, and during a restore those answers took the CPU the sweep
   needed (bench/README.md, session 8). A pthread, ``uffdd-urgent``, answers the
   urgent connections instead, from the images' mmaps, with the same chunks
   (fastlane_server.py, chunking.RangeCursor: never across an extent, DATA cut at the
   chunk size, a ZERO extent in one chunk) and the same checks, without the GIL.

   It answers only what it can answer exactly: a UFL1 request for a registered image,
   within the length limit, page-aligned, covered by extents whose checksum chunks
   verify (each checked once, as the reader does: the data file's size, then its
   xxh3 against the manifest; the shared ``verified`` bytes record it), and drops
   cancels (each request is answered whole before the next is parsed, so a cancel
   always comes too late). Anything else (an unknown image, a refusal, corrupt data,
   a bulk frame, garbage, a truncated last frame) hands the connection back to the
   event loop with its unparsed bytes, before a byte of that request is written; the
   loop's Connection answers it, and everything after it, as before. Writes never
   block: a connection whose peer does not read waits for EPOLLOUT and is not read
   meanwhile, so memory stays at its request buffer and one frame header per
   connection. */

#include <sys/stat.h>

#define UFFDD_ANS_IN 4096           /* unparsed request bytes of a connection, at most
                                       (more when its first read held more) */
#define UFFDD_ANS_TURN (256 * 1024) /* bytes one connection writes before the others */
#define UFFDD_ANS_FRAMES 64         /* or frames it parses (a flood of cancels) */
#define UFFDD_ANS_ZERO 1            /* uffdd_ans_extent.kind: known zero (else data) */
#define UFFDD_HB_DECLINED 0         /* a frame this thread does not answer */
#define UFFDD_HB_FULL 1             /* no room for the connection */
#define UFFDD_HB_UNKNOWN 2          /* a request for an image not registered (yet) */
#define UFFDD_HB_CLOSE (-1)         /* ans_release: close it instead */
#define UFFDD_SHORT_SLICE 100000    /* ns: kernel/sched.py's short slice */

struct uffdd_ans_extent {
    uint64_t start, end;        /* image addresses */
    uint64_t data_offset;       /* of start's bytes in the data file (DATA) */
    uint64_t page_size;         /* of the extent's region */
    uint32_t kind;
};

struct uffdd_handback {
    uint64_t token;
    int fd;                     /* the loop's now */
    int reason;                 /* UFFDD_HB_* */
    size_t len;
    char *bytes;                /* the unparsed bytes (uffdd_free), or NULL */
};

struct ans_image {
    char id[1024];
    size_t id_len;
    uint64_t page_size, chunk_size, data_size;
    const char *data;
    uint8_t *verified;          /* shared with the reader: 0 -> 1 only */
    const uint64_t *checksums;
    size_t nchunks;
    int data_fd;
    struct uffdd_ans_extent *extents;
    size_t nextents;
};

struct ans_conn {
    int fd;                     /* -1: a free slot */
    uint64_t token;
    uint32_t events;            /* what epoll waits for: EPOLLIN or EPOLLOUT */
    int runnable;               /* in the run list: more to write after its turn */
    unsigned char *in;          /* malloc'ed, in_cap bytes */
    size_t in_len, in_cap;
    /* the request being answered */
    int active;
    uint64_t request_id, pos, end;
    const struct ans_image *image;
    size_t ext;
    /* the frame being written */
    unsigned char header[32];
    size_t header_len, header_off;
    const char *body;
    size_t body_len, body_off;
};

struct ans_add {
    int fd;
    uint64_t token;
    size_t len;
    char *bytes;
};

struct uffdd_answerer {
    pthread_t thread;
    pthread_mutex_t lock;       /* images, adds, handbacks, live, stop, draining */
    struct ans_image **images;
    size_t nimages, cap_images;
    struct ans_add *adds;
    size_t nadds;
    struct uffdd_handback *handbacks;
    size_t nhandbacks, cap_handbacks;
    size_t live;                /* connections owned (slots in use and adds queued) */
    int stop, draining;
    struct ans_conn *conns;     /* the thread's own */
    size_t nconns;
    size_t *run, nrun;          /* connections with more to write, and a copy */
    size_t *turn;
    int epfd, ctl_efd, out_efd;
    uffdd_hash_fn hash;
    uint64_t chunk_size, max_length;
};

static void ans_put_u64(unsigned char *p, uint64_t v) { v = htole64(v); memcpy(p, &v, 8); }

static const struct ans_image *ans_find_image(struct uffdd_answerer *a, const unsigned char *id,
                                              size_t len)
{
    const struct ans_image *found = NULL;
    pthread_mutex_lock(&a->lock);  /* images are only added, and freed with the answerer */
    for (size_t i = 0; i < a->nimages && !found; i++)
        if (a->images[i]->id_len == len && memcmp(a->images[i]->id, id, len) == 0)
            found = a->images[i];
    pthread_mutex_unlock(&a->lock);
    return found;
}

/* The extent holding ``addr``: its index, or nextents. */
static size_t ans_find_extent(const struct ans_image *im, uint64_t addr)
{
    size_t lo = 0, hi = im->nextents;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (im->extents[mid].start <= addr)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo == 0 || addr >= im->extents[lo - 1].end)
        return im->nextents;
    return lo - 1;
}

/* The data of [offset, offset + len) verified (now, if not before): 1, else 0. */
static int ans_verify(struct uffdd_answerer *a, const struct ans_image *im, uint64_t offset,
                      uint64_t len)
{
    if (offset + len > im->data_size || offset + len < offset)
        return 0;
    uint64_t first = offset / im->chunk_size, last = (offset + len - 1) / im->chunk_size;
    for (uint64_t c = first; c <= last; c++) {
        if (c >= im->nchunks)
            return 0;
        if (im->verified[c])
            continue;
        struct stat st;  /* a data file changed under the mmap would fault it */
        if (fstat(im->data_fd, &st) != 0 || (uint64_t)st.st_size != im->data_size)
            return 0;
        uint64_t begin = c * im->chunk_size;
        uint64_t size = im->data_size - begin < im->chunk_size ? im->data_size - begin
                                                               : im->chunk_size;
        if (a->hash(im->data + begin, size) != im->checksums[c])
            return 0;  /* the loop's Connection reports it (DATA_LOSS) */
        __atomic_store_n(&im->verified[c], 1, __ATOMIC_RELAXED);
    }
    return 1;
}

/* Start answering [addr, addr + len) of ``im``, when this thread can answer it
   exactly as the loop would: 1, else 0 (nothing is written). */
static int ans_accept(struct uffdd_answerer *a, struct ans_conn *c, const struct ans_image *im,
                      uint64_t id, uint64_t addr, uint64_t len)
{
    if (!len || len > a->max_length || addr % im->page_size || len % im->page_size ||
        addr + len < addr)
        return 0;
    size_t first = ans_find_extent(im, addr);
    if (first == im->nextents || addr % im->extents[first].page_size ||
        len % im->extents[first].page_size)
        return 0;
    uint64_t pos = addr, end = addr + len;
    for (size_t i = first; pos < end; i++) {
        if (i == im->nextents || (i != first && im->extents[i].start != pos))
            return 0;  /* a gap: outside the image */
        const struct uffdd_ans_extent *e = &im->extents[i];
        uint64_t stop = e->end < end ? e->end : end;
        if (e->kind != UFFDD_ANS_ZERO &&
            !ans_verify(a, im, e->data_offset + (pos - e->start), stop - pos))
            return 0;
        pos = stop;
    }
    c->active = 1;
    c->request_id = id;
    c->pos = addr;
    c->end = end;
    c->image = im;
    c->ext = first;
    return 1;
}

/* The next chunk of the active request, into the frame to write. */
static void ans_next_piece(struct uffdd_answerer *a, struct ans_conn *c)
{
    const struct uffdd_ans_extent *e = &c->image->extents[c->ext];
    uint64_t stop = e->end < c->end ? e->end : c->end;
    int zero = e->kind == UFFDD_ANS_ZERO;
    if (!zero && stop - c->pos > a->chunk_size)
        stop = c->pos + a->chunk_size;
    uint64_t len = stop - c->pos;
    int last = stop == c->end;
    const char *body = zero ? NULL : c->image->data + e->data_offset + (c->pos - e->start);
    unsigned char *h = c->header;
    uint32_t l32 = htole32((uint32_t)len);
    ans_put_u64(h, c->request_id);
    ans_put_u64(h + 8, c->pos);
    memcpy(h + 16, &l32, 4);
    h[20] = (uint8_t)((zero ? UFFDD_FLAG_ZERO : 0) | (last ? UFFDD_FLAG_LAST : 0));
    h[21] = 0;
    h[22] = h[23] = 0;
    ans_put_u64(h + 24, zero ? 0 : a->hash(body, len));
    c->header_len = 32;
    c->header_off = 0;
    c->body = body;
    c->body_len = zero ? 0 : len;
    c->body_off = 0;
    c->pos = stop;
    if (stop == e->end)
        c->ext++;
    if (last)
        c->active = 0;
}

/* Parse one frame: 1 consumed (a request accepted or a cancel dropped), 0 more bytes
   needed, or the UFFDD_HB_* reason it is declined for (the connection goes back). */
static int ans_parse(struct uffdd_answerer *a, struct ans_conn *c)
{
    if (c->in_len < UFFDD_REQUEST_HEADER)
        return 0;
    const unsigned char *p = c->in;
    uint64_t id, addr;
    uint32_t len;
    uint16_t id_len;
    memcpy(&id, p + 4, 8);
    memcpy(&addr, p + 12, 8);
    memcpy(&len, p + 20, 4);
    memcpy(&id_len, p + 24, 2);
    id = le64toh(id);
    addr = le64toh(addr);
    len = le32toh(len);
    id_len = le16toh(id_len);
    int cancel = memcmp(p, "UFC1", 4) == 0;
    if ((!cancel && memcmp(p, "UFL1", 4) != 0) || id_len > 1024 || (cancel && id_len))
        return -UFFDD_HB_DECLINED - 1;
    size_t frame = UFFDD_REQUEST_HEADER + id_len;
    if (c->in_len < frame)
        return 0;
    if (!cancel) {
        const struct ans_image *im = ans_find_image(a, p + UFFDD_REQUEST_HEADER, id_len);
        if (!im)
            return -UFFDD_HB_UNKNOWN - 1;
        if (!ans_accept(a, c, im, id, addr, len))
            return -UFFDD_HB_DECLINED - 1;
    }
    memmove(c->in, c->in + frame, c->in_len - frame);
    c->in_len -= frame;
    return 1;
}

static void ans_handback_locked(struct uffdd_answerer *a, int fd, uint64_t token, int reason,
                                const char *bytes, size_t len)
{
    if (a->nhandbacks == a->cap_handbacks) {
        size_t cap = 2 * a->cap_handbacks;
        struct uffdd_handback *grown = realloc(a->handbacks, cap * sizeof *grown);
        if (!grown) {  /* nobody could take it: hang up rather than leak or block */
            close(fd);
            return;
        }
        a->handbacks = grown;
        a->cap_handbacks = cap;
    }
    char *copy = NULL;
    if (len && (copy = malloc(len)) != NULL)
        memcpy(copy, bytes, len);
    if (len && !copy) {
        close(fd);
        return;
    }
    a->handbacks[a->nhandbacks++] = (struct uffdd_handback){token, fd, reason, len, copy};
    efd_post(a->out_efd);
}

/* Let go of ``c``: hand it back to the loop for ``reason`` (UFFDD_HB_*), or close it
   (UFFDD_HB_CLOSE). */
static void ans_release(struct uffdd_answerer *a, struct ans_conn *c, int reason)
{
    epoll_ctl(a->epfd, EPOLL_CTL_DEL, c->fd, NULL);
    pthread_mutex_lock(&a->lock);
    if (reason != UFFDD_HB_CLOSE)
        ans_handback_locked(a, c->fd, c->token, reason, (const char *)c->in, c->in_len);
    else
        close(c->fd);
    a->live--;
    pthread_mutex_unlock(&a->lock);
    free(c->in);
    c->in = NULL;
    c->fd = -1;
    c->active = 0;
}

static void ans_wait_for(struct uffdd_answerer *a, struct ans_conn *c, uint32_t events)
{
    if (c->events == events)
        return;
    struct epoll_event ev = {.events = events, .data.u64 = (uint64_t)(c - a->conns)};
    epoll_ctl(a->epfd, EPOLL_CTL_MOD, c->fd, &ev);
    c->events = events;
}

/* Write what is pending of the frame: 1 all written, 0 the socket is full, -1 error. */
static int ans_write(struct ans_conn *c, size_t *written)
{
    while (c->header_off < c->header_len || c->body_off < c->body_len) {
        struct iovec iov[2];
        int n = 0;
        if (c->header_off < c->header_len)
            iov[n++] = (struct iovec){c->header + c->header_off, c->header_len - c->header_off};
        if (c->body_off < c->body_len)
            iov[n++] = (struct iovec){(void *)(c->body + c->body_off), c->body_len - c->body_off};
        struct msghdr m = {.msg_iov = iov, .msg_iovlen = (size_t)n};
        ssize_t w = sendmsg(c->fd, &m, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0)
            return errno == EAGAIN || errno == EWOULDBLOCK ? 0 : -1;
        size_t k = (size_t)w;
        *written += k;
        size_t h = c->header_len - c->header_off < k ? c->header_len - c->header_off : k;
        c->header_off += h;
        c->body_off += k - h;
    }
    return 1;
}

/* ``c`` had its turn with more to do: again after the others. */
static void ans_later(struct uffdd_answerer *a, struct ans_conn *c)
{
    if (!c->runnable) {
        c->runnable = 1;
        a->run[a->nrun++] = (size_t)(c - a->conns);
    }
}

/* Answer what ``c`` asks, for one turn. */
static void ans_run(struct uffdd_answerer *a, struct ans_conn *c, int draining)
{
    size_t written = 0;
    int frames = 0;
    for (;;) {
        int w = ans_write(c, &written);
        if (w < 0) {
            ans_release(a, c, UFFDD_HB_CLOSE);
            return;
        }
        if (w == 0) {
            ans_wait_for(a, c, EPOLLOUT);
            return;
        }
        if (c->active) {
            if (written >= UFFDD_ANS_TURN) {
                ans_later(a, c);
                return;
            }
            ans_next_piece(a, c);
            continue;
        }
        if (draining) {  /* as the loop's stop_reading: what was accepted is answered */
            ans_release(a, c, UFFDD_HB_CLOSE);
            return;
        }
        if (frames == UFFDD_ANS_FRAMES) {
            ans_later(a, c);
            return;
        }
        int r = ans_parse(a, c);
        if (r < 0) {
            ans_release(a, c, -r - 1);
            return;
        }
        if (r > 0) {
            frames++;
            continue;
        }
        ssize_t n = recv(c->fd, c->in + c->in_len, c->in_cap - c->in_len, MSG_DONTWAIT);
        if (n > 0) {
            c->in_len += (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            ans_wait_for(a, c, EPOLLIN);
            return;
        }
        /* EOF after a partial frame: the loop reports the truncated frame */
        ans_release(a, c, n == 0 && c->in_len > 0 ? UFFDD_HB_DECLINED : UFFDD_HB_CLOSE);
        return;
    }
}

/* Take the connections the loop added: each into a slot, or back when full. */
static void ans_adopt(struct uffdd_answerer *a)
{
    pthread_mutex_lock(&a->lock);
    size_t n = a->nadds;
    struct ans_add *adds = a->adds;
    a->adds = NULL;
    a->nadds = 0;
    pthread_mutex_unlock(&a->lock);
    for (size_t i = 0; i < n; i++) {
        struct ans_add *add = &adds[i];
        struct ans_conn *c = NULL;
        for (size_t s = 0; s < a->nconns && !c; s++)
            if (a->conns[s].fd < 0)
                c = &a->conns[s];
        struct epoll_event ev = {.events = EPOLLIN};
        size_t cap = add->len > UFFDD_ANS_IN ? add->len : UFFDD_ANS_IN;
        unsigned char *in = c ? malloc(cap) : NULL;
        if (c)
            ev.data.u64 = (uint64_t)(c - a->conns);
        if (!in || epoll_ctl(a->epfd, EPOLL_CTL_ADD, add->fd, &ev)) {
            free(in);
            pthread_mutex_lock(&a->lock);
            ans_handback_locked(a, add->fd, add->token, UFFDD_HB_FULL, add->bytes, add->len);
            a->live--;
            pthread_mutex_unlock(&a->lock);
            free(add->bytes);
            continue;
        }
        memset(c, 0, sizeof *c);
        c->fd = add->fd;
        c->token = add->token;
        c->events = EPOLLIN;
        c->in = in;
        c->in_cap = cap;
        memcpy(c->in, add->bytes, add->len);
        c->in_len = add->len;
        free(add->bytes);
        ans_later(a, c);  /* its first bytes are here already */
    }
    free(adds);
}

static void *answerer_main(void *arg)
{
    struct uffdd_answerer *a = arg;
    pthread_setname_np(pthread_self(), "uffdd-urgent");
    thread_slice(UFFDD_SHORT_SLICE);  /* a request waits for this thread to get a CPU */
    struct epoll_event evs[64];
    size_t *turn = a->turn;
    for (;;) {
        int n = epoll_wait(a->epfd, evs, 64, a->nrun ? 0 : -1);
        if (n < 0 && errno != EINTR)
            break;
        for (int i = 0; i < n; i++)
            if (evs[i].data.u64 == UINT64_MAX) {
                /* consumed before the flags are read: a post after this read stays
                   pending for the next epoll_wait, one before it set its flag first */
                uint64_t counter;
                ssize_t r = read(a->ctl_efd, &counter, sizeof counter);
                (void)r;
                ans_adopt(a);
            }
        pthread_mutex_lock(&a->lock);
        int stop = a->stop, draining = a->draining;
        pthread_mutex_unlock(&a->lock);
        if (stop)
            break;
        for (int i = 0; i < n; i++) {
            if (evs[i].data.u64 == UINT64_MAX)
                continue;
            struct ans_conn *c = &a->conns[evs[i].data.u64];
            if (c->fd >= 0 && !c->runnable)
                ans_run(a, c, draining);
        }
        size_t k = a->nrun;  /* a turn each for those with more to write */
        memcpy(turn, a->run, k * sizeof *turn);
        a->nrun = 0;
        for (size_t i = 0; i < k; i++) {
            struct ans_conn *c = &a->conns[turn[i]];
            c->runnable = 0;
            if (c->fd >= 0)
                ans_run(a, c, draining);
        }
        if (draining)  /* idle connections are closed at once */
            for (size_t s = 0; s < a->nconns; s++)
                if (a->conns[s].fd >= 0 && !a->conns[s].runnable && a->conns[s].events == EPOLLIN)
                    ans_run(a, &a->conns[s], draining);
    }
    return NULL;
}

/* A started answerer with room for ``max_conns`` connections, or NULL (errno set).
   ``chunk_size``: the urgent chunk size; ``max_length``: the longest request. */
static struct uffdd_answerer *uffdd_answerer_new(uffdd_hash_fn hash, uint64_t chunk_size,
                                                 uint64_t max_length, size_t max_conns)
{
    if (!chunk_size || !max_conns) {
        errno = EINVAL;
        return NULL;
    }
    struct uffdd_answerer *a = calloc(1, sizeof *a);
    if (!a)
        return NULL;
    a->conns = calloc(max_conns, sizeof *a->conns);
    a->run = calloc(max_conns, sizeof *a->run);
    a->turn = calloc(max_conns, sizeof *a->turn);
    a->handbacks = calloc(16, sizeof *a->handbacks);
    int fds = thread_fds_open(&a->epfd, &a->ctl_efd, &a->out_efd);
    if (!a->conns || !a->run || !a->turn || !a->handbacks || fds != 0)
        goto fail;
    for (size_t i = 0; i < max_conns; i++)
        a->conns[i].fd = -1;
    a->nconns = max_conns;
    a->cap_handbacks = 16;
    a->hash = hash;
    a->chunk_size = chunk_size;
    a->max_length = max_length;
    pthread_mutex_init(&a->lock, NULL);
    int rc = start_thread(&a->thread, answerer_main, a);
    if (rc == 0)
        return a;
    errno = rc;
fail:
    {
        int e = errno;
        close_opened((int[]){a->epfd, a->ctl_efd, a->out_efd}, 3);
        free(a->conns);
        free(a->run);
        free(a->turn);
        free(a->handbacks);
        free(a);
        errno = e;
    }
    return NULL;
}

static int uffdd_answerer_efd(const struct uffdd_answerer *a)
{
    return a->out_efd;
}

/* Serve image ``id`` from now on (the caller keeps data, verified, checksums and
   data_fd valid until uffdd_answerer_free). 0 or an errno. */
static int uffdd_answerer_image(struct uffdd_answerer *a, const char *id, size_t id_len,
                                uint64_t page_size, uint64_t chunk_size, const char *data,
                                uint64_t data_size, uint8_t *verified, const uint64_t *checksums,
                                size_t nchunks, int data_fd,
                                const struct uffdd_ans_extent *extents, size_t nextents)
{
    if (id_len > 1024 || !page_size || !chunk_size ||
        nchunks != (data_size + chunk_size - 1) / chunk_size)
        return EINVAL;
    for (size_t i = 0; i < nextents; i++)
        if (extents[i].end <= extents[i].start || !extents[i].page_size ||
            (i && extents[i].start < extents[i - 1].end))
            return EINVAL;  /* sorted, disjoint: ans_find_extent's bisection needs it */
    struct ans_image *im = calloc(1, sizeof *im);
    struct uffdd_ans_extent *copy = malloc((nextents ? nextents : 1) * sizeof *copy);
    if (!im || !copy) {
        free(im);
        free(copy);
        return ENOMEM;
    }
    memcpy(im->id, id, id_len);
    im->id_len = id_len;
    im->page_size = page_size;
    im->chunk_size = chunk_size;
    im->data = data;
    im->data_size = data_size;
    im->verified = verified;
    im->checksums = checksums;
    im->nchunks = nchunks;
    im->data_fd = data_fd;
    memcpy(copy, extents, nextents * sizeof *copy);
    im->extents = copy;
    im->nextents = nextents;
    pthread_mutex_lock(&a->lock);
    int err = 0;
    if (a->nimages == a->cap_images) {
        size_t cap = a->cap_images ? 2 * a->cap_images : 16;
        struct ans_image **grown = realloc(a->images, cap * sizeof *grown);
        if (grown) {
            a->images = grown;
            a->cap_images = cap;
        } else {
            err = ENOMEM;
        }
    }
    if (!err)
        a->images[a->nimages++] = im;
    pthread_mutex_unlock(&a->lock);
    if (err) {
        free(copy);
        free(im);
    }
    return err;
}

/* Answer connection ``fd`` (this answerer owns it from now on: it closes it, or hands
   it back through uffdd_answerer_take), whose first ``len`` bytes were read already.
   0, or an errno (EBUSY: full or stopping; the caller keeps fd). */
static int uffdd_answerer_add(struct uffdd_answerer *a, int fd, uint64_t token,
                              const char *bytes, size_t len)
{
    char *copy = len ? malloc(len) : NULL;
    if (len && !copy)
        return ENOMEM;
    if (len)
        memcpy(copy, bytes, len);
    int err = 0;
    pthread_mutex_lock(&a->lock);
    struct ans_add *grown = NULL;
    if (a->live >= a->nconns || a->draining || a->stop)
        err = EBUSY;
    else if (!(grown = realloc(a->adds, (a->nadds + 1) * sizeof *grown)))
        err = ENOMEM;
    if (!err) {
        a->adds = grown;
        a->adds[a->nadds++] = (struct ans_add){fd, token, len, copy};
        a->live++;
    }
    pthread_mutex_unlock(&a->lock);
    if (err) {
        free(copy);
        return err;
    }
    efd_post(a->ctl_efd);
    return 0;
}

static size_t uffdd_answerer_take(struct uffdd_answerer *a, struct uffdd_handback *out,
                                  size_t n)
{
    return efd_queue_take(a->out_efd, &a->lock, (void **)&a->handbacks, &a->nhandbacks, out, n,
                          sizeof *out);
}

/* Connections this answerer owns (queued, or in a slot). */
static size_t uffdd_answerer_live(struct uffdd_answerer *a)
{
    pthread_mutex_lock(&a->lock);
    size_t live = a->live;
    pthread_mutex_unlock(&a->lock);
    return live;
}

/* Shutting down: answer what was accepted, read nothing more, close each connection
   when done. Returns how many are still open. */
static size_t uffdd_answerer_drain(struct uffdd_answerer *a)
{
    pthread_mutex_lock(&a->lock);
    int first = !a->draining;
    a->draining = 1;
    size_t live = a->live;
    pthread_mutex_unlock(&a->lock);
    if (first)
        efd_post(a->ctl_efd);
    return live;
}

static void uffdd_answerer_free(struct uffdd_answerer *a)
{
    pthread_mutex_lock(&a->lock);
    a->stop = 1;
    pthread_mutex_unlock(&a->lock);
    efd_post(a->ctl_efd);
    pthread_join(a->thread, NULL);
    for (size_t i = 0; i < a->nconns; i++) {
        if (a->conns[i].fd >= 0)
            close(a->conns[i].fd);
        free(a->conns[i].in);
    }
    for (size_t i = 0; i < a->nadds; i++) {
        close(a->adds[i].fd);
        free(a->adds[i].bytes);
    }
    for (size_t i = 0; i < a->nhandbacks; i++) {
        close(a->handbacks[i].fd);  /* nobody took it */
        free(a->handbacks[i].bytes);
    }
    for (size_t i = 0; i < a->nimages; i++) {
        free(a->images[i]->extents);
        free(a->images[i]);
    }
    close(a->epfd);
    close(a->ctl_efd);
    close(a->out_efd);
    free(a->images);
    free(a->adds);
    free(a->handbacks);
    free(a->conns);
    free(a->run);
    free(a->turn);
    free(a);
}

static void uffdd_free(void *p)
{
    free(p);
}
"""
)

_CDEF = r"""
typedef uint64_t __u64;
typedef int64_t __s64;

struct uffdio_api { __u64 api; __u64 features; __u64 ioctls; };
struct uffdio_range { __u64 start; __u64 len; };
struct uffdio_register { struct uffdio_range range; __u64 mode; __u64 ioctls; };
struct uffdio_copy { __u64 dst; __u64 src; __u64 len; __u64 mode; __s64 copy; };
struct uffdio_zeropage { struct uffdio_range range; __u64 mode; __s64 zeropage; };
struct uffdio_writeprotect { struct uffdio_range range; __u64 mode; };
struct uffdio_continue { struct uffdio_range range; __u64 mode; __s64 mapped; };
struct uffdio_poison { struct uffdio_range range; __u64 mode; __s64 updated; };
struct uffdio_move { __u64 dst; __u64 src; __u64 len; __u64 mode; __s64 move; };

#define UFFD_API ...
#define UFFD_USER_MODE_ONLY ...
#define USERFAULTFD_IOC_NEW ...

#define UFFDIO_API ...
#define UFFDIO_REGISTER ...
#define UFFDIO_UNREGISTER ...
#define UFFDIO_WAKE ...
#define UFFDIO_COPY ...
#define UFFDIO_ZEROPAGE ...
#define UFFDIO_MOVE ...
#define UFFDIO_WRITEPROTECT ...
#define UFFDIO_CONTINUE ...
#define UFFDIO_POISON ...

#define _UFFDIO_REGISTER ...
#define _UFFDIO_UNREGISTER ...
#define _UFFDIO_WAKE ...
#define _UFFDIO_COPY ...
#define _UFFDIO_ZEROPAGE ...
#define _UFFDIO_MOVE ...
#define _UFFDIO_WRITEPROTECT ...
#define _UFFDIO_CONTINUE ...
#define _UFFDIO_POISON ...
#define _UFFDIO_API ...

#define UFFD_FEATURE_PAGEFAULT_FLAG_WP ...
#define UFFD_FEATURE_EVENT_FORK ...
#define UFFD_FEATURE_EVENT_REMAP ...
#define UFFD_FEATURE_EVENT_REMOVE ...
#define UFFD_FEATURE_MISSING_HUGETLBFS ...
#define UFFD_FEATURE_MISSING_SHMEM ...
#define UFFD_FEATURE_EVENT_UNMAP ...
#define UFFD_FEATURE_SIGBUS ...
#define UFFD_FEATURE_THREAD_ID ...
#define UFFD_FEATURE_MINOR_HUGETLBFS ...
#define UFFD_FEATURE_MINOR_SHMEM ...
#define UFFD_FEATURE_EXACT_ADDRESS ...
#define UFFD_FEATURE_WP_HUGETLBFS_SHMEM ...
#define UFFD_FEATURE_WP_UNPOPULATED ...
#define UFFD_FEATURE_POISON ...
#define UFFD_FEATURE_WP_ASYNC ...
#define UFFD_FEATURE_MOVE ...

#define UFFDIO_REGISTER_MODE_MISSING ...
#define UFFDIO_REGISTER_MODE_WP ...
#define UFFDIO_REGISTER_MODE_MINOR ...
#define UFFDIO_COPY_MODE_DONTWAKE ...
#define UFFDIO_COPY_MODE_WP ...
#define UFFDIO_ZEROPAGE_MODE_DONTWAKE ...
#define UFFDIO_WRITEPROTECT_MODE_WP ...
#define UFFDIO_WRITEPROTECT_MODE_DONTWAKE ...
#define UFFDIO_CONTINUE_MODE_DONTWAKE ...
#define UFFDIO_CONTINUE_MODE_WP ...
#define UFFDIO_POISON_MODE_DONTWAKE ...
#define UFFDIO_MOVE_MODE_DONTWAKE ...
#define UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES ...

int uffd_ioctl(int fd, unsigned long request, void *arg);
int uffd_create(int flags);
int uffd_create_from_device(int dev_fd, int flags);

struct uffdd_fast_range { uint64_t run_start; uint64_t run_end; uint64_t data_offset; };
struct uffdd_fast_done { uint64_t run; uint64_t len; uint64_t msg_index; };
struct uffdd_fast_out { size_t nread; size_t nrest; size_t ndone; size_t nfaults; };
#define UFFDD_FAST_BATCH ...

int uffdd_fast_serve(int fd, const struct uffdd_fast_range *ranges, size_t nranges,
                     const char *data, const uint8_t *verified, size_t nverified,
                     unsigned chunk_shift, uint64_t around,
                     char *rest, size_t rest_cap,
                     struct uffdd_fast_done *done, size_t done_cap,
                     struct uffdd_fast_out *out);

struct uffdd_install_done { uint64_t id; uint64_t copied; int err; };
struct uffdd_installer;

struct uffdd_installer *uffdd_installer_new(size_t cap, uint64_t piece, int nice);
void uffdd_installer_free(struct uffdd_installer *in);
int uffdd_installer_efd(const struct uffdd_installer *in);
int uffdd_installer_submit(struct uffdd_installer *in, int fd, uint64_t dst, uint64_t src,
                           uint64_t len, uint64_t mode, uint64_t id);
size_t uffdd_installer_take(struct uffdd_installer *in, struct uffdd_install_done *out,
                            size_t cap);
void uffdd_installer_hold(struct uffdd_installer *in);
void uffdd_installer_unhold(struct uffdd_installer *in);
int uffdd_installer_fence_held(struct uffdd_installer *in, int fd);
void uffdd_installer_unfence(struct uffdd_installer *in, int fd);
void uffdd_installer_quiesce(struct uffdd_installer *in, int fd);
int uffdd_installer_expedite(struct uffdd_installer *in, int fd, uint64_t addr);

struct uffdd_frame {
    uint64_t request_id, address, checksum;
    uint32_t length;
    uint8_t flags, code;
    uint16_t message_length;
    char *body;
    uint64_t body_len;
};
struct uffdd_receiver;
#define UFFDD_FRAME_HEADER ...
#define UFFDD_RECV_RUNNING ...
#define UFFDD_RECV_EOF ...
#define UFFDD_RECV_MIDFRAME ...
#define UFFDD_RECV_GARBAGE ...
#define UFFDD_RECV_STOPPED ...
#define UFFDD_RECV_NOMEM ...
struct uffdd_receiver *uffdd_receiver_new(int fd, size_t cap, uint64_t max_queued,
                                          uint64_t max_body);
int uffdd_receiver_efd(const struct uffdd_receiver *r);
size_t uffdd_receiver_take(struct uffdd_receiver *r, struct uffdd_frame *out, size_t n,
                           uint64_t max_bytes);
int uffdd_receiver_status(struct uffdd_receiver *r);
uint64_t uffdd_receiver_queued(struct uffdd_receiver *r);
int uffdd_receiver_send(struct uffdd_receiver *r, const char *data, size_t len);
uint64_t uffdd_receiver_unsent(struct uffdd_receiver *r);
void uffdd_receiver_free(struct uffdd_receiver *r);
typedef uint64_t (*uffdd_hash_fn)(const void *, size_t);
struct uffdd_demand_report {
    uint64_t token;
    double read_at, done_at;
    uint32_t nfaults, ninstalls, nmsgs, flags;
    int err;
    struct uffdd_fast_done *installs;
    char *msgs;
};
struct uffdd_demander;
#define UFFDD_DR_LAYOUT ...
#define UFFDD_DR_DRAINED ...
#define UFFDD_DR_ERROR ...
#define UFFDD_DR_LANE ...
#define UFFDD_DR_FENCE ...
struct uffdd_demander *uffdd_demander_new(int sock, uffdd_hash_fn hash, uint64_t around,
                                          size_t max_procs, struct uffdd_installer *installer);
int uffdd_demander_efd(const struct uffdd_demander *d);
int uffdd_demander_add(struct uffdd_demander *d, int fd, uint64_t token,
                       const char *image_id, size_t id_len,
                       const struct uffdd_fast_range *ranges, size_t nranges,
                       const struct uffdd_fast_range *zeros, size_t nzeros);
int uffdd_demander_resume(struct uffdd_demander *d, int slot,
                          const struct uffdd_fast_range *ranges, size_t nranges,
                          const struct uffdd_fast_range *zeros, size_t nzeros);
void uffdd_demander_remove(struct uffdd_demander *d, int slot);
size_t uffdd_demander_take(struct uffdd_demander *d, struct uffdd_demand_report *out,
                           size_t n);
void uffdd_demander_free(struct uffdd_demander *d);
int uffdd_installer_guarded_ioctl(struct uffdd_installer *in, int fd, unsigned long request,
                                  void *arg);
#define UFFDD_ANS_ZERO ...
#define UFFDD_HB_FULL ...
#define UFFDD_HB_UNKNOWN ...
struct uffdd_ans_extent { uint64_t start, end, data_offset, page_size; uint32_t kind; };
struct uffdd_handback { uint64_t token; int fd; int reason; size_t len; char *bytes; };
struct uffdd_answerer;
struct uffdd_answerer *uffdd_answerer_new(uffdd_hash_fn hash, uint64_t chunk_size,
                                          uint64_t max_length, size_t max_conns);
int uffdd_answerer_efd(const struct uffdd_answerer *a);
int uffdd_answerer_image(struct uffdd_answerer *a, const char *id, size_t id_len,
                         uint64_t page_size, uint64_t chunk_size, const char *data,
                         uint64_t data_size, uint8_t *verified, const uint64_t *checksums,
                         size_t nchunks, int data_fd, const struct uffdd_ans_extent *extents,
                         size_t nextents);
int uffdd_answerer_add(struct uffdd_answerer *a, int fd, uint64_t token, const char *bytes,
                       size_t len);
size_t uffdd_answerer_take(struct uffdd_answerer *a, struct uffdd_handback *out, size_t n);
size_t uffdd_answerer_live(struct uffdd_answerer *a);
size_t uffdd_answerer_drain(struct uffdd_answerer *a);
void uffdd_answerer_free(struct uffdd_answerer *a);
void uffdd_free(void *p);
"""

ffibuilder = FFI()
ffibuilder.cdef(_CDEF)
ffibuilder.set_source("uffdd.native._ffi", _SOURCE)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
