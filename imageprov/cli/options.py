"""Options that several commands share, defined once so that their names, help and limits agree."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from imageprov.mender.conf import AuthKey
from imageprov.mender.prepare import ConfTarget
from imageprov.pki.ca import Curve

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
        "default: [registry] url in PKI/imageprov.toml, else PKI/registry.sqlite.",
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
    int, typer.Option("--days", min=1, max=36500, help="Validity of the device certificates, in days.")
]
ServerUrl = Annotated[Optional[str], typer.Option("--server-url", help="Set ServerURL (the edge).")]
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
