"""Bearer-token access control, as a gRPC server interceptor: servicers never see a token.

    /quiver.v1.Adapters/*      the admin token (--admin-token or QUIVER_ADMIN_TOKEN)
    /quiver.v1.Generation/*    the API token when one is set (--api-token or QUIVER_API_TOKEN),
                               or the admin token; open when no API token is set
    grpc.health.v1, reflection open: load balancers and grpcurl must reach them without secrets

A client sends metadata `authorization: Bearer <token>`. Missing or wrong -> UNAUTHENTICATED, with a
message that says which token the service wants, never what was sent.

Adapters without an admin token: loading and unloading adapters changes what every client gets,
so that surface is never left open to the network by omission. On a loopback bind (the default,
127.0.0.1 / ::1 / localhost) it stays open, as it is on a developer's machine; on any other
address it answers PERMISSION_DENIED until an admin token is configured.

Secrets: tokens are compared in constant time (`hmac.compare_digest` over SHA-256 digests, so
neither content nor length leaks through timing), never logged, never put in a status message,
and kept out of ServerConfig's repr.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc

log = logging.getLogger(__name__)

GENERATION_SERVICE = "quiver.v1.Generation"
ADAPTERS_SERVICE = "quiver.v1.Adapters"
AUTH_HEADER = "authorization"
SCHEME = "bearer"


@dataclass(frozen=True)
class Rule:
    """Who may call one service. No digests and no `closed` message: open to everyone."""

    digests: tuple[bytes, ...] = ()  # SHA-256 of each accepted token
    wanted: str = ""  # names the token in messages ("the admin token (--admin-token)")
    closed: str | None = None  # refuse every call with PERMISSION_DENIED and this message

    @classmethod
    def tokens(cls, tokens: Sequence[str | None], wanted: str) -> "Rule":
        return cls(tuple(_digest(t) for t in tokens if t), wanted)

    @property
    def is_open(self) -> bool:
        return not self.digests and self.closed is None

    def check(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> tuple[grpc.StatusCode, str] | None:
        """None if the call may proceed, else (status, message for the client)."""
        if self.closed is not None:
            return grpc.StatusCode.PERMISSION_DENIED, self.closed
        if not self.digests:
            return None
        presented = bearer_token(metadata)
        if presented is None:
            return (grpc.StatusCode.UNAUTHENTICATED,
                    f"missing bearer token: send metadata 'authorization: Bearer <token>' with {self.wanted}")
        given = _digest(presented)
        # a list, not a generator: every accepted token is compared, whichever matches
        if not any([hmac.compare_digest(given, d) for d in self.digests]):
            return grpc.StatusCode.UNAUTHENTICATED, f"invalid bearer token: this service wants {self.wanted}"
        return None


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    """The token of the first `authorization: Bearer <token>` entry; None if there is none."""
    for key, value in metadata or ():
        if key.lower() != AUTH_HEADER:
            continue
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        scheme, _, token = value.strip().partition(" ")
        return token.strip() if scheme.lower() == SCHEME and token.strip() else None
    return None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: assume it is reachable from elsewhere


def rules_for(host: str, admin_token: str | None, api_token: str | None) -> dict[str, Rule]:
    """service full name -> Rule, as the module docstring lays out."""
    admin = "the admin token (--admin-token / QUIVER_ADMIN_TOKEN)"
    if admin_token:
        adapters = Rule.tokens([admin_token], admin)
    elif is_loopback(host):
        adapters = Rule()
    else:
        adapters = Rule(closed=f"the Adapters service is disabled on {host}: start the server with "
                               "--admin-token (or QUIVER_ADMIN_TOKEN) to manage adapters remotely")
    generation = (Rule.tokens([api_token, admin_token], "the API token (--api-token / QUIVER_API_TOKEN)")
                  if api_token else Rule())
    return {ADAPTERS_SERVICE: adapters, GENERATION_SERVICE: generation}


def service_of(method: str) -> str:
    """'/quiver.v1.Adapters/LoadAdapter' -> 'quiver.v1.Adapters'."""
    return method.lstrip("/").split("/", 1)[0]


class AuthInterceptor(grpc.ServerInterceptor):
    """Applies `rules` (service -> Rule); services without a rule are open.

    on_refused(service, status name): called for every refused call (a metrics counter)."""

    def __init__(self, rules: dict[str, Rule], on_refused: Callable[[str, str], None] | None = None):
        self.rules = {s: r for s, r in rules.items() if not r.is_open}
        self.on_refused = on_refused

    def intercept_service(self, continuation, handler_call_details):
        service = service_of(handler_call_details.method)
        rule = self.rules.get(service)
        denial = rule.check(handler_call_details.invocation_metadata) if rule is not None else None
        handler = continuation(handler_call_details)
        if denial is None or handler is None:
            return handler
        if self.on_refused is not None:
            self.on_refused(service, denial[0].name)
        return refusing(handler, handler_call_details.method, *denial)


def refusing(handler: grpc.RpcMethodHandler, method: str, code: grpc.StatusCode,
             message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape that answers `code` without reading the request (an
    unauthenticated caller's bytes are never parsed)."""

    def refuse(request_or_iterator, context: grpc.ServicerContext):
        log.warning("refused %s from %s: %s", method, context.peer(), code.name)
        context.abort(code, message)

    ser = handler.response_serializer
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse, response_serializer=ser)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse, response_serializer=ser)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse, response_serializer=ser)
    return grpc.unary_unary_rpc_method_handler(refuse, response_serializer=ser)
