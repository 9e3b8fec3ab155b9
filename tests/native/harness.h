/* What every C test of tests/native/ shares: checks that end the program with the line
   that failed, a time bound, and the fixtures the threads are driven with (a
   userfaultfd over memory of this process, a thread that faults on it, socket pairs).

   Why faults in this process: a pthread that faults here holds no GIL, so the C threads
   under test can answer it from the same process, and the sanitizers see both sides. */
#ifndef UFFDD_TEST_HARNESS_H
#define UFFDD_TEST_HARNESS_H

#include "uffdd.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#define CHECK(cond)                                                                     \
    do {                                                                                \
        if (!(cond)) {                                                                  \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond);    \
            exit(1);                                                                    \
        }                                                                               \
    } while (0)

#define CHECK_EQ(a, b)                                                                  \
    do {                                                                                \
        unsigned long long a_ = (unsigned long long)(a), b_ = (unsigned long long)(b);  \
        if (a_ != b_) {                                                                 \
            fprintf(stderr, "%s:%d: check failed: %s == %s (%llu != %llu)\n", __FILE__, \
                    __LINE__, #a, #b, a_, b_);                                          \
            exit(1);                                                                    \
        }                                                                               \
    } while (0)

#define TEST_SECONDS 60 /* SIGALRM ends a test that hangs (a uffd bug hangs, not fails) */

static inline void test_begin(void)
{
    alarm(TEST_SECONDS);
}

/* Until ``fd`` is readable: 1, or 0 after ``ms`` milliseconds. */
static inline int readable(int fd, int ms)
{
    struct pollfd p = {.fd = fd, .events = POLLIN};
    return poll(&p, 1, ms) == 1;
}

/* A page of ``seed``'s pattern: every byte differs from its neighbours'. */
static inline void pattern(char *page, size_t len, unsigned seed)
{
    for (size_t i = 0; i < len; i++)
        page[i] = (char)((i * 7 + seed * 13 + i / 4096) & 0xff);
}

/* A userfaultfd of this process (non-blocking) with ``features``, and ``pages`` of
   anonymous memory registered on it (MISSING), starting at a multiple of 64 KiB (so
   fault-around windows of up to 16 pages start at its pages). */
struct region {
    int uffd;
    char *base;
    size_t len;
};

#define REGION_ALIGN (16 * UFFDD_PAGE)

static inline struct region region_new(size_t pages, uint64_t features)
{
    struct region r = {-1, NULL, pages * UFFDD_PAGE};
    r.uffd = uffd_create(O_CLOEXEC | O_NONBLOCK);
    CHECK(r.uffd >= 0);
    struct uffdio_api api = {.api = UFFD_API, .features = features};
    CHECK_EQ(uffd_ioctl(r.uffd, UFFDIO_API, &api), 0);
    char *raw = mmap(NULL, r.len + REGION_ALIGN, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(raw != MAP_FAILED);
    r.base = (char *)(((uintptr_t)raw + REGION_ALIGN - 1) & ~(uintptr_t)(REGION_ALIGN - 1));
    if (r.base > raw)
        munmap(raw, (size_t)(r.base - raw));
    munmap(r.base + r.len, (size_t)(raw + REGION_ALIGN - r.base));
    struct uffdio_register reg = {{(uint64_t)(uintptr_t)r.base, r.len},
                                  UFFDIO_REGISTER_MODE_MISSING, 0};
    CHECK_EQ(uffd_ioctl(r.uffd, UFFDIO_REGISTER, &reg), 0);
    return r;
}

static inline void region_free(struct region *r)
{
    munmap(r->base, r->len);
    close(r->uffd);
}

static inline uint64_t addr(const struct region *r, size_t page)
{
    return (uint64_t)(uintptr_t)(r->base + page * UFFDD_PAGE);
}

/* A thread that reads [at, at + len) (each byte: a missing page faults and waits), into
   ``got``. */
struct faulter {
    pthread_t thread;
    const volatile char *at;
    size_t len;
    char *got;
};

static inline void *faulter_main(void *arg)
{
    struct faulter *f = arg;
    for (size_t i = 0; i < f->len; i++)
        f->got[i] = f->at[i];
    return NULL;
}

static inline void faulter_start(struct faulter *f, const char *at, size_t len)
{
    f->at = at;
    f->len = len;
    f->got = malloc(len);
    CHECK(f->got != NULL);
    CHECK_EQ(pthread_create(&f->thread, NULL, faulter_main, f), 0);
}

/* Join the faulter: its bytes (the caller frees them). */
static inline char *faulter_join(struct faulter *f)
{
    CHECK_EQ(pthread_join(f->thread, NULL), 0);
    return f->got;
}

/* The one message the uffd has within 10 s. */
static inline struct uffd_msg next_msg(int uffd)
{
    struct uffd_msg msg;
    CHECK(readable(uffd, 10000));
    CHECK_EQ(read(uffd, &msg, sizeof msg), sizeof msg);
    return msg;
}

/* UFFDIO_COPY of ``len`` bytes from ``src`` to ``dst`` (waking): the errno, or 0. */
static inline int copy_in(int uffd, uint64_t dst, const char *src, size_t len)
{
    struct uffdio_copy c = {dst, (uint64_t)(uintptr_t)src, len, 0, 0};
    return uffd_ioctl(uffd, UFFDIO_COPY, &c);
}

/* UFFDIO_ZEROPAGE of ``len`` bytes at ``dst`` (waking): the errno, or 0. */
static inline int zero_in(int uffd, uint64_t dst, size_t len)
{
    struct uffdio_zeropage z = {{dst, len}, 0, 0};
    return uffd_ioctl(uffd, UFFDIO_ZEROPAGE, &z);
}

/* Whether the page at ``at`` of this process is present (mincore). */
static inline int present(const void *at)
{
    unsigned char vec = 0;
    CHECK_EQ(mincore((void *)at, UFFDD_PAGE, &vec), 0);
    return vec & 1;
}

/* A connected pair of Unix stream sockets. */
static inline void stream_pair(int fds[2])
{
    CHECK_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds), 0);
}

/* Write all of ``len`` bytes to a blocking socket. */
static inline void write_all(int fd, const void *p, size_t len)
{
    const char *c = p;
    while (len) {
        ssize_t n = write(fd, c, len);
        CHECK(n > 0);
        c += n;
        len -= (size_t)n;
    }
}

/* Read exactly ``len`` bytes of a blocking socket within 10 s. */
static inline void read_all(int fd, void *p, size_t len)
{
    char *c = p;
    while (len) {
        CHECK(readable(fd, 10000));
        ssize_t n = read(fd, c, len);
        CHECK(n > 0);
        c += n;
        len -= (size_t)n;
    }
}

#endif
