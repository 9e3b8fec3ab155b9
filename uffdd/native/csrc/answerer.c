/* The page server's urgent answers on a pthread (``uffdd-urgent``).

   Why: an urgent fast-lane request answered by the page server's event loop cost tens
   of microseconds of Python and the loop's wake-up on top of the kernel's share; a
   demand fault waits for it, and during a restore those answers took the CPU the sweep
   needed. This thread answers the urgent connections instead, from the images' mmaps,
   with the same chunks as the loop (the core's rule, core/policy.py: chunk_length,
   which the loop's pageserver/chunking.py: RangeCursor calls) and the same checks,
   without the GIL.

   It answers only what it can answer exactly: a UFL1 request for a registered image,
   within the length limit, page-aligned, covered by extents whose checksum chunks
   verify (each checked once, as the reader does: the data file's size, then its
   checksum against the manifest; the shared ``verified`` bytes record it), and drops
   cancels (each request is answered whole before the next is parsed, so a cancel
   always comes too late). Anything else (an unknown image, a refusal, corrupt data, a
   bulk frame, garbage, a truncated last frame) hands the connection back to the event
   loop with its unparsed bytes, before a byte of that request is written; the loop's
   Connection answers it and everything after it (docs/architecture.md, section 6.4).
   Writes never block: a connection whose peer does not read waits for EPOLLOUT and is
   not read meanwhile, so memory stays at its request buffer and one frame header per
   connection. */
#include "uffdd.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#define ANS_IN 4096           /* unparsed request bytes of a connection, at most (more
                                 when its first read held more) */
#define ANS_TURN (256 * 1024) /* bytes one connection writes before the others */
#define ANS_FRAMES 64         /* or frames it parses (a flood of cancels) */
#define ANS_EVENTS 64
#define HANDBACKS 16          /* room for hand-backs at first (it grows) */
#define HB_CLOSE (-1)         /* ans_release: close it instead */

struct ans_image {
    char id[UFFDD_ID_MAX];
    size_t id_len;
    uint64_t page_size, chunk_size, data_size;
    const char *data;
    uint8_t *verified; /* shared with the reader: 0 -> 1 only */
    const uint64_t *checksums;
    size_t nchunks;
    int data_fd;
    struct uffdd_ans_extent *extents;
    size_t nextents;
};

struct ans_conn {
    int fd; /* -1: a free slot */
    uint64_t token;
    uint32_t events;   /* what epoll waits for: EPOLLIN or EPOLLOUT */
    int runnable;      /* in the run list: more to write after its turn */
    unsigned char *in; /* malloc'ed, in_cap bytes */
    size_t in_len, in_cap;
    /* the request being answered */
    int active;
    uint64_t request_id, pos, end;
    const struct ans_image *image;
    size_t ext;
    /* the frame being written */
    unsigned char header[UFFDD_FRAME_HEADER];
    size_t header_len, header_off;
    const char *body;
    size_t body_len, body_off;
};

struct ans_add {
    int fd;
    uint64_t token;
    size_t len;
    char *bytes;
};

struct uffdd_answerer {
    struct epoll_thread t; /* its lock: images, adds, live, draining, stats; its queue:
                              the hand-backs */
    struct ans_image **images;
    size_t nimages, cap_images;
    struct ans_add *adds;
    size_t nadds;
    size_t live; /* connections owned (slots in use and adds queued) */
    int draining;
    size_t waiting_for_output;
    uint64_t requests;
    struct ans_conn *conns; /* the thread's own */
    size_t nconns;
    size_t *run, nrun; /* connections with more to write, and a copy */
    size_t *turn;
    uint64_t chunk_size, max_length;
};

static const struct ans_image *ans_find_image(struct uffdd_answerer *a, const unsigned char *id,
                                              size_t len)
{
    const struct ans_image *found = NULL;
    pthread_mutex_lock(&a->t.lock); /* images are only added, and freed with the answerer */
    for (size_t i = 0; i < a->nimages && !found; i++)
        if (a->images[i]->id_len == len && memcmp(a->images[i]->id, id, len) == 0)
            found = a->images[i];
    pthread_mutex_unlock(&a->t.lock);
    return found;
}

/* The extent holding ``addr``: its index, or nextents. */
static size_t ans_find_extent(const struct ans_image *im, uint64_t addr)
{
    size_t lo = 0, hi = im->nextents;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (im->extents[mid].start <= addr)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo == 0 || addr >= im->extents[lo - 1].end)
        return im->nextents;
    return lo - 1;
}

/* The data of [offset, offset + len) verified (now, if not before): 1, else 0. */
static int ans_verify(const struct ans_image *im, uint64_t offset, uint64_t len)
{
    if (offset + len > im->data_size || offset + len < offset)
        return 0;
    uint64_t first = offset / im->chunk_size, last = (offset + len - 1) / im->chunk_size;
    for (uint64_t c = first; c <= last; c++) {
        if (c >= im->nchunks)
            return 0;
        if (__atomic_load_n(&im->verified[c], __ATOMIC_RELAXED))
            continue;
        struct stat st; /* a data file changed under the mmap would fault it */
        if (fstat(im->data_fd, &st) != 0 || (uint64_t)st.st_size != im->data_size)
            return 0;
        uint64_t begin = c * im->chunk_size;
        uint64_t size =
            im->data_size - begin < im->chunk_size ? im->data_size - begin : im->chunk_size;
        if (uffdd_checksum(im->data + begin, size) != im->checksums[c])
            return 0; /* the loop's Connection reports it (DATA_LOSS) */
        __atomic_store_n(&im->verified[c], 1, __ATOMIC_RELAXED);
    }
    return 1;
}

/* Start answering [addr, addr + len) of ``im``, when this thread can answer it exactly
   as the loop would: 1, else 0 (nothing is written). */
static int ans_accept(struct uffdd_answerer *a, struct ans_conn *c, const struct ans_image *im,
                      uint64_t id, uint64_t addr, uint64_t len)
{
    if (!len || len > a->max_length || addr % im->page_size || len % im->page_size ||
        addr + len < addr)
        return 0;
    size_t first = ans_find_extent(im, addr);
    if (first == im->nextents || addr % im->extents[first].page_size ||
        len % im->extents[first].page_size)
        return 0;
    uint64_t pos = addr, end = addr + len;
    for (size_t i = first; pos < end; i++) {
        if (i == im->nextents || (i != first && im->extents[i].start != pos))
            return 0; /* a gap: outside the image */
        const struct uffdd_ans_extent *e = &im->extents[i];
        uint64_t stop = e->end < end ? e->end : end;
        if (e->kind != UFFDD_ANS_ZERO && !ans_verify(im, e->data_offset + (pos - e->start), stop - pos))
            return 0;
        pos = stop;
    }
    c->active = 1;
    c->request_id = id;
    c->pos = addr;
    c->end = end;
    c->image = im;
    c->ext = first;
    return 1;
}

/* The next chunk of the active request, into the frame to write: as the core's rule
   cuts it (core/policy.py: chunk_length; a ZERO extent whole, DATA at most the chunk
   size, never across an extent). */
static void ans_next_piece(struct uffdd_answerer *a, struct ans_conn *c)
{
    const struct uffdd_ans_extent *e = &c->image->extents[c->ext];
    uint64_t stop = e->end < c->end ? e->end : c->end;
    int zero = e->kind == UFFDD_ANS_ZERO;
    if (!zero && stop - c->pos > a->chunk_size)
        stop = c->pos + a->chunk_size;
    uint64_t len = stop - c->pos;
    int last = stop == c->end;
    const char *body = zero ? NULL : c->image->data + e->data_offset + (c->pos - e->start);
    uint8_t flags = (uint8_t)((zero ? UFFDD_FLAG_ZERO : 0) | (last ? UFFDD_FLAG_LAST : 0));
    frame_encode_response(c->header, c->request_id, c->pos, (uint32_t)len, flags,
                          zero ? 0 : uffdd_checksum(body, len));
    c->header_len = UFFDD_FRAME_HEADER;
    c->header_off = 0;
    c->body = body;
    c->body_len = zero ? 0 : len;
    c->body_off = 0;
    c->pos = stop;
    if (stop == e->end)
        c->ext++;
    if (last)
        c->active = 0;
}

/* Parse one frame: 1 consumed (a request accepted or a cancel dropped), 0 more bytes
   needed, or -1 - the UFFDD_HB_* reason it is declined for (the connection goes back). */
static int ans_parse(struct uffdd_answerer *a, struct ans_conn *c)
{
    struct uffdd_request req;
    int parsed = frame_parse_request(c->in, c->in_len, &req);
    if (parsed < 0)
        return -UFFDD_HB_DECLINED - 1;
    if (parsed == 0)
        return 0;
    if (!req.cancel) {
        const struct ans_image *im = ans_find_image(a, req.image_id, req.id_len);
        if (!im)
            return -UFFDD_HB_UNKNOWN - 1;
        if (!ans_accept(a, c, im, req.request_id, req.address, req.length))
            return -UFFDD_HB_DECLINED - 1;
        pthread_mutex_lock(&a->t.lock);
        a->requests++;
        pthread_mutex_unlock(&a->t.lock);
    }
    memmove(c->in, c->in + req.size, c->in_len - req.size);
    c->in_len -= req.size;
    return 1;
}

/* With the lock held: queue connection ``fd`` for the loop, or close it when that
   cannot be done (no memory): hang up rather than leak or block. */
static void ans_handback_locked(struct uffdd_answerer *a, int fd, uint64_t token, int reason,
                                const char *bytes, size_t len)
{
    char *copy = len ? malloc(len) : NULL;
    if (len && !copy) {
        close(fd);
        return;
    }
    if (len)
        memcpy(copy, bytes, len);
    struct uffdd_handback back = {token, fd, reason, len, copy};
    if (epoll_thread_push_locked(&a->t, &back) != 0) {
        free(copy);
        close(fd);
    }
}

/* Let go of ``c``: hand it back to the loop for ``reason`` (UFFDD_HB_*), or close it
   (HB_CLOSE). */
static void ans_release(struct uffdd_answerer *a, struct ans_conn *c, int reason)
{
    epoll_ctl(a->t.epfd, EPOLL_CTL_DEL, c->fd, NULL);
    pthread_mutex_lock(&a->t.lock);
    if (reason != HB_CLOSE)
        ans_handback_locked(a, c->fd, c->token, reason, (const char *)c->in, c->in_len);
    else
        close(c->fd);
    a->live--;
    if (c->events == EPOLLOUT)
        a->waiting_for_output--;
    pthread_mutex_unlock(&a->t.lock);
    free(c->in);
    c->in = NULL;
    c->fd = -1;
    c->active = 0;
}

static void ans_wait_for(struct uffdd_answerer *a, struct ans_conn *c, uint32_t events)
{
    if (c->events == events)
        return;
    struct epoll_event ev = {.events = events, .data.u64 = (uint64_t)(c - a->conns)};
    epoll_ctl(a->t.epfd, EPOLL_CTL_MOD, c->fd, &ev);
    c->events = events;
    pthread_mutex_lock(&a->t.lock);
    if (events == EPOLLOUT)
        a->waiting_for_output++;
    else
        a->waiting_for_output--;
    pthread_mutex_unlock(&a->t.lock);
}

/* Write what is pending of the frame: 1 all written, 0 the socket is full, -1 error. */
static int ans_write(struct ans_conn *c, size_t *written)
{
    while (c->header_off < c->header_len || c->body_off < c->body_len) {
        struct iovec iov[2];
        int n = 0;
        if (c->header_off < c->header_len)
            iov[n++] = (struct iovec){c->header + c->header_off, c->header_len - c->header_off};
        if (c->body_off < c->body_len)
            iov[n++] = (struct iovec){(void *)(c->body + c->body_off), c->body_len - c->body_off};
        struct msghdr m = {.msg_iov = iov, .msg_iovlen = (size_t)n};
        ssize_t w = sendmsg(c->fd, &m, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0)
            return errno == EAGAIN || errno == EWOULDBLOCK ? 0 : -1;
        size_t k = (size_t)w;
        *written += k;
        size_t h = c->header_len - c->header_off < k ? c->header_len - c->header_off : k;
        c->header_off += h;
        c->body_off += k - h;
    }
    return 1;
}

/* ``c`` had its turn with more to do: again after the others. */
static void ans_later(struct uffdd_answerer *a, struct ans_conn *c)
{
    if (!c->runnable) {
        c->runnable = 1;
        a->run[a->nrun++] = (size_t)(c - a->conns);
    }
}

/* Answer what ``c`` asks, for one turn. */
static void ans_run(struct uffdd_answerer *a, struct ans_conn *c, int draining)
{
    size_t written = 0;
    int frames = 0;
    for (;;) {
        int w = ans_write(c, &written);
        if (w < 0) {
            ans_release(a, c, HB_CLOSE);
            return;
        }
        if (w == 0) {
            ans_wait_for(a, c, EPOLLOUT);
            return;
        }
        if (c->active) {
            if (written >= ANS_TURN) {
                ans_later(a, c);
                return;
            }
            ans_next_piece(a, c);
            continue;
        }
        if (draining) { /* as the loop's stop_reading: what was accepted is answered */
            ans_release(a, c, HB_CLOSE);
            return;
        }
        if (frames == ANS_FRAMES) {
            ans_later(a, c);
            return;
        }
        int r = ans_parse(a, c);
        if (r < 0) {
            ans_release(a, c, -r - 1);
            return;
        }
        if (r > 0) {
            frames++;
            continue;
        }
        ssize_t n = recv(c->fd, c->in + c->in_len, c->in_cap - c->in_len, MSG_DONTWAIT);
        if (n > 0) {
            c->in_len += (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            ans_wait_for(a, c, EPOLLIN);
            return;
        }
        /* EOF after a partial frame: the loop reports the truncated frame */
        ans_release(a, c, n == 0 && c->in_len > 0 ? UFFDD_HB_DECLINED : HB_CLOSE);
        return;
    }
}

/* Take the connections the loop added: each into a slot, or back when full. */
static void ans_adopt(struct uffdd_answerer *a)
{
    pthread_mutex_lock(&a->t.lock);
    size_t n = a->nadds;
    struct ans_add *adds = a->adds;
    a->adds = NULL;
    a->nadds = 0;
    pthread_mutex_unlock(&a->t.lock);
    for (size_t i = 0; i < n; i++) {
        struct ans_add *add = &adds[i];
        struct ans_conn *c = NULL;
        for (size_t s = 0; s < a->nconns && !c; s++)
            if (a->conns[s].fd < 0)
                c = &a->conns[s];
        struct epoll_event ev = {.events = EPOLLIN};
        size_t cap = add->len > ANS_IN ? add->len : ANS_IN;
        unsigned char *in = c ? malloc(cap) : NULL;
        if (c)
            ev.data.u64 = (uint64_t)(c - a->conns);
        if (!in || epoll_ctl(a->t.epfd, EPOLL_CTL_ADD, add->fd, &ev)) {
            free(in);
            pthread_mutex_lock(&a->t.lock);
            ans_handback_locked(a, add->fd, add->token, UFFDD_HB_FULL, add->bytes, add->len);
            a->live--;
            pthread_mutex_unlock(&a->t.lock);
            free(add->bytes);
            continue;
        }
        memset(c, 0, sizeof *c);
        c->fd = add->fd;
        c->token = add->token;
        c->events = EPOLLIN;
        c->in = in;
        c->in_cap = cap;
        if (add->len)
            memcpy(c->in, add->bytes, add->len);
        c->in_len = add->len;
        free(add->bytes);
        ans_later(a, c); /* its first bytes are here already */
    }
    free(adds);
}

static void *answerer_main(void *arg)
{
    struct uffdd_answerer *a = arg;
    pthread_setname_np(pthread_self(), "uffdd-urgent");
    thread_slice(UFFDD_SHORT_SLICE); /* a request waits for this thread to get a CPU */
    struct epoll_event evs[ANS_EVENTS];
    size_t *turn = a->turn;
    for (;;) {
        int control;
        int n = epoll_thread_wait(&a->t, evs, ANS_EVENTS, a->nrun ? 0 : -1, &control);
        if (n < 0)
            break;
        if (control)
            ans_adopt(a);
        pthread_mutex_lock(&a->t.lock);
        int stop = a->t.stop, draining = a->draining;
        pthread_mutex_unlock(&a->t.lock);
        if (stop)
            break;
        for (int i = 0; i < n; i++) {
            struct ans_conn *c = &a->conns[evs[i].data.u64];
            if (c->fd >= 0 && !c->runnable)
                ans_run(a, c, draining);
        }
        size_t k = a->nrun; /* a turn each for those with more to write */
        memcpy(turn, a->run, k * sizeof *turn);
        a->nrun = 0;
        for (size_t i = 0; i < k; i++) {
            struct ans_conn *c = &a->conns[turn[i]];
            c->runnable = 0;
            if (c->fd >= 0)
                ans_run(a, c, draining);
        }
        if (draining) /* idle connections are closed at once */
            for (size_t s = 0; s < a->nconns; s++)
                if (a->conns[s].fd >= 0 && !a->conns[s].runnable &&
                    a->conns[s].events == EPOLLIN)
                    ans_run(a, &a->conns[s], draining);
    }
    return NULL;
}

static void answerer_release(struct uffdd_answerer *a)
{
    free(a->conns);
    free(a->run);
    free(a->turn);
    free(a);
}

/* A started answerer with room for ``max_conns`` connections, or NULL (errno set).
   ``chunk_size``: the urgent chunk size; ``max_length``: the longest request. */
struct uffdd_answerer *uffdd_answerer_new(uint64_t chunk_size, uint64_t max_length,
                                          size_t max_conns)
{
    if (!chunk_size || !max_conns) {
        errno = EINVAL;
        return NULL;
    }
    struct uffdd_answerer *a = calloc(1, sizeof *a);
    if (!a)
        return NULL;
    a->conns = calloc(max_conns, sizeof *a->conns);
    a->run = calloc(max_conns, sizeof *a->run);
    a->turn = calloc(max_conns, sizeof *a->turn);
    if (!a->conns || !a->run || !a->turn) {
        answerer_release(a);
        errno = ENOMEM;
        return NULL;
    }
    int err = epoll_thread_open(&a->t, sizeof(struct uffdd_handback), HANDBACKS);
    if (err) {
        answerer_release(a);
        errno = err;
        return NULL;
    }
    for (size_t i = 0; i < max_conns; i++)
        a->conns[i].fd = -1;
    a->nconns = max_conns;
    a->chunk_size = chunk_size;
    a->max_length = max_length;
    err = epoll_thread_start(&a->t, answerer_main, a);
    if (err) {
        epoll_thread_release(&a->t);
        answerer_release(a);
        errno = err;
        return NULL;
    }
    return a;
}

int uffdd_answerer_efd(const struct uffdd_answerer *a)
{
    return a->t.out_efd;
}

/* Serve image ``id`` from now on (the caller keeps data, verified, checksums and
   data_fd valid until uffdd_answerer_free). 0 or an errno. */
int uffdd_answerer_image(struct uffdd_answerer *a, const char *id, size_t id_len,
                         uint64_t page_size, uint64_t chunk_size, const char *data,
                         uint64_t data_size, uint8_t *verified, const uint64_t *checksums,
                         size_t nchunks, int data_fd, const struct uffdd_ans_extent *extents,
                         size_t nextents)
{
    if (id_len > UFFDD_ID_MAX || !page_size || !chunk_size ||
        nchunks != (data_size + chunk_size - 1) / chunk_size)
        return EINVAL;
    for (size_t i = 0; i < nextents; i++)
        if (extents[i].end <= extents[i].start || !extents[i].page_size ||
            (i && extents[i].start < extents[i - 1].end))
            return EINVAL; /* sorted, disjoint: ans_find_extent's bisection needs it */
    struct ans_image *im = calloc(1, sizeof *im);
    struct uffdd_ans_extent *copy = malloc((nextents ? nextents : 1) * sizeof *copy);
    if (!im || !copy) {
        free(im);
        free(copy);
        return ENOMEM;
    }
    memcpy(im->id, id, id_len);
    im->id_len = id_len;
    im->page_size = page_size;
    im->chunk_size = chunk_size;
    im->data = data;
    im->data_size = data_size;
    im->verified = verified;
    im->checksums = checksums;
    im->nchunks = nchunks;
    im->data_fd = data_fd;
    if (nextents)
        memcpy(copy, extents, nextents * sizeof *copy);
    im->extents = copy;
    im->nextents = nextents;
    pthread_mutex_lock(&a->t.lock);
    int err = 0;
    if (a->nimages == a->cap_images) {
        size_t cap = a->cap_images ? 2 * a->cap_images : 16;
        struct ans_image **grown = realloc(a->images, cap * sizeof *grown);
        if (grown) {
            a->images = grown;
            a->cap_images = cap;
        } else {
            err = ENOMEM;
        }
    }
    if (!err)
        a->images[a->nimages++] = im;
    pthread_mutex_unlock(&a->t.lock);
    if (err) {
        free(copy);
        free(im);
    }
    return err;
}

/* Answer connection ``fd`` (this answerer owns it from now on: it closes it, or hands
   it back through uffdd_answerer_take), whose first ``len`` bytes were read already.
   0, or an errno (EBUSY: full or stopping; the caller keeps fd). */
int uffdd_answerer_add(struct uffdd_answerer *a, int fd, uint64_t token, const char *bytes,
                       size_t len)
{
    char *copy = len ? malloc(len) : NULL;
    if (len && !copy)
        return ENOMEM;
    if (len)
        memcpy(copy, bytes, len);
    int err = 0;
    pthread_mutex_lock(&a->t.lock);
    struct ans_add *grown = NULL;
    if (a->live >= a->nconns || a->draining || a->t.stop)
        err = EBUSY;
    else if (!(grown = realloc(a->adds, (a->nadds + 1) * sizeof *grown)))
        err = ENOMEM;
    if (!err) {
        a->adds = grown;
        a->adds[a->nadds++] = (struct ans_add){fd, token, len, copy};
        a->live++;
    }
    pthread_mutex_unlock(&a->t.lock);
    if (err) {
        free(copy);
        return err;
    }
    efd_post(a->t.ctl_efd);
    return 0;
}

size_t uffdd_answerer_take(struct uffdd_answerer *a, struct uffdd_handback *out, size_t n)
{
    return epoll_thread_take(&a->t, out, n);
}

/* Shutting down: answer what was accepted, read nothing more, close each connection
   when done. Returns how many are still open. */
size_t uffdd_answerer_drain(struct uffdd_answerer *a)
{
    pthread_mutex_lock(&a->t.lock);
    int first = !a->draining;
    a->draining = 1;
    size_t live = a->live;
    pthread_mutex_unlock(&a->t.lock);
    if (first)
        efd_post(a->t.ctl_efd);
    return live;
}

void uffdd_answerer_stats(struct uffdd_answerer *a, struct uffdd_answerer_stats *out)
{
    pthread_mutex_lock(&a->t.lock);
    out->live = a->live;
    out->waiting_for_output = a->waiting_for_output;
    out->requests = a->requests;
    pthread_mutex_unlock(&a->t.lock);
}

static void drop_handback(void *item)
{
    struct uffdd_handback *back = item;
    close(back->fd); /* nobody took it */
    free(back->bytes);
}

void uffdd_answerer_free(struct uffdd_answerer *a)
{
    epoll_thread_stop(&a->t);
    epoll_thread_end(&a->t, drop_handback); /* joined: the connections are ours now */
    for (size_t i = 0; i < a->nconns; i++) {
        if (a->conns[i].fd >= 0)
            close(a->conns[i].fd);
        free(a->conns[i].in);
    }
    for (size_t i = 0; i < a->nadds; i++) {
        close(a->adds[i].fd);
        free(a->adds[i].bytes);
    }
    for (size_t i = 0; i < a->nimages; i++) {
        free(a->images[i]->extents);
        free(a->images[i]);
    }
    free(a->images);
    free(a->adds);
    answerer_release(a);
}
