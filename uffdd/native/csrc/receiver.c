/* The bulk fast lane's socket on two pthreads: ``uffdd-bulk-recv`` reads response frames,
   ``uffdd-bulk-send`` writes request frames.

   Why: during a sweep the daemon's loop also answers every demand fault, and receiving
   bulk data was its largest single cost. The receiver reads frames (header, then the
   whole body into a malloc'ed buffer) without the GIL and queues them for the loop,
   whose eventfd is readable while frames wait. The writer writes the request frames the
   loop hands over: a TCP socket's lock is held by a recv for as long as it copies, and
   a send from another thread sleeps on that lock; on the loop that sleep delayed the
   next fault, on the writer it delays nobody.

   Bounded: at most ``cap`` frames and, past one frame, ``max_queued`` body bytes wait;
   then the receiver stops reading (``full``). It ends at EOF, on an error (the
   writer's too), on a header that breaks the frame rules, or when stopped; ``status``
   says which once the queue is empty. */
#include "uffdd.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#define SEND_IOV 64 /* request frames per sendmsg, at most */

struct outgoing { /* one request frame the loop handed over */
    struct outgoing *next;
    size_t len, sent;
    char data[];
};

struct uffdd_receiver {
    int fd, efd;
    pthread_t thread, writer;
    pthread_mutex_t lock;
    pthread_cond_t room, outgoing;
    struct uffdd_frame *ring;
    size_t cap, head, count;
    uint64_t queued, max_queued, max_body;
    struct outgoing *out_head, *out_tail; /* the writer alone moves ``sent`` */
    uint64_t unsent;
    int stop, status; /* status: UFFDD_RECV_RUNNING, a negative reason, or an errno */
    int send_error;   /* the writer's errno, 0 while it writes */
    uint64_t frames_read, bytes_read, bytes_sent; /* stats, under lock */
    int full, sending;                            /* under lock */
    int in_frame;                                 /* atomic: set outside the lock */
};

static int receiver_loop(struct uffdd_receiver *r)
{
    unsigned char h[UFFDD_FRAME_HEADER];
    for (;;) {
        int rc = socket_read(r->fd, (char *)h, sizeof h);
        if (rc <= 0)
            return rc < 0 ? -rc : UFFDD_RECV_EOF;
        struct uffdd_frame f;
        if (frame_parse_response(h, &f) < 0 || f.body_len > r->max_body)
            return UFFDD_RECV_GARBAGE;
        if (f.body_len) {
            f.body = malloc(f.body_len); /* not zeroed: the socket fills every byte */
            if (!f.body)
                return UFFDD_RECV_NOMEM;
            __atomic_store_n(&r->in_frame, 1, __ATOMIC_RELAXED);
            rc = socket_read(r->fd, f.body, f.body_len);
            __atomic_store_n(&r->in_frame, 0, __ATOMIC_RELAXED);
            if (rc <= 0) {
                free(f.body);
                return rc < 0 ? -rc : UFFDD_RECV_MIDFRAME;
            }
        }
        pthread_mutex_lock(&r->lock);
        while (!r->stop && (r->count == r->cap || (r->count && r->queued >= r->max_queued))) {
            r->full = 1;
            pthread_cond_wait(&r->room, &r->lock);
        }
        r->full = 0;
        if (r->stop) {
            pthread_mutex_unlock(&r->lock);
            free(f.body);
            return UFFDD_RECV_STOPPED;
        }
        r->ring[(r->head + r->count) % r->cap] = f;
        r->count++;
        r->queued += f.body_len;
        r->frames_read++;
        r->bytes_read += UFFDD_FRAME_HEADER + f.body_len;
        if (r->count == 1)
            efd_post(r->efd);
        pthread_mutex_unlock(&r->lock);
    }
}

static void *receiver_main(void *arg)
{
    struct uffdd_receiver *r = arg;
    pthread_setname_np(pthread_self(), "uffdd-bulk-recv");
    thread_slice(0); /* bulk data: the short slice is the loop's */
    int status = receiver_loop(r);
    pthread_mutex_lock(&r->lock);
    r->status = r->stop ? UFFDD_RECV_STOPPED : r->send_error ? r->send_error : status;
    efd_post(r->efd);
    pthread_mutex_unlock(&r->lock);
    return NULL;
}

/* Writes queued request frames, several per sendmsg, blocking as long as the socket
   makes it; on an error it shuts the socket down, which ends the receiver too. */
static void *writer_main(void *arg)
{
    struct uffdd_receiver *r = arg;
    pthread_setname_np(pthread_self(), "uffdd-bulk-send");
    thread_slice(0);
    pthread_mutex_lock(&r->lock);
    for (;;) {
        while (!r->stop && !r->out_head)
            pthread_cond_wait(&r->outgoing, &r->lock);
        if (r->stop)
            break;
        struct iovec iov[SEND_IOV];
        size_t n = 0;
        for (struct outgoing *o = r->out_head; o && n < SEND_IOV; o = o->next)
            iov[n++] = (struct iovec){o->data + o->sent, o->len - o->sent};
        r->sending = 1;
        pthread_mutex_unlock(&r->lock);
        struct msghdr msg = {.msg_iov = iov, .msg_iovlen = n};
        ssize_t sent = sendmsg(r->fd, &msg, MSG_NOSIGNAL);
        int error = sent < 0 && errno != EINTR ? errno : 0;
        pthread_mutex_lock(&r->lock);
        r->sending = 0;
        if (error) {
            if (!r->stop)
                r->send_error = error;
            break;
        }
        r->bytes_sent += sent > 0 ? (uint64_t)sent : 0;
        for (size_t left = sent > 0 ? (size_t)sent : 0; left;) {
            struct outgoing *o = r->out_head;
            size_t take = o->len - o->sent < left ? o->len - o->sent : left;
            o->sent += take;
            left -= take;
            if (o->sent < o->len)
                break;
            r->out_head = o->next;
            if (!r->out_head)
                r->out_tail = NULL;
            r->unsent -= o->len;
            free(o);
        }
    }
    int failed = r->send_error != 0;
    pthread_mutex_unlock(&r->lock);
    if (failed)
        shutdown(r->fd, SHUT_RDWR); /* the receiver's recv ends, with send_error */
    return NULL;
}

/* A started receiver of the connected socket ``fd`` (still the caller's to close,
   after uffdd_receiver_free), or NULL (errno set). */
struct uffdd_receiver *uffdd_receiver_new(int fd, size_t cap, uint64_t max_queued,
                                          uint64_t max_body)
{
    if (cap < 1) {
        errno = EINVAL;
        return NULL;
    }
    struct uffdd_receiver *r = calloc(1, sizeof *r);
    if (!r)
        return NULL;
    r->ring = calloc(cap, sizeof *r->ring);
    r->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (!r->ring || r->efd < 0)
        goto fail;
    r->fd = fd;
    r->cap = cap;
    r->max_queued = max_queued;
    r->max_body = max_body;
    pthread_mutex_init(&r->lock, NULL);
    pthread_cond_init(&r->room, NULL);
    pthread_cond_init(&r->outgoing, NULL);
    int rc = thread_start(&r->writer, writer_main, r);
    if (rc == 0) {
        rc = thread_start(&r->thread, receiver_main, r);
        if (rc == 0)
            return r;
        pthread_mutex_lock(&r->lock);
        r->stop = 1;
        pthread_cond_signal(&r->outgoing);
        pthread_mutex_unlock(&r->lock);
        pthread_join(r->writer, NULL);
    }
    pthread_mutex_destroy(&r->lock);
    pthread_cond_destroy(&r->room);
    pthread_cond_destroy(&r->outgoing);
    errno = rc;
fail: {
    int e = errno;
    if (r->efd >= 0)
        close(r->efd);
    free(r->ring);
    free(r);
    errno = e;
}
    return NULL;
}

int uffdd_receiver_efd(const struct uffdd_receiver *r)
{
    return r->efd;
}

/* Hand the writer a request frame (copied): 0, or -1 out of memory. Frames go out in
   order; after the end they are dropped (the loop learns of the end from ``status``). */
int uffdd_receiver_send(struct uffdd_receiver *r, const char *data, size_t len)
{
    struct outgoing *o = malloc(sizeof *o + len);
    if (!o)
        return -1;
    o->next = NULL;
    o->len = len;
    o->sent = 0;
    memcpy(o->data, data, len);
    pthread_mutex_lock(&r->lock);
    int first = r->out_head == NULL;
    if (r->out_tail)
        r->out_tail->next = o;
    else
        r->out_head = o;
    r->out_tail = o;
    r->unsent += len;
    if (first)
        pthread_cond_signal(&r->outgoing); /* behind others: the writer is at work */
    pthread_mutex_unlock(&r->lock);
    return 0;
}

/* Move queued frames to ``out`` (their bodies are the caller's to free): up to ``n``,
   and no more once their headers and bodies reach ``max_bytes`` (the first always
   comes), so many small frames (zero chunks) come in one call but data does not pile
   up in one loop turn. */
size_t uffdd_receiver_take(struct uffdd_receiver *r, struct uffdd_frame *out, size_t n,
                           uint64_t max_bytes)
{
    uint64_t drained;
    ssize_t d = read(r->efd, &drained, sizeof drained);
    (void)d;
    pthread_mutex_lock(&r->lock);
    size_t k = 0;
    uint64_t bytes = 0;
    for (; k < n && r->count && bytes < max_bytes; k++) {
        out[k] = r->ring[r->head];
        r->head = (r->head + 1) % r->cap;
        r->count--;
        r->queued -= out[k].body_len;
        bytes += UFFDD_FRAME_HEADER + out[k].body_len;
    }
    if (r->count || r->status != UFFDD_RECV_RUNNING)
        efd_post(r->efd); /* more wait, or the end is still to be seen: stay readable */
    if (k)
        pthread_cond_signal(&r->room);
    pthread_mutex_unlock(&r->lock);
    return k;
}

/* Why the thread ended (UFFDD_RECV_RUNNING while it runs or frames still wait). */
int uffdd_receiver_status(struct uffdd_receiver *r)
{
    pthread_mutex_lock(&r->lock);
    int status = r->count ? UFFDD_RECV_RUNNING : r->status;
    pthread_mutex_unlock(&r->lock);
    return status;
}

void uffdd_receiver_stats(struct uffdd_receiver *r, struct uffdd_receiver_stats *out)
{
    pthread_mutex_lock(&r->lock);
    out->frames_read = r->frames_read;
    out->bytes_read = r->bytes_read;
    out->queued_bytes = r->queued;
    out->queued_frames = r->count;
    out->bytes_sent = r->bytes_sent;
    out->unsent_bytes = r->unsent;
    out->full = r->full;
    out->in_frame = __atomic_load_n(&r->in_frame, __ATOMIC_RELAXED);
    out->sending = r->sending;
    pthread_mutex_unlock(&r->lock);
}

/* Stop both threads (shutting the socket down wakes a blocked recv or send), join
   them, and free everything, frames not taken and frames not sent included. The
   socket stays open for its owner. */
void uffdd_receiver_free(struct uffdd_receiver *r)
{
    pthread_mutex_lock(&r->lock);
    r->stop = 1;
    pthread_cond_signal(&r->room);
    pthread_cond_signal(&r->outgoing);
    pthread_mutex_unlock(&r->lock);
    shutdown(r->fd, SHUT_RDWR);
    pthread_join(r->thread, NULL);
    pthread_join(r->writer, NULL);
    for (size_t k = 0; k < r->count; k++)
        free(r->ring[(r->head + k) % r->cap].body);
    while (r->out_head) {
        struct outgoing *o = r->out_head;
        r->out_head = o->next;
        free(o);
    }
    pthread_mutex_destroy(&r->lock);
    pthread_cond_destroy(&r->room);
    pthread_cond_destroy(&r->outgoing);
    close(r->efd);
    free(r->ring);
    free(r);
}
