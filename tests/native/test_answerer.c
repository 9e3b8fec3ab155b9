/* The page server's urgent answerer (csrc/answerer.c) serving an in-memory image to a
   socket pair: exactly the chunks the loop sends (never across an extent, data cut at
   the chunk size, a zero extent in one frame, the right checksums), cancels dropped,
   every request it cannot answer exactly handed back unanswered with its bytes, a peer
   that does not read waits for EPOLLOUT, and draining closes what is idle. */
#include "harness.h"

#include <sys/mman.h>

#define P UFFDD_PAGE
#define SUM_CHUNK (4 * P) /* the image's checksum chunks */
#define ANSWER (2 * P)    /* the answerer's data chunks */

struct image {
    int fd;
    char *data;
    uint64_t size;
    uint64_t *sums;
    uint8_t *verified;
    size_t nchunks;
};

static struct image image_new(uint64_t size, unsigned seed)
{
    struct image im = {.size = size};
    im.fd = memfd_create("uffdd-test-image", MFD_CLOEXEC);
    CHECK(im.fd >= 0);
    CHECK_EQ(ftruncate(im.fd, (off_t)size), 0);
    im.data = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, im.fd, 0);
    CHECK(im.data != MAP_FAILED);
    pattern(im.data, size, seed);
    im.nchunks = (size + SUM_CHUNK - 1) / SUM_CHUNK;
    im.sums = calloc(im.nchunks, sizeof *im.sums);
    im.verified = calloc(im.nchunks, 1);
    for (size_t c = 0; c < im.nchunks; c++) {
        uint64_t len = size - c * SUM_CHUNK < SUM_CHUNK ? size - c * SUM_CHUNK : SUM_CHUNK;
        im.sums[c] = uffdd_checksum(im.data + c * SUM_CHUNK, len);
    }
    return im;
}

static void image_free(struct image *im)
{
    munmap(im->data, im->size);
    close(im->fd);
    free(im->sums);
    free(im->verified);
}

static void serve(struct uffdd_answerer *a, const char *id, struct image *im,
                  const struct uffdd_ans_extent *extents, size_t n)
{
    CHECK_EQ(uffdd_answerer_image(a, id, strlen(id), P, SUM_CHUNK, im->data, im->size,
                                  im->verified, im->sums, im->nchunks, im->fd, extents, n),
             0);
}

static size_t request(char *out, uint64_t id, const char *image_id, uint64_t address,
                      uint32_t length)
{
    return frame_encode_request(out, id, address, length, image_id, strlen(image_id));
}

/* The next frame on ``fd``: its header, and its body into ``body``. */
static struct uffdd_frame next_frame(int fd, char *body)
{
    unsigned char h[UFFDD_FRAME_HEADER];
    struct uffdd_frame f;
    read_all(fd, h, sizeof h);
    CHECK_EQ(frame_parse_response(h, &f), 0);
    if (f.body_len)
        read_all(fd, body, f.body_len);
    return f;
}

static void check_data(struct uffdd_frame f, const char *body, uint64_t id, uint64_t address,
                       const char *expected, uint32_t length, int last)
{
    CHECK_EQ(f.request_id, id);
    CHECK_EQ(f.address, address);
    CHECK_EQ(f.length, length);
    CHECK_EQ(f.flags, last ? UFFDD_FLAG_LAST : 0);
    CHECK(memcmp(body, expected, length) == 0);
    CHECK_EQ(f.checksum, uffdd_checksum(expected, length));
}

static struct uffdd_handback handed_back(struct uffdd_answerer *a)
{
    struct uffdd_handback back;
    for (;;) {
        CHECK(readable(uffdd_answerer_efd(a), 10000));
        if (uffdd_answerer_take(a, &back, 1) == 1)
            return back;
    }
}

static struct uffdd_answerer_stats stats(struct uffdd_answerer *a)
{
    struct uffdd_answerer_stats s;
    uffdd_answerer_stats(a, &s);
    return s;
}

int main(void)
{
    test_begin();
    struct uffdd_answerer *a = uffdd_answerer_new(ANSWER, 1 << 20, 4);
    CHECK(a != NULL);
    /* "img": 8 data pages, 8 zero pages, 4 data pages (at data offset 8 pages) */
    struct image img = image_new(12 * P, 1);
    const struct uffdd_ans_extent extents[] = {{0x10000, 0x18000, 0, P, 0},
                                               {0x18000, 0x20000, 0, P, UFFDD_ANS_ZERO},
                                               {0x20000, 0x24000, 8 * P, P, 0}};
    serve(a, "img", &img, extents, 3);
    const struct uffdd_ans_extent unsorted[] = {extents[2], extents[0]};
    CHECK_EQ(uffdd_answerer_image(a, "x", 1, P, SUM_CHUNK, img.data, img.size, img.verified,
                                  img.sums, img.nchunks, img.fd, unsorted, 2),
             EINVAL);

    /* one request across the three extents, handed over as the connection's first bytes */
    int fds[2];
    stream_pair(fds);
    char frame[UFFDD_REQUEST_HEADER + UFFDD_ID_MAX];
    size_t n = request(frame, 1, "img", 0x10000, 0x14000);
    CHECK_EQ(uffdd_answerer_add(a, fds[0], 11, frame, n), 0);
    char body[1 << 16];
    for (uint64_t k = 0; k < 4; k++)
        check_data(next_frame(fds[1], body), body, 1, 0x10000 + k * ANSWER,
                   img.data + k * ANSWER, ANSWER, 0);
    struct uffdd_frame f = next_frame(fds[1], body);
    CHECK_EQ(f.address, 0x18000);
    CHECK_EQ(f.length, 0x8000); /* the zero extent in one frame */
    CHECK_EQ(f.flags, UFFDD_FLAG_ZERO);
    CHECK_EQ(f.body_len, 0);
    check_data(next_frame(fds[1], body), body, 1, 0x20000, img.data + 8 * P, ANSWER, 0);
    check_data(next_frame(fds[1], body), body, 1, 0x22000, img.data + 10 * P, ANSWER, 1);
    for (size_t c = 0; c < img.nchunks; c++)
        CHECK_EQ(img.verified[c], 1); /* checked once, for whoever serves it next */

    /* a cancel is dropped; the next request is answered */
    memcpy(frame, "UFC1", 4);
    frame[24] = frame[25] = 0;
    write_all(fds[1], frame, UFFDD_REQUEST_HEADER);
    n = request(frame, 2, "img", 0x23000, P);
    write_all(fds[1], frame, n);
    check_data(next_frame(fds[1], body), body, 2, 0x23000, img.data + 11 * P, P, 1);
    struct uffdd_answerer_stats s = stats(a);
    CHECK_EQ(s.requests, 2);
    CHECK_EQ(s.live, 1);
    CHECK_EQ(s.waiting_for_output, 0);

    /* an image it does not know: the connection back, with the unparsed bytes */
    n = request(frame, 3, "nope", 0x10000, P);
    write_all(fds[1], frame, n);
    struct uffdd_handback back = handed_back(a);
    CHECK_EQ(back.token, 11);
    CHECK_EQ(back.fd, fds[0]);
    CHECK_EQ(back.reason, UFFDD_HB_UNKNOWN);
    CHECK_EQ(back.len, n);
    CHECK(memcmp(back.bytes, frame, n) == 0);
    uffdd_free(back.bytes);
    CHECK(!readable(fds[1], 0)); /* nothing of it was answered */
    CHECK_EQ(stats(a).live, 0);

    /* what the loop must answer (or refuse) goes back before a byte of it is written */
    struct image bad = image_new(4 * P, 2);
    const struct uffdd_ans_extent bad_extent = {0x10000, 0x14000, 0, P, 0};
    serve(a, "bad", &bad, &bad_extent, 1);
    bad.data[100] ^= 1; /* corrupt data: its checksum fails */
    char bulk[UFFDD_REQUEST_HEADER + 3];
    request(bulk, 6, "img", 0x10000, P);
    memcpy(bulk, "UFB1", 4);
    char frames[5][UFFDD_REQUEST_HEADER + 8];
    size_t lengths[5] = {
        request(frames[0], 4, "bad", 0x10000, P),       /* corrupt data */
        request(frames[1], 5, "img", 0x10100, P),       /* misaligned */
        request(frames[2], 6, "img", 0x10000, 2 << 20), /* over the length limit */
        request(frames[3], 7, "img", 0x23000, 2 * P),   /* past the last extent */
        sizeof bulk,                                    /* a bulk fetch */
    };
    memcpy(frames[4], bulk, sizeof bulk);
    for (size_t i = 0; i < 5; i++) {
        int pair[2];
        stream_pair(pair);
        size_t good = request(frame, 1, "img", 0x10000, P);
        memcpy(frame + good, frames[i], lengths[i]); /* one answered, then the refusal */
        CHECK_EQ(uffdd_answerer_add(a, pair[0], 20 + i, frame, good + lengths[i]), 0);
        check_data(next_frame(pair[1], body), body, 1, 0x10000, img.data, P, 1);
        back = handed_back(a);
        CHECK_EQ(back.token, 20 + i);
        CHECK_EQ(back.reason, UFFDD_HB_DECLINED);
        CHECK_EQ(back.len, lengths[i]);
        CHECK(memcmp(back.bytes, frames[i], lengths[i]) == 0);
        CHECK(!readable(pair[1], 0));
        uffdd_free(back.bytes);
        close(back.fd);
        close(pair[1]);
    }
    CHECK_EQ(bad.verified[0], 0);

    /* a peer that does not read: the thread waits for EPOLLOUT, and serves it later */
    struct image big = image_new(256 * P, 3);
    const struct uffdd_ans_extent big_extent = {0x1000000, 0x1100000, 0, P, 0};
    serve(a, "big", &big, &big_extent, 1);
    int slow[2];
    stream_pair(slow);
    n = request(frame, 9, "big", 0x1000000, 256 * P);
    CHECK_EQ(uffdd_answerer_add(a, slow[0], 30, frame, n), 0);
    while (stats(a).waiting_for_output != 1) /* 1 MiB: more than the socket holds */
        sched_yield();
    for (uint64_t k = 0; k < 128; k++)
        check_data(next_frame(slow[1], body), body, 9, 0x1000000 + k * ANSWER,
                   big.data + k * ANSWER, ANSWER, k == 127);
    while (stats(a).waiting_for_output != 0)
        sched_yield();
    int gone[2]; /* a peer that goes away while the thread waits to write: closed */
    stream_pair(gone);
    CHECK_EQ(uffdd_answerer_add(a, gone[0], 31, frame, n), 0);
    while (stats(a).waiting_for_output != 1)
        sched_yield();
    close(gone[1]);
    while (stats(a).live != 1)
        sched_yield();
    CHECK_EQ(stats(a).waiting_for_output, 0);

    /* draining: the idle connection is closed, nothing new is accepted */
    CHECK_EQ(uffdd_answerer_drain(a), 1);
    char eof;
    CHECK(readable(slow[1], 10000));
    CHECK_EQ(read(slow[1], &eof, 1), 0);
    CHECK_EQ(stats(a).live, 0);
    int late[2];
    stream_pair(late);
    CHECK_EQ(uffdd_answerer_add(a, late[0], 40, frame, n), EBUSY);
    close(late[0]);
    close(late[1]);
    close(slow[1]);

    close(fds[0]);
    close(fds[1]);
    uffdd_answerer_free(a);

    /* freed with a connection handed back and not taken: that one is closed */
    a = uffdd_answerer_new(ANSWER, 1 << 20, 4);
    stream_pair(fds);
    n = request(frame, 1, "img", 0x10000, P); /* unknown to this answerer */
    CHECK_EQ(uffdd_answerer_add(a, fds[0], 50, frame, n), 0);
    CHECK(readable(uffdd_answerer_efd(a), 10000));
    uffdd_answerer_free(a);
    CHECK(readable(fds[1], 10000));
    CHECK_EQ(read(fds[1], &eof, 1), 0);
    close(fds[1]);
    image_free(&img);
    image_free(&bad);
    image_free(&big);
    return 0;
}
