/* The keeper twin: a process that shares the daemon's descriptor table (CLONE_FILES).

   Why a shared table and not descriptors sent to a keeper: a FORK child's uffd is born
   in the reader's table by the read() that returns the event, and the child runs as soon
   as that read returns. Any copy made after it leaves a window in which the daemon's
   death closes the last copy and the child reads zeros. A process sharing the table holds
   every descriptor the daemon holds, at the instant it holds it, at no cost to the daemon.

   The twin runs no Python and calls nothing that may take a lock another thread of the
   daemon held at clone() time (no malloc, no stdio): it waits for the daemon to die
   (its pidfd turns readable), is then the table's only user, clears close-on-exec on
   every descriptor and executes the keeper program (keeper/run.py), which decides from
   the journal what to keep. A clean stop of the daemon kills the twin first. */

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "uffdd.h"

#define TWIN_STACK (64 * 1024)

struct twin_args {
    int daemon_pidfd;
    const char *path;
    char *const *argv;
    char *const *envp;
};

struct linux_dirent64 {
    uint64_t d_ino;
    int64_t d_off;
    unsigned short d_reclen;
    unsigned char d_type;
    char d_name[];
};

/* Clear FD_CLOEXEC on every open descriptor (getdents64 on /proc/self/fd: no malloc),
   and close every listening socket at once: a daemon started again must be able to bind
   the dead one's addresses long before the keeper's Python has started. */
static void keep_across_exec(void)
{
    int dir = (int)syscall(SYS_openat, AT_FDCWD, "/proc/self/fd", O_RDONLY | O_DIRECTORY);
    if (dir < 0)
        return;
    char buf[4096] __attribute__((aligned(8)));
    for (;;) {
        long n = syscall(SYS_getdents64, dir, buf, sizeof buf);
        if (n <= 0)
            break;
        for (long at = 0; at < n;) {
            struct linux_dirent64 *e = (struct linux_dirent64 *)(buf + at);
            at += e->d_reclen;
            int fd = 0;
            const char *c = e->d_name;
            if (*c < '0' || *c > '9')
                continue;
            for (; *c >= '0' && *c <= '9'; c++)
                fd = fd * 10 + (*c - '0');
            if (fd == dir)
                continue;
            int listening = 0;
            socklen_t size = sizeof listening;
            if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &size) == 0 && listening) {
                close(fd);
                continue;
            }
            int flags = fcntl(fd, F_GETFD);
            if (flags >= 0 && (flags & FD_CLOEXEC))
                fcntl(fd, F_SETFD, flags & ~FD_CLOEXEC);
        }
    }
    close(dir);
}

static int twin_main(void *arg)
{
    const struct twin_args *a = arg;
    /* Its own session: a terminal's Ctrl-C for the daemon's group must not reach it. */
    setsid();
    prctl(PR_SET_NAME, "uffdd-twin", 0, 0, 0);
    struct pollfd p = {.fd = a->daemon_pidfd, .events = POLLIN};
    while (poll(&p, 1, -1) < 0 && errno == EINTR)
        ;
    keep_across_exec();
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    execve(a->path, a->argv, a->envp);
    _exit(127);
}

/* Start the twin of the calling process: its pid, or -errno. ``daemon_pidfd`` is a
   pidfd of the caller (it must stay open); ``path``, ``argv`` and ``envp`` are what the
   twin executes once the daemon is gone (they must outlive this call in the caller's
   memory only until clone() returned: the twin has its own copy of it). */
int uffdd_twin_spawn(int daemon_pidfd, const char *path, char *const argv[], char *const envp[])
{
    static struct twin_args args;
    args = (struct twin_args){daemon_pidfd, path, argv, envp};
    char *stack = mmap(NULL, TWIN_STACK, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
    if (stack == MAP_FAILED)
        return -errno;
    /* Every signal blocked from birth: the twin runs the daemon's signal handlers
       otherwise, and those write into the daemon's (shared) wake-up descriptors. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int pid = clone(twin_main, stack + TWIN_STACK, CLONE_FILES | SIGCHLD, &args);
    int err = pid < 0 ? errno : 0;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    munmap(stack, TWIN_STACK); /* the twin has its own copy of the address space */
    return pid < 0 ? -err : pid;
}
