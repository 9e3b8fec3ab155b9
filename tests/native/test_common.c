/* What the threads share (csrc/common.c, ranges.c, epoll_thread.c): the eventfd queue
   to the loop, the epoll skeleton's control and output, thread start-up with signals
   blocked, exact socket reads, the range tables. */
#include "harness.h"

#include <signal.h>
#include <sys/eventfd.h>

static void test_the_eventfd_queue_hands_items_in_order_and_stays_readable_while_any_wait(void)
{
    int efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    CHECK(efd >= 0);
    pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
    uint64_t backing[8] = {10, 11, 12, 13, 14};
    void *items = backing;
    size_t count = 5;
    uint64_t out[8] = {0};
    efd_post(efd);
    efd_post(efd); /* posts collapse into one readable state */
    CHECK_EQ(efd_queue_take(efd, &lock, &items, &count, out, 2, sizeof out[0]), 2);
    CHECK_EQ(out[0], 10);
    CHECK_EQ(out[1], 11);
    CHECK_EQ(count, 3);
    CHECK_EQ(backing[0], 12); /* the rest moved to the front */
    CHECK(readable(efd, 0));  /* three still wait */
    CHECK_EQ(efd_queue_take(efd, &lock, &items, &count, out, 8, sizeof out[0]), 3);
    CHECK_EQ(out[2], 14);
    CHECK_EQ(count, 0);
    CHECK(!readable(efd, 0)); /* empty: not readable */
    CHECK_EQ(efd_queue_take(efd, &lock, &items, &count, out, 8, sizeof out[0]), 0);
    close(efd);
}

/* A thread on the skeleton: each control post makes it push one item (its number),
   until stopped. */
struct counter {
    struct epoll_thread t;
    uint64_t pushed;
    int pending; /* items the loop asked for */
};

static void *counter_main(void *arg)
{
    struct counter *c = arg;
    struct epoll_event evs[4];
    for (;;) {
        int control;
        int n = epoll_thread_wait(&c->t, evs, 4, -1, &control);
        CHECK(n >= 0);
        CHECK_EQ(n, 0); /* nothing but the control eventfd is in the set */
        pthread_mutex_lock(&c->t.lock);
        int stop = c->t.stop;
        while (!stop && c->pending) {
            c->pending--;
            uint64_t item = ++c->pushed;
            CHECK_EQ(epoll_thread_push_locked(&c->t, &item), 0);
        }
        pthread_mutex_unlock(&c->t.lock);
        if (stop)
            return NULL;
    }
}

static int dropped;

static void count_drop(void *item)
{
    (void)item;
    dropped++;
}

static void test_the_epoll_skeleton_queues_what_its_thread_pushes_and_ends_cleanly(void)
{
    struct counter c = {.pushed = 0};
    CHECK_EQ(epoll_thread_open(&c.t, sizeof(uint64_t), 2), 0); /* room for 2: it grows */
    CHECK_EQ(epoll_thread_start(&c.t, counter_main, &c), 0);
    pthread_mutex_lock(&c.t.lock);
    c.pending = 5;
    pthread_mutex_unlock(&c.t.lock);
    efd_post(c.t.ctl_efd);
    uint64_t out[8];
    size_t got = 0;
    while (got < 5) {
        CHECK(readable(c.t.out_efd, 10000));
        got += epoll_thread_take(&c.t, out + got, 8 - got);
    }
    for (size_t i = 0; i < 5; i++)
        CHECK_EQ(out[i], i + 1);
    pthread_mutex_lock(&c.t.lock);
    c.pending = 3; /* left in the queue at the end */
    pthread_mutex_unlock(&c.t.lock);
    efd_post(c.t.ctl_efd);
    CHECK(readable(c.t.out_efd, 10000));
    for (;;) { /* until all three are queued */
        pthread_mutex_lock(&c.t.lock);
        size_t queued = c.t.nitems;
        pthread_mutex_unlock(&c.t.lock);
        if (queued == 3)
            break;
        CHECK(queued < 3);
        sched_yield();
    }
    epoll_thread_stop(&c.t);
    epoll_thread_end(&c.t, count_drop);
    CHECK_EQ(dropped, 3);
}

static void *signal_mask(void *arg)
{
    sigset_t *mask = arg;
    pthread_sigmask(SIG_SETMASK, NULL, mask);
    return NULL;
}

static void test_a_started_thread_has_every_signal_blocked_and_its_creator_none_more(void)
{
    sigset_t before, after, in_thread;
    pthread_sigmask(SIG_SETMASK, NULL, &before);
    pthread_t thread;
    CHECK_EQ(thread_start(&thread, signal_mask, &in_thread), 0);
    CHECK_EQ(pthread_join(thread, NULL), 0);
    pthread_sigmask(SIG_SETMASK, NULL, &after);
    CHECK(sigismember(&in_thread, SIGTERM) && sigismember(&in_thread, SIGINT));
    CHECK(sigismember(&in_thread, SIGUSR1) && sigismember(&in_thread, SIGCHLD));
    for (int s = 1; s < SIGRTMIN; s++)
        CHECK_EQ(sigismember(&before, s), sigismember(&after, s));
}

static void test_socket_read_reads_exactly_and_tells_eof_from_an_error(void)
{
    int fds[2];
    stream_pair(fds);
    write_all(fds[1], "abc", 3);
    write_all(fds[1], "defgh", 5);
    char buf[8];
    CHECK_EQ(socket_read(fds[0], buf, 6), 1);
    CHECK(memcmp(buf, "abcdef", 6) == 0);
    close(fds[1]);
    CHECK_EQ(socket_read(fds[0], buf, 3), 0); /* two bytes, then EOF */
    close(fds[0]);
    CHECK_EQ(socket_read(fds[0], buf, 1), -EBADF);
}

static void test_ranges_are_found_by_bisection_and_plans_clip_to_them(void)
{
    const struct uffdd_fast_range table[] = {
        {0x10000, 0x14000, 0}, {0x20000, 0x40000, 0x4000}, {0x40000, 0x41000, 0x24000}};
    CHECK(range_find(table, 3, 0xffff) == NULL);
    CHECK(range_find(table, 3, 0x10000) == &table[0]);
    CHECK(range_find(table, 3, 0x13fff) == &table[0]);
    CHECK(range_find(table, 3, 0x14000) == NULL);
    CHECK(range_find(table, 3, 0x3f000) == &table[1]);
    CHECK(range_find(table, 3, 0x40000) == &table[2]);
    CHECK(range_find(table, 0, 0x10000) == NULL);
    CHECK_EQ(range_after(table, 3, 0), 0);
    CHECK_EQ(range_after(table, 3, 0x14000), 1);
    CHECK_EQ(range_after(table, 3, 0x41000), 3);
    /* the plan's block clipped to the row (tests/native/test_plan.py holds every case
       to the core's plan_fault) */
    struct uffdd_plan plan = {0x10000, 0};
    struct uffdd_span s[4];
    CHECK_EQ(uffdd_plan_fault(&plan, table, 3, NULL, 0, 0x11000, s, 4), 1);
    CHECK_EQ(s[0].start, 0x10000); /* the block 0x10000-0x20000 */
    CHECK_EQ(s[0].end, 0x14000);
    CHECK_EQ(s[0].row, 0);
    plan.block = 0x4000;
    CHECK_EQ(uffdd_plan_fault(&plan, table, 3, NULL, 0, 0x25000, s, 4), 1);
    CHECK_EQ(s[0].start, 0x24000);
    CHECK_EQ(s[0].end, 0x28000);
    CHECK_EQ(uffdd_plan_fault(&plan, table, 3, NULL, 0, 0x15000, s, 4), 0);
    CHECK(plan_valid(&plan));
    plan.block = 0x3000;
    CHECK(!plan_valid(&plan));
}

static void test_reserved_room_takes_pushes_without_growing(void)
{
    struct epoll_thread t;
    CHECK_EQ(epoll_thread_open(&t, sizeof(uint64_t), 2), 0);
    pthread_mutex_lock(&t.lock);
    CHECK_EQ(epoll_thread_reserve_locked(&t, 2), 0); /* there already */
    CHECK_EQ(t.cap, 2);
    CHECK_EQ(epoll_thread_reserve_locked(&t, 5), 0);
    CHECK(t.cap >= 5);
    void *items = t.items;
    size_t cap = t.cap;
    for (uint64_t i = 0; i < 5; i++)
        CHECK_EQ(epoll_thread_push_locked(&t, &i), 0);
    CHECK(t.items == items); /* the reserved room, not a new allocation */
    CHECK_EQ(t.cap, cap);
    CHECK_EQ(epoll_thread_reserve_locked(&t, cap - 5), 0);
    CHECK_EQ(t.cap, cap);
    CHECK_EQ(epoll_thread_reserve_locked(&t, cap - 5 + 1), 0); /* one more: it grows */
    CHECK(t.cap > cap);
    pthread_mutex_unlock(&t.lock);
    uint64_t out[5];
    CHECK_EQ(epoll_thread_take(&t, out, 5), 5);
    for (uint64_t i = 0; i < 5; i++)
        CHECK_EQ(out[i], i);
    epoll_thread_release(&t);
}

int main(void)
{
    test_begin();
    test_reserved_room_takes_pushes_without_growing();
    test_the_eventfd_queue_hands_items_in_order_and_stays_readable_while_any_wait();
    test_the_epoll_skeleton_queues_what_its_thread_pushes_and_ends_cleanly();
    test_a_started_thread_has_every_signal_blocked_and_its_creator_none_more();
    test_socket_read_reads_exactly_and_tells_eof_from_an_error();
    test_ranges_are_found_by_bisection_and_plans_clip_to_them();
    return 0;
}
