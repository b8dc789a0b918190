"""The accepting edge's decisions, as pure functions over bytes and certificates.

No I/O here: the HTTP layer hands in the raw body, the signature header and
the client certificate nginx verified; these functions say what is wrong, or
return what was checked. Each refusal is a ``Refused`` with a fixed reason
code (for logs and metrics) and the HTTP status the device gets. And when
Mender refuses a device that passed them all, ``readmission`` says, from what
Mender holds of the device, whether the edge may bring it back.

The auth request and its signature follow Mender's device API
(``POST /api/devices/v1/authentication/auth_requests``): ``id_data`` is a
string holding a JSON object, ``pubkey`` a PEM public key, ``tenant_token``
an optional string; ``X-MEN-Signature`` is base64 of an RSA PKCS#1 v1.5 or
ECDSA (ASN.1 DER) signature over SHA-256 of the raw body, or of an Ed25519
signature over the raw body itself.

The server parses the same body with Go's encoding/json, which matches struct
fields case-insensitively and takes the last of repeated keys; what the edge
and the server could read differently (a second ``PubKey``, numbers that do
not fit a float64, a lone surrogate, another encoding than UTF-8) is refused
here, so that both decide on the same request.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import enum
import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import unquote

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import NameOID, ObjectIdentifier

from imageprov.edge.mender_client import MenderDevice
from imageprov.pki import chain
from imageprov.pki.ca import is_bootstrap

# What Mender accepts as a device key (deviceauth's supported algorithms; chain.device_key_problem has the rest).
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
    UNHANDLED_EXTENSION = "unhandled-critical-extension"
    # What the registry says (edge/standing.py).
    NOT_DELIVERED = "not-delivered"
    UNKNOWN_CERTIFICATE = "unknown-certificate"
    # Identity bound to the certificate (edge/identity.py).
    IDENTITY_MISMATCH = "identity-mismatch"
    IDENTITY_PINNED = "identity-pinned-elsewhere"
    IDENTITY_TAKEN = "identity-taken"
    # A bootstrap certificate (pki.ca.issue_bootstrap) anywhere but at EST, or at EST's simplereenroll.
    BOOTSTRAP = "bootstrap-certificate"
    # Enrollment (EST, edge/est.py): the credential ...
    NOT_BOOTSTRAP = "not-bootstrap"  # simpleenroll with anything but a bootstrap certificate
    CREDENTIAL_USED = "credential-used"  # used before, by another key: a possible clone
    SUPERSEDED = "superseded"  # the device was issued a certificate after this bootstrap certificate
    BUSY = "device-busy"  # a station is stamping the device right now (503)
    # ... and the certificate request.
    BAD_CSR = "bad-csr"
    CSR_SIGNATURE = "bad-csr-signature"  # no proof of possession of the key it names
    CN_MISMATCH = "cn-mismatch"  # another device id than the credential's
    KEY_REFUSED = "key-refused"  # a key type or size Mender does not take
    KEY_REUSED = "key-reused"  # the bootstrap certificate's own key, which the image holds in a file


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


# The fields of Mender's AuthRequest (deviceauth's model/authreq.go).
_FIELDS = ("id_data", "pubkey", "tenant_token")
# The first PEM block begins here, as Go's pem.Decode finds it; its label must be PUBLIC KEY (utils.ParsePubKey).
_PEM_BEGIN = re.compile(r"-----BEGIN ([^\r\n-]*)-----\r?\n")


def _float(text: str) -> float:
    # Go decodes a JSON number as a float64, and fails on one that does not fit.
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:12]}... does not fit a float64")
    return value


def _int(text: str) -> int:
    _float(text)  # also keeps int() from the thousands of digits it refuses (or takes its time over)
    return int(text)


def _constant(text: str) -> Any:
    raise ValueError(f"{text} is not JSON")


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        raise ValueError("an object repeats a name")
    return dict(pairs)


def _json(text: bytes | str, what: str) -> Any:
    try:
        # Strict UTF-8: json.loads would also take UTF-16 and UTF-32 bytes, which Go does not.
        decoded = text.decode() if isinstance(text, bytes) else text
        value = json.loads(
            decoded, parse_float=_float, parse_int=_int, parse_constant=_constant, object_pairs_hook=_object
        )
        canonical(value)  # a lone surrogate parses, but cannot be encoded: not hashed, not sent on
    except RecursionError as exc:
        raise Refused(Reason.BAD_REQUEST, f"{what} is nested too deeply") from exc
    except ValueError as exc:  # JSONDecodeError, UnicodeError and the refusals above
        raise Refused(Reason.BAD_REQUEST, f"{what} is not JSON: {exc}") from exc
    return value


def parse_auth_request(body: bytes) -> AuthRequest:
    """Parse and check an auth request body against Mender's AuthRequest schema."""
    value = _json(body, "the body")
    if not isinstance(value, dict):
        raise Refused(Reason.BAD_REQUEST, "the body is not a JSON object")
    for name in value:
        if name not in _FIELDS and name.casefold() in _FIELDS:
            # Go would read it as that field, and the last one wins there: the server could see another key.
            raise Refused(Reason.BAD_REQUEST, f"the body names {name!r}, which Mender reads as {name.casefold()}")
    for name in ("id_data", "pubkey"):
        if name not in value:
            raise Refused(Reason.BAD_REQUEST, f"{name} is missing")
    for name in _FIELDS:
        if name in value and not isinstance(value[name], str):
            raise Refused(Reason.BAD_REQUEST, f"{name} is not a string")
    identity = _json(value["id_data"], "id_data")
    if not isinstance(identity, dict) or not identity:
        raise Refused(Reason.BAD_REQUEST, "id_data does not hold a non-empty JSON object")
    return AuthRequest(identity, load_device_key(value["pubkey"]), value["pubkey"], value.get("tenant_token"))


def load_device_key(pem: str) -> DeviceKey:
    """The key ``pem`` holds, if Mender's server takes it as a device key (see ``chain.device_key_problem``)."""
    begin = _PEM_BEGIN.search(pem)
    if begin is None:
        raise Refused(Reason.BAD_REQUEST, "pubkey is not a PEM public key")
    # One pass for the end, from the first beginning only: a body of many beginnings costs no more to read.
    end = pem.find(f"-----END {begin[1]}-----", begin.end())
    if end < 0:
        raise Refused(Reason.BAD_REQUEST, "pubkey is a PEM block without its end")
    if begin[1] != "PUBLIC KEY":
        raise Refused(Reason.BAD_REQUEST, f"pubkey is a PEM {begin[1][:40]!r} block; Mender takes PUBLIC KEY only")
    try:
        der = base64.b64decode("".join(pem[begin.end() : end].split()), validate=True)
        key = serialization.load_der_public_key(der)
    except (ValueError, UnsupportedAlgorithm) as exc:  # binascii.Error is a ValueError
        raise Refused(Reason.BAD_REQUEST, "pubkey is not a PEM public key") from exc
    problem = chain.device_key_problem(key)
    if problem is not None:
        raise Refused(Reason.BAD_REQUEST, f"pubkey: {problem}")
    if key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) != der:
        # Go's parser takes DER's one encoding only, and uncompressed EC points only.
        raise Refused(Reason.BAD_REQUEST, "pubkey is not in the encoding Mender parses (a compressed EC point?)")
    return cast(DeviceKey, key)  # device_key_problem passes these three kinds only


def parse_client_cert(header: str | None) -> x509.Certificate:
    """The certificate nginx verified, from ``$ssl_client_escaped_cert`` (URL-encoded PEM)."""
    if not header:
        raise Refused(Reason.NO_CERTIFICATE, "no client certificate")
    try:
        cert = x509.load_pem_x509_certificate(unquote(header).encode())
        # Parsed lazily by cryptography: read now, so that no later check meets a parse error.
        cert.subject, cert.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise Refused(Reason.BAD_CERTIFICATE, "the client certificate does not parse") from exc
    problem = chain.extension_problem(cert)
    if problem is not None:
        raise Refused(Reason.BAD_CERTIFICATE, f"the client certificate: {problem}")
    return cert


def check_certificate(cert: x509.Certificate, ca_cert: x509.Certificate, now: dt.datetime) -> None:
    """The certificate is the fleet CA's, valid now, and allows clientAuth (RFC 5280 4.2.1.12)."""
    check_issuer(cert, ca_cert)
    check_validity_and_usage(cert, now)


def check_issuer(cert: x509.Certificate, ca_cert: x509.Certificate) -> None:
    """Signed by the fleet CA itself (device certificates are; nginx: ssl_verify_depth 1), a CA that may sign them."""
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise Refused(Reason.UNTRUSTED, "the certificate is not signed by the fleet CA") from exc
    problems = chain.ca_problems(ca_cert)
    if problems:
        raise Refused(Reason.UNTRUSTED, f"the fleet CA may not issue client certificates: {'; '.join(problems)}")


def check_not_bootstrap(cert: x509.Certificate) -> None:
    """A bootstrap certificate is for enrollment (EST) and nothing else: no Mender identity, no device route.

    Refused by its policy (``pki.ca.BOOTSTRAP_POLICY``), before ``check_validity_and_usage`` would refuse
    that critical policy as an extension the edge does not process: the log then says why."""
    if is_bootstrap(cert):
        raise Refused(Reason.BOOTSTRAP, "a bootstrap certificate is for enrollment (EST) only")


def check_validity_and_usage(
    cert: x509.Certificate, now: dt.datetime, *, processed: frozenset[ObjectIdentifier] = frozenset()
) -> None:
    """Within its validity at ``now`` (both ends included, as OpenSSL has it), allows TLS client use,
    and has no critical extension the edge does not process (RFC 5280, 4.2); ``processed``: the critical
    extensions the caller has checked itself (EST: a bootstrap certificate's policy)."""
    if now < cert.not_valid_before_utc:
        raise Refused(Reason.NOT_YET_VALID, "the certificate is not valid yet")
    if now > cert.not_valid_after_utc:
        raise Refused(Reason.EXPIRED, "the certificate has expired")
    problems = chain.usage_problems(cert)
    if problems:
        raise Refused(Reason.NO_CLIENT_AUTH, f"the certificate may not be a TLS client's: {'; '.join(problems)}")
    unhandled = chain.unhandled_critical(cert)
    if processed:
        unhandled = [
            f"it has a critical extension imageprov does not process ({extension.oid.dotted_string})"
            for extension in cert.extensions
            if extension.critical and extension.oid not in chain.HANDLED_EXTENSIONS | processed
        ]
    if unhandled:
        raise Refused(Reason.UNHANDLED_EXTENSION, f"the certificate: {'; '.join(unhandled)}")


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


class Readmission(enum.Enum):
    """What the edge does when Mender refuses (401) a device that passed every check here."""

    # Mender holds the key preauthorized or accepted (another edge instance was quicker): forward once more.
    RETRY = "retry"
    # The key waits pending, or is not there: Mender forgot the device (decommissioned; the forwarded
    # request then made it anew, pending) or the device reached Mender before the edge. Preauthorize
    # it with force, then forward once more.
    FORCE = "force"
    # Someone rejected this key in Mender: an operator's decision, which stands.
    REJECTED = "rejected"
    # Another key holds the identity in Mender, and nothing here binds the identity to this certificate.
    CONTESTED = "contested"
    # Mender is deleting the device; the next request, once it is gone, preauthorizes it anew.
    DECOMMISSIONING = "decommissioning"
    # Mender no longer knows the device: the next request preauthorizes it anew.
    GONE = "gone"


# Auth sets through which a key holds an identity in Mender: an accepted one, or one that will be.
_HOLDING = frozenset({"accepted", "preauthorized"})


def readmission(device: MenderDevice | None, key: DeviceKey, *, bound: bool) -> Readmission:
    """How to answer Mender's refusal of ``key`` for ``device`` (what the 409 named, read again).

    ``bound``: the identity is this certificate's (``--identity pin`` or
    ``attribute``), so its key may take the identity from another key (a
    reissued certificate). Unbound (``none``), force is used only where no
    other key holds the identity: anything else would let any certificate of
    the fleet take any device's place in Mender."""
    if device is None:
        return Readmission.GONE
    if device.decommissioning:
        return Readmission.DECOMMISSIONING
    ours = [a for a in device.auth_sets if a.holds(key)]
    if any(a.status == "rejected" for a in ours):
        return Readmission.REJECTED
    if any(a.status in _HOLDING for a in ours):
        return Readmission.RETRY
    if not bound and any(a.status in _HOLDING for a in device.auth_sets if not a.holds(key)):
        return Readmission.CONTESTED
    return Readmission.FORCE
