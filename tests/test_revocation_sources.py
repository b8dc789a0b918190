"""The edge's revocation sources fail closed: a CRL, denylist or registry that is removed, damaged, forged or
replaced by an older one makes every lookup raise (503 from the service), never answer from what was read before,
until a good one is back."""

from __future__ import annotations

import asyncio
import datetime as dt
import inspect
import os
import re
import shutil
import signal
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

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


def _der(pem: bytes) -> bytes:
    return x509.load_pem_x509_crl(pem).public_bytes(serialization.Encoding.DER)


def _pem(der: bytes) -> bytes:
    return x509.load_der_x509_crl(der).public_bytes(serialization.Encoding.PEM)


def _tampered(der: bytes) -> bytes:
    """``der`` with the last octet of its (only) revoked serial changed: A1B2 becomes A1B3, still a valid CRL."""
    at = der.index(SERIAL.to_bytes(3, "big")) + 2
    return der[:at] + bytes([der[at] ^ 1]) + der[at + 1 :]


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
        # The fleet CA's own CRL with the revoked serial changed (one octet), as DER and as PEM.
        (lambda path: _replace(path, _tampered(_der(_crl(CA, [SERIAL])))), "not signed by the fleet CA"),
        (lambda path: _replace(path, _pem(_tampered(_der(_crl(CA, [SERIAL]))))), "not signed by the fleet CA"),
        # Its bytes, and something after them: not what was signed.
        (lambda path: _replace(path, _der(_crl(CA, [SERIAL])) + b"\x00"), "is not a CRL|not signed"),
        (lambda path: _replace(path, _crl(CA, [SERIAL]).replace(b"\n", b"\n*", 2)), "is not a CRL"),
    ],
    ids=["garbage PEM", "garbage DER", "forged", "removed", "delta CRL", "tampered DER", "tampered PEM",
         "bytes after it", "not base64"],
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


def _in_flight(gate: RegistryGate, release: threading.Event) -> tuple[Any, threading.Event]:
    """A registry call running in the gate's thread, held before its query until ``release``: as the cut-off
    loop's call is when the service stops (its task cancelled, its thread going on)."""
    started = threading.Event()

    def held(registry: Registry) -> list[Any]:
        started.set()
        release.wait(60)
        return registry.all()

    call = gate._pool.submit(gate._with_registry, held)
    assert started.wait(60)
    return call, started


def test_closing_waits_for_a_call_in_flight(registry: tuple[Path, RegistrySource, str, str]) -> None:
    """Closing the connection under a running query crashed the interpreter (SQLite's C connection freed)."""
    gate, release = registry[1].gate, threading.Event()
    call, _ = _in_flight(gate, release)
    closing = threading.Thread(target=gate.close)
    closing.start()
    closing.join(0.5)
    assert closing.is_alive(), "closed the connection while a call was using it"
    release.set()
    assert len(call.result(60)) == 2  # the query ran on an open connection
    closing.join(60)
    assert not closing.is_alive()
    with pytest.raises(PkiError, match="closed"):  # and a call that comes after is refused, not run on it
        gate._with_registry(Registry.status_of_serial, "0")


def test_closing_leaves_a_call_that_overruns_its_deadline(registry: tuple[Path, RegistrySource, str, str]) -> None:
    """A call stuck on a server that stopped answering does not hold the service's stop for longer than one call
    may take: its connection is left to the end of the process."""
    gate, release = registry[1].gate, threading.Event()
    gate.timeout = 0.2
    call, _ = _in_flight(gate, release)
    gate.close()  # returns, within the deadline
    release.set()
    assert len(call.result(60)) == 2


# -- reloads off the event loop ----------------------------------------------------------------------------------


class Held:
    """Makes a source's reloads wait until released: what parsing a CRL of a large fleet is to the lookups that
    come meanwhile, without depending on how long it takes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, source: CrlSource | DenylistSource) -> None:
        self.started, self.release, self.calls = threading.Event(), threading.Event(), 0
        load = source._load
        # Every file is one too big to read on the spot, as a CRL of a large fleet is.
        monkeypatch.setattr("imageprov.edge.revocation.INLINE_SIZE", 0)

        def held(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            self.started.set()
            # Waited for in the reload's thread. Were it on the event loop, nothing could ever release it.
            if not self.release.wait(10):
                raise AssertionError("the reload was never released: did it block the event loop?")
            return load(*args, **kwargs)

        monkeypatch.setattr(source, "_load", held)

    def again(self) -> None:
        self.started.clear()
        self.release.clear()


async def _until(condition: Callable[[], bool | Awaitable[bool]], what: str) -> None:
    """Poll ``condition`` (a lookup, or a plain test) until it holds."""
    deadline = time.monotonic() + 10
    while not await _value(condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def _value(result: bool | Awaitable[bool]) -> bool:
    return await result if inspect.isawaitable(result) else bool(result)


async def _answers(source: RevocationSource, serial: str, revoked: bool) -> bool:
    """Whether ``source`` answers, and says ``revoked``: not refusing (any more), and with the new file."""
    try:
        return await source.revoked(serial) is revoked
    except PkiError:
        return False


async def _refused(source: RevocationSource, serial: str, message: str) -> bool:
    try:
        await source.revoked(serial)
    except PkiError as exc:
        assert re.search(message, str(exc)), exc
        return True
    return False


def _source(kind: str, path: Path, serials: list[int]) -> CrlSource | DenylistSource:
    _publish(kind, path, serials)
    return CrlSource(path, CA.cert) if kind == "crl" else DenylistSource(path)


def _publish(kind: str, path: Path, serials: list[int]) -> None:
    _replace(path, _crl(CA, serials) if kind == "crl" else "".join(f"{s:x}\n" for s in serials).encode())


@pytest.mark.parametrize("kind", ["crl", "denylist"])
def test_a_big_file_is_read_while_lookups_go_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """While a new file is read, lookups on the same event loop are answered at once from the file in force;
    once it is read, the new file answers every lookup. One reload, however many lookups come meanwhile."""
    path = tmp_path / kind
    source = _source(kind, path, [SERIAL])
    held = Held(monkeypatch, source)

    async def scenario() -> None:
        _publish(kind, path, [SERIAL, 0xBB])  # 0xBB newly revoked
        meanwhile = [await asyncio.wait_for(source.revoked(s), 5) for s in ("bb", f"{SERIAL:x}", "ff")]
        await _until(held.started.is_set, "the reload to start")
        meanwhile += [await asyncio.wait_for(source.revoked(s), 5) for s in ("bb", f"{SERIAL:x}", "ff")]
        assert meanwhile == [False, True, False] * 2  # the file in force: 0xBB not yet
        held.release.set()
        await _until(lambda: _answers(source, "bb", True), "the new file to be in force")
        assert await source.revoked(f"{SERIAL:x}") and not await source.revoked("ff")
        assert held.calls == 1

    asyncio.run(scenario())


def test_a_big_crl_found_bad_is_refused_even_while_it_is_read_again(
    crl: tuple[Path, CrlSource], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Until a reload finds the new file bad, the CRL in force answers; from then on every lookup is refused,
    while it is read again too, and nothing from the CRL before it comes back until a good one is read."""
    path, source = crl
    held = Held(monkeypatch, source)

    async def scenario() -> None:
        _replace(path, b"-----BEGIN X509 CRL-----\n" + b"garbage\n" * 10 + b"-----END X509 CRL-----\n")
        assert await source.revoked(f"{SERIAL:x}")  # not found bad yet
        await _until(held.started.is_set, "the reload to start")
        assert await source.revoked(f"{SERIAL:x}")
        held.release.set()
        await _until(lambda: _refused(source, f"{SERIAL:x}", "is not a CRL"), "the CRL to be found bad")
        held.again()
        monkeypatch.setattr("imageprov.edge.revocation.RETRY_INTERVAL", 0.0)  # read again at the next lookup
        assert await _refused(source, "ff", "is not a CRL")
        await _until(held.started.is_set, "the reload to start again")
        for serial in (f"{SERIAL:x}", "ff"):  # while it is read again: refused, not the CRL before it
            assert await _refused(source, serial, "is not a CRL")
        _replace(path, _crl(CA, [0xFF]))  # a good one, while the bad one is still being read
        assert await _refused(source, f"{SERIAL:x}", "is not a CRL")
        held.release.set()
        await _until(lambda: _answers(source, "ff", True), "the good CRL to be in force")
        assert not await source.revoked(f"{SERIAL:x}")
        assert held.calls == 2  # the reload that was held read the file as it found it: the good one

    asyncio.run(scenario())


def test_the_crl_in_force_expires_while_its_successor_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "crl.pem"
    path.write_bytes(_crl(CA, [SERIAL], next_update=NOW + dt.timedelta(hours=1)))
    moment = [NOW]
    source = CrlSource(path, CA.cert, clock=lambda: moment[0])
    held = Held(monkeypatch, source)

    async def scenario() -> None:
        _replace(path, _crl(CA, [], next_update=NOW + dt.timedelta(days=1)))
        assert await source.revoked(f"{SERIAL:x}")
        await _until(held.started.is_set, "the reload to start")
        moment[0] = NOW + dt.timedelta(hours=2)
        assert await _refused(source, "ff", "past its nextUpdate")
        held.release.set()
        await _until(lambda: _answers(source, f"{SERIAL:x}", False), "the new CRL, good for a day, in force")

    asyncio.run(scenario())


def test_a_failure_of_the_reload_itself_refuses_and_is_tried_again(
    crl: tuple[Path, CrlSource], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not only a bad file: a reload that fails in any way refuses, and the same file is read again after
    RETRY_INTERVAL (a failure that was not the file's, such as the worker killed, passes)."""
    path, source = crl
    load = source._load

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("something unforeseen")

    monkeypatch.setattr(source, "_load", broken)
    _replace(path, _crl(CA, [0xBB]))
    for serial in ("bb", f"{SERIAL:x}"):
        with pytest.raises(PkiError, match=r"cannot read .*something unforeseen"):
            _revoked(source, serial)
    monkeypatch.setattr(source, "_load", load)
    monkeypatch.setattr("imageprov.edge.revocation.RETRY_INTERVAL", 0.0)
    assert _revoked(source, "bb") and not _revoked(source, f"{SERIAL:x}")


def test_the_worker_process_killed_or_stuck_fails_the_read_and_is_started_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from imageprov.edge import revocation

    def worker_pid() -> int:
        # What it runs, it imports by name: a function of the standard library, not of this test.
        return int(revocation._WORKER.run(os.readlink, Path("/proc/self")))

    pid = worker_pid()
    assert pid != os.getpid()
    with pytest.raises(PkiError, match=r"the process reading .* stopped"):
        revocation._WORKER.run(os.kill, pid, signal.SIGKILL)  # type: ignore[arg-type]
    stuck = worker_pid()
    assert stuck not in (pid, os.getpid())  # another one
    monkeypatch.setattr(revocation, "RELOAD_DEADLINE", 0.5)
    with pytest.raises(PkiError, match=r"took more than 0\.5 s"):
        revocation._WORKER.run(time.sleep, 60)  # type: ignore[arg-type]
    monkeypatch.setattr(revocation, "RELOAD_DEADLINE", 60.0)  # the next worker's start-up is not on trial
    assert worker_pid() != stuck  # killed, and another one started
