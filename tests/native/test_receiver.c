/* The bulk lane's receiver and writer threads (csrc/receiver.c) on a socket pair:
   frames arrive whole and in order, the loop takes a bounded turn's worth, the queue
   stops the reader when full, every end is told apart, request frames go out in order
   while nobody reads them, and freeing drops what is left. */
#include "harness.h"

#include <stdint.h>

#define KIB 1024

static uint64_t header(unsigned char *h, uint64_t id, uint64_t address, uint32_t length,
                       uint8_t flags, const char *body)
{
    uint64_t sum = body ? uffdd_checksum(body, length) : 0;
    frame_encode_response(h, id, address, length, flags, sum);
    return sum;
}

static void send_data(int fd, uint64_t id, const char *body, uint32_t length)
{
    unsigned char h[UFFDD_FRAME_HEADER];
    header(h, id, 0x1000 * id, length, UFFDD_FLAG_LAST, body);
    write_all(fd, h, sizeof h);
    write_all(fd, body, length);
}

static struct uffdd_receiver_stats stats(struct uffdd_receiver *r)
{
    struct uffdd_receiver_stats s;
    uffdd_receiver_stats(r, &s);
    return s;
}

/* The next ``n`` frames, waited for on the eventfd. */
static void take(struct uffdd_receiver *r, struct uffdd_frame *out, size_t n)
{
    size_t got = 0;
    while (got < n) {
        CHECK(readable(uffdd_receiver_efd(r), 10000));
        got += uffdd_receiver_take(r, out + got, n - got, UINT64_MAX);
    }
}

/* Until the thread has ended: its status. */
static int ended(struct uffdd_receiver *r)
{
    for (;;) {
        CHECK(readable(uffdd_receiver_efd(r), 10000));
        struct uffdd_frame f;
        CHECK_EQ(uffdd_receiver_take(r, &f, 1, UINT64_MAX), 0);
        int status = uffdd_receiver_status(r);
        if (status != UFFDD_RECV_RUNNING)
            return status;
    }
}

static void test_frames_arrive_whole_and_in_order(void)
{
    int fds[2];
    stream_pair(fds);
    struct uffdd_receiver *r = uffdd_receiver_new(fds[0], 16, 1 << 20, 1 << 20);
    CHECK(r != NULL);
    char data[3 * 4096];
    pattern(data, sizeof data, 1);
    send_data(fds[1], 1, data, sizeof data);
    unsigned char h[UFFDD_FRAME_HEADER];
    header(h, 2, 0x2000, 1 << 20, UFFDD_FLAG_ZERO | UFFDD_FLAG_LAST, NULL);
    write_all(fds[1], h, sizeof h);
    header(h, 3, 0x3000, 0, UFFDD_FLAG_ERROR | UFFDD_FLAG_LAST, NULL);
    h[21] = 5;
    h[22] = 4;
    write_all(fds[1], h, sizeof h);
    write_all(fds[1], "nope", 4);
    header(h, 4, 0x4000, sizeof data, UFFDD_FLAG_LAST, data); /* a byte at a time */
    for (size_t i = 0; i < sizeof h; i++)
        write_all(fds[1], h + i, 1);
    for (size_t i = 0; i < sizeof data; i += 1000)
        write_all(fds[1], data + i, sizeof data - i < 1000 ? sizeof data - i : 1000);
    struct uffdd_frame f[4];
    take(r, f, 4);
    CHECK_EQ(f[0].request_id, 1);
    CHECK_EQ(f[0].body_len, sizeof data);
    CHECK(memcmp(f[0].body, data, sizeof data) == 0);
    CHECK_EQ(f[0].checksum, uffdd_checksum(data, sizeof data));
    CHECK_EQ(f[1].request_id, 2);
    CHECK_EQ(f[1].length, 1 << 20);
    CHECK_EQ(f[1].body_len, 0);
    CHECK(f[1].body == NULL);
    CHECK_EQ(f[2].code, 5);
    CHECK_EQ(f[2].body_len, 4);
    CHECK(memcmp(f[2].body, "nope", 4) == 0);
    CHECK_EQ(f[3].address, 0x4000);
    CHECK(memcmp(f[3].body, data, sizeof data) == 0);
    struct uffdd_receiver_stats s = stats(r);
    CHECK_EQ(s.frames_read, 4);
    CHECK_EQ(s.bytes_read, 4 * UFFDD_FRAME_HEADER + 2 * sizeof data + 4);
    CHECK_EQ(s.queued_frames, 0);
    CHECK_EQ(s.queued_bytes, 0);
    CHECK(!readable(uffdd_receiver_efd(r), 0)); /* nothing waits, and it runs */
    for (size_t i = 0; i < 4; i++)
        uffdd_free(f[i].body);
    close(fds[1]);
    CHECK_EQ(ended(r), UFFDD_RECV_EOF);
    uffdd_receiver_free(r);
    close(fds[0]);
}

static void test_a_take_stops_at_its_byte_budget_but_takes_one_frame_at_least(void)
{
    int fds[2];
    stream_pair(fds);
    struct uffdd_receiver *r = uffdd_receiver_new(fds[0], 16, 1 << 20, 1 << 20);
    static char body[100 * KIB];
    pattern(body, sizeof body, 2);
    for (uint64_t id = 1; id <= 3; id++)
        send_data(fds[1], id, body, sizeof body);
    while (stats(r).frames_read < 3)
        CHECK(readable(uffdd_receiver_efd(r), 10000));
    struct uffdd_frame f[16];
    CHECK_EQ(uffdd_receiver_take(r, f, 16, 150 * KIB), 2); /* the second passes the budget */
    CHECK(readable(uffdd_receiver_efd(r), 0));              /* one still waits */
    CHECK_EQ(uffdd_receiver_take(r, f + 2, 16, 1), 1);      /* one always comes */
    for (size_t i = 0; i < 3; i++) {
        CHECK_EQ(f[i].request_id, i + 1);
        uffdd_free(f[i].body);
    }
    uffdd_receiver_free(r);
    close(fds[0]);
    close(fds[1]);
}

struct sender {
    int fd;
    const char *data;
    size_t len;
};

static void *send_all(void *arg)
{
    struct sender *s = arg;
    write_all(s->fd, s->data, s->len);
    return NULL;
}

static void test_a_full_queue_stops_the_reader_and_memory_stays_bounded(void)
{
    enum { FRAMES = 20, BODY = 50000 };
    int fds[2];
    stream_pair(fds);
    struct uffdd_receiver *r = uffdd_receiver_new(fds[0], 1024, 100000, 1 << 20);
    size_t frame = UFFDD_FRAME_HEADER + BODY;
    char *stream = malloc(FRAMES * frame);
    for (size_t k = 0; k < FRAMES; k++) {
        char *body = stream + k * frame + UFFDD_FRAME_HEADER;
        pattern(body, BODY, (unsigned)k);
        header((unsigned char *)stream + k * frame, k + 1, 0x1000 * k, BODY, UFFDD_FLAG_LAST,
               body);
    }
    struct sender s = {fds[1], stream, FRAMES * frame};
    pthread_t sender;
    CHECK_EQ(pthread_create(&sender, NULL, send_all, &s), 0);
    while (!stats(r).full) /* nobody takes: the reader stops */
        sched_yield();
    struct uffdd_receiver_stats st = stats(r);
    CHECK(st.queued_bytes >= 100000 && st.queued_bytes < 100000 + BODY);
    CHECK(st.frames_read < FRAMES);
    for (size_t k = 0; k < FRAMES; k++) {
        struct uffdd_frame f;
        take(r, &f, 1);
        CHECK_EQ(f.request_id, k + 1);
        CHECK(memcmp(f.body, stream + k * frame + UFFDD_FRAME_HEADER, BODY) == 0);
        uffdd_free(f.body);
    }
    CHECK_EQ(pthread_join(sender, NULL), 0);
    CHECK_EQ(stats(r).queued_bytes, 0);
    free(stream);
    uffdd_receiver_free(r);
    close(fds[0]);
    close(fds[1]);
}

static void test_each_end_is_told_apart(void)
{
    unsigned char h[UFFDD_FRAME_HEADER];
    char body[4096] = {0};
    int fds[2];

    stream_pair(fds); /* unknown flags */
    struct uffdd_receiver *r = uffdd_receiver_new(fds[0], 16, 1 << 20, 1 << 20);
    header(h, 1, 0, 4096, 0x80, NULL);
    write_all(fds[1], h, sizeof h);
    CHECK_EQ(ended(r), UFFDD_RECV_GARBAGE);
    uffdd_receiver_free(r);
    close(fds[0]);
    close(fds[1]);

    stream_pair(fds); /* a body over the limit */
    r = uffdd_receiver_new(fds[0], 16, 1 << 20, 4096);
    header(h, 1, 0, 8192, UFFDD_FLAG_LAST, NULL);
    write_all(fds[1], h, sizeof h);
    CHECK_EQ(ended(r), UFFDD_RECV_GARBAGE);
    uffdd_receiver_free(r);
    close(fds[0]);
    close(fds[1]);

    stream_pair(fds); /* closed inside a frame, after a whole one: that one first */
    r = uffdd_receiver_new(fds[0], 16, 1 << 20, 1 << 20);
    send_data(fds[1], 1, body, sizeof body);
    header(h, 2, 0, sizeof body, UFFDD_FLAG_LAST, body);
    write_all(fds[1], h, sizeof h);
    write_all(fds[1], body, 100);
    close(fds[1]);
    struct uffdd_frame f;
    take(r, &f, 1);
    CHECK_EQ(f.request_id, 1);
    uffdd_free(f.body);
    CHECK_EQ(ended(r), UFFDD_RECV_MIDFRAME);
    uffdd_receiver_free(r);
    close(fds[0]);

    stream_pair(fds); /* the writer's error ends the reader too, with its errno */
    r = uffdd_receiver_new(fds[0], 16, 1 << 20, 1 << 20);
    CHECK_EQ(shutdown(fds[1], SHUT_RD), 0);
    CHECK_EQ(uffdd_receiver_send(r, "request", 7), 0);
    CHECK_EQ(ended(r), EPIPE);
    uffdd_receiver_free(r);
    close(fds[0]);
    close(fds[1]);
}

static void test_request_frames_go_out_in_order_while_nobody_reads_them(void)
{
    enum { FRAMES = 64, SIZE = 64 * KIB };
    int fds[2];
    stream_pair(fds);
    struct uffdd_receiver *r = uffdd_receiver_new(fds[0], 16, 1 << 20, 1 << 20);
    char *all = malloc(FRAMES * SIZE);
    pattern(all, FRAMES * SIZE, 9);
    for (size_t k = 0; k < FRAMES; k++) /* 4 MiB: more than the socket holds */
        CHECK_EQ(uffdd_receiver_send(r, all + k * SIZE, SIZE), 0);
    while (!stats(r).sending) /* the writer is in a send the peer does not drain */
        sched_yield();
    CHECK(stats(r).unsent_bytes > 0);
    char *got = malloc(FRAMES * SIZE);
    read_all(fds[1], got, FRAMES * SIZE);
    CHECK(memcmp(got, all, FRAMES * SIZE) == 0);
    while (stats(r).unsent_bytes) /* the writer accounts for its last send */
        sched_yield();
    CHECK_EQ(stats(r).bytes_sent, FRAMES * SIZE);
    /* free with frames not sent and frames not taken: nothing leaks */
    for (size_t k = 0; k < FRAMES; k++)
        CHECK_EQ(uffdd_receiver_send(r, all + k * SIZE, SIZE), 0);
    send_data(fds[1], 1, all, SIZE);
    while (stats(r).frames_read < 1)
        CHECK(readable(uffdd_receiver_efd(r), 10000));
    uffdd_receiver_free(r);
    free(got);
    free(all);
    close(fds[0]);
    close(fds[1]);
}

int main(void)
{
    test_begin();
    test_frames_arrive_whole_and_in_order();
    test_a_take_stops_at_its_byte_budget_but_takes_one_frame_at_least();
    test_a_full_queue_stops_the_reader_and_memory_stays_bounded();
    test_each_end_is_told_apart();
    test_request_frames_go_out_in_order_while_nobody_reads_them();
    return 0;
}
