"""`uffdd page-server`: serve snapshot images to any number of daemons.

``server`` binds gRPC and the fast lanes; ``service`` answers the gRPC page service;
``fast_lane`` answers raw-socket connections on the loop and hands bulk ones to the
``bulk_worker`` process and urgent ones to the C answerer (``urgent``); ``catalog``
opens and resolves images, ``chunking`` cuts answers into chunks, ``ratelimit`` paces
bulk. The protocol is ``proto/uffdd/v1/pages.proto`` plus ``uffdd.wire.fast_lane``.
"""
