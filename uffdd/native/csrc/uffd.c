/* The userfaultfd syscalls Python calls, each returning its errno as a value: keeping
   errno in C saves a second call into cffi to read it; and the one rule every C reader
   of a uffd applies to what a read returned. */
#include "uffdd.h"

#include <errno.h>
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
