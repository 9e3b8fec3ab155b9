/* The fast lane's frames (wire/fast_lane.py: REQUEST and RESPONSE, little-endian), as
   the bulk receiver and the demand thread read responses, the demand thread writes
   urgent fetches, and the page server's urgent answerer reads those and writes
   responses. */
#include "uffdd.h"

#include <endian.h>
#include <string.h>

static uint64_t get64(const unsigned char *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return le64toh(v);
}

static uint32_t get32(const unsigned char *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return le32toh(v);
}

static uint16_t get16(const unsigned char *p)
{
    uint16_t v;
    memcpy(&v, p, 2);
    return le16toh(v);
}

static void put64(unsigned char *p, uint64_t v)
{
    v = htole64(v);
    memcpy(p, &v, 8);
}

static void put32(unsigned char *p, uint32_t v)
{
    v = htole32(v);
    memcpy(p, &v, 4);
}

static void put16(unsigned char *p, uint16_t v)
{
    v = htole16(v);
    memcpy(p, &v, 2);
}

int frame_parse_response(const unsigned char *h, struct uffdd_frame *f)
{
    f->request_id = get64(h);
    f->address = get64(h + 8);
    f->length = get32(h + 16);
    f->flags = h[20];
    f->code = h[21];
    f->message_length = get16(h + 22);
    f->checksum = get64(h + 24);
    f->body = NULL;
    if (f->flags & ~(UFFDD_FLAG_ZERO | UFFDD_FLAG_LAST | UFFDD_FLAG_ERROR))
        return -1;
    f->body_len = (f->flags & UFFDD_FLAG_ERROR) ? f->message_length
                  : (f->flags & UFFDD_FLAG_ZERO) ? 0
                                                 : f->length;
    return 0;
}

void frame_encode_response(unsigned char *h, uint64_t request_id, uint64_t address,
                           uint32_t length, uint8_t flags, uint64_t checksum)
{
    put64(h, request_id);
    put64(h + 8, address);
    put32(h + 16, length);
    h[20] = flags;
    h[21] = 0;
    put16(h + 22, 0);
    put64(h + 24, checksum);
}

int frame_parse_request(const unsigned char *p, size_t len, struct uffdd_request *req)
{
    if (len < UFFDD_REQUEST_HEADER)
        return 0;
    req->cancel = memcmp(p, "UFC1", 4) == 0;
    req->request_id = get64(p + 4);
    req->address = get64(p + 12);
    req->length = get32(p + 20);
    req->id_len = get16(p + 24);
    if ((!req->cancel && memcmp(p, "UFL1", 4) != 0) || req->id_len > UFFDD_ID_MAX ||
        (req->cancel && req->id_len))
        return -1;
    req->size = UFFDD_REQUEST_HEADER + (size_t)req->id_len;
    if (len < req->size)
        return 0;
    req->image_id = p + UFFDD_REQUEST_HEADER;
    return 1;
}

size_t frame_encode_request(char *out, uint64_t request_id, uint64_t address, uint32_t length,
                            const char *image_id, size_t id_len)
{
    unsigned char *p = (unsigned char *)out;
    memcpy(p, "UFL1", 4);
    put64(p + 4, request_id);
    put64(p + 12, address);
    put32(p + 20, length);
    put16(p + 24, (uint16_t)id_len);
    memcpy(p + UFFDD_REQUEST_HEADER, image_id, id_len);
    return UFFDD_REQUEST_HEADER + id_len;
}
