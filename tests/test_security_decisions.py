"""The edge's and the PKI's security decisions, each on both sides of its line (issue 20 item 3, issue 21).

Every test here was seen to fail with a hand-made mutation of the decision it
guards (a boundary moved, a check dropped, a fallback to "allow"); the mutation
is named in the test's docstring or comment. The edge's checks (edge/checks.py)
and the chain checks of ``verify`` and ``ca import`` (pki/chain.py) must agree:
where both are asked, both are asserted.
"""

from __future__ import annotations

import datetime as dt
import json
import mmap
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa, x448, x25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

from imageprov.disk.blockdev import (
    BlockDevice,
    TargetError,
    check_target,
    flush_buffers,
    open_exclusive,
    removable_disks,
)
from imageprov.edge import checks
from imageprov.edge.checks import Reason, Refused
from imageprov.errors import PkiError
from imageprov.pki import chain
from imageprov.pki.ca import check_pair
from tests.conftest import tool
from tests.edge_support import FleetCA, auth_body, public_pem, sign
from tests.flashdev import Loops, loop_devices, read_span, stale_file, unavailable

CA = FleetCA()
T0 = dt.datetime(2030, 1, 1, 12, 0, 0, tzinfo=dt.UTC)
T1 = dt.datetime(2031, 1, 1, 12, 0, 0, tzinfo=dt.UTC)
SECOND = dt.timedelta(seconds=1)
NOW = dt.datetime.now(dt.UTC)
EC_KEY = ec.generate_private_key(ec.SECP256R1())


def _reason(call: Callable[[], object]) -> Reason:
    """Why ``call`` refused; every refusal carries a message for the device's ``{"error": ...}``."""
    with pytest.raises(Refused) as caught:
        call()
    assert isinstance(caught.value.message, str) and caught.value.message == str(caught.value) != ""
    return caught.value.reason


def _usage(**allowed: bool) -> x509.KeyUsage:
    names = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment", "key_agreement",
             "key_cert_sign", "crl_sign", "encipher_only", "decipher_only")  # fmt: skip
    return x509.KeyUsage(**{name: allowed.get(name, False) for name in names})


Extensions = list[tuple[x509.ExtensionType, bool]]
CLIENT_EKU: Extensions = [(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)]
# An extension no verifier knows, and one cryptography parses but the edge does not process.
UNKNOWN = x509.UnrecognizedExtension(ObjectIdentifier("1.3.6.1.4.1.55555.1"), b"\x05\x00")
POLICIES = x509.CertificatePolicies([x509.PolicyInformation(ObjectIdentifier("1.3.6.1.4.1.55555.2"), None)])


def _leaf(
    extensions: Extensions = CLIENT_EKU,
    *,
    ca: FleetCA = CA,
    key: Any = EC_KEY,
    subject: x509.Name | None = None,
    start: dt.datetime = NOW - dt.timedelta(days=1),
    end: dt.datetime = NOW + dt.timedelta(days=30),
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject if subject is not None else x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "d-1")]))
        .issuer_name(ca.name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
    )  # fmt: skip
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(ca.key, hashes.SHA256())


def _ca(extensions: Extensions, *, start: dt.datetime = NOW - dt.timedelta(days=1),
        end: dt.datetime = NOW + dt.timedelta(days=365)) -> FleetCA:  # fmt: skip
    """A FleetCA whose certificate has exactly ``extensions`` and the validity given."""
    ca = FleetCA("Odd CA")
    builder = (
        x509.CertificateBuilder().subject_name(ca.name).issuer_name(ca.name).public_key(ca.key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
    )  # fmt: skip
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    ca.cert = builder.sign(ca.key, hashes.SHA256())
    return ca


CA_BASIC = (x509.BasicConstraints(ca=True, path_length=0), True)


# -- validity: both ends included, one second outside refused ------------------------------------------------------


def test_leaf_validity_boundaries_at_the_edge() -> None:
    """Kills: accepting up to 30 days past notAfter, or a day before notBefore (and < / > turned to <= / >=)."""
    cert = _leaf(start=T0, end=T1)
    checks.check_validity_and_usage(cert, T0)
    checks.check_validity_and_usage(cert, T1)
    checks.check_certificate(cert, CA.cert, T0)
    assert _reason(lambda: checks.check_validity_and_usage(cert, T0 - SECOND)) is Reason.NOT_YET_VALID
    assert _reason(lambda: checks.check_validity_and_usage(cert, T1 + SECOND)) is Reason.EXPIRED
    assert _reason(lambda: checks.check_certificate(cert, CA.cert, T1 + SECOND)) is Reason.EXPIRED


def test_ca_validity_boundaries_in_the_chain_checks() -> None:
    """``verify`` (chain.leaf_problems) refuses an expired or not yet valid CA, at the same lines as OpenSSL."""
    ca = _ca([CA_BASIC], start=T0, end=T1)
    leaf = _leaf(ca=ca, start=T0, end=T1)
    assert chain.leaf_problems(leaf, ca.cert, now=T0) == []
    assert chain.leaf_problems(leaf, ca.cert, now=T1) == []
    for moment in (T0 - SECOND, T1 + SECOND, T1 + dt.timedelta(days=400)):
        problems = chain.leaf_problems(leaf, ca.cert, now=moment)
        assert len(problems) == 1 and "the CA certificate is valid only 2030-01-01 to 2031-01-01" in problems[0]


def test_an_expired_ca_is_refused_by_the_chain_checks_with_the_current_time() -> None:
    expired = _ca([CA_BASIC], start=NOW - dt.timedelta(days=400), end=NOW - dt.timedelta(days=35))
    leaf = _leaf(ca=expired)
    assert any("the CA certificate is valid only" in p for p in chain.leaf_problems(leaf, expired.cert))
    assert chain.leaf_problems(_leaf(), CA.cert) == []


# -- the auth request -----------------------------------------------------------------------------------------------


def _body(**fields: Any) -> bytes:
    return json.dumps({"id_data": '{"mac": "02:00:00:00:00:01"}', "pubkey": public_pem(EC_KEY), **fields}).encode()


def test_the_control_request_parses() -> None:
    """The requests below differ from this one only in what each test names."""
    request = checks.parse_auth_request(_body())
    assert request.identity == {"mac": "02:00:00:00:00:01"} and request.pubkey == EC_KEY.public_key()


def test_an_empty_identity_is_refused_with_a_valid_key() -> None:
    """Kills: dropping ``or not identity`` (the old test paired ``{}`` with a pubkey refused anyway)."""
    with pytest.raises(Refused) as refused:
        checks.parse_auth_request(_body(id_data="{}"))
    assert refused.value.reason is Reason.BAD_REQUEST and refused.value.status == 400 and refused.value.message
    assert "non-empty" in refused.value.message


HOSTILE_ID_DATA = {
    "not JSON": "{mac",
    "a 5000-digit integer": '{"n": ' + "1" * 5000 + "}",
    "a 400-digit integer (no float64)": '{"n": ' + "9" * 400 + "}",
    "20000 nested [": '{"a": ' + "[" * 20000 + "]" * 20000 + "}",
    "a lone surrogate": '{"\\ud800": "x"}',
    "a lone surrogate value": '{"mac": "\\udfff"}',
    "NaN": '{"n": NaN}',
    "Infinity": '{"n": -Infinity}',
    "a float overflow": '{"n": 1e400}',
    "a repeated name": '{"mac": "a", "mac": "b"}',
    "an array": '["mac"]',
    "null": "null",
}


@pytest.mark.parametrize("id_data", list(HOSTILE_ID_DATA.values()), ids=list(HOSTILE_ID_DATA))
def test_hostile_id_data_is_a_bad_request_never_a_crash(id_data: str) -> None:
    """Kills: catching only JSONDecodeError (ValueError and RecursionError escape as 500s)."""
    with pytest.raises(Refused) as refused:
        checks.parse_auth_request(_body(id_data=id_data))
    assert refused.value.reason is Reason.BAD_REQUEST and refused.value.status == 400 and refused.value.message


PEM = json.dumps(public_pem(EC_KEY))
HEAD = '{"id_data": "{\\"a\\": 1}", "pubkey": '


def _with(tail: str, *, pubkey: str = PEM) -> bytes:
    """A good body with ``tail`` added to its object (surrogates kept as they are, which UTF-8 has no room for)."""
    return (HEAD + pubkey + tail + "}").encode("utf-8", "surrogatepass")


def test_the_control_body_parses() -> None:
    assert checks.parse_auth_request(_with("")).identity == {"a": 1}
    assert checks.parse_auth_request(_with(', "x": "\\ud83d\\ude00"')).identity == {"a": 1}  # a pair is fine


HOSTILE_BODIES = {
    "not JSON": b'{"id_data": ',
    "a 5000-digit integer": _with(', "n": ' + "1" * 5000),
    "20000 nested [": _with(', "n": ' + "[" * 20000 + "]" * 20000),
    "a lone surrogate in tenant_token": _with(', "tenant_token": "\\ud800"'),
    "a lone surrogate in pubkey": _with("", pubkey='"\\ud800' + PEM[1:]),
    "a raw surrogate (not UTF-8)": _with(', "x": "\ud800"'),
    "NaN": _with(', "n": NaN'),
    "UTF-16": (HEAD + PEM + "}").encode("utf-16"),
    "a byte-order mark": b"\xef\xbb\xbf" + _with(""),
    # Go's encoding/json fills a field from any key equal to it under case folding, the last one winning:
    # the server would see another key (or identity) than the edge checked.
    "a repeated pubkey": _with(', "pubkey": ' + PEM),
    "PubKey beside pubkey": _with(', "PubKey": ' + PEM),
    "ID_DATA beside id_data": _with(', "ID_DATA": "{\\"a\\": 2}"'),
    "pubkey with a Kelvin sign": ('{"id_data": "{\\"a\\": 1}", "pub\u212aey": ' + PEM + "}").encode(),
}


@pytest.mark.parametrize("body", list(HOSTILE_BODIES.values()), ids=list(HOSTILE_BODIES))
def test_hostile_bodies_are_a_bad_request_never_a_crash(body: bytes) -> None:
    with pytest.raises(Refused) as refused:
        checks.parse_auth_request(body)
    assert refused.value.reason is Reason.BAD_REQUEST and refused.value.status == 400 and refused.value.message


def test_an_unknown_field_and_a_large_number_that_fits_are_fine() -> None:
    request = checks.parse_auth_request(_body(id_data='{"n": 123456789012345678901234567890, "f": 1.5}', x=[1, {}]))
    assert request.identity == {"n": 123456789012345678901234567890, "f": 1.5}


def test_the_canonical_identity_is_stable() -> None:
    """What identities are hashed and cached (and pinned) by: sorted, compact, UTF-8 as it is.
    Kills: other separators, escaped non-ASCII (another hash for the same device after an upgrade)."""
    assert checks.canonical({"mac": "é", "a": [1, {"z": None, "b": True}]}) == (
        '{"a":[1,{"b":true,"z":null}],"mac":"é"}'.encode()
    )


def test_the_pubkey_is_kept_as_the_device_sent_it() -> None:
    """Preauthorized byte for byte as the auth request names it."""
    pem = "  " + public_pem(EC_KEY).replace("\n", "\r\n")
    request = checks.parse_auth_request(auth_body({"mac": "a"}, pem))
    assert request.pubkey_pem == pem and request.pubkey == EC_KEY.public_key()
    assert checks.public_pem(request.pubkey) == public_pem(EC_KEY)


def test_a_signature_with_characters_outside_base64_is_refused() -> None:
    """Go's base64.StdEncoding refuses them; Python's b64decode would skip them unless told to validate."""
    body = auth_body({"mac": "a"}, public_pem(EC_KEY))
    good = sign(EC_KEY, body)
    checks.verify_signature(EC_KEY.public_key(), body, good)
    for bad in (good[:8] + "!" + good[8:], good[:8] + "\n" + good[8:], "!!"):
        assert _reason(lambda b=bad: checks.verify_signature(EC_KEY.public_key(), body, b)) is Reason.BAD_SIGNATURE


def test_cache_key_is_the_identity_and_the_key() -> None:
    """Kills: a cache key of the key alone, or of the identity alone."""
    other_key = ec.generate_private_key(ec.SECP256R1())
    one = checks.parse_auth_request(auth_body({"mac": "a"}, public_pem(EC_KEY)))
    same = checks.parse_auth_request(auth_body({"mac": "a"}, public_pem(EC_KEY)))
    other_identity = checks.parse_auth_request(auth_body({"mac": "b"}, public_pem(EC_KEY)))
    other = checks.parse_auth_request(auth_body({"mac": "a"}, public_pem(other_key)))
    assert one.cache_key == same.cache_key
    assert len({one.cache_key, other_identity.cache_key, other.cache_key}) == 3
    assert one.identity_hash != other_identity.identity_hash


# -- the certificate ------------------------------------------------------------------------------------------------


def test_a_certificate_without_a_cn_does_not_crash() -> None:
    """Kills: ``found[0]`` without the emptiness check (IndexError, a 500)."""
    from urllib.parse import quote

    for subject in (x509.Name([]), x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ACME")])):
        cert = _leaf(subject=subject)
        parsed = checks.parse_client_cert(quote(cert.public_bytes(serialization.Encoding.PEM).decode(), safe=""))
        assert checks.common_name(parsed) == ""
        checks.check_certificate(parsed, CA.cert, NOW)
        assert chain.leaf_problems(parsed, CA.cert) == []


@pytest.mark.parametrize(
    ("extension", "critical", "refused"),
    [(UNKNOWN, True, True), (POLICIES, True, True), (UNKNOWN, False, False), (POLICIES, False, False),
     (x509.SubjectAlternativeName([x509.DNSName("d-1.example")]), True, False)],
    ids=["unknown critical", "policies critical", "unknown", "policies", "subjectAltName critical"],
)  # fmt: skip
def test_a_leaf_with_an_unprocessed_critical_extension_is_refused(
    extension: x509.ExtensionType, critical: bool, refused: bool
) -> None:
    """RFC 5280 4.2; kills: dropping the critical-extension check, in the edge or in chain.py."""
    cert = _leaf([*CLIENT_EKU, (extension, critical)])
    problems = chain.leaf_problems(cert, CA.cert)
    if refused:
        assert _reason(lambda: checks.check_certificate(cert, CA.cert, NOW)) is Reason.UNHANDLED_EXTENSION
        assert len(problems) == 1 and "critical extension imageprov does not process" in problems[0]
    else:
        checks.check_certificate(cert, CA.cert, NOW)
        assert problems == []


@pytest.mark.parametrize("extension", [UNKNOWN, POLICIES], ids=["unknown", "policies"])
def test_a_ca_with_an_unprocessed_critical_extension_is_refused(extension: x509.ExtensionType, tmp_path: Path) -> None:
    """At the edge (untrusted), by ``verify`` (chain.leaf_problems) and by ``ca import`` (check_pair)."""
    odd = _ca([CA_BASIC, (extension, True)])
    leaf = _leaf(ca=odd)
    assert _reason(lambda: checks.check_certificate(leaf, odd.cert, NOW)) is Reason.UNTRUSTED
    assert any("the CA: it has a critical extension" in p for p in chain.leaf_problems(leaf, odd.cert))
    with pytest.raises(PkiError, match="critical extension imageprov does not process"):
        check_pair(odd.cert, odd.key, tmp_path / "ca.key")
    # The same CA with the extension not critical is fine everywhere.
    fine = _ca([CA_BASIC, (extension, False)])
    checks.check_certificate(_leaf(ca=fine), fine.cert, NOW)
    assert chain.leaf_problems(_leaf(ca=fine), fine.cert) == []
    check_pair(fine.cert, fine.key, tmp_path / "ca.key")


def test_a_ca_that_may_not_sign_certificates_is_refused_at_the_edge() -> None:
    """The edge asks chain.ca_problems, as ``ca import`` and ``verify`` do."""
    for extensions in ([(x509.BasicConstraints(ca=False, path_length=None), True)],
                       [CA_BASIC, (_usage(crl_sign=True), True)]):  # fmt: skip
        bad = _ca(extensions)
        assert _reason(lambda b=bad: checks.check_certificate(_leaf(ca=b), b.cert, NOW)) is Reason.UNTRUSTED


KEY_USAGES = {
    "digitalSignature": (_usage(digital_signature=True), None),
    "digitalSignature and keyAgreement": (_usage(digital_signature=True, key_agreement=True), None),
    "keyAgreement only": (_usage(key_agreement=True), "does not allow digitalSignature"),
    "keyEncipherment only": (_usage(key_encipherment=True), "neither digitalSignature nor keyAgreement"),
}


@pytest.mark.parametrize("name", list(KEY_USAGES))
def test_a_client_certificate_needs_digital_signature(name: str) -> None:
    """A TLS client signs the handshake; kills: taking keyAgreement alone, as OpenSSL's purpose check does."""
    usage, problem = KEY_USAGES[name]
    cert = _leaf([*CLIENT_EKU, (usage, True)])
    if problem is None:
        checks.check_certificate(cert, CA.cert, NOW)
        assert chain.leaf_problems(cert, CA.cert) == []
    else:
        assert _reason(lambda: checks.check_certificate(cert, CA.cert, NOW)) is Reason.NO_CLIENT_AUTH
        problems = chain.leaf_problems(cert, CA.cert)
        assert len(problems) == 1 and problem in problems[0]


EXTENDED_USAGES: dict[str, tuple[Extensions, bool]] = {
    "absent": ([], True),
    "clientAuth": (CLIENT_EKU, True),
    "serverAuth and clientAuth": (
        [(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), False)], True),
    "serverAuth": ([(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)], False),
    "emailProtection, critical": ([(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), True)], False),
    # RFC 5280 would let it pass; OpenSSL, and so nginx, refuses it (xku_reject), so the edge and chain.py do.
    "anyExtendedKeyUsage": ([(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE]), False)], False),
}  # fmt: skip


@pytest.mark.parametrize("name", list(EXTENDED_USAGES))
def test_extended_key_usage_absent_allows_present_restricts(name: str, tmp_path: Path) -> None:
    """RFC 5280 4.2.1.12; the edge, chain.py and ``openssl verify -purpose sslclient`` agree on each."""
    extensions, allowed = EXTENDED_USAGES[name]
    cert = _leaf(extensions)
    (tmp_path / "ca.pem").write_bytes(CA.cert_pem())
    (tmp_path / "leaf.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    openssl = tool("openssl", "verify", "-CAfile", tmp_path / "ca.pem", "-purpose", "sslclient",
                   tmp_path / "leaf.pem", check=False)  # fmt: skip
    assert (openssl.returncode == 0) is allowed, openssl.stdout + openssl.stderr
    if allowed:
        checks.check_certificate(cert, CA.cert, NOW)
        assert chain.leaf_problems(cert, CA.cert) == []
    else:
        assert _reason(lambda: checks.check_certificate(cert, CA.cert, NOW)) is Reason.NO_CLIENT_AUTH
        problems = chain.leaf_problems(cert, CA.cert)
        assert len(problems) == 1 and "extendedKeyUsage does not allow TLS clients" in problems[0]


def test_a_v1_ca_is_a_ca_only_if_self_signed(tmp_path: Path) -> None:
    """OpenSSL takes a self-signed v1 certificate as a CA (X509_check_ca), and nothing else without basicConstraints:
    the edge, chain.py and ``openssl verify`` agree on both."""

    def openssl(*args: str) -> None:
        tool("openssl", *[str(tmp_path / a) if a.endswith((".key", ".pem", ".req")) else a for a in args])

    for name in ("v1", "other", "device"):
        openssl("ecparam", "-genkey", "-name", "P-256", "-noout", "-out", f"{name}.key")
        openssl("req", "-new", "-key", f"{name}.key", "-out", f"{name}.req", "-subj", f"/CN={name}")
    openssl("x509", "-req", "-in", "v1.req", "-signkey", "v1.key", "-out", "v1.pem", "-days", "30")
    openssl("req", "-new", "-x509", "-key", "other.key", "-out", "other.pem", "-days", "30", "-subj", "/CN=other")
    # The same name and key, but issued by another CA: a v1 certificate that is not self-signed.
    openssl("x509", "-req", "-in", "v1.req", "-CA", "other.pem", "-CAkey", "other.key", "-CAcreateserial",
            "-out", "v1-issued.pem", "-days", "30")  # fmt: skip
    for ca_file, is_ca in (("v1.pem", True), ("v1-issued.pem", False)):
        openssl("x509", "-req", "-in", "device.req", "-CA", ca_file, "-CAkey", "v1.key", "-CAcreateserial",
                "-out", "device.pem", "-days", "30")  # fmt: skip
        ca_cert = x509.load_pem_x509_certificate((tmp_path / ca_file).read_bytes())
        device = x509.load_pem_x509_certificate((tmp_path / "device.pem").read_bytes())
        assert ca_cert.version is x509.Version.v1
        verified = tool("openssl", "verify", "-CAfile", tmp_path / ca_file, "-purpose", "sslclient",
                        tmp_path / "device.pem", check=False)  # fmt: skip
        if is_ca:
            assert chain.ca_problems(ca_cert) == [] and verified.returncode == 0
            checks.check_certificate(device, ca_cert, dt.datetime.now(dt.UTC))
        else:
            assert chain.ca_problems(ca_cert) == ["it has no basicConstraints and is not a CA"]
            assert _reason(lambda c=ca_cert, d=device: checks.check_certificate(d, c, dt.datetime.now(dt.UTC))) is (
                Reason.UNTRUSTED
            )


def test_server_certificates_are_checked_for_their_own_purpose() -> None:
    """chain.py's purpose reaches the CA's and the leaf's checks (``issue_server`` asks for serverAuth)."""
    from imageprov.pki.ca import CertificateAuthority, Subject

    ca = CertificateAuthority.create(Subject("Purpose CA"))
    server, device = ca.issue_server(["edge.test"]).cert, ca.issue_device("d-1").cert
    assert chain.leaf_problems(server, ca.cert, purpose=chain.SERVER) == []
    assert chain.leaf_problems(device, ca.cert) == []
    assert chain.leaf_problems(device, ca.cert, purpose=chain.SERVER) == [
        "its extendedKeyUsage does not allow TLS servers (serverAuth)"
    ]
    client_only = _ca([CA_BASIC, (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)])
    leaf = _leaf([(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)], ca=client_only)
    assert chain.leaf_problems(leaf, client_only.cert, purpose=chain.SERVER) == [
        "the CA: its extendedKeyUsage does not allow TLS servers (serverAuth)"
    ]


def test_menders_openssl_recipe_makes_certificates_the_edge_accepts(tmp_path: Path) -> None:
    """Mender's documented mTLS recipe: a CA by ``openssl req -x509``, a v1 device certificate without any
    extension by ``openssl x509 -req``. Kills: requiring an extendedKeyUsage that is absent."""
    for command in (
        ["ecparam", "-genkey", "-name", "P-256", "-noout", "-out", "ca-private.key"],
        ["req", "-new", "-x509", "-key", "ca-private.key", "-out", "ca-cert.pem", "-days", "30", "-subj", "/CN=My CA"],
        ["ecparam", "-genkey", "-name", "P-256", "-noout", "-out", "device-private.key"],
        ["req", "-new", "-key", "device-private.key", "-out", "device-cert.req", "-subj", "/CN=dev-1"],
        ["x509", "-req", "-CA", "ca-cert.pem", "-CAkey", "ca-private.key", "-CAcreateserial", "-in", "device-cert.req",
         "-out", "device-cert.pem", "-days", "30"],
    ):  # fmt: skip
        tool("openssl", *[str(tmp_path / a) if a.endswith((".key", ".pem", ".req")) else a for a in command])
    ca_cert = x509.load_pem_x509_certificate((tmp_path / "ca-cert.pem").read_bytes())
    device = x509.load_pem_x509_certificate((tmp_path / "device-cert.pem").read_bytes())
    assert device.version is x509.Version.v1 and len(device.extensions) == 0
    checks.check_certificate(device, ca_cert, dt.datetime.now(dt.UTC))  # openssl made them valid from this second
    assert chain.leaf_problems(device, ca_cert) == [] and chain.ca_problems(ca_cert) == []
    key = serialization.load_pem_private_key((tmp_path / "device-private.key").read_bytes(), None)
    body = auth_body({"mac": "02:00:00:00:00:09"}, public_pem(key))
    request = checks.parse_auth_request(body)
    checks.check_key_matches(device, request)
    checks.verify_signature(request.pubkey, body, sign(key, body))


def _tlvs(data: bytes) -> list[tuple[int, bytes]]:
    """The DER elements in ``data``: (tag, content)."""
    found, i = [], 0
    while i < len(data):
        length, head = data[i + 1], 2
        if length & 0x80:
            size = length & 0x7F
            length, head = int.from_bytes(data[i + 2 : i + 2 + size]), 2 + size
        found.append((data[i], data[i + head : i + head + length]))
        i += head + length
    return found


def _der(tag: int, content: bytes) -> bytes:
    length = len(content)
    encoded = bytes([length]) if length < 0x80 else bytes([0x80 | 2]) + length.to_bytes(2)
    return bytes([tag]) + encoded + content


def _with_a_duplicate_extension(cert: x509.Certificate) -> bytes:
    """``cert`` (DER) with its last extension twice; the signature no longer verifies, which parsing never asks."""
    [(_, certificate)] = _tlvs(cert.public_bytes(serialization.Encoding.DER))
    (_, tbs), *rest = _tlvs(certificate)
    *fields, (tag, explicit) = _tlvs(tbs)
    assert tag == 0xA3
    [(_, extensions)] = _tlvs(explicit)
    items = [_der(t, c) for t, c in _tlvs(extensions)]
    tbs_der = _der(0x30, b"".join(_der(t, c) for t, c in fields) + _der(0xA3, _der(0x30, b"".join(items + items[-1:]))))
    return _der(0x30, tbs_der + b"".join(_der(t, c) for t, c in rest))


def test_duplicate_extensions_are_a_bad_certificate() -> None:
    """cryptography refuses to read them only when asked: the edge asks at once and refuses (400), never a 500."""
    from urllib.parse import quote

    der = _with_a_duplicate_extension(_leaf([*CLIENT_EKU, (UNKNOWN, False)]))
    cert = x509.load_der_x509_certificate(der)
    with pytest.raises(x509.DuplicateExtension):
        cert.extensions  # noqa: B018
    header = quote(cert.public_bytes(serialization.Encoding.PEM).decode(), safe="")
    assert _reason(lambda: checks.parse_client_cert(header)) is Reason.BAD_CERTIFICATE
    assert chain.leaf_problems(cert, CA.cert) == [
        "its extensions do not parse (Duplicate 1.3.6.1.4.1.55555.1 extension found)"
    ]
    assert chain.ca_problems(cert)[0].startswith("its extensions do not parse")


# -- device keys: exactly what Mender's deviceauth takes ------------------------------------------------------------


def _spki_pem(public_key: Any) -> str:
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def _rsa(bits: int = 2048, *, e: int = 65537, even: bool = False) -> Any:
    n = rsa.generate_private_key(65537, max(bits, 1024)).public_key().public_numbers().n
    if bits < 1024:
        n = (1 << (bits - 1)) | (n & ((1 << (bits - 1)) - 1)) | 1
    return rsa.RSAPublicNumbers(e, n + 1 if even else n).public_key()


def _compressed_p256() -> str:
    public = EC_KEY.public_key()
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    point = public.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint)
    algorithm = der[2:23]  # SEQUENCE { id-ecPublicKey, prime256v1 }
    spki = b"\x30\x39" + algorithm + b"\x03\x22\x00" + point
    assert serialization.load_der_public_key(spki) == public  # cryptography takes it; Go's parser does not
    import base64

    return "-----BEGIN PUBLIC KEY-----\n" + base64.encodebytes(spki).decode() + "-----END PUBLIC KEY-----\n"


ACCEPTED_KEYS: dict[str, Callable[[], str]] = {
    "RSA 1024": lambda: _spki_pem(_rsa(1024)),
    "RSA 4096": lambda: _spki_pem(_rsa(4096)),
    "RSA e=3": lambda: _spki_pem(_rsa(e=3)),
    "RSA e=2^31-1": lambda: _spki_pem(_rsa(e=2**31 - 1)),
    "P-224": lambda: _spki_pem(ec.generate_private_key(ec.SECP224R1()).public_key()),
    "P-256": lambda: _spki_pem(EC_KEY.public_key()),
    "P-384": lambda: _spki_pem(ec.generate_private_key(ec.SECP384R1()).public_key()),
    "P-521": lambda: _spki_pem(ec.generate_private_key(ec.SECP521R1()).public_key()),
    "Ed25519": lambda: _spki_pem(ed25519.Ed25519PrivateKey.generate().public_key()),
    "text before the PEM block": lambda: "device key\n" + _spki_pem(EC_KEY.public_key()),
    # Go's pem.Decode looks for the first BEGIN, and then its END.
    "an END line before the block": lambda: "-----END PUBLIC KEY-----\n" + _spki_pem(EC_KEY.public_key()),
    "two blocks (the first counts)": lambda: _spki_pem(EC_KEY.public_key()) + _spki_pem(_rsa()),
}
# The accepted PEMs above that hold EC_KEY (and must give it, not another key of the text).
OF_EC_KEY = {"P-256", "text before the PEM block", "an END line before the block", "two blocks (the first counts)"}
REFUSED_KEYS: dict[str, Callable[[], str]] = {
    "RSA 1023": lambda: _spki_pem(_rsa(1023)),
    "RSA 512": lambda: _spki_pem(_rsa(512)),
    "RSA e=2^31+1": lambda: _spki_pem(_rsa(e=2**31 + 1)),
    "RSA even modulus": lambda: _spki_pem(_rsa(even=True)),
    "RSA PKCS#1 block": lambda: _rsa().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1)
    .decode(),
    "secp256k1": lambda: _spki_pem(ec.generate_private_key(ec.SECP256K1()).public_key()),
    "P-192": lambda: _spki_pem(ec.generate_private_key(ec.SECP192R1()).public_key()),
    "brainpoolP256r1": lambda: _spki_pem(ec.generate_private_key(ec.BrainpoolP256R1()).public_key()),
    "compressed P-256 point": _compressed_p256,
    "Ed448": lambda: _spki_pem(ed448.Ed448PrivateKey.generate().public_key()),
    "X25519": lambda: _spki_pem(x25519.X25519PrivateKey.generate().public_key()),
    "X448": lambda: _spki_pem(x448.X448PrivateKey.generate().public_key()),
    "DSA": lambda: _spki_pem(dsa.generate_private_key(2048).public_key()),
    "bad base64": lambda: "-----BEGIN PUBLIC KEY-----\nMFkw!!\n-----END PUBLIC KEY-----\n",
    "a good key under another label": lambda: _spki_pem(EC_KEY.public_key()).replace("PUBLIC KEY", "EC PUBLIC KEY"),
    "no end line": lambda: _spki_pem(EC_KEY.public_key()).split("-----END")[0],
    "a character outside base64": lambda: _spki_pem(EC_KEY.public_key()).replace("\n", "\n!", 1),
    "a certificate": lambda: CA.cert_pem().decode(),
}  # fmt: skip


@pytest.mark.parametrize("name", list(ACCEPTED_KEYS))
def test_device_keys_mender_takes(name: str) -> None:
    pem = ACCEPTED_KEYS[name]()
    key = checks.load_device_key(pem)
    assert chain.device_key_problem(key) is None
    if name in OF_EC_KEY:
        assert key == EC_KEY.public_key()
    assert checks.parse_auth_request(auth_body({"mac": "x"}, pem)).pubkey == key


@pytest.mark.parametrize("name", list(REFUSED_KEYS))
def test_device_keys_mender_refuses(name: str) -> None:
    pem = REFUSED_KEYS[name]()
    assert _reason(lambda: checks.load_device_key(pem)) is Reason.BAD_REQUEST
    assert _reason(lambda: checks.parse_auth_request(auth_body({"mac": "x"}, pem))) is Reason.BAD_REQUEST


@pytest.mark.parametrize(
    "make", [lambda: ec.generate_private_key(ec.SECP224R1()), lambda: ec.generate_private_key(ec.SECP384R1()),
             lambda: ec.generate_private_key(ec.SECP521R1())], ids=["P-224", "P-384", "P-521"],
)  # fmt: skip
def test_every_curve_signs_with_sha256_as_menders_server_verifies(make: Callable[[], Any]) -> None:
    key = make()
    body = auth_body({"mac": "x"}, public_pem(key))
    request = checks.parse_auth_request(body)
    checks.verify_signature(request.pubkey, body, sign(key, body))
    assert _reason(lambda: checks.verify_signature(request.pubkey, body + b" ", sign(key, body))) is (
        Reason.BAD_SIGNATURE
    )


# -- flashing targets (disk/blockdev.py): what check_target refuses beside test_flash_safety's cases ----------------

CARD = 16 << 20


@pytest.fixture
def loops(tmp_path: Path) -> Iterator[Loops]:
    yield from loop_devices(tmp_path)


def _target_refused(path: Path, why: str, **kwargs: Any) -> None:
    with pytest.raises(TargetError) as caught:
        check_target(path, image_size=CARD, **kwargs)
    assert why in caught.value.message, caught.value.message


def test_a_loop_device_over_a_file_in_a_protected_directory_is_refused(loops: Loops, tmp_path: Path) -> None:
    """Kills: ``_backs`` taking any directory, or none; a deleted backing file is nothing protected."""
    pki, other = tmp_path / "pki", tmp_path / "other"
    pki.mkdir()
    other.mkdir()
    (other / "golden.img").write_bytes(b"golden")
    card = loops.attach(stale_file(pki / "inside.img", CARD))
    _target_refused(card, f"holds {pki}", protected=[pki])
    assert check_target(card, image_size=CARD, protected=[other, other / "golden.img"]).name == card.name
    (pki / "inside.img").unlink()  # the loop device now shows "... (deleted)"
    assert check_target(card, image_size=CARD, protected=[other / "golden.img"]).name == card.name


def test_a_disk_used_as_swap_is_refused(loops: Loops) -> None:
    """Kills the /proc/swaps part of ``_mounted_disks``."""
    card = loops.card(CARD)
    tool("mkswap", card)
    if tool("swapon", card, check=False).returncode != 0:
        unavailable("swapon is not allowed here")
    try:
        _target_refused(card, "is mounted, or holds a mounted partition (on swap)")
    finally:
        tool("swapoff", card, check=False)
    assert check_target(card, image_size=CARD).name == card.name


def test_removable_disks_by_name_give_sizes_and_skip_empty_loop_devices(loops: Loops) -> None:
    """Kills: a ``break`` for ``continue``, and an empty device (no medium: 0 sectors) taken for a card."""
    card = loops.card(CARD)
    found = removable_disks(["loop*"])
    assert found[card.name] == CARD
    assert all(size > 0 for size in found.values())
    empty = [d.name for d in Path("/sys/block").glob("loop*") if (d / "size").read_text().strip() == "0"]
    assert not set(empty) & set(found)
    assert removable_disks([card.name]) == {card.name: CARD}


def test_open_exclusive_writes_and_refuses_a_busy_disk(loops: Loops, tmp_path: Path) -> None:
    """The card is opened for writing, alone; a mounted one is busy; one that went away cannot be opened."""
    card = loops.card(CARD)
    device = check_target(card, image_size=CARD)
    fd, direct = open_exclusive(device)
    try:
        assert direct  # a loop device takes O_DIRECT
        block = os.sysconf("SC_PAGE_SIZE")
        buffer = mmap.mmap(-1, block)  # page-aligned, as O_DIRECT wants
        buffer.write(b"\x5a" * block)
        assert os.pwritev(fd, [buffer], 0) == block
        flush_buffers(fd)
        with pytest.raises(TargetError, match="busy"):
            open_exclusive(device)  # O_EXCL: not twice
    finally:
        os.close(fd)
    assert read_span(card, 0, block) == b"\x5a" * block
    tool("mkfs.ext4", "-q", card)
    loops.mount(card, tmp_path / "mnt")
    with pytest.raises(TargetError, match=f"target {card} .* is busy"):
        open_exclusive(device)
    gone = BlockDevice(tmp_path / "gone", "gone", 0, 0, False, False, 512)
    with pytest.raises(TargetError, match="cannot open target"):
        open_exclusive(gone)
    with open(tmp_path / "plain", "wb") as plain:  # not a block device: the page cache is dropped instead
        flush_buffers(plain.fileno())
