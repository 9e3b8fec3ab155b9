"""TLS and mutual TLS settings for the page server and its clients.

Why a small module: both ends read PEM files named on the command line (or by the
daemon's config) and must fail with a ConfigError that names the file, not with a
gRPC error at the first connection.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from uffdd.core.errors import ConfigError


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from exc


@dataclass(frozen=True, slots=True)
class ServerTls:
    """The server's certificate and key; with ``client_ca``, clients must present a
    certificate signed by it (mutual TLS)."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def credentials(self) -> grpc.ServerCredentials:
        key = _read(self.key, "TLS key")
        cert = _read(self.cert, "TLS certificate")
        if self.client_ca is None:
            return grpc.ssl_server_credentials([(key, cert)])
        return grpc.ssl_server_credentials(
            [(key, cert)],
            root_certificates=_read(self.client_ca, "client CA"),
            require_client_auth=True,
        )

    def ssl_context(self) -> ssl.SSLContext:
        """The same settings for an asyncio listener (the page server's fast lane)."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        _load(context.load_cert_chain, self.cert, self.key)
        if self.client_ca is not None:
            _read(self.client_ca, "client CA")  # a missing file fails as ConfigError
            context.load_verify_locations(cafile=str(self.client_ca))
            context.verify_mode = ssl.CERT_REQUIRED
        return context


@dataclass(frozen=True, slots=True)
class ClientTls:
    """How a client checks the server (``ca``; None = system roots) and, for mutual
    TLS, the certificate it presents. ``server_name`` overrides the name checked
    against the server's certificate (e.g. when dialling an IP address)."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.cert is None) != (self.key is None):
            raise ConfigError("a TLS client certificate needs its key, and a key its certificate")
        return grpc.ssl_channel_credentials(
            root_certificates=None if self.ca is None else _read(self.ca, "TLS CA"),
            private_key=None if self.key is None else _read(self.key, "TLS key"),
            certificate_chain=None if self.cert is None else _read(self.cert, "TLS certificate"),
        )

    def ssl_context(self) -> ssl.SSLContext:
        """The same settings for an asyncio connection (the client's fast lane)."""
        if (self.cert is None) != (self.key is None):
            raise ConfigError("a TLS client certificate needs its key, and a key its certificate")
        if self.ca is not None:
            _read(self.ca, "TLS CA")  # a missing file fails as ConfigError
        context = ssl.create_default_context(cafile=None if self.ca is None else str(self.ca))
        if self.cert is not None and self.key is not None:
            _load(context.load_cert_chain, self.cert, self.key)
        return context


def _load(load: Callable[[str, str], None], cert: Path, key: Path) -> None:
    _read(cert, "TLS certificate")
    _read(key, "TLS key")
    try:
        load(str(cert), str(key))
    except ssl.SSLError as exc:
        raise ConfigError(f"cannot use TLS certificate {cert} with key {key}: {exc}") from exc
