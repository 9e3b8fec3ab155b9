"""`uffdd daemon`: make handed-over processes whole, and never let them read wrong memory.

Why these rooms: ``lifecycle`` runs the service (doors in, progress out, graceful stop);
``executor`` runs the core's decisions against uffds and page sources and owns the
routes a fault can take (docs/architecture.md draws them); ``sources`` says where page
data comes from (a page server or a local image); ``doors/`` are the ways restores come
in: native handovers, CRIU's lazy-pages socket, Firecracker's UFFD backend; ``run``
opens the configured doors around one daemon (``uffdd daemon``).
"""
