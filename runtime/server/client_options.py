"""The flags that say how to reach a server: `quiver generate --server` and `quiver adapters`.

Kept apart from client.py so that building the command line imports no gRPC.
"""
from __future__ import annotations

import argparse


def add_connection_options(p: argparse.ArgumentParser) -> None:
    """--token / --tls / --tls-ca / --tls-cert / --tls-key. No default is shown in --help (the
    environment's token is a secret); client.client_from_args reads QUIVER_TOKEN at run time."""
    g = p.add_argument_group("connection (with --server)")
    g.add_argument("--token", default=None,
                   help="bearer token sent with every call (default: env QUIVER_TOKEN)")
    g.add_argument("--tls", action="store_true", help="connect with TLS, trusting the system's roots")
    g.add_argument("--tls-ca", default=None, metavar="PEM",
                   help="CA that signed the server's certificate (implies --tls)")
    g.add_argument("--tls-cert", default=None, metavar="PEM", help="client certificate (mTLS)")
    g.add_argument("--tls-key", default=None, metavar="PEM", help="client private key (mTLS)")
