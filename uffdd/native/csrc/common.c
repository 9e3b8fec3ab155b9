/* What every C thread of uffdd shares: eventfd wake-ups and the eventfd queue, thread
   start-up (signals blocked, scheduler slice), exact socket reads, the clock. */
#include "uffdd.h"

#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

void efd_post(int efd)
{
    uint64_t one = 1;
    ssize_t r = write(efd, &one, sizeof one); /* EAGAIN: the counter is set already */
    (void)r;
}

size_t efd_queue_take(int efd, pthread_mutex_t *lock, void **items, size_t *count, void *out,
                      size_t n, size_t size)
{
    uint64_t counter;
    ssize_t r = read(efd, &counter, sizeof counter);
    (void)r;
    pthread_mutex_lock(lock);
    size_t k = *count < n ? *count : n;
    if (k) {
        memcpy(out, *items, k * size);
        memmove(*items, (char *)*items + k * size, (*count - k) * size);
    }
    *count -= k;
    if (*count)
        efd_post(efd);
    pthread_mutex_unlock(lock);
    return k;
}

void close_opened(const int *fds, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (fds[i] >= 0)
            close(fds[i]);
}

int thread_start(pthread_t *thread, void *(*start)(void *), void *arg)
{
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int rc = pthread_create(thread, NULL, start, arg);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return rc;
}

/* The kernel's struct sched_attr, version 0 (48 bytes): <linux/sched/types.h> clashes
   with glibc's <sched.h>. */
struct sched_attr_v0 {
    uint32_t size, sched_policy;
    uint64_t sched_flags;
    int32_t sched_nice;
    uint32_t sched_priority;
    uint64_t sched_runtime, sched_deadline, sched_period;
};

void thread_slice(uint64_t runtime)
{
    struct sched_attr_v0 attr;
    if (syscall(SYS_sched_getattr, 0, &attr, sizeof attr, 0) != 0)
        return;
    if (attr.sched_policy != SCHED_OTHER && attr.sched_policy != SCHED_BATCH &&
        attr.sched_policy != SCHED_IDLE)
        return;
    attr.sched_runtime = runtime;
    attr.sched_flags = 0;
    syscall(SYS_sched_setattr, 0, &attr, 0);
}

int socket_read(int fd, char *p, size_t len)
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

double monotonic_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

void uffdd_free(void *p)
{
    free(p);
}
