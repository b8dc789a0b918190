"""Where the edge learns that a certificate is revoked besides the registry: a CRL or a denylist.

One small interface, ``RevocationSource``, so that the service asks the same
question of each (``await source.revoked(serial)``) and a new backend (a
source is one more class. Files are reread when they change, so a new CRL or
denylist takes effect without a restart. The registry is not one of them: it
says more than "revoked" (pending, unknown, the identity pin), and
``standing.RegistryGate`` asks it.

Fail closed: a file that is removed, damaged or replaced by one that is not
good (a CRL of another key, an older CRL) makes ``revoked`` raise, with the
reason, on every request until a good one is back; the contents read before are
never served in its place.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography import x509

from imageprov.errors import PkiError, UsageError
from imageprov.pki.chain import crl_problem


class RevocationSource(Protocol):
    """Says whether a certificate (by lowercase hex serial) is revoked; raises ``PkiError`` if it cannot tell."""

    name: str

    async def revoked(self, serial: str) -> bool: ...

    async def revoked_serials(self) -> frozenset[str]:
        """Every serial the source revokes now (read anew if it changed): what the edge cuts off in Mender."""
        ...


@dataclass
class _Loaded:
    stamp: tuple[int, ...]
    serials: frozenset[str]
    next_update: dt.datetime | None = None
    last_update: dt.datetime | None = None
    number: int | None = None


def normalize_serial(text: str) -> str:
    """``0A:1b`` / ``0x0a1b`` / ``a1b`` -> ``a1b``, the way the registry writes serials."""
    cleaned = text.strip().lower().removeprefix("0x").replace(":", "")
    int(cleaned, 16)  # ValueError on anything that is not hex
    return cleaned.lstrip("0") or "0"


def _stamp(path: Path) -> tuple[int, ...]:
    try:
        info = os.stat(path)
    except OSError as exc:
        raise PkiError(f"cannot read {path}: {exc.strerror}") from exc
    # The inode too: a file renamed into place may have the same size and (coarse) mtime.
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


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

    async def revoked_serials(self) -> frozenset[str]:
        if _stamp(self.path) != self._loaded.stamp:
            self._loaded = self._load()
        return self._loaded.serials

    async def revoked(self, serial: str) -> bool:
        return serial in await self.revoked_serials()


class CrlSource:
    """A CRL signed by the fleet CA. Past its nextUpdate it says nothing, and every device is refused,
    as nginx does with ``ssl_crl``."""

    name = "crl"

    def __init__(self, path: Path, ca_cert: x509.Certificate, *, clock: Callable[[], dt.datetime] = _utcnow) -> None:
        self.path = path
        self.ca_cert = ca_cert
        self.clock = clock
        problem = crl_problem(ca_cert)
        if problem is not None:  # OpenSSL, and so nginx, refuses every device with such a CRL
            raise PkiError(f"the fleet CA cannot sign CRLs: {problem}", hint="use --denylist")
        self._loaded = self._load(None)

    def _load(self, previous: _Loaded | None) -> _Loaded:
        stamp = _stamp(self.path)
        data = _read(self.path)
        try:
            crl = x509.load_pem_x509_crl(data) if data.lstrip().startswith(b"-----") else x509.load_der_x509_crl(data)
            number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        except x509.ExtensionNotFound:
            number = None
        except (ValueError, x509.DuplicateExtension) as exc:
            raise PkiError(f"{self.path} is not a CRL") from exc
        if crl.issuer != self.ca_cert.subject or not crl.is_signature_valid(self.ca_cert.public_key()):  # type: ignore[arg-type]
            raise PkiError(f"{self.path} is not signed by the fleet CA")
        critical = [e.oid.dotted_string for e in crl.extensions if e.critical]
        if critical:  # a delta CRL or one that covers only some certificates: what is missing could be revoked
            raise PkiError(f"{self.path} has a critical extension the edge does not process ({', '.join(critical)})")
        if previous is not None and (
            crl.last_update_utc < (previous.last_update or crl.last_update_utc)
            or (number is not None and previous.number is not None and number < previous.number)
        ):
            # A CRL from before the one in force would bring back what was revoked since.
            raise PkiError(f"{self.path} is older than the CRL it replaces", hint="publish a new one: imageprov crl")
        serials = frozenset(f"{entry.serial_number:x}" for entry in crl)
        return _Loaded(stamp, serials, crl.next_update_utc, crl.last_update_utc, number)

    async def revoked_serials(self) -> frozenset[str]:
        if _stamp(self.path) != self._loaded.stamp:
            self._loaded = self._load(self._loaded)
        next_update = self._loaded.next_update
        if next_update is not None and self.clock() > next_update:
            raise PkiError(f"the CRL {self.path} is past its nextUpdate", hint="publish a new one: imageprov crl")
        return self._loaded.serials

    async def revoked(self, serial: str) -> bool:
        return serial in await self.revoked_serials()
