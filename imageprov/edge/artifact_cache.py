"""A bounded disk cache of artifacts, shared by the devices that download the same one.

N devices asking for one artifact at once cause one fetch from storage: the
first request starts it (a task of its own, so that the device hanging up does
not cancel it), the others wait for that same task, and all are then served
from the file, ``Range`` included. Files are kept least recently used first
out, within ``size`` bytes; an artifact larger than the whole cache is not
cached (each device streams it from storage). Files are named by the SHA-256
of the storage URL without its query: presigned links for one object differ
only in their query (signature, expiry), per device and per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from imageprov.errors import ImageprovError

PART = ".part"


class TooLarge(ImageprovError):
    """The artifact does not fit the cache: streamed from storage instead."""


def cache_key(url: str) -> str:
    """The object a presigned URL names: scheme, host and path, without the query that signs it."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc.lower(), parts.path, "", ""))


# Writes the whole object into the path given, at most ``limit`` bytes (else TooLarge); returns its size.
Fetch = Callable[[Path, int], Awaitable[int]]


class ArtifactCache:
    """Artifacts on disk under ``directory``, at most ``size`` bytes in all."""

    def __init__(self, directory: Path, size: int) -> None:
        self.directory = directory
        self.size = size
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._entries: OrderedDict[str, int] = OrderedDict()
        self._flights: dict[str, asyncio.Task[Path | None]] = {}
        # What a restarted edge finds is kept, oldest use first; a fill cut by the stop is dropped.
        found = []
        for path in directory.iterdir():
            if path.name.endswith(PART):
                path.unlink(missing_ok=True)
            elif path.is_file():
                stat = path.stat()
                found.append((stat.st_mtime, path.name, stat.st_size))
        for _, name, bytes_ in sorted(found):
            self._entries[name] = bytes_
        self._evict(keep=None)

    @property
    def used(self) -> int:
        return sum(self._entries.values())

    async def get(self, url: str, fetch: Fetch) -> Path | None:
        """The file holding ``url``'s object, fetched once however many ask at once; None: too large to cache."""
        name = hashlib.sha256(cache_key(url).encode()).hexdigest()
        if name in self._entries:
            path = self.directory / name
            if path.is_file():
                self._entries.move_to_end(name)
                with contextlib.suppress(OSError):
                    os.utime(path)  # its place in the order survives a restart
                return path
            del self._entries[name]  # removed behind the cache's back: fetched again
        flight = self._flights.get(name)
        if flight is None:
            flight = asyncio.create_task(self._fill(name, fetch))
            self._flights[name] = flight
            flight.add_done_callback(lambda _: self._flights.pop(name, None))
        # Shielded: a device that hangs up does not cancel the fetch the others wait for.
        return await asyncio.shield(flight)

    async def _fill(self, name: str, fetch: Fetch) -> Path | None:
        part = self.directory / f"{name}.{uuid.uuid4().hex}{PART}"
        try:
            size = await fetch(part, self.size)
        except TooLarge:
            part.unlink(missing_ok=True)
            return None
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        path = self.directory / name
        os.replace(part, path)  # readers see the whole object or none
        self._entries[name] = size
        self._entries.move_to_end(name)
        self._evict(keep=name)
        return path

    def _evict(self, keep: str | None) -> None:
        # A file being served when it goes stays readable through its open descriptor.
        while self.used > self.size and self._entries:
            oldest = next(iter(self._entries))
            if oldest == keep:
                break
            del self._entries[oldest]
            (self.directory / oldest).unlink(missing_ok=True)
