"""The thin typed shell over the kernel: userfaultfd ioctls, reads, handover sockets."""
