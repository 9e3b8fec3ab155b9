"""uffdd's own handover: ``listener`` speaks the socket protocol, ``door`` serves it."""
