/* The fast lane's frames in C (csrc/frames.c) against the layout of wire/fast_lane.py:
   REQUEST "<4sQQIH" + image id, RESPONSE "<QQIBBHQ", little-endian. */
#include "harness.h"

static void test_a_request_encodes_to_the_wire_layout_and_parses_back(void)
{
    char buf[UFFDD_REQUEST_HEADER + 8];
    size_t n = frame_encode_request(buf, 0x0102030405060708ULL, 0x7f0000001000ULL, 0x10000,
                                    "img-1", 5);
    CHECK_EQ(n, UFFDD_REQUEST_HEADER + 5);
    const unsigned char expected[] = {
        'U', 'F', 'L', '1',                             /* magic */
        0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01, /* request id */
        0x00, 0x10, 0x00, 0x00, 0x00, 0x7f, 0x00, 0x00, /* image address */
        0x00, 0x00, 0x01, 0x00,                         /* length */
        0x05, 0x00,                                     /* image id length */
        'i', 'm', 'g', '-', '1'};
    CHECK_EQ(sizeof expected, n);
    CHECK(memcmp(buf, expected, n) == 0);

    struct uffdd_request req;
    for (size_t short_by = 1; short_by <= n; short_by++)
        CHECK_EQ(frame_parse_request((unsigned char *)buf, n - short_by, &req), 0);
    CHECK_EQ(frame_parse_request((unsigned char *)buf, n, &req), 1);
    CHECK_EQ(req.cancel, 0);
    CHECK_EQ(req.request_id, 0x0102030405060708ULL);
    CHECK_EQ(req.address, 0x7f0000001000ULL);
    CHECK_EQ(req.length, 0x10000);
    CHECK_EQ(req.id_len, 5);
    CHECK_EQ(req.size, n);
    CHECK(memcmp(req.image_id, "img-1", 5) == 0);
}

static void test_what_is_not_an_urgent_fetch_or_a_cancel_is_refused(void)
{
    char buf[UFFDD_REQUEST_HEADER + UFFDD_ID_MAX + 1];
    struct uffdd_request req;
    frame_encode_request(buf, 1, 0, 4096, "x", 1);
    memcpy(buf, "UFB1", 4); /* a bulk fetch: the loop's */
    CHECK_EQ(frame_parse_request((unsigned char *)buf, sizeof buf, &req), -1);
    memcpy(buf, "JUNK", 4);
    CHECK_EQ(frame_parse_request((unsigned char *)buf, sizeof buf, &req), -1);
    memcpy(buf, "UFC1", 4); /* a cancel carries no image id */
    CHECK_EQ(frame_parse_request((unsigned char *)buf, sizeof buf, &req), -1);
    buf[24] = 0;
    buf[25] = 0;
    CHECK_EQ(frame_parse_request((unsigned char *)buf, UFFDD_REQUEST_HEADER, &req), 1);
    CHECK_EQ(req.cancel, 1);
    CHECK_EQ(req.size, UFFDD_REQUEST_HEADER);
    memcpy(buf, "UFL1", 4); /* an image id over the limit */
    buf[24] = (char)((UFFDD_ID_MAX + 1) & 0xff);
    buf[25] = (char)((UFFDD_ID_MAX + 1) >> 8);
    CHECK_EQ(frame_parse_request((unsigned char *)buf, sizeof buf, &req), -1);
}

static void test_a_response_encodes_to_the_wire_layout_and_parses_back(void)
{
    unsigned char h[UFFDD_FRAME_HEADER];
    frame_encode_response(h, 9, 0x200000, 0x3000, UFFDD_FLAG_LAST, 0x1122334455667788ULL);
    const unsigned char expected[UFFDD_FRAME_HEADER] = {
        9,    0,    0,    0,    0,    0,    0,    0,    /* request id */
        0,    0,    0x20, 0,    0,    0,    0,    0,    /* address */
        0,    0x30, 0,    0,                            /* length */
        2,                                              /* flags */
        0,                                              /* code */
        0,    0,                                        /* message length */
        0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, /* checksum */
    };
    CHECK(memcmp(h, expected, sizeof h) == 0);
    struct uffdd_frame f;
    CHECK_EQ(frame_parse_response(h, &f), 0);
    CHECK_EQ(f.request_id, 9);
    CHECK_EQ(f.address, 0x200000);
    CHECK_EQ(f.length, 0x3000);
    CHECK_EQ(f.flags, UFFDD_FLAG_LAST);
    CHECK_EQ(f.checksum, 0x1122334455667788ULL);
    CHECK_EQ(f.body_len, 0x3000); /* data: the length follows */
    CHECK(f.body == NULL);
}

static void test_a_responses_body_length_follows_its_flags(void)
{
    unsigned char h[UFFDD_FRAME_HEADER];
    struct uffdd_frame f;
    frame_encode_response(h, 1, 0, 1 << 20, UFFDD_FLAG_ZERO | UFFDD_FLAG_LAST, 0);
    CHECK_EQ(frame_parse_response(h, &f), 0);
    CHECK_EQ(f.body_len, 0); /* zeros: no body */
    frame_encode_response(h, 1, 0, 0, UFFDD_FLAG_ERROR | UFFDD_FLAG_LAST, 0);
    h[21] = 5;    /* code */
    h[22] = 0x2c; /* message length 300 */
    h[23] = 0x01;
    CHECK_EQ(frame_parse_response(h, &f), 0);
    CHECK_EQ(f.code, 5);
    CHECK_EQ(f.message_length, 300);
    CHECK_EQ(f.body_len, 300); /* an error: its message follows */
    frame_encode_response(h, 1, 0, 4096, 0x08, 0);
    CHECK_EQ(frame_parse_response(h, &f), -1); /* unknown flags */
}

int main(void)
{
    test_begin();
    test_a_request_encodes_to_the_wire_layout_and_parses_back();
    test_what_is_not_an_urgent_fetch_or_a_cancel_is_refused();
    test_a_response_encodes_to_the_wire_layout_and_parses_back();
    test_a_responses_body_length_follows_its_flags();
    return 0;
}
