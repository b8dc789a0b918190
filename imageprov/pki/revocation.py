"""What the edge needs to refuse revoked devices: an X.509 v2 CRL and a plain denylist."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from imageprov.errors import PkiError
from imageprov.pki.ca import BACKDATE, CertificateAuthority, check_days
from imageprov.pki.chain import crl_problem
from imageprov.pki.registry import Reason


class Revoked(Protocol):
    """What a CRL entry is made of: a registry ``Record``, or the ``Revocation`` that ``Registry.revocations`` reads."""

    @property
    def serial(self) -> str: ...
    @property
    def revoked_at(self) -> str | None: ...
    @property
    def reason(self) -> Reason | None: ...


def build_crl(
    ca: CertificateAuthority, revoked: Sequence[Revoked], *, number: int, days: int = 30
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
    # Every entry goes to the builder at once: add_revoked_certificate copies the builder's list on each
    # call, which made a CRL of 100,000 revoked certificates take tens of seconds (quadratic).
    entries = [_entry(record, now) for record in revoked]
    builder = (
        x509.CertificateRevocationListBuilder(revoked_certificates=entries)
        .issuer_name(ca.cert.subject)
        # An edge whose clock runs behind would refuse a CRL from its future
        # (OpenSSL: "CRL is not yet valid"), and with it every device.
        .last_update(now - BACKDATE)
        .next_update(now + dt.timedelta(days=days))
        .add_extension(x509.CRLNumber(number), critical=False)  # increases with every CRL
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
    )
    return builder.sign(ca.key, ca.curve.hash)


# RFC 5280 5.3.1: the reason code is omitted rather than "unspecified". Made once, shared by every entry.
_REASON_EXTENSIONS: dict[Reason, list[x509.Extension[x509.ExtensionType]]] = {
    reason: [x509.Extension(x509.CRLReason.oid, False, x509.CRLReason(reason.flag))]
    for reason in Reason
    if reason is not Reason.UNSPECIFIED
}
_NO_EXTENSIONS: list[x509.Extension[x509.ExtensionType]] = []
# What an entry can hold: a serial of at most 20 octets, positive (RFC 5280 4.1.2.2), a date from 1950 on.
_EARLIEST = dt.datetime(1950, 1, 1, tzinfo=dt.UTC)
_MAX_SERIAL = 1 << 159


def _entry(record: Revoked, now: dt.datetime) -> x509.RevokedCertificate:
    """One CRL entry, from the builder's constructor rather than its chained setters.

    The setters check and copy on every call: half the time of a CRL of 100,000. Their checks are made here,
    once, because the encoder behind the constructor does not make them (it panics on a date before 1950).
    """
    serial = int(record.serial, 16)
    when = dt.datetime.fromisoformat(record.revoked_at) if record.revoked_at else now
    if when.tzinfo is None:  # what the builder's setter assumes too
        when = when.replace(tzinfo=dt.UTC)
    if not 0 < serial < _MAX_SERIAL or when < _EARLIEST:
        raise PkiError(
            f"the registry's record of serial {record.serial} (revoked at {record.revoked_at}) cannot go in a CRL",
            hint="no certificate the CA issued has such a serial or date: was the registry edited by hand?",
        )
    extensions = _NO_EXTENSIONS if record.reason is None else _REASON_EXTENSIONS.get(record.reason, _NO_EXTENSIONS)
    return x509.RevokedCertificateBuilder(serial, when, extensions).build()


def crl_bytes(crl: x509.CertificateRevocationList, *, der: bool = False) -> bytes:
    return crl.public_bytes(serialization.Encoding.DER if der else serialization.Encoding.PEM)


def denylist(revoked: Sequence[Revoked]) -> bytes:
    """Revoked serials in lowercase hex, one per line (Mender Gateway's MTLS_BLACKLIST_PATH)."""
    return "".join(f"{r.serial}\n" for r in revoked).encode()
