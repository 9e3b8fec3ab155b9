/* The skeleton of uffdd's epoll-driven threads (the demand thread, the urgent answerer):
   an epoll set, a control eventfd from the loop, an output queue to the loop that an
   eventfd signals, a stop flag, and their start and end.

   The rule that makes stopping and adding race-free: the control eventfd's counter is
   consumed before the thread reads its flags (stop, and the owner's), under the lock
   the loop sets them under; so a post after that read stays pending for the next
   wait, and one before it set its flag first. */
#include "uffdd.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

int epoll_thread_open(struct epoll_thread *t, size_t size, size_t cap)
{
    memset(t, 0, sizeof *t);
    t->epfd = epoll_create1(EPOLL_CLOEXEC);
    t->ctl_efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    t->out_efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    t->items = calloc(cap, size);
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = EPOLL_THREAD_CONTROL};
    if (t->epfd < 0 || t->ctl_efd < 0 || t->out_efd < 0 || !t->items ||
        epoll_ctl(t->epfd, EPOLL_CTL_ADD, t->ctl_efd, &ev) != 0) {
        int err = t->items ? errno : ENOMEM;
        close_opened((int[]){t->epfd, t->ctl_efd, t->out_efd}, 3);
        free(t->items);
        return err;
    }
    t->cap = cap;
    t->size = size;
    pthread_mutex_init(&t->lock, NULL);
    return 0;
}

int epoll_thread_start(struct epoll_thread *t, void *(*main)(void *), void *arg)
{
    return thread_start(&t->thread, main, arg);
}

int epoll_thread_wait(struct epoll_thread *t, struct epoll_event *evs, int max, int timeout,
                      int *control)
{
    *control = 0;
    int n = epoll_wait(t->epfd, evs, max, timeout);
    if (n < 0)
        return errno == EINTR ? 0 : -1;
    int kept = 0;
    for (int i = 0; i < n; i++) {
        if (evs[i].data.u64 == EPOLL_THREAD_CONTROL) {
            uint64_t counter;
            ssize_t r = read(t->ctl_efd, &counter, sizeof counter);
            (void)r;
            *control = 1;
        } else {
            evs[kept++] = evs[i];
        }
    }
    return kept;
}

int epoll_thread_reserve_locked(struct epoll_thread *t, size_t n)
{
    if (t->cap - t->nitems >= n)
        return 0;
    size_t cap = t->cap;
    while (cap - t->nitems < n)
        cap *= 2;
    void *grown = realloc(t->items, cap * t->size);
    if (!grown)
        return ENOMEM;
    t->items = grown;
    t->cap = cap;
    return 0;
}

int epoll_thread_push_locked(struct epoll_thread *t, const void *item)
{
    if (t->nitems == t->cap && epoll_thread_reserve_locked(t, 1) != 0)
        return ENOMEM;
    memcpy((char *)t->items + t->nitems * t->size, item, t->size);
    if (++t->nitems == 1)
        efd_post(t->out_efd);
    return 0;
}

size_t epoll_thread_take(struct epoll_thread *t, void *out, size_t n)
{
    return efd_queue_take(t->out_efd, &t->lock, &t->items, &t->nitems, out, n, t->size);
}

void epoll_thread_stop(struct epoll_thread *t)
{
    pthread_mutex_lock(&t->lock);
    t->stop = 1;
    pthread_mutex_unlock(&t->lock);
    efd_post(t->ctl_efd);
}

void epoll_thread_end(struct epoll_thread *t, void (*drop)(void *item))
{
    pthread_join(t->thread, NULL);
    for (size_t i = 0; i < t->nitems; i++)
        drop((char *)t->items + i * t->size);
    t->nitems = 0;
    epoll_thread_release(t);
}

void epoll_thread_release(struct epoll_thread *t)
{
    pthread_mutex_destroy(&t->lock);
    close(t->epfd);
    close(t->ctl_efd);
    close(t->out_efd);
    free(t->items);
    t->items = NULL;
}
