"""uffdd: serve a restored process's memory on demand over userfaultfd.

The package root only names the version; everything else lives in its room (see
shared/DESIGN.md section 2): ``core`` decides, ``kernel`` talks to the kernel,
``image`` and ``remote`` move page data, ``daemon`` runs the loop.
"""

__version__ = "0.1.0"
