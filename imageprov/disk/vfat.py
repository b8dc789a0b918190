"""The vfat boot partition, in place, through pyfatfs opened at the partition's offset."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from fs.errors import FSError
from pyfatfs._exceptions import PyFATException
from pyfatfs.PyFatFS import PyFatFS

from imageprov.errors import FilesystemError


@dataclass(frozen=True)
class VfatEntry:
    name: str
    is_dir: bool
    size: int


@dataclass(frozen=True)
class Vfat:
    """One FAT filesystem at a byte offset of an image file."""

    image: Path
    offset: int
    name: str

    @contextmanager
    def _open(self, *, write: bool) -> Iterator[PyFatFS]:
        try:
            fat = PyFatFS(str(self.image), offset=self.offset, read_only=not write)
        except (PyFATException, FSError, OSError, ValueError) as exc:
            raise FilesystemError(f"cannot open the vfat filesystem on {self.name}: {exc}") from exc
        try:
            yield fat
        except (PyFATException, FSError, OSError, ValueError) as exc:
            raise FilesystemError(f"vfat on {self.name}: {exc}") from exc
        finally:
            fat.close()

    def read(self, path: PurePosixPath) -> bytes:
        """The content of the file at ``path``."""
        with self._open(write=False) as fat:
            if not fat.isfile(str(path)):
                raise FilesystemError(f"{path} is not a file on {self.name}")
            data: bytes = fat.readbytes(str(path))
            return data

    def listdir(self, path: PurePosixPath) -> list[VfatEntry]:
        """The entries of the directory at ``path``."""
        with self._open(write=False) as fat:
            if not fat.isdir(str(path)):
                raise FilesystemError(f"{path} is not a directory on {self.name}")
            out = []
            for name in sorted(fat.listdir(str(path))):
                child = str(path / name)
                is_dir = fat.isdir(child)
                out.append(VfatEntry(name, is_dir, 0 if is_dir else fat.getsize(child)))
            return out

    def write(self, path: PurePosixPath, content: bytes) -> None:
        """Create or replace the file at ``path`` (parents created), then read it back."""
        with self._open(write=True) as fat:
            parent = str(path.parent)
            if parent != "/":
                fat.makedirs(parent, recreate=True)
            fat.writebytes(str(path), content)
        if self.read(path) != content:
            raise FilesystemError(f"{path} on {self.name} does not read back as written")
