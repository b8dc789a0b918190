"""Compressed golden images in, optionally compressed stamped images out.

A compressed golden image is decompressed once per batch into a sparse file
(runs of zero blocks become holes), so that per-device copies stay sparse.
gzip, xz and bzip2 come from the standard library; zstd from the zstd tool,
which writes sparse files itself.
"""

from __future__ import annotations

import bz2
import enum
import gzip
import lzma
import os
from pathlib import Path
from typing import IO

from imageprov.errors import ImageprovError
from imageprov.run import run

_BLOCK = 4096
_CHUNK = 1 << 20
_ZERO = bytes(_CHUNK)


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

    @classmethod
    def of(cls, path: Path) -> Compression | None:
        """The compression of ``path``, from its suffix."""
        return next((c for c in cls if path.suffix == c.suffix), None)

    def open(self, path: Path, mode: str) -> IO[bytes]:
        """A stream over the compressed file (not for zstd)."""
        if self is Compression.GZ:
            return gzip.open(path, mode)  # type: ignore[return-value]
        if self is Compression.XZ:
            return lzma.open(path, mode)  # type: ignore[return-value]
        return bz2.open(path, mode)  # type: ignore[return-value]


def inner_name(path: Path) -> str:
    """``golden.sdimg.xz`` -> ``golden.sdimg``."""
    kind = Compression.of(path)
    return path.name[: -len(kind.suffix)] if kind else path.name


def decompress_sparse(src: Path, dst: Path) -> None:
    """Decompress ``src`` into the new file ``dst``, leaving holes for zero blocks."""
    kind = Compression.of(src)
    if kind is None:
        raise CompressError(f"{src} is not .gz, .xz, .bz2 or .zst")
    if kind is Compression.ZST:
        run(["zstd", "-q", "-d", "-f", "--sparse", "-o", str(dst), "--", str(src)], timeout=3600)
        return
    try:
        with kind.open(src, "rb") as reader, open(dst, "wb") as out:
            size = 0
            while chunk := reader.read(_CHUNK):
                _write_sparse(out, chunk, size)
                size += len(chunk)
            out.truncate(size)
    except (OSError, EOFError, lzma.LZMAError) as exc:
        raise CompressError(f"cannot decompress {src}: {exc}", hint="the file is damaged or truncated") from exc


def _write_sparse(out: IO[bytes], chunk: bytes, offset: int) -> None:
    if chunk == _ZERO[: len(chunk)]:
        return
    view = memoryview(chunk)
    for start in range(0, len(chunk), _BLOCK):
        block = view[start : start + _BLOCK]
        if block != _ZERO[: len(block)]:
            out.seek(offset + start)
            out.write(block)


def compress(src: Path, dst: Path, kind: Compression) -> None:
    """Compress ``src`` into ``dst`` (which is overwritten)."""
    if kind is Compression.ZST:
        run(["zstd", "-q", "-f", "-T0", "-o", str(dst), "--", str(src)], timeout=3600)
        return
    with open(src, "rb") as reader, kind.open(dst, "wb") as writer:
        while chunk := reader.read(_CHUNK):
            writer.write(chunk)
    os.chmod(dst, os.stat(src).st_mode & 0o777)
