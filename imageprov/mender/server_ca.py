"""The certificate(s) the client trusts for the edge: ``ServerCertificate`` and the file it names.

meta-mender offers two routes. Its ``mender-server-certificate`` recipe
installs ``server.crt`` into the rootfs's system store
(``/usr/local/share/ca-certificates/mender``) and runs ``update-ca-certificates``
at build time; the configuration key ``ServerCertificate`` names a PEM file that
the client trusts besides the system store (the Go client 3.x appends it to the
system pool, the C++ client 4.x and later load it as an extra verify location).
A line tool that writes only the data partition cannot rebuild a rootfs's
system store (that is a build step, and an update would replace it), so
imageprov takes the second route: the certificate(s) go to
``/data/mender/server.crt`` (0644 root:root, the data partition survives
updates) and ``ServerCertificate`` points at it, in the conf the stamp writes.

A client that finds no file where ``ServerCertificate`` points only logs a
warning and falls back to the system store: a wrong path fails at the first
connection, on the device. So the file is checked wherever the conf names it.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from imageprov.errors import UsageError

SERVER_CERT = "/data/mender/server.crt"
SERVER_CERT_MODE = 0o644


@dataclass(frozen=True)
class ServerCa:
    """The PEM certificate(s) to install for the client to trust the edge, as they will be written."""

    pem: bytes
    fingerprints: tuple[str, ...]  # SHA-256, hex, in file order
    subjects: tuple[str, ...]

    @classmethod
    def from_pem(cls, data: bytes, where: str, *, now: dt.datetime | None = None) -> ServerCa:
        """Parse and check ``data``; refuse a key, a non-PEM file, or an expired certificate, in one line."""
        if b"PRIVATE KEY-----" in data:
            # The edge's key beside its certificate (nginx's ssl_certificate_key) is an easy slip:
            # it must never reach every device's image.
            raise UsageError(f"{where} holds a private key: --server-ca takes the edge's certificate or its CA",
                             hint="pass the certificate (e.g. the server-cert's .crt, or PKI/ca-cert.pem)")  # fmt: skip
        try:
            certs = x509.load_pem_x509_certificates(data)
        except ValueError as exc:
            der = not data.lstrip().startswith(b"-----")
            raise UsageError(
                f"{where} is not PEM certificate(s)" + (" (DER?)" if der and data else ""),
                hint="convert it with 'openssl x509 -inform der -in FILE -out FILE.pem'"
                if der
                else "pass a file of -----BEGIN CERTIFICATE----- blocks",
            ) from exc
        moment = now or dt.datetime.now(dt.UTC)
        for cert in certs:
            # Refused, not warned: every image would carry a trust that makes the
            # client fail 'certificate verify failed' at its first connection.
            if cert.not_valid_after_utc < moment:
                raise UsageError(
                    f"{where}: the certificate {cert.subject.rfc4514_string()} expired "
                    f"{cert.not_valid_after_utc:%Y-%m-%d}",
                    hint="pass the edge's current certificate or CA",
                )
        # Written back certificate by certificate: text around the blocks (openssl x509 -text) is dropped.
        pem = b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in certs)
        return cls(pem, tuple(fingerprint(c) for c in certs), tuple(c.subject.rfc4514_string() for c in certs))

    @classmethod
    def load(cls, path: Path) -> ServerCa:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise UsageError(f"cannot read --server-ca {path}: {exc.strerror}") from exc
        return cls.from_pem(data, f"--server-ca {path}")


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def certificates_in(data: bytes) -> list[x509.Certificate]:
    """The certificates of a PEM file as the client reads it (none if it holds none)."""
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        return []
