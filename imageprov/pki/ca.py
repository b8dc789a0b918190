"""The fleet's CA, the edge's server certificate, per-device client certificates and bootstrap certificates.

Modelled on trustme: a ``CertificateAuthority`` issues leaves; one builder sets
subject, issuer, validity, serial and key identifiers, and each kind of
certificate adds only the extensions that differ. Outputs are small objects
that know how to write themselves. Keys are EC (P-256 unless asked otherwise),
made with the OS's CSPRNG by ``cryptography``; a device certificate may also be
issued for a key made elsewhere (``certify_device``: a device's TPM, through EST).
"""

from __future__ import annotations

import configparser
import datetime as dt
import enum
import ipaddress
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPublicKeyTypes, CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID, ObjectIdentifier

from imageprov.errors import PkiError, UsageError
from imageprov.pki.chain import SERVER, ca_problems
from imageprov.pki.pkcs11 import KEY_REFERENCE, KeyReference, PinSource

CA_CERT = "ca-cert.pem"
CA_KEY = "ca-private.key"
CA_KEY_REFERENCE = KEY_REFERENCE  # instead of CA_KEY when the key is on a PKCS#11 token
Passphrase = bytes | None | Callable[[], bytes | None]
# Leaves are backdated a little: a device or edge whose clock runs a few
# minutes behind the signing station must not see a certificate "not yet valid".
BACKDATE = dt.timedelta(minutes=5)
# The longest validity (and CRL lifetime) taken, in days: a hundred years, far inside what X.509's
# GeneralizedTime and Python's datetime hold (year 9999), so that no --days ever overflows them.
MAX_DAYS = 36500
# The policy that marks a bootstrap certificate: "imageprov bootstrap, enrollment (EST) only". imageprov has
# no registered arc, so the OID is a UUID under 2.25 (ITU-T X.667 / RFC 4122 section 4, ISO/IEC 9834-8),
# generated once (2e8aa5c3-e8d8-4a77-a1ac-468206e1334c) and fixed here: every edge and every device of
# every fleet recognise bootstrap certificates by it, so it never changes.
BOOTSTRAP_POLICY = ObjectIdentifier("2.25.61864386891722231090998972135304672076")
# How long a bootstrap certificate lives unless asked otherwise: from the line to the device's first boot,
# which may be a year or two on a shelf. It is single-use: revoked the moment it enrolls.
BOOTSTRAP_DAYS = 730


def check_days(days: int) -> None:
    """Refuse a validity no certificate or CRL can carry (``--days``, 1 to MAX_DAYS)."""
    if days < 1:
        raise UsageError("--days must be at least 1")
    if days > MAX_DAYS:
        raise UsageError(f"--days {days} is more than {MAX_DAYS}", hint="a hundred years at most")


class Curve(enum.Enum):
    P256 = "P-256"
    P384 = "P-384"
    P521 = "P-521"

    def generate(self) -> ec.EllipticCurvePrivateKey:
        """A new private key on this curve."""
        return ec.generate_private_key(self.ec_curve)

    @property
    def ec_curve(self) -> ec.EllipticCurve:
        return {"P-256": ec.SECP256R1(), "P-384": ec.SECP384R1(), "P-521": ec.SECP521R1()}[self.value]

    @property
    def hash(self) -> hashes.SHA256 | hashes.SHA384 | hashes.SHA512:
        """The hash that matches the curve's strength (RFC 5480, section 4)."""
        if self is Curve.P256:
            return hashes.SHA256()
        return hashes.SHA384() if self is Curve.P384 else hashes.SHA512()


NAME_OIDS = (
    ("country", NameOID.COUNTRY_NAME),
    ("state", NameOID.STATE_OR_PROVINCE_NAME),
    ("locality", NameOID.LOCALITY_NAME),
    ("organization", NameOID.ORGANIZATION_NAME),
    ("organizational_unit", NameOID.ORGANIZATIONAL_UNIT_NAME),
    ("common_name", NameOID.COMMON_NAME),
    ("email", NameOID.EMAIL_ADDRESS),
)
# openssl config keys, long and short forms, to our fields.
CONFIG_KEYS = {
    "commonname": "common_name", "cn": "common_name",
    "organizationname": "organization", "o": "organization",
    "organizationalunitname": "organizational_unit", "ou": "organizational_unit",
    "emailaddress": "email",
    "countryname": "country", "c": "country",
    "localityname": "locality", "l": "locality",
    "stateorprovincename": "state", "st": "state",
}  # fmt: skip


@dataclass(frozen=True)
class Subject:
    """A distinguished name, with the fields of the manual recipe's openssl configs."""

    common_name: str
    organization: str | None = None
    organizational_unit: str | None = None
    email: str | None = None
    country: str | None = None
    locality: str | None = None
    state: str | None = None

    def to_name(self) -> x509.Name:
        """The X.509 name, in the usual C, ST, L, O, OU, CN order."""
        if self.country is not None and len(self.country) != 2:
            raise UsageError(f"country {self.country!r} must be a two-letter code, e.g. NO")
        attributes = []
        for field, oid in NAME_OIDS:
            value = getattr(self, field)
            if value:
                attributes.append(x509.NameAttribute(oid, value))
        return x509.Name(attributes)

    @classmethod
    def from_name(cls, name: x509.Name) -> Subject:
        values: dict[str, str] = {}
        for field, oid in NAME_OIDS:
            found = name.get_attributes_for_oid(oid)
            if found:
                values[field] = str(found[0].value)
        return cls(**{"common_name": "", **values})

    @classmethod
    def from_req_config(cls, path: Path) -> Subject:
        """Read ``[req_distinguished_name]`` of an openssl request config (the manual recipe's ca-cert.conf)."""
        parser = configparser.ConfigParser(interpolation=None, strict=False)
        try:
            parser.read_string("[_top]\n" + path.read_text())
        except OSError as exc:
            raise UsageError(f"cannot read the openssl config {path}: {exc.strerror}") from exc
        except UnicodeDecodeError:
            raise UsageError(f"the openssl config {path} is not UTF-8 text") from None
        except configparser.Error as exc:
            raise UsageError(f"cannot read the openssl config {path}: {exc}") from exc
        if not parser.has_section("req_distinguished_name"):
            raise UsageError(f"{path} has no [req_distinguished_name] section")
        values: dict[str, str] = {}
        for key, value in parser.items("req_distinguished_name"):
            field = CONFIG_KEYS.get(key.lower())
            if field is None:
                raise UsageError(f"{path}: unknown field {key!r} in [req_distinguished_name]")
            values[field] = value.strip()
        if "common_name" not in values:
            raise UsageError(f"{path}: [req_distinguished_name] has no commonName")
        return cls(**values)


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key, as issued."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        """The private key, unencrypted PKCS#8: what the Mender client and nginx read."""
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    @property
    def serial_hex(self) -> str:
        return f"{self.cert.serial_number:x}"

    @property
    def fingerprint(self) -> str:
        return self.cert.fingerprint(hashes.SHA256()).hex()

    def write_to(self, directory: Path, cert_name: str, key_name: str) -> tuple[Path, Path]:
        """Write certificate (0644) and key (0600, created so) into ``directory``."""
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a file in the way, a read-only parent
            raise UsageError(f"cannot write to {directory}: {exc.strerror}") from exc
        cert_path, key_path = directory / cert_name, directory / key_name
        write_private(key_path, self.key_pem())
        write_atomic(cert_path, self.cert_pem(), 0o644)
        return cert_path, key_path


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` through a temporary file created with ``mode``."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except OSError as exc:  # a path under a missing directory, a read-only one
        raise UsageError(f"cannot write {path}: {exc.strerror}") from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp, mode)  # the umask may have narrowed it
        os.replace(temp, path)
    except OSError as exc:  # a directory in the way, a full filesystem
        temp.unlink(missing_ok=True)
        raise UsageError(f"cannot write {path}: {exc.strerror}") from exc
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def write_private(path: Path, data: bytes) -> None:
    """Write a private key: 0600 from the moment the file exists."""
    write_atomic(path, data, 0o600)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _curve_of(key: ec.EllipticCurvePrivateKey) -> Curve:
    names = {"secp256r1": Curve.P256, "secp384r1": Curve.P384, "secp521r1": Curve.P521}
    if key.curve.name not in names:
        raise PkiError(f"the CA key is on curve {key.curve.name}", hint="use P-256, P-384 or P-521")
    return names[key.curve.name]


@dataclass(frozen=True)
class CertificateAuthority:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def create(
        cls,
        subject: Subject,
        *,
        curve: Curve = Curve.P256,
        days: int = 3650,
        key: ec.EllipticCurvePrivateKey | None = None,
    ) -> CertificateAuthority:
        """A new self-signed CA that may sign end-entity certificates only (pathlen 0).

        ``key``, when given, is the CA's key (e.g. one on a token); else one is made on ``curve``.
        """
        check_days(days)
        if key is None:
            key = curve.generate()
        curve = _curve_of(key)
        name = subject.to_name()
        now = _now()
        builder = (
            _builder(name, name, key.public_key(), now, now + dt.timedelta(days=days), key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)  # leaves only
            .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)  # sign certs and CRLs
        )
        return cls(builder.sign(key, curve.hash), key)

    @property
    def subject(self) -> Subject:
        return Subject.from_name(self.cert.subject)

    @property
    def curve(self) -> Curve:
        return _curve_of(self.key)

    def check_usable(self, now: dt.datetime | None = None) -> None:
        """Refuse a CA that is expired or not yet valid."""
        now = now or _now()
        if now > self.cert.not_valid_after_utc:
            raise PkiError(
                f"the CA certificate expired on {self.cert.not_valid_after_utc:%Y-%m-%d}",
                hint="create a new CA, or import a renewed one with 'imageprov ca import'",
            )
        if now < self.cert.not_valid_before_utc:
            raise PkiError(
                f"the CA certificate is not valid before {self.cert.not_valid_before_utc:%Y-%m-%d}",
                hint="check this machine's clock",
            )

    def _leaf(
        self, subject: Subject, days: int, curve: Curve
    ) -> tuple[x509.CertificateBuilder, ec.EllipticCurvePrivateKey]:
        key = curve.generate()
        return self._leaf_for(subject, days, key.public_key()), key

    def _leaf_for(self, subject: Subject, days: int, public_key: CertificatePublicKeyTypes) -> x509.CertificateBuilder:
        check_days(days)
        self.check_usable()
        now = _now()
        # A leaf never outlives its CA: past that, no verifier accepts it anyway.
        not_after = min(now + dt.timedelta(days=days), self.cert.not_valid_after_utc)
        return _builder(
            subject.to_name(), self.cert.subject, public_key, now - BACKDATE, not_after, self.key.public_key()
        ).add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)

    def issue_server(
        self, hosts: list[str], *, ips: list[str] | None = None, days: int = 730, curve: Curve = Curve.P256
    ) -> Issued:
        """A TLS server certificate for the mTLS edge, with every host and IP in subjectAltName.

        The manual recipe's server certificate has no subjectAltName; Go's TLS
        (the Mender client's) has ignored the CN since Go 1.15 and rejects it.
        """
        if not hosts and not ips:
            raise UsageError("a server certificate needs at least one --host or --ip")
        refused = ca_problems(self.cert, purposes=(SERVER,))
        if refused:
            raise PkiError(f"the CA cannot issue a server certificate that TLS clients accept: {'; '.join(refused)}")
        names: list[x509.GeneralName] = [x509.DNSName(_host(h)) for h in hosts]
        for text in ips or []:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(text)))
            except ValueError as exc:
                raise UsageError(f"--ip {text!r} is not an IP address") from exc
        subject = replace(self.subject, common_name=hosts[0] if hosts else str(ips[0] if ips else ""))
        builder, key = self._leaf(subject, days, curve)
        builder = (
            builder.add_extension(_key_usage(digital_signature=True), critical=True)  # ECDHE signatures
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)  # TLS server
            .add_extension(x509.SubjectAlternativeName(names), critical=False)  # what clients check
        )
        return Issued(builder.sign(self.key, self.curve.hash), key)

    def issue_device(
        self, device_id: str, *, days: int = 3650, curve: Curve = Curve.P256, subject: Subject | None = None
    ) -> Issued:
        """A TLS client certificate for one device: CN = the device id, clientAuth."""
        builder, key = self._leaf(replace(subject or self.subject, common_name=device_id), days, curve)
        return Issued(self._sign(_device_profile(builder)), key)

    def certify_device(
        self, device_id: str, public_key: CertificatePublicKeyTypes, *, days: int = 3650, subject: Subject | None = None
    ) -> x509.Certificate:
        """The device profile of ``issue_device`` for a key held elsewhere: a TPM's or a secure element's, whose
        public half came in a certificate request (EST). Nothing of the request but the key is taken: the
        subject, the validity and every extension are the CA's (RFC 7030, 4.2.1 lets the CA decide them)."""
        builder = self._leaf_for(replace(subject or self.subject, common_name=device_id), days, public_key)
        return self._sign(_device_profile(builder))

    def issue_bootstrap(
        self, device_id: str, *, days: int = BOOTSTRAP_DAYS, curve: Curve = Curve.P256, subject: Subject | None = None
    ) -> Issued:
        """A bootstrap certificate for one device: good for one enrollment (EST) and nothing else.

        The profile is the device certificate's (CN = the device id, keyUsage
        digitalSignature, extendedKeyUsage clientAuth), so that nginx takes it
        in the TLS handshake like any device certificate, plus a certificate
        policy, ``BOOTSTRAP_POLICY``, that says what it is for. The policy is
        marked critical: RFC 5280 (4.2.1.4) has a verifier that does not
        process certificate policies reject the certificate, so a relying
        party that does not know bootstrap certificates (an older edge, another
        gateway in front of the fleet) refuses it rather than take it for a
        device; OpenSSL processes policies and takes it (nginx's handshake),
        and imageprov's edge refuses it everywhere but on its EST routes. Its
        key is made here and written to the image like a device key, which is
        why it may do so little: the device replaces it at first boot with a
        key that never leaves its TPM, and the edge revokes it on that first
        use. The policy carries no qualifier (RFC 5280 recommends an OID alone).

        Another extendedKeyUsage (a private one for "enrollment") was the other
        candidate: it must come next to clientAuth for nginx, and then restricts
        nothing; the policy is the extension X.509 has for "what this is for".
        """
        builder, key = self._leaf(replace(subject or self.subject, common_name=device_id), days, curve)
        policies = x509.CertificatePolicies([x509.PolicyInformation(BOOTSTRAP_POLICY, None)])
        builder = _device_profile(builder).add_extension(policies, critical=True)  # enrollment only
        return Issued(self._sign(builder), key)

    def _sign(self, builder: x509.CertificateBuilder) -> x509.Certificate:
        return builder.sign(self.key, self.curve.hash)

    def write_to(self, pki_dir: Path, passphrase: bytes | None) -> None:
        """Write ca-cert.pem and ca-private.key (PKCS#8, encrypted unless ``passphrase`` is None)."""
        encryption: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
        )
        key_pem = self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
        self._write(pki_dir, CA_KEY, key_pem, 0o600)

    def write_with_reference(self, pki_dir: Path, reference: KeyReference) -> None:
        """Write ca-cert.pem and the reference to the token-held key (URI and module; no PIN, no key)."""
        self._write(pki_dir, CA_KEY_REFERENCE, reference.to_json(), 0o644)

    def _write(self, pki_dir: Path, key_name: str, key_data: bytes, key_mode: int) -> None:
        try:
            pki_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_atomic(pki_dir / key_name, key_data, key_mode)
            write_atomic(pki_dir / CA_CERT, self.cert.public_bytes(serialization.Encoding.PEM), 0o644)
        except OSError as exc:
            raise PkiError(f"cannot write the CA into {pki_dir}: {exc.strerror}") from exc


def _device_profile(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    """What a device certificate adds to the leaf: TLS client use, signatures only."""
    return builder.add_extension(_key_usage(digital_signature=True), critical=True).add_extension(
        x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
        critical=False,  # TLS client only
    )


def is_bootstrap(cert: x509.Certificate) -> bool:
    """Whether ``cert`` claims the bootstrap policy, critical or not: then it is for enrollment and nothing else."""
    try:
        policies = cert.extensions.get_extension_for_oid(ExtensionOID.CERTIFICATE_POLICIES).value
    except x509.ExtensionNotFound:
        return False
    assert isinstance(policies, x509.CertificatePolicies)
    return any(policy.policy_identifier == BOOTSTRAP_POLICY for policy in policies)


def bootstrap_problems(cert: x509.Certificate) -> list[str]:
    """Why ``cert`` is not a bootstrap certificate of ``issue_bootstrap``'s profile; empty if it is.

    Its certificate policies are exactly ``BOOTSTRAP_POLICY`` (critical, no
    qualifier) and it is no CA: nothing else that policy would let through.
    """
    try:
        extension = cert.extensions.get_extension_for_oid(ExtensionOID.CERTIFICATE_POLICIES)
    except x509.ExtensionNotFound:
        return ["it has no certificate policies: it is no bootstrap certificate"]
    problems = []
    assert isinstance(extension.value, x509.CertificatePolicies)
    policies = list(extension.value)
    if [(p.policy_identifier, p.policy_qualifiers) for p in policies] != [(BOOTSTRAP_POLICY, None)]:
        problems.append(
            f"its certificate policies are not the bootstrap policy alone ({BOOTSTRAP_POLICY.dotted_string})"
        )
    if not extension.critical:
        problems.append("its certificate policies are not critical")
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or constraints.ca:
        problems.append("it is not marked as an end entity (basicConstraints CA:FALSE)")
    return problems


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: CertificatePublicKeyTypes,
    not_before: dt.datetime,
    not_after: dt.datetime,
    issuer_key: CertificateIssuerPublicKeyTypes,
) -> x509.CertificateBuilder:
    """What every certificate has: names, validity, a random serial and key identifiers."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    if subject != issuer or public_key != issuer_key:
        builder = builder.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key), critical=False)
    return builder


def _key_usage(
    *, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _host(name: str) -> str:
    text = name.strip().rstrip(".").lower()
    labels = text.split(".")
    ok = bool(text) and all(
        0 < len(label) <= 63 and label.replace("-", "").replace("*", "").isalnum() and label.isascii()
        for label in labels
    )
    if not ok:
        raise UsageError(f"--host {name!r} is not a DNS name", hint="use --ip for IP addresses")
    return text


def load_ca(pki_dir: Path, passphrase: Passphrase, *, pin: PinSource | None = None) -> CertificateAuthority:
    """Load the CA from ``pki_dir``; a wrong or missing passphrase or PIN is one clear error.

    The key is a file (``passphrase``, or a function giving it, used only if
    the file is encrypted) or a token (``pin`` gives the PIN if the token asks).
    """
    cert_path, key_path, reference_path = pki_dir / CA_CERT, pki_dir / CA_KEY, pki_dir / CA_KEY_REFERENCE
    if not pki_dir.is_dir():
        raise PkiError(f"no PKI at {pki_dir}", hint=f"create one with 'imageprov ca init {pki_dir}'")
    cert = load_cert(cert_path)
    if reference_path.exists():
        if key_path.exists():
            raise PkiError(
                f"{pki_dir} holds both {CA_KEY} and {CA_KEY_REFERENCE}",
                hint="one CA has one key: remove the one that is not in use",
            )
        public = cert.public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey):
            raise PkiError(f"{cert_path} does not hold an EC public key")
        from imageprov.pki.token import open_key  # python-pkcs11 is loaded only for a token

        token_key = open_key(KeyReference.read(reference_path), public, pin or (lambda _: None))
        try:
            return check_pair(cert, token_key, reference_path)
        except BaseException:
            token_key.close()
            raise
    check_private_mode(key_path)
    key = load_key(key_path, passphrase)
    return check_pair(cert, key, key_path)


def check_private_mode(path: Path) -> None:
    """Refuse a private key that others may read, as OpenSSH does: its secrecy is already in doubt."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError as exc:
        raise PkiError(f"cannot read {path}: {exc.strerror}") from exc
    if mode & 0o077:
        raise PkiError(
            f"{path} is open to others (mode 0{mode:o}): a CA key must be private",
            hint=f"chmod 600 {path}, and replace the CA if others may have copied the key",
        )


def load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except OSError as exc:
        raise PkiError(f"cannot read {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise PkiError(f"{path} is not a PEM certificate") from exc


def load_key(path: Path, passphrase: Passphrase) -> ec.EllipticCurvePrivateKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PkiError(f"cannot read {path}: {exc.strerror}") from exc
    encrypted = b"ENCRYPTED" in data.split(b"\n", 1)[0] or b"Proc-Type: 4,ENCRYPTED" in data
    secret: bytes | None = None
    if encrypted:
        secret = passphrase() if callable(passphrase) else passphrase  # asked for only when needed
        if not secret:
            raise PkiError(
                f"{path} is encrypted and no passphrase was given",
                hint="set IMAGEPROV_CA_PASSPHRASE or pass --passphrase-file",
            )
    try:
        key = serialization.load_pem_private_key(data, secret)
    except ValueError as exc:
        if encrypted:
            raise PkiError(f"wrong passphrase for {path}") from exc
        raise PkiError(f"{path} is not a PEM private key") from exc
    except TypeError as exc:
        raise PkiError(f"cannot load {path}: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{path} is not an EC key", hint="imageprov's CA keys are EC (P-256, P-384 or P-521)")
    return key


def check_pair(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, key_path: Path) -> CertificateAuthority:
    """Refuse a key that does not belong to the certificate, or a certificate that OpenSSL would not take as a CA.

    A CA that may not sign certificates (no CA:TRUE, a keyUsage without
    keyCertSign, an extendedKeyUsage without clientAuth) issues device
    certificates that every verifier, nginx included, refuses.
    """
    if cert.public_key() != key.public_key():
        raise PkiError(f"{key_path} does not match the CA certificate", hint="the key belongs to another certificate")
    problems = ca_problems(cert)
    if problems:
        raise PkiError(
            f"the certificate cannot be the fleet's CA: {'; '.join(problems)}",
            hint="reissue it with basicConstraints CA:TRUE and keyUsage keyCertSign, cRLSign",
        )
    return CertificateAuthority(cert, key)
