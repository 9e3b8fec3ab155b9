"""What crosses a socket, shared by both ends: frames, codecs, conversions, TLS.

Why one place: the page server and its clients (and the restorer and the daemon) must
agree byte for byte; each format lives here once (``fast_lane``: the raw-socket lanes'
frames; ``chunk_codec``: page chunks without protobuf's copies; ``convert``: protobuf
to Python values; ``handover``: the native handover messages; ``tls``: certificates).
"""
