"""A squashfs root filesystem inside an image, read with ``unsquashfs`` at the partition's offset.

meta-mender builds read-only root filesystems as squashfs (``ARTIFACTIMG_FSTYPE
= "squashfs"``). imageprov only reads them (the fstab and mender.conf that say
the image's roles and configuration); nothing is ever written into one, since
a squashfs cannot be changed in place: what the device must get goes to the
data partition.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from imageprov.errors import FilesystemError
from imageprov.run import run


class Squashfs:
    """The squashfs at byte ``offset`` of ``image``, named ``name`` in messages."""

    def __init__(self, image: Path, offset: int, name: str) -> None:
        self.image = image
        self.offset = offset
        self.name = name

    def read(self, path: PurePosixPath) -> bytes | None:
        """The content of the regular file at ``path``, or None if there is none."""
        done = run(["unsquashfs", "-o", str(self.offset), "-cat", str(self.image), str(path)], check=False)
        if done.returncode == 0:
            return done.stdout
        if "no matches for" in done.stderr:
            return None
        last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit status {done.returncode}"
        raise FilesystemError(f"cannot read {path} from {self.name} (squashfs): {last}")

    def fetch(self, paths: Sequence[PurePosixPath]) -> dict[PurePosixPath, bytes | None]:
        return {path: self.read(path) for path in dict.fromkeys(paths)}
