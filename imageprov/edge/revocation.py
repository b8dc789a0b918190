"""Where the edge learns that a certificate is revoked: the registry, a CRL or a denylist.

One small interface, ``RevocationSource``, so that the service asks the same
question of each (``await source.revoked(serial)``) and a new backend (a
registry on PostgreSQL) is one more class. Files are reread when they change,
so a new CRL or denylist takes effect without a restart; the registry is asked
on every request, so a revocation takes effect at once.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography import x509

from imageprov.errors import PkiError, UsageError
from imageprov.pki.config import Scheme, load_config
from imageprov.pki.registry import REGISTRY, Registry, Status


class RevocationSource(Protocol):
    """Says whether a certificate (by lowercase hex serial) is revoked; raises ``PkiError`` if it cannot tell."""

    name: str

    async def revoked(self, serial: str) -> bool: ...


@dataclass
class _Loaded:
    stamp: tuple[int, int]
    serials: frozenset[str]
    next_update: dt.datetime | None = None


def normalize_serial(text: str) -> str:
    """``0A:1b`` / ``0x0a1b`` / ``a1b`` -> ``a1b``, the way the registry writes serials."""
    cleaned = text.strip().lower().removeprefix("0x").replace(":", "")
    int(cleaned, 16)  # ValueError on anything that is not hex
    return cleaned.lstrip("0") or "0"


def _stamp(path: Path) -> tuple[int, int]:
    try:
        info = os.stat(path)
    except OSError as exc:
        raise PkiError(f"cannot read {path}: {exc.strerror}") from exc
    return info.st_mtime_ns, info.st_size


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:  # replaced or removed between the stat and the read
        raise PkiError(f"cannot read {path}: {exc.strerror}") from exc


class DenylistSource:
    """Revoked serials in hex, one a line, '#' comments (Mender Gateway's MTLS_BLACKLIST_PATH)."""

    name = "denylist"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._loaded = self._load()

    def _load(self) -> _Loaded:
        stamp = _stamp(self.path)
        serials = set()
        for number, line in enumerate(_read(self.path).decode("utf-8", "replace").splitlines(), 1):
            text = line.split("#", 1)[0].strip()
            if not text:
                continue
            try:
                serials.add(normalize_serial(text))
            except ValueError as exc:
                raise UsageError(f"{self.path}:{number}: {text!r} is not a hex serial") from exc
        return _Loaded(stamp, frozenset(serials))

    async def revoked(self, serial: str) -> bool:
        if _stamp(self.path) != self._loaded.stamp:
            self._loaded = self._load()
        return serial in self._loaded.serials


class CrlSource:
    """A CRL signed by the fleet CA. Past its nextUpdate it says nothing, and every device is refused,
    as nginx does with ``ssl_crl``."""

    name = "crl"

    def __init__(self, path: Path, ca_cert: x509.Certificate) -> None:
        self.path = path
        self.ca_cert = ca_cert
        self._loaded = self._load()

    def _load(self) -> _Loaded:
        stamp = _stamp(self.path)
        data = _read(self.path)
        try:
            crl = x509.load_pem_x509_crl(data) if data.lstrip().startswith(b"-----") else x509.load_der_x509_crl(data)
        except ValueError as exc:
            raise PkiError(f"{self.path} is not a CRL") from exc
        if crl.issuer != self.ca_cert.subject or not crl.is_signature_valid(self.ca_cert.public_key()):  # type: ignore[arg-type]
            raise PkiError(f"{self.path} is not signed by the fleet CA")
        serials = frozenset(f"{entry.serial_number:x}" for entry in crl)
        return _Loaded(stamp, serials, crl.next_update_utc)

    async def revoked(self, serial: str) -> bool:
        if _stamp(self.path) != self._loaded.stamp:
            self._loaded = self._load()
        next_update = self._loaded.next_update
        if next_update is not None and dt.datetime.now(dt.UTC) > next_update:
            raise PkiError(f"the CRL {self.path} is past its nextUpdate", hint="publish a new one: imageprov crl")
        return serial in self._loaded.serials


class RegistrySource:
    """The PKI's registry, asked on every request: a revocation counts from the moment it is committed."""

    name = "registry"

    def __init__(self, pki_dir: Path) -> None:
        url = load_config(pki_dir).registry
        if url.scheme is Scheme.SQLITE and not url.path.is_file():
            raise UsageError(f"{pki_dir} has no {REGISTRY}", hint="pass the PKI directory made by 'imageprov ca init'")
        self.pki_dir = pki_dir
        # One connection (SQLite or PostgreSQL, as PKI/imageprov.toml says) for
        # every lookup, from worker threads: status_of_serial allows that, and
        # opens a lost PostgreSQL connection again by itself.
        self._registry = Registry(pki_dir)

    def _lookup(self, serial: str) -> bool:
        # In a worker thread: a lookup must not stall the event loop.
        return self._registry.status_of_serial(serial) is Status.REVOKED

    async def revoked(self, serial: str) -> bool:
        return await asyncio.to_thread(self._lookup, serial)
