"""The C: one cffi extension built from ``csrc/``, and the thin Python owners of its threads.

Why C at all: the hot paths (bulk installs, the bulk lane's receive and send, remote
demand faults, the local fast serve, the page server's urgent answers) run on pthreads
without the GIL where a measurement showed the event loop was the bottleneck. Each
owner here starts its thread, hands it plain values (fds, buffers, tables), takes its
results through an eventfd and frees it; none of them knows of images or the network.
docs/architecture.md is the one description of the threads, their locks and fences
(sections 4 and 5); its section 8 lists the C files.
"""
