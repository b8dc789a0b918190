"""Options that several commands share, defined once so that their names, help and limits agree."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional
from urllib.parse import urlsplit

import typer

from imageprov.errors import UsageError
from imageprov.mender.conf import AuthKey
from imageprov.mender.prepare import ConfTarget
from imageprov.mender.server_ca import SERVER_CERT
from imageprov.pki.ca import BOOTSTRAP_DAYS, MAX_DAYS, Curve
from imageprov.pki.config import mask_password

PASSPHRASE_ENV = "IMAGEPROV_CA_PASSPHRASE"

Json = Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of text.")]

# Where the layout rules cannot tell, or are overruled.
DataPart = Annotated[Optional[int], typer.Option("--data-part", help="Number of the data partition, if not found.")]
RootfsParts = Annotated[
    Optional[str], typer.Option("--rootfs-parts", help="Numbers of rootfs A and B, e.g. 2,3, if not found.")
]
BootPart = Annotated[Optional[int], typer.Option("--boot-part", help="Number of the boot partition (vfat or ext4).")]

# The PKI a command signs with or records in.
Pki = Annotated[Path, typer.Option("--pki", help="The PKI directory (made by 'imageprov ca init').")]
RegistryOpt = Annotated[
    Optional[str],
    typer.Option(
        "--registry",
        metavar="URL",
        help="sqlite:///PATH or postgresql://HOST/DB (password from PGPASSFILE, never the URL); "
        "default: the url of the registry section of PKI/imageprov.toml, else PKI/registry.sqlite.",
    ),
]
PassFile = Annotated[
    Optional[Path],
    typer.Option(
        "--passphrase-file", help=f"File holding the CA key's passphrase (else ${PASSPHRASE_ENV}, else a prompt)."
    ),
]
CurveOpt = Annotated[Curve, typer.Option("--curve", help="EC curve of the new key.")]

# What each device gets: the same for stamp and flash.
DeviceDays = Annotated[
    int, typer.Option("--days", min=1, max=MAX_DAYS, help="Validity of the device certificates, in days.")
]
# stamp's and flash's: the device certificate's, or with --enroll the bootstrap certificate's.
LineDays = Annotated[
    Optional[int],
    typer.Option(
        "--days",
        min=1,
        max=MAX_DAYS,
        help=f"Validity of each device's certificate, in days [default: 3650]; with --enroll, of its "
        f"bootstrap certificate [default: {BOOTSTRAP_DAYS}]: from the line to the device's first boot.",
        show_default=False,
    ),
]
EnrollOpt = Annotated[
    Optional[str],
    typer.Option(
        "--enroll",
        metavar="URL",
        help="Keys made on the device: write a bootstrap certificate and key (good for one enrollment) instead "
        "of the device's key, and the edge's EST URL (https://EDGE/.well-known/est); at first boot "
        "imageprov-enroll makes the key in the device's TPM and gets its certificate there. "
        "mender.conf then names the token's key (pkcs11: URI, SSLEngine pkcs11).",
    ),
]
# The other --days: checked by the command (pki.ca.check_days, the same bounds) before anything is asked or made.
CaDays = Annotated[int, typer.Option("--days", help=f"Validity of the CA certificate, in days (at most {MAX_DAYS}).")]
ServerDays = Annotated[
    int, typer.Option("--days", help=f"Validity of the server certificate, in days (at most {MAX_DAYS}).")
]
CrlDays = Annotated[int, typer.Option("--days", help=f"Days until the CRL's nextUpdate (at most {MAX_DAYS}).")]


def check_server_url(value: str | None) -> str | None:
    """``--server-url``: an http(s) URL the Mender client can parse, with no user or password (every device would
    carry it). Checked as the option is read, so that nothing is written with a URL the client would refuse."""
    if value is None:
        return None
    scheme, sep, rest = value.partition("://")
    if "@" in rest:  # a userinfo is never shown, whatever it holds
        rest = "***@" + rest.rpartition("@")[2]
    shown = mask_password(f"{scheme}{sep}{rest}")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 -- raises ValueError on a port that is not a number
    except ValueError:
        raise UsageError(f"--server-url {shown!r} is not a valid URL (an unclosed '[', a bad port?)",
                         hint="e.g. https://edge.example.com") from None  # fmt: skip
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"--server-url {shown!r} is not an http(s) URL", hint="e.g. https://edge.example.com")
    if "@" in parts.netloc:
        raise UsageError(
            "--server-url holds a user or password: every device would carry it",
            hint="the client authenticates with its certificate: give only https://HOST[:PORT]",
        )
    return value


ServerUrl = Annotated[
    Optional[str], typer.Option("--server-url", callback=check_server_url, help="Set ServerURL (the edge).")
]
TenantToken = Annotated[Optional[str], typer.Option("--tenant-token", help="Set TenantToken.")]
ConfTargetOpt = Annotated[
    ConfTarget,
    typer.Option(
        "--conf-target",
        help="auto (default): data, unless the rootfs mender.conf sets HttpsClient or Security (then an error); "
        "data: /data/mender/mender.conf, which updates keep, rootfs left byte-identical; "
        "rootfs: /etc/mender/mender.conf on each rootfs, which an update built without it removes.",
    ),
]
AuthKeyOpt = Annotated[
    AuthKey,
    typer.Option(
        "--auth-key",
        help="cert: the client signs auth requests with the certificate's key (Security.AuthPrivateKey), "
        "as an accepting edge requires; device: the key the client generates itself.",
    ),
]

# The edge's certificate or CA for the client to trust: stamp, prepare and flash take it alike.
ServerCaOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--server-ca",
        metavar="FILE",
        help=f"PEM certificate(s) of the edge or its CA: installed at {SERVER_CERT} (0644), "
        "and ServerCertificate set to it in the conf written.",
    ),
]
