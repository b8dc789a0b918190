"""An image that enrolls at first boot: a bootstrap credential in place of the device's key.

With ``stamp``/``flash --enroll URL`` the station writes no device key. The
data partition gets, in ``/data/imageprov/enroll``:

- ``bootstrap-key.pem`` (0600) and ``bootstrap-cert.pem`` (0644): a credential
  good for one enrollment (``CertificateAuthority.issue_bootstrap``), which the
  device deletes once it has its certificate;
- ``fleet-ca.pem``: the CA the certificate the edge sends must chain to;
- ``enroll.conf``: ``NAME=value`` lines that ``imageprov-enroll`` reads (it
  never sources them): the EST URL, the device id, and the token and key it makes.

``mender.conf`` (written once per batch, the same for every device) names the
certificate the device will write, ``/data/mender/mender-cert.pem``, and the
key it will make in its token: ``HttpsClient.Key`` and ``Security.AuthPrivateKey``
a ``pkcs11:`` URI with no PIN in it, loaded through the ``pkcs11`` engine
(``SSLEngine``); the token's PIN is made on the device and stays there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from urllib.parse import urlsplit

from imageprov.disk.ext4 import NewFile
from imageprov.disk.image import DevicePath
from imageprov.errors import UsageError
from imageprov.mender.conf import CLIENT_CERT, AuthKey, Settings
from imageprov.pki.ca import Issued
from imageprov.pki.config import mask_password

ENROLL_DIR = "/data/imageprov/enroll"
BOOTSTRAP_KEY = DevicePath.parse(f"{ENROLL_DIR}/bootstrap-key.pem")
BOOTSTRAP_CERT = DevicePath.parse(f"{ENROLL_DIR}/bootstrap-cert.pem")
FLEET_CA = DevicePath.parse(f"{ENROLL_DIR}/fleet-ca.pem")
ENROLL_CONF = DevicePath.parse(f"{ENROLL_DIR}/enroll.conf")
ENROLL_PATHS = (BOOTSTRAP_KEY.inner, BOOTSTRAP_CERT.inner, FLEET_CA.inner, ENROLL_CONF.inner)

# The token and the key in it: the labels imageprov-enroll gives them, and the URI the client loads the key by.
# TOKEN_DIR keeps the token's store (tpm2-pkcs11's: the key wrapped by the TPM, of use to that TPM alone) and
# the PINs imageprov-enroll makes on the device; the engine reads the user PIN from TOKEN_DIR/pin (libp11's
# pin-source), so that no PIN is in mender.conf, nor known to the station.
TOKEN_DIR = "/data/imageprov/token"
TOKEN_LABEL = "imageprov"
KEY_LABEL = "mender"
KEY_URI = f"pkcs11:token={TOKEN_LABEL};object={KEY_LABEL};type=private?pin-source=file:{TOKEN_DIR}/pin"
ENGINE = "pkcs11"
# Where the layer installs the program that enrolls the device (files/imageprov-enroll).
PROGRAM = "/usr/sbin/imageprov-enroll"

# What enroll.conf may hold: the device's program splits each line at its first "=" and takes the rest as it is.
_VALUE = re.compile(r"[\x21-\x7e]+")


@dataclass(frozen=True)
class Enrollment:
    """Where devices enroll: the EST base URL of the edge, e.g. ``https://edge.example.com/.well-known/est``."""

    url: str

    def __post_init__(self) -> None:
        shown = mask_password(self.url)  # a password in it is never echoed
        try:
            parts = urlsplit(self.url)
            parts.port  # noqa: B018 - parsed on access: a bad port raises here
        except ValueError as exc:
            raise UsageError(f"--enroll {shown!r} is not a URL: {exc}") from None
        if parts.scheme != "https" or not parts.hostname:
            example = "e.g. https://edge.example.com/.well-known/est"
            raise UsageError(f"--enroll {shown!r} is not an https URL", hint=example)
        if parts.username is not None or parts.password is not None:
            # Every device would carry it: the device proves who it is with its bootstrap certificate.
            raise UsageError(f"--enroll {shown!r} holds a user or password", hint="give the URL alone")
        if not _VALUE.fullmatch(self.url) or parts.query or parts.fragment:
            raise UsageError(f"--enroll {shown!r}: the URL must be printable, without spaces, query or fragment")

    @property
    def base(self) -> str:
        """The URL the operations are appended to (``BASE/simpleenroll``)."""
        return self.url.rstrip("/")

    def settings(self, settings: Settings) -> Settings:
        """``settings`` with the client pointed at the token's key and the certificate the device writes."""
        if settings.auth_key is not AuthKey.CERT:
            raise UsageError("--enroll signs auth requests with the token's key", hint="leave out --auth-key device")
        return replace(settings, certificate=CLIENT_CERT, key=KEY_URI, ssl_engine=ENGINE)

    def conf(self, device_id: str, server_ca: str | None) -> bytes:
        """enroll.conf for ``device_id``: which edge, which device, which token and key, which CA for TLS."""
        lines = {
            "EST_URL": self.base,
            "DEVICE_ID": device_id,
            "TOKEN_LABEL": TOKEN_LABEL,
            "KEY_LABEL": KEY_LABEL,
            "KEY_URI": KEY_URI,
            "CERT": CLIENT_CERT,
            "BOOTSTRAP_KEY": str(BOOTSTRAP_KEY.device_path),
            "BOOTSTRAP_CERT": str(BOOTSTRAP_CERT.device_path),
            "TOKEN_DIR": TOKEN_DIR,
            "FLEET_CA": str(FLEET_CA.device_path),
            # The edge's certificate or CA (--server-ca); none: the system's CAs.
            "SERVER_CA": server_ca or "",
        }
        for name, value in lines.items():
            if value and not _VALUE.fullmatch(value):
                raise UsageError(f"{name} {value!r} cannot go into enroll.conf")
        head = "# imageprov enrollment: read by imageprov-enroll at first boot (NAME=value, never sourced)\n"
        return (head + "".join(f"{name}={value}\n" for name, value in lines.items())).encode()

    def files(self, device_id: str, issued: Issued, fleet_ca_pem: bytes, server_ca: str | None) -> list[NewFile]:
        """What one enrolling device gets in ``ENROLL_DIR``."""
        return [
            NewFile(BOOTSTRAP_KEY.inner, issued.key_pem(), 0o600),
            NewFile(BOOTSTRAP_CERT.inner, issued.cert_pem()),
            NewFile(FLEET_CA.inner, fleet_ca_pem),
            NewFile(ENROLL_CONF.inner, self.conf(device_id, server_ca)),
        ]


def read_conf(text: bytes) -> dict[str, str]:
    """enroll.conf's names and values, as the device's program reads them; raises UsageError for a bad line."""
    found: dict[str, str] = {}
    try:
        lines = text.decode("ascii").splitlines()
    except UnicodeDecodeError:
        raise UsageError("enroll.conf is not ASCII text") from None
    for number, line in enumerate(lines, 1):
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        if not sep or not re.fullmatch(r"[A-Z_]+", name) or (value and not _VALUE.fullmatch(value)):
            raise UsageError(f"enroll.conf line {number} is not NAME=value: {line!r}")
        found[name] = value
    return found
