"""The certificate registry, revocation, the CRL and the denylist, and two processes issuing at once."""

from __future__ import annotations

import json
import multiprocessing
import sqlite3
import subprocess
from pathlib import Path

import pytest
from cryptography import x509

from imageprov.errors import PkiError
from imageprov.pki.ca import CertificateAuthority, Subject, load_ca
from imageprov.pki.registry import Reason, Registry, Status
from tests.conftest import PASSPHRASE, imageprov_pki, tool


def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return imageprov_pki(*args, check=False)


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    path = tmp_path / "pki"
    assert cli("ca", "init", path, "--cn", "Fleet CA", "--org", "ACME").returncode == 0
    return path


def test_one_live_certificate_per_device(pki: Path, tmp_path: Path) -> None:
    assert cli("device-cert", "--pki", pki, "--device-id", "d1", "--out", tmp_path / "a").returncode == 0
    proc = cli("device-cert", "--pki", pki, "--device-id", "d1", "--out", tmp_path / "b")
    assert proc.returncode == 1 and "--reissue" in proc.stderr
    assert not (tmp_path / "b").exists()
    assert cli("device-cert", "--pki", pki, "--device-id", "d1", "--out", tmp_path / "b", "--reissue").returncode == 0
    records = json.loads(cli("devices", "--pki", pki, "--json").stdout)
    assert [(r["status"], r["reason"]) for r in records] == [("revoked", "superseded"), ("active", None)]
    first = x509.load_pem_x509_certificate((tmp_path / "a/mender-cert.pem").read_bytes())
    assert records[0]["serial"] == f"{first.serial_number:x}"
    assert records[1]["delivered_to"] == str(tmp_path / "b")
    for record in records:
        assert set(record) >= {
            "device_id",
            "serial",
            "fingerprint",
            "not_before",
            "not_after",
            "status",
            "revoked_at",
            "reason",
            "delivered_to",
        }


def test_registry_keeps_public_key_and_fingerprint(pki: Path, tmp_path: Path) -> None:
    cli("device-cert", "--pki", pki, "--device-id", "d1", "--out", tmp_path / "a")
    pem = (tmp_path / "a/mender-cert.pem").read_bytes()
    fingerprint = (
        tool("openssl", "x509", "-in", tmp_path / "a/mender-cert.pem", "-noout", "-fingerprint", "-sha256")
        .stdout.decode()
        .split("=", 1)[1]
        .strip()
        .replace(":", "")
        .lower()
    )
    row = (
        sqlite3.connect(pki / "registry.sqlite").execute("SELECT fingerprint, public_key FROM certificates").fetchone()
    )
    assert row[0] == fingerprint
    assert row[1].encode() == tool("openssl", "x509", "-noout", "-pubkey", input=pem).stdout
    # The device's private key is never in the PKI.
    assert b"PRIVATE" not in (pki / "registry.sqlite").read_bytes()


def test_revoke_crl_and_denylist(pki: Path, tmp_path: Path) -> None:
    for device in ("d1", "d2", "d3"):
        assert cli("device-cert", "--pki", pki, "--device-id", device, "--out", tmp_path / device).returncode == 0
    serial_d2 = f"{x509.load_pem_x509_certificate((tmp_path / 'd2/mender-cert.pem').read_bytes()).serial_number:x}"
    assert cli("revoke", "--pki", pki, "d1", "--reason", "key-compromise").returncode == 0
    assert cli("revoke", "--pki", pki, "--serial", serial_d2.upper()).returncode == 0
    again = cli("revoke", "--pki", pki, "d1")
    assert again.returncode == 1 and "already revoked" in again.stderr
    assert cli("revoke", "--pki", pki, "nobody").returncode == 1

    assert cli("crl", "--pki", pki, "--out", tmp_path / "crl.pem", "--days", "7").returncode == 0
    text = tool(
        "openssl", "crl", "-in", tmp_path / "crl.pem", "-CAfile", pki / "ca-cert.pem", "-verify", "-noout", "-text"
    )
    assert b"verify OK" in text.stderr + text.stdout
    out = text.stdout.decode()
    assert "Key Compromise" in out and out.count("Serial Number:") == 2
    assert serial_d2.upper() in out.replace(":", "")
    crl = x509.load_pem_x509_crl((tmp_path / "crl.pem").read_bytes())
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 1
    assert (crl.next_update_utc - crl.last_update_utc).days == 7  # type: ignore[operator]

    assert cli("crl", "--pki", pki, "--out", tmp_path / "crl.der", "--der").returncode == 0
    der = x509.load_der_x509_crl((tmp_path / "crl.der").read_bytes())
    assert der.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 2

    assert cli("denylist", "--pki", pki, "--out", tmp_path / "deny").returncode == 0
    lines = (tmp_path / "deny").read_text().splitlines()
    assert len(lines) == 2 and serial_d2 in lines
    # openssl verify with the CRL refuses d1 and d2 but not d3.
    for device, ok in (("d1", False), ("d2", False), ("d3", True)):
        proc = tool(
            "openssl",
            "verify",
            "-crl_check",
            "-CAfile",
            pki / "ca-cert.pem",
            "-CRLfile",
            tmp_path / "crl.pem",
            tmp_path / device / "mender-cert.pem",
            check=False,
        )
        assert (proc.returncode == 0) is ok, proc.stdout + proc.stderr


def _issue_many(pki: str, ids: list[str], queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    ca = load_ca(Path(pki), PASSPHRASE.encode())
    ok, refused = 0, 0
    with Registry(Path(pki)) as registry:
        for device in ids:
            try:
                registry.record(ca.issue_device(device), status=Status.ACTIVE)
                ok += 1
            except PkiError:
                refused += 1
    queue.put((ok, refused))


def test_two_processes_issuing_at_once(pki: Path) -> None:
    context = multiprocessing.get_context("spawn")
    queue: multiprocessing.Queue = context.Queue()  # type: ignore[type-arg]
    shared = [f"same-{i}" for i in range(15)]
    jobs = [
        context.Process(target=_issue_many, args=(str(pki), [f"a-{i}" for i in range(25)] + shared, queue)),
        context.Process(target=_issue_many, args=(str(pki), [f"b-{i}" for i in range(25)] + shared, queue)),
    ]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(120)
        assert job.exitcode == 0
    results = [queue.get() for _ in jobs]
    assert sum(ok for ok, _ in results) == 65 and sum(r for _, r in results) == 15
    rows = (
        sqlite3.connect(pki / "registry.sqlite")
        .execute("SELECT device_id, serial, status FROM certificates")
        .fetchall()
    )
    assert len(rows) == 65 and len({serial for _, serial, _ in rows}) == 65
    assert len({device for device, _, _ in rows}) == 65
    assert all(status == "active" for _, _, status in rows)


def test_registry_record_roundtrip(tmp_path: Path) -> None:
    ca = CertificateAuthority.create(Subject("CA"))
    ca.write_to(tmp_path, None)
    with Registry(tmp_path) as registry:
        pending = registry.record(ca.issue_device("x"), status=Status.PENDING)
        assert registry.live("x") == pending
        registry.deliver(pending.serial, "/out/x.sdimg")
        active = registry.live("x")
        assert active is not None and active.status is Status.ACTIVE and active.delivered_to == "/out/x.sdimg"
        [revoked] = registry.revoke(device_id="x", reason=Reason.CESSATION_OF_OPERATION)
        assert revoked.reason is Reason.CESSATION_OF_OPERATION and revoked.revoked_at
        assert registry.live("x") is None


def test_missing_pki_is_one_line(tmp_path: Path) -> None:
    proc = cli("devices", "--pki", tmp_path / "nowhere")
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        f"imageprov: error: no PKI at {tmp_path}/nowhere (create one with 'imageprov ca init {tmp_path}/nowhere')"
    ]
