"""The checks OpenSSL (and so nginx) and the edge make on a CA and the leaves it signs, as pure functions.

``ca import`` refuses a CA these find fault with, ``verify`` reports them, and
the edge's checks (edge/checks.py) are these same functions, so that neither
passes what the edge will refuse. Modelled on OpenSSL 3's ``X509_check_ca``
and ``check_purpose_ssl_client``/``_server`` (crypto/x509/v3_purp.c) and
``check_chain`` (x509_vfy.c): the default, non-strict mode that nginx's
``ssl_verify_client`` uses. Where the edge is stricter than OpenSSL (a client
certificate's keyUsage, critical extensions), so are these.

The device key rule (``device_key_problem``) is Mender's: what its deviceauth
service takes as an auth request's ``pubkey``.
"""

from __future__ import annotations

import datetime as dt

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, ObjectIdentifier

CLIENT = ExtendedKeyUsageOID.CLIENT_AUTH
SERVER = ExtendedKeyUsageOID.SERVER_AUTH
_PURPOSE_NAMES = {CLIENT: "TLS clients (clientAuth)", SERVER: "TLS servers (serverAuth)"}

# The extensions these checks act on. RFC 5280, 4.2: a certificate with a
# critical extension the verifier does not process must be rejected; the edge
# processes no policies and no name constraints, so those count as unknown too.
# subjectAltName must be critical when the subject is empty (4.2.1.6), and
# names are never what the edge decides on.
HANDLED_EXTENSIONS = frozenset({
    ExtensionOID.BASIC_CONSTRAINTS,
    ExtensionOID.KEY_USAGE,
    ExtensionOID.EXTENDED_KEY_USAGE,
    ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
})  # fmt: skip

# What deviceauth takes (backend/services/deviceauth/utils/crypto.go in
# mender-server): ParsePubKey is Go's x509.ParsePKIXPublicKey, which knows
# these NIST curves; SerializePubKey then keeps RSA, ECDSA and Ed25519 only.
MENDER_CURVES = frozenset({"secp224r1", "secp256r1", "secp384r1", "secp521r1"})
# Go's crypto/rsa (1.24 and later, the server's go.mod says 1.25) refuses to
# verify with a modulus under 1024 bits, an even modulus, and an exponent that is
# even, below 3 or above 2^31 - 1 (crypto/internal/fips140/rsa: checkPublicKey).
MENDER_RSA_MIN_BITS = 1024
MENDER_RSA_MAX_EXPONENT = 2**31 - 1


def _get(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> x509.ExtensionType | None:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def extension_problem(cert: x509.Certificate) -> str | None:
    """Why ``cert``'s extensions cannot be read (a duplicate, a malformed value), as OpenSSL refuses them too."""
    try:
        cert.extensions  # noqa: B018 - parsed on first access
    except (ValueError, x509.DuplicateExtension) as exc:
        return f"its extensions do not parse ({exc})"
    return None


def unhandled_critical(cert: x509.Certificate, processed: frozenset[ObjectIdentifier] = frozenset()) -> list[str]:
    """The critical extensions of ``cert`` that no check here (nor the caller: ``processed``) processes: each makes
    it unusable."""
    found = []
    for extension in cert.extensions:
        if extension.critical and extension.oid not in HANDLED_EXTENSIONS | processed:
            name = extension.oid.dotted_string
            if not isinstance(extension.value, x509.UnrecognizedExtension):
                name = f"{type(extension.value).__name__}, {name}"
            found.append(f"it has a critical extension imageprov does not process ({name})")
    return found


def ca_problems(ca: x509.Certificate, *, purposes: tuple[ObjectIdentifier, ...] = (CLIENT,)) -> list[str]:
    """Why OpenSSL or the edge would not take ``ca`` as the issuer of leaves for ``purposes``; empty if both would."""
    unreadable = extension_problem(ca)
    if unreadable is not None:
        return [unreadable]
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
    return problems + unhandled_critical(ca)


def usage_problems(leaf: x509.Certificate, *, purpose: ObjectIdentifier = CLIENT) -> list[str]:
    """Why ``leaf``'s keyUsage or extendedKeyUsage do not allow TLS use for ``purpose``; empty if they do.

    An absent extension restricts nothing (RFC 5280, 4.2.1.3 and 4.2.1.12):
    Mender's documented openssl recipe makes v1 device certificates without
    any, and they are good client certificates.
    """
    problems = []
    usage = _get(leaf, x509.KeyUsage)
    if isinstance(usage, x509.KeyUsage):
        if not (usage.digital_signature or usage.key_agreement):
            problems.append("its keyUsage allows neither digitalSignature nor keyAgreement, which TLS needs")
        elif purpose == CLIENT and not usage.digital_signature:
            # A TLS client proves its key by signing (CertificateVerify); static
            # ECDH client certificates are gone from TLS 1.3 and from Go and
            # OpenSSL 1.1+. OpenSSL's purpose check still passes keyAgreement.
            problems.append("its keyUsage does not allow digitalSignature, which a TLS client signs the handshake with")
    extended = _get(leaf, x509.ExtendedKeyUsage)
    if isinstance(extended, x509.ExtendedKeyUsage) and purpose not in extended:
        # anyExtendedKeyUsage alone does not do: OpenSSL, and so nginx, refuses
        # such a client certificate (v3_purp.c, xku_reject), so the edge does too.
        problems.append(f"its extendedKeyUsage does not allow {_PURPOSE_NAMES.get(purpose, purpose)}")
    return problems


def leaf_problems(
    leaf: x509.Certificate,
    ca: x509.Certificate,
    *,
    purpose: ObjectIdentifier = CLIENT,
    now: dt.datetime | None = None,
    processed: frozenset[ObjectIdentifier] = frozenset(),
) -> list[str]:
    """Why ``openssl verify -purpose ssl{client,server}`` or the edge would refuse ``leaf`` issued by ``ca``,
    besides its signature and its own validity period.

    The signature (and with it the issuer's name and key) is checked by the
    caller, with ``verify_directly_issued_by``; critical extensions in ``processed``, by the caller too.
    """
    moment = now or dt.datetime.now(dt.UTC)
    problems = [f"the CA: {p}" for p in ca_problems(ca, purposes=(purpose,))]
    if not ca.not_valid_before_utc <= moment <= ca.not_valid_after_utc:
        problems.append(
            f"the CA certificate is valid only {ca.not_valid_before_utc:%Y-%m-%d} to {ca.not_valid_after_utc:%Y-%m-%d}"
        )
    unreadable = extension_problem(leaf)
    if unreadable is not None:
        return [*problems, unreadable]
    return problems + usage_problems(leaf, purpose=purpose) + unhandled_critical(leaf, processed)


def crl_problem(ca: x509.Certificate) -> str | None:
    """Why OpenSSL would refuse the CRLs ``ca`` signs (X509_V_ERR_KEYUSAGE_NO_CRL_SIGN); None if it would not."""
    usage = _get(ca, x509.KeyUsage)
    if isinstance(usage, x509.KeyUsage) and not usage.crl_sign:
        return "its keyUsage does not allow cRLSign (signing CRLs)"
    return None


def device_key_problem(key: object) -> str | None:
    """Why Mender's server would refuse ``key`` as a device's auth key; None if it takes it."""
    if isinstance(key, rsa.RSAPublicKey):
        numbers = key.public_numbers()
        if key.key_size < MENDER_RSA_MIN_BITS:
            return f"it is a {key.key_size}-bit RSA key; Mender takes {MENDER_RSA_MIN_BITS} bits or more"
        # An even exponent, or one below 3, cryptography refuses to load already.
        if numbers.n % 2 == 0 or numbers.e > MENDER_RSA_MAX_EXPONENT:
            return "it is an RSA key with an even modulus, or an exponent above 2^31 - 1"
        return None
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in MENDER_CURVES:
            return f"it is on curve {key.curve.name}; Mender takes P-224, P-256, P-384 and P-521"
        return None
    if isinstance(key, ed25519.Ed25519PublicKey):
        return None
    return "it is not an RSA, ECDSA or Ed25519 key"
