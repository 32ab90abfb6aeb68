"""Access control (hardening issue, part 3): bearer tokens on the Adapters and Generation services
(UNAUTHENTICATED when missing or wrong, compared in constant time, never logged), health and
reflection left open, the Adapters service closed on a network bind without an admin token, TLS
and mTLS with certificates made in the test, and the client / CLI options that go with them.
(LoadAdapter source confinement under --allow-adapter-root: test_hardening_adapters.py.)
"""
from __future__ import annotations

import datetime
import ipaddress
import logging
import secrets

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from runtime.config import ServerConfig
from runtime.server import auth, tls
from runtime.server.client import QuiverClient
from runtime.server.stubs import adapters_pb2 as apb
from runtime.server.stubs import generation_pb2 as gpb
from tests.server.hardening import expect_status, raw_unary, running_server, scrape

ADMIN = "admin-" + secrets.token_hex(16)
API = "api-" + secrets.token_hex(16)
UNAUTH = grpc.StatusCode.UNAUTHENTICATED


# ---- the pure parts -----------------------------------------------------------------------------
@pytest.mark.parametrize("metadata, token", [
    ([("authorization", "Bearer abc")], "abc"),
    ([("authorization", "bearer  abc ")], "abc"),
    ([("x-other", "1"), ("authorization", "Bearer abc")], "abc"),
    ([("authorization", b"Bearer abc")], "abc"),
    ([("authorization", "Basic abc")], None),
    ([("authorization", "Bearer ")], None),
    ([("authorization", "abc")], None),
    ([], None),
    (None, None),
])
def test_bearer_token(metadata, token):
    assert auth.bearer_token(metadata) == token


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("10.0.0.7", False), ("gpu-1.internal", False),
])
def test_is_loopback(host, loopback):
    assert auth.is_loopback(host) is loopback


@pytest.mark.parametrize("host, admin, api, adapters_md, generation_md, expected", [
    # (metadata sent to Adapters, to Generation) -> (Adapters status, Generation status); None = allowed
    ("127.0.0.1", None, None, [], [], (None, None)),
    ("0.0.0.0", None, None, [], [], ("PERMISSION_DENIED", None)),
    ("0.0.0.0", None, None, [("authorization", "Bearer x")], [], ("PERMISSION_DENIED", None)),
    ("0.0.0.0", "A", None, [("authorization", "Bearer A")], [], (None, None)),
    ("127.0.0.1", "A", None, [("authorization", "Bearer B")], [], ("UNAUTHENTICATED", None)),
    ("127.0.0.1", "A", "G", [("authorization", "Bearer G")], [("authorization", "Bearer G")],
     ("UNAUTHENTICATED", None)),
    ("127.0.0.1", "A", "G", [("authorization", "Bearer A")], [("authorization", "Bearer A")], (None, None)),
    ("127.0.0.1", "A", "G", [], [], ("UNAUTHENTICATED", "UNAUTHENTICATED")),
])
def test_rules(host, admin, api, adapters_md, generation_md, expected):
    rules = auth.rules_for(host, admin, api)
    got = tuple(None if d is None else d[0].name for d in (
        rules[auth.ADAPTERS_SERVICE].check(adapters_md), rules[auth.GENERATION_SERVICE].check(generation_md)))
    assert got == expected


def test_config_hides_tokens_and_checks_tls_flags():
    cfg = ServerConfig(admin_token=ADMIN, api_token=API)
    assert ADMIN not in repr(cfg) and API not in repr(cfg)
    assert ServerConfig(admin_token="").admin_token is None  # an empty variable is no token
    with pytest.raises(ValueError, match="--tls-cert and --tls-key go together"):
        ServerConfig(tls_cert="c.pem")
    with pytest.raises(ValueError, match="--tls-client-ca"):
        ServerConfig(tls_client_ca="ca.pem")
    with pytest.raises(ValueError, match="--tls-cert: cannot read /nonexistent.pem"):
        tls.server_credentials("/nonexistent.pem", "/nonexistent-key.pem")


# ---- tokens on a live server --------------------------------------------------------------------
@pytest.fixture(scope="module")
def token_server(tiny_model_dir, adapter_dir):
    with running_server(tiny_model_dir, adapter_dir=str(adapter_dir), preload=["lora-qv"],
                        admin_token=ADMIN, api_token=API) as srv:
        yield srv


def _bearer(token):
    return [("authorization", f"Bearer {token}")] if token else None


LIST = ("/quiver.v1.Adapters/ListAdapters", apb.ListAdaptersRequest())
UNLOAD = ("/quiver.v1.Adapters/UnloadAdapter", apb.UnloadAdapterRequest(adapter_id="nope"))
GENERATE = ("/quiver.v1.Generation/Generate", gpb.GenerateRequest(text="w5", params=gpb.GenerationParameters(max_new_tokens=1)))
INFO = ("/quiver.v1.Generation/ModelInfo", gpb.ModelInfoRequest())


@pytest.mark.parametrize("call, token, code, needle", [
    (LIST, None, UNAUTH, "missing bearer token"),
    (LIST, "wrong", UNAUTH, "invalid bearer token: this service wants the admin token"),
    (LIST, API, UNAUTH, "invalid bearer token"),  # the API token is not an admin token
    (LIST, ADMIN, grpc.StatusCode.OK, ""),
    (UNLOAD, API, UNAUTH, "admin token"),
    (UNLOAD, ADMIN, grpc.StatusCode.NOT_FOUND, "not loaded"),  # past auth: the servicer answers
    (GENERATE, None, UNAUTH, "missing bearer token"),
    (GENERATE, ADMIN[:-1], UNAUTH, "invalid bearer token: this service wants the API token"),
    (GENERATE, API + "x", UNAUTH, "invalid bearer token"),
    (GENERATE, API, grpc.StatusCode.OK, ""),
    (GENERATE, ADMIN, grpc.StatusCode.OK, ""),  # the admin token opens everything
    (INFO, None, UNAUTH, "missing bearer token"),
])
def test_tokens(token_server, call, token, code, needle):
    method, request = call
    with grpc.insecure_channel(token_server.address) as ch:
        got, details = raw_unary(ch, method, request.SerializeToString(), metadata=_bearer(token))
    assert (got, needle in details) == (code, True), details
    assert ADMIN not in details and API not in details


def test_wrong_scheme_stream_and_garbage_are_unauthenticated(token_server):
    addr = token_server.address
    with grpc.insecure_channel(addr) as ch:
        # the request bytes of an unauthenticated caller are never parsed
        code, _ = raw_unary(ch, "/quiver.v1.Adapters/LoadAdapter", b"\xff\xff\xff", metadata=_bearer(None))
        assert code == UNAUTH
        code, _ = raw_unary(ch, GENERATE[0], GENERATE[1].SerializeToString(),
                            metadata=[("authorization", f"Basic {API}")])
        assert code == UNAUTH
    with QuiverClient(addr, timeout=30) as q:
        expect_status(lambda: list(q.generate_stream("w5", max_new_tokens=2)), UNAUTH, "missing bearer token")
    with QuiverClient(addr, timeout=30, token=API) as q:
        assert len(list(q.generate_stream("w5", max_new_tokens=2, ignore_eos=True))) >= 1
        assert q.generation.Generate.future(q.request("w5", max_new_tokens=1)).result().generated_token_count == 1


def test_health_and_reflection_stay_open(token_server):
    with grpc.insecure_channel(token_server.address) as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="quiver.v1.Adapters"),
                                                      timeout=10)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        assert "quiver.v1.Adapters" in set(ProtoReflectionDescriptorDatabase(ch).get_services())


def test_refusals_are_counted(token_server):
    def refused():
        return scrape(token_server.metrics_port).get(
            ("quiver_auth_refusals_total", (("code", "UNAUTHENTICATED"), ("service", "quiver.v1.Adapters"))), 0.0)

    before = refused()
    with QuiverClient(token_server.address, timeout=30, token="nope") as q:
        for _ in range(3):
            expect_status(q.list_adapters, UNAUTH, "invalid bearer token")
    assert refused() == before + 3


def test_cli_token_option_and_env(token_server, capsys, monkeypatch):
    from runtime.cli import main

    monkeypatch.delenv("QUIVER_TOKEN", raising=False)
    assert main(["adapters", "list", "--server", token_server.address]) == 2
    err = capsys.readouterr().err
    assert "UNAUTHENTICATED: missing bearer token" in err
    assert main(["adapters", "list", "--server", token_server.address, "--token", ADMIN, "--json"]) == 0
    assert "lora-qv" in capsys.readouterr().out
    monkeypatch.setenv("QUIVER_TOKEN", API)
    assert main(["generate", "--server", token_server.address, "--max-new-tokens", "2", "w5"]) == 0
    assert main(["adapters", "list", "--server", token_server.address]) == 2  # API token: not admin
    out = capsys.readouterr()
    assert "invalid bearer token" in out.err and API not in out.err + out.out


def test_tokens_never_logged(tiny_model_dir, caplog, capfd):
    """Start a server with tokens, get refused, succeed, fail with bad parameters: no log record,
    no printed line and no status message carries a token, at any log level."""
    admin, api, wrong = (f"{k}-{secrets.token_hex(12)}" for k in ("admin", "api", "wrong"))
    caplog.set_level(logging.DEBUG)
    details = []
    with running_server(tiny_model_dir, admin_token=admin, api_token=api) as srv:
        for token in (None, wrong, api, admin):
            with QuiverClient(srv.address, timeout=30, token=token) as q:
                for call in (q.list_adapters, lambda: q.generate("w5", max_new_tokens=0),
                             lambda: q.generate("w5", max_new_tokens=1), lambda: q.load_adapter("../x")):
                    try:
                        call()
                    except grpc.RpcError as e:
                        details.append(e.details() or "")
        logged = caplog.text + repr(srv.cfg)
    printed = "".join(capfd.readouterr())
    assert any("invalid bearer token" in d for d in details) and any("max_new_tokens" in d for d in details)
    assert "refused /quiver.v1.Adapters/ListAdapters" in caplog.text  # refusals are logged, tokens not
    for secret in (admin, api, wrong):
        assert secret not in logged and secret not in printed and not any(secret in d for d in details)


def test_adapters_closed_on_a_network_bind_without_admin_token(tiny_model_dir, caplog):
    caplog.set_level(logging.WARNING)
    with running_server(tiny_model_dir, host="0.0.0.0", metrics_port=None) as srv:
        with QuiverClient(f"127.0.0.1:{srv.port}", timeout=30) as q:
            expect_status(q.list_adapters, grpc.StatusCode.PERMISSION_DENIED, "start the server with --admin-token")
            assert q.generate("w5", max_new_tokens=1).generated_token_count == 1  # Generation stays open
    assert "serving plaintext on 0.0.0.0" in caplog.text


# ---- TLS and mTLS -------------------------------------------------------------------------------
def _key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _cert(subject_key, name: str, issuer=None, ca: bool = False, server: bool = False):
    """A certificate for `subject_key`; self-signed when issuer is None, else (issuer cert, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_cert, issuer_key = issuer or (None, subject_key)
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(subject)
         .issuer_name(issuer_cert.subject if issuer_cert else subject)
         .public_key(subject_key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        b = b.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _write(path, cert=None, key=None):
    from cryptography.hazmat.primitives import serialization

    if cert is not None:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    else:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """PEM files: a server CA and server cert, a client CA with one client, a stranger CA with one."""
    pytest.importorskip("cryptography")
    d = tmp_path_factory.mktemp("pki")
    files = {}
    for ca_name in ("server-ca", "client-ca", "stranger-ca"):
        ca_key = _key()
        ca_cert = _cert(ca_key, ca_name, ca=True)
        files[ca_name] = _write(d / f"{ca_name}.pem", cert=ca_cert)
        leaf = {"server-ca": "server", "client-ca": "client", "stranger-ca": "stranger"}[ca_name]
        leaf_key = _key()
        files[leaf] = _write(d / f"{leaf}.pem", cert=_cert(leaf_key, leaf, (ca_cert, ca_key), server=leaf == "server"))
        files[f"{leaf}-key"] = _write(d / f"{leaf}-key.pem", key=leaf_key)
    return files


@pytest.fixture(scope="module")
def tls_server(tiny_model_dir, pki):
    with running_server(tiny_model_dir, tls_cert=pki["server"], tls_key=pki["server-key"],
                        admin_token=ADMIN, metrics_port=None) as srv:
        yield srv


@pytest.fixture(scope="module")
def mtls_server(tiny_model_dir, pki):
    with running_server(tiny_model_dir, tls_cert=pki["server"], tls_key=pki["server-key"],
                        tls_client_ca=pki["client-ca"], metrics_port=None) as srv:
        yield srv


def _connects(address: str, **client_kw) -> grpc.StatusCode:
    with QuiverClient(address, timeout=15, **client_kw) as q:
        try:
            q.model_info()
            return grpc.StatusCode.OK
        except grpc.RpcError as e:
            return e.code()


def test_tls(tls_server, pki):
    addr = tls_server.address
    assert _connects(addr, tls_ca=pki["server-ca"]) == grpc.StatusCode.OK
    assert _connects(addr) == grpc.StatusCode.UNAVAILABLE  # plaintext client
    assert _connects(addr, tls_ca=pki["stranger-ca"]) == grpc.StatusCode.UNAVAILABLE  # untrusted server
    with QuiverClient(addr, timeout=15, tls_ca=pki["server-ca"], token=ADMIN) as q:
        assert q.list_adapters() == []
    with QuiverClient(addr, timeout=15, tls_ca=pki["server-ca"]) as q:
        expect_status(q.list_adapters, UNAUTH, "missing bearer token")  # TLS is not a token


def test_mtls(mtls_server, pki):
    addr = mtls_server.address
    assert _connects(addr, tls_ca=pki["server-ca"]) == grpc.StatusCode.UNAVAILABLE  # no client cert
    assert _connects(addr, tls_ca=pki["server-ca"], tls_cert=pki["stranger"],
                     tls_key=pki["stranger-key"]) == grpc.StatusCode.UNAVAILABLE  # not signed by the client CA
    assert _connects(addr, tls_ca=pki["server-ca"], tls_cert=pki["client"],
                     tls_key=pki["client-key"]) == grpc.StatusCode.OK
    assert _connects(addr) == grpc.StatusCode.UNAVAILABLE


def test_cli_over_tls(tls_server, pki, capsys):
    from runtime.cli import main

    args = ["--server", tls_server.address, "--tls-ca", pki["server-ca"]]
    assert main(["adapters", "list", *args, "--token", ADMIN]) == 0
    assert main(["generate", *args, "--max-new-tokens", "2", "--json", "w5"]) == 0
    assert '"stop_reason"' in capsys.readouterr().out


def test_serve_flags(monkeypatch):
    """`quiver serve` flags map onto the config; a token comes from the environment unless a flag
    gives one, and an empty variable is no token."""
    from runtime.cli import build_parser
    from runtime.server.serve_cli import config_from_args

    def cfg(*argv):
        return config_from_args(build_parser().parse_args(["serve", *argv]))

    monkeypatch.setenv("QUIVER_ADMIN_TOKEN", ADMIN)
    monkeypatch.setenv("QUIVER_API_TOKEN", "")
    c = cfg("--max-message-bytes", "1024", "--max-input-chars", "99")
    assert (c.admin_token, c.api_token, c.max_message_bytes, c.max_input_chars) == (ADMIN, None, 1024, 99)
    assert cfg("--admin-token", "from-flag", "--api-token", API).admin_token == "from-flag"
    assert cfg("--tls-cert", "c.pem", "--tls-key", "k.pem", "--tls-client-ca", "ca.pem").tls_client_ca == "ca.pem"
    with pytest.raises(ValueError, match="--max-message-bytes must be >= 1"):
        cfg("--max-message-bytes", "0")
