/* The round-trip reference: a 4 KiB request/answer ping-pong between two processes.
 *
 * Why: an urgent 4 KiB request to `uffdd page-server` is, underneath, one small write
 * to another process and one page-sized answer back, and on this kind of VM the two
 * wake-ups across CPUs (a halted vCPU takes ~70 us to wake) and the scheduler's share
 * of two busy vCPUs are most of its latency and most of its p99. The same round trip
 * in plain C, measured right after uffdd's requests in the same round and under the
 * same bulk sweep, shows how much of uffdd's "under bulk / alone" ratio the machine
 * makes by itself. This is the least a page server can do: no framing beyond a fixed
 * header, no checksums, no event loop, one connection.
 *
 *   roundtrip tcp          loopback TCP (127.0.0.1, a free port, TCP_NODELAY)
 *   roundtrip unix PATH    a Unix stream socket bound at PATH (removed at exit)
 *   roundtrip fastlane ADDRESS IMAGE_ID BASE SIZE
 *                          no server of its own: urgent 4 KiB fetches (UFL1 frames,
 *                          uffdd/wire/fast_lane.py) of random pages of
 *                          [BASE, BASE + SIZE) from a page server's fast lane at
 *                          ADDRESS (HOST:PORT or unix:PATH), as the daemon's demand
 *                          thread sends them: the page server's own latency, without
 *                          a Python client around it
 *
 * Forks a server that accepts one connection and answers each 16-byte request
 * (sequence number, offset) with one write of 32 + 4096 bytes: a header echoing the
 * sequence number, then the page at that offset of a 1 MiB buffer. The parent
 * connects, prints "ready", then reads counts from stdin, one a line: for each count N
 * it makes N sequential round trips and prints one line of N latencies in nanoseconds
 * (CLOCK_MONOTONIC, from before the request's write to the answer's last byte). At EOF
 * on stdin it closes the connection (the server exits) and reaps the server.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "sockets.h"

#define PAGE 4096
#define HEADER 32
#define POOL (1u << 20)
#define MAX_COUNT 1000000
#define FLAG_ZERO 1
#define FLAG_LAST 2
#define FLAG_ERROR 4
#define MAX_ID 1024

struct fastlane {
    const char *image_id;
    uint64_t base, pages;
};

struct request {
    uint64_t sequence;
    uint64_t offset;
};

static void die(const char *what)
{
    fprintf(stderr, "roundtrip: %s: %s\n", what, strerror(errno));
    exit(1);
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void no_delay(int sock, int family)
{
    int one = 1;
    if (family == AF_INET && setsockopt(sock, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) < 0)
        die("TCP_NODELAY");
}

static _Noreturn void serve(int listener, int family)
{
    int sock = accept(listener, NULL, NULL);
    if (sock < 0)
        die("accept");
    close(listener);
    no_delay(sock, family);
    char *pool = malloc(POOL);
    char *answer = malloc(HEADER + PAGE);
    if (pool == NULL || answer == NULL)
        die("malloc");
    for (size_t i = 0; i < POOL; i++)
        pool[i] = (char)(i * 131 + 7);
    memset(answer, 0, HEADER);
    struct request req;
    for (;;) {
        int got = recv_all(sock, &req, sizeof req);
        if (got == 0)
            _exit(0);
        if (got < 0)
            die("server recv");
        memcpy(answer, &req.sequence, sizeof req.sequence);
        memcpy(answer + HEADER, pool + (req.offset % (POOL / PAGE)) * PAGE, PAGE);
        if (send_all(sock, answer, HEADER + PAGE) < 0)
            die("server send");
    }
}

static void put_le(unsigned char *p, uint64_t value, int bytes)
{
    for (int i = 0; i < bytes; i++)
        p[i] = (unsigned char)(value >> (8 * i));
}

static uint64_t get_le(const unsigned char *p, int bytes)
{
    uint64_t value = 0;
    for (int i = 0; i < bytes; i++)
        value |= (uint64_t)p[i] << (8 * i);
    return value;
}

/* One urgent fetch of the page at ``index``: every frame of its answer read. */
static void fetch(int sock, const struct fastlane *lane, uint64_t id, uint64_t index, char *body)
{
    size_t id_len = strlen(lane->image_id);
    unsigned char frame[26 + MAX_ID];
    uint64_t address = lane->base + index * PAGE;
    memcpy(frame, "UFL1", 4);
    put_le(frame + 4, id, 8);
    put_le(frame + 12, address, 8);
    put_le(frame + 20, PAGE, 4);
    put_le(frame + 24, id_len, 2);
    memcpy(frame + 26, lane->image_id, id_len);
    if (send_all(sock, frame, 26 + id_len) < 0)
        die("send");
    uint64_t received = 0;
    for (;;) {
        unsigned char h[HEADER];
        if (recv_all(sock, h, HEADER) != 1)
            die("recv");
        uint64_t length = get_le(h + 16, 4), flags = h[20], message = get_le(h + 22, 2);
        if (get_le(h, 8) != id || (flags & FLAG_ERROR)) {
            fprintf(stderr, "roundtrip: request %" PRIu64 " refused or answered out of order\n",
                    id);
            exit(1);
        }
        uint64_t body_len = (flags & FLAG_ZERO) ? 0 : length;
        (void)message;
        if (body_len > PAGE || (body_len && recv_all(sock, body, body_len) != 1))
            die("recv body");
        received += length;
        if (flags & FLAG_LAST)
            break;
    }
    if (received != PAGE) {
        fprintf(stderr, "roundtrip: request %" PRIu64 " got %" PRIu64 " bytes\n", id, received);
        exit(1);
    }
}

/* Connect to ADDRESS (HOST:PORT, numeric IPv4, or unix:PATH). */
static int dial(const char *address, int *family)
{
    struct sockaddr_storage where;
    socklen_t where_len;
    memset(&where, 0, sizeof where);
    if (strncmp(address, "unix:", 5) == 0) {
        struct sockaddr_un *un = (struct sockaddr_un *)&where;
        if (strlen(address + 5) >= sizeof un->sun_path) {
            fprintf(stderr, "roundtrip: socket path too long\n");
            exit(2);
        }
        un->sun_family = AF_UNIX;
        strcpy(un->sun_path, address + 5);
        where_len = sizeof *un;
        *family = AF_UNIX;
    } else {
        struct sockaddr_in *in = (struct sockaddr_in *)&where;
        char host[64];
        const char *colon = strrchr(address, ':');
        if (colon == NULL || (size_t)(colon - address) >= sizeof host) {
            fprintf(stderr, "roundtrip: bad address %s\n", address);
            exit(2);
        }
        memcpy(host, address, (size_t)(colon - address));
        host[colon - address] = 0;
        in->sin_family = AF_INET;
        in->sin_port = htons((uint16_t)atoi(colon + 1));
        if (inet_pton(AF_INET, host, &in->sin_addr) != 1) {
            fprintf(stderr, "roundtrip: bad host %s\n", host);
            exit(2);
        }
        where_len = sizeof *in;
        *family = AF_INET;
    }
    int sock = socket(*family, SOCK_STREAM, 0);
    if (sock < 0)
        die("socket");
    if (connect(sock, (struct sockaddr *)&where, where_len) < 0)
        die("connect");
    no_delay(sock, *family);
    return sock;
}

/* The stdin protocol both modes share: "N" a line in, N latencies a line out. */
static void measure(int sock, const struct fastlane *lane)
{
    uint64_t *lat = malloc(MAX_COUNT * sizeof *lat);
    char *answer = malloc(HEADER + PAGE);
    if (lat == NULL || answer == NULL)
        die("malloc");
    uint64_t sequence = 0;
    uint64_t offset = 12345;
    char line[64];
    puts("ready");
    fflush(stdout);
    while (fgets(line, sizeof line, stdin) != NULL) {
        long count = strtol(line, NULL, 10);
        if (count <= 0 || count > MAX_COUNT) {
            fprintf(stderr, "roundtrip: bad count %s", line);
            exit(2);
        }
        for (long i = 0; i < count; i++) {
            struct request req = {.sequence = ++sequence, .offset = offset};
            offset = offset * 6364136223846793005ull + 1442695040888963407ull;
            uint64_t started = now_ns();
            if (lane != NULL) {
                fetch(sock, lane, sequence, (req.offset >> 17) % lane->pages, answer);
                lat[i] = now_ns() - started;
                continue;
            }
            if (send_all(sock, &req, sizeof req) < 0)
                die("send");
            if (recv_all(sock, answer, HEADER + PAGE) != 1)
                die("recv");
            lat[i] = now_ns() - started;
            uint64_t echoed;
            memcpy(&echoed, answer, sizeof echoed);
            if (echoed != sequence) {
                fprintf(stderr, "roundtrip: answer %" PRIu64 " for request %" PRIu64 "\n",
                        echoed, sequence);
                exit(1);
            }
        }
        for (long i = 0; i < count; i++)
            printf("%s%" PRIu64, i ? " " : "", lat[i]);
        putchar('\n');
        fflush(stdout);
    }
    free(lat);
    free(answer);
}

int main(int argc, char **argv)
{
    int family;
    struct sockaddr_storage where;
    socklen_t where_len;
    memset(&where, 0, sizeof where);
    if (argc == 6 && strcmp(argv[1], "fastlane") == 0) {
        struct fastlane lane = {argv[3], strtoull(argv[4], NULL, 0), strtoull(argv[5], NULL, 0) / PAGE};
        if (strlen(lane.image_id) > MAX_ID || lane.pages == 0) {
            fprintf(stderr, "roundtrip: bad image id or size\n");
            return 2;
        }
        int sock = dial(argv[2], &family);
        measure(sock, &lane);
        close(sock);
        return 0;
    }
    if (argc == 2 && strcmp(argv[1], "tcp") == 0) {
        struct sockaddr_in *in = (struct sockaddr_in *)&where;
        family = AF_INET;
        in->sin_family = AF_INET;
        in->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        where_len = sizeof *in;
    } else if (argc == 3 && strcmp(argv[1], "unix") == 0) {
        struct sockaddr_un *un = (struct sockaddr_un *)&where;
        family = AF_UNIX;
        un->sun_family = AF_UNIX;
        if (strlen(argv[2]) >= sizeof un->sun_path) {
            fprintf(stderr, "roundtrip: socket path too long\n");
            return 2;
        }
        strcpy(un->sun_path, argv[2]);
        unlink(argv[2]);
        where_len = sizeof *un;
    } else {
        fprintf(stderr, "usage: roundtrip tcp | roundtrip unix PATH | "
                        "roundtrip fastlane ADDRESS IMAGE_ID BASE SIZE\n");
        return 2;
    }

    int listener = socket(family, SOCK_STREAM, 0);
    if (listener < 0)
        die("socket");
    if (bind(listener, (struct sockaddr *)&where, where_len) < 0)
        die("bind");
    if (listen(listener, 1) < 0)
        die("listen");
    if (getsockname(listener, (struct sockaddr *)&where, &where_len) < 0)
        die("getsockname");
    fflush(stdout);
    pid_t server = fork();
    if (server < 0)
        die("fork");
    if (server == 0)
        serve(listener, family);
    close(listener);

    int sock = socket(family, SOCK_STREAM, 0);
    if (sock < 0)
        die("socket");
    if (connect(sock, (struct sockaddr *)&where, where_len) < 0)
        die("connect");
    no_delay(sock, family);
    if (family == AF_UNIX)
        unlink(argv[2]);

    measure(sock, NULL);
    close(sock);
    int status;
    if (waitpid(server, &status, 0) < 0)
        die("waitpid");
    return WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : 1;
}
