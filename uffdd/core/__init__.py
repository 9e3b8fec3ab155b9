"""The pure core: decisions without IO (no os, socket, asyncio, grpc, cffi imports).

Shells feed events in and execute the actions that come out; everything tricky about
ordering, address translation and completion is decided here and tested without a kernel.
"""
