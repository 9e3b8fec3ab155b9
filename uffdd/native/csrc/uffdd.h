/* uffdd's C: the declarations every file of csrc/ shares.

   Why one header: the threads share a handful of helpers (an eventfd queue, thread
   start-up, frames, range tables, the epoll skeleton), and the cffi module and the C
   tests (tests/native/) need the same API. The first part is that API, mirrored by
   ffi_api.cdef (the cffi build compiles the cdef against this header, so a mismatch
   fails the build); the second is shared inside csrc/ and by the C tests only.

   Who runs what, which locks each thread takes and what fences what against layout
   events is written down in docs/architecture.md; the comments here say what each
   call does. */
#ifndef UFFDD_H
#define UFFDD_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* pthread_setname_np, recv flags, struct ucred */
#endif

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/epoll.h>

#include "uapi.h"

/* ===================================================================================
   The API (ffi_api.cdef)
   =================================================================================== */

#define UFFDD_PAGE 4096ULL

/* -- userfaultfd calls with errno as a value (uffd.c) ------------------------------- */

/* One ioctl: 0 on success, else the errno (one call from Python, no errno read). */
int uffd_ioctl(int fd, unsigned long request, void *arg);
/* userfaultfd(2): the fd, or -errno. */
int uffd_create(int flags);
/* USERFAULTFD_IOC_NEW on an open /dev/userfaultfd: the fd, or -errno. */
int uffd_create_from_device(int dev_fd, int flags);

/* -- the checksum every chunk carries: xxHash's XXH3-64 (checksum.c) ---------------- */

uint64_t uffdd_checksum(const void *data, size_t len);

/* Free a buffer the C handed over (a report's, a frame's, a hand-back's). */
void uffdd_free(void *p);

/* -- the local fast serve (fast_serve.c) -------------------------------------------- */

struct uffdd_fast_range {
    uint64_t run_start;
    uint64_t run_end;
    uint64_t data_offset; /* where run_start's bytes are in the data buffer */
};

struct uffdd_fast_done {
    uint64_t run;
    uint64_t len;
    uint64_t msg_index;
};

struct uffdd_fast_out {
    size_t nread;   /* messages read */
    size_t nrest;   /* messages copied to rest (the slow path's) */
    size_t ndone;   /* installs recorded in done */
    size_t nfaults; /* faults answered here (installed or woken) */
};

#define UFFDD_FAST_BATCH 64

/* How C answers a fault on its own (core/policy.py: FaultPlan): the block a fault's
   answer is cut from, and whether a data fault brings the block's other runs too. */
struct uffdd_plan {
    uint64_t block;
    uint32_t whole_block;
};

/* One part of a fault's answer: run-time [start, end), zeros or data, in table row
   ``row`` (of the zeros or of the data table). */
struct uffdd_span {
    uint64_t start, end;
    uint32_t zero, row;
};

/* What a fault on ``page`` gets under ``plan`` (core/policy.py: plan_fault, which says
   it in full): at most ``cap`` spans, the fault's own first; 0 when the page is in
   neither table (the core's to answer). */
size_t uffdd_plan_fault(const struct uffdd_plan *plan, const struct uffdd_fast_range *data,
                        size_t ndata, const struct uffdd_fast_range *zeros, size_t nzeros,
                        uint64_t page, struct uffdd_span *out, size_t cap);

int uffdd_fast_serve(int fd, const struct uffdd_fast_range *ranges, size_t nranges,
                     const char *data, const uint8_t *verified, size_t nverified,
                     unsigned chunk_shift, const struct uffdd_plan *plan, char *rest,
                     size_t rest_cap, struct uffdd_fast_done *done, size_t done_cap,
                     struct uffdd_fast_out *out, uint8_t *mark, uint8_t *slot);

/* -- the background installer, and the fence table (installer.c) -------------------- */

struct uffdd_install_done {
    uint64_t id;
    uint64_t copied;
    int err; /* 0, or the errno that ended the job (EAGAIN when fenced) */
};

struct uffdd_installer_stats {
    uint64_t pieces;        /* UFFDIO_COPY calls made */
    size_t queued;          /* jobs waiting for the thread */
    size_t untaken;         /* completions waiting for the loop */
    size_t watched;         /* uffds in the fence table */
    int busy;               /* a job is in progress */
    int waiting_for_reader; /* taking uffd_lock for its next piece (it waits while a
                               reader holds it) */
};

struct uffdd_installer;

struct uffdd_installer *uffdd_installer_new(size_t cap, uint64_t piece, int nice);
void uffdd_installer_free(struct uffdd_installer *in);
int uffdd_installer_efd(const struct uffdd_installer *in);
int uffdd_installer_watch(struct uffdd_installer *in, int fd);
void uffdd_installer_unwatch(struct uffdd_installer *in, int fd);
int uffdd_installer_submit(struct uffdd_installer *in, int fd, uint64_t dst, uint64_t src,
                           uint64_t len, uint64_t mode, uint64_t id);
size_t uffdd_installer_take(struct uffdd_installer *in, struct uffdd_install_done *out,
                            size_t cap);
void uffdd_installer_hold(struct uffdd_installer *in);
void uffdd_installer_unhold(struct uffdd_installer *in);
void uffdd_installer_fence_held(struct uffdd_installer *in, int fd);
void uffdd_installer_unfence(struct uffdd_installer *in, int fd);
void uffdd_installer_quiesce(struct uffdd_installer *in, int fd);
int uffdd_installer_expedite(struct uffdd_installer *in, int fd, uint64_t addr);
int uffdd_installer_guarded_ioctl(struct uffdd_installer *in, int fd, unsigned long request,
                                  void *arg);
void uffdd_installer_stats(struct uffdd_installer *in, struct uffdd_installer_stats *out);

/* -- the bulk lane's receiver and writer (receiver.c) ------------------------------- */

/* A response frame (wire/fast_lane.py RESPONSE) and its body. */
struct uffdd_frame {
    uint64_t request_id, address, checksum;
    uint32_t length;
    uint8_t flags, code;
    uint16_t message_length;
    char *body;
    uint64_t body_len;
};

#define UFFDD_RECV_RUNNING 0
#define UFFDD_RECV_EOF (-1)      /* closed by the peer between frames */
#define UFFDD_RECV_MIDFRAME (-2) /* closed by the peer inside a frame */
#define UFFDD_RECV_GARBAGE (-3)  /* unknown flags, or a body over max_body */
#define UFFDD_RECV_STOPPED (-4)
#define UFFDD_RECV_NOMEM (-5)

struct uffdd_receiver_stats {
    uint64_t frames_read;  /* frames queued for the loop so far */
    uint64_t bytes_read;   /* their header and body bytes */
    uint64_t queued_bytes; /* body bytes waiting for the loop */
    size_t queued_frames;
    uint64_t bytes_sent;   /* request frame bytes written */
    uint64_t unsent_bytes; /* request frame bytes handed over and not written yet */
    int full;              /* the reader stopped reading: the queue is full */
    int in_frame;          /* the reader has a frame's header and waits for its body */
    int sending;           /* the writer is in a send */
};

struct uffdd_receiver;

struct uffdd_receiver *uffdd_receiver_new(int fd, size_t cap, uint64_t max_queued,
                                          uint64_t max_body);
int uffdd_receiver_efd(const struct uffdd_receiver *r);
size_t uffdd_receiver_take(struct uffdd_receiver *r, struct uffdd_frame *out, size_t n,
                           uint64_t max_bytes);
int uffdd_receiver_status(struct uffdd_receiver *r);
int uffdd_receiver_send(struct uffdd_receiver *r, const char *data, size_t len);
void uffdd_receiver_stats(struct uffdd_receiver *r, struct uffdd_receiver_stats *out);
void uffdd_receiver_free(struct uffdd_receiver *r);

/* -- the demand thread (demander.c) ------------------------------------------------- */

#define UFFDD_DR_LAYOUT 1  /* msgs hold a layout event: fd fenced, paused */
#define UFFDD_DR_DRAINED 2 /* the fd was empty after this */
#define UFFDD_DR_ERROR 4   /* read() failed: err; the fd is paused */
#define UFFDD_DR_LANE 8    /* the service ended (err: the connection's, or ENOMEM for a
                              round): nothing is served any more; every message goes to
                              the loop */

struct uffdd_demand_report {
    uint64_t token;
    double read_at, done_at; /* CLOCK_MONOTONIC seconds */
    uint32_t nfaults;        /* faults answered here */
    uint32_t ninstalls;
    uint32_t nmsgs;          /* raw uffd_msg records for the loop, in order */
    uint32_t flags;
    int err;
    struct uffdd_fast_done *installs; /* malloc'ed (uffdd_free), or NULL */
    char *msgs;                       /* malloc'ed (uffdd_free), or NULL */
};

struct uffdd_demander;

struct uffdd_demander *uffdd_demander_new(int sock, const struct uffdd_plan *plan,
                                          size_t max_procs, struct uffdd_installer *installer);
int uffdd_demander_efd(const struct uffdd_demander *d);
int uffdd_demander_add(struct uffdd_demander *d, int fd, uint64_t token, const char *image_id,
                       size_t id_len, const struct uffdd_fast_range *ranges, size_t nranges,
                       const struct uffdd_fast_range *zeros, size_t nzeros);
int uffdd_demander_resume(struct uffdd_demander *d, int slot,
                          const struct uffdd_fast_range *ranges, size_t nranges,
                          const struct uffdd_fast_range *zeros, size_t nzeros);
void uffdd_demander_remove(struct uffdd_demander *d, int slot);
void uffdd_demander_marks(struct uffdd_demander *d, uint8_t *marks, size_t n, uint8_t *slots,
                          size_t slot_size);
size_t uffdd_demander_take(struct uffdd_demander *d, struct uffdd_demand_report *out, size_t n);
void uffdd_demander_free(struct uffdd_demander *d);

/* -- the page server's urgent answerer (answerer.c) --------------------------------- */

#define UFFDD_ANS_ZERO 1    /* uffdd_ans_extent.kind: known zero (else data) */
#define UFFDD_HB_DECLINED 0 /* a frame this thread does not answer */
#define UFFDD_HB_FULL 1     /* no room for the connection */
#define UFFDD_HB_UNKNOWN 2  /* a request for an image not registered (yet) */

struct uffdd_ans_extent {
    uint64_t start, end;  /* image addresses */
    uint64_t data_offset; /* of start's bytes in the data file (DATA) */
    uint64_t page_size;   /* of the extent's region */
    uint32_t kind;
};

struct uffdd_handback {
    uint64_t token;
    int fd;      /* the loop's now */
    int reason;  /* UFFDD_HB_* */
    size_t len;
    char *bytes; /* the unparsed bytes (uffdd_free), or NULL */
};

struct uffdd_answerer_stats {
    size_t live;               /* connections owned (in a slot, or queued to adopt) */
    size_t waiting_for_output; /* connections whose peer does not read: they wait for
                                  EPOLLOUT and are not read meanwhile */
    uint64_t requests;         /* requests accepted (each answered whole) */
};

struct uffdd_answerer;

struct uffdd_answerer *uffdd_answerer_new(uint64_t chunk_size, uint64_t max_length,
                                          size_t max_conns);
int uffdd_answerer_efd(const struct uffdd_answerer *a);
int uffdd_answerer_image(struct uffdd_answerer *a, const char *id, size_t id_len,
                         uint64_t page_size, uint64_t chunk_size, const char *data,
                         uint64_t data_size, uint8_t *verified, const uint64_t *checksums,
                         size_t nchunks, int data_fd, const struct uffdd_ans_extent *extents,
                         size_t nextents);
int uffdd_answerer_add(struct uffdd_answerer *a, int fd, uint64_t token, const char *bytes,
                       size_t len);
size_t uffdd_answerer_take(struct uffdd_answerer *a, struct uffdd_handback *out, size_t n);
size_t uffdd_answerer_drain(struct uffdd_answerer *a);
void uffdd_answerer_stats(struct uffdd_answerer *a, struct uffdd_answerer_stats *out);
void uffdd_answerer_free(struct uffdd_answerer *a);

/* the keeper twin (twin.c) */
int uffdd_twin_spawn(int daemon_pidfd, const char *path, char *const argv[], char *const envp[]);

/* ===================================================================================
   Shared inside csrc/ (and by tests/native/)
   =================================================================================== */

/* -- uffd.c -------------------------------------------------------------------------- */

/* 1 when a read's ``n`` messages hold a layout event (FORK, REMAP, REMOVE, UNMAP): then
   no fault of that read is answered in C. Its copy would run after the event was read,
   and once the kernel has zapped a removed range (it does so after the read), a copy
   that lands would put snapshot data where zeros are right. The core answers them,
   after the event (docs/architecture.md, section 5.3). */
int uffd_msgs_hold_layout(const struct uffd_msg *msgs, size_t n);
ssize_t uffd_read_journaled(int fd, struct uffd_msg *msgs, size_t cap, uint8_t *mark,
                            uint8_t *slot);
void uffd_read_settled(uint8_t *mark, uint8_t *slot, size_t count, int layout);

/* -- common.c: eventfds, threads, sockets, time ------------------------------------- */

/* Make an eventfd readable (a thread's wake-up of the loop, or the loop's of a thread). */
void efd_post(int efd);

/* The loop's side of a C thread's output queue: an array of ``*count`` items of
   ``size`` bytes at ``*items`` (read under ``lock``: the thread may move it), which
   eventfd ``efd`` signals while it is not empty. Moves up to ``n`` from its front to
   ``out``; the number moved. */
size_t efd_queue_take(int efd, pthread_mutex_t *lock, void **items, size_t *count, void *out,
                      size_t n, size_t size);

/* A constructor's fail path: close each of the ``n`` descriptors that was opened (the
   others are -1). */
void close_opened(const int *fds, size_t n);

/* pthread_create with every signal blocked in the new thread: signals stay with the
   threads that run Python. 0 or the error number. */
int thread_start(pthread_t *thread, void *(*start)(void *), void *arg);

/* This thread's scheduler slice: ``runtime`` ns, 0 for the kernel's default (a thread
   inherits its creator's, and the daemon's loop may run with a short one that bulk
   threads must not have). Only for a fair policy; policy and nice stay as they are. */
void thread_slice(uint64_t runtime);
#define UFFDD_SHORT_SLICE 100000 /* ns: kernel/sched.py's short slice */

/* Read exactly ``len`` bytes of a blocking socket: 1, 0 at EOF, -errno. */
int socket_read(int fd, char *p, size_t len);

/* CLOCK_MONOTONIC in seconds (what Python's time.monotonic() reads). */
double monotonic_now(void);

/* -- frames.c: the fast lane's frames (wire/fast_lane.py) --------------------------- */

#define UFFDD_FRAME_HEADER 32   /* RESPONSE */
#define UFFDD_REQUEST_HEADER 26 /* REQUEST, the image id follows */
#define UFFDD_ID_MAX 1024       /* MAX_IMAGE_ID_BYTES */
#define UFFDD_FLAG_ZERO 1
#define UFFDD_FLAG_LAST 2
#define UFFDD_FLAG_ERROR 4

/* A response header into ``f`` (body NULL, body_len from the flags): 0, or -1 for
   unknown flags. */
int frame_parse_response(const unsigned char *h, struct uffdd_frame *f);
/* A response header (no error code, no message). */
void frame_encode_response(unsigned char *h, uint64_t request_id, uint64_t address,
                           uint32_t length, uint8_t flags, uint64_t checksum);

struct uffdd_request {
    int cancel;            /* UFC1 (else UFL1: an urgent fetch) */
    uint64_t request_id, address;
    uint32_t length;
    uint16_t id_len;
    const unsigned char *image_id; /* points into the parsed bytes */
    size_t size;                   /* the whole frame's */
};

/* An urgent fetch or a cancel at the start of ``p``: 1 (``req`` filled), 0 when more
   bytes are needed, -1 when it is neither (a bulk fetch, garbage, a cancel with an
   image id, an image id over UFFDD_ID_MAX). */
int frame_parse_request(const unsigned char *p, size_t len, struct uffdd_request *req);
/* An urgent fetch (UFL1) into ``out`` (room for UFFDD_REQUEST_HEADER + id_len): its size. */
size_t frame_encode_request(char *out, uint64_t request_id, uint64_t address, uint32_t length,
                            const char *image_id, size_t id_len);

/* -- plan.c: the core's fault plan over its sorted tables of run-time ranges ------ */

/* The range holding ``addr`` in the sorted, disjoint ``ranges``, or NULL. */
const struct uffdd_fast_range *range_find(const struct uffdd_fast_range *ranges, size_t n,
                                          uint64_t addr);
/* The index of the first range that ends after ``addr``. */
size_t range_after(const struct uffdd_fast_range *ranges, size_t n, uint64_t addr);
/* 1 when ``plan``'s block is a power of two of at least a page. */
int plan_valid(const struct uffdd_plan *plan);
/* The first address of the block holding ``page``. */
uint64_t plan_block(const struct uffdd_plan *plan, uint64_t page);

/* -- epoll_thread.c: the skeleton of an epoll-driven thread ------------------------- */

/* A thread that waits in epoll for its fds and for the loop (``ctl_efd``), and gives
   the loop items through a queue that ``out_efd`` signals while it is not empty.
   ``lock`` guards the queue and ``stop``, and the owner's state shared with the loop. */
struct epoll_thread {
    pthread_t thread;
    pthread_mutex_t lock;
    int epfd, ctl_efd, out_efd;
    int stop;
    void *items; /* the queue: nitems of size bytes, room for cap */
    size_t nitems, cap, size;
};

#define EPOLL_THREAD_CONTROL UINT64_MAX /* the ctl eventfd's epoll data */

/* The fds, the lock and a queue with room for ``cap`` items of ``size`` bytes: 0, or
   an errno (nothing left open). */
int epoll_thread_open(struct epoll_thread *t, size_t size, size_t cap);
/* Start ``main(arg)``: 0, or the error number (then epoll_thread_release). */
int epoll_thread_start(struct epoll_thread *t, void *(*main)(void *), void *arg);
/* Wait for events: the number of the owner's events in ``evs`` (the control event
   taken out: ``*control`` says whether it came, and its counter is consumed before
   the caller reads its flags, so a post after that stays pending for the next wait),
   0 on EINTR, -1 on an error. */
int epoll_thread_wait(struct epoll_thread *t, struct epoll_event *evs, int max, int timeout,
                      int *control);
/* With ``lock`` held: room for ``n`` more items without growing. 0, or ENOMEM. */
int epoll_thread_reserve_locked(struct epoll_thread *t, size_t n);
/* With ``lock`` held: queue ``item`` for the loop (the queue grows). 0, or ENOMEM. */
int epoll_thread_push_locked(struct epoll_thread *t, const void *item);
/* The loop's side: up to ``n`` items to ``out``; the number. */
size_t epoll_thread_take(struct epoll_thread *t, void *out, size_t n);
/* Set ``stop`` and wake the thread (it ends at its next wait; not joined yet). */
void epoll_thread_stop(struct epoll_thread *t);
/* Join the stopped thread, ``drop`` each item still queued, release everything. */
void epoll_thread_end(struct epoll_thread *t, void (*drop)(void *item));
/* Release what epoll_thread_open made (no thread runs). */
void epoll_thread_release(struct epoll_thread *t);

#endif
