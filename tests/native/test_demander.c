/* The demand thread (csrc/demander.c) answering the faults of a thread of this process
   from a fake page server on a socket pair: each fault's window is fetched, checked and
   installed in C, known zeros are filled with no round trip, a wrong checksum is never
   installed (the fault goes back to the loop, raw), a fault outside the ranges goes back
   too, a layout event fences and pauses the uffd until resumed, and a broken lane is
   reported. */
#include "harness.h"

#define P UFFDD_PAGE
#define PAGES 64
#define AROUND (16 * P)
#define IMAGE_BASE 0x100000ULL /* the image address of the region's first page */
#define CHUNK (4 * P)          /* the server's data chunks */

static char image[PAGES * P];
static struct region r;
static int bad_checksums; /* the server damages the next answer's bytes */
static int hang_up;       /* the server closes at the next request */
static int requests;      /* requests the server read */

static void *server_main(void *arg)
{
    int fd = *(int *)arg;
    static char body[CHUNK];
    for (;;) {
        unsigned char h[UFFDD_REQUEST_HEADER + UFFDD_ID_MAX];
        struct uffdd_request req;
        if (socket_read(fd, (char *)h, UFFDD_REQUEST_HEADER) <= 0)
            return NULL;
        size_t id_len = (size_t)h[24] | (size_t)h[25] << 8;
        CHECK_EQ(socket_read(fd, (char *)h + UFFDD_REQUEST_HEADER, id_len), 1);
        CHECK_EQ(frame_parse_request(h, UFFDD_REQUEST_HEADER + id_len, &req), 1);
        CHECK_EQ(req.cancel, 0);
        CHECK(req.id_len == 3 && memcmp(req.image_id, "img", 3) == 0);
        __atomic_add_fetch(&requests, 1, __ATOMIC_SEQ_CST);
        if (__atomic_load_n(&hang_up, __ATOMIC_SEQ_CST)) {
            shutdown(fd, SHUT_RDWR);
            return NULL;
        }
        int bad = __atomic_load_n(&bad_checksums, __ATOMIC_SEQ_CST);
        for (uint32_t off = 0; off < req.length; off += CHUNK) {
            uint32_t len = req.length - off < CHUNK ? req.length - off : CHUNK;
            const char *data = image + (req.address - IMAGE_BASE) + off;
            memcpy(body, data, len);
            if (bad)
                body[0] ^= 0x5a; /* damaged on the way; the sum is the right bytes' */
            unsigned char rh[UFFDD_FRAME_HEADER];
            uint8_t flags = off + len == req.length ? UFFDD_FLAG_LAST : 0;
            frame_encode_response(rh, req.request_id, req.address + off, len, flags,
                                  uffdd_checksum(data, len));
            write_all(fd, rh, sizeof rh);
            write_all(fd, body, len);
        }
    }
}

/* The next report, waited for on the eventfd (its buffers: free_report). */
static struct uffdd_demand_report next_report(struct uffdd_demander *d)
{
    struct uffdd_demand_report rep;
    for (;;) {
        CHECK(readable(uffdd_demander_efd(d), 10000));
        if (uffdd_demander_take(d, &rep, 1) == 1)
            return rep;
    }
}

static void free_report(struct uffdd_demand_report *rep)
{
    uffdd_free(rep->installs);
    uffdd_free(rep->msgs);
}

static const struct uffd_msg *report_msg(const struct uffdd_demand_report *rep, size_t i)
{
    CHECK(i < rep->nmsgs);
    return (const struct uffd_msg *)rep->msgs + i;
}

/* A thread reads ``pages`` from ``page`` on; the demand thread answers it in one report. */
static struct uffdd_demand_report served(struct uffdd_demander *d, size_t page, size_t pages,
                                         const char *expected)
{
    struct faulter f;
    faulter_start(&f, r.base + page * P, pages * P);
    struct uffdd_demand_report rep = next_report(d);
    char *got = faulter_join(&f);
    CHECK(memcmp(got, expected, pages * P) == 0);
    free(got);
    CHECK_EQ(rep.token, 7);
    CHECK_EQ(rep.nmsgs, 0);
    CHECK_EQ(rep.nfaults, 1);
    CHECK(rep.read_at <= rep.done_at);
    return rep;
}

static void *remove_first_pages(void *arg)
{
    (void)arg;
    CHECK_EQ(madvise(r.base, 4 * P, MADV_DONTNEED), 0); /* waits for the event's read */
    return NULL;
}

int main(void)
{
    test_begin();
    pattern(image, sizeof image, 4);
    r = region_new(PAGES, UFFD_FEATURE_EVENT_REMOVE);
    struct uffdd_installer *in = uffdd_installer_new(8, 16 * P, 0);
    CHECK_EQ(uffdd_installer_watch(in, r.uffd), 0);
    int fds[2];
    stream_pair(fds);
    pthread_t server;
    CHECK_EQ(pthread_create(&server, NULL, server_main, &fds[1]), 0);
    struct uffdd_plan plan = {AROUND, 1};
    struct uffdd_demander *d = uffdd_demander_new(fds[0], &plan, 4, in);
    CHECK(d != NULL);
    /* pages 0-31 are image data, 32-47 known zeros, 48-63 neither (the loop's) */
    struct uffdd_fast_range data = {addr(&r, 0), addr(&r, 32), IMAGE_BASE};
    struct uffdd_fast_range zeros = {addr(&r, 32), addr(&r, 48), 0};
    CHECK_EQ(uffdd_demander_add(d, r.uffd, 7, "img", 3, &data, 1, &zeros, 1), 0);

    /* a data fault: its whole window, fetched and installed */
    struct uffdd_demand_report rep = served(d, 3, 1, image + 3 * P);
    CHECK_EQ(rep.ninstalls, 4); /* the server's four chunks */
    for (uint32_t i = 0; i < rep.ninstalls; i++) {
        CHECK_EQ(rep.installs[i].run, addr(&r, 4 * i));
        CHECK_EQ(rep.installs[i].len, CHUNK);
    }
    CHECK(memcmp(r.base, image, AROUND) == 0);
    CHECK_EQ(__atomic_load_n(&requests, __ATOMIC_SEQ_CST), 1);
    free_report(&rep);

    /* known zeros: filled here, no request */
    static const char zero_pages[2 * P];
    rep = served(d, 40, 2, zero_pages);
    CHECK_EQ(rep.ninstalls, 1);
    CHECK_EQ(rep.installs[0].run, addr(&r, 32)); /* the window, clipped to the zeros */
    CHECK_EQ(rep.installs[0].len, 16 * P);
    CHECK_EQ(__atomic_load_n(&requests, __ATOMIC_SEQ_CST), 1);
    free_report(&rep);

    /* a wrong checksum: nothing installed, the fault goes to the loop */
    __atomic_store_n(&bad_checksums, 1, __ATOMIC_SEQ_CST);
    struct faulter f;
    faulter_start(&f, r.base + 20 * P, P);
    rep = next_report(d);
    CHECK_EQ(rep.nfaults, 0);
    CHECK_EQ(rep.ninstalls, 0);
    CHECK_EQ(rep.nmsgs, 1);
    CHECK_EQ(report_msg(&rep, 0)->event, UFFD_EVENT_PAGEFAULT);
    CHECK_EQ(report_msg(&rep, 0)->arg.pagefault.address, addr(&r, 20));
    CHECK(!present(r.base + 16 * P) && !present(r.base + 20 * P));
    free_report(&rep);
    __atomic_store_n(&bad_checksums, 0, __ATOMIC_SEQ_CST);
    CHECK_EQ(copy_in(r.uffd, addr(&r, 20), image + 20 * P, P), 0); /* the loop's answer */
    free(faulter_join(&f));

    /* outside the ranges: the loop's, raw */
    faulter_start(&f, r.base + 50 * P, P);
    rep = next_report(d);
    CHECK_EQ(rep.nfaults, 0);
    CHECK_EQ(rep.nmsgs, 1);
    CHECK_EQ(report_msg(&rep, 0)->arg.pagefault.address, addr(&r, 50));
    free_report(&rep);
    CHECK_EQ(copy_in(r.uffd, addr(&r, 50), image, P), 0);
    free(faulter_join(&f));

    /* a layout event: reported, the uffd fenced and no longer read */
    pthread_t remover;
    CHECK_EQ(pthread_create(&remover, NULL, remove_first_pages, NULL), 0);
    rep = next_report(d);
    CHECK(rep.flags & UFFDD_DR_LAYOUT);
    CHECK_EQ(rep.nmsgs, 1);
    CHECK_EQ(report_msg(&rep, 0)->event, UFFD_EVENT_REMOVE);
    CHECK_EQ(report_msg(&rep, 0)->arg.remove.start, addr(&r, 0));
    CHECK_EQ(report_msg(&rep, 0)->arg.remove.end, addr(&r, 4));
    free_report(&rep);
    CHECK_EQ(pthread_join(remover, NULL), 0);
    char page[P] = {0};
    struct uffdio_copy c = {addr(&r, 60), (uint64_t)(uintptr_t)page, P, 0, 0};
    CHECK_EQ(uffdd_installer_guarded_ioctl(in, r.uffd, UFFDIO_COPY, &c), EAGAIN);
    faulter_start(&f, r.base + 1 * P, P); /* paused: the demand thread does not read it */
    struct uffd_msg msg = next_msg(r.uffd);
    CHECK_EQ(msg.arg.pagefault.address, addr(&r, 1));
    /* the loop has handled it: pages 0-3 read zeros now */
    uffdd_installer_unfence(in, r.uffd);
    CHECK_EQ(uffdd_installer_guarded_ioctl(in, r.uffd, UFFDIO_COPY, &c), 0);
    struct uffdd_fast_range after = {addr(&r, 4), addr(&r, 32), IMAGE_BASE + 4 * P};
    struct uffdd_fast_range removed[2] = {{addr(&r, 0), addr(&r, 4), 0}, zeros};
    CHECK_EQ(uffdd_demander_resume(d, 0, &after, 1, removed, 2), 0);
    struct uffdio_zeropage z = {{addr(&r, 1), P}, 0, 0};
    CHECK_EQ(uffd_ioctl(r.uffd, UFFDIO_ZEROPAGE, &z), 0); /* the loop's answer to page 1 */
    char *got = faulter_join(&f);
    CHECK(memcmp(got, page, P) == 0);
    free(got);
    rep = served(d, 2, 1, page); /* read again: a removed page is a known zero */
    CHECK_EQ(__atomic_load_n(&requests, __ATOMIC_SEQ_CST), 2);
    free_report(&rep);

    /* the lane breaks: reported, and the fault is the loop's */
    __atomic_store_n(&hang_up, 1, __ATOMIC_SEQ_CST);
    faulter_start(&f, r.base + 24 * P, P);
    rep = next_report(d);
    CHECK(rep.flags & UFFDD_DR_LANE);
    CHECK(rep.err != 0);
    CHECK_EQ(rep.nmsgs, 1);
    free_report(&rep);
    CHECK_EQ(copy_in(r.uffd, addr(&r, 24), image + 24 * P, P), 0);
    free(faulter_join(&f));
    faulter_start(&f, r.base + 28 * P, P); /* broken: nothing is fetched any more */
    rep = next_report(d);
    CHECK(rep.flags & UFFDD_DR_DRAINED);
    CHECK_EQ(rep.nfaults, 0);
    CHECK_EQ(rep.nmsgs, 1);
    free_report(&rep);
    CHECK_EQ(__atomic_load_n(&requests, __ATOMIC_SEQ_CST), 3);
    CHECK_EQ(copy_in(r.uffd, addr(&r, 28), image + 28 * P, P), 0);
    free(faulter_join(&f));

    uffdd_demander_remove(d, 0);
    /* a removed slot is not resumed (a layout report handed over after the loop took
       the uffd back): refused, and nothing is read of it */
    CHECK_EQ(uffdd_demander_resume(d, 0, &after, 1, removed, 2), -EBADF);
    uffdd_demander_free(d);
    CHECK_EQ(pthread_join(server, NULL), 0);
    close(fds[0]);
    close(fds[1]);
    uffdd_installer_unwatch(in, r.uffd);
    uffdd_installer_free(in);
    region_free(&r);
    return 0;
}
