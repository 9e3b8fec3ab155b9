/* The remote reference: a page server and a fault handler in plain C, over loopback TCP.
 *
 * Why: a remote demand fault costs four wake-ups across processes (the faulting
 * process -> handler -> page server -> handler -> process) on top of the copy, and on
 * this kind of VM each wake-up across CPUs costs ~70 us. What uffdd's Python daemon
 * and page server make of that only means something beside what C makes of it, in the
 * same run, with the same workload, the same fault-around window and, with the sweep,
 * the same competition for the CPUs. This is the least a remote handler can do: no
 * checksums, no policy, no event handling beyond page faults, no flow control.
 *
 *   remoteref server DATAFILE
 *       Listen on 127.0.0.1 (a free port, printed as "port N"), one thread per
 *       connection. A request is 16 bytes, offset and length (native uint64 each);
 *       the answer is those bytes of DATAFILE (mmapped), nothing else. Requests on
 *       one connection are answered in order. Runs until stdin reaches EOF.
 *   remoteref handle FD BASE LEN PORT WINDOW SWEEP [IMAGE_ID]
 *       Serve missing faults on [BASE, BASE+LEN) from the server on 127.0.0.1:PORT:
 *       fetch the WINDOW-aligned block holding the fault and UFFDIO_COPY it (which
 *       wakes). With SWEEP > 0 a second thread streams the whole range meanwhile, on
 *       its own connection, in SWEEP-byte requests, SWEEP_DEPTH of them outstanding,
 *       and copies each chunk (a page already there is skipped, as uffdd does).
 *       Prints "ready" once connected; runs until stdin reaches EOF, then prints
 *       {"faults": N, "swept_bytes": B, "sweep_s": S}.
 *       With IMAGE_ID, PORT is the fast lane of `uffdd page-server` instead, spoken
 *       as uffdd's daemon does (pages.proto, "Fast lane": UFL1 requests for faults,
 *       UFB1 for the sweep, answers in chunks), the image mapped at its own address:
 *       uffdd's page server with a C handler, to tell the two halves' costs apart.
 *       Chunk checksums are not checked.
 *
 * FD is a userfaultfd inherited from the parent, registered for MISSING on the range.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "refcommon.h"
#include "sockets.h"

#define SWEEP_DEPTH 4

struct request {
    uint64_t offset;
    uint64_t length;
};

static void no_delay(int sock)
{
    int one = 1;
    if (setsockopt(sock, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) < 0)
        die("TCP_NODELAY");
}

/* -- the server ------------------------------------------------------------------- */

static const char *server_map;
static uint64_t server_size;

static void *serve_connection(void *arg)
{
    int sock = (int)(intptr_t)arg;
    struct request req;
    while (recv_all(sock, &req, sizeof req) == 1) {
        if (req.offset > server_size || req.length > server_size - req.offset) {
            fprintf(stderr, "remoteref: request outside the data file\n");
            break;
        }
        if (send_all(sock, server_map + req.offset, req.length) < 0)
            break;
    }
    close(sock);
    return NULL;
}

static int server(const char *path)
{
    int data = open(path, O_RDONLY);
    struct stat st;
    if (data < 0 || fstat(data, &st) < 0)
        die("open data file");
    server_size = (uint64_t)st.st_size;
    server_map = mmap(NULL, server_size, PROT_READ, MAP_SHARED | MAP_POPULATE, data, 0);
    if (server_map == MAP_FAILED)
        die("mmap data file");
    int listener = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t addr_len = sizeof addr;
    if (listener < 0 || bind(listener, (struct sockaddr *)&addr, sizeof addr) < 0 ||
        listen(listener, 16) < 0 || getsockname(listener, (struct sockaddr *)&addr, &addr_len) < 0)
        die("listen");
    printf("port %u\n", ntohs(addr.sin_port));
    fflush(stdout);
    struct pollfd fds[2] = {{.fd = listener, .events = POLLIN}, {.fd = 0, .events = POLLIN}};
    for (;;) {
        if (poll(fds, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            die("poll");
        }
        if (fds[1].revents & (POLLIN | POLLHUP))
            return 0;
        if (!(fds[0].revents & POLLIN))
            continue;
        int sock = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
        if (sock < 0)
            die("accept");
        no_delay(sock);
        pthread_t thread;
        if (pthread_create(&thread, NULL, serve_connection, (void *)(intptr_t)sock) != 0)
            die("pthread_create");
        pthread_detach(thread);
    }
}

/* -- the handler ------------------------------------------------------------------ */

/* The handler's side of one connection, in either protocol. */
struct peer {
    int sock;
    uint64_t base;        /* raw protocol: offsets are from here */
    const char *image_id; /* NULL: the raw protocol; else uffdd's fast lane */
    uint64_t next_id;
};

struct chunk {
    uint64_t address;
    uint64_t length;
    int last; /* the request's final chunk */
};

#pragma pack(push, 1)
struct uffdd_request { /* fastlane_wire.REQUEST, then the image id */
    char magic[4];
    uint64_t request_id;
    uint64_t address;
    uint32_t length;
    uint16_t id_length;
};
struct uffdd_response { /* fastlane_wire.RESPONSE */
    uint64_t request_id;
    uint64_t address;
    uint32_t length;
    uint8_t flags;
    uint8_t code;
    uint16_t message_length;
    uint64_t checksum;
};
#pragma pack(pop)

#define FLAG_ZERO 1
#define FLAG_LAST 2
#define FLAG_ERROR 4

struct sweep {
    int uffd;
    struct peer peer;
    uint64_t len;
    uint64_t chunk;
    _Atomic uint64_t swept;
    _Atomic double seconds; /* set when the whole range is in; -1 until then */
};

static struct peer connect_to(unsigned port, uint64_t base, const char *image_id)
{
    int sock = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in addr = {
        .sin_family = AF_INET, .sin_port = htons((uint16_t)port),
        .sin_addr.s_addr = htonl(INADDR_LOOPBACK),
    };
    if (sock < 0 || connect(sock, (struct sockaddr *)&addr, sizeof addr) < 0)
        die("connect to the reference server");
    no_delay(sock);
    return (struct peer){.sock = sock, .base = base, .image_id = image_id, .next_id = 1};
}

static int ask(struct peer *p, int bulk, uint64_t address, uint64_t length)
{
    if (p->image_id == NULL) {
        struct request req = {.offset = address - p->base, .length = length};
        return send_all(p->sock, &req, sizeof req);
    }
    char frame[sizeof(struct uffdd_request) + 1024];
    size_t id_length = strlen(p->image_id);
    if (id_length > 1024)
        return -1;
    struct uffdd_request req = {
        .request_id = p->next_id++, .address = address, .length = (uint32_t)length,
        .id_length = (uint16_t)id_length,
    };
    memcpy(req.magic, bulk ? "UFB1" : "UFL1", 4);
    memcpy(frame, &req, sizeof req);
    memcpy(frame + sizeof req, p->image_id, id_length);
    return send_all(p->sock, frame, sizeof req + id_length);
}

/* Receive the next chunk of an answer into buf (room for cap bytes). The raw protocol
 * has no headers: its chunk is the whole request, [expect, expect + expect_length). */
static void next_chunk(struct peer *p, uint64_t expect, uint64_t expect_length, char *buf,
                       uint64_t cap, struct chunk *out)
{
    if (p->image_id == NULL) {
        *out = (struct chunk){.address = expect, .length = expect_length, .last = 1};
    } else {
        struct uffdd_response head;
        if (recv_all(p->sock, &head, sizeof head) != 1)
            die("receive a chunk header");
        if (head.flags & FLAG_ERROR) {
            char message[65536];
            if (recv_all(p->sock, message, head.message_length) < 0)
                die("receive an error");
            fprintf(stderr, "remoteref: page server error %u: %.*s\n", head.code,
                    (int)head.message_length, message);
            exit(1);
        }
        *out = (struct chunk){
            .address = head.address, .length = head.length, .last = !!(head.flags & FLAG_LAST),
        };
        if (head.flags & FLAG_ZERO) {
            if (out->length > cap)
                die("zero chunk larger than the buffer");
            memset(buf, 0, out->length);
            return;
        }
    }
    if (out->length > cap) {
        errno = EMSGSIZE;
        die("chunk larger than the buffer");
    }
    if (recv_all(p->sock, buf, out->length) != 1)
        die("receive chunk data");
}

static void *sweep_main(void *arg)
{
    struct sweep *s = arg;
    uint64_t base = s->peer.base;
    char *buf = aligned_alloc(4096, s->chunk);
    if (!buf)
        die("alloc");
    double t0 = now_s();
    uint64_t asked = 0, answered = 0, got = 0;
    while (answered < s->len) {
        while (asked < s->len && asked - answered < SWEEP_DEPTH * s->chunk) {
            uint64_t want = s->len - asked < s->chunk ? s->len - asked : s->chunk;
            if (ask(&s->peer, 1, base + asked, want) < 0)
                die("sweep request");
            asked += want;
        }
        uint64_t want = s->len - answered < s->chunk ? s->len - answered : s->chunk;
        struct chunk c;
        next_chunk(&s->peer, base + answered, want, buf, s->chunk, &c);
        if (copy_range(s->uffd, c.address, buf, c.length) < 0)
            die("sweep UFFDIO_COPY");
        got += c.length;
        if (c.last)
            answered += want;
        atomic_store(&s->swept, got);
    }
    atomic_store(&s->seconds, now_s() - t0);
    free(buf);
    return NULL;
}

struct urgent_ctx {
    int fd;
    struct peer *peer;
    uint64_t window;
    char *buf;
};

static void fetch_window(uint64_t at, uint64_t end, void *ctx)
{
    struct urgent_ctx *u = ctx;
    if (ask(u->peer, 0, at, end - at) < 0)
        die("urgent request");
    struct chunk c;
    do {
        next_chunk(u->peer, at, end - at, u->buf, u->window, &c);
        if (copy_range(u->fd, c.address, u->buf, c.length) < 0)
            die("UFFDIO_COPY");
    } while (!c.last);
}

static int handle(int fd, uint64_t base, uint64_t len, unsigned port, uint64_t window,
                  uint64_t sweep_chunk, const char *image_id)
{
    struct peer urgent = connect_to(port, base, image_id);
    struct sweep sweep = {.uffd = fd, .len = len, .chunk = sweep_chunk, .seconds = -1.0};
    pthread_t sweeper;
    if (sweep_chunk > 0) {
        sweep.peer = connect_to(port, base, image_id);
        if (pthread_create(&sweeper, NULL, sweep_main, &sweep) != 0)
            die("pthread_create");
        pthread_detach(sweeper);
    }
    struct urgent_ctx u = {.fd = fd, .peer = &urgent, .window = window};
    u.buf = aligned_alloc(4096, window);
    if (!u.buf)
        die("alloc");
    memset(u.buf, 0, window);
    uint64_t faults = fault_loop(fd, base, len, window, fetch_window, &u);
    printf("{\"faults\": %" PRIu64 ", \"swept_bytes\": %" PRIu64 ", \"sweep_s\": %.6f}\n",
           faults, atomic_load(&sweep.swept), atomic_load(&sweep.seconds));
    fflush(stdout);
    _exit(0); /* the sweep may still be receiving: the process ends with it */
}

int main(int argc, char **argv)
{
    ref_program = "remoteref";
    if (argc == 3 && strcmp(argv[1], "server") == 0)
        return server(argv[2]);
    if ((argc == 8 || argc == 9) && strcmp(argv[1], "handle") == 0) {
        uint64_t window = strtoull(argv[6], NULL, 0);
        if (window == 0 || (window & (window - 1)))
            return fprintf(stderr, "remoteref: WINDOW must be a power of two\n"), 2;
        return handle(atoi(argv[2]), strtoull(argv[3], NULL, 0), strtoull(argv[4], NULL, 0),
                      (unsigned)atoi(argv[5]), window, strtoull(argv[7], NULL, 0),
                      argc == 9 ? argv[8] : NULL);
    }
    fprintf(stderr, "usage: remoteref server DATAFILE\n"
                    "       remoteref handle FD BASE LEN PORT WINDOW SWEEP [IMAGE_ID]\n");
    return 2;
}
