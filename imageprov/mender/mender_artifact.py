"""The upstream engine: the manual recipe's steps, driven through mender-artifact.

For sites that must use the upstream tool. It copies partitions out and back
(tens of seconds per device on a real image) and leaves the image fully
allocated, but gives the same result as the debugfs engine. Modes are given
in octal with a leading 0: mender-artifact 3.9 reads ``-m 600`` as decimal
and writes mode 0130.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from imageprov.disk.copy import copy_image
from imageprov.errors import ToolError
from imageprov.mender.conf import CLIENT_CERT, CLIENT_KEY, DATA_CONF, ROOTFS_CONF, Settings, merge
from imageprov.mender.server_ca import SERVER_CERT, SERVER_CERT_MODE
from imageprov.pki.ca import Issued, write_private
from imageprov.run import run

# Partition copies out and back take a while on large images.
_TIMEOUT = 1800


def _ma(*args: str) -> None:
    done = run(["mender-artifact", *args], check=False, timeout=_TIMEOUT)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        raise ToolError(f"mender-artifact {args[0]} failed: {last}", hint="mender-artifact cannot handle every layout")


def install(local: Path, image: Path, device_path: str, mode: int) -> None:
    """``mender-artifact install -m 0MODE LOCAL IMAGE:PATH``."""
    _ma("install", "-m", f"0{mode:o}", str(local), f"{image}:{device_path}")


def read(image: Path, device_path: str, local: Path) -> bytes | None:
    """``mender-artifact cp IMAGE:PATH LOCAL``; None if the file is not there."""
    done = run(["mender-artifact", "cp", f"{image}:{device_path}", str(local)], check=False, timeout=_TIMEOUT)
    return local.read_bytes() if done.returncode == 0 and local.exists() else None


def stamp(golden: Path, image: Path, issued: Issued, settings: Settings, *, data_conf: bool) -> None:
    """Write ``golden`` to ``image`` with the device's credentials and the merged mender.conf."""
    copy_image(golden, image, mode=0o600)  # the image will hold the device's private key
    with tempfile.TemporaryDirectory(prefix="imageprov-ma-") as tmp:
        key, cert, conf = Path(tmp, "key.pem"), Path(tmp, "cert.pem"), Path(tmp, "mender.conf")
        write_private(key, issued.key_pem())
        cert.write_bytes(issued.cert_pem())
        install(key, image, CLIENT_KEY, 0o600)
        install(cert, image, CLIENT_CERT, 0o644)
        if settings.server_ca is not None:
            server = Path(tmp, "server.crt")
            server.write_bytes(settings.server_ca.pem)
            install(server, image, SERVER_CERT, SERVER_CERT_MODE)
        target = DATA_CONF if data_conf else ROOTFS_CONF
        current = read(image, target, Path(tmp, "current.conf"))
        if current is None and not data_conf:
            raise ToolError(f"mender-artifact could not read {ROOTFS_CONF} from {image}")
        conf.write_bytes(merge(current, settings, target).text)
        if data_conf:
            # 0600, as meta-mender makes it (mender-artifact cannot read back an existing file's mode).
            install(conf, image, target, 0o600)
        else:
            # mender-artifact cp writes a rootfs path to both rootfs partitions.
            _ma("cp", str(conf), f"{image}:{target}")
