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
#include <fcntl.h>
#include <inttypes.h>
#include <sys/mman.h>
#include <unistd.h>

#include "refcommon.h"

struct local {
    int fd;
    uint64_t base;
    const char *map;
};

static void serve_window(uint64_t at, uint64_t end, void *ctx)
{
    const struct local *l = ctx;
    if (copy_range(l->fd, at, l->map + (at - l->base), end - at) < 0)
        die("UFFDIO_COPY");
}

static int serve(int fd, uint64_t base, uint64_t len, const char *path, uint64_t window)
{
    int data = open(path, O_RDONLY);
    if (data < 0)
        die("open data file");
    const char *map = mmap(NULL, len, PROT_READ, MAP_PRIVATE | MAP_POPULATE, data, 0);
    if (map == MAP_FAILED)
        die("mmap data file");
    struct local l = {fd, base, map};
    uint64_t faults = fault_loop(fd, base, len, window, serve_window, &l);
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
    ref_program = "refhandler";
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
