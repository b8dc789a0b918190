"""A CRL's entries written as DER directly: a fleet's 100,000 revoked certificates in a fraction of a second.

cryptography makes each entry an object (``RevokedCertificateBuilder``) and
encodes it again when the list is signed: about 9 µs an entry together, most of
``imageprov crl``'s time at a fleet's size. An entry is three small fields
(RFC 5280, 5.1.2.6: serial, date, an optional reason code), so it is written
here. The rest of the CRL (issuer, dates, extensions, signature algorithm)
stays cryptography's: the entries go into the TBSCertList of a CRL it built
and signed without any, the result is signed with the same key and algorithm,
and cryptography loads it back. tests/test_properties.py checks that the bytes
are the ones cryptography writes for the same entries.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from imageprov.errors import PkiError
from imageprov.pki.registry_base import Reason

# RFC 5280 5.1.2.4: UTCTime through 2049, GeneralizedTime from 2050; a serial is positive and fits 20 octets.
_EARLIEST = dt.datetime(1950, 1, 1, tzinfo=dt.UTC)
_GENERALIZED_FROM = 2050
_MAX_SERIAL = 1 << 159
# ReasonCode (5.3.1) as an entry's only extension: SEQUENCE { SEQUENCE { id-ce-cRLReasons, OCTET STRING {
# ENUMERATED code } } }, not critical (the default, so absent in DER). "unspecified" is left out, as the RFC asks.
_REASON_CODES = {
    Reason.KEY_COMPROMISE: 1,
    Reason.CA_COMPROMISE: 2,
    Reason.AFFILIATION_CHANGED: 3,
    Reason.SUPERSEDED: 4,
    Reason.CESSATION_OF_OPERATION: 5,
    Reason.CERTIFICATE_HOLD: 6,
    Reason.PRIVILEGE_WITHDRAWN: 9,
}
_REASON_PREFIX = bytes.fromhex("300c300a0603551d1504030a01")
_REASONS = {reason: _REASON_PREFIX + bytes([code]) for reason, code in _REASON_CODES.items()}
_SEQUENCE, _INTEGER, _BIT_STRING, _EXTENSIONS = 0x30, 0x02, 0x03, 0xA0


def entry(serial_hex: str, revoked_at: str | None, reason: Reason | None, now: dt.datetime) -> bytes:
    """One revokedCertificates element; ``now`` stands in for a missing date. Raises on what no CA issues."""
    serial = int(serial_hex, 16)
    when = dt.datetime.fromisoformat(revoked_at) if revoked_at else now
    # A date without a zone is taken as UTC, as cryptography's builder takes it.
    when = when.replace(tzinfo=dt.UTC) if when.tzinfo is None else when.astimezone(dt.UTC)
    if not 0 < serial < _MAX_SERIAL or when < _EARLIEST:
        raise PkiError(
            f"the registry's record of serial {serial_hex} (revoked at {revoked_at}) cannot go in a CRL",
            hint="no certificate the CA issued has such a serial or date: was the registry edited by hand?",
        )
    # Positive and minimal: a leading zero octet exactly when the top bit is set.
    number = serial.to_bytes((serial.bit_length() + 8) // 8, "big")
    fields = (when.month, when.day, when.hour, when.minute, when.second)
    if when.year < _GENERALIZED_FROM:
        date = b"\x17\x0d%02d%02d%02d%02d%02d%02dZ" % (when.year % 100, *fields)
    else:
        date = b"\x18\x0f%04d%02d%02d%02d%02d%02dZ" % (when.year, *fields)
    body = b"\x02%c%b%b%b" % (len(number), number, date, _REASONS.get(reason, b"") if reason is not None else b"")
    return b"\x30%c%b" % (len(body), body)  # at most 54 octets: a one-octet length


def with_entries(
    empty: x509.CertificateRevocationList, entries: list[bytes], key: ec.EllipticCurvePrivateKey
) -> x509.CertificateRevocationList:
    """``empty`` (signed by ``key``, listing nobody) with ``entries`` added, signed again by ``key``."""
    if not entries:
        return empty
    tbs = list(_elements(empty.tbs_certlist_bytes))
    # TBSCertList (5.1): version, signature, issuer, thisUpdate, nextUpdate, [revokedCertificates], [0] extensions.
    at = next((n for n, (tag, _) in enumerate(tbs) if tag == _EXTENSIONS), len(tbs))
    revoked = _tlv(_SEQUENCE, b"".join(entries))
    body = b"".join(element for _, element in tbs[:at]) + revoked + b"".join(element for _, element in tbs[at:])
    signed_tbs = _tlv(_SEQUENCE, body)
    [_, (_, algorithm), _] = list(_elements(empty.public_bytes(serialization.Encoding.DER)))
    hash_algorithm = empty.signature_hash_algorithm
    if hash_algorithm is None:
        raise PkiError("the CRL's signature algorithm has no hash")  # ECDSA always has one
    signature = key.sign(signed_tbs, ec.ECDSA(hash_algorithm))
    der = _tlv(_SEQUENCE, signed_tbs + algorithm + _tlv(_BIT_STRING, b"\x00" + signature))
    return x509.load_der_x509_crl(der)


def _tlv(tag: int, body: bytes) -> bytes:
    size = len(body)
    if size < 0x80:
        return bytes((tag, size)) + body
    octets = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(octets))) + octets + body


def signed_parts(der: bytes) -> tuple[bytes, bytes]:
    """The TBSCertList and the signature of the CRL ``der``, as the bytes it holds (RFC 5280, 5.1).

    What a signature covers is these bytes: checked over them, a CRL needs no second encoding (cryptography's
    ``is_signature_valid`` writes a CRL of 100,000 entries out again, 0.2 s, to check it). Raises if ``der``
    is not exactly one such structure, so that what is checked is what cryptography parsed from the same bytes.
    """
    try:
        parts = list(_elements(der))
        _, _, end = _header(der, 0)
    except IndexError:
        parts, end = [], -1
    if (
        der[:1] != bytes([_SEQUENCE])
        or end != len(der)
        or [tag for tag, _ in parts] != [_SEQUENCE, _SEQUENCE, _BIT_STRING]
    ):
        raise PkiError("not a signed CRL (RFC 5280: a TBSCertList, an algorithm and a signature, nothing after)")
    (_, tbs), _, (_, bits) = parts
    _, body, _ = _header(bits, 0)
    if bits[body : body + 1] != b"\x00":
        raise PkiError("not a signed CRL: its signature is not a whole number of octets")
    return tbs, bits[body + 1 :]


def _elements(der: bytes) -> Iterator[tuple[int, bytes]]:
    """The (tag, whole element) pairs inside the outermost SEQUENCE of ``der`` (definite lengths: DER)."""
    _, start, end = _header(der, 0)
    at = start
    while at < end:
        tag, _, after = _header(der, at)
        if after > end:
            raise IndexError("an element runs past its SEQUENCE")
        yield tag, der[at:after]
        at = after


def _header(der: bytes, at: int) -> tuple[int, int, int]:
    """The tag at ``at``, where its body starts and where the element ends (IndexError past the end)."""
    tag, first = der[at], der[at + 1]
    if first < 0x80:
        return tag, at + 2, at + 2 + first
    count = first & 0x7F
    if not 0 < count <= 4 or at + 2 + count > len(der):  # no indefinite length in DER, and none over 4 GiB
        raise IndexError("not a DER length")
    size = int.from_bytes(der[at + 2 : at + 2 + count], "big")
    return tag, at + 2 + count, at + 2 + count + size
