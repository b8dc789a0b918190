"""The accepting edge's decisions, as pure functions over bytes and certificates.

No I/O here: the HTTP layer hands in the raw body, the signature header and
the client certificate nginx verified; these functions say what is wrong, or
return what was checked. Each refusal is a ``Refused`` with a fixed reason
code (for logs and metrics) and the HTTP status the device gets.

The auth request and its signature follow Mender's device API
(``POST /api/devices/v1/authentication/auth_requests``): ``id_data`` is a
string holding a JSON object, ``pubkey`` a PEM public key, ``tenant_token``
an optional string; ``X-MEN-Signature`` is base64 of an RSA PKCS#1 v1.5 or
ECDSA (ASN.1 DER) signature over SHA-256 of the raw body, or of an Ed25519
signature over the raw body itself.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import enum
import hashlib
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# What Mender accepts as a device key (deviceauth's supported algorithms).
DeviceKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey


class Reason(enum.Enum):
    """Why a request was refused: the ``reason`` of a log line and a metrics label."""

    BAD_REQUEST = "bad-request"
    NO_CERTIFICATE = "no-certificate"
    BAD_CERTIFICATE = "bad-certificate"
    UNTRUSTED = "untrusted-issuer"
    NOT_YET_VALID = "not-yet-valid"
    EXPIRED = "expired"
    NO_CLIENT_AUTH = "no-client-auth"
    REVOKED = "revoked"
    KEY_MISMATCH = "key-mismatch"
    BAD_SIGNATURE = "bad-signature"


# Malformed input is the device's bug (400); everything else is "not you" (401),
# which is also what the Mender server answers a device it does not accept.
_STATUS = {Reason.BAD_REQUEST: 400, Reason.NO_CERTIFICATE: 400, Reason.BAD_CERTIFICATE: 400}


class Refused(Exception):
    """The request fails a check; ``message`` is safe to send to the device."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message

    @property
    def status(self) -> int:
        return _STATUS.get(self.reason, 401)


@dataclass(frozen=True)
class AuthRequest:
    """A parsed auth request: the identity as an object and the key it names."""

    identity: dict[str, Any]
    pubkey: DeviceKey
    # As the device sent it: preauthorized byte for byte as the auth request will name it.
    pubkey_pem: str
    tenant_token: str | None

    @property
    def identity_hash(self) -> str:
        """A short, stable digest of the identity for logs (identity data may be personal)."""
        return hashlib.sha256(canonical(self.identity)).hexdigest()[:16]

    @property
    def cache_key(self) -> bytes:
        """Identity and key together: what the edge has already preauthorized."""
        spki = self.pubkey.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        return hashlib.sha256(canonical(self.identity) + b"\0" + spki).digest()


def canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def public_pem(key: DeviceKey) -> str:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def parse_auth_request(body: bytes) -> AuthRequest:
    """Parse and check an auth request body against Mender's AuthRequest schema."""
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Refused(Reason.BAD_REQUEST, f"the body is not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise Refused(Reason.BAD_REQUEST, "the body is not a JSON object")
    for name in ("id_data", "pubkey"):
        if name not in value:
            raise Refused(Reason.BAD_REQUEST, f"{name} is missing")
    for name in ("id_data", "pubkey", "tenant_token"):
        if name in value and not isinstance(value[name], str):
            raise Refused(Reason.BAD_REQUEST, f"{name} is not a string")
    try:
        identity = json.loads(value["id_data"])
    except json.JSONDecodeError as exc:
        raise Refused(Reason.BAD_REQUEST, "id_data does not hold JSON") from exc
    if not isinstance(identity, dict) or not identity:
        raise Refused(Reason.BAD_REQUEST, "id_data does not hold a non-empty JSON object")
    return AuthRequest(identity, load_device_key(value["pubkey"]), value["pubkey"], value.get("tenant_token"))


def load_device_key(pem: str) -> DeviceKey:
    try:
        key = serialization.load_pem_public_key(pem.encode())
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise Refused(Reason.BAD_REQUEST, "pubkey is not a PEM public key") from exc
    if isinstance(key, ec.EllipticCurvePublicKey) and not isinstance(key.curve, ec.SECP256R1):
        raise Refused(Reason.BAD_REQUEST, f"pubkey is on curve {key.curve.name}; Mender takes P-256")
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey):
        raise Refused(Reason.BAD_REQUEST, "pubkey is not RSA, ECDSA P-256 or Ed25519")
    return key


def parse_client_cert(header: str | None) -> x509.Certificate:
    """The certificate nginx verified, from ``$ssl_client_escaped_cert`` (URL-encoded PEM)."""
    if not header:
        raise Refused(Reason.NO_CERTIFICATE, "no client certificate")
    try:
        return x509.load_pem_x509_certificate(unquote(header).encode())
    except ValueError as exc:
        raise Refused(Reason.BAD_CERTIFICATE, "the client certificate does not parse") from exc


def check_certificate(cert: x509.Certificate, ca_cert: x509.Certificate, now: dt.datetime) -> None:
    """The certificate is the fleet CA's, valid now, and allows clientAuth (RFC 5280 4.2.1.12)."""
    check_issuer(cert, ca_cert)
    check_validity_and_usage(cert, now)


def check_issuer(cert: x509.Certificate, ca_cert: x509.Certificate) -> None:
    """Signed by the fleet CA itself (device certificates are; nginx: ssl_verify_depth 1)."""
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise Refused(Reason.UNTRUSTED, "the certificate is not signed by the fleet CA") from exc


def check_validity_and_usage(cert: x509.Certificate, now: dt.datetime) -> None:
    """Within its validity at ``now``, and allows clientAuth."""
    if now < cert.not_valid_before_utc:
        raise Refused(Reason.NOT_YET_VALID, "the certificate is not valid yet")
    if now > cert.not_valid_after_utc:
        raise Refused(Reason.EXPIRED, "the certificate has expired")
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usages = None
    if usages is None or ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
        raise Refused(Reason.NO_CLIENT_AUTH, "the certificate does not allow clientAuth")


def check_key_matches(cert: x509.Certificate, request: AuthRequest) -> None:
    """The device signs with its certificate's key: the request's pubkey must be that key."""
    if cert.public_key() != request.pubkey:
        raise Refused(Reason.KEY_MISMATCH, "pubkey is not the client certificate's key")


def verify_signature(key: DeviceKey, body: bytes, signature: str | None) -> None:
    """``X-MEN-Signature`` (base64) verifies over the raw ``body`` with ``key``."""
    if not signature:
        raise Refused(Reason.BAD_SIGNATURE, "X-MEN-Signature is missing")
    try:
        raw = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise Refused(Reason.BAD_SIGNATURE, "X-MEN-Signature is not base64") from exc
    try:
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(raw, body, padding.PKCS1v15(), hashes.SHA256())
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(raw, body, ec.ECDSA(hashes.SHA256()))
        else:
            key.verify(raw, body)
    except InvalidSignature as exc:
        raise Refused(Reason.BAD_SIGNATURE, "X-MEN-Signature does not verify") from exc


def common_name(cert: x509.Certificate) -> str:
    found = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(found[0].value) if found else ""


def serial_hex(cert: x509.Certificate) -> str:
    """The serial as imageprov's registry and denylists write it: lowercase hex, no leading zeros."""
    return f"{cert.serial_number:x}"
