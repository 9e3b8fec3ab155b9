"""The page service over gRPC: server, client, and proto <-> Python conversion.

``server``/``service``/``catalog`` serve the images of a directory (``uffdd
page-server``, see ``commands``); ``client`` is what the daemon uses to fetch pages;
``chunk_codec`` moves page data without protobuf's copies; ``convert`` keeps both sides
agreeing on the messages; ``tls`` reads certificates. The protocol is documented in
``proto/uffdd/v1/pages.proto``.
"""
