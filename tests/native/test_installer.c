/* The installer thread (csrc/installer.c) against a real userfaultfd of this process:
   jobs install exactly their bytes and wake as asked, no piece runs while a reader holds
   the lock, any number of watched uffds can be fenced at once (fenced jobs end with
   EAGAIN and the bytes done), the loop's guarded installs meet the fence, a fault's job
   goes first, a full queue refuses. */
#include "harness.h"

#define P UFFDD_PAGE
#define PIECE (16 * P)

static char *buffer(size_t pages, unsigned seed)
{
    char *b = malloc(pages * P);
    CHECK(b != NULL);
    pattern(b, pages * P, seed);
    return b;
}

/* The next ``n`` completions, waited for on the eventfd. */
static void take(struct uffdd_installer *in, struct uffdd_install_done *out, size_t n)
{
    size_t got = 0;
    while (got < n) {
        CHECK(readable(uffdd_installer_efd(in), 10000));
        got += uffdd_installer_take(in, out + got, n - got);
    }
}

static struct uffdd_installer_stats stats(struct uffdd_installer *in)
{
    struct uffdd_installer_stats s;
    uffdd_installer_stats(in, &s);
    return s;
}

static void test_a_job_installs_every_byte_and_wakes_a_waiting_thread(void)
{
    struct region r = region_new(40, 0);
    struct uffdd_installer *in = uffdd_installer_new(8, PIECE, 0);
    CHECK(in != NULL);
    char *data = buffer(40, 1);
    struct faulter f;
    faulter_start(&f, r.base + 37 * P, P); /* in the job's last piece */
    struct uffd_msg msg = next_msg(r.uffd);
    CHECK_EQ(msg.arg.pagefault.address, addr(&r, 37));
    CHECK_EQ(uffdd_installer_submit(in, r.uffd, addr(&r, 0), (uint64_t)(uintptr_t)data, 40 * P,
                                    0, 7),
             0);
    struct uffdd_install_done done;
    take(in, &done, 1);
    CHECK_EQ(done.id, 7);
    CHECK_EQ(done.copied, 40 * P);
    CHECK_EQ(done.err, 0);
    char *got = faulter_join(&f); /* only the job could wake it */
    CHECK(memcmp(got, data + 37 * P, P) == 0);
    CHECK(memcmp(r.base, data, 40 * P) == 0);
    CHECK_EQ(stats(in).pieces, 3); /* 40 pages in pieces of 16 */
    free(got);
    free(data);
    uffdd_installer_free(in);
    region_free(&r);
}

static void test_no_piece_runs_while_a_reader_holds_the_lock(void)
{
    struct region r = region_new(32, 0);
    struct uffdd_installer *in = uffdd_installer_new(8, PIECE, 0);
    char *data = buffer(32, 2);
    uffdd_installer_hold(in);
    CHECK_EQ(uffdd_installer_submit(in, r.uffd, addr(&r, 0), (uint64_t)(uintptr_t)data, 32 * P,
                                    UFFDIO_COPY_MODE_DONTWAKE, 1),
             0);
    while (!stats(in).waiting_for_reader) /* the thread has the job, and waits */
        sched_yield();
    struct uffdd_installer_stats s = stats(in);
    CHECK_EQ(s.busy, 1);
    CHECK_EQ(s.pieces, 0);
    CHECK(!present(r.base));
    uffdd_installer_unhold(in);
    struct uffdd_install_done done;
    take(in, &done, 1);
    CHECK_EQ(done.copied, 32 * P);
    CHECK(memcmp(r.base, data, 32 * P) == 0);
    free(data);
    uffdd_installer_free(in);
    region_free(&r);
}

static void test_any_number_of_watched_uffds_is_fenced_at_once(void)
{
    enum { N = 100 };
    int fds[N];
    struct uffdd_installer *in = uffdd_installer_new(128, PIECE, 0);
    char *data = buffer(1, 3);
    for (int i = 0; i < N; i++) {
        fds[i] = uffd_create(O_CLOEXEC | O_NONBLOCK);
        CHECK(fds[i] >= 0);
        CHECK_EQ(uffdd_installer_watch(in, fds[i]), 0);
    }
    CHECK_EQ(uffdd_installer_watch(in, fds[0]), 0); /* twice is one row */
    CHECK_EQ(stats(in).watched, N);
    uffdd_installer_hold(in);
    for (int i = 0; i < N; i++) {
        /* (a fenced job ends before its ioctl: no memory needs registering) */
        CHECK_EQ(uffdd_installer_submit(in, fds[i], 0x10000, (uint64_t)(uintptr_t)data, P,
                                        UFFDIO_COPY_MODE_DONTWAKE, (uint64_t)i),
                 0);
        uffdd_installer_fence_held(in, fds[i]);
    }
    uffdd_installer_unhold(in);
    for (int i = 0; i < N; i++)
        uffdd_installer_quiesce(in, fds[i]);
    struct uffdd_install_done done[N];
    take(in, done, N);
    int seen[N] = {0};
    for (int i = 0; i < N; i++) {
        CHECK_EQ(done[i].err, EAGAIN);
        CHECK_EQ(done[i].copied, 0);
        seen[done[i].id]++;
    }
    for (int i = 0; i < N; i++)
        CHECK_EQ(seen[i], 1);
    CHECK_EQ(stats(in).pieces, 0);
    for (int i = 0; i < N; i++) {
        uffdd_installer_unwatch(in, fds[i]);
        close(fds[i]);
    }
    CHECK_EQ(stats(in).watched, 0);
    CHECK_EQ(uffdd_installer_watch(in, -1), EINVAL);
    free(data);
    uffdd_installer_free(in);
}

static void test_a_guarded_install_meets_the_fence_and_unwatch_drops_it(void)
{
    struct region r = region_new(4, 0);
    struct uffdd_installer *in = uffdd_installer_new(8, PIECE, 0);
    char *data = buffer(1, 4);
    struct uffdio_copy c = {addr(&r, 0), (uint64_t)(uintptr_t)data, P, 0, 0};
    CHECK_EQ(uffdd_installer_watch(in, r.uffd), 0);
    uffdd_installer_hold(in);
    uffdd_installer_fence_held(in, r.uffd);
    uffdd_installer_unhold(in);
    CHECK_EQ(uffdd_installer_guarded_ioctl(in, r.uffd, UFFDIO_COPY, &c), EAGAIN);
    CHECK(!present(r.base));
    uffdd_installer_unfence(in, r.uffd);
    CHECK_EQ(uffdd_installer_guarded_ioctl(in, r.uffd, UFFDIO_COPY, &c), 0);
    CHECK(memcmp(r.base, data, P) == 0);
    /* released while fenced: the row goes with its fence */
    uffdd_installer_hold(in);
    uffdd_installer_fence_held(in, r.uffd);
    uffdd_installer_unhold(in);
    uffdd_installer_unwatch(in, r.uffd);
    CHECK_EQ(uffdd_installer_watch(in, r.uffd), 0);
    c.dst = addr(&r, 1);
    CHECK_EQ(uffdd_installer_guarded_ioctl(in, r.uffd, UFFDIO_COPY, &c), 0);
    free(data);
    uffdd_installer_free(in);
    region_free(&r);
}

static void test_a_fence_stops_a_running_job_between_pieces(void)
{
    size_t pages = 64 << 8; /* 64 MiB */
    char *data = buffer(pages, 5);
    struct uffdd_installer *in = uffdd_installer_new(8, PIECE, 0);
    struct uffdd_install_done done = {0, 0, 0};
    struct region r;
    /* a loaded machine may run the whole job before the fence: then again */
    for (int attempt = 0; attempt < 5; attempt++) {
        r = region_new(pages, 0);
        CHECK_EQ(uffdd_installer_watch(in, r.uffd), 0);
        uint64_t before = stats(in).pieces;
        CHECK_EQ(uffdd_installer_submit(in, r.uffd, addr(&r, 0), (uint64_t)(uintptr_t)data,
                                        pages * P, UFFDIO_COPY_MODE_DONTWAKE, 1),
                 0);
        while (stats(in).pieces == before)
            sched_yield();
        uffdd_installer_hold(in);
        uffdd_installer_fence_held(in, r.uffd);
        uffdd_installer_unhold(in);
        uffdd_installer_quiesce(in, r.uffd);
        take(in, &done, 1);
        uffdd_installer_unwatch(in, r.uffd);
        if (done.err == EAGAIN)
            break;
        region_free(&r);
    }
    CHECK_EQ(done.err, EAGAIN);
    CHECK(done.copied > 0 && done.copied < pages * P);
    CHECK_EQ(done.copied % PIECE, 0);
    CHECK(memcmp(r.base, data, done.copied) == 0); /* (present pages only: no fault) */
    CHECK(present(r.base + done.copied - P));
    CHECK(!present(r.base + done.copied));
    free(data);
    uffdd_installer_free(in);
    region_free(&r);
}

static void test_a_fault_moves_its_queued_job_first_and_it_wakes_as_it_goes(void)
{
    struct region r = region_new(3 * 32, 0);
    struct uffdd_installer *in = uffdd_installer_new(8, PIECE, 0);
    char *data = buffer(3 * 32, 6);
    struct faulter f;
    faulter_start(&f, r.base + (64 + 5) * P, P); /* in the third job */
    next_msg(r.uffd);
    uffdd_installer_hold(in); /* no piece runs meanwhile */
    for (uint64_t j = 0; j < 3; j++)
        CHECK_EQ(uffdd_installer_submit(in, r.uffd, addr(&r, j * 32),
                                        (uint64_t)(uintptr_t)(data + j * 32 * P), 32 * P,
                                        UFFDIO_COPY_MODE_DONTWAKE, j),
                 0);
    CHECK(uffdd_installer_expedite(in, r.uffd, addr(&r, 64 + 5)) != 0);
    CHECK_EQ(uffdd_installer_expedite(in, r.uffd, addr(&r, 96)), 0); /* no job there */
    uffdd_installer_unhold(in);
    struct uffdd_install_done done[3];
    take(in, done, 3);
    size_t third = 3, second = 3;
    for (size_t i = 0; i < 3; i++) {
        CHECK_EQ(done[i].err, 0);
        if (done[i].id == 2)
            third = i;
        if (done[i].id == 1)
            second = i;
    }
    CHECK(third < second); /* (the first may have been running) */
    char *got = faulter_join(&f); /* nothing but the job can wake it */
    CHECK(memcmp(got, data + (64 + 5) * P, P) == 0);
    free(got);
    free(data);
    uffdd_installer_free(in);
    region_free(&r);
}

static void test_a_full_queue_refuses_and_an_unexpected_errno_is_reported(void)
{
    struct region r = region_new(16, 0);
    struct uffdd_installer *in = uffdd_installer_new(2, PIECE, 0);
    char *data = buffer(16, 7);
    uint64_t src = (uint64_t)(uintptr_t)data;
    uffdd_installer_hold(in);
    CHECK_EQ(uffdd_installer_submit(in, r.uffd, addr(&r, 0), src, 8 * P, 0, 1), 0);
    CHECK_EQ(uffdd_installer_submit(in, r.uffd, addr(&r, 8) + 1, src, P, 0, 2), 0);
    CHECK_EQ(uffdd_installer_submit(in, r.uffd, addr(&r, 9), src, P, 0, 3), -EAGAIN);
    CHECK_EQ(stats(in).queued + stats(in).busy, 2);
    uffdd_installer_unhold(in);
    struct uffdd_install_done done[2];
    take(in, done, 2);
    CHECK_EQ(done[0].id, 1);
    CHECK_EQ(done[0].copied, 8 * P);
    CHECK_EQ(done[1].id, 2);
    CHECK_EQ(done[1].err, EINVAL); /* not page aligned */
    free(data);
    uffdd_installer_free(in);
    region_free(&r);
}

static void test_free_with_jobs_queued_returns_and_leaves_whole_pieces(void)
{
    struct region r = region_new(64, 0);
    struct uffdd_installer *in = uffdd_installer_new(8, PIECE, 0);
    char *data = buffer(64, 8);
    uffdd_installer_hold(in);
    for (uint64_t j = 0; j < 4; j++)
        CHECK_EQ(uffdd_installer_submit(in, r.uffd, addr(&r, j * 16),
                                        (uint64_t)(uintptr_t)(data + j * 16 * P), 16 * P,
                                        UFFDIO_COPY_MODE_DONTWAKE, j),
                 0);
    uffdd_installer_unhold(in);
    uffdd_installer_free(in); /* joins, dropping the jobs not started */
    for (size_t page = 0; page < 64; page++) /* what ran before is whole and right */
        if (present(r.base + page * P))
            CHECK(memcmp(r.base + page * P, data + page * P, P) == 0);
    free(data);
    region_free(&r);
}

int main(void)
{
    test_begin();
    test_a_job_installs_every_byte_and_wakes_a_waiting_thread();
    test_no_piece_runs_while_a_reader_holds_the_lock();
    test_any_number_of_watched_uffds_is_fenced_at_once();
    test_a_guarded_install_meets_the_fence_and_unwatch_drops_it();
    test_a_fence_stops_a_running_job_between_pieces();
    test_a_fault_moves_its_queued_job_first_and_it_wakes_as_it_goes();
    test_a_full_queue_refuses_and_an_unexpected_errno_is_reported();
    test_free_with_jobs_queued_returns_and_leaves_whole_pieces();
    return 0;
}
