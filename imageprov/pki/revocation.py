"""What the edge needs to refuse revoked devices: an X.509 v2 CRL and a plain denylist."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from imageprov.errors import PkiError
from imageprov.pki import crl_der
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
    # Entries made first: a record that cannot go in a CRL is refused before the CA's key signs anything.
    entries = [crl_der.entry(r.serial, r.revoked_at, r.reason, now) for r in revoked]
    empty = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        # An edge whose clock runs behind would refuse a CRL from its future
        # (OpenSSL: "CRL is not yet valid"), and with it every device.
        .last_update(now - BACKDATE)
        .next_update(now + dt.timedelta(days=days))
        .add_extension(x509.CRLNumber(number), critical=False)  # increases with every CRL
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
        .sign(ca.key, ca.curve.hash)
    )
    # The entries are written as DER (pki/crl_der.py): through the builder, a CRL of 100,000 took a second.
    return crl_der.with_entries(empty, entries, ca.key)


def crl_bytes(crl: x509.CertificateRevocationList, *, der: bool = False) -> bytes:
    return crl.public_bytes(serialization.Encoding.DER if der else serialization.Encoding.PEM)


def denylist(revoked: Sequence[Revoked]) -> bytes:
    """Revoked serials in lowercase hex, one per line (Mender Gateway's MTLS_BLACKLIST_PATH)."""
    return "".join(f"{r.serial}\n" for r in revoked).encode()
