"""TLS credentials for the gRPC port (server) and for clients, from PEM files.

    server:  --tls-cert chain.pem --tls-key key.pem [--tls-client-ca clients-ca.pem]
             with a client CA, every client must present a certificate it signed (mTLS)
    client:  --tls-ca server-ca.pem [--tls-cert client.pem --tls-key client-key.pem]
             (no CA file: the system's roots)

Files are read once, at start-up; a missing or non-PEM file is a flag error naming the flag, raised
before the model loads. The /metrics HTTP port is not covered (it carries counters, not prompts or
tokens): bind it where only the scraper reaches it.
"""
from __future__ import annotations

from pathlib import Path

import grpc


def read_pem(path: str | None, flag: str) -> bytes | None:
    """The file's bytes, or ValueError naming `flag` if it is unreadable or not PEM."""
    if not path:
        return None
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"{flag}: cannot read {path}: {e.strerror or e}") from e
    if b"-----BEGIN " not in data:
        raise ValueError(f"{flag}: {path} is not a PEM file (expected '-----BEGIN ...')")
    return data


def server_credentials(cert: str, key: str, client_ca: str | None = None) -> grpc.ServerCredentials:
    chain = read_pem(cert, "--tls-cert")
    private = read_pem(key, "--tls-key")
    roots = read_pem(client_ca, "--tls-client-ca")
    return grpc.ssl_server_credentials([(private, chain)], root_certificates=roots,
                                       require_client_auth=roots is not None)


def channel_credentials(ca: str | None = None, cert: str | None = None,
                        key: str | None = None) -> grpc.ChannelCredentials:
    if bool(cert) != bool(key):
        raise ValueError("--tls-cert and --tls-key (client certificate) go together")
    return grpc.ssl_channel_credentials(root_certificates=read_pem(ca, "--tls-ca"),
                                        private_key=read_pem(key, "--tls-key"),
                                        certificate_chain=read_pem(cert, "--tls-cert"))
