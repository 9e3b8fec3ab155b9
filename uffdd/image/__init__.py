"""Snapshot images: the format, writing, reading, a store of images, and dumps.

An image is a directory (``manifest.pb`` + ``pages.bin``, see ``format.py`` and
``proto/uffdd/v1/image.proto``); ``writer.py`` makes one atomically, ``reader.py``
serves it zero-copy with lazily verified checksums, ``store.py`` names images by id,
``procmem.py`` + ``dump.py`` capture a live process, ``raw.py`` makes one of a raw
memory file, ``summary.py`` describes one, ``criu/`` reads CRIU dumps.
"""
