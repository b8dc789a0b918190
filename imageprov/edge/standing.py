"""The PKI's registry as the edge asks it: a certificate's standing, its identity pin, and what to cut off.

Every call runs on a thread pool of its own, under a deadline: a registry
that stops answering (a stopped PostgreSQL server, a locked SQLite file)
makes the call raise ``RegistryUnavailable`` within ``timeout`` seconds, which
the service answers with 503, instead of holding the device, or the event
loop, without bound. A thread stuck on such a call stays stuck until the
database answers; the pool's size bounds how many can be.

An open SQLite connection goes on reading the file it opened after that file
is removed or replaced (a restore, a move), and answers from its cache after
the file is overwritten in place: the file is looked at before each call and
opened anew when it changed (a damaged one then fails to open), and a missing
one refuses, never "not revoked" from what the connection still holds.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from cryptography import x509

from imageprov.errors import PkiError
from imageprov.pki.config import Scheme, load_config
from imageprov.pki.registry import (
    EnrollResult,
    Kind,
    Pin,
    PinResult,
    Record,
    Registry,
    RegistryUnavailable,
    Status,
)

T = TypeVar("T")
log = logging.getLogger("imageprov.edge")


class Standing(enum.Enum):
    """What the registry says of a device certificate, as the edge needs it."""

    DELIVERED = "delivered"  # active: its image or card was confirmed
    PENDING = "pending"  # issued, never confirmed: a station died before it could say the card was good
    REVOKED = "revoked"
    UNKNOWN = "unknown"  # the CA's key signed it, the registry never heard of it
    BOOTSTRAP = "bootstrap"  # a bootstrap certificate, whatever its status: for enrollment (EST) only


class RegistryGate:
    """One registry connection, its own threads, and a deadline on every call."""

    def __init__(self, pki_dir: Path, *, timeout: float, threads: int = 4) -> None:
        self.timeout = timeout
        self.pki_dir = pki_dir
        url = load_config(pki_dir).registry
        self._file = url.path if url.scheme is Scheme.SQLITE else None
        self._lock = threading.Lock()
        self._closed = False
        # Opening it is a start-up step: a registry that is named but missing or
        # unreachable stops the service here, with the registry's own message.
        self._opened, self._registry = self._open()
        self.display = self._registry.display
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="registry")

    def _file_id(self, *, missing_ok: bool = False) -> tuple[int, ...] | None:
        if self._file is None:
            return None
        try:
            info = os.stat(self._file)
        except FileNotFoundError:
            if missing_ok:
                return None
            raise PkiError(
                f"the registry {self._file} cannot be read: it is gone",
                hint="restore it; every device is refused until it is back",
            ) from None
        except OSError as exc:
            raise PkiError(
                f"the registry {self._file} cannot be read: {exc.strerror}",
                hint="restore it; every device is refused until it is back",
            ) from exc
        # Which file, and whether anything wrote to it (a checkpoint of the
        # write-ahead log does too: the connection is then opened again, cheaply).
        return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns

    def _open(self) -> tuple[tuple[int, ...] | None, Registry]:
        before = self._file_id(missing_ok=True)  # then Registry says it is missing, in its own words
        registry = Registry(self.pki_dir)
        after = self._file_id()  # opening may write (a migration): what counts is that it is the same file
        if (after or ())[:2] != (before or ())[:2]:
            registry.close()
            raise PkiError(f"the registry {self._file} was replaced while it was being opened")
        return after, registry

    def _with_registry(self, function: Callable[..., T], *args: object) -> T:
        # In a worker thread. One call at a time: the connection takes them one
        # at a time anyway, and one that is replaced must not be in use.
        with self._lock:
            if self._closed:  # a call that was already on its way when the service stopped
                raise RegistryUnavailable(f"the registry {self.display} is closed: the service is stopping")
            if self._file_id() != self._opened:  # None == None on PostgreSQL
                opened, registry = self._open()
                self._registry.close()
                self._opened, self._registry = opened, registry
            return function(self._registry, *args)

    async def _call(self, what: str, function: Callable[..., T], *args: object) -> T:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout):
                return await loop.run_in_executor(self._pool, self._with_registry, function, *args)
        except TimeoutError:
            raise RegistryUnavailable(
                f"the registry {self.display} did not answer {what} within {self.timeout:g} s",
                hint="is the database up? [registry] timeout in PKI/imageprov.toml sets the deadline",
            ) from None

    async def standing(self, serial: str) -> Standing:
        state = await self._call("a status lookup", Registry.state_of_serial, serial)
        if state is None:
            return Standing.UNKNOWN
        if state.kind is Kind.BOOTSTRAP:
            return Standing.BOOTSTRAP
        return {Status.ACTIVE: Standing.DELIVERED, Status.PENDING: Standing.PENDING}.get(state.status, Standing.REVOKED)

    async def enrollment_verdict(self, serial: str, public_key: str, kind: Kind) -> EnrollResult:
        """What an enrollment with the credential ``serial`` would get now (``Registry.enrollment_verdict``)."""
        return await self._call(
            "an enrollment check", lambda registry: registry.enrollment_verdict(serial, public_key, kind=kind)
        )

    async def enroll(self, serial: str, cert: x509.Certificate, kind: Kind, where: str) -> EnrollResult:
        """Record ``cert``, obtained with the credential ``serial`` (``Registry.enroll``)."""
        return await self._call("an enrollment", lambda registry: registry.enroll(serial, cert, kind=kind, where=where))

    async def pin(self, serial: str, identity: str) -> PinResult:
        return await self._call("an identity pin", Registry.pin_identity, serial, identity)

    async def set_mender_device(self, serial: str, device_id: str) -> None:
        await self._call("a device id", Registry.set_mender_device, serial, device_id)

    async def uncut_revoked_pins(self) -> list[Pin]:
        return await self._call("the revoked devices", Registry.uncut_revoked_pins)

    async def pin_of(self, serial: str) -> Pin | None:
        return await self._call("a pin", Registry.pin_of, serial)

    async def record_of(self, serial: str) -> Record | None:
        return await self._call("a certificate", Registry.record_of, serial)

    async def claim_cut(self, serial: str, seconds: float) -> bool:
        return await self._call("a cut-off claim", Registry.claim_cut, serial, seconds)

    async def release_cut(self, serial: str) -> None:
        await self._call("a cut-off release", Registry.release_cut, serial)

    async def mark_cut(self, serial: str) -> None:
        await self._call("a cut-off", Registry.mark_cut, serial)

    async def ping(self) -> None:
        """Raise ``RegistryUnavailable`` unless the registry answers a lookup in time."""
        await self._call("a readiness probe", Registry.status_of_serial, "0")

    def close(self) -> None:
        """Take no more calls; close the connection once no call is using it.

        A call given up at its deadline, or whose task was cancelled (the
        cut-off loop's, at shutdown), goes on in its thread: closing the
        connection under it frees what that thread is reading (SQLite's C
        connection: the interpreter crashed here). So wait for it as long as one
        call may take; one still running then waits on a server that stopped
        answering, and its connection is left to the end of the process.
        """
        self._pool.shutdown(wait=False, cancel_futures=True)
        if not self._lock.acquire(timeout=self.timeout):
            log.warning(f"the registry {self.display} is still answering a call: its connection is left open")
            return
        try:
            self._closed = True
            self._registry.close()
        finally:
            self._lock.release()
