/* The background installer (``uffdd-install``): bulk UFFDIO_COPY on a thread of its own,
   and the fence table every reader of a uffd shares.

   Why: a large UFFDIO_COPY holds the thread that issues it for as long as the kernel
   takes to fill fresh pages (milliseconds per MiB), and a demand fault read by that
   thread meanwhile waits for all of it. Here a pthread runs bulk copies in pieces
   while the loop goes on reading faults and sockets; it never takes the GIL.

   Safety: a piece never lands after a reader has read a layout event (REMOVE, UNMAP,
   REMAP, FORK) the core has not handled yet. Every piece runs under uffd_lock, which
   every reader of a uffd holds around its reads, and checks first the fence a reader
   sets on such a read; a fenced job ends with EAGAIN and the bytes done, as a copy the
   kernel interrupted would. The protocol and why it holds: docs/architecture.md,
   section 5.3; the locks and their order: section 5.1 and 5.2.

   The fence table has a row for every uffd a reader may read: a uffd is watched
   before its first read (that may fail, cleanly: out of memory) and unwatched when
   released, so fencing it only flips its row and cannot fail. The table is indexed by
   fd number, so the check a piece makes costs one load. */
#include "uffdd.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ROW_WATCHED 1
#define ROW_FENCED 2

struct install_job {
    int fd;
    uint64_t dst, src, len, mode, id;
};

struct uffdd_installer {
    pthread_t thread;
    pthread_mutex_t uffd_lock; /* one piece at a time, never during a read; the fence
                                  table */
    pthread_mutex_t lock;      /* the queue, the completions, busy_fd, stop, the stats */
    pthread_cond_t work;       /* to the thread: a job or stop */
    pthread_cond_t idle;       /* to the loop: the job in progress ended */
    pthread_cond_t read_done;  /* to the thread: no reader waits for uffd_lock */
    int readers;               /* reads waiting for uffd_lock (a mutex does not queue:
                                  the thread would take it back piece after piece while
                                  a read waits for the whole job) */
    struct install_job *jobs;
    struct uffdd_install_done *done;
    size_t cap, head, count, ndone;
    int busy_fd;               /* the fd of the job in progress, or -1 */
    uint64_t busy_dst, busy_len;
    int busy_wake;             /* a thread waits in the job in progress: pieces wake */
    uint8_t *rows;             /* the fence table, by fd (under uffd_lock) */
    size_t nrows, nwatched;
    int stop;
    int efd;                   /* readable while completions wait */
    uint64_t piece;
    int nice;
    uint64_t pieces;           /* stats, atomic: read without uffd_lock */
    int waiting_for_reader;    /* the thread is taking uffd_lock for a piece */
};

/* With uffd_lock held: whether ``fd`` is fenced. */
static int fenced_held(const struct uffdd_installer *in, int fd)
{
    return fd >= 0 && (size_t)fd < in->nrows && (in->rows[fd] & ROW_FENCED);
}

static void installer_run(struct uffdd_installer *in, const struct install_job *job,
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
        if (stopping) { /* the installer is being freed: no more pieces */
            *err = EAGAIN;
            return;
        }
        __atomic_store_n(&in->waiting_for_reader, 1, __ATOMIC_RELAXED);
        pthread_mutex_lock(&in->uffd_lock);
        __atomic_store_n(&in->waiting_for_reader, 0, __ATOMIC_RELAXED);
        if (fenced_held(in, job->fd)) {
            pthread_mutex_unlock(&in->uffd_lock);
            *err = EAGAIN;
            return;
        }
        struct uffdio_copy c = {job->dst + *copied, job->src + *copied, n, mode, 0};
        int failed = ioctl(job->fd, UFFDIO_COPY, &c) != 0;
        int e = errno;
        pthread_mutex_unlock(&in->uffd_lock);
        __atomic_add_fetch(&in->pieces, 1, __ATOMIC_RELAXED);
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

static void *installer_main(void *arg)
{
    struct uffdd_installer *in = arg;
    pthread_setname_np(pthread_self(), "uffdd-install"); /* for top -H, perf, py-spy */
    thread_slice(0); /* bulk: the short slice is the loop's */
    if (in->nice)    /* per thread on Linux: bulk yields the CPU to the loop */
        setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), in->nice);
    pthread_mutex_lock(&in->lock);
    for (;;) {
        while (!in->count && !in->stop)
            pthread_cond_wait(&in->work, &in->lock);
        if (in->stop)
            break;
        struct install_job job = in->jobs[in->head];
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
        efd_post(in->efd);
    }
    pthread_mutex_unlock(&in->lock);
    return NULL;
}

/* A started installer with room for ``cap`` jobs, or NULL (errno set). */
struct uffdd_installer *uffdd_installer_new(size_t cap, uint64_t piece, int nice)
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
    pthread_mutex_init(&in->uffd_lock, NULL);
    pthread_mutex_init(&in->lock, NULL);
    pthread_cond_init(&in->work, NULL);
    pthread_cond_init(&in->idle, NULL);
    pthread_cond_init(&in->read_done, NULL);
    int rc = thread_start(&in->thread, installer_main, in);
    if (rc == 0)
        return in;
    pthread_mutex_destroy(&in->uffd_lock);
    pthread_mutex_destroy(&in->lock);
    pthread_cond_destroy(&in->work);
    pthread_cond_destroy(&in->idle);
    pthread_cond_destroy(&in->read_done);
    errno = rc;
fail: {
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
void uffdd_installer_free(struct uffdd_installer *in)
{
    pthread_mutex_lock(&in->lock);
    in->stop = 1;
    pthread_cond_signal(&in->work);
    pthread_mutex_unlock(&in->lock);
    pthread_join(in->thread, NULL);
    pthread_mutex_destroy(&in->uffd_lock);
    pthread_mutex_destroy(&in->lock);
    pthread_cond_destroy(&in->work);
    pthread_cond_destroy(&in->idle);
    pthread_cond_destroy(&in->read_done);
    close(in->efd);
    free(in->jobs);
    free(in->done);
    free(in->rows);
    free(in);
}

int uffdd_installer_efd(const struct uffdd_installer *in)
{
    return in->efd;
}

/* ``fd`` will be read (by the loop or the demand thread): give it a row in the fence
   table. 0, or an errno (EINVAL: a negative fd; ENOMEM). Not inside hold/unhold. */
int uffdd_installer_watch(struct uffdd_installer *in, int fd)
{
    if (fd < 0)
        return EINVAL;
    int err = 0;
    uffdd_installer_hold(in);
    if ((size_t)fd >= in->nrows) {
        size_t n = in->nrows ? in->nrows : 64;
        while (n <= (size_t)fd)
            n *= 2;
        uint8_t *grown = realloc(in->rows, n);
        if (grown) {
            memset(grown + in->nrows, 0, n - in->nrows);
            in->rows = grown;
            in->nrows = n;
        } else {
            err = ENOMEM;
        }
    }
    if (!err && !(in->rows[fd] & ROW_WATCHED)) {
        in->rows[fd] = ROW_WATCHED;
        __atomic_add_fetch(&in->nwatched, 1, __ATOMIC_RELAXED);
    }
    uffdd_installer_unhold(in);
    return err;
}

/* ``fd`` is no longer read, and no job of it is left (see quiesce): its row goes, fence
   and all, so the number is clean when it names another file. */
void uffdd_installer_unwatch(struct uffdd_installer *in, int fd)
{
    uffdd_installer_hold(in);
    if (fd >= 0 && (size_t)fd < in->nrows && in->rows[fd]) {
        in->rows[fd] = 0;
        __atomic_sub_fetch(&in->nwatched, 1, __ATOMIC_RELAXED);
    }
    uffdd_installer_unhold(in);
}

/* Queue a copy: 0, or -EAGAIN when ``cap`` jobs are queued, running or untaken (each
   ends in a completion slot, and there are ``cap`` of those). */
int uffdd_installer_submit(struct uffdd_installer *in, int fd, uint64_t dst, uint64_t src,
                           uint64_t len, uint64_t mode, uint64_t id)
{
    pthread_mutex_lock(&in->lock);
    if (in->count + in->ndone + (in->busy_fd >= 0) >= in->cap) {
        pthread_mutex_unlock(&in->lock);
        return -EAGAIN;
    }
    struct install_job *job = &in->jobs[(in->head + in->count) % in->cap];
    *job = (struct install_job){fd, dst, src, len, mode, id};
    in->count++;
    pthread_cond_signal(&in->work);
    pthread_mutex_unlock(&in->lock);
    return 0;
}

/* Move up to ``cap`` completions to ``out``; the number moved. */
size_t uffdd_installer_take(struct uffdd_installer *in, struct uffdd_install_done *out,
                            size_t cap)
{
    void *items = in->done;
    return efd_queue_take(in->efd, &in->lock, &items, &in->ndone, out, cap, sizeof *out);
}

/* A reader's side of uffd_lock: hold it around every read of a uffd. It waits for at
   most the piece in progress: the thread starts no piece while a reader waits. */
void uffdd_installer_hold(struct uffdd_installer *in)
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

void uffdd_installer_unhold(struct uffdd_installer *in)
{
    pthread_mutex_unlock(&in->uffd_lock);
}

/* With uffd_lock held, for a watched ``fd``: no piece for it starts until unfenced. */
void uffdd_installer_fence_held(struct uffdd_installer *in, int fd)
{
    if (fd >= 0 && (size_t)fd < in->nrows && (in->rows[fd] & ROW_WATCHED))
        in->rows[fd] |= ROW_FENCED;
}

void uffdd_installer_unfence(struct uffdd_installer *in, int fd)
{
    pthread_mutex_lock(&in->uffd_lock);
    if (fd >= 0 && (size_t)fd < in->nrows)
        in->rows[fd] &= (uint8_t)~ROW_FENCED;
    pthread_mutex_unlock(&in->uffd_lock);
}

/* A thread of ``fd`` faulted at ``addr``: the queued job that installs it goes first,
   waking as it goes (the job in progress wakes from its next piece on). 1 when a
   queued job moved, 2 for the job in progress, 0 when no job covers ``addr``. */
int uffdd_installer_expedite(struct uffdd_installer *in, int fd, uint64_t addr)
{
    int found = 0;
    pthread_mutex_lock(&in->lock);
    if (in->busy_fd == fd && in->busy_dst <= addr && addr - in->busy_dst < in->busy_len) {
        in->busy_wake = 1;
        found = 2;
    }
    for (size_t i = 0; !found && i < in->count; i++) {
        struct install_job job = in->jobs[(in->head + i) % in->cap];
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
void uffdd_installer_quiesce(struct uffdd_installer *in, int fd)
{
    pthread_mutex_lock(&in->lock);
    size_t kept = 0, ended = 0;
    for (size_t i = 0; i < in->count; i++) {
        struct install_job job = in->jobs[(in->head + i) % in->cap];
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
        efd_post(in->efd);
    pthread_mutex_unlock(&in->lock);
}

/* The loop's install into a uffd another thread reads: under uffd_lock, refused
   (EAGAIN, as the kernel refuses while an event is unread) when the uffd is fenced.
   Otherwise the ioctl's 0 or errno. */
int uffdd_installer_guarded_ioctl(struct uffdd_installer *in, int fd, unsigned long request,
                                  void *arg)
{
    uffdd_installer_hold(in);
    int err = fenced_held(in, fd) ? EAGAIN : (ioctl(fd, request, arg) == 0 ? 0 : errno);
    uffdd_installer_unhold(in);
    return err;
}

void uffdd_installer_stats(struct uffdd_installer *in, struct uffdd_installer_stats *out)
{
    pthread_mutex_lock(&in->lock);
    out->pieces = __atomic_load_n(&in->pieces, __ATOMIC_RELAXED);
    out->queued = in->count;
    out->untaken = in->ndone;
    out->busy = in->busy_fd >= 0;
    out->waiting_for_reader = __atomic_load_n(&in->waiting_for_reader, __ATOMIC_RELAXED);
    out->watched = __atomic_load_n(&in->nwatched, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&in->lock);
}
