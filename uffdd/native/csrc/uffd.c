/* The userfaultfd syscalls Python calls, each returning its errno as a value: keeping
   errno in C saves a second call into cffi to read it; and the one rule every C reader
   of a uffd applies to what a read returned. */
#include "uffdd.h"

#include <errno.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

int uffd_ioctl(int fd, unsigned long request, void *arg)
{
    return ioctl(fd, request, arg) == 0 ? 0 : errno;
}

int uffd_create(int flags)
{
    long fd = syscall(__NR_userfaultfd, flags);
    return fd >= 0 ? (int)fd : -errno;
}

int uffd_create_from_device(int dev_fd, int flags)
{
    int fd = ioctl(dev_fd, USERFAULTFD_IOC_NEW, flags);
    return fd >= 0 ? fd : -errno;
}

int uffd_msgs_hold_layout(const struct uffd_msg *msgs, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (msgs[i].event != UFFD_EVENT_PAGEFAULT)
            return 1;
    return 0;
}

/* -- reads the journal can replay (keeper/journal.py) -------------------------------- */

#define JOURNAL_READING 1
#define JOURNAL_HELD 2

/* Read up to ``cap`` messages of uffd ``fd`` into ``msgs``. With a journal slot
   (``mark`` and ``slot`` not NULL: the slot's 16 header bytes, then room for ``cap``
   messages), the kernel writes the messages into the slot itself, zeroed first, while
   the mark says READING: whatever moment the daemon dies at, what the read consumed is
   in the slot, for a daemon that resumes to replay. read()'s result; errno as it left it. */
ssize_t uffd_read_journaled(int fd, struct uffd_msg *msgs, size_t cap, uint8_t *mark,
                            uint8_t *slot)
{
    if (!mark || !slot)
        return read(fd, msgs, cap * sizeof *msgs);
    memset(slot + 16, 0, cap * sizeof *msgs);
    __atomic_store_n(mark, JOURNAL_READING, __ATOMIC_SEQ_CST);
    ssize_t n = read(fd, slot + 16, cap * sizeof *msgs);
    int err = errno;
    if (n > 0)
        memcpy(msgs, slot + 16, (size_t)n);
    errno = err;
    return n;
}

/* After a journaled read of ``count`` messages: a batch with a layout event is HELD
   (its count, then the next sequence number) until the loop has journaled it and
   clears the mark; one without is unmarked at once (faults are asked again on resume). */
void uffd_read_settled(uint8_t *mark, uint8_t *slot, size_t count, int layout)
{
    if (!mark || !slot)
        return;
    if (!layout) {
        __atomic_store_n(mark, 0, __ATOMIC_SEQ_CST);
        return;
    }
    uint32_t n = (uint32_t)count;
    uint64_t sequence;
    memcpy(&sequence, slot, sizeof sequence);
    memcpy(slot + 8, &n, sizeof n);
    __atomic_store_n((uint64_t *)(void *)slot, sequence + 1, __ATOMIC_SEQ_CST);
    __atomic_store_n(mark, JOURNAL_HELD, __ATOMIC_SEQ_CST);
}
