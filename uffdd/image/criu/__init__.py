"""CRIU's images read as uffdd images: the image codec, a dump's layout, a catalog.

Why under ``image``: a CRIU dump is one more kind of snapshot image; the page server and
the CRIU door serve it through the same ``ImageReader`` interface as uffdd's own.
"""
