"""One image onto many disks at once, from one pass over its source: bmaptool's copy engine, fanned out.

The image is a list of spans (byte ranges that must be written, the rest is
left as the card holds it). A span's bytes are either the same for every
target (read once, here, in the calling thread, and handed to every writer)
or each target's own (read by that target's writer from its own file: the
device's stamped data partition). One writer thread per target writes with
O_DIRECT where the device takes it, so that a pulled card shows as an error
at the write rather than as a silent loss in the page cache, and falls back
to buffered writes flushed every few MiB (as bmaptool bounds its dirty
pages) where it does not. Every chunk's SHA-256 is kept so that each target
can be read back and compared after it is flushed. An error names the target
and the byte offset, and stops that target only.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from imageprov.disk.blockdev import flush_buffers

CHUNK = 4 << 20
_DEPTH = 8  # chunks in flight per writer: bounds memory, lets a slow card lag a little
_SYNC_EVERY = 64 << 20  # buffered fallback: flush at least this often


@dataclass(frozen=True)
class Span:
    """Bytes ``[start, end)`` of the image, read from ``source``; None: from each target's own file."""

    start: int
    end: int
    source: Path | None


@dataclass(frozen=True)
class Chunk:
    offset: int
    length: int
    sha256: bytes


@dataclass(frozen=True)
class Target:
    name: str  # for messages, e.g. "/dev/sdb (sdb)"
    path: Path
    fd: int  # opened for writing by the caller (O_EXCL), O_DIRECT if ``direct``
    direct: bool
    align: int  # the device's logical block size
    own_source: Path | None = None  # where this target's own spans are read from
    own_ranges: tuple[tuple[int, int], ...] = ()  # the byte ranges of it to write, inside own spans


@dataclass
class Outcome:
    """A target's result, filled in by its writer thread."""

    target: Target
    total: int
    written: int = 0
    error: str | None = None
    chunks: list[Chunk] = field(default_factory=list)


class _Failed(Exception):
    def __init__(self, offset: int, exc: OSError) -> None:
        super().__init__(offset, exc)
        self.offset = offset
        self.exc = exc


def _buffer(size: int) -> mmap.mmap:
    # Anonymous mappings are page-aligned, as O_DIRECT wants its buffers.
    return mmap.mmap(-1, max(size, mmap.PAGESIZE))


def _pread_into(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise OSError(errno.EIO, f"unexpected end of file at byte {offset + done}")
        done += n


def _own_spans(target: Target, spans: Sequence[Span]) -> list[tuple[int, int]]:
    regions = [(s.start, s.end) for s in spans if s.source is None]
    return [(max(a, s), min(b, e)) for a, b in target.own_ranges for s, e in regions if max(a, s) < min(b, e)]


class _Writer(threading.Thread):
    def __init__(self, target: Target, outcome: Outcome) -> None:
        super().__init__(name=f"imageprov-write-{target.path.name}", daemon=True)
        self.target = target
        self.outcome = outcome
        self.queue: queue.Queue[tuple[int, memoryview, bytes] | tuple[int, int] | None] = queue.Queue(_DEPTH)
        self.stop = False
        self._buffered: int | None = None
        self._unsynced = 0

    def run(self) -> None:
        try:
            while (item := self.queue.get()) is not None:
                if self.outcome.error is not None or self.stop:
                    continue  # keep draining, so that the reader never blocks on a failed target
                try:
                    if len(item) == 3:
                        offset, view, digest = item
                        self._write(view, offset)
                        self.outcome.chunks.append(Chunk(offset, len(view), digest))
                    else:
                        self._write_own(*item)
                except _Failed as failed:
                    self.outcome.error = (
                        f"{self.target.name}: write failed at byte {failed.offset}: {failed.exc.strerror or failed.exc}"
                    )
            if not self.stop:
                self._flush()  # in this thread: the cards' flushes overlap
        finally:
            if self._buffered is not None:
                os.close(self._buffered)

    def _write_own(self, start: int, end: int) -> None:
        assert self.target.own_source is not None
        buf = _buffer(CHUNK)
        with open(self.target.own_source, "rb") as source:
            for offset in range(start, end, CHUNK):
                view = memoryview(buf)[: min(CHUNK, end - offset)]
                try:
                    _pread_into(source.fileno(), view, offset)
                except OSError as exc:
                    raise _Failed(offset, exc) from exc
                self._write(view, offset)
                self.outcome.chunks.append(Chunk(offset, len(view), hashlib.sha256(view).digest()))

    def _write(self, view: memoryview, offset: int) -> None:
        aligned = offset % self.target.align == 0 and len(view) % self.target.align == 0
        fd = self.target.fd if aligned or not self.target.direct else self._buffered_fd()
        done = 0
        try:
            while done < len(view):
                n = os.pwrite(fd, view[done:], offset + done)
                if n == 0:
                    raise OSError(errno.EIO, "the device took no bytes")
                done += n
                self.outcome.written += n
            if fd != self.target.fd or not self.target.direct:
                self._unsynced += len(view)
                if self._unsynced >= _SYNC_EVERY:
                    os.fdatasync(fd)
                    self._unsynced = 0
        except OSError as exc:
            raise _Failed(offset + done, exc) from exc

    def _buffered_fd(self) -> int:
        # Pieces O_DIRECT cannot take (not aligned to the logical block) go
        # through the page cache; the target's O_EXCL open still holds the disk.
        if self._buffered is None:
            self._buffered = os.open(self.target.path, os.O_WRONLY | os.O_CLOEXEC)
        return self._buffered

    def _flush(self) -> None:
        # Everything written made durable on the device, its volatile cache included.
        if self.outcome.error is not None:
            return
        try:
            if self._buffered is not None:
                os.fsync(self._buffered)
            os.fsync(self.target.fd)
        except OSError as exc:
            self.outcome.error = f"{self.target.name}: flushing failed: {exc.strerror}"


def fan_out(
    spans: Sequence[Span],
    targets: Sequence[Target],
    *,
    on_chunk: Callable[[list[Outcome]], None] | None = None,
) -> tuple[list[Outcome], dict[Path, int]]:
    """Write ``spans`` to every target; return each target's outcome and the bytes read from each source.

    Shared spans are read once whatever the number of targets. Each target is
    flushed (fsync) by its writer at the end; its file descriptor is not closed.
    """
    ordered = sorted(spans, key=lambda s: s.start)
    outcomes = []
    for target in targets:
        shared = sum(s.end - s.start for s in ordered if s.source is not None)
        own = sum(b - a for a, b in _own_spans(target, ordered))
        outcomes.append(Outcome(target, shared + own))
    writers = [_Writer(t, o) for t, o in zip(targets, outcomes)]
    for writer in writers:
        writer.start()
    read: dict[Path, int] = {}
    try:
        handles: dict[Path, int] = {}
        try:
            for span in ordered:
                if span.source is None:
                    for writer in writers:
                        for piece in _own_spans(writer.target, [span]):
                            writer.queue.put(piece)
                    continue
                if span.source not in handles:
                    handles[span.source] = os.open(span.source, os.O_RDONLY | os.O_CLOEXEC)
                    os.posix_fadvise(handles[span.source], 0, 0, os.POSIX_FADV_SEQUENTIAL)
                for offset in range(span.start, span.end, CHUNK):
                    # A new buffer per chunk: every writer holds it until written.
                    view = memoryview(_buffer(CHUNK))[: min(CHUNK, span.end - offset)]
                    _pread_into(handles[span.source], view, offset)
                    read[span.source] = read.get(span.source, 0) + len(view)
                    digest = hashlib.sha256(view).digest()
                    for writer in writers:
                        writer.queue.put((offset, view, digest))
                    if on_chunk is not None:
                        on_chunk(outcomes)
        finally:
            for fd in handles.values():
                os.close(fd)
    except BaseException:
        for writer in writers:
            writer.stop = True
        raise
    finally:
        for writer in writers:
            writer.queue.put(None)
        for writer in writers:
            writer.join()
    return outcomes, read


def read_back(target: Target, chunks: Sequence[Chunk]) -> str | None:
    """Read every written chunk back from the device and compare; the first difference, or None."""
    try:
        fd, direct = os.open(target.path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC), True
    except OSError:
        fd, direct = os.open(target.path, os.O_RDONLY | os.O_CLOEXEC), False
    buffered: int | None = None
    try:
        if not direct:
            flush_buffers(fd)
        buf = _buffer(CHUNK)
        for chunk in sorted(chunks, key=lambda c: c.offset):
            view = memoryview(buf)[: chunk.length]
            aligned = chunk.offset % target.align == 0 and chunk.length % target.align == 0
            if direct and not aligned and buffered is None:
                buffered = os.open(target.path, os.O_RDONLY | os.O_CLOEXEC)
                flush_buffers(buffered)
            try:
                _pread_into(fd if aligned or buffered is None else buffered, view, chunk.offset)
            except OSError as exc:
                return f"{target.name}: reading back failed at byte {chunk.offset}: {exc.strerror}"
            if hashlib.sha256(view).digest() != chunk.sha256:
                end = chunk.offset + chunk.length
                return f"{target.name}: reads back differently from what was written at bytes {chunk.offset}-{end}"
    finally:
        os.close(fd)
        if buffered is not None:
            os.close(buffered)
    return None
