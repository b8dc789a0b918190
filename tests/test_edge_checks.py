"""The edge's pure parts: the auth-request checks (with hypothesis), revocation files, settings, nginx's config."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imageprov.edge import checks
from imageprov.edge.checks import Reason, Refused
from imageprov.edge.config import Flags, Secret, ServeSettings
from imageprov.edge.nginx import EdgeConfig, render_nginx
from imageprov.edge.revocation import DenylistSource, normalize_serial
from imageprov.errors import UsageError
from tests.edge_support import FleetCA, auth_body, escaped, public_pem, sign

EC_KEY = ec.generate_private_key(ec.SECP256R1())
RSA_KEY = rsa.generate_private_key(65537, 2048)
ED_KEY = ed25519.Ed25519PrivateKey.generate()
CA = FleetCA()
NOW = dt.datetime.now(dt.UTC)


def _reason(call: Any) -> Reason:
    """Why ``call`` refused; every refusal carries a message for the device's ``{"error": ...}``."""
    with pytest.raises(Refused) as caught:
        call()
    assert isinstance(caught.value.message, str) and caught.value.message == str(caught.value) != ""
    return caught.value.reason


identities = st.dictionaries(
    st.text(min_size=1, max_size=10), st.text(max_size=20) | st.integers() | st.booleans(), min_size=1, max_size=5
)


@settings(max_examples=100, deadline=None)
@given(identity=identities, tenant=st.none() | st.text(max_size=30), key_index=st.sampled_from([0, 1, 2]))
def test_any_well_formed_request_parses_and_verifies(identity: dict[str, Any], tenant: str | None,
                                                     key_index: int) -> None:  # fmt: skip
    key = (EC_KEY, RSA_KEY, ED_KEY)[key_index]
    body = auth_body(identity, public_pem(key), tenant)
    request = checks.parse_auth_request(body)
    assert request.identity == identity and request.tenant_token == tenant
    assert request.pubkey == key.public_key()
    checks.verify_signature(request.pubkey, body, sign(key, body))


@settings(max_examples=200, deadline=None)
@given(identity=identities, flip=st.integers(min_value=0))
def test_any_change_to_the_signed_body_is_refused(identity: dict[str, Any], flip: int) -> None:
    body = auth_body(identity, public_pem(EC_KEY))
    signature = sign(EC_KEY, body)
    position = flip % len(body)
    altered = body[:position] + bytes([body[position] ^ 0x01]) + body[position + 1 :]
    assert _reason(lambda: checks.verify_signature(EC_KEY.public_key(), altered, signature)) is Reason.BAD_SIGNATURE


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_garbage_is_a_bad_request_never_a_crash(body: bytes) -> None:
    try:
        checks.parse_auth_request(body)
    except Refused as refused:
        assert refused.reason is Reason.BAD_REQUEST and refused.status == 400 and refused.message


@pytest.mark.parametrize(
    "value",
    [
        [], "x", {"pubkey": "p"}, {"id_data": "{}"}, {"id_data": 1, "pubkey": "p"},
        {"id_data": "{\"a\": 1}", "pubkey": 5}, {"id_data": "{\"a\": 1}", "pubkey": "junk"},
        {"id_data": "[]", "pubkey": "p"}, {"id_data": "{}", "pubkey": "p"},
        {"id_data": "{\"a\": 1}", "pubkey": public_pem(EC_KEY), "tenant_token": 3},
        {"id_data": "{\"a\": 1}", "pubkey": public_pem(ec.generate_private_key(ec.SECP256K1()))},
    ],
)  # fmt: skip
def test_schema_violations_are_refused(value: Any) -> None:
    assert _reason(lambda: checks.parse_auth_request(json.dumps(value).encode())) is Reason.BAD_REQUEST


def test_each_signature_kind_checks_its_own_way() -> None:
    body = auth_body({"mac": "x"}, public_pem(RSA_KEY))
    others = (ec.generate_private_key(ec.SECP256R1()), rsa.generate_private_key(65537, 2048),
              ed25519.Ed25519PrivateKey.generate())  # fmt: skip
    for key, other in zip((EC_KEY, RSA_KEY, ED_KEY), others):
        checks.verify_signature(key.public_key(), body, sign(key, body))
        # A signature by another key of the same kind does not pass.
        refused = _reason(lambda k=key, o=other: checks.verify_signature(k.public_key(), body, sign(o, body)))
        assert refused is Reason.BAD_SIGNATURE
    assert _reason(lambda: checks.verify_signature(RSA_KEY.public_key(), body, sign(EC_KEY, body))) is (
        Reason.BAD_SIGNATURE
    )
    assert _reason(lambda: checks.verify_signature(EC_KEY.public_key(), body, None)) is Reason.BAD_SIGNATURE


def test_certificate_checks() -> None:
    good, key = CA.issue("d-1")
    checks.check_certificate(good, CA.cert, NOW)
    assert _reason(lambda: checks.check_certificate(FleetCA().issue("d-1")[0], CA.cert, NOW)) is Reason.UNTRUSTED
    assert _reason(lambda: checks.check_certificate(good, CA.cert, NOW + dt.timedelta(days=400))) is Reason.EXPIRED
    early = NOW - dt.timedelta(days=3)
    assert _reason(lambda: checks.check_certificate(good, CA.cert, early)) is Reason.NOT_YET_VALID
    server_only = CA.issue("d-1", client_auth=False)[0]
    assert _reason(lambda: checks.check_certificate(server_only, CA.cert, NOW)) is Reason.NO_CLIENT_AUTH
    request = checks.parse_auth_request(auth_body({"a": 1}, public_pem(key)))
    checks.check_key_matches(good, request)
    other = checks.parse_auth_request(auth_body({"a": 1}, public_pem(EC_KEY)))
    assert _reason(lambda: checks.check_key_matches(good, other)) is Reason.KEY_MISMATCH


def test_client_cert_header() -> None:
    cert, _ = CA.issue("d-2")
    assert checks.parse_client_cert(escaped(cert)) == cert
    assert _reason(lambda: checks.parse_client_cert(None)) is Reason.NO_CERTIFICATE
    assert _reason(lambda: checks.parse_client_cert("-----BEGIN%20junk")) is Reason.BAD_CERTIFICATE
    assert checks.serial_hex(cert) == f"{cert.serial_number:x}" and checks.common_name(cert) == "d-2"


def test_cache_key_is_identity_and_key() -> None:
    a = checks.parse_auth_request(auth_body({"a": 1, "b": 2}, public_pem(EC_KEY)))
    same = checks.parse_auth_request(json.dumps({"id_data": '{"b": 2, "a": 1}', "pubkey": public_pem(EC_KEY)}).encode())
    other_key = checks.parse_auth_request(auth_body({"a": 1, "b": 2}, public_pem(ED_KEY)))
    assert a.cache_key == same.cache_key != other_key.cache_key
    assert a.identity_hash == same.identity_hash and len(a.identity_hash) == 16


@pytest.mark.parametrize(("text", "serial"), [("0A:1B", "a1b"), ("0x00ff", "ff"), ("abc", "abc"), ("0", "0")])
def test_serials_are_normalized(text: str, serial: str) -> None:
    assert normalize_serial(text) == serial


async def _revoked(source: DenylistSource, serial: str) -> bool:
    return await source.revoked(serial)


def test_denylist_is_reread_when_it_changes(tmp_path: Path) -> None:
    import asyncio
    import os

    path = tmp_path / "denylist"
    path.write_text("# comment\n0A1B  # a device\n\n")
    source = DenylistSource(path)
    assert asyncio.run(_revoked(source, "a1b")) and not asyncio.run(_revoked(source, "ff"))
    path.write_text("ff\n")
    os.utime(path, ns=(1, 1))  # a different mtime even within the clock's granularity
    assert asyncio.run(_revoked(source, "ff")) and not asyncio.run(_revoked(source, "a1b"))
    path.write_text("zz\n")
    with pytest.raises(UsageError, match="not a hex serial"):
        DenylistSource(path)


def _flags(**given: Any) -> Flags:
    """Flags for the tests of secrets and sources of settings: no revocation source, no identity rule to satisfy."""
    return Flags(**{"no_revocation": True, "identity": "none", **given})


def test_secret_never_shows(tmp_path: Path) -> None:
    secret = Secret("hunter2")
    assert "hunter2" not in repr(secret) and "hunter2" not in str(secret) and secret.reveal() == "hunter2"
    ca = tmp_path / "ca.pem"
    ca.write_bytes(CA.cert_pem())
    password = tmp_path / "pw"
    password.write_text("hunter2\n")
    loaded = ServeSettings.from_sources(_flags(ca=ca, upstream="http://m/", username="u", password_file=password), {})
    assert "hunter2" not in repr(loaded) and loaded.upstream == "http://m"


def test_flags_win_over_the_environment(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(CA.cert_pem())
    env = {"UPSTREAM_SERVER_URL": "http://env", "MTLS_CA_CERTIFICATE": str(ca), "MTLS_MENDER_USERNAME": "env-user",
           "MTLS_MENDER_PASSWORD": "env-pass"}  # fmt: skip
    from_env = ServeSettings.from_sources(_flags(), env)
    assert (from_env.upstream, from_env.credentials.username) == ("http://env", "env-user")  # type: ignore[union-attr]
    ambassador = {"MTLS_MENDER_BACKEND": "http://amb", "MTLS_CA_CERTIFICATE": str(ca), "MTLS_MENDER_USER": "a",
                  "MTLS_MENDER_PASS": "p"}  # fmt: skip
    from_ambassador = ServeSettings.from_sources(_flags(), ambassador)
    assert (from_ambassador.upstream, from_ambassador.credentials.username) == ("http://amb", "a")  # type: ignore[union-attr]
    token = tmp_path / "token"
    token.write_text("pat")
    with pytest.raises(UsageError, match="not both"):
        ServeSettings.from_sources(_flags(token_file=token, username="u"), env)
    flagged = ServeSettings.from_sources(
        _flags(upstream="http://flag", token_file=token), {**env, "MTLS_MENDER_USERNAME": ""}
    )
    assert flagged.upstream == "http://flag" and flagged.credentials.token.reveal() == "pat"  # type: ignore[union-attr]


def _edge_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    ca, cert, key = tmp_path / "ca.pem", tmp_path / "server.pem", tmp_path / "server.key"
    for path in (ca, cert, key):
        path.write_text("x")
    return ca, cert, key


def test_nginx_routes_auth_requests_to_the_service(tmp_path: Path) -> None:
    ca, cert, key = _edge_files(tmp_path)
    text = render_nginx(EdgeConfig(ca, cert, key, "https://hosted.mender.io", accept="http://127.0.0.1:9080"))
    auth = text.split("location = /api/devices/v1/authentication/auth_requests {", 1)[1].split("}", 1)[0]
    rest = text.split("location / {", 1)[1]
    assert "proxy_pass http://imageprov_accept;" in auth and "server 127.0.0.1:9080;" in text
    assert "proxy_set_header X-SSL-Client-Cert $ssl_client_escaped_cert;" in auth
    assert 'proxy_set_header X-SSL-Client-Cert "";' in rest
    # A name is resolved per request: through a variable holding the server's URL.
    assert 'set $imageprov_mender "https://hosted.mender.io";' in rest and "proxy_pass $imageprov_mender;" in rest
    plain = render_nginx(EdgeConfig(ca, cert, key, "https://hosted.mender.io"))
    assert "imageprov_accept" not in plain and "auth_requests" not in plain


@pytest.mark.parametrize(
    "accept", ["https://127.0.0.1:9080", "http://127.0.0.1:9080/x", "127.0.0.1:9080", "http://a b"]
)
def test_nginx_refuses_a_bad_accept_url(tmp_path: Path, accept: str) -> None:
    ca, cert, key = _edge_files(tmp_path)
    with pytest.raises(UsageError):
        render_nginx(EdgeConfig(ca, cert, key, "https://hosted.mender.io", accept=accept))


def _crl(ca: FleetCA, serials: list[int], next_update: dt.datetime) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    builder = x509.CertificateRevocationListBuilder().issuer_name(ca.name)
    builder = builder.last_update(NOW - dt.timedelta(days=2)).next_update(next_update)
    for serial in serials:
        entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(NOW - dt.timedelta(days=1))
        builder = builder.add_revoked_certificate(entry.build())
    return builder.sign(ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def test_crl_source(tmp_path: Path) -> None:
    import asyncio

    from imageprov.edge.revocation import CrlSource
    from imageprov.errors import PkiError

    cert, _ = CA.issue("d-crl")
    path = tmp_path / "crl.pem"
    path.write_bytes(_crl(CA, [cert.serial_number], NOW + dt.timedelta(days=1)))
    source = CrlSource(path, CA.cert)
    assert asyncio.run(source.revoked(f"{cert.serial_number:x}")) and not asyncio.run(source.revoked("ff"))
    # Past its nextUpdate it cannot say: the service answers 503 rather than guess.
    path.write_bytes(_crl(CA, [], NOW - dt.timedelta(hours=1)))
    with pytest.raises(PkiError, match="nextUpdate"):
        asyncio.run(source.revoked("ff"))
    path.write_bytes(_crl(FleetCA(), [], NOW + dt.timedelta(days=1)))
    with pytest.raises(PkiError, match="not signed by the fleet CA"):
        CrlSource(path, CA.cert)
