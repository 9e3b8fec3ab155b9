"""The thin typed shell over the kernel: userfaultfd ioctls and reads, memory, fds, probes."""
