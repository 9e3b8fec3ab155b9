/* What both C references share: fatal errors, a monotonic clock, and the copy loop.
 *
 * Why one place: the local and the remote reference must install pages exactly the
 * same way (one UFFDIO_COPY per range, a page that is already there skipped), or
 * their numbers would not compare.
 */
#ifndef UFFDD_BENCH_REFCOMMON_H
#define UFFDD_BENCH_REFCOMMON_H

#include <errno.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

static const char *ref_program = "ref";

static void die(const char *what)
{
    fprintf(stderr, "%s: %s: %s\n", ref_program, what, strerror(errno));
    exit(1);
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Install [dst, dst+len) from src; a page already present (EEXIST/EAGAIN partial) is
 * skipped and the copy resumes after it. Returns 0, or -1 on a real error. */
static int copy_range(int fd, uint64_t dst, const char *src, uint64_t len)
{
    uint64_t done = 0;
    while (done < len) {
        struct uffdio_copy c = {
            .dst = dst + done, .src = (uint64_t)(uintptr_t)(src + done), .len = len - done,
        };
        if (ioctl(fd, UFFDIO_COPY, &c) == 0)
            return 0;
        if (c.copy > 0) {
            done += (uint64_t)c.copy;
            continue;
        }
        if (errno == EEXIST || errno == EAGAIN) {
            struct uffdio_range r = {.start = dst + done, .len = 4096};
            ioctl(fd, UFFDIO_WAKE, &r);
            done += 4096;
            continue;
        }
        return -1;
    }
    return 0;
}

/* Print "ready" (the parent starts faulting only then), then serve until stdin reaches
 * EOF: for every page fault read from fd, serve(window start, window end, ctx), the
 * WINDOW-aligned block holding it clipped to [base, base+len). Returns the faults. */
static uint64_t fault_loop(int fd, uint64_t base, uint64_t len, uint64_t window,
                           void (*serve)(uint64_t at, uint64_t end, void *ctx), void *ctx)
{
    uint64_t faults = 0;
    struct uffd_msg msgs[64];
    struct pollfd fds[2] = {{.fd = fd, .events = POLLIN}, {.fd = 0, .events = POLLIN}};
    fputs("ready\n", stdout);
    fflush(stdout);
    for (;;) {
        if (poll(fds, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            die("poll");
        }
        if (fds[0].revents & POLLIN) {
            ssize_t got = read(fd, msgs, sizeof msgs);
            if (got < 0 && errno != EAGAIN)
                die("read uffd");
            for (ssize_t i = 0; got > 0 && i < got / (ssize_t)sizeof msgs[0]; i++) {
                if (msgs[i].event != UFFD_EVENT_PAGEFAULT)
                    continue;
                uint64_t at = msgs[i].arg.pagefault.address & ~(window - 1);
                if (at < base)
                    at = base;
                uint64_t end = at + window > base + len ? base + len : at + window;
                serve(at, end, ctx);
                faults++;
            }
        }
        if (fds[1].revents & (POLLIN | POLLHUP))
            return faults;
    }
}

#endif
