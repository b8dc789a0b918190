"""Compressed images: read through a private decompressed copy, written back in their own compression.

A compressed image is decompressed into a sparse file (runs of zero blocks
become holes): once per batch for ``stamp``, once per command for the
commands that read an image, and ``prepare``/``cp`` into one edit that copy
and compress it back over the image, atomically. gzip, xz and bzip2 come from
the standard library; zstd from the zstd tool, which writes sparse files itself.
"""

from __future__ import annotations

import bz2
import enum
import errno
import gzip
import lzma
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import IO

from imageprov.disk.copy import Progress, edit_in_place, stage, staged
from imageprov.errors import ImageprovError, UsageError
from imageprov.run import find_tool, run

_BLOCK = 4096
_CHUNK = 1 << 20
_ZERO = bytes(_CHUNK)
_FULL = (errno.ENOSPC, errno.EDQUOT)

# Long work shown to the user: (what is done, its total in bytes) -> a context
# yielding the callback that is given the bytes done as they are.
Meter = Callable[[str, int], AbstractContextManager[Progress]]


def quiet(label: str, total: int) -> AbstractContextManager[Progress]:
    """The meter that shows nothing."""
    return nullcontext(_ignore)


def _ignore(done: int) -> None:
    pass


class CompressError(ImageprovError):
    """A compressed image cannot be read or written."""


class Compression(enum.Enum):
    GZ = "gz"
    XZ = "xz"
    BZ2 = "bz2"
    ZST = "zst"

    @property
    def suffix(self) -> str:
        return f".{self.value}"

    @property
    def tool(self) -> str:
        """The format's own command-line tool."""
        return {"gz": "gzip", "xz": "xz", "bz2": "bzip2", "zst": "zstd"}[self.value]

    @classmethod
    def of(cls, path: Path) -> Compression | None:
        """The compression of ``path``, from its suffix."""
        return next((c for c in cls if path.suffix == c.suffix), None)

    def open(self, raw: IO[bytes], *, write: bool = False) -> IO[bytes]:
        """A stream over the open compressed file ``raw`` (not for zstd); gzip records no file name."""
        if self is Compression.GZ:
            return gzip.GzipFile(filename="", mode="wb" if write else "rb", fileobj=raw)  # type: ignore[return-value]
        if self is Compression.XZ:
            return lzma.LZMAFile(raw, "wb" if write else "rb")
        return bz2.BZ2File(raw, "wb") if write else bz2.BZ2File(raw, "rb")


def inner_name(path: Path) -> str:
    """``golden.sdimg.xz`` -> ``golden.sdimg``."""
    kind = Compression.of(path)
    return path.name[: -len(kind.suffix)] if kind else path.name


def decompress_sparse(src: Path, dst: Path, progress: Progress | None = None) -> None:
    """Decompress ``src`` into ``dst`` (its mode kept), leaving holes for zero blocks.

    ``progress`` is given the compressed bytes read as they are.
    """
    kind = Compression.of(src)
    if kind is None:
        raise CompressError(f"{src} is not .gz, .xz, .bz2 or .zst")
    if kind is Compression.ZST:
        mode = stat.S_IMODE(dst.stat().st_mode) if dst.exists() else None
        done = run(["zstd", "-q", "-d", "-f", "--sparse", "-o", str(dst), "--", str(src)], timeout=3600, check=False)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
            raise _cannot("decompress", src, dst, last, full="No space left" in last)
        if mode is not None:
            os.chmod(dst, mode)  # zstd gives its output the mode of its input
        if progress:
            progress(src.stat().st_size)
        return
    try:
        with open(src, "rb") as raw, kind.open(raw) as reader, open(dst, "wb") as out:
            size = seen = 0
            while chunk := reader.read(_CHUNK):
                _write_sparse(out, chunk, size)
                size += len(chunk)
                if progress:
                    now = raw.tell()
                    progress(now - seen)
                    seen = now
            out.truncate(size)
    except (OSError, EOFError, lzma.LZMAError) as exc:
        full = isinstance(exc, OSError) and exc.errno in _FULL
        raise _cannot("decompress", src, dst, str(getattr(exc, "strerror", None) or exc), full=full) from exc


def _cannot(doing: str, src: Path, dst: Path, why: str, *, full: bool) -> CompressError:
    if full:
        return CompressError(f"cannot {doing} {src}: {why} (in {dst.parent})", hint="free space there")
    if doing == "decompress":
        return CompressError(f"cannot decompress {src}: {why}", hint="the file is damaged or truncated")
    return CompressError(f"cannot compress {src} into {dst}: {why}")


def _write_sparse(out: IO[bytes], chunk: bytes, offset: int) -> None:
    if chunk == _ZERO[: len(chunk)]:
        return
    view = memoryview(chunk)
    for start in range(0, len(chunk), _BLOCK):
        block = view[start : start + _BLOCK]
        if block != _ZERO[: len(block)]:
            out.seek(offset + start)
            out.write(block)


def compress(src: Path, dst: Path, kind: Compression, progress: Progress | None = None) -> None:
    """Compress ``src`` into ``dst`` (which is overwritten); ``progress`` is given the bytes of ``src`` read."""
    if kind is Compression.ZST:
        run(["zstd", "-q", "-f", "-T0", "-o", str(dst), "--", str(src)], timeout=3600)
        if progress:
            progress(src.stat().st_size)
        return
    try:
        with open(src, "rb") as reader, open(dst, "wb") as raw, kind.open(raw, write=True) as writer:
            while chunk := reader.read(_CHUNK):
                writer.write(chunk)
                if progress:
                    progress(len(chunk))
    except OSError as exc:
        raise _cannot("compress", src, dst, exc.strerror or str(exc), full=exc.errno in _FULL) from exc
    os.chmod(dst, os.stat(src).st_mode & 0o777)


def scratch_dir(image: Path) -> Path:
    """Where a decompressed copy of ``image`` goes: beside it (the same filesystem) if writable, else TMPDIR."""
    beside = image.resolve().parent
    return beside if os.access(beside, os.W_OK | os.X_OK) else Path(tempfile.gettempdir())


@contextmanager
def decompressed(image: Path, directory: Path | None = None, *, meter: Meter = quiet) -> Iterator[Path]:
    """``image`` itself if it is not compressed; else a private, sparse, decompressed copy, removed after.

    The copy is a hidden 0600 file in ``directory`` (by default ``scratch_dir``),
    with the image's own suffix (``.dataimg`` tells a data partition), locked
    while this process lives so that an interrupted run's copy is known for a
    leftover. Errors raised meanwhile name ``image``, not the copy.
    """
    if Compression.of(image) is None or not image.is_file():
        yield image  # what is not a compressed file is for the caller to open, or to refuse
        return
    where = directory or scratch_dir(image)
    try:
        plain = stage(where / inner_name(image))
    except OSError as exc:
        raise CompressError(
            f"cannot decompress {image}: cannot write in {where}: {exc.strerror}",
            hint="free space there, or point TMPDIR at a directory with room",
        ) from exc
    try:
        with meter(f"decompressing {image.name}", image.stat().st_size) as progress:
            decompress_sparse(image, plain, progress)
        yield plain
    except ImageprovError as exc:
        exc.message, exc.hint = (text.replace(str(plain), str(image)) for text in (exc.message, exc.hint))
        exc.args = (exc.message,)
        raise
    finally:
        plain.unlink(missing_ok=True)


def check_write_back(image: Path) -> None:
    """Refuse, before any work, a compressed image that cannot be compressed back over itself."""
    kind = Compression.of(image)
    if kind is None:
        return
    if not image.is_file():
        raise UsageError(f"{image} does not exist" if not image.exists() else f"{image} is not a file")
    real = image.resolve()
    if not os.access(real.parent, os.W_OK | os.X_OK):
        raise CompressError(
            f"cannot write {image} back in place: {real.parent} is not writable",
            hint=f"decompress it where you can write ({kind.tool} -dk), change that, and compress it again",
        )
    if kind is Compression.ZST:
        find_tool("zstd")


def write_back(plain: Path, image: Path, *, meter: Meter = quiet) -> None:
    """Compress ``plain`` over ``image`` (a link's target), in its compression and with its mode, atomically.

    The new file is built beside the image and renamed over it once complete
    and on disk: any failure or interrupt leaves the image as it was.
    """
    kind = Compression.of(image)
    if kind is None:
        raise CompressError(f"{image} is not .gz, .xz, .bz2 or .zst")
    real = image.resolve(strict=True)
    mode = stat.S_IMODE(real.stat().st_mode)
    with staged(real) as packed, meter(f"compressing {image.name}", plain.stat().st_size) as progress:
        compress(plain, packed, kind, progress)
        os.chmod(packed, mode)


@contextmanager
def unpacked(image: Path, *, meter: Meter = quiet) -> Iterator[Path]:
    """A private decompressed copy of the compressed ``image``, beside it, to change and ``write_back``."""
    check_write_back(image)
    with decompressed(image, image.resolve().parent, meter=meter) as plain:
        yield plain


@contextmanager
def editing(image: Path, *, meter: Meter = quiet) -> Iterator[tuple[Path, Path]]:
    """(the image to read, the file to change) for an in-place edit of ``image``, compressed or not.

    The change replaces ``image`` (a link's target) only if no error is raised:
    a plain image through ``edit_in_place``, a compressed one compressed back
    in its own compression.
    """
    if Compression.of(image) is None:
        with edit_in_place(image) as staging:
            yield image, staging
        return
    with unpacked(image, meter=meter) as plain:
        yield plain, plain
        write_back(plain, image, meter=meter)
