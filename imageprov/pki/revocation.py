"""What the edge needs to refuse revoked devices: an X.509 v2 CRL and a plain denylist."""

from __future__ import annotations

import datetime as dt

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from imageprov.errors import PkiError
from imageprov.pki.ca import BACKDATE, CertificateAuthority, check_days
from imageprov.pki.chain import crl_problem
from imageprov.pki.registry import Record


def build_crl(
    ca: CertificateAuthority, revoked: list[Record], *, number: int, days: int = 30
) -> x509.CertificateRevocationList:
    """A CRL signed by ``ca`` listing ``revoked`` with their dates and reasons.

    nginx and OpenSSL refuse every client once ``nextUpdate`` has passed, so
    the edge must get a fresh CRL before ``days`` run out.
    """
    check_days(days)
    refused = crl_problem(ca.cert)
    if refused:
        raise PkiError(
            f"nginx would refuse a CRL from this CA: {refused}",
            hint="publish a denylist instead ('imageprov denylist'), or reissue the CA with cRLSign",
        )
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        # An edge whose clock runs behind would refuse a CRL from its future
        # (OpenSSL: "CRL is not yet valid"), and with it every device.
        .last_update(now - BACKDATE)
        .next_update(now + dt.timedelta(days=days))
        .add_extension(x509.CRLNumber(number), critical=False)  # increases with every CRL
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
    )
    for record in revoked:
        entry = x509.RevokedCertificateBuilder().serial_number(int(record.serial, 16))
        entry = entry.revocation_date(dt.datetime.fromisoformat(record.revoked_at or now.isoformat()))
        if record.reason is not None and record.reason.value != "unspecified":
            # RFC 5280 5.3.1: the reason code is omitted rather than "unspecified".
            entry = entry.add_extension(x509.CRLReason(record.reason.flag), critical=False)
        builder = builder.add_revoked_certificate(entry.build())
    return builder.sign(ca.key, ca.curve.hash)


def crl_bytes(crl: x509.CertificateRevocationList, *, der: bool = False) -> bytes:
    return crl.public_bytes(serialization.Encoding.DER if der else serialization.Encoding.PEM)


def denylist(revoked: list[Record]) -> bytes:
    """Revoked serials in lowercase hex, one per line (Mender Gateway's MTLS_BLACKLIST_PATH)."""
    return "".join(f"{r.serial}\n" for r in revoked).encode()
