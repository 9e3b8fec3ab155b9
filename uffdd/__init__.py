"""uffdd: serve a restored process's memory on demand over userfaultfd.

The package root only names the version; everything else lives in its room, drawn in
docs/architecture.md: ``core`` decides, ``native`` and ``kernel`` talk to the kernel,
``image``, ``wire`` and ``client`` move page data, ``daemon`` and ``pageserver`` are
the two programs, ``cli`` is every command.
"""

__version__ = "0.1.0"
