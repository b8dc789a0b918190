"""What a device will find in a stamped image, read with tools other than imageprov.

debugfs reads the files, openssl checks the certificate against the CA and the
key against the certificate, e2fsck checks every filesystem that was written,
sfdisk finds the partitions, and sqlite3 reads the registry (opened read-only,
as a backup or an auditor would): imageprov's own readers, ``verify`` and
``devices`` share code with what they would be checking, so tests judge
results with these instead.
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import closing
from pathlib import Path
from typing import Any
from urllib.parse import quote

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


# A registry row, columns by name: TEXT as str, INTEGER as int, NULL as None.
Row = dict[str, Any]


def _read_registry(pki: Path, query: str) -> list[Row]:
    uri = f"file:{quote(str(pki / 'registry.sqlite'))}?mode=ro"
    for _ in range(100):
        try:
            # WAL mode: a reader is never blocked by a writer; the timeout covers a checkpoint only.
            with closing(sqlite3.connect(uri, uri=True, timeout=60)) as db:
                db.row_factory = sqlite3.Row
                return [dict(row) for row in db.execute(query)]
        except sqlite3.OperationalError as exc:
            # SQLITE_PROTOCOL: the WAL index was being rebuilt (a writer just SIGKILLed by the test, whose
            # next connection recovers it) and SQLite gave up its own retries; the read is asked again.
            if "locking protocol" not in str(exc):
                raise
            time.sleep(0.05)
    raise AssertionError(f"the registry of {pki} stayed unreadable (locking protocol)")


def registry_rows(pki: Path) -> list[Row]:
    """Every certificate in the PKI's SQLite registry, in the order issued, as columns by name.

    Read with sqlite3 on the file opened read-only (the schema is in
    imageprov/pki/registry_sqlite.py), not with ``imageprov devices``.
    """
    return _read_registry(pki, "SELECT * FROM certificates ORDER BY rowid")


def registry(pki: Path) -> dict[str, Row]:
    """The device certificates in the registry by serial (lowercase hex without leading zeros, as ``serial``)."""
    return {str(row["serial"]): row for row in registry_rows(pki) if row["kind"] == "device"}


def registry_sessions(pki: Path) -> dict[int, Row]:
    """The stations' sessions (leases) in the registry by id: host, pid, boot_id, started_at, ended_at."""
    return {int(str(row["id"])): row for row in _read_registry(pki, "SELECT * FROM sessions ORDER BY id")}
