"""The daemon's front doors: each turns its restorer's protocol into ``Restore``s.

Why doors: the daemon serves a uffd the same whoever hands it over; what differs is the
protocol in (``native/``: uffdd's own, with replies; ``criu``: CRIU's lazy-pages socket;
``firecracker/``: Firecracker's UFFD memory backend) and where the image comes from.
A door is a coroutine the daemon runs for its life (``lifecycle.Door``).
"""
