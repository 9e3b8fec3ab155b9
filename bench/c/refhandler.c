/* Reference userfaultfd handlers in plain C: what the hardware and kernel allow.
 *
 * Why: uffdd's numbers mean little alone; the benchmark runs this beside the daemon,
 * in the same run, same CPU placement, same uffd setup, same image data file.
 *
 *   refhandler serve FD BASE LEN DATAFILE WINDOW
 *       Serve missing faults on [BASE, BASE+LEN) from DATAFILE (mmapped and populated
 *       first: "pages it already holds"): UFFDIO_COPY of the WINDOW-aligned block
 *       holding the fault (uffdd's fault-around), one ioctl per fault, which wakes.
 *       Runs until stdin reaches EOF; prints {"faults": N} on stdout.
 *   refhandler bulk FD BASE LEN DATAFILE CHUNK
 *       The local limit: read() DATAFILE in CHUNK pieces and UFFDIO_COPY each one.
 *       Prints {"seconds": S, "bytes": B}.
 *
 * FD is a userfaultfd inherited from the parent, registered for MISSING on the range.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static void die(const char *what)
{
    fprintf(stderr, "refhandler: %s: %s\n", what, strerror(errno));
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

static int serve(int fd, uint64_t base, uint64_t len, const char *path, uint64_t window)
{
    int data = open(path, O_RDONLY);
    if (data < 0)
        die("open data file");
    const char *map = mmap(NULL, len, PROT_READ, MAP_PRIVATE | MAP_POPULATE, data, 0);
    if (map == MAP_FAILED)
        die("mmap data file");
    uint64_t faults = 0;
    struct uffd_msg msgs[64];
    struct pollfd fds[2] = {{.fd = fd, .events = POLLIN}, {.fd = 0, .events = POLLIN}};
    /* Tell the parent we are ready: it starts faulting only then. */
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
                uint64_t end = at + window;
                if (end > base + len)
                    end = base + len;
                if (copy_range(fd, at, map + (at - base), end - at) < 0)
                    die("UFFDIO_COPY");
                faults++;
            }
        }
        if (fds[1].revents & (POLLIN | POLLHUP))
            break;
    }
    printf("{\"faults\": %" PRIu64 "}\n", faults);
    return 0;
}

static int bulk(int fd, uint64_t base, uint64_t len, const char *path, uint64_t chunk)
{
    int data = open(path, O_RDONLY);
    if (data < 0)
        die("open data file");
    char *buf = aligned_alloc(4096, chunk);
    if (!buf)
        die("alloc");
    memset(buf, 0, chunk); /* fault the buffer in before the clock starts */
    double t0 = now_s();
    uint64_t done = 0;
    while (done < len) {
        uint64_t want = len - done < chunk ? len - done : chunk;
        ssize_t got = pread(data, buf, want, (off_t)done);
        if (got <= 0)
            die("read data file");
        if (copy_range(fd, base + done, buf, (uint64_t)got) < 0)
            die("UFFDIO_COPY");
        done += (uint64_t)got;
    }
    double seconds = now_s() - t0;
    printf("{\"seconds\": %.6f, \"bytes\": %" PRIu64 "}\n", seconds, done);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc != 7) {
        fprintf(stderr, "usage: refhandler serve|bulk FD BASE LEN DATAFILE WINDOW|CHUNK\n");
        return 2;
    }
    int fd = atoi(argv[2]);
    uint64_t base = strtoull(argv[3], NULL, 0);
    uint64_t len = strtoull(argv[4], NULL, 0);
    uint64_t size = strtoull(argv[6], NULL, 0);
    if (size == 0 || (size & (size - 1)))
        return fprintf(stderr, "refhandler: WINDOW/CHUNK must be a power of two\n"), 2;
    if (strcmp(argv[1], "serve") == 0)
        return serve(fd, base, len, argv[5], size);
    if (strcmp(argv[1], "bulk") == 0)
        return bulk(fd, base, len, argv[5], size);
    fprintf(stderr, "refhandler: unknown mode %s\n", argv[1]);
    return 2;
}
