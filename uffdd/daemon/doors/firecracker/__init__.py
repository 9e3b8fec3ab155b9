"""Firecracker's UFFD memory backend: the socket, the payload, the VM's restore, its image.

``endpoint`` reads Firecracker's one message (regions as JSON and the uffd), ``listener``
checks it and starts the restore, ``restore`` keeps a VM's uffd until the VMM no longer
needs it, ``backing`` says where the snapshot's pages come from, ``doors`` and
``standalone`` are the ways to run it (inside ``uffdd daemon`` or on its own).
"""
