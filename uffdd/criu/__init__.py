"""CRIU's dialect: stand in for ``criu lazy-pages`` and serve CRIU images directories.

images (the image codec), reader (a task's memory as an ImageReader), catalog (a CRIU
dir on the page server), lazy_pages (the handover protocol), commands (the CLI).
"""
