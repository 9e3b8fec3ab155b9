/* Whole-buffer socket I/O shared by the C references that talk over sockets.
 *
 * Why one place: the remote reference and the round-trip reference must move their
 * bytes the same way (blocking calls, EINTR retried, no SIGPIPE) for their round trips
 * to compare.
 */
#ifndef UFFDD_BENCH_SOCKETS_H
#define UFFDD_BENCH_SOCKETS_H

#include <errno.h>
#include <stddef.h>
#include <sys/socket.h>
#include <sys/types.h>

/* Send all len bytes: 0, or -1 on an error. */
static inline int send_all(int sock, const void *data, size_t len)
{
    const char *p = data;
    while (len > 0) {
        ssize_t put = send(sock, p, len, MSG_NOSIGNAL);
        if (put < 0 && errno == EINTR)
            continue;
        if (put <= 0)
            return -1;
        p += put;
        len -= (size_t)put;
    }
    return 0;
}

/* Returns 1 with len bytes read, 0 at EOF before the first byte, -1 on error. */
static inline int recv_all(int sock, void *data, size_t len)
{
    char *p = data;
    size_t got = 0;
    while (got < len) {
        ssize_t n = recv(sock, p + got, len - got, MSG_WAITALL);
        if (n < 0 && errno == EINTR)
            continue;
        if (n == 0 && got == 0)
            return 0;
        if (n <= 0)
            return -1;
        got += (size_t)n;
    }
    return 1;
}

#endif
