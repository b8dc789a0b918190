"""What a device will find in a stamped image, read with tools other than imageprov.

debugfs reads the files, openssl checks the certificate against the CA and the
key against the certificate, e2fsck checks every filesystem that was written,
sfdisk finds the partitions: imageprov's own readers and ``verify`` share code
with what they would be checking, so tests judge results with these instead.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import debugfs, e2fsck_clean, roles, tool

KEY = "/mender/mender-cert-private.pem"
CERT = "/mender/mender-cert.pem"
HTTPS_CLIENT = {"Certificate": "/data/mender/mender-cert.pem", "Key": "/data/mender/mender-cert-private.pem"}


def stat(image: Path, number: int, path: str) -> tuple[str, str, str]:
    """(mode, uid, gid) of a file as debugfs stat prints them."""
    out = debugfs(image, number, f'stat "{path}"')
    return out.split("Mode:")[1].split()[0], out.split("User:")[1].split()[0], out.split("Group:")[1].split()[0]


def check_device_image(image: Path, device_id: str, pki: Path, tmp_path: Path, *, fsck_rootfs: bool = True) -> str:
    """Check what the device will see; return its certificate's serial (lowercase hex, as openssl prints it)."""
    layout = roles(image)
    data = layout["data"]
    assert stat(image, data, KEY) == ("0600", "0", "0")
    assert stat(image, data, CERT) == ("0644", "0", "0")
    cert, key = tmp_path / f"{device_id}.crt", tmp_path / f"{device_id}.key"
    cert.write_text(debugfs(image, data, f"cat {CERT}"))
    key.write_text(debugfs(image, data, f"cat {KEY}"))
    verified = tool("openssl", "verify", "-CAfile", pki / "ca-cert.pem", "-purpose", "sslclient", cert)
    assert b": OK" in verified.stdout
    subject = tool("openssl", "x509", "-in", cert, "-noout", "-subject", "-nameopt", "multiline").stdout.decode()
    assert f"commonName                = {device_id}" in subject
    pub_cert = tool("openssl", "x509", "-in", cert, "-noout", "-pubkey").stdout
    assert tool("openssl", "pkey", "-in", key, "-pubout").stdout == pub_cert
    for number in ((layout["rootfs-a"], layout["rootfs-b"]) if fsck_rootfs else ()) + (data,):
        e2fsck_clean(image, number)
    for role in ("rootfs-a", "rootfs-b"):
        conf = json.loads(debugfs(image, layout[role], "cat /etc/mender/mender.conf"))
        fallback = debugfs(image, data, "cat /mender/mender.conf")
        # The client reads the data partition's fallback, then the rootfs conf over it.
        effective = {**(json.loads(fallback) if fallback.strip() else {}), **conf}
        assert effective.get("HttpsClient") == HTTPS_CLIENT, (role, effective)
    # device_type and everything else on the data partition is still there.
    assert "device_type=imageprov-demo" in debugfs(image, data, "cat /mender/device_type")
    return serial(cert)


def serial(cert: Path) -> str:
    """The certificate's serial in lowercase hex, as openssl prints it."""
    out = tool("openssl", "x509", "-in", cert, "-noout", "-serial").stdout.decode()
    return out.strip().removeprefix("serial=").lower().lstrip("0")


def image_serial(image: Path, tmp_path: Path) -> str:
    cert = tmp_path / f"{image.name}.crt"
    cert.write_text(debugfs(image, roles(image)["data"], f"cat {CERT}"))
    return serial(cert)
