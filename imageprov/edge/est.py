"""Enrollment at first boot: EST (RFC 7030) in ``edge serve --est``, for keys that never leave the device.

A device stamped with a bootstrap certificate (``pki.ca.issue_bootstrap``)
makes a key in its TPM or secure element at first boot and asks, over mTLS
with the bootstrap certificate, for a device certificate of that key:

- ``GET cacerts``: the fleet CA, certs-only PKCS#7 (RFC 7030, 4.1);
- ``POST simpleenroll``: a PKCS#10 request; the client authenticates with its
  bootstrap certificate (4.2.1);
- ``POST simplereenroll``: the same, with the device's live certificate, to
  renew it before it expires (4.2.2).

nginx verifies the TLS client certificate and passes it in ``X-SSL-Client-Cert``
(``edge nginx --est``); every check is made again here. The credential: signed
by the fleet CA, valid now, for clientAuth; of the operation's profile (a
bootstrap certificate at simpleenroll, never one at simplereenroll); not
revoked by a CRL or denylist; and in the registry, of that kind, delivered,
not revoked and not used before. The request: DER, base64 (RFC 8951), its
signature verifies with the key it names (proof of possession), its subject's
CN is the credential's device id, its key is one Mender takes (EC P-256, P-384,
P-521; RSA of 2048 bits or more, 3072 as the Mender client makes them; Ed25519)
and, at simpleenroll, not the bootstrap certificate's own key, which the image
holds in a file. Nothing else of the request is taken: the CA sets the subject,
the validity and every extension (``CertificateAuthority.certify_device``).

Then the CA (its key in a file or on a PKCS#11 token) signs, and the registry
records the new certificate as the device's live one and the credential used,
in one transaction (``Registry.enroll``): a second enrollment with it is
refused (403) and logged as a possible clone, unless it asks for the key that
the first one certified (its answer was lost: that certificate is replaced).

The decisions are the pure functions below (``parse_csr``, ``check_csr``,
``check_verdict``...), each refusal a ``checks.Refused`` with its reason; the
handlers parse, call them, and answer: 400 with a plain-text reason for a bad
request, 401 without a client certificate, 403 for one that may not enroll,
503 with Retry-After when the registry or a revocation source cannot answer.
One JSON log line per request, and ``imageprov_edge_enrollments`` by result.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
import enum
import functools
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import ExtensionOID, NameOID

from imageprov.edge import checks
from imageprov.edge.checks import Reason, Refused
from imageprov.edge.http import (
    CERT_HEADER,
    GATE,
    METRICS,
    SETTINGS,
    check_revocation_sources,
    signed_by_fleet_ca,
)
from imageprov.edge.nginx import EST_CACERTS, EST_SIMPLEENROLL, EST_SIMPLEREENROLL
from imageprov.errors import ImageprovError, UsageError
from imageprov.pki import chain
from imageprov.pki.ca import CertificateAuthority, bootstrap_problems
from imageprov.pki.registry import EnrollResult, EnrollVerdict, Kind

log = logging.getLogger("imageprov.edge")

# The keys Mender takes that the edge certifies: deviceauth's (chain.device_key_problem), less what is weak
# today. RSA 3072 is what the Mender client generates (support/keygen-client); 2048 is the floor.
CURVES = frozenset({"secp256r1", "secp384r1", "secp521r1"})
RSA_MIN_BITS = 2048
# The content types of RFC 7030: a request (4.2.1), a CA's certificates (4.1.3), an issued one (4.2.3).
PKCS10 = "application/pkcs10"
CACERTS_TYPE = "application/pkcs7-mime"
CERTS_ONLY_TYPE = "application/pkcs7-mime; smime-type=certs-only"
# Statuses other than 403 (a credential that may not enroll).
_STATUS = {
    Reason.BAD_REQUEST: 400,
    Reason.BAD_CSR: 400,
    Reason.CSR_SIGNATURE: 400,
    Reason.CN_MISMATCH: 400,
    Reason.KEY_REFUSED: 400,
    Reason.KEY_REUSED: 400,
    Reason.NO_CERTIFICATE: 401,
    Reason.BUSY: 503,
}


class Operation(enum.Enum):
    """An EST request that issues a certificate, and the credential it takes."""

    ENROLL = "simpleenroll"  # with a bootstrap certificate
    REENROLL = "simplereenroll"  # with the device's live certificate

    @property
    def credential(self) -> Kind:
        return Kind.BOOTSTRAP if self is Operation.ENROLL else Kind.DEVICE


@dataclass(frozen=True)
class EstSettings:
    """What ``edge serve --est`` needs besides the service's settings: the CA that signs, for how long."""

    ca: CertificateAuthority
    days: int = 365


EST = web.AppKey("est", EstSettings)
CACERTS = web.AppKey("est_cacerts", bytes)


# -- the decisions ------------------------------------------------------------------------------------


def check_credential(cert: x509.Certificate, operation: Operation, now: dt.datetime) -> None:
    """The client certificate's profile is the operation's, and it is valid now for TLS client use.

    (Its signature by the fleet CA is checked apart, once per certificate.) A bootstrap certificate's
    critical policy is the one critical extension processed here, and only where one is taken."""
    if operation is Operation.ENROLL:
        problems = bootstrap_problems(cert)
        if problems:
            raise Refused(Reason.NOT_BOOTSTRAP, f"simpleenroll takes a bootstrap certificate: {'; '.join(problems)}")
        checks.check_validity_and_usage(cert, now, processed=frozenset({ExtensionOID.CERTIFICATE_POLICIES}))
    else:
        checks.check_not_bootstrap(cert)
        checks.check_validity_and_usage(cert, now)


def parse_csr(body: bytes) -> x509.CertificateSigningRequest:
    """A PKCS#10 request as EST sends it: base64 of its DER (RFC 8951), line breaks allowed."""
    try:
        der = base64.b64decode(b"".join(body.split()), validate=True)
        csr = x509.load_der_x509_csr(der)
        # Parsed lazily: read now, so that no check meets a parse error.
        csr.subject, csr.public_key()
    except (binascii.Error, ValueError) as exc:
        raise Refused(Reason.BAD_CSR, "the body is not a base64 DER PKCS#10 certificate request") from exc
    except UnsupportedAlgorithm as exc:
        raise Refused(Reason.KEY_REFUSED, "the request's key is of a type Mender does not take") from exc
    return csr


def key_problem(key: object) -> str | None:
    """Why the edge will not certify ``key`` for a device; None if it will."""
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < RSA_MIN_BITS:
        return f"it is a {key.key_size}-bit RSA key: at least {RSA_MIN_BITS} bits (3072 recommended)"
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name not in CURVES:
        return f"it is on curve {key.curve.name}: P-256, P-384 or P-521"
    if not isinstance(key, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey)):
        return "it is not an RSA, EC or Ed25519 key"
    return chain.device_key_problem(key)  # what else Mender's server refuses (Go's RSA rules)


def check_csr(
    csr: x509.CertificateSigningRequest, credential: x509.Certificate, operation: Operation
) -> CertificatePublicKeyTypes:
    """The request proves possession of its key, names the credential's device, and its key may be certified;
    returns that key."""
    try:
        possessed = csr.is_signature_valid
    except (UnsupportedAlgorithm, ValueError):  # a signature algorithm cryptography does not know
        possessed = False
    if not possessed:
        raise Refused(Reason.CSR_SIGNATURE, "the request's signature does not verify with its key")
    device_id = checks.common_name(credential)
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not device_id or len(names) != 1 or names[0].value != device_id:
        raise Refused(Reason.CN_MISMATCH, f"the request's subject CN must be the certificate's device id {device_id!r}")
    key = csr.public_key()
    problem = key_problem(key)
    if problem is not None:
        raise Refused(Reason.KEY_REFUSED, f"the request's key: {problem}")
    if operation is Operation.ENROLL and key == credential.public_key():
        raise Refused(Reason.KEY_REUSED, "the request names the bootstrap certificate's own key: make a new one")
    return key


def check_verdict(result: EnrollResult, operation: Operation) -> None:
    """Refuse unless the registry enrolled (or repeated an enrollment for the same key)."""
    verdict = result.verdict
    if verdict in (EnrollVerdict.ENROLLED, EnrollVerdict.REPEATED):
        return
    if verdict is EnrollVerdict.USED:
        raise Refused(
            Reason.CREDENTIAL_USED, f"this certificate was used to enroll already (certificate {result.other})"
        )
    if verdict is EnrollVerdict.WRONG_KIND:
        if operation is Operation.ENROLL:
            raise Refused(Reason.NOT_BOOTSTRAP, "simpleenroll takes a bootstrap certificate (registry)")
        raise Refused(Reason.BOOTSTRAP, "simplereenroll takes the device's certificate (registry)")
    refusals = {
        EnrollVerdict.UNKNOWN: (Reason.UNKNOWN_CERTIFICATE, "the registry has no record of this certificate"),
        EnrollVerdict.NOT_DELIVERED: (Reason.NOT_DELIVERED, "the certificate was never confirmed delivered"),
        EnrollVerdict.REVOKED: (Reason.REVOKED, "the certificate is revoked (registry)"),
        EnrollVerdict.SUPERSEDED: (Reason.SUPERSEDED, f"the device has a newer certificate ({result.other})"),
        EnrollVerdict.BUSY: (Reason.BUSY, "the device is being stamped; try again"),
    }
    reason, message = refusals[verdict]
    raise Refused(reason, message)


def certs_only(certs: list[x509.Certificate]) -> bytes:
    """A certs-only PKCS#7 (CMS SignedData, no signers) of ``certs``, base64 in lines of 64, as ``openssl base64``
    writes and reads them (RFC 7030 4.1.3 and 4.2.3; RFC 8951: base64 whatever Content-Transfer-Encoding says)."""
    text = base64.b64encode(pkcs7.serialize_certificates(certs, serialization.Encoding.DER))
    return b"".join(text[i : i + 64] + b"\n" for i in range(0, len(text), 64))


# -- the HTTP layer ------------------------------------------------------------------------------------


@dataclass
class Decision:
    """What one log line says about one (re)enrollment."""

    operation: Operation
    started: float = field(default_factory=time.monotonic)
    cn: str | None = None
    serial: str | None = None
    decision: str = "refused"
    reason: str | None = None
    issued: str | None = None  # the new certificate's serial
    replaced: str | None = None  # the device certificate it supersedes, if any
    repeated: bool = False  # the credential's enrollment, asked again by the key it certified
    possible_clone: bool = False

    def line(self) -> dict[str, Any]:
        line = {
            "time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
            "event": "est",
            "operation": self.operation.value,
            "cn": self.cn,
            "serial": self.serial,
            "decision": self.decision,
            "reason": self.reason,
            "issued": self.issued,
            "replaced": self.replaced,
            "repeated": self.repeated,
            "possible_clone": self.possible_clone,
            "ms": round((time.monotonic() - self.started) * 1000, 1),
        }
        if self.possible_clone:
            line["level"] = "warning"
            line["message"] = (
                f"possible clone: certificate {self.serial} of {self.cn} was used to enroll already, and is "
                "presented again: a second device may hold its key"
            )
        return line


def _text(status: int, message: str, **headers: str) -> web.Response:
    # RFC 7030, 4.2.3: an error's body is a human-readable message in plain text.
    return web.Response(status=status, text=message + "\n", content_type="text/plain", headers=headers or None)


async def cacerts(request: web.Request) -> web.Response:
    """The fleet CA, for a device to trust what the edge issues (RFC 7030, 4.1)."""
    headers = {"Content-Type": CACERTS_TYPE, "Content-Transfer-Encoding": "base64"}
    return web.Response(body=request.app[CACERTS], headers=headers)


async def simpleenroll(request: web.Request) -> web.Response:
    return await _enroll(request, Operation.ENROLL)


async def simplereenroll(request: web.Request) -> web.Response:
    return await _enroll(request, Operation.REENROLL)


async def _enroll(request: web.Request, operation: Operation) -> web.Response:
    decision = Decision(operation)
    try:
        response = await _decide(request, decision)
    except Exception:  # a bug: logged with its traceback; the device gets 500 and retries
        log.exception(f"{operation.value} failed")
        decision.decision, decision.reason = "error", "internal-error"
        response = _text(500, "internal error")
    finally:
        result = "repeated" if decision.repeated else decision.decision
        request.app[METRICS].enrollments.labels(
            operation=operation.value, result=result, reason=decision.reason or ""
        ).inc()
        (log.warning if decision.possible_clone else log.info)(operation.value, extra={"fields": decision.line()})
    return response


async def _decide(request: web.Request, decision: Decision) -> web.Response:
    app, operation = request.app, decision.operation
    retry = {"Retry-After": str(app[SETTINGS].retry_after)}
    try:
        if request.content_type != PKCS10:
            decision.reason = Reason.BAD_REQUEST.value
            return _text(415, f"the request's Content-Type must be {PKCS10}")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            decision.reason = Reason.BAD_REQUEST.value
            return _text(413, "the certificate request is too large")
        credential = checks.parse_client_cert(request.headers.get(CERT_HEADER))
        decision.cn, decision.serial = checks.common_name(credential), checks.serial_hex(credential)
        signed_by_fleet_ca(app, credential)
        check_credential(credential, operation, dt.datetime.now(dt.UTC))
        await check_revocation_sources(app, decision.serial)
        key = check_csr(parse_csr(body), credential, operation)
        spki = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
        gate = app[GATE]
        # Asked first, so that a refused credential costs no signature (the CA's key may be on a slow token).
        check_verdict(await gate.enrollment_verdict(decision.serial, spki, operation.credential), operation)
        est = app[EST]
        sign = functools.partial(est.ca.certify_device, decision.cn, key, days=est.days)
        issued = await asyncio.get_running_loop().run_in_executor(None, sign)
        result = await gate.enroll(decision.serial, issued, operation.credential, f"EST {operation.value}")
        check_verdict(result, operation)
    except Refused as refused:
        decision.reason = refused.reason.value
        decision.possible_clone = refused.reason is Reason.CREDENTIAL_USED
        status = _STATUS.get(refused.reason, 403)
        return _text(status, refused.message, **(retry if status == 503 else {}))
    except ImageprovError as exc:  # the registry, a revocation source, or the CA (expired) cannot answer now
        decision.decision, decision.reason = "unavailable", "unavailable"
        log.warning(f"{operation.value}: {exc}")
        return _text(503, "the edge cannot enroll now; try again", **retry)
    assert result.record is not None
    decision.decision, decision.issued = "enrolled", result.record.serial
    decision.replaced, decision.repeated = result.other, result.verdict is EnrollVerdict.REPEATED
    headers = {"Content-Type": CERTS_ONLY_TYPE, "Content-Transfer-Encoding": "base64"}
    return web.Response(body=certs_only([issued]), headers=headers)


def install(app: web.Application, est: EstSettings) -> None:
    """Add the EST routes to the application of ``edge serve`` (``http.make_app``), signing with ``est.ca``."""
    settings = app[SETTINGS]
    if settings.registry_dir is None:
        raise UsageError(
            "--est records every certificate it issues in the PKI's registry, and there is none",
            hint="pass --pki PKI, without --no-registry",
        )
    if est.ca.cert != settings.ca_cert:
        raise UsageError(f"--est signs with the CA of the PKI, and --ca {settings.ca_path} is another CA")
    app[EST] = est
    app[CACERTS] = certs_only([est.ca.cert])
    app.router.add_get(EST_CACERTS, cacerts)
    app.router.add_post(EST_SIMPLEENROLL, simpleenroll)
    app.router.add_post(EST_SIMPLEREENROLL, simplereenroll)
