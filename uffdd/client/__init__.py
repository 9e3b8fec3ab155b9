"""The page client: how a daemon asks a page server for image ranges.

Why a package of its own: the daemon needs pages, not transports. ``page_client``
hides the lanes (gRPC streams, and the raw-socket fast lanes when the server offers
them) behind one ``submit``; ``fast_lane`` and ``bulk_receiver`` move bulk data with the
receiver thread; ``demand_lane`` is the connection the demand thread fetches faults on;
``request`` is one request's life. Everything here is shared by any daemon, dialect or
benchmark that fetches pages; the frames themselves are ``uffdd.wire``'s.
"""
