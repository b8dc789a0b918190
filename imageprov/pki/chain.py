"""The checks OpenSSL (and so nginx) makes on a CA and the leaves it signs, as pure functions.

``ca import`` refuses a CA these find fault with, and ``verify`` reports them,
so that neither passes what the edge will refuse. Modelled on OpenSSL 3's
``X509_check_ca`` and ``check_purpose_ssl_client``/``_server`` (crypto/x509/
v3_purp.c) and ``check_chain`` (x509_vfy.c): the default, non-strict mode that
nginx's ``ssl_verify_client`` uses.
"""

from __future__ import annotations

import datetime as dt

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, ObjectIdentifier

CLIENT = ExtendedKeyUsageOID.CLIENT_AUTH
SERVER = ExtendedKeyUsageOID.SERVER_AUTH
_PURPOSE_NAMES = {CLIENT: "TLS clients (clientAuth)", SERVER: "TLS servers (serverAuth)"}


def _get(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> x509.ExtensionType | None:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _unhandled_critical(cert: x509.Certificate) -> list[str]:
    return [
        f"it has a critical extension OpenSSL does not know ({e.oid.dotted_string})"
        for e in cert.extensions
        if e.critical and isinstance(e.value, x509.UnrecognizedExtension)
    ]


def ca_problems(ca: x509.Certificate, *, purposes: tuple[ObjectIdentifier, ...] = (CLIENT,)) -> list[str]:
    """Why OpenSSL would not take ``ca`` as the issuer of leaves for ``purposes``; empty if it would."""
    problems = []
    usage = _get(ca, x509.KeyUsage)
    constraints = _get(ca, x509.BasicConstraints)
    if isinstance(usage, x509.KeyUsage) and not usage.key_cert_sign:
        problems.append("its keyUsage does not allow keyCertSign (signing certificates)")
    if isinstance(constraints, x509.BasicConstraints):
        if not constraints.ca:
            problems.append("it is not a CA (basicConstraints CA:FALSE)")
    elif ca.version is not x509.Version.v1 or ca.issuer != ca.subject:
        # OpenSSL takes a self-signed v1 certificate as a CA; imageprov does
        # not go further (a v3 certificate without basicConstraints is a CA to
        # OpenSSL only through its keyUsage, and to Go never).
        problems.append("it has no basicConstraints and is not a CA")
    extended = _get(ca, x509.ExtendedKeyUsage)
    if isinstance(extended, x509.ExtendedKeyUsage):
        # OpenSSL applies a CA's extendedKeyUsage to every leaf below it, and
        # anyExtendedKeyUsage does not count (v3_purp.c, xku_reject).
        for purpose in purposes:
            if purpose not in extended:
                problems.append(f"its extendedKeyUsage does not allow {_PURPOSE_NAMES.get(purpose, purpose)}")
    return problems + _unhandled_critical(ca)


def leaf_problems(
    leaf: x509.Certificate,
    ca: x509.Certificate,
    *,
    purpose: ObjectIdentifier = CLIENT,
    now: dt.datetime | None = None,
) -> list[str]:
    """Why ``openssl verify -purpose ssl{client,server}`` would refuse ``leaf`` issued by ``ca``, besides its signature.

    The signature (and with it the issuer's name and key) is checked by the
    caller, with ``verify_directly_issued_by``.
    """
    moment = now or dt.datetime.now(dt.UTC)
    problems = [f"the CA: {p}" for p in ca_problems(ca, purposes=(purpose,))]
    if not ca.not_valid_before_utc <= moment <= ca.not_valid_after_utc:
        problems.append(
            f"the CA certificate is valid only {ca.not_valid_before_utc:%Y-%m-%d} to {ca.not_valid_after_utc:%Y-%m-%d}"
        )
    usage = _get(leaf, x509.KeyUsage)
    if isinstance(usage, x509.KeyUsage) and not (usage.digital_signature or usage.key_agreement):
        problems.append("its keyUsage allows neither digitalSignature nor keyAgreement, which TLS needs")
    return problems + _unhandled_critical(leaf)


def crl_problem(ca: x509.Certificate) -> str | None:
    """Why OpenSSL would refuse the CRLs ``ca`` signs (X509_V_ERR_KEYUSAGE_NO_CRL_SIGN); None if it would not."""
    usage = _get(ca, x509.KeyUsage)
    if isinstance(usage, x509.KeyUsage) and not usage.crl_sign:
        return "its keyUsage does not allow cRLSign (signing CRLs)"
    return None
