"""The edge's revocation sources fail closed: a CRL, denylist or registry that is removed, damaged, forged or
replaced by an older one makes every lookup raise (503 from the service), never answer from what was read before,
until a good one is back."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import re
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from imageprov.edge.revocation import CrlSource, DenylistSource, RevocationSource
from imageprov.edge.standing import RegistryGate, Standing
from imageprov.errors import ImageprovError, PkiError
from imageprov.pki.ca import CertificateAuthority, Subject
from imageprov.pki.registry import Registry, RegistryMissing
from tests.edge_support import FleetCA

CA = FleetCA()
NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)


def _revoked(source: RevocationSource, serial: str) -> bool:
    return asyncio.run(source.revoked(serial))


def _crl(
    ca: FleetCA,
    serials: list[int],
    *,
    next_update: dt.datetime = NOW + dt.timedelta(days=1),
    last_update: dt.datetime = NOW - dt.timedelta(hours=1),
    number: int | None = None,
    critical: x509.ExtensionType | None = None,
) -> bytes:
    builder = x509.CertificateRevocationListBuilder().issuer_name(ca.name)
    builder = builder.last_update(last_update).next_update(next_update)
    if number is not None:
        builder = builder.add_extension(x509.CRLNumber(number), critical=False)
    if critical is not None:
        builder = builder.add_extension(critical, critical=True)
    for serial in serials:
        entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(NOW - dt.timedelta(days=1))
        builder = builder.add_revoked_certificate(entry.build())
    return builder.sign(ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def _replace(path: Path, data: bytes) -> None:
    """Write ``data`` as a new file renamed over ``path``, as publishing tools do."""
    new = path.with_name(path.name + ".new")
    new.write_bytes(data)
    os.replace(new, path)


SERIAL = 0xA1B2


@pytest.fixture
def crl(tmp_path: Path) -> tuple[Path, CrlSource]:
    path = tmp_path / "crl.pem"
    path.write_bytes(_crl(CA, [SERIAL]))
    source = CrlSource(path, CA.cert)
    assert _revoked(source, f"{SERIAL:x}") and not _revoked(source, "ff")
    return path, source


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda path: path.write_bytes(b"-----BEGIN X509 CRL-----\ngarbage\n-----END X509 CRL-----\n"), "is not a CRL"),
        (lambda path: path.write_bytes(b"\x30\x03\x02\x01"), "is not a CRL"),
        # Same issuer name, another key: a forged CRL that revokes nothing.
        (lambda path: _replace(path, _crl(FleetCA(), [])), "not signed by the fleet CA"),
        (lambda path: path.unlink(), "cannot read"),
        (lambda path: _replace(path, _crl(CA, [], critical=x509.DeltaCRLIndicator(1))), "critical extension"),
    ],
    ids=["garbage PEM", "garbage DER", "forged", "removed", "delta CRL"],
)  # fmt: skip
def test_a_crl_gone_bad_refuses_until_a_good_one_is_back(
    crl: tuple[Path, CrlSource], damage: object, message: str
) -> None:
    path, source = crl
    damage(path)  # type: ignore[operator]
    for _ in range(2):  # not only once: every lookup until the file is good again
        with pytest.raises(PkiError, match=message):
            _revoked(source, f"{SERIAL:x}")
        with pytest.raises(PkiError, match=message):
            _revoked(source, "ff")
    # A good CRL again, with other contents: those count, at once.
    _replace(path, _crl(CA, [0xFF]))
    assert _revoked(source, "ff") and not _revoked(source, f"{SERIAL:x}")


def test_an_older_crl_does_not_bring_back_a_revoked_device(tmp_path: Path) -> None:
    path = tmp_path / "crl.pem"
    path.write_bytes(_crl(CA, [], number=1, last_update=NOW - dt.timedelta(days=2)))
    source = CrlSource(path, CA.cert)
    assert not _revoked(source, f"{SERIAL:x}")
    _replace(path, _crl(CA, [SERIAL], number=2, last_update=NOW - dt.timedelta(days=1)))
    assert _revoked(source, f"{SERIAL:x}")
    # The first CRL again (a restore from backup, or someone who wants the device back).
    _replace(path, _crl(CA, [], number=1, last_update=NOW - dt.timedelta(days=2)))
    with pytest.raises(PkiError, match="older than the CRL it replaces"):
        _revoked(source, f"{SERIAL:x}")
    # Older by its number alone, or by its date alone: refused all the same.
    _replace(path, _crl(CA, [], number=1, last_update=NOW))
    with pytest.raises(PkiError, match="older"):
        _revoked(source, f"{SERIAL:x}")
    _replace(path, _crl(CA, [], last_update=NOW - dt.timedelta(days=3)))
    with pytest.raises(PkiError, match="older"):
        _revoked(source, f"{SERIAL:x}")
    # The same CRL published again, and a newer one, are fine.
    _replace(path, _crl(CA, [SERIAL], number=2, last_update=NOW - dt.timedelta(days=1)))
    assert _revoked(source, f"{SERIAL:x}")
    _replace(path, _crl(CA, [], number=3, last_update=NOW))
    assert not _revoked(source, f"{SERIAL:x}")


def test_a_crl_in_der_or_pem_with_blank_lines_before_it_is_read(tmp_path: Path) -> None:
    path = tmp_path / "crl"
    pem = _crl(CA, [SERIAL])
    for data in (x509.load_pem_x509_crl(pem).public_bytes(serialization.Encoding.DER), b"\n  \n" + pem):
        path.write_bytes(data)
        assert _revoked(CrlSource(path, CA.cert), f"{SERIAL:x}")


def test_a_crl_without_a_number_after_one_with_a_number(tmp_path: Path) -> None:
    """Newer by its date, it is read (no number to compare); never a crash comparing the two."""
    path = tmp_path / "crl.pem"
    path.write_bytes(_crl(CA, [], number=5, last_update=NOW - dt.timedelta(days=1)))
    source = CrlSource(path, CA.cert)
    _replace(path, _crl(CA, [SERIAL], last_update=NOW))
    assert _revoked(source, f"{SERIAL:x}")
    _replace(path, _crl(CA, [], number=4, last_update=NOW))
    assert not _revoked(source, f"{SERIAL:x}")


def test_crl_next_update_boundary(tmp_path: Path) -> None:
    """Good up to and at its nextUpdate (as OpenSSL has it), refused one second after."""
    path = tmp_path / "crl.pem"
    path.write_bytes(_crl(CA, [SERIAL], next_update=NOW + dt.timedelta(hours=1)))
    moment = [NOW]
    source = CrlSource(path, CA.cert, clock=lambda: moment[0])
    moment[0] = NOW + dt.timedelta(hours=1)
    assert _revoked(source, f"{SERIAL:x}") and not _revoked(source, "ff")
    moment[0] = NOW + dt.timedelta(hours=1, seconds=1)
    with pytest.raises(PkiError, match="past its nextUpdate"):
        _revoked(source, "ff")


def test_a_replaced_crl_of_the_same_size_and_time_is_read(tmp_path: Path) -> None:
    """A file renamed into place can have the old one's size and mtime: its inode tells them apart."""
    path = tmp_path / "crl.pem"
    first, second = _crl(CA, [0xAA]), _crl(CA, [0xBB])
    size = max(len(first), len(second))  # ECDSA signatures vary in length: pad the PEM with newlines
    path.write_bytes(first.ljust(size, b"\n"))
    source = CrlSource(path, CA.cert)
    assert _revoked(source, "aa")
    old = os.stat(path)
    new = path.with_name("crl.new")
    new.write_bytes(second.ljust(size, b"\n"))
    assert new.stat().st_size == old.st_size
    os.utime(new, ns=(old.st_atime_ns, old.st_mtime_ns))
    os.replace(new, path)
    assert _revoked(source, "bb") and not _revoked(source, "aa")


def test_a_ca_that_may_not_sign_crls_is_refused(tmp_path: Path) -> None:
    ca = CertificateAuthority.create(Subject("No CRL CA"))
    no_crl_sign = (
        x509.CertificateBuilder().subject_name(ca.cert.subject).issuer_name(ca.cert.subject)
        .public_key(ca.key.public_key()).serial_number(1)
        .not_valid_before(NOW - dt.timedelta(days=1)).not_valid_after(NOW + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .sign(ca.key, hashes.SHA256())
    )  # fmt: skip
    path = tmp_path / "crl.pem"
    path.write_bytes(b"unused")
    with pytest.raises(PkiError, match="cannot sign CRLs"):
        CrlSource(path, no_crl_sign)


def test_denylist_lines(tmp_path: Path) -> None:
    """Comments (with '#' in them, or bytes that are not UTF-8) are skipped; a serial that is not hex refuses
    the file, naming its line."""
    path = tmp_path / "denylist"
    path.write_bytes(b"# caf\xe9 devices\n0A:1B  # a device # the first\n\n")
    source = DenylistSource(path)
    assert _revoked(source, "a1b") and not _revoked(source, "ff")
    for bad in ("g1", "0xZZ", "12 34"):
        path.write_text(f"ff\n{bad}\n")
        with pytest.raises(ImageprovError, match=re.escape(f"{path}:2: '{bad}' is not a hex serial")):
            DenylistSource(path)


def test_a_denylist_gone_bad_refuses_until_a_good_one_is_back(tmp_path: Path) -> None:
    path = tmp_path / "denylist"
    path.write_text(f"{SERIAL:x}\n")
    source = DenylistSource(path)
    assert _revoked(source, f"{SERIAL:x}") and not _revoked(source, "ff")
    path.unlink()
    for _ in range(2):
        with pytest.raises(PkiError, match="cannot read"):
            _revoked(source, "ff")
    path.write_text("not-hex\n")
    with pytest.raises(ImageprovError, match="not a hex serial"):
        _revoked(source, "ff")
    _replace(path, b"ff\n")
    assert _revoked(source, "ff") and not _revoked(source, f"{SERIAL:x}")


# -- the registry ------------------------------------------------------------------------------------------------


class RegistrySource:
    """The edge's registry gate asked the one question these tests ask of every source."""

    name = "registry"

    def __init__(self, pki: Path) -> None:
        self.gate = RegistryGate(pki, timeout=5)

    async def revoked(self, serial: str) -> bool:
        return await self.gate.standing(serial) is Standing.REVOKED


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[tuple[Path, RegistrySource, str, str]]:
    """A PKI whose registry has one active and one revoked certificate, and a source on it."""
    pki = tmp_path / "pki"
    pki.mkdir()
    (pki / "imageprov.toml").write_text("[registry]\ntimeout = 0.2\n")
    ca = CertificateAuthority.create(Subject("Registry CA"))
    active, revoked = ca.issue_device("d-active"), ca.issue_device("d-revoked")
    with Registry(pki, create=True) as opened:
        opened.record(active)
        opened.record(revoked)
        opened.revoke(device_id="d-revoked")
    source = RegistrySource(pki)
    assert _revoked(source, revoked.serial_hex) and not _revoked(source, active.serial_hex)
    yield pki / "registry.sqlite", source, active.serial_hex, revoked.serial_hex
    source.gate.close()


def test_a_pki_without_its_registry_stops_the_edge(tmp_path: Path) -> None:
    (tmp_path / "pki").mkdir()
    with pytest.raises(RegistryMissing, match=r"no registry at .*registry\.sqlite"):
        RegistrySource(tmp_path / "pki")


def test_a_removed_registry_refuses(registry: tuple[Path, RegistrySource, str, str]) -> None:
    path, source, active, revoked = registry
    kept = path.with_name("kept.sqlite")
    shutil.copy(path, kept)
    path.unlink()
    for serial in (active, revoked, active):
        with pytest.raises(PkiError, match="cannot be read"):
            _revoked(source, serial)
    assert not path.exists()  # not made anew, empty, by the lookup
    os.replace(kept, path)
    assert _revoked(source, revoked) and not _revoked(source, active)


def test_a_replaced_registry_is_read(registry: tuple[Path, RegistrySource, str, str], tmp_path: Path) -> None:
    """A registry restored over the old one counts at once (the old connection would go on reading the old file)."""
    path, source, active, revoked = registry
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(path, other / "registry.sqlite")
    with Registry(other) as restored:
        restored.revoke(serial=active)
    os.replace(other / "registry.sqlite", path)
    assert _revoked(source, active) and _revoked(source, revoked)


@pytest.mark.parametrize("how", ["in place", "renamed over"])
def test_a_damaged_registry_refuses(registry: tuple[Path, RegistrySource, str, str], how: str) -> None:
    path, source, active, revoked = registry
    good = path.read_bytes()
    if how == "in place":
        with open(path, "r+b") as handle:
            handle.write(b"not a database!\0" * 256)
    else:
        _replace(path, b"not a database!\0" * 256)
    for serial in (active, revoked):
        with pytest.raises(PkiError, match="damaged"):
            _revoked(source, serial)
    _replace(path, good)
    assert _revoked(source, revoked) and not _revoked(source, active)


def test_a_locked_registry_refuses_within_its_timeout(registry: tuple[Path, RegistrySource, str, str]) -> None:
    """A registry (restored in place) that another program holds locked: refused after [registry] timeout."""
    path, source, active, revoked = registry
    copy = path.with_name("copy.sqlite")
    shutil.copy(path, copy)
    holder = sqlite3.connect(copy, isolation_level=None)
    try:
        holder.execute("PRAGMA locking_mode=EXCLUSIVE")
        holder.execute("BEGIN EXCLUSIVE")
        os.replace(copy, path)
        with pytest.raises(PkiError, match="locked"):
            _revoked(source, active)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert _revoked(source, revoked) and not _revoked(source, active)
